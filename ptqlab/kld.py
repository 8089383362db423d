"""The quantized model's token distribution against the FP16 model's: KL divergence, top-1 agreement, delta p.

On the same windows as perplexity (:func:`ptqlab.evaluate.eval_windows`), for every predicted token
(positions 1..seqlen-1 of each window) with P the FP16 model's next-token distribution and Q the quantized
model's, as llama.cpp's ``perplexity --kl-divergence`` reports them:

* ``mean`` / ``median`` / ``p99``: of the per-token ``KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))`` (nats);
* ``top1``: the fraction of tokens where both models put their highest probability on the same token;
* ``dp``: the mean of ``Q(correct) - P(correct)`` (a fraction, not llama.cpp's percent).

The reference (P) is computed once per (model weights, token windows, dtype, device type) with the session's
pristine FP16 model and cached on disk (:func:`cache_dir`), keyed by content hashes, so a study pays for it
once. Where the reference's logits fit in :func:`exact_limit_bytes` it is *exact*: the FP16 logits as the
model produced them (its dtype), so the KL of a model against itself is 0. Otherwise it is a *top-k*
reference: per token the ``k`` largest FP16 log-probabilities, their token ids and the log of the remaining
mass; KL is then computed between the two distributions coarsened to those ``k + 1`` bins (the top-k tokens
and "the rest"), which by the data-processing inequality never exceeds the exact KL:
``KL_exact = KL_topk + P(rest) * KL(P|rest || Q|rest) >= KL_topk``. The error is measured on the testbed in
tests/test_kld.py. ``top1`` and ``dp`` are exact in both modes (the FP16 top-1 token and its log-probability
of the correct token are stored).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .evaluate import EvaluationError, evaluate_windows

FORMAT_VERSION = 1  # of the cached files: a change of what they hold changes every key
DEFAULT_TOPK = 1024  # measured on the testbed (tests/test_kld.py): >= 98% of the exact mean KL; 64 gives ~80%
DEFAULT_EXACT_GIB = 4.0  # exact references up to this size (logits of every predicted token, model dtype)


def cache_dir() -> Path:
    """Where the references live: ``$PTQLAB_CACHE/kld`` (default ``~/.cache/ptqlab/kld``, beside the testbed cache)."""
    env = os.environ.get("PTQLAB_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "ptqlab") / "kld"


def exact_limit_bytes() -> int:
    """The largest exact reference: ``$PTQLAB_KLD_EXACT_GIB`` GiB (default 4). It is held in host memory while
    it is computed and once per run that compares with it; above it, the top-k reference."""
    text = os.environ.get("PTQLAB_KLD_EXACT_GIB", "")
    try:
        gib = float(text) if text else DEFAULT_EXACT_GIB
    except ValueError:
        raise ValueError(f"PTQLAB_KLD_EXACT_GIB must be a number of GiB, got {text!r}") from None
    return int(gib * 2**30)


def tokens_digest(windows: torch.Tensor) -> str:
    """sha256 of the evaluation windows (shape and ids): covers the text, the tokenizer, seqlen and the prefix."""
    digest = hashlib.sha256(json.dumps(list(windows.shape)).encode())
    digest.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ReferenceKey:
    """What a reference depends on; its hash names the cache file."""

    model: str  # content fingerprint of the weights (ptqlab.study.recipe.model_fingerprint)
    tokens: str  # tokens_digest of the windows
    dtype: str
    device: str  # device type: FP16 logits on a GPU and on the CPU differ in their last bits
    topk: int  # 0: exact

    def digest(self) -> str:
        blob = json.dumps({**self.__dict__, "format": FORMAT_VERSION}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:24]

    @property
    def path(self) -> Path:
        return cache_dir() / f"{self.digest()}.safetensors"


def reference_key(model_name: str, windows: torch.Tensor, dtype: torch.dtype, device: str, vocab: int,
                  fingerprint: str | None = None) -> ReferenceKey:
    """The key of the reference of model ``model_name`` (its weights' content hash, unless ``fingerprint`` is
    given) on these windows, exact or top-k by :func:`choose_topk`."""
    from .study.recipe import model_fingerprint  # the study's key of a model's files: one definition

    return ReferenceKey(fingerprint or model_fingerprint(model_name), tokens_digest(windows),
                        str(dtype).replace("torch.", ""), torch.device(device).type,
                        choose_topk(windows.shape[0] * (windows.shape[1] - 1), vocab, dtype))


def vocab_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def choose_topk(n_tokens: int, vocab: int, dtype: torch.dtype, limit: int | None = None) -> int:
    """0 (exact) when the logits of ``n_tokens`` predicted tokens fit in ``limit`` bytes, else :data:`DEFAULT_TOPK`."""
    limit = exact_limit_bytes() if limit is None else limit
    size = n_tokens * vocab * torch.finfo(dtype).bits // 8
    return 0 if size <= limit else min(DEFAULT_TOPK, vocab - 1)


class _Collect:
    """The reference's tensors from the FP16 logits stream (on CPU)."""

    def __init__(self, topk: int) -> None:
        self.topk = topk
        self.parts: dict[str, list[torch.Tensor]] = {}

    def _put(self, name: str, value: torch.Tensor) -> None:
        self.parts.setdefault(name, []).append(value.cpu())

    def add(self, first: int, logits: torch.Tensor, ids: torch.Tensor) -> None:
        for i in range(ids.shape[0]):
            lg = logits[i, :-1]
            logp = torch.log_softmax(lg.float(), dim=-1)
            if not bool(torch.isfinite(logp).all()):
                raise EvaluationError(f"KL reference: the FP16 model produced non-finite logits in window {first + i}")
            self._put("logp_correct", logp.gather(-1, ids[i, 1:, None])[:, 0])
            if self.topk == 0:
                self._put("logits", lg.contiguous())
                continue
            top, idx = logp.topk(self.topk, dim=-1)
            rest = torch.log1p(-top.exp().sum(-1).clamp(max=1.0 - 1e-7))
            self._put("top_logp", top)
            self._put("top_idx", idx.to(torch.int32))
            self._put("rest_logp", rest)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: torch.stack(parts) for name, parts in self.parts.items()}


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Written beside its final name, then renamed: an interrupted write leaves no file under that name."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Reference:
    """A cached FP16 reference: its file and what it holds."""

    path: Path
    topk: int  # 0: exact

    @property
    def kind(self) -> str:
        return "exact" if self.topk == 0 else f"top-{self.topk}"

    def load(self, device: str | torch.device) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path), device=str(device))


