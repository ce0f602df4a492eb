#!/usr/bin/env bash
# Compiles fedtune's GPU path (`--features cuda`) on a machine with neither a
# GPU nor a CUDA toolkit, as CI does: NVIDIA's compiler and headers come from
# PyPI into a cache (about 300 MB, once), candle's CUDA kernels are compiled
# for the compute capability in CUDA_COMPUTE_CAP (default 90: H100/H200),
# and every crate and test target is linted with the feature on. Nothing is
# linked: the CUDA libraries (driver, cuBLAS, cuRAND, NVRTC) are the GPU
# machine's (tests/gpu.sh builds and runs there).
set -euo pipefail
cd "$(dirname "$0")/.."
version=13.0
cache="${FEDTUNE_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fedtune/cuda-$version}"
if [ ! -x "$cache/nvidia/cu13/bin/nvcc" ]; then
    echo "tests/cuda_check.sh: installing the CUDA $version compiler and headers from PyPI into $cache" >&2
    rm -rf "$cache.part"
    # nvcc's own parts (nvvm, crt) pinned too: a newer cicc writes PTX the
    # 13.0 ptxas refuses.
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
        --target "$cache.part" \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
    rm -rf "$cache"
    mv "$cache.part" "$cache"
fi
export CUDA_HOME="$cache/nvidia/cu13"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# Its own target directory: the feature changes candle's build, and sharing
# one would rebuild the CPU targets after every check.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/cuda"
cargo clippy -j 2 --workspace --all-targets --features cuda -- -D warnings
