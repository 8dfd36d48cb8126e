#!/usr/bin/env bash
# Every GPU figure README needs, in one command that fits one device-tool call (benchmarks/README.md):
#   bash benchmarks/gpu_suite.sh OUT_DIR [--smoke] [--budget_s S] [--only PART ...]
# Writes OUT_DIR/results.json, results.md (after every part) and suite.log. The parts and how their time
# budget is enforced: benchmarks/gpu_suite.py. PYTHON picks the interpreter (default python3).
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: bash benchmarks/gpu_suite.sh OUT_DIR [--smoke] [--budget_s S] [--only PART ...]" >&2
    exit 2
fi
# The budget counts from here, so installing the carried wheels is inside it too.
GPU_SUITE_T0=${GPU_SUITE_T0:-$(date +%s)}
export GPU_SUITE_T0
PYTHON=${PYTHON:-python3}
mkdir -p "$1"
out=$(cd "$1" && pwd)
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Wheels carried in .whl/ (benchmarks/gpu_wheels.sh) go into a private folder in front of the image's own
# packages: the GPU image lacks torch-optimi, editdistance and python-dotenv, and its transformers is older
# than the one CI tests. --no-deps: nothing can be fetched there, and each wheel's needs were chosen here.
# --smoke runs on the machine's own environment as it is (the wheels are for the GPU image's Python 3.12).
wheels=() fonts=()
if [[ " $* " != *" --smoke "* ]]; then
    shopt -s nullglob
    wheels=(.whl/*.whl)
    fonts=("$PWD"/.whl/fonts/*)
    shopt -u nullglob
fi
if ((${#wheels[@]})); then
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    echo "installing ${#wheels[@]} carried wheels into $site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "${wheels[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The synthetic pages need a CJK font and the GPU image has none: use a carried one (tools/fonts.py reads this).
if ((${#fonts[@]})) && [[ -z ${MANGA_OCR_FONTS:-} ]]; then
    MANGA_OCR_FONTS=$(IFS=:; echo "${fonts[*]}")
    export MANGA_OCR_FONTS
fi

"$PYTHON" -u benchmarks/gpu_suite.py "$out" "$@" 2>&1 | tee "$out/suite.log"
