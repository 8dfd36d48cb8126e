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

import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps
from tqdm import tqdm

from paddleocr_vl_manga.data.manga109 import PrepareError, parse_dataclass_args, write_atomic, write_failed
from paddleocr_vl_manga.data.synth.fonts import ELSEWHERE_HINT, find_manga_fonts
from paddleocr_vl_manga.data.synth.screentone import draw_screentone

TOOL_VERSION = "synthesize_lines 1.1"  # 1.1: mixture classes matched to Manga109 train
CHUNK = 250  # lines per work unit: one RNG, one crop folder, one part file
STATE_FILE = ".synth_state.json"

HIRAGANA = "".join(chr(c) for c in range(0x3041, 0x3097))
KATAKANA = "".join(chr(c) for c in range(0x30A1, 0x30FB)) + "ー"
SMALL = "ぁぃぅぇぉっゃゅょゎァィゥェォッャュョヮヵヶ"
# JIS X 0208 rows 16-47 are level-1 kanji, 48-84 level-2: decoding every EUC-JP code of those rows lists them.
JIS_KANJI = "".join(
    ch for row in range(16, 85) for cell in range(1, 95)
    if len(ch := bytes([0xA0 + row, 0xA0 + cell]).decode("euc_jp", errors="ignore")) == 1
)
PUNCT = "！？…ー、。「」『』（）～〜♪・―"
ASCII = "".join(chr(c) for c in range(0x21, 0x7F))
FULLWIDTH = "".join(chr(c) for c in range(0xFF01, 0xFF5F))
INTERJECTIONS = (
    "えっ ああ うわぁ おい ねえ へぇ ほら よし まさか くそっ やった あれ？ はぁ ふーん えへへ うーん きゃあ "
    "ちょっ なっ ええ！？ はい いや うん おお わあ ひっ ぎゃあ あっ もう！ さあ ほう ふふ げっ おっと"
).split()
PARTICLES = "よ ね な ぞ ぜ わ の か かな さ だよ だね じゃん って でしょ だろ っす のよ かしら".split()
ENDINGS = ["！", "？", "！？", "…", "……", "ー", "ッ", "♪", "、", "。", "！！", "～", "っ"]
SFX_SYLLABLES = "ドゴザバガギズダパピポブビベボキカコトツチシスサ"
# Manga-ocr's length distribution (Manga109): peak near 4 characters, long tail to ~30.
DEFAULT_LENGTHS = {n: n ** 1.2 * math.exp(-n / 3.2) for n in range(1, 41)}
SIZES = (16, 18, 20, 22, 24, 26, 28, 30, 33, 36, 40, 44, 48)  # quantized so glyph caches hit
STYLE_WEIGHTS = {
    "gothic": 0.3, "mincho": 0.15, "rounded": 0.1, "brush": 0.07, "handwriting": 0.18, "pop": 0.2,
}
# Rotated or moved in vertical text: the font must do it itself (its `vert` feature) to draw it vertically.
VERT_TALL = "ー…〜～―"  # wide horizontally, tall in a column
VERT_WIDE = "「」『』（）"  # tall horizontally, wide in a column
VERT_CORNER = "、。"  # bottom-left horizontally, top-right in a column
NO_START = set(SMALL + "ー、。」』）！？…")  # a column or line never starts with these (kinsoku)


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


class SynthError(Exception):
    """A problem that stops the run; printed without traceback."""


# ---------------------------------------------------------------- fonts: what each face really draws


