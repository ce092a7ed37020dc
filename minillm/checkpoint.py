"""Our weights format: one .safetensors file is a whole model.

Tensors are stored under the model's own state-dict names (see model.py):

    tok_emb.weight                         (vocab_size, n_embd)
    pos_emb.weight                         (block_size, n_embd)        gpt2 only
    blocks.{i}.attn_norm.weight / .bias    (n_embd,)                   bias: gpt2 only
    blocks.{i}.attn.{q,k,v,o}_proj.weight  q,o: (n_head*hd, n_embd)-ish; k,v: (n_kv_head*hd, n_embd)
    blocks.{i}.attn.{q,k,v,o}_proj.bias    when config.bias
    blocks.{i}.mlp_norm.weight / .bias
    blocks.{i}.mlp.{up,down}_proj.weight   (mlp_hidden, n_embd), (n_embd, mlp_hidden)
    blocks.{i}.mlp.gate_proj.weight        llama only
    norm.weight / .bias                    final norm
    lm_head.weight                         only when tie_embeddings is False

The safetensors metadata (string -> string) holds:
    format      "minillm/1" (FORMAT below; a different version is refused)
    config      ModelConfig as JSON
    tokenizer   the tokenizer's full description as JSON (char vocab, or BPE ranks + regex + specials)
    provenance  JSON: where the weights came from (converted source, or training run: step, val loss, data sha256)
    quantization  (quantized models only) JSON {"bits", "group_size", "embedding_bits"}: every Linear and the
                token embedding are stored as integer codes + scales; minillm.quantize documents the tensors

Training state for --resume (optimizer moments, step, RNG states) goes to a second file,
NAME.train.safetensors, written by save_train_state. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses

import json
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

from .config import ModelConfig
from .model import Transformer, rope_tables
from .quantized import empty_quantized, finish_loading
from .tokenizer import tokenizer_from_dict

FORMAT = "minillm/1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, of another format, or disagrees with its config."""


def check_output(path: str | Path, flag: str = "", folder: bool = False, make_parents: bool = False,
                 inputs: tuple = ()) -> Path:
    """Refuse, before any work, an output that cannot be made. `path` is a file to write, or with
    folder=True a folder to write into; it is not a folder where a file goes (or the reverse), nor any of
    `inputs` (writing there would replace the source with its own output). Where it will be written
    must be writable: the folder itself if it exists, else the folder that holds it, which must exist
    (with make_parents, its nearest existing ancestor, the missing folders being made). An OSError
    (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError) whose
    one-line message names `flag`, the path and the problem."""
    path = Path(path)
    where = f"{flag} {path}" if flag else f"cannot write {path}"
    if path.is_dir() and not folder:
        raise IsADirectoryError(f"{where}: is a folder; give a file name inside it")
    if path.exists() and folder and not path.is_dir():
        raise FileExistsError(f"{where}: is a file, not a folder")
    for src in inputs:
        if path.exists() and Path(src).exists() and os.path.samefile(path, src):
            raise FileExistsError(f"{where}: is the input {src}; writing there would replace it with its own "
                                  f"output: choose another {flag or 'path'}")
    ancestor = path.parent
    if not make_parents and not ancestor.exists():
        raise FileNotFoundError(f"{where}: folder {ancestor} does not exist")
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{where}: {ancestor} is a file, not a folder")
    target = path if folder and path.is_dir() else ancestor
    if not os.access(target, os.W_OK | os.X_OK):
        raise PermissionError(f"{where}: folder {target} is not writable")
    return path


_HOST = re.sub(r"[^\w.-]", "_", socket.gethostname()) or "host"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Make the file `path` by calling write(tmp), then renaming tmp over `path`. tmp is a new, empty
    file in the same directory (so the rename is atomic), .NAME.HOST-PID.RANDOM.tmp, with the mode a
    newly created file gets (0o666 less the umask). A crash or an error during write() leaves the old
    file (if any) as it was and no temp file behind; a kill (SIGKILL, power loss) can leave one, which
    the next atomic_write of the same name removes once its process is gone (_remove_stale_temps)."""
    path = check_output(path)
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # O_EXCL: the name is ours alone
    mode = tmp.stat().st_mode  # what a new file gets here: 0o666 less the umask
    try:
        write(tmp)
        os.chmod(tmp, mode)  # write() may have made the file anew (safetensors makes it owner-only)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _remove_stale_temps(path: Path) -> None:
    """Remove the temp files of earlier atomic writes of `path` whose process was killed: made on this
    host by a process id that no longer runs. A live writer's temp file (another process saving the
    same name right now) is left alone. POSIX only (elsewhere os.kill(pid, 0) is not a probe)."""
    if os.name != "posix":
        return
    own = re.compile(rf"\.{re.escape(path.name)}\.{re.escape(_HOST)}-(\d+)\.[0-9a-f]{{8}}\.tmp")
    for sibling in path.parent.iterdir():
        m = own.fullmatch(sibling.name)
        if m and not _running(int(m.group(1))):
            sibling.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check that the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user
        return True
    return True


def atomic_save(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Save tensors and string metadata as one .safetensors file, atomically (atomic_write)."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def amend_provenance(path: str | Path, extra: dict) -> None:
    """Add `extra` to a file's provenance, its tensors and other metadata as they are (atomic_write)."""
    meta = read_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["provenance"] = json.dumps({**json.loads(meta.get("provenance") or "{}"), **extra})
    atomic_save(tensors, path, meta)


