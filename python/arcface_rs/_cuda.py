"""Run-time discovery of the CUDA path (the `cuda` cargo feature), and the device that a
``device`` argument names.

The Rust side opens the driver, NVRTC and cuBLAS by library name (cudarc's dynamic
loading). PyTorch's CUDA wheels keep NVRTC and cuBLAS in ``site-packages/nvidia/cu13/lib``,
which the dynamic loader does not search; loading them here by full path first makes the
names resolve to these copies (a library already loaded is found by its name).
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

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


# Why a child forked after its parent used CUDA cannot: CUDA does not survive fork().
FORKED = _core.CUDA_FORKED


def device_ordinal(value: Any) -> int | None:
    """None for "cpu"; the CUDA ordinal for "cuda" / "cuda:N" (checked to be usable)."""
    text = str(value)  # also takes a torch.device
    if text == "cpu":
        return None
    if text == "cuda":
        ordinal = 0
    elif text.startswith("cuda:") and text[5:].isdigit() and text[5:].isascii():
        ordinal = int(text[5:])
    else:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    if not _core.cuda_feature:
        raise ValueError(
            f"device={text!r}: this arcface_rs was built without the cuda feature; rebuild "
            'with MATURIN_PEP517_ARGS="--features python,cuda" pip install .'
        )
    if _core.cuda_forked():
        raise ValueError(f"device={text!r}: {FORKED}")
    if not cuda_available():
        raise ValueError(f"device={text!r}: no CUDA driver or GPU is visible in this process")
    count = _core.cuda_device_count()
    if ordinal >= count:
        raise ValueError(
            f"device={text!r}: this process sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return ordinal
