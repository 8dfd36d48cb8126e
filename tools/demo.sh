#!/usr/bin/env bash
# The whole pipeline on CPU, with nothing downloaded (run by `make demo`):
#   synthetic Manga109-format release -> prepare (book-level split) -> evaluate the untrained tiny model
#   -> fine-tune it with train.sh -> evaluate again -> before/after table.
# Everything lands in $DEMO_DIR (default ./demo_output); each run starts fresh.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
# One thread per process: two torch jobs on 2 cores with 2 threads each run 7-32x slower. Training still
# uses both cores: one loader process (DEMO_NUM_WORKERS) opens and preprocesses the next batch's crops while
# the main process steps the model (with 0, each step waits for its own batch to be prepared).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DEMO_DIR=${DEMO_DIR:-./demo_output}
BOOKS=${DEMO_BOOKS:-12}
PAGES=${DEMO_PAGES:-100}
CHARSET=${DEMO_CHARSET:-katakana}
MAX_CHARS=${DEMO_MAX_CHARS:-4}
# 4 epochs: a 6-epoch run's val CER was 15.9 % after 3.1 epochs (8.3 % at the end; test 621.7 % -> 13.5 %),
# and a 4-epoch cosine schedule anneals sooner. The demo still fails unless the test CER is at least halved.
EPOCHS=${DEMO_EPOCHS:-4}
NUM_WORKERS=${DEMO_NUM_WORKERS:-1}
LR=${DEMO_LR:-2e-3}
# A wider init than transformers' 0.02 lets a model this small stop ignoring the image within minutes;
# min_pixels 784 keeps crops at their own size (a few image tokens each), which makes CPU steps cheap.
TINY_ARGS=${DEMO_TINY_ARGS:---charset $CHARSET --init_std 0.1 --vision_init_std 0.2 --min_pixels 784}

rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"
start=$(date +%s)
stage() { echo; echo "== [$(( $(date +%s) - start )) s] $*"; }

stage "1/6 synthetic Manga109-format release: $BOOKS books x $PAGES pages ($CHARSET, <= $MAX_CHARS chars)"
"$PYTHON" tools/make_synthetic_manga109.py --out "$DEMO_DIR/manga109" --books "$BOOKS" --pages "$PAGES" \
    --seed 0 --charset "$CHARSET" --max_chars "$MAX_CHARS" --num_workers 2

stage "2/6 prepare crops with a book-level split (val and test books are never trained on)"
"$PYTHON" prepare_manga109_data.py --manga109_root "$DEMO_DIR/manga109" --output_dir "$DEMO_DIR/data" \
    --val_fraction 0.1 --test_fraction 0.1 --num_workers 2

stage "3/6 tiny random PaddleOCR-VL (real classes, small config)"
# shellcheck disable=SC2086
"$PYTHON" tools/make_tiny_model.py --out "$DEMO_DIR/tiny_model" $TINY_ARGS

stage "4/6 evaluate the untrained model on the held-out test books"
"$PYTHON" evaluate_model.py --model_path "$DEMO_DIR/tiny_model" --data_dir "$DEMO_DIR/data" --split test \
    --output_dir "$DEMO_DIR/eval_before" --max_new_tokens 16

stage "5/6 fine-tune with train.sh (CPU, fp32, $EPOCHS epochs, $NUM_WORKERS loader process(es))"
PYTHON="$PYTHON" MODEL_PATH="$DEMO_DIR/tiny_model" DATA_DIR="$DEMO_DIR/data" OUTPUT_DIR="$DEMO_DIR/sft_output" \
    EPOCHS="$EPOCHS" LR="$LR" BATCH_SIZE=16 GRAD_ACCUM=1 WARMUP=0.05 WEIGHT_DECAY=0 SAVE_STEPS=500 \
    EVAL_GENERATION_SAMPLES=64 LOGGING_STEPS=50 NUM_WORKERS="$NUM_WORKERS" RESUME=none \
    bash train.sh --disable_tqdm true --generation_max_new_tokens 16

stage "6/6 evaluate the fine-tuned model on the same test books"
"$PYTHON" evaluate_model.py --model_path "$DEMO_DIR/sft_output" --data_dir "$DEMO_DIR/data" --split test \
    --output_dir "$DEMO_DIR/eval_after" --max_new_tokens 16

stage "before / after (synthetic data, tiny model: a pipeline check, not a real-model result)"
"$PYTHON" evaluate_model.py --compare "$DEMO_DIR/eval_before/metrics.json" "$DEMO_DIR/eval_after/metrics.json" \
    --output_dir "$DEMO_DIR"
"$PYTHON" - "$DEMO_DIR" <<'EOF'
import json, sys
d = sys.argv[1]
before, after = (json.load(open(f"{d}/eval_{w}/metrics.json"))["metrics"]["none"]["cer"] for w in ("before", "after"))
verdict = "halved or better" if after <= before / 2 else "NOT halved"
print(f"\ntest CER (held-out books): {before:.1%} -> {after:.1%} ({verdict})")
conf = json.load(open(f"{d}/eval_after/metrics.json")).get("confidence", {})
if "top_half" in conf and conf["bottom_half"]:  # does the model's own confidence tell good lines from bad?
    top, bottom = conf["top_half"], conf["bottom_half"]
    cut = lambda g: f"{g['stops']['cap'] + g['stops']['loop']} cap/loop stops"
    print(f"by confidence (after): exact match {top['exact_match']:.1%} in the more confident half, "
          f"{bottom['exact_match']:.1%} in the other; CER {top['cer']:.1%} vs {bottom['cer']:.1%}; "
          f"{cut(top)} vs {cut(bottom)}")
print(f"training curves: {d}/sft_output/training_curves.png")
sys.exit(0 if after <= before / 2 else 1)
EOF
echo "demo finished in $(( $(date +%s) - start )) s"
