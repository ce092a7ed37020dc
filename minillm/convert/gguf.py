"""GGUF files (llama.cpp) -> Source: metadata -> config, tokenizer.ggml.* -> BPE tokenizer, tensors dequantized.

Read with the `gguf` package (GGUFReader memory-maps the file; nothing is loaded until a tensor is
dequantized). Supported: `general.architecture` = llama (LLaMA, SmolLM2, Llama 3.x without rope_freqs),
tensor types F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the K-quants that gguf.quants can dequantize.
Q4_0 and Q4_1 tensors also offer their 4-bit codes as they are (`q4_codes`), for `--keep-quant`.

GGUF (llama arch)                       ours
    token_embd.weight                   tok_emb.weight
    blk.{i}.attn_norm.weight            blocks.{i}.attn_norm.weight
    blk.{i}.attn_q.weight / attn_k      blocks.{i}.attn.q_proj / k_proj .weight  (un-permuted: rope.py)
    blk.{i}.attn_v / attn_output        blocks.{i}.attn.v_proj / o_proj .weight
    blk.{i}.ffn_norm.weight             blocks.{i}.mlp_norm.weight
    blk.{i}.ffn_gate / ffn_up / ffn_down  blocks.{i}.mlp.gate_proj / up_proj / down_proj .weight
    output_norm.weight                  norm.weight
    output.weight (absent: tied)        lm_head.weight
GGUF lists a tensor's shape fastest-dimension first (ne0 = in_features), so the numpy array is
reshaped to the reversed shape, (out, in), which is nn.Linear's layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..tokenizer import GPT2_PAT, BPETokenizer
from .rope import unpermute
from .source import ConvertError, Source, Tensor, TensorMap
from .vocab import LLAMA3_PAT, ranks_from_vocab

# `tokenizer.ggml.pre` (llama.cpp's pre-tokenizer names) -> (regex, split digits one per token first)
GGUF_PRE = {
    "gpt2": (GPT2_PAT, False),
    "gpt-2": (GPT2_PAT, False),  # how llama.cpp's convert_hf_to_gguf.py spells GPT-2's
    "smollm": (GPT2_PAT, True),  # llama.cpp: digits one per token, then the GPT-2 regex
    "llama-bpe": (LLAMA3_PAT, False),
    "llama3": (LLAMA3_PAT, False),
}

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
    if arch != "llama":
        raise ConvertError(f"GGUF architecture {arch!r} is not supported (supported: 'llama')")

    def get(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ConvertError(f"GGUF metadata has no {arch}.{key}")
        return v

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    if int(meta.get(f"{arch}.rope.dimension_count", n_embd // n_head)) != n_embd // n_head:
        raise ConvertError("GGUF rope.dimension_count != head_dim (partial rotary) is not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in shapes:
        raise ConvertError(f"GGUF rope scaling ({scaling if scaling != 'none' else 'rope_freqs.weight'}) is not supported")
    vocab = shapes["token_embd.weight"][0] if "token_embd.weight" in shapes else len(meta.get("tokenizer.ggml.tokens", []))
    # the file stores eps as float32 (1e-5 -> 9.99999975e-06): take the shortest decimal that rounds to it
    eps = float(str(np.float32(get("attention.layer_norm_rms_epsilon"))))
    return ModelConfig(family="llama", vocab_size=int(vocab), block_size=int(get("context_length")),
                       n_layer=int(get("block_count")), n_head=n_head, n_embd=n_embd,
                       n_kv_head=int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
                       mlp_hidden=int(get("feed_forward_length")), bias=False, norm_eps=eps,
                       rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
                       tie_embeddings="output.weight" not in shapes, attn_impl="sdpa")


def tokenizer_from_gguf(meta: dict, name: str) -> BPETokenizer:
    model = meta.get("tokenizer.ggml.model")
    if model in ("llama", "t5", "rwkv"):
        raise ConvertError(f"GGUF tokenizer model {model!r} is SentencePiece-style; SentencePiece tokenizers "
                           f"(Llama 2, TinyLlama, ...) are not supported, only byte-level BPE ('gpt2')")
    if model != "gpt2":
        raise ConvertError(f"GGUF tokenizer model {model!r} is not supported (only 'gpt2' byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE:
        raise ConvertError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(sorted(GGUF_PRE))}")
    pat, split_digits = GGUF_PRE[pre]
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, USER_DEFINED, UNUSED)}
    if any(ty == BYTE for ty in types):
        raise ConvertError("GGUF tokenizer has <0xNN> byte tokens (SentencePiece byte fallback): not supported")
    vocab = {t: i for i, t in enumerate(tokens) if t not in specials}
    ranks = ranks_from_vocab(vocab, meta.get("tokenizer.ggml.merges") or [], specials, name)

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) and tokens[int(i)] in specials else None

    bos = tok("bos_token_id")
    eos = [t for t in (tok("eos_token_id"), tok("eot_token_id"), tok("eom_token_id")) if t]
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    return BPETokenizer(name, pat, ranks, specials, bos_token=bos, eos_tokens=list(dict.fromkeys(eos)), add_bos=add_bos,
                        chat_template=meta.get("tokenizer.chat_template"), pre_split_digits=split_digits)


def _dequantize(t, transform=None):
    def load():
        from gguf.quants import dequantize
        try:
            a = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ConvertError(f"GGUF tensor {t.name!r}: type {t.tensor_type.name} cannot be dequantized ({e})") from e
        if a.dtype == np.dtype("uint16") and t.tensor_type.name == "BF16":  # older gguf: bf16 raw bits
            a = (a.astype(np.uint32) << 16).view(np.float32)
        shape = tuple(reversed([int(n) for n in t.shape]))  # (out, in)
        x = torch.from_numpy(a.astype(np.float32)).reshape(shape)  # astype copies: the memmap is read-only
        return transform(x) if transform else x
    return load


# Q4_0 / Q4_1 blocks: 32 consecutive inputs of one row share a float16 scale d (and, Q4_1, a minimum m);
# bytes = d [, m], then 16 bytes of codes: byte j holds input j in its low nibble and input j + 16 in
# its high nibble. Q4_0: w = d * (q - 8); Q4_1: w = d * q + m. Ours (minillm.quantize): w = (q - 8) * scale + zero,
# so scale = d with zero = 0 (Q4_0) or m + 8 d (Q4_1): same codes, same values (zero computed in float32).
Q4_BLOCK = {"Q4_0": 18, "Q4_1": 20}  # bytes per block of 32


def q4_codes(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw Q4_0/Q4_1 bytes of an (N, K) matrix -> q uint8 (N, K) in [0, 15], scale, zero float32 (N, K/32)."""
    N, K = shape
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(N, K // 32, Q4_BLOCK[type_name])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, K/32)
    if type_name == "Q4_1":
        zero = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * d
    else:
        zero = np.zeros_like(d)
    qs = blocks[..., -16:]  # (N, K/32, 16)
    q = np.concatenate((qs & 0xF, qs >> 4), axis=-1).reshape(N, K)  # inputs 0..15, then 16..31 of each block
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zero)


