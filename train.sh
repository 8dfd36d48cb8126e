#!/usr/bin/env bash
# Fine-tune PaddleOCR-VL on the prepared Manga109s crops.
#
#   bash train.sh                                   # the defaults below
#   LR=1e-5 EPOCHS=1 bash train.sh                  # override by environment variable ...
#   bash train.sh --max_steps 100 --eval_steps 50   # ... or by extra arguments (passed through, they win)
#   bash train.sh                                   # every visible GPU: one process each (DDP, torchrun)
#   NUM_GPUS=2 bash train.sh                        # the first 2 visible GPUs (CUDA_VISIBLE_DEVICES is set)
#   LORA_R=16 bash train.sh                         # LoRA adapters on a frozen base (8 GB cards)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NUM_GPUS=8 bash train.sh   # on node0, and NODE_RANK=1 on node1
#   bash train.sh --rehearse                        # first: these settings for a few steps (OUTPUT_DIR/rehearsal)
#   DRY_RUN=1 bash train.sh                         # print the command (and the variables set), run nothing
#
# Rehearse before a long run (REHEARSE=1, or --rehearse): every stage of it (evaluation with generation, a
# checkpoint save, a resume, the best-model load, the export) on a small sample in minutes, then the full
# run's steps, dropped crops, memory, s/step and projected time; exit 2 names the stage that failed.
#
# A killed run continues from its last checkpoint when started again (RESUME=auto); RESUME=none starts over.
# Never one process on several GPUs: the Trainer would wrap it in nn.DataParallel, which splits the batch's
# image patches across images (sft_paddleocr_vl.py refuses to start that way).
set -euo pipefail
cd "$(dirname "$0")"

# Every setting below is an environment variable; its comment is its row in docs/training.md's table
# (written by tools/write_docs.py: keep one beside or above each).

PYTHON=${PYTHON:-python}               # interpreter with requirements.txt installed
MODEL_PATH=${MODEL_PATH:-PaddlePaddle/PaddleOCR-VL}   # hub id or folder to fine-tune
# output of prepare_manga109_data.py (train.jsonl, val.jsonl); several folders, space-separated, each
# optionally FOLDER:WEIGHT, train on a mix ("./data/manga109s ./data/synth_lines:0.5"; val: the first)
DATA_DIR=${DATA_DIR:-./data/manga109s}
# checkpoints, the final model laid out like the base (loads with AutoModelForImageTextToText +
# AutoProcessor), training_curves.png
OUTPUT_DIR=${OUTPUT_DIR:-./sft_output}
EPOCHS=${EPOCHS:-3}                    # epochs
# optimizer steps to train, overriding EPOCHS (unset: EPOCHS decide)
MAX_STEPS=${MAX_STEPS:-}
# > 0: train rank-LORA_R LoRA adapters on a frozen base instead of every weight; 0: full fine-tuning
LORA_R=${LORA_R:-0}
# adapter scale: updates x LORA_ALPHA / LORA_R
# default: 2 x LORA_R
LORA_ALPHA=${LORA_ALPHA:-}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}     # dropout on the adapters' input
# layers with adapters, comma-separated: language (decoder attention + MLP projections), vision (vision
# encoder attention + MLP), projector
LORA_TARGETS=${LORA_TARGETS:-language}
# peak learning rate (LoRA: adapters start at zero and need a larger step)
# default: 2e-5 (2e-4 with LORA_R)
LR=${LR:-}
SCHEDULER=${SCHEDULER:-cosine}         # learning-rate schedule (transformers' lr_scheduler_type)
WARMUP=${WARMUP:-0.03}                 # warm-up steps; < 1: a fraction of all steps
WEIGHT_DECAY=${WEIGHT_DECAY:-0.01}     # AdamW weight decay
MAX_GRAD_NORM=${MAX_GRAD_NORM:-1.0}    # gradient clipping
BATCH_SIZE=${BATCH_SIZE:-1}            # per-device batch (x GRAD_ACCUM 16: effective 16, as the seed project)
GRAD_ACCUM=${GRAD_ACCUM:-16}           # gradient accumulation steps
# longest sample in tokens (image + text); longer train and val crops are dropped before training, counted
# per split in the log and in OUTPUT_DIR/sample_lengths.json (test crops counted), never truncated
MAX_LENGTH=${MAX_LENGTH:-1536}
# fp32_master (fp32 weights, bf16 autocast; weights + grads + AdamW state ~14.5 GB for 0.9B parameters) or
# bf16_lean (bf16 weights, Kahan-summed AdamW; ~9 GB); auto: fp32_master on GPUs with >= 20 GB and on CPU,
# bf16_lean on smaller GPUs such as 12 GB cards
PRECISION=${PRECISION:-auto}
BF16=${BF16:-auto}                     # bf16 autocast; auto: on when a CUDA GPU is present (CPU runs in fp32)
# recompute activations in backward (use_reentrant=False): less memory, more time
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-true}
SAVE_STEPS=${SAVE_STEPS:-2000}         # checkpoint interval
SAVE_TOTAL_LIMIT=${SAVE_TOTAL_LIMIT:-3}   # checkpoints kept (the best by val CER is never deleted)
EVAL_STEPS=${EVAL_STEPS:-$SAVE_STEPS}  # evaluation interval; must divide SAVE_STEPS (the best is kept)
# val crops decoded for CER at each evaluation (0: loss only), drawn once with SEED and spread over every
# val book (ids in OUTPUT_DIR/eval_sample_ids.json); the base model is evaluated at step 0
EVAL_GENERATION_SAMPLES=${EVAL_GENERATION_SAMPLES:-200}
LOGGING_STEPS=${LOGGING_STEPS:-10}     # log interval (train loss; learning rate)
# dataloader worker processes (training batches, and the crops of the eval CER generation)
NUM_WORKERS=${NUM_WORKERS:-2}
SEED=${SEED:-42}                       # seed
# processes (GPUs) on this node: auto = every visible GPU (1 process on CPU); N = the first N visible GPUs
# (CUDA_VISIBLE_DEVICES is set to them; more than visible is an error); > 1 launches torch.distributed.run
NUM_GPUS=${NUM_GPUS:-auto}
NNODES=${NNODES:-1}                    # machines in the job; start train.sh on each with its NODE_RANK
NODE_RANK=${NODE_RANK:-0}              # this machine's number; 0 hosts the rendezvous
MASTER_ADDR=${MASTER_ADDR:-}           # multi-node: an address of node 0 that every node can reach
MASTER_PORT=${MASTER_PORT:-29500}      # port of the rendezvous on node 0
RDZV_ID=${RDZV_ID:-manga-ocr-$MASTER_PORT}   # job id of the c10d rendezvous, the same on every node
# auto: continue from the newest complete checkpoint-* in OUTPUT_DIR when there is one; none: start over;
# or a path/to/checkpoint-N
RESUME=${RESUME:-auto}
REPORT_TO=${REPORT_TO:-none}           # where to log besides the console: tensorboard, wandb, ...
# 1: rehearse these settings in OUTPUT_DIR/rehearsal and exit (the same as --rehearse)
REHEARSE=${REHEARSE:-0}
DRY_RUN=${DRY_RUN:-0}                  # 1: print the command and the variables train.sh sets, and exit
# forked loader workers would each print tokenizers' fork warning at every evaluation
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

