#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU, its driver and a CUDA
# toolkit (nvcc on PATH, or CUDA_HOME): builds fedtune with `--features
# cuda`, then
#   1. the CUDA-against-CPU parity tests (adapters/tests/gpu.rs): logits and
#      LoRA gradients of tiny models of every family and of the default
#      model, f32 and a bf16 base;
#   2. `bench train-step --device cuda` in f32 and bf16, with the GPU's peak
#      memory, beside PyTorch's same step on the same GPU when PyTorch,
#      transformers and peft are installed (tests/torch_gpu.py);
#   3. the quickstart course on the GPU and on the CPU: held-out loss before
#      and after within 2% of each other.
# Everything it measures goes to $OUT (default gpu-results/); it exits
# non-zero when a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
if ! command -v nvidia-smi >/dev/null; then
    echo "tests/gpu.sh: no nvidia-smi here: this machine has no NVIDIA driver" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv | tee "$out/gpu.csv"
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '. ')"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$cap}"
jobs="$(nproc)"
cargo build --release -j "$jobs" --features cuda
bin=target/release/fedtune
model="$($bin model fetch)"

echo "== 1. parity" >&2
cargo test --release -j "$jobs" --features cuda -p fedtune-adapters --test gpu -- --ignored --nocapture \
    2>&1 | tee "$out/parity.txt"

# `$1` run with nvidia-smi sampling used memory every 100 ms; the peak (MiB)
# goes to $out/$2.peak-mib.
with_peak() {
    local name="$1"
    shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$out/$name.mem" &
    local sampler=$! rc=0
    "$@" || rc=$?
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    sort -n "$out/$name.mem" | tail -1 >"$out/$name.peak-mib"
    return $rc
}

echo "== 2. training step" >&2
have_torch=0
if python3 -c "import torch, transformers, peft; assert torch.cuda.is_available()" 2>/dev/null; then
    have_torch=1
fi
# Alternating fedtune and PyTorch, twice, so drift hits both.
for round in 1 2; do
    for compute in f32 bf16; do
        with_peak "fedtune-$compute-$round" \
            $bin bench train-step --device cuda --compute "$compute" --steps 10 --json \
            >"$out/fedtune-$compute-$round.json"
        if [ "$have_torch" = 1 ]; then
            dtype=float32
            [ "$compute" = bf16 ] && dtype=bfloat16
            with_peak "torch-$compute-$round" \
                python3 tests/torch_gpu.py "$model" --dtype "$dtype" >"$out/torch-$compute-$round.json"
        fi
    done
done
[ "$have_torch" = 1 ] || echo "tests/gpu.sh: no PyTorch with CUDA here; fedtune's figures only" >&2

echo "== 3. quickstart, GPU against CPU" >&2
$bin run configs/quickstart.toml --device cuda --quiet --overwrite --out "$out/quickstart-cuda"
$bin run configs/quickstart.toml --quiet --overwrite --out "$out/quickstart-cpu"
python3 - "$out" <<'PY'
import glob, json, os, statistics, sys
out = sys.argv[1]
load = lambda p: json.load(open(p))
gpu, cpu = (load(f"{out}/quickstart-{d}/summary.json") for d in ("cuda", "cpu"))
ok = True
for key in ("test_loss_before", "test_loss_after"):
    g, c = gpu[key], cpu[key]
    rel = abs(g - c) / c
    print(f"quickstart {key}: cuda {g:.4f}, cpu {c:.4f} ({rel:.2%} apart), wall {gpu['wall_s']:.0f} s vs {cpu['wall_s']:.0f} s")
    ok &= rel <= 0.02
rows = []
for stack in ("fedtune", "torch"):
    for compute in ("f32", "bf16"):
        runs = sorted(glob.glob(f"{out}/{stack}-{compute}-*.json"))
        if not runs:
            continue
        key = "median_s" if stack == "fedtune" else "step_s_median"
        s = statistics.median(load(p)[key] for p in runs)
        peak = max(float(open(p[:-5] + ".peak-mib").read() or 0) for p in runs)
        rows.append(f"| {stack} | {compute} | {s:.4f} | {peak:.0f} |")
print("| stack | compute | s/step (median over runs) | peak GPU memory (MiB, whole device) |")
print("|---|---|---:|---:|")
print("\n".join(rows))
sys.exit(0 if ok else 1)
PY