def model_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The state dict we store: a tied lm_head is the embedding, so it is left out."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def empty_model(cfg: ModelConfig, quantization: dict | None = None) -> Transformer:
    """The model's skeleton on the meta device (no memory): float, or with minillm.quantize's modules.
    Its values all come from the file, so no initializer runs (see SkipInitOnMeta)."""
    with torch.device("meta"), SkipInitOnMeta():
        return Transformer(cfg) if quantization is None else empty_quantized(cfg, quantization)


def assign_tensors(model: Transformer, tensors: dict[str, torch.Tensor]) -> Transformer:
    """Fill a skeleton from empty_model with its tensors (assigned, not copied): the one way a model is
    built from a config and tensors (loading, pruning, a truncated student). The tied head is re-tied
    (a quantized one rebuilt from the embedding) and the RoPE tables, built on meta, are made."""
    cfg, quantized = model.config, getattr(model, "quantization", None)
    if cfg.tie_embeddings and not quantized:
        tensors = {**tensors, "lm_head.weight": tensors["tok_emb.weight"]}
    model.load_state_dict(tensors, strict=True, assign=True)
    if quantized:
        finish_loading(model)
    elif cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    if cfg.family == "llama":
        model.rope_cos, model.rope_sin = rope_tables(cfg)
    return model


def keep_blocks(model: Transformer, blocks: list[int]) -> Transformer:
    """A new model with only the given blocks, in that order, renumbered 0.. (n_layer to match;
    their KV-cache slots with them), everything outside the blocks copied as it was, on the model's
    device, in eval mode (pruning, a distillation student, the truncation bench)."""
    n = model.config.n_layer
    if not blocks or len(set(blocks)) != len(blocks) or any(not 0 <= i < n for i in blocks):
        raise ValueError(f"blocks to keep must be distinct indices in 0..{n - 1}, got {blocks}")
    new_index = {old: new for new, old in enumerate(blocks)}
    tensors = {}
    for name, t in model.state_dict().items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            if int(i) not in new_index:
                continue
            name = f"blocks.{new_index[int(i)]}.{rest}"
        tensors[name] = t.detach().clone()
    cfg = dataclasses.replace(model.config, n_layer=len(blocks))
    new = assign_tensors(empty_model(cfg, getattr(model, "quantization", None)), tensors)
    return new.to(model.tok_emb.weight.device).eval()