if ! "$PYTHON" -c "import torch, transformers" 2>/dev/null; then
    hint="activate the environment that has requirements.txt installed, or set PYTHON=path/to/python"
    [ -x .venv/bin/python ] && hint="$hint (make setup built one: PYTHON=.venv/bin/python bash train.sh)"
    echo "error: $PYTHON cannot import torch and transformers: $hint" >&2
    exit 2
fi
# Every setting is checked before anything loads (one line each: the variable, its value, what it accepts),
# and look-alikes of settings in the environment (EPOCH=1) are named; see paddleocr_vl_manga/train/settings.py.
settings=()
while read -r name; do settings+=("$name=${!name}"); done < <(sed -n 's/^\([A-Z_][A-Z0-9_]*\)=\${\1:-.*/\1/p' train.sh)
"$PYTHON" -m paddleocr_vl_manga.train.settings "${settings[@]}" || exit $?
if [ -z "$LR" ]; then
    if [ "$LORA_R" -gt 0 ]; then LR=2e-4; else LR=2e-5; fi
fi
# yes/no settings as the Python side parses them
bool() { case "$(printf %s "$1" | tr '[:upper:]' '[:lower:]')" in 1|true|yes|on) echo true ;; *) echo false ;; esac; }
GRADIENT_CHECKPOINTING=$(bool "$GRADIENT_CHECKPOINTING")
[ "$BF16" != auto ] && BF16=$(bool "$BF16")
# processes, GPUs visible, GiB of the first, CUDA_VISIBLE_DEVICES to set ("-": leave it); see paddleocr_vl_manga/train/launch.py
launch=$("$PYTHON" -m paddleocr_vl_manga.train.launch "$NUM_GPUS") || exit $?
read -r nproc n_visible gpu_gb devices <<< "${launch##*$'\n'}"   # its last line: ignore any chatter
[ "$devices" != - ] && export CUDA_VISIBLE_DEVICES="$devices"
# Crop shapes vary from step to step, which fragments the caching allocator; expandable segments don't.
# (PYTORCH_ALLOC_CONF is torch's newer name for the same setting: a user's value of either is kept.)
if [ -z "${PYTORCH_CUDA_ALLOC_CONF:-}${PYTORCH_ALLOC_CONF:-}" ]; then
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
fi
if [ "$BF16" = auto ]; then
    if [ "$gpu_gb" -gt 0 ]; then BF16=true; else BF16=false; fi
