"""Hugging Face model directories (and hub ids) -> Source: config, tokenizer, and the tensor name map.

Supported: GPT2LMHeadModel, LlamaForCausalLM (also SmolLM/SmolLM2, TinyLlama's weights, Llama 3.x),
MistralForCausalLM (a Llama under another name), Qwen2ForCausalLM (biases on q, k and v: qkv_bias) and
Qwen3ForCausalLM (RMSNorm on each head's q and k: qk_norm; an explicit head_dim). Weights as model.safetensors,
sharded *.safetensors with model.safetensors.index.json, or pytorch_model.bin (sharded too), read with
torch.load(weights_only=True): no pickle code ever runs.

The name maps below are the whole story of how their models become ours:

GPT-2 (HF name, after an optional "transformer." prefix)   ours
    wte.weight, wpe.weight                                   tok_emb.weight, pos_emb.weight
    h.{i}.ln_1.*, h.{i}.ln_2.*                               blocks.{i}.attn_norm.*, blocks.{i}.mlp_norm.*
    h.{i}.attn.c_attn.weight  (in, 3C), .bias (3C,)         blocks.{i}.attn.{q,k,v}_proj: transposed, split in 3
    h.{i}.attn.c_proj, h.{i}.mlp.c_fc, h.{i}.mlp.c_proj      attn.o_proj, mlp.up_proj, mlp.down_proj: transposed
    ln_f.*                                                   norm.*
GPT-2 uses Conv1D layers, which store weights as (in, out), the transpose of nn.Linear's (out, in).
Old checkpoints also hold h.{i}.attn.bias / masked_bias: the causal-mask buffers, not weights (ignored).

LLaMA (HF name)                                              ours
    model.embed_tokens.weight                                tok_emb.weight
    model.layers.{i}.input_layernorm.weight                  blocks.{i}.attn_norm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight         blocks.{i}.attn.{q,k,v,o}_proj.weight (as is:
                                                             HF's rotate-half RoPE layout is ours, see rope.py)
    model.layers.{i}.self_attn.{q,k,v}_proj.bias             blocks.{i}.attn.{q,k,v}_proj.bias (Qwen2)
    model.layers.{i}.self_attn.{q,k}_norm.weight             blocks.{i}.attn.{q,k}_norm.weight (Qwen3)
    model.layers.{i}.post_attention_layernorm.weight         blocks.{i}.mlp_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight          blocks.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight, lm_head.weight (untied only)          norm.weight, lm_head.weight
A tied model's lm_head.weight, if saved anyway, is a copy of the embedding and is ignored.

Sliding-window attention (Mistral 7B v0.1's `sliding_window`, Qwen's `use_sliding_window`): a query sees
only the last `sliding_window` positions, itself included. On a sequence no longer than the window that
is plain causal attention, so the context (block_size) is capped at the window: exact up to there, and
the provenance says so. Our model has no windowed attention to go further.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path, PurePath, PureWindowsPath

import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..tokenizer import GPT2_PAT, BPETokenizer, CharTokenizer
from .source import ConvertError, Source, Tensor, TensorMap
from .vocab import LLAMA3_PAT, ranks_from_vocab

SUPPORTED = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
             "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}  # architecture -> model_type
MODEL_TYPES = {t: ("gpt2" if t == "gpt2" else "llama") for t in SUPPORTED.values()}  # model_type -> our family


# ----------------------------------------------------------------------------- hub

def download_hub(repo_id: str) -> Path:
    """Download a hub model's config, weights and tokenizer files (huggingface_hub, cached)."""
    hint = (f"download it on a machine with internet access (e.g. `huggingface-cli download {repo_id} --local-dir DIR`) "
            f"and pass the local directory instead")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConvertError(f"{repo_id!r} is not a local path and huggingface_hub is not installed to fetch it from the hub; "
                           f"pip install huggingface_hub, or {hint}") from None
    text_files = ["*.json", "merges.txt", "vocab.json", "tokenizer.model", "*.jinja"]
    try:
        d = Path(snapshot_download(repo_id, allow_patterns=text_files + ["*.safetensors"]))
        if not list(d.glob("*.safetensors")):  # older repos: pytorch_model*.bin only
            d = Path(snapshot_download(repo_id, allow_patterns=text_files + ["pytorch_model*.bin"]))
    except Exception as e:
        raise ConvertError(f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
                           f"If you are offline, {hint}") from e
    return d


