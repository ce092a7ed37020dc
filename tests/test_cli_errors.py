"""Issue 14: every command line given each invalid input it must refuse (convert, quantize, export, the
inspector, and sample.py for its checkpoint): exit status 2, exactly one line on stderr that names the
problem (the file, the flag and the value), no traceback, and no file created or changed (the whole
working folder's listing, sizes, modes and mtimes are compared before and after). Each command's main()
runs in-process on tiny files made once per session."""

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from minillm.checkpoint import save_model
from minillm.convert.__main__ import main as convert_main
from minillm.export import export_hf
from minillm.export import main as export_main
from minillm.inspector.cli import run as inspector_run
from minillm.quantize.__main__ import main as quantize_main
from minillm.tokenizer import BPETokenizer, CharTokenizer
from cli_runner import one_error_line, run, script
from tiny import tiny_model

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
# the inspector exits with 2 on an error (SystemExit) and returns None on success
MAINS = {"convert": convert_main, "quantize": quantize_main, "export": export_main, "inspect": inspector_run,
         "sample": script("sample").main}


# ----------------------------------------------------------------------------- the files

def _rewrite(src: Path, dst: Path, tensors=None, meta=None) -> None:
    """A copy of checkpoint src with its tensors and metadata edited in place by the given functions."""
    with safe_open(str(src), framework="pt") as f:
        t, m = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    (tensors or (lambda t: None))(t)
    (meta or (lambda m: None))(m)
    save_file(t, str(dst), metadata=m)


def _set_config(**kv):
    def edit(m):
        m["config"] = json.dumps({**json.loads(m["config"]), **kv})
    return edit


def _hf_dir(src: Path, dst: Path, config=None, index=None) -> None:
    """A copy of Hugging Face folder src with config.json replaced by `config` (text), or with a
    sharded-weights index naming the shards `index` instead of model.safetensors."""
    shutil.copytree(src, dst)
    if config is not None:
        (dst / "config.json").write_text(config)
    if index is not None:
        (dst / "model.safetensors").unlink()
        weight_map = {f"w{i}": name for i, name in enumerate(index)}
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _chat_model(d: Path, name: str, template: str) -> None:
    """A tiny model whose (byte-level) tokenizer carries the chat template `template`."""
    ranks = {bytes([b]): b for b in range(256)}
    tok = BPETokenizer("bytes", r"\S+|\s+", ranks, {"<|end|>": 256}, eos_tokens=["<|end|>"], chat_template=template)
    save_model(d / name, tiny_model("gpt2", vocab_size=257), tok)


