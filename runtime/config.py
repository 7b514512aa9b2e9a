"""Environment config (recipes/config.yaml): where things live and which services to use.

Recipes say *what* to train; this file says *where*: storage root, S3 mirror, hub, MLflow
tracking, launcher, hardware peak. Environment variables override the file (see ENV_OVERRIDES);
secrets (AWS keys, HF_TOKEN) are read from the environment only and never stored here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from runtime.schema import apply_overrides, build, key, load_yaml, require

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "config.yaml"


@dataclass
class StorageConfig:
    root: str = "storage"
    cache_dir: str = ".cache"


@dataclass
class S3Config:
    bucket: str | None = None
    prefix: str = "wmtp"
    region: str = "us-east-1"
    endpoint_url: str | None = None
    upload: bool = False  # mirror downloaded assets to the bucket
    checkpoints: bool = False  # mirror training checkpoints and exports to s3://bucket/prefix/runs/


@dataclass
class HubConfig:
    base_url: str = "https://huggingface.co"
    revision: str = "main"


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    enabled: bool = True


@dataclass
class VesslConfig:
    organization: str | None = None
    project: str = "wmtp"
    cluster: str = "default"
    preset: str = "gpu-a100-8"
    image: str = "wmtp:latest"


@dataclass
class LauncherConfig:
    target: Literal["local", "vessl"] = "local"
    nnodes: int = 1
    nproc_per_node: int = 8
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    rdzv_backend: Literal["static", "c10d"] = "static"
    rdzv_id: str = "wmtp"
    vessl: VesslConfig = field(default_factory=VesslConfig)

    def validate(self, where: str) -> None:
        require(self.nnodes >= 1, key(where, "nnodes"), self.nnodes, "must be >= 1")
        require(
            self.nproc_per_node >= 1,
            key(where, "nproc_per_node"),
            self.nproc_per_node,
            "must be >= 1",
        )
        require(
            0 <= self.node_rank < self.nnodes,
            key(where, "node_rank"),
            self.node_rank,
            "must be in [0, nnodes)",
        )


@dataclass
class HardwareConfig:
    peak_tflops: float = 312.0  # A100 bf16 dense; used for the MFU estimate


@dataclass
class ModelAssetConfig:
    repo: str = ""
    files: list[str] = field(default_factory=list)  # paths inside the repo
    sha256: dict[str, str] = field(default_factory=dict)  # pinned digests by path (optional)


@dataclass
class DatasetAssetConfig:
    repo: str | None = None  # hub dataset repo
    path: str = ""  # folder inside the repo (listed through the hub API)
    url: str | None = None  # or one plain URL
    sha256: str | None = None


@dataclass
class MicroConfig:
    """The CPU-sized models of step 5 (Meta's layer counting: n_layers includes the heads), and
    their pretraining on Python source (`assets/pretrain.py`)."""

    dim: int = 512
    n_layers: int = 5
    n_heads: int = 8
    n_kv_heads: int = 4
    multiple_of: int = 128
    n_future_tokens: int = 4
    vocab_size: int = 8000
    seed: int = 42
    max_corpus_mb: float = 20.0
    corpus_dirs: list[str] = field(default_factory=list)  # default: the interpreter's stdlib
    holdout_fraction: float = 0.03  # of the corpus files, held out for the base's CE
    pretrain_tokens: int = 2_000_000  # tokens the base sees (rows × seq_len × steps)
    pretrain_lr: float = 3e-3
    pretrain_seq_len: int = 512
    pretrain_micro_batch: int = 8


def _meta_asset() -> ModelAssetConfig:
    return ModelAssetConfig(
        "facebook/multi-token-prediction",
        ["7B_1T_4/consolidated.pth", "7B_1T_4/params.json", "tokenizer.model"],
    )


def _reference_asset() -> ModelAssetConfig:
    return ModelAssetConfig(
        "princeton-nlp/Sheared-LLaMA-2.7B",
        [
            "config.json",
            "pytorch_model.bin.index.json",
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
            "tokenizer.model",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ],
    )


@dataclass
class AssetsConfig:
    local_dirs: list[str] = field(default_factory=list)  # searched first for every file
    meta: ModelAssetConfig = field(default_factory=_meta_asset)
    reference: ModelAssetConfig = field(default_factory=_reference_asset)
    codecontests: DatasetAssetConfig = field(
        default_factory=lambda: DatasetAssetConfig("deepmind/code_contests", "data")
    )
    mbpp: DatasetAssetConfig = field(
        default_factory=lambda: DatasetAssetConfig(
            url="https://raw.githubusercontent.com/google-research/google-research/master/mbpp/mbpp.jsonl",
            sha256="ccf64ceae9c5403bf50a044cb6d505bfd2a2963ee58338ba268fd65beab92a9f",
        )
    )
    micro: MicroConfig = field(default_factory=MicroConfig)
    max_length: int = 2048
    split_seed: int = 42
    incorrect: Literal["tag", "drop", "keep"] = (
        "tag"  # incorrect solutions (data.prepare --incorrect)
    )


@dataclass
class EnvConfig:
    storage: StorageConfig = field(default_factory=StorageConfig)
    s3: S3Config = field(default_factory=S3Config)
    hub: HubConfig = field(default_factory=HubConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    assets: AssetsConfig = field(default_factory=AssetsConfig)


ENV_OVERRIDES = {
    "WMTP_STORAGE_ROOT": "storage.root",
    "WMTP_CACHE_DIR": "storage.cache_dir",
    "WMTP_S3_BUCKET": "s3.bucket",
    "WMTP_S3_PREFIX": "s3.prefix",
    "WMTP_S3_ENDPOINT_URL": "s3.endpoint_url",
    "WMTP_HUB_URL": "hub.base_url",
    "MLFLOW_TRACKING_URI": "mlflow.tracking_uri",
    "WMTP_LAUNCHER_TARGET": "launcher.target",
}


def load_env_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> EnvConfig:
    """config.yaml (default: recipes/config.yaml if present), then env vars, then overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    data = load_yaml(path) if path.is_file() or path != DEFAULT_CONFIG else {}
    env = [
        f"{dotted}={os.environ[var]}"
        for var, dotted in ENV_OVERRIDES.items()
        if os.environ.get(var)
    ]
    data = apply_overrides(data, env + list(overrides or []))
    return build(EnvConfig, data)
