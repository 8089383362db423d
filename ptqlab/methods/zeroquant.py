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
import os
import warnings
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
    """Fake-quantize with an identity gradient (straight-through estimator).

    No NaN/Inf check (a device sync per call): the latent weights start from a checked weight, and an iterate that
    diverges has a NaN loss, which the best-iterate selection below never keeps."""
    return w + (fake_quantize(w.detach(), spec, check=False) - w).detach()


def cuda_graphs_enabled(device: torch.device) -> bool:
    """Whether the ZQ optimisation loops replay one captured CUDA graph per step (on CUDA, unless
    ``PTQLAB_ZQ_GRAPHS=0``, the eager loop, for comparison). On the testbed's small layers a step is a few
    microseconds of GPU work behind ~1-2 ms of Python and kernel launches, which a replay removes."""
    return device.type == "cuda" and os.environ.get("PTQLAB_ZQ_GRAPHS", "1") != "0"


def _adam(params: list[torch.Tensor], lr: float, device: torch.device) -> torch.optim.Adam:
    # capturable on CUDA whether or not the steps are captured, so that the eager loop can check the graphed one
    # (tests/gpu/test_gpu_zq.py; they agree to float rounding, bench/README.md)
    return torch.optim.Adam(params, lr=lr, capturable=device.type == "cuda")


def _reset_adam(opt: torch.optim.Adam) -> None:
    """Adam's state back to before its first step, in place (the captured graph keeps pointers to it)."""
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()


