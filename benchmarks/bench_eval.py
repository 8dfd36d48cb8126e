"""Time evaluate_model.py's generation path against the seed project's one-crop-at-a-time loop.

    python benchmarks/bench_eval.py --model tiny --num_samples 64        # CPU: tiny random model
    python benchmarks/bench_eval.py --model full --num_samples 256       # GPU: full-size random weights

Both paths OCR the same crops (cut by prepare_manga109_data.py from synthetic full-size pages, so crop sizes
are realistic) with greedy decoding:
  batched   model.generation.generate_texts: batches of --batch_size, left padding, KV cache on
  seed loop one crop per model.generate(..., use_cache=False), as the seed project evaluated
`full` is PaddleOCRVLConfig() (0.9B, untied lm_head) with random weights in bf16 on CUDA, driven by the
release-like processor (tools/make_tiny_model.release_processor: the release's token ids, tokenizer, chat
template and image bounds, min_pixels 147384, max_pixels 2822400). Random weights rarely emit </s>, so
every crop generates --max_new_tokens tokens; the default 16 is about one manga text line. A path or hub
id is loaded as is.
--num_workers N adds the path evaluate_model.py takes: generate_texts reading the crop files itself, chunk by
chunk (decode + fit_image + processor inside the timing), with 0 and with N loader workers that prepare the
next batches while the model generates. Besides the seconds it reports how long the main process waited
for its next batch: with 0 workers that is the whole preparation, with N the part the workers did not hide.
On a CPU the workers share the cores with generation, so the wait can shrink while the total does not.
--json writes the figures; --deadline (Unix time, set by benchmarks/gpu_suite.py) stops the repeats, and the
seed loop after the 16-crop chunk that ends past it (its rate then comes from the crops it read).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paddleocr_vl_manga.data.manga109 as prep  # noqa: E402
from benchmarks.full_size import build_full_size_random  # noqa: E402
from paddleocr_vl_manga.data.dataset import RecordCrops, load_image, read_jsonl  # noqa: E402
from paddleocr_vl_manga.evaluate.evaluation import device_description  # noqa: E402
from paddleocr_vl_manga.model.generation import crop_chunks, generate_texts, pin_memory  # noqa: E402
from paddleocr_vl_manga.model.loading import load_model_and_processor  # noqa: E402
from tools.make_synthetic_manga109 import CHARSET, generate  # noqa: E402
from tools.make_tiny_model import build_tiny_model  # noqa: E402


def full_size_random(device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    model, processor = build_full_size_random(dtype=dtype, device=device)
    with torch.no_grad():
        # Ids past the small tokenizer decode to nothing; zero logits for them (same compute) make greedy
        # pick decodable ids, so comparing the two paths' texts means something.
        model.get_output_embeddings().weight[len(processor.tokenizer) :] = 0
    return model.eval(), processor


def seed_loop(model: Any, processor: Any, images: list, max_new_tokens: int) -> list[str]:
    """The seed project's evaluation: one crop per generate() call, KV cache off."""
    return generate_texts(model, processor, images, batch_size=1, max_new_tokens=max_new_tokens,
                          use_cache=False)


def seed_loop_until(model: Any, processor: Any, images: list, max_new_tokens: int,
                    deadline: float | None, chunk: int = 16) -> list[str]:
    """seed_loop over the first crops that fit before `deadline` (whole 16-crop chunks; None: every crop)."""
    if deadline is None:
        return seed_loop(model, processor, images, max_new_tokens)
    texts: list[str] = []
    for start in range(0, len(images), chunk):
        texts += seed_loop(model, processor, images[start : start + chunk], max_new_tokens)
        if time.time() >= deadline:
            break
    return texts


