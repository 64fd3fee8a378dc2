#!/usr/bin/env bash
# The GPU check: installs arcface_rs with the `cuda` feature, runs the GPU tests, then the
# GPU benchmarks and the sharded head's check.
#
#   bash benches/gpu_check.sh          everything (about 6 minutes on an H200)
#   bash benches/gpu_check.sh head     the head's GPU tests, its benchmark, its profile and
#                                      three tilings (about 4 minutes)
#   bash benches/gpu_check.sh search   the gallery's GPU tests, the search benchmark and
#                                      the profiles of a 1- and a 1024-query search
#
# What the machine needs: an NVIDIA GPU with a CUDA 13 driver, and a Python with numpy,
# pytest and PyTorch's CUDA wheels (they bring NVRTC and cuBLAS). It needs no Rust toolchain
# and no network when a wheel waits in .gpu/: build it beforehand where Rust is, with
#     bash scripts/gpu_wheel.sh
# (one cp39-abi3 wheel serves any CPython >= 3.9) and copy .gpu/ (ignored by git) along.
# Without a wheel there, this script builds one with cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=${1:-all}
export PYTHONUNBUFFERED=1

wheel=$(ls .gpu/arcface_rs-*.whl 2>/dev/null | head -1 || true)
if [ -n "$wheel" ]; then
    echo "== installing $wheel"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target /tmp/arcface_rs_site "$wheel"
    export PYTHONPATH="/tmp/arcface_rs_site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "== building with the cuda feature"
    "$PY" -m pip install --quiet .
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" -c "import arcface_rs as a; assert a._core.cuda_feature and a.cuda_available(), 'no usable GPU'"

if [ "$MODE" = head ]; then
    echo "== GPU tests of the head"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/cuda/test_cuda.py -rs -x \
        -k "gpu and not gallery" || echo "== GPU head tests FAILED (rc $?)"
    echo "== GPU head benchmark"
    timeout 200 "$PY" benches/bench_cuda.py --part head
    echo "== where a step's time goes (bf16 autocast, C=1M), with each pass's bandwidth"
    timeout 90 "$PY" benches/profile_cuda.py --mode autocast || echo "== profile FAILED (rc $?)"
    # smaller class tiles keep more of a tile's logits and dW in L2 between the kernels that
    # write and read them, at more launches (the default is 16384); a dX̂ batch of one tile
    # lets each tile's dW GEMM and projection find its stash and centres in L2 after its dX̂
    # GEMM, at a dX̂ GEMM per tile (the default batches up to 64 MiB of products)
    for setting in "ARCFACE_RS_CUDA_CLASS_TILE=8192" "ARCFACE_RS_CUDA_DX_BATCH=1" \
        "ARCFACE_RS_CUDA_CLASS_TILE=8192 ARCFACE_RS_CUDA_DX_BATCH=1"; do
        echo "== the head with $setting"
        env $setting timeout 45 "$PY" benches/bench_cuda.py --part head --ours-only \
            || echo "== $setting FAILED (rc $?)"
    done
    exit 0
fi
if [ "$MODE" = search ]; then
    echo "== GPU tests of the gallery"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/cuda/test_cuda.py -rs \
        -k "gpu and gallery" || echo "== GPU gallery tests FAILED (rc $?)"
    echo "== GPU search benchmark"
    timeout 300 "$PY" benches/bench_cuda.py --part search
    # where a search's time goes: the one-pass scan (Q=1), the GEMM tiles and their selection
    for q in 1 1024; do
        echo "== where a float16 search's time goes, Q=$q, N=1M"
        timeout 60 "$PY" benches/profile_cuda.py --search "$q" || echo "== profile FAILED (rc $?)"
    done
    exit 0
fi

echo "== GPU tests"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/cuda/test_cuda.py -rs

echo "== GPU benchmarks"
timeout 300 "$PY" benches/bench_cuda.py
timeout 90 "$PY" benches/profile_cuda.py --mode autocast || echo "== profile FAILED (rc $?)"

echo "== the sharded head on GPUs (2 ranks: NCCL with a GPU each, else gloo on one GPU)"
timeout 300 "$PY" benches/bench_sharded_cuda.py
