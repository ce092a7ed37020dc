"""Fine-tuning a checkpoint (issue 7): the BPE token-id cache, --init-from (step 0 = the checkpoint's
own loss), and flag combinations that are refused."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train as train_cli
from minillm import data
from minillm.checkpoint import load_model, save_model
from minillm.tokenizer import GPT2_EOT, GPT2_PAT, BPETokenizer, CharTokenizer
from minillm.train_config import TrainConfig
from minillm.train_setup import train
from tiny import tiny_model


def quiet(*a):
    pass


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bpe(gpt2_ranks_512):
    """A real byte-level BPE, small: GPT-2's first 512 ranks, plus its end-of-text token."""
    return BPETokenizer("gpt2-512", GPT2_PAT, gpt2_ranks_512, {GPT2_EOT: 512}, eos_tokens=[GPT2_EOT])


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, shakespeare_text):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(shakespeare_text[:20_000])
    return path


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def base_ckpt(request, tmp_path_factory, bpe):
    """A tiny random model of either family with the BPE tokenizer, saved as a checkpoint."""
    model = tiny_model(request.param, vocab_size=bpe.vocab_size, block_size=64)
    path = tmp_path_factory.mktemp("base") / f"base-{request.param}.safetensors"
    save_model(path, model, bpe, {"source": "test"})
    return path


def finetune(tmp_path, text, init, **kw):
    base = dict(name="ft", out_dir=str(tmp_path), data=str(text), init_from=str(init), seq_len=24, batch_size=4,
                max_iters=0, eval_interval=10, eval_iters=3, warmup_iters=0, lr=1e-3, min_lr=1e-3,
                plot=False)
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- token-id cache

def test_cached_ids_equal_direct_encoding_and_are_reused(tmp_path, text_file, bpe):
    ids = data.cached_token_ids(text_file, bpe, cache=tmp_path)
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert ids.tolist() == bpe.encode(text_file.read_text())
    (cached,) = tmp_path.iterdir()
    assert cached.name.startswith(data.file_sha256(text_file)[:16] + "-" + data.tokenizer_sha256(bpe)[:16])
    cached.write_bytes(np.array([7, 8, 9], dtype="<u2").tobytes())  # a second call must read the file, not re-encode
    assert data.cached_token_ids(text_file, bpe, cache=tmp_path).tolist() == [7, 8, 9]


def test_cache_key_changes_with_text_and_tokenizer(tmp_path, text_file, bpe, gpt2_ranks_512):
    data.cached_token_ids(text_file, bpe, cache=tmp_path)
    smaller = BPETokenizer("gpt2-300", GPT2_PAT, {b: r for b, r in gpt2_ranks_512.items() if r < 300}, {})
    other = data.cached_token_ids(text_file, smaller, cache=tmp_path)
    assert other.tolist() == smaller.encode(text_file.read_text())
    edited = tmp_path / "edited.txt"
    edited.write_text(text_file.read_text() + "!")
    assert data.cached_token_ids(edited, bpe, cache=tmp_path).tolist()[-1] == bpe.encode("!")[0]
    assert len(list(tmp_path.glob("*.bin"))) == 3


def test_id_dtype_and_empty_text(tmp_path):
    assert data.id_dtype(65_536) is np.uint16 and data.id_dtype(65_537) is np.uint32
    assert data.id_dtype(128_256) is np.uint32
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt: the text encodes to no tokens"):
        data.cached_token_ids(empty, CharTokenizer("ab"), cache=tmp_path)


def test_uint32_ids_round_trip(tmp_path, text_file):
    """A vocabulary over 65,536 ids is stored as uint32 and read back exactly."""
    class Wide:  # just what the cache needs from a tokenizer: ids beyond uint16's range
        vocab_size = 70_128

        def encode(self, text):
            return [70_000 + ord(c) % 128 for c in text]

        def to_dict(self):
            return {"kind": "wide"}
    tok = Wide()
    ids = data.cached_token_ids(text_file, tok, cache=tmp_path)
    assert ids.dtype == np.uint32 and ids.tolist() == tok.encode(text_file.read_text())


# ----------------------------------------------------------------------------- --init-from

