"""Decoding with the KV cache: batched temperature/top-p sampling, greedy, and self-speculative
greedy decoding with the MTP heads (draft with heads 1..n-1, verify with head 0).

Self-speculative greedy emits exactly the tokens plain greedy emits: every emitted token is
head 0's argmax given the verified prefix; drafts only decide how many tokens one forward covers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from evaluation.tasks import truncate_at_stop
from model.tokenizer import Tokenizer
from model.transformer import Transformer


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.2
    top_p: float = 0.95
    max_new_tokens: int = 512

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Generation:
    text: str
    tokens: list[int]
    forwards: int  # model calls spent on this batch
    seconds: float
    stopped: bool  # hit a stop sequence or EOS (vs. the token budget)


def sample_next(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row from (bsz, vocab) logits: argmax, or nucleus sampling at temperature T."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = (
        sorted_probs.cumsum(dim=-1) - sorted_probs > cfg.top_p
    )  # keep the smallest set reaching top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator).to(order.device)
    return order.gather(-1, choice).squeeze(-1)


class StopChecker:
    """Tracks, per row, whether EOS or a stop sequence has appeared in the generated text."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], n: int):
        self.tokenizer, self.stop = tokenizer, stop
        self.done = [False] * n

    def update(self, row: int, generated: list[int]) -> None:
        eos = bool(generated) and generated[-1] == self.tokenizer.eos_id
        if eos or (
            self.stop and any(s in self.tokenizer.decode(generated[-64:]) for s in self.stop)
        ):
            self.done[row] = True

    def finish(self, generated: list[int]) -> str:
        ids = [t for t in generated if t != self.tokenizer.eos_id]
        if self.tokenizer.eos_id in generated:
            ids = generated[: generated.index(self.tokenizer.eos_id)]
        return truncate_at_stop(self.tokenizer.decode(ids), self.stop)


def _model_device(model: Transformer) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    n: int,
    cfg: SamplingConfig,
    stop: list[str],
    generator: torch.Generator | None = None,
    stop_early: bool = True,
    cache_dtype: torch.dtype | None = None,
) -> list[Generation]:
    """`n` samples of one prompt, decoded together in one batch (one shared prompt length).

    `stop_early=False` decodes all `max_new_tokens` steps even when every row has stopped (ranks
    that run a sharded model in lockstep must make the same number of forwards).
    """
    start = time.perf_counter()
    device = _model_device(model)
    cache = model.new_cache(n, len(prompt_ids) + cfg.max_new_tokens, dtype=cache_dtype)
    tokens = torch.tensor([prompt_ids] * n, device=device)
    logits = model(tokens, 0, cache, n_heads=1)[:, -1, 0]
    pos, forwards = len(prompt_ids), 1
    out: list[list[int]] = [[] for _ in range(n)]
    checker = StopChecker(tokenizer, stop, n)
    for _ in range(cfg.max_new_tokens):
        nxt = sample_next(logits, cfg, generator)
        for row in range(n):
            if not checker.done[row]:
                out[row].append(int(nxt[row]))
                checker.update(row, out[row])
        if (stop_early and all(checker.done)) or pos + 1 >= cache[0].k.shape[1]:
            break
        logits = model(nxt[:, None], pos, cache, n_heads=1)[:, -1, 0]
        pos += 1
        forwards += 1
    seconds = time.perf_counter() - start
    return [
        Generation(checker.finish(ids), ids, forwards, seconds, checker.done[r])
        for r, ids in enumerate(out)
    ]


def _verify_forward(
    model: Transformer, tokens: torch.Tensor, pos: int, cache
) -> tuple[list[torch.Tensor], list[int]]:
    """All heads' hidden states for `tokens` (their KV caches must stay complete) and head 0's
    greedy tokens; the output projection runs for head 0 only (the drafts need just one row)."""
    h = model(tokens, pos, cache, return_trunk=True)
    hidden = [model.head_hidden(h, k, pos, cache) for k in range(model.n_future_tokens)]
    greedy = model.output(hidden[0][0]).argmax(dim=-1).tolist()
    return hidden, greedy


def _drafts(model: Transformer, hidden: list[torch.Tensor], row: int) -> list[int]:
    return [int(model.output(z[0, row]).argmax()) for z in hidden[1:]]


@torch.no_grad()
def speculative_greedy(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    stop: list[str],
) -> tuple[Generation, list[int]]:
    """Greedy decoding with self-speculation. Returns the generation and the number of tokens
    accepted by each verifying forward (mean > 1 is the speed-up)."""
    start = time.perf_counter()
    device = _model_device(model)
    n_heads = model.n_future_tokens
    cache = model.new_cache(1, len(prompt_ids) + cfg.max_new_tokens + n_heads)
    hidden, greedy = _verify_forward(model, torch.tensor([prompt_ids], device=device), 0, cache)
    pos = len(prompt_ids)
    nxt, drafts = (
        greedy[-1],
        _drafts(model, hidden, -1),
    )  # head k at the last prompt token: token pos + k
    out: list[int] = []
    accepted_per_forward: list[int] = []
    checker = StopChecker(tokenizer, stop, 1)
    forwards = 1
    while len(out) < cfg.max_new_tokens and not checker.done[0]:
        candidate = [nxt, *drafts][: cfg.max_new_tokens - len(out)]
        hidden, greedy = _verify_forward(
            model, torch.tensor([candidate], device=device), pos, cache
        )
        forwards += 1
        n_ok = 1  # greedy[i] is head 0's token after candidate[i]; candidate[0] is already verified
        while n_ok < len(candidate) and candidate[n_ok] == greedy[n_ok - 1]:
            n_ok += 1
        for token in candidate[:n_ok]:
            out.append(token)
            checker.update(0, out)
            if checker.done[0]:
                break
        accepted_per_forward.append(n_ok)
        pos += n_ok
        nxt, drafts = greedy[n_ok - 1], _drafts(model, hidden, n_ok - 1)
    seconds = time.perf_counter() - start
    return Generation(
        checker.finish(out), out, forwards, seconds, checker.done[0]
    ), accepted_per_forward
