"""Property tests: each identity of the derivation (shared/seeds 000, 004) is one test.

Run: python -m pytest -q test_ppo_rlhf.py      (CI=true selects the derandomized profile)
"""

import inspect
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ppo_rlhf as P

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=100,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

HERE = Path(__file__).resolve().parent
DTYPES = [torch.float32, torch.float64]
MASK_DTYPES = [torch.bool, torch.int64, torch.float32]


# ------------------------------------------------------------------------------------------------
# Strategies and plain-Python oracles
# ------------------------------------------------------------------------------------------------

finite = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False, width=32)
unit = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def rollouts(draw, max_batch=4, max_len=7):
    """values, rewards, extra [B, T] as nested lists; ragged row lengths >= 1; gamma, lam;
    the float dtype and the mask dtype."""
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(1, max_len))
    lengths = draw(st.lists(st.integers(1, length), min_size=batch, max_size=batch))
    grid = st.lists(st.lists(finite, min_size=length, max_size=length), min_size=batch,
                    max_size=batch)
    return dict(values=draw(grid), rewards=draw(grid), extra=draw(grid), lengths=lengths,
                gamma=draw(unit),
                lam=draw(unit), dtype=draw(st.sampled_from(DTYPES)),
                mask_dtype=draw(st.sampled_from(MASK_DTYPES)))


def mask_from(lengths, length, dtype=torch.bool):
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)


def tensors(r):
    length = len(r["values"][0])
    values = torch.tensor(r["values"], dtype=r["dtype"])
    rewards = torch.tensor(r["rewards"], dtype=r["dtype"])
    return values, rewards, mask_from(r["lengths"], length, r["mask_dtype"])


def tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-9)


def gae_loop_oracle(values, rewards, lengths, gamma, lam):
    """004's backward recursion, one row at a time, in plain Python on each row's real steps."""
    out = []
    for v, r, n in zip(values, rewards, lengths):
        adv = [0.0] * len(v)
        lastgaelam = 0.0
        for t in reversed(range(n)):
            next_value = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_value - v[t]
            lastgaelam = delta + gamma * lam * lastgaelam
            adv[t] = lastgaelam
        out.append(adv)
    return out


def td_errors(v, r, n, gamma):
    """delta_t = r_t + gamma V_{t+1} - V_t on a row's n real steps, V after the end = 0."""
    return [r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] for t in range(n)]


def n_step_advantage(v, r, n, gamma, t, k):
    """000's A^k(s_t) = r_t + ... + gamma^{k-1} r_{t+k-1} + gamma^k V_{t+k} - V_t."""
    bootstrap = v[t + k] if t + k < n else 0.0
    return sum(gamma ** j * r[t + j] for j in range(k)) + gamma ** k * bootstrap - v[t]


# ------------------------------------------------------------------------------------------------
# GAE (000 "GAE", 004 get_advantages_and_returns)
# ------------------------------------------------------------------------------------------------

@given(rollouts())
def test_gae_equals_plain_loop_oracle(r):
    """The implementation equals 004's recursion A_t = delta_t + gamma*lam*A_{t+1}, looped."""
    values, rewards, mask = tensors(r)
    advantages, _ = P.get_advantages_and_returns(values, rewards, mask, r["gamma"], r["lam"])
    expected = gae_loop_oracle(r["values"], r["rewards"], r["lengths"], r["gamma"], r["lam"])
    torch.testing.assert_close(advantages, torch.tensor(expected, dtype=r["dtype"]),
                               **tol(r["dtype"]))


@given(rollouts())
def test_gae_recursion_equals_closed_form(r):
    """000: A_t^GAE = sum_l (gamma*lam)^l delta_{t+l}."""
    values, rewards, mask = tensors(r)
    advantages, _ = P.get_advantages_and_returns(values, rewards, mask, r["gamma"], r["lam"])
    for b, n in enumerate(r["lengths"]):
        delta = td_errors(r["values"][b], r["rewards"][b], n, r["gamma"])
        for t in range(n):
            closed = sum((r["gamma"] * r["lam"]) ** l * delta[t + l] for l in range(n - t))
            assert math.isclose(advantages[b, t].item(), closed, rel_tol=1e-4, abs_tol=1e-4)


