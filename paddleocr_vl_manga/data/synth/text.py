"""What the synthetic lines say: the user's own Manga109 train texts, a word list, interjections, sound
effects and random characters, mixed by class to match Manga109's train split and its length distribution."""

from __future__ import annotations

import json
import math
import os
import random
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

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
NO_START = set(SMALL + "ー、。」』）！？…")  # a column or line never starts with these (kinsoku)


class SynthError(Exception):
    """A problem that stops the run; printed without traceback."""


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
