"""The training loader: packed (or padded) rows with per-head shifted labels and a resumable cursor.

Order: a permutation of the samples drawn from (seed, epoch), so any rank and any resumed run
sees the same sequence. Rows are filled greedily in that order; a sample that does not fit the
rest of a row starts the next one (samples are never split).
Each global step takes world_size × batch_size rows; rank r keeps its own slice. Samples longer
than seq_len are left out (cutting them would drop the response, the only part with a loss);
`n_skipped` says how many, and a split where none fits is an error.

Labels: position t of head k targets the token t+k+1 of the same sample, and only when that
token is part of the response (response + eos): prompts, padding and other samples never are.
Everything the step needs to know about a batch's shape is computed here, on the host, while the
rows are collated: each head's target positions and counts, the real (non-padding) tokens and,
with a precomputed reference CE store, each token's reference CE. The step then never has to
read a device tensor to size its work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.reference_ce import ReferenceCEStore
from data.tokenized import TokenizedSplit

IGNORE_INDEX = -100


TOKEN_CLASSES = ("other", "eos", "layout", "first")  # of a target token (`Batch.target_class`)


@dataclass(frozen=True)
class LoaderConfig:
    seq_len: int = 2048
    batch_size: int = 1
    n_heads: int = 4
    pack: bool = True
    seed: int = 42
    pad_id: int = 0
    eos_id: int = 2
    layout_ids: frozenset[int] = frozenset()  # newline / indentation pieces

    def __post_init__(self) -> None:
        for key in ("seq_len", "batch_size", "n_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key}={getattr(self, key)!r} is invalid: must be >= 1")


@dataclass
class Batch:
    """One micro-batch of rows. `targets[k]` are the flat positions (into B·L) where head k has
    a target, `n_targets[k]` their number and `n_tokens` the non-padding tokens: host values,
    known before the batch reaches the device."""

    tokens: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L, H) long, IGNORE_INDEX where no loss
    segment_ids: torch.Tensor  # (B, L) long: index of the sample within its row, -1 on padding
    token_is_correct: torch.Tensor  # (B, L) bool: is_correct of the sample each token belongs to
    sample_ids: list[list[str]]  # per row, in segment order
    targets: tuple[torch.Tensor, ...] = ()  # per head: (n_targets[k],) long
    n_targets: tuple[int, ...] = ()
    n_tokens: int = 0
    ref_ce: torch.Tensor | None = None  # (B, L) float32: reference CE of token t+1, NaN if none
    target_class: torch.Tensor | None = None  # (B, L, H) uint8: index into TOKEN_CLASSES

    def __post_init__(self) -> None:
        if not self.targets:  # a batch built by hand: find the targets from its labels
            flat = self.labels.flatten(0, 1)
            self.targets = tuple(
                (flat[:, k] != IGNORE_INDEX).nonzero().squeeze(1) for k in range(flat.shape[1])
            )
            self.n_targets = tuple(len(t) for t in self.targets)
            self.n_tokens = int((self.segment_ids >= 0).sum())

    @property
    def valid(self) -> torch.Tensor:
        """(B, L, H) bool: where head k at position t has a target."""
        return self.labels != IGNORE_INDEX

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.tokens.to(device),
            self.labels.to(device),
            self.segment_ids.to(device),
            self.token_is_correct.to(device),
            self.sample_ids,
            tuple(t.to(device) for t in self.targets),
            self.n_targets,
            self.n_tokens,
            self.ref_ce.to(device) if self.ref_ce is not None else None,
            self.target_class.to(device) if self.target_class is not None else None,
        )


def micro_batches(rows: int, micro_batch: int) -> list[int]:
    """Sizes of the micro-batches that make up one step of `rows` rows."""
    full, rest = divmod(rows, micro_batch)
    return [micro_batch] * full + ([rest] if rest else [])


def token_classes(
    sample: np.ndarray, prompt_len: int, eos_id: int, layout_ids: frozenset[int]
) -> np.ndarray:
    """(len,) uint8 class of every token (TOKEN_CLASSES): the response's first token, eos, a
    layout piece (newline, indentation), or other."""
    classes = np.zeros(len(sample), dtype=np.uint8)
    if layout_ids:
        classes[np.isin(sample, np.fromiter(layout_ids, np.int64))] = 2
    classes[sample == eos_id] = 1
    if prompt_len < len(sample):
        classes[prompt_len] = 3
    return classes


def head_labels(sample: np.ndarray, prompt_len: int, n_heads: int) -> np.ndarray:
    """(len, n_heads) targets of one sample: sample[t+k+1] where that token is a response token."""
    n = len(sample)
    labels = np.full((n, n_heads), IGNORE_INDEX, dtype=np.int64)
    for k in range(n_heads):
        src = np.arange(n) + k + 1
        ok = (src < n) & (src >= prompt_len)
        labels[ok, k] = sample[src[ok]]
    return labels


class TrainLoader:
    """Infinite iterator of Batches with `state_dict()` / `load_state_dict()` for exact resume."""

    def __init__(
        self,
        data: TokenizedSplit,
        config: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
        reference_ce: ReferenceCEStore | None = None,
    ):
        if len(data) == 0:
            raise ValueError("the training split is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.data, self.config, self.rank, self.world_size = data, config, rank, world_size
        self.reference_ce = reference_ce
        self.eligible = np.flatnonzero(data.lengths <= config.seq_len)
        self.n_skipped = len(data) - len(self.eligible)
        if len(self.eligible) == 0:
            raise ValueError(
                f"no sample fits data.seq_len={config.seq_len} (shortest has {data.lengths.min()} tokens)"
            )
        self.epoch, self.offset, self.step = 0, 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return self.eligible[
            np.random.default_rng([self.config.seed, epoch]).permutation(len(self.eligible))
        ]

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "step": self.step,
            "seed": self.config.seed,
        }

    def rewind(self) -> TrainLoader:
        """Back to the first batch of epoch 0 (a validation loader reads the same batches each
        time); returns itself."""
        self.load_state_dict({"epoch": 0, "offset": 0, "step": 0, "seed": self.config.seed})
        return self

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.config.seed) != self.config.seed:
            raise ValueError(
                f"loader state was saved with seed {state['seed']}, config has {self.config.seed}"
            )
        self.epoch, self.offset, self.step = state["epoch"], state["offset"], state["step"]
        self._order = self._permutation(self.epoch)

    def _next_sample(self) -> int:
        if self.offset >= len(self._order):
            self.epoch += 1
            self.offset = 0
            self._order = self._permutation(self.epoch)
        index = int(self._order[self.offset])
        self.offset += 1
        return index

    def _peek_length(self) -> int:
        if self.offset >= len(self._order):
            return int(self.data.lengths[self._permutation(self.epoch + 1)[0]])
        return int(self.data.lengths[self._order[self.offset]])

    def _row(self) -> list[int]:
        """Sample indices of one row."""
        row = [self._next_sample()]
        used = int(self.data.lengths[row[0]])
        while self.config.pack and used + self._peek_length() <= self.config.seq_len:
            index = self._next_sample()
            row.append(index)
            used += int(self.data.lengths[index])
        return row

    def _collate(self, rows: list[list[int]]) -> Batch:
        cfg = self.config
        width = (
            cfg.seq_len
            if cfg.pack
            else max(min(sum(self.data.lengths[r]), cfg.seq_len) for r in rows)
        )
        tokens = np.full((len(rows), width), cfg.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width, cfg.n_heads), IGNORE_INDEX, dtype=np.int64)
        segments = np.full((len(rows), width), -1, dtype=np.int64)
        correct = np.zeros((len(rows), width), dtype=bool)
        ref_ce = np.full((len(rows), width), np.nan, np.float32) if self.reference_ce else None
        classes = np.zeros((len(rows), width + cfg.n_heads), dtype=np.uint8)  # per token
        for b, row in enumerate(rows):
            pos = 0
            for seg, index in enumerate(row):
                sample = self.data.sample(index)
                end = pos + len(sample)
                tokens[b, pos:end] = sample
                labels[b, pos:end] = head_labels(
                    sample, int(self.data.prompt_lens[index]), cfg.n_heads
                )
                segments[b, pos:end] = seg
                correct[b, pos:end] = self.data.is_correct[index]
                classes[b, pos:end] = token_classes(
                    sample, int(self.data.prompt_lens[index]), cfg.eos_id, cfg.layout_ids
                )
                if ref_ce is not None:
                    values = self.reference_ce.values(self.data.sample_ids[index])
                    values = values[: len(sample) - 1]
                    ref_ce[b, pos : pos + len(values)] = values
                pos = end
        # head k at position t targets token t+k+1: its class is that token's (0 without target)
        target_class = np.stack([classes[:, k + 1 : k + 1 + width] for k in range(cfg.n_heads)], -1)
        target_class[labels == IGNORE_INDEX] = 0
        flat = labels.reshape(-1, cfg.n_heads)
        targets = tuple(
            torch.from_numpy(np.flatnonzero(flat[:, k] != IGNORE_INDEX)) for k in range(cfg.n_heads)
        )
        return Batch(
            torch.from_numpy(tokens),
            torch.from_numpy(labels),
            torch.from_numpy(segments),
            torch.from_numpy(correct),
            [[self.data.sample_ids[i] for i in row] for row in rows],
            targets,
            tuple(len(t) for t in targets),
            int((segments >= 0).sum()),
            torch.from_numpy(ref_ce) if ref_ce is not None else None,
            torch.from_numpy(np.ascontiguousarray(target_class)),
        )

    def next_batch(self, batch_size: int | None = None) -> Batch:
        """The next `batch_size` (default: the config's) rows of this rank."""
        size = batch_size or self.config.batch_size
        rows = [self._row() for _ in range(self.world_size * size)]
        mine = rows[self.rank * size : (self.rank + 1) * size]
        self.step += 1
        return self._collate(mine)

    def next_step(self, rows: int, micro_batch: int) -> list[Batch]:
        """One optimizer step's `rows` rows (per rank) in micro-batches of `micro_batch` (the
        last may be smaller)."""
        return [self.next_batch(n) for n in micro_batches(rows, micro_batch)]

    def split_is_correct(self) -> np.ndarray:
        """is_correct of every sample this loader can serve (the critic's reward labels)."""
        return self.data.is_correct[self.eligible]