def _ink(font: ImageFont.FreeTypeFont, ch: str, direction: str | None = None) -> tuple | None:
    """Ink box of one character drawn in a 2-em cell (None: blank), from real rasterization."""
    size = font.size
    im = Image.new("L", (2 * size, 2 * size), 0)
    try:
        ImageDraw.Draw(im).text((size, size // 2), ch, fill=255, font=font, anchor="mt", direction=direction)
    except (OSError, ValueError):  # some Ume faces raise FreeType errors on odd glyphs
        return None
    return im.getbbox()


def font_info(path: str, style: str, candidates: str) -> dict:
    """Characters with real outlines (the cmap lies: blank glyphs are common) and a vertical-layout check."""
    from fontTools.ttLib import TTFont

    cmap = TTFont(path, fontNumber=0, lazy=True).getBestCmap() or {}
    font = ImageFont.truetype(path, 32)
    chars = "".join(c for c in candidates if ord(c) in cmap and _ink(font, c) is not None)
    bad = set()  # characters whose vertical form the font does not provide
    for c in VERT_TALL + VERT_WIDE + VERT_CORNER:
        if c not in chars:
            continue
        box, hbox = _ink(font, c, "ttb"), _ink(font, c)
        w, h = (box[2] - box[0], box[3] - box[1]) if box else (0, 0)
        hw, hh = hbox[2] - hbox[0], hbox[3] - hbox[1]
        if c in VERT_TALL:
            ok = box is not None and h > w and hw > hh
        elif c in VERT_WIDE:
            ok = box is not None and w > h and hh > hw
        else:  # the cell spans x 16..48, y 16..48: the mark must sit in its top-right quarter
            ok = box is not None and (box[0] + box[2]) / 2 > 32 and (box[1] + box[3]) / 2 < 32 + 2
        if not ok:
            bad.add(c)
    vertical = not bad & set("ー「」、。") and all(c in chars for c in "ー「」、。")
    return {
        "path": path, "style": style, "chars": chars, "vertical": vertical,
        "no_vertical": "".join(sorted(bad)),
    }


def _cached_font_info(args: tuple[str, str, str]) -> dict:
    path, style, candidates = args
    st = os.stat(path)
    key = f"{TOOL_VERSION}|{path}|{st.st_size}|{st.st_mtime_ns}|{candidates}"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "manga-ocr" / "fonts"
    cache = cache / f"{hashlib.sha1(key.encode()).hexdigest()}.json"
    if cache.is_file():
        return {**json.loads(cache.read_text(encoding="utf-8")), "style": style}
    info = font_info(path, style, candidates)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, json.dumps(info, ensure_ascii=False))
    except OSError:
        pass  # a read-only home only costs the check next time
    return info


# ---------------------------------------------------------------- text


def _clean(text: str) -> str:
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c)[0] != "C")


# The offline mixture's kinds of text, their default weights, and the character class each mostly draws.
KINDS = ("words", "interjection", "sfx", "kanji", "number", "latin", "punct")
KIND_WEIGHTS = (0.55, 0.1, 0.1, 0.1, 0.06, 0.03, 0.06)
KIND_CLASS = ("hiragana", "hiragana", "katakana", "kanji", "digit", "latin", "punct")
CLASSES = ("hiragana", "katakana", "kanji", "digit", "latin", "punct")


def char_class(ch: str) -> str:
    if "\u3041" <= ch <= "\u309f":
        return "hiragana"
    if "\u30a0" <= ch <= "\u30ff":  # with ー
        return "katakana"
    if "\u4e00" <= ch <= "\u9fff" or ch == "々":
        return "kanji"
    if ch.isdigit():  # half- and full-width
        return "digit"
    if ch.isascii() and ch.isalpha() or ch.isalpha() and "\uff21" <= ch <= "\uff5a":
        return "latin"
    return "punct"


def class_shares(texts: Iterable[str]) -> dict[str, float]:
    """Share of each character class among all characters of the texts."""
    counts = Counter(char_class(c) for t in texts for c in t)
    total = sum(counts.values()) or 1
    return {c: counts[c] / total for c in CLASSES}


def load_words(limit: int = 60000) -> list[str]:
    """Japanese tokens of wordfreq's large list, most frequent first (no MeCab needed for top_n_list)."""
    from wordfreq import top_n_list

    jp = set(HIRAGANA + KATAKANA + JIS_KANJI + "々")
    return [w for w in top_n_list("ja", 200000, wordlist="large") if all(c in jp for c in w)][:limit]


