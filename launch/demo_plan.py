"""The demo sized to the machine: time a training step and a decoding step, then plan every stage
to fit the time budget (`python -m launch.demo --minutes 20`).

Calibration builds the candidate micro models in memory (random weights, the dtype `auto`
picks) and times a real training step (trunk, four heads, the weighted loss, AdamW) on packed
rows like the demo's, and a KV-cached decoding step at the evaluation's batch. The plan then takes
the largest model size that still gets `min_steps` fine-tuning steps per run, with evaluation
given the share it needs for informative intervals, and predicts each stage's seconds. Before
fine-tuning starts, `replan` corrects the step counts with the speed measured on the reference
run, so a machine slower than its calibration still finishes in time.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from assets.micro import micro_args
from data.loader import IGNORE_INDEX
from evaluation.generation import SamplingConfig, sample_next
from model import ModelArgs, Transformer
from runtime.config import MicroConfig
from runtime.precision import autocast, resolve_precision
from runtime.progress import Progress
from training.loss import mtp_loss_backward

ROWS, SEQ_LEN, SAMPLE_TOKENS, TARGET_SHARE = 4, 512, 213, 0.25  # the demo's packed task rows


@dataclass(frozen=True)
class Size:
    """One rung of the model-size ladder: assets.micro overrides. `repeatable`: worth running
    with several seeds (the smallest rungs learn the tasks too poorly to spend repeats on)."""

    name: str
    micro: dict = field(default_factory=dict)
    repeatable: bool = True


def _rung(dim: int, heads: int, kv_heads: int, vocab: int, repeatable: bool = True) -> Size:
    micro = {"dim": dim, "n_heads": heads, "n_kv_heads": kv_heads, "multiple_of": 64,
             "vocab_size": vocab}  # fmt: skip
    return Size(f"dim {dim}, 5 blocks, vocab {vocab}", micro, repeatable)


SIZES = (
    Size("dim 512, 5 blocks, vocab 8000"),  # assets.micro's defaults: 22.9 M parameters
    _rung(384, 6, 3, 6000),  # 12.7 M
    _rung(256, 4, 2, 4000),  # 5.7 M
    _rung(192, 3, 1, 3000, repeatable=False),  # 3.1 M
    _rung(128, 2, 1, 2000, repeatable=False),  # 1.5 M
)
QUICK_SIZES = (
    Size("dim 64, 5 blocks, vocab 1000", {"dim": 64, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "vocab_size": 1000}),
)  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """What the plan may choose: fine-tuning steps per run, evaluation samples, fixed costs."""

    min_steps: int = 250  # below this the runs are too short to compare; try a smaller model
    max_steps: int = 300  # past this the task set is learnt; spend the time on more seeds
    max_seeds: int = 3  # --seeds auto: at most this many, each run with max_steps
    floor_steps: int = 40  # the least the smallest model is given, even over budget (warned)
    ref_share: float = 0.5  # reference steps per fine-tuning step (a smaller, next-token model)
    stage1_share: float = 0.25  # critic stage-1 steps per fine-tuning step
    samples: tuple[int, ...] = (10, 5, 3)  # per problem, the most that fits the eval share
    eval_share: float = 0.2  # of the remaining budget, at most, for evaluation
    max_new_tokens: int = 96
    humaneval_problems: int = 10
    spec_baseline_problems: int = 8  # decoded plainly too, for the speed-up of speculation
    run_overhead_s: float = 8.0  # per train_wmtp / eval_harness run: start-up, MLflow, export
    margin: float = 0.1  # of the whole budget, kept free


QUICK_LIMITS = Limits(
    min_steps=8, max_steps=8, floor_steps=8, samples=(2,), max_new_tokens=16,
    humaneval_problems=2, spec_baseline_problems=1, run_overhead_s=3.0,
)  # fmt: skip


@dataclass
class Calibration:
    """Seconds per training step of each size (and of its reference), per decoding step
    (forward + nucleus sampling) at batch 1 and at the largest batch (samples per problem), and
    the sandbox's programs per second (from labelling the tasks)."""

    dtype: str
    dtype_reason: str
    train_step_s: dict[str, float] = field(default_factory=dict)
    ref_step_s: dict[str, float] = field(default_factory=dict)
    decode_step_s: dict[str, tuple[float, float]] = field(default_factory=dict)
    decode_batch: int = 10
    seconds: float = 0.0
    programs_per_s: float = 0.0  # sandboxed test programs run per second (0: not measured)

    def decode_seconds(self, size: str, batch: int) -> float:
        """A decoding step at `batch` rows, linear between the two calibrated batches."""
        one, full = self.decode_step_s[size]
        return one + (full - one) * (batch - 1) / max(self.decode_batch - 1, 1)


