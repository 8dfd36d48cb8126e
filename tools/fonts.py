"""Japanese fonts for the synthetic data (the code: paddleocr_vl_manga.data.synth.fonts).

    python tools/fonts.py --ensure       # one CJK font for tests and the demo (Debian: fonts-ipafont-*)
    python tools/fonts.py --pack manga   # the synthesize_lines.py font pack: Debian + OFL npm fonts
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python tools/X.py`: the package is at the root
    sys.path.insert(0, str(ROOT))
from paddleocr_vl_manga.data.synth.fonts import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
