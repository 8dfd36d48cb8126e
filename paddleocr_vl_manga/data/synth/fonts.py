"""Locate CJK fonts for the synthetic data generators.

    python tools/fonts.py --ensure       # one CJK font for tests and the demo (Debian: fonts-ipafont-*)
    python tools/fonts.py --pack manga   # the synthesize_lines.py font pack: Debian + OFL npm fonts, by style
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

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


# The manga pack: faces whose glyph coverage and vertical layout were checked on Debian 12 (shared facts).
# Styles matter because synthesize_lines.py samples fonts by style, not by file (Ume alone has 20 faces).
MANGA_APT = [
    "fonts-ipaexfont-gothic", "fonts-ipaexfont-mincho", "fonts-horai-umefont", "fonts-vlgothic",
    "fonts-motoya-l-cedar", "fonts-motoya-l-maruberi", "fonts-konatu", "fonts-kouzan-mouhitsu",
    "fonts-aoyagi-soseki", "fonts-kiloji", "fonts-seto", "fonts-yozvox-yozfont-cute", "fonts-yusei-magic",
    "fonts-reggae", "fonts-rocknroll", "fonts-stick", "fonts-dotgothic16",
]
MANGA_NPM = [  # @expo-google-fonts/<name>: OFL TTFs inside npm tarballs
    "hachi-maru-pop", "mochiy-pop-one", "yomogi", "zen-kurenaido", "dela-gothic-one", "klee-one", "potta-one",
]
NPM_FONT_DIR = "/usr/local/share/fonts/manga-ocr" if os.name != "nt" and os.geteuid() == 0 else \
    os.path.expanduser("~/.local/share/fonts/manga-ocr")
# (substring of the file path, lower case) -> style; first match wins, unmatched CJK fonts count as gothic.
STYLE_RULES = [
    ("mincho", "mincho"), ("ipam", "mincho"), ("cedar", "mincho"), ("serif", "mincho"), ("ume-pm", "mincho"),
    ("ume-tm", "mincho"), ("kouzan", "brush"), ("soseki", "brush"), ("aoyagi", "brush"),
    ("maruberi", "rounded"), ("mtlmr", "rounded"), ("mtlc", "mincho"), ("konatu", "rounded"),
    ("rounded", "rounded"), ("kiloji", "handwriting"),
    ("seto", "handwriting"), ("yozfont", "handwriting"), ("yusei", "handwriting"), ("yomogi", "handwriting"),
    ("kurenaido", "handwriting"), ("klee", "handwriting"), ("reggae", "pop"), ("rocknroll", "pop"),
    ("stick", "pop"), ("dotgothic", "pop"), ("hachimaru", "pop"), ("mochiy", "pop"), ("dela", "pop"),
    ("potta", "pop"),
]
MANGA_GLOBS = [
    "/usr/share/fonts/opentype/ipaexfont-*/*.ttf", "/usr/share/fonts/truetype/horai-umefont/*.ttf",
    "/usr/share/fonts/truetype/vlgothic/*.ttf", "/usr/share/fonts/truetype/motoya-l-*/*.ttf",
    "/usr/share/fonts/truetype/konatu/*.ttf", "/usr/share/fonts/truetype/kouzan-mouhitsu/*.ttf",
    "/usr/share/fonts/truetype/aoyagi-soseki/*.ttf", "/usr/share/fonts/truetype/kiloji/*.ttf",
    "/usr/share/fonts/truetype/seto/setofont.ttf", "/usr/share/fonts/truetype/yozvox-yozfont/YOz*[!i].ttf",
    "/usr/share/fonts/truetype/yusei-magic/*.ttf", "/usr/share/fonts/truetype/reggae/*.ttf",
    "/usr/share/fonts/truetype/rocknroll/*.ttf", "/usr/share/fonts/truetype/stick/*.ttf",
    "/usr/share/fonts/truetype/dotgothic16/*.ttf", f"{NPM_FONT_DIR}/*.ttf",
]
ELSEWHERE_HINT = (
    "Elsewhere (macOS, Windows, other Linux): download the same OFL faces from Google Fonts (Hachi Maru Pop, "
    "Mochiy Pop One, Yomogi, Zen Kurenaido, Dela Gothic One, Klee One, Potta One, Yusei Magic, Reggae One, "
    "RocknRoll One, Stick, DotGothic16, Kiwi Maru, Zen Maru Gothic), IPAex/Ume/VL Gothic from their sites, "
    "and list the files in MANGA_OCR_FONTS=path1:path2 (styles are guessed from file names)."
)


def font_style(path: str) -> str:
    low = path.lower()
    return next((style for key, style in STYLE_RULES if key in low), "gothic")


def find_manga_fonts() -> list[tuple[str, str]]:
    """(path, style) of the pack's fonts found here, plus the basic CJK fonts; MANGA_OCR_FONTS overrides."""
    paths = find_cjk_fonts() if os.environ.get("MANGA_OCR_FONTS") else []
    if not paths:
        for pattern in [*MANGA_GLOBS, *FONT_GLOBS[:2]]:
            for p in sorted(glob.glob(pattern)):
                if os.path.realpath(p) not in paths:
                    paths.append(os.path.realpath(p))
        paths = paths or find_cjk_fonts()
    return [(p, font_style(p)) for p in paths]


