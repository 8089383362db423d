"""The table of weight methods: each declares its name, whether it calibrates, and how it solves.

A method is registered once, in its own module (``register(Method(...))`` at
the end of ``rtn.py``, ``gptq.py``, ``zeroquant.py``); the config validates
against this table, the CLI takes its choices from it, and the pipeline calls
the solves it declares instead of branching on names. Adding a method (AWQ,
SmoothQuant, ...) is one new module that registers itself, plus its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class UnknownMethodError(ValueError):
    pass


@dataclass
class WeightResult:
    """A solved weight: dequantized values on the grid of ``scale``/``zero`` (``[out, n_groups]``, float32)."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


# solve_layer(W [out, in] float32, H [in, in] or None, config, label) -> WeightResult
LayerSolve = Callable[[torch.Tensor, "torch.Tensor | None", Any, str], WeightResult]
# solve_block(BlockProblem) -> ({linear name: (scale, zero)}, log entry for the report)
BlockSolve = Callable[["BlockProblem"], "tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]"]


@dataclass
class BlockProblem:
    """What a block-level method sees: the block, its wrapped linears, and the calibration data."""

    block: torch.nn.Module
    linears: dict[str, torch.nn.Module]
    config: Any  # QuantConfig
    run_block: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # float32 forward of one batch
    hidden: torch.Tensor  # block inputs [n, seqlen, h] (may be in CPU memory)
    targets: torch.Tensor | None  # the full-precision block's outputs, when the method asks for them
    label: str


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    needs_calibration: bool
    quantizes_weights: bool = True  # False only for the full-precision baseline
    solve_layer: LayerSolve | None = None  # per group of linears sharing one input
    solve_block: BlockSolve | None = None  # all linears of a block together, after solve_layer
    needs_targets: bool = False  # solve_block needs the full-precision block outputs
    options: tuple[str, ...] = ()  # the flat config keys (beyond the specs) this method reads
    # how the method runs on a device, where that changes its numbers (not part of the config: the same command
    # on another machine may run it otherwise); the run's record keeps it under "execution"
    execution: Callable[[torch.device], dict] | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method '{method.name}' is registered twice")
    if method.quantizes_weights and method.solve_layer is None and method.solve_block is None:
        raise ValueError(f"method '{method.name}' quantizes weights but declares no solve")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method '{name}'; choose from {', '.join(METHODS)}") from None


register(Method("fp16", "the unquantized baseline (W16A16)", needs_calibration=False, quantizes_weights=False))
