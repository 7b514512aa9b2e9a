"""Train/validation/test splits by task id (never by record: a task's solutions stay together)."""

from __future__ import annotations

import random
from collections.abc import Iterable

SPLITS = ("train", "validation", "test")
SMALL_SPLITS = {"train_small": ("train", 100), "validation_small": ("validation", 32)}


DEFAULT_RATIOS = (0.8, 0.1, 0.1)


def split_ratios(text: str) -> tuple[float, float, float]:
    """'0.6,0.1,0.3' → (0.6, 0.1, 0.3): train, validation, test shares summing to 1."""
    try:
        ratios = tuple(float(x) for x in text.split(","))
    except ValueError:
        ratios = ()
    if len(ratios) != 3 or any(not 0 <= r <= 1 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise ValueError(
            f"split ratios {text!r} are invalid: three shares (train,validation,test) in [0, 1] "
            "summing to 1, e.g. 0.8,0.1,0.1"
        )
    return ratios


def split_sizes(n_tasks: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """How many of `n_tasks` `seeded_split` puts in train, validation and test."""
    n_train, n_val = round(ratios[0] * n_tasks), round(ratios[1] * n_tasks)
    return n_train, n_val, n_tasks - n_train - n_val


def seeded_split(
    task_ids: Iterable[str], seed: int, ratios: tuple[float, float, float] = DEFAULT_RATIOS
) -> dict[str, str]:
    """task_id → split, from a seeded shuffle of the sorted unique ids (order-independent)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-9:
        raise ValueError(
            f"split ratios {ratios} are invalid: three non-negative numbers summing to 1"
        )
    ids = sorted(set(task_ids))
    random.Random(seed).shuffle(ids)
    n_train, n_val, _ = split_sizes(len(ids), ratios)
    return {
        tid: "train" if i < n_train else "validation" if i < n_train + n_val else "test"
        for i, tid in enumerate(ids)
    }


def mbpp_upstream_split(task_id: str) -> str:
    """Austin et al.: 1–10 prompt (trained on), 11–510 test, 511–600 validation, 601–974 train."""
    n = int(task_id.split("/")[-1])
    if 11 <= n <= 510:
        return "test"
    if 511 <= n <= 600:
        return "validation"
    return "train"


def small_subset(records: list, limit: int, seed: int) -> list:
    """A seeded sample of at most `limit` records, in their original order."""
    if len(records) <= limit:
        return list(records)
    chosen = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in chosen]
