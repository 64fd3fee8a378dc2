"""The margins' base classes and the argument checks their constructors share."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from .. import _core

_GRADS = ("exact", "straight_through")
#: kind codes of the margins that re-weight non-target logits (CurricularFace, MV-Softmax)
KINDS_WITH_HARD_NEGATIVES = (
    _core.MARGIN_KINDS["curricularface"],
    _core.MARGIN_KINDS["mvsoftmax"],
)


class Margin:
    """Base class of the margins. Logits are ``s * c`` except the target: ``s * psi(c)``."""

    _params: tuple[str, ...] = ()
    _spec: _core.Margin
    _block: tuple[float, ...]
    #: (B, MARGIN_PARAMS) parameter blocks when the margin has one value per row, else None
    _row_blocks: np.ndarray | None = None

    @property
    def block(self) -> tuple[float, ...]:
        """The margin's parameter block ``[kind, s, p0, p1, ...]`` (the core's
        ``Margin.encode()``): what the fused ops, the CUDA kernels and a sharded head's
        configuration check read. Per-row margins hold their rows elsewhere."""
        return self._block

    @property
    def spec(self) -> _core.Margin:
        """The core's margin (``_core.Margin``) of these values: what the NumPy heads pass to
        the Rust core. Per-row margins: the first row's (for kind and scale)."""
        return self._spec

    @property
    def row_blocks(self) -> np.ndarray | None:
        """(B, MARGIN_PARAMS) parameter blocks when the margin was built with one value per
        row, else None."""
        return self._row_blocks

    @property
    def varies_per_batch(self) -> bool:
        """Whether the margin's rows depend on the batch (feature norms, target cosines,
        draws, running statistics): then the heads call ``batch_rows`` every call."""
        return type(self).batch_rows is not Margin.batch_rows

    def _values(self) -> tuple[Any, ...]:
        values = (getattr(self, name) for name in self._params)
        return tuple(tuple(v.tolist()) if isinstance(v, np.ndarray) else v for v in values)

    def batch_rows(self, norms: Any, target_cos: Any, step: bool = True) -> np.ndarray | None:
        """The per-row parameter blocks of one call, or None for one margin for all rows.

        ``norms()`` and ``target_cos()`` return the batch's (B,) float64 feature norms and
        target cosines (NaN for ignored rows), computed only when a margin asks for them
        (array-likes: ``len(norms())`` does not read a GPU batch's values).
        Margins with running state (AdaFace, CurricularFace) compute the state this call
        moves them to when ``step`` (a loss call in training) and use it; per-sample draws
        (ElasticFace) are made here. Nothing changes yet: the new state waits in
        ``_pending`` until the caller's work has been accepted and it calls ``commit()``,
        so a refused call leaves the margin as it was."""
        return self._row_blocks

    def commit(self) -> None:
        """Applies the state of the last ``batch_rows`` call (see there); margins without state
        have none."""

    def last_rows(self) -> np.ndarray | None:
        """The blocks of the last accepted ``batch_rows`` call, for a backward of that call."""
        return getattr(self, "_last_rows", self._row_blocks)

    @property
    def scale(self) -> float | None:
        """The fixed logit scale ``s``, or None when logits scale by the feature norm."""
        return self._spec.scale

    def psi(self, cos: Any, norm: float | None = None) -> np.ndarray:
        """Target logit before scaling, elementwise (float64).

        With one margin per row, ``cos`` has one leading entry per row. ``norm`` is the
        feature norm for margins that read it (MagFace)."""
        return self._eval("psi", cos, norm)

    def dpsi(self, cos: Any, norm: float | None = None) -> np.ndarray:
        """d psi / d cos, elementwise (float64); finite for every cos in [-1, 1]."""
        return self._eval("dpsi", cos, norm)

    def _eval(self, what: str, cos: Any, norm: float | None) -> np.ndarray:
        cos = np.asarray(cos, dtype=np.float64)
        if self._row_blocks is None:
            return getattr(self._spec, what)(cos, norm)
        if cos.ndim == 0 or cos.shape[0] != len(self._row_blocks):
            raise ValueError(
                f"cos: this margin has {len(self._row_blocks)} per-row values, so cos needs "
                f"one leading entry per row, got shape {cos.shape}"
            )
        rows = [_core.Margin.decode(list(b)) for b in self._row_blocks]
        return np.stack(
            [getattr(r, what)(np.ascontiguousarray(c), norm) for r, c in zip(rows, cos)]
        )

    def __repr__(self) -> str:
        shown = [n for n in self._params if not (n == "grad" and self.grad == "exact")]  # type: ignore[attr-defined]
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in shown)
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._values() == self._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._values())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; build a new one")

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)
        if "_spec" in values:
            # the core's parameter block, kept as a tuple: torch.compile traces reading it
            # (it cannot trace a call into the native module)
            object.__setattr__(self, "_block", tuple(values["_spec"].encode()))


def real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def per_row(name: str, value: Any) -> float | np.ndarray:
    """A float, or a read-only 1-D float64 array of one value per row."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a real number or a 1-D array, got {type(value).__name__}")
    arr = np.array(value, dtype=np.float64)
    if arr.ndim == 0:
        return float(arr)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"{name}: must be a float or a 1-D array of one value per row, got shape {arr.shape}"
        )
    arr.flags.writeable = False
    return arr


def straight_through_of(value: Any) -> bool:
    if value not in _GRADS:
        raise ValueError(f"grad: must be 'exact' or 'straight_through', got {value!r}")
    return value == "straight_through"


def specs(make: Any, **values: float | np.ndarray) -> tuple[_core.Margin, np.ndarray | None]:
    """The core margin of scalar values, or of each row when any value is an array: the
    first row's margin (for kind and scale) and every row's parameter block."""
    if not any(isinstance(v, np.ndarray) for v in values.values()):
        return make(**values), None
    try:
        arrays = np.broadcast_arrays(*(np.asarray(v) for v in values.values()))
    except ValueError:
        shapes = {k: np.shape(v) for k, v in values.items()}
        raise ValueError(f"per-row margin values must have one length, got {shapes}") from None
    rows = [make(**dict(zip(values, row))) for row in zip(*(a.tolist() for a in arrays))]
    blocks = np.array([r.encode() for r in rows], dtype=np.float64)
    blocks.flags.writeable = False
    return rows[0], blocks


class StatefulMargin(Margin):
    """A margin whose calls change it (draws, running statistics): equal only to itself.

    Pickles and copies carry the whole state (``training``, running statistics, the random
    generator's position), so a copy continues exactly where the original stands."""

    #: attributes beyond the constructor's arguments that a copy carries
    _state: tuple[str, ...] = ()

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return other is self

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._values(), {n: getattr(self, n) for n in self._state})

    def _stage(self, blocks: np.ndarray | None, **state: Any) -> np.ndarray | None:
        """Keeps ``state`` (and ``blocks`` for ``last_rows``) for ``commit``."""
        object.__setattr__(self, "_pending", {"_last_rows": blocks, **state})
        return blocks

    def commit(self) -> None:
        pending = self.__dict__.get("_pending")
        if not pending:
            return
        object.__setattr__(self, "_pending", None)
        for name, value in pending.items():
            if name.startswith("_"):
                object.__setattr__(self, name, value)
            else:
                setattr(self, name, value)  # validated as any assignment is

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if name.startswith("_"):
                object.__setattr__(self, name, value)
            else:
                setattr(self, name, value)
