"""Property tests: each identity of the derivation (articles 000 and 004, quoted in the
README) is one test.

Run: python -m pytest -q test_ppo_rlhf.py      (CI=true selects the derandomized profile)
"""

import inspect
import dataclasses
import itertools
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st

import ppo_rlhf as P

# before anything imports huggingface_hub or datasets, which read it once, at import
os.environ["HF_HUB_OFFLINE"] = "1"

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=100,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = "ci" if os.environ.get("CI") else "dev"
settings.load_profile(PROFILE)
# the same search without shrinking, for property tests run where they must fail and the
# smallest failing example is not wanted (test_the_property_tests_catch_a_wrong_implementation)
settings.register_profile("no_shrink", settings.get_profile(PROFILE),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          report_multiple_bugs=False)

HERE = Path(__file__).resolve().parent
DTYPES = [torch.float32, torch.float64]
MASK_DTYPES = [torch.bool, torch.int64, torch.float32]


# ------------------------------------------------------------------------------------------------
# Shared helpers: tiny models saved to disk (loaded through the real from_pretrained path), a
# fast configuration, one rollout helper, and one command-line runner (one process or torchrun)
# ------------------------------------------------------------------------------------------------

NO_HUB = {"HF_HUB_OFFLINE": "1"}  # nothing in the tests may reach for a download
TIMING_KEYS = ("time/", "throughput/")
REQUIRED_METRICS = ["step", "objective/scores", "objective/kl", "objective/kl_coef",
                    "objective/rlhf_reward", "loss/policy", "loss/value", "policy/clipfrac",
                    "policy/approxkl", "policy/entropy", "val/clipfrac", "val/explained_variance",
                    "response/length", "time/rollout_s", "time/update_s",
                    "throughput/tokens_per_s"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in NO_HUB.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """A tiny causal LM, a 1-label and a 2-label sequence classifier, each with its tokenizer,
    saved with save_pretrained as a user's local models would be."""
    from transformers import GPT2ForSequenceClassification
    root = tmp_path_factory.mktemp("models")
    policy, tokenizer = P.build_tiny_model(seed=0)
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    for labels, name in [(1, "reward"), (2, "sentiment")]:
        config = policy.config.__class__.from_dict(policy.config.to_dict())
        config.num_labels = labels
        if labels == 2:
            config.id2label, config.label2id = {0: "NEG", 1: "POS"}, {"NEG": 0, "POS": 1}
        torch.manual_seed(labels)
        GPT2ForSequenceClassification(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {name: str(root / name) for name in ["policy", "reward", "sentiment"]}


def tiny_config(tmp_path, **overrides) -> "P.Config":
    """A fast configuration: ~0.1 s per iteration on 2 cores."""
    options = dict(output_dir=str(tmp_path / "run"), steps=3, batch_size=8, mini_batch_size=4,
                   ppo_epochs=2, max_new_tokens=8, samples=0)
    options.update(overrides)
    return P.Config(**options)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / P.METRICS).read_text().splitlines()]


def without_timing(rows):
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)} for row in rows]


def make_models(tiny_dirs, device="cpu"):
    """actor, critic, reference, score_fn (the tiny reward model) and tokenizer on `device`."""
    cfg = P.Config(model=tiny_dirs["policy"], reward_model=tiny_dirs["reward"], device=device)
    actor, ref_model, critic, tokenizer, score_fn = P.load_models(cfg, torch.device(device))
    return actor, critic, ref_model, score_fn, tokenizer


RAGGED_PROMPTS = ["a", "the cat sat on the mat", "hello there", "we went", "x", "my dream is to",
                  "on a rainy day we stayed in", "ok"]


def rollout(actor, critic, ref_model, scorer, tokenizer, prompts=RAGGED_PROMPTS,
            max_new_tokens=12, kl_ctl=None, autocast=P.nullcontext, **hyperparameters):
    """generate_experience on `prompts`, with PPOConfig(**hyperparameters)."""
    device = next(actor.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
    hp = P.PPOConfig(max_new_tokens=max_new_tokens, **hyperparameters)
    return P.generate_experience(actor, critic, ref_model, scorer, tokenizer, encoded.input_ids,
                                 encoded.attention_mask, hp, kl_ctl=kl_ctl, autocast=autocast,
                                 eos_token_ids=[tokenizer.eos_token_id])


def run_cli(args, cwd, timeout=300, ranks=1):
    """`python ppo_rlhf.py args` in a subprocess, or with `ranks` > 1 `torchrun args` (args[0]
    a script or ppo_rlhf.py), offline; returns the CompletedProcess."""
    if ranks == 1:
        command = [sys.executable, str(HERE / "ppo_rlhf.py"), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={ranks}", *args]
    env = {**os.environ, **NO_HUB, **({"OMP_NUM_THREADS": "1"} if ranks > 1 else {})}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def final_weights(run_dir):
    from safetensors.torch import load_file
    return load_file(str(Path(run_dir) / P.POLICY / "model.safetensors"))


def dataclass_replace(cfg, **changes):
    return P.dataclasses.replace(cfg, **changes)


def start_cli(args, cwd):
    """The command line in a subprocess, not waited for."""
    return subprocess.Popen([sys.executable, str(HERE / "ppo_rlhf.py"), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **NO_HUB})


def wait_for_rows(metrics, n, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and (not metrics.exists() or
                                      len(metrics.read_text().splitlines()) < n):
        time.sleep(0.1)


def torchrun(args, cwd, timeout=300):
    """The command line (or a script: args[0]) under torchrun, 2 ranks, gloo."""
    return run_cli(args, cwd, timeout, ranks=2)


def torchrun_worker(worker, cwd, **kwargs):
    """`worker(**kwargs)`, a function of this file, on each of 2 ranks under torchrun: this
    file run as a script joins the process group (gloo), calls it, and leaves as main() does."""
    return torchrun([str(HERE / "test_ppo_rlhf.py"), worker.__name__, json.dumps(kwargs)], cwd)


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


AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def aggregate_oracle(rows: list[list], mode: str, scale: float):
    """rows: each answer's per-token losses (tensors or floats); `scale`: Dr. GRPO's L."""
    if mode == "token-mean":
        return sum(x for row in rows for x in row) / sum(map(len, rows))
    divisor = {"seq-mean-token-mean": None, "seq-mean-token-sum": 1.0,
               "seq-mean-token-sum-norm": scale}[mode]
    return sum(sum(row) / (divisor or len(row)) for row in rows) / len(rows)


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


DUAL_CLIP = st.floats(1.5, 5.0)


def dual_clip_loop_oracle(log_probs, old, advantages, lengths, eps, c):
    """Dual-clip PPO (Ye et al. 2020) token by token, plain Python: 004's max(-A rho,
    -A clip(rho)), capped at -c A where A < 0, averaged over the real tokens."""
    total, n = 0.0, 0
    for b, length in enumerate(lengths):
        for t in range(length):
            ratio, a = math.exp(log_probs[b][t] - old[b][t]), advantages[b][t]
            loss = max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps))
            total, n = total + (min(loss, -c * a) if a < 0 else loss), n + 1
    return total / n


@given(rollouts(), EPS, DUAL_CLIP)
def test_dual_clip_equals_plain_loop_oracle(r, eps, c):
    advantages, log_probs, mask = tensors(r)
    old = torch.tensor(r["extra"], dtype=r["dtype"])
    expected = dual_clip_loop_oracle(log_probs.tolist(), old.tolist(), advantages.tolist(),
                                     r["lengths"], eps, c)
    loss = P.actor_loss_fn(log_probs, old, advantages, mask, cliprange=eps, dual_clip=c)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


@given(eps=EPS, c=DUAL_CLIP, over=st.floats(1.01, 3.0), magnitude=st.floats(0.1, 5.0))
def test_dual_clip_gives_no_gradient_to_a_negative_advantage_past_c(eps, c, over, magnitude):
    """A < 0 and rho > c: the loss is the constant -c A and the token's gradient exactly 0,
    where PPO-clip alone would push with -A rho."""
    ratio = c * over
    log_probs = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    args = (torch.zeros(1, 1, dtype=torch.float64),
            torch.tensor([[-magnitude]], dtype=torch.float64), torch.ones(1, 1))
    loss = P.actor_loss_fn(log_probs, *args, cliprange=eps, dual_clip=c)
    loss.backward()
    assert loss.item() == pytest.approx(c * magnitude) and log_probs.grad.item() == 0.0
    plain = P.actor_loss_fn(log_probs, *args, cliprange=eps)
    assert torch.autograd.grad(plain, log_probs)[0].item() == pytest.approx(magnitude * ratio)


@given(rollouts(), EPS)
def test_dual_clip_with_c_to_infinity_is_ppo_clip(r, eps):
    advantages, log_probs, mask = tensors(r)
    old = torch.tensor(r["extra"], dtype=r["dtype"])
    assert torch.equal(P.actor_loss_fn(log_probs, old, advantages, mask, cliprange=eps,
                                       dual_clip=1e30),
                       P.actor_loss_fn(log_probs, old, advantages, mask, cliprange=eps))

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
@example(r={"values": [[0.0]], "rewards": [[0.5]], "extra": [[0.95]], "lengths": [1],
            "gamma": 0.0, "lam": 0.0, "dtype": torch.float32, "mask_dtype": torch.bool},
         eps=0.05)  # a tie: (0.05 - 0.5)^2 == (0.95 - 0.5)^2, V outside the clip range
@example(r={"values": [[0.0]], "rewards": [[0.0]], "extra": [[1.0]], "lengths": [1],
            "gamma": 0.0, "lam": 0.0, "dtype": torch.float32, "mask_dtype": torch.bool},
         eps=1.0)  # a tie on the clip range's bound
def test_critic_gradient_is_zero_exactly_where_the_clipped_term_dominates(r, eps):
    """Per token: where (clip(V) - R)^2 > (V - R)^2 the max picks a constant and dV = 0;
    where the unclipped term is larger dV = (V - R) / N. At a tie torch.max splits the
    gradient between its two arguments: half, plus the clipped term's half where V is inside
    [V_old - eps, V_old + eps] (bounds included: there clamp passes the gradient)."""
    old_values, returns, mask = tensors(r)
    values = (old_values + torch.tensor(r["extra"], dtype=r["dtype"])).requires_grad_(True)
    P.critic_loss_fn(values, old_values, returns, mask, cliprange_value=eps).backward()
    clipped = torch.clamp(values.detach(), old_values - eps, old_values + eps)
    clipped_loss, loss = (clipped - returns) ** 2, (values.detach() - returns) ** 2
    inside = (values.detach() >= old_values - eps) & (values.detach() <= old_values + eps)
    tie = 0.5 + 0.5 * inside.to(r["dtype"])
    share = torch.where(clipped_loss > loss, 0.0, torch.where(clipped_loss == loss, tie, 1.0))
    real = mask.bool()
    expected = torch.where(real, share * (values.detach() - returns) / real.sum(), 0.0)
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


@pytest.mark.slow
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


PART_ONE_SCRIPT = """
import ast, copy, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import part_one as P1

imported = set()
for node in ast.walk(ast.parse(open(P1.__file__).read())):
    if isinstance(node, ast.Import):
        imported |= {{alias.name.split(".")[0] for alias in node.names}}
    elif isinstance(node, ast.ImportFrom):
        imported.add(node.module.split(".")[0])
print("IMPORTS", sorted(imported - set(sys.stdlib_module_names)))

def vowels(prompts, responses):
    letters = [[c for c in r if "a" <= c <= "z"] for r in responses]
    return torch.tensor([sum(2.0 * (c in "aeiou") - 1 for c in row) / 2 for row in letters])

torch.manual_seed(0)
actor = AutoModelForCausalLM.from_pretrained({policy!r})
tokenizer = AutoTokenizer.from_pretrained({policy!r}, padding_side="left")
ref_model = copy.deepcopy(actor).requires_grad_(False)
critic = P1.ValueModel(copy.deepcopy(actor.transformer), actor.config.n_embd)
models = P1.Models(actor, critic, ref_model, vowels, tokenizer, [tokenizer.eos_token_id])
prompts = ["the sea", "a cat", "my dream", "we went", "hello", "the old house", "i think",
           "once upon"]
prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
hp = P1.PPOConfig(steps=25, batch_size=8, mini_batch_size=4, ppo_epochs=4, max_new_tokens=12)
optimizers = [torch.optim.AdamW(m.parameters(), lr=lr) for m, lr in ((actor, 1e-3),
                                                                     (critic, 5e-3))]
for row, exp, skipped in P1.ppo_iterations(models, *optimizers, prompts, prompt_ids, hp):
    print("SCORE", row["objective/scores"])
"""


@pytest.mark.slow
def test_part_one_runs_alone(tmp_path, tiny_dirs):
    """Part I, the source up to the `Part II` marker saved as a file by itself, imports only
    torch and transformers (and the standard library), and with it a tiny GPT-2 learns a
    rule-based reward: its loop, models and hyperparameters are all a reader needs."""
    source = (HERE / "ppo_rlhf.py").read_text()
    part_one = source[:source.index("\n# Part II")]
    assert len(part_one.splitlines()) < 1000
    (tmp_path / "part_one.py").write_text(part_one)
    script = tmp_path / "run_part_one.py"
    script.write_text(PART_ONE_SCRIPT.format(policy=tiny_dirs["policy"]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, env={**os.environ, **NO_HUB})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "IMPORTS ['torch', 'transformers']", lines[0]
    scores = [float(line.split()[1]) for line in lines if line.startswith("SCORE")]
    assert len(scores) == 25
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 1.0, scores

# Ten one-line slips in the four functions, each plausible when copying 004 (a dropped
# discount, an index off by one, the clip's min for max, ...), and the property tests above that
# must catch it: each is applied to the function's own source and the tests run against it.
WRONG_IMPLEMENTATIONS = {
    "gamma dropped from the recursion": (
        "get_advantages_and_returns", "lastgaelam = delta + gamma * lam * lastgaelam",
        "lastgaelam = delta + lam * lastgaelam", ["test_gae_equals_plain_loop_oracle"]),
    "V_t where V_{t+1} belongs": (
        "get_advantages_and_returns", "nextvalues = values[:, t + 1] if",
        "nextvalues = values[:, t] if", ["test_gae_lambda0_is_td_error"]),
    "no baseline in the TD error": (
        "get_advantages_and_returns", "delta = rewards[:, t] + gamma * nextvalues - values[:, t]",
        "delta = rewards[:, t] + gamma * nextvalues", ["test_gae_docstring_worked_example"]),
    "returns without the values": (
        "get_advantages_and_returns", "return advantages, advantages + values",
        "return advantages, advantages", ["test_returns_equal_advantages_plus_values"]),
    "KL penalty with the wrong sign": (
        "compute_rewards", "rewards = -kl_ctl * kl", "rewards = kl_ctl * kl",
        ["test_rewards_row_sum_is_clipped_score_minus_kl"]),
    "score one slot after the end (DeepSpeed-Chat's index)": (
        "compute_rewards", "last = (positions * mask).argmax(dim=1, keepdim=True)",
        "last = mask.sum(dim=1, keepdim=True).clamp(max=mask.shape[1] - 1)",
        ["test_rewards_score_lands_on_last_real_token"]),
    "score not clipped": (
        "compute_rewards", "score = torch.clamp(reward_score, -clip_reward_value, "
        "clip_reward_value)", "score = reward_score",
        ["test_rewards_equal_policies_give_only_the_score_on_the_last_token"]),
    "min where -min(...) needs max": (
        "actor_loss_fn", "pg_loss = torch.max(pg_loss1, pg_loss2)",
        "pg_loss = torch.min(pg_loss1, pg_loss2)", ["test_actor_loss_is_004_formula_token_mean"]),
    "mean over padding too": (
        "actor_loss_fn", "return per_token.sum() / mask.sum().clamp(min=1)",
        "return per_token.mean()", ["test_actor_loss_is_004_formula_token_mean"]),
    "each answer's mean over the padded length": (
        "actor_loss_fn", '"seq-mean-token-mean": mask.sum(-1).clamp(min=1)',
        '"seq-mean-token-mean": mask.shape[-1]', ["test_the_losses_aggregate_as_aggregate_loss"]),
    "RLOO's baseline counts the answer itself": (
        "rloo_advantages", "return (r - (r.sum(1, keepdim=True) - r) / (group_size - 1)).view(-1)",
        "return (r - r.mean(1, keepdim=True)).view(-1)",
        ["test_group_estimators_equal_plain_loop_oracles"]),
    "GRPO without its std": (
        "grpo_advantages", " / (r.std(1, keepdim=True) + eps)", "",
        ["test_grpo_is_unchanged_by_a_positive_affine_map_of_the_rewards"]),
    "value clip around the returns": (
        "critic_loss_fn", "values_clipped = torch.clamp(values, old_values - cliprange_value,"
        "\n                                 old_values + cliprange_value)",
        "values_clipped = torch.clamp(values, returns - cliprange_value,"
        "\n                                 returns + cliprange_value)",
        ["test_critic_gradient_is_zero_exactly_where_the_clipped_term_dominates"]),
}


@pytest.mark.parametrize("slip", list(WRONG_IMPLEMENTATIONS))
def test_the_property_tests_catch_a_wrong_implementation(slip, monkeypatch):
    """The README's claim, shown: the function with this one-line slip fails its tests."""
    name, right, wrong, catchers = WRONG_IMPLEMENTATIONS[slip]
    source = textwrap.dedent(inspect.getsource(getattr(P, name)))
    assert source.count(right) == 1, slip
    namespace = {"torch": torch}
    exec(source.replace(right, wrong), namespace)
    monkeypatch.setattr(P, name, namespace[name])
    for catcher in map(globals().get, catchers):
        if hasattr(catcher, "hypothesis"):  # a failure is expected: no time spent shrinking it
            monkeypatch.setattr(catcher, "_hypothesis_internal_use_settings",
                                settings.get_profile("no_shrink"))
        with pytest.raises(AssertionError):
            catcher()


# ------------------------------------------------------------------------------------------------
# End to end on tiny models saved to disk and loaded through the real from_pretrained path.
# ------------------------------------------------------------------------------------------------

def test_experience_shapes_and_masks(tiny_dirs):
    """[B, T] tensors; the mask covers each response through its first EOS and nothing after,
    with pad == eos; prompts are left-padded; lengths are ragged."""
    torch.manual_seed(3)
    models = make_models(tiny_dirs)
    tokenizer = models[-1]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    exp = rollout(*models)
    batch, length = exp.action_mask.shape
    assert batch == len(RAGGED_PROMPTS) and length <= 12
    for name in ["log_probs", "ref_log_probs", "values", "rewards", "advantages", "returns",
                 "entropy"]:
        assert getattr(exp, name).shape == (batch, length), name
    prompt_length = exp.input_ids.shape[1] - length
    assert (exp.attention_mask[:, :prompt_length].sum(1) > 0).all()
    assert (exp.attention_mask[:, 0] == 0).any()  # left padding is there
    responses = exp.input_ids[:, prompt_length:]
    eos = tokenizer.eos_token_id
    lengths = exp.action_mask.sum(1)
    for row, n in zip(range(batch), lengths.tolist()):
        assert exp.action_mask[row, :n].all() and not exp.action_mask[row, n:].any()
        tokens = responses[row].tolist()
        if eos in tokens:
            assert n == tokens.index(eos) + 1  # through the first EOS, included
        else:
            assert n == length  # cut at the limit: every token is real
    assert (lengths < length).any() and len(set(lengths.tolist())) > 1  # ragged, some ended
    assert torch.isfinite(exp.rewards).all() and (exp.rewards[~exp.action_mask] == 0).all()



def test_a_model_whose_pad_is_not_its_eos_rolls_out_and_trains(tmp_path):
    """pad != eos (Pythia, TRL's setups): prompts left-padded with pad, each response masked
    through its first EOS and padded with pad after it, the ratio 1 before any step, the score
    on the EOS; the command line trains such a model and saves it."""
    from transformers import GPT2Config, GPT2LMHeadModel
    tokenizer = P.build_tiny_tokenizer(separate_pad=True)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    assert pad != eos
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos,
                        pad_token_id=pad, **P.TINY_GPT2)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    cfg = P.Config(model=str(tmp_path / "policy"))
    actor, ref_model, critic, tokenizer, score_fn = P.load_models(cfg, torch.device("cpu"))
    torch.manual_seed(3)
    exp = rollout(actor, critic, ref_model, score_fn, tokenizer, max_new_tokens=16)
    length = exp.response_length
    prompt = exp.input_ids[:, :-length]
    assert (prompt[exp.attention_mask[:, :-length] == 0] == pad).all()
    assert (exp.attention_mask[:, 0] == 0).any()
    ended = 0
    score_slots = exp.rewards - P.compute_rewards(exp.log_probs, exp.ref_log_probs,
                                                  torch.zeros(len(exp.scores)), exp.action_mask)
    for b, (row, n) in enumerate(zip(exp.input_ids[:, -length:].tolist(),
                                     exp.action_mask.sum(1).tolist())):
        if eos in row:
            ended += 1
            assert n == row.index(eos) + 1 and set(row[n:]) <= {pad}
        else:
            assert n == length
        assert score_slots[b].nonzero().flatten().tolist() in ([n - 1], [])
    assert ended > 0
    stats, _ = P.ppo_update(actor, critic, torch.optim.SGD(actor.parameters(), lr=0.0),
                            torch.optim.SGD(critic.parameters(), lr=0.0), exp,
                            P.PPOConfig(ppo_epochs=1, mini_batch_size=8))
    assert stats["policy/first_ratio_error"].item() < 1e-4
    assert P.train(tiny_config(tmp_path, model=str(tmp_path / "policy"), steps=2)) == 0
    assert (tmp_path / "run" / P.POLICY / "model.safetensors").exists()

def test_first_minibatch_ratio_is_one(tiny_dirs):
    """The update's full forward reproduces the log-probs recorded while sampling to ~1e-5 on
    a ragged, left-padded batch (position_ids, temperature and no dropout all agree)."""
    torch.manual_seed(4)
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    exp = rollout(actor, critic, ref_model, scorer, tokenizer, temperature=0.7)
    mb = exp.select(torch.arange(4))
    log_probs, _ = P.policy_log_probs(actor, mb.input_ids, mb.attention_mask,
                                      exp.response_length, temperature=0.7)
    ratio = torch.exp(torch.where(mb.action_mask, log_probs - mb.log_probs, 0.0))
    assert (ratio - 1).abs().max().item() < 1e-5


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8)])
def test_log_probs_recorded_while_sampling_equal_a_full_forward(tiny_dirs, temperature, top_k,
                                                                top_p):
    """SampledLogProbs gives log pi(a_t|s_t) and entropy of softmax(logits / temperature), the
    policy itself: top-k / top-p shape what is sampled, not the recorded distribution."""
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    torch.manual_seed(5)
    recorded = rollout(actor, critic, ref_model, scorer, tokenizer, **kwargs)
    torch.manual_seed(5)
    recomputed = rollout(actor, critic, ref_model, scorer, tokenizer, recompute_log_probs=True,
                         **kwargs)
    assert torch.equal(recorded.input_ids, recomputed.input_ids)  # the same samples
    mask = recorded.action_mask
    for name in ("log_probs", "entropy"):
        difference = getattr(recorded, name) - getattr(recomputed, name)
        assert difference[mask].abs().max().item() < 1e-5, name


def test_rollout_micro_batches_give_the_same_experience(tiny_dirs):
    """Scoring forwards in micro-batches of 3 rows (3 + 3 + 2) change nothing but memory."""
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    experiences = []
    for micro_batch_size in (None, 3):
        torch.manual_seed(6)
        experiences.append(rollout(actor, critic, ref_model, scorer, tokenizer,
                                   recompute_log_probs=True,
                                   rollout_micro_batch_size=micro_batch_size))
    whole, split = experiences
    assert torch.equal(whole.input_ids, split.input_ids)
    for name in ("log_probs", "ref_log_probs", "values", "entropy", "scores", "advantages"):
        assert torch.allclose(getattr(whole, name), getattr(split, name), atol=1e-5), name


def test_update_trains_actor_and_critic_only(tiny_dirs):
    """After one PPO update: losses finite; actor and critic weights moved; reference and
    reward model untouched."""
    torch.manual_seed(5)
    actor, critic, ref_model, _, tokenizer = make_models(tiny_dirs)
    reward = P.RewardModelScorer(tiny_dirs["reward"], None, torch.device("cpu"))
    scorer, reward_model = P.checked_scores(reward, "reward model"), reward.model
    before = {name: [p.detach().clone() for p in m.parameters()]
              for name, m in [("actor", actor), ("critic", critic), ("ref", ref_model),
                              ("reward", reward_model)]}
    exp = rollout(actor, critic, ref_model, scorer, tokenizer)
    stats, skipped = P.ppo_update(actor, critic, torch.optim.AdamW(actor.parameters(), lr=1e-3),
                                  torch.optim.AdamW(critic.parameters(), lr=1e-3), exp,
                                  P.PPOConfig(ppo_epochs=2, mini_batch_size=4, micro_batch_size=2))
    assert not any(skipped)
    assert all(math.isfinite(v.item()) for v in stats.values())

    def moved(name, model):
        return any(not torch.equal(a, b) for a, b in zip(before[name], model.parameters()))
    assert moved("actor", actor) and moved("critic", critic)
    assert not moved("ref", ref_model) and not moved("reward", reward_model)


def sgd_updated_weights(actor, critic, exp, stats=None, **kwargs) -> torch.Tensor:
    """All weights of copies of actor and critic after one seeded SGD ppo_update (SGD: the
    update is the gradient itself, so equal gradients give equal weights); the update's
    metrics go to `stats`, if given."""
    torch.manual_seed(0)
    result, _ = P.ppo_update(actor, critic, torch.optim.SGD(actor.parameters(), lr=0.1),
                             torch.optim.SGD(critic.parameters(), lr=0.1), exp,
                             P.PPOConfig(ppo_epochs=1, **kwargs))
    if stats is not None:
        stats.update({k: v.item() for k, v in result.items()})
    return torch.cat([p.detach().flatten() for p in [*actor.parameters(),
                                                      *critic.parameters()]])


def test_gradient_accumulation_matches_whole_minibatch(tiny_dirs):
    """Micro-batches weighted by their share of tokens give the whole minibatch's gradient."""
    torch.manual_seed(6)
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    exp = rollout(actor, critic, ref_model, scorer, tokenizer)
    results = [sgd_updated_weights(P.copy.deepcopy(actor), P.copy.deepcopy(critic), exp,
                                   mini_batch_size=8, micro_batch_size=micro, max_grad_norm=1e9)
               for micro in (8, 3)]
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_update(tiny_dirs):
    """Recomputing activations in backward changes memory, not the gradient."""
    torch.manual_seed(11)
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    exp = rollout(actor, critic, ref_model, scorer, tokenizer)
    weights = []
    for checkpointing in (False, True):
        a, c = P.copy.deepcopy(actor), P.copy.deepcopy(critic)
        if checkpointing:
            P.enable_gradient_checkpointing(a, c)
            assert a.is_activation_checkpointing and c.backbone.is_activation_checkpointing
        weights.append(sgd_updated_weights(a, c, exp, mini_batch_size=8))
    torch.testing.assert_close(weights[0], weights[1], atol=1e-6, rtol=1e-5)


def test_single_token_and_cut_responses(tiny_dirs):
    """An immediate EOS gives a 1-token response whose score sits on that token; a response
    cut at max_new_tokens without EOS keeps every token real. Both train without NaN."""
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # make EOS almost certain: final hidden = e_0, logit(EOS) = 20
        actor.transformer.ln_f.weight.zero_()
        actor.transformer.ln_f.bias.zero_()
        actor.transformer.ln_f.bias[0] = 1.0
        actor.lm_head.weight[:, 0] = 0.0
        actor.lm_head.weight[eos, 0] = 20.0
    exp = rollout(actor, critic, ref_model, scorer, tokenizer, missing_eos_penalty=1.0)
    assert exp.response_length == 1 and exp.action_mask.all()
    torch.testing.assert_close(exp.rewards[:, 0], exp.scores.clamp(-5, 5) - 0.1 * torch.where(
        exp.action_mask, exp.log_probs - exp.ref_log_probs, 0.0)[:, 0])
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    torch.manual_seed(7)
    cut = rollout(actor, critic, ref_model, scorer, tokenizer, max_new_tokens=2,
                  missing_eos_penalty=1.0)
    no_eos = ~(cut.input_ids[:, -2:] == eos).any(1)
    assert no_eos.any() and cut.action_mask[no_eos].all()
    for exp_ in (exp, cut):
        _, skipped = P.ppo_update(actor, critic, torch.optim.AdamW(actor.parameters()),
                                  torch.optim.AdamW(critic.parameters()), exp_,
                                  P.PPOConfig(ppo_epochs=1, mini_batch_size=4))
        assert not any(skipped)


def test_missing_eos_penalty_lowers_only_unfinished_responses(tiny_dirs):
    torch.manual_seed(8)
    models = make_models(tiny_dirs)
    torch.manual_seed(8)
    plain = rollout(*models, max_new_tokens=6)
    torch.manual_seed(8)
    penalized = rollout(*models, max_new_tokens=6, missing_eos_penalty=2.0)
    ended = (plain.input_ids[:, -plain.response_length:] == models[-1].eos_token_id).any(1)
    assert torch.equal(penalized.ended, ended) and ended.any() and (~ended).any()
    torch.testing.assert_close(penalized.scores, plain.scores)  # the raw score stays raw
    torch.testing.assert_close(penalized.reward_score,
                               (plain.scores - 2.0 * (~ended).float()).clamp(-5, 5))


def test_critic_initialized_from_reward_model_takes_its_head(tiny_dirs):
    """DeepSpeed-Chat initializes the critic from the reward model: backbone and score head."""
    from transformers import AutoModelForSequenceClassification
    cfg = P.Config(model=tiny_dirs["policy"], critic_model=tiny_dirs["reward"])
    _, _, critic, _, _ = P.load_models(cfg, torch.device("cpu"))
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["reward"])
    torch.testing.assert_close(critic.v_head.weight, reward_model.score.weight)
    torch.testing.assert_close(critic.backbone.wte.weight, reward_model.transformer.wte.weight)



def test_default_critic_is_the_reward_model_and_its_values_are_the_scores(tiny_dirs, capsys):
    """004 §3.3, DeepSpeed-Chat: with a 1-label reward model of the policy's vocabulary and no
    --critic-model, the critic starts from the reward model: its value head is the score
    head, and its initial value at a sequence's last token is the reward model's score of
    that sequence. The run says so in one line."""
    torch.manual_seed(0)
    actor, critic, _, score_fn, tokenizer = make_models(tiny_dirs)
    assert (f"critic: starts from {tiny_dirs['reward']} (the reward model, 004 §3.3; "
            "--critic-model picks another)\n"
            in capsys.readouterr().out)
    torch.testing.assert_close(critic.v_head.weight, score_fn.model.score.weight)
    texts = ["the cat sat on the mat", "hello there, a fine day"]
    scores = score_fn(["", ""], texts)
    for text, score in zip(texts, scores):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        values = critic(ids, torch.ones_like(ids), P.position_ids_from(torch.ones_like(ids)))
        torch.testing.assert_close(values[0, -1], score, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("why", ["no reward model", "2 labels", "other vocabulary", "LoRA"])
def test_default_critic_is_the_policy_otherwise(tiny_dirs, chat_dirs, capsys, why):
    """No reward model, a multi-label one, one of another vocabulary, or LoRA (whose default
    critic is an adapter on the policy's shared base): the critic starts from the policy,
    with a value head at 0, and the run says so."""
    options = {"no reward model": {}, "2 labels": {"reward_model": tiny_dirs["sentiment"],
                                                  "reward_label": "POS"},
               "other vocabulary": {"model": chat_dirs["policy"],
                                    "reward_model": tiny_dirs["reward"]},
               "LoRA": {"reward_model": tiny_dirs["reward"], "lora_r": 4}}[why]
    cfg = P.Config(**{"model": tiny_dirs["policy"], **options})
    _, _, critic, _, _ = P.load_models(cfg, torch.device("cpu"))
    assert "critic: starts from the policy\n" in capsys.readouterr().out
    assert not critic.v_head.weight.any() and not critic.v_head.bias.any()

def test_fused_gelu_computes_the_same_model(tiny_dirs):
    """The loaded models run PyTorch's one-kernel tanh GELU in place of transformers' seven-op
    `gelu_new`, and the policy's logits are those of the model as saved."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation
    saved = AutoModelForCausalLM.from_pretrained(tiny_dirs["policy"]).eval()
    assert any(isinstance(m, NewGELUActivation) for m in saved.modules())
    actor, critic, ref_model, _, tokenizer = make_models(tiny_dirs)
    reward = P.RewardModelScorer(tiny_dirs["reward"], None, torch.device("cpu"))
    for model in (actor, critic, ref_model, reward.model):
        assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
        assert any(isinstance(m, torch.nn.GELU) for m in model.modules())
    ids = tokenizer(RAGGED_PROMPTS, return_tensors="pt", padding=True).input_ids
    with torch.no_grad():
        assert torch.allclose(actor(ids).logits, saved(ids).logits, atol=1e-5, rtol=0)


def test_reward_label_selects_a_class_logit(tiny_dirs):
    scorer = P.RewardModelScorer(tiny_dirs["sentiment"], "POS", torch.device("cpu"))
    batch = scorer.tokenizer(["ab", "cd"], return_tensors="pt", padding=True)
    logits = scorer.model(**batch).logits
    torch.testing.assert_close(scorer(["a", "c"], ["b", "d"]), logits[:, 1])
    with pytest.raises(P.UsageError, match="--reward-label"):
        P.RewardModelScorer(tiny_dirs["sentiment"], None, torch.device("cpu"))


def test_reward_label_is_a_name_or_an_index_below_the_label_count(tiny_dirs):
    """--reward-label POS and --reward-label 1 score the same logit, 0 the other; an index
    past the labels or an unknown name is refused, naming the labels there are."""
    def scorer(label):
        return P.RewardModelScorer(tiny_dirs["sentiment"], label, torch.device("cpu"))

    batch = scorer("POS").tokenizer(["ab", "cd"], return_tensors="pt", padding=True)
    logits = scorer("POS").model(**batch).logits
    torch.testing.assert_close(scorer("1")(["a", "c"], ["b", "d"]), logits[:, 1])
    torch.testing.assert_close(scorer("0")(["a", "c"], ["b", "d"]), logits[:, 0])
    for label in ("2", "MAYBE"):
        with pytest.raises(P.UsageError, match=r"not one of \['NEG', 'POS'\] or an index below 2"):
            scorer(label)


def test_run_with_reward_model_saves_a_reloadable_policy(tiny_dirs, tmp_path):
    """--model DIR --reward-model DIR: metrics.jsonl has every documented key per iteration and
    the saved policy reloads with AutoModelForCausalLM.from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg = tiny_config(tmp_path, model=tiny_dirs["policy"], reward_model=tiny_dirs["reward"])
    assert P.train(cfg) == 0
    rows = read_metrics(cfg.output_dir)
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert set(REQUIRED_METRICS) <= set(row)
        assert all(math.isfinite(v) for v in row.values())
    model = AutoModelForCausalLM.from_pretrained(Path(cfg.output_dir) / P.POLICY)
    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.output_dir) / P.POLICY)
    assert model(**tokenizer(["hi"], return_tensors="pt")).logits.isfinite().all()


