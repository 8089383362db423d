"""Evaluation and calibration text, from local copies or the Hugging Face hub.

Local copies follow the layout of ``shared/data`` (see its README): pass the
folder with ``--data-dir`` or the ``PTQLAB_DATA`` environment variable.
Without one, the same splits are loaded through ``datasets``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

EVAL_DATASETS = ("wikitext2", "ptb", "c4", "heldout")

# dataset -> (local file of the evaluation split, local file of the calibration split)
_LOCAL_FILES = {
    "wikitext2": ("wikitext2/wiki.test.raw", "wikitext2/wiki.train.raw"),
    "ptb": ("ptb/ptb.test.txt", "ptb/ptb.train.txt"),
    "c4": ("c4/c4-validation.00000-of-00008.json.gz", "c4/c4-train.00000-of-01024.json.gz"),
}


# Which tokens the evaluation stream holds; recorded in every record. The GPTQ reference code
# tokenizes each joined split with the tokenizer's defaults, so OPT's leading </s> is part of the stream.
TOKENIZATION = "tokenizer defaults (special tokens added, as in the GPTQ reference code)"


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Text:
    """A split as the GPTQ protocol joins it, and where it came from."""

    name: str
    text: str | list[str]  # c4 keeps its documents separate: windows are drawn per document
    source: str


def data_dir(explicit: str | Path | None = None) -> Path | None:
    value = explicit or os.environ.get("PTQLAB_DATA")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {path} (from --data-dir or PTQLAB_DATA) does not exist")
    return path


def _how_to_provide(name: str, filename: str) -> str:
    return (
        f"dataset '{name}' is not available: give a local copy with --data-dir DIR or PTQLAB_DATA=DIR "
        f"(expected file DIR/{filename}, layout of shared/data/README.md), or install `datasets` "
        f"with access to the Hugging Face hub"
    )


_ROLES = {"eval": "evaluation text", "calib": "calibration text"}


def read_text_file(path: Path, split: str = "eval") -> str:
    """A text file's content, with errors that name the file and its role: not UTF-8 (where, and how to
    fix it), or empty."""
    role = _ROLES[split]
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{role} {path} is not UTF-8: byte 0x{data[err.start]:02x} at offset {err.start} "
                        f"({err.reason}); re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > "
                        f"{path.stem}.utf8{path.suffix}") from None
    if not text.strip():
        raise DataError(f"{role} {path} is empty" + (" (only whitespace)" if text else ""))
    # the newlines Path.read_text gave before (universal newlines), so that the token streams do not change
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_local(name: str, path: Path, split: str) -> Text:
    if name == "wikitext2":
        rows = read_text_file(path, split).replace("\r", "").split("\n")
        if rows and rows[-1] == "":
            rows.pop()
        return Text(name, "\n\n".join(rows), f"local:{path}")
    if name == "ptb":
        rows = read_text_file(path, split).splitlines()
        return Text(name, " ".join(r.strip() for r in rows), f"local:{path}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    return Text(name, docs, f"local:{path}")


def _read_hub(name: str, split: str) -> Text:
    from datasets import load_dataset  # imported lazily: only needed without local copies

    if name == "wikitext2":
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        return Text(name, "\n\n".join(ds["text"]), f"hub:wikitext/wikitext-2-raw-v1[{split}]")
    if name == "ptb":
        ds = load_dataset("ptb_text_only", "penn_treebank", split=split)
        return Text(name, " ".join(ds["sentence"]), f"hub:ptb_text_only[{split}]")
    shard = "en/c4-validation.00000-of-00008.json.gz" if split == "validation" else "en/c4-train.00000-of-01024.json.gz"
    ds = load_dataset("allenai/c4", data_files={split: shard}, split=split)
    return Text(name, list(ds["text"]), f"hub:allenai/c4/{shard}")


def _shipped_text(name: str) -> Path | None:
    """``heldout`` and ``testbed`` (calibration) are texts shipped with the testbed models."""
    from .testbed import CALIBRATION_TEXT, HELDOUT_TEXT

    return {"heldout": HELDOUT_TEXT, "testbed": CALIBRATION_TEXT}.get(name)


def _text_file(name: str) -> Path | None:
    """The plain-text file ``name`` stands for (a shipped text or a path), or None for a named dataset."""
    shipped = _shipped_text(name)
    if shipped is not None:
        return shipped
    if name in _LOCAL_FILES:
        return None
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.suffix or os.sep in name:
        raise DataError(f"text file {path} does not exist")
    raise DataError(f"unknown dataset '{name}'; choose from {', '.join(EVAL_DATASETS)} or give a text file path")


def _local_copy(name: str, split: str, data: str | Path | None) -> Path | None:
    root = data_dir(data)
    if root is None:
        return None
    path = root / _LOCAL_FILES[name][0 if split == "eval" else 1]
    return path if path.exists() else None


def load_text(name: str, split: str = "eval", data: str | Path | None = None) -> Text:
    """Load the evaluation (``split='eval'``) or calibration (``'calib'``) text of a named dataset.

    ``name`` may also be ``heldout`` (the testbed models' held-out text, shipped with
    ptqlab), ``testbed`` (their calibration text) or the path of a plain-text file,
    which is used as it is.
    """
    path = _text_file(name)
    if path is not None:
        label = name if _shipped_text(name) else path.stem
        return Text(label, read_text_file(path, split), f"file:{path}")
    local_rel = _LOCAL_FILES[name][0 if split == "eval" else 1]
    path = _local_copy(name, split, data)
    if path is not None:
        return _read_local(name, path, split)
    hub_split = {"eval": "validation" if name == "c4" else "test", "calib": "train"}[split]
    try:
        return _read_hub(name, hub_split)
    except Exception as err:  # no datasets package, no network, no such dataset
        raise DataError(_how_to_provide(name, local_rel) + f" (hub attempt failed: {type(err).__name__}: {err})") from err


def check_available(name: str, split: str = "eval", data: str | Path | None = None) -> None:
    """Fail now, with what :func:`load_text` would say, when ``name`` cannot be loaded; cheap (no download).

    A text file must be readable UTF-8 and not empty; a named dataset needs its local copy, or else
    the ``datasets`` package and a reachable (or offline-cached) Hugging Face hub.
    """
    import importlib.util

    from .preflight import hub_offline, hub_reachable

    path = _text_file(name)
    if path is not None:
        read_text_file(path, split)
        return
    if _local_copy(name, split, data) is not None:
        return
    if importlib.util.find_spec("datasets") is None:
        why = "the datasets package is not installed"
    elif hub_offline():
        if _in_hf_cache(name):
            return  # the offline cache may have it: load_text finds out
        why = "the Hugging Face hub is offline (HF_HUB_OFFLINE) and its caches hold no copy"
    elif not hub_reachable():
        why = "the Hugging Face hub cannot be reached"
    else:
        return  # the hub may have it: load_text finds out
    raise DataError(_how_to_provide(name, _LOCAL_FILES[name][0 if split == "eval" else 1]) + f" ({why})")


_HUB_IDS = {"wikitext2": ("Salesforce/wikitext", "wikitext"), "ptb": ("ptb_text_only",), "c4": ("allenai/c4",)}


def _in_hf_cache(name: str) -> bool:
    """Whether the Hugging Face hub or datasets cache holds anything of dataset ``name`` (cheap: folder names)."""
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE)
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    for repo in _HUB_IDS.get(name, ()):
        if (hub / f"datasets--{repo.replace('/', '--')}").is_dir():
            return True
        if datasets_cache.is_dir() and any(datasets_cache.glob(f"*{repo.rsplit('/', 1)[-1]}*")):
            return True
    return False


_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """The full sha256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    """A short content fingerprint, cached per (path, size, mtime) for the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = sha256_file(path)[:16]
    return _FINGERPRINTS[key]


def data_fingerprint(name: str, split: str = "eval", data: str | Path | None = None) -> str:
    """A content hash of the text a dataset name resolves to (the study keys its runs with it).

    Local copies and text files are hashed (cached by path, size and mtime), so
    regenerated or edited data gives new keys instead of reusing stale results;
    a hub dataset is named by its hub id, which pins its content.
    """
    path = _text_file(name)
    if path is None:
        path = _local_copy(name, split, data)
    if path is None:
        return f"hub:{name}:{split}"
    return f"sha256:{_file_sha256(path)}"


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D tensor, with the tokenizer's default special tokens (:data:`TOKENIZATION`)."""
    # verbose=False: a whole split is longer than the model's window on purpose; it is cut into windows later
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids.reshape(-1)


