"""Dataset lookup order, checksums, atomic download (simulated: no network in tests), splits, batches."""

import io
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from minillm import data


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Empty data dir and cache; the real file's bytes at hand."""
    monkeypatch.setenv("MINILLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MINILLM_DATA_DIR", str(tmp_path / "datadir"))
    return tmp_path


@pytest.fixture(scope="module")
def real_bytes(data_dir):
    return (data_dir / "tinyshakespeare" / "input.txt").read_bytes()


def serve(monkeypatch, payload):
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        if isinstance(payload, Exception):
            raise payload
        return io.BytesIO(payload)
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return calls


def test_explicit_path_wins(env, tmp_path):
    mine = tmp_path / "mine.txt"
    mine.write_text("hello")
    assert data.resolve_text_path(str(mine)) == mine
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.resolve_text_path(str(tmp_path / "nope.txt"))


def test_env_dir_then_cache_then_download(env, monkeypatch, real_bytes):
    calls = serve(monkeypatch, real_bytes)
    got = data.resolve_text_path()  # nothing local: downloads into the cache
    assert got == env / "cache" / "tinyshakespeare" / "input.txt" and got.read_bytes() == real_bytes
    assert calls == [data.TINYSHAKESPEARE_URL]
    assert data.resolve_text_path() == got and len(calls) == 1  # second time: the cache, no download
    local = env / "datadir" / "tinyshakespeare" / "input.txt"
    local.parent.mkdir(parents=True)
    local.write_bytes(real_bytes)
    assert data.resolve_text_path() == local  # MINILLM_DATA_DIR comes before the cache


def test_offline_error_says_how_to_supply_the_file(env, monkeypatch):
    serve(monkeypatch, urllib.error.URLError("no network"))
    with pytest.raises(RuntimeError, match=r"could not download .*--data PATH.*MINILLM_DATA_DIR"):
        data.resolve_text_path()
    assert not (env / "cache" / "tinyshakespeare").exists() or not any((env / "cache" / "tinyshakespeare").iterdir())


def test_download_with_wrong_hash_leaves_nothing(env, monkeypatch):
    serve(monkeypatch, b"not shakespeare")
    with pytest.raises(ValueError, match="does not match the expected 86c4e6aa"):
        data.resolve_text_path()
    folder = env / "cache" / "tinyshakespeare"
    assert list(folder.iterdir()) == []


def test_corrupt_local_copy_is_an_error(env, real_bytes):
    local = env / "datadir" / "tinyshakespeare" / "input.txt"
    local.parent.mkdir(parents=True)
    local.write_bytes(real_bytes[:-1])
    with pytest.raises(ValueError, match=f"{local}: sha256 .* does not match"):
        data.resolve_text_path()


def test_split_sizes_like_nanogpt(shakespeare_text):
    ids = np.frombuffer(shakespeare_text.encode("utf-8"), dtype=np.uint8)  # ASCII: one byte per char
    train, val = data.split_train_val(ids)
    assert (len(train), len(val)) == (1_003_854, 111_540)
    with pytest.raises(ValueError, match="too small"):
        data.split_train_val(np.arange(1))


def test_get_batch_blocks_are_shifted_contiguous_slices():
    ids = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(ids, 16, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(x[:, 1:] - x[:, :-1], torch.ones(8, 15, dtype=torch.long))
    x2, _ = data.get_batch(ids, 16, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="has 16 tokens, need more than block_size=16"):
        data.get_batch(ids[:16], 16, 2, torch.Generator())


def test_non_utf8_text_named(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        data.read_text(bad)
