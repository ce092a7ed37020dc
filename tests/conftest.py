import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """../shared/data beside the checkout, or $MINILLM_DATA_DIR."""
    return Path(os.environ.get("MINILLM_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _data_env():
    os.environ.setdefault("MINILLM_DATA_DIR", str(shared_data_dir()))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return shared_data_dir()


@pytest.fixture(scope="session")
def shakespeare_text(data_dir) -> str:
    return (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
