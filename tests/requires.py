"""Optional pieces of the test suite (PostgreSQL, Chromium, DeepSpeed, vLLM): skip where missing, fail in CI.

Why: a test that skips silently in CI proves nothing. ``.ci/run`` installs every piece and sets
``COTUNE_REQUIRE_<PIECE>=1``, which turns the skip into a failure that names what is missing; on a laptop without
the piece the test still skips with the command that installs it.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

PIECES = ("postgres", "chromium", "deepspeed", "vllm")


def required(piece: str) -> bool:
    """True where ``COTUNE_REQUIRE_<PIECE>=1``: the piece must be there, a skip would hide a broken install."""
    if piece not in PIECES:
        raise ValueError(f"unknown piece {piece!r}; expected one of {PIECES}")
    return os.environ.get(f"COTUNE_REQUIRE_{piece.upper()}") == "1"


def missing(piece: str, reason: str) -> NoReturn:
    """Skip the test (``reason`` says how to install ``piece``), or fail it where the piece is required."""
    if required(piece):
        pytest.fail(f"COTUNE_REQUIRE_{piece.upper()}=1 but {reason}", pytrace=False)
    pytest.skip(reason)
