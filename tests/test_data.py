"""Dataset lookup order, checksums, atomic download (simulated: no network in tests), splits, batches."""

from __future__ import annotations

import hashlib
import io
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from minillm import data

REL = Path("tinyshakespeare") / "input.txt"


@pytest.fixture(scope="session")
def real_bytes(data_dir: Path) -> bytes:
    return (data_dir / REL).read_bytes()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty data dir and cache under tmp_path; any network access fails the test."""
    monkeypatch.setenv("MINILLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MINILLM_DATA_DIR", str(tmp_path / "datadir"))
    serve(monkeypatch, AssertionError("this test must not download"))
    return tmp_path


def serve(monkeypatch: pytest.MonkeyPatch, payload: bytes | BaseException) -> list[str]:
    """Replace urlopen: return `payload` as the response body, or raise it. Returns the URLs asked for."""
    calls: list[str] = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        if isinstance(payload, BaseException):
            raise payload
        return io.BytesIO(payload)
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return calls


def put(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_cache_dir_from_env_or_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE_DIR", str(tmp_path / "c"))
    assert data.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MINILLM_CACHE_DIR")
    assert data.cache_dir() == Path.home() / ".cache" / "minillm"


def test_file_sha256(tmp_path, real_bytes):
    assert data.file_sha256(put(tmp_path / "abc", b"abc")) == hashlib.sha256(b"abc").hexdigest()
    assert data.file_sha256(put(tmp_path / "ts.txt", real_bytes)) == data.TINYSHAKESPEARE_SHA256
    assert len(real_bytes) == data.DATASETS["tinyshakespeare"].size


def test_explicit_path_wins(env, real_bytes):
    put(env / "datadir" / REL, real_bytes)
    put(env / "cache" / REL, real_bytes)
    mine = put(env / "mine.txt", b"any text, no checksum")
    assert data.resolve_text_path(str(mine)) == mine
    with pytest.raises(FileNotFoundError, match="nope.txt"):  # no fallback to the copies above
        data.resolve_text_path(str(env / "nope.txt"))


def test_env_dir_before_cache(env, real_bytes):
    local = put(env / "datadir" / REL, real_bytes)
    put(env / "cache" / REL, real_bytes)
    assert data.resolve_text_path() == local


@pytest.mark.parametrize("data_dir_set", [True, False])
def test_cache_when_env_dir_lacks_the_file(env, monkeypatch, real_bytes, data_dir_set):
    if not data_dir_set:
        monkeypatch.delenv("MINILLM_DATA_DIR")
    cached = put(env / "cache" / REL, real_bytes)
    assert data.resolve_text_path() == cached


def test_download_into_cache_when_nothing_local(env, monkeypatch, real_bytes):
    calls = serve(monkeypatch, real_bytes)
    got = data.resolve_text_path()
    assert got == env / "cache" / REL and got.read_bytes() == real_bytes
    assert calls == [data.TINYSHAKESPEARE_URL]
    assert list(got.parent.iterdir()) == [got]  # no temp file left behind
    assert data.resolve_text_path() == got and len(calls) == 1  # second time: the cache, no download


def test_offline_error_says_how_to_supply_the_file(env, monkeypatch):
    serve(monkeypatch, urllib.error.URLError("no network"))
    with pytest.raises(RuntimeError) as info:
        data.resolve_text_path()
    msg = str(info.value)
    assert "download failed" in msg and "--data PATH" in msg and "MINILLM_DATA_DIR" in msg
    assert str(REL) in msg and str(env / "cache" / REL) in msg
    folder = env / "cache" / "tinyshakespeare"
    assert not folder.exists() or list(folder.iterdir()) == []


@pytest.mark.parametrize("where", ["datadir", "cache"])
def test_corrupt_local_copy_is_an_error(env, real_bytes, where):
    local = put(env / where / REL, real_bytes[:-1])
    found = hashlib.sha256(real_bytes[:-1]).hexdigest()
    with pytest.raises(ValueError, match=rf"{local}: sha256 mismatch: expected {data.TINYSHAKESPEARE_SHA256}, "
                                         rf"found {found}"):
        data.resolve_text_path()


def test_download_with_wrong_hash_leaves_nothing(tmp_path, monkeypatch):
    serve(monkeypatch, b"not shakespeare")
    dest = tmp_path / "dl" / "input.txt"
    with pytest.raises(ValueError, match="sha256 mismatch"):
        data.download("https://example.invalid/x.txt", dest, sha256="0" * 64)
    assert list(dest.parent.iterdir()) == []
    put(dest, b"old")  # an existing file survives a bad download untouched
    with pytest.raises(ValueError, match="sha256 mismatch"):
        data.download("https://example.invalid/x.txt", dest, sha256="0" * 64)
    assert list(dest.parent.iterdir()) == [dest] and dest.read_bytes() == b"old"


def test_download_without_hash(tmp_path, monkeypatch):
    serve(monkeypatch, b"hello")
    dest = tmp_path / "dl" / "hello.txt"
    assert data.download("https://example.invalid/hello.txt", dest) == dest and dest.read_bytes() == b"hello"


def test_unknown_dataset_name(env):
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        data.resolve_text_path(name="nope")


def test_read_text(tmp_path):
    assert data.read_text(put(tmp_path / "ok.txt", "café ☕".encode())) == "café ☕"
    bad = put(tmp_path / "latin1.txt", "café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        data.read_text(bad)


def test_split_sizes_like_nanogpt(shakespeare_text):
    ids = np.frombuffer(shakespeare_text.encode("utf-32-le"), dtype=np.uint32)  # one id per character
    train, val = data.split_train_val(ids)
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert np.array_equal(np.concatenate([train, val]), ids)  # train first, val is the tail


def test_split_refuses_an_empty_part():
    train, val = data.split_train_val(np.arange(2))
    assert (len(train), len(val)) == (1, 1)
    for n in (0, 1):  # int(n * 0.9) == 0: nothing to train on
        with pytest.raises(ValueError, match="too small"):
            data.split_train_val(np.arange(n))
    with pytest.raises(ValueError, match="too small"):  # 1 - 1e-17 rounds to 1.0: val would be empty
        data.split_train_val(np.arange(10), val_fraction=1e-17)
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_train_val(np.arange(10), val_fraction=0.0)


def test_get_batch_blocks_are_shifted_contiguous_slices():
    ids = np.random.default_rng(0).permutation(1000).astype(np.uint16)  # distinct values
    x, y = data.get_batch(ids, 16, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    starts = torch.randint(1000 - 16, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    for row_x, row_y, i in zip(x, y, starts):
        assert row_x.tolist() == ids[i:i + 16].tolist()
        assert row_y.tolist() == ids[i + 1:i + 17].tolist()
    assert torch.equal(y[:, :-1], x[:, 1:])


def test_get_batch_same_seed_same_batch():
    ids = np.arange(10_000, dtype=np.int64)
    a = data.get_batch(ids, 8, 4, torch.Generator().manual_seed(7))
    b = data.get_batch(ids, 8, 4, torch.Generator().manual_seed(7))
    c = data.get_batch(ids, 8, 4, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_get_batch_data_too_short():
    ids = np.arange(17)
    x, y = data.get_batch(ids, 16, 2, torch.Generator())  # 17 tokens: exactly one block fits
    assert x[0].tolist() == list(range(16)) and y[0].tolist() == list(range(1, 17))
    with pytest.raises(ValueError, match="data has 16 tokens, need more than block_size=16"):
        data.get_batch(ids[:16], 16, 2, torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_get_batch_on_cuda():
    ids = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(ids, 16, 4, torch.Generator().manual_seed(0), "cuda")
    assert x.is_cuda and y.is_cuda and x.dtype == torch.int64
    torch.cuda.synchronize()
    assert torch.equal(y[:, :-1].cpu(), x[:, 1:].cpu())


def test_token_cache_keeps_the_largest_uint16_id(tmp_path):
    """id_dtype: a vocabulary of 65,536 ids (0..65535) is stored as uint16, one more id needs uint32;
    the cached ids read back exactly either way."""
    class Ids:  # a stand-in tokenizer: every text encodes to the first and the last id
        def __init__(self, vocab_size):
            self.vocab_size = vocab_size

        def encode(self, text):
            return [0, self.vocab_size - 1]

        def to_dict(self):
            return {"kind": "test", "vocab_size": self.vocab_size}

    text = tmp_path / "t.txt"
    text.write_text("x")
    for vocab_size, dtype in ((2**16, np.uint16), (2**16 + 1, np.uint32)):
        ids = data.cached_token_ids(text, Ids(vocab_size), cache=tmp_path / "cache")
        assert ids.dtype == dtype and ids.tolist() == [0, vocab_size - 1]
