"""The v2 storage layout, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODELS = ("meta-llama-mtp", "ref-sheared-llama-2.7b", "micro-mtp", "micro-ref")
MODEL_PARTS = ("raw", "safetensors", "configs", "tokenizer")
DATASETS = ("codecontests", "mbpp", "humaneval")
DATASET_PARTS = ("raw", "processed", "stats")
OLD_LAYOUTS = ("models", "datasets", "models_v1", "datasets_v1", "checkpoints_old")


@dataclass(frozen=True)
class Layout:
    root: Path

    def model(self, name: str, part: str = "") -> Path:
        return self.root / "models_v2" / name / part if part else self.root / "models_v2" / name

    def dataset(self, name: str, part: str = "") -> Path:
        return self.root / "datasets_v2" / name / part if part else self.root / "datasets_v2" / name

    @property
    def small(self) -> Path:
        return self.root / "datasets_local_small"

    def all_dirs(self) -> list[Path]:
        dirs = [self.model(m, p) for m in MODELS for p in MODEL_PARTS]
        dirs += [self.dataset(d, p) for d in DATASETS for p in DATASET_PARTS]
        return [*dirs, self.small]
