"""Distillation (issue 7): the loss is the stated formula, its KL term vanishes when student ==
teacher, a tiny student learns from a tiny teacher, tokenizers must match, --init-from-layers copies."""

import math

import pytest
import torch

from minillm import distill
from minillm.checkpoint import load_model, save_model
from minillm.config import ModelConfig
from minillm.model import Transformer
from minillm.tokenizer import CharTokenizer
from minillm.train_config import TrainConfig
from minillm.train_setup import train


def quiet(*a):
    pass


@pytest.fixture(scope="module")
def text_and_tokenizer(tmp_path_factory, shakespeare_text):
    path = tmp_path_factory.mktemp("data") / "t.txt"
    path.write_text(shakespeare_text[:20_000])
    return path, CharTokenizer(shakespeare_text[:20_000])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, text_and_tokenizer):
    """A tiny llama teacher, trained a little on the text so its distribution means something."""
    text, _ = text_and_tokenizer
    out = tmp_path_factory.mktemp("teacher")
    res = train(TrainConfig(name="teacher", out_dir=str(out), data=str(text), family="llama", n_layer=3, n_head=4,
                            n_embd=48, block_size=32, batch_size=8, max_iters=40, eval_interval=40, eval_iters=2,
                            warmup_iters=5, lr=3e-3, min_lr=3e-3, plot=False), log=quiet)
    return res.model_path


def test_loss_is_the_stated_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g) * 2
    y = torch.randint(0, 11, (2, 5), generator=g)
    T, a = 3.0, 0.3
    loss, ce, kl = distill.distill_loss(s, t, y, T, a)
    p, q = (t / T).softmax(-1), (s / T).softmax(-1)
    kl_by_hand = (p * (p.log() - q.log())).sum(-1).mean()  # KL(teacher ‖ student) per position
    ce_by_hand = -s.log_softmax(-1).gather(-1, y[..., None]).mean()
    torch.testing.assert_close(kl, kl_by_hand)
    torch.testing.assert_close(ce, ce_by_hand)
    torch.testing.assert_close(loss, (1 - a) * ce_by_hand + a * T**2 * kl_by_hand)
    assert distill.distill_loss(s, t, y, T, 0.0)[0] == pytest.approx(ce.item())  # alpha 0: plain CE


def test_kl_is_zero_when_student_is_teacher():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, 50, generator=g) * 4
    y = torch.randint(0, 50, (3, 7), generator=g)
    for T in (0.5, 1.0, 2.0, 5.0):
        loss, ce, kl = distill.distill_loss(logits, logits.clone(), y, T, alpha=1.0)
        assert abs(kl.item()) < 1e-6 and abs(loss.item()) < 1e-5
        assert distill.distill_loss(logits, logits, y, T, alpha=0.5)[0].item() == pytest.approx(0.5 * ce.item(), abs=1e-5)
    assert distill.distill_loss(logits, logits + 1.0, y, 2.0, 1.0)[2].abs() < 1e-6  # a shift changes no probability
    assert distill.distill_loss(logits, logits.flip(-1), y, 2.0, 1.0)[2] > 0.1


def test_bad_settings_rejected():
    x, y = torch.zeros(1, 2, 5), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distill.distill_loss(x, x, y, 0.0, 0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        distill.distill_loss(x, x, y, 1.0, 1.5)
    with pytest.raises(ValueError, match="differ in shape"):
        distill.distill_loss(x, torch.zeros(1, 2, 6), y, 1.0, 0.5)


def test_student_learns_from_teacher(tmp_path, text_and_tokenizer, teacher):
    """A fresh 1-layer student, pure distillation (alpha 1): its loss against the teacher falls, and
    its own cross-entropy on held-out text improves with it."""
    text, _ = text_and_tokenizer
    res = train(TrainConfig(name="student", out_dir=str(tmp_path), data=str(text), distill_from=str(teacher),
                            distill_temperature=2.0, distill_alpha=1.0, family="llama", n_layer=1, n_head=2,
                            n_embd=32, block_size=32, batch_size=8, max_iters=30, eval_interval=30, eval_iters=2,
                            warmup_iters=0, lr=3e-3, min_lr=3e-3, plot=False), log=quiet)
    first, last = [l for _, l in res.history[:5]], [l for _, l in res.history[-5:]]
    assert sum(last) / 5 < 0.5 * sum(first) / 5
    assert res.evals[-1][2] < res.evals[0][2] - 0.5
    student = load_model(res.model_path)
    assert student.config.n_layer == 1 and student.provenance["distilled_from"] == str(teacher)
    assert student.tokenizer.to_dict() == load_model(teacher).tokenizer.to_dict()


def test_mismatched_tokenizers_rejected(tmp_path, text_and_tokenizer, teacher):
    text, tok = text_and_tokenizer
    other = CharTokenizer(tok.chars[:-1] + ["é"])  # same size, one character different
    student_path = tmp_path / "student.safetensors"
    save_model(student_path, Transformer(ModelConfig(family="llama", vocab_size=other.vocab_size, n_layer=1)), other)
    with pytest.raises(ValueError, match=r"teacher .* and student .* have different tokenizers .*distillation needs one"):
        train(TrainConfig(name="s", out_dir=str(tmp_path), data=str(text), distill_from=str(teacher),
                          init_from=str(student_path), max_iters=1, plot=False), log=quiet)


def test_init_from_layers_copies_the_teachers_first_blocks(text_and_tokenizer, teacher):
    t = load_model(teacher).model
    x = torch.randint(0, t.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    whole = distill.truncated_copy(t, t.config.n_layer)
    with torch.no_grad():
        assert torch.equal(whole(x), t(x))  # all layers kept: the teacher itself
    two = distill.truncated_copy(t, 2)
    assert two.config.n_layer == 2 and two.config.n_embd == t.config.n_embd
    td = t.state_dict()
    for k, v in two.state_dict().items():
        assert torch.equal(v, td[k]), k
    assert two.lm_head.weight is two.tok_emb.weight  # still tied, and not shared with the teacher
    assert two.tok_emb.weight.data_ptr() != t.tok_emb.weight.data_ptr()
    with torch.no_grad():  # by hand: the teacher's first two blocks, then its norm and head
        h = t.tok_emb(x)
        rope = (t.rope_cos[:16], t.rope_sin[:16])
        mask = torch.ones(16, 16, dtype=torch.bool).tril()
        for block in t.blocks[:2]:
            h = block(h, rope, mask, None, 0)
        torch.testing.assert_close(two(x), t.lm_head(t.norm(h)))
    with pytest.raises(ValueError, match="between 1 and the teacher's 3 layers"):
        distill.truncated_copy(t, 4)


def test_trainer_init_from_layers(tmp_path, text_and_tokenizer, teacher):
    text, _ = text_and_tokenizer
    res = train(TrainConfig(name="s", out_dir=str(tmp_path), data=str(text), distill_from=str(teacher),
                            init_from_layers=2, seq_len=16, batch_size=4, max_iters=0, eval_iters=2,
                            plot=False), log=quiet)
    student = load_model(res.model_path)
    assert student.config.n_layer == 2 and math.isfinite(res.final_val)
    with pytest.raises(ValueError, match="init_from_layers takes the architecture from the checkpoint"):
        train(TrainConfig(out_dir=str(tmp_path), data=str(text), distill_from=str(teacher), init_from_layers=2,
                          n_embd=64), log=quiet)
