"""Precomputed Rho-1 reference CE: safetensors shards keyed by the training data's hash.

    <root>/<data_hash>/ref_ce-00000.safetensors   one 1-D float32 tensor per sample id
    <root>/<data_hash>/index.json                  data_hash, reference id, sample → shard
    <root>/<data_hash>/SHA256SUMS

`ce[i]` of a sample is the reference CE of its token i+1 given tokens[:i+1] (length n−1).
`python -m training.precompute_reference` writes them; the training loader attaches each row's
values to its `Batch` (`Batch.ref_ce`), reading from shards opened once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime.integrity import atomic_path, atomic_write_text, verify_sha256sums, write_sha256sums

INDEX = "index.json"


class ReferenceCEWriter:
    """Collects per-sample CE and writes shards of `shard_size` samples; `close()` seals it."""

    def __init__(self, root: str | Path, data_hash: str, reference_id: str, shard_size: int = 4096):
        self.directory = Path(root) / data_hash
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data_hash, self.reference_id, self.shard_size = data_hash, reference_id, shard_size
        self.pending: dict[str, torch.Tensor] = {}
        self.sample_to_shard: dict[str, str] = {}
        self.files: list[str] = []

    def add(self, sample_id: str, ce: torch.Tensor) -> None:
        if sample_id in self.sample_to_shard or sample_id in self.pending:
            raise ValueError(f"reference CE for sample {sample_id!r} written twice")
        self.pending[sample_id] = ce.detach().float().cpu().contiguous()
        if len(self.pending) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        name = f"ref_ce-{len(self.files):05d}.safetensors"
        with atomic_path(self.directory / name) as tmp:
            save_file(self.pending, str(tmp), metadata={"data_hash": self.data_hash})
        self.sample_to_shard.update(dict.fromkeys(self.pending, name))
        self.files.append(name)
        self.pending = {}

    def close(self) -> Path:
        self._flush()
        index = {
            "data_hash": self.data_hash,
            "reference_id": self.reference_id,
            "samples": self.sample_to_shard,
        }
        atomic_write_text(self.directory / INDEX, json.dumps(index, sort_keys=True) + "\n")
        write_sha256sums(self.directory, [*self.files, INDEX])
        return self.directory


class ReferenceCEStore:
    """Reads precomputed reference CE, refusing shards made for other data. Every shard is opened
    once (memory-mapped) and kept open for the store's life."""

    def __init__(self, root: str | Path, data_hash: str, verify: bool = True):
        self.directory = Path(root) / data_hash
        if not (self.directory / INDEX).is_file():
            raise FileNotFoundError(
                f"no precomputed reference CE for data hash {data_hash} under {root} "
                "(compute it first, or set weighting.reference_source: online)"
            )
        if verify:
            verify_sha256sums(self.directory)
        index = json.loads((self.directory / INDEX).read_text())
        if index["data_hash"] != data_hash:
            raise ValueError(
                f"{self.directory / INDEX} was computed for data hash {index['data_hash']}, "
                f"the training data has {data_hash}"
            )
        self.reference_id: str = index["reference_id"]
        self.sample_to_shard: dict[str, str] = index["samples"]
        self._shards = {
            name: safe_open(str(self.directory / name), framework="np")
            for name in sorted(set(self.sample_to_shard.values()))
        }

    def __len__(self) -> int:
        return len(self.sample_to_shard)

    def values(self, sample_id: str) -> np.ndarray:
        """The sample's CE (float32, its length − 1)."""
        try:
            shard = self.sample_to_shard[sample_id]
        except KeyError:
            raise KeyError(f"sample {sample_id!r} has no precomputed reference CE") from None
        return self._shards[shard].get_tensor(sample_id)

    def get(self, sample_id: str) -> torch.Tensor:
        return torch.from_numpy(self.values(sample_id))
