"""Batched self-speculative decoding: token for token plain greedy per row (ragged acceptance,
ragged prompts), lossless sampling (exactly by construction, and statistically against the
enumerated distribution of plain sampling), stop sequences, EOS and the token budget."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from evaluation.generation import (
    SamplingConfig,
    SpeculationStats,
    generate,
    residual,
    token_distribution,
)
from model import ModelArgs, Transformer
from model.tokenizer import Tokenizer


class DigitTokenizer:
    """Token i is the character str(i) (no EOS in the vocabulary unless asked)."""

    bos_id = 0

    def __init__(self, eos_id: int = -1):
        self.eos_id = eos_id

    def decode(self, ids):
        return "".join(str(i) for i in ids)


def tiny_mtp(vocab: int, seed: int, std: float = 0.5) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(dim=32, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=vocab,
                                  multiple_of=16, n_future_tokens=4))  # fmt: skip
    model.init_weights(std=std, seed=seed)
    return model.eval()


@pytest.fixture(scope="module")
def llama_tiny(llama2_tokenizer_path):
    tok = Tokenizer(llama2_tokenizer_path)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                  multiple_of=32, n_future_tokens=4))  # fmt: skip
    model.init_weights(std=0.3, seed=0)
    return model.eval(), tok


# -------------------------------------------------------------------------- greedy
def test_batched_greedy_speculation_is_plain_greedy_for_every_row(llama_tiny):
    model, tok = llama_tiny
    texts = [
        "def fib(n):",
        "import os\nclass A:",
        "x = [1, 2, 3]\nprint(",
        "# sort a list of numbers in place",
    ]
    prompts = [[tok.bos_id, *tok.encode(t)] for t in texts]  # different lengths
    cfg = SamplingConfig(temperature=0, max_new_tokens=37)  # not a multiple of the 4 heads
    stats = SpeculationStats()
    spec = generate(model, tok, prompts, cfg, stop=[], speculative=True, stats=stats)
    batched = generate(model, tok, prompts, cfg, stop=[])
    for row, prompt in enumerate(prompts):
        (alone,) = generate(model, tok, [prompt], cfg, stop=[])
        assert spec[row].tokens == alone.tokens == batched[row].tokens, row
        assert len(spec[row].tokens) == 37
    assert stats.tokens == 4 * 37 and 1 <= stats.tokens_per_forward <= 4
    assert len(stats.attempts) == 3 and stats.attempts[0] > 0


def test_rows_accept_different_numbers_of_tokens():
    """Heads copy head 0 for some prompts only: rows advance at different speeds, each exact."""
    model = tiny_mtp(vocab=30, seed=3, std=0.4)
    tok = DigitTokenizer()
    prompts = [[0, 5, 6], [0, 7, 8, 9, 10, 11], [0, 1], [0, 2, 3, 4]]
    cfg = SamplingConfig(temperature=0, max_new_tokens=25)
    stats = SpeculationStats()
    spec = generate(model, tok, prompts, cfg, stop=[], speculative=True, stats=stats)
    for row, prompt in enumerate(prompts):
        (alone,) = generate(model, tok, [prompt], cfg, stop=[])
        assert spec[row].tokens == alone.tokens, row
    assert 0 < stats.acceptance()["spec_accept_pos1"] < 1  # some drafts rejected, some kept


def test_speculation_accepts_every_draft_when_the_heads_agree():
    torch.manual_seed(0)
    model = Transformer(
        ModelArgs(dim=32, n_layers=5, n_heads=4, vocab_size=50, multiple_of=16, n_future_tokens=4)
    ).eval()
    model.init_weights(std=0.02, seed=1)
    with torch.no_grad():
        model.output.weight.zero_()
        model.output.weight[7] = 1.0  # every head always predicts token 7
    stats = SpeculationStats()
    (gen,) = generate(model, DigitTokenizer(), [[1, 3, 4]], SamplingConfig(temperature=0, max_new_tokens=20),
                      stop=[], speculative=True, stats=stats)  # fmt: skip
    assert gen.tokens == [7] * 20
    assert stats.tokens_per_forward > 3.0 and stats.acceptance()["spec_accept_pos3"] == 1.0


def test_stop_sequences_eos_and_budget_behave_as_in_plain_decoding(llama_tiny):
    model, tok = llama_tiny
    prompt = [tok.bos_id, *tok.encode("def f(x):")]
    cfg = SamplingConfig(temperature=0, max_new_tokens=30)
    (plain,) = generate(model, tok, [prompt], cfg, stop=[])
    stop_text = tok.decode(plain.tokens)[5:8]
    for stop in ([stop_text], []):
        (a,) = generate(model, tok, [prompt], cfg, stop=stop)
        (b,) = generate(model, tok, [prompt], cfg, stop=stop, speculative=True)
        assert (a.tokens, a.text, a.stopped) == (b.tokens, b.text, b.stopped)
    eos_model = tiny_mtp(vocab=12, seed=5)
    digits = DigitTokenizer(eos_id=3)
    for budget in (1, 2, 5, 13):
        cfg = SamplingConfig(temperature=0, max_new_tokens=budget)
        a = generate(eos_model, digits, [[0, 4], [0, 9, 9]], cfg, stop=["77"])
        b = generate(eos_model, digits, [[0, 4], [0, 9, 9]], cfg, stop=["77"], speculative=True)
        assert [(g.tokens, g.text, g.stopped) for g in a] == [
            (g.tokens, g.text, g.stopped) for g in b
        ]
        assert all(len(g.tokens) <= budget for g in b)


def test_a_row_that_stopped_early_waits_while_the_others_decode_their_whole_budget():
    """A stopped row keeps its place: it never walks past the KV cache while the batch goes on
    (regression: it advanced by ≥ 1 position per forward and overflowed the cache)."""
    model = tiny_mtp(vocab=12, seed=9)
    digits = DigitTokenizer(eos_id=3)
    prompts = [[0, 1], [0, 2], [0, 5], [0, 6], [0, 7]]
    for temperature in (0.0, 1.0):
        cfg = SamplingConfig(temperature=temperature, top_p=1.0, max_new_tokens=60)
        spec = generate(model, digits, prompts, cfg, stop=["77"], speculative=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
        lengths = [len(g.tokens) for g in spec]
        assert min(lengths) < 30 and max(lengths) == 60, lengths  # the case under test
        if temperature == 0:
            plain = generate(model, digits, prompts, cfg, stop=["77"])
            assert [g.tokens for g in spec] == [g.tokens for g in plain]


# ------------------------------------------------------------------------ sampling
def test_the_accept_or_replace_step_reproduces_p_exactly():
    """For any p and q: P(out = x) = q(x)·min(1, p(x)/q(x)) + P(reject)·residual(p, q)(x) = p(x)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        p = torch.softmax(torch.randn(7, generator=g) * 2, 0)
        q = torch.softmax(torch.randn(7, generator=g) * 2, 0)
        q[torch.randint(0, 7, (1,), generator=g)] = 0  # the drafter may rule tokens out
        q = q / q.sum()
        kept = q * torch.clamp(p / q.clamp(min=1e-30), max=1.0)
        out = kept + (1 - kept.sum()) * residual(p[None], q[None])[0]
        torch.testing.assert_close(out, p, rtol=0, atol=1e-6)


