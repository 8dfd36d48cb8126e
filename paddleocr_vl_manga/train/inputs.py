"""A run's data before any weight loads: the splits filtered by one length rule, the answer tokens checked on
the user's tokenizer, unreadable crops left out and counted, and the memory plan."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import TrainingArguments

from paddleocr_vl_manga.data.collator import (
    answer_ids,
    answer_tokens_line,
    configure_image_size,
    whitespace_start,
)
from paddleocr_vl_manga.data.dataset import (
    DatasetError,
    OCRDataset,
    mixed_train_dataset,
    spread_sample,
)
from paddleocr_vl_manga.data.lengths import (
    SplitLengths,
    check_fits,
    filter_split,
    image_tokens,
)
from paddleocr_vl_manga.model.loading import (
    CheckedModel,
    load_config_and_processor,
)
from paddleocr_vl_manga.model.output_vocabulary import label_vocabulary
from paddleocr_vl_manga.train.arguments import DataArguments, ModelArguments, activation_checkpointing

logger = logging.getLogger("sft")

class TrainData(NamedTuple):
    """Everything about the data and the checkpoint that needs no weights."""

    train: OCRDataset
    val: OCRDataset | None
    mix: list[dict]
    checked: CheckedModel
    splits: list[SplitLengths]  # train, then val and test where present
    answer_tokens: str = ""  # the first train answer's labelled tokens (check_answer_tokens)
    output_vocabulary: tuple[int, ...] = ()  # sorted ids every train label uses, eos included


class AnswerTokenError(DatasetError):
    """A train answer's labels would start with a whitespace-only token."""


def check_answer_tokens(tokenizer: Any, records: list[dict], labels: list[list[int]] | None = None) -> str:
    """One line with the first train answer's labelled ids and pieces on this (the user's) tokenizer, after
    checking every train answer: raises AnswerTokenError if any label starts with a whitespace-only piece, or
    with a piece that merges in a space ("▁O"); answer_ids drops the whitespace a text itself starts with.

    The prompt ends in its own "▁" (v1) or "\n" (1.5/1.6); a label starting with "▁" would teach the model
    to emit a second space there, on every crop if the tokenizer puts it before each text (add_prefix_space,
    which answer_ids turns off: this is the check that it did, on the files the run really loads).
    `labels`: the records' answer_ids, when the caller has them already."""
    texts = [r["text"] for r in records]
    labels = answer_ids(tokenizer, texts) if labels is None else labels
    firsts = {ids[0] for ids in labels}  # a few thousand distinct first tokens: each checked once
    blank = {i for i in firsts if whitespace_start(tokenizer, [i])}
    # a space merged into the first piece ("▁O" for "OK") is as wrong (answer_ids drops a text's own)
    spaced = {i for i in firsts if str(tokenizer.convert_ids_to_tokens(i)).startswith("▁")}
    bad = [k for k, ids in enumerate(labels) if ids[0] in blank or ids[0] in spaced]
    if bad:
        k = bad[0]
        raise AnswerTokenError(
            f"{len(bad)} of {len(texts)} train answers would be labelled starting with a whitespace-only "
            f"token or a space the text does not have, the first {records[k].get('id', k)!r} {texts[k]!r} -> "
            f"pieces {tokenizer.convert_ids_to_tokens(labels[k])}: the model would learn to emit a space "
            "after the prompt's own; the tokenizer puts a space before the text that answer_ids did not "
            "remove"
        )
    return answer_tokens_line(tokenizer, texts[0])


def train_data(
    model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments, decode: bool = True
) -> TrainData:
    """Read the splits and the checked config/processor, filter every split by one length rule (the owner:
    data.lengths), and (decode) leave out crops that cannot be decoded (drop_unreadable). Raises
    DatasetError / ModelLoadError."""
    # data first: a missing split should fail before minutes of downloading and loading weights
    train_ds, mix = mixed_train_dataset(
        data_args.data_dir, seed=args.data_seed or args.seed, augment=data_args.augment,
        max_samples=data_args.max_train_samples,
    )
    if not len(train_ds):
        raise DatasetError(f"{Path(mix[0]['folder']) / 'train.jsonl'} has no samples")
    logger.info("train samples per folder: %s", ", ".join(f"{m['folder']}: {m['drawn']}" for m in mix))
    data = Path(mix[0]["folder"])  # val/test: the first folder only
    splits = {name: data / f"{name}.jsonl" for name in ("val", "test")}
    present = {name: OCRDataset(p) for name, p in splits.items() if p.is_file() and p.stat().st_size > 0}
    checked = load_config_and_processor(model_args.model_path, trust_remote_code=model_args.trust_remote_code)
    configure_image_size(checked.processor, data_args.min_pixels, data_args.max_pixels)
    limit, processor = data_args.max_length, checked.processor
    labels = answer_ids(processor.tokenizer, [r["text"] for r in train_ds.records])  # once for all uses
    answer_tokens = check_answer_tokens(processor.tokenizer, train_ds.records, labels)
    logger.info("%s", answer_tokens)
    # every train answer's tokens (a few over max_length too): the rows the fine-tuned lm_head needs
    vocabulary = tuple(label_vocabulary(labels))
    logger.info("output vocabulary: %d distinct label tokens, eos included", len(vocabulary))
    results = [filter_split("train", train_ds, processor, limit, augment=data_args.augment, answers=labels)]
    if "val" in present:
        results.append(filter_split("val", present["val"], processor, limit))
    check_fits(results, data_args.on_overlong)
    if "test" in present:  # not used in training: counted so the user knows what evaluation will meet
        results.append(filter_split("test", present["test"], processor, limit, drop=False))
    for r in results:
        (logger.warning if r.dropped or r.padded else logger.info)("%s", r.line(used=r.split != "test"))
    if not results[0].lengths:
        raise DatasetError(f"every train sample is longer than --max_length {limit}")
    if "val" in present and not len(present["val"]):
        logger.warning("every val crop is over --max_length %d: no evaluation", limit)
        del present["val"]
    data = TrainData(train_ds, present.get("val"), mix, checked, results, answer_tokens, vocabulary)
    if decode:  # by this process alone (the rehearsal's rank 0); build_trainer shares it among the ranks
        drop_unreadable(data)
    return data


