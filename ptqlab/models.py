"""Model adapters: where quantization applies in each supported architecture.

An adapter knows, for one family of Hugging Face causal LMs, the list of
decoder blocks, the final norm and the LM head.  The linear layers inside a
block are found generically (``nn.Linear`` and GPT-2's ``Conv1D``), so a new
family needs only the three paths below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .quantizers import QuantSpec, fake_quantize

# model_type -> (blocks, final modules applied after the blocks, lm head)
_LAYOUTS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "opt": ("model.decoder.layers", ("model.decoder.final_layer_norm", "model.decoder.project_out"), "lm_head"),
    "bloom": ("transformer.h", ("transformer.ln_f",), "lm_head"),
    "llama": ("model.layers", ("model.norm",), "lm_head"),
    "mistral": ("model.layers", ("model.norm",), "lm_head"),
    "qwen2": ("model.layers", ("model.norm",), "lm_head"),
    "qwen3": ("model.layers", ("model.norm",), "lm_head"),
    "gpt2": ("transformer.h", ("transformer.ln_f",), "lm_head"),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_LAYOUTS))


@dataclass(frozen=True)
class NormMapping:
    """A norm inside a block and the linears that read its output (a per-channel scale can move between them)."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ScalePair:
    """Two linears where ``prev``'s output channels reach ``next``'s inputs linearly (attention's V before its
    output projection; a gated MLP's up before its down projection): a scale can move from one to the other."""

    prev: str
    next: str


@dataclass(frozen=True)
class FamilyMapping:
    """Where the transforms of :mod:`ptqlab.transforms` act in one family (paths inside a block, or the model).

    ``norms`` and ``pairs`` serve the per-channel scalings (SmoothQuant, AWQ), as llm-compressor's
    ``awq/mappings.py``; ``writers``, ``embeddings``, ``final_norm`` and ``down_proj`` serve the rotation of
    the residual stream (which linears write into it, what starts it, and the MLP input rotated online).
    """

    norms: tuple[NormMapping, ...]
    pairs: tuple[ScalePair, ...]
    writers: tuple[str, ...]
    down_proj: str
    embeddings: tuple[str, ...]
    final_norm: str
    embedding_norm: str | None = None  # BLOOM normalises the embeddings before block 0
    layer_norm: bool = False  # LayerNorm (mean and variance) rather than RMSNorm