@given(rollouts())
def test_gae_lambda0_is_td_error(r):
    """lam = 0: A_t = delta_t = r_t + gamma V_{t+1} - V_t (one-step TD, 004 QA 7)."""
    values, rewards, mask = tensors(r)
    advantages, _ = P.get_advantages_and_returns(values, rewards, mask, r["gamma"], lam=0.0)
    for b, n in enumerate(r["lengths"]):
        delta = td_errors(r["values"][b], r["rewards"][b], n, r["gamma"])
        torch.testing.assert_close(advantages[b, :n], torch.tensor(delta, dtype=r["dtype"]),
                                   **tol(r["dtype"]))


@given(rollouts())
def test_gae_lambda1_is_discounted_return_minus_value(r):
    """lam = 1: A_t = sum_l gamma^l r_{t+l} - V_t, the Monte-Carlo reward-to-go minus baseline
    (000's R_t^n - B(s_t))."""
    values, rewards, mask = tensors(r)
    advantages, _ = P.get_advantages_and_returns(values, rewards, mask, r["gamma"], lam=1.0)
    for b, n in enumerate(r["lengths"]):
        v, rw = r["values"][b], r["rewards"][b]
        for t in range(n):
            reward_to_go = sum(r["gamma"] ** l * rw[t + l] for l in range(n - t))
            assert math.isclose(advantages[b, t].item(), reward_to_go - v[t], rel_tol=1e-4,
                                abs_tol=1e-4)


@given(rollouts())
@example(dict(values=[[0.5, 0.5, 0.0]], rewards=[[0.0, 1.0, 0.0]], extra=[[0.0, 0.0, 0.0]],
              lengths=[2], gamma=1.0, lam=0.5, dtype=torch.float64, mask_dtype=torch.bool))
def test_gae_is_lambda_mixture_of_n_step_advantages(r):
    """000: A^GAE = (1-lam)(A^1 + lam A^2 + lam^2 A^3 + ...). On a finite horizon of L steps
    the weights of A^L, A^{L+1}, ... (all equal to A^L) sum to lam^{L-1}."""
    values, rewards, mask = tensors(r)
    gamma, lam = r["gamma"], r["lam"]
    advantages, _ = P.get_advantages_and_returns(values, rewards, mask, gamma, lam)
    for b, n in enumerate(r["lengths"]):
        v, rw = r["values"][b], r["rewards"][b]
        for t in range(n):
            horizon = n - t
            mixture = sum((1 - lam) * lam ** (k - 1) * n_step_advantage(v, rw, n, gamma, t, k)
                          for k in range(1, horizon))
            mixture += lam ** (horizon - 1) * n_step_advantage(v, rw, n, gamma, t, horizon)
            assert math.isclose(advantages[b, t].item(), mixture, rel_tol=1e-4, abs_tol=1e-4)


def test_gae_docstring_worked_example():
    """The worked example in get_advantages_and_returns' docstring, number for number."""
    values = torch.tensor([[0.5, 0.5, 123.0]])
    rewards = torch.tensor([[0.0, 1.0, -7.0]])
    advantages, returns = P.get_advantages_and_returns(values, rewards,
                                                       torch.tensor([[1, 1, 0]]), 1.0, 0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.25, 0.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.75, 1.0, 0.0]]))


@given(rollouts())
def test_returns_equal_advantages_plus_values(r):
    """004: returns_t = A_t + V_t on real tokens (0 on padding)."""
    values, rewards, mask = tensors(r)
    advantages, returns = P.get_advantages_and_returns(values, rewards, mask, r["gamma"],
                                                       r["lam"])
    real = mask.bool()
    torch.testing.assert_close(returns[real], (advantages + values)[real], **tol(r["dtype"]))
    assert (returns[~real] == 0).all()


@given(rollouts(), st.sampled_from([float("nan"), float("inf"), -1e30, 7.0]))
def test_gae_padding_invariance(r, junk):
    """Anything in padded positions changes nothing on real ones, and padding comes out 0."""
    values, rewards, mask = tensors(r)
    real = mask.bool()
    clean = P.get_advantages_and_returns(values, rewards, mask, r["gamma"], r["lam"])
    dirty = P.get_advantages_and_returns(values.masked_fill(~real, junk),
                                         rewards.masked_fill(~real, junk), mask, r["gamma"],
                                         r["lam"])
    for a, b in zip(clean, dirty):
        torch.testing.assert_close(a, b)
        assert (b[~real] == 0).all()


