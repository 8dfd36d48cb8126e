"""Batched greedy generation for OCR: crops in length-sorted chunks through loader workers, a loop guard
and a cap scaled to each crop, readings back in input order."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import closing
from itertools import islice
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from PIL import Image


def workers_fork() -> bool:
    """Whether loader workers start by fork. With spawn (Windows, macOS) each worker imports torch and
    transformers anew at every generate call: seconds per call, more than the overlap can win back."""
    import multiprocessing

    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return method == "fork"


def default_num_workers(device: str) -> int:
    """Generation's loader workers when the user names none.

    CUDA: 2, leaving at least one core to the main process, which drives the GPU. One worker keeps up as long
    as decoding and preprocessing a batch takes less than generating it; the second covers the batches of the
    largest crops and a slow disk, for the cost of one more forked process. CPU: none. generate() already runs
    torch's threads on every core there, so a worker competes with it for the same cores instead of filling
    time a device would otherwise sit idle."""
    if not device.startswith("cuda") or not workers_fork():
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(2, cores - 1))


@runtime_checkable
class Crops(Protocol):
    """What generation reads: sizes in the main process (they order the batches, nothing is decoded there)
    and images where the loader runs, a worker process when num_workers > 0. data.dataset.RecordCrops (JSONL
    records), predict.py's files and page boxes, and ImageList (images in memory) implement it."""

    def __len__(self) -> int: ...

    def size(self, i: int) -> tuple[int, int]: ...  # (width, height), as image(i) will have it

    def image(self, i: int) -> Image.Image: ...