# ----------------------------------------------------------------------------- weights

def read_json(path: Path) -> dict:
    """A JSON object from `path`; a ConvertError names the file when it is not valid JSON or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path}: a JSON {type(value).__name__}, where an object ({{...}}) belongs")
    return value


class Weights:
    """Names and shapes of every tensor in a HF directory, read lazily (safetensors) or once (.bin)."""

    def __init__(self, d: Path):
        self.dir = d
        self.where: dict[str, Path] = {}  # tensor name -> file
        self._open: dict[Path, object] = {}
        self._bin: dict[Path, dict] = {}
        files = self._files(d)
        for f in files:
            for name in self._names(f):
                self.where[name] = f

    @staticmethod
    def _files(d: Path) -> list[Path]:
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (d / index).is_file():
                weight_map = read_json(d / index).get("weight_map")
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise ConvertError(f"{d / index}: no 'weight_map' of tensor names to shard file names")
                for name in sorted(set(weight_map.values())):  # confined to the folder: no absolute path, no ..
                    outside = PurePath(name).is_absolute() or PureWindowsPath(name).is_absolute()
                    if outside or ".." in re.split(r"[/\\]", name):
                        raise ConvertError(f"{d / index} names shard {name!r}, outside its folder; shard names "
                                           f"must be file names inside {d}")
                files = sorted({d / f for f in weight_map.values()})
                absent = [f.name for f in files if not f.is_file()]
                if absent:
                    raise ConvertError(f"{d / index} names shard {absent[0]}, which is missing")
                return files
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (d / single).is_file():
                return [d / single]
        raise ConvertError(f"{d}: no weights found (expected model.safetensors, sharded *.safetensors with "
                           f"model.safetensors.index.json, or pytorch_model.bin)")

    def _names(self, f: Path) -> list[str]:
        if f.suffix == ".safetensors":
            try:
                h = safe_open(str(f), framework="pt")
                names = list(h.keys())
            except Exception as e:
                raise ConvertError(f"{f}: not a readable safetensors file ({e}); it may be truncated") from e
            self._open[f] = h
            return names
        try:  # weights_only: tensors and plain containers only, no arbitrary pickled code
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise ConvertError(f"{f}: cannot be loaded safely with torch.load(weights_only=True) ({e}); "
                                   f"only plain tensor state dicts are accepted") from e
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConvertError(f"{f}: cannot be loaded safely with torch.load(weights_only=True) "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                               f"only plain tensor state dicts are accepted, nothing was executed") from e
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ConvertError(f"{f}: not a state dict of tensors")
        self._bin[f] = sd
        return list(sd)

    def shape(self, name: str) -> tuple[int, ...]:
        f = self.where[name]
        if f in self._bin:
            return tuple(self._bin[f][name].shape)
        return tuple(self._open[f].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        t = self._bin[f][name] if f in self._bin else self._open[f].get_tensor(name)
        return t.float() if t.is_floating_point() else t

    def tensor_map(self) -> TensorMap:
        """A TensorMap over this directory's tensors: each recipe reads its tensor lazily, as float."""
        def recipe(name: str, transform, shape: tuple[int, ...]) -> Tensor:
            return Tensor(shape, (lambda: transform(self.get(name))) if transform else (lambda: self.get(name)), name)
        return TensorMap({name: self.shape(name) for name in self.where}, "config.json", recipe)


