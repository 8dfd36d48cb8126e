"""Reading a Manga109 release as the prepare command's arguments ask: book titles, each annotation XML in
the encoding it declares, and the text boxes checked one by one (skipped and counted, never a traceback)."""

from __future__ import annotations

import codecs
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

# Skipped by design; every other reason is bad data (and stops --strict).
FILTERED = {"empty_text", "too_small", "extreme_aspect"}
# The PaddleOCR-VL image processor refuses images whose sides differ by more than 200x.
MAX_ASPECT = 150  # settings that change crop pixels; a mismatch needs --overwrite


class PrepareError(Exception):
    """A problem that stops the run (bad root, or any bad item under --strict); printed without traceback."""


@dataclass
class PrepareArguments:
    manga109_root: str | None = field(
        default=None,
        metadata={
            "help": "Manga109s release folder (books.txt, annotations/, images/). "
            "Default: MANGA109_ROOT from the environment or .env."
        },
    )
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where crops and JSONL go (must be outside the release). "
            "Default: MANGA109_OUTPUT_DIR or ./data/manga109s."
        },
    )
    annotation_set: str = field(
        default="annotations",
        metadata={
            "help": "Annotation folder inside the release, e.g. "
            "annotations.v2018.05.31 or annotations.v2020.12.18."
        },
    )
    split_mode: str = field(
        default="book",
        metadata={
            "help": "'book': whole books per split (no leakage). 'random': the seed "
            "project's per-crop protocol (90/10 train/test, seed 42, no val).",
            "choices": ["book", "random"],
        },
    )
    val_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of books (book mode) or crops (random mode) for val. "
            "Default 0.05 in book mode, 0 in random mode."
        },
    )
    test_fraction: float = field(default=0.1, metadata={"help": "Fraction of books/crops for test."})
    val_books: str | None = field(
        default=None, metadata={"help": "File with one title per line: these books form val (book mode)."}
    )
    test_books: str | None = field(
        default=None,
        metadata={
            "help": "File with one title per line: these books form test (book mode). "
            "With --val_books/--test_books, all other books are train."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed of the split shuffle."})
    margin: int = field(default=0, metadata={"help": "Pixels added around each text box (clipped to page)."})
    min_size: int = field(default=10, metadata={"help": "Skip boxes narrower or shorter than this (px)."})
    num_workers: int = field(
        default=os.cpu_count() or 1, metadata={"help": "Processes cutting crops (pages run in parallel)."}
    )
    strict: bool = field(
        default=False, metadata={"help": "Stop at the first bad item instead of skipping it."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Delete earlier crops/JSONL and start fresh."})


@dataclass
class Box:
    """One <text> element that passed validation, with its crop rectangle in page pixels."""

    book: str
    page: int
    text_id: str
    text: str
    bbox: tuple[int, int, int, int]
    crop_rel: str


@dataclass
class PageJob:
    book: str
    page: int
    image_path: str
    boxes: list[Box]


@dataclass
class Scan:
    """Everything read from the XML: what to crop, and what was skipped with why."""

    jobs: list[PageJob] = field(default_factory=list)
    skipped_books: Counter = field(default_factory=Counter)
    skipped_pages: Counter = field(default_factory=Counter)
    skipped_texts: Counter = field(default_factory=Counter)
    texts_seen: int = 0
    problems: list[str] = field(default_factory=list)


def read_titles(root: Path) -> list[str]:
    lines = (root / "books.txt").read_text(encoding="utf-8").splitlines()
    # Sorted so that the split never depends on file or filesystem order.
    return sorted({t.strip() for t in lines if t.strip()})


# `<?xml ... encoding="..."?>` at the start of an annotation file (ASCII in every encoding Manga109 uses).
XML_ENCODING = re.compile(rb'^(?:\xef\xbb\xbf)?\s*<\?xml[^>]*?encoding\s*=\s*["\']([A-Za-z0-9._-]+)["\']')
# Names Japanese editors write that neither libxml2 nor Python's codecs know.
ENCODING_ALIASES = {"windows-31j": "cp932", "x-sjis": "shift_jis", "sjis": "shift_jis"}


class AnnotationError(ValueError):
    """An annotation file that can't be read: args are (skip reason, detail)."""


def read_annotation(path: Path) -> etree._Element:
    """The XML's root, read in the encoding it declares (UTF-8 when it declares none).

    libxml2 reads UTF-8, UTF-16 and, through iconv, Shift_JIS; names it does not know (Windows-31J, cp932 on
    some builds) are decoded by Python's codecs instead. Bytes that are not in the declared encoding (a
    Shift-JIS file under a UTF-8 declaration) are an AnnotationError, never a guess: a wrong guess would
    train on garbled text."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    data = path.read_bytes()
    try:
        return etree.fromstring(data, parser)
    except etree.XMLSyntaxError as e:
        first_error = e
    match = XML_ENCODING.match(data)
    declared = match.group(1).decode("ascii") if match else "utf-8"
    try:
        codec = codecs.lookup(ENCODING_ALIASES.get(declared.lower(), declared)).name
        # A "Shift_JIS" file from a Windows editor is cp932: strict Shift_JIS (libxml2's iconv, Python's
        # shift_jis) refuses its extensions (髙, ①, ㈱), which is why libxml2 failed above.
        text = data.decode("cp932" if codec == "shift_jis" else codec)
    except LookupError:
        raise AnnotationError("unknown_encoding", f"{path}: declares encoding {declared!r}, which is not "
                              "known; save it as UTF-8") from None
    except UnicodeDecodeError as e:
        raise AnnotationError("undecodable_xml", f"{path}: byte {e.start} is not {declared} (saved in "
                              "another encoding, e.g. Shift-JIS? declare it in <?xml ... encoding=...?> or "
                              "save it as UTF-8)") from None
    try:  # lxml refuses a str that still carries an encoding declaration
        return etree.fromstring(re.sub(r"^\ufeff?\s*<\?xml[^>]*\?>", "", text), parser)
    except etree.XMLSyntaxError:
        raise AnnotationError("malformed_xml", f"{path}: {first_error}") from None


def _int_attr(el, name: str) -> int:
    value = el.get(name)
    if value is None or not value.strip().lstrip("-").isdigit():
        raise ValueError(name)
    return int(value)


def scan_release(root: Path, titles: list[str], args: PrepareArguments) -> Scan:
    scan = Scan()

    def skip(counter: Counter, reason: str, where: str) -> None:
        counter[reason] += 1
        if reason in FILTERED:
            return  # ordinary filtering, not a data problem
        if args.strict:
            raise PrepareError(f"{reason}: {where}")
        scan.problems.append(f"{reason}: {where}")

    for title in titles:
        if "/" in title or "\\" in title or ".." in title or title in (".", ""):
            skip(scan.skipped_books, "unsafe_title", f"books.txt title {title!r}")
            continue
        xml_path = root / args.annotation_set / f"{title}.xml"
        if not xml_path.is_file():
            skip(scan.skipped_books, "missing_annotation", str(xml_path))
            continue
        try:
            tree = read_annotation(xml_path)
        except AnnotationError as e:
            skip(scan.skipped_books, *e.args)
            continue
        except OSError as e:  # unreadable file (permissions, I/O error)
            skip(scan.skipped_books, "unreadable_annotation", f"{xml_path}: {e.strerror or e}")
            continue
        for page_el in tree.iterfind(".//pages/page"):
            texts = page_el.findall("text")
            scan.texts_seen += len(texts)
            try:
                index, width, height = (_int_attr(page_el, a) for a in ("index", "width", "height"))
            except ValueError as e:
                skip(
                    scan.skipped_pages, "bad_page_attributes", f"{xml_path} page {page_el.get('index')} ({e})"
                )
                scan.skipped_texts["bad_page_attributes"] += len(texts)
                continue
            boxes = []
            for t in texts:
                where = f"{xml_path} page {index} text {t.get('id')}"
                box = _check_box(
                    t, title, index, width, height, args, lambda r, w=where: skip(scan.skipped_texts, r, w)
                )
                if box:
                    boxes.append(box)
            if boxes:
                scan.jobs.append(
                    PageJob(title, index, str(root / "images" / title / f"{index:03d}.jpg"), boxes)
                )
    return scan


def _check_box(t, title: str, page: int, width: int, height: int, args: PrepareArguments, skip) -> Box | None:
    text = t.text or ""
    if not text.strip():
        return skip("empty_text")
    try:
        x0, y0, x1, y1 = (_int_attr(t, a) for a in ("xmin", "ymin", "xmax", "ymax"))
    except ValueError:
        return skip("non_integer_coordinate")
    if x0 >= x1 or y0 >= y1:
        return skip("invalid_box")
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if cx0 >= cx1 or cy0 >= cy1:
        return skip("off_page")
    if cx1 - cx0 < args.min_size or cy1 - cy0 < args.min_size:
        return skip("too_small")
    if max(cx1 - cx0, cy1 - cy0) > MAX_ASPECT * min(cx1 - cx0, cy1 - cy0):
        return skip("extreme_aspect")
    m = args.margin
    bbox = (max(cx0 - m, 0), max(cy0 - m, 0), min(cx1 + m, width), min(cy1 + m, height))
    text_id = t.get("id") or f"p{page}_{x0}_{y0}"
    return Box(title, page, text_id, text, bbox, f"crops/{title}/{page:03d}_{text_id}.png")
