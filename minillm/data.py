"""Datasets: find (or download and checksum) the text, split it 90/10, cut random blocks.

Where the text comes from, first match wins:
  1. an explicit path (`train.py --data PATH`); any UTF-8 text file, no checksum;
  2. `$MINILLM_DATA_DIR/<name>/input.txt`;
  3. the cache, `cache_dir()/<name>/input.txt` (`$MINILLM_CACHE_DIR`, default ~/.cache/minillm);
  4. a download from the dataset's public URL into the cache.
Copies found in 2 and 3, and every download, are checked against the known sha256.

A pretrained checkpoint brings its own (BPE) tokenizer; `cached_token_ids` tokenizes a text with it
once and keeps the ids on disk as a flat array that later runs memory-map instead of re-encoding.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@dataclass(frozen=True)
class RemoteText:
    """A named text dataset: where to fetch it and what it must hash to."""
    url: str
    sha256: str
    size: int  # bytes, for the reader's information


DATASETS: dict[str, RemoteText] = {
    "tinyshakespeare": RemoteText(TINYSHAKESPEARE_URL, TINYSHAKESPEARE_SHA256, 1_115_394),
}


def cache_dir() -> Path:
    """Where downloads go: $MINILLM_CACHE_DIR, else ~/.cache/minillm."""
    env = os.environ.get("MINILLM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "minillm"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: Path, expected: str) -> Path:
    """Return path if its sha256 is `expected`, else raise ValueError naming file and both hashes."""
    found = file_sha256(path)
    if found != expected:
        raise ValueError(f"{path}: sha256 mismatch: expected {expected}, found {found} "
                         "(a corrupt or different file; replace or delete it)")
    return path


def download(url: str, dest: Path, sha256: str | None = None) -> Path:
    """Fetch url to dest atomically (checkpoint.atomic_write): into a temp file beside dest, verified, then renamed.

    A failed or mismatching download leaves dest as it was (absent, or the old file)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(tmp: Path) -> None:
        try:
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=30) as resp:
                shutil.copyfileobj(resp, out, 1 << 20)
        except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
            raise RuntimeError(
                f"download failed: {url} ({e}). Supply the file yourself: pass --data PATH, "
                f"or set MINILLM_DATA_DIR=DIR with DIR/{dest.parent.name}/{dest.name}, "
                f"or put it at {dest}") from e
        if sha256 is not None:
            check_sha256(tmp, sha256)

    return atomic_write(dest, fetch)


def resolve_text_path(data: str | Path | None = None, name: str = "tinyshakespeare") -> Path:
    """The text file to train on: `data` if given, else dataset `name` from the first place that has it."""
    if data is not None:
        path = Path(data).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"dataset file not found: {path}")
        return path
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)}); pass a file path instead")
    remote = DATASETS[name]
    rel = Path(name) / "input.txt"
    env = os.environ.get("MINILLM_DATA_DIR")
    if env and (Path(env).expanduser() / rel).is_file():
        return check_sha256(Path(env).expanduser() / rel, remote.sha256)
    cached = cache_dir() / rel
    if cached.is_file():
        return check_sha256(cached, remote.sha256)
    return download(remote.url, cached, remote.sha256)


def read_text(path: str | Path) -> str:
    """The file's text as UTF-8; a ValueError naming the file if it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e


VAL_FRACTION = 0.1  # the last tenth of a text is validation (as nanoGPT)


def train_val_cut(length: int, val_fraction: float = VAL_FRACTION) -> int:
    """The one train/val cut: items [0, cut) train, [cut, length) validation. The trainer cuts ids with
    it; the evaluation and pruning cut characters with it, so a char model's val ids are the val text."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    return int(length * (1 - val_fraction))


def split_train_val(ids: np.ndarray, val_fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """First (1 - val_fraction) of the ids for training, the rest for validation (train_val_cut)."""
    n = train_val_cut(len(ids), val_fraction)
    if n == 0 or n == len(ids):
        raise ValueError(f"dataset of {len(ids)} tokens is too small to split "
                         f"{1 - val_fraction:.0%}/{val_fraction:.0%} with neither part empty")
    return ids[:n], ids[n:]


def get_batch(data: np.ndarray, block_size: int, batch_size: int, generator: torch.Generator,
              device: str | torch.device = "cpu", rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random contiguous blocks: x = data[i:i+block_size], y = data[i+1:i+1+block_size].

    Returns int64 tensors of shape (batch_size, block_size) on device; with `rows`, only those rows of
    that batch (a data-parallel rank's share: the generator advances as for the whole batch)."""
    if len(data) <= block_size:
        raise ValueError(f"data has {len(data)} tokens, need more than block_size={block_size}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()[rows]
    index = starts[:, None] + np.arange(block_size)  # (batch_size, block_size) positions
    x = torch.from_numpy(np.asarray(data[index], dtype=np.int64))
    y = torch.from_numpy(np.asarray(data[index + 1], dtype=np.int64))
    if torch.device(device).type == "cuda":  # pinned host memory lets the copy overlap compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)



# ----------------------------------------------------------------------------- token-id cache (BPE fine-tuning)

def tokenizer_sha256(tokenizer) -> str:
    """Hex sha256 of the tokenizer's full JSON description: equal hashes mean identical ids for any text."""
    return hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode("utf-8")).hexdigest()


def id_dtype(vocab_size: int) -> type:
    """The narrowest unsigned integer that holds every id 0..vocab_size-1: uint16 (ids up to 65,535,
    so vocab_size up to 65,536), else uint32. The one definition: every cache and memmap of ids uses it."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def cached_token_ids(text_path: str | Path, tokenizer, cache: str | Path | None = None) -> np.ndarray:
    """The text's token ids as a read-only np.memmap, encoded once and then read from disk.

    The cache file is named by the text's sha256 and the tokenizer's sha256 (so editing the text or
    switching tokenizer can never reuse stale ids), and by the dtype (id_dtype of the vocabulary):
        cache/<text sha256[:16]>-<tokenizer sha256[:16]>.<uint16|uint32>.bin     raw little-endian ids
    `cache` defaults to cache_dir()/"tokens". The file is written to a temp name and renamed, so an
    interrupted run never leaves a truncated cache behind."""
    text_path = Path(text_path)
    dtype = np.dtype(id_dtype(tokenizer.vocab_size)).newbyteorder("<")
    folder = Path(cache) if cache is not None else cache_dir() / "tokens"
    path = folder / f"{file_sha256(text_path)[:16]}-{tokenizer_sha256(tokenizer)[:16]}.{dtype.name}.bin"
    if not path.is_file():
        ids = np.asarray(tokenizer.encode(read_text(text_path)), dtype=dtype)
        if len(ids) == 0:
            raise ValueError(f"{text_path}: the text encodes to no tokens; nothing to train on")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, ids.tofile)
    return np.memmap(path, dtype=dtype, mode="r")
