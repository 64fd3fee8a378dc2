"""Run-time discovery of the CUDA path (the `cuda` cargo feature).

The Rust side opens the driver, NVRTC and cuBLAS by library name (cudarc's dynamic
loading). PyTorch's CUDA wheels keep NVRTC and cuBLAS in ``site-packages/nvidia/cu13/lib``,
which the dynamic loader does not search; loading them here by full path first makes the
names resolve to these copies (a library already loaded is found by its name).
"""

from __future__ import annotations

import ctypes
import functools
import os

from . import _core

# CUDA 13 names: the version the feature's bindings are built for.
_LIBRARIES = ("libnvrtc.so.13", "libcublasLt.so.13", "libcublas.so.13")


def _wheel_dirs() -> list[str]:
    try:
        import nvidia  # the namespace package of NVIDIA's PyPI wheels
    except ImportError:
        return []
    return [os.path.join(root, "cu13", "lib") for root in nvidia.__path__]


@functools.cache
def _preload() -> None:
    for name in _LIBRARIES:
        try:
            ctypes.CDLL(name)
            continue  # the loader finds it already
        except OSError:
            pass
        for folder in _wheel_dirs():
            path = os.path.join(folder, name)
            if os.path.exists(path):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    continue
                break


def cuda_available() -> bool:
    """Whether the CUDA path can run here: arcface_rs built with the ``cuda`` feature, a CUDA
    driver and device, NVRTC and cuBLAS (CUDA 13) loadable. False, never an error, else."""
    if not _core.cuda_feature:
        return False
    _preload()
    return bool(_core.cuda_available())