_LLAMA_MAPPING = FamilyMapping(
    norms=(NormMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
           NormMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    pairs=(ScalePair("self_attn.v_proj", "self_attn.o_proj"), ScalePair("mlp.up_proj", "mlp.down_proj")),
    writers=("self_attn.o_proj", "mlp.down_proj"), down_proj="mlp.down_proj",
    embeddings=("model.embed_tokens",), final_norm="model.norm")

# model_type -> where the transforms act; a family missing here cannot take --transform (GPT-2's Conv1D)
MAPPINGS: dict[str, FamilyMapping] = {
    "opt": FamilyMapping(
        norms=(NormMapping("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               NormMapping("final_layer_norm", ("fc1",))),
        pairs=(ScalePair("self_attn.v_proj", "self_attn.out_proj"),),
        writers=("self_attn.out_proj", "fc2"), down_proj="fc2",
        embeddings=("model.decoder.embed_tokens", "model.decoder.embed_positions"),
        final_norm="model.decoder.final_layer_norm", layer_norm=True),
    "bloom": FamilyMapping(
        # BLOOM's fused query_key_value interleaves heads: no V -> dense pair
        norms=(NormMapping("input_layernorm", ("self_attention.query_key_value",)),
               NormMapping("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
        pairs=(),
        writers=("self_attention.dense", "mlp.dense_4h_to_h"), down_proj="mlp.dense_4h_to_h",
        embeddings=("transformer.word_embeddings",), final_norm="transformer.ln_f",
        embedding_norm="transformer.word_embeddings_layernorm", layer_norm=True),
    "llama": _LLAMA_MAPPING,
    "mistral": _LLAMA_MAPPING,
    "qwen2": _LLAMA_MAPPING,
    # Qwen3's per-head q/k RMSNorms act on q_proj/k_proj outputs: inputs scaled or rotated reach them unchanged
    "qwen3": _LLAMA_MAPPING,
}


def family_mapping(model_type: str | None, what: str = "this transform") -> FamilyMapping:
    """The mapping of a family, or a clear error naming the family and those that have one."""
    if model_type not in MAPPINGS:
        why = " (GPT-2's Conv1D layers and fused attention have no norm -> linear mapping)" if model_type == "gpt2" else ""
        raise UnsupportedModelError(f"{what} needs a norm -> linear mapping of the model family, and "
                                    f"model_type={model_type!r} has none{why}; families with one: "
                                    f"{', '.join(sorted(MAPPINGS))}")
    return MAPPINGS[model_type]


class UnsupportedModelError(TypeError):
    pass


def _get(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj  # type: ignore[return-value]


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2's Conv1D is a linear layer with a transposed [in, out] weight.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantLinear)) or _is_conv1d(module)


@dataclass
class ModelAdapter:
    model: nn.Module
    model_type: str
    blocks: nn.ModuleList
    final_modules: list[nn.Module]
    lm_head: nn.Module

    @staticmethod
    def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
        """The linear layers of a block, by their name inside it, in forward order."""
        return {name: m for name, m in block.named_modules() if name and is_linear(m)}

    @property
    def max_seqlen(self) -> int | None:
        return max_positions(self.model.config)


def max_positions(config) -> int | None:
    """The longest window a model config allows, or None (ALiBi models such as BLOOM have no hard limit)."""
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def get_adapter(model: nn.Module) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _LAYOUTS:
        raise UnsupportedModelError(
            f"ptqlab does not know where the decoder blocks of {type(model).__name__} "
            f"(model_type={model_type!r}) are; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    blocks_path, final_paths, head_path = _LAYOUTS[model_type]
    blocks = _get(model, blocks_path)
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__}: expected decoder blocks at '{blocks_path}'")
    finals = [m for m in (_get(model, p) for p in final_paths) if m is not None]
    head = _get(model, head_path)
    if head is None:
        raise UnsupportedModelError(f"{type(model).__name__}: no LM head at '{head_path}'")
    return ModelAdapter(model, model_type, blocks, finals, head)


class QuantLinear(nn.Module):
    """A linear layer with a (fake-)quantized weight, quantized inputs and optional LoRC factors.

    ``y = Q_a(x) @ (W_q + U V)^T + b`` where ``W_q`` is stored dequantized in the
    model dtype, ``Q_a`` is dynamic per-token activation quantization and
    ``U [out, r]``, ``V [r, in]`` are the (quantized) low-rank compensation.
    Once its weight is quantized, ``weight_scale``/``weight_zero`` ``[out, n_groups]``
    (float32) give the grid it lies on: its integer codes are
    ``quantizers.weight_codes(weight, weight_scale, weight_zero, weight_spec)``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, name: str = "linear",
                 share: bool = False) -> None:
        """``share``: take ``weight``/``bias`` (Parameters) as they are instead of copying them."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if share:
            self.weight, self.bias = weight, bias
        else:
            self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.name = name
        self.act_spec = QuantSpec()
        self.weight_spec = QuantSpec()
        self.lorc_u: nn.Parameter | None = None
        self.lorc_v: nn.Parameter | None = None
        self.weight_scale: torch.Tensor | None = None
        self.weight_zero: torch.Tensor | None = None
        # an orthogonal rotation of the input applied online, before activation quantization (the rotation
        # transform's Hadamard on the MLP down-projection input; the weight holds W H so y is unchanged)
        self.input_rotation: str | None = None

    @classmethod
    def from_module(cls, module: nn.Module, name: str, share: bool = True) -> "QuantLinear":
        """Wrap a linear layer. With ``share`` (nn.Linear only) the weight and bias *Parameters* are
        the module's own, so quantizing changes them in place and no second copy of the model's
        linears exists (:class:`~ptqlab.experiment.ModelSession` restores them between runs)."""
        if isinstance(module, QuantLinear):
            return module
        if _is_conv1d(module):  # its weight is [in, out]: the transposed copy cannot share
            q = cls(module.weight.t(), module.bias, name)
        else:
            q = cls(module.weight, module.bias, name, share=share)
        q.original = module  # kept out of the module tree (a plain attribute), to put back on restore
        return q

    def __setattr__(self, name: str, value: object) -> None:
        if name == "original":  # not a submodule: it must not show in state_dict() or .to()
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def set_weight_qparams(self, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Record the grid the (already quantized) weight lies on: ``[out, n_groups]`` each."""
        if scale.shape != zero.shape or scale.dim() != 2 or scale.shape[0] != self.out_features:
            raise ValueError(f"{self.name}: scale/zero must be [out={self.out_features}, n_groups], "
                             f"got {tuple(scale.shape)} and {tuple(zero.shape)}")
        self.weight_scale = scale.detach().float().cpu()
        self.weight_zero = zero.detach().float().cpu()

    def set_lorc(self, u: torch.Tensor | None, v: torch.Tensor | None) -> None:
        if u is None or v is None:
            self.lorc_u = self.lorc_v = None
            return
        self.lorc_u = nn.Parameter(u.to(self.weight.dtype), requires_grad=False)
        self.lorc_v = nn.Parameter(v.to(self.weight.dtype), requires_grad=False)

    def effective_weight(self) -> torch.Tensor:
        if self.lorc_u is None:
            return self.weight
        return self.weight + self.lorc_u @ self.lorc_v

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            from .kernels.hadamard import rotate_online

            x = rotate_online(x, self.input_rotation)
        if x.is_cuda and not (x.requires_grad and torch.is_grad_enabled()):
            from .kernels import act_quant  # Triton: imported only where there is a GPU

            if act_quant.supported(self.act_spec):
                # one fused launch, no device sync: a non-finite input becomes NaN output,
                # which evaluation reports once per window (ptqlab.evaluate)
                return act_quant.SHARED_INPUTS.get(x, self.act_spec, f"{self.name} input")
        # no NaN/Inf check (a device sync) inside a CUDA graph being captured (ZQ-Global's training steps)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        return fake_quantize(x, self.act_spec, f"{self.name} input", activation=True, check=not capturing)

    # How inference applies LoRC: "addmm" (t = x V^T, then y += t U^T in place: no [tokens, out] temporary,
    # no separate add; the fastest layout measured, bench/README.md) or "plain" (the reference's three ops).
    lorc_mode = "addmm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        if self.lorc_u is None:
            return nn.functional.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() or self.lorc_mode == "plain":
            y = nn.functional.linear(x, self.weight, self.bias)
            return y + nn.functional.linear(nn.functional.linear(x, self.lorc_v), self.lorc_u)
        x2 = x.reshape(-1, self.in_features)
        y = nn.functional.linear(x2, self.weight, self.bias)
        y.addmm_(nn.functional.linear(x2, self.lorc_v), self.lorc_u.t())
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        rank = 0 if self.lorc_u is None else self.lorc_u.shape[1]
        return (
            f"in={self.in_features}, out={self.out_features}, w={self.weight_spec.describe()}, "
            f"a={self.act_spec.describe()}, lorc_rank={rank}"
            + (f", input_rotation={self.input_rotation}" if self.input_rotation else "")
        )


def wrap_linears(block: nn.Module, prefix: str = "", select=None) -> dict[str, QuantLinear]:
    """Replace the linear layers of ``block`` (those ``select(name)`` accepts; default all) by
    :class:`QuantLinear` (in place)."""
    wrapped: dict[str, QuantLinear] = {}
    for name, module in list(ModelAdapter.linear_layers(block).items()):
        if select is not None and not select(name):
            continue
        full = f"{prefix}{name}"
        q = QuantLinear.from_module(module, full)
        if q is not module:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, q)
        wrapped[name] = q
    return wrapped


_HOW_TO_NAME_A_MODEL = ("Give a local folder with config.json and weights, a Hugging Face hub id (needs network), "
                        "or a testbed model (testbed-opt, testbed-bloom, testbed-opt-2m, ...; see "
                        "ptqlab/testbed/MODEL_CARD.md).")


def model_path(name_or_path: str | Path) -> str:
    """The folder or hub id a model name stands for, checked without any network wait.

    A misspelt testbed name fails with the nearest names; a name that is no local folder fails at once
    when the hub cannot be reached (offline mode, or no connection) and the model is not in its cache,
    instead of after the hub client's retries.
    """
    import difflib

    from .preflight import hub_offline, hub_reachable
    from .testbed import ALIASES, FAMILY, is_testbed_model, resolve_model_path

    name = str(name_or_path)
    if name.startswith("testbed-") and not is_testbed_model(name):
        known = sorted({*FAMILY, *ALIASES})
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {' or '.join(filter(None, [', '.join(close[:-1]), close[-1]]))}? " if close else ""
        raise FileNotFoundError(f"unknown testbed model '{name}': {hint}the testbed models are {', '.join(known)}")
    path = resolve_model_path(name)
    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"could not load model '{name}': no model in {folder} (a model folder holds "
                                f"config.json, the weights (*.safetensors) and the tokenizer files)")
    if folder.exists():
        return path
    if name.startswith((".", "/", "~")) or Path(path).suffix:
        raise FileNotFoundError(f"could not load model '{name}': model folder {folder} does not exist")
    # a hub id: usable offline only from the local hub cache
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
    except ValueError:  # not a valid repo id either (huggingface_hub's HFValidationError)
        raise FileNotFoundError(f"could not load model '{name}': it is neither a local folder nor a Hugging Face "
                                f"hub id. {_HOW_TO_NAME_A_MODEL}") from None
    if not cached:
        if hub_offline():
            raise FileNotFoundError(f"could not load model '{name}': no local folder of that name, and the "
                                    f"Hugging Face hub is off (HF_HUB_OFFLINE) with no cached copy. "
                                    f"{_HOW_TO_NAME_A_MODEL}")
        if not hub_reachable():
            raise FileNotFoundError(f"could not load model '{name}': no local folder of that name, and the "
                                    f"Hugging Face hub cannot be reached (no network?) with no cached copy. "
                                    f"{_HOW_TO_NAME_A_MODEL}")
    return path


def model_config(name_or_path: str | Path):
    """The Hugging Face config of a model (no weights are read): what can be checked before loading it."""
    from transformers import AutoConfig

    path = model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(f"could not load model '{name_or_path}': {err}. {_HOW_TO_NAME_A_MODEL}") from err


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float16):
    """Load a causal LM and its tokenizer from a local folder or a hub id (``testbed-*`` resolves to the shipped models)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise FileNotFoundError(f"could not load model '{name_or_path}': {err}. {_HOW_TO_NAME_A_MODEL}") from err
    model.eval()
    model.requires_grad_(False)  # post-training only: no autograd state on the weights
    model.config.use_cache = False
    get_adapter(model)  # fail early on unsupported architectures
    return model, tokenizer
