"""Quantizing a model larger than host memory: block by block from its memory-mapped safetensors.

``ptqlab run --stream --save DIR`` builds the model on the meta device (accelerate's ``init_empty_weights``),
loads only what lies outside the decoder blocks (embeddings, final norm, head), and then, for each block in
turn: reads its tensors from the checkpoint (``safe_open``, memory-mapped), quantizes it (the usual pipeline),
runs the evaluation windows' hidden states through the quantized block, writes its compressed tensors to a
file of its own beside DIR, and frees it (back to the meta device; only its scales, zero points and LoRC
factors stay). At the end the evaluation finishes with the final norm and head, and ``model.safetensors``
is assembled from the block files one tensor at a time, byte for byte the file the in-memory path writes.

Host memory is about one block, the hidden states of the calibration and evaluation windows, and the parts
outside the blocks; disk needs about twice the quantized checkpoint until the block files are removed
(checked before the first block). The evaluation is the block-by-block one (``--offload``): the same numbers.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .blockio import BlockInputs, capture_block_inputs, run_block
from .evaluate import Perplexity, eval_windows, head_logits
from .experiment import ModelSession
from .models import _LAYOUTS, QuantLinear, get_adapter, model_path
from .moves import block_moves
from .preflight import gib
from .restore import _safetensors_index


class StreamError(ValueError):
    """A streamed run that cannot go ahead (the message says why and what to do)."""


def check_stream(spec, save: str | None, kernel: str = "fake", save_format: str = "compressed-tensors",
                 offload: bool | None = None) -> None:
    """Refuse ``--stream`` where it cannot run, before anything is loaded."""
    if not save:
        raise StreamError("--stream writes each quantized block to the checkpoint as it goes: it needs --save DIR")
    if save_format != "compressed-tensors":
        raise StreamError(f"--stream writes compressed-tensors checkpoints only (got --save-format {save_format})")
    refused = [(spec.config.transform != "none", f"--transform {spec.config.transform} (it changes every block "
                                                 f"before the first is quantized)"),
               ("kld" in spec.metrics, "--metrics kld (its reference is a pass of the whole unquantized model)"),
               (bool(spec.tasks), "--tasks (lm-eval scores the whole model at once)"),
               (spec.speed, "--speed (the model is never whole on the GPU to be timed)"),
               (kernel != "fake", f"--kernel {kernel} (the blocks are not kept for kernel selection)")]
    for bad, what in refused:
        if bad:
            raise StreamError(f"--stream cannot run with {what}; drop one of them")
    from .distributed import launched

    if launched():
        raise StreamError("--stream runs in one process; launch it without torchrun")


# ---------------------------------------------------------------- safetensors, written one tensor at a time

# safetensors orders a file's tensors by dtype (this enum order, largest first), then by name
_ST_DTYPES = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16",
              "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
_TORCH_TO_ST = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
                torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}


def write_safetensors(entries: dict[str, tuple[torch.dtype, tuple[int, ...], callable]], path: Path,
                      metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of ``{name: (dtype, shape, load)}``, each tensor loaded (``load()``) only when its
    bytes are written: the layout of ``safetensors.torch.save_file`` without all tensors in memory at once."""
    order = sorted(entries, key=lambda k: (-_ST_DTYPES.index(_TORCH_TO_ST[entries[k][0]]), k))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape, _ = entries[name]
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            dtype, shape, load = entries[name]
            t = load().contiguous()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise StreamError(f"{name}: expected {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


# ---------------------------------------------------------------- the session and its blocks


class StreamSession(ModelSession):
    """A :class:`ModelSession` whose model is a skeleton: the decoder blocks on the meta device, read from the
    checkpoint one at a time by the run's :class:`StreamedBlocks`; one run per session."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "auto", data_dir: str | None = None,
                 progress: bool = True, calib_batch: int = 8, calib_offload: bool = False) -> None:
        import time

        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from .runtime import resolve_dtype

        self.name, self.device, self.data_dir, self.progress = model, device, data_dir, progress
        self.calib_batch, self.calib_offload, self.offload = calib_batch, calib_offload, True
        self.dtype, self.dtype_name = resolve_dtype(dtype, device), dtype
        t0 = time.perf_counter()
        path = model_path(model)
        self.folder = Path(path)
        self.index = _safetensors_index(self.folder if self.folder.is_dir() else None)
        if not self.index:
            raise StreamError(f"--stream reads the model's safetensors files, and {model} has none here")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) real
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model.eval()
        self.model.requires_grad_(False)
        self.model.config.use_cache = False
        self.adapter = get_adapter(self.model)
        self.blocks_path = _LAYOUTS[self.adapter.model_type][0]
        inside = {id(m) for b in self.adapter.blocks for m in b.modules()}
        for name, module in self.model.named_modules():
            if id(module) not in inside:
                self._load_tensors(module, name)
        self._tie_head()
        self.load_time = time.perf_counter() - t0
        self._tokens, self._calib, self._fingerprint = {}, {}, None
        self._used = False

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.index[key]), framework="pt") as f:
            return f.get_tensor(key)

    def _load_tensors(self, module: nn.Module, prefix: str, recurse: bool = False) -> None:
        """Fill ``module``'s meta parameters (and persistent buffers) from the checkpoint, in the run's dtype."""
        named = module.named_parameters(recurse=recurse) if recurse else module.named_parameters(recurse=False)
        for local, p in list(named):
            if p.device.type != "meta":
                continue
            key = f"{prefix}.{local}" if prefix else local
            if key not in self.index:
                if key == "lm_head.weight" and getattr(self.model.config, "tie_word_embeddings", False):
                    continue  # tied to the embeddings (_tie_head)
                raise StreamError(f"--stream: {key} is not in the checkpoint's safetensors files ({self.folder}); "
                                  f"streaming reads tensors under the model's own names")
            owner_name, _, leaf = local.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            owner._parameters[leaf] = nn.Parameter(self._read(key).to(self.dtype), requires_grad=False)

    def _tie_head(self) -> None:
        head, embed = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head is not None and head.weight.device.type == "meta":
            head.weight = embed.weight

    def load_block(self, index: int, block: nn.Module) -> None:
        self._load_tensors(block, f"{self.blocks_path}.{index}", recurse=True)

    def fresh_model(self, transformed: bool = False) -> nn.Module:
        if self._used:
            raise StreamError("a streamed session quantizes its model once (its blocks are not kept)")
        self._used = True
        return self.model

    def block_stream(self, spec, eval_data: dict, seqlen: int, save: str | None) -> StreamedBlocks:
        return StreamedBlocks(self, spec, eval_data, seqlen, save)


def _release(block: nn.Module, keep: tuple[str, ...] = ("lorc_u", "lorc_v")) -> None:
    """Free a block's tensors (back to the meta device), keeping the LoRC factors (small) for the adapter."""
    modules = list(block.modules()) + [m.original for m in block.modules() if hasattr(m, "original")]
    for module in modules:
        for name, p in list(module._parameters.items()):
            if p is not None and name not in keep and p.device.type != "meta":
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for name, b in list(module._buffers.items()):
            if b is not None and b.device.type != "meta":
                module._buffers[name] = torch.empty_like(b, device="meta")


def _resident_bytes(blocks: nn.ModuleList) -> int:
    """Bytes of the blocks' tensors in memory, less the LoRC factors kept for the adapter."""
    seen, total = set(), 0
    for block in blocks:
        for name, t in [*block.named_parameters(), *block.named_buffers()]:
            if t.device.type != "meta" and id(t) not in seen and not name.endswith(("lorc_u", "lorc_v")):
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


class StreamedBlocks:
    """The :class:`~ptqlab.pipeline.BlockStream` of a streamed run: loads each block, evaluates it, writes it."""

    def __init__(self, session: StreamSession, spec, eval_data: dict, seqlen: int, save: str | None) -> None:
        if not save:
            raise StreamError("--stream needs --save DIR")
        self.session, self.spec, self.target = session, spec, Path(save)
        self.model = session.model
        self.adapter = get_adapter(self.model)
        self.check_disk()
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".blocks", dir=self._parent()))
        # removed when the checkpoint is written, and also when the run fails or the process exits
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.dir), ignore_errors=True)
        self.files: list[Path] = []
        self.peak_resident_bytes = 0
        self.max_block_bytes = 0
        device = torch.device(session.device)
        self.evals: dict[str, tuple[torch.Tensor, BlockInputs, Perplexity]] = {}
        for name, (tokens, _) in eval_data.items():
            desc = f"eval {name}"
            windows = eval_windows(tokens, seqlen, spec.max_eval_windows, desc)
            # the captured batch of 8 windows: as the block-by-block evaluation (--offload) runs them
            self.evals[name] = (windows, capture_block_inputs(self.model, self.adapter, windows, device, 8),
                                Perplexity(desc))

    def _parent(self) -> Path:
        parent = self.target.expanduser().resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        return parent

    def estimate_bytes(self) -> int:
        """About the bytes of the quantized checkpoint: every block linear at its stored size (float32 scales,
        the larger case), every other tensor in the save dtype."""
        from .export.checkpoint import _stored_weight_bytes
        from .models import ModelAdapter

        config = self.spec.config
        item = torch.empty((), dtype=self.session.dtype).element_size()
        total = 0
        linear_params = set()
        for index, block in enumerate(self.adapter.blocks):
            for name, m in ModelAdapter.linear_layers(block).items():
                linear_params.add(id(m.weight))
                out_f, in_f = m.weight.shape
                if config.weight.enabled and config.layers.selects(index, name):
                    layer = SimpleNamespace(weight_spec=config.weight, act_spec=config.act, out_features=out_f,
                                            in_features=in_f)
                    total += _stored_weight_bytes(layer, 4)
                    if config.lorc_rank:
                        total += config.lorc_rank * (out_f + in_f) * item
                else:
                    total += m.weight.numel() * item
        seen = set()
        for p in self.model.parameters():
            if id(p) not in linear_params and id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * item
        return total

    def check_disk(self) -> None:
        """Refuse, before the first block, a folder whose filesystem cannot take the block files and the
        checkpoint assembled from them (about twice the checkpoint)."""
        size = self.estimate_bytes()
        need = 2 * size + 64 * 2**20
        free = shutil.disk_usage(self._parent()).free
        if free < need:
            raise StreamError(f"--stream: writing {self.target} needs about {gib(need)} free on its filesystem (each "
                              f"block written as it is quantized, then the checkpoint assembled from them: twice "
                              f"its ~{gib(size)}), but {gib(free)} is free there; free some space or --save "
                              f"elsewhere")

    # the BlockStream hooks --------------------------------------------------------------------------

    def load(self, index: int, block: nn.Module) -> None:
        self.session.load_block(index, block)
        resident = _resident_bytes(self.adapter.blocks)
        self.peak_resident_bytes = max(self.peak_resident_bytes, resident)
        self.max_block_bytes = max(self.max_block_bytes, _resident_bytes(nn.ModuleList([block])))

    def done(self, index: int, block: nn.Module) -> None:
        """Run the evaluation windows through the quantized block, write its tensors out, free it."""
        moves = block_moves()  # back into the host tensors it left, as the pipeline's moves
        for _, (_, inputs, _) in self.evals.items():
            moves.to_device(block, inputs.device)
            run_block(block, inputs.hidden, inputs, out=inputs.hidden)
            moves.to_host(block)
        self._write_block(index, block)
        _release(block)

    def _write_block(self, index: int, block: nn.Module) -> None:
        from safetensors.torch import save_file

        from .export.checkpoint import _float_state, compress_layer

        prefix = f"{self.session.blocks_path}.{index}."
        layers = {f"{prefix}{n}": m for n, m in block.named_modules()
                  if isinstance(m, QuantLinear) and m.weight_spec.enabled}
        dtype = self.session.dtype
        state: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():  # float32 scales: the checkpoint's scale dtype is known at the end
            tensors = compress_layer(name, layer, torch.float32)
            state.update({f"{name}.{k}": (v.to(dtype) if k == "bias" else v) for k, v in tensors.items()})
        local = {n.removeprefix(prefix): m for n, m in layers.items()}
        state.update({prefix + k: v for k, v in _float_state(_Wrapped(block, self.model.config), local, dtype).items()})
        path = self.dir / f"block-{index:05d}.safetensors"
        save_file(state, str(path))
        self.files.append(path)

    # after the blocks ---------------------------------------------------------------------------------

    def memory(self) -> dict:
        """What the record says of the streaming: the most block bytes ever resident at once, the largest block."""
        return {"streamed": True, "peak_resident_block_bytes": self.peak_resident_bytes,
                "largest_block_bytes": self.max_block_bytes}

    def evaluation(self) -> tuple[dict, dict, dict]:
        """``(ppl, window_nll, kld)`` of the evaluation windows, finished with the final norm and head."""
        ppl, window_nll = {}, {}
        for name, (windows, inputs, metric) in self.evals.items():
            for first, logits, ids in head_logits(self.adapter, inputs.hidden, windows, inputs.device):
                metric.add(first, logits, ids)
            ppl[name], window_nll[name] = metric.result(), metric.window_nll
        return ppl, window_nll, {}

    def save(self, model: nn.Module, tokenizer, directory: str, record: dict, overwrite: bool = False) -> dict:
        from safetensors import safe_open

        from .export.checkpoint import (_float_state, compress_layer, format_for,
                                        weight_tensor_names, write_quantized_folder)

        blocks_prefix = f"{self.session.blocks_path}."

        def write_weights(path: Path, layers: dict, scale_dtype: torch.dtype, dtype: torch.dtype) -> int:
            outside = {n: m for n, m in layers.items() if not n.startswith(blocks_prefix)}  # a quantized head
            state = _float_state(model, outside, dtype, keep=lambda k: not k.startswith(blocks_prefix))
            for name, layer in outside.items():
                state.update({f"{name}.{k}": (v.to(dtype) if k == "bias" else v)
                              for k, v in compress_layer(name, layer, scale_dtype).items()})
            entries = {k: (v.dtype, tuple(v.shape), lambda v=v: v) for k, v in state.items()}
            # scales were written in float32; the checkpoint stores them in scale_dtype (exact: scale_dtype_for)
            casts = {f"{n}.weight_scale" for n, m in layers.items() if m.weight_spec.fmt in ("int", "fp8")}
            for file in self.files:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        dt = _st_dtype(sl.get_dtype())
                        cast = scale_dtype if key in casts and dt == torch.float32 else dt
                        entries[key] = (cast, tuple(sl.get_shape()),
                                        lambda file=file, key=key, cast=cast: _read(file, key).to(cast))
            quantized = {f"{n}.{k}" for n, m in layers.items()
                         for k in weight_tensor_names(format_for(m.weight_spec, m.act_spec), m.weight_spec.symmetric)}
            write_safetensors(entries, path, {"format": "pt"})
            return sum(torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
                       for k, (dt, shape, _) in entries.items() if k in quantized)

        try:
            return write_quantized_folder(model, tokenizer, directory, write_weights, record, overwrite)
        finally:
            self.close()

    def close(self) -> None:
        self._cleanup()


class _Wrapped(nn.Module):
    """A block seen as a model with a config (what _float_state reads for tied weights)."""

    def __init__(self, block: nn.Module, config) -> None:
        super().__init__()
        self.block = block
        self.config = config

    def state_dict(self, *args, **kwargs):  # the block's own names, without the wrapper's prefix
        return self.block.state_dict(*args, **kwargs)

    def named_modules(self, *args, **kwargs):
        return self.block.named_modules(*args, **kwargs)


def _read(file: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key)


def _st_dtype(name: str) -> torch.dtype:
    return {v: k for k, v in _TORCH_TO_ST.items()}[name]