def compute_reference(model: nn.Module, windows: torch.Tensor, key: ReferenceKey, device: str,
                      offload: bool = False, eval_batch: int | None = None, progress: bool = True,
                      desc: str = "KL reference") -> Reference:
    """Run the (pristine, FP16) model over the windows and write its reference to the cache."""
    collect = _Collect(key.topk)
    evaluate_windows(model, windows, [collect], device, offload, eval_batch, desc, progress)
    meta = {k: str(v) for k, v in key.__dict__.items()}
    meta["format"] = str(FORMAT_VERSION)
    _save_atomic(collect.tensors(), key.path, meta)
    return Reference(key.path, key.topk)


def get_reference(model: nn.Module, windows: torch.Tensor, key: ReferenceKey, device: str, offload: bool = False,
                  eval_batch: int | None = None, progress: bool = True, desc: str = "KL reference") -> Reference:
    """The cached reference of ``key``, computed (one FP16 pass) when the cache has none."""
    if key.path.is_file():
        return Reference(key.path, key.topk)
    return compute_reference(model, windows, key, device, offload, eval_batch, progress, desc)


class KLDivergence:
    """The :class:`~ptqlab.evaluate.WindowMetric` of KL(FP16 || quantized), top-1 agreement and delta p."""

    def __init__(self, reference: Reference, device: str | torch.device, desc: str = "eval") -> None:
        self.reference = reference
        self.ref = reference.load(device)
        self.desc = desc
        self._kl: list[torch.Tensor] = []
        self._agree: list[torch.Tensor] = []
        self._dp: list[torch.Tensor] = []

    def add(self, first: int, logits: torch.Tensor, ids: torch.Tensor) -> None:
        n_ref = self.ref["logp_correct"].shape[0]
        if first + ids.shape[0] > n_ref or self.ref["logp_correct"].shape[1] != ids.shape[1] - 1:
            raise EvaluationError(f"{self.desc}: the KL reference {self.reference.path} holds {n_ref} windows of "
                                  f"{self.ref['logp_correct'].shape[1] + 1} tokens, not these windows")
        for i in range(ids.shape[0]):
            w = first + i
            logq = torch.log_softmax(logits[i, :-1].float(), dim=-1)
            target = ids[i, 1:, None]
            if self.reference.topk == 0:
                logp = torch.log_softmax(self.ref["logits"][w].float(), dim=-1)
                # xlogy-style: P(v) = 0 contributes 0 even where log Q(v) is -inf
                kl = (logp.exp() * (logp - logq)).nan_to_num(nan=0.0, posinf=float("inf")).sum(-1)
                ref_top1 = logp.argmax(-1)
            else:
                idx = self.ref["top_idx"][w].long()
                top_p, top_q = self.ref["top_logp"][w], logq.gather(-1, idx)
                rest_p = self.ref["rest_logp"][w]
                rest_q = torch.log1p(-top_q.exp().sum(-1).clamp(max=1.0 - 1e-7))
                kl = (top_p.exp() * (top_p - top_q)).sum(-1) + rest_p.exp() * (rest_p - rest_q)
                ref_top1 = idx[:, 0]
            if not bool(torch.isfinite(kl).all()):
                raise EvaluationError(f"{self.desc}: non-finite KL divergence in window {w} (NaN/Inf logits)")
            self._kl.append(kl.clamp(min=0.0))  # rounding can give -1e-9 where P and Q agree
            self._agree.append(logq.argmax(-1) == ref_top1)
            self._dp.append(logq.gather(-1, target)[:, 0].exp() - self.ref["logp_correct"][w].exp())

    def result(self) -> dict:
        kl = torch.cat(self._kl).double().cpu()
        return {"mean": float(kl.mean()), "median": float(kl.median()), "p99": float(torch.quantile(kl, 0.99)),
                "top1": float(torch.cat(self._agree).double().mean()), "dp": float(torch.cat(self._dp).double().mean()),
                "tokens": int(kl.numel()), "reference": self.reference.kind}