def make_files(d: Path) -> Path:
    """ok.safetensors (a tiny char model) and every broken variant, its Hugging Face export (hf/) and
    broken variants of that, a stand-in GGUF, a plain file, a read-only folder, links."""
    tok = CharTokenizer.from_text(TEXT)
    ok = d / "ok.safetensors"
    save_model(ok, tiny_model("gpt2", vocab_size=tok.vocab_size), tok)
    (d / "truncated.safetensors").write_bytes(ok.read_bytes()[:-200])
    _rewrite(ok, d / "nan.safetensors", tensors=lambda t: t["blocks.0.mlp.up_proj.weight"].__setitem__((3, 4), float("nan")))
    _rewrite(ok, d / "int.safetensors", tensors=lambda t: t.__setitem__("norm.weight", t["norm.weight"].long()))
    _rewrite(ok, d / "config_not_json.safetensors", meta=lambda m: m.__setitem__("config", '{"family": "gpt2",'))
    _rewrite(ok, d / "config_list.safetensors", meta=lambda m: m.__setitem__("config", "[1, 2]"))
    _rewrite(ok, d / "config_heads.safetensors", meta=_set_config(n_head=5, n_kv_head=None, head_dim=None))
    export_hf(ok, d / "hf")
    config = json.loads((d / "hf" / "config.json").read_text())
    _hf_dir(d / "hf", d / "hf_not_json", config='{"architectures": ["GPT2LMHeadModel"],')
    _hf_dir(d / "hf", d / "hf_list", config='[{"architectures": ["GPT2LMHeadModel"]}]')
    _hf_dir(d / "hf", d / "hf_heads", config=json.dumps({**config, "n_head": 5}))
    _hf_dir(d / "hf", d / "hf_shard_up", index=["../ok.safetensors"])
    _hf_dir(d / "hf", d / "hf_shard_abs", index=[str(ok)])
    _chat_model(d, "chat_syntax.safetensors", "{% for m in messages %}{{ m['content'] }}")  # no endfor
    _chat_model(d, "chat_sandbox.safetensors", "{{ messages.__class__.__mro__ }}")  # blocked by the sandbox
    (d / "model.gguf").write_bytes(b"GGUF" + bytes(60))  # refused before it is read: any bytes do
    (d / "plain.txt").write_text("a file, not a folder\n")
    (d / "sub").mkdir()
    (d / "dirlink").symlink_to(d, target_is_directory=True)  # dirlink/ok.safetensors is ok.safetensors
    (d / "link.gguf").symlink_to(d / "model.gguf")
    (d / "ro").mkdir()
    (d / "ro" / "keep.txt").write_text("x")
    (d / "ro").chmod(0o555)
    return d


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    d = make_files(tmp_path_factory.mktemp("cli_errors"))
    yield d
    (d / "ro").chmod(0o755)  # so that pytest can clean up


# ----------------------------------------------------------------------------- the cases
# (command, id, argv with {d} for the folder, words the one error line must contain)

