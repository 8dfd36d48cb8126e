"""Synthetic manga text lines for training: DIR/crops/, DIR/train.jsonl, DIR/manifest.json (prepare's format).

    python tools/fonts.py --pack manga      # once: ~60 faces in 6 styles (Debian + OFL npm fonts)
    python synthesize_lines.py --out ./data/synth_lines --num_lines 1000000 --manga109_dir ./data/manga109s

Text comes from the *train* split of a prepared Manga109 folder (re-rendered and recombined; val/test
books are never read) plus an offline mixture (wordfreq words, interjections, particles, SFX, digits/Latin,
random JIS kanji). Lines are drawn vertically (one character per cell, columns right to left, the font's
vertical forms) or horizontally, with furigana noise, tate-chu-yoko, outlines, bubbles, page or screentone
backgrounds and photometric/geometric augmentation. The label is exactly what is drawn, in horizontal
code points.

Work is cut into chunks of CHUNK lines, each with its own RNG: output is the same at any --num_workers, a
killed run resumes where it stopped (a chunk's part file is written last, atomically), and --shard K/N runs
the chunks with index = K-1 mod N, so N machines writing into one shared DIR make the unsharded result.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from paddleocr_vl_manga.data.manga109 import parse_dataclass_args, write_atomic, write_failed
from paddleocr_vl_manga.data.manga109_scan import PrepareError
from paddleocr_vl_manga.data.synth.fonts import ELSEWHERE_HINT, find_manga_fonts
from paddleocr_vl_manga.data.synth.render import (
    _CTX,
    TOOL_VERSION,
    _cached_font_info,
    _init_worker,
    render_line,
)
from paddleocr_vl_manga.data.synth.text import (
    ASCII,
    DEFAULT_LENGTHS,
    FULLWIDTH,
    HIRAGANA,
    JIS_KANJI,
    KATAKANA,
    PUNCT,
    SynthError,
    TextSource,
    _clean,
    load_words,
    read_manga109,
)

CHUNK = 250  # lines per work unit: one RNG, one crop folder, one part file
STATE_FILE = ".synth_state.json"


@dataclass
class SynthArguments:
    out: str = field(
        default="./data/synth_lines", metadata={"help": "Output folder (a data folder for training)."}
    )
    num_lines: int = field(default=10000, metadata={"help": "Lines to make (all shards together)."})
    seed: int = field(default=0, metadata={"help": "Same seed, same files, at any --num_workers."})
    num_workers: int = field(default=os.cpu_count() or 1, metadata={"help": "Rendering processes."})
    manga109_dir: str | None = field(
        default=None,
        metadata={
            "help": "Prepared Manga109 folder (prepare_manga109_data.py): texts, length and vertical share "
            "from its train split, backgrounds from its train pages away from text boxes."
        },
    )
    shard: str = field(
        default="1/1", metadata={"help": "K/N: make only chunks K-1, K-1+N, ... (N machines, one DIR)."}
    )
    preview: bool = field(default=False, metadata={"help": "Also write DIR/preview.png, a contact sheet."})
    vertical_share: float | None = field(
        default=None,
        metadata={"help": "Share of vertical lines, 0 to 1 (default: Manga109 train's, else 0.7)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Delete earlier output in --out first."})


def render_chunk(chunk: int) -> int:
    """Render one chunk's crops and write its part file last; returns the number of lines."""
    c = _CTX
    rng = random.Random(f"{c['seed']}:{chunk}")
    size = c["chunk"]
    first, n = chunk * size, min(size, c["num_lines"] - chunk * size)
    out = Path(c["out"])
    (out / "crops" / f"{chunk:05d}").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        for _attempt in range(20):
            text, kind = c["text"].sample(rng)
            text = _clean(text)
            vertical = rng.random() < c["text"].vertical_share
            try:
                got = render_line(rng, text, vertical) if text else None
            except OSError:  # FreeType fails on a few glyphs of some faces ("invalid opcode"): draw another
                got = None
            if got:
                break
        else:
            raise SynthError(f"chunk {chunk}: no font draws the sampled texts; install the font pack")
        img, font_path, settings = got
        rel = f"crops/{chunk:05d}/{i:03d}.png"
        tmp = out / f"{rel}.tmp{os.getpid()}"
        try:
            img.save(tmp, format="PNG", compress_level=1)
            os.replace(tmp, out / rel)  # a crop file that exists is always complete
        except OSError as e:  # a full disk: one line, and no partial crop left behind
            tmp.unlink(missing_ok=True)
            raise SynthError(write_failed(out / rel, e)) from None
        w, h = img.size
        lines.append(json.dumps({
            "id": f"synth{c['seed']}/{chunk:05d}/{i:03d}", "image": rel, "text": text, "book": "synthetic",
            "page": chunk, "text_id": f"{first + i:08d}", "bbox": [0, 0, w, h], "width": w, "height": h,
            "orientation": "vertical" if settings["vertical"] else "horizontal", "font": font_path,
            "source": kind, "render": settings,
        }, ensure_ascii=False) + "\n")
    (out / "parts").mkdir(exist_ok=True)
    write_atomic(out / "parts" / f"{chunk:05d}.jsonl", "".join(lines))
    return n


