#!/usr/bin/env bash
# GPU check, prepared to finish in under 6 minutes on one GPU (each step has its own time limit).
#
#   bash gpu_check.sh [OUT_DIR]
#
# 1. installs speechbrain & co. from ./gpu_wheels when the machine lacks them
#    (a GPU image that has torch but not speechbrain, hyperpyyaml, soundfile);
# 2. builds (or reuses) the tiny profile;
# 3. runs finetune.py on 1 rank (NCCL, cuda:0) and on 2 ranks sharing the GPU
#    (gloo: NCCL refuses two ranks on one device), both evaluation paths;
# 4. runs the padding-invariance tests on CUDA;
# 5. measures decoding throughput on the GPU against the CPU;
# 6. prints one table (sbtemplate.benchmarks.gpu_table), comparing with the CPU
#    run in artifacts/tiny/results/gpu_reference_cpu when it is there.
set -uo pipefail
cd "$(dirname "$0")"
OUT_DIR=${1:-${OUT:-results/gpu_check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# SpeechBrain turns TF32 on for CUDA matmuls and convolutions (its allow_tf32
# quirk). TF32 rounds differently for each tensor shape, so batched decoding
# could not match batch size 1 exactly, nor the GPU the CPU: switch it off here.
export SB_DISABLE_QUIRKS=${SB_DISABLE_QUIRKS-allow_tf32}

if ! "$PY" -c "import speechbrain, hyperpyyaml, soundfile, jiwer, espeakng_loader" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/sbtemplate-site gpu_wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/sbtemplate-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"

step() {  # step NAME TIMEOUT_S COMMAND...: log to OUT_DIR/NAME.log, record rc
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT_DIR/steps.txt"
    tail -n 4 "$OUT_DIR/$name.log"
}

step build 40 "$PY" -m sbtemplate.build --profile tiny
step finetune_1rank_nccl 90 "$PY" -m torch.distributed.run --nproc_per_node=1 \
    finetune.py finetune.yaml --build_profile='!include:sbtemplate/hparams/profiles/tiny.yaml' --output_folder="$OUT_DIR/ft_1rank_nccl"
step finetune_2ranks_gloo 90 "$PY" -m torch.distributed.run --nproc_per_node=2 \
    finetune.py finetune.yaml --build_profile='!include:sbtemplate/hparams/profiles/tiny.yaml' --distributed_backend=gloo --device=cuda:0 \
    --output_folder="$OUT_DIR/ft_2ranks_gloo"
SBTEMPLATE_DEVICE=cuda:0 step padding_tests_cuda 80 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_padding_invariance.py
# The two decoding runs side by side: the GPU run drives its device from one
# core, the CPU run uses 8 threads; each takes about 1-2 minutes.
SBTEMPLATE_DEVICE=cuda:0 step decode_gpu 170 "$PY" -m sbtemplate.benchmarks.padding \
    --profile tiny --no-stages --repeats 1 --long-form 0 --recognizers padding_invariant stock \
    --json "$OUT_DIR/decode_gpu.json" &
SBTEMPLATE_DEVICE=cpu step decode_cpu 170 "$PY" -m sbtemplate.benchmarks.padding \
    --profile tiny --no-stages --threads 8 --repeats 1 --long-form 0 \
    --recognizers padding_invariant stock --json "$OUT_DIR/decode_cpu.json" &
wait
"$PY" -m sbtemplate.benchmarks.gpu_table "$OUT_DIR" | tee "$OUT_DIR/table.md"
