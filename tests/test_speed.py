"""The speed layer computes what the reference model computes: each route against model.py's own."""

import pytest
import torch

from minillm.config import preset
from minillm.kv_cache import KVCache
from minillm.model import Transformer
from minillm.speed import FewRowLinear, GQADecodeAttention, compile_decode, speed_up

FAMILIES = {"gpt2": dict(family="gpt2"), "llama-gqa": dict(family="llama", n_kv_head=2)}


def make(name, **kw):
    torch.manual_seed(0)
    return Transformer(preset("nano", vocab_size=97, **{**FAMILIES[name], **kw})).eval()


@pytest.mark.parametrize("bias", [True, False])
def test_few_row_linear_equals_nn_linear(bias):
    torch.manual_seed(0)
    ref = torch.nn.Linear(48, 40, bias=bias)
    lin = torch.nn.Linear(48, 40, bias=bias)
    lin.load_state_dict(ref.state_dict())
    lin.__class__ = FewRowLinear
    for shape in [(1, 48), (2, 48), (1, 5, 48), (2, 4, 48), (3, 3, 48), (9, 48)]:  # 1 and 9 rows: the plain path
        x = torch.randn(*shape)
        with torch.no_grad():
            y, want = lin(x), ref(x)
        assert y.shape == want.shape
        torch.testing.assert_close(y, want, rtol=0, atol=1e-5)
    x = torch.randn(3, 48, requires_grad=True)  # with grad: nn.Linear itself, gradients as usual
    lin(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


@pytest.mark.parametrize("name", FAMILIES)
def test_speed_up_keeps_every_logit(name):
    """Training forward, prefill, few-token verify and one-token decode: sped-up == reference."""
    model = make(name)
    x = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    calls = [(0, 16), (16, 20), (20, 21), (21, 22)]  # prefill, verify 4, decode, decode
    with torch.no_grad():
        ref_full, cache = model(x), KVCache.for_model(model, 2)
        ref = [model(x[:, a:b], cache, a) for a, b in calls]
        speed_up(model)
        assert sum(isinstance(m, (FewRowLinear, GQADecodeAttention)) for m in model.modules()) > 0
        got_full, cache = model(x), KVCache.for_model(model, 2)
        got = [model(x[:, a:b], cache, a) for a, b in calls]
    torch.testing.assert_close(got_full, ref_full, rtol=0, atol=1e-5)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)


def test_gqa_decode_route_is_taken_and_equals_reference():
    model = make("llama-gqa")
    speed_up(model)
    attn = model.blocks[0].attn
    q = torch.randn(2, 4, 1, 8)  # (B, nh, 1, hd): one query token
    k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)  # (B, nkv, S, hd)
    fast = attn.attend(q, k, v, None)
    ref = super(GQADecodeAttention, attn).attend(q, k, v, None)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_compiled_decode_gives_the_eager_greedy_tokens(name):
    from minillm.generate import stream_tokens
    from minillm.sampling import SamplingParams
    model = make(name)
    with torch.no_grad():  # louder blocks: a random model's argmax then moves instead of echoing its input
        for n, p in model.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(30)
    prompt, greedy = [3, 14, 15, 92, 65], SamplingParams(temperature=0.0)
    eager = list(stream_tokens(model, prompt, 12, greedy))
    compile_decode(model)
    compiled = list(stream_tokens(model, prompt, 12, greedy))
    assert compiled == eager and len(set(eager)) > 1  # a varied sequence, not one token repeated
    with torch.inference_mode():  # and the compiled step really ran (one-token cached calls go through it)
        cache = KVCache.for_model(model, 1, 8)
        model(torch.tensor([prompt]), cache, 0)
        eager_logits = Transformer.forward(model, torch.tensor([[7]]), cache, 5)
        cache.crop(5)
        compiled_logits = model.compiled_step(torch.tensor([[7]]), cache, 5, False)
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=0, atol=1e-4)