# ---------------------------------------------------------------- driver


def parse_shard(spec: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise SynthError(f"--shard {spec!r}: expected K/N, e.g. 1/4") from None
    if not 1 <= k <= n:
        raise SynthError(f"--shard {spec!r}: need 1 <= K <= N")
    return k, n


def build_context(args: SynthArguments, out: Path) -> dict:
    """Everything a worker needs; the same on every machine with the same fonts and inputs."""
    texts, lengths, vshare, pages = [], DEFAULT_LENGTHS, 0.7, []
    if args.manga109_dir:
        texts, lengths, vshare, pages = read_manga109(Path(args.manga109_dir))
    if args.vertical_share is not None:
        vshare = args.vertical_share
    found = find_manga_fonts()
    if not found:
        raise SynthError("no CJK font found: run `python tools/fonts.py --pack manga`. " + ELSEWHERE_HINT)
    # Every character the generator could ever draw: fonts are checked for these only.
    candidates = "".join(sorted(set(HIRAGANA + KATAKANA + JIS_KANJI + PUNCT + ASCII + FULLWIDTH + "々"
                                    + "".join(texts))))
    jobs = [(p, s, candidates) for p, s in found]
    workers = max(1, min(args.num_workers, len(jobs)))
    if workers > 1:
        with mp.Pool(workers) as pool:
            fonts = pool.map(_cached_font_info, jobs)
    else:
        fonts = [_cached_font_info(j) for j in jobs]
    fonts = [f for f in fonts if len(f["chars"]) > 100]  # symbol or supplement-only faces
    words = load_words()
    return {"seed": args.seed, "num_lines": args.num_lines, "out": str(out), "fonts": fonts, "pages": pages,
            "chunk": CHUNK,
            "text": TextSource(words, texts, lengths, vshare)}


def run(args: SynthArguments) -> dict:
    t0 = time.time()
    k, n_shards = parse_shard(args.shard)
    if args.num_lines < 1:
        raise SynthError("--num_lines must be >= 1")
    # A share is a probability: 2 once ran as 1 without a word (every line vertical).
    if args.vertical_share is not None and not 0 <= args.vertical_share <= 1:
        raise SynthError(f"--vertical_share {args.vertical_share}: a share of lines, from 0 to 1")
    out = Path(args.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise SynthError(f"--out {out} is a file, not a folder: choose a folder for the crops and JSONL")
    if args.overwrite and out.exists():
        import shutil

        for name in ("crops", "parts", "train.jsonl", "manifest.json", "preview.png", STATE_FILE):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    ctx = build_context(args, out)
    state = {
        "tool_version": TOOL_VERSION, "seed": args.seed, "num_lines": args.num_lines, "chunk": ctx["chunk"],
        "manga109_dir": str(Path(args.manga109_dir).resolve()) if args.manga109_dir else None,
        "vertical_share": ctx["text"].vertical_share, "fonts": [f["path"] for f in ctx["fonts"]],
    }
    state_path = out / STATE_FILE
    if state_path.exists() and json.loads(state_path.read_text()) != state:
        raise SynthError(f"{out} holds lines made with other settings or fonts ({state_path}); "
                         "pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(state_path, json.dumps(state, indent=1))
    for stale in [*out.glob("crops/*/*.tmp*"), *out.glob("parts/*.tmp*")]:  # leftovers of a killed run
        stale.unlink(missing_ok=True)
    size = ctx["chunk"]
    n_chunks = math.ceil(args.num_lines / size)
    mine = [c for c in range(k - 1, n_chunks, n_shards)]
    todo = [c for c in mine if not (out / "parts" / f"{c:05d}.jsonl").exists()]
    done_before = sum(min(size, args.num_lines - c * size) for c in mine if c not in todo)
    workers = max(1, min(args.num_workers, len(todo)))
    total = sum(min(size, args.num_lines - c * size) for c in mine)
    with tqdm(total=total, initial=done_before, desc="lines", unit="line", disable=None) as bar:
        if workers == 1:
            _init_worker(ctx)
            for c in todo:
                bar.update(render_chunk(c))
        else:
            with mp.Pool(workers, initializer=_init_worker, initargs=(ctx,)) as pool:
                for n in pool.imap_unordered(render_chunk, todo):
                    bar.update(n)
    made = total - done_before
    summary = {"lines_made": made, "seconds": time.time() - t0, "out": str(out), "complete": False}
    parts = [out / "parts" / f"{c:05d}.jsonl" for c in range(n_chunks)]
    if not all(p.exists() for p in parts):  # other shards still running: the last one assembles
        summary["chunks_done"] = sum(p.exists() for p in parts)
        summary["chunks"] = n_chunks
        return summary
    text = "".join(p.read_text(encoding="utf-8") for p in parts)
    write_atomic(out / "train.jsonl", text)
    records = [json.loads(line) for line in text.splitlines()]
    manifest = {
        "tool_version": TOOL_VERSION,
        "arguments": {"seed": args.seed, "num_lines": args.num_lines, "manga109_dir": state["manga109_dir"],
                      "vertical_share": state["vertical_share"]},
        "crops": len(records),
        "splits": {"train": {"crops": len(records), "books": ["synthetic"]}},
        "fonts": [{k: f[k] for k in ("path", "style", "vertical", "no_vertical")} | {"chars": len(f["chars"])}
                  for f in ctx["fonts"]],
        "styles": dict(Counter(f["style"] for f in ctx["fonts"])),
        "stats": _stats(records),
    }
    write_atomic(out / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1) + "\n")
    if args.preview:
        write_preview(records[:48], out, out / "preview.png")
    summary.update(complete=True, lines=len(records), stats=manifest["stats"], fonts=len(ctx["fonts"]),
                   styles=manifest["styles"])
    return summary


def _stats(records: list[dict]) -> dict:
    n = len(records)
    share = lambda pred: round(sum(map(pred, records)) / n, 3)  # noqa: E731
    return {
        "vertical": share(lambda r: r["render"]["vertical"]),
        "mean_length": round(sum(len(r["text"]) for r in records) / n, 2),
        "sources": dict(Counter(r["source"] for r in records)),
        "bubble": share(lambda r: r["render"]["bubble"]),
        "stroke": share(lambda r: r["render"]["stroke"] > 0),
        "furigana": share(lambda r: r["render"]["furigana"]),
        "tate_chu_yoko": share(lambda r: r["render"].get("tcy", False)),
        "page_background": share(lambda r: r["render"]["background"].startswith("page:")),
        "augmented": share(lambda r: bool(r["render"]["augment"]) or "rotate" in r["render"]
                           or "perspective" in r["render"]),
    }


def write_preview(records: list[dict], out: Path, dst: Path, cols: int = 8, cell: int = 150) -> None:
    """A contact sheet: each crop fitted into a cell with its label underneath."""
    rows = math.ceil(len(records) / cols)
    label_h = 22
    sheet = Image.new("L", (cols * cell, rows * (cell + label_h)), 255)
    font = ImageFont.truetype(find_manga_fonts()[-1][0], 14)
    draw = ImageDraw.Draw(sheet)
    for i, r in enumerate(records):
        with Image.open(out / r["image"]) as im:
            im = im.convert("L")
            im.thumbnail((cell - 8, cell - 8))
        x, y = (i % cols) * cell, (i // cols) * (cell + label_h)
        sheet.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
        label = r["text"] if len(r["text"]) <= 10 else r["text"][:9] + "…"
        draw.text((x + cell // 2, y + cell + 2), label, fill=0, font=font, anchor="mt")
    sheet.save(dst, optimize=True)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_dataclass_args(SynthArguments, argv)
    except SystemExit as e:  # a bad flag (one line printed) or --help
        return int(e.code or 0)
    try:
        s = run(args)
    except (SynthError, PrepareError) as e:  # PrepareError: write_atomic's failed write
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out below a file, or a folder without write access
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    rate = s["lines_made"] / max(s["seconds"], 1e-9)
    print(f"\nmade {s['lines_made']} lines in {s['seconds']:.1f} s ({rate:.0f} lines/s) -> {s['out']}")
    if s["complete"]:
        print(f"  {s['lines']} lines in train.jsonl; {s['fonts']} fonts {s['styles']}; {s['stats']}")
    else:
        print(f"  {s['chunks_done']} of {s['chunks']} chunks done; the run that makes the last one writes "
              "train.jsonl (or rerun without --shard once all shards finished)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
