"""ZeroQuant-Local and ZeroQuant-Global (ZeroQuant-V2 section 4).

Both start from RTN and learn the weights by gradient descent *through* the
quantizer, with a straight-through estimator for the rounding
(``Q(W') = W' + stopgrad(Q(W') - W')``) and Adam:

* **ZQ-Local** minimises each linear module's own output error
  ``||X W^T - X Q(W')^T||^2 / n``.  With ``D = W - Q(W')`` and ``H = 2 X^T X / n``
  this is ``tr(D H D^T) / 2``, so the full-batch objective over all
  calibration tokens is computed from the Hessian the pipeline already
  accumulated, without keeping the activations.
* **ZQ-Global** is ZeroQuant's layer-by-layer knowledge distillation: all
  weights of one transformer block are learned together to minimise the MSE
  between the full-precision block's output and the quantized block's output
  on the same input, in mini-batches of calibration windows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..quantizers import QuantSpec, fake_quantize, weight_qparams
from ..options import int_at_least, option, positive_float, register_options
from .registry import BlockProblem, Method, WeightResult, register


@dataclass(frozen=True)
class ZQOptions:
    # measured on both testbed models (bench/README.md): 100 steps at lr 1e-3 is the best worst case for
    # ZQ-Global and ties 300 steps for ZQ-Local, so both methods share one setting
    steps: int = option(100, "ZQ-Local/Global optimisation steps", key="zq_steps", check=int_at_least(1))
    lr: float = option(1e-3, "ZQ learning rate, relative to the weight RMS", key="zq_lr", check=positive_float)
    batch_size: int = option(8, "ZQ-Global batch size (windows)", key="zq_batch", check=int_at_least(1))


register_options("zq", ZQOptions)


def ste_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize with an identity gradient (straight-through estimator)."""
    return w + (fake_quantize(w.detach(), spec) - w).detach()