def install_manga_pack() -> list[str]:
    """Install what this machine can (apt as root, npm if present); return the problems, empty if none."""
    problems = []
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if shutil.which("apt-get") and os.geteuid() == 0:
        print(f"apt-get install {len(MANGA_APT)} Debian font packages", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        for pkg in MANGA_APT:  # one by one: a package missing from an older release must not stop the rest
            r = subprocess.run(["apt-get", "install", "-y", "-qq", pkg], env=env, capture_output=True)
            if r.returncode:
                problems.append(f"apt-get install {pkg} failed: {r.stderr.decode()[-200:].strip()}")
    else:
        problems.append(f"not root with apt-get: install {' '.join(MANGA_APT)} yourself (Debian/Ubuntu)")
    if shutil.which("npm"):
        os.makedirs(NPM_FONT_DIR, exist_ok=True)
        for name in MANGA_NPM:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = ["npm", "pack", "--silent", f"@expo-google-fonts/{name}", "--pack-destination", tmp]
                r = subprocess.run(cmd, capture_output=True, cwd=tmp)
                tgz = glob.glob(os.path.join(tmp, "*.tgz"))
                if r.returncode or not tgz:
                    problems.append(f"npm pack @expo-google-fonts/{name} failed: {r.stderr.decode()[-200:]}")
                    continue
                with tarfile.open(tgz[0]) as tar:
                    for m in tar.getmembers():
                        if m.isfile() and m.name.endswith(".ttf"):
                            data = tar.extractfile(m).read()
                            with open(os.path.join(NPM_FONT_DIR, os.path.basename(m.name)), "wb") as f:
                                f.write(data)
    else:
        problems.append(f"npm not found: the OFL faces {', '.join(MANGA_NPM)} were not installed")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ensure", action="store_true", help="install a Debian font package if none is found"
    )
    parser.add_argument("--pack", choices=["manga"], help="install the font pack of synthesize_lines.py")
    args = parser.parse_args()
    if args.pack:
        problems = install_manga_pack()
        found = find_manga_fonts()
        for path, style in found:
            print(f"{style:12s}{path}")
        styles = sorted({s for _, s in found})
        print(f"{len(found)} faces in {len(styles)} styles ({', '.join(styles)})", file=sys.stderr)
        for p in problems:
            print(f"warning: {p}", file=sys.stderr)
        if problems or len(styles) < 5:
            print(ELSEWHERE_HINT, file=sys.stderr)
        return 0 if found else 1
    fonts = ensure_cjk_font() if args.ensure else find_cjk_fonts()
    if not fonts:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    print("\n".join(fonts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