def test_reward_fn_option(tmp_path, monkeypatch):
    """--reward-fn file.py:function scores the decoded responses: here, by their length."""
    module = tmp_path / "my_reward.py"
    module.write_text("def length(prompts, responses):\n"
                      "    return [float(len(r)) for r in responses]\n")
    cfg = tiny_config(tmp_path, reward_fn=f"{module}:length", steps=1, clip_reward_value=100.0)
    assert P.load_reward_fn(cfg.reward_fn)(["p"], ["abc"]) == [3.0]
    rollouts = spy_on(monkeypatch, "generate_experience")
    assert P.train(cfg) == 0
    exp = rollouts[0][1]
    assert exp.scores.tolist() == [float(len(r)) for r in exp.responses]
    assert read_metrics(cfg.output_dir)[0]["objective/scores"] == pytest.approx(
        sum(len(r) for r in exp.responses) / len(exp.responses))


def test_builtin_task_reward_rises(tmp_path):
    """The offline demo learns: mean score over the last fifth well above the first fifth."""
    cfg = tiny_config(tmp_path, steps=30, batch_size=32, mini_batch_size=16, ppo_epochs=4,
                      max_new_tokens=16)
    assert P.train(cfg) == 0
    scores = [row["objective/scores"] for row in read_metrics(cfg.output_dir)]
    first, last = sum(scores[:6]) / 6, sum(scores[-6:]) / 6
    assert last > first + 2.0, scores


def test_seeded_cpu_run_is_reproducible(tmp_path):
    rows = []
    for name in ("a", "b"):
        cfg = tiny_config(tmp_path, output_dir=str(tmp_path / name))
        assert P.train(cfg) == 0
        rows.append(without_timing(read_metrics(cfg.output_dir)))
    assert rows[0] == rows[1]


def test_frozen_models_in_bf16_halve_their_memory_and_still_train(tiny_dirs, tmp_path):
    """--frozen-bf16: reference and reward model stored in bf16; the run trains and the KL at
    the first rollout is only bf16 rounding."""
    cfg = tiny_config(tmp_path, model=tiny_dirs["policy"], reward_model=tiny_dirs["reward"],
                      frozen_bf16=True, steps=2)
    actor, ref_model, _, _, score_fn = P.load_models(cfg, torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 for p in ref_model.parameters())
    assert all(p.dtype == torch.float32 for p in actor.parameters())
    assert P.train(cfg) == 0
    first = read_metrics(cfg.output_dir)[0]
    assert abs(first["objective/kl"]) < 0.5 and math.isfinite(first["loss/policy"])


FAULTS_PROBE = """
import resource, sys, torch
sys.path.insert(0, {here!r})
import ppo_rlhf as P

torch.manual_seed(0)
w = torch.randn(4096, 4096, requires_grad=True)  # 64 MB: its gradient is a fresh 64 MB block
x = torch.randn(64, 4096)

def page_faults(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        (x @ w).square().mean().backward()
        w.grad = None  # as zero_grad(set_to_none=True) does after each optimizer step
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

page_faults(2)
default = page_faults(5)
P.keep_freed_memory(torch.device("cpu"))
page_faults(20)  # the heap grows to the loop's working set
print(default, page_faults(5))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_stops_page_faults_in_a_training_loop(tmp_path):
    """By default each step's freed 64 MB gradient goes back to the kernel and its 16384 pages
    fault in again on the next step; after keep_freed_memory (and a warm-up) the loop runs
    on memory the heap kept."""
    script = tmp_path / "probe.py"
    script.write_text(FAULTS_PROBE.format(here=str(Path(__file__).parent)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    default, kept = map(int, out.stdout.split())
    # by default 5 steps re-fault ~5 x 16384 pages; kept, not even a quarter of one block
    assert default > 4 * 16384 and kept < 16384 // 4, (default, kept)


# ------------------------------------------------------------------------------------------------
# Interruption, resume, bad input and numerical trouble (the command line through subprocess)
# ------------------------------------------------------------------------------------------------

def test_critic_warmup_update_leaves_the_actor_untouched_and_trains_the_critic(tiny_dirs):
    """ppo_update with train_actor=False: every actor weight bit-identical and its fused AdamW
    holding no state (no step was taken), the critic moved; the metrics say so."""
    torch.manual_seed(9)
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    exp = rollout(actor, critic, ref_model, scorer, tokenizer)
    before = [p.detach().clone() for p in [*actor.parameters(), *critic.parameters()]]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (actor, critic)]
    stats, skipped = P.ppo_update(actor, critic, *optimizers, exp,
                                  P.PPOConfig(ppo_epochs=2, mini_batch_size=4),
                                  parallel=P.DataParallel(torch.device("cpu"), actor, critic),
                                  train_actor=False)
    n_actor = len(list(actor.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before[:n_actor], actor.parameters()))
    assert not optimizers[0].state and all(p.grad is None for p in actor.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before[n_actor:], critic.parameters()))
    assert stats["updates/actor_frozen"].item() == 1 and stats["policy/grad_norm"].item() == 0
    assert stats["val/grad_norm"].item() > 0 and skipped.tolist() == [False] * 4


def test_critic_warmup_run_keeps_the_initial_policy_and_resumes_inside_the_warmup(tmp_path):
    """--critic-warmup-steps 2: iterations 1-2 train the critic alone (the saved policy after
    them is the initial one, bit for bit), iteration 3 trains both; stopped after 1 and resumed,
    the run equals the uninterrupted one."""
    warm = tiny_config(tmp_path, output_dir=str(tmp_path / "warm"), steps=2,
                       critic_warmup_steps=2)
    assert P.train(warm) == 0
    initial, _ = P.build_tiny_model(seed=warm.seed)
    initial = initial.state_dict()
    for name, value in final_weights(warm.output_dir).items():
        assert torch.equal(value, initial[name]), name
    straight = dataclass_replace(warm, output_dir=str(tmp_path / "straight"), steps=3)
    assert P.train(straight) == 0
    split = dataclass_replace(straight, output_dir=str(tmp_path / "split"), steps=1)
    assert P.train(split) == 0
    assert P.train(dataclass_replace(split, steps=3, resume=True)) == 0
    a, b = read_metrics(straight.output_dir), read_metrics(split.output_dir)
    assert [row["updates/actor_frozen"] for row in a] == [1, 1, 0]
    assert [row["policy/grad_norm"] > 0 for row in a] == [False, False, True]
    assert without_timing(a) == without_timing(b)
    wa, wb = final_weights(straight.output_dir), final_weights(split.output_dir)
    assert any(not torch.equal(wa[name], initial[name]) for name in wa)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=1e-6)


def test_normalized_reward_has_mean_0_std_1_on_its_sample_and_resumes(tmp_path, monkeypatch):
    """--normalize-reward: the measuring rollouts' raw scores, mapped with the logged mu0 and
    sigma0, have mean 0 and std 1; PPO then sees clip((s - mu0) / sigma0) while
    objective/scores stays the raw mean and objective/rlhf_reward what PPO maximizes; the
    checkpoint holds mu0, sigma0, and a run resumed from it does not measure again and
    equals the uninterrupted one."""
    cfg = tiny_config(tmp_path, output_dir=str(tmp_path / "straight"), steps=3,
                      normalize_reward=True, normalize_reward_samples=12, clip_reward_value=1.0)
    rollouts = spy_on(monkeypatch, "generate_experience")
    assert P.train(cfg) == 0
    rows = read_metrics(cfg.output_dir)
    mu, sigma = rows[0]["reward/mean"], rows[0]["reward/std"]
    assert rows[0]["step"] == 0 and len(rollouts) == 2 + 3  # 12 answers: 2 batches of 8
    measured = torch.cat([exp.scores for _, exp in rollouts[:2]]).double()
    normalized = (measured - mu) / sigma
    assert normalized.mean().item() == pytest.approx(0, abs=1e-6)
    assert normalized.std(correction=0).item() == pytest.approx(1, abs=1e-6)
    for (_, exp), row in zip(rollouts[2:], rows[1:]):
        torch.testing.assert_close(exp.reward_score, ((exp.scores - mu) / sigma).clamp(-1, 1))
        assert row["objective/scores"] == pytest.approx(exp.scores.mean().item(), abs=1e-5)
        assert row["objective/rlhf_reward"] == pytest.approx(
            (exp.reward_score - row["objective/kl_coef"] * P.sequence_stats(
                exp, row["objective/kl_coef"])["kl"]).mean().item(), abs=1e-5)
    state = torch.load(Path(cfg.output_dir) / P.CHECKPOINT, weights_only=True)
    assert state["reward_norm"] == pytest.approx([mu, sigma])
    split = dataclass_replace(cfg, output_dir=str(tmp_path / "split"), steps=1)
    assert P.train(split) == 0
    del rollouts[:]
    assert P.train(dataclass_replace(split, steps=3, resume=True)) == 0
    assert len(rollouts) == 2  # iterations 2 and 3, no measuring
    assert without_timing(read_metrics(split.output_dir)) == without_timing(rows)


def test_normalized_scores_reach_every_rollout_after_the_measuring(tmp_path, monkeypatch):
    """With --normalize-reward, every rollout after the measuring ones (training, held-out
    evaluation, the final samples) sees the scores with the run's mu0 and sigma0; the
    measuring rollouts themselves see them raw."""
    cfg = tiny_config(tmp_path, steps=2, normalize_reward=True, normalize_reward_samples=8,
                      eval_fraction=0.25, eval_every=1, samples=2)
    rollouts = spy_on(monkeypatch, "generate_experience")
    assert P.train(cfg) == 0
    start = read_metrics(cfg.output_dir)[0]
    seen = [arguments.get("score_norm", (0.0, 1.0)) for arguments, _ in rollouts]
    # measuring, the evaluation before training, 2 x (rollout, evaluation), the final samples
    assert seen[0] == (0.0, 1.0) and len(seen) == 1 + 1 + 2 * 2 + 1
    assert all(norm == (start["reward/mean"], start["reward/std"]) for norm in seen[1:])


def test_resume_equals_uninterrupted_run(tmp_path):
    """N iterations straight == k iterations, then --resume to N: same metrics rows (one per
    iteration, no duplicates or gaps) and the same final weights."""
    straight = tiny_config(tmp_path, output_dir=str(tmp_path / "straight"), steps=5,
                           kl_controller="adaptive", kl_target=0.5)
    assert P.train(straight) == 0
    first = dataclass_replace(straight, output_dir=str(tmp_path / "split"), steps=2)
    assert P.train(first) == 0
    assert P.train(dataclass_replace(first, steps=5, resume=True)) == 0
    a, b = read_metrics(straight.output_dir), read_metrics(first.output_dir)
    assert [row["step"] for row in b] == [1, 2, 3, 4, 5]
    assert without_timing(a) == without_timing(b)
    wa, wb = final_weights(straight.output_dir), final_weights(first.output_dir)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=1e-6)


def test_each_checkpoint_is_written_once(tmp_path, monkeypatch):
    """The end of a run writes its checkpoint unless --save-every just wrote that very state;
    resuming a finished run writes none, yet saves the policy again."""
    saved = []
    save = P.save_checkpoint
    monkeypatch.setattr(P, "save_checkpoint", lambda run, step: (saved.append(step),
                                                                 save(run, step)))
    cfg = tiny_config(tmp_path, steps=2, save_every=1, batch_size=4, mini_batch_size=4)
    assert P.train(cfg) == 0 and saved == [1, 2]
    P.shutil.rmtree(Path(cfg.output_dir) / P.POLICY)
    saved.clear()
    assert P.train(dataclass_replace(cfg, resume=True)) == 0 and saved == []
    assert (Path(cfg.output_dir) / P.POLICY / "model.safetensors").exists()
    saved.clear()
    assert P.train(dataclass_replace(cfg, resume=True, steps=3)) == 0 and saved == [3]
    saved.clear()
    cfg = dataclass_replace(cfg, output_dir=str(tmp_path / "end"), save_every=0)
    assert P.train(cfg) == 0 and saved == [2]


@pytest.mark.slow
def test_sigint_saves_and_resumes_and_a_second_run_is_locked_out(tmp_path):
    """Ctrl-C finishes the iteration, saves, exits 130 with a resume hint; --resume continues
    with one metrics row per iteration. While the first run works, a second one on the same
    --output-dir (even with --overwrite) is refused and deletes nothing."""
    out = tmp_path / "run"
    args = ["--output-dir", str(out), "--batch-size", "8", "--mini-batch-size", "4",
            "--max-new-tokens", "8", "--ppo-epochs", "1", "--samples", "0"]
    proc = start_cli([*args, "--steps", "500"], tmp_path)
    metrics = out / P.METRICS
    wait_for_rows(metrics, 2)
    second = run_cli([*args, "--steps", "5", "--overwrite"], tmp_path)
    assert second.returncode == 2 and "in use by another run" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and metrics.exists()
    assert proc.poll() is None  # the first run goes on
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert f"--resume --output-dir {out}" in stderr and "Traceback" not in stderr
    stopped = len(metrics.read_text().splitlines())
    state = torch.load(out / P.CHECKPOINT, weights_only=False)
    assert state["step"] == stopped
    result = run_cli([*args, "--steps", str(stopped + 2), "--resume"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["step"] for r in read_metrics(out)] == list(range(1, stopped + 3))


@pytest.mark.parametrize("forwarded", [False, True])
def test_a_second_signal_interrupts_unless_torchrun_forwards_it(forwarded, monkeypatch):
    """One process: a second Ctrl-C interrupts at once, and the old handlers come back.
    Under torchrun each rank gets Ctrl-C from the terminal and again from torchrun: later
    copies are the same stop, ignored also after the loop, while the rank leaves."""
    monkeypatch.setattr(P, "world", lambda: (0, 2 if forwarded else 1))
    previous = {s: signal.getsignal(s) for s in P.StopRequest.SIGNALS}
    # Ctrl-C as a terminal delivers it: a background job starts with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with P.StopRequest() as stop:
            signal.raise_signal(signal.SIGTERM)
            assert stop.signum == signal.SIGTERM
            if forwarded:
                signal.raise_signal(signal.SIGINT)
                assert stop.signum == signal.SIGTERM  # the first signal sets the exit status
            else:
                with pytest.raises(KeyboardInterrupt):
                    signal.raise_signal(signal.SIGINT)
        if forwarded:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)  # a late copy from torchrun: nothing happens
        else:
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_run_without_a_signal_gives_the_handlers_back_under_torchrun(monkeypatch):
    """Signals are ignored after the loop only when a stop was requested: a run that simply
    finished gives the previous handlers back, under torchrun as in one process."""
    monkeypatch.setattr(P, "world", lambda: (0, 2))
    previous = {s: signal.getsignal(s) for s in P.StopRequest.SIGNALS}
    with P.StopRequest() as stop:
        assert signal.getsignal(signal.SIGINT) is not previous[signal.SIGINT]
    assert stop.signum is None
    assert {s: signal.getsignal(s) for s in P.StopRequest.SIGNALS} == previous


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A failure between writing the temporary file and renaming it leaves the previous
    checkpoint intact and loadable."""
    path = tmp_path / P.CHECKPOINT
    P.atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def killed(src, dst):
        raise KeyboardInterrupt("killed between write and rename")
    monkeypatch.setattr(P.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        P.atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=False)["step"] == 1


def test_nonfinite_update_is_skipped_and_weights_stay(tiny_dirs):
    torch.manual_seed(9)
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    exp = rollout(actor, critic, ref_model, scorer, tokenizer)
    exp.advantages[0, 0] = float("nan")
    before = [p.detach().clone() for p in actor.parameters()]
    _, skipped = P.ppo_update(actor, critic, torch.optim.AdamW(actor.parameters(), lr=1e-3),
                              torch.optim.AdamW(critic.parameters(), lr=1e-3), exp,
                              P.PPOConfig(ppo_epochs=1, mini_batch_size=8))
    assert skipped.tolist() == [True]
    assert all(torch.equal(a, b) for a, b in zip(before, actor.parameters()))


def test_consecutive_nonfinite_updates_stop_the_run(tmp_path, monkeypatch, capsys):
    """K skipped updates in a row: exit 1, a message, and a checkpoint of the last good state:
    the actor's loss alone is NaN, yet the critic did not step either (its loss and gradient
    were finite): both models skip together, so the checkpoint holds the initial weights."""
    monkeypatch.setattr(P, "actor_loss_fn", lambda log_probs, *a, **k: log_probs.sum() * math.nan)
    cfg = tiny_config(tmp_path, steps=10, max_skipped_updates=3)
    assert P.train(cfg) == 1
    assert "non-finite" in capsys.readouterr().err
    # the first iteration's 2 epochs x 2 minibatches were all skipped, and the run stopped
    assert [row["updates/skipped"] for row in read_metrics(cfg.output_dir)] == [4]
    state = torch.load(Path(cfg.output_dir) / P.CHECKPOINT, weights_only=True)
    actor, _, critic, _, _ = P.load_models(cfg, torch.device("cpu"))  # as the run began
    for name, model in (("actor", actor), ("critic", critic)):
        initial = dict(model.named_parameters())
        assert state[name].keys() == initial.keys()
        assert all(torch.equal(value, initial[key]) for key, value in state[name].items())
        assert not state[name + "_optimizer"]["state"] or all(
            s["step"] == 0 for s in state[name + "_optimizer"]["state"].values())