def exact_distribution(model, prompt: list[int], cfg: SamplingConfig) -> dict[tuple, float]:
    """P(sequence) of plain sampling, enumerated over every sequence of max_new_tokens tokens."""
    vocab = model.args.vocab_size
    probs = {}
    with torch.no_grad():
        for seq in itertools.product(range(vocab), repeat=cfg.max_new_tokens):
            ids = torch.tensor([[*prompt, *seq[:-1]]])
            dist = token_distribution(model(ids, n_heads=1)[0, len(prompt) - 1 :, 0], cfg)
            probs[seq] = float(torch.prod(dist[torch.arange(len(seq)), torch.tensor(seq)]))
    return probs


def empirical(model, prompt, cfg, n, speculative, seed) -> Counter:
    counts, g = Counter(), torch.Generator().manual_seed(seed)
    for _ in range(n // 2000):
        gens = generate(
            model,
            DigitTokenizer(),
            [prompt] * 2000,
            cfg,
            stop=[],
            generator=g,
            speculative=speculative,
        )
        counts.update(tuple(x.tokens) for x in gens)
    return counts


def total_variation(counts: Counter, exact: dict, n: int) -> float:
    return 0.5 * sum(abs(counts.get(seq, 0) / n - p) for seq, p in exact.items())


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_speculative_sampling_has_plain_samplings_distribution(temperature, top_p):
    model = tiny_mtp(vocab=5, seed=11, std=0.8)  # heads disagree: drafts are often rejected
    prompt, n = [0, 2, 4], 20_000
    cfg = SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=3)
    exact = exact_distribution(model, prompt, cfg)
    assert abs(sum(exact.values()) - 1) < 1e-5
    noise = 0.5 * sum(
        (2 * p * (1 - p) / (torch.pi * n)) ** 0.5 for p in exact.values()
    )  # E[TV] of n draws
    plain = total_variation(empirical(model, prompt, cfg, n, False, seed=1), exact, n)
    spec = total_variation(empirical(model, prompt, cfg, n, True, seed=2), exact, n)
    assert plain < 2 * noise and spec < 2 * noise, (plain, spec, noise)
    # the test has power: taking the drafts without the acceptance test is far off
    biased = Counter()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(n // 2000):
            ids = torch.tensor([prompt] * 2000)
            logits = model(ids)[:, -1]
            first = torch.multinomial(token_distribution(logits[:, 0], cfg), 1, generator=g)[:, 0]
            drafts = [
                torch.multinomial(token_distribution(logits[:, k], cfg), 1, generator=g)[:, 0]
                for k in (1, 2)
            ]
            biased.update(zip(first.tolist(), drafts[0].tolist(), drafts[1].tolist(), strict=True))
    assert total_variation(biased, exact, n) > 4 * noise
