"""
Reinforcement learning with verifiable rewards, after SFT: GRPO (Shao et al. 2024) with
PPO's clipped updates, on the synthetic instructions, whose answers a rule can check
(synth.follows). One loop, as nanochat's chat_rl.py reads:

    sample groups of answers -> score them -> advantages -> clipped loss -> update -> eval

$ python train_rl.py --init_from=out_sft/ckpt.pt --device=cpu      # writes out_rl/
$ python train_rl.py --init_from=resume                            # continues out_rl/
$ torchrun --standalone --nproc_per_node=2 train_rl.py --device=cpu   # DDP (gloo on CPU)

Each step draws requests and answers each group_size times at temperature 1. An answer
scores 1 if it follows its request (the rule the held-out eval applies), plus wish_weight if
a story also names the wished-for thing. Its advantage is its score minus its group's mean,
over the group's standard deviation. A group whose answers all follow, or all fail, teaches
nothing, so requests are drawn until batch_size groups differ (DAPO's dynamic sampling), and
from the classes of request where the model sometimes succeeds: the first step measures each
class, and the edge of competence is drawn most. The batch is then used for ppo_epochs
updates, each held within 1 +- clip of the policy that sampled it, with a KL penalty to the
SFT model. --lora_rank=8 trains small adapters instead of every weight (as train.py's SFT and
DPO do); the KL's reference is then the model under the adapters. Ctrl-C saves a checkpoint
and stops.
"""

import copy
import math
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import rlhf
import synth
from checkpoint import (LORA_CHECKS, RunLog, Trackers, claim_out_dir, load_model, lora_note,
                        resumed_log, run_out_dir, save_run, start_lora)
from configurator import StopOnCtrlC, check, check_device, configure, die
from model import RewardModel, lora_weights, without_adapters
from tokenizer import CHAT_TEMPLATE, GENERATION_PROMPT, checkpoint_tokenizer

