"""JSONL written by prepare_manga109_data.py -> (image, text) samples, and the conversation the model sees.

Shared by training, evaluation and the benchmarks. Records are validated when the file is read, so a broken
line fails at start-up with its file and line number, not hours into a run.
"""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image, ImageEnhance, ImageOps

PROMPT = "OCR:"
REQUIRED_FIELDS = ("image", "text")
# The image processor raises ValueError for an aspect ratio over 200 (transformers' smart_resize); a crop
# is padded to at most this ratio, which leaves room for the processor's rounding of the short side.
MAX_ASPECT = 190
AUG_PAD = 4  # augment() pads each side by 0..AUG_PAD px: sample lengths take the worst case


class DatasetError(ValueError):
    """A JSONL record or its image is unusable; the message names file and line."""


def build_messages() -> list[dict[str, Any]]:
    """The user turn (the crop, then PROMPT) that the chat template renders into the generation prompt.

    Content is a list of typed items: the release's template iterates over it (a plain string fails there).
    Training appends the answer's own tokens to the rendered prompt (data.collator), not an assistant turn.
    """
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate records; each gets `_line` and `image_path` (absolute)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (run prepare_manga109_data.py first?)")
    records = []
    with open(path, "rb") as f:  # decoded line by line, so an undecodable line is named by its number
        for lineno, raw in enumerate(f, 1):
            line = _decode_line(raw, path, lineno)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            missing = [k for k in REQUIRED_FIELDS if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise DatasetError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            if not isinstance(rec["text"], str) or not isinstance(rec["image"], str):
                raise DatasetError(f"{path}:{lineno}: 'image' and 'text' must be strings")
            rec["_line"] = lineno
            rec["image_path"] = str((path.parent / rec["image"]).resolve())
            rec.setdefault("id", f"{path.name}:{lineno}")
            records.append(rec)
    return records


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    """A JSONL line as text: UTF-8 (a byte-order mark on line 1 is dropped), else one DatasetError line.
    Japanese files often come in Shift-JIS; the error says so when the line reads as Shift-JIS."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        try:
            raw.decode("cp932")  # Windows' Shift-JIS: SHIFT_JIS lacks ① and turns ～ (FF5E) into 〜 (301C)
            guess = "it reads as Shift-JIS (cp932); convert the file: iconv -f CP932 -t UTF-8"
        except UnicodeDecodeError:
            guess = "save the file as UTF-8"
        raise DatasetError(f"{path}:{lineno}: not UTF-8 (byte {e.start + 1}: {e.reason}); {guess}") from None


def rgb_image(image: Image.Image) -> Image.Image:
    """Any PIL image as the 8-bit RGB the model reads, in the one way every reader uses (training,
    evaluation, predict.py, MangaOcr).

    PIL's own convert("RGB") clips 16- and 32-bit integer pixels at 255 (a 16-bit grayscale PNG, mode
    I;16 or I, comes out all white) and drops alpha (transparent pixels show whatever colour they hold,
    often black). Here integer images are scaled from their bit depth (16 bits: 65535 -> 255), float
    images from 0..1 (or clipped to 0..255 when larger), and transparent pixels become white paper."""
    import numpy as np

    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        top = float(pixels.max(initial=0))
        if image.mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
        elif image.mode.startswith("I;16"):
            scale = 255 / 65535
        else:  # 32-bit I: a 16-bit PNG in older Pillow, or 8-bit values widened
            scale = 1.0 if top <= 255 else 255 / 65535 if top <= 65535 else 255 / top
        gray = np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:  # a PNG tRNS chunk
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, rgba).convert("RGB")
    return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV


def open_rgb(path: str | Path) -> Image.Image:
    """The image file as rgb_image gives it; OSError / ValueError when it cannot be read."""
    with Image.open(path) as im:
        return rgb_image(im)


def load_image(rec: dict[str, Any], source: str) -> Image.Image:
    try:
        return open_rgb(rec["image_path"])
    except (OSError, ValueError) as e:
        raise DatasetError(f"{source}:{rec['_line']}: cannot open image {rec['image_path']} ({e})") from None


def fitted_size(width: int, height: int) -> tuple[int, int]:
    """The size fit_image gives a crop of this size: an empty side becomes 1 px, and the short side grows
    (white padding) until the aspect ratio is at most MAX_ASPECT, which the image processor accepts."""
    width, height = max(width, 1), max(height, 1)
    short = -(-max(width, height) // MAX_ASPECT)
    return (max(width, short), height) if width < height else (width, max(height, short))


def fit_image(image: Image.Image) -> Image.Image:
    """The crop padded (white, centred) into a shape the processor takes; most crops come back unchanged.

    Manga109 boxes never need it, but a user's own JSONL or synthetic folder can hold a 10 x 2,100 line
    that the processor would refuse mid-run. Sample lengths count the padded size (fitted_size)."""
    w, h = fitted_size(*image.size)
    if (w, h) == image.size:
        return image
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    canvas.paste(image.convert("RGB"), ((w - image.width) // 2, (h - image.height) // 2))
    return canvas


def augment(image: Image.Image, rng: Any = random) -> Image.Image:
    """Light, label-preserving changes: contrast/brightness jitter and a few pixels of padding."""
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.9, 1.1))
    pad = tuple(rng.randint(0, AUG_PAD) for _ in range(4))
    return ImageOps.expand(image, border=pad, fill=(255, 255, 255)) if any(pad) else image


class OCRDataset:
    """Map-style dataset over one JSONL split. Items: image, text, id, book, orientation."""

    def __init__(
        self, jsonl_path: str | Path, *, augment: bool = False, max_samples: int | None = None
    ) -> None:
        self.path = str(jsonl_path)
        self.records = read_jsonl(jsonl_path)
        if max_samples is not None:
            self.records = self.records[:max_samples]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        image = load_image(rec, rec.get("_source", self.path))
        if self.augment:
            # The module RNG: DataLoader seeds it differently in each worker, a shared Random would repeat.
            image = augment(image, random)
        return {
            "index": i,  # the trainer maps it back to the id (collator counters die with loader workers)
            "image": fit_image(image),
            "text": rec["text"],
            "id": rec["id"],
            "book": rec.get("book", ""),
            "orientation": rec.get("orientation", ""),
        }

    def with_records(self, records: list[dict[str, Any]]) -> OCRDataset:
        """The same split holding only `records` (e.g. a sample of it)."""
        other = copy.copy(self)
        other.records = records
        return other

    def image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) per record, from the JSONL when present (no image decode needed)."""
        return [record_size(rec) for rec in self.records]


