"""Manga109s release -> text-line crops + train/val/test JSONL (book-level split by default).

    python prepare_manga109_data.py --manga109_root ./Manga109s --output_dir ./data/manga109s

Each page image is opened once and all its crops are cut from it, in a process pool over pages. Crops and
the JSONL/manifest are written atomically (temp file + rename), so a killed run can simply be rerun: finished
crops are reused and the result is identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

from dotenv import load_dotenv
from PIL import Image
from tqdm import tqdm

from paddleocr_vl_manga.data.manga109_scan import (
    Box,
    PageJob,
    PrepareArguments,
    PrepareError,
    read_titles,
    scan_release,
)

TOOL_VERSION = "prepare_manga109_data 1.0"
SPLITS = ("train", "val", "test")
STATE_FILE = ".prepare_state.json"


# errno values of a write that ran out of room: a full disk, a quota, or a file-size limit (`ulimit -f`,
# with SIGXFSZ ignored; otherwise the kernel kills the process before Python sees anything).
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def write_failed(path: str | Path, e: OSError) -> str:
    """One line for an OSError while writing `path`: full disk and size limits named as such."""
    if e.errno in NO_ROOM:
        return (f"could not write {path}: the disk is full or a file-size limit (ulimit -f) stopped the "
                f"write ({e.strerror}); make room and run the same command again")
    return f"could not write {path}: {e.strerror or e}"


# ---------------------------------------------------------------- reading the release


def resolve_paths(args: PrepareArguments) -> tuple[Path, Path]:
    load_dotenv()  # never overrides variables already set in the environment
    root_str = args.manga109_root or os.environ.get("MANGA109_ROOT")
    if not root_str:
        raise PrepareError("No dataset given: pass --manga109_root or set MANGA109_ROOT (see .env.example).")
    root = Path(root_str).expanduser().resolve()
    if not root.is_dir():
        raise PrepareError(f"Manga109 root not found: {root}")
    missing = [p for p in ("books.txt", args.annotation_set, "images") if not (root / p).exists()]
    if missing:
        raise PrepareError(
            f"{root} is not a Manga109 release: expected books.txt, {args.annotation_set}/ and images/ "
            f"inside it; missing: {', '.join(missing)}"
        )
    out = Path(args.output_dir or os.environ.get("MANGA109_OUTPUT_DIR") or "./data/manga109s")
    out = out.expanduser().resolve()
    if out == root or root in out.parents:
        raise PrepareError(f"--output_dir {out} is inside the dataset {root}; choose a folder outside it.")
    return root, out


# ---------------------------------------------------------------- cutting crops (runs in workers)


def cut_page(job: PageJob, out_dir: str) -> tuple[str | None, int]:
    """Open the page once and save every missing crop: (error reason or None, crops written). Bad pages
    are returned, not raised; a failed write raises PrepareError and leaves no partial file."""
    todo = [b for b in job.boxes if not os.path.exists(os.path.join(out_dir, b.crop_rel))]
    if not todo:
        return None, 0
    if not os.path.isfile(job.image_path):
        return "missing_image", 0
    try:
        with Image.open(job.image_path) as im:
            im.load()
            page = im
    except Exception:  # PIL raises many types for corrupt or truncated files
        return "unreadable_image", 0
    for b in todo:
        dst = os.path.join(out_dir, b.crop_rel)
        tmp = f"{dst}.tmp{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            # PNG keeps crops pixel-exact; compress_level 1 is ~5x faster to write than the default.
            page.crop(b.bbox).save(tmp, format="PNG", compress_level=1)
            os.replace(tmp, dst)  # a crop file that exists is always complete
        except OSError as e:
            _remove(tmp)
            raise PrepareError(write_failed(dst, e)) from None
    return None, len(todo)


def _remove(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------- splits and outputs


def _fraction_count(n: int, frac: float) -> int:
    return 0 if frac <= 0 else max(1, round(n * frac))


def _read_list(path: str, known: list[str]) -> list[str]:
    try:
        titles = [t.strip() for t in Path(path).read_text(encoding="utf-8").splitlines() if t.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    unknown = sorted(set(titles) - set(known))
    if unknown:
        raise PrepareError(f"{path}: titles not in this release: {', '.join(unknown)}")
    return titles


def split_books(books: list[str], args: PrepareArguments) -> dict[str, str]:
    """Map each book to a split; the shuffle is over sorted titles, so it is the same on every machine."""
    if args.val_books or args.test_books:
        val = _read_list(args.val_books, books) if args.val_books else []
        test = _read_list(args.test_books, books) if args.test_books else []
        if set(val) & set(test):
            raise PrepareError(f"books in both val and test lists: {sorted(set(val) & set(test))}")
        return {b: "test" if b in test else "val" if b in val else "train" for b in books}
    order = sorted(books)
    random.Random(args.seed).shuffle(order)
    n_test = _fraction_count(len(order), args.test_fraction)
    n_val = _fraction_count(len(order), 0.05 if args.val_fraction is None else args.val_fraction)
    if n_test + n_val >= len(order):
        raise PrepareError(
            f"{len(order)} books cannot fill {n_test} test + {n_val} val books and leave "
            "any for train; lower --test_fraction/--val_fraction or use more books."
        )
    return {
        b: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, b in enumerate(order)
    }


def split_random(records: list[dict], args: PrepareArguments) -> list[str]:
    """The seed project's protocol: shuffle crops (in sorted order) with the seed, first 90 % train."""
    idx = list(range(len(records)))
    random.Random(args.seed).shuffle(idx)
    n_test = int(len(idx) * args.test_fraction)
    n_val = int(len(idx) * (args.val_fraction or 0.0))
    n_train = len(idx) - n_test - n_val
    which = [""] * len(idx)
    for rank, i in enumerate(idx):
        which[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return which


def write_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all (temp file + rename); a failed write raises PrepareError (one line)
    and leaves neither the temp file nor a changed `path`."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # per process: shards may share a folder
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise PrepareError(write_failed(path, e)) from None


def make_record(b: Box) -> dict:
    x0, y0, x1, y1 = b.bbox
    w, h = x1 - x0, y1 - y0
    return {
        "id": f"{b.book}/{b.page:03d}/{b.text_id}",
        "image": b.crop_rel,
        "text": b.text,
        "book": b.book,
        "page": b.page,
        "text_id": b.text_id,
        "bbox": [x0, y0, x1, y1],
        "width": w,
        "height": h,
        # Japanese manga text runs in columns, so a box taller than wide is read vertically.
        "orientation": "vertical" if h > w else "horizontal",
    }


def prepare_output_dir(out: Path, root: Path, args: PrepareArguments) -> None:
    state = {
        "manga109_root": str(root),
        "annotation_set": args.annotation_set,
        "margin": args.margin,
        "crop_format": "png",
    }
    state_path = out / STATE_FILE
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--output_dir {out} is a file, not a folder")
    if args.overwrite and out.exists():
        import shutil

        for name in ("crops", *(f"{s}.jsonl" for s in SPLITS), "manifest.json", STATE_FILE):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    elif state_path.exists() and json.loads(state_path.read_text()) != state:
        raise PrepareError(
            f"{out} holds crops made with other settings ({state_path.read_text().strip()}); "
            "pass --overwrite or choose another --output_dir."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot write to output folder {out}: {e}") from e
    write_atomic(state_path, json.dumps(state, indent=1))
    for stale in (out / "crops").glob("*/*.tmp*"):  # leftovers of a killed run
        stale.unlink(missing_ok=True)


def run(args: PrepareArguments) -> dict:
    t0 = time.time()
    root, out = resolve_paths(args)
    titles = read_titles(root)
    if not titles:
        raise PrepareError(f"{root / 'books.txt'} lists no titles.")
    for listed in (args.val_books, args.test_books):  # checked again at the split; here, before any write
        if listed:
            _read_list(listed, titles)
    prepare_output_dir(out, root, args)
    scan = scan_release(root, titles, args)

    failed: dict[tuple[str, int], str] = {}
    cut = 0  # crops written by this run; the others were reused from an earlier (killed or finished) run
    workers = max(1, args.num_workers)
    n_boxes = sum(len(j.boxes) for j in scan.jobs)
    out_dirs = [str(out)] * len(scan.jobs)
    with (
        tqdm(total=n_boxes, desc="cropping", unit="crop", disable=None) as bar,
        ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool,
    ):
        results = (
            pool.map(cut_page, scan.jobs, out_dirs, chunksize=4)
            if pool
            else map(cut_page, scan.jobs, out_dirs)
        )
        try:
            for job, (error, written) in zip(scan.jobs, results, strict=True):
                cut += written
                if error:
                    where = f"{job.image_path} (book {job.book}, page {job.page})"
                    if args.strict:
                        raise PrepareError(f"{error}: {where}")
                    failed[(job.book, job.page)] = error
                    scan.problems.append(f"{error}: {where}")
                bar.update(len(job.boxes))
        finally:
            if pool:  # on --strict or Ctrl-C, don't wait for the remaining pages
                pool.shutdown(cancel_futures=True)

    records = []
    for job in scan.jobs:
        if (job.book, job.page) in failed:
            scan.skipped_pages[failed[job.book, job.page]] += 1
            scan.skipped_texts[failed[job.book, job.page]] += len(job.boxes)
        else:
            records.extend(make_record(b) for b in job.boxes)

    if args.split_mode == "book":
        book_split = split_books(sorted({j.book for j in scan.jobs}), args)
        which = [book_split[r["book"]] for r in records]
    else:
        which = split_random(records, args)
    by_split = {s: [r for r, w in zip(records, which, strict=True) if w == s] for s in SPLITS}
    for s in SPLITS:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in by_split[s])
        write_atomic(out / f"{s}.jsonl", lines)

    manifest = {
        "tool_version": TOOL_VERSION,
        "arguments": {**asdict(args), "manga109_root": str(root), "output_dir": str(out)},
        "num_titles": len(titles),
        "texts_in_annotations": scan.texts_seen,
        "crops": len(records),
        "splits": {
            s: {"crops": len(by_split[s]), "books": sorted({r["book"] for r in by_split[s]})} for s in SPLITS
        },
        "crops_per_book": dict(sorted(Counter(r["book"] for r in records).items())),
        "skipped": {
            "books": dict(sorted(scan.skipped_books.items())),
            "pages": dict(sorted(scan.skipped_pages.items())),
            "texts": dict(sorted(scan.skipped_texts.items())),
        },
    }
    for key in ("num_workers", "overwrite"):  # they don't change the result; keeps manifests comparable
        del manifest["arguments"][key]
    write_atomic(out / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1) + "\n")
    manifest["seconds"] = time.time() - t0  # these keys after the write: reruns give identical manifests
    manifest["crops_cut"] = cut
    manifest["problems"] = scan.problems
    return manifest