def test_step0_eval_loss_is_the_checkpoints_own_loss(tmp_path, text_file, base_ckpt, bpe):
    """No training: the trainer's eval loss equals the loaded checkpoint's cross-entropy on the same
    batches, computed here independently (own encoding, split and batch sampling)."""
    tc = finetune(tmp_path, text_file, base_ckpt)
    res = train(tc, log=quiet)
    assert res.iters == 0 and res.history == []

    loaded = load_model(base_ckpt)
    ids = np.array(bpe.encode(text_file.read_text()))
    n = int(len(ids) * 0.9)
    expected = {}
    for name, part in [("train", ids[:n]), ("val", ids[n:])]:
        gen = torch.Generator().manual_seed(tc.seed + 1)  # the trainer's eval generator
        losses = []
        for _ in range(tc.eval_iters):
            starts = torch.randint(len(part) - tc.seq_len, (tc.batch_size,), generator=gen)
            x = torch.stack([torch.from_numpy(part[s:s + tc.seq_len]) for s in starts.tolist()])
            y = torch.stack([torch.from_numpy(part[s + 1:s + 1 + tc.seq_len]) for s in starts.tolist()])
            with torch.no_grad():
                losses.append(F.cross_entropy(loaded.model(x).flatten(0, 1), y.flatten()).item())
        expected[name] = sum(losses) / len(losses)
    assert res.final_train == pytest.approx(expected["train"], abs=1e-6)
    assert res.final_val == pytest.approx(expected["val"], abs=1e-6)
    assert res.final_val == pytest.approx(np.log(bpe.vocab_size), rel=0.05)  # a random model: ~uniform

    saved = load_model(res.model_path)  # the step-0 checkpoint is the base, with its config and tokenizer
    assert saved.config == loaded.config and saved.tokenizer.to_dict() == bpe.to_dict()
    for (k, a), (_, b) in zip(saved.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert saved.provenance["init_from"] == str(base_ckpt)


def test_init_from_trains_the_checkpoint(tmp_path, text_file, base_ckpt):
    res = train(finetune(tmp_path, text_file, base_ckpt, max_iters=30, eval_interval=30, lr=3e-3, min_lr=3e-3), log=quiet)
    (it0, _, val0), (it1, _, val1) = res.evals
    assert (it0, it1) == (0, 30) and val1 < val0 - 0.5
    assert load_model(res.model_path).config == load_model(base_ckpt).config
    assert res.trainable_params == load_model(base_ckpt).model.num_params()


def test_init_from_cli(tmp_path, text_file, base_ckpt):
    rc = train_cli.main(["--data", str(text_file), "--init-from", str(base_ckpt), "--out-dir", str(tmp_path),
                         "--name", "cli", "--seq-len", "16", "--batch-size", "2", "--max-iters", "2",
                         "--eval-interval", "2", "--eval-iters", "1", "--no-progress", "--no-plot"])
    assert rc == 0 and load_model(tmp_path / "cli.safetensors").provenance["step"] in (0, 2)


@pytest.mark.parametrize("kw, message", [
    (dict(n_layer=3), "init_from takes the architecture from the checkpoint, so n_layer cannot be set"),
    (dict(seq_len=65), "seq_len 65 is longer than the model's context"),
    (dict(lora_rank=-1), "lora_rank must be >= 0"),
    (dict(merge=True), "merge folds LoRA adapters"),
    (dict(init_from_layers=1), "init_from_layers copies the teacher's first layers"),
])
def test_bad_flag_combinations(tmp_path, text_file, base_ckpt, kw, message):
    with pytest.raises(ValueError, match=message):
        train(finetune(tmp_path, text_file, base_ckpt, **kw), log=quiet)


def test_lora_without_init_from_and_missing_checkpoint(tmp_path, text_file):
    with pytest.raises(ValueError, match="lora_rank needs init_from"):
        train(TrainConfig(data=str(text_file), lora_rank=4, out_dir=str(tmp_path)), log=quiet)
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nope.safetensors"):
        train(finetune(tmp_path, text_file, tmp_path / "nope.safetensors"), log=quiet)


@pytest.mark.slow
def test_step0_on_smollm2_matches_transformers(tmp_path, text_file, smollm2_converted, smollm2_hf_model):
    """The real converted SmolLM2-135M: the trainer's step-0 eval loss (--init-from, no training) equals
    Hugging Face transformers' loss for the GGUF model on the same token batches."""
    tc = finetune(tmp_path, text_file, smollm2_converted, seq_len=32, batch_size=2, eval_iters=1)
    res = train(tc, log=quiet)
    ids = data.cached_token_ids(text_file, load_model(smollm2_converted).tokenizer)
    n = int(len(ids) * 0.9)
    for name, part, got in [("train", ids[:n], res.final_train), ("val", ids[n:], res.final_val)]:
        gen = torch.Generator().manual_seed(tc.seed + 1)
        x, y = data.get_batch(part, tc.seq_len, tc.batch_size, gen)
        with torch.no_grad():
            hf_logits = smollm2_hf_model(x).logits
        assert got == pytest.approx(F.cross_entropy(hf_logits.flatten(0, 1), y.flatten()).item(), abs=1e-4), name


# ----------------------------------------------------------------------------- presets, keep, a run that gains nothing

def test_init_from_picks_the_finetune_or_lora_preset(base_ckpt):
    full = TrainConfig(init_from=str(base_ckpt)).resolved()
    lora = TrainConfig(init_from=str(base_ckpt), lora_rank=8).resolved()
    assert (full.preset, full.seq_len, full.lr, full.eval_interval) == ("finetune", 128, 1e-4, 10)
    assert (lora.preset, lora.lr) == ("lora", 1e-3)
    assert TrainConfig().resolved().preset == "baby"
    # the baby preset's eval_interval 250 beyond a 200-iteration run: a fifth of the run instead
    assert TrainConfig(max_iters=200).resolved().eval_interval == 40
    assert TrainConfig(max_iters=200, eval_interval=500).resolved().eval_interval == 500  # asked for: kept
    with pytest.raises(ValueError, match="preset lora fine-tunes a checkpoint: it needs init_from"):
        TrainConfig(preset="lora").resolved().check()


def rising_val(monkeypatch):
    """estimate_loss with a val loss that only rises (a fine-tune overfitting a tiny text)."""
    from minillm import trainer
    calls = []

    def fake(model, batches, eval_iters, seed, autocast=None):
        calls.append(1)
        return {"train": 3.0 - 0.1 * len(calls), "val": 4.0 + 0.5 * len(calls)}
    monkeypatch.setattr(trainer, "estimate_loss", fake)


def test_a_run_that_never_beats_its_start_says_so(tmp_path, text_file, base_ckpt, monkeypatch):
    """Before: 'done: 200 iters, best val 4.4172' and a file equal to the base, without a word."""
    rising_val(monkeypatch)
    lines = []
    res = train(finetune(tmp_path, text_file, base_ckpt, max_iters=4, eval_interval=2), log=lines.append)
    note = [line for line in lines if line.startswith("note: no evaluation beat the first")]
    assert len(note) == 1 and "holds the weights of iter 0" in note[0] and "keep=last" in note[0], lines
    kept = load_model(res.model_path).provenance
    assert kept["step"] == 0 and kept["note"].startswith("no evaluation beat the first (val 4.5000 at iter 0")


def test_keep_last_keeps_the_latest_weights(tmp_path, text_file, base_ckpt, monkeypatch):
    rising_val(monkeypatch)
    lines = []
    res = train(finetune(tmp_path, text_file, base_ckpt, max_iters=4, eval_interval=2, keep="last"), log=lines.append)
    kept = load_model(res.model_path).provenance
    assert (kept["step"], kept["kept"]) == (4, "last") and "note" not in kept
    assert not any(line.startswith("note:") for line in lines)


def test_a_training_state_given_as_a_model_names_the_model_file(tmp_path, text_file, base_ckpt):
    res = train(finetune(tmp_path, text_file, base_ckpt, max_iters=2, eval_interval=2), log=quiet)
    state = tmp_path / "ft.train.safetensors"
    with pytest.raises(ValueError, match=rf"a training state .*the run's model is {tmp_path}/ft.safetensors"):
        load_model(state)
    assert res.model_path == tmp_path / "ft.safetensors"
