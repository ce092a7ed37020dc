"""Datasets: find (or download and checksum) the text, split it 90/10, cut random blocks.

Lookup order for tinyshakespeare: an explicit `--data PATH`, then
`$MINILLM_DATA_DIR/tinyshakespeare/input.txt`, then the cache (`$MINILLM_CACHE_DIR`, default
~/.cache/minillm), then a download into the cache. Any other text file works via `--data`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_REL = Path("tinyshakespeare") / "input.txt"


def cache_dir() -> Path:
    return Path(os.environ.get("MINILLM_CACHE_DIR", Path.home() / ".cache" / "minillm"))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, expected: str) -> Path:
    found = file_sha256(path)
    if found != expected:
        raise ValueError(f"{path}: sha256 {found} does not match the expected {expected} (corrupt or different file)")
    return path


def download(url: str, dest: Path, sha256: str | None = None) -> Path:
    """Fetch url to dest atomically: a temp file in dest's directory, verified, then renamed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        if sha256 is not None:
            check_sha256(Path(tmp), sha256)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download {url} ({e}). Supply the file yourself: pass --data PATH, or set "
            f"MINILLM_DATA_DIR=DIR with DIR/{TINYSHAKESPEARE_REL}, or place it at {dest}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def resolve_text_path(data: str | None = None) -> Path:
    """The text file to train on: `data` if given, else tinyshakespeare from the first place that has it."""
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {path}")
        return path
    env = os.environ.get("MINILLM_DATA_DIR")
    if env and (Path(env) / TINYSHAKESPEARE_REL).is_file():
        return check_sha256(Path(env) / TINYSHAKESPEARE_REL, TINYSHAKESPEARE_SHA256)
    cached = cache_dir() / TINYSHAKESPEARE_REL
    if cached.is_file():
        return check_sha256(cached, TINYSHAKESPEARE_SHA256)
    return download(TINYSHAKESPEARE_URL, cached, TINYSHAKESPEARE_SHA256)


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e


def split_train_val(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """First 90% for training, last 10% for validation (as nanoGPT's prepare scripts)."""
    n = int(len(ids) * (1 - val_fraction))
    if n == len(ids) or n == 0:
        raise ValueError(f"dataset of {len(ids)} tokens is too small to split {1 - val_fraction:.0%}/{val_fraction:.0%}")
    return ids[:n], ids[n:]


def get_batch(ids: np.ndarray, block_size: int, batch_size: int, generator: torch.Generator,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random contiguous blocks: x = ids[i:i+block], y = ids[i+1:i+1+block] (int64)."""
    if len(ids) <= block_size:
        raise ValueError(f"data split has {len(ids)} tokens, need more than block_size={block_size}")
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([ids[i:i + block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([ids[i + 1:i + 1 + block_size] for i in starts]).astype(np.int64))
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
