"""The trained testbed models of ptqlab (see MODEL_CARD.md).

Three architectures (OPT, BLOOM and Llama: RMSNorm, SwiGLU, rotary positions, grouped-query attention),
each a family of sizes trained on the same Debian-documentation corpus with the same tokenizer.
``testbed-opt`` / ``testbed-bloom`` / ``testbed-llama`` (~7M parameters) and the ~2M members ship in this
package; the larger members are rebuilt on a GPU by one command
(``python scripts/testbed/train_family.py --sizes 25m,60m``) into a cache folder,
``$PTQLAB_TESTBED_CACHE/<arch>-<size>`` (default ``~/.cache/ptqlab/testbed``), where
:func:`resolve_model_path` finds them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TESTBED_DIR = Path(__file__).resolve().parent
CALIBRATION_TEXT = TESTBED_DIR / "calibration.txt"  # training-corpus text: the testbed's calibration set
HELDOUT_TEXT = TESTBED_DIR / "heldout.txt"  # held-out corpus text: the testbed's in-domain evaluation set
BUILD_COMMAND = "python scripts/testbed/train_family.py --arch {arch} --sizes {size}"


@dataclass(frozen=True)
class FamilyMember:
    """One size of the testbed family: its architecture, shape and training settings."""

    arch: str  # "opt" | "bloom" | "llama"
    size: str  # "2m", "7m", ...
    hidden: int
    layers: int
    heads: int
    params: int  # unique parameters (tied embedding counted once)
    shipped: bool  # in this package (else built into the cache)
    lr: float = 2e-3
    # seconds of training (train_family.py) on one GPU to itself, compiled; 0 = the shipped ~7M recipe.
    # The ~2M members' 25 s were spent with two trainings sharing one H100 (scripts/testbed/README.md).
    time_budget_s: float = 0.0
    # residual dropout in training: the ~60M members overfit the 19.4M-token corpus without it (MODEL_CARD.md)
    dropout: float = 0.0
    folder: str = ""  # package folder of a shipped member (default "<arch>-<size>")
    kv_heads: int = 0  # key/value heads (grouped-query attention; 0 = one per query head)
    intermediate: int = 0  # MLP width (0 = 4 x hidden); Llama's SwiGLU has three matrices, so ~8/3 x hidden

    @property
    def name(self) -> str:
        return f"testbed-{self.arch}" if self.size == "7m" else f"testbed-{self.arch}-{self.size}"

    @property
    def ffn(self) -> int:
        return self.intermediate or 4 * self.hidden

    @property
    def key_value_heads(self) -> int:
        return self.kv_heads or self.heads

    def path(self) -> Path:
        """The package folder of a shipped member, else (or when a shipped ~2M member was left out of
        the package) its folder in the cache."""
        cached = cache_dir() / f"{self.arch}-{self.size}"
        if self.shipped:
            packaged = TESTBED_DIR / (self.folder or f"{self.arch}-{self.size}")
            if (packaged / "config.json").exists() or self.size == "7m" or not (cached / "config.json").exists():
                return packaged
        return cached


def _members() -> dict[str, FamilyMember]:
    # params: exact unique counts of the built models (OPT has a position table of 514 rows, BLOOM none)
    specs = [
        # size, hidden, layers, heads, opt params, bloom params, shipped, lr, budget, dropout
        ("2m", 128, 4, 4, 1_907_712, 1_842_176, True, 3e-3, 25.0, 0.0),
        ("7m", 256, 6, 8, 6_967_808, 6_836_736, True, 2e-3, 0.0, 0.0),
        ("25m", 512, 7, 8, 26_525_184, 26_263_040, False, 1.5e-3, 130.0, 0.0),
        ("60m", 768, 8, 12, 63_390_720, 62_997_504, False, 1e-3, 240.0, 0.1),
    ]
    # Llama: the same hidden x layers x heads and peak LR; grouped-query attention (fewer KV heads than query
    # heads) and a SwiGLU width near 8/3 x hidden, a multiple of 128 (groups of 128 on down_proj's input), so
    # the parameter counts match the other two families'. Every size trains alone on the family corpus
    # (train_family.py; the ~7M member for 100 s, as the other ~7M members were not trained on this corpus).
    # Llama learns faster per token than OPT/BLOOM here, so it starts to overfit at ~25M already: residual
    # dropout 0.1 at 25M, 0.2 at 60M (at 0.1 it still overfit and ended above the 25M member; MODEL_CARD.md).
    llama = {
        # size: kv heads, intermediate, params, budget, dropout
        "2m": (2, 384, 1_836_160, 25.0, 0.0),
        "7m": (4, 768, 6_819_072, 100.0, 0.0),
        "25m": (4, 1536, 26_222_080, 130.0, 0.1),  # without dropout it overfit: best at step 1,800 of 2,929
        "60m": (4, 2304, 61_354_752, 240.0, 0.2),  # at 0.1: train 2.34, held-out 3.20
    }
    out: dict[str, FamilyMember] = {}
    for arch in ARCHS:
        for size, hidden, layers, heads, p_opt, p_bloom, shipped, lr, budget, dropout in specs:
            if arch == "llama":
                kv, inter, params, budget, dropout = llama[size]
                m = FamilyMember(arch, size, hidden, layers, heads, params, shipped, lr, budget, dropout,
                                 folder="llama" if size == "7m" else "", kv_heads=kv, intermediate=inter)
            else:
                m = FamilyMember(arch, size, hidden, layers, heads, p_opt if arch == "opt" else p_bloom, shipped,
                                 lr, budget, dropout, folder=arch if size == "7m" else "")
            out[m.name] = m
    return out


ARCHS = ("opt", "bloom", "llama")
FAMILY: dict[str, FamilyMember] = _members()
ALIASES = {f"testbed-{a}-7m": f"testbed-{a}" for a in ARCHS}
# the members shipped in this package (their package folders)
TESTBED_MODELS = {name: TESTBED_DIR / (m.folder or f"{m.arch}-{m.size}") for name, m in FAMILY.items() if m.shipped}


def cache_dir() -> Path:
    """Where the larger family members are built: ``$PTQLAB_TESTBED_CACHE`` or ``~/.cache/ptqlab/testbed``."""
    env = os.environ.get("PTQLAB_TESTBED_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ptqlab" / "testbed"


def family_member(name: str) -> FamilyMember | None:
    """The family member called ``name`` (``testbed-opt-7m`` is ``testbed-opt``), or None."""
    return FAMILY.get(ALIASES.get(name, name))


def is_testbed_model(name: str) -> bool:
    """True for every member of the testbed family (all are trained on the corpus of ``heldout.txt``)."""
    return family_member(name) is not None


def resolve_model_path(name: str) -> str:
    """Map a testbed family name to its folder; anything else is returned as given."""
    member = family_member(name)
    if member is None:
        return name
    path = member.path()
    if not (path / "config.json").exists():
        if member.shipped:
            raise FileNotFoundError(f"the shipped testbed model '{name}' is missing at {path}")
        raise FileNotFoundError(
            f"testbed model '{name}' has not been built: expected it at {path} "
            f"(set PTQLAB_TESTBED_CACHE to change the folder). Build it on a GPU (minutes) with\n"
            f"  {BUILD_COMMAND.format(arch=member.arch, size=member.size)}\n"
            "after building the family's token files (scripts/testbed/README.md, 'The testbed family').")
    return str(path)