# ----------------------------------------------------------------------------- config

def _rope(c: dict) -> tuple[float, dict | None]:
    """rope_theta and llama3 scaling from either transformers 5 (`rope_parameters`) or 4 (`rope_theta`, `rope_scaling`)."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or params
    theta = float(params.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConvertError(f"rope scaling type {kind!r} is not supported (only llama3 scaling)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {k: scaling[k] for k in keys}


def config_from_hf(c: dict) -> ModelConfig:
    arch = (c.get("architectures") or [None])[0]
    kind = SUPPORTED.get(arch) if arch else c.get("model_type")
    if kind not in MODEL_TYPES:
        raise ConvertError(f"unsupported architecture {arch or c.get('model_type')!r}; supported: {', '.join(SUPPORTED)} "
                           f"(and SmolLM/TinyLlama/Llama 3.x, which are LlamaForCausalLM)")
    try:
        return _gpt2_config(c) if kind == "gpt2" else _llama_config(c, kind)
    except KeyError as e:
        raise ConvertError(f"config.json has no {e.args[0]!r}, which a {MODEL_TYPES[kind]} model needs") from None


def _gpt2_config(c: dict) -> ModelConfig:
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConvertError(f"GPT-2 activation {act!r} is not supported (ours is tanh-approximated GELU)")
    if not c.get("scale_attn_weights", True) or c.get("scale_attn_by_inverse_layer_idx", False):
        raise ConvertError("GPT-2 attention scaling variants (scale_attn_weights=False, "
                           "scale_attn_by_inverse_layer_idx) are not supported")
    return ModelConfig(family="gpt2", vocab_size=c["vocab_size"], block_size=c["n_positions"],
                       n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                       mlp_hidden=c.get("n_inner") or 4 * c["n_embd"], bias=True,
                       norm_eps=c.get("layer_norm_epsilon", 1e-5),
                       tie_embeddings=c.get("tie_word_embeddings", True), attn_impl="sdpa")


def _llama_config(c: dict, kind: str) -> ModelConfig:
    """A LLaMA-family config: llama and mistral (biases on every Linear or none), qwen2 (biases on q, k
    and v only, always), qwen3 (q/k RMSNorm; `attention_bias` would put biases on q, k, v and o only)."""
    if c.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"LLaMA activation {c['hidden_act']!r} is not supported (SwiGLU uses silu)")
    attn_bias, mlp_bias = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
    if kind == "qwen2":  # its attention has q/k/v biases and an unbiased o_proj whatever the config says
        attn_bias = mlp_bias = False
    if kind == "qwen3" and attn_bias:
        raise ConvertError("Qwen3 attention_bias=True (biases on q, k, v and o, none in the MLP) is not supported")
    if attn_bias != mlp_bias:
        raise ConvertError("attention_bias != mlp_bias is not supported (our bias flag covers every linear layer)")
    n_head, n_layer = c["num_attention_heads"], c["num_hidden_layers"]
    theta, scaling = _rope(c)
    window = _sliding_window(c, n_layer)
    return ModelConfig(family="llama", vocab_size=c["vocab_size"], n_layer=n_layer, n_head=n_head,
                       block_size=min(c["max_position_embeddings"], window or c["max_position_embeddings"]),
                       n_embd=c["hidden_size"], head_dim=c.get("head_dim") or c["hidden_size"] // n_head,
                       n_kv_head=c.get("num_key_value_heads") or n_head, mlp_hidden=c["intermediate_size"],
                       bias=attn_bias, qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3",
                       norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
                       tie_embeddings=c.get("tie_word_embeddings", False), attn_impl="sdpa")


def _sliding_window(c: dict, n_layer: int) -> int | None:
    """The attention window some layer of this config uses, or None when every layer sees the whole context:
    transformers 5's `layer_types`, else Qwen's use_sliding_window (from layer max_window_layers on), else
    Mistral's sliding_window (every layer)."""
    window = c.get("sliding_window")
    if not window:
        return None
    if isinstance(c.get("layer_types"), list):
        used = "sliding_attention" in c["layer_types"]
    elif "use_sliding_window" in c or c.get("model_type") in ("qwen2", "qwen3"):
        used = bool(c.get("use_sliding_window")) and c.get("max_window_layers", n_layer) < n_layer
    else:
        used = True
    return int(window) if used else None


