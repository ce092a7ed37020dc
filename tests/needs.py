"""What the suite needs from the machine beyond pip (a real model file, Debian's Chromium). Where one
is missing a test skips, saying how to get it; where CI sets the variable that requires it
(MINILLM_REQUIRE_MODELS=1, MINILLM_REQUIRE_BROWSER=1), the same is a failure."""

import os

import pytest


def missing(msg: str, require_env: str, what: str):
    """Skip with msg, or fail where $require_env is 1."""
    if os.environ.get(require_env) == "1":
        pytest.fail(f"{msg}; {require_env}=1 makes a missing {what} a failure")
    pytest.skip(msg)
