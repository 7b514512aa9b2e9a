"""The demo sized to the machine (`python -m launch.demo --minutes 20`): a literal table of model
sizes, one calibration of the real training and decoding steps, and every stage's steps and
samples scaled to its share of the budget.

Calibration builds a size's models with random weights in the dtype `auto` picks and times, on
rows shaped like the demo's: a pretraining step of the base, `train_wmtp.train_step` of every
arm (the weighter, its signals, the sequential-head loss, AdamW), a critic stage-1 step, a step
of the next-token reference, and a KV-cached decoding step with the evaluation's sampling.
The plan then gives each stage its share of the budget:

    base        pretrain the largest size that fits, on the most tokens of BASE_TOKENS that fit
    reference   the Rho-1 reference step: micro-ref fine-tuned on the correct solutions
    fine-tune   every arm × seed the same number of steps (the same tokens, from the same base)
    evaluate    every test task × the most samples that fit, at the evaluation's sampling

A base already built for this corpus is reused and its share left unspent, so the plan — and
the comparison — is the same with or without it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch

from data.loader import IGNORE_INDEX, Batch
from evaluation.generation import SamplingConfig, sample_next
from model import ModelArgs, Transformer
from runtime.precision import Precision, resolve_precision
from runtime.progress import Progress
from training.distributed import DistInfo
from training.recipe import Recipe
from training.run import step_run

# The micro models the demo may use, largest first (gpt-fast's `transformer_configs` style).
# n_layers counts every block: 2 trunk blocks + 4 prediction heads' blocks − 1 = 5 (Meta's MTP).
SIZES: dict[str, dict] = {
    "micro-384": dict(dim=384, n_layers=5, n_heads=6, n_kv_heads=3, vocab_size=6000, multiple_of=64),
    "micro-256": dict(dim=256, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=4000, multiple_of=64),
    "micro-192": dict(dim=192, n_layers=5, n_heads=3, n_kv_heads=1, vocab_size=3000, multiple_of=64),
    "micro-128": dict(dim=128, n_layers=5, n_heads=2, n_kv_heads=1, vocab_size=2000, multiple_of=64),
}  # fmt: skip
BASE_TOKENS = (4_000_000, 2_000_000, 1_000_000, 500_000)  # fixed, so a cached base is found again
MIN_BASE_TOKENS = 1_000_000  # below this the base barely writes Python: try a smaller size
RUN_STARTUP_S = 6.0  # a train_wmtp / eval_harness run's own start-up, export and MLflow, stated


@dataclass(frozen=True)
class Shape:
    """The rows and the sampling, set once and passed to every stage."""

    seq_len: int = 512
    pretrain_rows: int = 8
    finetune_rows: int = 4
    sample_tokens: int = 213  # a packed task sample (prompt + response), for calibration
    response_share: float = 0.25  # of a task sample's tokens: the targets
    temperature: float = 0.2
    top_p: float = 0.95
    max_new_tokens: int = 96

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.max_new_tokens)


@dataclass(frozen=True)
class Shares:
    """What share of the budget each stage may take (the rest: the margin and the small
    stages — tasks, calibration, processing, report)."""

    base: float = 0.30
    reference: float = 0.04
    finetune: float = 0.30
    evaluation: float = 0.18
    min_finetune_steps: int = 120  # fewer and the arms cannot be told apart: a smaller size
    max_finetune_steps: int = 300
    max_seeds: int = 3
    samples: tuple[int, ...] = (10, 6, 4, 2)  # per test task, the most that fits
    humaneval_problems: int = 10  # the floor check
    speculative_problems: int = 8  # decoded speculatively and plainly, for acceptance and speed


QUICK_SIZES = {"micro-64": dict(dim=64, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=1000,
                                multiple_of=32)}  # fmt: skip
QUICK_SHARES = Shares(min_finetune_steps=8, max_finetune_steps=8, samples=(2,),
                      humaneval_problems=2, speculative_problems=1)  # fmt: skip
QUICK_BASE_TOKENS = (40_000,)


@dataclass
class SizeTiming:
    """Seconds per step of one size, measured."""

    pretrain_step_s: float
    arm_step_s: dict[str, float]  # train_wmtp.train_step + AdamW, per arm
    stage1_step_s: float
    reference_step_s: float
    decode_step_s: dict[int, float]  # batch → one decoding step with sampling

    def decode_seconds(self, batch: int) -> float:
        """A decoding step at `batch` rows, linear between the calibrated batches."""
        (b1, s1), (b2, s2) = sorted(self.decode_step_s.items())[:2]
        return s1 + (s2 - s1) * (batch - b1) / max(b2 - b1, 1)


@dataclass
class Calibration:
    dtype: str
    dtype_reason: str
    sizes: dict[str, SizeTiming] = field(default_factory=dict)
    programs_per_s: float = 0.0  # sandboxed test programs per second (measured by the tasks)
    seconds: float = 0.0


# ------------------------------------------------------------------------- calibration
def synthetic_batch(args: ModelArgs, shape: Shape, rows: int, pretraining: bool) -> Batch:
    """Random tokens in the demo's row shape: packed task samples whose last quarter is the
    response (fine-tuning), or every position a target (pretraining); precomputed reference CE
    attached (the demo's rho1 arm reads it)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (rows, shape.seq_len), generator=generator)
    position = torch.arange(shape.seq_len)
    segments = (position // shape.sample_tokens).expand(rows, -1).contiguous()
    within = position % shape.sample_tokens
    in_response = within >= shape.sample_tokens * (1 - shape.response_share)
    if pretraining:
        in_response = torch.ones_like(in_response)
    labels = torch.stack([torch.roll(tokens, -k - 1, 1) for k in range(args.n_future_tokens)], -1)
    labels[~in_response.expand(rows, -1)] = IGNORE_INDEX
    correct = torch.rand(rows, shape.seq_len, generator=generator) > 0.5
    ids = [[f"s{r}"] for r in range(rows)]
    batch = Batch(tokens, labels, segments, correct, ids)
    batch.ref_ce = torch.rand(rows, shape.seq_len, generator=generator) * 4
    return batch


def _time(step, repeats: int = 2) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def time_training_step(
    recipe: Recipe, args: ModelArgs, precision: Precision, batch: Batch
) -> float:
    """Seconds of the real step of `recipe`'s arm: train_step, clipping, the read, AdamW."""
    from train_wmtp import train_step
    from training.step import clip_gradients

    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(seed=0)
    run = step_run(recipe, args, model, DistInfo(), precision)

    def step() -> None:
        totals = train_step(run, [batch])
        totals.reduce(clip_gradients(model, 1.0, False), run.info)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)

    return _time(step)


def time_stage1_step(args: ModelArgs, precision: Precision, batch: Batch, recipe: Recipe) -> float:
    from training.critic import build_critic, critic_stage1_step

    model = Transformer(args)
    critic = build_critic(args.dim, recipe.weighting.critic, DistInfo())
    info = DistInfo()
    return _time(lambda: critic_stage1_step(model, critic, batch, precision.dtype, info))


@torch.no_grad()
def time_decode_step(args: ModelArgs, dtype: torch.dtype, batch: int, shape: Shape) -> float:
    """Seconds of one KV-cached decoding step of `batch` rows after a 160-token prompt: the
    forward of the next-token head and the evaluation's nucleus sampling."""
    model = Transformer(args).to(dtype).eval()
    steps = 24
    prompt = torch.randint(0, args.vocab_size, (batch, 160))
    cache = model.new_cache(batch, 160 + steps + 1)
    model(prompt, 0, cache, return_trunk=True)
    token, generator = prompt[:, -1:], torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for i in range(steps):
        logits = model(token, 160 + i, cache, n_heads=1)[:, -1, 0].float()
        token = sample_next(logits, shape.sampling, generator)[:, None]
    return (time.perf_counter() - start) / steps


def calibrate_size(
    size: dict, arms: dict[str, Recipe], shape: Shape, precision: Precision, max_samples: int
) -> SizeTiming:
    """Times one size: a pretraining step, every arm's step, stage 1, the reference, decoding."""
    args = ModelArgs(**size, n_future_tokens=4, max_seq_len=2048)
    reference = replace(args, n_layers=args.n_layers - args.n_future_tokens + 1, n_future_tokens=1)
    finetune = synthetic_batch(args, shape, shape.finetune_rows, pretraining=False)
    pretrain = synthetic_batch(args, shape, shape.pretrain_rows, pretraining=True)
    baseline = arms["baseline"]
    return SizeTiming(
        pretrain_step_s=time_training_step(baseline, args, precision, pretrain),
        arm_step_s={a: time_training_step(r, args, precision, finetune) for a, r in arms.items()},
        stage1_step_s=time_stage1_step(args, precision, finetune, baseline),
        reference_step_s=time_training_step(
            baseline,
            reference,
            precision,
            synthetic_batch(reference, shape, shape.finetune_rows, pretraining=False),
        ),  # fmt: skip
        decode_step_s={
            b: time_decode_step(args, precision.dtype, b, shape) for b in (1, max_samples)
        },
    )


# ---------------------------------------------------------------------------- planning
@dataclass
class Plan:
    size: str
    micro: dict
    base_tokens: int
    base_cached: bool
    arms: list[str]
    seeds: int
    finetune_steps: int
    reference_steps: int
    stage1_steps: int
    eval_samples: int
    humaneval_problems: int
    speculative_problems: int
    shape: Shape
    predicted_s: dict[str, float]
    budget_s: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def finetune_tokens(self) -> int:
        """Token positions each arm fine-tunes on (per seed)."""
        return self.finetune_steps * self.shape.finetune_rows * self.shape.seq_len

    def describe(self) -> str:
        stages = ", ".join(f"{k} {v:.0f}s" for k, v in self.predicted_s.items())
        base = "cached" if self.base_cached else f"pretrained on {self.base_tokens:,} tokens"
        return (
            f"{self.size} ({self.micro['dim']} wide), base {base}; {len(self.arms)} arms × "
            f"{self.seeds} seed(s) × {self.finetune_steps} fine-tuning steps (reference "
            f"{self.reference_steps}, critic stage 1 {self.stage1_steps}); evaluation: every "
            f"test task × {self.eval_samples} samples at T={self.shape.temperature}, "
            f"HumanEval {self.humaneval_problems}; predicted {stages} "
            f"(total {sum(self.predicted_s.values()) / 60:.1f} of {self.budget_s / 60:.1f} min)"
        )

    def regime(self, pretrain_lr: float, finetune_lr: float) -> str:
        """How the demo's regime maps onto the 7B recipe's."""
        ft = 2000 * 128 * 2048  # recipes/*.yaml: 2000 steps × 8 GPUs × 4 rows × 4 accumulations
        return (
            f"7B_1T_4 was pretrained on 1T tokens and the 7B recipes fine-tune {ft / 1e9:.2f}B "
            f"token positions ({ft / 1e12:.3%} of pretraining) at LR 1e-5, a small fraction of "
            f"its pretraining LR. Here the base saw {self.base_tokens / 1e6:.1f}M tokens and "
            f"each arm fine-tunes {self.finetune_tokens / 1e6:.2f}M token positions "
            f"({self.finetune_tokens / self.base_tokens:.0%} of pretraining) at LR "
            f"{finetune_lr:g} with warm-up, {pretrain_lr / finetune_lr:.0f}× below the base's "
            f"{pretrain_lr:g}: the same shape of experiment — a pretrained model, a short "
            "fine-tune from it, every arm from the same weights on the same rows — at a scale "
            "where fine-tuning is a much larger share of what the model ever saw."
        )


def _eval_seconds(t: SizeTiming, shares: Shares, shape: Shape, runs: int, problems: int,
                  samples: int, programs_per_s: float) -> float:  # fmt: skip
    """Every test task × `samples` decoded as one batch to the token budget, the speculative
    and HumanEval subsets, every program run in the sandbox, each run's start-up."""
    decode = t.decode_seconds(samples) * shape.max_new_tokens
    programs = problems * samples + shares.humaneval_problems
    extra = (2 * shares.speculative_problems * decode
             + shares.humaneval_problems * t.decode_seconds(1) * shape.max_new_tokens)  # fmt: skip
    execute = programs / programs_per_s if programs_per_s else 0.0
    return runs * (problems * decode + extra + execute + 3 * RUN_STARTUP_S)


def _finetune_steps(t: SizeTiming, shares: Shares, budget_s: float, seeds: int) -> int:
    """Steps every arm × seed gets in the fine-tuning share (the critic's stage 1 is a quarter
    as many steps as its stage 2)."""
    per_step = sum(t.arm_step_s.values()) + 0.25 * t.stage1_step_s
    startup = RUN_STARTUP_S * len(t.arm_step_s) * seeds
    return int((shares.finetune * budget_s - startup) / (seeds * per_step))


def _tokens_per_s(t: SizeTiming, shape: Shape) -> float:
    return shape.pretrain_rows * shape.seq_len / t.pretrain_step_s


def choose_size(
    calibration: Calibration,
    shares: Shares,
    shape: Shape,
    budget_s: float,
    seeds: int,
    base_tokens: tuple[int, ...],
    test_problems: int,
) -> tuple[str, int, list[str]]:
    """(size, base tokens, notes): the largest calibrated size whose base gets MIN_BASE_TOKENS
    (or the ladder's top), whose arms get `min_finetune_steps` and whose evaluation fits its
    share with the fewest samples; else the smallest."""
    floor = min(MIN_BASE_TOKENS, base_tokens[0])
    for name, t in calibration.sizes.items():
        fits = [n for n in base_tokens if n / _tokens_per_s(t, shape) <= shares.base * budget_s]
        tokens = fits[0] if fits else base_tokens[-1]
        steps = _finetune_steps(t, shares, budget_s, seeds)
        evaluation = _eval_seconds(t, shares, shape, len(t.arm_step_s) * seeds, test_problems,
                                   min(shares.samples), calibration.programs_per_s)  # fmt: skip
        fits_eval = evaluation <= shares.evaluation * budget_s
        if tokens >= floor and steps >= shares.min_finetune_steps and fits_eval:
            return name, tokens, []
    note = (f"even {name} gets fewer than {shares.min_finetune_steps} fine-tuning steps or "
            f"{floor:,} pretraining tokens in the budget: the comparison will be weak "
            "(raise --minutes)")  # fmt: skip
    return name, tokens, [note]


def plan(
    calibration: Calibration,
    sizes: dict[str, dict],
    shares: Shares,
    shape: Shape,
    budget_s: float,
    seeds: int | None,
    test_problems: int,
    cached: tuple[str, int] | None = None,
    base_tokens: tuple[int, ...] = BASE_TOKENS,
) -> Plan:
    """The size and base tokens (`choose_size`, or a `cached` base's as they are), then seeds,
    fine-tuning steps, reference steps and evaluation samples, each scaled to its share."""
    if cached:
        (name, tokens), notes = cached, []
    else:
        name, tokens, notes = choose_size(
            calibration, shares, shape, budget_s, seeds or 1, base_tokens, test_problems
        )
    t = calibration.sizes[name]
    if seeds is None:  # as many as keep the full length (up to max_seeds), else one
        full = shares.max_finetune_steps
        seeds = next((n for n in range(shares.max_seeds, 1, -1)
                      if _finetune_steps(t, shares, budget_s, n) >= full), 1)  # fmt: skip
    steps = min(shares.max_finetune_steps, _finetune_steps(t, shares, budget_s, seeds))
    steps = max(1, min(steps, tokens // (shape.finetune_rows * shape.seq_len)))  # < the base's
    runs = len(t.arm_step_s) * seeds
    samples = next((n for n in shares.samples if _eval_seconds(
        t, shares, shape, runs, test_problems, n, calibration.programs_per_s
    ) <= shares.evaluation * budget_s), min(shares.samples))  # fmt: skip
    reference = int((shares.reference * budget_s - 2 * RUN_STARTUP_S) / t.reference_step_s)
    reference = max(1, min(reference, steps))
    per_step = sum(t.arm_step_s.values()) + 0.25 * t.stage1_step_s
    predicted = {
        "base": 0.0 if cached else tokens / _tokens_per_s(t, shape) + RUN_STARTUP_S,
        "reference": reference * t.reference_step_s + 2 * RUN_STARTUP_S,
        "fine-tuning": seeds * steps * per_step + runs * RUN_STARTUP_S,
        "evaluation": _eval_seconds(
            t, shares, shape, runs, test_problems, samples, calibration.programs_per_s
        ),  # fmt: skip
    }
    return Plan(
        size=name, micro=dict(sizes[name]), base_tokens=tokens, base_cached=bool(cached),
        arms=list(t.arm_step_s), seeds=seeds, finetune_steps=steps, reference_steps=reference,
        stage1_steps=max(1, steps // 4), eval_samples=samples,
        humaneval_problems=shares.humaneval_problems,
        speculative_problems=shares.speculative_problems, shape=shape,
        predicted_s={k: round(v, 1) for k, v in predicted.items()}, budget_s=budget_s,
        notes=notes,
    )  # fmt: skip


def calibrate(
    sizes: dict[str, dict],
    arms: dict[str, Recipe],
    shares: Shares,
    shape: Shape,
    budget_s: float,
    seeds: int | None,
    test_problems: int,
    programs_per_s: float,
    cached: tuple[str, int] | None = None,
    base_tokens: tuple[int, ...] = BASE_TOKENS,
) -> Calibration:
    """Times sizes from the largest down until one fits the budget (only the cached one when a
    base is cached): each calibration is the real step, so the plan needs no cost model."""
    started = time.perf_counter()
    precision = resolve_precision("auto", torch.device("cpu"))
    calibration = Calibration(precision.name, precision.reason, programs_per_s=programs_per_s)
    names = [cached[0]] if cached else list(sizes)
    with Progress("  calibrating", len(names), "sizes", heartbeat=True) as progress:
        for name in names:
            t = calibrate_size(sizes[name], arms, shape, precision, max(shares.samples))
            calibration.sizes[name] = t
            arms_text = ", ".join(f"{a} {s:.2f}s" for a, s in t.arm_step_s.items())
            progress.write(
                f"  {name}: pretraining step {t.pretrain_step_s:.2f}s, fine-tuning steps "
                f"{arms_text}, decoding step {t.decode_seconds(1) * 1000:.1f} ms "
                f"({precision.name})"
            )
            progress.update()
            chosen = plan(calibration, sizes, shares, shape, budget_s, seeds, test_problems,
                          cached, base_tokens)  # fmt: skip
            if chosen.size == name and not chosen.notes:
                break  # a smaller size would not be chosen
    calibration.seconds = time.perf_counter() - started
    return calibration
