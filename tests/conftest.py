"""Shared fixtures: the real data in ../shared/data (MBPP, LLaMA-2 tokenizer)."""

from __future__ import annotations

import os
import socket
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3(tuple):
    """(endpoint, client) of a moto S3 server on 127.0.0.1, with `.server` to stop it early."""

    def __new__(cls, endpoint: str, client, server):
        local = super().__new__(cls, (endpoint, client))
        local.server = server
        return local


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    client.create_bucket(Bucket="wmtp-mirror")
    yield LocalS3(f"http://127.0.0.1:{port}", client, server)
    server.stop()
