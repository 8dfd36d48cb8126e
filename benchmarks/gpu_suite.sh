#!/usr/bin/env bash
# Every GPU figure README needs, in one command that fits one device-tool call (benchmarks/README.md):
#   bash benchmarks/gpu_suite.sh OUT_DIR [--smoke | --preflight] [--budget_s S] [--only PART ...]
# Writes OUT_DIR/results.json, results.md (after every part) and suite.log. The parts and how their time
# budget is enforced: benchmarks/gpu_suite.py. PYTHON picks the interpreter (default python3).
# --preflight: the GPU image's twin on this machine, then --smoke inside it (benchmarks/gpu_preflight.py);
# run it before every GPU run.
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: bash benchmarks/gpu_suite.sh OUT_DIR [--smoke | --preflight] [--budget_s S] [--only PART ...]" >&2
    exit 2
fi
if [[ " $* " == *" --preflight "* ]]; then
    args=()
    for a in "$@"; do [[ $a == --preflight ]] || args+=("$a"); done
    exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/gpu_preflight.py" "${args[@]}"
fi
# The budget counts from here, so installing the carried wheels is inside it too.
GPU_SUITE_T0=${GPU_SUITE_T0:-$(date +%s)}
export GPU_SUITE_T0
PYTHON=${PYTHON:-python3}
mkdir -p "$1"
out=$(cd "$1" && pwd)
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Wheels carried in .whl/ (benchmarks/gpu_wheels.sh: the set benchmarks/gpu_carry.lock names) go into a
# private folder in front of the image's own packages. --no-deps: nothing can be fetched there, and each
# wheel's needs were resolved here. gpu_suite.py then checks every need (GPU_SUITE_SITE: what was carried)
# and stops, naming each unmet one, before any part runs. GPU_WHEELS picks another folder (the preflight's
# wheels for this machine's Python); --smoke without it runs on the machine's own environment as it is.
wheel_dir=${GPU_WHEELS:-.whl}
wheels=() fonts=()
if [[ -n ${GPU_WHEELS:-} || " $* " != *" --smoke "* ]]; then
    shopt -s nullglob
    wheels=("$wheel_dir"/*.whl)
    fonts=("$(cd "$wheel_dir" 2>/dev/null && pwd)"/fonts/*)
    shopt -u nullglob
fi
if ((${#wheels[@]})); then
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    t=$(date +%s)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "${wheels[@]}"
    echo "installed ${#wheels[@]} carried wheels from $wheel_dir into $site in $(($(date +%s) - t)) s"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" GPU_SUITE_SITE=$site
fi
# The synthetic pages need a CJK font and the GPU image has none: use a carried one (tools/fonts.py reads this).
if ((${#fonts[@]})) && [[ -z ${MANGA_OCR_FONTS:-} ]]; then
    MANGA_OCR_FONTS=$(IFS=:; echo "${fonts[*]}")
    export MANGA_OCR_FONTS
fi

"$PYTHON" -u benchmarks/gpu_suite.py "$out" "$@" 2>&1 | tee "$out/suite.log"