def from_files(model: Any, processor: Any, crops: RecordCrops, batch_size: int, max_new_tokens: int,
               num_workers: int) -> tuple[list[str], float]:
    """generate_texts called chunk by chunk as evaluate_model.py calls it; also the seconds the main process
    waited for its next batch (with 0 workers: loading and preprocessing it itself)."""
    waited = 0.0

    def clocked(batches: Any) -> Any:
        nonlocal waited
        while True:
            t = time.perf_counter()
            item = next(batches, None)
            waited += time.perf_counter() - t
            if item is None:
                return
            yield item

    texts: list[str] = []
    chunks = crop_chunks(processor, crops, batch_size=batch_size, chunk_size=8 * batch_size,
                         num_workers=num_workers, pin_memory=pin_memory(model, num_workers))
    with closing(chunks):
        for chunk in chunks:
            texts += generate_texts(model, processor, chunk._replace(batches=clocked(chunk.batches)),
                                    max_new_tokens=max_new_tokens)
    return texts, waited


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[list[str], float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, full, or a model path / hub id")
    ap.add_argument("--num_samples", type=int, default=64, help="crops timed by both paths")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=16)
    ap.add_argument("--books", type=int, default=2, help="synthetic books (full-size 1654x1170 pages)")
    ap.add_argument("--pages", type=int, default=6, help="pages per synthetic book")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="time each path this often, report the fastest")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--num_workers", type=int, help="also time reading the crop files with 0 and this many "
                    "loader workers (the evaluate_model.py path)")
    ap.add_argument("--deadline", type=float, help="Unix time: no repeat after it; cut the seed loop at it")
    ap.add_argument("--data_dir", help="prepared crops (every split pooled) instead of --books/--pages "
                    "(benchmarks/gpu_fixtures.py builds them once per GPU suite)")
    ap.add_argument("--tiny_dir", help="the tiny model already built (--model tiny)")
    a = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        release, data = Path(tmp, "m109"), Path(a.data_dir or Path(tmp, "data"))
        if not a.data_dir:
            generate(release, books=a.books, pages=a.pages, seed=a.seed)
            # The split does not matter here (all crops are pooled); random mode works with any book count.
            prep.run(prep.PrepareArguments(manga109_root=str(release), output_dir=str(data),
                                           split_mode="random", num_workers=1))
        records = [r for s in prep.SPLITS if (data / f"{s}.jsonl").is_file()
                   for r in read_jsonl(data / f"{s}.jsonl")]
        if len(records) < a.num_samples:
            sys.exit(f"error: only {len(records)} crops; raise --books/--pages")
        records = random.Random(a.seed).sample(records, a.num_samples)
        images = [load_image(r, "bench") for r in records]
        crops = RecordCrops(records, "bench")

        if a.model == "tiny":
            tiny_dir = a.tiny_dir or build_tiny_model(Path(tmp, "tiny"), charset=CHARSET)
            model, processor = load_model_and_processor(tiny_dir, dtype=dtype, device=device)
        elif a.model == "full":
            model, processor = full_size_random(device, dtype)
        else:
            model, processor = load_model_and_processor(a.model, dtype=dtype, device=device)

        # Warm-up outside the timings: the first generate() pays one-off costs (kernels, allocator).
        generate_texts(model, processor, images[:2], batch_size=2, max_new_tokens=2)
        seed_loop(model, processor, images[:1], max_new_tokens=2)
        # Alternating repeats and keeping each path's fastest run filters out other load on the machine
        # without favouring whichever path happened to run during a quiet spell.
        t_batched = t_single = float("inf")
        workers = [] if a.num_workers is None else sorted({0, a.num_workers})
        files = dict.fromkeys(workers, float("inf"))  # seconds, fastest repeat
        waited = dict.fromkeys(workers, float("inf"))  # the main process waiting for batches, least
        files_same = n_files = 0  # texts read from the files that equal the in-memory path's
        single: list[str] = []
        repeats = 0
        out_of_time = False
        while repeats < max(a.repeats, 1) and not out_of_time:
            batched, t = timed(generate_texts, model, processor, images, batch_size=a.batch_size,
                               max_new_tokens=a.max_new_tokens)
            t_batched = min(t_batched, t)
            for w in workers:
                (texts, wait), t = timed(from_files, model, processor, crops, a.batch_size,
                                         a.max_new_tokens, w)
                files_same += sum(x == y for x, y in zip(texts, batched, strict=True))
                n_files += len(texts)
                files[w], waited[w] = min(files[w], t), min(waited[w], wait)
            texts, t = timed(seed_loop_until, model, processor, images, a.max_new_tokens, a.deadline)
            if len(texts) / t > len(single) / t_single:  # the fastest rate (a cut run read fewer crops)
                single, t_single = texts, t
            repeats += 1
            out_of_time = a.deadline is not None and time.time() >= a.deadline

    n, n_single = len(images), len(single)
    params = sum(p.numel() for p in model.parameters())
    same = sum(x == y for x, y in zip(batched, single, strict=False))  # the crops both paths read
    sizes = sorted(im.width * im.height for im in images)
    ratio = (n / t_batched) / (n_single / t_single)
    print(f"\ndevice: {device_description(device)}, dtype {dtype}")
    print(f"model: {a.model} ({params / 1e6:.1f} M parameters), {n} crops "
          f"(median {sizes[n // 2]} px), max_new_tokens {a.max_new_tokens}, "
          f"mean output {sum(len(t) for t in batched) / n:.1f} chars")
    print(f"{'path':52s} {'seconds':>8s} {'crops/s':>8s}")
    cut = "" if n_single == n else f"  ({n_single} of {n} crops: time budget)"
    print(f"{'seed loop (batch 1, use_cache=False)':52s} {t_single:8.2f} {n_single / t_single:8.2f}{cut}")
    label = f"generate_texts (batch {a.batch_size}, use_cache=True)"
    print(f"{label:52s} {t_batched:8.2f} {n / t_batched:8.2f}")
    print(f"ratio: {ratio:.1f}x")
    hidden = None
    for w in workers:
        label = f"generate_texts from files, {w} loader workers"
        print(f"{label:52s} {files[w]:8.2f} {n / files[w]:8.2f}  (waited {waited[w]:.2f} s for batches)")
    if workers:
        hidden = 1 - waited[a.num_workers] / waited[0]
        print(f"workers hid {100 * hidden:.0f} % of the main process's wait for batches; texts as in "
              f"memory: {files_same}/{n_files}")
    print(f"identical texts: {same}/{n_single}"
          + ("" if same == n_single else "  (bf16 batching can flip near-ties)"))
    if a.json:
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        Path(a.json).write_text(json.dumps({
            "model": a.model, "device": device_description(device), "dtype": str(dtype), "parameters": params,
            "crops": n, "median_px": sizes[n // 2], "max_new_tokens": a.max_new_tokens,
            "batch_size": a.batch_size, "repeats": repeats, "peak_gib": peak,
            "seed_loop": {"crops": n_single, "seconds": t_single, "crops_per_s": n_single / t_single},
            "batched": {"crops": n, "seconds": t_batched, "crops_per_s": n / t_batched},
            "ratio": ratio, "identical": same, "compared": n_single,
            **({"files": {"num_workers": a.num_workers, "seconds": {str(w): files[w] for w in workers},
                          "waited_s": {str(w): waited[w] for w in workers}, "hidden": hidden,
                          "identical": files_same, "compared": n_files}} if workers else {}),
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
