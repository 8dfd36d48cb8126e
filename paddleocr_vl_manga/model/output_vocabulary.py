"""The fine-tuned model's output vocabulary: the token ids its labels use, and an lm_head of just those rows.

A manga reader fine-tuned on Manga109 only ever writes the tokens its training answers contain (plus eos):
a few thousand of PaddleOCR-VL's 103,424. Yet every decoded token multiplies the hidden state by the whole
103,424 x 1,024 lm_head, 33 ms of the ~50 ms an int8 token takes on a 2-core laptop CPU (issue 30).

Training writes the ids its labels use, sorted, to OUTPUT_VOCABULARY_FILE (`output_vocabulary.json`, a JSON
list) beside the final model and in every checkpoint; the export keeps it beside the weights. A model folder
that holds one is loaded for inference (model.loading.load_for_inference) with `restrict_lm_head`: lm_head
becomes a Linear of those k rows only, and its k logits are scattered into a -inf-filled vocabulary-sized
tensor, so generate(), its logits processors and the token ids it returns work unchanged. Greedy decoding is
exact whenever the full model's choice lies in the set: the same rows give the same logits (bit for bit on
this CPU, except where the BLAS takes another kernel for a tiny shape, 47 rows at batch 1: 6e-8 apart, which
only a tie that close could flip); otherwise the best token inside the set is chosen. Probabilities read
from these logits (generation.TokenProbabilities) are within the restricted set.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers.utils import cached_file

OUTPUT_VOCABULARY_FILE = "output_vocabulary.json"
logger = logging.getLogger("output_vocabulary")


class OutputVocabularyError(ValueError):
    """A model's output_vocabulary.json is unusable (the commands print it as one `error: ...` line)."""


def label_vocabulary(labels: Iterable[Iterable[int]]) -> list[int]:
    """The sorted distinct ids of tokenized labels (data.collator.answer_ids: each answer ends in eos)."""
    return sorted({i for ids in labels for i in ids})


def write_output_vocabulary(folder: str | Path, ids: list[int]) -> Path:
    """Write `ids` (sorted, distinct) as folder/output_vocabulary.json; return the file's path."""
    path = Path(folder) / OUTPUT_VOCABULARY_FILE
    path.write_text(json.dumps(sorted(set(ids))) + "\n", encoding="utf-8")
    return path