@pytest.mark.parametrize("poisoned", ["advantages", "returns"])
def test_a_nonfinite_loss_in_either_model_skips_both_steps(tiny_dirs, poisoned):
    """A NaN in the actor's loss (advantages) or in the critic's (returns): neither model
    steps, and the skip is counted once for the step they share."""
    torch.manual_seed(9)
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    exp = rollout(actor, critic, ref_model, scorer, tokenizer)
    getattr(exp, poisoned)[0, 0] = float("nan")
    before = [p.detach().clone() for p in [*actor.parameters(), *critic.parameters()]]
    _, skipped = P.ppo_update(actor, critic, torch.optim.AdamW(actor.parameters(), lr=1e-3),
                              torch.optim.AdamW(critic.parameters(), lr=1e-3), exp,
                              P.PPOConfig(ppo_epochs=1, mini_batch_size=8))
    assert skipped.tolist() == [True]
    after = [*actor.parameters(), *critic.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_logged_grad_norms_are_the_mean_over_the_steps_taken(tiny_dirs):
    """Two minibatches, one of them poisoned (skipped): policy/grad_norm and val/grad_norm are
    the other step's norms, not halved by the step that was skipped."""
    torch.manual_seed(9)
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    exp = rollout(actor, critic, ref_model, scorer, tokenizer)
    exp.advantages[0, 0] = float("nan")
    torch.manual_seed(4)
    order = torch.randperm(8)
    finite_rows = next(mini for mini in order.split(4) if 0 not in mini.tolist())
    copies = P.copy.deepcopy(actor), P.copy.deepcopy(critic)
    torch.manual_seed(4)  # the update draws the same minibatch order
    stats, skipped = P.ppo_update(actor, critic, torch.optim.SGD(actor.parameters(), lr=0.1),
                                  torch.optim.SGD(critic.parameters(), lr=0.1), exp,
                                  P.PPOConfig(ppo_epochs=1, mini_batch_size=4))
    assert sorted(skipped.tolist()) == [False, True]
    alone, _ = P.ppo_update(*copies, torch.optim.SGD(copies[0].parameters(), lr=0.1),
                            torch.optim.SGD(copies[1].parameters(), lr=0.1),
                            exp.select(finite_rows), P.PPOConfig(ppo_epochs=1, mini_batch_size=4))
    for name in ("policy/grad_norm", "val/grad_norm"):
        assert stats[name].item() == pytest.approx(alone[name].item(), rel=1e-5), name


def test_resume_refuses_missing_checkpoint_or_changed_options_not_memory_knobs(tmp_path):
    """Refused: no checkpoint, or an option that changes the run. Accepted: a memory knob."""
    cfg = tiny_config(tmp_path, resume=True)
    with pytest.raises(P.UsageError, match="no checkpoint"):
        P.train(cfg)
    assert P.train(dataclass_replace(cfg, resume=False, steps=1)) == 0
    with pytest.raises(P.UsageError, match="cliprange"):
        P.train(dataclass_replace(cfg, cliprange=0.3))
    # a checkpoint of an earlier version, whose options lack a newer one (its draw differs)
    path = Path(cfg.output_dir) / P.CHECKPOINT
    state = torch.load(path, weights_only=True)
    del state["fingerprint"]["prompts_config"]
    torch.save(state, path.with_name("older.pt"))
    path.rename(path.with_name("newer.pt"))
    path.with_name("older.pt").rename(path)
    with pytest.raises(P.UsageError, match=r"prompts_config: '\(not an option then\)' -> None"):
        P.train(cfg)
    path.with_name("newer.pt").replace(path)
    # memory knobs may change: the way to go on after running out of memory
    assert P.train(dataclass_replace(cfg, steps=2, micro_batch_size=2,
                                     rollout_micro_batch_size=3)) == 0
    assert [row["step"] for row in read_metrics(cfg.output_dir)] == [1, 2]
    # --steps below the checkpoint's step would run nothing and save step 2's state as step 1
    before = file_bytes(cfg.output_dir)
    assert P.main(["--resume", "--output-dir", cfg.output_dir, "--steps", "1",
                   "--batch-size", "8", "--mini-batch-size", "4", "--ppo-epochs", "2",
                   "--max-new-tokens", "8", "--samples", "0"]) == 2
    assert file_bytes(cfg.output_dir) == before
    with pytest.raises(P.UsageError, match="beyond --steps 1"):
        P.train(dataclass_replace(cfg, steps=1))


def bad_input_cases(tmp_path, tiny_dirs, chat_dirs):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    no_field = tmp_path / "bad.jsonl"
    no_field.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    raises = tmp_path / "raises.py"
    raises.write_text("def f(p, r):\n    raise RuntimeError('boom')\n")
    wrong_count = tmp_path / "count.py"
    wrong_count.write_text("def f(p, r):\n    return [1.0]\n")
    not_finite = tmp_path / "nan.py"
    not_finite.write_text("def f(p, r):\n    return [float('nan')] * len(r)\n")
    return {
        "missing prompts file": (["--prompts", str(tmp_path / "nope.txt")], "no such file"),
        "empty prompts file": (["--prompts", str(empty)], "no prompt"),
        "jsonl without prompt": (["--prompts", str(no_field)], "'prompt'"),
        "unloadable model": (["--model", "no-such-org/no-such-model"], "cannot load --model"),
        "model not a causal LM": (["--model", tiny_dirs["reward"]], "not a causal LM"),
        "reward model not a classifier": (["--reward-model", tiny_dirs["policy"]],
                                          "not a sequence classifier"),
        "reward-fn not importable": (["--reward-fn", "no_such_module:f"], "cannot import"),
        "reward-fn raises": (["--reward-fn", f"{raises}:f"], "boom"),
        "reward-fn wrong count": (["--reward-fn", f"{wrong_count}:f"], "1 scores for"),
        "reward-fn non-finite": (["--reward-fn", f"{not_finite}:f"], "non-finite"),
        "cliprange <= 0": (["--cliprange", "0"], "--cliprange"),
        "gamma outside [0, 1]": (["--gamma", "1.5"], "--gamma"),
        "lam outside [0, 1]": (["--lam", "-0.1"], "--lam"),
        "batch not a multiple": (["--batch-size", "10", "--mini-batch-size", "4"], "multiple"),
        "non-positive size": (["--batch-size", "0"], "batch sizes"),
        "non-positive rollout micro-batch": (["--rollout-micro-batch-size", "0"],
                                             "--rollout-micro-batch-size"),
        "non-positive learning rate": (["--actor-lr=-1e-3"], "--actor-lr"),
        "context too small": (["--max-new-tokens", "500"], "context"),
        "resume without checkpoint": (["--resume"], "no checkpoint"),
        "critic of another vocabulary": (["--critic-model", chat_dirs["policy"]],
                                         "another vocabulary"),
        "LoRA with FSDP": (["--lora-r", "4", "--data-parallel", "fsdp"], "not supported"),
        "LoRA on modules the model lacks": (["--lora-r", "4", "--lora-target-modules",
                                             "q_proj"], "not found in the base model"),
        "nothing left to train on": (["--eval-fraction", "0.99"], "no prompt to train on"),
        "eval fraction of 1": (["--eval-fraction", "1"], "--eval-fraction"),
        "negative warm-up": (["--warmup-steps", "-1"], "--warmup-steps"),
        "every prompt too long": (["--max-prompt-length", "2"], "none is left"),
        "dataset without the column": (["--prompts",
                                        datasets_of(tmp_path)["no-column.parquet"]],
                                       "its columns: text, id"),
        "dataset without the split": (["--prompts", datasets_of(tmp_path)["splits"],
                                       "--prompts-split", "validation"], "['train', 'test']"),
        "empty dataset": (["--prompts", datasets_of(tmp_path)["empty.parquet"]],
                          "holds no prompt"),
        "column of another type": (["--prompts", datasets_of(tmp_path)["no-column.parquet"],
                                    "--prompts-column", "id"], "holds int values"),
        "conversations as CSV strings": (["--prompts", datasets_of(tmp_path)["chats.csv"]],
                                         "holds strings"),
        "Hub dataset while offline": (["--prompts", "no-such-org/no-such-dataset"],
                                      "pass a local file or directory"),
        "grpo with one answer per prompt": (["--advantage-estimator", "grpo"],
                                            "needs --samples-per-prompt >= 2"),
        "rloo with one answer per prompt": (["--advantage-estimator", "rloo"],
                                            "needs --samples-per-prompt >= 2"),
        "a group that does not divide the batch": (
            ["--samples-per-prompt", "3", "--batch-size", "4", "--mini-batch-size", "2"],
            "must be a multiple of --samples-per-prompt 3"),
        "a critic option without a critic": (["--advantage-estimator", "reinforce_pp",
                                              "--critic-warmup-steps", "1"], "has no critic"),
        "a KL controller with the KL in the loss": (["--kl-loss-coef", "0.1", "--kl-controller",
                                                     "adaptive"], "at a fixed coefficient"),
        "a discount with a group estimator": (["--advantage-estimator", "rloo",
                                               "--samples-per-prompt", "2", "--gamma", "0.9"],
                                              "--gamma must be 1"),
    }


def test_bad_input_gets_one_line_and_exit_2(tmp_path, tiny_dirs, chat_dirs, capsys):
    """Each bad input, through the command line's entry point: exit status 2, one line on
    stderr naming the problem, and no output directory written."""
    failures = []
    for name, (args, needle) in bad_input_cases(tmp_path, tiny_dirs, chat_dirs).items():
        out = tmp_path / ("out-" + name.replace(" ", "-"))
        sizes = [] if "--batch-size" in args else ["--batch-size", "4", "--mini-batch-size", "2"]
        status = P.main([*args, *sizes, "--output-dir", str(out), "--steps", "1"])
        lines = capsys.readouterr().err.strip().splitlines()
        if not (status == 2 and len(lines) == 1 and needle in lines[0] and not out.exists()):
            failures.append((name, status, lines[-3:]))
    assert not failures, failures


# each option's range as --help and the docs state it: (values refused, values accepted)
OPTION_RANGES = {
    **dict.fromkeys(["steps", "ppo_epochs", "max_new_tokens", "max_prompt_length", "kl_horizon",
                     "eval_every", "max_skipped_updates", "normalize_reward_samples",
                     "micro_batch_size", "rollout_micro_batch_size"], ([0, -1], [1, 7])),
    "samples_per_prompt": ([0, -1], [1, 2, 4]),  # (dividing --batch-size 4)
    **dict.fromkeys(["temperature", "actor_lr", "critic_lr", "max_grad_norm", "cliprange",
                     "cliprange_high", "cliprange_value", "kl_target", "clip_reward_value",
                     "lora_alpha"], ([0.0, -0.5], [1e-6, 3.0])),
    **dict.fromkeys(["top_k", "kl_ctl", "kl_loss_coef", "ent_coef", "weight_decay",
                     "warmup_steps", "critic_warmup_steps", "save_every"], ([-1], [0, 2])),
    **dict.fromkeys(["gamma", "lam"], ([-0.01, 1.01], [0.0, 0.5, 1.0])),
    "top_p": ([0.0, 1.01], [0.01, 1.0]),
    "eval_fraction": ([-0.1, 1.0], [0.0, 0.5]),
    "lora_dropout": ([-0.1, 1.0], [0.0, 0.5]),
    "dual_clip": ([1.0, 0.5], [1.01, 3.0]),
    "lora_r": ([-1], [0]),
}


def test_validate_refuses_exactly_the_values_outside_each_options_range():
    """Every value outside an option's range is refused in one message naming the option and
    the value; every value inside passes (batch sizes are checked with compatible others)."""
    base = P.Config(batch_size=4, mini_batch_size=2, tensorboard=False)
    for name, (refused, accepted) in OPTION_RANGES.items():
        flag = "--" + name.replace("_", "-")
        for value in refused:
            with pytest.raises(P.UsageError, match=f"^{flag} {value}: .*must be"):
                P.validate(dataclass_replace(base, **{name: value}))
        for value in accepted:
            P.validate(dataclass_replace(base, **{name: value}))
    for sizes in ({"batch_size": 0}, {"mini_batch_size": 0},
                  {"batch_size": 1, "mini_batch_size": 0}):
        with pytest.raises(P.UsageError, match="batch sizes must be >= 1"):
            P.validate(dataclass_replace(base, **sizes))
    P.validate(dataclass_replace(base, batch_size=1, mini_batch_size=1))


@pytest.mark.slow
def test_bad_input_through_a_real_process_exits_2_without_a_traceback(tmp_path, tiny_dirs):
    """The same from a shell: the process's exit status is 2 and stderr holds one line."""
    def run_case(args):
        out = tmp_path / f"out-{len(args)}"
        result = run_cli([*args, *SMALL_RUN, "--output-dir", str(out), "--steps", "1"],
                         tmp_path)
        return result.returncode, result.stderr.strip().splitlines(), out.exists()

    cases = [["--model", tiny_dirs["reward"]], ["--cliprange", "0", "--gamma", "2"]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for status, lines, written in pool.map(run_case, cases):
            assert status == 2 and len(lines) == 1 and not written, lines
            assert lines[0].startswith("ppo_rlhf: error: ")


@pytest.mark.slow
def test_help_documents_every_option_with_its_default(tmp_path):
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for f in P.dataclasses.fields(P.Config):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "(default: 0.1)" in text and "(default: 0.95)" in text
    # grouped as Config is, each option under its own group's heading, the groups in order
    starts = [result.stdout.index(f"\n{group}:\n") for group in P.GROUPS]
    assert starts == sorted(starts)
    for f in P.dataclasses.fields(P.Config):
        at = re.search(f"\n  --{f.name.replace('_', '-')}[ ,\n]", result.stdout).start()
        group = P.GROUPS.index(f.metadata["group"])
        assert starts[group] < at < (starts + [len(result.stdout)])[group + 1], f.name


# ------------------------------------------------------------------------------------------------
# Data parallel (torchrun, gloo on CPU)
# ------------------------------------------------------------------------------------------------

def ddp_worker(data, out, policy, prompts):
    """One rank of the 2-rank update test: PPO's update on its half of the experience (DDP
    replicas), the rollout metrics over both halves, and a rollout of its own half of
    `prompts` whitened over both ranks; saved to out.format(rank)."""
    rank, _ = P.world()
    data = torch.load(data, weights_only=False)
    actor, critic = data["actor"], data["critic"]
    exp = data["exp"].select(torch.arange(rank * 4, rank * 4 + 4))  # this rank's half
    parallel = P.DataParallel(torch.device("cpu"), actor, critic)  # DDP replicas
    stats, _ = P.ppo_update(parallel.trained(actor), parallel.trained(critic),
                            torch.optim.SGD(actor.parameters(), lr=0.1),
                            torch.optim.SGD(critic.parameters(), lr=0.1), exp,
                            P.PPOConfig(ppo_epochs=2, mini_batch_size=8, micro_batch_size=2),
                            parallel=parallel)
    rollout_metrics = P.rollout_stats(exp, 0.1, parallel=parallel)
    # whitening over both ranks' rollouts: each rank samples its own half of the prompts
    actor, ref_model, critic, tokenizer, score_fn = P.load_models(P.Config(model=policy),
                                                                  torch.device("cpu"))
    torch.manual_seed(rank)
    encoded = tokenizer(prompts[rank * 4:rank * 4 + 4], return_tensors="pt", padding=True)
    own = P.generate_experience(actor, critic, ref_model, score_fn, tokenizer, encoded.input_ids,
                                encoded.attention_mask,
                                P.PPOConfig(max_new_tokens=8, whiten_rewards=True),
                                eos_token_ids=[tokenizer.eos_token_id], mean_fn=parallel.mean)
    raw_rewards = P.compute_rewards(own.log_probs, own.ref_log_probs, own.scores,
                                    own.action_mask)
    lengths = own.action_mask.sum(1).tolist()

    def real(t):
        return [row[:n] for row, n in zip(t.tolist(), lengths)]

    whitening = {"raw_rewards": real(raw_rewards), "rewards": real(own.rewards),
                 "raw_advantages": real(own.returns - own.values),
                 "advantages": real(own.advantages)}
    torch.save({"actor": data["actor"].state_dict(), "critic": data["critic"].state_dict(),
                "stats": stats, "rollout": rollout_metrics, "whitening": whitening},
               out.format(rank))


@pytest.mark.parametrize("outcome, status, together", [
    (0, 0, True), (130, 130, True), (P.UsageError("bad input"), 2, False),
    (RuntimeError("bug"), None, False)])
def test_torchrun_ranks_leave_together_after_a_return_not_after_an_error(
        monkeypatch, outcome, status, together):
    """main() under torchrun: once train returns (every rank after the same iteration) a
    barrier, then destroy_process_group; after an error, no barrier (another rank may be
    inside another collective), but the group is still left."""
    calls = []
    monkeypatch.setattr(P, "world", lambda: (1, 2))
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "destroy_process_group",
                        lambda: calls.append("destroy"))

    def train(cfg):
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
    monkeypatch.setattr(P, "train", train)
    if status is None:
        with pytest.raises(RuntimeError, match="bug"):
            P.main([])
    else:
        assert P.main([]) == status
    assert calls == (["barrier", "destroy"] if together else ["destroy"])


def per_prompt_sampler(actor, prompt_ids, prompt_mask, *, eos_token_ids, pad_token_id,
                       max_new_tokens, temperature, **_):
    """A stand-in for `sample_responses` whose draw depends on each prompt alone (its own
    generator, seeded by its tokens and by which of its answers in this call it is), not on
    which process samples it or beside which rows: the one random choice that differs between
    N ranks and one process on their union (a group of answers never straddles ranks)."""
    rows, seen = [], []
    for ids, mask in zip(prompt_ids, prompt_mask):
        sequence = ids[mask.bool()]
        seen.append(sequence.tolist())
        generator = torch.Generator().manual_seed(int(sum(sequence.tolist())) * 31 + len(sequence)
                                                  + 1000 * seen.count(seen[-1]))
        response = []
        for _ in range(max_new_tokens):
            logits = actor(input_ids=sequence[None]).logits[0, -1].float() / temperature
            token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            sequence, response = torch.cat([sequence, token]), response + [int(token)]
            if response[-1] in eos_token_ids:
                break
        rows.append(response)
    length = max(len(r) for r in rows)
    responses = torch.tensor([r + [pad_token_id] * (length - len(r)) for r in rows])
    return torch.cat([prompt_ids, responses.to(prompt_ids.device)], dim=1)


LOOP_PROMPTS = ["the sea", "a cat", "my dream", "we went", "hello", "the old house", "i think",
                "once upon"]


def run_the_loop(policy_dir, out, estimator="gae", n=1):
    """Part I's loop, as the trainer runs it (`DataParallel`), for 2 iterations on the union of
    what every rank takes; each rank saves its metrics rows, its prompts and the weights to
    out.format(rank). `estimator`, n answers per prompt: with a group estimator, no critic."""
    P.sample_responses = per_prompt_sampler
    torch.manual_seed(0)
    actor, ref_model, critic, tokenizer, score_fn = P.load_models(
        P.Config(model=policy_dir, advantage_estimator=estimator), torch.device("cpu"))
    models = P.Models(actor, critic, ref_model, score_fn, tokenizer, [tokenizer.eos_token_id])
    parallel = P.DataParallel(torch.device("cpu"), actor, critic)
    optimizers = [m and torch.optim.SGD(m.parameters(), lr=0.1) for m in (actor, critic)]
    prompt_ids = [tokenizer(p)["input_ids"] for p in LOOP_PROMPTS]
    hp = P.PPOConfig(steps=2, batch_size=8, mini_batch_size=8, micro_batch_size=2, ppo_epochs=2,
                     max_new_tokens=6, recompute_log_probs=True, whiten_rewards=estimator == "gae",
                     advantage_estimator=estimator, samples_per_prompt=n,
                     loss_agg_mode="token-mean" if n == 1 else "seq-mean-token-mean")
    rows, prompts = [], []
    for row, exp, _ in P.ppo_iterations(models, *optimizers, LOOP_PROMPTS, prompt_ids, hp,
                                        parallel=parallel):
        rows.append(without_timing([row])[0])
        prompts.append(exp.prompts)
    torch.save({"rows": rows, "prompts": prompts, "actor": actor.state_dict(),
                "critic": critic.state_dict() if critic else {}}, str(out).format(P.world()[0]))


@pytest.mark.slow
@pytest.mark.parametrize("estimator, n", [("gae", 1), ("grpo", 4), ("reinforce_pp", 2)])
def test_two_rank_loop_equals_one_process_on_the_union_of_their_prompts(tiny_dirs, tmp_path,
                                                                        monkeypatch, estimator,
                                                                        n):
    """ppo_iterations under torchrun, 2 ranks, rollout included: each rank takes its own half
    of every global batch (together: the batch one process takes; with 4 answers per prompt,
    whole groups), whitening and the metrics are the global batch's, and the weights after 2
    iterations are one process's. (Sampling is per prompt and answer, so that the draw does
    not depend on the rank; SGD, as for the update.)"""
    out = str(tmp_path / "rank{}.pt")
    result = torchrun_worker(run_the_loop, tmp_path, policy_dir=tiny_dirs["policy"], out=out,
                             estimator=estimator, n=n)
    assert result.returncode == 0, result.stderr[-3000:]
    monkeypatch.setattr(P, "sample_responses", P.sample_responses)  # restored after the test
    run_the_loop(tiny_dirs["policy"], tmp_path / "one.pt", estimator, n)
    one, ranks = (torch.load(tmp_path / "one.pt", weights_only=False),
                  [torch.load(out.format(r), weights_only=False) for r in range(2)])
    for step, prompts in enumerate(one["prompts"]):
        assert ranks[0]["prompts"][step] + ranks[1]["prompts"][step] == prompts
        assert not set(ranks[0]["prompts"][step]) & set(ranks[1]["prompts"][step])
    assert ranks[0]["rows"] == ranks[1]["rows"]
    for row, expected in zip(ranks[0]["rows"], one["rows"]):
        assert row.keys() == expected.keys()
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    for name in ("actor", "critic"):
        for key, value in one[name].items():
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), key
            torch.testing.assert_close(ranks[0][name][key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_two_rank_update_equals_one_process_on_the_concatenated_batch(tiny_dirs, tmp_path):
    """Same experience: 2 ranks x 4 sequences == 1 process x 8, in weights and in metrics
    (update and rollout); both ranks end with identical weights; and generate_experience
    whitens with the statistics of both ranks' tokens. (SGD: Adam's m/sqrt(v) would magnify float32
    summation-order noise on near-zero gradients; the identity is about the gradient.)"""
    torch.manual_seed(10)
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    exp = rollout(actor, critic, ref_model, scorer, tokenizer)
    data = tmp_path / "data.pt"
    torch.save({"actor": actor, "critic": critic, "exp": exp}, data)
    out = str(tmp_path / "rank{}.pt")
    result = torchrun_worker(ddp_worker, tmp_path, data=str(data), out=out,
                             policy=tiny_dirs["policy"], prompts=RAGGED_PROMPTS)
    assert result.returncode == 0, result.stderr[-3000:]
    stats, _ = P.ppo_update(actor, critic, torch.optim.SGD(actor.parameters(), lr=0.1),
                            torch.optim.SGD(critic.parameters(), lr=0.1), exp,
                            P.PPOConfig(ppo_epochs=2, mini_batch_size=8, micro_batch_size=2))
    ranks = [torch.load(out.format(r), weights_only=False) for r in range(2)]
    for name, model in [("actor", actor), ("critic", critic)]:
        for key, value in model.state_dict().items():
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), key
            torch.testing.assert_close(ranks[0][name][key], value, atol=1e-5, rtol=1e-4)
    for key, value in stats.items():
        torch.testing.assert_close(ranks[0]["stats"][key], value, atol=1e-5, rtol=1e-4)
    for key, value in P.rollout_stats(exp, 0.1).items():  # metrics of the global batch
        torch.testing.assert_close(ranks[0]["rollout"][key], value, atol=1e-5, rtol=1e-4)
    # whitening statistics are those of both ranks' real tokens together
    both = {k: ranks[0]["whitening"][k] + ranks[1]["whitening"][k]
            for k in ranks[0]["whitening"]}
    lengths = [len(row) for row in both["rewards"]]
    close(sum(both["rewards"], []),
          sum(whiten_oracle(both["raw_rewards"], lengths, shift_mean=False), []), atol=1e-5)
    close(sum(both["advantages"], []),
          sum(whiten_oracle(both["raw_advantages"], lengths), []), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [[], ["--lora-r", "4"]], ids=["full", "lora"])
def test_torchrun_cli_writes_one_set_of_outputs_and_resumes(tmp_path, lora):
    """Rank 0 alone writes metrics (one row per iteration), the checkpoint and the model (and
    with LoRA the adapter); a resume with the same number of ranks continues."""
    out = tmp_path / "run"
    args = [str(HERE / "ppo_rlhf.py"), "--output-dir", str(out), "--batch-size", "8",
            "--mini-batch-size", "4", "--max-new-tokens", "6", "--ppo-epochs", "1",
            "--samples", "0", *lora]
    result = torchrun([*args, "--steps", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step    2/2") == 1  # one voice
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    names = [p.name for p in out.iterdir()]
    assert len([n for n in names if n.startswith("events.out.tfevents")]) == 1  # TensorBoard
    assert sorted(n for n in names if not n.startswith("events.")) == sorted(
        [P.LOCK_FILE, "checkpoint.pt", "metrics.jsonl", P.POLICY, *([P.ADAPTER] if lora else [])])
    assert sorted(p.name for p in (out / P.POLICY).iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json"])
    assert len(torch.load(out / P.CHECKPOINT, weights_only=False)["rng"]) == 2
    result = torchrun([*args, "--steps", "3", "--resume"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    single = run_cli(args[1:] + ["--steps", "4", "--resume"], tmp_path)
    assert single.returncode == 2 and "world_size" in single.stderr


# ------------------------------------------------------------------------------------------------
# Wiring: every per-token tensor and every metric against a slow, direct computation. The
# formulas above are right; these check that the code feeds them the right tensors.
# ------------------------------------------------------------------------------------------------

def distinct_models(tiny_dirs, seed=12):
    """make_models, then the actor nudged away from the reference and the critic's value head
    made nonzero: copies that agree (or V = 0 everywhere) would hide a swapped model or a
    misaligned value."""
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        critic.v_head.weight.copy_(torch.randn(critic.v_head.weight.shape, generator=g))
        critic.v_head.bias.fill_(0.3)
    return actor, critic, ref_model, scorer, tokenizer


def prompt_and_response(exp, b):
    """Row b's prompt tokens without padding, and its real response tokens."""
    prompt_length = exp.input_ids.shape[1] - exp.response_length
    prompt = exp.input_ids[b, :prompt_length][exp.attention_mask[b, :prompt_length].bool()]
    n = int(exp.action_mask[b].sum())
    return prompt, exp.input_ids[b, prompt_length:prompt_length + n]


@torch.no_grad()
def per_prefix_oracle(actor, critic, ref_model, exp, temperature):
    """For every real response token a_t of every row, one forward per prefix
    s_t = prompt + response[:t], unpadded, with positions 0..len-1: log pi(a_t|s_t),
    log pi_ref(a_t|s_t), H(pi(.|s_t)) from logits / temperature, and V(s_t) at s_t's last
    position. Padding slots stay 0."""
    shape = exp.action_mask.shape
    out = {name: torch.zeros(shape, dtype=torch.float64)
           for name in ("log_probs", "ref_log_probs", "entropy", "values")}
    for b in range(shape[0]):
        prompt, response = prompt_and_response(exp, b)
        for t in range(len(response)):
            prefix = torch.cat([prompt, response[:t]])[None]
            positions = torch.arange(prefix.shape[1])[None]
            for name, model in (("log_probs", actor), ("ref_log_probs", ref_model)):
                logits = model(prefix, position_ids=positions).logits[0, -1].double()
                log_p = torch.log_softmax(logits / temperature, -1)
                out[name][b, t] = log_p[response[t]]
                if model is actor:
                    out["entropy"][b, t] = -(log_p.exp() * log_p).sum()
            out["values"][b, t] = critic(prefix, torch.ones_like(prefix), positions)[0, -1]
    return out


def rewards_oracle(log_probs, ref_log_probs, scores, lengths, kl_ctl, clip, estimator):
    """004 §4.1(3) in plain Python: r_t = -kl_ctl * kl_t, plus clip(score) at t = n - 1."""
    out = []
    for lp, ref, score, n in zip(log_probs, ref_log_probs, scores, lengths):
        row = [0.0] * len(lp)
        for t in range(n):
            log_ratio = lp[t] - ref[t]
            kl = {"k1": log_ratio, "k2": 0.5 * log_ratio ** 2,
                  "k3": math.expm1(-log_ratio) + log_ratio}[estimator]
            row[t] = -kl_ctl * kl
        row[n - 1] += max(-clip, min(clip, score))
        out.append(row)
    return out


def whiten_oracle(rows, lengths, shift_mean=True):
    """(x - mean) / sqrt(var + 1e-8) over the real tokens of all rows (population variance)."""
    real = [x for row, n in zip(rows, lengths) for x in row[:n]]
    mean = sum(real) / len(real)
    var = sum((x - mean) ** 2 for x in real) / len(real)
    return [[((x - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)) if t < n
             else 0.0 for t, x in enumerate(row)] for row, n in zip(rows, lengths)]


def close(actual, expected, atol):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


@pytest.mark.parametrize("recompute", [False, True])
def test_experience_tensors_equal_a_forward_per_prefix(tiny_dirs, recompute):
    """log_probs, ref_log_probs, entropy and values of generate_experience are those of
    s_t = prompt + response[:t] for the token a_t at t: no position off by one, no model
    swapped, the temperature applied, padding ignored (micro-batches of 3 rows)."""
    actor, critic, ref_model, scorer, tokenizer = distinct_models(tiny_dirs)
    torch.manual_seed(13)
    exp = rollout(actor, critic, ref_model, scorer, tokenizer, temperature=0.8,
                  recompute_log_probs=recompute, rollout_micro_batch_size=3)
    oracle = per_prefix_oracle(actor, critic, ref_model, exp, temperature=0.8)
    mask = exp.action_mask
    assert (mask.sum(1) > 1).any() and not mask.all()  # ragged, multi-token responses
    for name, expected in oracle.items():
        close(torch.where(mask, getattr(exp, name).double(), 0.0), expected, atol=1e-4)
    assert (oracle["log_probs"] - oracle["ref_log_probs"]).abs().max() > 1e-2  # distinct models


class RecordingScorer:
    """Wraps a score function and keeps what it was called with."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        return self.fn(prompts, responses)


@pytest.mark.parametrize("estimator,whiten_advantages,whiten_rewards",
                         [("k1", True, False), ("k3", False, True), ("k2", True, True)])
def test_experience_rewards_advantages_returns_follow_the_formulas(tiny_dirs, estimator,
                                                                   whiten_advantages,
                                                                   whiten_rewards):
    """The reward model sees each decoded prompt and response (up to its first EOS); rewards =
    compute_rewards' formula with the experience's own log-probs; advantages = GAE of
    (values, rewards), whitened over the batch's real tokens when asked; returns = the
    unwhitened GAE advantages + values."""
    actor, critic, ref_model, scorer, tokenizer = distinct_models(tiny_dirs)
    recorder = RecordingScorer(scorer)
    hyper = dict(kl_ctl=0.3, clip_reward_value=0.05, kl_estimator=estimator, gamma=0.9,
                 lam=0.7, whiten_advantages=whiten_advantages, whiten_rewards=whiten_rewards)
    torch.manual_seed(14)
    exp = rollout(actor, critic, ref_model, recorder, tokenizer, rollout_micro_batch_size=3,
                  **hyper)
    rows = range(len(RAGGED_PROMPTS))
    pieces = [prompt_and_response(exp, b) for b in rows]
    prompts = [tokenizer.decode(p, skip_special_tokens=True) for p, _ in pieces]
    responses = [tokenizer.decode(r, skip_special_tokens=True) for _, r in pieces]
    assert [sum((c[0] for c in recorder.calls), []),
            sum((c[1] for c in recorder.calls), [])] == [prompts, responses]
    close(exp.scores, scorer(prompts, responses), atol=1e-5)
    assert exp.scores.abs().max() > 0.05  # the clip binds somewhere

    lengths = exp.action_mask.sum(1).tolist()
    rewards = rewards_oracle(exp.log_probs.tolist(), exp.ref_log_probs.tolist(),
                             exp.scores.tolist(), lengths, 0.3, 0.05, estimator)
    if whiten_rewards:
        rewards = whiten_oracle(rewards, lengths, shift_mean=False)
    close(exp.rewards, rewards, atol=1e-5)
    values = torch.where(exp.action_mask, exp.values, 0.0).tolist()
    advantages = gae_loop_oracle(values, rewards, lengths, 0.9, 0.7)
    returns = [[a + v if t < n else 0.0 for t, (a, v) in enumerate(zip(ar, vr))]
               for ar, vr, n in zip(advantages, values, lengths)]
    close(exp.returns, returns, atol=1e-5)
    if whiten_advantages:
        advantages = whiten_oracle(advantages, lengths)
    close(exp.advantages, advantages, atol=1e-4)


def test_compute_rewards_and_kl_loss_fn_estimate_as_kl_k1_k2_k3():
    """compute_rewards and kl_loss_fn keep their own copies of the estimators (each pastes
    alone): pinned to kl_k1, kl_k2, kl_k3, and kl_k3 to (r - 1) - log r with r = pi_ref(a) /
    pi(a) computed from probabilities."""
    g = torch.Generator().manual_seed(0)
    log_probs, ref_log_probs = -3 * torch.rand(3, 5, generator=g), -3 * torch.rand(3, 5,
                                                                                   generator=g)
    mask = mask_from([5, 2, 4], 5)
    ratio = ref_log_probs.double().exp() / log_probs.double().exp()
    close(P.kl_k3(log_probs, ref_log_probs), ratio - 1 - ratio.log(), atol=1e-6)
    rewards = P.compute_rewards(log_probs, ref_log_probs, torch.zeros(3), mask, kl_ctl=0.7,
                                kl_estimator="k3")
    close(rewards, torch.where(mask, -0.7 * P.kl_k3(log_probs, ref_log_probs), 0.0), atol=1e-6)
    rewards = P.compute_rewards(log_probs, ref_log_probs, torch.zeros(3), mask, kl_ctl=0.7)
    close(rewards, torch.where(mask, -0.7 * P.kl_k1(log_probs, ref_log_probs), 0.0), atol=1e-6)
    for name, fn in (("k1", P.kl_k1), ("k2", P.kl_k2), ("k3", P.kl_k3)):
        per_token = torch.where(mask, fn(log_probs, ref_log_probs), 0.0)
        rewards = P.compute_rewards(log_probs, ref_log_probs, torch.zeros(3), mask,
                                    kl_ctl=0.7, kl_estimator=name)
        close(rewards, -0.7 * per_token, atol=1e-6)
        clamped = per_token.clamp(max=10) if name == "k3" else per_token  # (verl's clamp)
        close(P.kl_loss_fn(log_probs, ref_log_probs, mask, name),
              clamped.sum() / mask.sum(), atol=1e-6)


def test_rlhf_reward_and_kl_are_what_ppo_optimizes(tiny_dirs):
    """On a real rollout with k3, a clip that binds and a missing-EOS penalty:
    objective/rlhf_reward is the mean of sum_t r_t, the return PPO maximizes (the score
    penalized and clipped as PPO sees it); objective/kl is the KL the rewards penalize, with
    their estimator; objective/scores stays the reward model's raw score."""
    actor, critic, ref_model, scorer, tokenizer = distinct_models(tiny_dirs)
    torch.manual_seed(24)
    exp = rollout(actor, critic, ref_model, scorer, tokenizer, kl_ctl=0.3, max_new_tokens=6,
                  clip_reward_value=0.05, kl_estimator="k3", missing_eos_penalty=1.0)
    assert exp.ended.any() and not exp.ended.all() and exp.scores.abs().max() > 0.05
    stats = {k: v.item() for k, v in P.rollout_stats(exp, 0.3, "k3").items()}
    kl = torch.where(exp.action_mask, P.kl_k3(exp.log_probs, exp.ref_log_probs), 0.0).sum(1)
    assert stats["objective/rlhf_reward"] == pytest.approx(exp.rewards.sum(1).mean().item(),
                                                           abs=1e-6)
    assert stats["objective/kl"] == pytest.approx(kl.mean().item(), abs=1e-6)
    assert stats["objective/non_score_reward"] == pytest.approx(-0.3 * kl.mean().item(),
                                                                abs=1e-6)
    assert stats["objective/scores"] == pytest.approx(exp.scores.mean().item(), abs=1e-6)
    assert stats["response/no_eos"] == pytest.approx((~exp.ended).float().mean().item())


def handmade_experience():
    """3 rows, T = 4, lengths 4, 2, 1, with numbers small enough to check by hand; padding
    holds junk that no metric may read."""
    junk = 99.0
    mask = mask_from([4, 2, 1], 4)

    def grid(rows):
        return torch.where(mask, torch.tensor(rows), junk)
    return P.Experience(
        input_ids=torch.zeros(3, 6, dtype=torch.long), attention_mask=torch.ones(3, 6),
        action_mask=mask,
        log_probs=grid([[-1.0, -2.0, -0.5, -1.5], [-0.2, -0.4, 0, 0], [-3.0, 0, 0, 0]]),
        ref_log_probs=grid([[-1.5, -1.0, -0.5, -2.5], [-0.1, -0.9, 0, 0], [-1.0, 0, 0, 0]]),
        values=grid([[0.5, 0.2, -0.1, 0.4], [1.0, 0.0, 0, 0], [-0.5, 0, 0, 0]]),
        rewards=grid([[0.0] * 4] * 3),
        advantages=grid([[0.3, -0.2, 0.1, 0.9], [-1.0, 0.5, 0, 0], [0.7, 0, 0, 0]]),
        returns=grid([[1.0, 0.5, 0.3, 0.2], [0.4, -0.3, 0, 0], [2.0, 0, 0, 0]]),
        scores=torch.tensor([1.0, -2.0, 4.0]),
        reward_score=torch.tensor([1.0, -2.5, 3.0]),  # row 2 penalized, row 3 clipped
        ended=torch.tensor([True, False, True]),
        entropy=grid([[2.0, 1.0, 1.5, 0.5], [3.0, 2.5, 0, 0], [1.0, 0, 0, 0]]),
        prompts=["a", "b", "c"], responses=["x", "y", "z"])


def real(exp, name):
    """The real tokens of one [B, T] field, row by row, as Python lists."""
    return [row[:n] for row, n in zip(getattr(exp, name).tolist(),
                                      exp.action_mask.sum(1).tolist())]


def rollout_metrics_oracle(exp, kl_coef, estimator="k1"):
    """The rollout's metrics from their definitions, in plain Python over real tokens: the KL
    with the estimator the rewards use, and the rlhf reward from the score PPO sees (penalized,
    clipped)."""
    def flat(name):
        return sum(real(exp, name), [])

    def var(xs):
        return sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / len(xs)

    def per_token(lp, ref):
        return {"k1": lp - ref, "k2": 0.5 * (lp - ref) ** 2,
                "k3": math.expm1(ref - lp) + (lp - ref)}[estimator]
    kl = [sum(per_token(a, b) for a, b in zip(lp, ref))
          for lp, ref in zip(real(exp, "log_probs"), real(exp, "ref_log_probs"))]
    scores, lengths = exp.scores.tolist(), [len(row) for row in real(exp, "values")]
    returns, values = flat("returns"), flat("values")
    return kl, {
        "objective/scores": sum(scores) / len(scores),
        "objective/kl": sum(kl) / len(kl),
        "objective/non_score_reward": -kl_coef * sum(kl) / len(kl),
        "objective/rlhf_reward": sum(s - kl_coef * k for s, k in zip(exp.reward_score.tolist(),
                                                                    kl)) / len(kl),
        "policy/entropy": sum(flat("entropy")) / sum(lengths),
        "val/explained_variance": 1 - var([r - v for r, v in zip(returns, values)]) / var(
            returns),
        "response/length": sum(lengths) / len(lengths),
        "response/no_eos": sum(not e for e in exp.ended.tolist()) / len(lengths),
        "response/tokens": float(sum(lengths)),
    }


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_rollout_stats_equal_their_formulas(estimator):
    """Every rollout metric, from its definition in plain Python on a hand-made batch: the KL
    with the rewards' estimator, the rlhf reward from the score PPO optimizes."""
    exp = handmade_experience()
    stats = {k: v.item() for k, v in P.rollout_stats(exp, 0.25, estimator).items()}
    kl, expected = rollout_metrics_oracle(exp, 0.25, estimator)
    if estimator == "k1":  # by hand: the sums of log pi - log pi_ref
        assert kl == pytest.approx([0.5, 0.4, -2.0])
    assert expected["response/tokens"] == 7 and expected["policy/entropy"] == 11.5 / 7
    assert stats == pytest.approx(expected, abs=1e-6)


def update_oracle(actor, critic, exp, temperature, cliprange, cliprange_value,
                  dual_clip=math.inf, cliprange_high=None):
    """The update's metrics from their definitions: current log-probs and values from one
    forward per prefix, then per-token terms averaged over every real token of the batch."""
    now = per_prefix_oracle(actor, critic, actor, exp, temperature)
    terms = {name: [] for name in ("loss/policy", "policy/clipfrac", "policy/dualclipfrac",
                                   "policy/approxkl", "policy/ratio", "loss/value",
                                   "val/clipfrac", "val/mean")}
    for b, n in enumerate(exp.action_mask.sum(1).tolist()):
        for t in range(n):
            log_ratio = now["log_probs"][b, t].item() - exp.log_probs[b, t].item()
            ratio, adv = math.exp(log_ratio), exp.advantages[b, t].item()
            unclipped = -adv * ratio
            clipped = -adv * min(max(ratio, 1 - cliprange), 1 + (cliprange_high or cliprange))
            v, v_old = now["values"][b, t].item(), exp.values[b, t].item()
            ret = exp.returns[b, t].item()
            v_clip = min(max(v, v_old - cliprange_value), v_old + cliprange_value)
            capped = adv < 0 and -dual_clip * adv < max(unclipped, clipped)
            terms["loss/policy"].append(-dual_clip * adv if capped else max(unclipped, clipped))
            terms["policy/clipfrac"].append(float(clipped > unclipped))
            terms["policy/dualclipfrac"].append(float(capped))
            terms["policy/approxkl"].append(0.5 * log_ratio ** 2)
            terms["policy/ratio"].append(ratio)
            terms["loss/value"].append(0.5 * max((v - ret) ** 2, (v_clip - ret) ** 2))
            terms["val/clipfrac"].append(float((v_clip - ret) ** 2 > (v - ret) ** 2))
            terms["val/mean"].append(v)
    ratios = terms["policy/ratio"]
    return {**{name: sum(xs) / len(xs) for name, xs in terms.items()},
            "policy/first_ratio_error": max(abs(r - 1) for r in ratios)}


def perturbed_experience(tiny_dirs, seed):
    """A real rollout at temperature 0.8 whose old log-probs and values are moved, so that
    ratios and values fall on both sides of the clip ranges."""
    actor, critic, ref_model, scorer, tokenizer = distinct_models(tiny_dirs)
    torch.manual_seed(seed)
    exp = rollout(actor, critic, ref_model, scorer, tokenizer, temperature=0.8)
    g = torch.Generator().manual_seed(seed)
    exp.log_probs += 0.3 * torch.randn(exp.log_probs.shape, generator=g)
    exp.values += 0.2 * torch.randn(exp.values.shape, generator=g)
    return actor, critic, exp


@pytest.mark.parametrize("dual_clip, high", [(None, None), (1.1, None), (None, 0.15)])
def test_update_stats_equal_their_formulas(tiny_dirs, dual_clip, high):
    """ppo_update's metrics are token means over the batch of the per-token terms of the
    losses (PPO-clip, and dual-clip PPO's cap). With lr = 0 every step sees the rollout's
    weights, so over 2 epochs of one minibatch in micro-batches of 3 each metric is the plain
    mean over all real tokens."""
    actor, critic, exp = perturbed_experience(tiny_dirs, seed=15)
    hp = P.PPOConfig(ppo_epochs=2, mini_batch_size=8, micro_batch_size=3, cliprange=0.1,
                     cliprange_value=0.05, temperature=0.8, dual_clip=dual_clip,
                     ent_coef=0.05, cliprange_high=high)  # loss/policy: the clipped term alone
    stats, skipped = P.ppo_update(actor, critic, torch.optim.SGD(actor.parameters(), lr=0.0),
                                  torch.optim.SGD(critic.parameters(), lr=0.0), exp, hp)
    assert skipped.tolist() == [False, False]
    expected = update_oracle(actor, critic, exp, 0.8, cliprange=0.1, cliprange_value=0.05,
                             dual_clip=dual_clip or math.inf, cliprange_high=high)
    if high:  # some ratios between 1 + eps and 1 + eps_high: the clip fraction moves
        assert expected["policy/clipfrac"] < update_oracle(actor, critic, exp, 0.8, 0.1,
                                                           0.05)["policy/clipfrac"]
    assert 0 < expected["policy/clipfrac"] < 1 and 0 < expected["val/clipfrac"] < 1
    assert (0 < expected["policy/dualclipfrac"] < 1) == (dual_clip is not None)
    assert stats.pop("updates/actor_frozen").item() == 0
    norms = {k: stats.pop(k).item() for k in ("policy/grad_norm", "val/grad_norm")}
    assert {k: v.item() for k, v in stats.items()} == pytest.approx(expected, abs=1e-4)
    assert all(norm > 0 for norm in norms.values())  # their values: the gradient test below


@pytest.mark.parametrize("mode, kl", [("token-mean", None), *zip(AGG_MODES, ["k3", "k2", "k1",
                                                                               "k3"])])
def test_update_step_follows_the_gradient_of_the_direct_loss(tiny_dirs, mode, kl):
    """One SGD step of ppo_update moves the weights by -lr x the gradient of the loss written
    out directly: PPO-clip - ent_coef x entropy (+ kl_loss_coef x the KL estimate) + clipped
    value loss, each aggregated by loss_agg_mode over the minibatch (micro-batches of 3 of 8
    answers), with log-probs, entropy and values from one unpadded forward per row; with a KL
    in the loss, clip-higher's upper bound too."""
    actor, critic, exp = perturbed_experience(tiny_dirs, seed=16)
    high = 0.1 if kl is None else 0.25
    hyper = dict(cliprange=0.1, cliprange_value=0.05, temperature=0.8)
    copies = P.copy.deepcopy(actor), P.copy.deepcopy(critic)
    stats = {}
    updated = sgd_updated_weights(*copies, exp, stats, mini_batch_size=8, micro_batch_size=3,
                                  max_grad_norm=1e9, ent_coef=0.1, loss_agg_mode=mode,
                                  kl_loss_coef=0.0 if kl is None else 0.1,
                                  kl_estimator=kl or "k1", max_new_tokens=20,
                                  cliprange_high=None if kl is None else high, **hyper)
    before = torch.cat([p.detach().flatten() for p in [*actor.parameters(),
                                                        *critic.parameters()]])
    pg, entropy, vf, kls = [], [], [], []
    for b in range(len(RAGGED_PROMPTS)):
        prompt, response = prompt_and_response(exp, b)
        ids = torch.cat([prompt, response])[None]
        positions = torch.arange(ids.shape[1])[None]
        start = len(prompt) - 1  # logits at position p predict token p + 1
        logits = actor(ids, position_ids=positions).logits[0, start:-1] / 0.8
        log_p = torch.log_softmax(logits, -1)
        values = critic(ids, torch.ones_like(ids), positions)[0, start:-1]
        for term in (pg, entropy, vf, kls):
            term.append([])
        for t, token in enumerate(response.tolist()):
            ratio = torch.exp(log_p[t, token] - exp.log_probs[b, t])
            adv = exp.advantages[b, t]
            pg[-1].append(torch.max(-adv * ratio, -adv * ratio.clamp(0.9, 1 + high)))
            entropy[-1].append(-(log_p[t].exp() * log_p[t]).sum())
            v_old, ret = exp.values[b, t], exp.returns[b, t]
            v_clip = values[t].clamp(v_old - 0.05, v_old + 0.05)
            vf[-1].append(0.5 * torch.max((values[t] - ret) ** 2, (v_clip - ret) ** 2))
            log_r = exp.ref_log_probs[b, t] - log_p[t, token]  # r = pi_ref / pi
            kls[-1].append({"k1": -log_r, "k2": 0.5 * log_r ** 2,
                            "k3": log_r.exp() - 1 - log_r, None: 0.0 * log_r}[kl])
    loss = sum(weight * aggregate_oracle(term, mode, 20) for weight, term in
               ((1.0, pg), (-0.1, entropy), (0.1, kls), (1.0, vf)))
    loss.backward()
    assert ("loss/kl" in stats) == (kl is not None)
    for name, term in (("loss/policy", pg), ("loss/value", vf), ("loss/kl", kls)):
        if name in stats:  # logged as each loss aggregates
            assert stats[name] == pytest.approx(
                aggregate_oracle(term, mode, 20).item(), rel=1e-4, abs=1e-6), name
    grad = torch.cat([p.grad.flatten() for p in [*actor.parameters(), *critic.parameters()]])
    torch.testing.assert_close(before - updated, 0.1 * grad, atol=1e-6, rtol=1e-4)
    # the logged norms are each model's, before clipping
    n_actor = sum(p.numel() for p in actor.parameters())
    assert stats["policy/grad_norm"] == pytest.approx(grad[:n_actor].norm().item(), rel=1e-4)
    assert stats["val/grad_norm"] == pytest.approx(grad[n_actor:].norm().item(), rel=1e-4)


def spy_on(monkeypatch, name):
    """Replace P.<name> by a wrapper that records ({argument: value}, result) of every call."""
    calls, original = [], getattr(P, name)
    signature = inspect.signature(original)

    def spy(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        calls.append((arguments, original(*args, **kwargs)))
        return calls[-1][1]
    monkeypatch.setattr(P, name, spy)
    return calls


def test_train_feeds_every_option_to_the_math_and_logs_what_it_computed(tmp_path,
                                                                         monkeypatch):
    """A run with no option at its default: each iteration's rollout and update get the
    configured hyperparameters, and each metrics row holds the rollout's metrics (recomputed
    here from the experience itself), the update's, beta and the skip count."""
    cfg = tiny_config(tmp_path, steps=2, kl_ctl=0.3, clip_reward_value=2.0, kl_estimator="k3",
                      gamma=0.9, lam=0.8, temperature=0.9, top_k=20, top_p=0.95,
                      whiten_advantages=False, whiten_rewards=True, missing_eos_penalty=0.5,
                      recompute_log_probs=True, rollout_micro_batch_size=3, cliprange=0.15,
                      cliprange_value=0.3, ent_coef=0.01, max_grad_norm=0.7, ppo_epochs=3,
                      micro_batch_size=2, kl_controller="proportional", kl_target=0.01,
                      kl_horizon=100, samples_per_prompt=2, cliprange_high=0.25,
                      loss_agg_mode="seq-mean-token-mean")
    rollouts = spy_on(monkeypatch, "generate_experience")
    updates = spy_on(monkeypatch, "ppo_update")
    assert P.train(cfg) == 0
    rows = read_metrics(cfg.output_dir)
    assert len(rollouts) == len(updates) == len(rows) == 2
    beta = cfg.kl_ctl
    for (rollout_kwargs, exp), (update_kwargs, (stats, skipped)), row in zip(rollouts, updates,
                                                                            rows):
        for name in ("max_new_tokens", "temperature", "top_k", "top_p", "clip_reward_value",
                     "kl_estimator", "gamma", "lam", "whiten_advantages", "whiten_rewards",
                     "missing_eos_penalty", "recompute_log_probs", "rollout_micro_batch_size",
                     "samples_per_prompt"):
            assert getattr(rollout_kwargs["hp"], name) == getattr(cfg, name), name
        assert rollout_kwargs["kl_ctl"] == beta == row["objective/kl_coef"]
        for name in ("ppo_epochs", "mini_batch_size", "micro_batch_size", "cliprange",
                     "cliprange_value", "ent_coef", "max_grad_norm", "temperature",
                     "cliprange_high", "loss_agg_mode"):
            assert getattr(update_kwargs["hp"], name) == getattr(cfg, name), name
        assert len(exp.prompts) == cfg.batch_size and len(skipped) == 3 * 2
        assert row["updates/skipped"] == 0
        for name, value in stats.items():
            assert row[name] == pytest.approx(value.item(), abs=1e-6), name
        kl, expected = rollout_metrics_oracle(exp, beta, cfg.kl_estimator)
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, abs=1e-5), name
        mean_kl = expected["objective/kl"]
        assert row["throughput/tokens_per_s"] == pytest.approx(
            row["response/tokens"] / (row["time/rollout_s"] + row["time/update_s"]), rel=1e-6)
        # Ziegler's controller, n = the global batch size, sets beta for the next rollout
        beta = beta * (1 + max(-0.2, min(0.2, mean_kl / 0.01 - 1)) * cfg.batch_size / 100)
    assert rows[1]["objective/kl_coef"] != rows[0]["objective/kl_coef"]


@given(st.integers(1, 9), st.integers(1, 12), st.integers(0, 3))
def test_prompt_batches_are_consecutive_slices_of_per_epoch_permutations(n_prompts, batch_size,
                                                                         seed):
    """Iterations 1, 2, ... take consecutive slices of the stream of permutations of the prompt
    set seeded seed_of(seed, "order", 0), seed_of(seed, "order", 1), ... (a batch may span two
    epochs, or more when it is larger than the set): every prompt once per epoch, and the same
    prompts on a resume."""
    stream = [int(i) for epoch in range(2 + 12 * 3 // n_prompts) for i in torch.randperm(
        n_prompts, generator=torch.Generator().manual_seed(P.seed_of(seed, "order", epoch)))]
    for step in (1, 2, 3):
        assert (P.prompt_indices(step, batch_size, n_prompts, seed)
                == stream[(step - 1) * batch_size:step * batch_size])


@pytest.mark.parametrize("controller", ["adaptive", "proportional", "fixed"])
def test_kl_coef_in_the_metrics_follows_the_controller(tmp_path, controller):
    """beta of iteration k + 1 = the controller's rule applied to iteration k's beta and KL."""
    cfg = tiny_config(tmp_path, steps=4, kl_controller=controller, kl_target=0.05,
                      kl_horizon=50)
    assert P.train(cfg) == 0
    rows = read_metrics(cfg.output_dir)
    rule = {"adaptive": lambda b, kl: P.adaptive_kl_coef(b, kl, 0.05),
            "proportional": lambda b, kl: P.proportional_kl_coef(b, kl, 0.05, cfg.batch_size,
                                                                 horizon=50),
            "fixed": lambda b, kl: b}[controller]
    coefs = [row["objective/kl_coef"] for row in rows]
    assert coefs[0] == cfg.kl_ctl and (len(set(coefs)) > 1) == (controller != "fixed")
    for before, after in zip(rows, rows[1:]):
        assert after["objective/kl_coef"] == pytest.approx(
            rule(before["objective/kl_coef"], before["objective/kl"]), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Watching a run: held-out evaluation, samples over time, learning-rate schedules, live checks
# ------------------------------------------------------------------------------------------------

EVAL_PROMPTS = ["what is the sea", "a red house", "tell me", "the last one", "x"]


def eval_config(tmp_path, name, **overrides):
    path = tmp_path / "eval.txt"
    path.write_text("".join(p + "\n" for p in EVAL_PROMPTS))
    options = dict(output_dir=str(tmp_path / name), eval_prompts=str(path), eval_every=2,
                   batch_size=4, mini_batch_size=2)
    return tiny_config(tmp_path, **{**options, **overrides})


def training_part(rows):
    """The rows without evaluation (eval/*, its time, the step-0 row) and wall times."""
    return [{k: v for k, v in row.items() if not k.startswith(("eval/", "time/eval"))}
            for row in without_timing(rows) if row["step"] > 0]


def test_evaluation_does_not_change_training(tmp_path):
    """Same seed with and without held-out evaluation: the same training metrics and the same
    final weights (evaluation samples from its own random stream, and changes no model)."""
    plain = eval_config(tmp_path, "plain", eval_prompts=None)
    assert P.train(plain) == 0
    evaluated = eval_config(tmp_path, "evaluated")
    assert P.train(evaluated) == 0
    rows = read_metrics(evaluated.output_dir)
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert [row["step"] for row in rows if "eval/scores" in row] == [0, 2, 3]
    assert training_part(rows) == training_part(read_metrics(plain.output_dir))
    ours, theirs = final_weights(evaluated.output_dir), final_weights(plain.output_dir)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_evaluations_of_one_policy_draw_the_same_samples(tmp_path):
    """Every evaluation starts its own random stream from the same seed: the same policy
    evaluated at two steps gives the same responses, so that a change between evaluations is
    the policy's, not the draw's; and it leaves the training stream where it was."""
    run = P.setup_run(eval_config(tmp_path, "run"))
    with run.lock, run.metrics:
        state = torch.random.get_rng_state()
        rows = [P.evaluate(run, step) for step in (1, 7)]
        assert torch.equal(torch.random.get_rng_state(), state)
    assert [{k: v for k, v in row.items() if k != "time/eval_s"} for row in rows] == \
        [{k: v for k, v in rows[0].items() if k != "time/eval_s"}] * 2
    samples = [json.loads(line) for line in (Path(run.out) / P.SAMPLES).read_text()
               .splitlines()]
    first, second = ([{k: v for k, v in s.items() if k != "step"} for s in samples
                      if s["step"] == step] for step in (1, 7))
    assert first == second and len(first) == len(EVAL_PROMPTS)


def test_evaluation_metrics_and_samples_equal_a_direct_computation(tmp_path, monkeypatch):
    """Each evaluation answers every held-out prompt once (5 prompts in batches of 4: the last
    batch padded and the padding dropped); eval/* are the means of sequence_stats over them,
    written out here from the experiences themselves; samples.jsonl holds exactly those
    prompts, responses, scores and whether each ended with an EOS; a resume keeps one set per step, dropping what an
    interrupted run wrote after its checkpoint."""
    rollouts = spy_on(monkeypatch, "generate_experience")
    cfg = eval_config(tmp_path, "run", steps=2, eval_every=1, kl_estimator="k3",
                      missing_eos_penalty=0.5, clip_reward_value=0.3)
    assert P.train(cfg) == 0
    rows = {row["step"]: row for row in read_metrics(cfg.output_dir)}
    samples = [json.loads(line) for line in (Path(cfg.output_dir) / P.SAMPLES).read_text()
               .splitlines()]
    assert sorted(rows) == [0, 1, 2] and [s["step"] for s in samples] == [0] * 5 + [1] * 5 + [2] * 5
    evaluations = [exp for _, exp in rollouts if set(exp.prompts) <= set(EVAL_PROMPTS)]
    assert len(evaluations) == 3 * 2  # three evaluations of two batches
    for step, (first, second) in zip((0, 1, 2), zip(evaluations[::2], evaluations[1::2])):
        assert first.prompts == EVAL_PROMPTS[:4] and second.prompts[0] == EVAL_PROMPTS[4]
        kl = {"scores": [], "kl": [], "rlhf_reward": [], "length": [], "no_eos": []}
        answered = []
        for exp, n in ((first, 4), (second, 1)):  # the second batch: 1 prompt + 3 of padding
            for b in range(n):
                log_ratio = (exp.log_probs[b] - exp.ref_log_probs[b])[exp.action_mask[b]]
                k3 = (torch.expm1(-log_ratio) + log_ratio).sum().item()
                score = exp.scores[b].item()
                penalized = score - (0.0 if exp.ended[b] else 0.5)
                kl["scores"].append(score)
                kl["kl"].append(k3)
                kl["rlhf_reward"].append(max(-0.3, min(0.3, penalized)) - 0.1 * k3)
                kl["length"].append(exp.action_mask[b].sum().item())
                kl["no_eos"].append(0.0 if exp.ended[b] else 1.0)
                answered.append({"step": step, "prompt": exp.prompts[b], "kl": k3,
                                 "response": exp.responses[b], "score": score,
                                 "ended": bool(exp.ended[b])})
        for name, values in kl.items():
            assert rows[step][f"eval/{name}"] == pytest.approx(sum(values) / 5, abs=1e-5), name
        written = [s for s in samples if s["step"] == step]
        assert [s["prompt"] for s in written] == EVAL_PROMPTS
        assert written == [pytest.approx(a, abs=1e-5) for a in answered]
    # an interrupted run's rows after its checkpoint (step 2): dropped when it resumes
    for name in (P.METRICS, P.SAMPLES):
        with (Path(cfg.output_dir) / name).open("a") as f:
            f.write(json.dumps({"step": 3, "eval/scores": 99.0, "prompt": "stale"}) + "\n")
    assert P.train(dataclass_replace(cfg, steps=3, resume=True)) == 0
    rows = read_metrics(cfg.output_dir)
    samples = [json.loads(line) for line in (Path(cfg.output_dir) / P.SAMPLES).read_text()
               .splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3] and rows[-1]["eval/scores"] != 99.0
    assert [s["step"] for s in samples] == [k for k in range(4) for _ in EVAL_PROMPTS]
    assert "stale" not in {s["prompt"] for s in samples}


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@given(warmup=st.integers(0, 5), extra=st.integers(1, 20))
def test_lr_factor_follows_its_formula_at_every_step(schedule, warmup, extra):
    """Warm-up k / W, then constant 1, linear 1 - p or cosine (1 + cos(pi p)) / 2 with
    p = (k - W - 1) / (N - W): full rate right after warm-up, never 0, never above 1."""
    total = warmup + extra
    factors = [P.lr_factor(k, schedule=schedule, warmup_steps=warmup, total_steps=total)
               for k in range(1, total + 1)]
    for k, factor in enumerate(factors, start=1):
        if k <= warmup:
            expected = k / warmup
        else:
            p = (k - warmup - 1) / extra
            expected = {"constant": 1.0, "linear": 1 - p,
                        "cosine": (1 + math.cos(math.pi * p)) / 2}[schedule]
        assert factor == pytest.approx(expected, abs=1e-12)
        assert 0 < factor <= 1
    assert factors[warmup] == 1.0  # the first iteration after the warm-up: the full rate


def test_learning_rates_follow_the_schedule_and_resume_exactly(tmp_path):
    """lr/actor and lr/critic of every iteration: the configured rates x lr_factor; a run cut
    in two and resumed logs the same rows as one run straight; a resume that would change the
    decay's horizon (--steps) is refused."""
    common = dict(steps=5, warmup_steps=2, lr_schedule="cosine", actor_lr=2e-3, critic_lr=5e-3,
                  batch_size=4, mini_batch_size=2)
    straight = tiny_config(tmp_path, output_dir=str(tmp_path / "straight"), **common)
    assert P.train(straight) == 0
    rows = read_metrics(straight.output_dir)
    for row in rows:
        factor = P.lr_factor(row["step"], schedule="cosine", warmup_steps=2, total_steps=5)
        assert row["lr/actor"] == pytest.approx(2e-3 * factor, rel=1e-12)
        assert row["lr/critic"] == pytest.approx(5e-3 * factor, rel=1e-12)
    # the same run stopped by SIGTERM during iteration 3 (it saves there) and resumed
    split = dataclass_replace(straight, output_dir=str(tmp_path / "split"))
    update, calls = P.ppo_update, []

    def stopped_during_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return update(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(P, "ppo_update", stopped_during_the_third)
        assert P.train(split) == 128 + signal.SIGTERM
    state = torch.load(Path(split.output_dir) / P.CHECKPOINT, weights_only=True)
    assert state["step"] == 3 and [s["last_epoch"] for s in state["schedulers"]] == [3, 3]
    assert P.train(dataclass_replace(split, resume=True)) == 0
    assert without_timing(read_metrics(split.output_dir)) == without_timing(rows)
    with pytest.raises(P.UsageError, match="--steps"):
        P.train(dataclass_replace(split, steps=6, resume=True))


def check_counts(row):
    return {name[len("check/"):]: count for name, count in row.items()
            if name.startswith("check/")}


def check_warnings(stderr):
    return [line for line in stderr.splitlines() if line.startswith("warning: check ")]


def test_live_checks_stay_silent_on_a_healthy_run(tmp_path, capsys):
    """The demo past the critic's warm-up: every invariant holds, nothing is warned about,
    and the counts are logged (0) on every iteration."""
    cfg = P.Config(output_dir=str(tmp_path / "run"), steps=P.CRITIC_WARMUP + 2, samples=0)
    assert P.train(cfg) == 0
    rows = read_metrics(cfg.output_dir)
    assert all(check_counts(row) == dict.fromkeys(P.InvariantChecks.ADVICE, 0.0)
               for row in rows)
    assert check_warnings(capsys.readouterr().err) == []


def dropout_left_on(monkeypatch, tiny_dirs):
    monkeypatch.setattr(P, "disable_dropout", lambda model: None)
    return {}


def hotter_update(monkeypatch, tiny_dirs):
    update = P.ppo_update
    monkeypatch.setattr(P, "ppo_update", lambda *args, **kwargs: update(
        *args[:5], P.dataclasses.replace(args[5], temperature=2 * args[5].temperature),
        **kwargs))
    return {}


def another_reference(monkeypatch, tiny_dirs):
    load = P.load_models

    def perturbed(*args, **kwargs):
        actor, ref_model, *rest = load(*args, **kwargs)
        with torch.no_grad():
            for p in ref_model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return actor, ref_model, *rest
    monkeypatch.setattr(P, "load_models", perturbed)
    return {}


def lora_dropout_on(monkeypatch, tiny_dirs):
    # B = 0 at the start, so the LoRA path's dropout changes nothing on the first iteration
    return dict(model=tiny_dirs["policy"], lora_r=4, lora_dropout=0.5, actor_lr=1e-2)


def cut_responses(monkeypatch, tiny_dirs):
    return dict(reward_model=tiny_dirs["reward"], max_new_tokens=2)


def critic_trained_backwards(monkeypatch, tiny_dirs):
    loss = P.critic_loss_fn
    monkeypatch.setattr(P, "critic_loss_fn", lambda *args, **kwargs: -loss(*args, **kwargs))
    return dict(steps=P.CRITIC_WARMUP + 2, batch_size=32, mini_batch_size=8, ppo_epochs=4,
                max_new_tokens=P.Config.max_new_tokens)


@pytest.mark.parametrize("fault, check, failing_steps", [
    (dropout_left_on, "first_ratio", [1, 2]),
    (hotter_update, "first_ratio", [1, 2]),
    (lora_dropout_on, "first_ratio", [2]),
    (another_reference, "kl_at_start", [1]),
    (cut_responses, "no_eos", [1, 2]),
    (critic_trained_backwards, "explained_variance", [P.CRITIC_WARMUP + k for k in range(3)]),
])
def test_each_live_check_fires_on_the_bug_it_watches_for(tiny_dirs, tmp_path, monkeypatch,
                                                         capsys, fault, check, failing_steps):
    """One plausible bug each: its check counts every failing iteration, warns once, names
    the likely causes, and the other checks stay at 0."""
    cfg = tiny_config(tmp_path, **{"steps": 2, **fault(monkeypatch, tiny_dirs)})
    assert P.train(cfg) == 0
    rows = read_metrics(cfg.output_dir)
    for row in rows:
        failed_so_far = sum(step <= row["step"] for step in failing_steps)
        assert check_counts(row) == {**dict.fromkeys(P.InvariantChecks.ADVICE, 0.0),
                                     check: float(failed_so_far)}, row["step"]
    warnings = check_warnings(capsys.readouterr().err)
    assert len(warnings) == 1 and f"check {check} failed at step {failing_steps[0]}" in warnings[0]
    assert P.InvariantChecks.ADVICE[check] in warnings[0]


@pytest.mark.parametrize("penalty", [None, 1.0])
def test_no_eos_is_watched_only_when_cut_responses_go_unpenalized(tiny_dirs, tmp_path, capsys,
                                                                  penalty):
    """Responses cut at --max-new-tokens: a reward model scores cut sentences, unless
    --missing-eos-penalty already prices them in (then there is nothing to warn about); a
    rule-based reward decides itself what a cut response is worth."""
    for reward, watched in ((dict(reward_model=tiny_dirs["reward"]), penalty is None),
                            (dict(), False)):
        cfg = tiny_config(tmp_path, steps=1, max_new_tokens=2, missing_eos_penalty=penalty,
                          output_dir=str(tmp_path / f"run{len(reward)}"), **reward)
        assert P.train(cfg) == 0
        row = read_metrics(cfg.output_dir)[-1]
        assert row["response/no_eos"] > P.NO_EOS_LIMIT  # the check's condition is there
        assert row["check/no_eos"] == float(watched), reward
    warned = check_warnings(capsys.readouterr().err)
    assert len(warned) == (penalty is None)


def test_live_check_counts_resume_with_the_run(tiny_dirs, tmp_path, monkeypatch):
    """The counts and the critic's window are part of the checkpoint: a resumed run goes on
    counting where the interrupted one stopped."""
    dropout_left_on(monkeypatch, tiny_dirs)
    cfg = tiny_config(tmp_path, steps=2, save_every=1)
    assert P.train(cfg) == 0
    assert P.train(dataclass_replace(cfg, steps=3, resume=True)) == 0
    rows = read_metrics(cfg.output_dir)
    assert [row["check/first_ratio"] for row in rows] == [1.0, 2.0, 3.0]
    state = torch.load(Path(cfg.output_dir) / P.CHECKPOINT, weights_only=True)["checks"]
    assert state["counts"]["first_ratio"] == 3
    assert state["explained_variance"] == pytest.approx(
        [row["val/explained_variance"] for row in rows], abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Nothing lost: one run per output directory, locked; checkpoints that run no code
# ------------------------------------------------------------------------------------------------

SMALL_RUN = ["--batch-size", "4", "--mini-batch-size", "2", "--max-new-tokens", "4",
             "--ppo-epochs", "1", "--samples", "0"]


def file_bytes(directory):
    """The run's files, byte for byte (the lock file holds the last holder's pid)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in Path(directory).rglob("*")
            if p.is_file() and p.name != P.LOCK_FILE}


@pytest.mark.slow
def test_default_output_dir_is_new_for_every_run(tmp_path):
    """Two default runs started together: each gets its own runs/<model>__<seed>__<time>,
    says where, and keeps its outputs."""
    procs = [start_cli([*SMALL_RUN, "--steps", "1"], tmp_path) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("tiny-gpt2__0__") for r in runs)
    for run in runs:
        assert [row["step"] for row in read_metrics(run)] == [1]
        assert (run / P.POLICY / "model.safetensors").is_file() and (run / P.CHECKPOINT).is_file()
    said = sorted(line.split()[-1] for out, _ in outputs for line in out.splitlines()
                  if line.startswith("outputs go to"))
    assert said == [str(run.relative_to(tmp_path)) for run in runs]


@pytest.mark.slow
def test_an_earlier_run_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    """A directory holding a run's results is refused before any model loads (a model that
    cannot load would otherwise be the error) and is left byte for byte; --overwrite starts
    afresh there in every output: it deletes the earlier checkpoint, metrics, samples,
    TensorBoard event files and W&B run id (so that no curve continues the old one), and the
    saved policy, only once the new run has loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    eval_prompts = tmp_path / "eval.txt"
    eval_prompts.write_text("held out\n")
    assert P.train(tiny_config(tmp_path, output_dir=str(out), steps=2, eval_every=1,
                               eval_prompts=str(eval_prompts))) == 0
    (out / P.WANDB_ID_FILE).write_text("earlier-run-id")  # as --wandb leaves it
    earlier_events = set(out.glob("events.out.tfevents.*"))
    assert earlier_events and (out / P.SAMPLES).exists() and (out / P.POLICY).is_dir()
    before = file_bytes(out)
    capsys.readouterr()
    assert P.main([*SMALL_RUN, "--output-dir", str(out), "--steps", "1",
                   "--model", "no-such-org/no-such-model"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "earlier run" in lines[0]
    assert "--resume" in lines[0] and "--overwrite" in lines[0]
    assert P.main([*SMALL_RUN, "--output-dir", str(out), "--steps", "1", "--overwrite",
                   "--model", "no-such-org/no-such-model"]) == 2
    assert "cannot load --model" in capsys.readouterr().err
    assert file_bytes(out) == before  # neither start changed anything
    fresh = run_cli([*SMALL_RUN, "--output-dir", str(out), "--steps", "1", "--overwrite"],
                    tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert [row["step"] for row in read_metrics(out)] == [1]
    assert torch.load(out / P.CHECKPOINT, weights_only=True)["step"] == 1
    assert not (out / P.WANDB_ID_FILE).exists() and not (out / P.SAMPLES).exists()
    assert not earlier_events & set(out.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(out), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("objective/kl")] == [1]
    assert "eval/scores" not in events.Tags()["scalars"]
    assert file_bytes(out / P.POLICY) != {k.removeprefix(P.POLICY + "/"): v
                                          for k, v in before.items()
                                          if k.startswith(P.POLICY + "/")}


@pytest.mark.slow
def test_unwritable_output_dir_is_reported_before_models_load(tmp_path):
    """A file in the directory's place, a path through a file, a directory that cannot be
    created: exit 2 and one line at start (the model named cannot load, so an error about
    the directory proves it was checked first)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    cases = {"a file in its place": (a_file, "is a file"),
             "a path through a file": (a_file / "run", "cannot be written")}
    if os.geteuid() == 0:  # root writes through permissions; /proc takes no new directories
        cases["no permission"] = (Path("/proc/ppo-rlhf-test-run"), "cannot be written")
    else:
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o500)
        cases["no permission"] = (locked / "run", "cannot be written")
    for name, (out, needle) in cases.items():
        result = run_cli([*SMALL_RUN, "--output-dir", str(out), "--steps", "1",
                          "--model", "no-such-org/no-such-model"], tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], (name, lines)
    assert a_file.read_text() == "not a directory"


@pytest.mark.slow
@pytest.mark.parametrize("lora", [[], ["--lora-r", "4"]], ids=["full", "lora"])
def test_sigkill_and_resume_reproduce_the_uninterrupted_run(tmp_path, lora):
    """A run killed with SIGKILL (no handler runs, the lock is left to the kernel) resumes from
    its last checkpoint, and its metrics equal those of a run never interrupted; with LoRA
    too, whose checkpoints hold only adapters and value head."""
    args = [*SMALL_RUN, "--save-every", "2", "--kl-controller", "adaptive", "--kl-target",
            "0.5", *lora]
    killed = tmp_path / "killed"
    proc = start_cli([*args, "--output-dir", str(killed), "--steps", "400"], tmp_path)
    wait_for_rows(killed / P.METRICS, 3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    checkpointed = torch.load(killed / P.CHECKPOINT, weights_only=True)["step"]
    steps = str(checkpointed + 3)
    resumed = run_cli([*args, "--output-dir", str(killed), "--steps", steps, "--resume"],
                      tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    straight = run_cli([*args, "--output-dir", str(tmp_path / "straight"), "--steps", steps],
                       tmp_path)
    assert straight.returncode == 0, straight.stderr
    rows = read_metrics(killed)
    assert [row["step"] for row in rows] == list(range(1, int(steps) + 1))
    assert without_timing(rows) == without_timing(read_metrics(tmp_path / "straight"))
    # the curves too: TensorBoard drops the points the killed run logged after its checkpoint
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(killed), size_guidance={"scalars": 0})
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("objective/kl")]
    assert logged == [(row["step"], pytest.approx(row["objective/kl"], rel=1e-6, abs=1e-6))
                      for row in rows]


@pytest.mark.filterwarnings("error::UserWarning")  # nothing a user must read
def test_sharded_checkpoint_in_one_process_and_its_fallback_copy_resume(tmp_path):
    """--data-parallel fsdp in a single process writes the sharded format (so that any number
    of ranks can resume); a kill between save_sharded_checkpoint's two renames leaves only
    checkpoint.old/, which --resume reads."""
    cfg = tiny_config(tmp_path, steps=2, data_parallel="fsdp")
    assert P.train(cfg) == 0
    out = Path(cfg.output_dir)
    assert (out / P.SHARDED_CHECKPOINT / "meta.pt").is_file() and not (out / P.CHECKPOINT).exists()
    os.replace(out / P.SHARDED_CHECKPOINT, out / (P.SHARDED_CHECKPOINT + ".old"))
    assert P.train(dataclass_replace(cfg, steps=3, resume=True)) == 0
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3]


class RunsCode:
    """Pickles as a call to os.system: what a malicious checkpoint.pt would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    """checkpoint.pt is loaded with weights_only=True: a file that would run code when
    unpickled is refused in one line (exit 2), and the code does not run."""
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    out.mkdir()
    torch.save({"step": 1, "actor": RunsCode(marker)}, out / P.CHECKPOINT)
    result = run_cli([*SMALL_RUN, "--output-dir", str(out), "--steps", "2", "--resume"],
                     tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "refusing" in lines[0], lines
    assert not marker.exists()
    torch.load(out / P.CHECKPOINT, weights_only=False)  # the file does run code, unguarded
    assert marker.exists()


def test_reward_fn_imports_only_the_named_file(tmp_path, monkeypatch):
    """'file.py:f' executes that file once, as its own module (a stdlib name stays the
    stdlib's); a '.py' path that does not exist is an error, never a module of that name."""
    import json as stdlib_json
    log = tmp_path / "imported.log"
    named = tmp_path / "json.py"
    named.write_text(f"open({str(log)!r}, 'a').write('x')\n"
                     "def f(prompts, responses):\n    return [1.0] * len(responses)\n")
    fn = P.load_reward_fn(f"{named}:f")
    assert fn(["p"], ["r"]) == [1.0] and log.read_text() == "x"
    assert sys.modules["json"] is stdlib_json
    monkeypatch.chdir(tmp_path / "..")
    with pytest.raises(P.UsageError, match="cannot import"):
        P.load_reward_fn("json.py:dumps")
    assert log.read_text() == "x"


# ------------------------------------------------------------------------------------------------
# bf16 compute, on any device. What differs on a GPU is mostly bf16, which also runs on a CPU
# (torch.autocast("cpu", dtype=torch.bfloat16)): each test runs on the CPU in every CI run, and
# on CUDA where a GPU exists (skipped elsewhere, saying why). What stays CUDA-only: NCCL,
# pinned memory, device placement, fused AdamW's CUDA kernel.
# ------------------------------------------------------------------------------------------------

HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; none on this machine")
BF16 = pytest.mark.skipif(not (HAS_CUDA and torch.cuda.is_bf16_supported()),
                          reason="needs a CUDA GPU with bf16")
TWO_GPUS = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2,
                              reason="needs 2 CUDA GPUs for a 2-rank NCCL run")
BF16_DEVICES = ["cpu", pytest.param("cuda", marks=BF16)]
# The first minibatch's largest |ratio - 1| under bf16 autocast, measured on CPU (2026-11-23):
# log-probs recorded while sampling 4.2e-3 here (tiny GPT-2), 1.4e-2 on a GPT-2-size model
# (KV-cached and full attention round differently); recomputed with --recompute-log-probs,
# 0 on CPU. The bounds: 5x the tiny measurement, and on CPU a bound the rollout without
# autocast (3.3e-3 from an update under it) would break. On CUDA the recomputed forward runs
# other batch shapes than the rollout's, whose kernels may round differently: not measured.
BF16_RATIO_TOLERANCE = {("cpu", False): 2e-2, ("cpu", True): 1e-3,
                        ("cuda", False): 2e-2, ("cuda", True): 2e-2}


def bf16_autocast(device="cuda"):
    return lambda: torch.autocast(device, dtype=torch.bfloat16)


def device_rollout(models, device, autocast, **kwargs):
    return rollout(*models, autocast=autocast, **kwargs)


@pytest.mark.parametrize("device", BF16_DEVICES)
@pytest.mark.parametrize("recompute", [False, True])
def test_first_minibatch_ratio_under_bf16_autocast(tiny_dirs, device, recompute):
    """Under bf16 autocast the update's forward of the first minibatch gives back the rollout's
    log-probs to bf16 rounding (recorded while sampling) or to BF16_RATIO_TOLERANCE's bound
    (recomputed, as the update computes them). The log-probs stay fp32."""
    torch.manual_seed(17)
    models = make_models(tiny_dirs, device)
    with torch.no_grad():  # away from the reference, so that nothing lines up by chance
        for p in models[0].parameters():
            p.add_(0.02 * torch.randn_like(p))
    exp = device_rollout(models, device, bf16_autocast(device), recompute_log_probs=recompute)
    assert exp.log_probs.device.type == device and exp.log_probs.dtype == torch.float32
    mb = exp.select(torch.arange(4))
    with bf16_autocast(device)():
        log_probs, _ = P.policy_log_probs(models[0], mb.input_ids, mb.attention_mask,
                                          exp.response_length, temperature=1.0)
    assert log_probs.dtype == torch.float32
    ratio = torch.exp(torch.where(mb.action_mask, log_probs - mb.log_probs, 0.0))
    assert (ratio - 1).abs().max().item() <= BF16_RATIO_TOLERANCE[device, recompute]


def test_bf16_autocast_keeps_log_softmax_and_value_head_in_fp32(tiny_dirs):
    """Under CPU bf16 autocast the blocks compute in bf16, but the log-softmax takes the logits
    in fp32 and the value head multiplies in fp32 with fp32 weights: both equal a float64
    computation from the very logits and hidden states the model produced (a bf16 head or
    log-softmax would keep 8 bits of them)."""
    actor, critic, _, _, tokenizer = distinct_models(tiny_dirs)
    with torch.no_grad():
        critic.v_head.weight.mul_(10.0)
        critic.v_head.bias.fill_(3.3)
    captured = {}
    actor.lm_head.register_forward_hook(lambda m, i, out: captured.update(logits=out))
    critic.backbone.register_forward_hook(
        lambda m, i, out: captured.update(hidden=out.last_hidden_state))
    encoded = tokenizer(RAGGED_PROMPTS, return_tensors="pt", padding=True)
    ids, mask = encoded.input_ids, encoded.attention_mask
    with torch.no_grad(), bf16_autocast("cpu")():
        log_probs, _ = P.policy_log_probs(actor, ids, mask, 4, temperature=0.7)
        values = P.critic_values(critic, ids, mask, 4)
    assert captured["logits"].dtype == torch.bfloat16  # (the final layer norm runs in fp32)
    assert log_probs.dtype == values.dtype == torch.float32
    logits = captured["logits"][:, :-1].double() / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, -4:, None])[..., 0]
    close(torch.where(mask[:, -4:].bool(), log_probs, 0.0),
          torch.where(mask[:, -4:].bool(), expected, 0.0), atol=1e-5)
    head = captured["hidden"].double() @ critic.v_head.weight[0].double() + 3.3
    close(values, head[:, -5:-1], atol=1e-4)


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float16])
def test_trained_models_are_fp32_whatever_dtype_the_checkpoint_was_saved_in(tiny_dirs,
                                                                            tmp_path, saved):
    """Models saved in bf16 or fp16 (as Qwen2.5- and Llama-3.1-Instruct are): the actor and
    the critic (from the policy or from --critic-model) load in fp32, master weights that a
    small AdamW step does not round away; the reference and the reward model in the frozen
    dtype asked for. A run on the CPU without autocast then trains."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    dirs = {}
    for name, loader in (("policy", AutoModelForCausalLM),
                         ("reward", AutoModelForSequenceClassification)):
        model = loader.from_pretrained(tiny_dirs[name], dtype=saved)
        assert all(p.dtype == saved for p in model.parameters())
        model.save_pretrained(tmp_path / name)
        P.load_tokenizer(tiny_dirs[name], "test").save_pretrained(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    for critic_model, frozen in ((None, False), (dirs["reward"], True), (dirs["policy"], True)):
        cfg = P.Config(model=dirs["policy"], reward_model=dirs["reward"],
                       critic_model=critic_model, frozen_bf16=frozen)
        actor, ref_model, critic, _, score_fn = P.load_models(cfg, torch.device("cpu"))
        frozen_dtype = torch.bfloat16 if frozen else torch.float32
        assert {p.dtype for p in [*actor.parameters(), *critic.parameters()]} == {torch.float32}
        assert {p.dtype for p in ref_model.parameters()} == {frozen_dtype}
        reward_model = score_fn.fits.__self__.model  # the RewardModelScorer's
        assert {p.dtype for p in reward_model.parameters()} == {frozen_dtype}
    cfg = tiny_config(tmp_path, model=dirs["policy"], reward_model=dirs["reward"],
                      critic_model=dirs["reward"], bf16=False, steps=1)
    assert P.train(cfg) == 0
    # with LoRA the saved-in-bf16 base is held in the frozen dtype asked for, the adapters
    # (and the value head) in fp32; such a run trains too
    for frozen in (False, True):
        cfg = P.Config(model=dirs["policy"], lora_r=4, frozen_bf16=frozen)
        actor, _, critic, _, _ = P.load_models(cfg, torch.device("cpu"))
        weights = dict(actor.named_parameters())
        assert {p.dtype for n, p in weights.items() if "lora_" in n} == {torch.float32}
        assert {p.dtype for n, p in weights.items() if "lora_" not in n} == {
            torch.bfloat16 if frozen else torch.float32}
        assert critic.v_head.weight.dtype == torch.float32
    assert P.train(tiny_config(tmp_path, model=dirs["policy"], lora_r=4, bf16=False, steps=1,
                               output_dir=str(tmp_path / "lora"))) == 0


def test_bf16_is_a_choice_on_any_device(monkeypatch, capsys):
    """Default: bf16 on a CUDA GPU that has it, not on a CPU. --bf16 asks for it on a CPU too,
    with a warning where the CPU has no bf16 units; --no-bf16 turns it off everywhere."""
    cpu = torch.device("cpu")
    assert not P.uses_bf16(P.Config(), cpu)
    assert not P.uses_bf16(P.Config(bf16=False), cpu)
    monkeypatch.setattr(P, "cpu_has_bf16_units", lambda: True)
    assert P.uses_bf16(P.Config(bf16=True), cpu) and not capsys.readouterr().err
    monkeypatch.setattr(P, "cpu_has_bf16_units", lambda: False)
    assert P.uses_bf16(P.Config(bf16=True), cpu)
    assert "without bf16 units" in capsys.readouterr().err
    assert P.frozen_bf16(P.Config(), True) and not P.frozen_bf16(P.Config(), False)
    assert not P.frozen_bf16(P.Config(frozen_bf16=False), True)


def test_gpu_acceptance_reports_mfu_against_the_datasheet_bf16_peak():
    """benchmarks/gpu_acceptance.py: the GPU's peak found by name (the longest match: an H100
    PCIe is not an H100 SXM), MFU = the iteration's FLOP/s over that peak, "n/a" when the GPU
    is unknown."""
    spec = P.importlib.util.spec_from_file_location(
        "gpu_acceptance", HERE / "benchmarks" / "gpu_acceptance.py")
    acceptance = P.importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acceptance)
    assert acceptance.bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert acceptance.bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert acceptance.bf16_peak_flops("NVIDIA H200") == 989e12
    assert acceptance.bf16_peak_flops("a GPU nobody knows") is None
    row = {"s/iter": 2.0, "rollout s": 0.5, "update s": 1.5, "tokens/s": 4096.0,
           "peak MB": 20000.0, "FLOP/s": 98.9e12}
    bench = {"device": "NVIDIA H200", "preset": "gpt2", "rounds": 1,
             "rows": [{"trainer": "ppo_rlhf", **row}, {"trainer": "TRL", **row, "s/iter": 4.0}]}
    table = acceptance.acceptance_table(bench, 989e12, "5 passed", "2026-12-01").splitlines()
    assert table[0].startswith("NVIDIA H200, 2026-12-01") and "5 passed" in table[0]
    assert table[4] == "| ppo_rlhf | 2.000 | 0.500 | 1.500 | 4096 | 20000 | 98.90 | 10.0% |"
    assert table[-1] == "ours / TRL time per iteration: 0.50"
    unknown = acceptance.acceptance_table(bench, None, "5 passed", "2026-12-01").splitlines()
    assert unknown[4].endswith("| n/a |")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=BF16)])
def test_nonfinite_step_is_skipped_by_fused_adamw_on_the_device(tiny_dirs, device):
    """A NaN advantage: GradScaler finds it where the gradients are, the fused AdamW the
    trainer uses skips its step (weights kept, Adam's step count and moments still 0), and
    the next finite step trains. Under bf16 autocast."""
    torch.manual_seed(18)
    autocast = bf16_autocast(device)
    models = make_models(tiny_dirs, device)
    actor, critic = models[0], models[1]
    exp = device_rollout(models, device, autocast)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (actor, critic)]
    parallel = P.DataParallel(torch.device(device), actor, critic)  # the trainer's step
    before = [p.detach().clone() for p in actor.parameters()]
    poisoned = P.dataclasses.replace(exp, advantages=exp.advantages.clone())
    poisoned.advantages[0, 0] = float("nan")
    _, skipped = P.ppo_update(actor, critic, *optimizers, poisoned,
                              P.PPOConfig(ppo_epochs=1, mini_batch_size=8), autocast=autocast,
                              parallel=parallel)
    assert skipped.device.type == device and skipped.tolist() == [True]
    assert all(torch.equal(a, b) for a, b in zip(before, actor.parameters()))
    for state in optimizers[0].state.values():
        assert state["step"].item() == 0 and not state["exp_avg"].any()
    _, skipped = P.ppo_update(actor, critic, *optimizers, exp,
                              P.PPOConfig(ppo_epochs=1, mini_batch_size=8), autocast=autocast,
                              parallel=parallel)
    assert skipped.tolist() == [False]
    assert any(not torch.equal(a, b) for a, b in zip(before, actor.parameters()))


@pytest.mark.parametrize("device", BF16_DEVICES)
def test_bf16_run_checkpoints_and_resumes(tiny_dirs, tmp_path, monkeypatch, device):
    """A few iterations with bf16 autocast (on the run's device) and the reward model: every
    forward runs under autocast, metrics are finite, the checkpoint loads with weights_only,
    and a resume continues with the optimizers' state (Adam's step count equals an
    uninterrupted run's); on the CPU, deterministic, the metrics equal it exactly."""
    autocast_seen = []
    original = P.policy_log_probs

    def recording(*args, **kwargs):
        autocast_seen.append(torch.is_autocast_enabled(device)
                             and torch.get_autocast_dtype(device) == torch.bfloat16)
        return original(*args, **kwargs)
    monkeypatch.setattr(P, "policy_log_probs", recording)
    common = dict(model=tiny_dirs["policy"], reward_model=tiny_dirs["reward"], device=device,
                  bf16=True, save_every=1, recompute_log_probs=True)
    straight = tiny_config(tmp_path, output_dir=str(tmp_path / "straight"), steps=4, **common)
    assert P.train(straight) == 0
    assert autocast_seen and all(autocast_seen)
    split = tiny_config(tmp_path, output_dir=str(tmp_path / "split"), steps=2, **common)
    assert P.train(split) == 0
    assert P.train(dataclass_replace(split, steps=4, resume=True)) == 0
    rows = read_metrics(split.output_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(v) for row in rows for v in row.values())
    if device == "cpu":
        assert without_timing(rows) == without_timing(read_metrics(straight.output_dir))
    states = [torch.load(Path(cfg.output_dir) / P.CHECKPOINT, weights_only=True)
              for cfg in (straight, split)]
    steps = [[float(s["step"]) for s in state["actor_optimizer"]["state"].values()]
             for state in states]
    assert steps[0] == steps[1] and steps[0][0] == 4 * 2 * 2  # 4 iterations x 2 epochs x 2


@pytest.mark.slow
@TWO_GPUS
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_gpu_nccl_run_writes_one_set_of_outputs_and_resumes(tmp_path, engine):
    """torchrun with 2 GPUs (NCCL), replicated or sharded (bf16 mixed precision): one set of
    outputs from rank 0, and a resume on 2 ranks."""
    out = tmp_path / "run"
    args = [str(HERE / "ppo_rlhf.py"), "--output-dir", str(out), "--device", "cuda",
            "--data-parallel", engine, *SMALL_RUN]
    result = torchrun([*args, "--steps", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step    2/2") == 1 and "x2" in result.stdout
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    result = torchrun([*args, "--steps", "3", "--resume"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


# ------------------------------------------------------------------------------------------------
# LoRA: one frozen base serves the actor (+ adapter), the reference (adapters off) and the critic
# (+ a second adapter and the value head)
# ------------------------------------------------------------------------------------------------

def lora_models(tiny_dirs, seed=0, **options):
    """actor, reference, critic and tokenizer with --lora-r 4, as a run loads them."""
    cfg = P.Config(model=tiny_dirs["policy"], lora_r=4, seed=seed, **options)
    torch.manual_seed(seed)
    actor, ref_model, critic, tokenizer, _ = P.load_models(cfg, torch.device("cpu"))
    return actor, ref_model, critic, tokenizer


def lora_config(tiny_dirs, tmp_path, name="run", **overrides):
    return tiny_config(tmp_path, model=tiny_dirs["policy"], lora_r=4,
                       output_dir=str(tmp_path / name), **overrides)


def plain_logits(model, tokenizer, prompts=RAGGED_PROMPTS):
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask).logits


def adapter_key(name):
    """A LoRA weight's place in the transformer ("h.0.attn.c_attn.lora_A.critic.weight"),
    whatever wraps the transformer (PeftModel, LMHead, ValueModel)."""
    return name[name.index(".h.") + 1:]


def fill_adapters(*models):
    """Every LoRA weight set from its place's own seed: the same values in every model that
    holds that place, and B != 0, so that adapters change what the model computes."""
    import zlib
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if "lora_" in name:
                    g = torch.Generator().manual_seed(zlib.crc32(adapter_key(name).encode()))
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_lora_reference_is_the_base_to_the_bit(tiny_dirs):
    """The reference is the base model with the adapters off: its logits equal those of the
    policy loaded alone, bit for bit, before and after the adapters change; the actor starts
    equal to it too (B = 0), then moves with its adapter."""
    actor, ref_model, critic, tokenizer = lora_models(tiny_dirs)
    base, _ = P.load_policy(tiny_dirs["policy"], seed=0)
    expected = plain_logits(base, tokenizer)
    assert torch.equal(plain_logits(ref_model, tokenizer), expected)
    assert torch.equal(plain_logits(actor, tokenizer), expected)
    fill_adapters(actor, critic)
    assert torch.equal(plain_logits(ref_model, tokenizer), expected)
    assert not torch.allclose(plain_logits(actor, tokenizer), expected, atol=1e-3)
    assert actor.active_adapter == P.LORA_ACTOR  # the reference's forward left it as it was


@pytest.mark.parametrize("options, r, alpha, dropout, targets", [
    ([], 4, 8, 0.0, {"c_attn", "c_proj", "c_fc"}),  # defaults: alpha 2r, no dropout, all linear
    (["--lora-alpha", "2", "--lora-dropout", "0.1", "--lora-target-modules", "c_attn, c_fc"],
     4, 2, 0.1, {"c_attn", "c_fc"}),
])
def test_lora_options_reach_both_adapters(tiny_dirs, options, r, alpha, dropout, targets):
    """--lora-* from the command line to PEFT: rank, alpha (scaling alpha / r), dropout and
    target modules of the actor's and the critic's adapters; every linear layer of the blocks
    by default, never the LM head."""
    cfg = P.parse_args(["--model", tiny_dirs["policy"], "--lora-r", str(r), *options])
    torch.manual_seed(0)
    actor, _, critic, _, _ = P.load_models(cfg, torch.device("cpu"))
    for adapter in (P.LORA_ACTOR, P.LORA_CRITIC):
        layers = {name.split(".")[-1]: module for name, module in actor.named_modules()
                  if hasattr(module, "lora_A") and adapter in module.lora_A}
        assert set(layers) == targets, adapter
        for module in layers.values():
            assert module.r[adapter] == r and module.scaling[adapter] == alpha / r
            dropout_layer = module.lora_dropout[adapter]
            assert getattr(dropout_layer, "p", 0.0) == dropout
    assert not hasattr(actor.get_base_model().lm_head, "lora_A")


def test_default_learning_rates_suit_the_model_and_the_method():
    """Actor: 1e-3 for the built-in random model, 1e-5 for a pretrained one, 10x that with
    LoRA; the critic 5x the actor's; given rates win."""
    cases = [(dict(), (1e-3, 5e-3)), (dict(model="gpt2"), (1e-5, 5e-5)),
             (dict(model="gpt2", lora_r=8), (1e-4, 5e-4)),
             (dict(model="gpt2", lora_r=8, actor_lr=3e-4), (3e-4, 1.5e-3)),
             (dict(model="gpt2", actor_lr=3e-4, critic_lr=1e-6), (3e-4, 1e-6))]
    for options, expected in cases:
        assert P.learning_rates(P.Config(**options)) == pytest.approx(expected, rel=1e-12)


def test_lora_on_a_bf16_base_keeps_values_and_log_probs_fp32(tiny_dirs):
    """--frozen-bf16 with LoRA stores the shared base in bf16, also without autocast (a CPU
    run): the critic's hidden states come out in bf16, and the value head and the log-softmax
    still compute in fp32, equal to an fp32 head applied to those hidden states."""
    actor, ref_model, critic, tokenizer = lora_models(tiny_dirs, frozen_bf16=True)
    fill_adapters(actor, critic)
    with torch.no_grad():
        critic.v_head.weight.normal_()
    encoded = tokenizer(RAGGED_PROMPTS, return_tensors="pt", padding=True,
                        add_special_tokens=False)
    ids, mask = encoded.input_ids, encoded.attention_mask
    with torch.no_grad():
        values = P.critic_values(critic, ids, mask, response_length=3)
        with P.use_adapter(actor, P.LORA_CRITIC):
            hidden = critic.backbone(input_ids=ids, attention_mask=mask,
                                     position_ids=P.position_ids_from(mask)).last_hidden_state
        log_probs, _ = P.policy_log_probs(actor, ids, mask, 3, 1.0)
    assert hidden.dtype == torch.bfloat16
    assert values.dtype == log_probs.dtype == torch.float32
    expected = hidden.float() @ critic.v_head.weight[0] + critic.v_head.bias
    torch.testing.assert_close(values, expected[:, -4:-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
def test_lora_first_kl_is_zero(tiny_dirs, recompute):
    """The first rollout's log-probs against the reference: equal to the bit when the policy's
    are recomputed by a forward like the reference's, within float rounding when recorded while
    sampling (a KV-cached forward rounds differently)."""
    actor, ref_model, critic, tokenizer = lora_models(tiny_dirs)
    torch.manual_seed(1)
    exp = rollout(actor, critic, ref_model, P.checked_scores(P.vowel_reward, "vowels"),
                  tokenizer, recompute_log_probs=recompute)
    mask = exp.action_mask
    if recompute:
        assert torch.equal(exp.log_probs[mask], exp.ref_log_probs[mask])
    else:
        torch.testing.assert_close(exp.log_probs[mask], exp.ref_log_probs[mask], atol=1e-5,
                                   rtol=0)


def capture_run(monkeypatch):
    """The Run of the next P.train, and a copy of its trained and frozen weights taken just
    before the final policy is saved (with LoRA, saving merges the adapter into the base)."""
    captured = {}
    save = P.save_final_policy

    def spy(run):
        captured["run"] = run
        captured["actor"] = {k: v.clone() for k, v in run.models.actor.state_dict().items()}
        captured["critic"] = {k: v.clone() for k, v in run.models.critic.state_dict().items()}
        captured["memory"] = P.memory_bytes(run)
        captured["table"] = P.model_table(run)
        captured["logits"] = plain_logits(run.models.actor, run.models.tokenizer)
        return save(run)
    monkeypatch.setattr(P, "save_final_policy", spy)
    return captured


def test_lora_update_changes_only_the_adapters_and_the_value_head(tiny_dirs, tmp_path,
                                                                   monkeypatch):
    """After training, every base weight is bit-identical to the loaded model's; every adapter
    weight that starts at 0 (B) has moved, in both adapters; the value head has moved."""
    captured = capture_run(monkeypatch)
    cfg = lora_config(tiny_dirs, tmp_path, steps=2)
    assert P.train(cfg) == 0
    actor, ref_model, critic, _ = lora_models(tiny_dirs, seed=cfg.seed)
    before = {"actor": actor.state_dict(), "critic": critic.state_dict()}
    for role in ("actor", "critic"):
        after = captured[role]
        assert after.keys() == before[role].keys()
        for name, value in before[role].items():
            trained = "lora_B" in name or name.startswith("v_head.")
            if trained:
                assert not torch.equal(after[name], value), name
            elif "lora_A" not in name:  # the frozen base
                assert torch.equal(after[name], value), name
    lora_b = [k for k in captured["actor"] if "lora_B" in k]
    assert {k.split(".")[-2] for k in lora_b} == {P.LORA_ACTOR, P.LORA_CRITIC}


@pytest.mark.parametrize("frozen_bf16", [False, True])
def test_lora_holds_one_base_and_memory_bytes_count_it_once(tiny_dirs, tmp_path, monkeypatch,
                                                            frozen_bf16):
    """memory_bytes against the sizes written out: full fine-tuning holds actor, reference and
    critic (36 B per policy parameter in fp32, with gradients and AdamW's two moments); LoRA
    one base (4 B, or 2 with --frozen-bf16) plus fp32 adapters, value head, their gradients and
    moments. The base's storages are shared by actor, critic and reference, not copied."""
    base, _ = P.load_policy(tiny_dirs["policy"], seed=0)
    n = sum(p.numel() for p in base.parameters())  # GPT-2 ties lm_head to wte: counted once
    hidden = base.config.hidden_size
    rows = {}
    for lora_r in (0, 4):
        captured = capture_run(monkeypatch)
        cfg = tiny_config(tmp_path, model=tiny_dirs["policy"], lora_r=lora_r, steps=1,
                          frozen_bf16=frozen_bf16, output_dir=str(tmp_path / f"r{lora_r}"))
        assert P.train(cfg) == 0
        rows[lora_r] = captured["memory"]
        run = captured["run"]
        states = len(run.actor_optimizer.state) + len(run.critic_optimizer.state)
        step_counters = 4 * states  # fused AdamW's per-parameter step (one fp32 each)
        frozen = 2 if frozen_bf16 else 4
        if lora_r == 0:  # the critic: the transformer (all of n: lm_head is tied) + v_head
            critic = 4 * (n + hidden + 1)
            assert rows[0] == {"parameters": 4 * n + frozen * n + critic,
                               "gradients": 4 * n + critic,
                               "optimizer": 2 * (4 * n + critic) + step_counters}
            # the README's capacity table: 16 + 16 + 4 (or 2) bytes per policy parameter
            per_parameter = (sum(rows[0].values()) - step_counters) / n
            assert per_parameter == pytest.approx(32 + frozen, rel=0.01)
        else:
            adapters = sum(p.numel() for name, p in captured["actor"].items()
                           if "lora_" in name)  # both roles' (saving merged the actor since)
            trained = 4 * (adapters + hidden + 1)
            assert rows[4] == {"parameters": frozen * n + trained, "gradients": trained,
                               "optimizer": 2 * trained + step_counters}
            for name, p in captured["actor"].items():
                assert p.dtype == (torch.float32 if "lora_" in name else
                                   (torch.bfloat16 if frozen_bf16 else torch.float32)), name
    assert sum(rows[4].values()) < 0.25 * sum(rows[0].values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_two_adapters_on_one_base_step_like_two_separate_lora_models(tiny_dirs, checkpointing):
    """One PPO update of actor and critic sharing a base (PEFT switching adapters inside one
    forward-backward) moves each adapter exactly as two separate LoRA models from the same
    weights do: no adapter is left frozen by a switch, no backward recomputes a block with the
    other role's adapter."""
    from peft import LoraConfig
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    shared_base, tokenizer = P.load_policy(tiny_dirs["policy"], seed=0)
    shared = P.add_lora(shared_base, None, P.copy.deepcopy(config))
    actor_base, _ = P.load_policy(tiny_dirs["policy"], seed=0)
    critic_base, _ = P.load_policy(tiny_dirs["policy"], seed=0)
    separate = P.add_lora(actor_base, (critic_base.transformer, None), P.copy.deepcopy(config))
    results, initial = [], None
    for actor, ref_model, critic in (shared, separate):
        fill_adapters(actor, critic)
        if checkpointing:
            P.enable_gradient_checkpointing(actor, critic)
        torch.manual_seed(5)
        exp = rollout(actor, critic, ref_model, P.checked_scores(P.vowel_reward, "vowels"),
                      tokenizer, temperature=0.8)
        optimizers = [torch.optim.AdamW(P.trainable_parameters(m), lr=1e-2) for m in
                      (actor, critic)]
        trained = {}
        for model in (actor, critic):
            ids = {id(p) for p in P.trainable_parameters(model)}
            trained.update({adapter_key(n) if "lora_" in n else n: p
                            for n, p in model.named_parameters() if id(p) in ids})
        initial = initial or {k: p.detach().clone() for k, p in trained.items()}
        torch.manual_seed(6)
        P.ppo_update(actor, critic, *optimizers, exp,
                     P.PPOConfig(ppo_epochs=2, mini_batch_size=4, micro_batch_size=2,
                                 temperature=0.8))
        results.append({k: p.detach().clone() for k, p in trained.items()})
    shared_weights, separate_weights = results
    assert shared_weights.keys() == separate_weights.keys() == initial.keys()
    assert {k.split(".")[-2] for k in shared_weights if "lora_" in k} == {P.LORA_ACTOR,
                                                                           P.LORA_CRITIC}
    for key, value in shared_weights.items():
        torch.testing.assert_close(value, separate_weights[key], atol=1e-5, rtol=1e-4)
        assert not torch.equal(value, initial[key]), key  # every trained weight has moved


# PeftModel.from_pretrained (the user's call) reads a transformers property deprecated in v5
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_lora_run_resumes_exactly_and_saves_a_merged_policy_and_its_adapter(
        tiny_dirs, tmp_path, monkeypatch):
    """N iterations straight == k, then --resume to N; the checkpoint holds only the adapters
    and the value head (far smaller than a full run's); <out>/policy is the merged actor, an
    ordinary model with the trained actor's logits, and <out>/adapter loads onto the base with
    PeftModel.from_pretrained to the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    captured = capture_run(monkeypatch)
    straight = lora_config(tiny_dirs, tmp_path, "straight", steps=3, actor_lr=1e-2)
    assert P.train(straight) == 0
    split = dataclass_replace(straight, output_dir=str(tmp_path / "split"), steps=2)
    assert P.train(split) == 0
    assert P.train(dataclass_replace(split, steps=3, resume=True)) == 0
    trained = captured["logits"]  # the resumed run's actor, just before saving
    assert without_timing(read_metrics(split.output_dir)) == \
        without_timing(read_metrics(straight.output_dir))
    ours, theirs = final_weights(split.output_dir), final_weights(straight.output_dir)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    state = torch.load(Path(split.output_dir) / P.CHECKPOINT, weights_only=True)
    for role, adapter in (("actor", P.LORA_ACTOR), ("critic", P.LORA_CRITIC)):
        assert state[role] and all(f"lora_A.{adapter}." in k or f"lora_B.{adapter}." in k
                                   or k.startswith("v_head.") for k in state[role]), role
    full = tiny_config(tmp_path, model=tiny_dirs["policy"], steps=1,
                       output_dir=str(tmp_path / "full"))
    assert P.train(full) == 0
    sizes = [(Path(run.output_dir) / P.CHECKPOINT).stat().st_size for run in (split, full)]
    assert sizes[0] < 0.2 * sizes[1]

    tokenizer = P.load_tokenizer(tiny_dirs["policy"], "--model")
    tokenizer.padding_side = "left"
    merged = AutoModelForCausalLM.from_pretrained(Path(split.output_dir) / P.POLICY)
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(plain_logits(merged.eval(), tokenizer), trained, atol=1e-5,
                               rtol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["policy"])
    reloaded = PeftModel.from_pretrained(base, Path(split.output_dir) / P.ADAPTER).eval()
    torch.testing.assert_close(plain_logits(reloaded, tokenizer), trained, atol=1e-5, rtol=1e-5)
    untrained = AutoModelForCausalLM.from_pretrained(tiny_dirs["policy"]).eval()
    assert not torch.allclose(plain_logits(untrained, tokenizer), trained, atol=1e-3)
    # a checkpoint that lacks one of the weights the model trains is refused, not half-loaded
    del state["critic"]["v_head.bias"]
    torch.save(state, Path(split.output_dir) / P.CHECKPOINT)
    with pytest.raises(P.UsageError, match="not those this model trains"):
        P.train(dataclass_replace(split, steps=4, resume=True))


def test_lora_with_a_critic_model_trains_its_own_adapter(tiny_dirs, tmp_path, monkeypatch):
    """--critic-model with --lora-r: the critic is that backbone plus its own adapter and the
    reward model's head; the policy's base and the critic's stay frozen, both adapters train."""
    captured = capture_run(monkeypatch)
    cfg = lora_config(tiny_dirs, tmp_path, critic_model=tiny_dirs["reward"], steps=2)
    assert P.train(cfg) == 0
    assert captured["run"].models.critic.backbone is not (
        captured["run"].models.actor.get_base_model())
    from transformers import AutoModelForSequenceClassification
    loaded = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["reward"])
    backbone = {k.removeprefix("transformer."): v for k, v in loaded.state_dict().items()}
    after = captured["critic"]
    for name, value in after.items():
        if "lora_" in name:
            assert f".{P.LORA_CRITIC}." in name
        elif not name.startswith("v_head."):  # the critic's frozen base
            key = name.removeprefix("backbone.base_model.model.").replace(".base_layer", "")
            assert torch.equal(value, backbone[key]), name
    assert not torch.equal(after["v_head.weight"], loaded.score.weight)  # started there, moved
    assert any("lora_B" in k and not torch.equal(v, torch.zeros_like(v))
               for k, v in after.items())


def lora_ddp_worker(data, out, policy):
    """One rank of the 2-rank LoRA update test: each model's DDP broadcasts and all-reduces
    its own trained weights only; then PPO's update on this rank's half of the experience,
    saved to out.format(rank)."""
    rank, _ = P.world()
    data = torch.load(data, weights_only=False)
    torch.manual_seed(0)
    actor, _, critic, _, _ = P.load_models(P.Config(model=policy, lora_r=4), torch.device("cpu"))
    actor.load_state_dict(data["actor"])
    critic.load_state_dict(data["critic"])
    exp = data["exp"].select(torch.arange(rank * 4, rank * 4 + 4))  # this rank's half
    parallel = P.DataParallel(torch.device("cpu"), actor, critic)
    ddp_actor, ddp_critic = parallel.trained(actor), parallel.trained(critic)
    synced = [sorted(n for n, _ in m.named_parameters() if n not in ddp.parameters_to_ignore)
              for m, ddp in ((actor, ddp_actor), (critic, ddp_critic))]
    trained = [sorted(n for n, p in m.named_parameters()
                      if any(p is q for q in P.trainable_parameters(m))) for m in (actor, critic)]
    assert synced == trained, synced
    P.ppo_update(ddp_actor, ddp_critic, torch.optim.SGD(P.trainable_parameters(actor), lr=0.1),
                 torch.optim.SGD(P.trainable_parameters(critic), lr=0.1), exp,
                 P.PPOConfig(ppo_epochs=2, mini_batch_size=8, micro_batch_size=2),
                 parallel=parallel)
    torch.save({"actor": actor.state_dict(), "critic": critic.state_dict()}, out.format(rank))


@pytest.mark.slow
def test_two_rank_lora_update_equals_one_process(tiny_dirs, tmp_path):
    """LoRA under DDP (`replicate`): each model's DDP averages its own adapter (and value head)
    and ignores the shared base and the other role's adapter; 2 ranks x 4 sequences then equal
    1 process x 8, and both ranks hold the same adapters."""
    actor, ref_model, critic, tokenizer = lora_models(tiny_dirs)
    fill_adapters(actor, critic)
    torch.manual_seed(10)
    exp = rollout(actor, critic, ref_model, P.checked_scores(P.vowel_reward, "vowels"),
                  tokenizer)
    data = tmp_path / "data.pt"
    torch.save({"actor": actor.state_dict(), "critic": critic.state_dict(), "exp": exp}, data)
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    out = str(tmp_path / "rank{}.pt")
    result = torchrun_worker(lora_ddp_worker, tmp_path, data=str(data), out=out,
                             policy=tiny_dirs["policy"])
    assert result.returncode == 0, result.stderr[-3000:]
    P.ppo_update(actor, critic, torch.optim.SGD(P.trainable_parameters(actor), lr=0.1),
                 torch.optim.SGD(P.trainable_parameters(critic), lr=0.1), exp,
                 P.PPOConfig(ppo_epochs=2, mini_batch_size=8, micro_batch_size=2))
    ranks = [torch.load(out.format(r), weights_only=False) for r in range(2)]
    trained = 0
    for name, model in [("actor", actor), ("critic", critic)]:
        for key, value in model.state_dict().items():
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), key
            torch.testing.assert_close(ranks[0][name][key], value, atol=1e-5, rtol=1e-4)
            trained += name == "critic" and not torch.equal(value, before[key])
    lora_and_head = sum("lora_" in k or k.startswith("v_head.") for k in before)
    assert trained == lora_and_head  # every adapter weight of both roles and the head moved

# ------------------------------------------------------------------------------------------------
# Chat models: conversations in, conversations scored; curves
# ------------------------------------------------------------------------------------------------

CHAT_SPECIALS = ["<s>", "</s>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONVERSATION = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi there"}]


def build_chat_tokenizer():
    """Characters plus chat specials. Like Llama's, it adds BOS itself (so a template that
    writes BOS, tokenized with special tokens, would double it), and a turn ends with <|end|>,
    which is not its eos_token </s>."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(CHAT_SPECIALS + list(P.TINY_ALPHABET))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", pad_token="</s>",
                                        additional_special_tokens=CHAT_SPECIALS[3:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def chat_dirs(tmp_path_factory):
    """A tiny chat policy whose generation_config ends responses at <|end|> only, and a tiny
    1-label reward model with the same chat template, saved as users' models are."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
    root = tmp_path_factory.mktemp("chat")
    tokenizer = build_chat_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=end,
                        pad_token_id=tokenizer.pad_token_id, **P.TINY_GPT2)
    torch.manual_seed(20)
    policy = GPT2LMHeadModel(config)
    with torch.no_grad():  # logit(<|end|>) + 3 everywhere: rollouts show the end of turn
        w = policy.lm_head.weight[end]
        policy.transformer.ln_f.bias += 3.0 * w / w.dot(w)
    policy.generation_config.eos_token_id = [end]
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    config.num_labels = 1
    GPT2ForSequenceClassification(config).save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    prompts = root / "chat.jsonl"
    prompts.write_text("\n".join(json.dumps(record) for record in [
        {"prompt": CONVERSATION},
        {"messages": [{"role": "user", "content": "tell me"},
                      {"role": "assistant", "content": "a reference answer"}]},
        {"prompt": [{"role": "user", "content": "what is the moon"}]},
        {"prompt": "plain text too"}]) + "\n")
    return {"policy": str(root / "policy"), "reward": str(root / "reward"),
            "prompts": str(prompts), "end": end}


def test_conversational_prompts_render_with_the_chat_template_and_one_bos(chat_dirs):
    """"prompt" or "messages" (a trailing assistant answer dropped) as message lists; their
    tokens equal apply_chat_template(..., add_generation_prompt=True) exactly, with one BOS;
    a plain-text prompt is tokenized as before."""
    from transformers import AutoTokenizer
    prompts = P.load_prompts(chat_dirs["prompts"])
    assert prompts[0] == CONVERSATION and prompts[1] == [{"role": "user", "content": "tell me"}]
    assert prompts[3] == "plain text too"
    tokenizer = AutoTokenizer.from_pretrained(chat_dirs["policy"])
    for prompt in prompts[:3]:
        ids = P.prompt_token_ids(tokenizer, prompt)
        expected = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        assert ids == expected["input_ids"]
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids[-1:]) == "<|assistant|>"  # where the reply begins
    assert P.prompt_token_ids(tokenizer, prompts[3]) == tokenizer("plain text too")["input_ids"]
    ids = [P.prompt_token_ids(tokenizer, p) for p in prompts]
    batch = P.encode_prompts(tokenizer, ids, torch.device("cpu"))
    longest = max(map(len, ids))
    assert batch.input_ids.shape[1] == longest and batch.attention_mask.sum(1).tolist() == [
        len(row) for row in ids]
    assert batch.input_ids[0, longest - len(ids[0]):].tolist() == ids[0]  # left-padded, whole


def test_responses_end_at_every_end_of_turn_id(chat_dirs):
    """The generation_config's end-of-turn id ends a response although the tokenizer's
    eos_token is another one (which ends one too); the mask and the score's slot stop at the
    first of them."""
    cfg = P.Config(model=chat_dirs["policy"], reward_model=chat_dirs["reward"])
    actor, ref_model, critic, tokenizer, score_fn = P.load_models(cfg, torch.device("cpu"))
    end, eos = chat_dirs["end"], tokenizer.eos_token_id
    assert end != eos and P.end_of_response_ids(actor.generation_config, tokenizer) == [end, eos]
    prompts = P.load_prompts(chat_dirs["prompts"]) * 2
    encoded = P.encode_prompts(tokenizer, [P.prompt_token_ids(tokenizer, p) for p in prompts],
                               torch.device("cpu"))
    torch.manual_seed(21)
    exp = P.generate_experience(actor, critic, ref_model, score_fn, tokenizer, encoded.input_ids,
                                encoded.attention_mask, P.PPOConfig(max_new_tokens=12),
                                eos_token_ids=[end, eos], prompts=prompts)
    responses = exp.input_ids[:, -exp.response_length:]
    ended = 0
    for b, row in enumerate(responses.tolist()):
        n = int(exp.action_mask[b].sum())
        stops = [t for t, token in enumerate(row) if token in (end, eos)]
        assert n == (stops[0] + 1 if stops else len(row))
        ended += bool(stops) and row[stops[0]] == end
        score_slot = exp.rewards[b] - P.compute_rewards(
            exp.log_probs[b:b + 1], exp.ref_log_probs[b:b + 1], torch.zeros(1),
            exp.action_mask[b:b + 1])[0]
        assert score_slot.nonzero().flatten().tolist() in ([n - 1], [])
    assert ended > 0  # some responses ended with <|end|> itself
    assert exp.prompts == prompts  # the file's prompts, messages and all


def test_chat_reward_model_reads_the_templated_conversation(chat_dirs, tiny_dirs):
    """A reward model with a chat template scores prompt messages + the assistant's reply
    rendered by its template, with one BOS; a plain-text prompt becomes the user's message. A
    plain classifier keeps reading prompt + response."""
    scorer = P.RewardModelScorer(chat_dirs["reward"], None, torch.device("cpu"))
    tokenizer = scorer.tokenizer
    seen = []
    scorer.model.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs),
                                       with_kwargs=True)
    scores = scorer([CONVERSATION, "hello"], ["fine", "you"])
    conversations = [CONVERSATION + [{"role": "assistant", "content": "fine"}],
                     [{"role": "user", "content": "hello"},
                      {"role": "assistant", "content": "you"}]]
    for row, conversation in enumerate(conversations):
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert scorer.texts([CONVERSATION, "hello"], ["fine", "you"])[row] == text
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        expected = scorer.model(**ids).logits[0, 0]
        torch.testing.assert_close(scores[row], expected, atol=1e-5, rtol=1e-5)
        real = seen[0]["input_ids"][row][seen[0]["attention_mask"][row].bool()].tolist()
        assert real == ids.input_ids[0].tolist() and real.count(tokenizer.bos_token_id) == 1
    plain = P.RewardModelScorer(tiny_dirs["reward"], None, torch.device("cpu"))
    assert plain.texts(["the cat", CONVERSATION], [" sat", "ok"]) == [
        "the cat sat", "be kind\nhi there\nok"]



PLAIN_PROMPTS = ["the sea is", "a cat", "my dream is to", "we went to the market"]
CHATS = [[{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}],
         [{"role": "system", "content": "be kind"}, {"role": "user", "content": "tell me"}]]
PROMPTS_OF_CHATS = [CHATS[0][:1], CHATS[1]]  # from 'messages': a last assistant turn dropped


def datasets_of(root: Path) -> dict:
    """Prompt sets as the ecosystem keeps them, written with `datasets`: {name: path}."""
    import datasets
    datasets.disable_progress_bars()
    root = root / "datasets"
    if root.exists():
        return {p.name: str(p) for p in root.iterdir()}
    root.mkdir()
    plain = datasets.Dataset.from_dict({"prompt": PLAIN_PROMPTS, "id": [1, 2, 3, 4]})
    chats = datasets.Dataset.from_dict({"messages": CHATS})
    plain.to_parquet(root / "plain.parquet")
    chats.to_parquet(root / "chats.parquet")
    plain.to_csv(root / "plain.csv", index=False)
    chats.to_csv(root / "chats.csv", index=False)  # CSV cells are strings: no conversations
    plain.to_json(root / "plain.json")
    chats.to_json(root / "chats.json")
    plain.save_to_disk(root / "plain-saved")
    chats.save_to_disk(root / "chats-saved")
    datasets.DatasetDict({"train": plain, "test": datasets.Dataset.from_dict(
        {"query": ["a test prompt", "another"]})}).save_to_disk(root / "splits")
    (root / "parquet-dir").mkdir()
    plain.to_parquet(root / "parquet-dir" / "data.parquet")
    datasets.Dataset.from_dict({"text": ["x"], "id": [1]}).to_parquet(root / "no-column.parquet")
    datasets.Dataset.from_dict({"prompt": []}).to_parquet(root / "empty.parquet")
    return datasets_of(root.parent)


def test_prompts_load_from_every_dataset_format(tmp_path):
    """Parquet, CSV, JSON, save_to_disk, a directory of data files: the 'prompt' column's
    strings, or the 'messages' column's conversations without a last assistant turn."""
    sets = datasets_of(tmp_path)
    for name in ("plain.parquet", "plain.csv", "plain.json", "plain-saved", "parquet-dir"):
        assert P.load_prompts(sets[name]) == PLAIN_PROMPTS, name
    for name in ("chats.parquet", "chats.json", "chats-saved"):
        assert P.load_prompts(sets[name]) == PROMPTS_OF_CHATS, name



def test_prompts_are_tokenized_once_in_chunks_equal_to_one_at_a_time(tiny_dirs, monkeypatch):
    """usable_prompts in chunks of 3 (a large set's 1024): every plain prompt given to the
    tokenizer once, the ids those of one prompt at a time, and the reward model's room check
    the same as prompt by prompt."""
    monkeypatch.setattr(P, "PROMPT_CHUNK", 3)
    _, _, _, score_fn, tokenizer = make_models(tiny_dirs)
    prompts = RAGGED_PROMPTS + ["x " * 40, "the end"]
    given, call = [], type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, text, *a, **k: (
        given.extend(text if isinstance(text, list) else [text]), call(self, text, *a, **k))[1])
    cfg = P.Config(max_prompt_length=30, max_new_tokens=118)  # the reward model reads 128
    kept, ids = P.usable_prompts(prompts, tokenizer, score_fn, cfg, "--prompts", print)
    assert sorted(given[:len(prompts)]) == sorted(prompts)
    monkeypatch.undo()
    one_by_one = [tokenizer(p)["input_ids"] for p in prompts]
    room = [score_fn.fits([p], 118)[0] for p in prompts]
    expected = [i for i, row in enumerate(one_by_one) if len(row) <= 30 and room[i]]
    assert 0 < len(expected) and any(len(one_by_one[i]) <= 30 and not room[i]
                                     for i in range(len(prompts)))
    assert kept == [prompts[i] for i in expected] and ids == [one_by_one[i] for i in expected]

def test_dataset_split_and_column_options_pick_what_is_loaded(tmp_path):
    sets = datasets_of(tmp_path)
    assert P.load_prompts(sets["splits"]) == PLAIN_PROMPTS
    assert P.load_prompts(sets["splits"], split="test", column="query") == ["a test prompt",
                                                                            "another"]
    assert P.load_prompts(sets["chats.parquet"], column="messages") == PROMPTS_OF_CHATS
    cfg = P.Config(prompts=sets["splits"], eval_prompts=sets["splits"],
                   eval_prompts_split="test", eval_prompts_column="query")
    assert P.load_prompt_sets(cfg) == (PLAIN_PROMPTS, ["a test prompt", "another"])


@pytest.mark.parametrize("name", ["plain.parquet", "plain.csv", "plain.json", "plain-saved",
                                  "chats.parquet", "chats.json", "chats-saved", "splits"])
def test_a_dataset_of_prompts_trains_from_the_command_line(tmp_path, chat_dirs, name):
    """Each format, plain and conversational, through the command line: a chat model (for
    its template) trains on it for an iteration; the held-out split evaluates."""
    path = datasets_of(tmp_path)[name]
    out = tmp_path / "run"
    args = ["--model", chat_dirs["policy"], "--prompts", path, "--output-dir", str(out),
            "--steps", "1", "--batch-size", "4", "--mini-batch-size", "2", "--max-new-tokens",
            "4", "--samples", "0", "--no-tensorboard"]
    if name == "splits":
        args += ["--eval-prompts", path, "--eval-prompts-split", "test",
                 "--eval-prompts-column", "query"]
    assert P.main(args) == 0
    rows = read_metrics(out)
    assert rows[-1]["step"] == 1 and ("eval/scores" in rows[-1]) == (name == "splits")

def test_reward_fn_receives_the_prompts_as_the_file_held_them(chat_dirs, tmp_path,
                                                              monkeypatch):
    module = tmp_path / "seen.py"
    module.write_text("SEEN = []\ndef f(prompts, responses):\n    SEEN.extend(prompts)\n"
                      "    return [0.0] * len(responses)\n")
    calls = spy_on(monkeypatch, "load_reward_fn")
    cfg = tiny_config(tmp_path, model=chat_dirs["policy"], prompts=chat_dirs["prompts"],
                      reward_fn=f"{module}:f", steps=1, batch_size=4, mini_batch_size=2)
    assert P.train(cfg) == 0
    seen = calls[0][1].__globals__["SEEN"]
    assert sorted(map(json.dumps, seen)) == sorted(map(json.dumps,
                                                       P.load_prompts(chat_dirs["prompts"])))


@pytest.mark.slow
def test_chat_run_trains_resumes_and_refuses_bad_conversations(chat_dirs, tiny_dirs, tmp_path):
    """Through the command line: a chat policy, a chat reward model and conversational
    prompts train and resume; malformed messages, or conversations for a tokenizer without
    a chat template, are one-line errors (exit 2) that write nothing."""
    out = tmp_path / "run"
    args = [*SMALL_RUN, "--model", chat_dirs["policy"], "--reward-model", chat_dirs["reward"],
            "--prompts", chat_dirs["prompts"], "--output-dir", str(out)]
    result = run_cli([*args, "--steps", "2"], tmp_path)
    assert result.returncode == 0, result.stderr
    result = run_cli([*args, "--steps", "3", "--resume"], tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3]
    # templates, left padding and stop ids leave PPO's invariants intact (no_eos may fire:
    # --max-new-tokens 4 cuts most responses)
    assert rows[-1]["check/first_ratio"] == rows[-1]["check/kl_at_start"] == 0
    # the same instruct model with LoRA, as a new user would run it: a merged policy that
    # loads with its chat template, and the adapter beside it
    lora = run_cli([*args[:-1], str(tmp_path / "lora"), "--steps", "2", "--lora-r", "4"],
                   tmp_path)
    assert lora.returncode == 0, lora.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / P.POLICY)
    assert AutoTokenizer.from_pretrained(tmp_path / "lora" / P.POLICY).chat_template
    assert (tmp_path / "lora" / P.ADAPTER / "adapter_config.json").exists()
    assert read_metrics(tmp_path / "lora")[-1]["check/kl_at_start"] == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": [{"role": "user"}]}\n')
    cases = [(["--model", chat_dirs["policy"], "--prompts", str(bad)], "list of"),
             (["--model", tiny_dirs["policy"], "--prompts", chat_dirs["prompts"]],
              "no chat template")]
    for extra, needle in cases:
        result = run_cli([*SMALL_RUN, *extra, "--output-dir", str(tmp_path / "bad"),
                          "--steps", "1"], tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], lines
        assert not (tmp_path / "bad").exists()


def small_context_reward_model(chat_dirs, path, positions):
    """The tiny chat reward model with a context of `positions` tokens, saved to `path`."""
    from transformers import AutoConfig, GPT2ForSequenceClassification
    config = AutoConfig.from_pretrained(chat_dirs["reward"])
    config.n_positions = positions
    torch.manual_seed(23)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    P.load_tokenizer(chat_dirs["reward"], "test").save_pretrained(path)
    return str(path)


def test_prompts_too_long_for_the_policy_or_the_reward_model_are_left_out_not_cut(
        chat_dirs, tmp_path, monkeypatch, capsys):
    """Through a run: a conversation longer than --max-prompt-length, and one that leaves the
    reward model (context 30) no room for a response of --max-new-tokens, are left out with
    one warning; the policy answers only whole prompts, each beginning with its BOS and chat
    header, and the reward model reads the same prompts."""
    reward = small_context_reward_model(chat_dirs, tmp_path / "reward", positions=30)
    prompts = [[{"role": "user", "content": "hi"}],  # 6 policy tokens
               [{"role": "user", "content": "x" * 40}],  # 44 > --max-prompt-length 32
               [{"role": "user", "content": "y" * 22}],  # 26; for the reward model 27 + 8 > 30
               "hello there"]  # a plain prompt: 12 tokens
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    rollouts = spy_on(monkeypatch, "generate_experience")
    cfg = tiny_config(tmp_path, model=chat_dirs["policy"], reward_model=reward,
                      prompts=str(path), max_prompt_length=32, max_new_tokens=8, steps=2,
                      batch_size=4, mini_batch_size=2)
    assert P.train(cfg) == 0
    err = capsys.readouterr().err
    assert err.count("are left out") == 1 and "2 of the 4 prompts" in err
    assert "1 longer than --max-prompt-length 32" in err and "1 too long for the reward" in err
    tokenizer = P.load_tokenizer(chat_dirs["policy"], "test")
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    for _, exp in rollouts:
        assert all(p in (prompts[0], prompts[3]) for p in exp.prompts)
        prompt_length = exp.input_ids.shape[1] - exp.response_length
        for row, mask, prompt in zip(exp.input_ids, exp.attention_mask, exp.prompts):
            real = row[:prompt_length][mask[:prompt_length].bool()].tolist()
            assert real == P.prompt_token_ids(tokenizer, prompt)  # whole, as rendered
            assert real[0] == tokenizer.bos_token_id and (isinstance(prompt, str)
                                                          or real[1] == user)


def test_the_reward_model_reads_every_response_whole(chat_dirs, tmp_path, capsys):
    """Should prompt + response exceed the reward model's context after all (its tokenizer
    may split a response into more tokens than the policy's), the prompt is cut from the
    left, with one warning, and the response read whole; a response that cannot fit is an
    error, never a score."""
    scorer = P.RewardModelScorer(small_context_reward_model(chat_dirs, tmp_path / "r", 30),
                                 None, torch.device("cpu"))
    seen = []
    scorer.model.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs),
                                       with_kwargs=True)
    prompt, response = [{"role": "user", "content": "z" * 26}], "abc"
    full = scorer.tokenizer(scorer.texts([prompt], [response]), add_special_tokens=False,
                            return_tensors="pt").input_ids  # [1, 34]
    assert full.shape[1] == 34 and scorer.context == 30
    for _ in range(2):
        score = scorer([prompt, "ok"], [response, "fine"])
    ids = seen[0]["input_ids"][0][seen[0]["attention_mask"][0].bool()]
    assert torch.equal(ids, full[0, -30:])  # the last 30: the response and its end of turn
    with torch.no_grad():
        torch.testing.assert_close(score[0], scorer.model(full[:, -30:]).logits[0, 0])
    assert capsys.readouterr().err.count("cut from the left") == 1
    with pytest.raises(P.UsageError, match="cannot read a whole response"):
        scorer(["hi"], ["q" * 40])


def test_tensorboard_event_files_hold_the_metrics(tmp_path, capsys):
    """Every scalar of metrics.jsonl, read back from the event files in the output directory;
    the run says how to open them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny_config(tmp_path, steps=3)
    assert P.train(cfg) == 0
    assert f"tensorboard --logdir {cfg.output_dir}" in capsys.readouterr().out
    events = EventAccumulator(cfg.output_dir, size_guidance={"scalars": 0})
    events.Reload()
    rows = read_metrics(cfg.output_dir)
    assert set(events.Tags()["scalars"]) == set(rows[0]) - {"step"}
    for name in events.Tags()["scalars"]:
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert [step for step, _ in logged] == [1, 2, 3]
        assert [value for _, value in logged] == pytest.approx([row[name] for row in rows],
                                                               rel=1e-6, abs=1e-6)
    off = tiny_config(tmp_path, output_dir=str(tmp_path / "off"), steps=1, tensorboard=False)
    assert P.train(off) == 0
    assert not list(Path(off.output_dir).glob("events.out.tfevents*"))


class FakeWandb:
    """Stands in for the wandb package: records what a run logs."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0
        self.util = type("util", (), {"generate_id": staticmethod(lambda: "run-id-1")})

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, scalars, step):
        self.logged.append((step, scalars))

    def finish(self):
        self.finished += 1


def test_wandb_logs_the_metrics_and_a_missing_package_is_one_line(tmp_path, monkeypatch,
                                                                  capsys):
    """--wandb logs each metrics row at its step (a stand-in package records it); without the
    package, --wandb is a one-line error before anything is written."""
    fake, find_spec = FakeWandb(), P.importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(P.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "wandb" else find_spec(name, *a))
    cfg = tiny_config(tmp_path, steps=2, wandb=True, wandb_project="proj")
    assert P.train(cfg) == 0
    rows = read_metrics(cfg.output_dir)
    assert fake.inits[0]["project"] == "proj" and fake.inits[0]["id"] == "run-id-1"
    assert fake.logged == [(row["step"], {k: v for k, v in row.items() if k != "step"})
                           for row in rows]
    assert fake.finished == 1
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(P.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    out = tmp_path / "no-wandb"
    assert P.main(["--wandb", "--output-dir", str(out), "--steps", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install wandb" in lines[0] and not out.exists()


# ------------------------------------------------------------------------------------------------
# Sharded data parallel (FSDP2 under torchrun, gloo on CPU)
# ------------------------------------------------------------------------------------------------

def fsdp_worker(data, out):
    """One rank of the FSDP2 test: a rollout under `gathered` counts its all-gathers, PPO's
    update on this rank's half counts its reduce-scatters and measures the local shards, and
    an inf in rank 1's gradient shards must make every rank skip. Rank 0 saves the full
    weights and the counts to `out`; each rank its shard fractions to out + rank."""
    rank, _ = P.world()
    data = torch.load(data, weights_only=False)
    actor, critic = data["actor"], data["critic"]
    models = {"actor": actor, "critic": critic}
    full = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    for model in (actor, critic):
        P.shard_model(model, bf16=False)
    exp = data["exp"].select(torch.arange(rank * 4, rank * 4 + 4))  # this rank's half

    def counting(name, counts):  # torch.distributed.<name>, counting its calls
        original = getattr(torch.distributed, name)

        def counted(*args, **kwargs):
            counts.append(1)
            return original(*args, **kwargs)
        return original, counted

    # a rollout under `gathered`: one all-gather per unit of the actor, however many tokens
    all_gathers = []
    original, torch.distributed.all_gather_single = counting("all_gather_single", all_gathers)
    with P.gathered(actor):
        for _ in range(2):  # ranks generate different numbers of tokens
            P.sample_responses(actor, exp.input_ids[:, :4], torch.ones(4, 4, dtype=torch.long),
                               eos_token_ids=[-1], pad_token_id=0, max_new_tokens=6 + 4 * rank,
                               temperature=1.0)
    torch.distributed.all_gather_single = original
    actor_units = sum(P.is_sharded(m) for m in actor.modules())
    assert len(all_gathers) == actor_units, (len(all_gathers), actor_units)
    assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in actor.parameters())

    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (actor, critic)]
    reduce_scatters = []  # FSDP2's gradient reduction
    original, torch.distributed.reduce_scatter_single = counting("reduce_scatter_single",
                                                                 reduce_scatters)
    parallel = P.DataParallel(torch.device("cpu"), actor, critic)  # sharded: no replicas
    stats, _ = P.ppo_update(actor, critic, *optimizers, exp,
                            P.PPOConfig(ppo_epochs=2, mini_batch_size=8, micro_batch_size=2),
                            parallel=parallel)
    torch.distributed.reduce_scatter_single = original
    local = {}
    for (name, model), optimizer in zip(models.items(), optimizers):
        local[name] = sum(p.to_local().numel() for p in model.parameters()) / full[name]
        local[name + "_optimizer"] = sum(s["momentum_buffer"].to_local().numel()
                                         for s in optimizer.state.values()) / full[name]
    units = sum(P.is_sharded(m) for model in (actor, critic) for m in model.modules())
    states = {name: P.full_state_dict(m) for name, m in models.items()}

    # one inf in one element of rank 1's actor gradient shards, as backward would leave it:
    # every rank skips, in both models, shards untouched
    before = [p.to_local().clone() for m in (actor, critic) for p in m.parameters()]
    gradient_norm = P.gradient_norm

    def norm_after_an_inf(optimizer):
        if rank == 1 and optimizer is optimizers[0]:
            next(actor.parameters()).grad.to_local().view(-1)[0] = float("inf")
        return gradient_norm(optimizer)

    P.gradient_norm = norm_after_an_inf
    _, nan_skipped = P.ppo_update(actor, critic, *optimizers, exp,
                                  P.PPOConfig(ppo_epochs=1, mini_batch_size=8), parallel=parallel)
    P.gradient_norm = gradient_norm
    assert nan_skipped.tolist() == [True], nan_skipped
    after = [p.to_local() for m in (actor, critic) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    if rank == 0:
        torch.save({**states, "stats": stats, "local": local,
                    "reduce_scatters": len(reduce_scatters), "units": units}, out)
    torch.save(local, out + str(rank))


@pytest.mark.slow
def test_ctrl_c_to_a_sharded_torchrun_run_saves_every_rank_and_resumes(tmp_path):
    """Ctrl-C in a terminal reaches torchrun and both ranks, and torchrun forwards it once
    more: every rank finishes the same iteration, the shards of that step are written, rank 0
    says how to resume, and the checkpoint resumes (here in one process)."""
    out = tmp_path / "run"
    args = [str(HERE / "ppo_rlhf.py"), "--data-parallel", "fsdp", *SMALL_RUN,
            "--output-dir", str(out)]
    env = {**os.environ, **NO_HUB, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", *args, "--steps", "500"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group, as a terminal's
    metrics = out / P.METRICS
    wait_for_rows(metrics, 2)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert f"--resume --output-dir {out}" in stderr, stderr[-3000:]
    assert "KeyboardInterrupt" not in stderr  # no rank was interrupted by the second copy
    stopped = len(metrics.read_text().splitlines())
    assert torch.load(out / P.SHARDED_CHECKPOINT / "meta.pt")["step"] == stopped
    result = run_cli([*args[1:], "--steps", str(stopped + 1), "--resume"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["step"] for r in read_metrics(out)] == list(range(1, stopped + 2))


@pytest.mark.slow
def test_two_sharded_ranks_equal_one_process_and_hold_half_each(tiny_dirs, tmp_path):
    """FSDP2 on 2 ranks, same experience: the weights and metrics of one process on the
    concatenated batch; each rank holds about half of actor's and critic's parameters and
    optimizer state (measured from the local shards); the gradient is reduce-scattered once
    per optimizer step, not once per micro-batch; a rollout all-gathers the policy once, not
    once per generated token; and an inf in one rank's gradient shards makes every rank skip."""
    torch.manual_seed(22)
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    with torch.no_grad():
        critic.v_head.weight.normal_()
    exp = rollout(actor, critic, ref_model, scorer, tokenizer)
    data, out = tmp_path / "data.pt", str(tmp_path / "sharded.pt")
    torch.save({"actor": actor, "critic": critic, "exp": exp}, data)
    result = torchrun_worker(fsdp_worker, tmp_path, data=str(data), out=out)
    assert result.returncode == 0, result.stderr[-3000:]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (actor, critic)]
    stats, _ = P.ppo_update(actor, critic, *optimizers, exp,
                            P.PPOConfig(ppo_epochs=2, mini_batch_size=8, micro_batch_size=2))
    sharded = torch.load(out, weights_only=False)
    for name, model in [("actor", actor), ("critic", critic)]:
        for key, value in model.state_dict().items():
            torch.testing.assert_close(sharded[name][key], value, atol=1e-5, rtol=1e-4)
    for key, value in stats.items():
        torch.testing.assert_close(sharded["stats"][key], value, atol=1e-5, rtol=1e-4)
    for rank in range(2):
        local = torch.load(out + str(rank), weights_only=False)
        assert all(0.45 < fraction <= 0.55 for fraction in local.values()), local
    # 2 epochs x 1 minibatch = 2 optimizer steps of 2 micro-batches: each unit (block or
    # root) reduce-scatters once per step
    assert sharded["reduce_scatters"] == 2 * sharded["units"] > 0


@pytest.mark.slow
def test_sharded_cli_run_resumes_on_two_ranks_and_on_one(tmp_path):
    """torchrun --data-parallel fsdp with bf16 mixed precision (on gloo, as FSDP2's
    MixedPrecisionPolicy runs on NCCL): rank 0 alone writes metrics and the policy, every rank
    writes its shards of the checkpoint; 2 iterations + resume to 3 on 2 ranks equals 3
    straight; the same checkpoint resumes in one process (resharded); the saved policy
    loads with from_pretrained and equals the checkpoint's gathered fp32 actor."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM
    args = [str(HERE / "ppo_rlhf.py"), "--data-parallel", "fsdp", "--bf16", *SMALL_RUN,
            "--save-every", "1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for out, steps, extra in ((straight, "3", []), (split, "2", []), (split, "3", ["--resume"])):
        result = torchrun([*args, "--output-dir", str(out), "--steps", steps, *extra], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count(f"step    {steps}/{steps}") == 1  # one voice
    assert without_timing(read_metrics(split)) == without_timing(read_metrics(straight))
    shards = sorted(p.name for p in (split / P.SHARDED_CHECKPOINT).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert not (split / P.CHECKPOINT).exists()

    dcp_to_torch_save(str(straight / P.SHARDED_CHECKPOINT), str(tmp_path / "whole.pt"))
    actor = torch.load(tmp_path / "whole.pt", weights_only=True)["actor"]
    saved = AutoModelForCausalLM.from_pretrained(straight / P.POLICY).state_dict()
    assert saved.keys() == actor.keys() and {v.dtype for v in actor.values()} == {torch.float32}
    for key, value in actor.items():
        assert torch.equal(saved[key], value), key

    single = run_cli([*args[1:], "--output-dir", str(split), "--steps", "4", "--resume"],
                     tmp_path)
    assert single.returncode == 0, single.stderr
    assert "written by 2 rank(s)" in single.stdout
    assert [row["step"] for row in read_metrics(split)] == [1, 2, 3, 4]



# ------------------------------------------------------------------------------------------------
# Where options meet: the critic from the reward model on PPO's scale, beta and the actor's
# schedule frozen with the actor, DDP accumulation, and every pair of options run together
# ------------------------------------------------------------------------------------------------

def scored_rows(exp, tokenizer):
    """[(row, t)]: the rows whose response ended with an EOS after tokens that decode to
    themselves (no other special token), and t, the EOS's index: values[row, t] is the
    critic's V of prompt + response before the EOS, the very text the reward model scored."""
    specials = set(tokenizer.all_special_ids)
    rows = []
    for b in range(len(exp.scores)):
        n = int(exp.action_mask[b].sum())
        response = exp.input_ids[b, -exp.response_length:][:n - 1].tolist()
        if exp.ended[b] and not specials & set(response):
            rows.append((b, n - 1))
    return rows


def test_a_critic_from_the_reward_model_starts_at_the_normalized_score_it_gives(
        tiny_dirs, tmp_path, monkeypatch, capsys):
    """004 §3.3 with --normalize-reward: at the token the reward model scores, the critic's
    first value is the normalized score (s - mu0) / sigma0 of the same text, on the scale of
    PPO's rewards (its head w / sigma0, (b - mu0) / sigma0); the moved head is what the
    checkpoint keeps: a resumed run does not move it again and equals the uninterrupted one."""
    rollouts = spy_on(monkeypatch, "generate_experience")
    cfg = tiny_config(tmp_path, model=tiny_dirs["policy"], reward_model=tiny_dirs["reward"],
                      normalize_reward=True, normalize_reward_samples=16, batch_size=16,
                      max_new_tokens=24, output_dir=str(tmp_path / "straight"), steps=2)
    assert P.train(cfg) == 0
    assert "critic: its head, the reward model's, maps to the same scale" in capsys.readouterr().out
    rows = read_metrics(cfg.output_dir)
    mu, sigma = rows[0]["reward/mean"], rows[0]["reward/std"]
    exp = rollouts[1][1]  # the first training rollout (the first measured)
    tokenizer = P.load_tokenizer(tiny_dirs["policy"], "test")
    scored = scored_rows(exp, tokenizer)
    assert len(scored) >= 3
    for b, t in scored:
        assert exp.values[b, t].item() == pytest.approx(
            ((exp.scores[b] - mu) / sigma).item(), abs=1e-4)
    split = dataclass_replace(cfg, output_dir=str(tmp_path / "split"), steps=1)
    assert P.train(split) == 0
    assert P.train(dataclass_replace(split, steps=2, resume=True)) == 0
    assert without_timing(read_metrics(split.output_dir)) == without_timing(rows)


@pytest.mark.parametrize("case", ["raw", "normalized", "no reward model"])
def test_a_critic_from_the_reward_model_warns_when_its_first_scores_are_clipped(
        tiny_dirs, tmp_path, capsys, case):
    """Without --normalize-reward, a critic from the reward model predicts raw scores while
    PPO's returns are clipped: when most first scores lie beyond --clip-reward-value the run
    says so once; with normalization the head is mapped, and a critic from the policy starts
    at 0: nothing is said."""
    reward = {} if case == "no reward model" else {"reward_model": tiny_dirs["reward"]}
    cfg = tiny_config(tmp_path, model=tiny_dirs["policy"], clip_reward_value=1e-4,
                      normalize_reward=case == "normalized", normalize_reward_samples=8,
                      steps=2, **reward)
    assert P.train(cfg) == 0
    err = capsys.readouterr().err
    assert err.count("of the first scores lie beyond --clip-reward-value") == (case == "raw")


@pytest.mark.parametrize("case", ["the reward model, spelled otherwise", "a 2-label critic"])
def test_the_head_is_mapped_exactly_when_it_is_the_reward_models(tiny_dirs, tmp_path,
                                                                 monkeypatch, capsys, case):
    """--critic-model naming the reward model's directory another way lends its head, which
    is mapped to the reward scale; a critic model that lends no head (2 labels) keeps V = 0,
    unmapped, even when it is the reward model too."""
    rollouts = spy_on(monkeypatch, "generate_experience")
    models = ({"reward_model": tiny_dirs["reward"], "critic_model": tiny_dirs["reward"] + "/."}
              if case.startswith("the reward model") else
              {"reward_model": tiny_dirs["sentiment"], "reward_label": "POS",
               "critic_model": tiny_dirs["sentiment"]})
    cfg = tiny_config(tmp_path, model=tiny_dirs["policy"], normalize_reward=True,
                      normalize_reward_samples=16, batch_size=16, max_new_tokens=24, steps=1,
                      **models)
    assert P.train(cfg) == 0
    mapped = "maps to the same scale" in capsys.readouterr().out
    exp, start = rollouts[1][1], read_metrics(cfg.output_dir)[0]
    if case.startswith("the reward model"):
        scored = scored_rows(exp, P.load_tokenizer(tiny_dirs["policy"], "test"))
        assert mapped and len(scored) >= 3
        for b, t in scored:
            assert exp.values[b, t].item() == pytest.approx(
                ((exp.scores[b] - start["reward/mean"]) / start["reward/std"]).item(), abs=1e-4)
    else:
        assert not mapped and not exp.values.any()


class Hidden(torch.nn.Module):
    """A backbone whose last hidden state is its input: V = input . w + b, to read a head."""

    def forward(self, input_ids, **_):
        return P.dataclasses.make_dataclass("Out", ["last_hidden_state"])(input_ids)


def test_the_critic_takes_the_score_heads_weight_and_bias_and_maps_them_to_the_reward_scale():
    """ValueModel(head=) copies the reward model's head, bias included (V = h.w + b = s), and
    value_head_to_reward_scale turns V into (s - mu0) / sigma0 for every hidden state."""
    torch.manual_seed(4)
    head = torch.nn.Linear(8, 1)
    critic = P.ValueModel(Hidden(), 8, head)
    hidden = torch.randn(3, 5, 8)
    scores = head(hidden).squeeze(-1).detach()
    torch.testing.assert_close(critic(hidden, None, None), scores)
    P.value_head_to_reward_scale(critic, mu0=1.5, sigma0=0.25)
    torch.testing.assert_close(critic(hidden, None, None), (scores - 1.5) / 0.25)


@pytest.mark.parametrize("controller", ["adaptive", "proportional"])
def test_beta_and_the_actors_schedule_wait_while_the_critic_warms_up(tmp_path, controller):
    """--critic-warmup-steps 2: beta stays at --kl-ctl through the warm-up (a frozen actor's KL
    of 0 would halve an adaptive beta each time) and then follows the controller; the
    actor's learning rate is its first iteration's until it trains, and its warm-up and decay
    span the iterations it trains; the critic's schedule spans every iteration."""
    cfg = tiny_config(tmp_path, steps=6, critic_warmup_steps=2, kl_controller=controller,
                      kl_target=0.05, lr_schedule="linear", warmup_steps=2, actor_lr=1e-3,
                      critic_lr=4e-3)
    assert P.train(cfg) == 0
    rows = read_metrics(cfg.output_dir)
    betas = [row["objective/kl_coef"] for row in rows]
    assert betas[:3] == [cfg.kl_ctl] * 3
    for k in range(2, 5):  # beta of iteration k + 2 from iteration k + 1's
        assert betas[k + 1] == pytest.approx(P.next_kl_coef(cfg, betas[k], rows[k]["objective/kl"]))
    assert betas[3] != cfg.kl_ctl

    def factor(step, total):
        return P.lr_factor(step, schedule="linear", warmup_steps=2, total_steps=total)
    actor_steps = [1, 1, 1, 2, 3, 4]  # the actor's own iteration count, 1 while frozen
    assert [row["lr/actor"] for row in rows] == pytest.approx(
        [1e-3 * factor(k, 6 - 2) for k in actor_steps])
    assert [row["lr/critic"] for row in rows] == pytest.approx(
        [4e-3 * factor(k, 6) for k in range(1, 7)])


def test_part_one_loop_takes_a_score_fn_that_returns_a_list(tiny_dirs):
    """`Models.score_fn` may return a list of floats (as `vowel_reward` does): Part I's loop,
    without Part II's `checked_scores`, makes them the rollout's float32 scores."""
    torch.manual_seed(2)
    actor, critic, ref_model, _, tokenizer = make_models(tiny_dirs)
    models = P.Models(actor, critic, ref_model, P.vowel_reward, tokenizer,
                      [tokenizer.eos_token_id])
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (actor, critic)]
    hp = P.PPOConfig(steps=1, batch_size=8, mini_batch_size=8, ppo_epochs=1, max_new_tokens=6)
    prompt_ids = [tokenizer(p)["input_ids"] for p in LOOP_PROMPTS]
    (row, exp, _), = P.ppo_iterations(models, *optimizers, LOOP_PROMPTS, prompt_ids, hp)
    assert exp.scores.dtype == torch.float32
    assert exp.scores.tolist() == pytest.approx(P.vowel_reward(exp.prompts, exp.responses))
    assert all(math.isfinite(value) for value in row.values())


def test_the_entropy_bonus_keeps_no_softmax_for_backward():
    """entropy_from_logits under autograd, on a slice of logits as the update passes it: no
    tensor of a chunk's size is saved for backward but views of the logits themselves (each
    chunk's softmax is recomputed there), and value and gradient are the plain formula's."""
    torch.manual_seed(5)
    logits = torch.randn(4, 33, 300, dtype=torch.float64, requires_grad=True)
    view = logits[:, :-1]  # [B, T, V], not contiguous
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        entropy = P.entropy_from_logits(view, chunk_rows=32)
    ours = logits.untyped_storage().data_ptr()
    kept = [t for t in saved if t.untyped_storage().data_ptr() != ours]
    assert sum(t.numel() for t in kept) < 300  # not one row of V
    plain = -(torch.softmax(view, -1) * torch.log_softmax(view, -1)).sum(-1)
    torch.testing.assert_close(entropy, plain)
    weights = torch.randn_like(plain)
    torch.testing.assert_close(torch.autograd.grad(entropy, logits, weights)[0],
                               torch.autograd.grad(plain, logits, weights)[0])


def test_every_random_stream_of_a_run_is_seeded_by_its_own_name(tmp_path, monkeypatch):
    """The streams a run seeds (its samples, the held-out evaluation's, the reward
    normalization's) are seed_of(seed, name, rank), each its own: none is seed + k, which
    another seed or rank would share."""
    seeds = []
    manual_seed = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda s: seeds.append(s) or manual_seed(s))
    cfg = tiny_config(tmp_path, seed=3, steps=1, normalize_reward=True,
                      normalize_reward_samples=8, eval_fraction=0.25)
    assert P.train(cfg) == 0
    streams = {P.seed_of(3, name, 0) for name in ("sample", P.EVAL_STREAM, P.NORM_STREAM)}
    assert streams <= set(seeds) and len(streams) == 3
    assert set(seeds) - streams == {3}  # and the seed itself, for the models' initialization


def test_runs_of_different_seeds_share_no_epoch_order():
    """Each (seed, epoch) permutes the prompts with a stream of its own (`seed_of`): seed 1's
    first epoch is not seed 0's second, so runs of several seeds see independent data."""
    n = 50
    orders = [tuple(P.prompt_indices(epoch + 1, n, n, seed)) for seed in range(4)
              for epoch in range(6)]
    assert len(set(orders)) == len(orders)
    keys = [(seed, name, k) for seed in range(20) for name in ("order", "sample")
            for k in range(20)]
    assert len({P.seed_of(*key) for key in keys}) == len(keys)


def test_a_dataset_with_configurations_loads_the_one_named(tmp_path, capsys):
    """--prompts-config (and --eval-prompts-config) names the configuration of a dataset that
    has several, as `load_dataset(path, name)` does for openai/gsm8k's "main": built offline
    as a directory whose README lists its configs. Without it, one line names the option."""
    root = tmp_path / "gsm"
    questions = {"main": ["what is 2 + 2", "what is 3 + 5"], "socratic": ["how many apples"]}
    readme = ["---", "configs:"]
    for name, rows in questions.items():
        (root / name).mkdir(parents=True)
        (root / name / "train.jsonl").write_text(
            "".join(json.dumps({"question": q, "answer": "4"}) + "\n" for q in rows))
        readme += [f"- config_name: {name}", "  data_files:", "  - split: train",
                   f"    path: {name}/train.jsonl"]
    (root / "README.md").write_text("\n".join(readme + ["---", ""]))
    cfg = P.parse_args(["--prompts", str(root), "--prompts-config", "main", "--prompts-column",
                        "question", "--eval-prompts", str(root), "--eval-prompts-config",
                        "socratic", "--eval-prompts-column", "question"])
    assert P.load_prompt_sets(cfg) == (questions["main"], questions["socratic"])
    with pytest.raises(P.UsageError, match=r"Config name is missing.*--prompts-config\)$"):
        P.load_prompts(str(root), column="question")
    (tmp_path / "prompts.txt").write_text("hello\n")
    (tmp_path / "prompts.csv").write_text("prompt\nhello\n")
    for path in (tmp_path / "prompts.txt", tmp_path / "prompts.csv",
                 datasets_of(tmp_path)["plain-saved"]):
        with pytest.raises(P.UsageError, match="--eval-prompts-config 'main'"):
            P.load_prompts(str(path), "--eval-prompts", config="main")


@pytest.mark.parametrize("lora_r", [0, 4])
def test_the_start_up_report_names_each_model_and_counts_its_parameters(
        tiny_dirs, tmp_path, monkeypatch, capsys, lora_r):
    """At the start each model's role, source and parameter count (what it computes with: with
    LoRA the shared base and its own adapter), and the memory foreseen for its weights (a
    shared storage once), gradients and AdamW moments, which is what the run then holds."""
    from transformers import AutoModelForSequenceClassification
    captured = capture_run(monkeypatch)
    cfg = tiny_config(tmp_path, model=tiny_dirs["policy"], reward_model=tiny_dirs["reward"],
                      lora_r=lora_r, steps=1)
    assert P.train(cfg) == 0
    out = capsys.readouterr().out
    run = captured["run"]
    policy = sum(p.numel() for p in P.load_policy(tiny_dirs["policy"], 0)[0].parameters())
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["reward"])
    n_reward = sum(p.numel() for p in reward.parameters())
    hidden = reward.config.hidden_size
    adapters = {role: sum(p.numel() for name, p in captured["actor"].items()
                          if f".{adapter}." in name)
                for role, adapter in (("actor", P.LORA_ACTOR), ("critic", P.LORA_CRITIC))}
    table = {row[0]: row[1:] for row in captured["table"]}
    head = hidden + 1
    if lora_r:  # the critic: an adapter and a head on the policy's transformer
        critic = policy + adapters["critic"] + head  # lm_head is tied to wte: not counted
        assert table["critic"][:3] == ("the policy + a LoRA adapter", critic,
                                       adapters["critic"] + head)
        assert table["actor"][1:3] == (policy + adapters["actor"], adapters["actor"])
        assert table["reference"][1:4] == (policy, 0, 0)  # the actor's base: no bytes of its own
    else:  # the critic: the reward model's transformer and head
        assert table["critic"][:3] == (f"{tiny_dirs['reward']} (the reward model)",
                                       n_reward - hidden + head, n_reward - hidden + head)
        assert table["actor"][1:3] == (policy, policy)
        assert table["reference"][1:4] == (policy, 0, 4 * policy)
    assert table["reward"][:3] == (tiny_dirs["reward"], n_reward, 0)
    for role, (source, count, trained, *_) in table.items():
        assert f"  {role:<9} {source}: {count:,} parameters" in out
    steps = 4 * (len(run.actor_optimizer.state) + len(run.critic_optimizer.state))
    foreseen = sum(row[5] for row in table.values())  # what AdamW then allocated
    assert foreseen == captured["memory"]["optimizer"] - steps > 0


def test_the_start_up_table_counts_a_reference_copy_whole_on_a_llama():
    """A reference that is a frozen copy of the policy counts as the policy does, also where
    the model's backbone attribute is `.model` (Llama, Qwen, Mistral): its untied LM head
    included."""
    from transformers import LlamaConfig, LlamaForCausalLM
    actor = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, tie_word_embeddings=False))
    critic = P.ValueModel(P.copy.deepcopy(actor.model), 16)
    critic.source = None
    optimizers = [torch.optim.AdamW(m.parameters()) for m in (actor, critic)]
    run = SimpleNamespace(cfg=P.Config(model="llama"), actor_optimizer=optimizers[0],
                          critic_optimizer=optimizers[1], models=SimpleNamespace(
                              actor=actor, ref_model=P.copy.deepcopy(actor), critic=critic,
                              score_fn=SimpleNamespace(model=None)))
    table = {row[0]: row[1:] for row in P.model_table(run)}
    n = sum(p.numel() for p in actor.parameters())
    assert table["actor"][1:4] == (n, n, 4 * n)
    assert table["reference"][1:4] == (n, 0, 4 * n)