CONVERT = [
    ("out-is-the-source", ["{d}/model.gguf", "--out", "{d}/model.gguf"], ["--out", "model.gguf", "is the input"]),
    ("out-is-the-source-by-a-link", ["{d}/model.gguf", "--out", "{d}/link.gguf"], ["--out", "link.gguf", "is the input"]),
    ("out-is-a-file-of-the-hf-source", ["{d}/hf", "--out", "{d}/hf/model.safetensors"],
     ["--out", "hf/model.safetensors", "is the input"]),
    ("out-is-a-folder", ["{d}/hf", "--out", "{d}/sub"], ["--out", "sub", "is a folder"]),
    ("out-folder-missing", ["{d}/hf", "--out", "{d}/missing/m.safetensors"], ["--out", "missing", "does not exist"]),
    ("out-folder-is-a-file", ["{d}/hf", "--out", "{d}/plain.txt/m.safetensors"], ["--out", "plain.txt", "not a folder"]),
    ("out-folder-read-only", ["{d}/hf", "--out", "{d}/ro/m.safetensors"], ["--out", "folder {d}/ro is not writable"]),
    ("config-not-json", ["{d}/hf_not_json", "--out", "{d}/m.safetensors"], ["hf_not_json/config.json", "not valid JSON"]),
    ("config-a-list", ["{d}/hf_list", "--out", "{d}/m.safetensors"], ["hf_list/config.json", "JSON list"]),
    ("config-n-head", ["{d}/hf_heads", "--out", "{d}/m.safetensors"], ["hf_heads/config.json", "n_embd (32) must be divisible by n_head (5)"]),
    ("shard-outside-by-dotdot", ["{d}/hf_shard_up", "--out", "{d}/m.safetensors"], ["'../ok.safetensors'", "outside its folder"]),
    ("shard-outside-absolute", ["{d}/hf_shard_abs", "--out", "{d}/m.safetensors"], ["ok.safetensors'", "outside its folder"]),
]
QUANTIZE = [
    ("out-is-the-input", ["{d}/ok.safetensors", "--out", "{d}/ok.safetensors"], ["--out", "ok.safetensors", "is the input"]),
    ("out-is-the-input-by-another-path", ["{d}/ok.safetensors", "--out", "{d}/dirlink/ok.safetensors"],
     ["--out", "dirlink/ok.safetensors", "is the input"]),
    ("input-missing", ["{d}/nope.safetensors", "--out", "{d}/q.safetensors"], ["nope.safetensors", "not found"]),
    ("out-folder-missing", ["{d}/ok.safetensors", "--out", "{d}/missing/q.safetensors"], ["--out", "missing", "does not exist"]),
    ("out-folder-is-a-file", ["{d}/ok.safetensors", "--out", "{d}/plain.txt/q.safetensors"], ["--out", "plain.txt", "not a folder"]),
    ("out-folder-read-only", ["{d}/ok.safetensors", "--out", "{d}/ro/q.safetensors"], ["--out", "folder {d}/ro is not writable"]),
    ("out-is-a-folder", ["{d}/ok.safetensors", "--out", "{d}/sub"], ["--out", "sub", "is a folder"]),
    ("input-truncated", ["{d}/truncated.safetensors", "--out", "{d}/q.safetensors"], ["truncated.safetensors", "truncated"]),
    ("input-nan", ["{d}/nan.safetensors", "--out", "{d}/q.safetensors"], ["nan.safetensors", "up_proj", "NaN"]),
    ("input-integer-tensor", ["{d}/int.safetensors", "--out", "{d}/q.safetensors"], ["int.safetensors", "norm.weight", "I64"]),
    ("config-not-json", ["{d}/config_not_json.safetensors", "--out", "{d}/q.safetensors"], ["config_not_json", "not valid JSON"]),
    ("config-a-list", ["{d}/config_list.safetensors", "--out", "{d}/q.safetensors"], ["config_list", "JSON list"]),
    ("config-n-head", ["{d}/config_heads.safetensors", "--out", "{d}/q.safetensors"], ["config_heads", "n_embd (32) must be divisible by n_head (5)"]),
]
EXPORT = [
    ("out-folder-read-only", ["{d}/ok.safetensors", "--out", "{d}/ro/hf"], ["--out", "folder {d}/ro is not writable"]),
    ("out-inside-a-file", ["{d}/ok.safetensors", "--out", "{d}/plain.txt/hf"], ["--out", "plain.txt", "not a folder"]),
    ("out-is-a-file", ["{d}/ok.safetensors", "--out", "{d}/plain.txt"], ["--out", "plain.txt", "not a folder"]),
    ("out-parent-missing", ["{d}/ok.safetensors", "--out", "{d}/missing/hf"], ["--out", "missing", "does not exist"]),
    ("input-missing", ["{d}/nope.safetensors", "--out", "{d}/hf2"], ["nope.safetensors", "not found"]),
    ("input-nan", ["{d}/nan.safetensors", "--out", "{d}/hf2"], ["nan.safetensors", "NaN"]),
    ("input-integer-tensor", ["{d}/int.safetensors", "--out", "{d}/hf2"], ["int.safetensors", "I64"]),
    ("config-a-list", ["{d}/config_list.safetensors", "--out", "{d}/hf2"], ["config_list", "JSON list"]),
]
_INSPECT = ["--model", "{d}/ok.safetensors", "--prompt", "Be", "--no-attention"]
INSPECT = [
    ("out-is-a-file", [*_INSPECT, "--out", "{d}/plain.txt"], ["--out", "plain.txt", "not a folder"]),
    ("out-inside-a-file", [*_INSPECT, "--out", "{d}/plain.txt/pngs"], ["--out", "plain.txt", "not a folder"]),
    ("out-read-only", [*_INSPECT, "--out", "{d}/ro"], ["--out", "folder {d}/ro is not writable"]),
    ("out-inside-read-only", [*_INSPECT, "--out", "{d}/ro/pngs"], ["--out", "folder {d}/ro is not writable"]),
    ("json-is-a-folder", [*_INSPECT, "--json", "{d}/sub"], ["--json", "sub", "is a folder"]),
    ("json-inside-a-file", [*_INSPECT, "--json", "{d}/plain.txt/r.json"], ["--json", "plain.txt", "not a folder"]),
    ("json-inside-read-only", [*_INSPECT, "--json", "{d}/ro/r.json"], ["--json", "folder {d}/ro is not writable"]),
    ("model-nan", ["--model", "{d}/nan.safetensors", "--prompt", "Be"], ["nan.safetensors", "NaN"]),
]
_SAMPLE = ["--prompt", "Be", "--max-new-tokens", "3", "--device", "cpu"]
SAMPLE_CASES = [
    ("model-missing", ["--model", "{d}/nope.safetensors", *_SAMPLE], ["nope.safetensors", "not found"]),
    ("model-truncated", ["--model", "{d}/truncated.safetensors", *_SAMPLE], ["truncated.safetensors", "truncated"]),
    ("model-nan", ["--model", "{d}/nan.safetensors", *_SAMPLE], ["nan.safetensors", "blocks.0.mlp.up_proj.weight", "NaN"]),
    ("model-integer-tensor", ["--model", "{d}/int.safetensors", *_SAMPLE], ["int.safetensors", "'norm.weight'", "I64"]),
    ("config-not-json", ["--model", "{d}/config_not_json.safetensors", *_SAMPLE], ["config_not_json", "not valid JSON"]),
    ("config-a-list", ["--model", "{d}/config_list.safetensors", *_SAMPLE], ["config_list", "JSON list"]),
    ("config-n-head", ["--model", "{d}/config_heads.safetensors", *_SAMPLE], ["config_heads", "n_embd (32) must be divisible by n_head (5)"]),
    ("chat-template-syntax", ["--model", "{d}/chat_syntax.safetensors", "--chat", *_SAMPLE],
     ["chat template", "TemplateSyntaxError", "endfor"]),
    ("chat-template-sandbox", ["--model", "{d}/chat_sandbox.safetensors", "--chat", *_SAMPLE],
     ["chat template", "SecurityError", "__class__"]),
]
CASES = [(cli, name, argv, words) for cli, cases in (("convert", CONVERT), ("quantize", QUANTIZE), ("export", EXPORT),
                                                     ("inspect", INSPECT), ("sample", SAMPLE_CASES))
         for name, argv, words in cases]