def eval_tokens(tokenizer, text: Text, seqlen: int, c4_segments: int = 256) -> torch.Tensor:
    """The token stream that perplexity is computed on (GPTQ protocol)."""
    if isinstance(text.text, str):
        return tokenize(tokenizer, text.text)
    # GPTQ's c4 eval: 256 random seqlen-token segments of validation documents, seed 0.
    rng = random.Random(0)
    segments = []
    docs = text.text
    for _ in range(c4_segments):
        for _attempt in range(10_000):
            ids = tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)])
            if ids.numel() > seqlen:
                break
        else:
            raise DataError(f"{text.name}: no document longer than {seqlen} tokens")
        start = rng.randint(0, ids.numel() - seqlen - 1)
        segments.append(ids[start : start + seqlen])
    return torch.cat(segments)


def calibration_windows(
    tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0, data: str | Path | None = None
) -> tuple[torch.Tensor, str]:
    """``nsamples`` random windows of ``seqlen`` tokens from a training split or a text file.

    Returns ``(windows [nsamples, seqlen], description of the source)``.
    """
    if nsamples < 1:
        raise DataError(f"nsamples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}")
    text = load_text(source, "calib", data)
    rng = random.Random(seed)
    if isinstance(text.text, list):  # c4: one window from each random document, as GPTQ does
        windows = []
        misses = 0
        while len(windows) < nsamples:
            ids = tokenize(tokenizer, text.text[rng.randint(0, len(text.text) - 1)])
            if ids.numel() > seqlen:
                start = rng.randint(0, ids.numel() - seqlen - 1)
                windows.append(ids[start : start + seqlen])
            else:
                misses += 1
                if misses > 10_000 and misses > 100 * len(windows):  # else it would loop forever
                    raise DataError(f"calibration text {text.source}: almost no document is longer than {seqlen} "
                                    f"tokens; give a shorter --calib-seqlen")
        return torch.stack(windows), text.source
    ids = tokenize(tokenizer, text.text)
    n = ids.numel()
    if n <= seqlen:
        raise DataError(f"calibration text {text.source} has {n} tokens, too few for one window of {seqlen} "
                        f"tokens (that needs at least {seqlen + 1}): give a longer text or a shorter --calib-seqlen")
    # Windows are drawn at random starts and may overlap; but more windows than the text holds side by side
    # only repeat its tokens (each drawn nsamples * seqlen / n times on average), which adds memory and
    # time, not calibration data. GPTQ's 128 x 2048 from WikiText-2's 2.4M tokens is far below this.
    holds = n // seqlen
    if nsamples > holds:
        raise DataError(f"calibration text {text.source} has {n} tokens: {holds} windows of {seqlen} tokens "
                        f"without overlap, and --nsamples {nsamples} would draw each token about "
                        f"{nsamples * seqlen / n:.1f} times; pass --nsamples {holds} or fewer, a shorter "
                        f"--calib-seqlen, or a longer calibration text")
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts]), text.source
