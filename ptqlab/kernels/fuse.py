"""Linears that read the same input as one wider linear: q/k/v of an attention block in one GEMM.

Why: at decode's one to sixteen tokens a 4096 -> 4096 projection is too little work to fill an H200 (the W4A16
kernel moved its 8.6 MB at 26% of the copy bandwidth, bench/README.md session 32) and each is one more launch; the
three of an attention block as one 4096 -> 12288 product are one launch over 3x the bytes.

Memory: the fused module holds the concatenated weight, and each layer's own weight becomes a view of its rows of
it (the layers keep working, e.g. for the model's own forward, and no second copy exists).  Tensors that run over
the outputs along a later dimension (fp16 scales ``[G, N]``) cannot be row views: the fused module holds a copy of
those (a few percent of a 4-bit weight's bytes).

What fuses: ``nn.Linear`` and unquantized :class:`~ptqlab.models.QuantLinear` (the FP16 model), and
:class:`~ptqlab.kernels.real.RealLinear` layers of one backend that declares its buffers' output dimensions
(``KernelBackend.out_dims``) with equal specs and grids; LoRC factors fuse exactly (stacked ``V``, block-diagonal
``U``).  Anything else (fake-quantized layers, mixed kinds) returns None: the caller runs the layers one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: attributes of a RealLinear that differ between the fused layers (everything else must be equal)
_PER_LAYER = {"name", "out_features", "original", "training", "bias", "lorc_u", "lorc_v"}


def _plain_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a layer that is exactly ``x @ W^T + b`` (None: it quantizes, rotates or adds LoRC)."""
    from ..models import QuantLinear

    if type(layer) is nn.Linear:
        return layer.weight, layer.bias
    if (isinstance(layer, QuantLinear) and not layer.weight_spec.enabled and not layer.act_spec.enabled
            and layer.lorc_u is None and layer.input_rotation is None):
        return layer.weight, layer.bias
    return None


def _cat_bias(biases: list[torch.Tensor | None], outs: list[int], dtype: torch.dtype,
              device: torch.device) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    return torch.cat([torch.zeros(n, dtype=dtype, device=device) if b is None else b.detach().to(dtype)
                      for b, n in zip(biases, outs)])


def _rows_to_views(fused: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """Point each part's data at its rows of ``fused`` (same values): one copy of the weight, not two."""
    start = 0
    for p in parts:
        p.data = fused[start:start + p.shape[0]]
        start += p.shape[0]


def _fuse_plain(layers: Sequence[nn.Module]) -> nn.Linear | None:
    pairs = [_plain_weight(layer) for layer in layers]
    if any(p is None for p in pairs):
        return None
    weights = [w for w, _ in pairs]
    w0 = weights[0]
    if any(w.dim() != 2 or w.shape[1] != w0.shape[1] or w.dtype != w0.dtype or w.device != w0.device
           for w in weights):
        return None
    outs = [w.shape[0] for w in weights]
    fused = nn.Linear(w0.shape[1], sum(outs), bias=False, device="meta")
    fused.weight = nn.Parameter(torch.cat([w.detach() for w in weights]), requires_grad=False)
    bias = _cat_bias([b for _, b in pairs], outs, w0.dtype, w0.device)
    fused.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    _rows_to_views(fused.weight.data, weights)
    return fused


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a == b


def _fuse_real(layers: Sequence[nn.Module]) -> nn.Module | None:
    from .real import RealLinear

    if not all(isinstance(layer, RealLinear) for layer in layers):
        return None
    first = layers[0]
    dims = first.backend.out_dims
    if dims is None or any(layer.backend is not first.backend for layer in layers):
        return None
    plain = {k: v for k, v in vars(first).items()
             if not k.startswith("_") and k not in _PER_LAYER and not isinstance(v, (torch.Tensor, nn.Module))}
    if any(not _same(vars(layer).get(k), v) for layer in layers[1:] for k, v in plain.items()):
        return None  # different specs, grids or kernels
    if any((layer.lorc_u is None) != (first.lorc_u is None) for layer in layers):
        return None
    parts = {name: [getattr(layer, name) for layer in layers] for name in dims}
    if any(len({p is None for p in ps}) > 1 for ps in parts.values()):
        return None  # e.g. a symmetric grid (no zero points) beside an asymmetric one
    buffers = {name: None if ps[0] is None else torch.cat(ps, dims[name]) for name, ps in parts.items()}
    outs = [layer.out_features for layer in layers]
    fused = RealLinear.__new__(RealLinear)
    nn.Module.__init__(fused)
    for k, v in plain.items():
        setattr(fused, k, v)
    fused.name = "+".join(layer.name for layer in layers)
    object.__setattr__(fused, "original", None)
    fused.out_features = sum(outs)
    device = next(b for b in buffers.values() if b is not None).device
    fused.bias = _cat_bias([layer.bias for layer in layers], outs, first.dtype, device)
    if first.lorc_u is not None:
        fused.lorc_v = torch.cat([layer.lorc_v for layer in layers])
        fused.lorc_u = torch.block_diag(*[layer.lorc_u for layer in layers])
    else:
        fused.lorc_u = fused.lorc_v = None
    for name, buf in buffers.items():
        fused.register_buffer(name, buf)
        if buf is not None and dims[name] == 0:
            _rows_to_views(buf, parts[name])
    # (a split-K workspace sized for the wider output grows on the first eager call, before any capture)
    return fused


def fuse_linears(layers: Sequence[nn.Module]) -> nn.Module | None:
    """One module whose output is ``torch.cat([layer(x) for layer in layers], -1)``, or None where these layers
    do not fuse (see the module docstring).  The layers' large weights become views of the fused one's rows."""
    if len(layers) < 2:
        return None
    return _fuse_plain(layers) or _fuse_real(layers)
