"""speed.OneCallStep: a one-token step of an int4, bf16 or float32 LLaMA-family model, every block in one C++
call (kernels/step.cpp), held to the eager step on real models: SmolLM2-135M (no biases) and
Qwen2.5-Coder-0.5B (q, k, v biases), each quantized to int4 here, cast to bf16 and as converted (float32);
and the calls and models it must leave to the other route."""

import copy

import pytest
import torch

from bench.prompts import OUR_PROMPTS
from minillm.checkpoint import load_model
from minillm.config import preset
from minillm.generate import stream_tokens
from minillm.methods import Method
from minillm.kv_cache import KVCache
from minillm.model import RMSNorm, Transformer
from minillm.quantize import quantize_model
from minillm.quantized import QuantEmbedding
from minillm.sampling import SamplingParams
from minillm.kernels import VNNIInt4Linear
from minillm.speed import (FewRowLinear, FusedRMSNorm, OneCallStep, StackedLinear, batch_invariant, compile_decode,
                           speed_layer, speed_up)
from test_speed import needs_our_kernel

pytestmark = needs_our_kernel
GREEDY = SamplingParams(temperature=0.0)
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_converted):
    loaded = load_model(smollm2_converted)
    return speed_up(quantize_model(loaded.model, 4, 32)), loaded.tokenizer


@pytest.fixture(scope="module")
def smollm2_bf16(smollm2_converted):
    loaded = load_model(smollm2_converted)
    return speed_up(loaded.model.to(torch.bfloat16)), loaded.tokenizer


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_converted):
    loaded = load_model(smollm2_converted)
    return speed_up(loaded.model), loaded.tokenizer


@pytest.fixture(params=["int4", "bf16", "fp32"])
def smollm2_fast(request):
    """SmolLM2 as speed_up leaves its int4 checkpoint (our int4 kernel) and its bf16 and float32 ones (our
    few-row kernel)."""
    return request.getfixturevalue(f"smollm2_{request.param}")


def check_against_eager(model, tokenizer, n: int) -> int:
    """Along n greedy tokens, each position's step through OneCallStep against the eager step on the same cache:
    the K/V it writes (every layer's) and its logits within a few bf16 steps of the eager ones (RMSNorm's
    sum order and e^x are step.cpp's own), the argmax the same wherever the eager top two are further
    apart than that. A bf16 step's one-step difference in a layer reaches every later one (the int4
    kernel's rounding of x to int8 absorbs most such differences): a layer's K or V then within 5% of
    its largest number (seen: up to 3.3% on SmolLM2 along 24 tokens; int4 within 2%). In float32 the
    eager step runs step.cpp's own row functions: its K and V bit for bit.
    -> the number of positions whose logits were bit for bit the eager ones."""
    int4 = isinstance(model.blocks[0].mlp.down_proj, VNNIInt4Linear)
    kv_tol = 0.02 if int4 else 0.0 if model.norm.weight.dtype == torch.float32 else 0.05
    step = OneCallStep.of(model)
    assert step is not None
    prompt = tokenizer.encode(PROMPT)
    ids = list(stream_tokens(model, prompt, n, GREEDY))
    same = 0
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, len(prompt) + n)
        model(torch.tensor([prompt]), cache, 0)
        for pos, t in enumerate(ids[:-1], start=len(prompt)):
            eager = Transformer.forward(model, torch.tensor([[t]]), cache, pos)[0, -1].float()
            k, v = [c[:, :, pos].clone() for c in cache.k], [c[:, :, pos].clone() for c in cache.v]
            cache.crop(pos)
            for c in cache.k + cache.v:  # the eager step's writes there gone: only OneCallStep's count
                c[:, :, pos:] = float("nan")
            ours = step(torch.tensor([[t]]), cache, pos)[0, -1].float()
            assert cache.length == pos + 1
            for written, want in zip(cache.k + cache.v, k + v):
                torch.testing.assert_close(written[:, :, pos], want, rtol=kv_tol, atol=kv_tol * want.abs().max().item())
            diff = (ours - eager).abs().max().item()
            assert diff <= 0.05 * eager.abs().max().item(), (pos, diff)  # seen: up to 0.02 along 128 tokens
            top2 = eager.topk(2).values
            if top2[0] - top2[1] > 2 * diff:
                assert ours.argmax() == eager.argmax(), pos
            same += diff == 0
    return same


