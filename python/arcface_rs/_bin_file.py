"""InsightFace's verification ``.bin`` files (LFW, CFP-FP, AgeDB-30): a pickle read with an
unpickler that builds only bytes, booleans and NumPy arrays, and the images decoded."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np


class BinUnpickler(pickle.Unpickler):
    """Unpickles InsightFace's ``.bin`` files and nothing else: they hold a tuple of a list of
    encoded images (bytes, or NumPy uint8 arrays in some re-packed files) and a list of
    booleans. Every other global (``os.system``, ``subprocess``, ...) is refused before
    anything is called."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            # how Python 3 pickles bytes at protocol 2: encode(text, "latin1"), nothing else
            def encode(text: str, encoding: str = "utf-8") -> bytes:
                if not isinstance(text, str) or encoding != "latin1":
                    raise pickle.UnpicklingError("a .bin file encodes bytes as latin1 only")
                return text.encode("latin1")

            return encode
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a .bin file: it may run code; "
            "InsightFace .bin files hold only images (bytes) and booleans"
        )


def load_bin(path: str | Path, image_size: tuple[int, int] = (112, 112)):
    """Reads an InsightFace verification ``.bin`` file (LFW, CFP-FP, AgeDB-30, ...).

    The file is a pickle; it is read with an unpickler that builds only bytes, lists,
    tuples, booleans, numbers and NumPy arrays, and refuses any other object (a pickle can
    run code) with ``pickle.UnpicklingError``. Images are decoded with Pillow (``pip install
    'arcface_rs[eval]'``), converted to RGB and resized to ``image_size`` when they differ.

    Parameters
    ----------
    path : str or Path
        The ``.bin`` file.
    image_size : (int, int)
        (height, width) of the returned images.

    Returns
    -------
    images : numpy.ndarray
        (2P, H, W, 3) uint8, pair i in rows 2i and 2i+1.
    issame : numpy.ndarray
        (P,) bool.
    """
    h, w = (int(v) for v in image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size: must be two positive integers, got {image_size!r}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        loaded = BinUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"path: {path}: {e}") from e
    except Exception as e:  # truncated or foreign files
        raise ValueError(
            f"path: {path}: not an InsightFace .bin file (unpickling failed: "
            f"{type(e).__name__}: {e})"
        ) from e
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
        raise ValueError(f"path: {path}: expected (images, issame), got {type(loaded).__name__}")
    bins, issame = loaded
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple, np.ndarray)):
        raise ValueError(
            f"path: {path}: expected a list of images and a list of booleans, got "
            f"{type(bins).__name__} and {type(issame).__name__}"
        )
    issame = _booleans(path, issame)
    if len(bins) != 2 * len(issame):
        raise ValueError(
            f"path: {path}: {len(bins)} images for {len(issame)} pairs (need 2 per pair)"
        )
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow comes with the test extras
        raise ImportError(
            "load_bin decodes images with Pillow: pip install 'arcface_rs[eval]'"
        ) from e
    images = np.empty((len(bins), h, w, 3), dtype=np.uint8)
    for i, b in enumerate(bins):
        if not isinstance(b, (bytes, bytearray, np.ndarray)):
            raise ValueError(
                f"path: {path}: image {i} is a {type(b).__name__}, not encoded image bytes"
            )
        raw = bytes(b) if not isinstance(b, np.ndarray) else b.tobytes()
        try:
            with Image.open(io.BytesIO(raw)) as im:
                im = im.convert("RGB")
                if im.size != (w, h):
                    im = im.resize((w, h))
                images[i] = np.asarray(im)
        except (OSError, ValueError, SyntaxError) as e:  # Pillow's "cannot identify" et al.
            raise ValueError(f"path: {path}: image {i} cannot be decoded ({e})") from e
    return images, issame


def _booleans(path: Any, values: Any) -> np.ndarray:
    """``issame`` of a .bin file: booleans, or the integers 0 and 1 (NumPy's bool() would
    read the string "False" and the number 2 as True)."""
    out = np.empty(len(values), dtype=bool)
    for i, v in enumerate(values):
        if isinstance(v, (bool, np.bool_)):
            out[i] = bool(v)
        elif isinstance(v, (int, np.integer)) and v in (0, 1):
            out[i] = v == 1
        else:
            raise ValueError(f"path: {path}: issame[{i}] is {v!r}, not a boolean (or 0/1)")
    return out
