"""
What comes after SFT, as plain functions of tensors: train.py's --task=dpo and rm and
train_rl.py run them, and test_all.py checks each against a computation by hand.

- DPO (--task=dpo): from preference pairs, raise the policy's log-probability of the chosen
  answer over the rejected one, measured against the frozen model it started from.
- A reward model (--task=rm): a Transformer with a scalar head, trained on the same pairs
  so that r(chosen) > r(rejected) (the Bradley-Terry model of preferences).
- RL with verifiable rewards (train_rl.py, GRPO with PPO's clipped updates): sample a group
  of answers to each prompt, score each with a rule that checks it against the request, and
  push up the answers that scored above their group's mean, while a KL penalty keeps the
  policy near the reference.
"""

import math

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
# RL with verifiable rewards (GRPO, Shao et al. 2024, with PPO's clipped updates)

@torch.no_grad()
def sample_group(model, prompt, group_size, max_new_tokens, stop_ids, temperature=1.0,
                 generator=None):
    """group_size answers to one prompt (ids), sampled with the KV cache (at temperature 1:
    the policy's own distribution; 0: greedy). Returns [(answer ids, stopped)]: the ids end
    with the stop id when the answer stopped (at <|im_end|>, or BOS/EOS if given)."""
    stops = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    idx = torch.tensor([prompt] * group_size, device=model.output.weight.device)
    out = model.generate(idx, max_new_tokens, temperature, stop_id=stops,
                         generator=generator)[:, len(prompt):].tolist()
    cut = lambda a: next((i for i, t in enumerate(a) if t in stops), None)
    return [(a[:cut(a) + 1], True) if cut(a) is not None else (a, False) for a in out]


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


def ppo_loss(logp, old_logp, ref_logp, adv, mask, clip=0.2, beta=0.0):
    """logp (N, T): log-probs of the sampled tokens under the policy being updated (with
    gradient); old_logp: under the policy that sampled them; ref_logp: under the frozen
    reference; adv (N,) each answer's advantage; mask (N, T) 1 on answer tokens. Per token:
    -min(ratio * adv, clamp(ratio, 1 - clip, 1 + clip) * adv) + beta * KL, ratio =
    exp(logp - old_logp), averaged over each answer's tokens, then over the answers (GRPO's
    form: a 10-token answer weighs as much as a 130-token story). The first update on a batch
    has ratio 1, and its gradient is the policy gradient adv * d logp; the later ones on the
    same samples are held within 1 +- clip of the policy that drew them (PPO), so a batch
    can teach several steps. Returns (loss, mean KL per token, the fraction of the tokens
    whose ratio was clipped)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    clipped = ratio.clamp(1 - clip, 1 + clip) * a
    surrogate = torch.minimum(ratio * a, clipped)
    kl = kl_k3(logp, ref_logp)
    per_token = (-surrogate + beta * kl) * mask
    loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).mean()
    tokens = mask.sum().clamp(min=1)
    was_clipped = (clipped < ratio * a).float() * mask  # where the clamp gave the minimum
    return loss, (kl.detach() * mask).sum() / tokens, was_clipped.sum() / tokens


# -----------------------------------------------------------------------------
# held-out instruction following: sample.py --eval_instruct and train_rl.py's evals

@torch.no_grad()
def heldout_eval(model, tok, items, max_new_tokens, best_of=0, seed=0, progress=None):
    """Answer each held-out (messages, check) greedily, and with best_of=K also K times at
    temperature 1 (whether one of them follows: the ceiling that sharpening a model towards
    its own best answers can reach). An answer counts if it stopped and follows its request
    (synth.follows, which RL's reward counts too). Returns, per request, (kind, followed,
    passed (the wish too), followed by one of the K, or None)."""
    import synth
    stops = (tok.im_end_id, tok.bos_id, tok.eos_id)
    gen = torch.Generator(device=model.output.weight.device).manual_seed(seed)
    results = []
    for i, (messages, check) in enumerate(items):
        if progress:
            progress(i, results)
        prompt = tok.encode_chat(messages[:1], add_generation_prompt=True)[0]
        if len(prompt) >= model.params.max_seq_len:  # the request does not fit: not followed
            results.append((check['kind'], False, False, False if best_of else None))
            continue

        def answers(n, temperature):
            return [(tok.decode(a[:-1] if stopped else a), stopped) for a, stopped in
                    sample_group(model, prompt, n, max_new_tokens, stops, temperature, gen)]
        (text, stopped), = answers(1, 0.0)
        ok = stopped and synth.follows(text, check)
        best = any(s and synth.follows(t, check) for t, s in answers(best_of, 1.0)) if best_of else None
        results.append((check['kind'], ok, ok and synth.wish(text, check), best))
    return results


def rate(hits, n):
    """A proportion and its standard error, sqrt(p (1 - p) / n)"""
    p = hits / max(n, 1)
    return p, math.sqrt(p * (1 - p) / max(n, 1))