class SkipInitOnMeta(TorchFunctionMode):
    """Inside `with SkipInitOnMeta():`, torch.nn.init's functions and the tensor fills they are made of
    return a meta tensor as it is, without running. Any op on a meta tensor makes torch import its
    Python meta kernels (and sympy), which then stay in memory for the rest of the process
    (bench/README.md). A torch function mode, like torch.device(...): it acts on this thread only,
    inside the `with`, and patches nothing."""

    SKIP = {*(getattr(nn.init, name) for name in ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_",
                                                   "zeros_", "xavier_uniform_", "xavier_normal_",
                                                   "kaiming_uniform_", "kaiming_normal_")),
            torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.fill_, torch.Tensor.zero_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIP:
            tensor = args[0] if args else kwargs["tensor"]  # nn.init passes its tensor by keyword
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def expected_shapes(cfg: ModelConfig, quantization: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with its shape (built on the meta device: no memory)."""
    return {k: tuple(v.shape) for k, v in model_tensors(empty_model(cfg, quantization)).items()}


def save_model(path: str | Path, model: Transformer, tokenizer, provenance: dict | None = None) -> None:
    """Save weights + config + tokenizer + provenance to one .safetensors file, atomically."""
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {cfg.vocab_size}")
    metadata = {
        "format": FORMAT,
        "config": cfg.to_json(),
        "tokenizer": json.dumps(tokenizer.to_dict()),
        "provenance": json.dumps(provenance or {}),
    }
    if getattr(model, "quantization", None):  # set by quantized.swap_in
        metadata["quantization"] = json.dumps(model.quantization)
    atomic_save(model_tensors(model), path, metadata)


@dataclass
class Loaded:
    model: Transformer
    tokenizer: object
    config: ModelConfig
    provenance: dict


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        _refuse_foreign(path)
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
        _refuse_foreign(path)
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _refuse_foreign(path: Path) -> None:
    """A model of another kind where our checkpoint was expected: a CheckpointError naming the command
    that converts it."""
    foreign = _foreign_format(path)
    if foreign:
        raise CheckpointError(f"{path}: {foreign}, not a minillm checkpoint; convert it first: "
                              f"python -m minillm.convert {path} --out weights/{path.stem or 'model'}.safetensors")


def _foreign_format(path: Path) -> str:
    """What a model file of another kind is ("a GGUF file", "a Hugging Face model folder"), or ""."""
    if path.is_dir():
        return "a Hugging Face model folder" if (path / "config.json").is_file() else ""
    try:
        with open(path, "rb") as f:
            return "a GGUF file" if f.read(4) == b"GGUF" else ""
    except OSError:
        return ""


def check_tensor_set(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """The rule for a model's tensors, wherever they come from (a file, a converter's source): every
    tensor `expected` names, with its shape, and no other. A CheckpointError names the first problem."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r} (expected shape {expected[missing[0]]})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]!r} not used by this config"
                              + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(found[name])}, config expects {tuple(shape)}")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Loaded:
    """Load and validate a checkpoint: format version, readable metadata, every expected tensor present
    with its shape and dtype, no extras, no NaN or infinite weights. Any problem is a CheckpointError
    naming the file (FileNotFoundError for a missing one)."""
    path = Path(path)
    meta = read_metadata(path)
    fmt = meta.get("format")
    if fmt == FORMAT + "-train":
        raise CheckpointError(f"{path}: a training state (optimizer moments and counters), not a model: the run's "
                              f"model is {str(path).removesuffix('.train.safetensors')}.safetensors (train.py "
                              "--keep last makes it the latest weights)")
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: format {fmt!r} is not {FORMAT!r} (not a minillm checkpoint, or another version)")
    try:
        cfg = ModelConfig.from_dict(_metadata_json(meta, "config", path))
        tokenizer = tokenizer_from_dict(_metadata_json(meta, "tokenizer", path))
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError) as e:  # a config or tokenizer that cannot be: names the field
        raise CheckpointError(f"{path}: invalid metadata ({type(e).__name__}: {e})") from None
    provenance = _metadata_json(meta, "provenance", path, default={})
    quantization = _metadata_json(meta, "quantization", path) if "quantization" in meta else None
    try:
        model = empty_model(cfg, quantization)
    except ValueError as e:  # a quantization entry with bad bits / group size
        raise CheckpointError(f"{path}: {e}") from e
    model = assign_tensors(model, _read_tensors(path, model_tensors(model)))
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    return Loaded(model, tokenizer, cfg, provenance)


def _metadata_json(meta: dict[str, str], key: str, path: Path, default: dict | None = None) -> dict:
    """The metadata entry `key`, which must be a JSON object; a CheckpointError names the entry otherwise."""
    if key not in meta:
        if default is not None:
            return default
        raise CheckpointError(f"{path}: metadata has no {key!r} entry")
    try:
        value = json.loads(meta[key])
    except ValueError as e:
        raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: metadata {key!r} is a JSON {type(value).__name__}, not an object")
    return value


FLOAT_DTYPES = ("F32", "BF16", "F16")  # what weights are stored as (safetensors' names)
_ST_INT = {torch.int8: "I8", torch.uint8: "U8"}  # quantized codes