@given(rollouts(max_batch=4))
def test_gae_rows_are_independent(r):
    """Each row's advantages depend on that row alone: computed alone, they are the same."""
    values, rewards, mask = tensors(r)
    together, _ = P.get_advantages_and_returns(values, rewards, mask, r["gamma"], r["lam"])
    for b in range(values.shape[0]):
        alone, _ = P.get_advantages_and_returns(values[b:b + 1], rewards[b:b + 1],
                                                mask[b:b + 1], r["gamma"], r["lam"])
        torch.testing.assert_close(together[b:b + 1], alone, **tol(r["dtype"]))


def test_gae_carries_no_gradient():
    """Advantages and returns are targets: no graph back to the critic's values."""
    values = torch.randn(2, 3, requires_grad=True)
    advantages, returns = P.get_advantages_and_returns(values, torch.randn(2, 3),
                                                       torch.ones(2, 3))
    assert not advantages.requires_grad and not returns.requires_grad


# ------------------------------------------------------------------------------------------------
# PPO-clip (004 §4.1(5)-(6), figure 10)
# ------------------------------------------------------------------------------------------------

EPS = st.floats(0.05, 0.5)
# where the ratio sits relative to the clip range, as a fraction of the distance to the bound
CASES = [(+1, "below"), (+1, "inside"), (+1, "above"), (-1, "below"), (-1, "inside"),
         (-1, "above")]


def ratio_in(region, eps, u):
    """A ratio strictly inside `region` of [1-eps, 1+eps], u in (0, 1) picks where."""
    if region == "below":
        return (1 - eps) * (0.2 + 0.7 * u)
    if region == "inside":
        return 1 - eps + 2 * eps * (0.1 + 0.8 * u)
    return (1 + eps) * (1.1 + u)


@pytest.mark.parametrize("sign,region", CASES)
@given(eps=EPS, u=st.floats(0.0, 1.0), magnitude=st.floats(0.1, 5.0))
def test_clip_gradient_in_each_of_the_six_cases(sign, region, eps, u, magnitude):
    """004 figure 10: the gradient is exactly 0 where clipping binds (A > 0 above 1+eps,
    A < 0 below 1-eps) and the unclipped gradient d(-A rho)/d log pi = -A rho elsewhere."""
    advantage = sign * magnitude
    ratio = ratio_in(region, eps, u)
    log_probs = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    loss = P.actor_loss_fn(log_probs, torch.zeros(1, 1, dtype=torch.float64),
                           torch.tensor([[advantage]], dtype=torch.float64),
                           torch.ones(1, 1), cliprange=eps)
    loss.backward()
    binds = (sign > 0 and region == "above") or (sign < 0 and region == "below")
    expected = 0.0 if binds else -advantage * ratio
    assert log_probs.grad.item() == pytest.approx(expected, abs=1e-12, rel=1e-9)


@given(rollouts(), EPS)
def test_clip_at_ratio_one_is_vanilla_policy_gradient(r, eps):
    """rho = 1 (first minibatch): loss = -mean(A) over real tokens, and its gradient equals
    that of 000's vanilla loss -1/N sum A_t log pi(a_t|s_t)."""
    advantages, log_probs_data, mask = tensors(r)
    log_probs = log_probs_data.clone().requires_grad_(True)
    loss = P.actor_loss_fn(log_probs, log_probs_data, advantages, mask, cliprange=eps)
    real = mask.bool()
    n = real.sum()
    assert loss.item() == pytest.approx(-(advantages[real].sum() / n).item(), abs=1e-5)
    loss.backward()
    vanilla = log_probs_data.clone().requires_grad_(True)
    (-(advantages * vanilla)[real].sum() / n).backward()
    torch.testing.assert_close(log_probs.grad, vanilla.grad, **tol(r["dtype"]))


@given(rollouts(), EPS)
def test_clipped_objective_never_exceeds_unclipped(r, eps):
    """min(A rho, A clip(rho)) <= A rho: the clipped surrogate is a lower bound (PPO paper)."""
    advantages, log_probs, mask = tensors(r)
    old = torch.tensor(r["extra"], dtype=r["dtype"])
    clipped_objective = -P.actor_loss_fn(log_probs, old, advantages, mask, cliprange=eps)
    ratio = torch.exp(log_probs - old)
    unclipped_objective = P.masked_mean(advantages * ratio, mask)
    assert clipped_objective.item() <= unclipped_objective.item() + 1e-5