def _count(n: int, noun: str, plural: str = "") -> str:
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def print_summary(m: dict, out_dir: str) -> None:
    cut, reused = m["crops_cut"], m["crops"] - m["crops_cut"]
    # Speed only over crops cut in this run: reused ones cost a stat() each, not a crop (a rerun that
    # reused all 10,841 crops of a release once printed "10,841 crops/s").
    speed = f", {cut / max(m['seconds'], 1e-9):,.0f} crops/s" if cut else ""
    work = ("all reused from an earlier run" if not cut else
            f"{cut:,} cut, {reused:,} reused from an earlier run" if reused else "all cut in this run")
    boxes = _count(m["texts_in_annotations"], "text box", "text boxes")
    print(f"\n{_count(m['crops'], 'crop')} ({work}) from {boxes} in {_count(m['num_titles'], 'book')} "
          f"({m['seconds']:.1f} s{speed}) -> {out_dir}")
    for s, v in m["splits"].items():
        print(f"  {s:5s}: {_count(v['crops'], 'crop'):>12}, {_count(len(v['books']), 'book')}")
    for unit, reasons in m["skipped"].items():
        for reason, n in reasons.items():
            print(f"  skipped {n} {unit} ({reason})")
    for p in m["problems"][:10]:
        print(f"    {p}")
    if len(m["problems"]) > 10:
        print(f"    ... {len(m['problems']) - 10} more")


