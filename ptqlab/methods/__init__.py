"""Weight quantization algorithms: plain functions over tensors, and the table that names them.

Each takes a float weight ``[out, in]`` (and, where it needs calibration, the
Hessian ``H = 2 X^T X / n`` of the layer's inputs or the inputs themselves)
and returns the quantized weight in float.  They choose the numbers; the
:mod:`ptqlab.quantizers` spec says what the numbers may look like.  Every
method registers itself in :mod:`ptqlab.methods.registry` (imported here, so
the table is complete once this package is imported).
"""

# registration order is the order of the CLI's choices and the reports' rows
from .registry import METHODS, BlockProblem, Method, WeightResult, get_method, register  # noqa: I001
from .rtn import rtn_quantize
from .gptq import GPTQResult, gptq_quantize
from .zeroquant import zq_global_block, zq_local_quantize
from .lorc import lorc_factors, lorc_factors_many

__all__ = ["METHODS", "BlockProblem", "GPTQResult", "Method", "WeightResult", "get_method", "gptq_quantize",
           "lorc_factors", "lorc_factors_many", "register", "rtn_quantize", "zq_global_block", "zq_local_quantize"]