# -----------------------------------------------------------------------------
# I/O
out_dir = ''             # '' = out_rl
init_from = 'out_sft/ckpt.pt'  # the (SFT) checkpoint to start from, or 'resume' (out_dir's)
eval_interval = 20       # evaluate on held-out requests and save a checkpoint this often
eval_iters = 100         # held-out requests per eval (answered greedily)
log_interval = 1
wandb_log = False        # log to Weights & Biases (pip install wandb)
wandb_project = 'llama-from-scratch'
wandb_run_name = 'rl'
swanlab_log = False      # log to SwanLab (pip install swanlab): what wandb gets
swanlab_project = 'llama-from-scratch'
swanlab_run_name = 'rl'
swanlab_mode = 'online'  # online (swanlab login first) | offline: kept in out_dir/swanlog
# what RL trains on: synth's training requests (never the held-out ones)
rl_prompts = 2000        # the pool of requests
probe = 8                # requests per class measured before the first step
replay = 0.02            # the least weight of a class, so that none is left out and falls
seed = 1337              # step k's requests and samples are a function of (seed, rank, k)
# sampling and the reward
batch_size = 16          # groups per step (on each process)
group_size = 8           # answers per request
max_draws = 4            # dynamic sampling draws at most max_draws * batch_size requests
max_new_tokens = 160     # per answer; one that has not stopped by then scores 0
wish_weight = 0.2        # a story that also names the wish scores this much more
reward_model = ''        # a train.py --task=rm checkpoint whose score is added to the rule's
rm_weight = 0.05         # ... times this (its scores are tens of nats for a story)
# the update
ppo_epochs = 2           # updates on each batch of samples
clip = 0.2               # each held within 1 +- clip of the policy that sampled the batch
beta = 0.05              # weight of the KL penalty to the starting (SFT) model
micro_batch = 32         # answers per forward/backward pass (gradients are summed)
learning_rate = 2e-4
warmup_iters = 5         # then constant: a decay would spend the last steps near zero
max_iters = 40
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
# LoRA: train a low-rank update of some weights, the base frozen (model.py)
lora_rank = 0            # r of each adapter; 0 = every weight trains
lora_alpha = 16.0        # the update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0       # dropout on the adapters' input
lora_targets = 'wq,wk,wv,wo'  # the layers that get adapters, of wq,wk,wv,wo,w1,w2,w3
# system
device = 'cuda' if torch.cuda.is_available() else 'cpu'
# -----------------------------------------------------------------------------
config, _ = configure(globals())
at_least_1 = (lambda v: v >= 1, "at least 1")
check(globals(), {
    'eval_interval': at_least_1, 'eval_iters': at_least_1, 'log_interval': at_least_1,
    'rl_prompts': at_least_1, 'probe': at_least_1, 'batch_size': at_least_1,
    'group_size': (lambda v: v >= 2, "at least 2 (advantages compare answers in a group)"),
    'max_draws': at_least_1, 'max_new_tokens': at_least_1, 'ppo_epochs': at_least_1,
    'micro_batch': at_least_1, 'max_iters': (lambda v: v >= 0, "0 or more"),
    'warmup_iters': (lambda v: v >= 0, "0 or more"), 'seed': (lambda v: v >= 0, "0 or more"),
    'replay': (lambda v: 0 <= v <= 1, "between 0 and 1"),
    'clip': (lambda v: 0 < v < 1, "above 0 and below 1 (0.2 is usual)"),
    **{k: (lambda v: math.isfinite(v) and v >= 0, "a number, 0 or more") for k in
       ('wish_weight', 'rm_weight', 'beta', 'learning_rate', 'weight_decay', 'grad_clip')},
    'swanlab_mode': (lambda v: v in ('online', 'offline', 'local'), "online, offline or local"),
    'beta1': (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    'beta2': (lambda v: 0 <= v < 1, "at least 0 and below 1"), **LORA_CHECKS,
})
check_device(device)
out_dir = config['out_dir'] = run_out_dir(out_dir, 'rl', init_from, default='out_rl')
ckpt_path = os.path.join(out_dir, 'ckpt.pt')

# DDP: torchrun sets RANK; NCCL between GPUs, gloo between CPU processes
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device.startswith('cuda'):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
else:
    rank, world_size = 0, 1
master = rank == 0  # only rank 0 evaluates and writes files

# -----------------------------------------------------------------------------
# the policy, the frozen reference, the requests, and where we start from

path = ckpt_path if init_from == 'resume' else init_from
model, ckpt = load_model(path, device)
if isinstance(model, RewardModel):
    die(f"{path} is a reward model: it scores answers, it does not write them — RL needs a "
        "language model (the sft checkpoint)")
tok = checkpoint_tokenizer(path, ckpt)
iter_num, resume_log, weights = 0, None, None
if init_from == 'resume' and (ckpt.get('task') != 'rl' or type(ckpt.get('iter_num')) is not int):
    die(f"{path} is not an RL run to resume ({ckpt.get('task', 'pretrain')}) — start one "
        f"with --init_from=path/to/sft/ckpt.pt")
# LoRA: adapters on the model RL starts from (a resumed run's own), the rest frozen; their
# random A is drawn from the seed, so that a run can be repeated
torch.manual_seed(seed)
lora = start_lora(model, path, ckpt, init_from == 'resume', out_dir, dict(
    rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets))
# the model RL starts from, frozen: with LoRA the base under the adapters (its tensors, no copy)
ref_model = without_adapters(model) if lora else copy.deepcopy(model).eval().requires_grad_(False)
if init_from == 'resume':
    iter_num, resume_log, weights = ckpt['iter_num'], resumed_log(ckpt), ckpt.get('weights')
    try:
        if not lora:  # (a LoRA run's reference is its base, which load_model found and checked)
            ref_model.load_state_dict(ckpt['ref_model'])
    except (KeyError, RuntimeError, TypeError) as e:
        die(f"{path}: its reference model does not fit ({str(e)[:80]}) — the checkpoint is "
            "damaged; start again from the sft checkpoint")
elif ckpt.get('task', 'pretrain') == 'pretrain':
    print(f"note: {path} was pretrained only, never fine-tuned to chat: RL from it learns "
          "little — fine-tune it first (train.py --task=sft)")

# the pool: synth's training requests, by class (a request and the check its answer must pass)
pool = {kind: [] for kind in synth.KINDS}
for messages, wanted in synth.instructions(rl_prompts, seed=seed):
    prompt = tok.encode_chat(messages[:1], add_generation_prompt=True)[0]
    pool[wanted['kind']].append((prompt, wanted))
kinds = [k for k in synth.KINDS if pool[k]]
heldout = synth.instructions(eval_iters, heldout=True)
longest = max([len(p) for k in kinds for p, _ in pool[k]]
              + [len(tok.encode_chat(m[:1], add_generation_prompt=True)[0]) for m, _ in heldout])
if model.params.max_seq_len <= longest:
    die(f"{path} has a context of {model.params.max_seq_len} tokens, but RL's requests take up "
        f"to {longest} — fine-tune a model with a longer --max_seq_len")
rm_model = None
if reward_model:
    rm_model, rm_ckpt = load_model(reward_model, device)
    if not isinstance(rm_model, RewardModel) or rm_ckpt.get('tokenizer') != ckpt['tokenizer']:
        die(f"--reward_model={reward_model} is not a reward model of this tokenizer — train one "
            "with train.py --task=rm from the same sft checkpoint")
    if rm_model.params.max_seq_len < min(longest + max_new_tokens, model.params.max_seq_len):
        die(f"--reward_model={reward_model} has a context of {rm_model.params.max_seq_len} "
            "tokens, shorter than a request with its answer — train it from the policy's own "
            "sft checkpoint")
    rm_model.eval().requires_grad_(False)

optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2),
                                       device.split(':')[0])
