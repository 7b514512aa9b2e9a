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


@pytest.fixture(scope="session")
def micro(tmp_path_factory, mbpp_path):
    """Micro assets shared by the training tests: (root, asset paths, env config path)."""
    from tests.micro_assets import build_micro_assets, env_config

    root = tmp_path_factory.mktemp("micro")
    assets = build_micro_assets(root, mbpp_path)
    return root, assets, env_config(root / "config.yaml", root)
