#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with what benchmarks/gpu_suite.sh needs on the GPU machine, which has no
# registry (its packages: benchmarks/gpu_image.txt, from the device tool's KINDS.md):
#   - the carried set, derived by benchmarks/gpu_carry.py: requirements.txt's packages and, recursively, the
#     needs of each carried wheel (Requires-Dist of its METADATA, markers for CPython 3.12 on manylinux
#     x86-64) that the image lacks or holds outside the spec; transformers pinned for the image (gpu_carry.PINS).
#     It rewrites benchmarks/gpu_carry.lock (commit it), preferring the lock's versions (--update: the newest);
#   - one CJK font for the synthetic pages (tools/fonts.py finds it here; the image has none).
#   PYTHON=.venv/bin/python bash benchmarks/gpu_wheels.sh [--update]
set -euo pipefail

PYTHON=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rm -rf .whl  # one version of each package: two wheels of one package stop the whole install there
mkdir -p .whl/fonts
"$PYTHON" benchmarks/gpu_carry.py resolve --wheel_dir .whl "$@"

font=""
while IFS= read -r f; do
    case $f in *.ttf | *.otf | *.ttc) font=$f; break ;; esac
done < <("$PYTHON" tools/fonts.py || true)
if [[ -n $font ]]; then
    cp "$font" .whl/fonts/
else
    echo "warning: no CJK font found here (tools/fonts.py); the suite needs one on the GPU machine" >&2
fi
ls -l .whl .whl/fonts
du -sh .whl
