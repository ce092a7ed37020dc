"""Our checkpoint -> a Hugging Face model directory that `transformers` loads.

    python -m minillm.export weights/NAME.safetensors --out DIR

writes DIR/config.json, DIR/model.safetensors, DIR/generation_config.json and the tokenizer:
DIR/tokenizer.json + DIR/tokenizer_config.json (loadable with AutoTokenizer / PreTrainedTokenizerFast).
The name maps are the inverse of convert/hf.py: gpt2 -> GPT2LMHeadModel (Linear weights transposed into
Conv1D's (in, out), q/k/v concatenated into c_attn), llama -> LlamaForCausalLM, or Qwen2ForCausalLM with
qkv_bias, Qwen3ForCausalLM with qk_norm (names only; our RoPE layout is HF's). A gpt2-family model
trained without biases gets zero biases, which changes nothing.

Tokenizers: BPE becomes a byte-level BPE tokenizer.json (vocab in GPT-2's printable byte alphabet,
merges recovered from the ranks, the pre-tokenizer regex, special tokens as added tokens); a char
tokenizer becomes a WordLevel tokenizer that splits text into single characters.
The directory is built beside DIR under a temporary name and renamed at the end: nothing is left
behind on failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import atomic_save, check_output, load_model
from .flags import Parser, add_input, add_output, fail
from .config import ModelConfig
from .tokenizer import GPT2_PAT, bytes_to_token, merges_from_ranks


class ExportError(ValueError):
    pass


# ----------------------------------------------------------------------------- weights and config

def hf_config(cfg: ModelConfig, tokenizer, dtype: torch.dtype) -> dict:
    bos = getattr(tokenizer, "bos_id", None)
    eos = getattr(tokenizer, "eos_id", None)
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": bos,
              "eos_token_id": eos, "dtype": str(dtype).removeprefix("torch.")}
    if cfg.family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_inner": cfg.mlp_hidden, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, **cfg.rope_scaling}
    arch, model_type, extra = _llama_class(cfg)
    return {"architectures": [arch], "model_type": model_type, **common, **extra,
            "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
            "rope_parameters": rope,  # transformers >= 5
            "rope_theta": cfg.rope_theta, "rope_scaling": rope if cfg.rope_scaling else None}  # transformers 4


def _llama_class(cfg: ModelConfig) -> tuple[str, str, dict]:
    """The Hugging Face class of a llama-family config: (architecture, model_type, its own config keys).
    Qwen2: biases on q, k, v only; Qwen3: q/k RMSNorm, no biases; Llama: biases on every Linear or none."""
    if cfg.qk_norm:
        if cfg.bias or cfg.qkv_bias:
            raise ExportError("a model with q/k norms and biases has no Hugging Face class (Qwen3 has no MLP biases)")
        return "Qwen3ForCausalLM", "qwen3", {"attention_bias": False, "use_sliding_window": False}
    if cfg.qkv_bias and not cfg.bias:
        return "Qwen2ForCausalLM", "qwen2", {"use_sliding_window": False}
    return "LlamaForCausalLM", "llama", {"attention_bias": bool(cfg.bias), "mlp_bias": bool(cfg.bias)}


def hf_tensors(model) -> dict[str, torch.Tensor]:
    cfg = model.config
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    if cfg.family == "gpt2":
        zeros = lambda n: torch.zeros(n, dtype=sd["tok_emb.weight"].dtype)  # noqa: E731
        bias = lambda key, n: sd.get(key, None) if cfg.bias else zeros(n)  # noqa: E731
        out["transformer.wte.weight"] = sd["tok_emb.weight"]
        out["transformer.wpe.weight"] = sd["pos_emb.weight"]
        C = cfg.n_embd
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[f"{h}{theirs}.weight"] = sd[f"{b}{ours}.weight"]
                out[f"{h}{theirs}.bias"] = bias(f"{b}{ours}.bias", C)
            qkv = [sd[f"{b}attn.{x}_proj.weight"] for x in "qkv"]
            out[f"{h}attn.c_attn.weight"] = torch.cat(qkv, 0).t().contiguous()  # Conv1D: (in, 3C)
            out[f"{h}attn.c_attn.bias"] = torch.cat([bias(f"{b}attn.{x}_proj.bias", C) for x in "qkv"])
            for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"), ("mlp.down_proj", "mlp.c_proj")):
                w = sd[f"{b}{ours}.weight"]
                out[f"{h}{theirs}.weight"] = w.t().contiguous()
                out[f"{h}{theirs}.bias"] = bias(f"{b}{ours}.bias", w.shape[0])
        out["transformer.ln_f.weight"] = sd["norm.weight"]
        out["transformer.ln_f.bias"] = bias("norm.bias", C)
    else:
        out["model.embed_tokens.weight"] = sd["tok_emb.weight"]
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            out[f"{h}input_layernorm.weight"] = sd[f"{b}attn_norm.weight"]
            out[f"{h}post_attention_layernorm.weight"] = sd[f"{b}mlp_norm.weight"]
            for x in "qkvo":
                biased = cfg.bias or (cfg.qkv_bias and x != "o")
                for kind in ("weight", "bias") if biased else ("weight",):
                    out[f"{h}self_attn.{x}_proj.{kind}"] = sd[f"{b}attn.{x}_proj.{kind}"]
            if cfg.qk_norm:
                out[f"{h}self_attn.q_norm.weight"] = sd[f"{b}attn.q_norm.weight"]
                out[f"{h}self_attn.k_norm.weight"] = sd[f"{b}attn.k_norm.weight"]
            for x in ("gate", "up", "down"):
                for kind in ("weight", "bias") if cfg.bias else ("weight",):
                    out[f"{h}mlp.{x}_proj.{kind}"] = sd[f"{b}mlp.{x}_proj.{kind}"]
        out["model.norm.weight"] = sd["norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- tokenizer

def hf_tokenizer_files(tokenizer, block_size: int) -> dict[str, dict]:
    """tokenizer.json and tokenizer_config.json contents for `tokenizer`."""
    if tokenizer.kind == "char":
        tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
              "pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"[\s\S]"}, "behavior": "Isolated", "invert": False},
              "post_processor": None, "decoder": {"type": "Fuse"},
              "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(tokenizer.chars)}, "unk_token": "\ufffd"}}
        return {"tokenizer.json": tj, "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast",
                                                                "model_max_length": block_size}}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    if tokenizer.pat_str == GPT2_PAT:  # HF's own GPT-2 regex (tiktoken's is a faster equivalent)
        steps = [{**byte_level, "use_regex": True}]
    else:
        steps = [{"type": "Split", "pattern": {"Regex": tokenizer.pat_str}, "behavior": "Isolated", "invert": False}, byte_level]
    if tokenizer.pre_split_digits:
        steps = [{"type": "Digits", "individual_digits": True}, *steps]
    vocab = {bytes_to_token(b): r for b, r in tokenizer.ranks.items()}
    vocab.update(tokenizer.special_tokens)  # HF keeps added tokens in the vocab too (else it renumbers them)
    merges = [[bytes_to_token(a), bytes_to_token(b)] for a, b in merges_from_ranks(tokenizer.ranks)]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])]
    post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if tokenizer.add_bos and tokenizer.bos_token:
        bos = tokenizer.bos_token
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}}}
    norm = {"type": tokenizer.normalize} if getattr(tokenizer, "normalize", None) else None  # Qwen2: NFC
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": norm,
          "pre_tokenizer": steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps},
          "post_processor": post, "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                              "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": vocab, "merges": merges}}
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
          "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_tokens[0] if tokenizer.eos_tokens else None,
          "add_bos_token": bool(tokenizer.add_bos)}
    if tokenizer.chat_template:
        tc["chat_template"] = tokenizer.chat_template
    return {"tokenizer.json": tj, "tokenizer_config.json": tc}


# ----------------------------------------------------------------------------- entry

def export_hf(ckpt: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a Hugging Face directory for checkpoint `ckpt` at `out_dir` (created; its parent must exist)."""
    out_dir = Path(out_dir)
    try:  # a folder (not a file) in a folder that exists
        check_output(out_dir, "--out", folder=True)
    except OSError as e:
        raise ExportError(str(e)) from None
    if not os.access(out_dir.parent, os.W_OK | os.X_OK):  # it is made beside, then renamed into place
        raise ExportError(f"--out {out_dir}: folder {out_dir.parent} is not writable")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"--out {out_dir} is not empty (pass overwrite=True / --overwrite to replace it)")
    loaded = load_model(ckpt)
    model, tok, cfg = loaded.model, loaded.tokenizer, loaded.config
    dtype = model.tok_emb.weight.dtype
    tmp = out_dir.with_name(f".{out_dir.name}.{secrets.token_hex(4)}.tmp")
    os.mkdir(tmp, 0o777)  # the mode any new folder gets here: 0o777 less the umask (mkdtemp's is 0o700)
    try:
        atomic_save(hf_tensors(model), tmp / "model.safetensors", {"format": "pt"})  # the umask's mode too
        config = hf_config(cfg, tok, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {"bos_token_id": config["bos_token_id"],
               "eos_token_id": sorted(tok.eos_ids) if len(tok.eos_ids) > 1 else config["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for name, content in hf_tokenizer_files(tok, cfg.block_size).items():
            (tmp / name).write_text(json.dumps(content, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        if out_dir.is_dir():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def make_parser() -> Parser:
    ap = Parser(prog="python -m minillm.export",
                                 description="Export a minillm checkpoint as a Hugging Face model directory "
                                             "(config.json, model.safetensors, tokenizer.json) that transformers loads.")
    add_input(ap, "ckpt", help="our checkpoint, e.g. weights/NAME.safetensors")
    add_output(ap, "--out", required=True, folder=True, replaces=True,
               help="output directory (created; its parent must exist)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return ap


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    try:
        out = export_hf(args.ckpt, args.out, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # ExportError, CheckpointError, a missing checkpoint, a failed write
        return fail(str(e))
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
