"""Tokenised splits, cached under .cache/tokenized/ by a key over everything that shapes them.

The key hashes the split file's SHA256, the manifest's data version, preprocessing config,
template and split seed, and the tokenizer's SHA256: change any of them and a new cache entry
is built; the old one is never reused by mistake.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data.records import read_records
from model.tokenizer import Tokenizer
from runtime.integrity import atomic_path, sha256_file

TOKENIZATION_VERSION = "bos-prompt-response-eos-v1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("WMTP_CACHE_DIR", ".cache"))


@dataclass
class TokenizedSplit:
    """Flat token storage: sample i is tokens[offsets[i]:offsets[i+1]].

    Its first prompt_lens[i] tokens (bos + prompt) carry no loss; the rest (response + eos) do.
    """

    tokens: np.ndarray  # int32
    offsets: np.ndarray  # int64, n+1
    prompt_lens: np.ndarray  # int32
    is_correct: np.ndarray  # bool
    sample_ids: list[str]
    key: str

    def __len__(self) -> int:
        return len(self.sample_ids)

    def sample(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def cache_key(split_path: Path, tokenizer: Tokenizer) -> str:
    manifest_path = split_path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    material = {
        "split_sha256": sha256_file(split_path),
        "data_version": manifest.get("data_version"),
        "config": manifest.get("config"),
        "template": manifest.get("template"),
        "split_seed": manifest.get("seed"),
        "tokenizer_sha256": tokenizer.sha256(),
        "tokenization": TOKENIZATION_VERSION,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def tokenize_split(split_path: Path, tokenizer: Tokenizer, key: str = "") -> TokenizedSplit:
    records = read_records(split_path)
    pieces, prompt_lens = [], []
    for record in records:
        prompt = [tokenizer.bos_id, *tokenizer.encode(record.prompt)]
        pieces.append(
            np.asarray(prompt + tokenizer.encode(record.response) + [tokenizer.eos_id], np.int32)
        )
        prompt_lens.append(len(prompt))
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    return TokenizedSplit(
        tokens=np.concatenate(pieces) if pieces else np.zeros(0, np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        prompt_lens=np.asarray(prompt_lens, np.int32),
        is_correct=np.asarray([r.metadata["is_correct"] for r in records], bool),
        sample_ids=[r.sample_id for r in records],
        key=key,
    )


def _save(split: TokenizedSplit, path: Path) -> None:
    tensors = {
        "tokens": torch.from_numpy(split.tokens),
        "offsets": torch.from_numpy(split.offsets),
        "prompt_lens": torch.from_numpy(split.prompt_lens),
        "is_correct": torch.from_numpy(split.is_correct.astype(np.uint8)),
    }
    with atomic_path(path) as tmp:
        save_file(
            tensors,
            str(tmp),
            metadata={"sample_ids": json.dumps(split.sample_ids), "key": split.key},
        )


def _load(path: Path) -> TokenizedSplit:
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
        arrays = {k: f.get_tensor(k) for k in ("tokens", "offsets", "prompt_lens", "is_correct")}
    return TokenizedSplit(
        tokens=arrays["tokens"],
        offsets=arrays["offsets"],
        prompt_lens=arrays["prompt_lens"],
        is_correct=arrays["is_correct"].astype(bool),
        sample_ids=json.loads(meta["sample_ids"]),
        key=meta["key"],
    )


def load_tokenized(
    split_path: str | Path, tokenizer: Tokenizer, cache_dir: str | Path | None = None
) -> TokenizedSplit:
    """The tokenised split, from the cache when its key matches, else tokenised and cached."""
    split_path = Path(split_path)
    key = cache_key(split_path, tokenizer)
    path = (
        Path(cache_dir or default_cache_dir())
        / "tokenized"
        / f"{split_path.stem}-{key}.safetensors"
    )
    if path.is_file():
        return _load(path)
    split = tokenize_split(split_path, tokenizer, key)
    _save(split, path)
    return split