# ----------------------------------------------------------------------------- name maps

def _gpt2_map(cfg: ModelConfig, w: Weights) -> tuple[dict[str, Tensor], list[str]]:
    """Our names -> recipes for a GPT-2 directory, and the source tensors left unused."""
    pre = "transformer." if "transformer.wte.weight" in w.where else ""
    C, H = cfg.n_embd, cfg.mlp_hidden
    m = w.tensor_map()

    def take(ours, theirs, *rest):  # every name but lm_head's sits under the optional prefix
        m.take(ours, pre + theirs, *rest)

    take("tok_emb.weight", "wte.weight", (cfg.vocab_size, C))
    take("pos_emb.weight", "wpe.weight", (cfg.block_size, C))
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            take(f"{b}{ours}.weight", f"{h}{theirs}.weight", (C,))
            take(f"{b}{ours}.bias", f"{h}{theirs}.bias", (C,))
        for j, x in enumerate("qkv"):  # c_attn: (C, 3C) Conv1D = [q | k | v] columns
            take(f"{b}attn.{x}_proj.weight", f"{h}attn.c_attn.weight", (C, 3 * C),
                 lambda t, j=j: t[:, j * C:(j + 1) * C].t(), (C, C))
            take(f"{b}attn.{x}_proj.bias", f"{h}attn.c_attn.bias", (3 * C,), lambda t, j=j: t[j * C:(j + 1) * C], (C,))
        for ours, theirs, shape in (("attn.o_proj", "attn.c_proj", (C, C)), ("mlp.up_proj", "mlp.c_fc", (C, H)),
                                    ("mlp.down_proj", "mlp.c_proj", (H, C))):
            take(f"{b}{ours}.weight", f"{h}{theirs}.weight", shape, lambda t: t.t(), shape[::-1])
            take(f"{b}{ours}.bias", f"{h}{theirs}.bias", (shape[1],))
    take("norm.weight", "ln_f.weight", (C,))
    take("norm.bias", "ln_f.bias", (C,))
    if not cfg.tie_embeddings:
        m.take("lm_head.weight", "lm_head.weight", (cfg.vocab_size, C))
    return m.tensors, m.unused(ignore=re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$|^lm_head\.weight$"))


def _llama_map(cfg: ModelConfig, w: Weights) -> tuple[dict[str, Tensor], list[str]]:
    """Our names -> recipes for a LLaMA-style directory (Llama, Mistral, Qwen2, Qwen3; names only: the
    layouts are ours), and the unused rest."""
    C, H, hd = cfg.n_embd, cfg.mlp_hidden, cfg.head_dim
    m = w.tensor_map()
    m.take("tok_emb.weight", "model.embed_tokens.weight", (cfg.vocab_size, C))
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        m.take(f"{b}attn_norm.weight", f"{h}input_layernorm.weight", (C,))
        m.take(f"{b}mlp_norm.weight", f"{h}post_attention_layernorm.weight", (C,))
        for x, rows in (("q", cfg.n_head * hd), ("k", cfg.n_kv_head * hd), ("v", cfg.n_kv_head * hd)):
            m.take(f"{b}attn.{x}_proj.weight", f"{h}self_attn.{x}_proj.weight", (rows, C))
            if cfg.bias or cfg.qkv_bias:
                m.take(f"{b}attn.{x}_proj.bias", f"{h}self_attn.{x}_proj.bias", (rows,))
        if cfg.qk_norm:
            m.take(f"{b}attn.q_norm.weight", f"{h}self_attn.q_norm.weight", (hd,))
            m.take(f"{b}attn.k_norm.weight", f"{h}self_attn.k_norm.weight", (hd,))
        m.take(f"{b}attn.o_proj.weight", f"{h}self_attn.o_proj.weight", (C, cfg.n_head * hd))
        for x, shape in (("gate", (H, C)), ("up", (H, C)), ("down", (C, H))):
            m.take(f"{b}mlp.{x}_proj.weight", f"{h}mlp.{x}_proj.weight", shape)
            if cfg.bias:
                m.take(f"{b}mlp.{x}_proj.bias", f"{h}mlp.{x}_proj.bias", (shape[0],))
        if cfg.bias:
            m.take(f"{b}attn.o_proj.bias", f"{h}self_attn.o_proj.bias", (C,))
    m.take("norm.weight", "model.norm.weight", (C,))
    if not cfg.tie_embeddings:
        m.take("lm_head.weight", "lm_head.weight", (cfg.vocab_size, C))
    return m.tensors, m.unused(ignore=re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$|^lm_head\.weight$"))


# ----------------------------------------------------------------------------- tokenizer

def _special(tok) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    return tok.get("content")


def _pre_tokenizer(pt: dict | None, where: Path) -> tuple[str, bool]:
    """tokenizer.json's pre_tokenizer -> (regex, split digits first). Only byte-level forms we reproduce exactly."""
    steps = pt.get("pretokenizers", []) if pt and pt.get("type") == "Sequence" else [pt] if pt else []
    kinds = [s.get("type") for s in steps]
    if kinds and kinds[-1] == "ByteLevel" and steps[-1].get("add_prefix_space"):
        raise ConvertError(f"{where}: ByteLevel with add_prefix_space=True is not supported")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PAT, False  # GPT-2
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return GPT2_PAT, True  # SmolLM/SmolLM2
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        pattern = (split.get("pattern") or {}).get("Regex")
        if pattern and split.get("behavior") == "Isolated" and not split.get("invert"):
            return pattern, False  # Llama 3 (and other tiktoken-style regexes)
    if "Metaspace" in kinds:
        raise ConvertError(f"{where}: a SentencePiece tokenizer (Metaspace); SentencePiece tokenizers "
                           f"(Llama 2, TinyLlama, Mistral 7B, ...) are not supported, only byte-level BPE")
    raise ConvertError(f"{where}: unsupported pre-tokenizer {kinds or None}; supported: GPT-2 ByteLevel, "
                       f"Digits+ByteLevel (SmolLM), Split(regex)+ByteLevel (Llama 3)")


def tokenizer_from_hf(d: Path, name: str) -> BPETokenizer | CharTokenizer:
    """The tokenizer of HF directory `d`, from the first of: tokenizer.json (byte-level BPE, or a
    single-character WordLevel vocabulary as minillm.export writes; its Unicode normalizer, Qwen2's NFC,
    comes along), vocab.json + merges.txt (GPT-2), a tiktoken tokenizer.model (Llama 3). Special tokens,
    BOS/EOS and the chat template come from tokenizer_config.json (and generation_config.json's extra
    stop ids)."""
    tc_path, tj_path = d / "tokenizer_config.json", d / "tokenizer.json"
    tc = read_json(tc_path) if tc_path.is_file() else {}
    normalize = None
    specials = {t["content"]: int(i) for i, t in (tc.get("added_tokens_decoder") or {}).items()}
    tj = read_json(tj_path) if tj_path.is_file() else None
    if tj is not None:
        chars = _char_vocab(tj)
        if chars is not None:
            return CharTokenizer(chars)
        ranks, pat, split_digits = _bpe_from_tokenizer_json(tj, tj_path, specials, name)
        normalize = _normalizer(tj, tj_path)
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        ranks, pat, split_digits = _bpe_from_vocab_and_merges(d, specials, name)
    elif (d / "tokenizer.model").is_file():
        ranks, pat, split_digits = _bpe_from_tiktoken_file(d / "tokenizer.model", specials)
    else:
        raise ConvertError(f"{d}: no tokenizer found (expected tokenizer.json, vocab.json + merges.txt, "
                           f"or a tiktoken tokenizer.model)")
    bos, add_bos = _special(tc.get("bos_token")), tc.get("add_bos_token")
    if add_bos is None and tj is not None:
        add_bos, bos = _bos_from_post_processor(tj, bos)
    bos = bos if bos in specials else None
    try:
        return BPETokenizer(name, pat, ranks, specials, bos_token=bos, eos_tokens=_eos_tokens(d, tc, specials),
                            add_bos=bool(add_bos and bos), chat_template=_chat_template(d, tc),
                            pre_split_digits=split_digits, normalize=normalize)
    except ValueError as e:
        raise ConvertError(f"{d}: tokenizer cannot be built ({e})") from e


def _char_vocab(tj: dict) -> str | None:
    """The characters of a WordLevel vocabulary with one id per character, in order (minillm.export's char
    tokenizers), else None."""
    model = tj.get("model") or {}
    vocab = model.get("vocab") or {}
    if (model.get("type") == "WordLevel" and all(len(t) == 1 for t in vocab)
            and sorted(vocab, key=vocab.get) == sorted(vocab) and sorted(vocab.values()) == list(range(len(vocab)))):
        return "".join(sorted(vocab))
    return None


def _bpe_from_tokenizer_json(tj: dict, where: Path, specials: dict[str, int], name: str) -> tuple[dict[bytes, int], str, bool]:
    """tokenizer.json -> (ranks, pre-tokenizer regex, split digits first); its added tokens join `specials`."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(f"{where}: tokenizer model {model.get('type')!r} is not supported (only byte-level BPE)")
    if model.get("byte_fallback"):
        raise ConvertError(f"{where}: a SentencePiece-style BPE (byte_fallback); SentencePiece "
                           f"tokenizers (Llama 2, TinyLlama, Mistral 7B, ...) are not supported, only byte-level BPE")
    pat, split_digits = _pre_tokenizer(tj.get("pre_tokenizer"), where)
    for t in tj.get("added_tokens") or []:
        specials[t["content"]] = t["id"]
    return ranks_from_vocab(model["vocab"], model.get("merges") or [], specials, name), pat, split_digits


def _normalizer(tj: dict, where: Path) -> str | None:
    """tokenizer.json's normalizer -> BPETokenizer.normalize: none, or one Unicode normal form (Qwen2: NFC)."""
    norm = tj.get("normalizer")
    if norm and norm.get("type") == "Sequence" and len(norm.get("normalizers") or []) == 1:
        norm = norm["normalizers"][0]
    if not norm:
        return None
    if norm.get("type") in ("NFC", "NFKC", "NFD", "NFKD"):
        return norm["type"]
    raise ConvertError(f"{where}: normalizer {norm.get('type')!r} is not supported (a SentencePiece-style tokenizer?); "
                       f"supported: none, or one Unicode normal form (NFC, NFKC, NFD, NFKD)")


def _bpe_from_vocab_and_merges(d: Path, specials: dict[str, int], name: str) -> tuple[dict[bytes, int], str, bool]:
    """GPT-2's vocab.json + merges.txt -> (ranks, GPT-2's regex, False); <|endoftext|> joins `specials`."""
    vocab = read_json(d / "vocab.json")
    lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    if "<|endoftext|>" in vocab:
        specials.setdefault("<|endoftext|>", vocab["<|endoftext|>"])
    return ranks_from_vocab(vocab, merges, specials, name), GPT2_PAT, False


def _bpe_from_tiktoken_file(path: Path, specials: dict[str, int]) -> tuple[dict[bytes, int], str, bool]:
    """Llama 3's tokenizer.model (tiktoken: base64 token and rank per line) -> (ranks, Llama 3's regex, False).
    A SentencePiece model under the same name is refused."""
    ranks = {}
    try:
        for line in path.read_bytes().decode("ascii").splitlines():
            if line:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    except (UnicodeDecodeError, ValueError):
        raise ConvertError(f"{path}: a SentencePiece model; SentencePiece tokenizers "
                           f"(Llama 2, TinyLlama, Mistral 7B, ...) are not supported, only byte-level BPE") from None
    if not specials:
        raise ConvertError(f"{path}: a tiktoken rank file without its special tokens; put the "
                           f"model's tokenizer_config.json (added_tokens_decoder) beside it")
    return ranks, LLAMA3_PAT, False


def _bos_from_post_processor(tj: dict, bos: str | None) -> tuple[bool | None, str | None]:
    """(add_bos, bos token) as tokenizer.json's TemplateProcessing post-processor implies them, when
    tokenizer_config.json does not say: BOS is added if the template starts with a special token."""
    post = tj.get("post_processor") or {}
    if post.get("type") != "TemplateProcessing":
        return None, bos
    first = (post.get("single") or [{}])[0]
    add_bos = "SpecialToken" in first
    return add_bos, (bos or first["SpecialToken"]["id"]) if add_bos else bos


def _eos_tokens(d: Path, tc: dict, specials: dict[str, int]) -> list[str]:
    """tokenizer_config.json's eos_token, then generation_config.json's extra stop ids (instruct models
    often list more, e.g. Llama 3's <|eot_id|>); special tokens only, each once."""
    eos = [_special(tc.get("eos_token"))]
    gen = d / "generation_config.json"
    if gen.is_file():
        ids = read_json(gen).get("eos_token_id")
        by_id = {i: t for t, i in specials.items()}
        eos += [by_id[i] for i in ([ids] if isinstance(ids, int) else ids or []) if i in by_id]
    return list(dict.fromkeys(t for t in eos if t in specials))


def _chat_template(d: Path, tc: dict) -> str | None:
    """tokenizer_config.json's chat_template (the default one of several), else chat_template.jinja."""
    chat = tc.get("chat_template")
    if chat is None and (d / "chat_template.jinja").is_file():
        chat = (d / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(chat, list):  # several named templates: keep the default one
        chat = next((t["template"] for t in chat if t.get("name") == "default"), None)
    return chat


# ----------------------------------------------------------------------------- entry

def load_hf_dir(d: Path) -> Source:
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{d}: no config.json (not a Hugging Face model directory)")
    c = read_json(cfg_path)
    try:
        cfg = config_from_hf(c)
    except (ValueError, TypeError, ArithmeticError) as e:  # ConvertError, ModelConfig's checks, a head count of 0
        raise ConvertError(f"{cfg_path}: {e}") from None
    w = Weights(d)
    tensors, unused = (_gpt2_map if cfg.family == "gpt2" else _llama_map)(cfg, w)
    if unused:
        first = unused[0]
        raise ConvertError(f"tensor {first!r} in {w.where[first].name} is not used by a {cfg.family} model "
                           f"({len(unused)} unused); unsupported architecture variant?")
    name = d.resolve().name
    tokenizer = tokenizer_from_hf(d, name)
    provenance = {"source": str(d.resolve()), "source_format": "huggingface",
                  "architecture": (c.get("architectures") or [c.get("model_type")])[0]}
    if cfg.family == "llama" and cfg.block_size < c.get("max_position_embeddings", 0):
        provenance["context"] = (f"block_size {cfg.block_size}: the sliding window (exact up to it); "
                                 f"the source allows {c['max_position_embeddings']}")
    files = sorted({*w.where.values(), *(p for p in d.iterdir() if p.suffix in (".json", ".txt", ".model", ".jinja"))})
    return Source(cfg, tokenizer, tensors, provenance, files)