if init_from == 'resume':
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        die(f"{path}: its optimizer state does not fit the model ({str(e)[:80]}) — start again "
            "from the sft checkpoint")
start = dict(model_args=ckpt['model_args'], tokenizer=ckpt['tokenizer'], source=path)
ckpt = None  # free the memory
policy = DDP(model) if ddp else model  # the module that takes the gradient steps


# -----------------------------------------------------------------------------
# sampling and scoring

def answers(prompt, wanted, n, gen):
    """n answers to one request at temperature 1 -> [(ids, stopped, reward, follows, wish)]"""
    out = []
    for ids, stopped in rlhf.sample_group(model, prompt, n, max_new_tokens, tok.im_end_id,
                                          generator=gen):
        text = tok.decode(ids[:-1] if stopped else ids)
        follows = stopped and synth.follows(text, wanted)
        out.append((ids, stopped, synth.reward(text, wanted, stopped, wish_weight), follows,
                    stopped and synth.wish(text, wanted)))
    return out


@torch.no_grad()
def measure_classes():
    """Where the starting model stands on each class of request: the share of `probe`
    requests' answers that follow, p. A class is drawn in proportion to p (1 - p), the
    chance that a pair of its answers differ, so most of the groups RL samples can teach
    (the edge of competence); replay keeps every class in the mix."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.default_rng([seed, 2**31])
    p = {}
    for kind in kinds:
        picks = rng.choice(len(pool[kind]), min(probe, len(pool[kind])), replace=False)
        hits = [a[3] for i in picks for a in answers(*pool[kind][i], group_size, gen)]
        p[kind] = sum(hits) / len(hits)
    w = {k: p[k] * (1 - p[k]) + replay for k in kinds}
    total = sum(w.values())
    weights = {k: v / total for k, v in w.items()}
    print("classes: " + "; ".join(f"{k} {p[k]:.0%} follow, drawn {weights[k]:.0%}" for k in kinds))
    return weights


def to_rows(seqs):
    """[(prompt + answer ids, prompt length)] -> x, y (rows, T) padded; y counts only the
    answer tokens"""
    T = max(len(s) for s, _ in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for r, (s, n) in enumerate(seqs):
        x[r, :len(s) - 1] = torch.tensor(s[:-1])
        y[r, n - 1:len(s) - 1] = torch.tensor(s[n:])
    return x.to(device), y.to(device)


@torch.no_grad()
def sample_batch(it):
    """Step it's batch: requests drawn by class weight, group_size answers to each, kept when
    some of a group's answers follow and some do not, until batch_size groups (or
    max_draws * batch_size requests). Returns (x, y, advantages, what the answers were)."""
    model.eval()
    rng = np.random.default_rng([seed, rank, it])
    gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
    seqs, rewards, drawn, sampled = [], [], 0, []
    while len(rewards) < batch_size and drawn < max_draws * batch_size:
        kind = kinds[rng.choice(len(kinds), p=[weights[k] for k in kinds])]
        prompt, wanted = pool[kind][rng.integers(len(pool[kind]))]
        group = answers(prompt, wanted, group_size, gen)
        drawn += 1
        sampled += [(kind, *a[2:], len(a[0])) for a in group]  # (kind, reward, follows, wish, n)
        if len({a[3] for a in group}) > 1:  # some follow, some do not: it can teach
            seqs += [(prompt + a[0], len(prompt)) for a in group]
            rewards.append([a[2] for a in group])
    kept = len(rewards)
    if not kept:  # nothing to learn: a pass that changes nothing all the same (DDP's ranks go
        seqs, rewards = [(prompt + group[0][0], len(prompt))], [[0.0]]  # together)
    x, y = to_rows(seqs)
    if not kept:
        y[:] = -1
    rewards = torch.tensor(rewards, device=device)
    if rm_model is not None:
        rewards = rewards + rm_weight * rm_model(x, y).float().view(rewards.shape)
    adv = rlhf.group_advantages(rewards)[0] if kept else torch.zeros_like(rewards)
    mean = lambda i, rows: sum(r[i] for r in rows) / len(rows)
    stats = {'reward': mean(1, sampled), 'follows': mean(2, sampled), 'wish': mean(3, sampled),
             'answer_len': mean(4, sampled), 'kept': kept, 'drawn': drawn}
    for k in kinds:  # how often each class's answers followed, among those sampled
        rows = [r for r in sampled if r[0] == k]
        if rows:
            stats[f'follows_{k}'] = mean(2, rows)
    return x, y, adv.flatten(), stats


# -----------------------------------------------------------------------------
# the update, and the eval

def update(x, y, adv):
    """ppo_epochs clipped updates on one batch of samples, micro_batch answers per pass.
    The log-probs of the policy that sampled them (old) and of the reference are taken
    once, before the first update. Returns (loss, KL per token, fraction clipped)."""
    model.eval()  # (no dropout: the old and new log-probs must be of the same function)
    mask = y != -1
    with torch.no_grad():
        old = torch.cat([rlhf.token_logps(model, x[i:i + micro_batch], y[i:i + micro_batch])
                         for i in range(0, len(x), micro_batch)])
        ref = torch.cat([rlhf.token_logps(ref_model, x[i:i + micro_batch], y[i:i + micro_batch])
                         for i in range(0, len(x), micro_batch)])
    totals = np.zeros(3)
    for _ in range(ppo_epochs):
        for i in range(0, len(x), micro_batch):
            j = slice(i, i + micro_batch)
            last = i + micro_batch >= len(x)  # DDP averages the gradients once, after the last
            with policy.no_sync() if ddp and not last else nullcontext():
                logp = rlhf.token_logps(policy, x[j], y[j])
                loss, kl, clipped = rlhf.ppo_loss(logp, old[j], ref[j], adv[j], mask[j], clip,
                                                  beta)
                share = len(x[j]) / len(x)  # the batch's mean, summed over the passes
                (loss * share).backward()
            totals += np.array([loss.item(), kl.item(), clipped.item()]) * share / ppo_epochs
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return totals


def evaluate():
    """Greedy answers to eval_iters held-out requests: the share that follow (synth.follows,
    what the reward counts), pass@1 (the wish too), and by class"""
    model.eval()
    results = rlhf.heldout_eval(model, tok, heldout, max_new_tokens)
    out = {'instruct': sum(r[1] for r in results) / len(results),
           'pass1': sum(r[2] for r in results) / len(results)}
    for k in kinds:
        hits = [r[1] for r in results if r[0] == k]
        if hits:
            out[f'instruct_{k}'] = sum(hits) / len(hits)
    return out


def get_lr(it):
    return learning_rate * min(1.0, (it + 1) / (warmup_iters + 1))


# -----------------------------------------------------------------------------
# the loop

columns = (['iter', 'loss', 'lr', 'reward', 'follows', 'wish', 'kl', 'answer_len', 'kept',
            'drawn', 'clipped'] + [f'follows_{k}' for k in kinds] + ['instruct', 'pass1']
           + [f'instruct_{k}' for k in kinds])
out_dir_lock = claim_out_dir(out_dir) if master else None
log = RunLog(os.path.join(out_dir, 'log.csv'), columns,
             resume=(resume_log, iter_num) if init_from == 'resume' else None) if master else None
if weights is None:  # measured once, kept in the checkpoint: a resumed run draws the same
    weights = measure_classes() if master else None
    if ddp:  # rank 0's measurement for all
        shared = [weights]
        dist.broadcast_object_list(shared, src=0)
        weights = shared[0]
if master:
    n = sum(p.numel() for p in model.parameters())
    print(f"rl from {start['source']}: {batch_size} groups x {group_size} answers per step x "
          f"{world_size} processes, {ppo_epochs} updates each; {n:,} parameters"
          f"{lora_note(model, lora)}; {device}")
    trackers = Trackers(config, out_dir)  # wandb, swanlab: what log.csv gets, if asked for


def save():
    # LoRA: the adapters alone, and the base's path and hash (checkpoint.py), which is the
    # reference too; else the whole model and the reference
    weights_and_ref = (dict(model=lora_weights(model), lora=lora) if lora else
                       dict(model=model.state_dict(), ref_model=ref_model.state_dict()))
    save_run(ckpt_path, dict(weights_and_ref, optimizer=optimizer.state_dict(),
                             model_args=start['model_args'],
                             iter_num=iter_num, config=config, tokenizer=start['tokenizer'],
                             task='rl', weights=weights, chat_template=dict(
                                 message=CHAT_TEMPLATE, generation_prompt=GENERATION_PROMPT)), log)
    print(f"saved {ckpt_path} at iteration {iter_num}")


ctrl_c = StopOnCtrlC()  # Ctrl-C: finish the step, save, exit
resumed_here = init_from == 'resume'  # its eval and save are in the checkpoint already
while True:
    for group in optimizer.param_groups:
        group['lr'] = lr = get_lr(iter_num)
    last = iter_num >= max_iters
    if master and (last or iter_num % eval_interval == 0) and not resumed_here:
        evals = evaluate()
        print(f"iter {iter_num}: held-out instruct {evals['instruct']:.1%}, pass@1 "
              f"{evals['pass1']:.1%} | " + ", ".join(f"{k} {evals[f'instruct_{k}']:.0%}"
                                                    for k in kinds if f'instruct_{k}' in evals))
        log.add([iter_num] + [f"{evals[c]:.6f}" if c in evals else '' for c in columns[1:]])
        trackers.log({f'eval/{k}': v for k, v in evals.items()}, iter_num)
        if iter_num > 0:
            save()
    resumed_here = False
    if last:
        break

    t0 = time.time()
    x, y, adv, stats = sample_batch(iter_num)
    t1 = time.time()
    loss, kl, clipped = update(x, y, adv)
    if not math.isfinite(loss):
        die(f"loss is {loss} at iteration {iter_num} — stopped before the next checkpoint; "
            "lower --learning_rate")
    stats |= {'loss': loss, 'kl': kl, 'clipped': clipped, 'lr': lr}
    if master and iter_num % log_interval == 0:
        print(f"iter {iter_num} | reward {stats['reward']:.3f} | follows {stats['follows']:.0%} | "
              f"kl {kl:.4f} | answer {stats['answer_len']:.0f} tokens | kept {stats['kept']} of "
              f"{stats['drawn']} groups | clipped {clipped:.1%} | sampling {t1 - t0:.1f} s, "
              f"{ppo_epochs} updates {time.time() - t1:.1f} s", flush=True)
        log.add([iter_num] + [f"{stats[c]:.6g}" if c in stats else '' for c in columns[1:]])
        trackers.log({('lr' if k == 'lr' else f'train/{k}'): v for k, v in stats.items()}, iter_num)
    iter_num += 1
    if ctrl_c.requested(ddp, device):
        if master:
            print(f"interrupted: saving at iteration {iter_num}")
            save()
        break

if ddp:
    dist.barrier()
    dist.destroy_process_group()
