"""The table of transforms: function-preserving changes of a model made before its weights are quantized.

A transform rescales or rotates weights so that a weight method (RTN, GPTQ, ...) that runs after it meets
easier numbers, folding the inverse into a neighbouring norm or linear so the unquantized model computes the
same function. It acts at one or both of two stages of :func:`ptqlab.pipeline.quantize_model`:

* ``prepare_model`` once, before calibration (rotations of the residual stream: embeddings, every block,
  the head);
* ``prepare_block`` for each block, given its calibration inputs, before its Hessians are collected
  (SmoothQuant's and AWQ's per-channel scales).

A transform is registered once, in its own module (as methods are in :mod:`ptqlab.methods.registry`), with
its option set (:mod:`ptqlab.options`); the config, CLI, recipes and records take it from this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models import FamilyMapping


class UnknownTransformError(ValueError):
    pass


@dataclass
class ModelContext:
    """What ``prepare_model`` sees: the whole model (on the CPU), its family's mapping and the config."""

    model: nn.Module
    adapter: Any  # ModelAdapter
    mapping: FamilyMapping
    config: Any  # QuantConfig
    device: torch.device


@dataclass
class BlockContext:
    """What ``prepare_block`` sees: one block (on the device) and the calibration windows entering it."""

    index: int
    block: nn.Module
    mapping: FamilyMapping
    config: Any  # QuantConfig
    hidden: torch.Tensor  # block inputs [n, seqlen, h], the outputs of the blocks before (quantized)
    forward: Callable[[], None]  # run the block over every window, for hooks (outputs discarded)
    outputs: Callable[[], torch.Tensor]  # the block's outputs for every window, [n, seqlen, h]
    device: torch.device

    @property
    def label(self) -> str:
        return f"blocks.{self.index}"

    def module(self, path: str) -> nn.Module:
        return self.block.get_submodule(path)


# check_config(config) -> None, or the reason this transform cannot serve the config
ConfigCheck = Callable[[Any], "str | None"]
# check_model(hf_config, mapping, config) -> None, or the reason the model cannot take this transform
ModelCheck = Callable[[Any, FamilyMapping, Any], "str | None"]


@dataclass(frozen=True)
class Transform:
    name: str
    summary: str
    needs_calibration: bool
    prepare_model: Callable[[ModelContext], dict] | None = None  # returns a log entry for the record
    prepare_block: Callable[[BlockContext], dict] | None = None
    option_sets: tuple[str, ...] = ()  # the option sets (ptqlab.options) it reads
    check_config: ConfigCheck | None = None
    check_model: ModelCheck | None = None
    needs_mapping: bool = True  # False only for "none"


TRANSFORMS: dict[str, Transform] = {}


def register_transform(transform: Transform) -> Transform:
    if transform.name in TRANSFORMS:
        raise ValueError(f"transform '{transform.name}' is registered twice")
    if transform.name != "none" and transform.prepare_model is None and transform.prepare_block is None:
        raise ValueError(f"transform '{transform.name}' declares neither prepare_model nor prepare_block")
    TRANSFORMS[transform.name] = transform
    return transform


def unregister_transform(name: str) -> None:
    TRANSFORMS.pop(name, None)


def get_transform(name: str) -> Transform:
    try:
        return TRANSFORMS[name]
    except KeyError:
        raise UnknownTransformError(f"unknown transform '{name}'; choose from {', '.join(TRANSFORMS)}") from None


def check_transform_model(config: Any, hf_config: Any, model: str = "the model") -> None:
    """Refuse, before any work, a transform the model's family cannot take (raises QuantizationError)."""
    from ..models import UnsupportedModelError, family_mapping
    from ..quantizers import QuantizationError

    name = config.transform
    transform = get_transform(name)
    if not transform.needs_mapping:
        return
    model_type = getattr(hf_config, "model_type", None)
    try:
        mapping = family_mapping(model_type, f"--transform {name}")
    except UnsupportedModelError as err:
        raise QuantizationError(f"{model}: {err}") from None
    if transform.check_model is not None:
        why = transform.check_model(hf_config, mapping, config)
        if why:
            raise QuantizationError(f"--transform {name} cannot act on {model} ({model_type}): {why}")


register_transform(Transform("none", "no transform", needs_calibration=False, needs_mapping=False))
