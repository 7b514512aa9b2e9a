"""Whether each arm of a comparison actually trained; an arm that did not makes its verdict
"inconclusive", never "significant".

    trained   its validation CE of head 0 at the end is finite; the baseline's ended below
              where it started; an arm's ended within TRAINED_FACTOR × the baseline's and fell
              by at least TRAINED_SHARE of the baseline's fall (all arms start from the same
              weights: a weighted loss may end a little higher on the unweighted validation CE;
              an arm that did not train barely moves, or stops far above)
    parses    the share of its samples that are valid Python is at least PARSE_FACTOR × the
              baseline's (the baseline's own: at least MIN_PARSE_SHARE)
    critic    (runs with a value head) it explained at least `min_explained_variance` of the
              held-out return variance after stage 1 (MIN_EXPLAINED_VARIANCE when the run set
              none), it did not fall back to uniform weights, and at its last validation of
              stage 2 it still explained more than 0 (drift shows in the line)

Facts come from each run's history (`runtime.history`) and its eval dirs' samples, so any
`python -m evaluation.compare` gets them, not only the demo.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime.history import read_history

TRAINED_SHARE = 0.5
TRAINED_FACTOR = 1.5
PARSE_FACTOR = 0.5
MIN_PARSE_SHARE = 0.5
MIN_EXPLAINED_VARIANCE = 0.05


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not measured (no validation data, no samples)
    text: str


@dataclass
class Health:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    def why(self) -> str:
        return "; ".join(c.text for c in self.checks if c.ok is False)

    def line(self, arm: str) -> str:
        mark = "healthy" if self.ok else "NOT healthy"
        return f"**{arm}**: {mark} — " + "; ".join(c.text for c in self.checks)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def run_facts(run_dir: Path) -> dict:
    """One run's training facts: validation CE at the start and the end, the critic's."""
    history = read_history(run_dir)
    start = next((h for h in history if h.get("stage") == "validation" and h["step"] == 0), {})
    steps = [h for h in history if h.get("stage") == "step"]
    end = next((h for h in reversed(steps) if "val_loss" in h), {})
    critic = [h for h in history if h.get("stage") == "critic_eval"]
    stage1 = [h["stage1_explained_variance"] for h in critic if "stage1_explained_variance" in h]
    return {
        "val_start": start.get("val_loss"),
        "val_end": end.get("val_loss"),
        "has_critic": bool(critic),
        "stage1_ev": stage1[-1] if stage1 else None,
        "min_ev": next(
            (h["min_explained_variance"] for h in critic if "min_explained_variance" in h), None
        ),  # fmt: skip
        "critic_uniform": any(h.get("critic_uniform") for h in critic),
        "stage2_ev": [
            h["critic_explained_variance"] for h in steps if "critic_explained_variance" in h
        ],  # fmt: skip
    }


def parse_share(eval_dirs: list[Path]) -> float | None:
    rows = []
    for directory in eval_dirs:
        for path in sorted(directory.glob("*_samples.jsonl")):
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "parses" in r]
    return sum(bool(r["parses"]) for r in rows) / len(rows) if rows else None


def arm_facts(eval_dirs: list[Path]) -> dict:
    """Facts of one arm over its seeds (the runs that made `eval_dirs`)."""
    runs = [run_facts(d) for d in dict.fromkeys(d.parent for d in eval_dirs)]
    return {
        "val_start": _mean([r["val_start"] for r in runs]),
        "val_end": _mean([r["val_end"] for r in runs]),
        "val_end_all": [r["val_end"] for r in runs],
        "parse_share": parse_share(eval_dirs),
        "critic": [r for r in runs if r["has_critic"]],
    }


def _trained(arm: dict, base: dict, is_baseline: bool) -> Check:
    ends = [v for v in arm["val_end_all"] if v is not None]
    if not ends:
        return Check("trained", None, "no validation CE logged")
    if not all(math.isfinite(v) for v in ends):
        return Check("trained", False, "validation CE is not finite")
    end = arm["val_end"]
    if is_baseline:
        start = arm["val_start"]
        if start is None:
            return Check("trained", True, f"validation CE {end:.3f}")
        ok = end < start
        return Check("trained", ok, f"validation CE {start:.3f} → {end:.3f}"
                     + ("" if ok else " (did not fall)"))  # fmt: skip
    if base["val_end"] is None:
        return Check("trained", None, f"validation CE {end:.3f} (baseline has none)")
    ratio = end / base["val_end"]
    ok = ratio <= TRAINED_FACTOR
    text = f"validation CE {end:.3f} = {ratio:.2f}× the baseline's (needs ≤ {TRAINED_FACTOR}×)"
    start, base_start = arm["val_start"], base["val_start"]
    if start is not None and base_start is not None and base_start > base["val_end"]:
        share = (start - end) / (base_start - base["val_end"])
        ok &= share >= TRAINED_SHARE
        text = (f"validation CE {start:.3f} → {end:.3f}: {ratio:.2f}× the baseline's end (needs "
                f"≤ {TRAINED_FACTOR}×), a fall {share:.0%} of its fall (needs ≥ {TRAINED_SHARE:.0%})")  # fmt: skip
    return Check("trained", ok, text)


def _parses(arm: dict, base: dict, is_baseline: bool) -> Check:
    share = arm["parse_share"]
    if share is None:
        return Check("parses", None, "no samples with a parse verdict")
    if is_baseline or base["parse_share"] is None:
        ok = share >= MIN_PARSE_SHARE
        return Check("parses", ok, f"{share:.0%} of its programs parse (needs ≥ "
                     f"{MIN_PARSE_SHARE:.0%})")  # fmt: skip
    floor = PARSE_FACTOR * base["parse_share"]
    ok = share >= floor
    return Check("parses", ok, f"{share:.0%} of its programs parse (baseline "
                 f"{base['parse_share']:.0%}; needs ≥ {floor:.0%})")  # fmt: skip


def _critic(runs: list[dict]) -> Check | None:
    if not runs:
        return None
    texts, ok = [], True
    for r in runs:
        least = r["min_ev"] if r["min_ev"] else MIN_EXPLAINED_VARIANCE
        ev = r["stage1_ev"]
        drift = " → ".join(f"{v:.0%}" for v in r["stage2_ev"])
        text = f"value head explains {ev:.0%} after stage 1" if ev is not None else "no EV"
        text += f" (needs ≥ {least:.0%})" + (f", in stage 2 {drift}" if drift else "")
        if r["critic_uniform"]:
            text += ", fell back to uniform weights"
        bad = (ev is None or ev < least or r["critic_uniform"]
               or (r["stage2_ev"] and r["stage2_ev"][-1] <= 0))  # fmt: skip
        ok &= not bad
        texts.append(text)
    return Check("critic", ok, "; ".join(texts))


def assess(facts: dict[str, dict], baseline: str) -> dict[str, Health]:
    """Every arm's health, judged against the baseline's facts."""
    base = facts[baseline]
    health = {}
    for arm, arm_facts_ in facts.items():
        is_baseline = arm == baseline
        checks = [_trained(arm_facts_, base, is_baseline), _parses(arm_facts_, base, is_baseline)]
        critic = _critic(arm_facts_["critic"])
        health[arm] = Health([*checks, *([critic] if critic else [])])
    return health


def verdict_override(arm: str, baseline: str, health: dict[str, Health]) -> str | None:
    """'inconclusive: ...' when the arm or the baseline did not train; None when both did."""
    for name in (arm, baseline):
        if not health[name].ok:
            return f"inconclusive: {name} did not train ({health[name].why()})"
    return None
