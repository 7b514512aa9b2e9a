"""pass@1 by execution during training (`train.eval_pass_every`): decode held-out problems with
the model being trained, run them in the sandbox, and let `checkpoint.best_metric: pass@1`
choose `best` (and `train.early_stop_patience` stop a run that no longer improves).

With a sharded model every rank decodes the same prompts in lockstep (a fixed number of
forwards, since FSDP gathers parameters in each); rank 0 runs the programs and shares the score.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from evaluation.generation import SamplingConfig, generate
from evaluation.sandbox import Limits, Sandbox
from evaluation.scoring import check_completion
from evaluation.tasks import Problem, load_problems
from model.tokenizer import Tokenizer
from runtime.precision import autocast
from training.distributed import DistInfo
from training.recipe import EvalPassSection

MBPP_VALIDATION_IDS = range(511, 601)


def held_out_problems(section: EvalPassSection) -> list[Problem]:
    """The problem set named by the recipe's `eval_pass:` section (its first `limit`)."""
    return load_problems(
        section.benchmark,
        section.problems or None,
        split=section.split,
        mbpp_ids=MBPP_VALIDATION_IDS,
        style="alpaca",
        condition=section.condition == "correct",
        max_tests=section.max_tests,
        limit=section.limit,
    )


class PassAtOne:
    """Scores the model on a fixed held-out problem set; `__call__` → {"pass@1", ...}."""

    def __init__(
        self, section: EvalPassSection, tokenizer: Tokenizer, info: DistInfo, dtype: torch.dtype
    ):
        self.section, self.tokenizer, self.info, self.dtype = section, tokenizer, info, dtype
        self.problems = held_out_problems(section)
        if not self.problems:
            raise ValueError(f"eval_pass: no problems in {section.problems}")
        self.sampling = SamplingConfig(section.temperature, section.top_p, section.max_new_tokens)
        self.sandbox = (
            Sandbox(Limits(timeout_s=section.timeout_s, cpu_s=int(section.timeout_s) + 1))
            if info.is_main
            else None
        )

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        start = time.perf_counter()
        model.eval()
        generator = torch.Generator().manual_seed(step)
        completions = []
        for problem in self.problems:
            ids = [self.tokenizer.bos_id, *self.tokenizer.encode(problem.prompt)]
            with autocast(self.info.device, self.dtype):
                gens = generate(
                    model,
                    self.tokenizer,
                    [ids] * self.section.n_samples,
                    self.sampling,
                    problem.stop,
                    generator,
                    stop_early=not self.info.enabled,
                    cache_dtype=self.dtype,
                )
            completions += [(problem, g.text) for g in gens]
        model.train()
        score = torch.zeros(1, dtype=torch.float64, device=self.info.device)
        if self.info.is_main:
            with ThreadPoolExecutor(max_workers=2) as pool:
                verdicts = list(
                    pool.map(lambda pc: check_completion(pc[0], pc[1], self.sandbox), completions)
                )
            score[0] = sum(v.passed for v in verdicts) / len(verdicts)
        if self.info.enabled:
            dist.broadcast(score, src=0)
        return {"pass@1": float(score[0]), "eval_pass_seconds": time.perf_counter() - start}


def tracked_name(metric: str) -> str:
    """MLflow metric names cannot hold '@'."""
    return metric.replace("@", "_at_")