def test_one_call_step_is_the_eager_step_on_smollm2(smollm2_fast):
    model, tokenizer = smollm2_fast
    same = check_against_eager(model, tokenizer, 24)
    if model.norm.weight.dtype == torch.float32:
        assert same == 23  # every position bit for bit: the eager float32 step computes a row as step.cpp does
    assert same >= 12  # most positions bit for bit (int4 all 23 here, bf16 19; a sum order moves a few)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int4", "bf16", "fp32"])
def test_one_call_step_is_the_eager_step_on_qwen_with_biases(qwen05_ours, fmt):
    model = copy.deepcopy(qwen05_ours.model)
    model = speed_up({"int4": lambda m: quantize_model(m, 4, 32), "bf16": lambda m: m.to(torch.bfloat16),
                      "fp32": lambda m: m}[fmt](model))
    assert model.blocks[0].attn.q_proj.bias is not None
    same = check_against_eager(model, qwen05_ours.tokenizer, 16)
    assert fmt != "fp32" or same == 15


def hooked_run(model, prompt: list[int], n: int) -> tuple[list[int], list[int]]:
    """n greedy tokens with a forward hook on block 3 (as the inspector hooks a model), removed after
    -> (the tokens, one entry per call the hook saw)."""
    seen = []
    hook = model.blocks[3].register_forward_hook(lambda m, i, o: seen.append(1))
    try:
        return list(stream_tokens(model, prompt, n, GREEDY)), seen
    finally:
        hook.remove()  # the fixture's blocks are shared


def test_compile_decode_runs_one_call_steps_and_compiles_nothing(smollm2_fast, monkeypatch):
    """compile_decode takes OneCallStep for such a model: the greedy tokens are the eager ones, and no graph was
    compiled (torch.compile, replaced here, is never called); a hook (the inspector's) sends the steps to
    the graph, which runs the hook; without it OneCallStep again."""
    model, tokenizer = smollm2_fast
    prompt = tokenizer.encode(PROMPT)
    eager = list(stream_tokens(model, prompt, 16, GREEDY))
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)  # the graph: eager forward
    model = compile_decode(copy.copy(model))  # a shallow copy: the fixture's model keeps its class
    assert list(stream_tokens(model, prompt, 16, GREEDY)) == eager and compiled == []
    assert model.compiled_step.one_call is not None
    tokens, seen = hooked_run(model, prompt, 4)
    assert tokens == eager[:4] and len(compiled) == 1 and len(seen) == 4  # prefill + 3 steps
    assert model.compiled_step.one_call is None
    assert list(stream_tokens(model, prompt, 4, GREEDY)) == eager[:4] and len(seen) == 4
    assert model.compiled_step.one_call is not None


