"""Checks made before any expensive work: output paths, free memory, the Hugging Face hub.

Each check raises ``ValueError`` (the command line's exit code 2) with one line that says what is
wrong and what to do instead; none of them creates, writes or deletes anything.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

GIB = 1024**3


def _nearest_existing(path: Path) -> Path:
    """``path`` or the closest of its parents that exists (where a new file or folder would be created)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable(path: Path, flag: str) -> None:
    """A missing ``path`` could be created: its nearest existing parent is a writable folder."""
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, so no file or folder can be created below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {parent} is not writable")


def check_writable_file(path: str | os.PathLike | None, flag: str) -> None:
    """An output file (appended to or created) can be written: not a folder, not read-only."""
    if not path:
        return
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give the path of a file (e.g. {path / 'results.jsonl'})")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ValueError(f"{flag} {path} is not writable")
        return
    _check_creatable(path, flag)


def check_writable_folder(path: str | os.PathLike | None, flag: str) -> None:
    """An output folder (created, or replaced by a rename) can be written: not a file, its parent writable."""
    if not path:
        return
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder")
    # a folder is written beside its target and renamed into place, so the parent must be writable too
    _check_creatable(path, flag)


# ---------------------------------------------------------------- memory


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory(device: str) -> int | None:
    """Free bytes where ``device``'s tensors live: the GPU's (``torch.cuda.mem_get_info``) or the host's
    (psutil if installed, else ``/proc/meminfo`` MemAvailable); None when it cannot be told."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        import psutil
    except ImportError:
        return _meminfo_available()
    return int(psutil.virtual_memory().available)


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


# ---------------------------------------------------------------- the hub


def hub_offline() -> bool:
    """Whether the Hugging Face libraries are told to stay offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds.

    The hub client retries for most of a minute before it gives up; this answers in at most
    ``timeout``. Behind a proxy a direct connection says nothing, so the answer is then yes
    (the client will find out).
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True
