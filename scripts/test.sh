#!/usr/bin/env bash
# The one test command (README.md): set-up, lints, Rust tests, stub check and pytest.
# Works from a fresh clone: it builds and installs the extension and the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

echo "== install (builds the extension; test extras include torch, hypothesis, ruff, mypy)"
"$PY" -m pip install --quiet --disable-pip-version-check ".[test]"

echo "== rust lints and tests"
cargo fmt --check
cargo clippy --quiet --all-targets -- -D warnings
cargo clippy --quiet --all-targets --features python -- -D warnings
cargo test --quiet

echo "== the cuda feature: builds without CUDA; every kernel compiles with NVRTC (no GPU needed);"
echo "   the launch sequences and the driver code run on a CPU emulator and a fake libcuda"
cargo clippy --quiet --all-targets --features cuda -- -D warnings
# NVRTC comes with PyTorch's CUDA wheels (nvidia/cu13/lib); the test fails if it cannot load.
NVRTC_DIR=$("$PY" -c "import glob, os, nvidia
hits = glob.glob(os.path.join(list(nvidia.__path__)[0], '*', 'lib', 'libnvrtc.so.13'))
print(os.path.dirname(hits[0]) if hits else '')")
export LD_LIBRARY_PATH="$NVRTC_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo test --quiet --features cuda --lib cuda::
cargo test --quiet --features cuda --test fake_cuda

echo "== python lints"
"$PY" -m ruff check python tests benches examples
"$PY" -m ruff format --check python tests benches examples

echo "== typed stubs against the built module"
(cd /tmp && "$PY" -m mypy.stubtest arcface_rs._core)

echo "== pytest"
"$PY" -m pytest tests

echo "== the Python side of the cuda feature on the fake driver (tests/fake_cuda/)"
FAKE=$(mktemp -d)
trap 'rm -rf "$FAKE"' EXIT
MATURIN_PEP517_ARGS="--features python,cuda" "$PY" -m pip wheel --quiet --no-deps -w "$FAKE/wheel" .
"$PY" -m pip install --quiet --no-deps --target "$FAKE/site" "$FAKE"/wheel/*.whl
bash tests/fake_cuda/build.sh "$FAKE/lib"
ARCFACE_RS_FAKE_CUDA="$FAKE/lib" PYTHONPATH="$FAKE/site" "$PY" -m pytest -q -p no:cacheprovider tests/fake_cuda
