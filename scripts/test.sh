#!/usr/bin/env bash
# The one test command (README.md): set-up, lints, Rust tests, stub check and pytest.
# Works from a fresh clone: it builds and installs the extension and the test dependencies.
#
#   bash scripts/test.sh            every stage, as CI runs it
#   bash scripts/test.sh rust       cargo fmt, clippy, cargo test
#   bash scripts/test.sh python     install, ruff, stubtest, pytest
#   bash scripts/test.sh cuda       the cuda feature: build, NVRTC compile of every kernel, the
#                                   emulator and the fake driver (Rust and Python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGE=${1:-all}
case "$STAGE" in
all | rust | python | cuda) ;;
*)
    echo "usage: bash scripts/test.sh [rust|python|cuda]" >&2
    exit 2
    ;;
esac

install() {
    echo "== install (builds the extension; test extras include torch, hypothesis, ruff, mypy)"
    "$PY" -m pip install --quiet --disable-pip-version-check ".[test]"
}

rust_stage() {
    echo "== rust lints and tests"
    cargo fmt --check
    cargo clippy --quiet --all-targets -- -D warnings
    cargo clippy --quiet --all-targets --features python -- -D warnings
    cargo test --quiet
    # The core builds for non-x86 targets (no x86 intrinsic outside an x86 cfg): checked for
    # aarch64 when its standard library is installed (rustup target add aarch64-unknown-linux-gnu).
    if rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
        echo "== the core for aarch64 (cargo clippy --target aarch64-unknown-linux-gnu)"
        cargo clippy --quiet --lib --target aarch64-unknown-linux-gnu -- -D warnings
        # ...and its tests run there, where an aarch64 linker and qemu-user are installed
        # (apt install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user): the portable
        # loops and the NEON code of the dependencies, checked on ARM. The fork test is left
        # out: qemu-user cannot fork a process that has threads.
        if command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then
            echo "== the core's tests on aarch64 under qemu-user"
            CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
                CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu" \
                cargo test --quiet --lib --target aarch64-unknown-linux-gnu -- \
                --skip a_forked_child_gets_a_pool_of_its_own
        else
            echo "== skipped: the core's tests on aarch64 (no aarch64-linux-gnu-gcc or qemu-aarch64)"
        fi
    else
        echo "== skipped: the aarch64 check (its standard library is not installed here)"
    fi
}

python_stage() {
    echo "== python lints"
    "$PY" -m ruff check python tests benches examples
    "$PY" -m ruff format --check python tests benches examples

    echo "== typed stubs against the built module"
    (cd /tmp && "$PY" -m mypy.stubtest arcface_rs._core)

    echo "== pytest"
    "$PY" -m pytest tests

    # The kernels at every lower SIMD level this CPU supports (ARCFACE_RS_SIMD caps the
    # dispatch): the Rust kernel tests and the Python tests of the heads and the search.
    local best level
    best=$("$PY" -c "import arcface_rs; print(arcface_rs.simd_level())")
    for level in avx2 scalar; do
        [ "$level" = "$best" ] && continue
        if ! ARCFACE_RS_SIMD=$level "$PY" -c "import arcface_rs" 2>/dev/null; then
            continue
        fi
        echo "== kernels at ARCFACE_RS_SIMD=$level (this CPU's best: $best)"
        ARCFACE_RS_SIMD=$level cargo test --quiet --lib -- kernels search head gemm triplet
        ARCFACE_RS_SIMD=$level "$PY" -m pytest -q -p no:cacheprovider tests/core/test_heads.py \
            tests/search/test_search.py tests/search/test_gallery.py tests/core/test_simd.py tests/core/test_triplet.py
    done
}

cuda_stage() {
    echo "== the cuda feature: builds without CUDA; every kernel compiles with NVRTC (no GPU needed);"
    echo "   the launch sequences and the driver code run on a CPU emulator and a fake libcuda"
    cargo clippy --quiet --all-targets --features cuda -- -D warnings
    cargo clippy --quiet --all-targets --features python,cuda -- -D warnings
    # NVRTC comes with PyTorch's CUDA wheels (nvidia/cu13/lib).
    local nvrtc_dir
    nvrtc_dir=$("$PY" -c "import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
hits = glob.glob(os.path.join(list(nvidia.__path__)[0], '*', 'lib', 'libnvrtc.so.13'))
print(os.path.dirname(hits[0]) if hits else '')")
    if [ -z "$nvrtc_dir" ]; then
        echo "   SKIPPED the NVRTC compile, the emulator and the fake driver: the installed torch"
        echo "   has no CUDA wheels (no nvidia/*/lib/libnvrtc.so.13); PyPI's Linux torch brings them"
        return 0
    fi
    export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    cargo test --quiet --features cuda --lib cuda::
    cargo test --quiet --features cuda --test fake_cuda

    echo "== the Python side of the cuda feature on the fake driver (tests/cuda/fake_cuda/)"
    local fake
    fake=$(mktemp -d)
    # shellcheck disable=SC2064  # expand now: the folder is local to this function
    trap "rm -rf '$fake'" EXIT
    MATURIN_PEP517_ARGS="--features python,cuda" "$PY" -m pip wheel --quiet --no-deps -w "$fake/wheel" .
    "$PY" -m pip install --quiet --no-deps --target "$fake/site" "$fake"/wheel/*.whl
    # kernels.cu's margin definitions, from the built module (the crate's one definition)
    local defines
    defines=$(PYTHONPATH="$fake/site" "$PY" -c "from arcface_rs import _core
print(' '.join([f'-DMARGIN_{k.upper()}={v}' for k, v in _core.MARGIN_KINDS.items()]
               + [f'-DMARGIN_PARAMS={_core.MARGIN_PARAMS}',
                  f'-DREMOTE_TARGET={_core.REMOTE_TARGET}']))")
    # shellcheck disable=SC2086  # one word per flag
    bash tests/cuda/fake_cuda/build.sh "$fake/lib" $defines
    ARCFACE_RS_FAKE_CUDA="$fake/lib" PYTHONPATH="$fake/site" "$PY" -m pytest -q -p no:cacheprovider tests/cuda/fake_cuda
}

case "$STAGE" in
rust) rust_stage ;;
python)
    install
    python_stage
    ;;
cuda)
    install
    cuda_stage
    ;;
all)
    install
    rust_stage
    python_stage
    cuda_stage
    ;;
esac
