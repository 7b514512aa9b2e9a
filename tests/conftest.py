"""Shared fixtures: the real data in ../shared/data (MBPP, LLaMA-2 tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WMTP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"test data missing: {path} (set WMTP_SHARED_DATA to the shared/data folder)")
    return path


@pytest.fixture(scope="session")
def llama2_tokenizer_path() -> Path:
    return shared_file("tokenizer", "llama2", "tokenizer.model")


@pytest.fixture(scope="session")
def mbpp_path() -> Path:
    return shared_file("mbpp", "mbpp.jsonl")
