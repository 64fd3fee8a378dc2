#!/usr/bin/env bash
# Regenerates the lists of symbols cudarc looks up in libcuda and libcublas (every one must
# exist, or cudarc refuses the library), from the cudarc version in Cargo.lock.
set -euo pipefail
cd "$(dirname "$0")"
version=$(grep -A1 '^name = "cudarc"' ../../../Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$version"/src | head -1)
for lib in driver cublas; do
    grep -o '\.get(b"[A-Za-z0-9_]*\\0")' "$src/$lib/sys/mod.rs" | sed 's/.get(b"//; s/\\0")//' \
        | sort -u > "${lib}_symbols.txt"
done
wc -l driver_symbols.txt cublas_symbols.txt
