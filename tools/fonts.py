"""Locate a CJK font for the synthetic data generator; `--ensure` installs one on Debian if none is found."""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

# Searched in order; the first families are small Debian packages (fonts-ipafont-*), then Noto CJK.
FONT_GLOBS = [
    "/usr/share/fonts/opentype/ipafont-gothic/ipag*.ttf",
    "/usr/share/fonts/opentype/ipafont-mincho/ipam*.ttf",
    "/usr/share/fonts/truetype/fonts-japanese-*.ttf",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-*.ttc",
    "/usr/share/fonts/opentype/noto/NotoSerifCJK-*.ttc",
    "/usr/share/fonts/truetype/takao-gothic/*.ttf",
    "/usr/share/fonts/**/*CJK*.tt[cf]",
    "/usr/share/fonts/**/*ipa*.ttf",
    "/Library/Fonts/*.ttc",  # macOS ships Hiragino here
    "/System/Library/Fonts/*ヒラギノ*.ttc",
    "C:/Windows/Fonts/msgothic.ttc",
]
DEBIAN_PACKAGES = ["fonts-ipafont-gothic", "fonts-ipafont-mincho"]
INSTALL_HINT = (
    "No CJK font found. Install one, e.g. `sudo apt-get install fonts-ipafont-gothic fonts-ipafont-mincho` "
    "(Debian/Ubuntu), `brew install --cask font-noto-sans-cjk-jp` (macOS), or pass --font PATH to a "
    ".ttf/.otf/.ttc that has Japanese glyphs. You can also set MANGA_OCR_FONTS=path1:path2."
)


def find_cjk_fonts() -> list[str]:
    """Return CJK font files found on this machine, deduplicated, in a stable order."""
    env = os.environ.get("MANGA_OCR_FONTS")
    if env:
        return [p for p in env.split(os.pathsep) if os.path.isfile(p)]
    found: list[str] = []
    for pattern in FONT_GLOBS:
        for path in sorted(glob.glob(pattern, recursive=True)):
            real = os.path.realpath(path)
            if real not in found:
                found.append(real)
    return found


def ensure_cjk_font() -> list[str]:
    """Return found fonts, installing the Debian packages first when none is found and apt-get is usable."""
    fonts = find_cjk_fonts()
    if fonts or not shutil.which("apt-get") or os.geteuid() != 0:
        return fonts
    print(f"No CJK font found: installing {' '.join(DEBIAN_PACKAGES)} with apt-get", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", *DEBIAN_PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(cmd, env=env, capture_output=True)
    return find_cjk_fonts()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--ensure", action="store_true", help="install a Debian font package if none is found"
    )
    args = parser.parse_args()
    fonts = ensure_cjk_font() if args.ensure else find_cjk_fonts()
    if not fonts:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    print("\n".join(fonts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