def test_speed_layer_runs_one_call_steps_and_eager_ones_where_it_does_not_take_them(smollm2_fast, monkeypatch):
    """What the commands run (speed_layer): OneCallStep's steps, compile_decode's tokens, and nothing compiled
    whatever the call; a hook (the inspector's) sends the steps to the eager route, which runs the hook; the
    exact mode takes the model (no refusal: there is no graph to round otherwise) and runs eager; both undone,
    OneCallStep again."""
    model, tokenizer = smollm2_fast
    prompt = tokenizer.encode(PROMPT)
    want = list(stream_tokens(compile_decode(copy.copy(model)), prompt, 16, GREEDY))  # OneCallStep's tokens
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: pytest.fail("a graph was compiled"))
    calls, call = [], OneCallStep.__call__
    monkeypatch.setattr(OneCallStep, "__call__", lambda self, *a: calls.append(1) or call(self, *a))
    model = speed_layer(copy.copy(model))  # a shallow copy: the fixture's model keeps its class
    assert list(stream_tokens(model, prompt, 16, GREEDY)) == want and len(calls) == 16  # the prompt's, 15 steps'
    tokens, seen = hooked_run(model, prompt, 4)
    assert tokens == want[:4] and len(seen) == 4 and len(calls) == 16  # prefill + 3 eager steps
    assert model.compiled_step.one_call is None
    assert list(stream_tokens(model, prompt, 4, GREEDY)) == want[:4] and model.compiled_step.one_call is not None
    exact = copy.deepcopy(model)  # a fresh step of its own; a float stack's copied layers views of its copy again
    attn = exact.blocks[0].attn
    assert OneCallStep.of(exact) is not None and attn.qkv_stack is not model.blocks[0].attn.qkv_stack
    if isinstance(attn.qkv_stack, StackedLinear):
        assert attn.qkv_stack.holds([attn.q_proj, attn.k_proj, attn.v_proj])
    batch_invariant(exact, 5)
    n = len(calls)
    tokens = list(stream_tokens(exact, prompt, 4, GREEDY))
    assert len(calls) == n and exact.compiled_step.one_call is None  # the mode's steps ran eager
    assert tokens == want[:4] or model.norm.weight.dtype != torch.float32
    batch_invariant(exact, None)
    assert list(stream_tokens(exact, prompt, 4, GREEDY)) == want[:4] and len(calls) == n + 4
    gpt2 = Transformer(preset("baby", vocab_size=65)).eval()  # a model it does not take: speed_up's, unchecked
    assert type(speed_layer(gpt2)) is Transformer and type(speed_layer(gpt2, graph=True)) is not Transformer


def test_one_call_step_leaves_other_models_and_calls_to_the_other_route(smollm2_int4, smollm2_converted):
    model, _ = smollm2_int4
    step = OneCallStep.of(model)
    with torch.inference_mode():
        cache = KVCache.for_model(model, 2, 8)
        assert step(torch.tensor([[1], [2]]), cache, 0) is None  # batch 2
        cache = KVCache(model.config.n_layer, 1, model.config.n_kv_head, 8, model.config.head_dim)  # float32
        assert step(torch.tensor([[1]]), cache, 0) is None
        cache = KVCache.for_model(model, 1, 8)
        model(torch.tensor([[1] * 6]), cache, 0)
        with pytest.raises(ValueError, match="past the cached length"):  # the cache's own checks, before any write
            step(torch.tensor([[1]]), cache, 7)
        model(torch.tensor([[1] * 2]), cache, 6)
        with pytest.raises(ValueError, match="overflow"):
            step(torch.tensor([[1]]), cache, 8)
        assert cache.length == 8
    assert OneCallStep.of(speed_up(load_model(smollm2_converted).model.half())) is None  # float16
    fp32 = speed_up(load_model(smollm2_converted).model)
    fp32.blocks[3].attn_norm.__class__ = RMSNorm  # PyTorch's RMSNorm in the eager float32 step: not step.cpp's numbers
    assert OneCallStep.of(fp32) is None
    fp32.blocks[3].attn_norm.__class__ = FusedRMSNorm
    assert OneCallStep.of(fp32) is not None
    other = copy.deepcopy(model)
    attn = other.blocks[5].attn
    attn.o_proj = FewRowLinear.wrap(torch.zeros(attn.o_proj.out_features, attn.o_proj.in_features)).eval()
    assert OneCallStep.of(other) is None  # one float32 layer among int4 ones
    assert OneCallStep.of(batch_invariant(copy.deepcopy(model), 5)) is None  # the exact mode's attention
    assert OneCallStep.of(copy.deepcopy(model).train()) is None
    with pytest.raises(RuntimeError, match="DecodeStep"):  # the C++ side checks its arguments too
        step.step(torch.zeros(1, 1, dtype=torch.long), 0, model.rope_cos, model.rope_sin, [], [], False)
    cache = KVCache.for_model(model, 1, 8)
    with pytest.raises(RuntimeError, match="token id 49152 is outside the vocabulary of 49152"), torch.inference_mode():
        step.step(torch.tensor([[49152]]), 0, model.rope_cos, model.rope_sin, cache.k, cache.v, False)