@dataclass
class TextSource:
    words: list[str]
    texts: list[str]  # Manga109 train texts; empty without --manga109_dir
    lengths: dict[int, float]
    vertical_share: float
    kind_weights: list[float] = field(default_factory=lambda: list(KIND_WEIGHTS))

    def __post_init__(self) -> None:
        # With Manga109 train texts, the mixture's character classes are matched to theirs: each kind's
        # weight moves by its class's ratio target / drawn, over a few rounds of a fixed-seed sample.
        if not self.texts:
            return
        target, rng = class_shares(self.texts), random.Random(0)
        for _ in range(6):
            got = class_shares(self.mixture(rng, self.length(rng)) for _ in range(1500))
            self.kind_weights = [w * ((target[c] + 1e-3) / (got[c] + 1e-3)) ** 0.8
                                 for w, c in zip(self.kind_weights, KIND_CLASS, strict=True)]

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """(text, kind): a train text as it is, two recombined, or the offline mixture."""
        r = rng.random()
        if self.texts and r < 0.55:
            return rng.choice(self.texts), "manga109"
        if self.texts and r < 0.7:
            a, b = rng.choice(self.texts), rng.choice(self.texts)
            return a[: rng.randint(1, len(a))] + b[rng.randrange(len(b)):], "recombined"
        return self.mixture(rng, self.length(rng)), "mixture"

    def length(self, rng: random.Random) -> int:
        return rng.choices(list(self.lengths), list(self.lengths.values()))[0]

    def mixture(self, rng: random.Random, n: int) -> str:
        parts: list[str] = []
        while sum(map(len, parts)) < n:
            kind = rng.choices(KINDS, self.kind_weights)[0]
            if kind == "words":  # frequent words more often: a Zipf-like pick over the rank
                k = rng.randint(1, 4)
                parts.append("".join(self.words[int(len(self.words) ** rng.random()) - 1] for _ in range(k)))
                if rng.random() < 0.3:
                    parts.append(rng.choice(PARTICLES))
            elif kind == "interjection":
                parts.append(rng.choice(INTERJECTIONS))
            elif kind == "sfx":
                unit = "".join(rng.choice(SFX_SYLLABLES) for _ in range(rng.randint(1, 2)))
                parts.append(unit * rng.randint(1, 3) + rng.choice(["ッ", "ー", "ーッ", "", "！"]))
            elif kind == "kanji":  # rare kanji get seen: uniform over JIS level 1 + 2
                parts.append("".join(rng.choice(JIS_KANJI) for _ in range(rng.randint(1, 3))))
            elif kind == "number":
                digits = "0123456789" if rng.random() < 0.5 else "０１２３４５６７８９"
                parts.append("".join(rng.choice(digits) for _ in range(rng.randint(1, 4))))
            elif kind == "latin":
                letters = ASCII[32:58] + ASCII[64:90] if rng.random() < 0.5 else FULLWIDTH[32:58]
                parts.append("".join(rng.choice(letters) for _ in range(rng.randint(1, 4))))
            else:
                parts.append(rng.choice(ENDINGS))
        text = "".join(parts)[:n]
        if rng.random() < 0.05 and n > 2:
            text = "「" + text[: n - 2] + "」"
        return text.lstrip("".join(NO_START)) or rng.choice(INTERJECTIONS)


