"""RLHF with PPO in one file: Part I is the method, Part II the trainer that scales it.

The RLHF-PPO stage (004 §2-4 of the derivation, five Chinese articles 000-004 not in this
repository; README.md quotes every formula used here) with four models: the actor (trained
policy), the critic (trained value model), the reward model (frozen) and the reference model (a
frozen copy of the initial policy). Each iteration samples responses, scores them, turns the
scores into KL-shaped per-token rewards, estimates advantages with GAE, and takes PPO-clip steps.

Part I (§0-9, torch and transformers only) is the method; you may stop reading at `Part II`.
Part II (§10-15) loads models (whole or with adapters), rewards and prompts, runs on several
processes (replicated or sharded), checkpoints, evaluates, logs, and makes the command line from
`Config`: `python ppo_rlhf.py` is the offline demo, `--help` lists every option.

Reading order is one PPO iteration, in the derivation's order:
    0     the method's hyperparameters (`PPOConfig`), with 004's defaults
    1-6   the math, pure torch: masked helpers; log-probs, KL estimators; KL-shaped rewards (004
          `compute_rewards`); GAE (000, 004 `get_advantages_and_returns`), critic-free baselines
          (GRPO, Dr. GRPO, RLOO, REINFORCE++); the losses: PPO-clip actor, clipped critic (004
          `actor_loss_fn`, `critic_loss_fn`), KL; the KL coefficient controllers (004 §4.2)
    7     `generate_experience`: sample, score with the four models, rewards, advantages
    8     `ppo_update`: ppo_epochs passes of minibatch steps on actor and critic
    9     `ppo_iterations`: the training loop, 004 §4.1(5)'s pseudo-code

Notation: B batch (sequences), P prompt length (left-padded), T response length (right-padded);
action_mask [B, T] (float, int or bool): 1 on real response tokens, through the first EOS, 0 on
the padding after it. Per-token tensors are aligned to the response: position t holds the action
a_t (response token t), log pi(a_t|s_t), V(s_t) with s_t = prompt + response[:t], and r_t."""

import dataclasses
import hashlib
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.utils.checkpoint

# === 0. The method's hyperparameters, 004's (DeepSpeed-Chat's) defaults; Part II adds `Config`.

def option(default, group: str, help: str):
    """A dataclass field with its --help line and the group it is listed in."""
    return field(default=default, metadata={"group": group, "help": help})


@dataclass
class PPOConfig:
    steps: int = option(80, "schedule", "PPO iterations (rollout + update)")
    batch_size: int = option(32, "schedule", "answers per rollout (all processes together): "
                             "prompts x --samples-per-prompt")
    samples_per_prompt: int = option(1, "schedule", "answers to each prompt, a group (the "
                                     "group estimators' baseline)")
    mini_batch_size: int = option(16, "schedule", "sequences per optimizer step (all processes)")
    micro_batch_size: int | None = option(None, "schedule", "sequences per forward/backward "
                                          "of each process (accumulated); default: minibatch")
    rollout_micro_batch_size: int | None = option(None, "schedule", "sequences per scoring "
                                                  "forward of each process; default: all")
    ppo_epochs: int = option(4, "schedule", "passes over each batch of experience")
    critic_warmup_steps: int = option(0, "schedule", "first N iterations: the critic alone "
                                      "(the actor, its lr schedule and beta wait)")
    seed: int = option(0, "runtime", "seed of the prompt order and of sampling")
    max_new_tokens: int = option(16, "generation", "response length limit")
    temperature: float = option(1.0, "generation", "sampling temperature (log-probs too)")
    top_k: int = option(0, "generation", "top-k sampling, 0 = off (ratio, KL off-policy)")
    top_p: float = option(1.0, "generation", "nucleus sampling, 1 = off (ratio, KL off-policy)")
    missing_eos_penalty: float | None = option(None, "generation", "subtracted from the score "
                                               "of responses that never emit EOS (after "
                                               "--normalize-reward: in units of sigma0)")
    recompute_log_probs: bool = option(False, "generation", "rollout log-probs from a full "
                                       "actor forward, not from generate's logits")
    max_grad_norm: float = option(1.0, "optimization", "gradient-norm clipping, per model")
    ent_coef: float = option(0.0, "optimization", "entropy bonus in the actor loss")
    advantage_estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = option(
        "gae", "the math", "gae (critic); grpo, dr_grpo, rloo (group baselines), reinforce_pp "
        "(batch-normalized return): no critic")
    kl_ctl: float = option(0.1, "the math", "KL coefficient beta: r_t = -beta*log(pi/pi_ref)")
    kl_loss_coef: float = option(0.0, "the math", "> 0: the KL is a loss term with this "
                                 "coefficient (GRPO) and leaves the reward")
    kl_estimator: Literal["k1", "k2", "k3"] = option("k1", "the math", "per-token KL: k1 = "
                                                     "log-ratio, k2 = k1^2/2, k3 = (r-1) - log r")
    kl_controller: Literal["fixed", "adaptive", "proportional"] = option(
        "fixed", "the math", "beta fixed, 004's adaptive PPO-Penalty rule, or Ziegler's")
    kl_target: float = option(6.0, "the math", "target KL per sequence of the controllers")
    kl_horizon: int = option(10000, "the math", "horizon of the proportional controller")
    clip_reward_value: float = option(5.0, "the math", "scores are clamped to [-v, v]")
    cliprange: float = option(0.2, "the math", "PPO ratio clip epsilon")
    cliprange_high: float | None = option(None, "the math", "upper clip 1 + eps_high (DAPO's "
                                          "clip-higher); default: --cliprange")
    dual_clip: float | None = option(None, "the math", "dual-clip PPO's c > 1: a token with "
                                     "A < 0 loses at most -c*A; default off (004's PPO-clip)")
    cliprange_value: float = option(0.2, "the math", "critic value clip epsilon")
    gamma: float = option(1.0, "the math", "discount factor")
    lam: float = option(0.95, "the math", "GAE lambda")
    whiten_advantages: bool = option(True, "the math", "normalize GAE's advantages over real "
                                     "tokens (gae; the others normalize their own way)")
    whiten_rewards: bool = option(False, "the math", "per-token rewards to unit variance (gae)")
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                           "seq-mean-token-sum-norm"] = option(
        "token-mean", "the math", "how the losses average their tokens (`aggregate_loss`)")


# === 1. Masked helpers. Statistics over real tokens only: padding must never move a mean.

