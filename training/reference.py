"""The Rho-1 reference's per-token CE: computed by a reference forward, or read from precomputed
safetensors shards keyed by the training data's hash.

    <root>/<data_hash>/ref_ce-00000.safetensors   one 1-D float32 tensor per sample id
    <root>/<data_hash>/index.json                  data_hash, reference id, sample → shard
    <root>/<data_hash>/SHA256SUMS

`ce[i]` of a sample is the reference CE of its token i+1 given tokens[:i+1] (length n−1).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from model.transformer import Transformer
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
    """Reads precomputed reference CE, refusing shards made for other data."""

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

    def __len__(self) -> int:
        return len(self.sample_to_shard)

    def get(self, sample_id: str) -> torch.Tensor:
        try:
            shard = self.sample_to_shard[sample_id]
        except KeyError:
            raise KeyError(f"sample {sample_id!r} has no precomputed reference CE") from None
        with safe_open(str(self.directory / shard), framework="pt") as f:
            return f.get_tensor(sample_id)


@torch.no_grad()
def reference_next_token_ce(
    reference: Transformer,
    tokens: torch.Tensor,
    chunk_size: int = 512,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """CE of the reference's next-token head: out[b, t] = −log p(tokens[b, t+1] | tokens[b, :t+1]).

    With `segment_ids` the context is the token's own sample only (packed rows). The last
    position has no target and is NaN. Logits are built `chunk_size` positions at a time so a
    32000-word vocabulary never needs (bsz, seq, vocab) floats at once.
    """
    trunk = reference(tokens, return_trunk=True, segment_ids=segment_ids)
    hidden = reference.head_hidden(trunk, 0, segment_ids=segment_ids)
    bsz, seq = tokens.shape
    ce = torch.full((bsz, seq), float("nan"), device=tokens.device)
    for start in range(0, seq - 1, chunk_size):
        end = min(start + chunk_size, seq - 1)
        logits = reference.output(hidden[:, start:end]).float()
        targets = tokens[:, start + 1 : end + 1]
        ce[:, start:end] = F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), reduction="none"
        ).view(bsz, end - start)
    return ce
