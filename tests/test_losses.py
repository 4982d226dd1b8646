"""GRPO objective pieces against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from vigorl_cli.train.losses import (aggregate, group_advantages, informative_groups, kl_estimate,
                                     kl_penalised_rewards, policy_loss)


def test_group_advantages_normalise_by_unbiased_std():
    # group 0: rewards [1, 0, 0, 1] → mean 0.5, unbiased std sqrt(((.5²)*4)/3) = sqrt(1/3) = 0.57735
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.2])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    a = group_advantages(r, g)
    s = math.sqrt(1 / 3)
    assert torch.allclose(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6), atol=1e-6)
    assert torch.equal(a[4:], torch.zeros(2))  # equal rewards → no signal
    # Dr. GRPO: no std
    assert torch.allclose(group_advantages(r, g, norm="none")[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_informative_groups_drop_all_equal_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0])
    g = torch.tensor([0, 0, 1, 1])
    assert informative_groups(r, g).tolist() == [False, False, True, True]


def test_kl_estimators_match_their_formulas():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    k = ref - logp  # [-0.5, 1.0]
    assert torch.allclose(kl_estimate(logp, ref, "k1"), -k)
    assert torch.allclose(kl_estimate(logp, ref, "k2"), 0.5 * k ** 2)
    # k3: exp(-0.5) + 0.5 - 1 = 0.10653; exp(1) - 1 - 1 = 0.71828
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.tensor([[0.10653066, 0.71828183]]), atol=1e-6)
    big = kl_estimate(torch.tensor([[-30.0]]), torch.tensor([[0.0]]), "k3")
    assert float(big) == 10.0  # clamped


def test_aggregation_modes():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert float(aggregate(v, m, "token_mean")) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert float(aggregate(v, m, "seq_mean_token_mean")) == pytest.approx((2 + 4) / 2)
    assert float(aggregate(v, m, "seq_mean_token_sum")) == pytest.approx((6 + 4) / 2)


def test_on_policy_loss_is_minus_mean_advantage_and_gradient_is_reinforce():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    out = policy_loss(logp, logp.detach(), torch.tensor([2.0]), torch.ones(1, 2))
    assert float(out.loss) == pytest.approx(-2.0)  # ratio 1 → −A
    out.loss.backward()
    # d/dlogp of −A·exp(logp−old)/2 tokens at ratio 1 = −A/2
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0]]))
    assert out.clip_frac == 0.0


def test_positive_advantage_clipped_at_one_plus_clip_high():
    # ratio e^{0.5} = 1.6487 > 1.28 → clipped branch: loss = −A·1.28, zero gradient
    old = torch.tensor([[0.0]])
    logp = torch.tensor([[0.5]], requires_grad=True)
    out = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.28)
    assert float(out.loss) == pytest.approx(-1.28, abs=1e-6)
    out.loss.backward()
    assert float(logp.grad) == 0.0 and out.clip_frac_high == 1.0


def test_negative_advantage_clipped_below_and_dual_clip_bounds_the_loss():
    old = torch.tensor([[0.0, 0.0]])
    # token 0: ratio e^{-1} = 0.3679 < 0.8 with A = −1 → max(0.3679, 0.8) = 0.8 (clipped branch)
    # token 1: ratio e^{2} = 7.389 with A = −1 → PPO loss 7.389, dual clip caps it at 3.0
    logp = torch.tensor([[-1.0, 2.0]], requires_grad=True)
    out = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2), clip_dual=3.0)
    assert float(out.loss) == pytest.approx((0.8 + 3.0) / 2, abs=1e-5)
    assert out.dual_clip_frac == 0.5 and out.clip_frac_low == 0.5
    out.loss.backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))


def test_kl_term_added_with_its_coefficient():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    out = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 2), ref_logp=ref, kl_coef=0.01)
    expected_kl = (0.10653066 + 0.71828183) / 2
    assert float(out.kl) == pytest.approx(expected_kl, abs=1e-6)
    assert float(out.loss) == pytest.approx(0.01 * expected_kl, abs=1e-7)


def test_gspo_uses_the_sequence_geometric_mean_ratio():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[0.1, 0.3]], requires_grad=True)  # mean log-ratio 0.2 → s = e^{0.2} = 1.2214 (< 1.28)
    out = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), objective="gspo")
    assert float(out.loss) == pytest.approx(-math.exp(0.2), abs=1e-6)
    out.loss.backward()
    # straight-through: every token's gradient is −A·s/2
    assert torch.allclose(logp.grad, torch.full((1, 2), -math.exp(0.2) / 2), atol=1e-6)


def test_truncated_importance_weights_cap_engine_mismatch():
    logp = torch.zeros(1, 2)
    engine = torch.tensor([[-1.0, 0.0]])  # weights exp(0 - (-1)) = e = 2.718 → capped at 2.0; and 1.0
    out = policy_loss(logp, logp, torch.tensor([1.0]), torch.ones(1, 2), engine_logp=engine, tis_cap=2.0)
    assert float(out.loss) == pytest.approx(-(2.0 + 1.0) / 2)


def test_masked_tokens_do_not_count():
    logp = torch.tensor([[0.0, 5.0]], requires_grad=True)
    out = policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[1, 0]]))
    assert float(out.loss) == pytest.approx(-1.0)
    out.loss.backward()
    assert float(logp.grad[0, 1]) == 0.0


def test_kl_in_reward_subtracts_per_token_penalty():
    r = torch.tensor([[0.0, 1.0]])
    out = kl_penalised_rewards(r, torch.tensor([[-1.0, -1.0]]), torch.tensor([[-2.0, -1.0]]), torch.ones(1, 2), 0.1)
    assert torch.allclose(out, torch.tensor([[-0.1, 1.0]]))