def one_line_usage_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser` with argparse's errors as one `error:` line (exit 2) instead of the usage, which for these
    commands is 20-40 lines with the useful line last."""
    def error(message: str) -> NoReturn:
        parser.exit(2, f"error: {message} (--help lists the flags)\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


def parse_dataclass_args(dataclass_type: type, argv: list[str] | None):
    """HfArgumentParser over `dataclass_type` with one-line errors; SystemExit(2) on bad flags."""
    from transformers import HfArgumentParser

    parser = one_line_usage_errors(HfArgumentParser(dataclass_type))
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:  # HfArgumentParser raises a ValueError (a traceback) for these
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def check_arguments(args: PrepareArguments) -> None:
    """Values no run can use, refused before anything is read or written."""
    for name in ("test_fraction", "val_fraction"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < 1:  # NaN fails too
            raise PrepareError(f"--{name} {value}: a fraction of books (or crops), from 0 to below 1")
    for name, low in (("margin", 0), ("min_size", 1)):
        if getattr(args, name) < low:
            raise PrepareError(f"--{name} {getattr(args, name)}: need at least {low} (pixels)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_dataclass_args(PrepareArguments, argv)
    except SystemExit as e:  # a bad flag (one line printed) or --help
        return int(e.code or 0)
    try:
        check_arguments(args)
        manifest = run(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # anything else the file system refuses (a books.txt without read access, ...)
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    print_summary(manifest, manifest["arguments"]["output_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