@given(rollouts())
def test_actor_loss_is_004_formula_token_mean(r):
    """The literal 004 code: sum(max(-A rho, -A clip(rho)) * mask) / mask.sum()."""
    advantages, log_probs, mask = tensors(r)
    old = torch.tensor(r["extra"], dtype=r["dtype"])
    ratio = torch.exp(log_probs - old)
    m = mask.to(r["dtype"])
    expected = (torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2)) * m).sum() \
        / m.sum()
    torch.testing.assert_close(P.actor_loss_fn(log_probs, old, advantages, mask), expected,
                               **tol(r["dtype"]))


def test_losses_ignore_nonfinite_padding():
    """Padding holding -inf log-probs or NaN values must not turn a loss or gradient into NaN."""
    mask = torch.tensor([[1, 1, 0]])
    log_probs = torch.tensor([[-1.0, -2.0, -float("inf")]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.9, float("nan")]])
    adv = torch.tensor([[0.5, -0.3, float("nan")]])
    loss = P.actor_loss_fn(log_probs, old, adv, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_probs.grad).all()
    values = torch.tensor([[0.1, 0.2, float("inf")]], requires_grad=True)
    vf = P.critic_loss_fn(values, torch.tensor([[0.0, 0.0, float("nan")]]),
                          torch.tensor([[1.0, 1.0, float("inf")]]), mask)
    vf.backward()
    assert torch.isfinite(vf) and torch.isfinite(values.grad).all()


# ------------------------------------------------------------------------------------------------
# KL-shaped rewards (004 §4.1(3) compute_rewards)
# ------------------------------------------------------------------------------------------------

@st.composite
def reward_inputs(draw):
    r = draw(rollouts())
    scores = draw(st.lists(st.floats(-20, 20), min_size=len(r["lengths"]),
                           max_size=len(r["lengths"])))
    return r, scores, draw(st.floats(0.0, 1.0)), draw(st.floats(0.1, 10.0))


@given(reward_inputs())
@example((dict(values=[[-1.0, -2.0]], rewards=[[-1.5, -1.0]], extra=[[0.0, 0.0]], lengths=[1],
               gamma=1.0, lam=1.0, dtype=torch.float32, mask_dtype=torch.float32), [9.0], 0.1,
           5.0))
def test_rewards_row_sum_is_clipped_score_minus_kl(inputs):
    """sum_t r_t = clip(score, +-c) - kl_ctl * sum_t (log pi - log pi_ref) over real tokens."""
    r, scores, kl_ctl, clip = inputs
    log_probs, ref_log_probs, mask = tensors(r)
    rewards = P.compute_rewards(log_probs, ref_log_probs, torch.tensor(scores), mask,
                                kl_ctl=kl_ctl, clip_reward_value=clip)
    real = mask.bool()
    for b in range(len(scores)):
        kl = (log_probs[b] - ref_log_probs[b])[real[b]].sum().item()
        expected = max(-clip, min(clip, scores[b])) - kl_ctl * kl
        assert rewards[b].sum().item() == pytest.approx(expected, abs=1e-3)


@given(reward_inputs())
def test_rewards_equal_policies_give_only_the_score_on_the_last_token(inputs):
    """pi = pi_ref: the KL terms vanish and the only nonzero reward is clip(score) at the end."""
    r, scores, kl_ctl, clip = inputs
    log_probs, _, mask = tensors(r)
    rewards = P.compute_rewards(log_probs, log_probs.clone(), torch.tensor(scores), mask,
                                kl_ctl=kl_ctl, clip_reward_value=clip)
    expected = torch.zeros_like(rewards)
    for b, n in enumerate(r["lengths"]):
        expected[b, n - 1] = max(-clip, min(clip, scores[b]))
    torch.testing.assert_close(rewards, expected)


@given(reward_inputs(), st.sampled_from(["k1", "k3"]))
def test_rewards_padding_is_exactly_zero(inputs, estimator):
    """Padding gets exactly 0 reward, whatever the log-probs hold there."""
    r, scores, kl_ctl, clip = inputs
    log_probs, ref_log_probs, mask = tensors(r)
    real = mask.bool()
    rewards = P.compute_rewards(log_probs.masked_fill(~real, -float("inf")),
                                ref_log_probs.masked_fill(~real, float("nan")),
                                torch.tensor(scores), mask, kl_ctl=kl_ctl,
                                clip_reward_value=clip, kl_estimator=estimator)
    assert (rewards[~real] == 0).all() and torch.isfinite(rewards).all()


