"""
What comes after SFT, as plain functions of tensors: train.py's --task=dpo, rm and rl run
them, and test_all.py checks each against a computation by hand.

- DPO (--task=dpo): from preference pairs, raise the policy's log-probability of the chosen
  answer over the rejected one, measured against the frozen model it started from.
- A reward model (--task=rm): a Transformer with a scalar head, trained on the same pairs
  so that r(chosen) > r(rejected) (the Bradley-Terry model of preferences).
- RL with verifiable rewards (--task=rl, GRPO-style): sample a group of answers to each
  prompt, score each with a rule that checks it against the request, and push up the
  answers that scored above their group's mean, while a KL penalty keeps the policy near
  the reference.
"""

import torch
import torch.nn.functional as F

from model import token_logprobs


def token_logps(model, x, y):
    """log p(y[t] | x[..t]) at every position: (rows, T), 0 where y is -1 (not counted)"""
    return token_logprobs(model(x, y)[0], y)


# -----------------------------------------------------------------------------
# DPO (Rafailov et al. 2023), with RPO's SFT term (Pang et al. 2024)

def dpo_loss(pi, ref, beta, rpo_alpha=0.0, chosen_tokens=None):
    """pi, ref (2B,): the summed log-probs of each answer under the policy and the reference;
    rows 0..B-1 are chosen answers, B..2B-1 the rejected ones. The loss is
    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), the implicit rewards' margin.
    DPO alone only widens the gap: it may do so by lowering both answers, and then the
    chosen answer too becomes less likely than after SFT. rpo_alpha adds the chosen
    answers' per-token negative log-likelihood (chosen_tokens (B,) their lengths), which
    keeps them likely. Returns (loss, reward margins (B,))."""
    B = pi.size(0) // 2
    rewards = beta * (pi - ref)  # DPO's implicit rewards
    margin = rewards[:B] - rewards[B:]
    loss = -F.logsigmoid(margin).mean()
    if rpo_alpha:
        loss = loss + rpo_alpha * (-pi[:B] / chosen_tokens).mean()
    return loss, margin


# -----------------------------------------------------------------------------
# the reward model

def reward_model_loss(r):
    """Bradley-Terry: P(chosen preferred) = sigmoid(r_chosen - r_rejected); r (2B,) in the
    order of dpo_loss. Returns (-log of that probability averaged, margins (B,))."""
    B = r.size(0) // 2
    margin = r[:B] - r[B:]
    return -F.logsigmoid(margin).mean(), margin


# -----------------------------------------------------------------------------
# RL with verifiable rewards (GRPO, Shao et al. 2024)

@torch.no_grad()
def sample_group(model, prompt, group_size, max_new_tokens, stop_id, temperature=1.0,
                 generator=None):
    """group_size answers to one prompt (ids), sampled with the KV cache (at temperature 1:
    the policy's own distribution). Returns [(answer ids, stopped)]: the ids end with
    stop_id when the answer stopped."""
    idx = torch.tensor([prompt] * group_size, device=model.output.weight.device)
    out = model.generate(idx, max_new_tokens, temperature, stop_id=stop_id,
                         generator=generator)[:, len(prompt):].tolist()
    return [(a[:a.index(stop_id) + 1], True) if stop_id in a else (a, False) for a in out]


def group_advantages(rewards, normalize=True):
    """rewards (P, G): G answers to each of P prompts. The advantage of an answer is its
    reward minus its group's mean (over the group's standard deviation if normalize):
    better than its siblings -> pushed up. A group whose rewards are all equal has nothing
    to teach (every advantage 0): kept (P,) marks the others."""
    adv = rewards - rewards.mean(1, keepdim=True)
    kept = rewards.amax(1) > rewards.amin(1)
    if normalize:
        adv = adv / rewards.std(1, keepdim=True).clamp(min=1e-6)
    return adv * kept[:, None], kept


def kl_k3(logp, ref_logp):
    """Per-token estimate of KL(policy || reference) from tokens the policy sampled
    (Schulman's k3): exp(d) - d - 1 with d = ref_logp - logp; >= 0, and 0 where equal."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp, ref_logp, adv, mask, beta):
    """logp, ref_logp (N, T): log-probs of the sampled tokens under the policy (with
    gradient) and the frozen reference; adv (N,) each answer's advantage; mask (N, T) 1 on
    answer tokens. Per token: -ratio * adv + beta * KL, averaged over each answer's tokens,
    then over the answers (GRPO's form: a 10-token answer to a question weighs as much as a
    130-token story). ratio = exp(logp - logp.detach()) is 1 here, since the answers were
    just sampled from this policy (PPO's clipped ratio with one update per sample), but its
    gradient is the policy gradient, adv * d logp. Returns (loss, mean KL per token)."""
    ratio = torch.exp(logp - logp.detach())
    kl = kl_k3(logp, ref_logp)
    per_token = (-ratio * adv[:, None] + beta * kl) * mask
    loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    return loss, (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