def test_live_checks_hold_bf16_runs_to_the_bf16_tolerances(tiny_dirs, tmp_path, monkeypatch):
    """A run with bf16 compute or bf16 frozen models is checked with the bf16 tolerances
    (first |ratio - 1| 0.1, first KL per token 1e-2), an fp32 run with fp32's (1e-3, 1e-4)."""
    precisions = {}
    for name, options in (("fp32", {}), ("bf16", {"bf16": True}),
                          ("frozen", {"frozen_bf16": True})):
        captured = capture_run(monkeypatch)
        assert P.train(tiny_config(tmp_path, output_dir=str(tmp_path / name), steps=1,
                                   **options)) == 0
        precisions[name] = captured["run"].checks.precision
    assert precisions == {"fp32": "fp32", "bf16": "bf16", "frozen": "bf16"}
    healthy = {"step": 1, "val/explained_variance": 1.0, "response/length": 10.0,
               "response/no_eos": 0.0, "policy/first_ratio_error": 0.0, "objective/kl": 0.0}
    for precision, ratio_ok, ratio_bad, kl_ok, kl_bad in (("fp32", 5e-4, 5e-3, 5e-5, 5e-4),
                                                          ("bf16", 5e-2, 0.2, 5e-3, 5e-2)):
        for ratio, kl, failed in ((ratio_ok, kl_ok, []), (ratio_bad, kl_ok, ["first_ratio"]),
                                  (ratio_ok, kl_bad, ["kl_at_start"])):
            checks = P.InvariantChecks(precision, watch_eos=True, log=lambda *a, **k: None)
            counts = checks({**healthy, "policy/first_ratio_error": ratio,
                             "objective/kl": 10 * kl}, first=True)
            assert [name.removeprefix("check/") for name, n in counts.items() if n] == failed


