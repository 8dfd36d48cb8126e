"""Generate a synthetic dataset in the exact Manga109 release layout (books.txt, annotations/, images/).

Manga109s cannot be shipped, so tests, the demo and benchmarks run on this stand-in: Japanese text
drawn with real CJK fonts, mostly vertical, inside light speech bubbles over busy drawn-looking panels,
plus the odd cases the real annotations have (empty text, tiny boxes, boxes touching or crossing the page
edge). Output is byte-identical for a given seed whatever --num_workers is: every page has its own RNG.

--extremes also puts on the first page of every book the extremes that every split of the real Manga109s
holds (a large box, thin 10 x 400 and 400 x 10 boxes, a 12 x 12 box, 100+ character texts mixing Japanese,
Latin letters and digits, an empty text), so a book-level split gives each split some of each.

    python tools/make_synthetic_manga109.py --out data/synth --books 3 --pages 20 --seed 0
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import random
import sys
from pathlib import Path

from lxml import etree
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python tools/X.py`: the package is at the root
    sys.path.insert(0, str(ROOT))
from paddleocr_vl_manga.data.synth.fonts import INSTALL_HINT, find_cjk_fonts  # noqa: E402
from paddleocr_vl_manga.data.synth.screentone import draw_screentone  # noqa: E402

HIRAGANA = "".join(chr(c) for c in range(0x3041, 0x3094))
KATAKANA = "".join(chr(c) for c in range(0x30A1, 0x30F5)) + "ー"
KANJI = (
    "一二三四五六七八九十百千万円年月日時分今何人子女男私僕俺君彼方自手目口耳足頭顔心気体力生死先後前上下"
    "左右中外内大小高長新古多少早良悪好強弱明暗白黒赤青金銀水火木土山川空海雨雪風花春夏秋冬朝昼夜東西南北"
    "国町村家店道駅車電話学校会社仕事言語見聞読書行来帰出入立座食飲買売待持思知考感愛恋友達兄弟姉妹父母親"
    "様当本物情味変動止開閉始終着使作送返通教習練勝負戦殺守助信頼約束夢命運神魔王剣世界者部屋間違正直全然"
    "急無理最初回度名誰元逃聞敵味方"
)
PUNCT = "ー…！？「」、。"
DIGITS = "0123456789" + "".join(chr(0xFF10 + i) for i in range(10))
LATIN = (
    "".join(chr(c) for c in range(0x41, 0x5B)) + "".join(chr(c) for c in range(0x61, 0x7B))
    + "".join(chr(c) for c in range(0xFF21, 0xFF3B)) + "".join(chr(c) for c in range(0xFF41, 0xFF5B))
)
PHRASES = (
    "おはよう ありがとう ごめんなさい なんだって！？ ちょっと待って 大丈夫？ 行くぞ！ "
    "そうだね 本当に？ やめろ！ え？ はい いいえ うそ… まさか… 私の名前は お前は誰だ "
    "助けて！ すごい！ よし！ 何をしている こんにちは ただいま おかえり いただきます "
    "さようなら あれ？ どうして… 気をつけて 早く！ 負けないぞ 約束だよ 信じてる ドキドキ "
    "ワクワク ゴゴゴゴ バーン ドン！ ねえ うん ダメだ もう一回 学校に行く 先生！ 友達だろ "
    "逃げろ！ 今日は雨だ お母さん 何だと！？ 大好き 世界の王 魔王様 ＯＫ！ ＮＯ！ ＴＶ 3時 "
    "１０年 100円 ＳＯＳ"
).split()
NO_START = "ーぁぃぅぇぉっゃゅょゎゕゖァィゥェォッャュョヮヵヶ、。」"  # never begin a random run
# Sorted so that a tokenizer built from it is the same on every run and machine.
CHARSET: str = "".join(sorted(set(HIRAGANA + KATAKANA + KANJI + PUNCT + DIGITS + LATIN + "".join(PHRASES))))
# --charset: "full" is the mixed text above (phrases, runs, SFX, digits, Latin: CHARSET). The others draw
# every text as a random run of 1..max_chars characters of a small alphabet, which a tiny model learns to read
# within minutes on a CPU (the demo). Each is a subset of CHARSET, so the default tokenizer covers them too.
KATAKANA_BASIC = (  # the 46 basic katakana: no small, voiced or semi-voiced forms
    "アイウエオカキクケコサシスセソタチツテトナニヌネノ"
    "ハヒフヘホマミムメモヤユヨラリルレロワヲン"
)
CHARSETS: dict[str, str] = {
    "full": CHARSET,
    "katakana": KATAKANA_BASIC,
    "digits": DIGITS[10:],  # full-width ０-９
    "katakana_digits": KATAKANA_BASIC + DIGITS[10:],
}
ROTATED = set("ー…「」")  # drawn turned 90° in vertical typesetting
SMALL_PUNCT = set("、。")  # sit in the upper right of their cell in vertical typesetting
TITLE_A = "Sakura Kaze Hoshi Yume Tsuki Umi Sora Hana Kumo Yoru Kage Honoo Midori Akai Shiroi Kuroi".split()
TITLE_B = "Monogatari Nikki Gakuen Bouken Tantei Kingdom Diary Quest Senki Densetsu Days Rhapsody".split()
CHAR_NAMES = "ヒロシ ユキ ケンジ サクラ 先生 王様 魔王 タロウ ハナコ Other".split()
# Latin/digit runs of the long --extremes texts: full- and half-width, and half-width spaces, which the
# release's tokenizer merges with the next letter or digit. " " and "." are outside CHARSET (kept unchanged
# so the tiny tokenizer and the default fixture stay as they are) but inside both tokenizers' ASCII pieces.
LATIN_RUNS = ["ＯＫ", "ABC123", "ＴＶ", "No.1", "Dr. X", "3時", "１０年", "100円", "ＳＯＳ", "OK GO", "R2"]
# --extremes sizes (px). BIG_* makes a box of about 700 x 800: 600+ image tokens with the release's v1
# processor (28 px per token side after merging) even before the answer is counted.
BIG_FONT, BIG_PER_COLUMN = 64, 12
THIN = (10, 400)  # 10 px survives prepare's --min_size 10 (it skips < 10); aspect 40 is under its 150
TINY = 12
LONG_CHARS = (100, 120)  # the text grows by whole pieces until it reaches a length in this range


class NoFontError(RuntimeError):
    """No usable CJK font: the message is fonts.INSTALL_HINT."""


def sample_text(rng: random.Random, max_chars: int, alphabet: str | None = None, min_chars: int = 1) -> str:
    """A plausible-ish line: mostly dialogue phrases, some random runs, SFX katakana and digits/Latin.

    With an ``alphabet`` (a --charset other than full): a random run of min_chars..max_chars of its chars.
    """
    if alphabet:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(min_chars, max_chars)))
    r = rng.random()
    if r < 0.45:
        text = rng.choice(PHRASES)
        if rng.random() < 0.4:  # two utterances in one bubble
            text += ("" if text[-1] in "！？…" else rng.choice(["", "、", "。", "！"])) + rng.choice(PHRASES)
    elif r < 0.7:
        pools = rng.choices([HIRAGANA, KANJI, KATAKANA, PUNCT], [0.6, 0.25, 0.1, 0.05], k=max_chars)
        run = [rng.choice(pool) for pool in pools[: rng.randint(1, max_chars)]]
        text = "".join(run).lstrip(NO_START) or rng.choice(PHRASES)
    elif r < 0.85:
        text = "".join(rng.choice(KATAKANA[:-1]) for _ in range(rng.randint(2, 6))).lstrip(NO_START)
        text = (text or "ド") + rng.choice(["ー", "ッ", "！", ""])
    elif r < 0.93:
        digits = DIGITS[:10] if rng.random() < 0.5 else DIGITS[10:]
        text = "".join(rng.choice(digits) for _ in range(rng.randint(1, 4)))
        text += rng.choice(["年", "円", "時", "人", "回", "", "！"])
    else:
        letters = LATIN[:52] if rng.random() < 0.5 else LATIN[52:]  # half- or full-width, not mixed
        text = "".join(rng.choice(letters) for _ in range(rng.randint(1, 6)))
    if rng.random() < 0.08:
        text = "「" + text + "」"
    return text[:max_chars]


_FONTS: list[str] = []
_CACHE: dict[tuple, object] = {}  # per worker: building FreeType faces and rotated glyphs is the slow part


def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    key = (path, size)
    if key not in _CACHE:
        _CACHE[key] = ImageFont.truetype(path, size)
    return _CACHE[key]


def _rotated_glyph(path: str, size: int, ch: str) -> Image.Image:
    key = (path, size, ch)
    if key not in _CACHE:
        tmp = Image.new("L", (2 * size, 2 * size), 0)
        ImageDraw.Draw(tmp).text((size, size), ch, fill=255, font=_font(path, size), anchor="mm")
        _CACHE[key] = tmp.transpose(Image.Transpose.ROTATE_270)
    return _CACHE[key]


def _init_worker(fonts: list[str]) -> None:
    _FONTS[:] = fonts


def _panels(rng: random.Random, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Panels of a two-page spread: each half cut into rows, each row into 1-3 panels, with white gutters."""
    panels = []
    margin, gutter = max(4, width // 40), max(3, width // 120)
    halves = [(0, width // 2), (width // 2, width)] if width > height else [(0, width)]
    for hx0, hx1 in halves:
        rows = rng.randint(2, 4)
        cuts = sorted(rng.sample(range(1, 20), rows - 1)) if rows > 1 else []
        ys = [margin] + [margin + (height - 2 * margin) * c // 20 for c in cuts] + [height - margin]
        for ry0, ry1 in zip(ys, ys[1:], strict=False):
            cols = rng.randint(1, 3)
            xs = [hx0 + margin + (hx1 - hx0 - 2 * margin) * i // cols for i in range(cols + 1)]
            for cx0, cx1 in zip(xs, xs[1:], strict=False):
                if cx1 - cx0 > 2 * gutter + 8 and ry1 - ry0 > 2 * gutter + 8:
                    panels.append((cx0 + gutter, ry0 + gutter, cx1 - gutter, ry1 - gutter))
    return panels


def long_text(rng: random.Random) -> str:
    """A 100+ character utterance (narration-like): phrases with Latin/digit runs, always with a full-width
    run (ＯＫ) and a half-width letters+digits run (ABC123) somewhere in it."""
    target = rng.randint(*LONG_CHARS)
    parts = ["ＯＫ", "ABC123"]
    while sum(map(len, parts)) < target:
        parts.append(rng.choice(LATIN_RUNS) if rng.random() < 0.25 else rng.choice(PHRASES))
    rng.shuffle(parts)
    return "".join(p + ("" if p[-1] in "！？…" or rng.random() < 0.6 else rng.choice("、。")) for p in parts)


def _layout(rng: random.Random, text: str, font: ImageFont.FreeTypeFont, size: int, vertical: bool,
            per: int | None = None):
    """Split text into columns (vertical) or lines (horizontal); return (chunks, block width, height).

    per: characters per column/line; None draws it (the default pages' RNG stream depends on that draw).
    """
    per = per or (rng.randint(3, 8) if vertical else rng.randint(4, 10))
    chunks = [text[i:i + per] for i in range(0, len(text), per)] if len(text) > per else [text]
    if vertical:
        step = round(size * rng.uniform(1.15, 1.4))
        return chunks, size + (len(chunks) - 1) * step, max(map(len, chunks)) * size
    return chunks, math.ceil(max(font.getlength(c) for c in chunks)), round(len(chunks) * size * 1.2)


def _draw_text(img: Image.Image, chunks: list[str], font_path: str, size: int, vertical: bool,
               x0: int, y0: int, w: int, ink: int) -> None:
    draw, font = ImageDraw.Draw(img), _font(font_path, size)
    if not vertical:
        for i, line in enumerate(chunks):
            draw.text((x0, y0 + round((i + 0.5) * size * 1.2)), line, fill=ink, font=font, anchor="lm")
        return
    step = (w - size) // max(1, len(chunks) - 1)
    for j, col in enumerate(chunks):  # columns run right to left
        cx = x0 + w - size // 2 - j * step
        for i, ch in enumerate(col):
            cy = y0 + i * size + size // 2
            if ch in ROTATED:
                img.paste(ink, (cx - size, cy - size), _rotated_glyph(font_path, size, ch))
            elif ch in SMALL_PUNCT:
                draw.text((cx + size // 3, cy - size // 3), ch, fill=ink, font=font, anchor="mm")
            else:
                draw.text((cx, cy), ch, fill=ink, font=font, anchor="mm")


def _overlaps(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    # A later bubble must never paint over earlier text, or that annotation would be wrong.
    return any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed)


def _find_spot(rng: random.Random, w: int, h: int, width: int, height: int,
               placed: list[tuple[int, int, int, int]]) -> tuple[int, int]:
    """Top-left of a free w x h rectangle (with a 4 px margin) fully on the page; random tries, then a scan,
    so a crowded page still finds room when there is any."""
    lo_x, lo_y, hi_x, hi_y = 4, 4, width - w - 4, height - h - 4
    if hi_x >= lo_x and hi_y >= lo_y:
        spots = [(rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y)) for _ in range(50)]
        spots += [(x, y) for y in range(lo_y, hi_y + 1, 8) for x in range(lo_x, hi_x + 1, 8)]
        for x, y in spots:
            if not _overlaps((x - 4, y - 4, x + w + 4, y + h + 4), placed):
                placed.append((x - 4, y - 4, x + w + 4, y + h + 4))
                return x, y
    raise ValueError(f"a {width}x{height} page has no room for a {w}x{h} --extremes box; use larger pages "
                     "(the default 1654x1170 fits them all)")


def _spaced(img: Image.Image, text: str, font_path: str, box: tuple[int, int, int, int], ink: int) -> None:
    """Draw text spread evenly along a thin box's long side (a stretched sound, a dotted line)."""
    x0, y0, x1, y1 = box
    draw, vertical = ImageDraw.Draw(img), y1 - y0 > x1 - x0
    size = min(x1 - x0, y1 - y0) - 1
    n = len(text)
    for i, ch in enumerate(text):
        t = (i + 0.5) / n
        xy = ((x0 + x1) / 2, y0 + t * (y1 - y0)) if vertical else (x0 + t * (x1 - x0), (y0 + y1) / 2)
        draw.text(xy, ch, fill=ink, font=_font(font_path, size), anchor="mm")


def place_extremes(rng: random.Random, img: Image.Image, ann: dict[str, list], placed: list, width: int,
                   height: int) -> None:
    """The real data's extremes, each boxed on a white ground: a large vertical box with a 100+ character
    text in a big font, a 100+ character multi-line text in a normal font, thin boxes 10 x 400 and 400 x 10,
    a 12 x 12 box and an empty box. Raises ValueError when the page is too small for them."""
    draw, font_path = ImageDraw.Draw(img), rng.choice(_FONTS)

    def block(text: str, size: int, per: int, vertical: bool, pad: int) -> None:
        chunks, tw, th = _layout(rng, text, _font(font_path, size), size, vertical, per)
        x, y = _find_spot(rng, tw + 2 * pad, th + 2 * pad, width, height, placed)
        box = (x, y, x + tw + 2 * pad, y + th + 2 * pad)
        draw.rectangle(box, fill=rng.randint(245, 255), outline=rng.randint(0, 40), width=2)
        _draw_text(img, chunks, font_path, size, vertical, x + pad, y + pad, tw, rng.randint(0, 40))
        ann["text"].append((box, "".join(chunks)))

    block(long_text(rng), BIG_FONT, BIG_PER_COLUMN, True, 12)
    size = max(12, round(0.02 * height))
    vertical = rng.random() < 0.7
    block(long_text(rng), size, rng.randint(10, 14) if vertical else rng.randint(12, 18), vertical, 4)
    for w, h in (THIN, THIN[::-1], (TINY, TINY)):
        x, y = _find_spot(rng, w, h, width, height, placed)
        box = (x, y, x + w, y + h)
        n = 1 if w == h else rng.randint(4, 8)
        text = "".join(rng.choice(KATAKANA[:-1] if w < h else DIGITS[:10] + LATIN[:26]) for _ in range(n))
        draw.rectangle(box, fill=255)
        _spaced(img, text, font_path, box, rng.randint(0, 40))
        ann["text"].append((box, text))
    x, y = _find_spot(rng, 60, 80, width, height, placed)  # an empty bubble: prepare skips it (empty_text)
    draw.ellipse((x, y, x + 60, y + 80), fill=255, outline=rng.randint(0, 40), width=2)
    ann["text"].append(((x, y, x + 60, y + 80), ""))


def render_page(task: tuple) -> dict:
    """Draw one page, save its JPEG, and return its annotations (IDs are assigned later, in page order)."""
    seed, book, page, path, width, height, n_chars, max_chars, alphabet, min_chars, extremes = task
    rng = random.Random(f"{seed}:{book}:{page}")
    img = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(img)
    ann: dict[str, list] = {"frame": [], "face": [], "body": [], "text": []}
    for panel in _panels(rng, width, height):
        draw_screentone(rng, img, panel)
        draw.rectangle(panel, outline=0, width=3)
        ann["frame"].append(panel)
        px0, py0, px1, py1 = panel
        for _ in range(rng.randint(0, 2)):  # characters: a body with a face on top
            bw = rng.randint(10, max(11, (px1 - px0) // 3))
            bh = rng.randint(10, max(11, (py1 - py0) * 2 // 3))
            bx, by = rng.randint(px0, max(px0, px1 - bw)), rng.randint(py0, max(py0, py1 - bh))
            fs = max(6, min(bw, bh) // 2)
            face = (bx + (bw - fs) // 2, by, bx + (bw + fs) // 2, by + fs)
            body = (bx, by + fs, bx + bw, by + bh)
            draw.rounded_rectangle(body, radius=4, fill=rng.randint(150, 230), outline=20, width=2)
            draw.ellipse(face, fill=rng.randint(200, 250), outline=10, width=2)
            who = rng.randrange(n_chars)
            ann["body"].append((body, who))
            ann["face"].append((face, who))
    placed: list[tuple[int, int, int, int]] = []
    if extremes and page == 0:  # placed first, so the ordinary bubbles fill the room they leave
        place_extremes(random.Random(f"{seed}:{book}:{page}:extremes"), img, ann, placed, width, height)
    area_scale = width * height / (1654 * 1170)
    for _ in range(max(2, round(rng.randint(7, 16) * area_scale ** 0.5))):
        kind = rng.choices(["normal", "empty", "tiny", "edge"], [0.85, 0.04, 0.04, 0.07])[0]
        font_path = rng.choice(_FONTS)
        if kind == "tiny":
            size = rng.randint(6, 9)
            x, y = rng.randrange(0, width - size), rng.randrange(0, height - size)
            if _overlaps((x - 2, y - 2, x + size + 2, y + size + 5), placed):
                continue
            placed.append((x - 2, y - 2, x + size + 2, y + size + 5))
            ch = rng.choice(alphabet or HIRAGANA)
            draw.text((x + size // 2, y + size // 2), ch, fill=0, font=_font(font_path, size), anchor="mm")
            ann["text"].append(((x, y, x + size, y + rng.randint(size, size + 3)), ch))
            continue
        size = max(12, round(rng.uniform(0.014, 0.026) * height))  # below 12 px glyphs turn to mush
        text = "" if kind == "empty" else sample_text(rng, max_chars, alphabet, min_chars)
        ascii_heavy = sum(c in LATIN or c in DIGITS for c in text) > len(text) / 2
        vertical = rng.random() < (0.35 if ascii_heavy else 0.85)
        chunks, tw, th = _layout(rng, text or "あいう", _font(font_path, size), size, vertical)
        pad = rng.randint(2, 4)
        mx, my = round(tw * rng.uniform(0.3, 0.45)) + 6, round(th * rng.uniform(0.3, 0.45)) + 6
        if tw + 2 * (mx + pad) >= width or th + 2 * (my + pad) >= height:
            continue
        for _attempt in range(15):  # keep bubbles apart, as on a real page
            x0 = rng.randint(mx + pad, width - tw - mx - pad)
            y0 = rng.randint(my + pad, height - th - my - pad)
            if kind == "edge":  # touch the edge (xmin=0, ymin=0, xmax=width) or cross it slightly
                x0, y0 = rng.choice([(pad, y0), (x0, pad), (width - tw - pad, y0),
                                     (width - tw - pad + rng.randint(1, 8), y0),
                                     (x0, height - th - pad + rng.randint(1, 8))])
            bub = (x0 - mx - pad, y0 - my - pad, x0 + tw + mx + pad, y0 + th + my + pad)
            if not _overlaps(bub, placed):
                break
        else:
            continue
        placed.append(bub)
        shape = rng.random()
        fill, outline, lw = rng.randint(240, 255), rng.randint(0, 40), rng.randint(2, 3)
        if shape < 0.6:  # an ellipse must be > sqrt(2) times the text block to contain it
            ex, ey = (tw / 2 + pad) * 1.5 + 4, (th / 2 + pad) * 1.5 + 4
            cx, cy = x0 + tw / 2, y0 + th / 2
            draw.ellipse((cx - ex, cy - ey, cx + ex, cy + ey), fill=fill, outline=outline, width=lw)
        elif shape < 0.9:
            draw.rounded_rectangle(bub, radius=min(mx, my), fill=fill, outline=outline, width=lw)
        else:  # narration box
            m = 2 * pad + lw  # keeps the border out of the text box
            draw.rectangle((x0 - m, y0 - m, x0 + tw + m, y0 + th + m), fill=fill, outline=outline, width=lw)
        if text:
            _draw_text(img, chunks, font_path, size, vertical, x0, y0, tw, rng.randint(0, 40))
        box = (x0 - pad, y0 - pad, x0 + tw + pad, y0 + th + pad)
        ann["text"].append((box, "".join(chunks) if text else ""))
    img.convert("RGB").save(path, "JPEG", quality=90)
    return ann


def _title_list(seed: int, books: int) -> list[str]:
    rng, titles = random.Random(f"{seed}:titles"), []
    for i in range(books):
        title = rng.choice(TITLE_A) + rng.choice(TITLE_B)
        titles.append(title if title not in titles else f"{title}{i:02d}")
    return titles


def _box(parent: etree._Element, tag: str, next_id: int, box, **extra: str) -> None:
    attrs = {"id": f"{next_id:08x}", "xmin": str(box[0]), "ymin": str(box[1]), "xmax": str(box[2]),
             "ymax": str(box[3])}
    etree.SubElement(parent, tag, attrs | extra)


def generate(out_dir: str | os.PathLike, books: int = 2, pages: int = 10, seed: int = 0, width: int = 1654,
             height: int = 1170, num_workers: int | None = 1, max_chars: int = 16,
             fonts: list[str] | None = None, progress: bool = True, charset: str = "full",
             min_chars: int = 1, extremes: bool = False) -> dict:
    """Write a synthetic Manga109-layout dataset to out_dir; return counts of what was written.

    charset: a key of CHARSETS; anything but "full" draws runs of min_chars..max_chars characters of that
    small alphabet (the demo). min_chars is used only then.
    extremes: also put the real data's extremes (see place_extremes) on the first page of every book; they
    ignore max_chars and charset. Off by default, so the default pages stay byte-identical.
    """
    if charset not in CHARSETS:
        raise ValueError(f"unknown charset {charset!r}; choose from {', '.join(CHARSETS)}")
    if charset != "full" and not 1 <= min_chars <= max_chars:
        raise ValueError(f"need 1 <= min_chars <= max_chars, got {min_chars} and {max_chars}")
    alphabet = None if charset == "full" else CHARSETS[charset]
    fonts = list(fonts) if fonts else find_cjk_fonts()
    if not fonts or not all(os.path.isfile(f) for f in fonts):
        raise NoFontError(INSTALL_HINT)
    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    titles = _title_list(seed, books)
    n_chars = [random.Random(f"{seed}:chars:{b}").randint(2, 6) for b in range(books)]
    tasks = []
    for b, title in enumerate(titles):
        (out / "images" / title).mkdir(parents=True, exist_ok=True)
        for p in range(pages):
            path = str(out / "images" / title / f"{p:03d}.jpg")
            tasks.append((seed, b, p, path, width, height, n_chars[b], max_chars, alphabet, min_chars,
                          extremes))
    workers = min(num_workers or os.cpu_count() or 1, len(tasks)) or 1
    bar = dict(total=len(tasks), desc="pages", unit="page", disable=not progress)
    if workers == 1:
        _init_worker(fonts)
        results = [render_page(t) for t in tqdm(tasks, **bar)]
    else:
        with mp.Pool(workers, initializer=_init_worker, initargs=(fonts,)) as pool:
            results = list(tqdm(pool.imap(render_page, tasks, chunksize=2), **bar))
    stats = {"books": books, "pages": len(tasks), "texts": 0, "empty_texts": 0, "titles": titles}
    for b, title in enumerate(titles):
        root = etree.Element("book", title=title)
        chars, next_id = etree.SubElement(root, "characters"), 1
        char_ids = []
        for c in range(n_chars[b]):
            char_ids.append(f"{next_id:08x}")
            etree.SubElement(chars, "character", id=char_ids[-1], name=CHAR_NAMES[c % len(CHAR_NAMES)])
            next_id += 1
        pages_el = etree.SubElement(root, "pages")
        for p in range(pages):
            ann = results[b * pages + p]
            page_el = etree.SubElement(pages_el, "page", index=str(p), width=str(width), height=str(height))
            for box in ann["frame"]:
                _box(page_el, "frame", next_id, box)
                next_id += 1
            for tag in ("face", "body"):
                for box, who in ann[tag]:
                    _box(page_el, tag, next_id, box, character=char_ids[who])
                    next_id += 1
            for box, text in ann["text"]:
                _box(page_el, "text", next_id, box)
                page_el[-1].text = text
                next_id += 1
                stats["texts"] += 1
                stats["empty_texts"] += not text
        xml = etree.tostring(root, encoding="utf-8", pretty_print=True)
        (out / "annotations" / f"{title}.xml").write_bytes(b'<?xml version="1.0" encoding="utf-8"?>\n' + xml)
    (out / "books.txt").write_text("".join(t + "\n" for t in titles), encoding="utf-8")
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (books.txt, annotations/, images/)")
    ap.add_argument("--books", type=int, default=2, help="number of books")
    ap.add_argument("--pages", type=int, default=10, help="pages per book")
    ap.add_argument("--seed", type=int, default=0,
                    help="same seed, byte-identical files, whatever --num_workers")
    ap.add_argument("--width", type=int, default=1654, help="page width in px (the real spread size)")
    ap.add_argument("--height", type=int, default=1170, help="page height in px")
    ap.add_argument("--num_workers", type=int, default=os.cpu_count(), help="processes drawing pages")
    ap.add_argument("--max_chars", type=int, default=16, help="longest text element, in characters")
    ap.add_argument("--font", action="extend", nargs="+", default=None,
                    help="CJK font file(s) to draw with, .ttf/.otf/.ttc (default: one found on the machine)")
    ap.add_argument("--charset", choices=list(CHARSETS), default="full",
                    help="full (default): mixed Japanese text from CHARSET (dialogue phrases, random runs, "
                    "SFX, digits and Latin; 513 characters). katakana (46 basic), digits "
                    "(full-width 0-9) or katakana_digits (both, 56): every text is a random run of "
                    "1..--max_chars of them, which a tiny model learns to read in minutes on a CPU (demo)")
    ap.add_argument("--min_chars", type=int, default=1,
                    help="shortest text with a --charset other than full (default 1); equal to --max_chars: "
                    "texts of one length")
    ap.add_argument("--extremes", action="store_true",
                    help="also put on the first page of every book a large box (600+ image tokens with the "
                    "release's v1 processor), thin 10x400 and 400x10 boxes, a 12x12 box, two 100+ character "
                    "texts with Latin letters and digits, and an empty box, as every split of Manga109s has")
    args = ap.parse_args(argv)
    try:
        stats = generate(args.out, books=args.books, pages=args.pages, seed=args.seed, width=args.width,
                         height=args.height, num_workers=args.num_workers, max_chars=args.max_chars,
                         fonts=args.font, charset=args.charset, min_chars=args.min_chars,
                         extremes=args.extremes)
    except (NoFontError, ValueError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"wrote {stats['pages']} pages, {stats['texts']} text boxes, {stats['books']} books to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
