"""Decoding with the KV cache, one entry point: `generate(model, tokenizer, prompts, cfg, stop,
generator, speculative=False)`.

Rows are decoded together, each from its own prompt, greedily (T = 0) or by temperature/top-p
sampling. With `speculative=True` and an MTP model, heads 1..n−1 draft the next n−1 tokens and
head 0 verifies all of them in one forward, for every row at once; rows accept different numbers
of tokens and keep their own positions in the KV cache.

Lossless: a drafted token x is accepted with probability min(1, p(x)/q(x)), p being head 0's
and q the drafting head's distribution after the same temperature and top-p processing; on a
rejection the token is drawn from normalise(max(0, p − q)); when every draft is accepted the
next token is drawn from p. Each emitted token is thus distributed exactly as in plain sampling
(Leviathan et al. 2023; Chen et al. 2023), and greedy speculation emits plain greedy's tokens.
Stop sequences, EOS and the token budget are applied token by token, exactly as in plain decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

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


@dataclass
class SpeculationStats:
    """Verify forwards, tokens they produced, and draft acceptance by position (1 = head 1)."""

    verifies: int = 0  # row-forwards: one per active row per verify step
    tokens: int = 0  # tokens those forwards emitted (accepted drafts + the verified token)
    attempts: list[int] = field(default_factory=list)
    accepts: list[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float | None:
        return self.tokens / self.verifies if self.verifies else None

    def acceptance(self) -> dict[str, float]:
        """{"spec_accept_pos1": rate, ...}: P(draft i accepted | drafts before it accepted)."""
        return {
            f"spec_accept_pos{i + 1}": a / t
            for i, (a, t) in enumerate(zip(self.accepts, self.attempts, strict=True))
            if t
        }

    def add(self, other: SpeculationStats) -> None:
        self.verifies += other.verifies
        self.tokens += other.tokens
        for i, (a, t) in enumerate(zip(other.accepts, other.attempts, strict=True)):
            while len(self.attempts) <= i:
                self.attempts.append(0)
                self.accepts.append(0)
            self.attempts[i] += t
            self.accepts[i] += a


# ------------------------------------------------------------------------ distributions
def sample_next(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row from (bsz, vocab) logits: argmax, or nucleus sampling at temperature T."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(token_distribution(logits, cfg).cpu(), 1, generator=generator).to(
        logits.device
    )[:, 0]


def token_distribution(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """What sampling draws from, (..., vocab), summing to 1: softmax(logits / T) restricted to the
    smallest set of tokens whose mass reaches top_p; one-hot at the argmax when greedy."""
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = (
        sorted_probs.cumsum(dim=-1) - sorted_probs > cfg.top_p
    )  # keep the smallest set reaching top_p
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return kept / kept.sum(dim=-1, keepdim=True)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalise(max(0, p − q)), what a rejected draft is replaced from (p where p == q)."""
    r = (p - q).clamp(min=0)
    mass = r.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp(min=1e-30), p)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of (rows, vocab) probabilities (argmax of a one-hot row, exactly)."""
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)[:, 0]


# ------------------------------------------------------------------------------ stopping
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


def _device(model: Transformer) -> torch.device:
    return next(model.parameters()).device


def _prompt_batch(
    prompts: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Right-padded prompt tokens (rows, longest), their lengths, and whether they differ."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(lengths.max())
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        tokens[row, : len(ids)] = torch.tensor(ids, device=device)
    return tokens, lengths, bool((lengths != longest).any())


def _last(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(rows, dim): each row's hidden state at its last prompt token."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]


# ------------------------------------------------------------------------------ decoding
@torch.no_grad()
def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    stop: list[str],
    generator: torch.Generator | None = None,
    speculative: bool = False,
    stop_early: bool = True,
    cache_dtype: torch.dtype | None = None,
    stats: SpeculationStats | None = None,
) -> list[Generation]:
    """One Generation per prompt (row), decoded together.

    Args:
        speculative: draft with heads 1..n−1, verify with head 0 (needs n_future_tokens > 1;
            otherwise plain decoding). Greedy output is token for token plain greedy's;
            sampled output has exactly plain sampling's distribution.
        stop_early: False decodes all `max_new_tokens` steps even when every row has stopped
            (ranks running a sharded model in lockstep must make the same number of forwards).
        stats: speculative decoding adds its acceptance statistics here.
    """
    if speculative and model.n_future_tokens > 1:
        return _speculative(model, tokenizer, prompts, cfg, stop, generator, cache_dtype, stats)
    return _plain(model, tokenizer, prompts, cfg, stop, generator, stop_early, cache_dtype)


def _plain(
    model, tokenizer, prompts, cfg, stop, generator, stop_early, cache_dtype
) -> list[Generation]:
    start = time.perf_counter()
    tokens, lengths, ragged = _prompt_batch(prompts, _device(model))
    n = len(prompts)
    cache = model.new_cache(n, tokens.shape[1] + cfg.max_new_tokens, dtype=cache_dtype)
    h = model(tokens, 0, cache, return_trunk=True)
    logits = model.output(_last(model.head_hidden(h, 0, 0, cache), lengths)).float()
    pos = lengths.clone() if ragged else tokens.shape[1]  # next write position (per row if ragged)
    out: list[list[int]] = [[] for _ in range(n)]
    checker, forwards = StopChecker(tokenizer, stop, n), 1
    for step in range(cfg.max_new_tokens):
        nxt = sample_next(logits, cfg, generator)
        for row in range(n):
            if not checker.done[row]:
                out[row].append(int(nxt[row]))
                checker.update(row, out[row])
        if (stop_early and all(checker.done)) or step == cfg.max_new_tokens - 1:
            break
        logits = model(nxt[:, None], pos, cache, n_heads=1)[:, -1, 0]
        pos = pos + 1
        forwards += 1
    seconds = time.perf_counter() - start
    return [
        Generation(checker.finish(ids), ids, forwards, seconds, checker.done[r])
        for r, ids in enumerate(out)
    ]


def _speculative(
    model, tokenizer, prompts, cfg, stop, generator, cache_dtype, stats
) -> list[Generation]:
    start = time.perf_counter()
    n_heads, n = model.n_future_tokens, len(prompts)
    tokens, lengths, _ = _prompt_batch(prompts, _device(model))
    cache = model.new_cache(n, tokens.shape[1] + cfg.max_new_tokens + n_heads, dtype=cache_dtype)
    h = model(tokens, 0, cache, return_trunk=True)
    hidden = [_last(model.head_hidden(h, k, 0, cache), lengths) for k in range(n_heads)]
    verified, drafts, q = _propose(model, hidden, cfg, generator)
    pos = lengths.clone()  # where each row's verified token goes
    out: list[list[int]] = [[] for _ in range(n)]
    checker, forwards, local = StopChecker(tokenizer, stop, n), 1, SpeculationStats()
    while not all(checker.done):
        remaining = torch.tensor([cfg.max_new_tokens - len(o) for o in out], device=pos.device)
        width = int(min(n_heads, remaining.max()))
        candidates = torch.cat([verified[:, None], drafts], dim=1)[:, :width]
        h = model(candidates, pos, cache, return_trunk=True)
        heads = [model.head_hidden(h, k, pos, cache) for k in range(n_heads)]  # every head's cache
        p = token_distribution(model.output(heads[0]).float(), cfg)  # (rows, width, vocab)
        accepted = _accept(candidates, p, q, generator)  # (rows,) in 1..width
        accepted = torch.minimum(accepted, remaining.clamp(min=1))
        forwards += 1
        last = accepted - 1
        rows = torch.arange(n, device=pos.device)
        rejected = accepted < width
        p_last = p[rows, last]
        q_next = q[rows, last.clamp(max=q.shape[1] - 1)]
        replace_from = torch.where(rejected[:, None], residual(p_last, q_next), p_last)
        next_verified = draw(replace_from, generator)
        _count(local, accepted, width, checker, pos.device)
        active = torch.tensor(  # a finished row keeps its position (and its cache bound)
            [not checker.done[r] and len(out[r]) < cfg.max_new_tokens for r in range(n)],
            device=pos.device,
        )
        for row in range(n):
            for token in candidates[row, : int(accepted[row])].tolist():
                if checker.done[row] or len(out[row]) >= cfg.max_new_tokens:
                    break
                out[row].append(token)
                checker.update(row, out[row])
        if all(checker.done[r] or len(out[r]) >= cfg.max_new_tokens for r in range(n)):
            break
        verified, drafts, q = _propose(
            model, [z[rows, last] for z in heads], cfg, generator, next_verified
        )
        pos = pos + accepted * active
    seconds = time.perf_counter() - start
    if stats is not None:
        stats.add(local)
    return [
        Generation(checker.finish(ids), ids, forwards, seconds, checker.done[r])
        for r, ids in enumerate(out)
    ]


def _propose(
    model, hidden: list[torch.Tensor], cfg, generator, verified: torch.Tensor | None = None
):
    """From every head's hidden state at each row's last verified position: the next verified
    token (head 0, unless already drawn) and drafts of heads 1..n−1 with their distributions."""
    if verified is None:
        verified = draw(token_distribution(model.output(hidden[0]).float(), cfg), generator)
    q = torch.stack([token_distribution(model.output(z).float(), cfg) for z in hidden[1:]], dim=1)
    drafts = torch.stack([draw(q[:, k], generator) for k in range(q.shape[1])], dim=1)
    return verified, drafts, q


def _accept(candidates: torch.Tensor, p: torch.Tensor, q: torch.Tensor, generator) -> torch.Tensor:
    """How many candidates each row keeps: the verified token, then drafts while each is accepted
    with probability min(1, p(x)/q(x)) (p: head 0 given everything before x; q: its drafter)."""
    width = candidates.shape[1]
    if width == 1:
        return torch.ones(candidates.shape[0], dtype=torch.long, device=candidates.device)
    x = candidates[:, 1:, None]
    p_x = p[:, : width - 1].gather(-1, x)[..., 0]
    q_x = q[:, : width - 1].gather(-1, x)[..., 0]
    u = torch.rand(p_x.shape, generator=generator).to(p_x.device)
    ok = u * q_x < p_x
    return 1 + ok.long().cumprod(dim=1).sum(dim=1)


def _count(
    stats: SpeculationStats, accepted: torch.Tensor, width: int, checker: StopChecker, device
) -> None:
    """Per active row: one verify forward, `accepted` tokens, and which draft positions were
    reached and accepted."""
    active = torch.tensor([not d for d in checker.done], device=device)
    while len(stats.attempts) < width - 1:
        stats.attempts.append(0)
        stats.accepts.append(0)
    stats.verifies += int(active.sum())
    stats.tokens += int(accepted[active].sum())
    for i in range(1, width):
        stats.attempts[i - 1] += int((active & (accepted >= i)).sum())
        stats.accepts[i - 1] += int((active & (accepted >= i + 1)).sum())