def local_objective(weight: torch.Tensor, quantized: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``||X W^T - X Q^T||^2 / n`` from the Hessian ``H = 2 X^T X / n``."""
    D = weight - quantized
    return (D @ H * D).sum() / 2


@dataclass
class ZQLocalResult:
    weight: torch.Tensor  # quantized, dequantized, in the input dtype
    scale: torch.Tensor  # [out, n_groups]
    zero: torch.Tensor
    history: list[float]  # the objective per step (the first entry is the RTN start)


@contextlib.contextmanager
def tf32_matmuls() -> Iterator[None]:
    """CUDA float32 matmuls on TF32 tensor cores inside the block, restored after."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def zq_local_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    steps: int = 200,
    lr: float = 1e-3,
) -> "ZQLocalResult":
    """ZQ-Local: learn ``W'`` so that ``Q(W')`` reproduces the layer's outputs.

    ``lr`` is relative to the RMS of the weight, so one default serves layers
    of any scale.  Returns the quantized weight and the objective per step
    (the first entry is the RTN start), with the grid it lies on.
    """
    W = weight.detach().float()
    H = H.detach().float()
    scale = W.pow(2).mean().sqrt().clamp(min=1e-12)
    latent = W.clone().requires_grad_(True)
    opt = torch.optim.Adam([latent], lr=lr * float(scale))
    losses = []
    best = fake_quantize(W, spec)
    best_latent = W.clone()
    best_loss = torch.tensor(float("inf"), device=W.device)
    # TF32 for the objective's [out, in] x [in, in] products on the GPU, as in ZQ-Global: the gradient steps need
    # no more than its 10-bit mantissa, and at full size those products are the whole cost (fp32 ran ZQ-Local at
    # 1.15x its fp32 floor on the OPT-6.7B shape, H200: bench/README.md). CPU arithmetic is unchanged.
    with torch.enable_grad(), tf32_matmuls():  # callers (the pipeline) run under no_grad
        for _ in range(steps + 1):
            q = ste_quantize(latent, spec)
            loss = local_objective(W, q, H)
            losses.append(loss.detach())
            # keep the best iterate (Adam on a rounded objective is not monotone), without a device sync
            better = loss.detach() < best_loss
            best = torch.where(better, q.detach(), best)
            best_latent = torch.where(better, latent.detach(), best_latent)
            best_loss = torch.where(better, loss.detach(), best_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    scale, zero = weight_qparams(best_latent, spec)  # the grid that best was rounded onto
    return ZQLocalResult(best.to(weight.dtype), scale, zero, torch.stack(losses).tolist())


class _STEWeight(nn.Module):
    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return ste_quantize(w, self.spec)


def zq_global_block(
    block: nn.Module,
    linears: dict[str, nn.Module],
    weight_spec: QuantSpec,
    run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 8,
    seed: int = 0,
) -> tuple[list[float], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """ZQ-Global (layer-wise distillation) of one block, in place.

    ``run_block(block, x)`` runs the block on a batch of hidden states;
    ``targets`` are the full-precision block's outputs for ``inputs``.  Every
    weight in ``linears`` is learned through the quantizer and finally left
    quantized.  Training runs in float32 whatever the model dtype; the block
    is returned in its original dtype.  If the learned weights end with a
    higher full-batch MSE than the RTN start, the RTN start is kept.
    Returns ``[start MSE, training loss per step..., final MSE]`` and, per
    linear, the scale/zero ``[out, n_groups]`` of the grid its weight is on.
    """
    dtype = next(block.parameters()).dtype
    block.float()
    params = []
    for module in linears.values():
        module.weight.requires_grad_(True)
        parametrize.register_parametrization(module, "weight", _STEWeight(weight_spec))
        params.append(module.parametrizations.weight.original)
    rms = torch.stack([p.detach().pow(2).mean() for p in params]).mean().sqrt().item()
    opt = torch.optim.Adam(params, lr=lr * rms)
    gen = torch.Generator().manual_seed(seed)
    n = inputs.shape[0]
    device = params[0].device  # inputs and targets may be kept in CPU memory

    def on_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, non_blocking=True).float()

    def full_mse() -> torch.Tensor:
        return torch.stack([nn.functional.mse_loss(run_block(block, on_device(x)).float(), on_device(t))
                            for x, t in zip(inputs.split(batch_size), targets.split(batch_size))]).mean()

    losses = []
    with contextlib.ExitStack() as restore:
        # TF32 for the distillation's matmuls: gradients need no more than its 10-bit mantissa
        restore.enter_context(tf32_matmuls())
        restore.callback(_unparametrize, linears, block, dtype)
        with torch.no_grad():
            start_mse = full_mse()  # the RTN start: latent weights = W, so the forward is RTN
            start = [p.detach().clone() for p in params]
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randperm(n, generator=gen)[: min(batch_size, n)].to(inputs.device)
                out = run_block(block, on_device(inputs[idx]))
                loss = nn.functional.mse_loss(out.float(), on_device(targets[idx]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
        with torch.no_grad():
            end_mse = full_mse()
            if end_mse > start_mse:  # distillation overshot: keep the RTN start
                for p, p0 in zip(params, start):
                    p.copy_(p0)
                end_mse = start_mse
        qparams = {name: weight_qparams(p.detach().float(), weight_spec) for name, p in zip(linears, params)}
    history = [float(start_mse), *torch.stack(losses).tolist(), float(end_mse)] if losses else [float(start_mse)]
    return history, qparams


def _unparametrize(linears: dict[str, nn.Module], block: nn.Module, dtype: torch.dtype) -> None:
    """Leave each linear with its (quantized) learned weight as a plain parameter, the block in ``dtype``."""
    for module in linears.values():
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        module.weight.requires_grad_(False)
    block.to(dtype)


def _solve_local(W: torch.Tensor, H: torch.Tensor | None, config, name: str) -> WeightResult:
    res = zq_local_quantize(W, H, config.weight, config.options.zq.steps, config.options.zq.lr)
    return WeightResult(res.weight, res.scale, res.zero)


def _solve_global(problem: BlockProblem) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    o = problem.config.options.zq
    # The latent weights start at W, so the first step's forward is exactly RTN.
    history, qparams = zq_global_block(problem.block, problem.linears, problem.config.weight, problem.run_block,
                                       problem.hidden, problem.targets, o.steps, o.lr, o.batch_size)
    return qparams, {"layer": problem.label, "zq_global_mse": [history[0], history[-1]] if history else []}


register(Method("zq-local", "ZeroQuant-Local: each linear's output error, STE + Adam from RTN",
                needs_calibration=True, solve_layer=_solve_local, options=("zq_steps", "zq_lr")))
register(Method("zq-global", "ZeroQuant-Global: block-wise distillation, STE + Adam from RTN",
                needs_calibration=True, solve_block=_solve_global, needs_targets=True,
                options=("zq_steps", "zq_lr", "zq_batch")))
