"""`ModelArgs`: the hyper-parameters of an (MTP) LLaMA, as Meta's params.json spells them."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class ModelArgs:
    """LLaMA hyper-parameters plus the number of future-token heads.

    `n_layers` counts every transformer block, prediction heads included: Meta's 7B_1T_4 has
    n_layers=32 and n_future_tokens=4, so its trunk holds 28 blocks, head 0 is block 29 and the
    three extra heads are one block each.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None  # explicit FFN width; overrides the multiple_of rule
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    n_future_tokens: int = 1
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_trunk_layers(self) -> int:
        """Blocks shared by all heads (Meta's `layers[:-1]`)."""
        return self.n_layers - self.n_future_tokens

    @property
    def hidden_dim(self) -> int:
        """FFN width, by Meta's rule (2/3 of 4*dim, times the multiplier, rounded up)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self) -> None:
        checks = [
            ("dim", self.dim > 0, "a positive integer"),
            ("n_heads", self.n_heads > 0 and self.dim % self.n_heads == 0, "a divisor of dim"),
            ("head_dim", self.head_dim % 2 == 0, "even (rotary embeddings pair dimensions)"),
            ("n_kv_heads", self.n_heads % self.kv_heads == 0, "a divisor of n_heads"),
            ("vocab_size", self.vocab_size > 0, "a positive integer (set it from the tokenizer)"),
            ("n_future_tokens", self.n_future_tokens >= 1, "at least 1"),
            (
                "n_layers",
                self.n_layers >= self.n_future_tokens,
                f"at least n_future_tokens ({self.n_future_tokens})",
            ),
            ("multiple_of", self.multiple_of > 0, "a positive integer"),
            ("max_seq_len", self.max_seq_len > 0, "a positive integer"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                value = self.head_dim if key == "head_dim" else getattr(self, key)
                raise InputError(f"ModelArgs.{key}={value!r} is invalid: must be {allowed}")

    @classmethod
    def from_dict(cls, params: dict[str, Any], **overrides: Any) -> ModelArgs:
        """Builds args from a params.json-style dict; unknown keys are logged and ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        merged = {**params, **overrides}
        unknown = sorted(set(merged) - known)
        if unknown:
            log.warning("ignoring params keys not used by ModelArgs: %s", ", ".join(unknown))
        return cls(**{k: v for k, v in merged.items() if k in known})

    @classmethod
    def from_params_json(cls, path: str | Path, **overrides: Any) -> ModelArgs:
        """Reads Meta's params.json. `vocab_size: -1` (Meta's "take it from the tokenizer")
        must be overridden by the caller."""
        from model.weights import read_params

        try:
            return cls.from_dict(read_params(Path(path)), **overrides)
        except TypeError as exc:
            raise InputError(f"{path}: not a valid params.json ({exc})") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The published shapes the planner uses before the weights are on disk (`train_wmtp.py --plan`):
# Meta's 7B_1T_4 params.json (what prepare_assets.py step 3 writes into meta_adapter.yaml) and
# Sheared-LLaMA 2.7B's config.json (the Rho-1 reference), in ModelArgs' terms.
META_7B_1T_4 = {"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 32000,
                "multiple_of": 256, "norm_eps": 1e-5, "n_future_tokens": 4}  # fmt: skip
SHEARED_LLAMA_2_7B = {"dim": 2560, "n_layers": 32, "n_heads": 20, "vocab_size": 32000,
                      "ffn_hidden_dim": 6912, "norm_eps": 1e-6, "n_future_tokens": 1}  # fmt: skip
