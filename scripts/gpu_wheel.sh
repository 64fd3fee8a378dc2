#!/usr/bin/env bash
# Builds an arcface_rs wheel with the `cuda` feature into .gpu/, for a GPU machine that has
# no Rust toolchain (see benches/gpu_check.sh). The wheel is cp39-abi3, so it serves every
# CPython >= 3.9 there. $1: the Python that builds it (a version such as 3.12 or an
# interpreter path; default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-3}" in
    */*) PY=$1 ;;
    *) PY=python${1:-3} ;;
esac
rm -rf .gpu && mkdir -p .gpu
MATURIN_PEP517_ARGS="--features python,cuda" "$PY" -m pip wheel --quiet --no-deps -w .gpu .
ls -l .gpu