class ImageList:
    """Crops already decoded. Workers inherit them when they fork (spawn would pickle them)."""

    def __init__(self, images: Sequence[Image.Image]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def size(self, i: int) -> tuple[int, int]:
        return self.images[i].size

    def image(self, i: int) -> Image.Image:
        return self.images[i]


class _WorkerError:
    """An exception raised in a loader worker, sent back as data and raised again in the main process.

    Raised there, DataLoader would re-raise it as the same type with the worker's traceback in its message,
    so a DatasetError would no longer print as one `error:` line. The traceback rides along as a note."""

    def __init__(self, error: Exception) -> None:
        import pickle
        import traceback

        note = "raised in a generation loader worker:\n" + "".join(traceback.format_exception(error)).rstrip()
        try:
            pickle.loads(pickle.dumps(error))  # an exception that cannot travel would hang the loader
        except Exception:
            error = RuntimeError(f"{type(error).__name__}: {error}")
        self.error, self.note = error, note

    def raise_again(self) -> None:
        self.error.add_note(self.note)
        raise self.error


class _Batches(torch.utils.data.Dataset):
    """Item b: batch b's crops loaded and turned into generate() inputs (runs in a worker when there are)."""

    def __init__(self, processor: Any, crops: Crops, batches: list[list[int]]) -> None:
        self.processor, self.crops, self.batches = processor, crops, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> tuple[list[int], dict[str, torch.Tensor] | _WorkerError]:
        from paddleocr_vl_manga.data.collator import generation_batch  # fit_image happens in there

        idx = self.batches[b]
        try:
            return idx, generation_batch(self.processor, [self.crops.image(i) for i in idx])
        except Exception as e:
            if torch.utils.data.get_worker_info() is None:
                raise  # the main process: it keeps its own traceback
            return idx, _WorkerError(e)


def pin_memory(model: Any, num_workers: int) -> bool:
    """Whether generation's loader pins its batches: on CUDA, with workers. Pinned pages make the copy to the
    GPU asynchronous; without workers, pinning is one more copy in the main process."""
    return next(model.parameters()).device.type == "cuda" and num_workers > 0


def _quiet_worker(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: the main process alone handles it and shuts the workers down.
    A worker it interrupted mid-send printed a traceback (fd sharing), so workers ignore SIGINT; and when the
    main process leaves in the middle of fetching a batch's file descriptors, the worker's resource_sharer
    thread fails to accept that connection and prints it through sys.excepthook: nothing a user can act on."""
    import signal
    from multiprocessing import AuthenticationError

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    report = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not issubclass(kind, (ConnectionError, EOFError, AuthenticationError)):
            report(kind, value, tb)

    sys.excepthook = hook


def _as_is(item: Any) -> Any:  # collate_fn: items already are batches (a module function: spawn pickles it)
    return item


class Chunk(NamedTuple):
    """Consecutive crops of a crop_chunks plan; its batches are loaded as generate_texts asks for them."""

    positions: list[int]  # the crops' indices, ascending
    batches: Iterator[tuple[list[int], dict[str, torch.Tensor]]]
    num_batches: int
    sizes: dict[int, tuple[int, int]]  # crop index -> (width, height): the answer's token cap follows it


# Bounded answers. A reader's tool calls once per text line and waits: a model that loops on a blurry or
# empty crop (PaddleOCR #17903, #16710) must stop early, and no crop may run to a large fixed cap.
AUTO_MAX_NEW_TOKENS = 256  # the cap when none is given; each crop's own cap (auto_max_new_tokens) is lower
PIXELS_PER_TOKEN = 100  # a 10 x 10 px glyph, smaller than printed manga text: at most one token each
LOOP_MAX_NGRAM = 12  # a loop is the same n-gram (n <= this) repeated ...
LOOP_MIN_REPEATS = 4  # ... at least this often ...
LOOP_MIN_SPAN = 24  # ... over at least this many tokens ("ドドドド…" of 23 same tokens still passes)


def generation_flag_error(
    max_new_tokens: int | None, min_pixels: int | None, max_pixels: int | None
) -> str | None:
    """What is wrong with evaluation's and prediction's generation flags, before anything loads; None: fine.

    --max_new_tokens 0 was ignored (each crop's own cap) while metrics.json recorded 0, -1 crashed in
    generate(); --min_pixels above --max_pixels resized every crop to the wrong budget (CER 406 % against
    26.5 % on the same crops)."""
    if max_new_tokens is not None and max_new_tokens <= 0:
        return (f"--max_new_tokens must be a positive number of tokens, got {max_new_tokens} (leave it out "
                "for each crop's own cap, from its size)")
    for flag, value in (("--min_pixels", min_pixels), ("--max_pixels", max_pixels)):
        if value is not None and value <= 0:
            return f"{flag} must be a positive number of pixels, got {value}"
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        return f"--min_pixels {min_pixels} is above --max_pixels {max_pixels}: give min_pixels <= max_pixels"
    return None


def pixel_bounds_error(processor: Any, model_path: str) -> str | None:
    """The image budget after --min_pixels / --max_pixels met the checkpoint's own (one flag alone can
    cross the other bound of preprocessor_config.json); None: fine."""
    size = processor.image_processor.size
    low, high = size["shortest_edge"], size["longest_edge"]
    if low > high:
        return (f"min_pixels {low} is above max_pixels {high} (flags and {model_path}'s "
                "preprocessor_config.json together): give min_pixels <= max_pixels")
    return None


def auto_max_new_tokens(width: int, height: int, cap: int = AUTO_MAX_NEW_TOKENS) -> int:
    """A crop's token cap: 16 plus one token per PIXELS_PER_TOKEN px of the crop as given, at most `cap`."""
    return max(1, min(cap, 16 + math.ceil(width * height / PIXELS_PER_TOKEN)))


def loop_tail(tokens: Sequence[int]) -> int:
    """How many trailing tokens to cut when the sequence ends in a loop (all but one pass of it), else 0."""
    for n in range(1, LOOP_MAX_NGRAM + 1):
        k = max(LOOP_MIN_REPEATS, math.ceil(LOOP_MIN_SPAN / n))
        tail = list(tokens[-k * n :])
        if len(tail) == k * n and tail == tail[:n] * k:
            return (k - 1) * n
    return 0


class LoopAndCapStop:
    """generate()'s stopping criterion: each sequence ends at its own token cap or once it loops
    (loop_tail's rule, on the device without reading anything back)."""

    def __init__(self, prompt_length: int, caps: torch.Tensor) -> None:
        self.prompt_length, self.caps = prompt_length, caps

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_length :]
        done = new.shape[1] >= self.caps
        for n in range(1, LOOP_MAX_NGRAM + 1):
            k = max(LOOP_MIN_REPEATS, math.ceil(LOOP_MIN_SPAN / n))
            if new.shape[1] < k * n:
                break
            tail = new[:, -k * n :].reshape(len(new), k, n)
            done = done | (tail == tail[:, :1]).flatten(1).all(1)
        return done


class Reading(NamedTuple):
    """One crop's answer and why generation ended: eos (the model finished), cap (its token cap was
    reached) or loop (the repetition guard stopped it; the repeats are cut from the text).

    confidence: the geometric mean of the probabilities the model gave its own greedy tokens, over the
    tokens kept plus the end token when it stopped by itself: exp(mean log p), in [0, 1]. A geometric mean,
    not the product, so a 40-token line is not judged less sure than a 4-token one for its length alone; not
    the arithmetic mean, so one near-zero token (a glyph the model had to guess) pulls it down clearly.
    min_probability: the least sure of those tokens, the weakest glyph, beside it."""

    text: str
    stop: str
    confidence: float = float("nan")
    min_probability: float = float("nan")


def _raise_worker_errors(batches: Iterator) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    for idx, batch in batches:
        if isinstance(batch, _WorkerError):
            batch.raise_again()
        yield idx, batch


def crop_chunks(
    processor: Any,
    crops: Crops,
    *,
    batch_size: int,
    chunk_size: int | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[Chunk]:
    """Cut `crops` into chunks of chunk_size consecutive crops (None: one chunk) and each chunk into batches
    of similar image-token count, all read through one DataLoader.

    With num_workers > 0, worker processes load and preprocess the next batches, across chunk boundaries,
    while the model generates; batches still arrive in order, and an error reaches the caller when its
    batch's turn comes (so every chunk before it is complete). Feed each chunk to generate_texts, in order.
    Close the generator (contextlib.closing) to stop the workers early.
    """
    from torch.utils.data import DataLoader

    from paddleocr_vl_manga.data.collator import num_image_tokens

    n = len(crops)
    if n == 0:
        return
    step = chunk_size or n
    tokens = [num_image_tokens(processor, *crops.size(i)) for i in range(n)]
    plan = []
    for start in range(0, n, step):
        part = sorted(range(start, min(start + step, n)), key=tokens.__getitem__)
        plan.append([part[k : k + batch_size] for k in range(0, len(part), batch_size)])
    dataset = _Batches(processor, crops, [batch for chunk in plan for batch in chunk])
    loader = DataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, collate_fn=_as_is,
        worker_init_fn=_quiet_worker,
    )
    batches = _raise_worker_errors(iter(loader))
    for chunk in plan:
        positions = sorted(i for batch in chunk for i in batch)
        yield Chunk(positions, islice(batches, len(chunk)), len(chunk), {i: crops.size(i) for i in positions})


def generate_texts(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image] | Crops | Chunk,
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = False,
    use_cache: bool = True,
    num_workers: int = 0,
) -> list[str]:
    """Greedy OCR of crops: the texts of generate_readings."""
    return [r.text for r in generate_readings(
        model, processor, images, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
        use_cache=use_cache, num_workers=num_workers,
    )]