def test_a_reward_model_saved_without_a_pad_token_scores_each_row_at_its_own_end(tiny_dirs,
                                                                                   tmp_path):
    """Most GPT-2 and Llama classifiers trained elsewhere are saved with no pad token in their
    config or tokenizer: the scorer pads with EOS and tells the model, so that each row of a
    ragged batch is scored at its own last token, as it is alone."""
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dirs["reward"])
    model.config.pad_token_id = None
    model.save_pretrained(tmp_path / "reward")
    tokenizer = P.build_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "reward")
    assert model.config.from_pretrained(tmp_path / "reward").pad_token_id is None
    scorer = P.RewardModelScorer(str(tmp_path / "reward"), None, torch.device("cpu"))
    prompts, responses = ["the cat", "a", "we went to the sea"], ["sat on the mat", "b", "!"]
    together = scorer(prompts, responses)
    alone = torch.cat([scorer([p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_the_reward_model_cuts_only_the_rows_over_its_context_and_only_their_prompt(
        chat_dirs, tmp_path):
    """A batch where a short row stands beside one over the context by less than its prompt:
    the short row is read whole and scored as alone, the long one cut from the left (its last
    30 tokens), though its excess is more than the short row's prompt; a row whose excess is
    more than its own prompt is refused wherever it stands."""
    scorer = P.RewardModelScorer(small_context_reward_model(chat_dirs, tmp_path / "r", 30),
                                 None, torch.device("cpu"))
    long_prompt, short, answer = [{"role": "user", "content": "z" * 26}], "ok", "a" * 10
    full = scorer.tokenizer(scorer.texts([long_prompt], [answer]), add_special_tokens=False,
                            return_tensors="pt").input_ids
    before_short = scorer.lengths(scorer.texts([short]))[0]
    before_long = scorer.lengths(scorer.texts([long_prompt]))[0]
    assert before_short < full.shape[1] - 30 < before_long  # the excess: more than "ok"'s room
    with torch.no_grad():
        cut = scorer.model(full[:, -30:]).logits[0, 0]
    scores = scorer([short, long_prompt], ["fine", answer])
    torch.testing.assert_close(scores, torch.stack([scorer([short], ["fine"])[0], cut]))
    for prompts, responses in (([long_prompt, "hi"], [answer, "q" * 40]),
                               (["hi", long_prompt], ["q" * 40, answer])):
        with pytest.raises(P.UsageError, match="cannot read a whole response"):
            scorer(prompts, responses)



def test_printed_samples_show_a_conversation_by_its_last_message():
    """The samples printed before and after training show a conversation's last message, the
    question the policy answers, not the list of messages it is kept as."""
    lines = []
    exp = SimpleNamespace(prompts=[CONVERSATION, "plain"], responses=["hello", "x"],
                          scores=torch.tensor([1.0, -0.5]))
    P.print_samples("samples:", exp, 2, lines.append)
    assert lines == ["samples:", "  [+1.00] 'hi there' -> 'hello'", "  [-0.50] 'plain' -> 'x'"]


def test_the_saved_lora_policy_merges_the_actors_adapter_alone(tiny_dirs, tmp_path):
    """Both adapters on the shared base moved from their start (B != 0), and the critic's the
    active one when the run ends: <out>/policy is the base plus the actor's adapter alone,
    whichever adapter is active (the critic's would change the policy: checked)."""
    from transformers import AutoModelForCausalLM
    actor, _, _, tokenizer = lora_models(tiny_dirs)
    fill_adapters(actor)
    expected = plain_logits(actor, tokenizer)
    actor.set_adapter(P.LORA_CRITIC)
    assert not torch.allclose(plain_logits(actor, tokenizer), expected, atol=1e-3)
    run = SimpleNamespace(models=SimpleNamespace(actor=actor, tokenizer=tokenizer), rank=0,
                          out=tmp_path)
    P.save_final_policy(run)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / P.POLICY).eval()
    torch.testing.assert_close(plain_logits(merged, tokenizer), expected, atol=1e-5, rtol=1e-5)


def fsdp_head_worker(policy, reward, out):
    """One rank: the critic from the reward model, sharded (FSDP2); after a no-grad forward
    (the root unit then stays gathered) its head is mapped to the reward scale, then
    resharded as the next update would; the head before and after, whole, saved."""
    actor, _, critic, tokenizer, _ = P.load_models(
        P.Config(model=policy, reward_model=reward, data_parallel="fsdp"), torch.device("cpu"))
    before = critic.v_head.weight.full_tensor().clone()
    ids = tokenizer(["hello there"], return_tensors="pt").input_ids
    with torch.no_grad():
        critic(ids, torch.ones_like(ids), P.position_ids_from(torch.ones_like(ids)))
    P.value_head_to_reward_scale(critic, mu0=1.5, sigma0=0.5)
    critic.reshard()
    torch.save({"before": before, "after": critic.v_head.weight.full_tensor(),
                "bias": critic.v_head.bias.full_tensor()}, out.format(P.world()[0]))


@pytest.mark.slow
def test_a_sharded_critic_keeps_its_head_mapped_to_the_reward_scale(tiny_dirs, tmp_path):
    """Under FSDP the mapping reaches the shards, not a gathered copy that is freed unchanged:
    after resharding, each rank's whole head is w / sigma0 and (b - mu0) / sigma0."""
    out = str(tmp_path / "rank{}.pt")
    result = torchrun_worker(fsdp_head_worker, tmp_path, policy=tiny_dirs["policy"],
                             reward=tiny_dirs["reward"], out=out)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        head = torch.load(out.format(rank), weights_only=True)
        assert head["before"].abs().sum() > 0
        torch.testing.assert_close(head["after"], head["before"] / 0.5)
        torch.testing.assert_close(head["bias"], torch.tensor([-1.5 / 0.5]))


MINIBATCH_ORDER = [0, 1, 4, 5, 2, 3, 6, 7]  # one process: minibatch k = each rank's k-th


def ddp_accumulation_worker(data, out):
    """One rank of the accumulation test: its half of the experience (rows 4r..4r+3) in two
    minibatches of two micro-batches per epoch, in row order (`torch.randperm` made arange),
    and every DDP all-reduce counted, per model, by a comm hook; saved to out.format(rank)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    rank, _ = P.world()
    torch.randperm = lambda n, **_: torch.arange(n)
    data = torch.load(data, weights_only=False)
    actor, critic = data["actor"], data["critic"]
    parallel = P.DataParallel(torch.device("cpu"), actor, critic)
    calls = []
    for name, model in (("actor", actor), ("critic", critic)):
        parallel.trained(model).register_comm_hook(
            name, lambda state, bucket: calls.append(state) or allreduce_hook(None, bucket))
    _, skipped = P.ppo_update(parallel.trained(actor), parallel.trained(critic),
                              torch.optim.SGD(actor.parameters(), lr=0.1),
                              torch.optim.SGD(critic.parameters(), lr=0.1),
                              data["exp"].select(torch.arange(rank * 4, rank * 4 + 4)),
                              P.PPOConfig(ppo_epochs=2, mini_batch_size=4, micro_batch_size=1),
                              parallel=parallel)
    torch.save({"actor": actor.state_dict(), "critic": critic.state_dict(), "calls": calls,
                "optimizer_steps": len(skipped)}, out.format(rank))


@pytest.fixture(scope="module")
def ddp_accumulation(tiny_dirs, tmp_path_factory):
    """The experience, each rank's results of `ddp_accumulation_worker`, and one process's
    update on the whole experience taking the union of the ranks' k-th minibatches."""
    tmp_path = tmp_path_factory.mktemp("accumulation")
    torch.manual_seed(10)
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    exp = rollout(actor, critic, ref_model, scorer, tokenizer)
    torch.save({"actor": actor, "critic": critic, "exp": exp}, tmp_path / "data.pt")
    out = str(tmp_path / "rank{}.pt")
    result = torchrun_worker(ddp_accumulation_worker, tmp_path, data=str(tmp_path / "data.pt"),
                             out=out)
    assert result.returncode == 0, result.stderr[-3000:]
    randperm, torch.randperm = torch.randperm, lambda n, **_: torch.tensor(MINIBATCH_ORDER)
    try:
        P.ppo_update(actor, critic, torch.optim.SGD(actor.parameters(), lr=0.1),
                     torch.optim.SGD(critic.parameters(), lr=0.1), exp,
                     P.PPOConfig(ppo_epochs=2, mini_batch_size=4, micro_batch_size=2))
    finally:
        torch.randperm = randperm
    return [torch.load(out.format(r), weights_only=False) for r in range(2)], actor, critic


@pytest.mark.slow
def test_two_ranks_step_on_the_union_of_their_kth_minibatches(ddp_accumulation):
    """--mini-batch-size below the batch on 2 ranks: each rank takes mini_batch_size / 2 of its
    rows per step (here 2 of 4: two steps per epoch, not one), and each step equals one
    process's on the union of the two ranks' minibatches."""
    ranks, actor, critic = ddp_accumulation
    assert [rank["optimizer_steps"] for rank in ranks] == [2 * 2, 2 * 2]
    for name, model in (("actor", actor), ("critic", critic)):
        for key, value in model.state_dict().items():
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), key
            torch.testing.assert_close(ranks[0][name][key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_ddp_reduces_each_models_gradients_once_per_optimizer_step(ddp_accumulation):
    """With 2 micro-batches per minibatch, DDP all-reduces on the last alone: per optimizer
    step one call per trained model (`no_sync` around the forward too: DDP decides there)."""
    ranks, _, _ = ddp_accumulation
    for rank in ranks:
        steps = rank["optimizer_steps"]
        assert sorted(rank["calls"]) == ["actor"] * steps + ["critic"] * steps


def all_pairs(levels: dict[str, int], candidates: int = 10) -> list[dict[str, int]]:
    """A covering array of strength 2, by AETG's greedy (Cohen et al. 1997): rows of one level
    per factor such that every pair of levels of every two factors stands in some row. Each
    row is the best of `candidates`: one starts from the factor level in most uncovered
    pairs, takes the other factors in a seeded random order, each at the level covering most
    new pairs with the levels chosen so far."""
    names, rng = list(levels), random.Random(0)
    uncovered = {(a, i, b, j) for a, b in itertools.combinations(names, 2)
                 for i in range(levels[a]) for j in range(levels[b])}

    def new_pairs(row):
        return {(x, row[x], y, row[y]) for x, y in itertools.combinations(names, 2)
                if x in row and y in row} & uncovered

    rows = []
    while uncovered:
        first = max(((name, v) for name in names for v in range(levels[name])), key=lambda nv:
                    sum(nv in ((a, i), (b, j)) for a, i, b, j in uncovered))
        best = None
        for _ in range(candidates):
            row, rest = dict([first]), [name for name in names if name != first[0]]
            rng.shuffle(rest)
            for name in rest:  # ties broken at random, as AETG does
                gains = [len(new_pairs({**row, name: v})) for v in range(levels[name])]
                row[name] = rng.choice([v for v, g in enumerate(gains) if g == max(gains)])
            if best is None or len(new_pairs(row)) > len(new_pairs(best)):
                best = row
        rows.append({name: best[name] for name in names})
        uncovered -= new_pairs(best)
    return rows


# the options that change what the update sees, and the values each is run with
MEETING_OPTIONS = {
    # the vowel reward; --reward-model; and --critic-model the reward model or the policy
    "critic": ["policy", "reward model", "critic = reward model", "critic = policy"],
    "normalize_reward": [False, True],
    "critic_warmup_steps": [0, 1],
    "kl_controller": ["fixed", "adaptive", "proportional"],
    "kl_estimator": ["k1", "k3"],
    "dual_clip": [None, 2.0],
    "lora_r": [0, 4],
    "bf16": [False, True],
    "micro_batch_size": [None, 2],
    "ent_coef": [0.0, 0.05],
    "missing_eos_penalty": [None, 1.0],
    "lr_schedule": [("constant", 0), ("linear", 1), ("cosine", 2)],  # with --warmup-steps
    "top_k": [0, 5],
}
MEETING_ROWS = all_pairs({name: len(values) for name, values in MEETING_OPTIONS.items()})


def invariants_of_any_run(cfg, rows: list[dict]) -> list[dict]:
    """What a 3-iteration run keeps whatever its options: every metric finite, no update
    skipped, pi/pi_old = 1 on each first minibatch and KL = 0 at the start (within the
    precision's live-check tolerance). Returns the training rows."""
    precision = "bf16" if cfg.bf16 else "fp32"
    training = rows[1:] if cfg.normalize_reward else rows
    assert len(training) == 3
    for row in rows:
        assert all(math.isfinite(value) for value in row.values()), row
    for row in training:
        assert row["updates/skipped"] == 0
        assert row["policy/first_ratio_error"] <= P.FIRST_RATIO_TOLERANCE[precision]
    first = training[0]
    assert abs(first["objective/kl"]) / first["response/length"] <= \
        P.START_KL_TOLERANCE[precision]
    return training


def test_the_option_array_covers_every_pair_of_values():
    """Every pair of values of two options of MEETING_OPTIONS stands in some row of the array
    the trainer runs, in far fewer rows than every combination (4 x 3 x 3 x 2^10 = 36,864)."""
    names = list(MEETING_OPTIONS)
    for a, b in itertools.combinations(names, 2):
        seen = {(row[a], row[b]) for row in MEETING_ROWS}
        assert len(seen) == len(MEETING_OPTIONS[a]) * len(MEETING_OPTIONS[b]), (a, b)
    assert len(MEETING_ROWS) <= 18


@pytest.mark.slow
@pytest.mark.parametrize("levels", MEETING_ROWS, ids=lambda row: "".join(map(str, row.values())))
def test_options_that_meet_keep_ppos_invariants(tiny_dirs, tmp_path, monkeypatch, levels):
    """One row of the all-pairs array, run by the trainer for 3 iterations. Whatever the
    options: every metric finite and no update skipped; pi/pi_old = 1 on each first minibatch
    and KL = 0 at the start (within the precision's live-check tolerance); a critic that starts
    from the reward model starts on the returns' scale (V = (s - mu0) / sigma0 where the
    reward model scores), any other at V = 0; while the critic warms up, the actor, beta and
    the actor's learning rate stay as they started."""
    option = {name: MEETING_OPTIONS[name][k] for name, k in levels.items()}
    critic, (schedule, warmup) = option.pop("critic"), option.pop("lr_schedule")
    reward = {"reward_model": tiny_dirs["reward"]}
    models = {"policy": {}, "reward model": reward,
              "critic = reward model": {**reward, "critic_model": tiny_dirs["reward"]},
              "critic = policy": {**reward, "critic_model": tiny_dirs["policy"]}}[critic]
    cfg = tiny_config(tmp_path, model=tiny_dirs["policy"], lr_schedule=schedule,
                      warmup_steps=warmup, kl_target=0.5, normalize_reward_samples=8,
                      batch_size=8, max_new_tokens=16, **models, **option)
    rollouts, actors, generate = [], [], P.generate_experience

    def spy(actor, *args, **kwargs):  # each rollout, and the actor's weights when it began
        actors.append({k: v.clone() for k, v in actor.state_dict().items()
                       if f".{P.LORA_CRITIC}." not in k})  # with LoRA: not the critic's adapter
        rollouts.append(generate(actor, *args, **kwargs))
        return rollouts[-1]
    monkeypatch.setattr(P, "generate_experience", spy)
    assert P.train(cfg) == 0
    rows = read_metrics(cfg.output_dir)
    precision = "bf16" if cfg.bf16 else "fp32"
    start = rows[0] if cfg.normalize_reward else {"reward/mean": 0.0, "reward/std": 1.0}
    training = invariants_of_any_run(cfg, rows)
    exp = rollouts[1 if cfg.normalize_reward else 0]
    if critic == "critic = reward model" or critic == "reward model" and not cfg.lora_r:
        tokenizer = P.load_tokenizer(tiny_dirs["policy"], "test")
        scored = scored_rows(exp, tokenizer)
        target = (exp.scores - start["reward/mean"]) / start["reward/std"]
        atol = {"fp32": 1e-4, "bf16": 0.1}[precision]
        for b, t in scored:
            assert exp.values[b, t].item() == pytest.approx(target[b].item(), abs=atol)
    else:
        assert not exp.values.any()
    if cfg.critic_warmup_steps:
        measuring = 1 if cfg.normalize_reward else 0
        before, after = actors[measuring], actors[measuring + 1]  # rollouts 1 and 2
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert training[0]["objective/kl_coef"] == training[1]["objective/kl_coef"] == cfg.kl_ctl
        assert training[0]["lr/actor"] == training[1]["lr/actor"]



# ------------------------------------------------------------------------------------------------
# The real-model study (benchmarks/real_model.py): its own logic, on tiny models. The suite
# never runs the study itself.
# ------------------------------------------------------------------------------------------------

def study_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("real_model", HERE / "benchmarks" /
                                                  "real_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


R = study_module()
QUESTION = "Sam has 14 marbles and gives 6 away. How many marbles are left?" + R.INSTRUCTION


@pytest.mark.parametrize("response, score", [
    ("8", 1), ("Sam has 8 marbles left.", 1), ("14 - 6 = 8", 1), ("The answer is 8.\n", 1),
    ("9", 0), ("Sam has 14 marbles.", 0), ("6", 0), ("eight", 0), ("", 0),
    ("7 8 9", 0),  # the last number is what counts
    ("1 2 3 4 5 6 7 8", 0), ("8 or 9 or 10 or 7 or 8", 0),  # listing numbers is refused
    ("14 - 6 = 8, so 8", 1), ("-8", 0), ("8.5", 0), ("8 apples and 1 more", 0)])
def test_the_arithmetic_reward_scores_the_last_number_and_refuses_the_hacks(response, score):
    """1 exactly when the response's last number is the answer and it writes at most
    MAX_NUMBERS numbers: a copied operand, a neighbour, words, a sign or a spray of guesses
    score 0. The answer comes from the question, as a message list or as plain text."""
    for prompt in ([{"role": "user", "content": QUESTION}], QUESTION):
        assert R.arithmetic_reward([prompt], [response]) == [score]


def test_every_template_reads_back_its_own_numbers():
    """solve() recovers each generated problem's answer from its text alone, for every
    template; a question of another task is an error, not a score."""
    train, heldout = R.make_problems(600, 60, seed=3)
    assert {R.solve(p["prompt"][-1]["content"]) == p["answer"] for p in train + heldout} == {True}
    for template, _ in R.TEMPLATES:  # each template in use, and read back by its own pattern
        assert any(R.template_pattern(template).search(p["prompt"][-1]["content"])
                   for p in train)
    with pytest.raises(ValueError, match="not a question of this task"):
        R.solve("What is the capital of France?")


def test_train_and_held_out_problems_are_disjoint_in_their_arithmetic():
    """No held-out fact appears in training in any wording or operand order (7 + 5 and 5 + 7
    are one fact); the answer is never one of the operands; training's problems all differ;
    the split is the same for the same seed."""
    train, heldout = R.make_problems(1500, 100)
    facts = [{R.fact(p["key"]) for p in rows} for rows in (train, heldout)]
    assert len({p["prompt"][0]["content"] for p in train}) == 1500 and len(facts[1]) == 100
    assert not facts[0] & facts[1]
    assert facts[0] | facts[1] == {R.fact(key) for key in R.arithmetic()}
    assert all(p["answer"] not in p["key"][1:] for p in train + heldout)
    assert {op for op, _, _ in facts[1]} == {"+", "-", "*"}
    assert R.make_problems(1500, 100) == (train, heldout)


def write_run(root, name, scores, evals, kl, usage=None, critic=True):
    """A fake run directory: metrics.jsonl rows (steps 1.., evaluations at the given steps; 100
    tokens and 60 s an iteration, 30 s an evaluation)."""
    run = root / name
    run.mkdir(parents=True)
    rows = [{"step": 0, "eval/scores": evals[0], "time/eval_s": 30.0}]
    for step, score in enumerate(scores, 1):
        rows.append({"step": step, "objective/scores": score, "objective/kl": kl * step,
                     "response/length": 10.0 + step, "response/tokens": 100.0,
                     "time/rollout_s": 40.0, "time/update_s": 20.0,
                     **({"val/explained_variance": 0.1 * step} if critic else {}),
                     **({"eval/scores": evals[step], "time/eval_s": 30.0}
                        if step in evals else {})})
    (run / P.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if usage:
        (run / "usage.json").write_text(json.dumps(usage))
    return run


def write_samples(run, step, answers):
    """samples.jsonl lines of one evaluation: (score, ended) per held-out answer."""
    with (run / P.SAMPLES).open("a") as f:
        f.writelines(json.dumps({"step": step, "prompt": QUESTION, "response": "8",
                                 "score": score, "ended": ended}) + "\n"
                     for score, ended in answers)


def test_the_study_table_is_computed_from_the_runs_metrics(tmp_path):
    """Each cell is the mean over seeds and the min-max: held-out score at step 0 and at the
    last evaluation, the share of held-out answers right and finished (an answer cut at the
    limit does not count), the training score of the last 5 iterations, the final KL and
    length, the explained variance of the last 5, wall minutes and peak GiB; a missing seed
    is not counted."""
    first = write_run(tmp_path, "full-seed0", [0.0] * 5 + [1.0] * 5, {0: 0.25, 10: 0.5}, 0.1,
                      {"wall_s": 600, "peak_rss_mib": 2048, "invocations": 1})
    second = write_run(tmp_path, "full-seed1", [0.0] * 5 + [0.5] * 5, {0: 0.25, 10: 0.75}, 0.3,
                       {"wall_s": 1200, "peak_rss_mib": 3072, "invocations": 2})
    for run, answers in ((first, [(1.0, False), (0.0, True)]), (second, [(1.0, True)] * 2)):
        write_samples(run, 0, [(0.0, True), (1.0, True)])
        write_samples(run, 10, answers)
    table = R.summarize(tmp_path, ["full", "lora16"], [0, 1, 2]).splitlines()
    assert table[2] == ("| full | 2 | 0.250 (0.250–0.250) | 0.625 (0.500–0.750) | "
                        "0.500 (0.500–0.500) | 0.500 (0.000–1.000) | "
                        "0.750 (0.500–1.000) | 2.000 (1.000–3.000) | 20.000 (20.000–20.000) | "
                        "0.800 (0.800–0.800) | 1.000 (1.000–1.000) | 15.000 (10.000–20.000) | "
                        "2.500 (2.000–3.000) |")
    assert table[3] == "| lora16 | 0 | – | – | – | – | – | – | – | – | – | – | – |"
    write_run(tmp_path, "grpo-seed0", [0.0] * 4, {0: 0.25, 4: 0.5}, 0.1, critic=False)
    row = R.summarize(tmp_path, ["grpo"], [0]).splitlines()[2].split(" | ")
    assert row[9:11] == ["–", "0.400"]  # no explained variance without a critic; 400 tokens


def test_the_study_plots_each_curve_from_the_runs_metrics(tmp_path):
    """One PNG per curve, the variants' means and bands drawn from the same files (with the
    study's own requirements: matplotlib)."""
    pytest.importorskip("matplotlib", reason="the study's plots need benchmarks/requirements.txt")
    write_run(tmp_path, "full-seed0", [0.0, 1.0], {0: 0.25, 2: 0.5}, 0.1)
    write_run(tmp_path, "full-seed1", [0.5, 1.0], {0: 0.5, 2: 0.75}, 0.2)
    plots = R.plot(tmp_path, ["full", "lora16"], [0, 1, 2], tmp_path)
    assert [p.name for p in plots] == [name.replace("/", "_") + ".png" for name, _ in R.CURVES]
    plots.append(R.plot_against_time(tmp_path, ["full", "lora16"], [0, 1, 2], tmp_path))
    assert all(p.stat().st_size > 1000 for p in plots)


def test_wall_time_at_each_evaluation_sums_the_iterations_and_evaluations_before_it(tmp_path):
    rows = R.read_rows(write_run(tmp_path, "gae-seed0", [0.0] * 4, {0: 0.1, 2: 0.2, 4: 0.3},
                                 0.1))
    assert R.elapsed(rows) == {0: 0.5, 2: 3.0, 4: 5.5}  # 60 s an iteration, 30 s an evaluation


def study_config(preset, variant, seed=0):
    command = R.train_command("model", (Path("train"), Path("held-out")), R.PRESETS[preset],
                              variant, seed, Path("/nonexistent"))
    return P.parse_args(command[2:])


def test_the_baselines_study_gives_each_estimator_one_budget_and_gae_is_the_full_run():
    """gae, grpo and rloo: the same rollouts of 16 answers (grpo, rloo: 4 prompts x 4), the
    same iterations and everything else; gae's run is the real-model study's full fine-tuning
    run, option for option (docs/baselines.md reuses it)."""
    configs = {v: study_config("baselines", v) for v in R.PRESETS["baselines"].variants}
    assert dataclasses.asdict(configs["gae"]) == dataclasses.asdict(study_config("cpu", "full"))
    for name, cfg in configs.items():
        assert (cfg.batch_size, cfg.steps, cfg.max_new_tokens) == (16, 40, 16)
        assert (cfg.advantage_estimator, cfg.samples_per_prompt) == (
            (name, 4) if name != "gae" else ("gae", 1))
        P.validate(cfg)
        same = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("advantage_estimator", "samples_per_prompt", "critic_warmup_steps")}
        assert same == {k: v for k, v in dataclasses.asdict(configs["gae"]).items() if k in same}


@pytest.fixture
def study_model(chat_dirs, tmp_path):
    """The tiny chat policy with room for the study's questions (512 positions)."""
    from transformers import AutoConfig, GPT2LMHeadModel
    config = AutoConfig.from_pretrained(chat_dirs["policy"])
    config.n_positions = 512
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "model")
    P.load_tokenizer(chat_dirs["policy"], "test").save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


@pytest.mark.slow
def test_a_second_study_invocation_skips_finished_runs_and_resumes_an_interrupted_one(
        study_model, tmp_path, monkeypatch, capsys):
    """The study's driver on a tiny preset: the first invocation trains every run; a second
    trains none ('skipped'); a run with a checkpoint and no saved policy (interrupted) is
    continued with --resume, keeping its rows; its wall time adds up over invocations."""
    preset = R.Preset(study_model, ["--reward-fn", f"{HERE / 'benchmarks' / 'real_model.py'}"
                                    ":arithmetic_reward", "--steps", "2", "--batch-size", "4",
                                    "--mini-batch-size", "2", "--ppo-epochs", "1",
                                    "--max-new-tokens", "4", "--eval-every", "1",
                                    "--max-prompt-length", "400", "--samples", "0",
                                    "--no-tensorboard"],
                      {"full": []}, seeds=[0], n_train=16, n_heldout=4)
    monkeypatch.setitem(R.PRESETS, "tiny", preset)
    results = tmp_path / "results"
    assert R.main(["--preset", "tiny", "--results", str(results)]) == 0
    run = results / "runs" / "full-seed0"
    assert "run 1/1: full seed 0: new" in capsys.readouterr().out
    assert [row["step"] for row in read_metrics(run)] == [0, 1, 2]
    assert R.main(["--preset", "tiny", "--results", str(results)]) == 0
    assert "run 1/1: full seed 0: done, skipped" in capsys.readouterr().out
    assert json.loads((run / "usage.json").read_text())["invocations"] == 1
    P.shutil.rmtree(run / P.POLICY)  # as if killed after its last checkpoint
    preset.train_options[preset.train_options.index("--steps") + 1] = "3"
    assert "--resume" in R.train_command(study_model, (Path("a"), Path("b")), preset, "full",
                                         0, run)
    assert R.main(["--preset", "tiny", "--results", str(results)]) == 0
    assert "run 1/1: full seed 0: interrupted" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds the runs of another study"):
        R.main(["--preset", "tiny", "--results", str(results), "--model", "other"])
    assert [row["step"] for row in read_metrics(run)] == [0, 1, 2, 3]
    assert json.loads((run / "usage.json").read_text())["invocations"] == 2
    report = (results / "results.md").read_text()
    assert "| full | 1 |" in report and "## Held-out samples" in report


if __name__ == "__main__":  # a torchrun worker (`torchrun_worker`): <function> <JSON keywords>
    torch.distributed.init_process_group("gloo")
    globals()[sys.argv[1]](**json.loads(sys.argv[2]))
    P.leave_process_group(together=True)  # as main() leaves


# ------------------------------------------------------------------------------------------------
# Group baselines, the KL in the loss, clip-higher and the loss's aggregation (issue 30)
# ------------------------------------------------------------------------------------------------

# runs whose metrics test_data/metrics_before_estimators.json recorded from the code before the
# options below existed (commit ef8af6f): with those options at their defaults nothing changes
RECORDED_RUNS = {
    "defaults": {},
    "options": dict(micro_batch_size=2, kl_estimator="k3", ent_coef=0.01, dual_clip=3.0,
                    whiten_rewards=True, kl_controller="adaptive", kl_target=0.01,
                    critic_warmup_steps=1, steps=4),
    "lora": dict(lora_r=4, ppo_epochs=1),
}


def this_machine() -> dict:
    cpu = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
           if line.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
    return {"torch": torch.__version__, "cpu": cpu[0] if cpu else platform.processor()}


def test_defaults_reproduce_the_metrics_recorded_before_the_new_options(tmp_path):
    """Bit for bit where the recording was made (same torch, same CPU): float kernels differ
    between CPUs, so elsewhere to 1e-5."""
    recorded = json.loads((HERE / "test_data" / "metrics_before_estimators.json").read_text())
    exact = recorded["recorded_on"] == this_machine()
    for name, overrides in RECORDED_RUNS.items():
        cfg = tiny_config(tmp_path, output_dir=str(tmp_path / name), **overrides)
        assert P.train(cfg) == 0
        rows = without_timing(read_metrics(cfg.output_dir))
        assert rows == (recorded["runs"][name] if exact else
                        [pytest.approx(row, rel=1e-5, abs=1e-7) for row in recorded["runs"][name]])


def group_oracle(rewards: list[float], n: int, estimator: str, eps: float = 1e-6) -> list:
    """The group estimators written out, one answer at a time."""
    out = []
    for start in range(0, len(rewards), n):
        group = rewards[start:start + n]
        mean = sum(group) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (n - 1))
        for r in group:
            others = (sum(group) - r) / (n - 1)
            out.append({"grpo": (r - mean) / (std + eps), "dr_grpo": r - mean,
                        "rloo": r - others}[estimator])
    return out


@st.composite
def grouped_rewards(draw, max_groups=4, max_n=6):
    """(rewards [groups x n] float64, n): real-valued, or 0/1 as a rule reward gives."""
    n, groups = draw(st.integers(2, max_n)), draw(st.integers(1, max_groups))
    value = st.floats(-5, 5, allow_nan=False) if draw(st.booleans()) else st.sampled_from([0., 1.])
    rewards = draw(st.lists(value, min_size=n * groups, max_size=n * groups))
    return torch.tensor(rewards, dtype=torch.float64), n


GROUP_NAMES = ["grpo", "dr_grpo", "rloo"]


@given(grouped_rewards(), st.sampled_from(GROUP_NAMES))
def test_group_estimators_equal_plain_loop_oracles(data, estimator):
    rewards, n = data
    expected = group_oracle(rewards.tolist(), n, estimator)
    assert P.GROUP_ESTIMATORS[estimator].__name__ == f"{estimator}_advantages"
    assert getattr(P, f"{estimator}_advantages")(rewards, n).tolist() == pytest.approx(
        expected, rel=1e-6, abs=1e-6)


@given(grouped_rewards())
def test_rloo_advantages_sum_to_zero_in_each_group(data):
    rewards, n = data
    sums = P.rloo_advantages(rewards, n).view(-1, n).sum(1)
    assert sums.abs().max().item() <= 1e-9 * (1 + rewards.abs().max().item())


@given(grouped_rewards(), st.floats(0.1, 10), st.floats(-10, 10))
def test_grpo_is_unchanged_by_a_positive_affine_map_of_the_rewards(data, scale, shift):
    rewards, n = data
    spread = rewards.view(-1, n).std(1)
    assume(spread.min().item() > 0.1)  # eps is what moves: by eps/std at most
    torch.testing.assert_close(P.grpo_advantages(scale * rewards + shift, n),
                               P.grpo_advantages(rewards, n), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("estimator", GROUP_NAMES)
@pytest.mark.parametrize("value", [0.0, 1.0, -3.5])
def test_identical_rewards_in_a_group_give_zero_advantage_not_nan(estimator, value):
    rewards = torch.tensor([value] * 4 + [0.0, 1.0, 1.0, 0.0])
    advantages = P.GROUP_ESTIMATORS[estimator](rewards, 4)
    assert advantages[:4].tolist() == [0.0] * 4
    assert torch.isfinite(advantages).all() and advantages[4:].abs().sum() > 0


@pytest.mark.parametrize("estimator", GROUP_NAMES)
def test_a_group_of_one_answer_is_refused(estimator):
    """With n = 1 OpenRLHF asserts n_samples_per_prompt > 1 and TRL requires num_generations
    >= 2 (verl alone falls back to the raw score): the functions refuse, the command line exits
    2 (test_bad_input_gets_one_line_and_exit_2)."""
    with pytest.raises(ValueError, match="needs >= 2 answers"):
        P.GROUP_ESTIMATORS[estimator](torch.tensor([1.0, 0.0]), 1)


def reward_to_go_oracle(rewards, lengths, gamma):
    return [[sum(gamma ** (k - t) * rewards[b][k] for k in range(t, n)) for t in range(n)]
            for b, n in enumerate(lengths)]


@given(rollouts(), st.floats(0.5, 1.0))
def test_reinforce_pp_equals_plain_loop_oracle(r, gamma):
    """Return-to-go per row, then (G - mean) / std over every real token of the batch."""
    _, rewards, mask = tensors(r)
    rewards, lengths = rewards.double(), r["lengths"]
    returns = reward_to_go_oracle(rewards.tolist(), lengths, gamma)
    flat = [g for row in returns for g in row]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((g - mean) ** 2 for g in flat) / len(flat) + 1e-8)
    got = P.reinforce_pp_advantages(rewards, mask, gamma)
    for b, n in enumerate(lengths):
        assert got[b, :n].tolist() == pytest.approx([(g - mean) / std for g in returns[b]],
                                                    rel=1e-6, abs=1e-6)
        assert got[b, n:].abs().sum() == 0


@given(rollouts(), st.floats(0.5, 1.0))
def test_reinforce_pp_is_whitened_gae_with_no_critic_and_lambda_1(r, gamma):
    """000's reward-to-go is GAE with V = 0 and lambda = 1."""
    _, rewards, mask = tensors(r)
    rewards = rewards.double()
    to_go, _ = P.get_advantages_and_returns(torch.zeros_like(rewards), rewards, mask,
                                            gamma=gamma, lam=1.0)
    torch.testing.assert_close(P.reinforce_pp_advantages(rewards, mask, gamma),
                               P.masked_whiten(to_go, mask), rtol=1e-6, atol=1e-6)


@given(rollouts(), st.sampled_from(AGG_MODES), st.sampled_from([None, 20]))
def test_aggregate_loss_equals_plain_loop_oracle(r, mode, scale):
    _, loss, mask = tensors(r)
    loss = loss.double().masked_fill(~mask.bool(), math.nan)  # padding never counts
    lengths = r["lengths"]
    rows = [loss[b, :n].tolist() for b, n in enumerate(lengths)]
    expected = aggregate_oracle(rows, mode, scale or mask.shape[1])
    assert P.aggregate_loss(loss, mask, mode, scale).item() == pytest.approx(expected, rel=1e-9,
                                                                             abs=1e-12)


@given(rollouts(), st.sampled_from(AGG_MODES), st.floats(0.05, 0.3), st.floats(0.05, 0.5))
def test_the_losses_aggregate_as_aggregate_loss(r, mode, eps, eps_value):
    """actor_loss_fn and critic_loss_fn keep copies of aggregate_loss (they paste alone):
    pinned to it, on their per-token terms."""
    values, rewards, mask = tensors(r)
    values, rewards = values.double(), rewards.double()
    old, adv = values * 0.3, rewards
    log_probs = old + 0.4 * torch.sin(7 * values)
    ratio = torch.exp(log_probs - old)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
    close(P.actor_loss_fn(log_probs, old, adv, mask, cliprange=eps, loss_agg_mode=mode,
                          loss_scale_factor=11), P.aggregate_loss(pg, mask, mode, 11), atol=1e-5)
    new, ret = values + 0.3 * torch.cos(5 * values), rewards
    vf = 0.5 * torch.max((new - ret) ** 2,
                         (new.clamp(values - eps_value, values + eps_value) - ret) ** 2)
    close(P.critic_loss_fn(new, values, ret, mask, eps_value, loss_agg_mode=mode),
          P.aggregate_loss(vf, mask, mode), atol=1e-5)


@given(st.integers(1, 5), st.integers(1, 6), st.sampled_from(["actor", "critic", "kl"]))
def test_seq_mean_token_mean_equals_token_mean_for_equal_lengths(batch, length, loss):
    g = torch.Generator().manual_seed(batch * 10 + length)
    a, b, c = (torch.randn(batch, length, generator=g) for _ in range(3))
    mask = torch.ones(batch, length, dtype=torch.bool)
    fn = {"actor": lambda mode: P.actor_loss_fn(a, b, c, mask, loss_agg_mode=mode),
          "critic": lambda mode: P.critic_loss_fn(a, b, c, mask, loss_agg_mode=mode),
          "kl": lambda mode: P.kl_loss_fn(a, b, mask, "k3", loss_agg_mode=mode)}[loss]
    torch.testing.assert_close(fn("seq-mean-token-mean"), fn("token-mean"), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("advantage, ratio, moves", [
    (1.0, 1.25, True),    # past 1 + eps, short of 1 + eps_high: still pushed up
    (1.0, 1.35, False),   # past 1 + eps_high
    (1.0, 0.7, True),     # A > 0 has no lower bound
    (-1.0, 0.75, False),  # below 1 - eps: the lower bound is still eps's
    (-1.0, 0.85, True),
    (-1.0, 1.35, True),   # A < 0 has no upper bound
])
def test_clip_higher_moves_only_the_upper_bound(advantage, ratio, moves):
    log_probs = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    P.actor_loss_fn(log_probs, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1),
                    cliprange=0.2, cliprange_high=0.3).backward()
    assert log_probs.grad.item() == pytest.approx(-advantage * ratio if moves else 0.0)


@given(rollouts(), st.floats(0.05, 0.3))
def test_clip_higher_at_eps_is_ppo_clip(r, eps):
    values, rewards, mask = tensors(r)
    args = (values * 0.5, values * 0.4, rewards, mask)
    assert P.actor_loss_fn(*args, cliprange=eps, cliprange_high=eps).item() == \
        P.actor_loss_fn(*args, cliprange=eps).item()


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@given(st.integers(2, 6), st.integers(0, 2 ** 31))
def test_kl_loss_gradients_by_exact_enumeration(estimator, vocab, seed):
    """E_{a ~ pi}[grad k(a)], summed over every action weighted by pi(a) (pi itself not
    differentiated: the tokens were sampled), equals 0 for k1, grad KL(pi || pi_ref) for k2
    and grad KL(pi_ref || pi) for k3 (kl_loss_fn's docstring)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True)
    log_ref = torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64), -1)
    log_pi = torch.log_softmax(theta, -1)
    assume(P.kl_k3(log_pi, log_ref).max() < 10)  # short of k3's clamp (a test of its own)
    one = torch.ones(1, 1, dtype=torch.bool)
    expected = sum(log_pi[a].exp().detach() * torch.autograd.grad(
        P.kl_loss_fn(log_pi[a].view(1, 1), log_ref[a].view(1, 1), one, estimator), theta,
        retain_graph=True)[0] for a in range(vocab))
    pi, ref = log_pi.exp(), log_ref.exp()
    closed = {"k1": 0.0 * theta.sum(), "k2": (pi * (log_pi - log_ref)).sum(),
              "k3": (ref * (log_ref - log_pi)).sum()}[estimator]
    closed_grad = torch.autograd.grad(closed, theta, allow_unused=True)[0]
    torch.testing.assert_close(expected, closed_grad, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_micro_batches_give_the_minibatchs_gradient_under_every_mode(tiny_dirs, mode):
    """Weighted by their share of the minibatch's tokens (token-mean) or answers (the
    seq-mean modes), micro-batches of ragged answers give the whole minibatch's gradient,
    the KL and entropy terms included."""
    torch.manual_seed(6)
    actor, critic, ref_model, scorer, tokenizer = make_models(tiny_dirs)
    exp = rollout(actor, critic, ref_model, scorer, tokenizer)
    assert exp.action_mask.sum(1).unique().numel() > 2  # ragged: the weights differ
    results = [sgd_updated_weights(P.copy.deepcopy(actor), P.copy.deepcopy(critic), exp,
                                   mini_batch_size=8, micro_batch_size=micro, max_grad_norm=1e9,
                                   loss_agg_mode=mode, kl_loss_coef=0.5, kl_estimator="k2",
                                   ent_coef=0.1) for micro in (8, 3)]
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-5)


GROUP_PROMPTS = ["the cat sat on the mat", "hello there"]


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
@pytest.mark.parametrize("kl_ctl", [0.0, 0.3])
def test_experience_advantages_follow_each_estimator(tiny_dirs, estimator, kl_ctl):
    """generate_experience without a critic (V = 0): a group estimator's advantage of the
    score in its group (samples_per_prompt consecutive rows), clipped, plus the KL-to-go
    sum_{t' >= t} -beta k3_t' (undiscounted whatever gamma); REINFORCE++'s whitened
    return-to-go of the KL-shaped rewards, discounted by gamma."""
    actor, _, ref_model, scorer, tokenizer = distinct_models(tiny_dirs)
    torch.manual_seed(4)
    prompts = [p for p in GROUP_PROMPTS for _ in range(4)]
    exp = rollout(actor, None, ref_model, scorer, tokenizer, prompts, kl_ctl=kl_ctl, gamma=0.9,
                  advantage_estimator=estimator, samples_per_prompt=4, clip_reward_value=0.05,
                  kl_estimator="k3")
    lengths = exp.action_mask.sum(1).tolist()
    assert not exp.values.any()
    kl = [[math.expm1(ref - lp) + lp - ref for lp, ref in zip(*rows)]
          for rows in zip(exp.log_probs.tolist(), exp.ref_log_probs.tolist())]
    rewards = rewards_oracle(exp.log_probs.tolist(), exp.ref_log_probs.tolist(),
                             exp.scores.tolist(), lengths, kl_ctl, 0.05, "k3")
    if estimator == "reinforce_pp":
        to_go = reward_to_go_oracle(rewards, lengths, 0.9)
        flat = [g for row in to_go for g in row]
        mean = sum(flat) / len(flat)
        std = math.sqrt(sum((g - mean) ** 2 for g in flat) / len(flat) + 1e-8)
        expected = [[(g - mean) / std for g in row] for row in to_go]
    else:
        group = [min(max(a, -0.05), 0.05) for a in group_oracle(exp.scores.tolist(), 4,
                                                                 estimator)]
        assert exp.scores.abs().max() > 0.05 and 0 < sum(abs(a) < 0.05 for a in group) < 8
        expected = [[group[b] + sum(-kl_ctl * kl[b][k] for k in range(t, n)) for t in range(n)]
                    for b, n in enumerate(lengths)]
    for b, n in enumerate(lengths):
        assert exp.advantages[b, :n].tolist() == pytest.approx(expected[b], abs=1e-5)
        assert not exp.advantages[b, n:].any()


def memory_line(out: str) -> int:
    """The bytes of the end-of-run line "memory held for the models ...", summed."""
    line = next(x for x in out.splitlines() if x.startswith("memory held for the models"))
    return sum(float(m) for m in re.findall(r"([\d.]+) MiB", line))


@pytest.mark.parametrize("lora_r", [0, 4])
def test_an_estimator_without_a_critic_loads_none_and_says_what_it_saves(tmp_path, capsys,
                                                                       lora_r):
    """rloo loads no critic (no model, adapter, optimizer, metrics or checkpoint entry), says
    so at the start with the bytes a critic would have held, and holds less than gae."""
    held = {}
    for estimator, n in (("gae", 1), ("rloo", 4)):
        cfg = tiny_config(tmp_path, output_dir=str(tmp_path / estimator), lora_r=lora_r,
                          advantage_estimator=estimator, samples_per_prompt=n)
        assert P.train(cfg) == 0
        out = capsys.readouterr().out
        held[estimator] = memory_line(out)
        rows = read_metrics(cfg.output_dir)
        state = torch.load(Path(cfg.output_dir) / P.CHECKPOINT, weights_only=True)
        if estimator == "rloo":
            assert "critic    none (rloo needs no value model): saves ~" in out
            assert not any(k.startswith(("val/", "loss/value", "lr/critic"))
                           for row in rows for k in row)
            assert not any(k.startswith("critic") for k in state)
        else:
            assert all("val/explained_variance" in r for r in rows) and "critic" in state
    assert held["rloo"] < held["gae"]


def test_the_saved_bytes_the_run_states_are_the_critics_it_leaves_out(tmp_path, capsys):
    """The start-up line's estimate (a critic of what the actor trains: weights, gradients
    and two AdamW moments, 4 x the actor's gradient bytes) against gae's critic row."""
    gae = tiny_config(tmp_path, output_dir=str(tmp_path / "gae"), steps=1)
    table = {row[0]: row for row in P.model_table(P.setup_run(gae))}
    capsys.readouterr()
    P.train(dataclass_replace(gae, output_dir=str(tmp_path / "grpo"), samples_per_prompt=4,
                              advantage_estimator="grpo"))
    said = float(re.search(r"saves ~([\d.]+) MiB", capsys.readouterr().out)[1])
    assert said == pytest.approx(4 * table["actor"][5] / 2 ** 20, abs=0.05)
    assert said == pytest.approx(sum(table["critic"][4:]) / 2 ** 20, rel=0.05)  # gae's critic


def test_a_group_run_resumes_exactly(tmp_path):
    """grpo, 4 answers per prompt, the KL in the loss: N iterations straight == k, then
    --resume to N (no critic in the checkpoint to restore)."""
    straight = tiny_config(tmp_path, output_dir=str(tmp_path / "straight"), steps=4,
                           advantage_estimator="grpo", samples_per_prompt=4, kl_loss_coef=0.1,
                           kl_estimator="k3", loss_agg_mode="seq-mean-token-sum-norm")
    assert P.train(straight) == 0
    first = dataclass_replace(straight, output_dir=str(tmp_path / "split"), steps=2)
    assert P.train(first) == 0
    assert P.train(dataclass_replace(first, steps=4, resume=True)) == 0
    a, b = read_metrics(straight.output_dir), read_metrics(first.output_dir)
    assert without_timing(a) == without_timing(b)


def test_the_kl_in_the_loss_leaves_the_reward(tmp_path, monkeypatch):
    """With --kl-loss-coef the rewards carry the score alone (beta 0 in the reward, and in
    objective/kl_coef), the loss carries the KL (loss/kl, the estimate it aggregates), and
    objective/kl still measures it."""
    rollouts = spy_on(monkeypatch, "generate_experience")
    cfg = tiny_config(tmp_path, kl_loss_coef=0.2, kl_estimator="k2", steps=2)
    assert P.train(cfg) == 0
    rows = read_metrics(cfg.output_dir)
    assert [row["objective/kl_coef"] for row in rows] == [0.0, 0.0]
    assert rows[1]["objective/kl"] > 0 and rows[1]["loss/kl"] > 0
    for args, exp in rollouts:
        assert args["kl_ctl"] == 0.0
        last = exp.action_mask.sum(1) - 1
        expected = torch.zeros_like(exp.rewards)
        expected[torch.arange(len(last)), last] = exp.reward_score
        assert torch.equal(exp.rewards, expected)


# the new options, with those they change a quantity of: the reward's scale and its clip
# (normalize, EOS penalty), the gradient's reduction (micro-batches, LoRA), the precision
ESTIMATOR_OPTIONS = {
    "advantage_estimator": ["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"],
    "samples_per_prompt": [2, 4],
    "kl_loss": [(0.0, "k1"), (0.2, "k1"), (0.2, "k2"), (0.2, "k3")],  # --kl-loss-coef, estimator
    "cliprange_high": [None, 0.28],
    "loss_agg_mode": AGG_MODES,
    "micro_batch_size": [None, 2],
    "lora_r": [0, 4],
    "reward_model": [False, True],
    "normalize_reward": [False, True],
    "missing_eos_penalty": [None, 1.0],
    "bf16": [False, True],
    "whiten_advantages": [True, False],
}
ESTIMATOR_ROWS = all_pairs({name: len(values) for name, values in ESTIMATOR_OPTIONS.items()})


def test_the_estimator_array_covers_every_pair_of_values():
    for a, b in itertools.combinations(ESTIMATOR_OPTIONS, 2):
        seen = {(row[a], row[b]) for row in ESTIMATOR_ROWS}
        assert len(seen) == len(ESTIMATOR_OPTIONS[a]) * len(ESTIMATOR_OPTIONS[b]), (a, b)
    assert len(ESTIMATOR_ROWS) <= 26


@pytest.mark.slow
@pytest.mark.parametrize("levels", ESTIMATOR_ROWS,
                         ids=lambda row: "".join(map(str, row.values())))
def test_estimators_and_losses_that_meet_keep_their_invariants(tiny_dirs, tmp_path,
                                                              monkeypatch, levels):
    """One row of the all-pairs array of the estimators, the KL's place and the loss's
    aggregation with the options they meet, run by the trainer for 3 iterations: every metric
    finite, no update skipped, pi/pi_old = 1 on each first minibatch and KL = 0 at the start;
    a critic exactly with gae; with the KL in the loss, beta 0 in the rewards and loss/kl
    logged; a group estimator's advantages sum to zero in each group (beta 0: no KL-to-go)
    and are equal along each answer."""
    option = {name: ESTIMATOR_OPTIONS[name][k] for name, k in levels.items()}
    (coef, estimator), reward = option.pop("kl_loss"), option.pop("reward_model")
    cfg = tiny_config(tmp_path, model=tiny_dirs["policy"], batch_size=8, max_new_tokens=16,
                      normalize_reward_samples=8, kl_loss_coef=coef, kl_estimator=estimator,
                      reward_model=tiny_dirs["reward"] if reward else None, **option)
    rollouts = spy_on(monkeypatch, "generate_experience")
    assert P.train(cfg) == 0
    for row in invariants_of_any_run(cfg, read_metrics(cfg.output_dir)):
        assert ("loss/value" in row) == (cfg.advantage_estimator == "gae")
        assert ("loss/kl" in row) == (coef > 0)
        assert (row["objective/kl_coef"] == 0) == (coef > 0)
    args, exp = rollouts[1 if cfg.normalize_reward else 0]
    assert (args["critic"] is None) == (cfg.advantage_estimator != "gae")
    if cfg.advantage_estimator in P.GROUP_ESTIMATORS and coef > 0:
        n = cfg.samples_per_prompt
        firsts = exp.advantages[:, 0]
        assert firsts.view(-1, n).sum(1).abs().max() <= 1e-4 * (1 + firsts.abs().max())
        assert torch.equal(exp.advantages, torch.where(exp.action_mask, firsts[:, None], 0.0))


def test_k3_in_the_loss_is_clamped_at_10_as_verl_does():
    """A sampled token that pi makes far less likely than pi_ref (log pi = -20.7, log pi_ref
    = -1.2: k3 = 2.9e8) counts 10 and pushes no gradient; below the clamp k3 is exact."""
    log_probs = torch.tensor([[-20.7, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.2, -1.5]], dtype=torch.float64)
    P.kl_loss_fn(log_probs, ref, torch.ones(1, 2), "k3", "seq-mean-token-sum").backward()
    exact = math.expm1(-0.5) + 0.5
    assert log_probs.grad[0].tolist() == pytest.approx([0.0, 1 - math.exp(-0.5)])
    assert P.kl_loss_fn(log_probs, ref, torch.ones(1, 2), "k3", "seq-mean-token-sum").item() \
        == pytest.approx(10 + exact)


def test_a_group_check_counts_every_rank():
    """--batch-size must hold whole groups on every rank: 8 answers in groups of 8 fit one
    process, not two."""
    cfg = P.Config(batch_size=8, mini_batch_size=4, samples_per_prompt=8, tensorboard=False)
    P.validate(cfg, world_size=1)
    with pytest.raises(P.UsageError, match="x the 2 ranks"):
        P.validate(cfg, world_size=2)
    P.validate(dataclass_replace(cfg, samples_per_prompt=4), world_size=2)


def test_each_group_is_one_prompt_answered_n_times(tmp_path, monkeypatch):
    """The loop's rollout: batch / n prompts, each answered n times in consecutive rows, no
    prompt twice in a batch; objective/flat_groups is the share of groups scored alike."""
    rollouts = spy_on(monkeypatch, "generate_experience")
    cfg = tiny_config(tmp_path, advantage_estimator="dr_grpo", samples_per_prompt=4, steps=2)
    assert P.train(cfg) == 0
    rows = read_metrics(cfg.output_dir)
    for (args, exp), row in zip(rollouts, rows):
        groups = [exp.prompts[i:i + 4] for i in range(0, 8, 4)]
        assert all(len(set(group)) == 1 for group in groups)
        assert len({group[0] for group in groups}) == 2
        flat = [len(set(exp.reward_score[i:i + 4].tolist())) == 1 for i in range(0, 8, 4)]
        assert row["objective/flat_groups"] == sum(flat) / 2


def test_a_checkpoint_of_the_version_before_resumes_when_the_new_options_are_default(tmp_path):
    """A checkpoint whose options predate --samples-per-prompt, --advantage-estimator,
    --kl-loss-coef, --cliprange-high and --loss-agg-mode resumes with them at their defaults
    (which reproduce that version), and is refused with another value."""
    cfg = tiny_config(tmp_path, steps=2)
    assert P.train(cfg) == 0
    path = Path(cfg.output_dir) / P.CHECKPOINT
    state = torch.load(path, weights_only=True)
    for name in P.SINCE_WITH_OLD_DEFAULTS:
        del state["fingerprint"][name]
    torch.save(state, path)
    assert P.train(dataclass_replace(cfg, steps=3, resume=True)) == 0
    with pytest.raises(P.UsageError, match="loss_agg_mode: 'token-mean' -> 'seq-mean"):
        P.load_checkpoint(Path(cfg.output_dir), dataclass_replace(
            cfg, steps=3, resume=True, loss_agg_mode="seq-mean-token-mean"))


def test_options_a_critic_free_estimator_does_not_use_are_named(tmp_path, capsys):
    """--kl-loss-coef with k1 (zero gradient in expectation) and gae's own options set under
    another estimator each get a warning at the start."""
    cfg = tiny_config(tmp_path, steps=1, advantage_estimator="reinforce_pp", lam=0.9,
                      whiten_advantages=False, kl_loss_coef=0.1)
    assert P.train(cfg) == 0
    err = capsys.readouterr().err
    assert "--kl-estimator k1: its gradient is 0 in expectation" in err
    assert "--lam, --whiten-advantages: gae's, unused by --advantage-estimator reinforce_pp" in err
