"""How a synthetic line looks: fonts checked glyph by glyph, vertical or horizontal layout one character per
cell, stroke, backgrounds cut from pages or screen tone, then geometric and photometric noise."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from paddleocr_vl_manga.data.manga109 import write_atomic
from paddleocr_vl_manga.data.synth.screentone import draw_screentone
from paddleocr_vl_manga.data.synth.text import ASCII, HIRAGANA, NO_START

TOOL_VERSION = "synthesize_lines 1.1"  # 1.1: mixture classes matched to Manga109 train
SIZES = (16, 18, 20, 22, 24, 26, 28, 30, 33, 36, 40, 44, 48)  # quantized so glyph caches hit
STYLE_WEIGHTS = {
    "gothic": 0.3, "mincho": 0.15, "rounded": 0.1, "brush": 0.07, "handwriting": 0.18, "pop": 0.2,
}
# Rotated or moved in vertical text: the font must do it itself (its `vert` feature) to draw it vertically.
VERT_TALL = "ー…〜～―"  # wide horizontally, tall in a column
VERT_WIDE = "「」『』（）"  # tall horizontally, wide in a column
VERT_CORNER = "、。"  # bottom-left horizontally, top-right in a column


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