def test_int4_step_embeds_int8_codes_times_their_scales_as_quant_embedding_does(smollm2_int4):
    """step.cpp's embedding both ways: the checkpoint's int8 codes times their bf16 scales, and a plain bf16
    nn.Embedding holding what QuantEmbedding returns for each row: the same logits, bit for bit, so the
    int8 rows are QuantEmbedding's to the bit; ids read at any stride; a final norm made float32 in place
    refused; an embedding it cannot compute (int4 rows) goes to the other route."""
    model, _ = smollm2_int4
    assert type(model.tok_emb) is QuantEmbedding and model.tok_emb.bits == 8
    plain = copy.deepcopy(model)  # not copy.copy: a shallow copy shares the fixture's modules
    plain.tok_emb = torch.nn.Embedding.from_pretrained(model.tok_emb(torch.arange(model.config.vocab_size))).eval()
    tokens = torch.tensor([[17, 4031, 49151, 0]])
    every_other = torch.tensor([[17, 5, 4031, 5, 49151, 5, 0, 5]])[:, ::2]  # the same ids, 2 apart in memory
    with torch.inference_mode():
        steps = [OneCallStep.of(m) for m in (model, plain)]
        int8, bf16 = (step(tokens, KVCache.for_model(m, 1, 8), 0) for step, m in zip(steps, (model, plain)))
        strided = steps[0](every_other, KVCache.for_model(model, 1, 8), 0)
        assert steps[0](tokens.int(), KVCache.for_model(model, 1, 8), 0) is None  # int32 ids: the other route
        plain.norm.float()  # in place: the step made for a bf16 norm refuses to run on it
        with pytest.raises(RuntimeError, match="changed dtype"):
            steps[1](tokens, KVCache.for_model(plain, 1, 8), 0)
    assert torch.equal(int8, bf16) and torch.equal(strided, int8)
    plain.norm.bfloat16()
    plain.tok_emb = copy.deepcopy(model.tok_emb)
    assert OneCallStep.of(plain) is not None
    plain.tok_emb.bits = 4
    assert OneCallStep.of(plain) is None


@pytest.mark.slow
def test_greedy_speculative_with_a_one_call_step_target_is_its_plain_greedy_over_20_prompts(
        smollm2_fast, smollm2_converted, monkeypatch):
    """A verification of k + 1 tokens goes through OneCallStep too, and each token's numbers there are those of a
    one-token step (every kernel on the way computes a row alone): greedy speculative output is the
    target's plain greedy output, token for token, without the exact mode; nothing compiled."""
    model, tokenizer = smollm2_fast
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: pytest.fail("a graph was compiled"))
    calls, call = [], OneCallStep.__call__
    monkeypatch.setattr(OneCallStep, "__call__",
                        lambda self, tokens, *a: calls.append(tokens.shape[1]) or call(self, tokens, *a))
    model = compile_decode(copy.copy(model))
    draft = speed_up(quantize_model(load_model(smollm2_converted).model, 4, 64))  # another grouping: rejections too
    spec, plain = Method("speculative", GREEDY, k=4), Method("greedy", GREEDY)
    stats = spec.new_stats()
    differ = []
    for text in OUR_PROMPTS:
        ids = tokenizer.encode(text)
        want = list(plain.stream(model, ids, 12))
        got = list(spec.stream(model, ids, 12, draft, stats=stats))
        if got != want:
            differ.append((text, tokenizer.decode(want), tokenizer.decode(got)))
    assert len(OUR_PROMPTS) == 20 and not differ, differ
    assert 0 < stats.drafts_accepted < stats.drafts_proposed  # both acceptances and rejections were checked
    assert calls.count(5) >= stats.calls["target"] // 2  # the verifications went through OneCallStep (the spy saw them)


