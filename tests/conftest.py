import os
from pathlib import Path

import pytest

pytest.register_assert_rewrite("cli_runner", "real_models")  # imported here, before pytest would rewrite them
from cli_runner import exit_status  # noqa: F401  (test_flags and test_readme import it from here)
from real_models import real_model  # noqa: F401  (test_readme imports it from here)

pytest_plugins = ["real_models"]  # the real-model fixtures (SmolLM2, Qwen 0.5B, GPT-2's ranks)
ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """../shared/data beside the checkout, or $MINILLM_DATA_DIR."""
    return Path(os.environ.get("MINILLM_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _data_env():
    os.environ.setdefault("MINILLM_DATA_DIR", str(shared_data_dir()))


@pytest.fixture(scope="session", autouse=True)
def _quant_kernel_built():
    """Build our int4/int8 kernel (minillm/kernels; on AVX-512 VNNI CPUs) once, up front: else the first
    command-line test that loads a quantized model would build it inside its subprocess's time limit."""
    from minillm.kernels import vnni
    vnni()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return shared_data_dir()


@pytest.fixture(scope="session")
def shakespeare_text(data_dir) -> str:
    return (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


@pytest.fixture
def one_thread():
    """For tests made of thousands of tiny ops: intra-op threads only add synchronisation
    (up to 10x slower on a busy machine). Restores the thread count afterwards."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