@dataclass
class Plan:
    size: str
    micro: dict
    seeds: int
    finetune_steps: int
    ref_steps: int
    stage1_steps: int
    eval_samples: int
    max_new_tokens: int
    humaneval_problems: int
    spec_baseline_problems: int
    predicted_s: dict[str, float]
    budget_s: float
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        stages = ", ".join(f"{k} {v:.0f}s" for k, v in self.predicted_s.items())
        return (
            f"model {self.size}; {self.seeds} seed(s) × 3 algorithms × {self.finetune_steps} "
            f"fine-tuning steps (reference {self.ref_steps}, critic stage 1 {self.stage1_steps}); "
            f"evaluation: every test task × {self.eval_samples} samples at T=0.2, HumanEval "
            f"{self.humaneval_problems} problems; predicted {stages} "
            f"(total {sum(self.predicted_s.values()) / 60:.1f} of {self.budget_s / 60:.1f} min)"
        )


# ------------------------------------------------------------------------- calibration
def _packed_batch(vocab: int, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random tokens in the demo's shape: samples of ~SAMPLE_TOKENS packed per row, a quarter
    of each sample's positions with targets (the response)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (ROWS, SEQ_LEN), generator=generator)
    position = torch.arange(SEQ_LEN)
    segments = (position // SAMPLE_TOKENS).expand(ROWS, -1).contiguous()
    in_response = (position % SAMPLE_TOKENS) >= SAMPLE_TOKENS * (1 - TARGET_SHARE)
    labels = torch.stack([torch.roll(tokens, -k - 1, dims=1) for k in range(n_heads)], dim=-1)
    labels[~in_response.expand(ROWS, -1)] = IGNORE_INDEX
    return tokens, labels, segments


def time_train_step(args: ModelArgs, dtype: torch.dtype, repeats: int = 2) -> float:
    """Seconds of one optimizer step (after a warm-up step) of a model with `args`."""
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens, labels, segments = _packed_batch(args.vocab_size, args.n_future_tokens)
    weights = (labels != IGNORE_INDEX).float()
    n_targets = [float(weights[..., k].sum()) for k in range(args.n_future_tokens)]
    lam = [1.0] * args.n_future_tokens

    def step() -> None:
        with autocast(tokens.device, dtype):
            trunk = model(tokens, return_trunk=True, segment_ids=segments)
        mtp_loss_backward(model, trunk, labels, weights, lam, n_targets, 256, 1.0, dtype, segments)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def time_decode_step(args: ModelArgs, dtype: torch.dtype, batch: int, steps: int = 24) -> float:
    """Seconds of one KV-cached decoding step of `batch` rows after a 160-token prompt: the
    forward and the evaluation's nucleus sampling (T=0.2, top-p 0.95)."""
    model = Transformer(args).to(dtype).eval()
    prompt = torch.randint(0, args.vocab_size, (batch, 160))
    cache = model.new_cache(batch, 160 + steps + 1)
    model(prompt, 0, cache, return_trunk=True)
    token, cfg = prompt[:, -1:], SamplingConfig(temperature=0.2, top_p=0.95)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for i in range(steps):
        logits = model(token, 160 + i, cache, n_heads=1)[:, -1, 0].float()
        token = sample_next(logits, cfg, generator)[:, None]
    return (time.perf_counter() - start) / steps


def _time_size(calibration: Calibration, size: Size, dtype: torch.dtype) -> None:
    config = MicroConfig(**size.micro)
    policy, reference = micro_args(config, False), micro_args(config, True)
    calibration.train_step_s[size.name] = time_train_step(policy, dtype)
    calibration.ref_step_s[size.name] = time_train_step(reference, dtype, repeats=1)
    calibration.decode_step_s[size.name] = (
        time_decode_step(policy, dtype, 1),
        time_decode_step(policy, dtype, calibration.decode_batch),
    )


def calibrate(
    sizes: tuple[Size, ...],
    limits: Limits,
    budget_s: float,
    seeds: int | None,
    test_problems: int,
    programs_per_s: float = 0.0,
) -> Calibration:
    """Times the sizes from the largest down, stopping where the plan could not choose a
    smaller one: at the first whose runs get min_steps within `budget_s` (with auto seeds, only
    after every repeatable size). `programs_per_s`: the sandbox's speed, measured by the caller."""
    start = time.perf_counter()
    precision = resolve_precision("auto", torch.device("cpu"))
    calibration = Calibration(
        precision.name,
        precision.reason,
        decode_batch=max(limits.samples),
        programs_per_s=programs_per_s,
    )
    with Progress("  calibrating", None, "sizes", heartbeat=True) as progress:
        for i, size in enumerate(sizes):
            _time_size(calibration, size, precision.dtype)
            one, full = calibration.decode_step_s[size.name]
            progress.write(
                f"  {size.name}: training step {calibration.train_step_s[size.name]:.2f}s, "
                f"reference step {calibration.ref_step_s[size.name]:.2f}s, decoding step "
                f"{one * 1000:.1f}ms (batch 1) / {full * 1000:.1f}ms (batch "
                f"{calibration.decode_batch}), {precision.name}"
            )
            progress.update()
            fits = _steps_that_fit(calibration, size, limits, budget_s, seeds or 1, test_problems)
            more_repeats = seeds is None and i + 1 < len(sizes) and sizes[i + 1].repeatable
            if fits >= limits.min_steps and not more_repeats:
                break  # no smaller size could be chosen
    calibration.seconds = time.perf_counter() - start
    return calibration


# ---------------------------------------------------------------------------- planning
def _eval_seconds(
    calibration: Calibration, size: Size, limits: Limits, seeds: int, problems: int, samples: int
) -> float:
    """For each of 3 × seeds runs: every test task decoded `samples` times (one batch, of
    typical length), the speculative subset (speculative ≈ 2 plain decodes on a micro model,
    plus the plain one it is timed against), HumanEval at batch 1 (to the token budget: micro
    models rarely stop), every program run in the sandbox (on the same cores as decoding, so
    the times add) and the three evaluations' start-up."""
    step = calibration.decode_seconds(size.name, samples)
    per_problem = step * (0.6 * limits.max_new_tokens + 10)  # + the prompt's prefill
    programs = (problems + limits.spec_baseline_problems) * samples + limits.humaneval_problems
    execute = programs / calibration.programs_per_s if calibration.programs_per_s else 0.0
    per_run = (
        per_problem * (problems + 3 * limits.spec_baseline_problems)
        + calibration.decode_seconds(size.name, 1)
        * (limits.max_new_tokens + 10)
        * limits.humaneval_problems
        + execute
        + 3 * limits.run_overhead_s
    )
    return 3 * seeds * per_run


def _train_seconds(
    calibration: Calibration, size: Size, limits: Limits, seeds: int, steps: int
) -> dict[str, float]:
    t = calibration.train_step_s[size.name]
    reference = (
        math.ceil(steps * limits.ref_share) * calibration.ref_step_s[size.name]
        + 2 * limits.run_overhead_s
    )
    finetune = seeds * (
        steps * t * 3.1  # baseline, rho1 (precomputed reference CE), critic (value head)
        + math.ceil(steps * limits.stage1_share) * t * 0.4  # stage 1: no backward through it
        + 3 * limits.run_overhead_s
    )
    return {"reference": reference, "fine-tuning": finetune}


def _steps_that_fit(
    calibration: Calibration,
    size: Size,
    limits: Limits,
    budget_s: float,
    seeds: int,
    problems: int,
    samples: int | None = None,
) -> int:
    """Fine-tuning steps per run that fit `budget_s` next to the evaluation and the runs'
    start-up costs."""
    samples = samples or min(limits.samples)
    available = budget_s - _eval_seconds(calibration, size, limits, seeds, problems, samples)
    fixed = sum(_train_seconds(calibration, size, limits, seeds, 0).values())
    per_step = (sum(_train_seconds(calibration, size, limits, seeds, 1000).values()) - fixed) / 1000
    return max(0, int((available - fixed) / per_step))


def _choose_size_and_seeds(
    calibration: Calibration,
    sizes: list[Size],
    limits: Limits,
    left: float,
    seeds: int | None,
    test_problems: int,
) -> tuple[Size, int]:
    """With `seeds` given: the largest size whose runs get ≥ min_steps. Auto (None): first the
    most seeds (down to 2, at most max_seeds) that give every run max_steps on a repeatable
    size, largest first; else one seed, as with `seeds` = 1."""

    def fits(size: Size, n: int, wanted: int) -> bool:
        return _steps_that_fit(calibration, size, limits, left, n, test_problems) >= wanted

    if seeds is None:
        for n in range(limits.max_seeds, 1, -1):
            for size in sizes:
                if size.repeatable and fits(size, n, limits.max_steps):
                    return size, n
    n = seeds or 1
    return next((size for size in sizes if fits(size, n, limits.min_steps)), sizes[-1]), n


def plan(
    calibration: Calibration,
    sizes: tuple[Size, ...],
    limits: Limits,
    budget_s: float,
    elapsed_s: float,
    seeds: int | None,
    test_problems: int,
) -> Plan:
    """Sizes the demo to what is left of the budget (after `elapsed_s` and the margin): the
    model size and seeds (`_choose_size_and_seeds`), the most evaluation samples per problem the
    evaluation share allows, then as many fine-tuning steps as fit (at most max_steps)."""
    left = budget_s * (1 - limits.margin) - elapsed_s - limits.run_overhead_s  # + report
    calibrated = [s for s in sizes if s.name in calibration.train_step_s]
    size, seeds = _choose_size_and_seeds(
        calibration, calibrated, limits, left, seeds, test_problems
    )
    samples = next(
        (
            n
            for n in limits.samples
            if _eval_seconds(calibration, size, limits, seeds, test_problems, n)
            <= limits.eval_share * left
        ),
        min(limits.samples),
    )
    fits = _steps_that_fit(calibration, size, limits, left, seeds, test_problems, samples)
    steps = min(limits.max_steps, max(limits.floor_steps, fits))
    warnings = []
    if fits < limits.min_steps:
        over = ": expect the demo to take longer than asked" if steps > fits else ""
        warnings.append(
            f"the budget allows {fits} fine-tuning steps per run even for the smallest model "
            f"(wanted ≥ {limits.min_steps}); running {steps}{over}; the comparison will be "
            "weaker (raise --minutes or lower --seeds)"
        )
    return _with_predictions(
        Plan(
            size=size.name,
            micro=dict(size.micro),
            seeds=seeds,
            finetune_steps=steps,
            ref_steps=max(1, math.ceil(steps * limits.ref_share)),
            stage1_steps=max(1, math.ceil(steps * limits.stage1_share)),
            eval_samples=samples,
            max_new_tokens=limits.max_new_tokens,
            humaneval_problems=limits.humaneval_problems,
            spec_baseline_problems=limits.spec_baseline_problems,
            predicted_s={},
            budget_s=budget_s,
            warnings=warnings,
        ),
        calibration,
        limits,
        test_problems,
    )


def _with_predictions(
    p: Plan, calibration: Calibration, limits: Limits, test_problems: int
) -> Plan:
    size = Size(p.size, p.micro)
    predicted = _train_seconds(calibration, size, limits, p.seeds, p.finetune_steps)
    predicted["evaluation"] = _eval_seconds(
        calibration, size, limits, p.seeds, test_problems, p.eval_samples
    )
    return replace(p, predicted_s={k: round(v, 1) for k, v in predicted.items()})


def replan(
    p: Plan,
    calibration: Calibration,
    limits: Limits,
    measured_ref_step_s: float,
    elapsed_s: float,
    test_problems: int,
    measured_overhead_s: float | None = None,
) -> Plan:
    """Before fine-tuning: scales every timing by how much slower (or faster) the reference run
    was than calibrated, takes the per-run overhead (start-up, validation, export) the reference
    run really had, and resizes the fine-tuning steps to what is left of the budget."""
    factor = measured_ref_step_s / calibration.ref_step_s[p.size]
    overhead = max(1.0, measured_overhead_s or limits.run_overhead_s)
    if 0.8 <= factor <= 1.25 and 0.8 <= overhead / limits.run_overhead_s <= 1.25:
        return p  # within the noise of calibration
    limits = replace(limits, run_overhead_s=overhead)
    scaled = replace(
        calibration,
        train_step_s={k: v * factor for k, v in calibration.train_step_s.items()},
        ref_step_s={k: v * factor for k, v in calibration.ref_step_s.items()},
        decode_step_s={
            k: (v[0] * factor, v[1] * factor) for k, v in calibration.decode_step_s.items()
        },
    )
    size = Size(p.size, p.micro)
    left = p.budget_s * (1 - limits.margin) - elapsed_s - limits.run_overhead_s
    train_only = replace(limits, ref_share=0.0)  # the reference is trained already
    fits = _steps_that_fit(scaled, size, train_only, left, p.seeds, test_problems, p.eval_samples)
    steps = min(limits.max_steps, max(limits.floor_steps, fits))
    note = (
        f"the reference trained at {factor:.2f}× its calibrated step time, with {overhead:.0f}s "
        f"per run besides its steps: fine-tuning steps {p.finetune_steps} → {steps}"
    )
    updated = replace(
        p,
        finetune_steps=steps,
        stage1_steps=max(1, math.ceil(steps * limits.stage1_share)),
        warnings=[*p.warnings, note],
    )
    updated = _with_predictions(updated, scaled, limits, test_problems)
    updated.predicted_s["reference"] = p.predicted_s["reference"]  # done already
    return updated
