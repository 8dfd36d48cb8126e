"""Screen tone: the drawn-looking panel fill of manga pages (synthetic backgrounds, the page fixture)."""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw


def draw_screentone(rng: random.Random, img: Image.Image, box: tuple[int, int, int, int]) -> None:
    """Fill one panel with tone: a gradient plus dots or hatching, all vectorized."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    yy, xx = np.ogrid[:h, :w]
    angle = rng.uniform(0, math.pi)
    ramp = (xx * math.cos(angle) + yy * math.sin(angle)) / max(w, h)
    lo, hi = sorted(rng.sample(range(90, 256), 2))
    tone = lo + (hi - lo) * (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    period = rng.randint(4, 12)
    style = rng.random()
    if style < 0.35:  # screen-tone dots
        tone = np.where((xx % period < period // 2) & (yy % period < period // 2), tone * 0.55, tone)
    elif style < 0.7:  # diagonal hatching
        tone = np.where((xx + yy * rng.choice([1, -1])) % period < 2, tone * 0.4, tone)
    img.paste(Image.fromarray(np.clip(tone, 0, 255).astype(np.uint8)), (x0, y0))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(10, 40)):  # ink strokes and shapes so it looks drawn, not just toned
        pts = [(rng.randint(x0, x1), rng.randint(y0, y1)) for _ in range(2)]
        if rng.random() < 0.6:
            draw.line(pts, fill=rng.randint(0, 120), width=rng.randint(1, 4))
        else:
            (ax, ay), (bx, by) = pts
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)], outline=rng.randint(0, 80),
                  fill=rng.choice([None, rng.randint(60, 230)]), width=rng.randint(1, 3))