def _read_tensors(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors (memory-mapped), after the checks: check_tensor_set on their names and shapes
    against `expected` (the model's tensors on meta), then their dtypes, then their values."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            check_tensor_set({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()},
                             {name: tuple(t.shape) for name, t in expected.items()}, str(path))
            _check_dtypes({name: f.get_slice(name).get_dtype() for name in expected}, expected, path)
            tensors = {name: f.get_tensor(name) for name in expected}
    except CheckpointError:
        raise
    except Exception as e:  # data section shorter than the header says, etc.
        raise CheckpointError(f"{path}: cannot read tensors ({e}); the file may be truncated") from e
    for name, t in tensors.items():  # a sum first: one cheap pass, the full check only where it is not finite
        if t.is_floating_point() and not torch.isfinite(t.sum(dtype=torch.float32)):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise CheckpointError(f"{path}: tensor {name!r} holds {bad} NaN or infinite values (of {t.numel()}); "
                                      f"these weights cannot compute (a training run that diverged?)")
    return tensors


def _check_dtypes(found: dict[str, str], expected: dict[str, torch.Tensor], path: Path) -> None:
    """Float weights as F32, BF16 or F16, one of them for the whole file; quantized codes in their own dtype."""
    floats = {}
    for name, t in expected.items():
        want = FLOAT_DTYPES if t.dtype.is_floating_point else (_ST_INT[t.dtype],)
        if found[name] not in want:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {found[name]}; this model stores it as "
                                  f"{' or '.join(want)}")
        if t.dtype.is_floating_point:
            floats.setdefault(found[name], name)
    if len(floats) > 1:
        (a, na), (b, nb) = list(floats.items())[:2]
        raise CheckpointError(f"{path}: float tensors of two dtypes ({na!r} is {a}, {nb!r} is {b}); "
                              f"a checkpoint stores all its float weights in one")


# ----------------------------------------------------------------------------- training state

def train_state_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".train.safetensors")


def save_train_state(path: str | Path, optimizer: torch.optim.Optimizer, state: dict,
                     rng: dict[str, torch.Tensor], model: Transformer, trainable_only: bool = False) -> None:
    """The latest weights as `model.{name}`, optimizer moments as `opt.{param_index}.{name}`, RNG
    states as `rng.{name}`; JSON metadata: `state` (iter, best val, ...), the optimizer's param
    groups and its scalar entries. (The model file keeps the best-val weights; resuming needs the latest.)
    trainable_only (LoRA): only parameters with requires_grad; the frozen rest must come from elsewhere
    (the base checkpoint) when resuming."""
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    if trainable_only:
        keep = {f"model.{n}" for n, p in model.named_parameters() if p.requires_grad}
        tensors = {k: v for k, v in tensors.items() if k in keep}
    scalars = {}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"opt.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = float(v)
    for k, v in rng.items():
        tensors[f"rng.{k}"] = v
    metadata = {"format": FORMAT + "-train", "state": json.dumps(state), "weights": "trainable" if trainable_only else "all",
                "opt_scalars": json.dumps(scalars), "param_groups": json.dumps(opt["param_groups"])}
    atomic_save(tensors, path, metadata)


def train_state_info(path: str | Path) -> dict:
    """The state a training-state file records (iter, config, data, ...), read from its header only."""
    return json.loads(_train_state_metadata(path)["state"])


def _train_state_metadata(path: str | Path) -> dict[str, str]:
    meta = read_metadata(path)
    if meta.get("format") != FORMAT + "-train":
        raise CheckpointError(f"{path}: not a minillm training-state file (format {meta.get('format')!r})")
    return meta


def load_train_state(path: str | Path, optimizer: torch.optim.Optimizer,
                     model: Transformer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore the model's weights and the optimizer in place; return (state, rng tensors)."""
    path = Path(path)
    meta = _train_state_metadata(path)
    weights, opt_state, rng = {}, {}, {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            kind, rest = name.split(".", 1)
            if kind == "model":
                weights[rest] = f.get_tensor(name)
            elif kind == "opt":
                idx, k = rest.split(".", 1)
                opt_state.setdefault(int(idx), {})[k] = f.get_tensor(name)
            else:
                rng[rest] = f.get_tensor(name)
    if meta.get("weights") == "trainable":  # the frozen weights stay as the model has them
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != trainable:
            diff = sorted(set(weights) ^ trainable)
            raise CheckpointError(f"{path}: holds the trainable weights of another setup ({diff[0]!r} is in one of "
                                  f"the file and the model's trainable parameters but not the other)")
        model.load_state_dict(weights, strict=False)
    else:
        if model.config.tie_embeddings:
            weights["lm_head.weight"] = weights["tok_emb.weight"]
        model.load_state_dict(weights, strict=True)
    for key, v in json.loads(meta["opt_scalars"]).items():
        idx, k = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[k] = torch.tensor(v)
    optimizer.load_state_dict({"state": opt_state, "param_groups": json.loads(meta["param_groups"])})
    return json.loads(meta["state"]), rng