class _Capture:
    """``step(); backward; opt.step()`` captured once as a CUDA graph, replayed per step.

    Two eager warm-up steps on a side stream create Adam's state and the autograd buffers (as capture requires);
    ``restart`` then puts the iterate back at its start and Adam's state is zeroed, so the replays make the same
    sequence as the eager loop from the same start.
    """

    def __init__(self, step: Callable[[], torch.Tensor], opt: torch.optim.Adam, restart: Callable[[], None]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                opt.zero_grad(set_to_none=True)
                step().backward()
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        restart()
        _reset_adam(opt)
        opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = step()
            self.loss.backward()
            opt.step()

    def replay(self) -> torch.Tensor:
        """One step; the loss of the iterate it started from (a tensor the next replay overwrites)."""
        self.graph.replay()
        return self.loss.detach()


def _graphed_or_eager(graphed: Callable[[], list[float]], eager: Callable[[], list[float]],
                      reset: Callable[[], None], what: str) -> list[float]:
    """``graphed()``, or, where a CUDA graph cannot be captured (an operation in the step that capture does not
    allow), a warning and ``eager()`` from the reset start: a slower run, never a failed one."""
    try:
        return graphed()
    except RuntimeError as err:
        warnings.warn(f"{what}: the training step could not be captured as a CUDA graph ({str(err).splitlines()[0]}); "
                      f"running it eagerly (set PTQLAB_ZQ_GRAPHS=0 to skip the attempt)")
        torch.cuda.synchronize()
        reset()
        return eager()


def _replay_steps(step: Callable[[], torch.Tensor], opt: torch.optim.Adam, restart: Callable[[], None],
                  n: int) -> torch.Tensor:
    """``n`` steps of ``step(); backward; opt.step()`` as graph replays; their losses."""
    capture = _Capture(step, opt, restart)
    losses = torch.empty(n, device=capture.loss.device)
    for i in range(n):
        losses[i].copy_(capture.replay())
    return losses


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
    opt = _adam([latent], lr * float(scale), W.device)
    start = fake_quantize(W, spec)  # the RTN start (and the one NaN/Inf check of the weight)
    best = start.clone()
    best_latent = W.clone()
    best_loss = torch.full((), float("inf"), device=W.device)

    def step() -> torch.Tensor:
        q = ste_quantize(latent, spec)
        loss = local_objective(W, q, H)
        # keep the best iterate (Adam on a rounded objective is not monotone), without a device sync, in place
        # (a captured graph writes the same tensors every replay)
        better = loss.detach() < best_loss
        best.copy_(torch.where(better, q.detach(), best))
        best_latent.copy_(torch.where(better, latent.detach(), best_latent))
        best_loss.copy_(torch.where(better, loss.detach(), best_loss))
        return loss

    def restart() -> None:
        with torch.no_grad():
            latent.copy_(W)
        best.copy_(start)
        best_latent.copy_(W)
        best_loss.fill_(float("inf"))

    # TF32 for the objective's [out, in] x [in, in] products on the GPU, as in ZQ-Global: the gradient steps need
    # no more than its 10-bit mantissa, and at full size those products are the whole cost (fp32 ran ZQ-Local at
    # 1.15x its fp32 floor on the OPT-6.7B shape, H200: bench/README.md). CPU arithmetic is unchanged.
    # Each iteration evaluates the current iterate, then steps (the last step's result is never evaluated).
    with torch.enable_grad(), tf32_matmuls():  # callers (the pipeline) run under no_grad
        def eager() -> list[float]:
            history = []
            for _ in range(steps + 1):
                loss = step()
                history.append(loss.detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return torch.stack(history).tolist()

        if cuda_graphs_enabled(W.device):
            losses = _graphed_or_eager(lambda: _replay_steps(step, opt, restart, steps + 1).tolist(), eager,
                                       lambda: (restart(), _reset_adam(opt)), "ZQ-Local")
        else:
            losses = eager()
    scale, zero = weight_qparams(best_latent, spec)  # the grid that best was rounded onto
    return ZQLocalResult(best.to(weight.dtype), scale, zero, losses)


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
    device = params[0].device  # inputs and targets may be kept in CPU memory
    opt = _adam(params, lr * rms, device)
    gen = torch.Generator().manual_seed(seed)
    n = inputs.shape[0]
    bs = min(batch_size, n)

    def on_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, non_blocking=True).float()

    def full_mse() -> torch.Tensor:
        return torch.stack([nn.functional.mse_loss(run_block(block, on_device(x)).float(), on_device(t))
                            for x, t in zip(inputs.split(batch_size), targets.split(batch_size))]).mean()

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(steps):
            idx = torch.randperm(n, generator=gen)[:bs].to(inputs.device)
            yield on_device(inputs[idx]), on_device(targets[idx])

    losses: list[float] = []
    with contextlib.ExitStack() as restore:
        # TF32 for the distillation's matmuls: gradients need no more than its 10-bit mantissa
        restore.enter_context(tf32_matmuls())
        restore.callback(_unparametrize, linears, block, dtype)
        with torch.no_grad():
            start_mse = full_mse()  # the RTN start: latent weights = W, so the forward is RTN
            start = [p.detach().clone() for p in params]
        def eager() -> list[float]:
            history = []
            for x, t in batches():
                loss = nn.functional.mse_loss(run_block(block, x).float(), t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append(loss.detach())
            return torch.stack(history).tolist() if history else []

        def reset() -> None:
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)
            _reset_adam(opt)
            opt.zero_grad(set_to_none=True)

        with torch.enable_grad():
            if steps and cuda_graphs_enabled(device):
                losses = _graphed_or_eager(lambda: _global_steps_graphed(block, run_block, opt, params, start,
                                                                         batches(), steps, bs, inputs, targets,
                                                                         device), eager, reset, "ZQ-Global")
            else:
                losses = eager()
        with torch.no_grad():
            end_mse = full_mse()
            if end_mse > start_mse:  # distillation overshot: keep the RTN start
                for p, p0 in zip(params, start):
                    p.copy_(p0)
                end_mse = start_mse
        qparams = {name: weight_qparams(p.detach().float(), weight_spec) for name, p in zip(linears, params)}
    history = [float(start_mse), *losses, float(end_mse)] if losses else [float(start_mse)]
    return history, qparams


def _global_steps_graphed(block: nn.Module, run_block, opt: torch.optim.Adam, params: list[torch.Tensor],
                          start: list[torch.Tensor], batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                          steps: int, bs: int, inputs: torch.Tensor, targets: torch.Tensor,
                          device: torch.device) -> list[float]:
    """ZQ-Global's ``steps`` training steps as replays of one captured graph of forward, backward and Adam step;
    each step's mini-batch is copied into the graph's static input and target first. The warm-up steps run on the
    first windows and are then undone (weights back to ``start``, Adam's state zeroed), so the replays take the
    eager loop's mini-batches in the same order from the same start."""
    static_x = inputs[:bs].to(device).float()
    static_t = targets[:bs].to(device).float()

    def step() -> torch.Tensor:
        return nn.functional.mse_loss(run_block(block, static_x).float(), static_t)

    def restart() -> None:
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)

    loss_of = _Capture(step, opt, restart)
    losses = torch.empty(steps, device=device)
    for i, (x, t) in enumerate(batches):
        static_x.copy_(x)
        static_t.copy_(t)
        losses[i].copy_(loss_of.replay())
    return losses.tolist()


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


def _execution(device: torch.device) -> dict:
    # graphed and eager steps agree to float rounding, which ZQ's rounding decisions can amplify (bench/README.md)
    return {"zq_cuda_graphs": cuda_graphs_enabled(device)}


register(Method("zq-local", "ZeroQuant-Local: each linear's output error, STE + Adam from RTN",
                needs_calibration=True, solve_layer=_solve_local, options=("zq_steps", "zq_lr"),
                execution=_execution))
register(Method("zq-global", "ZeroQuant-Global: block-wise distillation, STE + Adam from RTN",
                needs_calibration=True, solve_block=_solve_global, needs_targets=True,
                options=("zq_steps", "zq_lr", "zq_batch"), execution=_execution))