def unreadable(path: str) -> str | None:
    """Why the crop at `path` cannot be decoded (None: it can). A full decode, as training does: PIL's
    verify() takes half the time but misses a truncated JPEG and refuses a PNG that lacks only its end mark
    (docs/training.md#faults)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for some broken headers
        return str(e) or type(e).__name__
    return None


def drop_unreadable(data: TrainData, rank: int = 0, world: int = 1) -> None:
    """Decode every train and val crop before training: one truncated PNG would otherwise stop the run when
    its batch comes up, hours in (or go unnoticed by a short run). Unreadable crops are left out (with their
    lengths) and counted in one warning per split naming the first; none readable is a DatasetError."""
    for split, ds in (("train", data.train), ("val", data.val)):
        if ds is None:
            continue
        keep = readable(split, ds, rank, world)
        if not all(keep):
            ds.records = [r for r, k in zip(ds.records, keep, strict=True) if k]
            lengths = next(r for r in data.splits if r.split == split)
            lengths.lengths = [n for n, k in zip(lengths.lengths, keep, strict=True) if k]


def readable(split: str, ds: OCRDataset, rank: int = 0, world: int = 1) -> list[bool]:
    """Per record of `ds`: can its crop be decoded? Warns once naming the first that cannot. Each of the
    `world` ranks decodes every world-th crop and all get the whole verdict: the ranks keep the same crops
    (DDP's sampler shards by index and length), and 8 ranks of a node don't each decode all 150k."""
    from concurrent.futures import ThreadPoolExecutor

    # PIL decodes with the GIL released; each process (rank) of this node checks with its share of the CPUs
    # it may use (a Slurm or container job may be given fewer than the machine has)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        mine = list(pool.map(unreadable, [r["image_path"] for r in ds.records[rank::world]]))
    shares = [mine]
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, mine)
    why: list[str | None] = [None] * len(ds.records)
    for r, share in enumerate(shares):
        why[r::world] = share
    bad = [(r, w) for r, w in zip(ds.records, why, strict=True) if w is not None]
    logger.info("%s: %d crops decoded in %.1f s (%d on this rank, %d threads)", split, len(ds.records),
                time.monotonic() - started, len(mine), threads)
    if bad:
        first, reason = bad[0]
        where = f"{first.get('_source', ds.path)}:{first['_line']} ({first['image_path']}: {reason})"
        if len(bad) == len(ds.records):
            raise DatasetError(f"{split}: none of the {len(bad):,} crops can be decoded, e.g. {where}")
        logger.warning("%s: %d of %d crops cannot be decoded and are left out, e.g. %s", split, len(bad),
                       len(ds.records), where)
    return [w is None for w in why]


def run_memory_plan(
    model_args: ModelArguments, data_args: DataArguments, args: TrainingArguments, data: TrainData
) -> str:
    """The memory plan for a micro-batch of the longest train sample (peak memory follows the longest)."""
    from paddleocr_vl_manga.train.memory_plan import format_plan, gpu_memory_bytes, memory_plan

    checked, ds, lengths = data.checked, data.train, data.splits[0].lengths
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    multiple = data_args.pad_to_multiple_of or 1
    rows = memory_plan(
        checked.config,
        batch_size=args.per_device_train_batch_size,
        seq_len=-(-lengths[longest] // multiple) * multiple,
        image_tokens=image_tokens(checked.processor, *ds.image_sizes()[longest], augment=data_args.augment),
        gradient_checkpointing=activation_checkpointing(args),
        bf16_autocast=args.bf16,
        lora_r=model_args.lora_r,
        lora_targets=model_args.lora_targets,
        lora_precision=model_args.precision,
        lora_dropout=model_args.lora_dropout,
    )
    chosen = "lora" if model_args.lora_r else model_args.precision
    return format_plan(rows, chosen, gpu_memory_bytes())


def eval_datasets(
    val: OCRDataset | None, data_args: DataArguments, args: TrainingArguments
) -> tuple[OCRDataset | None, OCRDataset | None]:
    """(val set for the loss, val sample for CER): drawn once from the filtered val with the seed, spread over
    every val book (the JSONL is in title/page order: its first N crops are one book). Rank 0 writes the ids
    to eval_sample_ids.json."""
    if val is None:
        return None, None
    seed = args.data_seed or args.seed
    n_loss, n_gen = data_args.max_eval_samples, data_args.eval_generation_samples
    loss = val.with_records(spread_sample(val.records, n_loss, seed)) if n_loss is not None else val
    gen = val.with_records(spread_sample(val.records, n_gen, seed)) if n_gen > 0 else None
    if args.process_index == 0:
        ids = {"generation": [r["id"] for r in gen.records] if gen else [],
               "loss": [r["id"] for r in loss.records]}
        path = Path(args.output_dir) / "eval_sample_ids.json"
        path.write_text(json.dumps(ids, ensure_ascii=False, indent=0) + "\n")
    return loss, gen