def record_size(rec: dict[str, Any]) -> tuple[int, int]:
    """A record's (width, height): the JSONL's, else the image file's header (nothing decoded)."""
    if "width" in rec and "height" in rec:
        return int(rec["width"]), int(rec["height"])
    with Image.open(rec["image_path"]) as im:
        return im.size


class RecordCrops:
    """Records as generation input (model.generation.Crops): sizes without decoding, images loaded in the
    generation loader's workers. `source` names the file in errors (a record's own `_source` first)."""

    def __init__(self, records: list[dict[str, Any]], source: str) -> None:
        self.records, self.source = records, source

    def __len__(self) -> int:
        return len(self.records)

    def size(self, i: int) -> tuple[int, int]:
        try:
            return record_size(self.records[i])
        except (OSError, ValueError):  # image() raises the DatasetError when its batch is loaded, in order
            return 0, 0

    def image(self, i: int) -> Image.Image:
        rec = self.records[i]
        return load_image(rec, rec.get("_source", self.source))


def spread_sample(records: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """n records spread over the books as evenly as the count allows, at random within each book (seeded).

    The JSONL is in title/page order, so "the first n" is one book. Each book gets n // books crops (all of
    a smaller book, its share going to the others); the rest go to randomly chosen books with crops left.
    Returned in file order. Training's CER sample and evaluate_model.py --num_samples both use it."""
    if n >= len(records):
        return list(records)
    rng = random.Random(seed)
    books: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        books.setdefault(r.get("book", ""), []).append(i)
    for idx in books.values():
        rng.shuffle(idx)
    quota = dict.fromkeys(books, 0)
    left = n
    while left:
        open_books = [b for b in books if quota[b] < len(books[b])]
        share = left // len(open_books)
        if share == 0:  # fewer crops left than books: random books get one more
            for b in rng.sample(open_books, left):
                quota[b] += 1
            break
        for b in open_books:
            take = min(share, len(books[b]) - quota[b])
            quota[b] += take
            left -= take
    return [records[i] for i in sorted(i for b, idx in books.items() for i in idx[: quota[b]])]


def parse_data_dirs(spec: str) -> list[tuple[Path, float]]:
    """'./data/manga109s ./data/synth_lines:0.5' -> [(manga109s, 1.0), (synth_lines, 0.5)]; default 1."""
    folders = []
    for item in spec.split():
        path, _, weight = item.rpartition(":")
        try:
            w = float(weight) if path else 1.0
        except ValueError:  # a colon that is part of the path
            path, w = item, 1.0
        if not w > 0:
            raise DatasetError(f"--data_dir {item!r}: the weight must be > 0")
        folders.append((Path(path or item), w))
    if not folders:
        raise DatasetError("--data_dir is empty")
    if len({p.resolve() for p, _ in folders}) < len(folders):
        raise DatasetError(f"--data_dir {spec!r} names a folder twice: give it one weight")
    return folders


def mixed_train_dataset(
    spec: str, *, seed: int, augment: bool = False, max_samples: int | None = None
) -> tuple[OCRDataset, list[dict[str, Any]]]:
    """Train records of one or more data folders, mixed by weight; returns the dataset and per-folder counts.

    A weight is a folder's share of the train samples. The first folder's records each appear once; the epoch
    is as long as that makes its share, and every other folder fills its share with records drawn without
    replacement (whole reshuffles repeat when it has too few). The list depends only on the files and the
    seed, so every DDP rank and every resumed run builds the same one before the Trainer shards and shuffles.
    """
    folders = parse_data_dirs(spec)
    first = OCRDataset(folders[0][0] / "train.jsonl", augment=augment)
    if len(folders) == 1:
        first.records = first.records[:max_samples]  # one folder: the file order, as always
        n = len(first)
        return first, [{"folder": str(folders[0][0]), "weight": 1.0, "records": n, "drawn": n}]
    rng = random.Random(seed)
    mixed, counts = [], []
    for k, (folder, w) in enumerate(folders):
        recs = first.records if k == 0 else read_jsonl(folder / "train.jsonl")
        if not recs:
            raise DatasetError(f"{folder / 'train.jsonl'} has no samples")
        # relative to the first folder's count, rounded once (rounding an epoch total first can lose one)
        want = len(recs) if k == 0 else round(len(first.records) * w / folders[0][1])
        drawn: list[dict[str, Any]] = []
        while len(drawn) < want:
            order = list(range(len(recs)))
            rng.shuffle(order)
            # _source: the file named in errors about this record
            drawn += [{**recs[i], "_source": str(folder / "train.jsonl")} for i in order[: want - len(drawn)]]
        mixed += drawn
        counts.append({"folder": str(folder), "weight": w, "records": len(recs)})
    rng.shuffle(mixed)  # so that max_samples keeps the mix
    first.records = mixed[:max_samples]
    kept = Counter(r["_source"] for r in first.records)
    for c in counts:
        c["drawn"] = kept[str(Path(c["folder"]) / "train.jsonl")]
    return first, counts
