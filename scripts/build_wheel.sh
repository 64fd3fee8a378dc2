#!/usr/bin/env bash
# Builds the release wheel (one cp39-abi3 wheel serves CPython 3.9 and newer), installs it
# into a fresh virtual environment and imports it there, so a broken wheel is caught before
# anyone downloads it. The wheel lands in dist/.
#
#   bash scripts/build_wheel.sh            # the CPU build
#   FEATURES=python,cuda bash scripts/build_wheel.sh   # with the optional CUDA path
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
FEATURES=${FEATURES:-python}

rm -rf dist
MATURIN_PEP517_ARGS="--features $FEATURES" "$PY" -m pip wheel --quiet --no-deps -w dist .
wheel=$(ls dist/arcface_rs-*.whl)
echo "built $wheel"
case "$wheel" in
*-cp39-abi3-*) ;;
*)
    echo "expected a cp39-abi3 wheel, got $wheel" >&2
    exit 1
    ;;
esac

venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
"$PY" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel"
(cd "$venv" && "$venv/bin/python" -c "
import numpy as np
import arcface_rs as afr
scores, idx = afr.cosine_topk(np.eye(3), np.eye(3), k=1)
assert idx.ravel().tolist() == [0, 1, 2], idx
loss, _, _ = afr.margin_loss(np.eye(3), np.eye(3), [0, 1, 2], afr.ArcFace())
assert np.isfinite(loss)
print('imported arcface_rs', afr.__version__, 'from', afr.__file__)
")