def test_a_verification_through_one_call_step_gives_each_token_its_one_token_step(smollm2_fast):
    """Five tokens in one OneCallStep call: each position's logits and K/V bit for bit those of five one-token calls."""
    model, tokenizer = smollm2_fast
    step = OneCallStep.of(model)
    prompt, tokens = tokenizer.encode(PROMPT), [11, 400, 7, 9000, 42]
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, len(prompt) + 5)
        model(torch.tensor([prompt]), cache, 0)
        n = len(prompt)
        together = step(torch.tensor([tokens]), cache, n)[0]
        k, v = [c[:, :, n:].clone() for c in cache.k], [c[:, :, n:].clone() for c in cache.v]
        cache.crop(n)
        alone = torch.cat([step(torch.tensor([[t]]), cache, n + i)[0] for i, t in enumerate(tokens)])
        assert torch.equal(together, alone) and cache.length == n + 5
        assert all(torch.equal(a[:, :, n:], b) for a, b in zip(cache.k + cache.v, k + v))
        cache.crop(n)
        assert torch.equal(step(torch.tensor([tokens]), cache, n, last_only=True)[0], together[-1:])


def test_a_bf16_layer_given_a_tensor_of_its_own_sends_the_steps_off_the_stack(smollm2_bf16, smollm2_converted,
                                                                            monkeypatch):
    """A layer of a bf16 q|k|v stack given a tensor of its own (`.data =`: the stack keeps the old numbers): the
    eager step multiplies the layers one by one from then on, and CompiledStep's check sees it, so the steps
    leave OneCallStep (which multiplies the stack) for the graph (eager forward here), with the new numbers."""
    _, tokenizer = smollm2_bf16
    prompt = tokenizer.encode(PROMPT)
    before = list(stream_tokens(smollm2_bf16[0], prompt, 8, GREEDY))
    # two fresh models
    plain, model = (speed_up(load_model(smollm2_converted).model.to(torch.bfloat16)) for _ in range(2))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    compile_decode(model)
    assert list(stream_tokens(model, prompt, 8, GREEDY)) == before and model.compiled_step.one_call is not None
    for m in (plain, model):
        q = m.blocks[2].attn.q_proj
        q.weight.data = q.weight.flip(0)  # a new tensor: q's outputs in the other order
    want = list(stream_tokens(plain, prompt, 8, GREEDY))
    assert want != before  # the change matters
    assert list(stream_tokens(model, prompt, 8, GREEDY)) == want and model.compiled_step.one_call is None


def test_sample_py_runs_its_steps_through_one_call_by_default(smollm2_fp32, smollm2_converted, capsys, monkeypatch):
    """sample.py without --compile (speed_layer): SmolLM2's float32 steps through OneCallStep's call, nothing
    compiled, the text the eager speed layer gives (float32: its numbers bit for bit); --reference: none."""
    from cli_runner import run, script
    model, tokenizer = smollm2_fp32
    want = tokenizer.decode(list(stream_tokens(model, tokenizer.encode(PROMPT), 12, GREEDY)))  # speed_up's eager step
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: pytest.fail("a graph was compiled"))
    calls, call = [], OneCallStep.__call__
    monkeypatch.setattr(OneCallStep, "__call__", lambda self, *a: calls.append(1) or call(self, *a))
    args = ["--model", smollm2_converted, "--prompt", PROMPT, "--method", "greedy", "--max-new-tokens", 12]
    code, out, err = run(capsys, script("sample").main, *args)
    assert code == 0 and out == PROMPT + want + "\n" and len(calls) == 12, (out, err)  # the prompt's call, 11 steps
    code, out, err = run(capsys, script("sample").main, *args, "--reference")
    assert code == 0 and len(calls) == 12
