"""What to do to a model: one frozen config per quantization run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from .quantizers import QuantizationError, QuantSpec

METHODS = ("fp16", "rtn", "gptq", "zq-local", "zq-global")


@dataclass(frozen=True)
class GPTQOptions:
    blocksize: int = 128
    percdamp: float = 0.01  # the GPTQ paper's 1% of the mean Hessian diagonal
    act_order: bool = False


@dataclass(frozen=True)
class ZQOptions:
    local_steps: int = 100  # measured: 100 and 300 steps tie on the testbed (bench/README.md)
    local_lr: float = 1e-3  # relative to each weight's RMS
    global_steps: int = 100  # measured on both testbed models: the best worst case (bench/README.md)
    global_lr: float = 1e-3
    global_batch_size: int = 8


@dataclass(frozen=True)
class QuantConfig:
    """A weight method, a weight spec, an activation spec and LoRC: the whole recipe for one run."""

    method: str = "rtn"
    weight: QuantSpec = field(default_factory=QuantSpec)
    act: QuantSpec = field(default_factory=QuantSpec)
    lorc_rank: int = 0
    lorc_bits: int = 8
    lorc_aware: bool = False  # beyond the paper: SVD of the error scaled by the input statistics
    quantize_head: bool = False
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    zq: ZQOptions = field(default_factory=ZQOptions)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(f"unknown method '{self.method}'; choose from {', '.join(METHODS)}")
        if self.method == "fp16" and (self.weight.enabled or self.act.enabled or self.lorc_rank):
            raise QuantizationError(
                "method 'fp16' leaves the model unquantized: use --method rtn for W16A8 and the like"
            )
        if self.method in ("gptq", "zq-local", "zq-global") and not self.weight.enabled:
            raise QuantizationError(f"method '{self.method}' quantizes weights: give --wbits between 2 and 8")
        if self.lorc_rank < 0:
            raise QuantizationError(f"lorc_rank must be >= 0, got {self.lorc_rank}")
        if self.lorc_rank and not self.weight.enabled:
            raise QuantizationError("LoRC compensates the weight quantization error: it needs --wbits below 16")
        if not (2 <= self.lorc_bits <= 8 or self.lorc_bits == 16):
            raise QuantizationError(f"lorc_bits must be in 2..8 or 16, got {self.lorc_bits}")

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "zq-local", "zq-global") or (self.lorc_rank > 0 and self.lorc_aware)

    @property
    def lorc_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.lorc_bits, symmetric=True)

    def to_dict(self) -> dict:
        return asdict(self)

    def name(self) -> str:
        parts = [self.method, f"W{self.weight.bits}A{self.act.bits}"]
        if self.weight.enabled:
            parts.append(self.weight.describe())
        if self.act.enabled:
            parts.append("act-" + self.act.describe())
        if self.method == "gptq" and self.gptq.act_order:
            parts.append("act-order")
        if self.lorc_rank:
            parts.append(f"lorc{self.lorc_rank}" + ("-aware" if self.lorc_aware else ""))
        return " ".join(parts)


def config_hash(record_config: dict) -> str:
    """Stable short hash of everything that affects a result."""
    blob = json.dumps(record_config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
