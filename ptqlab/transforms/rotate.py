"""Rotation of the residual stream (QuaRot, Ashkboos et al., 2024), folded into the weights.

An orthogonal ``Q`` turns the residual stream ``x`` into ``x Q``: every embedding becomes ``E Q``, every
linear reading the stream (after a norm) ``W Q``, every linear writing into it ``Q^T W``, and the head
``W Q``. A norm without its affine part commutes with ``Q`` (it divides by the vector's RMS, which ``Q``
keeps), so the norms' weights (and LayerNorm biases) are first folded into the linears after them. For the
LayerNorm families (OPT, BLOOM) the stream is first made mean-free, as SliceGPT does (embeddings and writers
centred), and ``Q`` keeps the all-ones direction (``Q 1 = 1``), so each LayerNorm then computes exactly what
an RMSNorm would, before and after the rotation. The rotated model computes the original function; its
weights and activations have their outliers spread over all channels, which is what makes W4A4 and W4A8
usable. ``Q = H D H`` with ``H`` the (block-diagonal) Hadamard of the hidden size and ``D`` random signs
(``--rotate-seed``), the first of each block +1 so that ``Q 1 = 1``.

With ``--rotate-online`` (the default) the MLP down-projection's input, which the residual rotation does not
reach, is rotated online by a Hadamard (its weight holds ``W H``): the QuaRot online rotation of the MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.hadamard import HadamardError, hadamard_block, hadamard_matrix
from ..models import QuantLinear
from ..options import int_at_least, option, register_options
from .registry import ModelContext, Transform, register_transform


@dataclass(frozen=True)
class RotateOptions:
    seed: int = option(0, "rotation: seed of the random signs of the residual rotation", key="rotate_seed",
                       check=int_at_least(0))
    online: bool = option(True, "rotation: also rotate the MLP down-projection input online (Hadamard)",
                          key="rotate_online")


register_options("rotate", RotateOptions)


def residual_rotation(d: int, seed: int) -> torch.Tensor:
    """``Q = H D H`` (float64, orthogonal, ``Q 1 = 1``) for a hidden size ``d``."""
    m = hadamard_block(d, "hidden size")
    H = hadamard_matrix(d)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d,), generator=g).double() * 2 - 1
    signs[::m] = 1.0  # the first index of each Hadamard block: keeps the all-ones direction
    return H @ torch.diag(signs) @ H


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(device=param.device, dtype=param.dtype)


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    old = root.get_submodule(path)
    new.original = old  # restore.PristineWeights puts it back
    setattr(root.get_submodule(parent) if parent else root, child, new)


class _Identity(nn.Identity):
    def __setattr__(self, name: str, value: object) -> None:
        if name == "original":  # a plain attribute, not a submodule
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)


class _Head(nn.Linear):
    """The rotated LM head: its own weight (the embeddings may be tied to the original) and, where the final
    LayerNorm had a bias, a bias."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "original":
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)


def _fold_norm(norm: nn.Module, readers: list[nn.Module], what: str) -> None:
    """``W <- W diag(g)``, ``b <- b + W beta`` for each reader; the norm's affine part becomes the identity."""
    gamma = norm.weight.detach().double()
    beta = getattr(norm, "bias", None)
    beta = None if beta is None else beta.detach().double()
    for lin in readers:
        W = lin.weight.detach().double()
        if beta is not None and bool(beta.any()):
            if lin.bias is None:
                raise ValueError(f"{what}: the norm has a bias but the linear after it has none to fold it into")
            _set(lin.bias, lin.bias.detach().double() + W @ beta)
        _set(lin.weight, W * gamma)
    _set(norm.weight, torch.ones_like(gamma))
    if getattr(norm, "bias", None) is not None:
        _set(norm.bias, torch.zeros_like(gamma))


