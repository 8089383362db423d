"""Transforms before quantization (SmoothQuant, AWQ, rotation): each module registers itself in ``registry.py``."""

# registration order is the order of the CLI's choices and the reports' rows
from .registry import (TRANSFORMS, BlockContext, ModelContext, Transform, check_transform_model,  # noqa: I001
                       get_transform, register_transform, unregister_transform)
from . import smoothquant, awq, rotate  # noqa: F401,E402

__all__ = ["TRANSFORMS", "BlockContext", "ModelContext", "Transform", "check_transform_model", "get_transform",
           "register_transform", "unregister_transform"]