def snapshot(d: Path) -> dict[str, tuple]:
    """Every file, folder and link under d (hidden ones too): kind, size, mode and mtime."""
    out = {}
    for root, dirs, names in os.walk(d):
        for name in dirs + names:
            p = Path(root) / name
            st = p.lstat()
            out[str(p.relative_to(d))] = (st.st_mode, st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return out


@pytest.fixture
def read_only_for_root(files, monkeypatch):
    """Root writes into a mode-0555 folder anyway (CAP_DAC_OVERRIDE), so there the kernel's answer for
    an ordinary user is stood in for: os.access denies writing into {d}/ro. Elsewhere nothing changes."""
    if os.geteuid() == 0:
        real = os.access
        ro = files / "ro"
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if (mode & os.W_OK and Path(p) == ro)
                            else real(p, mode, **kw))


@pytest.mark.parametrize("cli,name,argv,words", CASES, ids=[f"{c}-{n}" for c, n, _, _ in CASES])
def test_refused_with_one_line_and_nothing_written(files, read_only_for_root, capsys, cli, name, argv, words):
    argv = [a.replace("{d}", str(files)) for a in argv]
    argv += {"convert": ["--quiet"], "quantize": ["--bits", "8"]}.get(cli, [])
    before = snapshot(files)
    code, out, err = run(capsys, MAINS[cli], *argv)
    assert code == 2, (code, err)
    assert "Traceback" not in out
    line = one_error_line(err)
    assert line.startswith("error: "), err
    for w in words:
        assert w.replace("{d}", str(files)) in line, (w, line)
    assert snapshot(files) == before, "a file was created or changed"