def read_manga109(prepared: Path) -> tuple[list[str], dict[int, float], float, list[dict]]:
    """Texts, length histogram, vertical share and pages (with text boxes) of the train split only."""
    path = prepared / "train.jsonl"
    if not path.is_file():
        raise SynthError(f"{path} not found: pass the output folder of prepare_manga109_data.py")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SynthError(f"{path}: byte {e.start} is not UTF-8, which prepare_manga109_data.py writes") \
            from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            if line.strip():
                records.append(json.loads(line))
                str(records[-1]["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SynthError(f"{path}:{number}: not a record of prepare_manga109_data.py ({e})") from None
    texts = [t for r in records if (t := _clean(r["text"]))]
    if not texts:
        raise SynthError(f"{path} has no texts")
    lengths = Counter(min(len(t), 60) for t in texts)
    vertical = sum(r.get("orientation") == "vertical" for r in records) / len(records)
    root = None
    manifest = prepared / "manifest.json"
    if manifest.is_file():
        root = json.loads(manifest.read_text(encoding="utf-8")).get("arguments", {}).get("manga109_root")
    pages: dict[tuple[str, int], list] = {}
    for r in records:
        if root and "book" in r and "bbox" in r:
            pages.setdefault((r["book"], int(r["page"])), []).append(r["bbox"])
    page_list = [
        {"path": str(Path(root) / "images" / b / f"{p:03d}.jpg"), "boxes": boxes}
        for (b, p), boxes in sorted(pages.items())
        if os.path.isfile(Path(root) / "images" / b / f"{p:03d}.jpg")
    ]
    return sorted(set(texts)), dict(sorted(lengths.items())), vertical, page_list


# ---------------------------------------------------------------- drawing (runs in workers)

_CTX: dict = {}
_FONT_CACHE: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}
_GLYPHS: dict[tuple, tuple[Image.Image, Image.Image | None]] = {}


def _init_worker(ctx: dict) -> None:
    _CTX.clear()
    _CTX.update(ctx)
    for f in ctx["fonts"]:
        f["charset"] = frozenset(f["chars"])
        f["vset"] = frozenset(f["chars"]) - frozenset(f["no_vertical"])


def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    if (path, size) not in _FONT_CACHE:
        _FONT_CACHE[path, size] = ImageFont.truetype(path, size)
    return _FONT_CACHE[path, size]


def _glyph(path: str, size: int, unit: str, stroke: int) -> tuple[Image.Image, Image.Image | None]:
    """Masks (fill, fill + outline) of one 1-em vertical cell, cached: lines reuse kana and punctuation."""
    key = (path, size, unit, stroke)
    if key not in _GLYPHS:
        if len(_GLYPHS) > 100000:  # bounds a worker's memory on long runs
            _GLYPHS.clear()
        pad = stroke + 2
        cell = Image.new("L", (size + 2 * pad, size + 2 * pad), 0)
        draw, font = ImageDraw.Draw(cell), _font(path, size)
        if len(unit) > 1 or unit in ASCII:  # tate-chu-yoko or a half-width character: upright, squeezed
            f = _font(path, max(8, min(size, int(size * size / max(font.getlength(unit), 1)))))
            kw = dict(xy=(pad + size / 2, pad + size / 2), text=unit, font=f, anchor="mm")
        else:  # `ttb` applies the font's vert substitutions: 「→﹁, ー→｜, 、。 to the top right
            kw = dict(xy=(pad + size / 2, pad), text=unit, font=font, anchor="mt", direction="ttb")
        draw.text(fill=255, **kw)
        outline = None
        if stroke:
            outline = Image.new("L", cell.size, 0)
            ImageDraw.Draw(outline).text(fill=255, stroke_width=stroke, stroke_fill=255, **kw)
        _GLYPHS[key] = (cell, outline)
    return _GLYPHS[key]


def _units(text: str, rng: random.Random, tcy: bool) -> list[str]:
    """Vertical cells: one character each, or a run of 2-3 half-width characters across (tate-chu-yoko)."""
    units, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and text[j] in ASCII:
            j += 1
        if tcy and 2 <= j - i <= 3:
            units.append(text[i:j])
        else:  # a longer half-width run (or none): one cell per character
            units.extend(text[i:max(j, i + 1)])
        i = max(j, i + 1)
    return units


def _split(units: list[str], per: int) -> list[list[str]]:
    """Columns or lines of at most `per` units; a mark that may not start one stays at the end of the last."""
    cols: list[list[str]] = [[]]
    for u in units:
        if len(cols[-1]) >= per and u not in NO_START:
            cols.append([])
        cols[-1].append(u)
    return cols


def _layout(rng: random.Random, text: str, font: dict, size: int, vertical: bool, stroke: int, s: dict):
    """Masks (fill, outline or None) of the text block, furigana included."""
    per = rng.randint(3, 12) if vertical else rng.randint(5, 16)
    multi = len(text) > per and rng.random() < 0.8
    furigana = rng.random() < 0.35 and any("\u4e00" <= c <= "\u9fff" for c in text)
    fs = max(8, round(size * 0.45))
    pitch = round(size * (1.6 if furigana else rng.uniform(1.1, 1.45)))
    s.update(multi_line=multi, furigana=furigana)
    path = font["path"]
    if vertical:
        units = _units(text, rng, rng.random() < 0.7)
        s["tcy"] = any(len(u) > 1 for u in units)
        cols = _split(units, per if multi else len(units))
        track = size + rng.choice([0, 0, 1, 2, round(size * 0.1)])
        extra = fs + 2 if furigana else 0
        w, h = size + (len(cols) - 1) * pitch + extra, max(map(len, cols)) * track - (track - size)
        pad = stroke + 2
        fill, outline = Image.new("L", (w + 2 * pad, h + 2 * pad), 0), None
        if stroke:
            outline = Image.new("L", fill.size, 0)
        for j, col in enumerate(cols):  # columns run right to left
            x = w - extra - size - j * pitch
            for i, u in enumerate(col):
                g, o = _glyph(path, size, u, stroke)
                fill.paste(255, (x, i * track), g)
                if outline is not None:
                    outline.paste(255, (x, i * track), o)
            if furigana:  # a few random kana beside each kanji run, as ruby would be; not in the label
                i = 0
                while i < len(col):
                    k = i
                    while k < len(col) and "\u4e00" <= col[k] <= "\u9fff":
                        k += 1
                    if k > i and rng.random() < 0.7:
                        n_ruby = rng.randint(1, min(4, 2 * (k - i)))
                        ruby = "".join(rng.choice(HIRAGANA[:82]) for _ in range(n_ruby))
                        y0 = i * track + ((k - i) * track - len(ruby) * fs) // 2
                        for r, ch in enumerate(ruby):
                            g, _ = _glyph(path, fs, ch, 0)
                            fill.paste(255, (x + size + pad // 2, max(0, y0 + r * fs)), g)
                    i = max(k, i + 1)
        return fill, outline
    lines = _split(list(text), per if multi else len(text))
    pil_font = _font(path, size)
    rows = ["".join(line) for line in lines]
    top = fs + 2 if furigana else 0
    w = math.ceil(max(pil_font.getlength(r) for r in rows))
    h = top + size + (len(rows) - 1) * pitch
    pad = stroke + 2
    fill = Image.new("L", (w + 2 * pad, h + 2 * pad), 0)
    outline = Image.new("L", fill.size, 0) if stroke else None
    for i, row in enumerate(rows):
        y = pad + top + i * pitch
        ImageDraw.Draw(fill).text((pad, y), row, fill=255, font=pil_font, anchor="lt")
        if outline is not None:
            ImageDraw.Draw(outline).text((pad, y), row, fill=255, font=pil_font, anchor="lt",
                                         stroke_width=stroke, stroke_fill=255)
        if furigana:
            small = _font(path, fs)
            for k, c in enumerate(row):
                if "\u4e00" <= c <= "\u9fff" and rng.random() < 0.6:
                    ruby = "".join(rng.choice(HIRAGANA[:82]) for _ in range(rng.randint(1, 2)))
                    x = pad + pil_font.getlength(row[:k]) + size / 2
                    ImageDraw.Draw(fill).text((x, y - 1), ruby, fill=255, font=small, anchor="mb")
    return fill, outline


def _background(rng: random.Random, w: int, h: int, s: dict) -> Image.Image:
    pages = _CTX["pages"]
    if pages and rng.random() < 0.6:  # a piece of a real train page that holds no text box
        page = pages[rng.randrange(len(pages))]
        im = _page_image(page["path"])
        scale = im.info["scale"]
        for _ in range(8):
            if im.width <= w or im.height <= h:
                break
            x, y = rng.randrange(im.width - w), rng.randrange(im.height - h)
            X0, Y0, X1, Y1 = x / scale, y / scale, (x + w) / scale, (y + h) / scale
            if not any(X0 < b[2] and b[0] < X1 and Y0 < b[3] and b[1] < Y1 for b in page["boxes"]):
                s["background"] = f"page:{Path(page['path']).parent.name}/{Path(page['path']).name}"
                return im.crop((x, y, x + w, y + h))
    img = Image.new("L", (w, h), 255)
    if rng.random() < 0.7:
        draw_screentone(rng, img, (0, 0, w, h))
        s["background"] = "screentone"
    else:
        s["background"] = "white"
    return img


_PAGES: dict[str, Image.Image] = {}


def _page_image(path: str) -> Image.Image:
    """Pages decoded at half size (JPEG draft mode is ~4x faster), a few kept per worker."""
    if path not in _PAGES:
        if len(_PAGES) > 16:
            _PAGES.pop(next(iter(_PAGES)))
        with Image.open(path) as im:
            full = im.size
            im.draft("L", (full[0] // 2, full[1] // 2))
            page = im.convert("L")
        page.info["scale"] = page.width / full[0]
        _PAGES[path] = page
    return _PAGES[path]


def _pick_font(rng: random.Random, text: str, vertical: bool) -> tuple[dict | None, bool]:
    """A font by style that draws every character (vertically if asked); falls back to horizontal."""
    fonts = _CTX["fonts"]
    need = set(text)
    for want_vertical in ((True, False) if vertical else (False,)):
        ok = [f for f in fonts if need <= (f["vset"] if want_vertical else f["charset"])
              and (f["vertical"] or not want_vertical)]
        if ok:
            styles = sorted({f["style"] for f in ok})
            style = rng.choices(styles, [STYLE_WEIGHTS.get(st, 0.1) for st in styles])[0]
            return rng.choice([f for f in ok if f["style"] == style]), want_vertical
    return None, False


def render_line(rng: random.Random, text: str, vertical: bool) -> tuple[Image.Image, str, dict] | None:
    """One crop of exactly `text`: (image, font path, render settings), or None if no font can draw it."""
    font, vertical = _pick_font(rng, text, vertical)
    if font is None:
        return None
    size = rng.choice(SIZES)
    bubble = rng.random() < 0.6
    # Text over artwork is nearly always outlined in manga; inside a bubble an outline is optional.
    outlined = rng.random() < (0.5 if bubble else 0.9)
    stroke = rng.choice([1, 2, 3, 4, max(2, size // 6)]) if outlined else 0
    s: dict = {"size": size, "vertical": vertical, "stroke": stroke, "bubble": bubble}
    fill, outline = _layout(rng, text, font, size, vertical, stroke, s)
    margin = size // 2 + stroke + 4  # room for rotation and the bubble's edge
    W, H = fill.width + 2 * margin, fill.height + 2 * margin
    canvas = _background(rng, W, H, s)
    draw = ImageDraw.Draw(canvas)
    if bubble:  # only its edge shows at the crop corners, as in Manga109 crops
        grow = rng.uniform(1.05, 1.35)
        ex, ey = W / 2 * grow, H / 2 * grow
        box = (W / 2 - ex, H / 2 - ey, W / 2 + ex, H / 2 + ey)
        (draw.ellipse if rng.random() < 0.7 else draw.rectangle)(
            box, fill=rng.randint(235, 255), outline=rng.randint(0, 40), width=rng.randint(2, 4))
    ink, paper = rng.randint(0, 50), rng.randint(225, 255)
    if rng.random() < 0.12:  # white letters outlined in black, as SFX often are
        ink, paper = paper, ink
    s["shadow"] = not stroke and rng.random() < 0.4
    at = (margin, margin)
    if s["shadow"]:
        d = max(1, size // 12)
        canvas.paste(rng.randint(90, 170), (margin + d, margin + d), fill)
    if outline is not None:
        canvas.paste(paper, at, outline)
    canvas.paste(ink, at, fill)
    mask = Image.new("L", canvas.size, 0)
    mask.paste(outline if outline is not None else fill, at)
    canvas, mask = _geometry(rng, canvas, mask, s)
    x0, y0, x1, y1 = mask.getbbox() or (0, 0, W, H)
    m = [rng.randint(0, max(1, size // 5)) for _ in range(4)]
    crop = canvas.crop((max(0, x0 - m[0]), max(0, y0 - m[1]), min(W, x1 + m[2]), min(H, y1 + m[3])))
    return _photometric(rng, crop, s), font["path"], s


def _geometry(rng: random.Random, canvas: Image.Image, mask: Image.Image, s: dict):
    """Small rotation or perspective, applied to the text mask too so the crop still holds every glyph."""
    r = rng.random()
    if r < 0.25:
        angle = rng.uniform(-3, 3)
        s["rotate"] = round(angle, 2)
        fillc = int(np.median(np.asarray(canvas)))
        return (canvas.rotate(angle, Image.Resampling.BILINEAR, fillcolor=fillc),
                mask.rotate(angle, Image.Resampling.BILINEAR))
    if r < 0.4:
        w, h = canvas.size
        j = 0.04 * min(w, h)
        quad = [v + rng.uniform(-j, j) for v in (0, 0, 0, h, w, h, w, 0)]
        s["perspective"] = True
        fillc = int(np.median(np.asarray(canvas)))
        return (canvas.transform(canvas.size, Image.Transform.QUAD, quad, Image.Resampling.BILINEAR,
                                 fillcolor=fillc),
                mask.transform(mask.size, Image.Transform.QUAD, quad, Image.Resampling.BILINEAR))
    return canvas, mask


def _photometric(rng: random.Random, img: Image.Image, s: dict) -> Image.Image:
    aug = []
    if rng.random() < 0.2:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
        aug.append("blur")
    if rng.random() < 0.2:
        f = rng.uniform(0.45, 0.8)
        small = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))))
        img = small.resize(img.size, Image.Resampling.BILINEAR)
        aug.append("downscale")
    if rng.random() < 0.2:
        gen = np.random.default_rng(rng.getrandbits(32))
        noise = gen.normal(0, rng.uniform(3, 12), (img.height, img.width))
        img = Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))
        aug.append("noise")
    if rng.random() < 0.25:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(30, 90))
        img = Image.open(buf).convert("L")
        aug.append("jpeg")
    if rng.random() < 0.04:
        img = ImageOps.invert(img)
        aug.append("invert")
    s["augment"] = aug
    return img


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
