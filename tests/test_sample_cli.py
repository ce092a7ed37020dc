"""sample.py: every method wired to the library (greedy speculative and beta = 0 contrastive equal
plain greedy), the sampler flags, stop strings, stats on stderr, and clear errors for bad flag
combinations. Tiny random models are saved to a temporary directory; main() runs in-process (one
subprocess run checks the real entry point)."""

import subprocess
import sys

import pytest

from minillm.checkpoint import save_model
from minillm.tokenizer import CharTokenizer
from cli_runner import ROOT, run as run_main, script
from tiny import lively, tiny_model

TEXT = "ROMEO:\nWhat light through yonder window breaks?\nJULIET:\nAy me!\n"
CLI = script("sample")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A target, a draft/amateur (same tokenizer, different weights, llama family) and a model with
    another tokenizer."""
    d = tmp_path_factory.mktemp("cli")
    tok = CharTokenizer.from_text(TEXT)
    shape = dict(vocab_size=tok.vocab_size, block_size=64, tie_embeddings=False)  # lively: the two models disagree
    save_model(d / "target.safetensors", lively(tiny_model("gpt2", 0, **shape)), tok)
    save_model(d / "small.safetensors", lively(tiny_model("llama", 1, n_layer=1, n_kv_head=None, **shape)), tok)
    other = CharTokenizer.from_text(TEXT + "XYZ")
    save_model(d / "other.safetensors", tiny_model("gpt2", 2, vocab_size=other.vocab_size), other)
    return {k: str(d / f"{k}.safetensors") for k in ("target", "small", "other")}


def run(capsys, *args):
    return run_main(capsys, CLI.main, *args)  # a flag the parser refuses exits (minillm.flags)


def test_sample_is_reproducible_and_streams(ckpts, capsys):
    args = ["--model", ckpts["target"], "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "5"]
    c1, a, err = run(capsys, *args)
    c2, b, _ = run(capsys, *args)
    _, c, _ = run(capsys, *args[:-1], "6")
    assert c1 == c2 == 0 and a == b != c
    assert a.startswith("ROMEO:") and len(a) == len("ROMEO:") + 20 + 1
    assert "tok/s" in err and "stopped by max_new_tokens" in err


def greedy_text(capsys, ckpts, n=30):
    code, out, _ = run(capsys, "--model", ckpts["target"], "--prompt", "Ay", "--max-new-tokens", str(n), "--method", "greedy")
    assert code == 0
    return out


@pytest.mark.parametrize("k", [["--k", "1"], ["--k", "3"], ["--k", "2", "--adaptive-k"]])
def test_greedy_speculative_equals_greedy_and_prints_stats(ckpts, capsys, k):
    want = greedy_text(capsys, ckpts)
    code, out, err = run(capsys, "--model", ckpts["target"], "--prompt", "Ay", "--max-new-tokens", "30",
                         "--method", "speculative", "--draft", ckpts["small"], *k, "--temperature", "0")
    assert code == 0, err
    assert out == want and "acceptance rate 1.000" not in err  # the draft was wrong at times
    for needle in ("acceptance histogram (drafts accepted per target call) 0:", "mean accepted ",
                   "tokens per target call", "target ", "draft ", "tok/s"):
        assert needle in err, needle


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_invariant_greedy_speculative_equals_its_greedy(ckpts, capsys, dtype):
    """--batch-invariant: the plain run and the speculative run compute each token the same way."""
    same = ["--model", ckpts["target"], "--prompt", "Ay", "--max-new-tokens", "30", "--dtype", dtype,
            "--batch-invariant", "3"]
    code, want, err = run(capsys, *same, "--method", "greedy")
    assert code == 0, err
    code, out, err = run(capsys, *same, "--method", "speculative", "--draft", ckpts["small"], "--k", "2",
                         "--temperature", "0")
    assert code == 0 and out == want, err


def test_greedy_prompt_lookup_equals_greedy(ckpts, capsys):
    """--draft-lookup: speculative decoding with no draft model (prompt lookup), greedy text unchanged."""
    want = greedy_text(capsys, ckpts)
    code, out, err = run(capsys, "--model", ckpts["target"], "--prompt", "Ay", "--max-new-tokens", "30",
                         "--method", "speculative", "--draft-lookup", "--lookup-ngram", "2", "--k", "5",
                         "--temperature", "0")
    assert code == 0, err
    assert out == want and "acceptance histogram" in err and "lookup " in err and "draft " not in err


def test_sampled_speculative_is_seeded(ckpts, capsys):
    args = ["--model", ckpts["target"], "--prompt", "Ay", "--max-new-tokens", "25", "--method", "speculative",
            "--draft", ckpts["small"], "--top-k", "10", "--seed", "3"]
    assert run(capsys, *args)[1] == run(capsys, *args)[1]


def test_contrastive_with_beta_zero_is_greedy_and_prints_stats(ckpts, capsys):
    want = greedy_text(capsys, ckpts)
    code, out, err = run(capsys, "--model", ckpts["target"], "--prompt", "Ay", "--max-new-tokens", "30",
                         "--method", "contrastive", "--amateur", ckpts["small"], "--beta", "0")
    assert code == 0, err
    assert out == want and "mean |V_head|" in err and "differs from expert argmax" in err
    code, out, err = run(capsys, "--model", ckpts["target"], "--prompt", "Ay", "--max-new-tokens", "30",
                         "--method", "contrastive", "--amateur", ckpts["small"], "--beta", "2", "--alpha", "0.5",
                         "--amateur-context", "last_prompt_token")
    assert code == 0 and len(out) == len("Ay") + 30 + 1 and out != want
    assert "differs from expert argmax on 0.0%" not in err


def test_sampler_flags_reach_the_sampler(ckpts, capsys):
    """--no-repeat-ngram-size 2 on greedy: the output never repeats a character bigram."""
    code, out, err = run(capsys, "--model", ckpts["target"], "--prompt", "Ay", "--max-new-tokens", "30",
                         "--method", "greedy", "--no-repeat-ngram-size", "2", "--repetition-penalty", "1.1",
                         "--presence-penalty", "0.1", "--frequency-penalty", "0.1")
    assert code == 0, err
    text = out[:-1]
    grams = [text[i:i + 2] for i in range(len(text) - 1)]
    assert len(grams) == len(set(grams))
    code, out, err = run(capsys, "--model", ckpts["target"], "--prompt", "Ay", "--max-new-tokens", "10",
                         "--min-p", "0.1", "--typical-p", "0.9", "--top-p", "0.95", "--top-k", "20")
    assert code == 0, err


def test_stop_strings_cut_the_output(ckpts, capsys):
    full = greedy_text(capsys, ckpts)[:-1]  # "Ay" + 30 new characters
    stop = full[12:14]
    code, out, err = run(capsys, "--model", ckpts["target"], "--prompt", "Ay", "--max-new-tokens", "30",
                         "--method", "greedy", "--stop", "\u2603", "--stop", stop)
    assert code == 0 and out == full[:full.find(stop, 2)] + "\n" and "stopped by stop" in err


@pytest.mark.parametrize("extra, match", [
    (["--method", "speculative"], "--method speculative needs --draft PATH (a smaller model with the same "
                                  "tokenizer) or --draft-lookup"),
    (["--method", "contrastive"], "--method contrastive needs --amateur PATH"),
    (["--draft", "X"], "--draft is used only by --method speculative (got --method sample)"),
    (["--method", "greedy", "--amateur", "X"], "--amateur is used only by --method contrastive"),
    (["--method", "greedy", "--temperature", "0.5"], "--method greedy means temperature 0; got --temperature 0.5"),
    (["--adaptive-k"], "--adaptive-k is used only by --method speculative"),
    (["--method", "speculative", "--draft", "OTHER"], "have different tokenizers"),
    (["--method", "contrastive", "--amateur", "OTHER"], "have different tokenizers"),
    (["--method", "speculative", "--draft", "SMALL", "--k", "0"],
     "argument --k: must be a whole number >= 1 and <= 64, got '0'"),
    (["--draft-lookup"], "--draft-lookup is used only by --method speculative (got --method sample)"),
    (["--method", "speculative", "--draft", "SMALL", "--draft-lookup"], "give --draft PATH or --draft-lookup, not both"),
    (["--method", "speculative", "--draft-lookup", "--lookup-ngram", "17"],
     "argument --lookup-ngram: must be a whole number >= 1 and <= 16, got '17'"),
    (["--method", "contrastive", "--amateur", "SMALL", "--alpha", "0"], "argument --alpha: must be a finite number > 0 and <= 1, got '0'"),
    (["--top-p", "1.5"], "argument --top-p: must be a finite number > 0 and <= 1, got '1.5'"),
    (["--min-p", "2"], "argument --min-p: must be a finite number >= 0 and <= 1, got '2'"),
    (["--typical-p", "0"], "argument --typical-p: must be a finite number > 0 and <= 1, got '0'"),
    (["--repetition-penalty", "0"], "argument --repetition-penalty: must be a finite number > 0, got '0'"),
    (["--no-repeat-ngram-size", "-2"], "argument --no-repeat-ngram-size: must be a whole number >= 0, got '-2'"),
    (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0, got '-1'"),
    (["--stop", ""], "stop strings must be non-empty strings"),
    (["--prompt", "QQ"], "'Q'"),
    (["--num-samples", "0"], "argument --num-samples: must be a whole number >= 1, got '0'"),
    (["--batch-invariant", "0"], "argument --batch-invariant: must be a whole number >= 1 and <= 65, got '0'"),
    (["--batch-invariant", "5", "--compile"], "--batch-invariant and --compile do not go together"),
    (["--batch-invariant", "5", "--reference"], "--batch-invariant and --reference do not go together"),
])
def test_bad_flags_are_clear_errors(ckpts, capsys, extra, match):
    extra = [{"OTHER": ckpts["other"], "SMALL": ckpts["small"]}.get(a, a) for a in extra]
    code, out, err = run(capsys, "--model", ckpts["target"], "--max-new-tokens", "5", *extra)
    assert code == 2 and match in err, err


def test_missing_model_file(capsys, tmp_path):
    code, _, err = run(capsys, "--model", str(tmp_path / "nope.safetensors"))
    assert code == 2 and "nope.safetensors" in err


def test_errors_name_the_next_step(capsys, tmp_path, monkeypatch):
    """A GGUF file or a Hugging Face folder where our checkpoint is expected names the convert command
    (was "not a readable safetensors file (... header too large)"); with no model at all, the default
    --model names train.py (was "checkpoint not found: weights/shakespeare-char.safetensors")."""
    gguf, hf = tmp_path / "model.gguf", tmp_path / "hf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    for path, kind in ((gguf, "a GGUF file"), (hf, "a Hugging Face model folder")):
        code, _, err = run(capsys, "--model", str(path))
        assert code == 2 and f"{path}: {kind}, not a minillm checkpoint; convert it first: python -m minillm.convert " \
            f"{path} --out weights/{path.stem}.safetensors" in err, err
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys)
    assert code == 2 and "(the default --model): make it with `python train.py`" in err, err


def test_entry_point_runs(ckpts):
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", ckpts["target"], "--prompt", "Ay",
                        "--max-new-tokens", "8", "--method", "speculative", "--draft", ckpts["small"]],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Ay") and len(r.stdout) == len("Ay") + 8 + 1 and "mean accepted" in r.stderr


@pytest.mark.slow
def test_compile_flag_gives_the_same_greedy_text(ckpts, capsys):
    args = ["--model", ckpts["target"], "--prompt", "Ay", "--max-new-tokens", "20", "--method", "speculative",
            "--draft", ckpts["small"], "--k", "2", "--temperature", "0"]
    code, eager, _ = run(capsys, *args)
    code_c, compiled, err = run(capsys, *args, "--compile")
    assert code == code_c == 0 and compiled == eager and len(set(eager.strip())) > 2
    assert err.count("compiling the one-token step of") == 2, err  # the target's step and the draft's


def test_a_refused_setting_prints_no_prompt_first(ckpts, capsys):
    """The context check runs inside the decoding loop; sample.py asks for the first piece before it
    echoes the prompt, so stdout stays empty when the settings are refused."""
    code, out, err = run(capsys, "--model", ckpts["target"], "--prompt", "ROMEO:", "--method", "contrastive",
                         "--amateur", ckpts["small"], "--max-new-tokens", "60")
    assert code == 2 and out == "" and "exceeds the expert's context of 64" in err and err.count("\n") == 1


@pytest.mark.parametrize("method, partner", [("speculative", "--draft"), ("contrastive", "--amateur")])
def test_default_max_new_tokens_fits_the_context(ckpts, capsys, method, partner):
    """Without --max-new-tokens, methods with no sliding window generate what fits: 64 - 6 + 1 = 59 tokens."""
    code, out, err = run(capsys, "--model", ckpts["target"], "--prompt", "ROMEO:", "--method", method,
                         partner, ckpts["small"], "--temperature", "0")
    assert code == 0, err
    assert len(out) == len("ROMEO:") + 59 + 1 and "+ 59 new tokens" in err


def test_ctrl_c_and_a_closed_pipe_end_quietly(ckpts, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(CLI, "stream", interrupted)
    code, out, err = run(capsys, "--model", ckpts["target"], "--max-new-tokens", "5")
    assert code == 130 and err.strip() == "interrupted" and "Traceback" not in err
    r = subprocess.run(f"{sys.executable} {ROOT / 'sample.py'} --model {ckpts['target']} --max-new-tokens 3000 "
                       f"--prompt Ay | head -c 1", shell=True, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.stdout == "A" and r.stderr == ""
