#!/usr/bin/env bash
# `make gpu-check`: the one-command GPU check, in two halves.
#
#   scripts/gpu_check.sh bundle [DIR]   on a machine with the Rust toolchain (CPU is enough): builds
#                                        the release binaries, strips them and copies them with this
#                                        script into DIR (default target/gpu-check; under 64 MiB).
#   DIR/gpu_check.sh run                 on the GPU machine, which needs python with torch 2.11 (the
#                                        libtorch the binaries link, found through torch's own lib
#                                        folder) but no Rust: prints one Markdown table.
#
# `run` measures: `medtvt doctor`; an NCCL all-reduce with one rank per GPU; generation at the
# Llama-3.2-1B shape in bf16 (batch 64, prompt 128, 256 new tokens; and 8 prompts x G = 8 with one
# prefill per group); one GRPO step of `bench_grpo`; and the learner's TFLOP/s for a 16 x 1024
# training step. Each part has its own time limit, 8 minutes in all. PyTorch rows (transformers'
# generate, a plain PyTorch training step) are added when that python has transformers.
set -uo pipefail

bundle() {
    local dir=${1:-target/gpu-check}
    cd "$(dirname "$0")/.." || exit 1
    cargo build --release --bin medtvt \
        && cargo build --release -p medtvt-model --example bench_generate \
        && cargo build --release -p medtvt-learner --example bench_train_step --example bench_allreduce \
        && cargo build --release -p medtvt-cli --example bench_grpo || exit 1
    mkdir -p "$dir"
    cp target/release/medtvt "$dir/"
    for example in bench_generate bench_train_step bench_allreduce bench_grpo; do
        cp "target/release/examples/$example" "$dir/"
    done
    strip "$dir"/medtvt "$dir"/bench_*
    cp scripts/gpu_check.sh "$dir/gpu_check.sh"
    local mib=$(( $(du -sk "$dir" | cut -f1) / 1024 ))
    echo "bundle: $dir ($mib MiB): copy it to the GPU machine and run $dir/gpu_check.sh run"
    if (( mib >= 64 )); then
        echo "bundle: over 64 MiB" >&2
        exit 1
    fi
}

run() {
    local here python torch_lib nccl_dir has_hf=0
    here=$(cd "$(dirname "$0")" && pwd)
    python=${PYTHON:-python3}
    torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
        echo "gpu-check: $python cannot import torch (set PYTHON=...)" >&2
        exit 1
    }
    # cudarc looks for libnccl.so; the nvidia-nccl wheel ships libnccl.so.2 only.
    nccl_dir=$(mktemp -d)
    local wheel_nccl="$torch_lib/../../nvidia/nccl/lib/libnccl.so.2"
    [[ -e $wheel_nccl ]] && ln -s "$(realpath "$wheel_nccl")" "$nccl_dir/libnccl.so"
    export LD_LIBRARY_PATH="$torch_lib:$nccl_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export MEDTVT_PYTHON=$python
    "$python" -c 'import transformers' 2>/dev/null && has_hf=1
    local hf_flag=() torch_flag=()
    (( has_hf )) || { hf_flag=(--no-hf); torch_flag=(--no-torch); }

    echo "## medtvt GPU check ($(date -u +%Y-%m-%dT%H:%MZ), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
    echo
    section() { echo; echo "### $1"; echo; }
    section "doctor"
    timeout 60 "$here/medtvt" doctor || echo "(doctor failed: exit $?)"
    section "NCCL all-reduce, one rank per GPU"
    timeout 60 "$here/bench_allreduce" --mib 64 --iters 5 || echo "(all-reduce failed: exit $?)"
    section "generation, Llama-3.2-1B shape, bf16, batch 64, prompt 128, 256 new tokens"
    timeout 120 "$here/bench_generate" --config llama-1b --dtype bf16 --device cuda --batch 64 --prompt 128 \
        --new 256 --repeat 2 "${hf_flag[@]}" || echo "(generation failed: exit $?)"
    section "generation, GRPO groups: 8 prompts of 512 tokens x G = 8, 128 new tokens"
    timeout 120 "$here/bench_generate" --config llama-1b --dtype bf16 --device cuda --batch 64 --group 8 \
        --prompt 512 --new 128 --repeat 1 --no-hf || echo "(grouped generation failed: exit $?)"
    section "learner step, Llama-3.2-1B shape, bf16, 16 x 1024 tokens"
    timeout 90 "$here/bench_train_step" --config llama-1b --batch 16 --seq 1024 --dtype bf16 --device cuda \
        --steps 3 "${torch_flag[@]}" || echo "(training step failed: exit $?)"
    section "one GRPO step (bench_grpo, ours)"
    timeout 90 "$here/bench_grpo" --device cuda --dtype bf16 --steps 3 --no-trl || echo "(GRPO step failed: exit $?)"
    rm -rf "$nccl_dir"
}

case "${1:-}" in
    bundle) shift; bundle "$@" ;;
    run) run ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
esac
