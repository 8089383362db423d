"""A one-entry cache of a function of the last input tensor, valid while that very tensor lives unchanged.

q/k/v projections read one hidden-state tensor: quantizing it once instead of three times saves two passes
over it.  Identity (a weak reference) and the tensor's version counter, not its data address, say that the
input is the same (a freed tensor's memory can be reused); when the input dies, the cached result is
dropped with it, so nothing outlives the forward that made it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch


class InputCache:
    def __init__(self) -> None:
        self._key: tuple | None = None
        self._ref: weakref.ref | None = None
        self._out: Any = None

    def lookup(self, x: torch.Tensor, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()`` for ``x`` and ``key``, or the kept result if both are the last call's."""
        key = (x._version, x.shape, x.stride(), *key)
        if self._ref is not None and self._ref() is x and self._key == key:
            return self._out
        out = compute()
        self._ref, self._key, self._out = weakref.ref(x, self._expire), key, out
        return out

    def _expire(self, ref: weakref.ref) -> None:
        if self._ref is ref:
            self.clear()

    def clear(self) -> None:
        self._ref = self._key = self._out = None