fi
if [ "$PRECISION" = auto ]; then
    # fp32 master weights + AdamW states need ~15 GB for the 0.9B model before activations.
    # CPU runs (tests, the demo) stay in fp32.
    if [ "$gpu_gb" -eq 0 ] || [ "$gpu_gb" -ge 20 ]; then PRECISION=fp32_master; else PRECISION=bf16_lean; fi
fi
resume_args=()
[ "$RESUME" != none ] && resume_args=(--resume_from_checkpoint "$RESUME")
# first, so that an explicit --rehearse false among the extra arguments still wins
# A yes/no variable: anything unrecognised stops, rather than silently starting the full run.
is_on() {
    case "$(printf %s "$2" | tr '[:upper:]' '[:lower:]')" in
        1|true|yes|on) return 0 ;;
        ""|0|false|no|off) return 1 ;;
        *) echo "error: $1=$2: use 1/true/yes/on or 0/false/no/off" >&2; exit 2 ;;
    esac
}
if is_on REHEARSE "$REHEARSE"; then set -- --rehearse true "$@"; fi

# (Without a GPU, sft_paddleocr_vl.py itself switches a torchrun launch to DDP over gloo on the CPU.)
launcher=("$PYTHON")
if [ "$NNODES" -gt 1 ]; then
    if [ -z "$MASTER_ADDR" ]; then
        echo "error: NNODES=$NNODES needs MASTER_ADDR (an address of node 0 that all nodes reach)" >&2
        exit 2
    fi
    # c10d rendezvous: node 0 hosts the store; the ranks of the nodes are assigned as they join, and the
    # output folder must be on a file system that all nodes share (checked at start).
    is_host=false
    [ "$NODE_RANK" -eq 0 ] && is_host=true
    launcher=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$nproc"
              --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID"
              --rdzv_conf "is_host=$is_host" --max_restarts 0)
elif [ "$nproc" -gt 1 ]; then
    launcher=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc")
fi

lora_args=()
[ "$LORA_R" -gt 0 ] && lora_args=(--lora_r "$LORA_R" --lora_dropout "$LORA_DROPOUT" --lora_targets "$LORA_TARGETS"
                                 ${LORA_ALPHA:+--lora_alpha "$LORA_ALPHA"})
max_steps_args=()
[ -n "$MAX_STEPS" ] && max_steps_args=(--max_steps "$MAX_STEPS")

echo "train.sh: model=$MODEL_PATH data=$DATA_DIR out=$OUTPUT_DIR precision=$PRECISION bf16=$BF16" \
     "processes=$nproc visible_gpus=$n_visible${CUDA_VISIBLE_DEVICES+ (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)}" \
     "nodes=$NNODES lora_r=$LORA_R"
cmd=("${launcher[@]}" sft_paddleocr_vl.py \
    --model_path "$MODEL_PATH" \
    --data_dir "$DATA_DIR" \
    --output_dir "$OUTPUT_DIR" \
    --precision "$PRECISION" \
    --bf16 "$BF16" \
    --num_train_epochs "$EPOCHS" \
    --learning_rate "$LR" \
    --lr_scheduler_type "$SCHEDULER" \
    --warmup_steps "$WARMUP" \
    --weight_decay "$WEIGHT_DECAY" \
    --max_grad_norm "$MAX_GRAD_NORM" \
    --per_device_train_batch_size "$BATCH_SIZE" \
    --per_device_eval_batch_size "$BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --max_length "$MAX_LENGTH" \
    --gradient_checkpointing "$GRADIENT_CHECKPOINTING" \
    --eval_strategy steps \
    --eval_steps "$EVAL_STEPS" \
    --eval_generation_samples "$EVAL_GENERATION_SAMPLES" \
    --save_strategy steps \
    --save_steps "$SAVE_STEPS" \
    --save_total_limit "$SAVE_TOTAL_LIMIT" \
    --load_best_model_at_end true \
    --metric_for_best_model cer \
    --greater_is_better false \
    --logging_steps "$LOGGING_STEPS" \
    --dataloader_num_workers "$NUM_WORKERS" \
    --seed "$SEED" \
    --report_to "$REPORT_TO" \
    "${max_steps_args[@]}" \
    "${resume_args[@]}" \
    "${lora_args[@]}" \
    "$@")
if is_on DRY_RUN "$DRY_RUN"; then
    for var in CUDA_VISIBLE_DEVICES PYTORCH_CUDA_ALLOC_CONF PYTORCH_ALLOC_CONF TOKENIZERS_PARALLELISM; do
        [ -n "${!var+x}" ] && printf '%s=%q ' "$var" "${!var}"
    done
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