def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is nonzero (over all, or along `dim`); 0 for an empty mask.
    Padding may hold anything, even inf/NaN: it is selected away, not multiplied by 0."""
    mask = mask.bool()
    total = torch.where(mask, values, 0).sum(dim)
    return total / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, mean_fn=masked_mean) -> torch.Tensor:
    """Population variance E[(x - E[x])^2] over the real positions; `mean_fn` computes the
    masked means (a global one takes them over all processes)."""
    mean = mean_fn(values, mask)
    return mean_fn((values - mean) ** 2, mask)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8, mean_fn=masked_mean) -> torch.Tensor:
    """(x - mean) / std over the real positions, padding 0. shift_mean=False keeps the mean,
    (x - mean)/std + mean: rewards keep their sign."""
    mean, var = mean_fn(values, mask), masked_var(values, mask, mean_fn)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0)


# === 2. Log-probabilities, entropy and KL estimators, per token.

def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(a_t|s_t) = logit[a_t] - logsumexp(logits), for logits [B, T, V], tokens [B, T].
    Gathering first keeps no [B, T, V] log-softmax alive for backward (the update's largest)."""
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = 256) -> torch.Tensor:
    """H(pi(.|s_t)) = logsumexp(z) - sum_a softmax(z)_a z_a, for logits [..., V] -> [...].
    About `chunk_rows` rows at a time, on views of `logits`: one chunk's softmax exists at once,
    and with gradients (the entropy bonus) it is recomputed in backward, not kept."""
    def entropy(z):
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)
    rows = logits.reshape(1, -1, logits.shape[-1]) if logits.dim() < 3 else logits.flatten(0, -3)
    keep_graph = logits.requires_grad and torch.is_grad_enabled()
    step = max(1, chunk_rows // max(len(rows), 1))  # positions per chunk, all rows at once
    parts = [torch.utils.checkpoint.checkpoint(entropy, chunk, use_reentrant=False) if keep_graph
             else entropy(chunk) for chunk in rows.split(step, dim=1)]
    return torch.cat(parts, dim=1).reshape(logits.shape[:-1])


def kl_k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(a) - log pi_ref(a), a ~ pi: unbiased for KL(pi||pi_ref), can be negative."""
    return log_probs - ref_log_probs


def kl_k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi(a) - log pi_ref(a))^2 / 2, a ~ pi: >= 0, low variance, biased for KL."""
    return 0.5 * (log_probs - ref_log_probs) ** 2


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r, r = pi_ref(a)/pi(a), a ~ pi (Schulman, "Approximating KL"): unbiased
    for KL(pi||pi_ref) like k1, but every sample is >= 0 and its variance is lower."""
    log_r = ref_log_probs - log_probs
    return torch.expm1(log_r) - log_r


# === 3. KL-shaped rewards (004 §4.1(3), DeepSpeed-Chat `compute_rewards`).

def compute_rewards(log_probs, ref_log_probs, reward_score, action_mask, kl_ctl=0.1,
                    clip_reward_value=5.0, kl_estimator="k1"):
    """Per-token rewards r_t of 004 §4.1(3):

        r_t = -kl_ctl * log(pi(a_t|s_t) / pi_ref(a_t|s_t))                  for t != T
        r_T = -kl_ctl * log(pi(a_T|s_T) / pi_ref(a_T|s_T)) + clip(score)    on the last real token

    log_probs, ref_log_probs [B, T]: the sampled tokens' log-probs under actor and reference;
    reward_score [B]: one score per sequence, clamped to +-clip_reward_value; action_mask [B, T]:
    1 on real response tokens (through the first EOS), 0 on padding; kl_estimator: "k1" (the
    documents' log-ratio), "k2" (k1^2 / 2) or "k3" ((r-1) - log r, r = pi_ref/pi). Returns
    rewards [B, T], exactly 0 on padding.

    The score lands on each row's last real token. DeepSpeed-Chat adds it at `ends - 1`, `ends =
    start + mask.sum() + 1`: one slot after the last real token, which when pad == eos (GPT-2) is
    masked (its mask omits the EOS), so "stop here" is never credited. Here the mask includes the
    EOS and the score is on it (or on the last token of a response cut at the length limit)."""
    mask = action_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("compute_rewards: a row of action_mask has no real token; every "
                         "response needs at least one (the EOS counts)")
    log_ratio = torch.where(mask, log_probs - ref_log_probs, 0.0)  # 0 on padding, even if inf
    kl = {"k1": log_ratio, "k2": 0.5 * log_ratio ** 2,  # k3 = (r - 1) - log r, r = pi_ref/pi
          "k3": torch.expm1(-log_ratio) + log_ratio}[kl_estimator]  # each 0 on padding
    rewards = -kl_ctl * kl
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(dim=1, keepdim=True)  # [B, 1] index of the last real token
    score = torch.clamp(reward_score, -clip_reward_value, clip_reward_value)
    return rewards.scatter_add(1, last, score.to(rewards.dtype).unsqueeze(1))


# === 4. Generalized Advantage Estimation (000 "GAE", 004 §4.1(4) `get_advantages_and_returns`).

def get_advantages_and_returns(values, rewards, action_mask, gamma=1.0, lam=0.95):
    """GAE, computed backward as in 004:

        delta_t = r_t + gamma * V_{t+1} - V_t                  (TD error)
        A_t     = delta_t + gamma * lam * A_{t+1}  =  sum_l (gamma*lam)^l delta_{t+l}
        returns_t = A_t + V_t                                  (the critic's target)

    values [B, T]: V(s_t) from the critic at rollout time; rewards [B, T] (`compute_rewards`);
    action_mask [B, T]: 1 on real tokens, 0 on the padding after (a prefix of ones per row).
    After a row's last real token the episode has ended (V_{T+1} = 0, A_{T+1} = 0); padding
    contributes nothing. Returns (advantages, returns) [B, T], 0 on padding, no gradient (targets).

    Worked example, one row, gamma = 1, lam = 0.5, mask [1, 1, 0] (third slot is padding):
        r = [0, 1, x], V = [0.5, 0.5, y]   (x, y ignored)
        t=1: delta = 1 + 1*0   - 0.5 = 0.5 ; A_1 = 0.5
        t=0: delta = 0 + 1*0.5 - 0.5 = 0.0 ; A_0 = 0.0 + 1*0.5*0.5 = 0.25
        advantages = [0.25, 0.5, 0], returns = [0.75, 1.0, 0]
    """
    mask = action_mask.bool()
    values = torch.where(mask, values.detach(), 0.0)
    rewards = torch.where(mask, rewards.detach(), 0.0)
    lastgaelam = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    length = rewards.shape[1]
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    advantages = torch.where(mask, advantages, 0.0)
    return advantages, advantages + values


# === 4b. Baselines without a critic (000 "baseline": a Monte-Carlo b instead of a learned V(s)).
# The group ones score each prompt's n answers (consecutive rows) against each other: [B] -> [B],
# the sequence's return R_i (its score) to its advantage; the loop adds the per-token KL-to-go.

def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath §4.1.2): A_i = (R_i - mean(R_g)) / (std(R_g) + eps)
    over i's group g; std with n - 1, as TRL, verl, OpenRLHF. Equal rewards give A = 0."""
    if group_size < 2:
        raise ValueError("grpo_advantages: a group needs >= 2 answers (group_size)")
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = R_i - mean(R_g),
    GRPO without the std (its other fix, no 1/|o_i|: loss_agg_mode seq-mean-token-sum-norm)."""
    if group_size < 2:
        raise ValueError("dr_grpo_advantages: a group needs >= 2 answers (group_size)")
    r = rewards.view(-1, group_size)
    return (r - r.mean(1, keepdim=True)).view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = R_i - sum_{j != i} R_j / (n - 1), the mean of the other
    answers to the same prompt: a baseline independent of answer i, so the gradient is unbiased."""
    if group_size < 2:
        raise ValueError("rloo_advantages: a group needs >= 2 answers (group_size)")
    r = rewards.view(-1, group_size)
    return (r - (r.sum(1, keepdim=True) - r) / (group_size - 1)).view(-1)


def reinforce_pp_advantages(rewards, action_mask, gamma=1.0, mean_fn=None):
    """REINFORCE++ (Hu 2025): no critic, no group: the return-to-go of the per-token rewards
    (`compute_rewards`: the KL on every token, the score on the last), whitened over the batch:

        G_t = sum_l gamma^l r_{t+l}   (000's reward-to-go: GAE with V = 0 and lam = 1)
        A_t = (G_t - mean G) / std G  over every real token of the batch
    Shapes [B, T]. mean_fn(values, mask): the masked mean (over every process when several share
    the batch); default this batch's. Returns A, 0 on padding."""
    mask = action_mask.bool()
    mean_fn = mean_fn or (lambda x, m: torch.where(m, x, 0.0).sum() / m.sum().clamp(min=1))
    running, returns = torch.zeros_like(rewards[:, 0]), []
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t], 0.0) + gamma * running
        returns.append(running)
    returns = torch.stack(returns[::-1], dim=1)
    mean = mean_fn(returns, mask)
    std = mean_fn((returns - mean) ** 2, mask).add(1e-8).sqrt()
    return torch.where(mask, (returns - mean) / std, 0.0)


GROUP_ESTIMATORS = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}


# === 5. PPO losses (004 §4.1(5)-(6) `actor_loss_fn`, §4.2 `critic_loss_fn`).

def aggregate_loss(loss, action_mask, loss_agg_mode="token-mean", loss_scale_factor=None):
    """A per-token loss l [B, T] to a scalar over the real tokens (verl's `loss_agg_mode`):

        token-mean               sum_{i,t} l_it / sum_i |o_i|    each token counts once (004)
        seq-mean-token-mean      mean_i (sum_t l_it / |o_i|)     each answer once (GRPO)
        seq-mean-token-sum       mean_i sum_t l_it
        seq-mean-token-sum-norm  mean_i sum_t l_it / L           L = loss_scale_factor, constant
                                 (Dr. GRPO: the length limit); default T
    |o_i| = answer i's real tokens. `ppo_update` weighs micro-batches by the denominator."""
    mask = action_mask.bool()
    per_token = torch.where(mask, loss, 0.0)
    if loss_agg_mode == "token-mean":
        return per_token.sum() / mask.sum().clamp(min=1)
    length = {"seq-mean-token-mean": mask.sum(-1).clamp(min=1), "seq-mean-token-sum": 1.0,
              "seq-mean-token-sum-norm": loss_scale_factor or mask.shape[-1]}[loss_agg_mode]
    return (per_token.sum(-1) / length).mean()


def actor_loss_fn(log_probs, old_log_probs, advantages, action_mask, cliprange=0.2,
                  dual_clip=None, cliprange_high=None, loss_agg_mode="token-mean",
                  loss_scale_factor=None):
    """PPO-clip surrogate, averaged over the batch's real tokens (004 §4.1(6)):

        rho_t = pi(a_t|s_t) / pi_old(a_t|s_t) = exp(log_probs - old_log_probs)
        loss  = -mean_t min(A_t * rho_t, A_t * clip(rho_t, 1 - eps, 1 + eps))

    Where clipping binds (A > 0 and rho > 1+eps, or A < 0 and rho < 1-eps: figure 10's two
    clipped cases) the min picks a constant and that token's gradient is exactly 0. dual_clip =
    c > 1 (dual-clip PPO, Ye et al. 2020): for A < 0 the loss, unbounded in rho, is capped at
    -c * A_t (no gradient where rho > c); None: 004's PPO-clip exactly. cliprange_high (DAPO's
    clip-higher, Yu et al. 2025): the upper bound 1 + eps_high apart, so unlikely tokens with
    A > 0 can grow more. The mean is loss_agg_mode's (`aggregate_loss`, copied: the function
    pastes alone; default 004's token mean). Shapes [B, T], action_mask 1 on real tokens."""
    mask = action_mask.bool()
    # select before exp: padding may hold -inf log-probs, and exp(inf) * 0 would be NaN
    log_ratio = torch.where(mask, log_probs - old_log_probs, 0.0)
    ratio = torch.exp(log_ratio)
    advantages = torch.where(mask, advantages, 0.0)
    pg_loss1 = -advantages * ratio
    high = cliprange if cliprange_high is None else cliprange_high
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high)
    pg_loss = torch.max(pg_loss1, pg_loss2)  # -min(...) of the formula
    if dual_clip is not None:
        pg_loss = torch.where(advantages < 0, torch.min(pg_loss, -dual_clip * advantages), pg_loss)
    per_token = torch.where(mask, pg_loss, 0.0)
    if loss_agg_mode == "token-mean":
        return per_token.sum() / mask.sum().clamp(min=1)
    length = {"seq-mean-token-mean": mask.sum(-1).clamp(min=1), "seq-mean-token-sum": 1.0,
              "seq-mean-token-sum-norm": loss_scale_factor or mask.shape[-1]}[loss_agg_mode]
    return (per_token.sum(-1) / length).mean()


def critic_loss_fn(values, old_values, returns, action_mask, cliprange_value=0.2,
                   loss_agg_mode="token-mean", loss_scale_factor=None):
    """Clipped value loss, averaged over real tokens (004 §4.2):

        V_clip = clip(V, V_old - eps, V_old + eps)
        loss   = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)

    V_old and R (= A + V_old) come from the rollout; V is the critic's current estimate. The
    mean is loss_agg_mode's, as in `actor_loss_fn`. Shapes [B, T], action_mask 1 on real tokens."""
    mask = action_mask.bool()
    values = torch.where(mask, values, 0.0)
    old_values = torch.where(mask, old_values, 0.0)
    returns = torch.where(mask, returns, 0.0)
    values_clipped = torch.clamp(values, old_values - cliprange_value,
                                 old_values + cliprange_value)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (values_clipped - returns) ** 2
    per_token = torch.where(mask, torch.max(vf_loss1, vf_loss2), 0.0)
    if loss_agg_mode == "token-mean":
        return 0.5 * per_token.sum() / mask.sum().clamp(min=1)
    length = {"seq-mean-token-mean": mask.sum(-1).clamp(min=1), "seq-mean-token-sum": 1.0,
              "seq-mean-token-sum-norm": loss_scale_factor or mask.shape[-1]}[loss_agg_mode]
    return 0.5 * (per_token.sum(-1) / length).mean()


def kl_loss_fn(log_probs, ref_log_probs, action_mask, kl_estimator="k3",
               loss_agg_mode="token-mean", loss_scale_factor=None):
    """The KL as a loss term (GRPO's; `kl_loss_coef`), k per token aggregated as the other
    losses. Its tokens a ~ pi (the rollout's), so a step follows E_pi[grad k(a)], via log pi:

        k1 = log pi - log pi_ref       E_pi[grad log pi] = 0: it penalizes nothing
        k2 = k1^2 / 2                  E_pi[k1 grad log pi] = grad KL(pi || pi_ref)
        k3 = (r - 1) - log r,          E_pi[(1 - r) grad log pi] = -sum_a pi_ref grad log pi
             r = pi_ref / pi                                     = grad KL(pi_ref || pi)
    k3 is clamped to <= 10, as verl does: one token with pi << pi_ref would outweigh a batch.
    (In the reward only the value counts: k1 and k3 are unbiased for KL(pi || pi_ref).)"""
    mask = action_mask.bool()
    log_ratio = torch.where(mask, log_probs - ref_log_probs, 0.0)  # padding may hold inf
    kl = {"k1": log_ratio, "k2": 0.5 * log_ratio ** 2,
          "k3": (torch.expm1(-log_ratio) + log_ratio).clamp(max=10.0)}[kl_estimator]
    return aggregate_loss(kl, mask, loss_agg_mode, loss_scale_factor)


# === 6. KL coefficient controllers (004 §4.2 PPO-Penalty; Ziegler et al. 2019).

def adaptive_kl_coef(kl_coef: float, kl: float, target: float) -> float:
    """004's PPO-Penalty rule: beta doubles when the measured KL exceeds 1.5 x target, halves
    when it is below target / 1.5, and stays otherwise."""
    if kl > 1.5 * target:
        return kl_coef * 2.0
    if kl < target / 1.5:
        return kl_coef / 2.0
    return kl_coef


def proportional_kl_coef(kl_coef: float, kl: float, target: float, n_steps: int,
                         horizon: int = 10000, max_error: float = 0.2) -> float:
    """Ziegler et al.'s proportional controller (lm-human-preferences `AdaptiveKLController`):

        e = clip(kl / target - 1, -max_error, max_error);  beta <- beta * (1 + e * n / horizon)
    with n the number of sequences in this batch."""
    error = min(max(kl / target - 1.0, -max_error), max_error)
    return kl_coef * (1.0 + error * n_steps / horizon)


# === 7. Experience (004 §4.1(5), steps 1-3): sample, then score with all four models.

def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only. Prompts are left-padded, and models with
    absolute positions (GPT-2) would otherwise score a different policy than the one that
    sampled: `generate` counts positions this way, so every forward must too."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def response_mask(responses: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """action_mask [B, T]: 1 up to and including each row's first EOS, 0 after it. Correct when
    pad == eos: `generate` pads after an EOS with EOS, and only the first is a real action."""
    is_eos = torch.isin(responses, torch.tensor(eos_token_ids, device=responses.device))
    eos_before = is_eos.long().cumsum(1) - is_eos.long()  # EOS strictly before position t
    return eos_before == 0


def policy_log_probs(model, input_ids, attention_mask, response_length: int,
                     temperature: float, with_entropy: bool = False):
    """log pi(a_t|s_t) [B, T] for the last T = response_length tokens, from logits/temperature:
    logits at position P-1+t predict response token t, so the last T+1 positions are kept and
    the very last dropped. Returns (log_probs, entropy or None)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from(attention_mask),
                logits_to_keep=response_length + 1, use_cache=False)
    logits = out.logits[:, :-1].float()  # [B, T, V]
    if temperature != 1.0:  # skipped at 1: a [B, T, V] copy, and another in backward
        logits = logits / temperature
    log_probs = logprobs_from_logits(logits, input_ids[:, -response_length:])
    return log_probs, (entropy_from_logits(logits) if with_entropy else None)


def critic_values(critic, input_ids, attention_mask, response_length: int) -> torch.Tensor:
    """V(s_t) [B, T]: the value at the position that predicts response token t."""
    values = critic(input_ids, attention_mask, position_ids_from(attention_mask))
    return values[:, -response_length - 1:-1]


class ValueModel(nn.Module):
    """The critic: a transformer backbone and a linear value head, V(s) at every position.
    The head starts at V = 0 (the first advantages are the rewards themselves, not noise), or
    from `head`, a 1-label reward model's score head (DeepSpeed-Chat's critic, 004 §3.3): V at
    the token the reward model scores is then its score. fp32 from fp32 weights, also under bf16
    autocast: values are regression targets, and bf16 keeps only 8 bits of them. `context` is
    entered around each backbone forward (Part II: the critic's adapter on the actor's base)."""

    def __init__(self, backbone: nn.Module, hidden_size: int, head: nn.Linear | None = None,
                 context: Callable | None = None):
        super().__init__()
        self.backbone, self.context = backbone, context
        self.v_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)
        if head is not None:
            self.v_head.weight.data.copy_(head.weight.data)
            if head.bias is not None:
                self.v_head.bias.data.copy_(head.bias.data)

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        with self.context() if self.context else nullcontext():
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=False).last_hidden_state
        # h . w + b: a fresh [B, L] tensor, not a view of [B, L, 1] (a sharded module's view
        # could lose its backward hook); .float() of the weights undoes bf16 mixed precision
        with torch.autocast(hidden.device.type, enabled=False):
            return hidden.float() @ self.v_head.weight[0].float() + self.v_head.bias.float()


@dataclass
class Experience:
    """One rollout. Sequences are prompt (left-padded, P) + response (right-padded, T)."""
    input_ids: torch.Tensor  # [B, P+T]
    attention_mask: torch.Tensor  # [B, P+T] prompt padding 0, response = action_mask
    action_mask: torch.Tensor  # [B, T] bool
    log_probs: torch.Tensor  # [B, T] actor at rollout time: the "old" policy of PPO
    ref_log_probs: torch.Tensor  # [B, T]
    values: torch.Tensor  # [B, T] critic at rollout time
    rewards: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B, T]
    returns: torch.Tensor  # [B, T]
    scores: torch.Tensor  # [B] raw scores of the reward model (or function), as it gave them
    reward_score: torch.Tensor  # [B] the score PPO sees: normalized, EOS-penalized, clipped
    ended: torch.Tensor  # [B] bool: the response emitted an EOS (else it was cut at the limit)
    entropy: torch.Tensor  # [B, T] entropy of the rollout policy at each step
    prompts: list  # strings, or message lists for conversations
    responses: list[str]  # decoded through the first EOS, special tokens dropped

    @property
    def response_length(self) -> int:
        return self.action_mask.shape[1]

    def select(self, index: torch.Tensor) -> "Experience":
        """The rows in `index`, a CPU tensor (so picking the text rows costs no device sync)."""
        rows = index.tolist()
        device_index = index.to(self.action_mask.device, non_blocking=True)
        picked = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            is_tensor = isinstance(value, torch.Tensor)
            picked[f.name] = value[device_index] if is_tensor else [value[i] for i in rows]
        return Experience(**picked)


class SampledLogProbs:
    """A `generate` logits processor recording log pi(a_t|s_t) and H(pi(.|s_t)) of
    softmax(logits / temperature) for each sampled token: the rollout needs no actor forward.
    Each step gets the raw logits [B, V] (before generate's temperature/top-k/top-p, which never
    reach the log-probs); the sampled token is the last of `input_ids` at the next call (the
    last step's comes with `result`). Versus the update's full forward: < 1e-5 in float32, ~1e-2
    nats in bf16 (KV-cached and full attention round differently: `recompute_log_probs`)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.log_probs, self.entropy = [], []  # one [B] tensor per generated token
        self.pending = None  # [B, V] scaled logits of the step whose token is not known yet

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self.log_probs.append(logprobs_from_logits(self.pending, input_ids[:, -1]))
        self.pending = scores / self.temperature  # a copy: generate's warpers cannot alter it
        self.entropy.append(entropy_from_logits(self.pending))
        return scores

    def result(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_probs, entropy), each [B, T], given the tokens sampled at the last step [B]."""
        log_probs = self.log_probs + [logprobs_from_logits(self.pending, last_tokens)]
        return torch.stack(log_probs, dim=1), torch.stack(self.entropy, dim=1)


def sample_responses(actor, prompt_ids, prompt_mask, *, eos_token_ids, pad_token_id,
                     max_new_tokens, temperature, top_k=0, top_p=1.0,
                     logits_processor=()) -> torch.Tensor:
    """prompt + sampled response [B, P+T] with HF `generate` (KV cache; T <= max_new_tokens),
    exactly from softmax(logits / temperature), PPO's policy: a neutral generation_config stands
    in for the model's own, which would fill unset options (a hub model's top_k=20, penalties)."""
    from transformers import GenerationConfig
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                              max_new_tokens=max_new_tokens, eos_token_id=eos_token_ids,
                              pad_token_id=pad_token_id)
    saved, actor.generation_config = actor.generation_config, GenerationConfig()
    was_training = actor.training
    actor.eval()  # HF turns the KV cache off in training mode when gradient checkpointing is on
    try:
        return actor.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                              generation_config=config, logits_processor=list(logits_processor))
    finally:
        actor.generation_config = saved
        actor.train(was_training)


def generate_experience(actor, critic, ref_model, score_fn, tokenizer, prompt_ids, prompt_mask,
                        hp: PPOConfig, *, eos_token_ids, kl_ctl=None, score_norm=(0.0, 1.0),
                        autocast=nullcontext, mean_fn=masked_mean, prompts=None) -> Experience:
    """004 §4.1(5) steps 1-3: the actor answers, the four models score the answers.

    Args:
        actor, critic, ref_model: the trained policy, the `ValueModel` (None: no critic, V = 0),
            the frozen copy. score_fn: (prompts, responses as text) -> [B] scores (a tensor or
            floats). prompt_ids, prompt_mask: [B, P] left-padded prompts.
        hp: sampling (max_new_tokens, temperature, top_k, top_p, recompute_log_probs), scoring
            (rollout_micro_batch_size rows per forward), `compute_rewards`', advantage_estimator:
            `get_advantages_and_returns` (gae), `reinforce_pp_advantages`, or a group's
            (`GROUP_ESTIMATORS` on the score, then clipped; samples_per_prompt rows a group).
        eos_token_ids: the tokens that end a response. kl_ctl: this rollout's beta. mean_fn:
            whitening's masked mean (over all processes when several share it).
        score_norm: (mu0, sigma0): PPO sees each score as (s - mu0) / sigma0 (Part II measures
            them on the initial policy's answers); the Experience's `scores` stay raw.
        prompts: as given (strings, or message lists), for score_fn; default: decoded.
    Returns an `Experience` with per-token tensors [B, T], T the batch's longest response."""
    kl_ctl = hp.kl_ctl if kl_ctl is None else kl_ctl
    temperature, micro_batch_size = hp.temperature, hp.rollout_micro_batch_size
    # no_grad, not inference_mode: a sharded policy's all-gather buffers made here are reused
    # by the update, and an inference tensor cannot be written outside inference mode
    with torch.no_grad(), autocast():
        recorder = None if hp.recompute_log_probs else SampledLogProbs(temperature)
        sequences = sample_responses(actor, prompt_ids, prompt_mask, eos_token_ids=eos_token_ids,
                                     pad_token_id=tokenizer.pad_token_id,
                                     max_new_tokens=hp.max_new_tokens, temperature=temperature,
                                     top_k=hp.top_k, top_p=hp.top_p,
                                     logits_processor=[recorder] if recorder else [])
        responses = sequences[:, prompt_ids.shape[1]:]  # [B, T]
        length = responses.shape[1]
        action_mask = response_mask(responses, eos_token_ids)
        attention_mask = torch.cat([prompt_mask.bool(), action_mask], dim=1).long()
        step = micro_batch_size or len(sequences)
        rows = [slice(i, i + step) for i in range(0, len(sequences), step)]  # micro-batches
        if recorder is None:
            parts = [policy_log_probs(actor, sequences[r], attention_mask[r], length,
                                      temperature, with_entropy=True) for r in rows]
            log_probs, entropy = (torch.cat(part) for part in zip(*parts))
        else:
            log_probs, entropy = recorder.result(responses[:, -1])
        ref_log_probs = torch.cat([policy_log_probs(ref_model, sequences[r], attention_mask[r],
                                                    length, temperature)[0] for r in rows])
        values = (torch.cat([critic_values(critic, sequences[r], attention_mask[r], length)
                             for r in rows]) if critic is not None else torch.zeros_like(log_probs))
    if prompts is None:
        prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
    texts = tokenizer.batch_decode(responses.masked_fill(~action_mask, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    scores = torch.cat([torch.as_tensor(score_fn(prompts[r], texts[r]), dtype=torch.float32)
                        for r in rows]).to(log_probs.device)
    ended = torch.isin(responses, torch.tensor(eos_token_ids, device=responses.device)).any(1)
    reward_score = (scores - score_norm[0]) / score_norm[1]
    if hp.missing_eos_penalty is not None:  # a response cut at the limit is scored lower
        reward_score = torch.where(ended, reward_score, reward_score - hp.missing_eos_penalty)
    rewards = compute_rewards(log_probs, ref_log_probs, reward_score, action_mask, kl_ctl=kl_ctl,
                              clip_reward_value=hp.clip_reward_value, kl_estimator=hp.kl_estimator)
    if hp.advantage_estimator == "gae":
        if hp.whiten_rewards:
            rewards = masked_whiten(rewards, action_mask, shift_mean=False, mean_fn=mean_fn)
        advantages, returns = get_advantages_and_returns(values, rewards, action_mask,
                                                         gamma=hp.gamma, lam=hp.lam)
        if hp.whiten_advantages:
            advantages = masked_whiten(advantages, action_mask, mean_fn=mean_fn)
    elif hp.advantage_estimator == "reinforce_pp":  # (no critic: returns are not targets)
        advantages = returns = reinforce_pp_advantages(rewards, action_mask, hp.gamma, mean_fn)
    else:  # the score's advantage in its group (then clipped), plus the KL-to-go: GAE with
        # V = 0, lam = 1 and gamma = 1 (one advantage for every token of an answer)
        group_advantages = GROUP_ESTIMATORS[hp.advantage_estimator](reward_score,
                                                                    hp.samples_per_prompt)
        shaped = compute_rewards(log_probs, ref_log_probs, group_advantages, action_mask,
                                 kl_ctl=kl_ctl, clip_reward_value=hp.clip_reward_value,
                                 kl_estimator=hp.kl_estimator)
        advantages, returns = get_advantages_and_returns(torch.zeros_like(values), shaped,
                                                         action_mask, gamma=1.0, lam=1.0)
    return Experience(input_ids=sequences, attention_mask=attention_mask, action_mask=action_mask,
                      log_probs=log_probs, ref_log_probs=ref_log_probs, values=values,
                      rewards=rewards, advantages=advantages, returns=returns, scores=scores,
                      reward_score=reward_score.clamp(-hp.clip_reward_value, hp.clip_reward_value),
                      ended=ended, entropy=entropy, prompts=prompts, responses=texts)


# === 8. The PPO update (004 §4.1(5) step 4): ppo_epochs passes of minibatch steps.

def trained_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters an optimizer updates (Part II: with adapters, those, not the base)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def gradient_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The L2 norm of the gradients of the optimizer's parameters; inf/NaN if any is."""
    return nn.utils.get_total_norm([p.grad for p in trained_parameters(optimizer)
                                    if p.grad is not None])


class SingleProcess:
    """How the update and the loop reach their batch: here one process holds all of it. Each
    method is the one-process case of Part II's `DataParallel`, which makes N processes compute
    what one would on the union of their batches."""

    size = 1  # processes that share one batch

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def mean(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(values, mask)

    def share(self, indices: list[int]) -> list[int]:
        return indices

    def no_sync(self, actor, critic, last: bool):
        return nullcontext()

    def gathered(self, actor):
        return nullcontext()

    def trained(self, model: nn.Module) -> nn.Module:
        return model  # as the update runs it (data-parallel: wrapped to reduce its gradients)

    def step(self, optimizers, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip each optimizer's gradients to `max_grad_norm` and step, unless a gradient is not
        finite: then no model steps (the critic skips a batch whose actor loss failed, and the
        reverse). Returns (norms before clipping, one per optimizer; skipped: 0-d bool). Syncs."""
        norms = torch.stack([gradient_norm(optimizer) for optimizer in optimizers])
        skipped = ~torch.isfinite(norms).all()
        if not skipped:
            for optimizer, norm in zip(optimizers, norms):
                nn.utils.clip_grads_with_norm_(trained_parameters(optimizer), max_grad_norm, norm)
                optimizer.step()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        return norms, skipped


def ppo_update(actor, critic, actor_optimizer, critic_optimizer, exp: Experience,
               hp: PPOConfig, *, autocast=nullcontext, parallel=SingleProcess(), train_actor=True):
    """Updates actor and critic on one batch of experience; returns (stats, skipped).

    hp: ppo_epochs, mini_batch_size (of all processes together) and micro_batch_size,
    cliprange(_high), dual_clip, cliprange_value, ent_coef, kl_loss_coef with kl_estimator,
    loss_agg_mode, max_grad_norm, temperature. critic None: the actor alone. train_actor=False
    (critic warm-up): only the critic trains, the actor untouched (its losses still measured).
    stats: {name: 0-d tensor}, means over the update (loss/* as the losses aggregate, the rest
    over tokens), each model's gradient norm before clipping (mean over the steps taken), the
    first minibatch's largest |ratio - 1| (0 in exact arithmetic: nothing was updated yet).
    skipped: bool tensor, per optimizer step, True where a loss or gradient was not finite and
    both models skipped the step (`parallel.step`). Micro-batches accumulate gradients, each loss
    weighted by its share of the minibatch's real tokens (answers if seq-mean) over all processes
    (`parallel.sum`), so the gradient is the whole minibatch's; times the process count, as
    data-parallel wrappers average the gradients."""
    device = exp.action_mask.device
    mini_batch_size = hp.mini_batch_size // parallel.size
    micro_batch_size = hp.micro_batch_size or mini_batch_size
    length = exp.response_length
    optimizers = (actor_optimizer,) * train_actor + (critic_optimizer,) * (critic is not None)
    # the losses' mean (Dr. GRPO's constant L: the length limit), and micro-batches' weights
    agg = {"loss_agg_mode": hp.loss_agg_mode, "loss_scale_factor": hp.max_new_tokens}
    per_answer = hp.loss_agg_mode != "token-mean"
    totals: dict[str, torch.Tensor] = {}
    skipped, grad_norms = [], []
    first_ratio_error = torch.zeros((), device=device)  # max |rho - 1| before any step
    for _ in range(hp.ppo_epochs):
        # indices on the CPU (picking text rows never waits), pinned on CUDA (async copies)
        order = torch.randperm(exp.action_mask.shape[0])
        order = order.pin_memory() if device.type == "cuda" else order
        for mini in order.split(mini_batch_size):
            # real tokens, and answers (column 0 is real in every row), of all processes
            mask = exp.action_mask[mini.to(device, non_blocking=True)]
            mini_tokens, mini_answers = parallel.sum(torch.stack([mask.sum(), mask[:, 0].sum()]))
            micros = mini.split(micro_batch_size)
            for i, micro in enumerate(micros):
                mb = exp.select(micro)
                token_weight = mb.action_mask.sum() / mini_tokens  # the token means' weight
                weight = len(micro) / mini_answers if per_answer else token_weight
                # forward and backward inside: a wrapper's forward decides if backward reduces
                with parallel.no_sync(actor, critic, last=i == len(micros) - 1):
                    with autocast():
                        with nullcontext() if train_actor else torch.no_grad():
                            log_probs, entropy = policy_log_probs(
                                actor, mb.input_ids, mb.attention_mask, length, hp.temperature,
                                with_entropy=hp.ent_coef > 0)
                        values = None if critic is None else critic_values(
                            critic, mb.input_ids, mb.attention_mask, length)
                    losses = {"loss/policy": actor_loss_fn(
                        log_probs, mb.log_probs, mb.advantages, mb.action_mask,
                        cliprange=hp.cliprange, dual_clip=hp.dual_clip,
                        cliprange_high=hp.cliprange_high, **agg)}
                    actor_loss = losses["loss/policy"]
                    if entropy is not None:
                        actor_loss = actor_loss - hp.ent_coef * aggregate_loss(
                            entropy, mb.action_mask, **agg)
                    if hp.kl_loss_coef:
                        losses["loss/kl"] = kl_loss_fn(log_probs, mb.ref_log_probs,
                                                       mb.action_mask, hp.kl_estimator, **agg)
                        actor_loss = actor_loss + hp.kl_loss_coef * losses["loss/kl"]
                    loss = actor_loss if train_actor else 0.0
                    if critic is not None:  # disjoint graphs: one backward call serves both
                        losses["loss/value"] = critic_loss_fn(
                            values, mb.values, mb.returns, mb.action_mask,
                            cliprange_value=hp.cliprange_value, **agg)
                        loss = loss + losses["loss/value"]
                    (loss * weight * parallel.size).backward()
                with torch.no_grad():
                    stats = update_stats(log_probs, values, mb, hp)
                    for name, value in stats.items():
                        totals[name] = totals.get(name, 0.0) + value * token_weight
                    for name, value in losses.items():
                        totals[name] = totals.get(name, 0.0) + value * weight
                    if not skipped:  # the first minibatch: pi is still pi_old
                        error = torch.where(mb.action_mask, log_probs - mb.log_probs, 0.0)
                        first_ratio_error = torch.maximum(first_ratio_error,
                                                          error.exp().sub(1).abs().max())
            norms, was_skipped = parallel.step(optimizers, hp.max_grad_norm)
            skipped.append(was_skipped)
            zero = norms.new_zeros(())  # [actor, critic]: 0 for a model not stepped
            grad_norms.append(torch.stack([norms[0] if train_actor else zero,
                                           zero if critic is None else norms[-1]]))
    skipped = torch.stack(skipped)
    stats = {name: parallel.sum(total) / len(skipped) for name, total in totals.items()}
    norms = torch.where(skipped[:, None], 0.0, torch.stack(grad_norms)).sum(0)  # [2]
    norms = norms / (~skipped).sum().clamp(min=1)  # mean over the steps taken
    stats.update({"policy/grad_norm": norms[0], "val/grad_norm": norms[1],
                  "policy/first_ratio_error": parallel.max(first_ratio_error),
                  "updates/actor_frozen": torch.tensor(float(not train_actor), device=device)})
    if critic is None:
        del stats["val/grad_norm"]
    return stats, skipped


def update_stats(log_probs, values, mb: Experience, hp: PPOConfig) -> dict:
    """Diagnostics of one micro-batch, token means (OpenAI-style names); val/* with a critic.
    The loss functions' terms are recomputed here (no gradient): they return only their scalar,
    so that each stands alone as 004 writes it."""
    mask, eps_value = mb.action_mask, hp.cliprange_value
    high = hp.cliprange if hp.cliprange_high is None else hp.cliprange_high
    log_ratio = torch.where(mask, log_probs - mb.log_probs, 0.0)
    ratio = torch.exp(log_ratio)
    pg_loss1 = -mb.advantages * ratio
    pg_loss2 = -mb.advantages * torch.clamp(ratio, 1.0 - hp.cliprange, 1.0 + high)
    capped = (mb.advantages < 0) & (-(hp.dual_clip or math.inf) * mb.advantages
                                    < torch.max(pg_loss1, pg_loss2))
    stats = {"policy/clipfrac": masked_mean((pg_loss2 > pg_loss1).float(), mask),
             "policy/dualclipfrac": masked_mean(capped.float(), mask),
             "policy/approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
             "policy/ratio": masked_mean(ratio, mask)}
    if values is not None:
        clipped = torch.clamp(values, mb.values - eps_value, mb.values + eps_value)
        stats["val/clipfrac"] = masked_mean(((clipped - mb.returns) ** 2 >
                                             (values - mb.returns) ** 2).float(), mask)
        stats["val/mean"] = masked_mean(values, mask)
    return stats


# === 9. The training loop (004 §4.1(5)'s pseudo-code): rollout, update, metrics, next beta.

@dataclass
class Models:
    """The four models of 004 §3, and what turns their tokens into text."""
    actor: nn.Module  # the trained policy
    critic: nn.Module | None  # the trained `ValueModel` (None: an estimator without one)
    ref_model: nn.Module  # the frozen initial policy
    score_fn: Callable  # the frozen reward: (prompts, responses: list[str]) -> [B] scores
    tokenizer: object  # the policy's; pads on the left
    eos_token_ids: list[int]  # every token that ends a response


@dataclass
class LoopState:
    """How far the loop is: iterations done, beta for the next rollout, the scores' scale."""
    step: int = 0
    kl_coef: float = 0.1
    reward_norm: tuple[float, float] = (0.0, 1.0)  # `generate_experience`'s score_norm


def seed_of(*keys) -> int:
    """The seed of the random stream named by `keys`, e.g. (seed, "order", epoch): a hash, so
    distinct keys name unrelated streams (with seed + epoch, seed 1's first epoch is 0's 2nd)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any torch.Generator takes it


def prompt_indices(step: int, batch_size: int, n_prompts: int, seed: int) -> list[int]:
    """Prompts of iteration `step` (1-based): consecutive slices of a stream of per-epoch
    permutations of the prompt set, epoch e's seeded seed_of(seed, "order", e). A function of
    (step, seed): a resumed run draws the prompts the uninterrupted one would have, and
    processes split one global batch (no prompt twice within an epoch)."""
    start = (step - 1) * batch_size
    orders, indices = {}, []  # one permutation per epoch the batch reaches (one or two)
    for k in range(start, start + batch_size):
        epoch, position = divmod(k, n_prompts)
        if epoch not in orders:
            generator = torch.Generator().manual_seed(seed_of(seed, "order", epoch))
            orders[epoch] = torch.randperm(n_prompts, generator=generator)
        indices.append(int(orders[epoch][position]))
    return indices


def encode_prompts(tokenizer, prompt_ids: list[list[int]], device: torch.device):
    """Left-padded [B, P] input_ids and attention_mask from lists of token ids."""
    return tokenizer.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt").to(device)


def rollout(models: Models, prompts: list, prompt_ids: list[list[int]], hp: PPOConfig,
            kl_coef: float, *, score_norm=(0.0, 1.0), autocast=nullcontext,
            parallel=SingleProcess(), mean_fn=None) -> Experience:
    """`generate_experience` on `prompts` and their token ids (left-padded here), the policy
    whole while it samples; whitening over every process's rollout unless `mean_fn` says."""
    actor = models.actor
    batch = encode_prompts(models.tokenizer, prompt_ids, next(actor.parameters()).device)
    with parallel.gathered(actor):
        return generate_experience(
            actor, models.critic, models.ref_model, models.score_fn, models.tokenizer,
            batch.input_ids, batch.attention_mask, hp, eos_token_ids=models.eos_token_ids,
            kl_ctl=kl_coef, score_norm=score_norm, autocast=autocast,
            mean_fn=mean_fn or parallel.mean, prompts=prompts)


def sequence_stats(exp: Experience, kl_coef: float, kl_estimator: str = "k1") -> dict:
    """Per-sequence quantities [B] behind the rollout and evaluation metrics:

        kl           sum_t kl_t over real tokens, kl_t the rewards' estimator (k1, k2 or k3)
        rlhf_reward  reward_score - kl_coef * kl = sum_t r_t before any whitening: the return
                     PPO maximizes (the score clipped and EOS-penalized, as PPO sees it)
        scores       the raw score; length: real tokens; no_eos: 1 if cut without an EOS"""
    per_token = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}[kl_estimator]
    kl = torch.where(exp.action_mask, per_token(exp.log_probs, exp.ref_log_probs), 0.0).sum(1)
    return {"scores": exp.scores, "kl": kl, "non_score_reward": -kl_coef * kl,
            "rlhf_reward": exp.reward_score - kl_coef * kl,
            "length": exp.action_mask.sum(1).float(), "no_eos": (~exp.ended).float()}


def rollout_stats(exp: Experience, kl_coef: float, kl_estimator: str = "k1",
                  parallel=SingleProcess(), critic: bool = True, n: int = 1) -> dict:
    """Per-rollout metrics, 0-d tensors (the caller syncs them at once), over every process's
    rollout (`parallel`): `sequence_stats`' means over sequences (objective/*, response/length,
    response/no_eos), and over real tokens

        policy/entropy          mean entropy of the rollout policy per token
        val/explained_variance  1 - Var[returns - values] / Var[returns]  (with a `critic`)
    and with groups of n > 1 answers, objective/flat_groups: the share of groups whose clipped
    scores are all alike (no signal for a group baseline, unless the clip hid one)."""
    mask, mean = exp.action_mask, parallel.mean
    rows = torch.ones_like(exp.scores, dtype=torch.bool)
    per_sequence = sequence_stats(exp, kl_coef, kl_estimator)
    stats = {f"{'response' if name in ('length', 'no_eos') else 'objective'}/{name}":
             mean(value, rows) for name, value in per_sequence.items()}
    stats.update({"policy/entropy": mean(exp.entropy, mask),
                  "response/tokens": parallel.sum(mask.sum().float())})
    if n > 1:
        flat = (exp.reward_score.view(-1, n).std(1) == 0).float()
        stats["objective/flat_groups"] = mean(flat, torch.ones_like(flat, dtype=torch.bool))
    if critic:
        residual_var = masked_var(exp.returns - exp.values, mask, mean)
        stats["val/explained_variance"] = 1 - residual_var / masked_var(exp.returns, mask,
                                                                         mean).clamp(min=1e-8)
    return stats


def next_kl_coef(hp: PPOConfig, kl_coef: float, kl: float) -> float:
    """beta for the next rollout from this rollout's KL: fixed, 004's adaptive, or Ziegler's."""
    if hp.kl_controller == "adaptive":
        return adaptive_kl_coef(kl_coef, kl, hp.kl_target)
    if hp.kl_controller == "proportional":
        return proportional_kl_coef(kl_coef, kl, hp.kl_target, n_steps=hp.batch_size,
                                    horizon=hp.kl_horizon)
    return kl_coef


def ppo_iterations(models: Models, actor_optimizer, critic_optimizer, prompts: list,
                   prompt_ids: list[list[int]], hp: PPOConfig, state: LoopState | None = None,
                   *, schedulers=(), autocast=nullcontext, parallel=SingleProcess()):
    """Trains for iterations state.step + 1 ... hp.steps; after each yields (row, exp, skipped):
    its metrics (floats: one host sync per iteration), its experience and which optimizer
    steps were skipped, `state` already advanced (resuming from it continues exactly).

        for step in 1..steps:
            prompts <- the step's batch, each samples_per_prompt times (`prompt_indices`)
            steps 1-3: actor answers; actor, reference, critic and reward model score it;
                       KL-shaped rewards, advantages (GAE) (`rollout`, `generate_experience`)
            step 4:    ppo_epochs passes of clipped minibatch updates      (`ppo_update`)
            beta <- the KL controller's rule                (`next_kl_coef`)

    In the first hp.critic_warmup_steps iterations the critic trains alone, and beta (a frozen
    actor's KL of 0 would halve an adaptive one) and `actor_optimizer`'s schedulers wait. With
    hp.kl_loss_coef the KL is in the actor's loss and the rewards' beta is 0. One process, as
    `test_part_one_runs_alone` does it:
        critic = ValueModel(copy.deepcopy(actor.transformer), hidden_size)
        models = Models(actor, critic, ref_model, reward, tokenizer, [tokenizer.eos_token_id])
        for row, exp, skipped in ppo_iterations(models, opt_a, opt_c, prompts, ids, hp): ..."""
    state = state or LoopState(kl_coef=hp.kl_ctl)
    critic, n = models.critic, hp.samples_per_prompt
    if hp.batch_size % n:
        raise ValueError(f"batch_size {hp.batch_size} must be a multiple of samples_per_prompt {n}")
    update_actor = parallel.trained(models.actor)
    update_critic = None if critic is None else parallel.trained(critic)
    for step in range(state.step + 1, hp.steps + 1):
        t0 = time.perf_counter()
        indices = prompt_indices(step, hp.batch_size // n, len(prompts), hp.seed)
        indices = parallel.share([i for i in indices for _ in range(n)])  # groups: consecutive
        beta = 0.0 if hp.kl_loss_coef else state.kl_coef  # a KL in the loss leaves the reward
        exp = rollout(models, [prompts[i] for i in indices], [prompt_ids[i] for i in indices],
                      hp, beta, score_norm=state.reward_norm, autocast=autocast, parallel=parallel)
        t1 = time.perf_counter()
        train_actor = step > hp.critic_warmup_steps
        stats, skipped = ppo_update(update_actor, update_critic, actor_optimizer,
                                    critic_optimizer, exp, hp, autocast=autocast,
                                    parallel=parallel, train_actor=train_actor)
        rates = {"lr/actor": actor_optimizer.param_groups[0]["lr"]}
        if critic is not None:
            rates["lr/critic"] = critic_optimizer.param_groups[0]["lr"]
        for scheduler in schedulers:  # the learning rates of the next iteration
            if train_actor or scheduler.optimizer is not actor_optimizer:
                scheduler.step()
        row = {**rollout_stats(exp, beta, hp.kl_estimator, parallel, critic is not None, n),
               **stats, "updates/skipped": skipped.sum().float()}
        row = dict(zip(row, torch.stack(list(row.values())).tolist()))  # the one host sync
        t2 = time.perf_counter()
        row.update({"step": step, "objective/kl_coef": beta, **rates,
                    "time/rollout_s": t1 - t0, "time/update_s": t2 - t1,
                    "throughput/tokens_per_s": row["response/tokens"] / (t2 - t0)})
        # the controller sees this rollout's KL and sets beta for the next one
        if train_actor:
            state.kl_coef = next_kl_coef(hp, state.kl_coef, row["objective/kl"])
        state.step = step
        yield row, exp, skipped


# ==============================================================================================
# Part II: the trainer. Everything above is the method; what follows loads, scales, saves and
# watches it, and runs Part I's loop from the command line.
# ==============================================================================================

import argparse
import copy
import ctypes
import functools
import importlib.util
import itertools
import json
import os
import pickle
import random
import shutil
import signal
import sys
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import get_args, get_origin

try:
    import fcntl  # the output directory's lock; not on Windows
except ImportError:
    fcntl = None

# === 10. The run: its options, and the command-line trainer around Part I's loop.

BUILTIN_MODEL = "builtin:tiny-gpt2"
BUILTIN_ACTOR_LR = 1e-3  # a randomly initialized tiny model learns fast and needs a large step
PRETRAINED_ACTOR_LR = 1e-5  # a common choice for fine-tuning a pretrained LM with PPO
CRITIC_LR_FACTOR = 5.0  # the critic learns a fresh head: a larger step than the actor's
# LoRA trains a low-rank update from zero: it needs about 10x full fine-tuning's step, in
# supervised and RL fine-tuning alike (Schulman et al., "LoRA Without Regret", 2025)
LORA_LR_FACTOR = 10.0
DATA, OPTIMIZE, RUNTIME = "models and data", "optimization", "runtime"
GROUPS = (DATA, "schedule", "generation", OPTIMIZE, "LoRA", "the math", RUNTIME)  # --help's order


@dataclass
class Config(PPOConfig):
    model: str = option(BUILTIN_MODEL, DATA, "policy: a causal-LM hub name or directory, or "
                        "builtin:tiny-gpt2 (in memory, no download)")
    critic_model: str | None = option(None, DATA, "gae's critic initialization (hub name or "
                                      "directory, the policy's vocabulary); default: the reward "
                                      "model if a 1-label classifier of the policy's vocabulary "
                                      "(004 §3.3; not with --lora-r), else the policy")
    reward_model: str | None = option(None, DATA, "frozen reward model: an "
                                      "AutoModelForSequenceClassification name or directory")
    reward_label: str | None = option(None, DATA, "for a multi-class reward model, the label "
                                      "(name or index) scored")
    reward_fn: str | None = option(None, DATA, "rule-based reward 'module:function' or "
                                   "'file.py:function', f(prompts, responses) -> floats")
    prompts: str | None = option(None, DATA, "prompts: .txt (one per line), .jsonl, "
                                 ".parquet/.csv/.json, a dataset directory or Hub id; default: "
                                 "a built-in set")
    prompts_config: str | None = option(None, DATA, "the configuration of a --prompts dataset "
                                        "that has several (e.g. main for openai/gsm8k)")
    prompts_split: str = option("train", DATA, "the split of a --prompts dataset")
    prompts_column: str | None = option(None, DATA, "its column of prompts or conversations; "
                                        "default: 'prompt', else 'messages'")
    eval_prompts: str | None = option(None, DATA, "held-out prompts (same formats), answered "
                                      "every --eval-every iterations")
    eval_prompts_config: str | None = option(None, DATA, "its configuration, as "
                                             "--prompts-config")
    eval_prompts_split: str = option("train", DATA, "the split of an --eval-prompts dataset "
                                     "(e.g. test)")
    eval_prompts_column: str | None = option(None, DATA, "its column, as --prompts-column")
    eval_fraction: float = option(0.0, DATA, "hold out this fraction of --prompts (seeded) for "
                                  "evaluation")
    eval_every: int = option(10, DATA, "evaluate every N iterations, before the first and after "
                             "the last")
    output_dir: str | None = option(None, DATA, "where outputs go; default: a new "
                                    "runs/<model>__<seed>__<date-time>")
    max_prompt_length: int = option(64, "generation", "prompts longer than this (policy "
                                    "tokens) are left out, with a warning, never cut")
    actor_lr: float | None = option(None, OPTIMIZE, f"actor AdamW learning rate; default "
                                    f"{BUILTIN_ACTOR_LR} built-in, {PRETRAINED_ACTOR_LR} "
                                    f"pretrained, x{LORA_LR_FACTOR:g} with LoRA")
    critic_lr: float | None = option(None, OPTIMIZE, "critic AdamW learning rate; default "
                                     f"{CRITIC_LR_FACTOR:g} x actor_lr")
    lr_schedule: Literal["constant", "linear", "cosine"] = option(
        "constant", OPTIMIZE, "learning rates over --steps after the warm-up")
    warmup_steps: int = option(0, OPTIMIZE, "iterations of linear learning-rate warm-up")
    weight_decay: float = option(0.0, OPTIMIZE, "AdamW weight decay")
    gradient_checkpointing: bool = option(False, OPTIMIZE, "recompute activations in backward "
                                          "(actor and critic): less memory")
    frozen_bf16: bool | None = option(None, OPTIMIZE, "store the frozen models in bf16; "
                                      "default: when bf16 compute is on")
    normalize_reward: bool = option(False, "the math", "PPO sees scores as (s - mu0) / sigma0, "
                                    "measured on the initial policy's answers")
    normalize_reward_samples: int = option(256, "the math", "answers that measure mu0, sigma0 "
                                           "(in whole batches)")
    lora_r: int = option(0, "LoRA", "LoRA rank; > 0: actor and critic adapters on one frozen "
                         "base, which is the reference; 0: full fine-tuning")
    lora_alpha: float | None = option(None, "LoRA", "updates scaled by alpha / r; default 2 x "
                                      "--lora-r")
    lora_dropout: float = option(0.0, "LoRA", "dropout on the LoRA path; keep 0 (pi/pi_old "
                                 "must be 1 before an update)")
    lora_target_modules: str = option("all-linear", "LoRA", "modules with adapters: "
                                      "comma-separated names, or all-linear")
    device: str = option("auto", RUNTIME, "auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    data_parallel: Literal["ddp", "fsdp"] = option(
        "ddp", RUNTIME, "under torchrun: ddp, a full copy per rank; fsdp, sharded (FSDP2)")
    bf16: bool | None = option(None, RUNTIME, "bf16 autocast, fp32 master weights; default: on "
                               "on a CUDA GPU with bf16")
    save_every: int = option(0, RUNTIME, "checkpoint every N iterations (0: at the end)")
    resume: bool = option(False, RUNTIME, "continue the run in --output-dir from its checkpoint")
    overwrite: bool = option(False, RUNTIME, "delete an earlier run's outputs in --output-dir "
                             "and start afresh")
    max_skipped_updates: int = option(5, RUNTIME, "stop after this many consecutive non-finite "
                                      "updates")
    samples: int = option(3, RUNTIME, "sample responses printed before and after training")
    tensorboard: bool = option(True, RUNTIME, "TensorBoard event files in --output-dir")
    wandb: bool = option(False, RUNTIME, "also log to Weights & Biases (pip install wandb)")
    wandb_project: str = option("ppo_rlhf", RUNTIME, "the W&B project")


@dataclass
class Run:
    """What the trainer works with, built by `setup_run`."""
    cfg: Config
    device: torch.device
    parallel: "DataParallel"  # rank, world size, and the models the update runs (DDP)
    models: Models
    actor_optimizer: torch.optim.Optimizer
    critic_optimizer: torch.optim.Optimizer | None  # None: no critic
    schedulers: list  # the learning-rate schedule of each optimizer, stepped once an iteration
    prompts: list  # training prompts as the prompts file holds them: strings or message lists
    prompt_ids: list[list[int]]  # each prompt's tokens (chat template applied)
    eval_prompts: list  # held-out prompts (empty: no evaluation), and their tokens
    eval_prompt_ids: list[list[int]]
    autocast: Callable  # () -> context manager: bf16 autocast, or nothing
    log: Callable  # print on rank 0, silent elsewhere
    state: LoopState  # the step done and beta; a resumed run's from its checkpoint
    checks: "InvariantChecks"
    lock: "OutputLock"  # the output directory, and rank 0's lock on it until the run ends
    metrics: "MetricsWriter"  # metrics.jsonl, samples.jsonl, TensorBoard, W&B (rank 0 writes)
    saved_step: int = -1  # the step of the checkpoint on disk (-1: none yet)

    @property
    def out(self) -> Path:
        return self.lock.out

    @property
    def rank(self) -> int:
        return self.parallel.rank


def train(cfg: Config) -> int:
    """Runs RLHF-PPO as configured (Part I's loop, with outputs, evaluation, checks, signals);
    returns 0, 1 after too many skipped updates, 128 + signal when stopped by SIGINT/SIGTERM."""
    # silenced: a skipped step still steps its schedule; torch.distributed.checkpoint alone
    warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before")
    warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
    run = setup_run(cfg)
    log, parallel = run.log, run.parallel
    checkpoint = run.out / (SHARDED_CHECKPOINT if cfg.data_parallel == "fsdp" else CHECKPOINT)
    consecutive_skips = 0
    log(f"training {cfg.model} on {run.device} x{parallel.size} for {cfg.steps} iterations "
        f"({len(run.prompts)} prompts, batch {cfg.batch_size}, {cfg.ppo_epochs} PPO epochs)")
    with run.lock, run.metrics, StopRequest() as stop:
        start = {}  # before training: the scores' scale, the held-out reward
        if cfg.normalize_reward and run.state.step == 0:
            start.update(measure_reward_norm(run))
        if run.eval_prompts and run.state.step == 0:
            start.update(evaluate(run, 0))
        if start:
            run.metrics.write({"step": 0, **start})
        for row, exp, skipped in ppo_iterations(
                run.models, run.actor_optimizer, run.critic_optimizer, run.prompts,
                run.prompt_ids, cfg, run.state, schedulers=run.schedulers,
                autocast=run.autocast, parallel=parallel):
            step = row["step"]
            if step == 1:
                print_samples("samples before training:", exp, cfg.samples, log)
                warn_if_critic_off_scale(run, exp)
            stopping = parallel.sum(torch.tensor(float(stop.signum is not None),
                                                 device=run.device)).item() > 0
            row.update(run.checks(row, first=step == 1))
            if run.eval_prompts and (step % cfg.eval_every == 0 or step == cfg.steps):
                row.update(evaluate(run, step, row["objective/kl_coef"]))
            run.metrics.write(row)
            log(f"step {step:4d}/{cfg.steps} | score {row['objective/scores']:7.3f} | "
                f"kl {row['objective/kl']:7.3f} | beta {row['objective/kl_coef']:.3f} | "
                f"pg {row['loss/policy']:7.4f} | "
                + (f"vf {row['loss/value']:7.4f} | " if "loss/value" in row else "") +
                f"clip {row['policy/clipfrac']:.3f} | len {row['response/length']:5.1f} | "
                f"{row['time/rollout_s'] + row['time/update_s']:5.2f}s"
                + (f" | eval {row['eval/scores']:7.3f}" if "eval/scores" in row else "")
                + (" | critic warm-up" if row["updates/actor_frozen"] else ""), flush=True)
            for was_skipped in skipped.tolist():
                consecutive_skips = consecutive_skips + 1 if was_skipped else 0
            if consecutive_skips >= cfg.max_skipped_updates:
                save_checkpoint(run, step)  # skipped steps left weights and optimizers intact
                log(f"stopping: {consecutive_skips} consecutive updates had a non-finite loss "
                    f"or gradient; the last good state is in {checkpoint}. Lower the "
                    "learning rates or check the reward scale.", file=sys.stderr)
                return 1
            if stopping or (cfg.save_every and step % cfg.save_every == 0):
                save_checkpoint(run, step)
            if stopping:
                signum = stop.signum or signal.SIGTERM  # a rank that got none follows the others
                log(f"{signal.Signals(signum).name}: stopped after step {step}; checkpoint "
                    f"saved in {checkpoint}. Resume with the same options plus --resume "
                    f"--output-dir {run.out}", file=sys.stderr)
                return 128 + signum
        finish_run(run)
    return 0


CLIPPED_SCORES_LIMIT = 0.1  # a larger share of clipped first scores: warn (critic off scale)


def warn_if_critic_off_scale(run: Run, exp: Experience) -> None:
    """A critic from the reward model predicts its score s, while PPO's return is clip(s): say
    so once when many first raw scores lie beyond +-clip_reward_value without normalization."""
    cfg = run.cfg
    critic = run.models.critic
    if critic is not None and critic.head_is_reward_models and not cfg.normalize_reward:
        clipped = (exp.scores.abs() > cfg.clip_reward_value).float().mean().item()
        if clipped > CLIPPED_SCORES_LIMIT:
            run.log(f"warning: {clipped:.0%} of the first scores lie beyond --clip-reward-value "
                    f"{cfg.clip_reward_value:g}: the critic, which starts from the reward model, "
                    "predicts them unclipped, off the returns' scale; --normalize-reward puts "
                    "both on one scale", file=sys.stderr)


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of iteration `step` (1-based) as a fraction of the configured one:
    step / W during a warm-up of W iterations, then with p = (step - W - 1) / (steps - W)
    constant 1, linear 1 - p, or cosine (1 + cos(pi p)) / 2 (0 one iteration after the last)."""
    if step <= warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps - 1) / max(total_steps - warmup_steps, 1)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


EVAL_STREAM = "eval"  # evaluation samples from its own stream: seed_of(seed, this, rank)
NORM_STREAM = "normalize"  # and so does the measuring of --normalize-reward (its prompts too)


@contextmanager
def own_random_stream(run: Run, stream: str):
    """Sampling from the stream seed_of(seed, stream, rank); then the training stream resumes."""
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        torch.manual_seed(seed_of(run.cfg.seed, stream, run.rank))
        yield


def measure_reward_norm(run: Run) -> dict:
    """--normalize-reward ("The N Implementation Details of RLHF with PPO"): the initial policy
    answers --normalize-reward-samples training prompts (prompt stream seed_of(seed,
    NORM_STREAM), each rank its share, own random stream); their raw scores' mu0, sigma0
    (population) become `state.reward_norm` (checkpointed): PPO sees (s - mu0) / sigma0 before
    the clip and KL shaping; a critic with the reward model's head too. Returns reward/mean, std."""
    cfg = run.cfg
    sums = torch.zeros(3, dtype=torch.float64, device=run.device)  # count, sum s, sum s^2
    with own_random_stream(run, NORM_STREAM):
        for step in range(1, -(-cfg.normalize_reward_samples // cfg.batch_size) + 1):
            indices = run.parallel.share(prompt_indices(step, cfg.batch_size, len(run.prompts),
                                                        seed_of(cfg.seed, NORM_STREAM)))
            scores = rollout(run.models, [run.prompts[i] for i in indices],
                             [run.prompt_ids[i] for i in indices], cfg, run.state.kl_coef,
                             autocast=run.autocast, parallel=run.parallel).scores.double()
            sums += torch.stack([scores.new_tensor(len(scores)), scores.sum(),
                                 scores.square().sum()]).to(sums)
    count, total, squares = run.parallel.sum(sums).tolist()
    mean = total / count
    std = math.sqrt(max(squares / count - mean ** 2, 0.0))
    if not std > 1e-8:
        raise UsageError(f"--normalize-reward: every one of the {count:.0f} measured answers "
                         f"scored {mean:.6g}; a constant reward has no scale to normalize")
    run.state.reward_norm = (mean, std)
    run.log(f"reward normalization: mu0 {mean:.4f}, sigma0 {std:.4f} over {count:.0f} answers "
            "of the initial policy")
    critic = run.models.critic
    if critic is not None and critic.head_is_reward_models:
        value_head_to_reward_scale(critic, mean, std)
        run.log("critic: its head, the reward model's, maps to the same scale: "
                "V = (s - mu0) / sigma0 where the reward model scores s")
    return {"reward/mean": mean, "reward/std": std}


def value_head_to_reward_scale(critic: ValueModel, mu0: float, sigma0: float) -> None:
    """A critic whose head is the reward model's (V = h.w + b = s where it scores) moved to the
    scale of --normalize-reward: w / sigma0 and (b - mu0) / sigma0, so V = (s - mu0) / sigma0
    there. Once, at the start; a resumed run restores the head from its checkpoint."""
    if is_sharded(critic):  # a root unit stays gathered after a no-grad forward: its gathered
        critic.reshard()  # copy would be freed unchanged; the shards are what must change
    with torch.no_grad():
        critic.v_head.weight.div_(sigma0)
        critic.v_head.bias.sub_(mu0).div_(sigma0)


def evaluate(run: Run, step: int, kl_coef: float | None = None) -> dict:
    """eval/scores, eval/kl, eval/rlhf_reward, eval/length, eval/no_eos (`sequence_stats`,
    averaged) of the policy's answers to every held-out prompt, sampled as in training (the
    objective's policy), from its own random stream, the same every time (common random
    numbers: evaluations differ by the policy; training draws what it would without them). Rank
    0 appends the samples to samples.jsonl. Each rank answers its share of global batches, a
    short share padded with a prompt whose answer is dropped (same collective forwards)."""
    cfg, t0, size = run.cfg, time.perf_counter(), run.parallel.size
    kl_coef = run.state.kl_coef if kl_coef is None else kl_coef  # beta of the rollout's KL
    per_rank = cfg.batch_size // size
    names = ("scores", "kl", "rlhf_reward", "length", "no_eos")
    sums, mine = torch.zeros(len(names) + 1, device=run.device), []  # the last: a count
    with own_random_stream(run, EVAL_STREAM):
        for start in range(0, len(run.eval_prompts), cfg.batch_size):
            share = range(start + run.rank * per_rank,
                          min(start + (run.rank + 1) * per_rank, len(run.eval_prompts)))
            indices = list(share) + [0] * (per_rank - len(share))  # padded to the same size
            exp = rollout(run.models, [run.eval_prompts[i] for i in indices],
                          [run.eval_prompt_ids[i] for i in indices], cfg, kl_coef,
                          score_norm=run.state.reward_norm, autocast=run.autocast,
                          parallel=run.parallel, mean_fn=masked_mean)
            per_sequence = sequence_stats(exp, kl_coef, cfg.kl_estimator)
            real = torch.arange(per_rank, device=run.device) < len(share)  # [B] not padding
            for k, name in enumerate(names):
                sums[k] += torch.where(real, per_sequence[name], 0.0).sum()
            sums[-1] += real.sum()
            mine += [{"prompt": exp.prompts[b], "response": exp.responses[b],
                      "score": float(exp.scores[b]), "kl": float(per_sequence["kl"][b]),
                      "ended": bool(exp.ended[b]), "index": i} for b, i in enumerate(share)]
    totals = run.parallel.sum(sums).tolist()
    samples = sorted((s for rank in gather_objects(mine) for s in rank), key=lambda s: s["index"])
    run.metrics.write_samples(step, [{k: v for k, v in s.items() if k != "index"} for s in samples])
    row = {f"eval/{name}": total / totals[-1] for name, total in zip(names, totals)}
    return {**row, "time/eval_s": time.perf_counter() - t0}


# Tolerances of the live checks, measured (docs/watching.md, gpu-and-bf16.md): the first
# minibatch's max |ratio - 1| ~1e-6 in fp32, up to 1.4e-2 in bf16 (0.3+ with dropout or another
# temperature); the first |KL| per token ~1e-7 in fp32, up to 7e-4 in bf16; a backwards critic's
# explained variance stays 0 +- 1e-5; the demo's is 0 for 25-38 iterations, 0.35 (mean) by 50.
FIRST_RATIO_TOLERANCE = {"fp32": 1e-3, "bf16": 0.1}
START_KL_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}
NO_EOS_LIMIT = 0.5  # most responses cut at --max-new-tokens
CRITIC_WARMUP, CRITIC_WINDOW, EXPLAINED_VARIANCE_FLOOR = 50, 10, 0.05


class InvariantChecks:
    """PPO's invariants on each iteration's metrics row: the first minibatch's ratio is 1, the
    first rollout's KL is 0, most responses end with an EOS (with a reward model and no
    --missing-eos-penalty), after CRITIC_WARMUP iterations the critic explains the returns
    (docs/watching.md); entropy and clip fraction are task-dependent. A failure warns once with
    its likely causes; check/<name> counts them."""

    ADVICE = {
        "first_ratio": "pi/pi_old should be 1 before any update. Likely: dropout left on, "
                       "position ids that differ between sampling and the update, another "
                       "temperature or dtype in the update than in the rollout",
        "kl_at_start": "the KL to the reference should be 0 before the first update. Likely: a "
                       "reference that is not the initial policy, or another temperature",
        "no_eos": "most responses were cut at --max-new-tokens without an EOS: raise "
                  "--max-new-tokens, or penalize them with --missing-eos-penalty",
        "explained_variance": "the critic predicts the returns no better than their mean. "
                              "Likely: a critic learning rate too high or too low, a "
                              "--cliprange-value too tight for the rewards' scale, or a critic "
                              "loss with the wrong sign",
    }

    def __init__(self, precision: str, watch_eos: bool, log: Callable):
        self.precision, self.watch_eos, self.log = precision, watch_eos, log
        self.counts, self.explained_variance = dict.fromkeys(self.ADVICE, 0), []
        self.warned = set()  # warnings of this process: once each

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts), "explained_variance": list(self.explained_variance)}

    def load_state_dict(self, state: dict) -> None:
        self.counts.update(state["counts"])
        self.explained_variance = list(state["explained_variance"])

    def __call__(self, row: dict, first: bool) -> dict:
        watched = "val/explained_variance" in row  # (not without a critic)
        self.explained_variance = (self.explained_variance + [row["val/explained_variance"]]
                                   if watched else [math.nan])[-CRITIC_WINDOW:]
        per_token_kl = abs(row["objective/kl"]) / max(row["response/length"], 1.0)
        critic = sum(self.explained_variance) / len(self.explained_variance)
        ratio, no_eos = row["policy/first_ratio_error"], row["response/no_eos"]
        measured = {  # name: (value, failed)
            "first_ratio": (ratio, not ratio <= FIRST_RATIO_TOLERANCE[self.precision]),
            "kl_at_start": (per_token_kl,
                            first and not per_token_kl <= START_KL_TOLERANCE[self.precision]),
            "no_eos": (no_eos, self.watch_eos and no_eos > NO_EOS_LIMIT),
            "explained_variance": (critic, watched and row["step"] >= CRITIC_WARMUP
                                   and not critic >= EXPLAINED_VARIANCE_FLOOR),
        }
        for name, (value, failed) in measured.items():
            if failed and name not in self.warned:
                self.warned.add(name)
                self.log(f"warning: check {name} failed at step {row['step']} (measured "
                         f"{value:.4g}): {self.ADVICE[name]}", file=sys.stderr)
            self.counts[name] += failed
        return {f"check/{name}": float(count) for name, count in self.counts.items()}


def setup_run(cfg: Config) -> Run:
    """Device and process group, options checked, prompts and models loaded, optimizers
    made, a checkpoint restored with --resume: everything before the first iteration."""
    device = init_distributed(cfg.device)
    keep_freed_memory(device)
    rank, world_size = world()
    validate(cfg, world_size)
    log = print if rank == 0 else (lambda *args, **kwargs: None)  # one voice under torchrun
    if cfg.kl_loss_coef and cfg.kl_estimator == "k1":
        log("warning: --kl-loss-coef with --kl-estimator k1: its gradient is 0 in expectation, "
            "it penalizes nothing (k2: KL(pi||pi_ref), k3: KL(pi_ref||pi))", file=sys.stderr)
    ignored = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(PPOConfig)
               if f.name in ("lam", "cliprange_value", "whiten_advantages")
               and getattr(cfg, f.name) != f.default and cfg.advantage_estimator != "gae"]
    if ignored:
        log(f"warning: {', '.join(ignored)}: gae's, unused by --advantage-estimator "
            f"{cfg.advantage_estimator}", file=sys.stderr)
    if cfg.top_k or cfg.top_p < 1:
        log("warning: --top-k/--top-p sample from a truncated distribution, while PPO's "
            "log-probs are the full policy's: the ratio and the KL are off-policy estimates",
            file=sys.stderr)
    prompts, eval_prompts = load_prompt_sets(cfg)
    lock = claim_output_dir(cfg, rank)  # checked and locked before any model loads
    try:
        # with --resume its options are checked before the models load (memory-mapped)
        checkpoint = load_checkpoint(lock.out, cfg) if cfg.resume else None
        run = load_run(cfg, device, prompts, eval_prompts, lock, log, checkpoint)
    except BaseException:
        lock.release(remove_created=True)  # a failed start leaves no directory behind
        raise
    if cfg.overwrite:
        lock.discard_earlier_run()
    log("the models on this rank (weights, and the gradients and AdamW moments of what is "
        "trained, before activations):")
    for role, source, count, trained, weights, gradients, optimizer in model_table(run):
        log(f"  {role:<9} {source}" + ("" if count is None else ": no parameters" if not count
                                       else ": " + (
            f"{count:,} parameters" + (f", {trained:,} trained" if trained else "")
            + f"; weights {weights / 2**20:.1f} MiB" + (
                f", gradients {gradients / 2**20:.1f} MiB, AdamW {optimizer / 2**20:.1f} MiB"
                if trained else ""))))
    log(f"outputs go to {lock.out}" + (f"; curves: tensorboard --logdir {lock.out}"
                                       if cfg.tensorboard else ""))
    return run


def load_run(cfg: Config, device: torch.device, prompts: list, eval_prompts: list,
             lock: "OutputLock", log: Callable, checkpoint: dict | None = None) -> Run:
    """Models, optimizers and the `checkpoint`'s state (`load_checkpoint`), in a `Run`."""
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    bf16 = uses_bf16(cfg, device, log)
    actor, ref_model, critic, tokenizer, score_fn = load_models(cfg, device, bf16, log)
    prompts, prompt_ids = usable_prompts(prompts, tokenizer, score_fn, cfg, "--prompts", log)
    eval_prompts, eval_prompt_ids = usable_prompts(eval_prompts, tokenizer, score_fn, cfg,
                                                   "the held-out prompts", log)
    context, longest = context_length(actor.config), max(map(len, prompt_ids + eval_prompt_ids))
    if context is not None and longest + cfg.max_new_tokens > context:
        raise UsageError(f"prompts of up to {longest} tokens + --max-new-tokens "
                         f"{cfg.max_new_tokens} exceed the model's context of {context}; "
                         "lower --max-new-tokens or --max-prompt-length")
    # separate optimizers over what each model trains (with LoRA, its adapter only). Fused
    # AdamW lets GradScaler skip a non-finite step without waiting for the device.
    optimizers = [model and torch.optim.AdamW(trainable_parameters(model), lr=lr,
                                              weight_decay=cfg.weight_decay, fused=True)
                  for model, lr in zip((actor, critic), learning_rates(cfg))]
    # the actor's schedule spans the iterations it trains: those after --critic-warmup-steps
    schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done, total=total: (
        lr_factor(done + 1, schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps,
                  total_steps=total))) for optimizer, total in zip(
        optimizers, (cfg.steps - cfg.critic_warmup_steps, cfg.steps)) if optimizer]
    precision = "bf16" if bf16 or frozen_bf16(cfg, bf16) else "fp32"
    run = Run(cfg=cfg, device=device, parallel=DataParallel(device, actor, critic),
              models=Models(actor, critic, ref_model, score_fn, tokenizer,
                            end_of_response_ids(actor.generation_config, tokenizer)),
              actor_optimizer=optimizers[0], critic_optimizer=optimizers[1],
              schedulers=schedulers, prompts=prompts, prompt_ids=prompt_ids,
              eval_prompts=eval_prompts, eval_prompt_ids=eval_prompt_ids,
              autocast=((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16
                        else nullcontext), log=log, state=LoopState(kl_coef=cfg.kl_ctl),
              checks=InvariantChecks(precision, bool(cfg.reward_model)
                                     and cfg.missing_eos_penalty is None, log),
              lock=lock, metrics=MetricsWriter(cfg, lock.out, enabled=world()[0] == 0))
    torch.manual_seed(seed_of(cfg.seed, "sample", run.rank))  # each rank samples its own
    if checkpoint is not None:
        restore_checkpoint(run, checkpoint)
        run.metrics.start_step = run.state.step
        log(f"resumed from the checkpoint in {run.out} at step {run.state.step}")
    return run


def learning_rates(cfg: Config) -> tuple[float, float]:
    """(actor, critic) learning rates: as given, or the defaults for the model and method."""
    actor_lr = cfg.actor_lr or ((BUILTIN_ACTOR_LR if cfg.model == BUILTIN_MODEL
                                 else PRETRAINED_ACTOR_LR)
                                * (LORA_LR_FACTOR if cfg.lora_r else 1.0))
    return actor_lr, cfg.critic_lr or CRITIC_LR_FACTOR * actor_lr


def finish_run(run: Run) -> None:
    """The last checkpoint, a few samples, and the policy as a `from_pretrained` directory."""
    cfg = run.cfg
    if run.saved_step != cfg.steps:  # --save-every may have just written this very state
        save_checkpoint(run, cfg.steps)
    if cfg.samples > 0:  # the first iteration's prompts, answered by the trained policy
        first = prompt_indices(1, cfg.batch_size, len(run.prompts), cfg.seed)[:cfg.samples]
        # every rank (a sharded model's forward is collective), each with its own statistics
        alone = dataclasses.replace(cfg, advantage_estimator="gae")  # answers not in groups
        final = rollout(run.models, [run.prompts[i] for i in first],
                        [run.prompt_ids[i] for i in first], alone, run.state.kl_coef,
                        score_norm=run.state.reward_norm, autocast=run.autocast,
                        parallel=run.parallel, mean_fn=masked_mean)
        print_samples("samples after training:", final, cfg.samples, run.log)
    run.log("memory held for the models (this rank, before activations): " + ", ".join(
        f"{name} {size / 2**20:.1f} MiB" for name, size in memory_bytes(run).items()))
    where = save_final_policy(run)  # last: with LoRA, merging the adapter changes the base
    run.log(f"saved the policy to {where} (AutoModelForCausalLM.from_pretrained({str(where)!r}))")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP) tensor's own shard; any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def model_table(run: Run) -> list[tuple]:
    """(role, source, parameters, trained parameters, bytes of weights, of gradients, of AdamW
    state) of each of the four models on this rank, the last two foreseen (one gradient and two
    moments per trained parameter, in its dtype). Parameters: what the role computes with (with
    LoRA: the shared base and its own adapter); weights: each storage once, for its first role."""
    cfg, models, seen = run.cfg, run.models, set()
    lora = bool(getattr(models.actor, "lora_adapter", None))

    def row(role, source, module, optimizer=None):
        own = set(map(id, trainable_parameters(module))) if optimizer else set()
        used = [p for name, p in (module.named_parameters() if module is not None else ())
                if "lora_" not in name or id(p) in own]
        weights = 0
        for tensor in used:
            storage = local(tensor).untyped_storage()
            weights += storage.nbytes() if storage.data_ptr() not in seen else 0
            seen.add(storage.data_ptr())
        trained = trained_parameters(optimizer) if optimizer else []
        gradients = sum(local(p).numel() * p.element_size() for p in trained)  # this rank's
        return (role, source, sum(p.numel() for p in used), sum(p.numel() for p in trained),
                weights, gradients, 2 * gradients)
    critic, reference = models.critic, models.ref_model
    actor = row("actor", cfg.model, models.actor, run.actor_optimizer)
    if critic is None:  # what a critic the size of what the actor trains would hold
        critic = ("critic", f"none ({cfg.advantage_estimator} needs no value model): saves "
                  f"~{4 * actor[5] / 2**20:.1f} MiB of weights, gradients and AdamW state, and "
                  "the critic's activations", None, 0, 0, 0, 0)
    else:
        critic = row("critic", (critic.source or "the policy")
                     + (" + a LoRA adapter" if lora else "")
                     + (" (the reward model)" if same_model(critic.source, cfg.reward_model)
                        else ""), critic, run.critic_optimizer)
    return [actor, row("reference", "the actor's base, adapters off" if lora
                       else "a frozen copy of the policy",
                       reference.model if isinstance(reference, AdaptersOff) else reference),
            critic, row("reward", cfg.reward_model or cfg.reward_fn or "the built-in vowel reward",
                        models.score_fn.model)]


def memory_bytes(run: Run) -> dict[str, int]:
    """Bytes this rank holds for the four models and their training state, activations aside:
    parameters and gradients as `model_table` counts them, the optimizers' state as it is."""
    table = model_table(run)
    return {"parameters": sum(row[4] for row in table), "gradients": sum(row[5] for row in table),
            "optimizer": sum(local(t).numel() * local(t).element_size()
                             for optimizer in (run.actor_optimizer, run.critic_optimizer)
                             if optimizer for state in optimizer.state.values()
                             for t in state.values() if torch.is_tensor(t))}


def print_samples(title: str, exp: Experience, n: int, log) -> None:
    """The first n prompts (a conversation by its last message), responses and raw scores."""
    if n > 0:
        log(title)
        for prompt, response, score in list(zip(exp.prompts, exp.responses, exp.scores))[:n]:
            text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            log(f"  [{float(score):+.2f}] {text!r} -> {response!r}")


class MetricsWriter:
    """Each iteration's row to metrics.jsonl, TensorBoard and W&B (if enabled); each evaluation's
    samples to samples.jsonl (and TensorBoard text). Only rank 0's writer is `enabled`. Files
    open with the first row (a run failing before it writes nothing). After a resume, the first
    write drops the rows after `start_step` (TensorBoard purges them too)."""

    def __init__(self, cfg: Config, out: Path, enabled: bool, start_step: int = 0):
        self.cfg, self.out, self.enabled, self.start_step = cfg, out, enabled, start_step
        self.started, self.tensorboard, self.wandb_run = False, None, None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def write(self, row: dict) -> None:
        if self.enabled:
            self.append(METRICS, [row])
            scalars = {k: v for k, v in row.items() if k != "step"}
            if self.tensorboard is not None:
                for name, value in scalars.items():
                    self.tensorboard.add_scalar(name, value, row["step"])
                self.tensorboard.flush()  # curves follow the run, not its end
            if self.wandb_run is not None:
                self.wandb_run.log(scalars, step=row["step"])

    def write_samples(self, step: int, samples: list[dict]) -> None:
        """One evaluation's prompts, responses and scores: a JSON line each."""
        if self.enabled:
            self.append(SAMPLES, [{"step": step, **sample} for sample in samples])
            if self.tensorboard is not None:
                rows = "".join(f"| {s['score']:+.3f} | {json.dumps(s['prompt'])} | "
                               f"{json.dumps(s['response'])} |\n" for s in samples)
                self.tensorboard.add_text("eval/samples", "| score | prompt | response |\n"
                                          "|---|---|---|\n" + rows, step)

    def append(self, name: str, rows: list[dict]) -> None:
        if not self.started:
            self.start()
        with (self.out / name).open("a") as f:
            f.write("".join(json.dumps(dict(sorted(row.items()))) + "\n" for row in rows))

    def start(self) -> None:
        """Drop the rows after `start_step`; open TensorBoard's and W&B's (resumed) runs."""
        self.started = True
        for path in (self.out / METRICS, self.out / SAMPLES):
            if path.exists():
                kept = [r for r in path.read_text().splitlines()
                        if json.loads(r)["step"] <= self.start_step]
                path.write_text("".join(r + "\n" for r in kept))
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(
                log_dir=str(self.out), purge_step=self.start_step + 1 if self.start_step else None)
        if self.cfg.wandb:
            import wandb
            id_file = self.out / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
            id_file.write_text(run_id)
            self.wandb_run = wandb.init(project=self.cfg.wandb_project, name=self.out.name,
                                        id=run_id, resume="allow", dir=str(self.out),
                                        config=dataclasses.asdict(self.cfg))


# === 11. Models: the four of 004 §3. Errors a user can fix are `UsageError`s: one line, exit 2.

class UsageError(Exception):
    """A problem with the user's input (options, files, models): reported in one line."""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


TINY_ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?'"
TINY_GPT2 = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128)  # ~0.1M parameters
BUILTIN_PROMPTS = [
    "the weather today is", "my favourite food is", "once upon a time", "the best way to learn",
    "i think that", "in the morning i", "a good friend is", "the city at night",
    "she opened the door and", "the answer is", "we went to the sea", "music makes me",
    "the cat sat on", "tomorrow we will", "the old house", "what i like about you is",
    "he said hello and", "the garden in spring", "a long time ago", "my dream is to",
    "the train was late so", "books are", "the moon is", "after dinner we",
    "the little dog", "on a rainy day", "her song was", "the mountain road",
    "we laughed because", "the new teacher", "at the market", "the river runs",
]


def build_tiny_tokenizer(separate_pad: bool = False):
    """A character tokenizer (a-z, space, punctuation): what the policy learns reads letter by
    letter. pad == eos as for GPT-2, unless `separate_pad` (TRL's PPOTrainer needs them apart)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    eos, unk, pad = "<|endoftext|>", "<unk>", "<pad>"
    specials = [eos, unk] + ([pad] if separate_pad else [])
    backend = Tokenizer(models.WordLevel(
        {token: i for i, token in enumerate(specials + list(TINY_ALPHABET))}, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=eos,
                                   unk_token=unk, pad_token=pad if separate_pad else eos)


def build_tiny_model(seed: int):
    """A randomly initialized 2-layer GPT-2 and its character tokenizer, built in memory."""
    from transformers import GPT2Config, GPT2LMHeadModel
    tokenizer = build_tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                        **TINY_GPT2)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config), tokenizer


def uses_bf16(cfg: Config, device: torch.device, log: Callable = print) -> bool:
    """bf16 compute (autocast, FSDP's mixed precision): by default on a CUDA GPU that has it;
    --bf16 asks for it. Refused on a GPU without bf16; a warning on a CPU without bf16 units."""
    if cfg.bf16 is None:
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    if cfg.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--bf16: this GPU does not support bf16; run with --no-bf16")
    if cfg.bf16 and device.type == "cpu" and not cpu_has_bf16_units():
        log("warning: --bf16 on a CPU without bf16 units (AMX, AVX512-BF16, Arm BF16): "
            "PyTorch emulates bf16 there, usually slower than fp32", file=sys.stderr)
    return cfg.bf16


def cpu_has_bf16_units() -> bool:
    units = torch.cpu.get_capabilities()
    return any(units.get(unit) for unit in ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16"))


def frozen_bf16(cfg: Config, bf16: bool) -> bool:
    """Whether the frozen weights are stored in bf16: as asked, by default with bf16 compute
    (autocast runs their matmuls in bf16 anyway: fp32 storage would only cost memory)."""
    return bf16 if cfg.frozen_bf16 is None else cfg.frozen_bf16


def load_models(cfg: Config, device: torch.device, bf16: bool = False, log: Callable = print):
    """(actor, reference, critic, tokenizer, score_fn): the four models of 004 §3 and the
    policy's tokenizer, on `device`, dropout off. Trained weights are fp32 whatever the saved
    dtype (master weights: a 1e-5 AdamW step mostly rounds away in bf16); frozen ones bf16 with
    `frozen_bf16`, else fp32. With --lora-r one frozen base serves three roles (`add_lora`)."""
    frozen = torch.bfloat16 if frozen_bf16(cfg, bf16) else torch.float32
    scorer = (RewardModelScorer(cfg.reward_model, cfg.reward_label, device, frozen, log)
              if cfg.reward_model else None)
    if scorer:
        score_fn = checked_scores(scorer, f"--reward-model {cfg.reward_model}")
    elif cfg.reward_fn:
        score_fn = checked_scores(load_reward_fn(cfg.reward_fn), f"--reward-fn {cfg.reward_fn}")
    else:
        score_fn = checked_scores(vowel_reward, "the built-in vowel reward")
    base_dtype = frozen if cfg.lora_r else torch.float32  # with LoRA the bases are frozen
    actor, tokenizer = load_policy(cfg.model, cfg.seed, base_dtype)
    with_critic = cfg.advantage_estimator == "gae"
    critic_from = critic_source(cfg, tokenizer, scorer) if with_critic else None
    backbone, head = (load_critic_backbone(critic_from, tokenizer, base_dtype) if critic_from
                      else (None, None))
    if cfg.lora_r:
        actor, ref_model, critic = add_lora(actor, (backbone, head) if critic_from else None,
                                            lora_config(cfg), with_critic)
    else:
        ref_model = copy.deepcopy(actor).requires_grad_(False).eval().to(frozen).to(device)
        backbone = backbone or copy.deepcopy(actor.base_model) if with_critic else None
        critic = backbone and ValueModel(backbone, backbone.config.hidden_size, head)
    actor.to(device).train()  # train mode with dropout off: gradient checkpointing needs it
    if critic is None:
        log(f"critic: none (--advantage-estimator {cfg.advantage_estimator} needs no value "
            "model)")
    else:
        critic.source = critic_from  # None: the policy
        from_reward_model = same_model(critic_from, cfg.reward_model)
        # its head is the reward model's: V = s where the reward model scores (the scale of s)
        critic.head_is_reward_models = head is not None and from_reward_model
        log(f"critic: starts from {critic_from or 'the policy'}"
            + (" (the reward model, 004 §3.3; --critic-model picks another)"
               if from_reward_model else ""))
        critic.to(device).train()
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(actor, critic)
    if cfg.data_parallel == "fsdp" and world()[1] > 1:
        for model in (actor, critic, ref_model, scorer and scorer.model):
            if model is not None:
                shard_model(model, bf16)
    return actor, ref_model, critic, tokenizer, score_fn


def load_pretrained(loader, name: str, option: str, **kwargs):
    """`loader.from_pretrained(name)` for a hub name or a directory; failures become one line.
    Local files first (offline, the hub is retried for a minute); HF_HUB_OFFLINE=1 skips it."""
    try:
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        error = e
    if not Path(name).exists() and os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true"):
        try:
            return loader.from_pretrained(name, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            error = e
    raise UsageError(f"cannot load {option} {name!r} with {loader.__name__}: "
                     f"{first_line(error)}") from error


def load_tokenizer(name: str, option: str):
    """AutoTokenizer for `name`, refusing the empty one built for weights without tokenizer
    files. Without a pad token (GPT-2, SmolLM...) it pads with EOS (the masks tell them apart)."""
    from transformers import AutoTokenizer
    tokenizer = load_pretrained(AutoTokenizer, name, option)
    if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        raise UsageError(f"{option} {name!r} has no usable tokenizer (no tokenizer files?); "
                         "save one beside the weights with tokenizer.save_pretrained")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_sequence_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def load_policy(name: str, seed: int, dtype: torch.dtype = torch.float32):
    """(actor, tokenizer) from the built-in tiny model or a causal-LM hub name / directory,
    its weights in `dtype` whatever dtype they were saved in."""
    if name == BUILTIN_MODEL:
        model, tokenizer = build_tiny_model(seed)
        model.to(dtype)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM
        try:  # the config comes first: if it loads, the model's files are within reach
            config = load_pretrained(AutoConfig, name, "--model")
        except UsageError as e:
            raise UsageError(f"{e} (offline? pass a local directory, or run without --model "
                             "for the built-in demo)") from e
        if is_sequence_classifier(config):
            raise UsageError(f"--model {name!r} is a sequence classifier "
                             f"({config.architectures}), not a causal LM; pass it as "
                             "--reward-model or --critic-model")
        tokenizer = load_tokenizer(name, "--model")
        model = load_pretrained(AutoModelForCausalLM, name, "--model", dtype=dtype)
    tokenizer.padding_side = "left"  # prompts end where the response begins
    disable_dropout(model)
    fuse_gelu(model)
    return model, tokenizer


def load_critic_backbone(name: str, tokenizer, dtype: torch.dtype):
    """(backbone, head) for --critic-model, in `dtype`: a causal LM's backbone, or a 1-label
    reward model's and its score head (DeepSpeed-Chat's critic). It reads the policy's token
    ids: its vocabulary must be the policy's (its tokenizer's, or without one its embedding)."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
    config = load_pretrained(AutoConfig, name, "--critic-model")
    try:
        own = load_tokenizer(name, "--critic-model").get_vocab()
    except UsageError:  # no tokenizer beside the weights: the embedding must hold every id
        own = None
    if different := other_vocabulary(own, config.vocab_size, tokenizer):
        raise UsageError(f"--critic-model {name!r} {different}: the critic reads the policy's "
                         "token ids; take a critic of the policy's model family")
    head = None
    if is_sequence_classifier(config) and config.num_labels == 1:
        source = load_pretrained(AutoModelForSequenceClassification, name, "--critic-model",
                                 dtype=dtype)
        backbone, score = source.base_model, getattr(source, "score", None)
        if isinstance(score, nn.Linear) and score.weight.shape == (1, config.hidden_size):
            head = score.float()
    else:
        backbone = load_pretrained(AutoModel, name, "--critic-model", dtype=dtype)
    disable_dropout(backbone)
    fuse_gelu(backbone)
    return backbone, head


def other_vocabulary(own: dict | None, vocab_size: int, tokenizer) -> str | None:
    """How a model's token ids (its tokenizer's vocabulary `own`, or without one its embedding
    size) differ from the policy's, or None if they are the same."""
    policy = tokenizer.get_vocab()
    if own is None:
        return (f"embeds {vocab_size} token ids, the policy's tokenizer has "
                f"{len(policy)}") if vocab_size < len(policy) else None
    different = [token for token, i in policy.items() if own.get(token) != i]
    return (f"has another vocabulary than the policy ({len(different)} of the policy's "
            f"{len(policy)} tokens have another id there, e.g. {different[0]!r})"
            if different else None)


def same_model(a: str | None, b: str | None) -> bool:
    """Whether two --*-model options name the same model: one hub name, or one directory."""
    if a is None or b is None:
        return False
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() ==
                      Path(b).resolve())


def critic_source(cfg: Config, tokenizer, scorer) -> str | None:
    """What the critic starts from: --critic-model; else, as 004 §3.3 and DeepSpeed-Chat do, the
    reward model (`scorer`) if a 1-label classifier of the policy's token ids (not with LoRA:
    an adapter on the shared base needs no second base); else None (the policy)."""
    if cfg.critic_model or scorer is None or cfg.lora_r:
        return cfg.critic_model
    config = scorer.model.config
    same = other_vocabulary(scorer.tokenizer.get_vocab(), config.vocab_size, tokenizer) is None
    return cfg.reward_model if config.num_labels == 1 and same else None


def disable_dropout(model: nn.Module) -> None:
    """p = 0 in every dropout layer. PPO's ratio compares two evaluations of the same policy:
    with dropout on, pi/pi_old != 1 before any update and the clip fires on noise."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):  # attention modules that pass p to SDPA
            module.attention_dropout = 0.0


def fuse_gelu(model: nn.Module) -> None:
    """transformers' `NewGELUActivation` (GPT-2, GPT-J, Phi...) swapped for the fused
    `nn.GELU(approximate="tanh")`: the same to < 1e-6, in one kernel instead of seven passes."""
    from transformers.activations import NewGELUActivation
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, nn.GELU(approximate="tanh"))


LORA_ACTOR, LORA_CRITIC = "default", "critic"  # adapter names (PEFT's default for the actor)


def lora_config(cfg: Config):
    """PEFT's LoraConfig from the --lora-* options."""
    from peft import LoraConfig
    targets = cfg.lora_target_modules
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r,
                      lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=targets if targets == "all-linear"
                      else [t.strip() for t in targets.split(",") if t.strip()])


def add_lora(base: nn.Module, critic_base: tuple | None, config, with_critic: bool = True):
    """(actor, reference, critic) on one frozen base, with PEFT: the actor is `base` plus
    adapter LORA_ACTOR; the reference the same object with the adapters off (`AdaptersOff`: no
    copy, no memory); the critic the base's backbone plus adapter LORA_CRITIC and a value head,
    or `critic_base`'s (a --critic-model backbone and head) plus its own adapter; None without
    with_critic. Adapters are fp32 (PEFT's default); `trainable_parameters` gives each its own."""
    from peft import get_peft_model
    from transformers.pytorch_utils import Conv1D

    def fitted(model, task_type=None):  # a copy each: PEFT resolves "all-linear" in place
        fitted = copy.deepcopy(config)
        fitted.task_type = task_type  # and GPT-2's Conv1D stores its weight transposed:
        fitted.fan_in_fan_out = any(isinstance(m, Conv1D) for m in model.modules())
        return fitted
    targets = config.target_modules  # "all-linear", or the names (PEFT keeps them as a set)
    targets = targets if isinstance(targets, str) else ",".join(sorted(targets))
    with warnings.catch_warnings():  # PEFT calls a transformers property deprecated in v5
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        try:
            actor = get_peft_model(base, fitted(base, "CAUSAL_LM"), adapter_name=LORA_ACTOR)
        except ValueError as e:  # PEFT's NoMatchingPeftModuleError: no such module here
            raise UsageError(f"--lora-target-modules {targets}: {first_line(e)}") from e
        critic = None
        if critic_base is None and with_critic:
            actor.add_adapter(LORA_CRITIC, fitted(base, "CAUSAL_LM"))
            backbone = actor.get_base_model().base_model  # the transformer without its LM head
            critic = ValueModel(backbone, backbone.config.hidden_size,
                                context=functools.partial(use_adapter, actor, LORA_CRITIC))
        elif with_critic:
            backbone, head = critic_base
            critic = ValueModel(get_peft_model(backbone, fitted(backbone),
                                               adapter_name=LORA_CRITIC),
                                backbone.config.hidden_size, head)
    actor.lora_adapter = LORA_ACTOR
    if critic is not None:
        critic.lora_adapter = LORA_CRITIC
    for model in [m for m in (actor, critic) if m is not None]:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name or name.startswith("v_head."))
    return actor, AdaptersOff(actor), critic


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    """What an optimizer trains in `model`: all of it, or with LoRA its adapter (named by
    `model.lora_adapter`) and value head, not the base nor the other role's adapter."""
    adapter = getattr(model, "lora_adapter", None)
    return [p for name, p in model.named_parameters()
            if adapter is None or ("lora_" in name and f".{adapter}." in name)
            or name.startswith("v_head.")]


@contextmanager
def use_adapter(model: nn.Module, name: str | None):
    """`model` (a PeftModel) runs with LoRA adapter `name` active, or with none (None: the base
    alone, the reference policy); afterwards as before. PEFT's switches also set requires_grad
    (set_adapter(name) freezes every other adapter, disabling freezes them all), and autograd
    skips a leaf whose requires_grad is off when backward reaches it: after the critic's
    forward, the one backward of both losses would silently leave the actor's adapter
    untrained. So every trainable adapter weight is made trainable again, also on an exception
    (gradient checkpointing's recompute, run in here during backward, stops early by raising)."""
    trainable = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    previous = model.active_adapter
    try:
        with model.disable_adapter() if name is None else nullcontext():
            if name is not None:
                model.set_adapter(name)
            for parameter in trainable:
                parameter.requires_grad_(True)
            yield
    finally:
        if name is not None:
            model.set_adapter(previous)
        for parameter in trainable:
            parameter.requires_grad_(True)


class AdaptersOff:
    """The reference policy with LoRA: the actor's base with its adapters off. Not a copy (no
    memory), not an nn.Module (moving or freezing it must not touch the actor); called like it."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        with use_adapter(self.model, None):
            return self.model(*args, **kwargs)


def enable_gradient_checkpointing(actor, critic: ValueModel) -> None:
    """Recompute activations in backward in both trained models (non-reentrant: works with DDP
    and inputs without gradient). With LoRA on a shared base, each block is recomputed with the
    adapter of its forward (PyTorch's `context_fn`), not the one active in backward."""
    checkpointing = {"use_reentrant": False}
    if getattr(actor, "lora_adapter", None):
        checkpointing["context_fn"] = lambda: (nullcontext(),
                                               use_adapter(actor, actor.active_adapter))
    unwrap = lambda m: m.get_base_model() if hasattr(m, "get_base_model") else m  # noqa: E731
    unwrap(actor).activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    if critic is not None and critic.context is None:  # its own backbone (else the actor's)
        unwrap(critic.backbone).activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})


def save_final_policy(run) -> Path:
    """The trained policy as a `save_pretrained` directory, <out>/policy. With LoRA the actor's
    adapter alone goes to <out>/adapter first (for PeftModel.from_pretrained), then is merged
    into the base, in place: nothing runs after. The config names the model's own class (FSDP2
    subclasses it). Each directory is written under a temporary name, then renamed."""
    model = run.models.actor
    if getattr(model, "lora_adapter", None):
        if run.rank == 0:
            write_directory(run.out / ADAPTER, lambda tmp: model.save_pretrained(
                tmp, selected_adapters=[LORA_ACTOR]))
        model = model.merge_and_unload(adapter_names=[LORA_ACTOR])
    state = full_state_dict(model)  # sharded: gathered by all ranks to rank 0

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state)
        if is_sharded(model):
            model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
            model.config.save_pretrained(tmp)
        run.models.tokenizer.save_pretrained(tmp)
    if run.rank == 0:
        write_directory(run.out / POLICY, save)
    return run.out / POLICY


def end_of_response_ids(generation_config, tokenizer) -> list[int]:
    """Every token that ends a response: generation_config's `eos_token_id` (one or a list: Llama
    3 ends a turn with <|eot_id|>, the text with <|end_of_text|>), then the tokenizer's EOS."""
    ids = generation_config.eos_token_id
    ids = [] if ids is None else (list(ids) if isinstance(ids, (list, tuple)) else [ids])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


# === 12. Rewards and prompts. A reward: (prompts as the file holds them, strings or message
# lists; responses: list[str]) -> [B] CPU scores; a frozen classifier, a function or a rule.

def vowel_reward(prompts: list, responses: list[str]) -> list[float]:
    """The built-in task: +0.5 per vowel and -0.5 per consonant in the response. Readable at a
    glance ("strk" scores -2, "aia eo" +2.5), no download, any model's decoded text. Spaces and
    punctuation score 0; a longer vowel-rich answer beats a short one (stopping early does not
    win). 10 more vowels than consonants reach the default clip of 5."""
    scores = []
    for response in responses:
        letters = [c for c in response.lower() if "a" <= c <= "z"]
        vowels = sum(c in "aeiou" for c in letters)
        scores.append(0.5 * (vowels - (len(letters) - vowels)))
    return scores


class RewardModelScorer:
    """Scores prompt and response with a frozen `AutoModelForSequenceClassification`, through
    its own tokenizer (it need not share the policy's vocabulary). With a chat template it reads
    the conversation as trained: the prompt's messages (a plain prompt as one user message) plus
    {"role": "assistant", "content": response}, by its template (special tokens not added
    twice); a plain classifier, prompt + response as one string (a conversation's contents, one
    per line, first). Its `context` (its tokenizer's or model's limit) must hold both: prompts
    without room for --max-new-tokens are left out (`fits`); a text still longer is cut from the
    left, in the prompt, with one warning; a response it cannot read whole is an error."""

    def __init__(self, name: str, label: str | None, device: torch.device,
                 dtype: torch.dtype = torch.float32, log: Callable = print):
        from transformers import AutoConfig, AutoModelForSequenceClassification
        config = load_pretrained(AutoConfig, name, "--reward-model")
        if not is_sequence_classifier(config):
            raise UsageError(f"--reward-model {name!r} is not a sequence classifier (its "
                             f"architectures are {config.architectures}); it must load with "
                             "AutoModelForSequenceClassification")
        self.tokenizer = load_tokenizer(name, "--reward-model")
        self.tokenizer.truncation_side = "left"  # a cut, if ever, takes the prompt's start
        self.model = load_pretrained(AutoModelForSequenceClassification, name, "--reward-model",
                                     dtype=dtype)
        # the classifier finds each row's last real token through config.pad_token_id
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        fuse_gelu(self.model)
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.log, self.warned = device, log, False
        self.context = min(self.tokenizer.model_max_length, context_length(config) or 10 ** 9)
        labels, n = config.label2id, config.num_labels
        if label is None and n > 1:
            raise UsageError(f"the reward model has {n} labels {list(config.id2label.values())}"
                             "; pick one with --reward-label")
        self.label = (0 if label is None else int(label) if label.isdigit() and int(label) < n
                      else labels.get(label))
        if self.label is None:
            raise UsageError(f"--reward-label {label!r} is not one of {list(labels)} or an "
                             f"index below {n}")

    def texts(self, prompts: list, responses: list[str] | None = None) -> list[str]:
        """What the reward model reads: each prompt and response; without `responses`, the
        part before the response."""
        replies = [""] * len(prompts) if responses is None else responses
        if not self.tokenizer.chat_template:
            return [(p if isinstance(p, str) else "".join(m["content"] + "\n" for m in p)) + r
                    for p, r in zip(prompts, replies)]
        return [self.tokenizer.apply_chat_template(
            (p if isinstance(p, list) else [{"role": "user", "content": p}])
            + ([] if responses is None else [{"role": "assistant", "content": r}]),
            tokenize=False, add_generation_prompt=responses is None)
            for p, r in zip(prompts, replies)]

    def lengths(self, texts: list[str]) -> list[int]:
        ids = self.tokenizer(texts, add_special_tokens=not self.tokenizer.chat_template)
        return [len(row) for row in ids["input_ids"]]

    def fits(self, prompts: list, max_new_tokens: int) -> list[bool]:
        """Whether each prompt leaves room for a response of `max_new_tokens` tokens."""
        lengths = self.lengths(self.texts(prompts, [""] * len(prompts)))
        return [n + max_new_tokens <= self.context for n in lengths]

    @torch.no_grad()  # not inference_mode: a sharded (FSDP) model reuses its buffers
    def __call__(self, prompts: list, responses: list[str]) -> torch.Tensor:
        texts, special = self.texts(prompts, responses), not self.tokenizer.chat_template
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special)
        lengths = batch["attention_mask"].sum(1).tolist()
        over = [b for b, n in enumerate(lengths) if n > self.context]
        if over:  # the cut must stay inside what precedes the response
            room = self.lengths(self.texts([prompts[b] for b in over]))
            if any(lengths[b] - self.context > n for b, n in zip(over, room)):
                raise UsageError(f"the reward model cannot read a whole response: prompt + "
                                 f"response exceed its context of {self.context} tokens by more "
                                 "than the prompt; lower --max-new-tokens")
            if not self.warned:
                self.warned = True
                self.log(f"warning: the reward model's context of {self.context} tokens cannot "
                         "hold some prompt + response: their prompts are cut from the left "
                         "(the responses are read whole)", file=sys.stderr)
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                   max_length=self.context, add_special_tokens=special)
        return self.model(**batch.to(self.device)).logits[:, self.label].float().cpu()


def load_reward_fn(spec: str) -> Callable[[list, list[str]], list[float]]:
    """Import 'package.module:function' or 'path/to/file.py:function'."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise UsageError(f"--reward-fn {spec!r} must look like 'module:function' or "
                         "'file.py:function'")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                raise ImportError(f"no file {module_name}")
            module_spec = importlib.util.spec_from_file_location(Path(module_name).stem,
                                                                 module_name)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        fn = getattr(module, attr)
    except Exception as e:  # an import runs arbitrary user code: report any failure in one line
        raise UsageError(f"cannot import --reward-fn {spec!r}: {type(e).__name__}: "
                         f"{first_line(e)}") from e
    if not callable(fn):
        raise UsageError(f"--reward-fn {spec!r} is not callable")
    return fn


def checked_scores(fn: Callable, name: str) -> Callable[[list, list[str]], torch.Tensor]:
    """Wraps a scorer so a wrong count, a non-finite score or an exception is a UsageError."""
    def score(prompts: list, responses: list[str]) -> torch.Tensor:
        try:
            scores = torch.as_tensor(fn(prompts, responses), dtype=torch.float32).flatten().cpu()
        except Exception as e:  # user code: any failure is the user's to fix, in one line
            raise UsageError(f"{name} failed: {type(e).__name__}: {first_line(e)}") from e
        if scores.numel() != len(responses):
            raise UsageError(f"{name} returned {scores.numel()} scores for {len(responses)} "
                             "responses; it must return one float per response")
        if not torch.isfinite(scores).all():
            raise UsageError(f"{name} returned a non-finite score: {scores.tolist()}")
        return scores
    score.fits = getattr(fn, "fits", None)  # a reward model's context check, if it has one
    score.model = getattr(fn, "model", None)  # the reward model itself, if there is one
    return score


def load_prompt_sets(cfg: Config) -> tuple[list, list]:
    """(training prompts, held-out prompts): --prompts, less a seeded --eval-fraction of it,
    which joins --eval-prompts."""
    prompts = load_prompts(cfg.prompts, "--prompts", cfg.prompts_split, cfg.prompts_column,
                           cfg.prompts_config)
    held_out = (load_prompts(cfg.eval_prompts, "--eval-prompts", cfg.eval_prompts_split,
                             cfg.eval_prompts_column, cfg.eval_prompts_config)
                if cfg.eval_prompts else [])
    if cfg.eval_fraction > 0:
        n = max(1, round(cfg.eval_fraction * len(prompts)))
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed))
        chosen = set(order[:n].tolist())
        held_out += [p for i, p in enumerate(prompts) if i in chosen]
        prompts = [p for i, p in enumerate(prompts) if i not in chosen]
        if not prompts:
            raise UsageError(f"--eval-fraction {cfg.eval_fraction} leaves no prompt to train on")
    return prompts, held_out


DATASET_FILES = {".parquet": "parquet", ".csv": "csv", ".json": "json"}  # loaded by `datasets`


def load_prompts(path: str | None, option: str = "--prompts", split: str = "train",
                 column: str | None = None, config: str | None = None) -> list:
    """Prompts from a text file (one per line) or JSONL; from a dataset (a .parquet, .csv or
    .json file, a `save_to_disk` directory, another directory of data files, or a Hub dataset
    id, through `datasets`: its `config`, `split` and `column`); default: a built-in set.
    A JSONL line holds "prompt": a string, or a conversation in TRL's format, a list of
    {"role", "content"} messages; or "messages", such a list less a last assistant message (a
    reference answer); a dataset's column (default "prompt", else "messages") likewise."""
    if path is None:
        return list(BUILTIN_PROMPTS)
    file = Path(path)
    if not file.exists() and file.suffix in (".txt", ".jsonl", *DATASET_FILES):
        raise UsageError(f"{option} {path!r}: no such file")
    if file.suffix in DATASET_FILES or not file.is_file():
        return dataset_prompts(path, option, split, column, config)
    if config is not None:
        raise UsageError(f"{option}-config {config!r}: {path} is a file of prompts, which has "
                         "no configurations")
    prompts = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and file.suffix != ".jsonl":
            prompts.append(line)
        elif line.strip():
            where = f"{option} {path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: not JSON ({e.msg})") from e
            if not isinstance(record, dict) or not ({"prompt", "messages"} & set(record)):
                raise UsageError(f"{where}: each JSONL line needs a field 'prompt' (a string or "
                                 "a list of messages) or 'messages'")
            name = "prompt" if "prompt" in record else "messages"
            prompts.append(prompt_from(record[name], name, where))
    if not prompts:
        raise UsageError(f"{option} {path!r} holds no prompt")
    return prompts


def prompt_from(value, column: str, where: str):
    """One prompt: a string as it is, or a conversation, a non-empty list of {"role": str,
    "content": str} messages (from "messages": without a trailing assistant message)."""
    if isinstance(value, str):
        return value
    if not (isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in value)):
        raise UsageError(f"{where}: a conversation must be a non-empty list of "
                         '{"role": ..., "content": ...} messages with string values')
    messages = [{"role": m["role"], "content": m["content"]} for m in value]
    if column == "messages" and len(messages) > 1 and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return messages


def dataset_prompts(path: str, option: str, split: str, column: str | None,
                    config: str | None = None) -> list:
    """The prompts of a dataset's `split` and `column`, through `datasets` (see `load_prompts`);
    `config`: `load_dataset`'s name, for a Hub dataset or directory that has several. Only the
    column's values are kept, not the (memory-mapped) dataset."""
    import datasets
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    local, suffix = Path(path).exists(), Path(path).suffix
    saved = local and any((Path(path) / name).exists() for name in (
        "dataset_dict.json", "dataset_info.json", "state.json"))  # by save_to_disk
    if config is not None and (suffix in DATASET_FILES or saved):
        raise UsageError(f"{option}-config {config!r}: {path} is one dataset, without "
                         "configurations; it applies to a Hub id or a directory of data files "
                         "whose README lists configs")
    try:
        if suffix in DATASET_FILES:
            dataset = datasets.load_dataset(DATASET_FILES[suffix], data_files=path, split=split)
        elif saved:
            dataset = datasets.load_from_disk(path)
            splits = dataset if isinstance(dataset, datasets.DatasetDict) else {"train": dataset}
            if split not in splits:  # a dataset saved without splits counts as 'train'
                raise ValueError(f"Unknown split {split!r}. Should be one of {list(splits)}.")
            dataset = splits[split]
        else:  # a directory of data files, or a Hub id
            dataset = datasets.load_dataset(path, config, split=split)
    except (ValueError, KeyError) as e:
        if "corresponds to no data" in str(e):  # how `datasets` says a data file is empty
            raise UsageError(f"{option} {path!r} holds no prompt") from e
        hint = f" (pick one with {option}-config)" if "Config name is missing" in str(e) else ""
        raise UsageError(f"{option} {path!r}: {first_line(e)}{hint}") from e
    except (OSError, datasets.exceptions.DatasetNotFoundError) as e:
        where = "" if local else " (offline? pass a local file or directory)"
        raise UsageError(f"{option} {path!r}: cannot load it{where}: {first_line(e)}") from e
    names = dataset.column_names
    column = column or next((name for name in ("prompt", "messages") if name in names), None)
    if column not in names:
        wanted = repr(column) if column else "'prompt' or 'messages'"
        raise UsageError(f"{option} {path!r} (split {split!r}) has no column {wanted}; its "
                         f"columns: {', '.join(names)} (pick one with {option}-column)")
    if len(dataset) == 0:
        raise UsageError(f"{option} {path!r} (split {split!r}) holds no prompt")
    prompts = []
    for row, value in enumerate(dataset.select_columns([column]).to_dict()[column]):
        if column == "messages" and isinstance(value, str):  # a CSV cell, say: not a list
            raise UsageError(f"{option} {path!r} column 'messages' holds strings (row {row}); "
                             "a conversation is a list of messages: keep it in Parquet, JSON "
                             "or JSONL, or name the column of plain prompts 'prompt'")
        if not isinstance(value, (str, list)):
            raise UsageError(f"{option} {path!r} column {column!r} holds "
                             f"{type(value).__name__} values (row {row}), not strings or lists "
                             "of messages")
        prompts.append(prompt_from(value, column, f"{option} {path} row {row}"))
    return prompts


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """The policy's tokens for one prompt. A string is tokenized as is (with the tokenizer's
    special tokens). A conversation is rendered by the chat template with add_generation_prompt
    (ending where the reply begins), tokenized without adding special tokens (no second BOS)."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    if not tokenizer.chat_template:
        raise UsageError("--prompts holds conversations, but the policy's tokenizer has no chat "
                         "template; use plain-text prompts or a chat model")
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


PROMPT_CHUNK = 1024  # prompts per batched call (a tokenizer's output holds offsets and masks)


def usable_prompts(prompts: list, tokenizer, score_fn, cfg: Config, what: str,
                   log: Callable) -> tuple[list, list[list[int]]]:
    """The prompts both the policy and the reward can read whole, and their policy tokens.
    Left out, with one warning: prompts longer than --max-prompt-length policy tokens, or that
    leave a reward model no room for a response of --max-new-tokens. None is cut instead: a
    prompt cut from the left loses its chat header and BOS, and the reward model would score
    the answer to another prompt (or cut the response). Plain prompts are tokenized in chunks."""
    def chunked(fn, indices):  # fn(items) for PROMPT_CHUNK of `indices` at a time
        return [out for start in range(0, len(indices), PROMPT_CHUNK)
                for out in fn([prompts[i] for i in indices[start:start + PROMPT_CHUNK]])]
    plain = [i for i, prompt in enumerate(prompts) if isinstance(prompt, str)]
    ids = [None if isinstance(p, str) else prompt_token_ids(tokenizer, p) for p in prompts]
    for i, row in zip(plain, chunked(lambda chunk: tokenizer(chunk)["input_ids"], plain)):
        ids[i] = row
    if any(len(row) == 0 for row in ids):
        raise UsageError(f"{what} holds a prompt with no token; remove empty prompts")
    too_long = [len(row) > cfg.max_prompt_length for row in ids]
    short = [i for i, long in enumerate(too_long) if not long]
    no_room, fits = [False] * len(prompts), getattr(score_fn, "fits", None)
    if fits is not None:
        for i, ok in zip(short, chunked(lambda chunk: fits(chunk, cfg.max_new_tokens), short)):
            no_room[i] = not ok
    keep = [i for i in range(len(prompts)) if not (too_long[i] or no_room[i])]
    if len(keep) < len(prompts):
        reasons = [(sum(too_long), f"longer than --max-prompt-length {cfg.max_prompt_length}"),
                   (sum(no_room), "too long for the reward model to read with a response of "
                    f"--max-new-tokens {cfg.max_new_tokens}")]
        message = (f"{len(prompts) - len(keep)} of the {len(prompts)} prompts of {what} ("
                   + "; ".join(f"{n} {reason}" for n, reason in reasons if n) + ")")
        if not keep:
            raise UsageError(f"{message}: none is left; raise --max-prompt-length or lower "
                             "--max-new-tokens")
        log(f"warning: {message} are left out: a prompt cut short would lose its chat header "
            "or BOS, or the reward model would read another prompt than the policy",
            file=sys.stderr)
    return [prompts[i] for i in keep], [ids[i] for i in keep]


def context_length(config) -> int | None:
    """The positions a model reads (n_positions, or max_position_embeddings), if its config says."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


# === 13. Data parallelism (torchrun): DDP replicas, or FSDP2 shards (--data-parallel fsdp). The
# only code that knows other ranks exist; in one process each function is the identity.

def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) without torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class DataParallel(SingleProcess):
    """Part I's `SingleProcess` operations over every rank of a torchrun job, and an optimizer
    step that skips a non-finite step without waiting for the device (GradScaler at scale 1
    finds inf/NaN, fused AdamW skips itself; FSDP reduces the flag: all ranks skip together)."""

    def __init__(self, device: torch.device, actor: nn.Module, critic: nn.Module | None):
        self.device, (self.rank, self.size) = device, world()
        # DDP averages the gradients of the trained models over ranks (FSDP's are sharded)
        self.replicas = ({id(m): replicate(m, device) for m in (actor, critic) if m is not None}
                         if self.size > 1 and not is_sharded(actor) else {})
        self.scaler = torch.amp.GradScaler(device.type, init_scale=1.0)

    def trained(self, model: nn.Module) -> nn.Module:
        return self.replicas.get(id(model), model)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return reduced(tensor, "SUM")

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return reduced(tensor, "MAX")

    def mean(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`masked_mean` over every rank's real positions: sum and count are all-reduced."""
        mask = mask.bool()
        sums = torch.stack([torch.where(mask, values, 0).sum(), mask.sum().to(values.dtype)])
        total, count = self.sum(sums)
        return total / count.clamp(min=1)

    def share(self, indices: list[int]) -> list[int]:
        per_rank = len(indices) // self.size
        return indices[self.rank * per_rank:(self.rank + 1) * per_rank]

    def no_sync(self, actor, critic, last: bool):
        """No gradient reduction on all but the last micro-batch of a minibatch: DDP's
        all-reduce, or FSDP's reduce-scatter (gradients accumulate unsharded until the last)."""
        stack = ExitStack()
        for model in (actor, critic) if not last else ():
            if isinstance(model, nn.parallel.DistributedDataParallel):
                stack.enter_context(model.no_sync())
            elif is_sharded(model):
                model.set_requires_gradient_sync(False)
                stack.callback(model.set_requires_gradient_sync, True)
        return stack

    def gathered(self, actor):
        return gathered(actor)

    def step(self, optimizers, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        # a sharded model's norm is a DTensor: gathered into one plain tensor (all ranks')
        norms = torch.stack([(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                             for norm in map(gradient_norm, optimizers)])
        finite = torch.isfinite(norms).all()
        self.scaler.scale(norms)  # (the scaler's scale of 1 is made where the norms are)
        for optimizer, norm in zip(optimizers, norms):
            # a non-finite norm makes both clip coefficients NaN: GradScaler skips both steps
            nn.utils.clip_grads_with_norm_(trained_parameters(optimizer), max_grad_norm,
                                           torch.where(finite, norm, torch.nan))
            self.scaler.unscale_(optimizer)
            self.scaler.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
        self.scaler.update(1.0)  # keep the scale at 1: a finiteness check, not fp16 scaling
        return norms, ~finite


def reduced(tensor: torch.Tensor, op: str) -> torch.Tensor:
    if world()[1] == 1:
        return tensor
    total = tensor.detach().clone()
    torch.distributed.all_reduce(total, op=getattr(torch.distributed.ReduceOp, op))
    return total


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    objects = [obj] * world()[1]
    if len(objects) > 1:
        torch.distributed.all_gather_object(objects, obj)
    return objects


def replicate(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DDP, syncing only what it trains: with LoRA, actor and critic share a frozen
    base and each holds the other's adapter, which its DDP must neither broadcast nor wait for."""
    trained = {id(p) for p in trainable_parameters(model)}
    ignored = [name for name, p in model.named_parameters() if id(p) not in trained]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, bf16: bool) -> None:
    """FSDP2 over all ranks: each transformer block a unit, the root holds the rest; weights,
    gradients and AdamW state 1/N per rank. With bf16: bf16 compute, fp32 shards and reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": policy} if bf16 else {}
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    for block in max(lists, key=len, default=[]):  # GPT-2's .h, Llama's .layers
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


@contextmanager
def gathered(model: nn.Module):
    """A sharded policy all-gathered once for a whole rollout, not once per generated token
    (ranks whose responses end sooner would stop taking part); resharded afterwards."""
    units = [m for m in model.modules() if is_sharded(m)]
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def full_state_dict(model: nn.Module) -> dict:
    """The model's whole state dict on rank 0's CPU (sharded: every rank must call this)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                               cpu_offload=True))


def init_distributed(name: str) -> torch.device:
    """The run's device; under torchrun, after joining the process group (NCCL or gloo)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def leave_process_group(together: bool) -> None:
    """Under torchrun, leave the process group; `together`: after a barrier (DDP and FSDP keep
    the group alive past it, and a rank at interpreter shutdown while rank 0 still writes can
    abort in a gloo thread), not after an error (other ranks may be in another collective)."""
    if world()[1] > 1:
        if together:
            barrier()
        torch.distributed.destroy_process_group()


# === 14. The output directory (one run, locked) and checkpoints (atomic, exact, no code run).

CHECKPOINT = "checkpoint.pt"
SHARDED_CHECKPOINT = "checkpoint"  # a directory: torch.distributed.checkpoint, files per rank
METRICS, SAMPLES = "metrics.jsonl", "samples.jsonl"  # each iteration's row; evaluations' answers
POLICY = "policy"  # the trained policy, a save_pretrained directory
ADAPTER = "adapter"  # with LoRA: the actor's adapter alone, a PEFT directory
LOCK_FILE, WANDB_ID_FILE = ".ppo_rlhf.lock", ".wandb_run_id"
# what a run writes: it marks an earlier run's results; --overwrite deletes it (and SCRATCH)
RUN_FILES = (CHECKPOINT, SHARDED_CHECKPOINT, SHARDED_CHECKPOINT + ".old", METRICS, SAMPLES,
             POLICY, ADAPTER)
SCRATCH = (CHECKPOINT + ".tmp", SHARDED_CHECKPOINT + ".tmp", POLICY + ".tmp", ADAPTER + ".tmp",
           WANDB_ID_FILE, "wandb")
# options a resumed run may change (the last three: memory knobs, moving results by rounding)
RESUMABLE_OPTIONS = {"steps", "resume", "overwrite", "save_every", "output_dir", "device",
                     "samples", "tensorboard", "wandb", "wandb_project", "eval_every",
                     "max_skipped_updates", "micro_batch_size", "rollout_micro_batch_size",
                     "gradient_checkpointing"}


@dataclass
class OutputLock:
    """The output directory, and rank 0's `flock` on its lock file: dropped however it ends."""
    out: Path
    file: object = None  # the open lock file; None on the other ranks
    created: bool = False  # this run made the directory

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.release(remove_created=exc_type is not None)

    def discard_earlier_run(self) -> None:
        """--overwrite, once the new run has loaded (a start that fails destroys nothing)."""
        if self.file is not None:
            for path in [*(self.out / name for name in RUN_FILES + SCRATCH),
                         *self.out.glob("events.out.tfevents.*")]:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def release(self, remove_created: bool = False) -> None:
        """Unlock; `remove_created`: also remove the directory this run made if only the lock."""
        if self.file is not None:
            self.file.close()
            self.file = None
            if remove_created and self.created and [p.name for p in self.out.iterdir()] == [
                    LOCK_FILE]:
                (self.out / LOCK_FILE).unlink()
                self.out.rmdir()


def claim_output_dir(cfg: Config, rank: int) -> OutputLock:
    """The run's output directory, checked and locked by rank 0 before anything loads; every
    rank gets its answer. By default a new runs/<model>__<seed>__<date-time> (CleanRL's; -2,
    -3... by atomic mkdir when runs start together). Refused: an earlier run's results without
    --resume or --overwrite, --resume without a checkpoint, unwritable or held by a live run."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = lock_output_dir(cfg)
        except UsageError as e:
            error = str(e)
    out, error = gather_objects((lock and str(lock.out), error))[0]
    if error:
        raise UsageError(error)
    return lock or OutputLock(Path(out))


def lock_output_dir(cfg: Config) -> OutputLock:
    """`claim_output_dir`'s checks and lock, in one process."""
    if cfg.output_dir is None:
        model = "tiny-gpt2" if cfg.model == BUILTIN_MODEL else Path(cfg.model.rstrip("/")).name
        model = "".join(c if c.isalnum() or c in "._-" else "_" for c in model)
        base = Path("runs") / f"{model}__{cfg.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
        numbered = (base.with_name(f"{base.name}-{n}") for n in itertools.count(2))
        out = next(path for path in itertools.chain([base], numbered) if not path.exists())
    else:
        out = Path(cfg.output_dir)
        earlier = [name for name in RUN_FILES if (out / name).exists()]
        if earlier and not (cfg.resume or cfg.overwrite):
            raise UsageError(f"--output-dir {out} holds an earlier run ({', '.join(earlier)}); "
                             "continue it with --resume, replace it with --overwrite, or pass "
                             "another --output-dir")
        if cfg.resume and find_checkpoint(out) is None:
            raise UsageError(f"--resume: no checkpoint in {out}; start without --resume")
        if out.exists() and not out.is_dir():
            raise UsageError(f"--output-dir {out} cannot be written: it is a file")
    created = cfg.output_dir is None or not out.exists()
    try:
        if created:
            out.mkdir(parents=True, exist_ok=cfg.output_dir is not None)
        file = open(out / LOCK_FILE, "a+")
        if fcntl is not None:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileExistsError:  # a run started in the same second took that name
        return lock_output_dir(cfg)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "unknown"
        file.close()
        raise UsageError(f"--output-dir {out} is in use by another run (pid {holder}); "
                         "wait for it to end or pass another --output-dir") from None
    except OSError as e:
        where = f"--output-dir {out}" if cfg.output_dir else f"the output directory {out}"
        raise UsageError(f"{where} cannot be written: {e.strerror or first_line(e)}") from e
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()}\n")
    file.flush()
    return OutputLock(out, file, created)


def write_directory(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a fresh path.tmp, then renamed over `path`: a kill leaves the earlier
    directory whole (or, between the two steps, the complete .tmp)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename: a kill mid-write leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def resume_fingerprint(cfg: Config) -> dict:
    """The options a checkpoint must agree with, and the number of ranks that wrote it."""
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_OPTIONS}
    return {**options, "world_size": world()[1]}


# options added since checkpoints were fingerprinted whose defaults reproduce the version before
# them bit for bit: a checkpoint that lacks one resumes as if it held the default
SINCE_WITH_OLD_DEFAULTS = {"samples_per_prompt", "advantage_estimator", "kl_loss_coef",
                           "cliprange_high", "loss_agg_mode"}


def find_checkpoint(out: Path) -> Path | None:
    """checkpoint/meta.pt (sharded), checkpoint.old/meta.pt (a kill between
    `save_checkpoint`'s two renames left it), or checkpoint.pt in `out`; or None."""
    candidates = [out / SHARDED_CHECKPOINT / "meta.pt",
                  out / (SHARDED_CHECKPOINT + ".old") / "meta.pt", out / CHECKPOINT]
    return next((path for path in candidates if path.is_file()), None)


def load_checkpoint(out: Path, cfg: Config) -> dict:
    """What `save_checkpoint` wrote (sharded: meta.pt, and the shards' "directory"), its
    options checked against `cfg`; tensors and plain containers only (weights_only)."""
    path = find_checkpoint(out)
    if path is None:
        raise UsageError(f"--resume: no checkpoint in {out}; start without --resume")
    directory = path.parent if path.name == "meta.pt" else None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise UsageError(f"--resume: {path} is not a checkpoint this program wrote, or is "
                         f"damaged; refusing to load it ({type(e).__name__}: "
                         f"{first_line(e)[:200]})") from e
    saved, now = state["fingerprint"], resume_fingerprint(cfg)
    if directory:  # sharded checkpoints are resharded to any number of ranks
        saved, now = ({k: v for k, v in d.items() if k != "world_size"} for d in (saved, now))
    missing = "(not an option then)"  # a checkpoint of an earlier version lacks the newer ones
    saved = {**{f.name: f.default for f in dataclasses.fields(Config)
                if f.name in SINCE_WITH_OLD_DEFAULTS}, **saved}
    if differ := sorted(k for k in set(saved) | set(now)
                        if saved.get(k, missing) != now.get(k, missing)):
        changes = ", ".join(f"{k}: {saved.get(k, missing)!r} -> {now.get(k, missing)!r}"
                            for k in differ)
        raise UsageError(f"--resume: {path} was written with other options ({changes}); "
                         "resume with the same options or use another --output-dir")
    if cfg.steps < state["step"]:
        raise UsageError(f"--resume: the checkpoint is at step {state['step']}, beyond --steps "
                         f"{cfg.steps}: nothing would run, and its later state would be saved "
                         f"as step {cfg.steps}; give --steps {state['step']} or more")
    if cfg.lr_schedule != "constant" and cfg.steps != state["steps"]:
        raise UsageError(f"--resume: --lr-schedule {cfg.lr_schedule} decays over --steps, "
                         f"which was {state['steps']} and is now {cfg.steps}; resume with "
                         f"--steps {state['steps']}")
    return {**state, "directory": directory}


def trained_state(model: nn.Module) -> dict:
    """{name: tensor} of the parameters `model` trains: with LoRA, megabytes, not the base."""
    trained = {id(p) for p in trainable_parameters(model)}
    return {name: p.detach() for name, p in model.named_parameters() if id(p) in trained}


def training_state(run) -> dict:
    """Models and optimizers as `torch.distributed.checkpoint` state dicts (sharded: DTensors)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    return {name: state for name, model, optimizer in trained_models(run)
            for name, state in zip((name, name + "_optimizer"), get_state_dict(model, optimizer))}


def trained_models(run) -> list:
    return [(name, model, optimizer) for name, model, optimizer in (
        ("actor", run.models.actor, run.actor_optimizer),
        ("critic", run.models.critic, run.critic_optimizer)) if model is not None]


def save_checkpoint(run, step: int) -> None:
    """All `--resume` needs to continue exactly: what the models train (with LoRA: adapters and
    value head), optimizers, schedules, beta, the checks, the step, every rank's random state.
    fsdp: every rank writes its shards into checkpoint.tmp/ (any number of ranks resumes), then
    rank 0 adds meta.pt and renames it over checkpoint/ (moved aside first); else one file."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           **({"cuda": torch.cuda.get_rng_state()} if cuda else {})}
    meta = {"step": step, "steps": run.cfg.steps, "kl_coef": run.state.kl_coef,
            "reward_norm": list(run.state.reward_norm), "fingerprint": resume_fingerprint(run.cfg),
            "schedulers": [scheduler.state_dict() for scheduler in run.schedulers],
            "checks": run.checks.state_dict(), "rng": gather_objects(rng)}  # every rank's
    if run.cfg.data_parallel == "fsdp":
        import torch.distributed.checkpoint as dcp
        tmp, final, old = (run.out / (SHARDED_CHECKPOINT + end) for end in (".tmp", "", ".old"))
        if run.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        dcp.save(training_state(run), checkpoint_id=str(tmp))  # returns when all have written
        if run.rank == 0:
            torch.save(meta, tmp / "meta.pt")
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            (run.out / CHECKPOINT).unlink(missing_ok=True)  # superseded
        barrier()
    elif run.rank == 0:
        for name, model, optimizer in trained_models(run):
            meta[name], meta[name + "_optimizer"] = trained_state(model), optimizer.state_dict()
        atomic_save(meta, run.out / CHECKPOINT)
        for name in (SHARDED_CHECKPOINT, SHARDED_CHECKPOINT + ".old"):  # superseded
            shutil.rmtree(run.out / name, ignore_errors=True)
    run.saved_step = step


def restore_checkpoint(run, state: dict) -> None:
    """A `load_checkpoint` state into `run`; sharded: any number of ranks (RNG: only the same)."""
    if state["directory"]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        shards = training_state(run)  # the layout of this run: dcp reads into it
        dcp.load(shards, checkpoint_id=str(state["directory"]))
    for name, model, optimizer in trained_models(run):
        if state["directory"]:
            set_state_dict(model, optimizer, model_state_dict=shards[name],
                           optim_state_dict=shards[name + "_optimizer"])
            continue
        expected = trained_state(model).keys()
        if state[name].keys() != expected:
            raise UsageError(f"the checkpoint's trained weights ({len(state[name])}) are not "
                             f"those this model trains ({len(expected)}): it was written by "
                             "another model")
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if key in state[name]:
                    parameter.copy_(state[name][key])
        optimizer.load_state_dict(state[name + "_optimizer"])
    for scheduler, scheduler_state in zip(run.schedulers, state["schedulers"]):
        scheduler.load_state_dict(scheduler_state)
    run.checks.load_state_dict(state["checks"])
    run.state = LoopState(step=state["step"], kl_coef=state["kl_coef"],
                          reward_norm=tuple(state["reward_norm"]))
    run.saved_step = run.state.step
    if len(state["rng"]) == run.parallel.size:
        rng = state["rng"][run.rank]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:  # another number of ranks samples other responses anyway: fresh, distinct seeds
        random.seed(seed_of(run.cfg.seed, "resample", run.state.step))
        torch.manual_seed(seed_of(run.cfg.seed, "resample", run.state.step, run.rank))
        run.log(f"note: the checkpoint was written by {len(state['rng'])} rank(s), this run "
                f"has {run.parallel.size}: weights and optimizers resume exactly, sampling "
                "does not")


# === 15. Runtime and the command line.

LIMITS = [  # (the rule, the options it holds for, its test); None means unset and passes
    ("batch sizes must be >= 1", "batch_size mini_batch_size micro_batch_size "
     "rollout_micro_batch_size", lambda v: v >= 1),
    ("must be >= 1", "steps ppo_epochs max_new_tokens max_prompt_length kl_horizon eval_every "
     "max_skipped_updates normalize_reward_samples samples_per_prompt", lambda v: v >= 1),
    ("must be > 0", "temperature actor_lr critic_lr max_grad_norm cliprange cliprange_high "
     "cliprange_value kl_target clip_reward_value lora_alpha", lambda v: v > 0),
    ("must be >= 0", "top_k kl_ctl kl_loss_coef ent_coef weight_decay warmup_steps "
     "critic_warmup_steps save_every lora_r", lambda v: v >= 0),
    ("must be in [0, 1]", "gamma lam", lambda v: 0 <= v <= 1),
    ("must be in (0, 1]", "top_p", lambda v: 0 < v <= 1),
    ("must be in [0, 1)", "eval_fraction lora_dropout", lambda v: 0 <= v < 1),
    ("must be > 1", "dual_clip", lambda v: v > 1),
]


def validate(cfg: Config, world_size: int = 1) -> None:
    """Refuse out-of-range options and contradictions before anything is loaded or written."""
    for rule, names, holds in LIMITS:
        for name in names.split():
            value = getattr(cfg, name)
            if value is not None and not holds(value):
                raise UsageError(f"--{name.replace('_', '-')} {value}: {rule}")
    n, estimator, no_critic = (cfg.samples_per_prompt, f"--advantage-estimator "
                               f"{cfg.advantage_estimator}", cfg.advantage_estimator != "gae")
    checks = [
        (n == 1 or cfg.batch_size % (n * world_size) == 0, f"--batch-size {cfg.batch_size} "
         f"must be a multiple of --samples-per-prompt {n} x the {world_size} ranks: a group "
         "of answers to one prompt never straddles ranks"),
        (n > 1 or cfg.advantage_estimator not in GROUP_ESTIMATORS, f"{estimator} needs "
         "--samples-per-prompt >= 2: its baseline is the other answers to the same prompt"),
        (cfg.gamma == 1 or cfg.advantage_estimator not in GROUP_ESTIMATORS, f"{estimator} gives "
         "every token of an answer its one advantage: --gamma must be 1"),
        (not no_critic or not (cfg.critic_warmup_steps or cfg.critic_model or cfg.critic_lr
                               or cfg.whiten_rewards), f"{estimator} has no critic: "
         "--critic-warmup-steps, --critic-model, --critic-lr and --whiten-rewards are gae's"),
        (not cfg.kl_loss_coef or cfg.kl_controller == "fixed", "--kl-controller adapts the "
         "reward's beta; with --kl-loss-coef the KL is in the loss, at a fixed coefficient"),
        (cfg.batch_size % cfg.mini_batch_size == 0,
         f"--batch-size {cfg.batch_size} must be a multiple of --mini-batch-size "
         f"{cfg.mini_batch_size}"),
        (cfg.mini_batch_size % world_size == 0 and cfg.batch_size % world_size == 0,
         f"--batch-size and --mini-batch-size must be multiples of the {world_size} ranks"),
        (not (cfg.reward_model and cfg.reward_fn), "give --reward-model or --reward-fn, not both"),
        (not cfg.resume or cfg.output_dir is not None,
         "--resume needs --output-dir, the directory of the run to continue"),
        (not (cfg.resume and cfg.overwrite), "give --resume or --overwrite, not both"),
        (not (cfg.lora_r and cfg.data_parallel == "fsdp"),
         "--lora-r with --data-parallel fsdp is not supported: LoRA's one frozen base serves "
         "actor, reference and critic in turn, which FSDP would gather for each; use ddp "
         "(each rank holds the base, 2 bytes per parameter in bf16)"),
    ]
    for package, wanted, without in (("tensorboard", cfg.tensorboard, "--no-tensorboard"),
                                     ("wandb", cfg.wandb, "no --wandb"),
                                     ("peft", cfg.lora_r > 0, "--lora-r 0")):
        checks.append((not wanted or importlib.util.find_spec(package) is not None,
                       f"the {package} package is not installed: pip install {package}, or "
                       f"run with {without}"))
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


class StopRequest:
    """While active, SIGINT/SIGTERM only set `signum`: the loop finishes its iteration, saves
    and exits. In one process a second signal interrupts at once; the previous handlers come
    back on exit. Under torchrun (which forwards every signal: Ctrl-C arrives twice) later
    signals are ignored, also while the rank leaves (a late copy must not break its barrier)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.forwarded, self.previous = None, world()[1] > 1, {}

    def __enter__(self) -> "StopRequest":
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        leaving = self.forwarded and self.signum is not None
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_IGN if leaving else handler)

    def handle(self, signum, frame) -> None:
        if self.signum is None:  # a second one is only seen when forwarded: the same stop
            self.signum = signum
            if not self.forwarded:
                for s, handler in self.previous.items():
                    signal.signal(s, handler)


def keep_freed_memory(device: torch.device) -> None:
    """On CPU, have glibc's malloc keep freed memory for the next step. By default it maps each
    block above 32 MB (logits, the tied embedding's gradient) fresh and unmaps it when freed:
    each step faults its pages in again, zeroed (GPT-2 size, 2 cores: 0.6M faults, 3.3 s of
    kernel time per 10 s; kept: 0, 7.8 s, same peak RSS). CUDA already reuses; no glibc: no-op."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if device.type == "cpu" else None
    if mallopt is not None:
        mallopt(-4, 0)  # M_MMAP_MAX (glibc's malloc.h): no block gets its own mapping
        mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD at its largest: the heap is never shrunk


def parse_args(argv: list[str] | None = None) -> Config:
    """The command line, generated from `Config`: --kebab-case per field, help and default,
    listed in the groups of `GROUPS`."""
    parser = argparse.ArgumentParser(
        usage="%(prog)s [options]",
        description="RLHF with PPO: actor, critic, reward and reference models in one file.")
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in dataclasses.fields(Config):
        kind = f.type
        if get_origin(kind) is not None and type(None) in get_args(kind):  # X | None
            kind = next(a for a in get_args(kind) if a is not type(None))
        default = "" if f.default is None else f" (default: {f.default})"
        kwargs = {"default": f.default, "help": f.metadata["help"] + default}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal:
            kwargs["choices"] = get_args(kind)
        else:
            kwargs.update(type=kind, metavar={int: "N", float: "X"}.get(kind, "S"))
        groups[f.metadata["group"]].add_argument("--" + f.name.replace("_", "-"), **kwargs)
    return Config(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # load reports and progress bars would bury the metrics
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()
    cfg = parse_args(argv)
    try:
        status = train(cfg)
    except BaseException as e:
        leave_process_group(together=False)  # the other ranks may be anywhere: no barrier
        if not isinstance(e, UsageError):
            raise
        print(f"ppo_rlhf: error: {e}", file=sys.stderr)
        return 2
    leave_process_group(together=True)  # every rank returned after the same iteration
    return status


if __name__ == "__main__":
    sys.exit(main())