def _codes(t, transform=None):
    """For a Q4_0/Q4_1 tensor: () -> (q, scale, zero), rows put in our order by `transform`; else None."""
    if t.tensor_type.name not in Q4_BLOCK:
        return None
    shape = tuple(reversed([int(n) for n in t.shape]))

    def load():
        parts = q4_codes(t.data, t.tensor_type.name, shape)
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
    except (ValueError, TypeError) as e:  # ConvertError, and ModelConfig's own checks (n_head must divide n_embd, ...)
        raise ConvertError(f"{path}: {e}") from None
    tensors = _llama_map(cfg, by_name, shapes)
    tokenizer = tokenizer_from_gguf(meta, path.stem)
    provenance = {"source": str(Path(path).resolve()), "source_format": "gguf",
                  "general.name": meta.get("general.name"), "general.file_type": meta.get("general.file_type")}
    return Source(cfg, tokenizer, tensors, provenance, [Path(path)])


def _llama_map(cfg: ModelConfig, by_name: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Our names -> recipes (dequantize; q/k rows un-permuted), every GGUF tensor used exactly once."""
    def recipe(name: str, transform, shape: tuple[int, ...]) -> Tensor:
        t = by_name[name]
        return Tensor(shape, _dequantize(t, transform), name, kind=t.tensor_type.name, codes=_codes(t, transform))

    m = TensorMap(shapes, "the GGUF metadata", recipe)
    C, H, hd = cfg.n_embd, cfg.mlp_hidden, cfg.head_dim
    m.take("tok_emb.weight", "token_embd.weight", (cfg.vocab_size, C))
    for i in range(cfg.n_layer):
        g, b = f"blk.{i}.", f"blocks.{i}."
        m.take(f"{b}attn_norm.weight", f"{g}attn_norm.weight", (C,))
        m.take(f"{b}attn.q_proj.weight", f"{g}attn_q.weight", (cfg.n_head * hd, C), lambda w: unpermute(w, cfg.n_head))
        m.take(f"{b}attn.k_proj.weight", f"{g}attn_k.weight", (cfg.n_kv_head * hd, C), lambda w: unpermute(w, cfg.n_kv_head))
        m.take(f"{b}attn.v_proj.weight", f"{g}attn_v.weight", (cfg.n_kv_head * hd, C))
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