@torch.inference_mode()
def generate_readings(
    model: Any,
    processor: Any,
    images: Sequence[Image.Image] | Crops | Chunk,
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    progress: bool = False,
    use_cache: bool = True,
    num_workers: int = 0,
) -> list[Reading]:
    """Greedy OCR of crops, batched with left padding and the KV cache; results in input order.

    `images`: decoded crops, a Crops (read by `num_workers` loader processes, prefetching while the model
    generates), or one Chunk of crop_chunks (batched there already: batch_size and num_workers do not apply;
    the results follow chunk.positions). Crops are sorted by their image-token count so each batch pads
    little.
    max_new_tokens: None gives each crop its own cap from its size (auto_max_new_tokens); a number is the cap
    of every crop. A sequence that loops is stopped and its repeats cut (loop_tail). The released generation
    config turns the KV cache off (the seed evaluated that way, one crop at a time: batch_size=1,
    use_cache=False); the cache is what makes batches fast.
    """
    if max_new_tokens is not None and max_new_tokens <= 0:  # 0 used to mean "auto" silently
        raise ValueError(f"max_new_tokens must be positive (None: each crop's own cap), got {max_new_tokens}")
    if isinstance(images, Chunk):
        return _generate_chunk(model, processor, images, max_new_tokens, progress, use_cache)
    crops = images if isinstance(images, Crops) else ImageList(images)
    with closing(crop_chunks(processor, crops, batch_size=batch_size, num_workers=num_workers,
                             pin_memory=pin_memory(model, num_workers))) as chunks:
        return [r for chunk in chunks for r in _generate_chunk(model, processor, chunk, max_new_tokens,
                                                               progress, use_cache)]