def vocabulary_file(model_path: str, *, local_files_only: bool = False) -> Path | None:
    """The model's output_vocabulary.json (a local folder's, or a hub model's through the hub cache), or
    None when it has none (the base model, a model trained before the file existed)."""
    folder = Path(model_path).expanduser()
    if folder.is_dir():
        return folder / OUTPUT_VOCABULARY_FILE if (folder / OUTPUT_VOCABULARY_FILE).is_file() else None
    found = cached_file(model_path, OUTPUT_VOCABULARY_FILE, local_files_only=local_files_only,
                        _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    return Path(found) if found else None


def read_output_vocabulary(path: str | Path, vocab_size: int) -> list[int]:
    """The sorted distinct ids in the output_vocabulary.json at `path`; OutputVocabularyError naming the
    file when it is not a non-empty JSON list of ids below vocab_size."""
    try:
        ids = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutputVocabularyError(f"{path}: not readable as JSON ({e}); a list of token ids was expected "
                                    "(delete the file to use the full vocabulary)") from None
    if not isinstance(ids, list) or not ids:
        raise OutputVocabularyError(f"{path}: expected a non-empty JSON list of token ids, got "
                                    f"{type(ids).__name__} {str(ids)[:40]}")
    bad = [i for i in ids if type(i) is not int or not 0 <= i < vocab_size]
    if bad:
        raise OutputVocabularyError(f"{path}: {len(bad)} entries are not token ids of this model (0 to "
                                    f"{vocab_size - 1}), e.g. {bad[0]!r}: it belongs to another model?")
    return sorted(set(ids))


class RestrictedHead(nn.Module):
    """lm_head with only the rows of `ids`: `linear` (k rows, quantized like any Linear) computes k logits,
    scattered into a -inf-filled tensor of `vocab_size` (one fill per call against the matmul's saved
    (vocab_size - k) x hidden multiply-adds: 103,424 x 1,024 per token for the release)."""

    def __init__(self, full: nn.Linear, ids: list[int]) -> None:
        super().__init__()
        index = torch.tensor(ids, dtype=torch.long, device=full.weight.device)
        self.vocab_size = full.out_features
        self.linear = nn.Linear(full.in_features, len(ids), bias=full.bias is not None,
                                device=full.weight.device, dtype=full.weight.dtype)
        with torch.no_grad():  # copies: the full matrix is freed once lm_head is replaced
            self.linear.weight.copy_(full.weight[index])
            if full.bias is not None:
                self.linear.bias.copy_(full.bias[index])
        self.register_buffer("ids", index, persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        small = self.linear(hidden_states)
        logits = small.new_full((*small.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.ids, small)

    def extra_repr(self) -> str:
        return f"{self.linear.out_features} of {self.vocab_size} rows"


def _refuse_to_save(rows: int, vocab_size: int, *args: object, **kwargs: object) -> None:
    # save_pretrained would write lm_head.linear.weight (k rows) and no lm_head.weight: a random head on load
    raise OutputVocabularyError(f"this model's lm_head holds {rows:,} of {vocab_size:,} rows "
                                "(output_vocabulary.json), which no loader can read back: load it with "
                                "full_vocabulary=True to save it")


def restrict_lm_head(model: nn.Module, ids: list[int]) -> nn.Module:
    """Replace model.lm_head (an nn.Linear) by a RestrictedHead of `ids`, in place; return the model.
    Do it before quantize_model, which then quantizes the small head as it would have the full one."""
    full = model.get_output_embeddings()
    if not isinstance(full, nn.Linear):
        raise OutputVocabularyError(f"cannot restrict an lm_head of type {type(full).__name__}")
    model.set_output_embeddings(RestrictedHead(full, ids))
    # this instance only; a partial of ints, not a closure over `full`: its matrix must be freed, and the
    # model must still pickle
    model.save_pretrained = functools.partial(_refuse_to_save, len(ids), full.out_features)
    return model


def head_size(model: nn.Module) -> str:
    """Which lm_head the model computes: "3,021 of 103,424 tokens" (restricted) or "all 103,424 tokens"."""
    head = model.get_output_embeddings()
    if isinstance(head, RestrictedHead):
        return f"{head.linear.out_features:,} of {head.vocab_size:,} tokens"
    return f"all {getattr(head, 'out_features', 0):,} tokens"


def head_line(model: nn.Module) -> str:
    """The line the commands print at load: head_size, and for a restricted head what it cannot write and the
    flag that reads it (a fine-tune's labels rarely hold every name or rare kanji a reader meets)."""
    line = f"lm_head: {head_size(model)}"
    if isinstance(model.get_output_embeddings(), RestrictedHead):
        line += (" (output_vocabulary.json: the tokens training's labels used; a character no label had "
                 "cannot be read: --full_vocabulary computes all)")
    return line


def apply_output_vocabulary(
    model: nn.Module, model_path: str, *, full_vocabulary: bool = False, local_files_only: bool = False
) -> str:
    """Restrict the model's lm_head to its output_vocabulary.json, unless full_vocabulary or it has none;
    return (and log once) which head is in use, e.g. "lm_head: 3,021 of 103,424 tokens (.../output_
    vocabulary.json)". Call it before quantize_model."""
    vocab_size = model.get_output_embeddings().out_features
    path = vocabulary_file(model_path, local_files_only=local_files_only)
    if path is None or full_vocabulary:
        why = "full vocabulary asked for" if path is not None else f"no {OUTPUT_VOCABULARY_FILE}"
        line = f"lm_head: all {vocab_size:,} tokens ({why})"
    else:
        ids = read_output_vocabulary(path, vocab_size)
        restrict_lm_head(model, ids)
        line = f"lm_head: {len(ids):,} of {vocab_size:,} tokens ({path})"
    logger.info("%s", line)
    return line