@given(st.lists(st.integers(1, 9), min_size=1, max_size=6), st.integers(0, 3))
def test_rewards_score_lands_on_last_real_token(lengths, extra):
    """The score is added at index length-1 of each row, for any ragged mask."""
    length = max(lengths) + extra
    mask = mask_from(lengths, length)
    zeros = torch.zeros(len(lengths), length)
    scores = torch.arange(1, len(lengths) + 1, dtype=torch.float32)
    rewards = P.compute_rewards(zeros, zeros, scores, mask, kl_ctl=0.1, clip_reward_value=100.0)
    for b, n in enumerate(lengths):
        assert rewards[b].nonzero().flatten().tolist() == [n - 1]
        assert rewards[b, n - 1].item() == scores[b].item()


def test_rewards_row_without_real_token_raises():
    """A response with no real token has nowhere to put its score: refuse, saying so."""
    mask = torch.tensor([[1, 1], [0, 0]])
    with pytest.raises(ValueError, match="no real token"):
        P.compute_rewards(torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2), mask)


@given(reward_inputs())
def test_rewards_k3_penalty_is_never_a_bonus(inputs):
    """With k3 >= 0, the KL part of every reward is <= 0: deviating is never paid for."""
    r, _, kl_ctl, _ = inputs
    log_probs, ref_log_probs, mask = tensors(r)
    zero = torch.zeros(len(r["lengths"]))
    rewards = P.compute_rewards(log_probs, ref_log_probs, zero, mask, kl_ctl=kl_ctl,
                                kl_estimator="k3")
    assert (rewards <= 1e-6).all()


# ------------------------------------------------------------------------------------------------
# Critic (004 §4.2 critic_loss_fn)
# ------------------------------------------------------------------------------------------------

@given(rollouts(), st.floats(0.05, 1.0), st.floats(-1.0, 1.0))
def test_critic_loss_is_half_mse_inside_clip_range(r, eps, u):
    """|V - V_old| <= eps everywhere: the clip is inactive and loss = 0.5 mean (V - R)^2."""
    old_values, returns, mask = tensors(r)
    values = old_values + u * eps
    loss = P.critic_loss_fn(values, old_values, returns, mask, cliprange_value=eps)
    expected = 0.5 * P.masked_mean((values - returns) ** 2, mask)
    torch.testing.assert_close(loss, expected, **tol(r["dtype"]))


@given(rollouts(), st.floats(0.05, 1.0))
def test_critic_gradient_is_zero_exactly_where_the_clipped_term_dominates(r, eps):
    """Per token: where (clip(V) - R)^2 > (V - R)^2 the max picks a constant and dV = 0;
    elsewhere dV = (V - R) / N."""
    old_values, returns, mask = tensors(r)
    values = (old_values + torch.tensor(r["extra"], dtype=r["dtype"])).requires_grad_(True)
    P.critic_loss_fn(values, old_values, returns, mask, cliprange_value=eps).backward()
    clipped = torch.clamp(values.detach(), old_values - eps, old_values + eps)
    clipped_dominates = (clipped - returns) ** 2 > (values.detach() - returns) ** 2
    real = mask.bool()
    expected = torch.where(real & ~clipped_dominates, (values.detach() - returns) / real.sum(),
                           0.0)
    torch.testing.assert_close(values.grad, expected, **tol(r["dtype"]))


# ------------------------------------------------------------------------------------------------
# KL estimators and controllers
# ------------------------------------------------------------------------------------------------

@st.composite
def categorical_pairs(draw):
    k = draw(st.integers(2, 6))
    weights = st.lists(st.floats(0.05, 1.0), min_size=k, max_size=k)
    p = torch.tensor(draw(weights), dtype=torch.float64)
    q = torch.tensor(draw(weights), dtype=torch.float64)
    return p / p.sum(), q / q.sum()


