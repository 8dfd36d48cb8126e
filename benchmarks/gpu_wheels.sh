#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with what benchmarks/gpu_suite.sh needs on the GPU machine, which has torch,
# transformers 5.17 and no internet (/work/.library/device/KINDS.md lists its packages):
#   - wheels of the requirements.txt packages the image lacks or has too old, at the versions CI would
#     install today: transformers, torch-optimi, editdistance, python-dotenv;
#   - regex, which transformers >= 5.2x needs newer than an image may have (the suite names any other unmet
#     need in its warnings; pass it here, e.g. 'huggingface-hub==1.40.0');
#   - one CJK font for the synthetic pages (tools/fonts.py finds it here; the image has none).
#   PYTHON=.venv/bin/python bash benchmarks/gpu_wheels.sh [EXTRA_REQUIREMENT ...]
# The GPU image's python is CPython 3.12 on x86-64; pip picks the matching wheels whatever this machine is.
set -euo pipefail

PYTHON=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rm -rf .whl  # one version of each package: two wheels of one package stop the whole install there
mkdir -p .whl/fonts

specs=()
for name in transformers torch-optimi editdistance python-dotenv; do
    spec=$(grep -E "^${name}([<>=!~ ]|$)" requirements.txt) || { echo "error: $name not in requirements.txt" >&2; exit 1; }
    specs+=("${spec%%#*}")
done
specs+=(regex "$@")
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
    manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
    platforms+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${specs[@]}"

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
echo "transformers needs (compare with the image's versions in KINDS.md; carry what is missing or older):"
for whl in .whl/transformers-*.whl; do
    "$PYTHON" -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
print("\n".join("  " + line for line in z.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist") and "extra ==" not in line))' "$whl"
done
