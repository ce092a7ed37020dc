"""GGUF files (llama.cpp) -> Source: metadata -> config, tokenizer.ggml.* -> BPE tokenizer, tensors dequantized.

Read with the `gguf` package (GGUFReader memory-maps the file; nothing is loaded until a tensor is
dequantized, a slice of rows at a time, into one float32 tensor). Supported: `general.architecture` =
llama (LLaMA, SmolLM2, Llama 3.x without rope_freqs), qwen2 (Qwen2/Qwen2.5: biases on q, k and v) and
qwen3 (RMSNorm on each head's q and k); tensor types F32, F16, BF16 and every block type
gguf.quants.dequantize handles (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ*, ...).
Q4_0, Q4_1 and Q4_K tensors also offer their 4-bit codes as they are (blocks.py), for `--keep-quant`.

GGUF                                    ours
    token_embd.weight                   tok_emb.weight
    blk.{i}.attn_norm.weight            blocks.{i}.attn_norm.weight
    blk.{i}.attn_q / attn_k .weight     blocks.{i}.attn.q_proj / k_proj .weight  (llama: un-permuted, rope.py)
    blk.{i}.attn_q / k / v .bias        blocks.{i}.attn.q_proj / k_proj / v_proj .bias  (qwen2)
    blk.{i}.attn_q_norm / attn_k_norm   blocks.{i}.attn.q_norm / k_norm .weight  (qwen3)
    blk.{i}.attn_v / attn_output        blocks.{i}.attn.v_proj / o_proj .weight
    blk.{i}.ffn_norm.weight             blocks.{i}.mlp_norm.weight
    blk.{i}.ffn_gate / ffn_up / ffn_down  blocks.{i}.mlp.gate_proj / up_proj / down_proj .weight
    output_norm.weight                  norm.weight
    output.weight (absent: tied)        lm_head.weight
GGUF lists a tensor's shape fastest-dimension first (ne0 = in_features), so the numpy array is
reshaped to the reversed shape, (out, in), which is nn.Linear's layout. Only the llama architecture
stores q/k rows in the interleaved RoPE layout (llama.cpp's converter permutes them for llama alone);
qwen2 and qwen3 use rotate-half RoPE (llama.cpp's NEOX mode) and keep Hugging Face's rows, which are ours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..tokenizer import GPT2_PAT, BPETokenizer
from .blocks import KEEPABLE, int4_codes
from .rope import unpermute
from .source import ConvertError, Source, Tensor, TensorMap
from .vocab import LLAMA3_PAT, QWEN2_PAT, ranks_from_vocab

# `tokenizer.ggml.pre` (llama.cpp's pre-tokenizer names) -> (regex, split digits one per token first)
GGUF_PRE = {
    "gpt2": (GPT2_PAT, False),
    "gpt-2": (GPT2_PAT, False),  # how llama.cpp's convert_hf_to_gguf.py spells GPT-2's
    "smollm": (GPT2_PAT, True),  # llama.cpp: digits one per token, then the GPT-2 regex
    "llama-bpe": (LLAMA3_PAT, False),
    "llama3": (LLAMA3_PAT, False),
    "qwen2": (QWEN2_PAT, False),  # Qwen2/2.5 and Qwen3: single digits
    "deepseek-r1-qwen": (QWEN2_PAT, False),  # DeepSeek-R1's Qwen distills: Qwen2's vocabulary and regex
}

# general.architecture -> whether llama.cpp stored q/k rows interleaved (they are un-permuted on import)
ARCHS = {"llama": True, "qwen2": False, "qwen3": False}

# Control tokens that end generation whatever the file's eos_token_id says (llama.cpp treats them so too):
# an instruct model's end of turn and its base model's end of text both stop a reply.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _fields(reader) -> dict:
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception:  # a value type the reader cannot decode: leave it out, we never need those
            pass
    return out


def config_from_gguf(meta: dict, shapes: dict[str, tuple]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise ConvertError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(map(repr, ARCHS))})")

    def get(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ConvertError(f"GGUF metadata has no {arch}.{key}")
        return v

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    if n_head < 1:
        raise ConvertError(f"GGUF {arch}.attention.head_count must be >= 1, got {n_head} (ModelConfig.n_head)")
    head_dim = int(get("attention.key_length", n_embd // n_head))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ConvertError("GGUF attention.value_length != key_length is not supported")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ConvertError("GGUF rope.dimension_count != head_dim (partial rotary) is not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in shapes:
        raise ConvertError(f"GGUF rope scaling ({scaling if scaling != 'none' else 'rope_freqs.weight'}) is not supported")
    vocab = shapes["token_embd.weight"][0] if "token_embd.weight" in shapes else len(meta.get("tokenizer.ggml.tokens", []))
    # the file stores eps as float32 (1e-5 -> 9.99999975e-06): take the shortest decimal that rounds to it
    eps = float(str(np.float32(get("attention.layer_norm_rms_epsilon"))))
    return ModelConfig(family="llama", vocab_size=int(vocab), block_size=int(get("context_length")),
                       n_layer=int(get("block_count")), n_head=n_head, n_embd=n_embd, head_dim=head_dim,
                       n_kv_head=int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
                       mlp_hidden=int(get("feed_forward_length")), bias=False, norm_eps=eps,
                       qkv_bias="blk.0.attn_q.bias" in shapes, qk_norm=arch == "qwen3",
                       rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
                       tie_embeddings="output.weight" not in shapes, attn_impl="sdpa")


def tokenizer_from_gguf(meta: dict, name: str) -> BPETokenizer:
    model = meta.get("tokenizer.ggml.model")
    if model in ("llama", "t5", "rwkv"):
        raise ConvertError(f"GGUF tokenizer model {model!r} is SentencePiece-style; SentencePiece tokenizers "
                           f"(Llama 2, TinyLlama, Mistral 7B, ...) are not supported, only byte-level BPE ('gpt2')")
    if model != "gpt2":
        raise ConvertError(f"GGUF tokenizer model {model!r} is not supported (only 'gpt2' byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE:
        raise ConvertError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(GGUF_PRE))}")
    pat, split_digits = GGUF_PRE[pre]
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ConvertError("GGUF metadata has no tokenizer.ggml.tokens (the token list): the file cannot be "
                           "tokenized for")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    # control and user-defined tokens are matched whole in text (llama.cpp and Hugging Face); unused ones
    # (Qwen's [PAD151665]...) are plain vocabulary entries that no text ever produces, as Hugging Face has them
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, USER_DEFINED)}
    if any(ty == BYTE for ty in types):
        raise ConvertError("GGUF tokenizer has <0xNN> byte tokens (SentencePiece byte fallback): not supported")
    vocab = {t: i for i, t in enumerate(tokens) if t not in specials}
    ranks = ranks_from_vocab(vocab, meta.get("tokenizer.ggml.merges") or [], specials, name)

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) and tokens[int(i)] in specials else None

    bos = tok("bos_token_id")
    eos = [t for t in (tok("eos_token_id"), tok("eot_token_id"), tok("eom_token_id")) if t]
    eos += sorted((t for t in END_TOKENS if t in specials), key=specials.get)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    return BPETokenizer(name, pat, ranks, specials, bos_token=bos, eos_tokens=list(dict.fromkeys(eos)), add_bos=add_bos,
                        chat_template=meta.get("tokenizer.chat_template"), pre_split_digits=split_digits)


DEQUANT_CHUNK = 1 << 22  # weights dequantized per gguf call: bounds the temporaries of a large tensor


def _dequantize(t, transform=None):
    """() -> GGUF tensor `t` as one float32 tensor (out, in), dequantized a slice of rows at a time (the
    K-quant code makes several temporaries of its input's size), then passed through `transform`."""
    def load():
        from gguf.quants import dequantize
        shape = tuple(reversed([int(n) for n in t.shape]))  # (out, in)
        out = torch.empty(shape, dtype=torch.float32)
        rows_out = out.view(-1, shape[-1]).numpy()  # writes land in `out`
        rows_in = t.data.reshape(rows_out.shape[0], -1)  # raw rows: elements, or the blocks of each row
        step = max(1, DEQUANT_CHUNK // shape[-1])
        for i in range(0, rows_out.shape[0], step):
            try:
                a = dequantize(rows_in[i:i + step], t.tensor_type)
            except NotImplementedError as e:
                raise ConvertError(f"GGUF tensor {t.name!r}: type {t.tensor_type.name} cannot be dequantized ({e})") from e
            if a.dtype == np.dtype("uint16") and t.tensor_type.name == "BF16":  # older gguf: bf16 raw bits
                a = (a.astype(np.uint32) << 16).view(np.float32)
            rows_out[i:i + step] = a.reshape(-1, shape[-1])
        return transform(out) if transform else out
    return load


def _codes(t, transform=None):
    """For a Q4_0/Q4_1/Q4_K matrix: () -> (q, scale, zero) (blocks.py), rows put in our order by `transform`; else None."""
    if t.tensor_type.name not in KEEPABLE or len(t.shape) != 2:
        return None
    shape = tuple(reversed([int(n) for n in t.shape]))

    def load():
        parts = int4_codes(t.data, t.tensor_type.name, shape)
        return tuple(transform(p) for p in parts) if transform else parts
    return load


def load_gguf(path: Path) -> Source:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ConvertError("reading GGUF needs the `gguf` package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise ConvertError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated") from e
    meta = _fields(reader)
    by_name = {t.name: t for t in reader.tensors}
    shapes = {n: tuple(int(x) for x in reversed(t.shape)) for n, t in by_name.items()}  # (out, in)
    try:
        cfg = config_from_gguf(meta, shapes)
    except (ValueError, TypeError, ArithmeticError) as e:  # ConvertError, ModelConfig's checks, a head count of 0
        raise ConvertError(f"{path}: {e}") from None
    arch = meta["general.architecture"]
    tensors = _llama_map(cfg, by_name, shapes, permuted=ARCHS[arch])
    try:
        tokenizer = tokenizer_from_gguf(meta, path.stem)
    except (ValueError, TypeError, KeyError) as e:  # ConvertError, malformed merges or token ids
        raise ConvertError(f"{path}: tokenizer: {e}") from None
    provenance = {"source": str(Path(path).resolve()), "source_format": "gguf", "general.architecture": arch,
                  "general.name": meta.get("general.name"), "general.file_type": meta.get("general.file_type")}
    return Source(cfg, tokenizer, tensors, provenance, [Path(path)])


def _llama_map(cfg: ModelConfig, by_name: dict, shapes: dict[str, tuple[int, ...]], permuted: bool) -> dict[str, Tensor]:
    """Our names -> recipes (dequantize; q/k rows un-permuted if `permuted`), every GGUF tensor used exactly once."""
    def recipe(name: str, transform, shape: tuple[int, ...]) -> Tensor:
        t = by_name[name]
        return Tensor(shape, _dequantize(t, transform), name, kind=t.tensor_type.name, codes=_codes(t, transform))

    m = TensorMap(shapes, "the GGUF metadata", recipe)
    C, H, hd = cfg.n_embd, cfg.mlp_hidden, cfg.head_dim
    rows = {"q": cfg.n_head * hd, "k": cfg.n_kv_head * hd, "v": cfg.n_kv_head * hd}
    order = {"q": (lambda w: unpermute(w, cfg.n_head)) if permuted else None,  # rows and biases alike
             "k": (lambda w: unpermute(w, cfg.n_kv_head)) if permuted else None, "v": None}
    m.take("tok_emb.weight", "token_embd.weight", (cfg.vocab_size, C))
    for i in range(cfg.n_layer):
        g, b = f"blk.{i}.", f"blocks.{i}."
        m.take(f"{b}attn_norm.weight", f"{g}attn_norm.weight", (C,))
        for x in "qkv":
            m.take(f"{b}attn.{x}_proj.weight", f"{g}attn_{x}.weight", (rows[x], C), order[x])
            if cfg.qkv_bias:
                m.take(f"{b}attn.{x}_proj.bias", f"{g}attn_{x}.bias", (rows[x],), order[x])
        if cfg.qk_norm:  # over one head's channels: the same for every head, and never permuted (qwen3 only)
            m.take(f"{b}attn.q_norm.weight", f"{g}attn_q_norm.weight", (hd,))
            m.take(f"{b}attn.k_norm.weight", f"{g}attn_k_norm.weight", (hd,))
        m.take(f"{b}attn.o_proj.weight", f"{g}attn_output.weight", (C, cfg.n_head * hd))
        m.take(f"{b}mlp_norm.weight", f"{g}ffn_norm.weight", (C,))
        m.take(f"{b}mlp.gate_proj.weight", f"{g}ffn_gate.weight", (H, C))
        m.take(f"{b}mlp.up_proj.weight", f"{g}ffn_up.weight", (H, C))
        m.take(f"{b}mlp.down_proj.weight", f"{g}ffn_down.weight", (C, H))
    m.take("norm.weight", "output_norm.weight", (C,))
    if not cfg.tie_embeddings:
        m.take("lm_head.weight", "output.weight", (cfg.vocab_size, C))
    unused = m.unused()
    if unused:
        raise ConvertError(f"GGUF tensor {unused[0]!r} is not used by a llama model ({len(unused)} unused); "
                           f"unsupported architecture variant?")
    return m.tensors
