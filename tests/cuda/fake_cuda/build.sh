#!/usr/bin/env bash
# Builds the fake libcuda.so and libcublas.so into $1: fake_driver.cpp / fake_cublas.cpp plus
# a weak, trapping stub for every other symbol cudarc looks up (it refuses a library that
# lacks any). Used by tests/fake_cuda.rs and by scripts/test.sh's Python check.
# Usage: build.sh OUT_DIR -DMARGIN_...=N ...: the margin definitions that kernels.cu needs,
# from the crate's one definition (arcface_rs::cuda::margin_defines, or _core.MARGIN_KINDS,
# _core.MARGIN_PARAMS and _core.REMOTE_TARGET).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$1
shift
mkdir -p "$out"
for lib in cuda cublas; do
    case $lib in
        cuda) list=driver_symbols.txt src=fake_driver.cpp ;;
        cublas) list=cublas_symbols.txt src=fake_cublas.cpp ;;
    esac
    sed 's/.*/extern "C" __attribute__((weak)) void &(void) { __builtin_trap(); }/' \
        "$here/$list" > "$out/${lib}_stubs.cpp"
    "${CXX:-c++}" "$@" -std=c++20 -O1 -shared -fPIC "-Wl,-soname,lib$lib.so" -o "$out/lib$lib.so" \
        "$here/$src" "$out/${lib}_stubs.cpp"
done