@given(categorical_pairs())
def test_kl_estimators_are_unbiased_by_exact_enumeration(pq):
    """E_{a~p}[k1] = E_{a~p}[k3] = KL(p||q), the expectation taken exactly over the support."""
    p, q = pq
    kl = torch.distributions.kl_divergence(torch.distributions.Categorical(probs=p),
                                           torch.distributions.Categorical(probs=q))
    log_p, log_q = p.log(), q.log()
    assert (p * P.kl_k1(log_p, log_q)).sum().item() == pytest.approx(kl.item(), abs=1e-12)
    assert (p * P.kl_k3(log_p, log_q)).sum().item() == pytest.approx(kl.item(), abs=1e-12)


@given(finite, finite)
def test_k3_is_nonnegative_per_sample(log_p, log_q):
    """k3 = (r - 1) - log r >= 0 for every r > 0 (since log r <= r - 1)."""
    assert P.kl_k3(torch.tensor(log_p), torch.tensor(log_q)).item() >= 0


@given(st.floats(1e-3, 10.0), st.floats(0.0, 50.0), st.floats(0.1, 20.0))
def test_adaptive_kl_coef_follows_ppo_penalty_rule(beta, kl, target):
    """004 §4.2: beta x2 if KL > 1.5 target, beta / 2 if KL < target / 1.5, else unchanged."""
    new = P.adaptive_kl_coef(beta, kl, target)
    if kl > 1.5 * target:
        assert new == 2 * beta
    elif kl < target / 1.5:
        assert new == beta / 2
    else:
        assert new == beta


@given(st.floats(1e-3, 10.0), st.floats(0.0, 50.0), st.floats(0.1, 20.0), st.integers(1, 512))
def test_proportional_kl_coef_moves_toward_target_with_bounded_error(beta, kl, target, n):
    """Ziegler: beta grows when KL > target, shrinks below, by at most 20% x n / horizon."""
    horizon = 10000
    new = P.proportional_kl_coef(beta, kl, target, n_steps=n, horizon=horizon)
    error = max(-0.2, min(0.2, kl / target - 1))
    assert new == pytest.approx(beta * (1 + error * n / horizon))
    assert (new >= beta) == (kl >= target) or new == pytest.approx(beta)


# ------------------------------------------------------------------------------------------------
# Helpers: masked statistics, log-probs, entropy
# ------------------------------------------------------------------------------------------------

@given(rollouts())
def test_masked_whiten_has_zero_mean_unit_variance_on_real_tokens(r):
    values, _, mask = tensors(r)
    real = mask.bool()
    if real.sum() < 2 or values[real].std() < 1e-2:
        return  # a constant sample has no scale to normalize
    white = P.masked_whiten(values, mask)
    assert abs(white[real].mean().item()) < 1e-4
    assert white[real].var(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    assert (white[~real] == 0).all()
    kept = P.masked_whiten(values, mask, shift_mean=False)
    assert kept[real].mean().item() == pytest.approx(values[real].mean().item(), abs=1e-4)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(2, 9), st.integers(0, 2 ** 16))
def test_logprobs_and_entropy_match_log_softmax(batch, length, vocab, seed):
    """gather - logsumexp = log_softmax.gather; chunked entropy = Categorical entropy."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * 3
    tokens = torch.randint(vocab, (batch, length), generator=g)
    expected = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(P.logprobs_from_logits(logits, tokens), expected)
    entropy = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(P.entropy_from_logits(logits, chunk_rows=2), entropy)


# ------------------------------------------------------------------------------------------------
# The four functions stand alone: pasted into a file with only `import torch`, they work.
# ------------------------------------------------------------------------------------------------

FOUR = ["compute_rewards", "get_advantages_and_returns", "actor_loss_fn", "critic_loss_fn"]


def test_the_four_functions_work_pasted_alone(tmp_path):
    source = "import torch\n\n" + "\n\n".join(inspect.getsource(getattr(P, name))
                                              for name in FOUR)
    script = tmp_path / "pasted.py"
    script.write_text(source + textwrap.dedent("""

        mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
        lp, ref = torch.randn(2, 3), torch.randn(2, 3)
        rewards = compute_rewards(lp, ref, torch.tensor([1.0, -2.0]), mask)
        values = torch.randn(2, 3)
        adv, ret = get_advantages_and_returns(values, rewards, mask)
        pg = actor_loss_fn(lp + 0.1, lp, adv, mask)
        vf = critic_loss_fn(values + 0.1, values, ret, mask)
        print(rewards.sum().item(), adv.sum().item(), pg.item(), vf.item())
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert all(math.isfinite(float(x)) for x in out.stdout.split())
