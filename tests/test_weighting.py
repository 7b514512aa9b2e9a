"""Token-weighting invariants (hypothesis), GAE by hand, the value head on a toy problem."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weighting import (
    CriticConfig,
    NormalizeConfig,
    Rho1Config,
    SingleProcess,
    ValueHead,
    WeightingConfig,
    WeightingError,
    WeightingInputs,
    align_to_heads,
    check_mean_error,
    gae,
    get_weighter,
    mean_error,
    normalize_per_head,
    normalize_scores,
    td_errors,
    terminal_rewards,
    value_loss,
    weight_stats,
)
from weighting.rho1 import selected_weights, top_fraction_threshold

SPECIAL = [math.inf, -math.inf, math.nan, 0.0, 1e30, -1e30, 1e-30]


def weigh(weighter, inputs: WeightingInputs) -> torch.Tensor:
    """What the step does for a per-micro-batch weighter."""
    return weighter.weights(weighter.scores(inputs), inputs.valid)


@st.composite
def scores_and_mask(draw):
    n = draw(st.integers(1, 64))
    finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
    values = draw(st.lists(st.one_of(finite, st.sampled_from(SPECIAL)), min_size=n, max_size=n))
    mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float32), torch.tensor(mask)


configs = st.builds(
    NormalizeConfig,
    temperature=st.floats(0.01, 20.0),
    min_weight=st.floats(1e-4, 1.0),
    max_weight=st.floats(1.0, 50.0),
)


def check_invariants(w: torch.Tensor, valid: torch.Tensor, cfg: NormalizeConfig) -> None:
    assert torch.isfinite(w).all() and w.dtype == torch.float32
    assert (w[~valid] == 0).all()
    if valid.any():
        vals = w[valid]
        assert abs(vals.mean().item() - 1.0) <= cfg.mean_tolerance
        assert vals.min().item() >= cfg.min_weight * (1 - 1e-6)
        assert vals.max().item() <= cfg.max_weight * (1 + 1e-6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scores_and_mask(), configs)
def test_normalized_weights_are_finite_mean_one_and_inside_bounds(data, cfg):
    scores, valid = data
    check_invariants(normalize_scores(scores, valid, cfg), valid, cfg)


@settings(max_examples=100, deadline=None)
@given(scores_and_mask(), configs)
def test_weights_are_monotone_in_the_score(data, cfg):
    scores, valid = data
    finite = valid & torch.isfinite(scores)
    w = normalize_scores(scores, valid, cfg)
    s, ws = scores[finite], w[finite]
    order = torch.argsort(s)
    assert (ws[order].diff() >= -1e-5).all(), "a higher score got a lower weight"


def test_all_equal_scores_give_uniform_weights():
    valid = torch.tensor([[True, True, False], [True, True, True]])
    w = normalize_scores(torch.full((2, 3), 7.5), valid, NormalizeConfig())
    assert torch.equal(w, valid.float())


def test_one_valid_token_gets_weight_one():
    valid = torch.zeros(4, 8, dtype=torch.bool)
    valid[2, 5] = True
    w = normalize_scores(torch.randn(4, 8) * 100, valid, NormalizeConfig())
    assert w[2, 5].item() == pytest.approx(1.0) and w.sum().item() == pytest.approx(1.0)


def test_all_masked_gives_zero_weights_not_nan():
    w = normalize_scores(torch.randn(3, 5), torch.zeros(3, 5, dtype=torch.bool), NormalizeConfig())
    assert torch.equal(w, torch.zeros(3, 5))


def test_all_non_finite_scores_give_uniform_weights():
    scores = torch.tensor([math.nan, math.inf, -math.inf, math.nan])
    w = normalize_scores(scores, torch.ones(4, dtype=torch.bool), NormalizeConfig())
    assert torch.allclose(w, torch.ones(4))


def test_emphasis_is_continuous_top_tokens_up_nobody_dropped():
    torch.manual_seed(0)
    scores = torch.randn(1000)
    cfg = NormalizeConfig(temperature=0.7, min_weight=0.05, max_weight=5.0)
    w = normalize_scores(scores, torch.ones(1000, dtype=torch.bool), cfg)
    top = scores >= scores.quantile(0.8)
    assert w[top].mean() > 1.5 and w[~top].mean() < 1.0
    assert (w > 0).all() and len(torch.unique(w)) > 500  # graded, not a two-level mask
    hot = normalize_scores(
        scores, torch.ones(1000, dtype=torch.bool), NormalizeConfig(temperature=5)
    )
    assert hot.std() < w.std()  # higher temperature → flatter weights


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"temperature": 0}, "temperature"),
        ({"min_weight": 1.5}, "min_weight"),
        ({"max_weight": 0.5}, "max_weight"),
        ({"min_weight": 0.0}, "min_weight"),
    ],
)
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"weighting.{key}="):
        NormalizeConfig(**kwargs)


def test_registry_keys_and_typo_message():
    assert get_weighter("baseline").name == "baseline"
    assert get_weighter("rho1-wmtp").name == "rho1-wmtp"
    assert get_weighter("critic-wmtp").name == "critic-wmtp"
    assert get_weighter("dft").name == "dft"
    with pytest.raises(
        KeyError,
        match=r"'rho1_wmtp' \(did you mean 'rho1-wmtp'\?\); allowed: "
        r"baseline, critic-wmtp, dft, rho1-wmtp",
    ):
        get_weighter("rho1_wmtp")


def test_baseline_is_one_on_valid_tokens():
    valid = torch.rand(2, 6, 4) > 0.3
    w = weigh(get_weighter("baseline"), WeightingInputs(valid=valid))
    assert torch.equal(w, valid.float())


def test_align_to_heads_uses_the_same_target_token():
    next_ce = torch.arange(6, dtype=torch.float32)[None]  # ce of token t+1 at position t
    aligned = align_to_heads(next_ce, n_heads=3)
    assert aligned[0, 0].tolist() == [0.0, 1.0, 2.0]  # head k at t=0 targets token k+1
    assert aligned[0, 4, 0] == 4.0 and aligned[0, 4, 1] == 5.0 and math.isnan(aligned[0, 4, 2])


def test_rho1_weights_follow_excess_loss_per_head():
    torch.manual_seed(0)
    base = torch.rand(2, 10, 4) * 3
    ref = base.clone()
    ref[0, 3, :] += 5.0  # one token where reference and base disagree strongly
    valid = torch.ones(2, 10, 4, dtype=torch.bool)
    valid[1, 8:] = False
    cfg = NormalizeConfig(max_weight=8.0)
    inputs = WeightingInputs(valid, policy_token_ce=base, reference_ce=ref)
    w = weigh(get_weighter("rho1-wmtp", cfg), inputs)
    for k in range(4):
        check_invariants(w[..., k], valid[..., k], cfg)
        assert w[0, 3, k] == w[..., k].max()
    with pytest.raises(ValueError, match="rho1-wmtp needs `reference_ce`"):
        weigh(get_weighter("rho1-wmtp"), WeightingInputs(valid, policy_token_ce=base))


def test_gae_matches_hand_computed_example():
    valid = torch.tensor([[False, True, True, True, False]])
    values = torch.tensor([[9.0, 0.5, 0.2, 0.8, 9.0]])
    rewards = terminal_rewards(valid, torch.tensor([True]), CriticConfig())
    assert rewards.tolist() == [[0.0, 0.0, 0.0, 1.0, 0.0]]
    delta = td_errors(rewards, values, valid, gamma=0.9)
    assert delta[0].tolist() == pytest.approx([0.0, -0.32, 0.52, 0.2, 0.0])
    adv, ret = gae(rewards, values, valid, gamma=0.9, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.0, -0.0455, 0.61, 0.2, 0.0])
    assert ret[0].tolist() == pytest.approx([0.0, 0.4545, 0.81, 1.0, 0.0])
    _, mc = gae(rewards, values, valid, gamma=0.9, lam=1.0)  # λ=1: discounted Monte-Carlo return
    assert mc[0].tolist() == pytest.approx([0.0, 0.81, 0.9, 1.0, 0.0])


def test_gae_keeps_packed_episodes_apart():
    valid = torch.tensor([[True, True, False, True, True]])
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0, -1.0]])
    _, ret = gae(rewards, torch.zeros(1, 5), valid, gamma=1.0, lam=1.0)
    assert ret[0].tolist() == [1.0, 1.0, 0.0, -1.0, -1.0]


def test_value_head_learns_a_simple_reward_and_td_weights_follow():
    torch.manual_seed(0)
    bsz, seq, dim = 64, 12, 16
    is_correct = torch.rand(bsz) > 0.5
    hidden = torch.randn(bsz, seq, dim)
    hidden[..., 0] = torch.where(is_correct, 1.0, -1.0)[:, None]  # the trunk "knows" correctness
    valid = torch.ones(bsz, seq, dtype=torch.bool)
    valid[:, :3] = False  # prompt
    cfg = CriticConfig(gamma=1.0, gae_lambda=1.0, reward_correct=1.0, reward_incorrect=-1.0)
    rewards = terminal_rewards(valid, is_correct, cfg)
    head = ValueHead(dim)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        values = head(hidden)
        _, returns = gae(rewards, values.detach(), valid, cfg.gamma, cfg.gae_lambda)
        loss = value_loss(values, returns, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
    values = head(hidden).detach()
    assert loss.item() < 0.01
    assert values[is_correct][:, 3:].mean() > 0.9 and values[~is_correct][:, 3:].mean() < -0.9
    delta = td_errors(rewards, values, valid, cfg.gamma)
    per_head = align_to_heads(delta, n_heads=2, fill=0.0)
    head_valid = align_to_heads(valid.float(), n_heads=2, fill=0.0).bool()
    w = weigh(get_weighter("critic-wmtp"), WeightingInputs(head_valid, td_error=per_head))
    check_invariants(w[..., 0], head_valid[..., 0], NormalizeConfig())


def test_weight_stats():
    w = torch.tensor([0.05, 1.0, 2.95, 3.0, 9.9])
    valid = torch.tensor([True, True, True, True, False])
    stats = weight_stats(w, valid, min_weight=0.05, max_weight=3.0, n_bins=3)
    assert stats["n_valid"] == 4 and stats["mean"] == pytest.approx(1.75)
    assert stats["min"] == pytest.approx(0.05) and stats["max"] == 3.0
    assert stats["clipped_fraction"] == pytest.approx(0.5)
    assert stats["hist_counts"] == [1, 1, 2] and sum(stats["hist_counts"]) == 4
    assert weight_stats(w, torch.zeros(5, dtype=torch.bool))["n_valid"] == 0


def test_huge_scores_keep_their_order_and_sharp_temperatures_do_not_underflow():
    valid = torch.ones(3, dtype=torch.bool)
    w = normalize_scores(torch.tensor([1e30, 0.0, -1e30]), valid, NormalizeConfig(max_weight=2.5))
    assert w[0] > w[1] > w[2] > 0
    sharp = NormalizeConfig(temperature=0.03125, min_weight=0.5, max_weight=1.0)
    assert normalize_scores(torch.tensor([0.0, 1.0]), valid[:2], sharp).tolist() == [1.0, 1.0]


# ---------------------------------------------------------------- rho1 modes
def test_rho1_soft_scores_the_magnitude_and_select_the_signed_excess():
    base, ref = torch.tensor([[[3.0], [1.0]]]), torch.tensor([[[1.0], [3.0]]])
    inputs = WeightingInputs(
        torch.ones(1, 2, 1, dtype=torch.bool), policy_token_ce=base, reference_ce=ref
    )
    soft = get_weighter("rho1-wmtp", WeightingConfig())
    select = get_weighter("rho1-wmtp", WeightingConfig(rho1=Rho1Config(mode="select")))
    assert soft.scores(inputs).flatten().tolist() == [2.0, 2.0]
    assert select.scores(inputs).flatten().tolist() == [2.0, -2.0]  # learnable token first
    assert select.per_step and not soft.per_step
    assert soft.normalised and not select.normalised


def test_rho1_head_score_reads_each_heads_own_ce():
    token = get_weighter("rho1-wmtp", WeightingConfig(rho1=Rho1Config(score="token")))
    head = get_weighter("rho1-wmtp", WeightingConfig(rho1=Rho1Config(score="head")))
    assert token.needs == ("policy_token_ce", "reference_ce")
    assert head.needs == ("policy_head_ce", "reference_ce")
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    inputs = WeightingInputs(
        valid,
        policy_token_ce=torch.zeros(1, 2, 2),
        policy_head_ce=torch.full((1, 2, 2), 5.0),
        reference_ce=torch.ones(1, 2, 2),
    )
    assert head.scores(inputs).flatten().tolist() == [4.0] * 4
    assert token.scores(inputs).flatten().tolist() == [1.0] * 4


def test_top_fraction_threshold_and_selected_weights():
    inf = math.inf
    values = torch.tensor([[5.0, 1.0], [1.0, -inf], [3.0, 2.0], [2.0, -inf], [4.0, -inf]])
    # head 0: ceil(0.6·5) = 3 kept (5, 4, 3); head 1: 2 candidates, ceil(1.2) = 2 kept
    assert top_fraction_threshold(values, 0.6).tolist() == [3.0, 1.0]
    assert top_fraction_threshold(values, 1.0).tolist() == [1.0, 1.0]
    assert top_fraction_threshold(torch.full((3, 1), -inf), 0.5).tolist() == [inf]
    scores = torch.tensor([[[5.0, 0.0], [1.0, 9.0], [math.nan, 9.0], [3.0, 1.0]]])
    valid = torch.tensor([[[True, True], [True, True], [True, True], [True, False]]])
    w = selected_weights(scores, valid, torch.tensor([3.0, 9.0]))
    assert w[..., 0].flatten().tolist() == [1.0, 0.0, 0.0, 1.0]  # NaN never selected
    assert w[..., 1].flatten().tolist() == [0.0, 1.0, 1.0, 0.0]  # invalid never selected


def test_rho1_select_agrees_on_one_threshold_over_every_micro_batch():
    select = get_weighter(
        "rho1-wmtp", WeightingConfig(rho1=Rho1Config(select_ratio=0.5, mode="select"))
    )
    scores = [torch.tensor([[[4.0], [1.0]]]), torch.tensor([[[3.0], [2.0]]])]
    valid = [torch.ones(1, 2, 1, dtype=torch.bool)] * 2
    context = select.step_context(scores, valid, SingleProcess())
    weights = [select.weights(s, v, context) for s, v in zip(scores, valid, strict=True)]
    # the top half of all four scores (4, 3), not of each micro-batch (4 and 3, 2 would be 2 + 2)
    assert [w.flatten().tolist() for w in weights] == [[1.0, 0.0], [1.0, 0.0]]


def test_dft_weights_each_heads_target_by_its_own_detached_probability():
    dft = get_weighter("dft")
    assert dft.needs == ("policy_head_ce",) and not dft.per_step and not dft.normalised
    ce = torch.tensor([[[0.0, 1.0], [2.0, 30.0], [0.5, 0.0]]])
    valid = torch.tensor([[[True, True], [True, True], [False, True]]])
    w = weigh(dft, WeightingInputs(valid, policy_head_ce=ce))
    expected = torch.where(valid, torch.exp(-ce), torch.zeros_like(ce))
    torch.testing.assert_close(w, expected)
    assert w[0, 0, 0] == 1.0 and w[0, 2, 0] == 0.0 and 0 < w[0, 1, 1] < 1e-12


def test_rho1_config_rejects_bad_values_naming_the_key():
    with pytest.raises(
        ValueError, match=r"weighting.rho1.select_ratio=0 is invalid: must be in \(0, 1\]"
    ):
        Rho1Config(select_ratio=0)
    with pytest.raises(ValueError, match="weighting.rho1.mode='hard' is invalid"):
        Rho1Config(mode="hard")
    with pytest.raises(
        ValueError, match=r"weighting.temperature=0.0005 is invalid: must be >= 0.001"
    ):
        NormalizeConfig(temperature=5e-4)


@pytest.mark.parametrize("temperature", [1e-308, 1e-16])
def test_a_degenerate_normalisation_is_caught_by_the_step_check(temperature):
    cfg = NormalizeConfig()
    object.__setattr__(cfg, "temperature", temperature)  # past the recipe check, as a library user
    valid = torch.ones(64, 1, dtype=torch.bool)
    weights = normalize_per_head(torch.randn(64, 1), valid, cfg)
    error = float(mean_error(weights, valid, cfg))
    with pytest.raises(WeightingError, match="token weights have mean off 1.0"):
        check_mean_error(error, cfg)


def test_mean_error_is_small_for_healthy_weights_and_flags_each_broken_invariant():
    cfg = NormalizeConfig(min_weight=0.1, max_weight=30.0)
    valid = torch.ones(4, 8, 2, dtype=torch.bool)
    valid[0, :, 1] = False
    weights = normalize_per_head(
        torch.randn(4, 8, 2, generator=torch.Generator().manual_seed(0)), valid, cfg
    )
    assert float(mean_error(weights, valid, cfg)) < 1e-6
    check_mean_error(float(mean_error(weights, valid, cfg)), cfg)
    shifted = weights.clone()
    shifted[..., 1] *= 1.01  # head 1's mean moves to 1.01
    assert float(mean_error(shifted, valid, cfg)) == pytest.approx(0.01, rel=1e-3)
    for broken in (math.nan, 50.0, 0.01):  # non-finite, above max_weight, below min_weight
        bad = weights.clone()
        bad[1, 1, 0] = broken
        assert float(mean_error(bad, valid, cfg)) == math.inf, broken


def test_weight_stats_report_the_share_above_one_and_at_each_bound():
    w = torch.tensor([0.05, 0.05, 1.0, 2.0, 3.0])
    stats = weight_stats(w, torch.ones(5, dtype=torch.bool), min_weight=0.05, max_weight=3.0)
    assert stats["above_one_fraction"] == pytest.approx(0.4)
    assert stats["at_min_fraction"] == pytest.approx(0.4)
    assert stats["at_max_fraction"] == pytest.approx(0.2)
    assert stats["clipped_fraction"] == pytest.approx(0.6)