class TokenProbabilities:
    """generate()'s last logits processor: records log p of the token greedy decoding picks at each step,
    the largest log-softmax of the scores it chooses from. Read from the logits generate() computes anyway:
    no second forward pass, one log-softmax over the vocabulary per step (kept on the device to the end)."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(torch.log_softmax(scores.float(), dim=-1).amax(dim=-1))
        return scores

    def rows(self) -> list[list[float]]:
        """Per sequence, the log probability of each generated token, in order."""
        return torch.stack(self.steps, dim=1).tolist() if self.steps else []


def confidence_of(log_probs: Sequence[float]) -> tuple[float, float]:
    """(geometric mean probability, minimum probability) of a reading's tokens; an answer of no tokens at
    all (generation capped at 0 steps) has no evidence either way: (0.0, 0.0)."""
    if not log_probs:
        return 0.0, 0.0
    return math.exp(sum(log_probs) / len(log_probs)), math.exp(min(log_probs))


def _read(tokens: list[int], eos_id: int, pad_id: int, cap: int) -> tuple[list[int], str]:
    """A generated row -> (answer tokens, why it ended)."""
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id)], "eos"
    while tokens and tokens[-1] == pad_id:  # rows stopped before the batch's last step are padded
        tokens = tokens[:-1]
    cut = loop_tail(tokens)
    if cut:
        return tokens[:-cut], "loop"
    return tokens, "cap" if len(tokens) >= cap else "eos"


def _generate_chunk(
    model: Any, processor: Any, chunk: Chunk, max_new_tokens: int | None, progress: bool, use_cache: bool
) -> list[Reading]:
    from tqdm import tqdm
    from transformers import LogitsProcessorList, StoppingCriteriaList

    readings: dict[int, Reading] = {}
    device = next(model.parameters()).device
    pad_id = processor.tokenizer.pad_token_id
    eos_id = processor.tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(chunk.batches, total=chunk.num_batches, desc="generating", disable=not progress,
                   unit="batch")
        for idx, batch in bar:  # the loader prepares the next batches meanwhile
            caps = [max_new_tokens or auto_max_new_tokens(*chunk.sizes[i]) for i in idx]  # checked > 0
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            n_prompt = batch["input_ids"].shape[1]
            stop = LoopAndCapStop(n_prompt, torch.tensor(caps, device=device))
            probabilities = TokenProbabilities()
            out = model.generate(
                **batch, max_new_tokens=max(caps), do_sample=False, use_cache=use_cache,
                pad_token_id=pad_id, eos_token_id=eos_id, stopping_criteria=StoppingCriteriaList([stop]),
                logits_processor=LogitsProcessorList([probabilities]),
            )
            for i, row, cap, log_probs in zip(idx, out[:, n_prompt:].tolist(), caps, probabilities.rows(),
                                              strict=True):
                tokens, why = _read(row, eos_id, pad_id, cap)
                # the kept tokens, and the end token when the model chose to stop (its sureness that the
                # line is complete); a loop's cut repeats and a cap's missing end say nothing more
                kept = len(tokens) + (why == "eos" and eos_id in row)
                readings[i] = Reading(processor.decode(tokens, skip_special_tokens=True), why,
                                      *confidence_of(log_probs[:kept]))
    finally:  # also when generation fails, e.g. during training-time evaluation
        model.train(was_training)
    return [readings[i] for i in chunk.positions]
