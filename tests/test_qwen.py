"""The real Qwen2.5-Coder-0.5B-Instruct GGUF (architecture qwen2; Q5_0, Q8_0, Q4_K, Q6_K and F32 tensors)
against transformers' own loading of the same file: logits at every position of a 256-token prompt, the
tokenizer on prose, Python source and odd strings, 64 greedy tokens, and a ChatML chat turn.

The file comes from `python ../shared/tools/fetch_models.py qwen2.5-coder-0.5b` ($MINILLM_MODELS_DIR,
default ~/.cache/minillm/models); without it these tests skip and say so (fail under .ci/run, which
fetches it and sets MINILLM_REQUIRE_MODELS=1). Fixtures (one conversion, one transformers load per
session) are in conftest.py.
"""

import sysconfig
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from minillm.chat import ChatSession, render_chat  # noqa: E402
from minillm.convert.blocks import q4k_codes  # noqa: E402
from minillm.convert.vocab import QWEN2_PAT  # noqa: E402
from real_models import greedy_ours_and_hf  # noqa: E402
from minillm.quantize import dequantize_int4  # noqa: E402
from minillm.sampling import SamplingParams  # noqa: E402

# Both sides dequantize the same GGUF blocks to the same float32 weights (gguf-py's numpy code and
# transformers' own; checked equal on this file) and neither permutes q/k, so what differs is only the
# order of float32 operations (SDPA vs eager attention, RMSNorm, RoPE, bias adds) accumulated over 24
# layers. Observed max |diff| 3.9e-5 on logits of magnitude up to ~24 (1.7e-6 relative, a few float32
# ulps of the largest logits). 1e-3 leaves 25x headroom, and stays 5x below the smallest top-1/top-2 gap
# on this prompt (5.2e-3), so the argmax is compared exactly as well.
TOL = 1e-3

STRINGS = ["Hello world", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n\n", "héllo wörld ñ ç",
           "cafe\u0301 (NFD) vs caf\u00e9 (NFC)", "日本語のテキスト 中文 한국어", "emoji 👋🏽👨‍👩‍👧 🎉!",
           "In 1999, 42 cats ate 3.14159 pies; 1,000,000 + 7 = ?", "x1y22z333 007 0x1F 1e-5", "١٢٣ ²³ ½ ⅷ",
           "<|im_start|>user\nhi<|im_end|>\n", "<tool_call>{\"name\": \"f\"}</tool_call>", "<|fim_prefix|>a<|fim_suffix|>",
           "[PAD151665] is text, not a token", "don't you'll WE'RE", "a" * 300, " " * 17 + "\n" * 5,
           "    def f(x):\n        return x ** 2\n", "ünïcödé\u00a0nbsp\u200bzwsp\ufeffbom", "\x00\x01 bytes \x7f"]
STDLIB = ["textwrap.py", "json/decoder.py", "functools.py", "dataclasses.py"]

# Every test here is slow: the session's fixtures convert the 0.5B (~15 s), parse the GGUF in transformers
# (~30 s) and hold two 2.5 GB float32 models. The 1.5B is for benchmarks only, never loaded here.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompt_256(qwen05_ours, shakespeare_text):
    ids = qwen05_ours.tokenizer.encode(shakespeare_text[:4000])[:256]
    assert len(ids) == 256
    return ids


def test_qwen_q4_k_layout_on_the_real_file(qwen05_gguf):
    """Our reading of Q4_K (blocks.py) gives exactly gguf's dequantized values on a real tensor."""
    t = next(t for t in gguf.GGUFReader(str(qwen05_gguf)).tensors if t.tensor_type.name == "Q4_K")
    shape = tuple(reversed([int(n) for n in t.shape]))
    q, scale, zero = q4k_codes(t.data, shape)
    theirs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))
    assert torch.equal(dequantize_int4(q, scale, zero), theirs), t.name


def test_qwen_config_and_tokenizer_carried(qwen05_ours):
    cfg, tok = qwen05_ours.config, qwen05_ours.tokenizer
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.mlp_hidden) == (24, 896, 14, 2, 64, 4864)
    assert (cfg.vocab_size, cfg.block_size, cfg.rope_theta, cfg.norm_eps) == (151936, 32768, 1e6, 1e-6)
    assert (cfg.qkv_bias, cfg.bias, cfg.qk_norm, cfg.tie_embeddings) == (True, False, False, False)
    assert (tok.pat_str, tok.add_bos, tok.normalize) == (QWEN2_PAT, False, None)
    assert tok.eos_tokens == ["<|im_end|>", "<|endoftext|>"] and tok.eos_ids == {151645, 151643}
    assert len(tok.special_tokens) == 22 and tok.special_tokens["<tool_call>"] == 151657
    assert tok.decode([151700]) == "[PAD151700]"  # the file's filler tokens: vocabulary, never matched in text
    prov = qwen05_ours.provenance
    assert (prov["source_format"], prov["general.architecture"], prov["dtype"]) == ("gguf", "qwen2", "float32")


def test_qwen_logits_match_transformers(qwen05_ours, qwen05_hf_model, prompt_256):
    x = torch.tensor([prompt_256])
    with torch.no_grad():
        ref = qwen05_hf_model(x).logits
        ours = qwen05_ours.model(x)
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"max |diff| {diff}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_qwen_tokenizer_matches_hf(qwen05_ours, qwen05_hf_tokenizer, shakespeare_text):
    """Ids equal transformers' tokenizer of the same GGUF (no NFC there, as in llama.cpp) on 20,000
    characters of tinyshakespeare, Python source files and odd strings; decode(encode(s)) == s."""
    tok, hf = qwen05_ours.tokenizer, qwen05_hf_tokenizer
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [shakespeare_text[:20000], *STRINGS] + [(stdlib / f).read_text(encoding="utf-8") for f in STDLIB]
    for s in texts:
        ids = tok.encode(s)
        assert ids == hf(s)["input_ids"], s[:60]
        assert tok.decode(ids) == s, s[:60]
    assert len(tok.encode("2024")) == 4  # single digits (Qwen2's pre-tokenizer)


def test_qwen_greedy_64_matches_transformers(qwen05_ours, qwen05_hf_model, one_thread):
    tok = qwen05_ours.tokenizer
    prompt = tok.encode(render_chat(tok.chat_template, [{"role": "user", "content": "Write a Python function that "
                                                         "checks whether a number is prime."}]))
    out, ref = greedy_ours_and_hf(qwen05_ours.model, qwen05_hf_model, prompt, pad_id=151643)
    assert out == ref
    assert "def " in tok.decode(out)


def test_qwen_chat_turn(qwen05_ours, qwen05_hf_tokenizer, one_thread):
    """sample.py --chat's session: the ChatML prompt as transformers renders it, a reply that ends at <|im_end|>."""
    tok = qwen05_ours.tokenizer
    messages = [{"role": "user", "content": "What is 2 + 3? Answer with the number only."}]
    ours = render_chat(tok.chat_template, messages)
    assert ours == qwen05_hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    session = ChatSession(qwen05_ours.model, tok, params=SamplingParams(temperature=0), max_new_tokens=32)
    reply = "".join(session.reply(messages[0]["content"]))
    assert "5" in reply and session.last_stats.stopped_by == "eos", reply  # ended by <|im_end|>