@torch.no_grad()
def _prepare_model(ctx: ModelContext) -> dict:
    model, mp, adapter = ctx.model, ctx.mapping, ctx.adapter
    opts = ctx.config.options.rotate
    embeddings = [model.get_submodule(p) for p in mp.embeddings]
    d = embeddings[0].weight.shape[1]
    Q = residual_rotation(d, opts.seed)

    # the head first: it may share its weight with the embeddings, which are rotated below
    final = model.get_submodule(mp.final_norm)
    old_head = adapter.lm_head
    W_head = old_head.weight.detach().double()
    beta_f = getattr(final, "bias", None)
    has_bias = beta_f is not None and bool(beta_f.detach().any())
    head = _Head(d, W_head.shape[0], bias=has_bias, device=old_head.weight.device, dtype=old_head.weight.dtype)
    head.requires_grad_(False)
    if has_bias:
        _set(head.bias, W_head @ beta_f.detach().double())
    _set(head.weight, (W_head * final.weight.detach().double()) @ Q)
    _set(final.weight, torch.ones(d, dtype=torch.float64))
    if beta_f is not None:
        _set(final.bias, torch.zeros(d, dtype=torch.float64))
    head_path = next(n for n, m in model.named_modules() if m is old_head)
    _replace(model, head_path, head)
    adapter.lm_head = head
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False

    # the stream's start: embeddings (BLOOM: normalised by its own LayerNorm first), mean-free for LayerNorm
    for i, emb in enumerate(embeddings):
        E = emb.weight.detach().double()
        if mp.embedding_norm is not None and i == 0:
            ln = model.get_submodule(mp.embedding_norm)
            E = nn.functional.layer_norm(E, (d,), ln.weight.double(), ln.bias.double(), ln.eps)
        if mp.layer_norm:
            E = E - E.mean(1, keepdim=True)
        _set(emb.weight, E @ Q)
    if mp.embedding_norm is not None:
        _replace(model, mp.embedding_norm, _Identity())

    online = 0
    for index, block in enumerate(adapter.blocks):
        for nm in mp.norms:
            readers = [block.get_submodule(p) for p in nm.linears]
            _fold_norm(block.get_submodule(nm.norm), readers, f"blocks.{index}.{nm.norm}")
            for lin in readers:
                _set(lin.weight, lin.weight.detach().double() @ Q)
        for path in mp.writers:
            lin = block.get_submodule(path)
            W = lin.weight.detach().double()
            b = None if lin.bias is None else lin.bias.detach().double()
            if mp.layer_norm:
                W = W - W.mean(0, keepdim=True)
                b = None if b is None else b - b.mean()
            _set(lin.weight, Q.t() @ W)
            if b is not None:
                _set(lin.bias, b @ Q)
        if opts.online:
            down = block.get_submodule(mp.down_proj)
            Hf = hadamard_matrix(down.weight.shape[1])
            _set(down.weight, down.weight.detach().double() @ Hf)
            q = QuantLinear.from_module(down, f"blocks.{index}.{mp.down_proj}")
            q.input_rotation = "hadamard"
            parent, _, child = mp.down_proj.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, q)
            online += 1
    return {"layer": "model", "rotate": {"hidden": d, "block": hadamard_block(d), "seed": opts.seed,
                                         "online_hadamard": online, "head_bias": has_bias}}


def _ffn_size(hf_config) -> int | None:
    for key in ("intermediate_size", "ffn_dim", "n_inner"):
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    hidden = getattr(hf_config, "hidden_size", None)
    return 4 * hidden if isinstance(hidden, int) else None


def _check_model(hf_config, mapping, config) -> str | None:
    if getattr(hf_config, "model_type", None) == "opt":
        if not getattr(hf_config, "do_layer_norm_before", True):
            return "its LayerNorms come after the residual additions (do_layer_norm_before=False, as opt-350m)"
        proj = getattr(hf_config, "word_embed_proj_dim", hf_config.hidden_size)
        if proj != hf_config.hidden_size:
            return f"its embeddings ({proj}) are projected to the hidden size ({hf_config.hidden_size})"
    if getattr(hf_config, "apply_residual_connection_post_layernorm", False):
        return "its residual stream starts after the LayerNorm (apply_residual_connection_post_layernorm)"
    try:
        hadamard_block(hf_config.hidden_size, "hidden size")
        ffn = _ffn_size(hf_config)
        if ffn is not None and config.options.rotate.online:
            hadamard_block(ffn, "MLP size (the online Hadamard; --no-rotate-online goes without it)")
    except HadamardError as err:
        return str(err)
    return None


register_transform(Transform("rotate", "rotation of the residual stream (QuaRot): Hadamard-based, folded into the "
                             "weights, plus an online Hadamard on the MLP down-projection input",
                             needs_calibration=False, prepare_model=_prepare_model, option_sets=("rotate",),
                             check_model=_check_model))
