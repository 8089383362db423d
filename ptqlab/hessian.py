"""The Hessians of a block's linear inputs, ``H = 2 X^T X / n``, accumulated during a forward."""

from __future__ import annotations

import torch

from .models import QuantLinear
from .quantizers import QuantizationError


# fp16/bf16 inputs on CUDA: whether cuBLAS takes them as they are with a float32 output (``addmm(out_dtype=)``);
# set to False by the first call that finds this torch without it
_HALF_INPUTS = [True]


def accumulate_gram(total: torch.Tensor, x: torch.Tensor) -> None:
    """``total += x^T x`` in float32 for ``x [tokens, d]``.

    Every product of two fp16 (or bf16) values is exact in float32, so the sum differs from the float32 one
    only in the order of its additions: on CUDA the half-precision input goes to the tensor cores as it is,
    with float32 accumulation and output (twice TF32's rate, no float32 copy of the input); failing that, TF32,
    which also holds fp16/bf16 values exactly (10-bit mantissa). Other inputs: float32 as they are."""
    half = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
    if half and _HALF_INPUTS[0]:
        try:
            torch.addmm(total, x.t(), x, out_dtype=torch.float32, out=total)
            return
        except (RuntimeError, TypeError):  # a torch without the float32-output half GEMM
            _HALF_INPUTS[0] = False
    x = x.float()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = half
    try:
        total.addmm_(x.t(), x)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class HessianCollector:
    """Accumulates ``X^T X`` of each distinct linear input of a block.

    Linears called one after the other on the very same tensor (q, k, v;
    gate, up) share one accumulator. "The very same" is object identity and
    an unchanged version counter, never the data address: a freed
    activation's memory is soon handed to the next tensor of its size (so
    OPT's fc1 input can sit where out_proj's input was), and an in-place op
    changes the data at the same address.
    """

    def __init__(self, linears: dict[str, QuantLinear]) -> None:
        self.linears = linears
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.owner: dict[str, str] = {}  # layer -> the layer whose accumulator it shares
        # the last linear called and its input; holding the tensor keeps its memory from being reused
        self._last: tuple[str, torch.Tensor, int] | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module: QuantLinear, args: tuple) -> None:
            x = args[0]
            last = self._last
            same_input = last is not None and last[1] is x and last[2] == x._version
            owner = self.owner[last[0]] if same_input else name
            if self.owner.setdefault(name, owner) != owner:
                raise RuntimeError(
                    f"{module.name}: reads {'the same' if same_input else 'a different'} input as the linear "
                    f"before it in one batch but not in another; its Hessian cannot be shared consistently"
                )
            self._last = (name, x, x._version)
            if self.owner[name] != name:
                return
            # no per-batch finiteness check (a full pass over the input and a device sync per linear and
            # batch): a NaN or Inf in the input reaches the diagonal of the sum, which close() checks once
            xq = module.quantize_input(x).reshape(-1, x.shape[-1])
            if name not in self.sums:
                self.sums[name] = torch.zeros(xq.shape[1], xq.shape[1], device=xq.device)
                self.tokens[name] = 0
            accumulate_gram(self.sums[name], xq)
            self.tokens[name] += xq.shape[0]

        return hook

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in self.linears:
            out.setdefault(self.owner.get(name, name), []).append(name)
        return out

    def hessian(self, owner: str) -> torch.Tensor:
        """``H = 2 X^T X / n``, made in place from the accumulator (which it replaces)."""
        return self.sums.pop(owner).mul_(2 / self.tokens[owner])

    def close(self) -> None:
        """Remove the hooks; raise if a linear's input held NaN or Inf.

        ``(X^T X)_ii`` sums the squares of input column ``i``: one NaN or Inf there makes it NaN or Inf for
        good (the terms are never negative, so no Inf - Inf), so the diagonals, checked with one sync for the
        whole block, see every non-finite input of every batch.
        """
        for h in self._handles:
            h.remove()
        self._last = None
        if not self.sums:
            return
        finite = torch.stack([torch.isfinite(s.diagonal()).all() for s in self.sums.values()]).tolist()
        for name, ok in zip(self.sums, finite):
            if not ok:
                column = int((~torch.isfinite(self.sums[name].diagonal())).nonzero()[0])
                raise QuantizationError(
                    f"{self.linears[name].name} input: cannot quantize a non-finite value (NaN or Inf, or a value "
                    f"whose square overflows float32) in input column {column} of the calibration activations")
