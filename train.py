"""
Train a Llama 2 model: pretraining, supervised fine-tuning (SFT), and after SFT: DPO or a
reward model (RM). Each is a loss on batches of prepared data (the table LOSSES below);
RL, which samples its own data, has its own script: train_rl.py.

One GPU or the CPU (the device is picked for you; every knob below is --key=value):
$ python train.py --dataset=tinystories --vocab_size=4096
$ python train.py --device=cpu --compile=False --batch_size=16 --dim=64 --n_layers=5 ...

DDP on 4 GPUs of one node (gloo on CPU: add --device=cpu):
$ torchrun --standalone --nproc_per_node=4 train.py
DDP on 2 nodes of 8 GPUs (run on each node, node_rank 0 and 1):
$ torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=10.0.0.1 --master_port=1234 train.py

Continue a run: --init_from=resume. Fine-tune: --task=sft --init_from=out/ckpt.pt, then
--task=dpo (or rm) --init_from=out_sft/ckpt.pt; add --lora_rank=8 to train small adapters
instead of every weight (SFT, DPO). A config file of plain assignments may be given as an
argument too (nanoGPT style). Ctrl-C saves a checkpoint and stops.
"""

import copy
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import rlhf
from checkpoint import (LORA_CHECKS, RunLog, Trackers, claim_out_dir, load_model, lora_note,
                        resumed_log, run_out_dir, save_run, start_lora)
from configurator import StopOnCtrlC, check, check_device, configure, die
from model import ModelArgs, RewardModel, Transformer, lora_weights, without_adapters
from preprocess import ChatRows, PreferencePairs, PretokWindows, dataset_name, recipe
from tokenizer import CHAT_TEMPLATE, GENERATION_PROMPT, Tokenizer

# -----------------------------------------------------------------------------
# I/O
out_dir = ''             # '' = out when pretraining, out_{task} (out_sft, ...) when fine-tuning
eval_interval = 500      # evaluate and save a checkpoint every this many iterations
log_interval = 10
eval_iters = 50          # batches per loss estimate
eval_only = False        # evaluate once and exit
always_save_checkpoint = True  # save at every eval, not only when val loss improves
init_from = 'scratch'    # 'scratch', 'resume' (out_dir/ckpt.pt), or a checkpoint path to fine-tune
task = 'pretrain'        # pretrain | sft | dpo | rm (reward model); RL: train_rl.py
wandb_log = False        # log to Weights & Biases (pip install wandb)
wandb_project = 'llama-from-scratch'
wandb_run_name = 'run'
swanlab_log = False      # log to SwanLab (pip install swanlab): what wandb gets
swanlab_project = 'llama-from-scratch'
swanlab_run_name = 'run'
swanlab_mode = 'online'  # online (swanlab login first) | offline: kept in out_dir/swanlog for
                         # swanlab sync | local: swanlab watch shows it (swanlab[dashboard])
# data: data/{dataset}/tok{vocab_size}/ (sft{N}/, dpo{N}/ for fine-tuning), see preprocess.py
data_dir = 'data'
dataset = 'tinystories'
vocab_size = 4096
batch_size = 64          # micro-batch size; with gradient accumulation, more per step
max_seq_len = 256
num_workers = 0          # DataLoader processes that cut batches
seed = 1337              # batch k of rank r is a function of (seed, r, k) only
# model (ignored when starting from a checkpoint, which brings its own)
dim = 288
n_layers = 8
n_heads = 8
n_kv_heads = 4
multiple_of = 32
dropout = 0.0
n_experts = 0            # > 0: a mixture of experts, each feed-forward this many SwiGLUs
n_experts_per_tok = 2    # ... of which each token uses this many (top-k)
aux_loss_coef = 0.01     # weight of the experts' load-balancing loss in the training loss
# AdamW and the learning rate schedule: linear warmup, then cosine decay to min_lr
gradient_accumulation_steps = 4
learning_rate = 5e-4
max_iters = 20000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0          # clip the gradient norm at this value; 0 disables
decay_lr = True
warmup_iters = 1000
lr_decay_iters = 0       # where the cosine reaches min_lr; 0 means max_iters
min_lr = 5e-5
# DPO and the reward model
beta = 0.1               # DPO: how far the policy may move from the reference model
rpo_alpha = 1.0          # DPO: weight of the chosen answers' SFT loss (RPO); 0 = plain DPO
rm_likelihood = True     # reward model: add the answer's log-likelihood to the head's score
                         # (False: the head alone, the textbook reward model; see model.py)
# LoRA (sft, dpo): train a low-rank update of some weights, the base frozen (model.py)
lora_rank = 0            # r of each adapter; 0 = full fine-tuning, every weight trains
lora_alpha = 16.0        # the update is scaled by lora_alpha / lora_rank
lora_dropout = 0.0       # dropout on the adapters' input
lora_targets = 'wq,wk,wv,wo'  # the layers that get adapters, of wq,wk,wv,wo,w1,w2,w3
# system
device = 'cuda' if torch.cuda.is_available() else (
    'mps' if torch.backends.mps.is_available() else 'cpu')
dtype = 'auto'           # auto (bfloat16 on CUDA if supported, else float16; float32 elsewhere) | float32 | bfloat16 | float16
compile = torch.cuda.is_available()  # torch.compile the model
peak_flops = 0.0         # for MFU; 0 = look up the GPU (bf16 dense), unknown -> MFU not shown
# -----------------------------------------------------------------------------
SHAPE = ('dim', 'n_layers', 'n_heads', 'n_kv_heads', 'multiple_of', 'n_experts',
         'n_experts_per_tok')  # the model knobs a checkpoint overrides
shape_defaults = {k: globals()[k] for k in SHAPE}
config, _ = configure(globals())

at_least_1, at_least_0 = (lambda v: v >= 1, "at least 1"), (lambda v: v >= 0, "0 or more")
fraction = (lambda v: 0 <= v < 1, "at least 0 and below 1")
rate = (lambda v: math.isfinite(v) and v >= 0, "a number, 0 or more")
check(globals(), {
    'task': (lambda v: v in ('pretrain', 'sft', 'dpo', 'rm'),
             "pretrain, sft, dpo or rm (RL has its own script: train_rl.py)"),
    'batch_size': at_least_1, 'max_seq_len': at_least_1, 'gradient_accumulation_steps': at_least_1,
    'eval_interval': at_least_1, 'eval_iters': at_least_1, 'log_interval': at_least_1,
    'max_iters': at_least_0, 'warmup_iters': at_least_0, 'lr_decay_iters': at_least_0,
    'num_workers': at_least_0, 'seed': at_least_0,
    'dim': at_least_1, 'n_layers': at_least_1, 'n_heads': at_least_1,
    'n_kv_heads': (lambda v: v >= 0, "0 (= n_heads) or more"), 'multiple_of': at_least_1,
    'n_experts': (lambda v: 0 <= v <= 256, "0 (dense) to 256"), 'n_experts_per_tok': at_least_1,
    'aux_loss_coef': rate,
    'vocab_size': (lambda v: 1 <= v <= 1 << 16, "between 1 and 65536 (shards hold uint16 ids)"),
    'dropout': fraction, 'beta1': fraction, 'beta2': fraction,
    'learning_rate': rate, 'min_lr': rate, 'weight_decay': rate, 'grad_clip': rate,
    'beta': (lambda v: math.isfinite(v) and v >= 0, "0 or more"), 'peak_flops': rate,
    'rpo_alpha': rate, **LORA_CHECKS,
    'dtype': (lambda v: v in ('auto', 'float32', 'bfloat16', 'float16'),
              "auto, float32, bfloat16 or float16"),
    'swanlab_mode': (lambda v: v in ('online', 'offline', 'local'), "online, offline or local"),
})
check_device(device)
if dtype == 'float16' and not device.startswith('cuda'):
    die(f"--dtype=float16 needs a CUDA GPU (its loss scaling is CUDA's) — on {device} use "
        "float32 or bfloat16")
if task != 'pretrain' and init_from == 'scratch':
    die(f"--task={task} fine-tunes a model: give --init_from=path/to/ckpt.pt (or resume)")
if task == 'dpo' and beta == 0:
    die("--beta=0 makes DPO's loss a constant: give it a value above 0 (0.1 is usual)")
if lora_rank and task not in ('sft', 'dpo'):
    die(f"--lora_rank fine-tunes adapters on a trained model: for --task=sft or dpo (RL: "
        f"train_rl.py), not {task}" + (" (a reward model's new head must train whole)"
                                       if task == 'rm' else ""))
lr_decay_iters = lr_decay_iters or max_iters
# where this run writes: never the folder of the checkpoint it starts from, unless it resumes
out_dir = config['out_dir'] = run_out_dir(out_dir, task, init_from, default='out' if (
    task == 'pretrain' and init_from in ('scratch', 'resume')) else 'out_' + task)
if dtype == 'auto':
    dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') \
        if device.startswith('cuda') else 'float32'

# DDP: torchrun sets RANK; NCCL between GPUs, gloo between CPU processes
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    rank, local_rank, world_size = dist.get_rank(), int(os.environ['LOCAL_RANK']), dist.get_world_size()
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world_size:
        die(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple "
            f"of the number of processes ({world_size})")
    gradient_accumulation_steps //= world_size  # the same tokens per step, shared out
else:
    rank, world_size = 0, 1
master = rank == 0  # only rank 0 writes files and logs


tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * max_seq_len
torch.manual_seed(seed + rank)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
device_type = 'cuda' if device.startswith('cuda') else device.split(':')[0]
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
ckpt_path = os.path.join(out_dir, 'ckpt.pt')

# -----------------------------------------------------------------------------
# data

# rm trains on dpo's preference pairs
kind = {'pretrain': 'tok', 'sft': 'sft', 'dpo': 'dpo', 'rm': 'dpo'}[task]
data_folder = os.path.join(data_dir, dataset_name(dataset), f'{kind}{vocab_size}')
tok_path = os.path.join(data_folder, 'tokenizer.model')
if not os.path.exists(tok_path):
    die(f"no prepared data in {data_folder} — " + recipe(dataset, vocab_size, data_dir, kind))
tokenizer_bytes = open(tok_path, 'rb').read()


EVAL_BATCHES = 10**9     # evals draw batches k = EVAL_BATCHES + 0, 1, ...: never a step's


def make_batches(split):
    args = (batch_size, max_seq_len, seed, rank)
    if task == 'pretrain':
        return PretokWindows(data_folder, split, *args)
    cls = ChatRows if task == 'sft' else PreferencePairs
    return cls(os.path.join(data_folder, f'{split}.npz'), *args)


splits = {split: make_batches(split) for split in ('train', 'val')}
if task in ('pretrain', 'sft'):  # UTF-8 bytes per id, for val bits per byte
    token_bytes = torch.tensor(Tokenizer(tokenizer_bytes).token_bytes(), device=device)


class BatchStream(torch.utils.data.IterableDataset):
    """Batches start, start + 1, ... of ds. With W DataLoader workers, worker w makes
    batches start + w, start + w + W, ...; the DataLoader takes them round robin, so they
    arrive in order."""
    def __init__(self, ds, start):
        super().__init__()
        self.ds, self.start = ds, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        k = self.start + worker
        while True:
            yield self.ds.batch(self.ds.rng(k))
            k += workers


def to_device(x, y):
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if device_type == 'cuda':
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# model, optimizer, and where we start from

iter_num, best_val_loss, ckpt, ref_model, resume_log, lora = 0, 1e9, None, None, None, None
if init_from == 'scratch':
    model_args = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      vocab_size=vocab_size, multiple_of=multiple_of, max_seq_len=max_seq_len,
                      dropout=dropout, n_experts=n_experts, n_experts_per_tok=n_experts_per_tok)
    try:
        model = Transformer(ModelArgs(**model_args))
    except AssertionError as e:
        die(f"model shape: {e}")
else:
    path = ckpt_path if init_from == 'resume' else init_from
    model, ckpt = load_model(path)
    if isinstance(model, RewardModel) and task != 'rm':
        die(f"{path} is a reward model: it scores answers, it does not write them — "
            f"--task={task} needs a language model (the sft checkpoint)")
    # LoRA: adapters on the model this run starts from (a resumed run's own), the rest frozen
    lora = start_lora(model, path, ckpt, init_from == 'resume', out_dir, dict(
        rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets))
    if task == 'rm' and not isinstance(model, RewardModel):  # put the scalar head on
        lm, model = model, RewardModel(model.params, rm_likelihood)
        model.load_state_dict(lm.state_dict(), strict=False)
    if task == 'rm' and model.likelihood != rm_likelihood:
        die(f"{path} is a reward model with rm_likelihood={model.likelihood}: "
            f"{'resume' if init_from == 'resume' else 'fine-tune'} it with "
            f"--rm_likelihood={model.likelihood}")
    model_args = dict(ckpt['model_args'], dropout=dropout)
    model.params.dropout = dropout
    if ckpt.get('tokenizer') != tokenizer_bytes:
        die(f"{path} was trained with another tokenizer than the data in {data_folder} — "
            "preprocess with the checkpoint's tokenizer, or use a matching --vocab_size/--dataset")
    if model_args['max_seq_len'] < max_seq_len:
        die(f"--max_seq_len={max_seq_len} exceeds the checkpoint's {model_args['max_seq_len']}")
    if init_from == 'resume':
        if type(ckpt.get('iter_num')) is not int or not isinstance(ckpt.get('optimizer'), dict):
            die(f"{path} holds no optimizer state or iteration — it cannot be resumed; "
                f"fine-tune from it instead: --init_from={path}")
        if ckpt.get('task', 'pretrain') != task:
            die(f"{path} is a {ckpt.get('task', 'pretrain')} run; resume it with "
                f"--task={ckpt.get('task', 'pretrain')}")
        iter_num, best_val_loss = ckpt['iter_num'], float(ckpt.get('best_val_loss', 1e9))
        resume_log = resumed_log(ckpt)  # the rows of log.csv up to the checkpoint
    if task == 'dpo':  # the reference is the model DPO started from, frozen
        if lora:  # the base under the adapters, sharing its weights: no copy, nothing saved
            ref_model = without_adapters(model)
        else:
            ref_model = copy.deepcopy(model)
            if init_from == 'resume':
                if not isinstance(ckpt.get('ref_model'), dict):
                    die(f"{path} holds no reference model — resume it with its own --task")
                ref_model.load_state_dict(ckpt['ref_model'])
        ref_model.to(device).eval().requires_grad_(False)
model.to(device)
if model_args['vocab_size'] != vocab_size:
    die(f"the model has {model_args['vocab_size']} tokens but --vocab_size={vocab_size}")
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if init_from == 'resume':
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
        if 'scaler' in ckpt:
            scaler.load_state_dict(ckpt['scaler'])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        die(f"{ckpt_path}: its optimizer state does not fit the model ({str(e)[:80]}) — "
            f"fine-tune from it instead: --init_from={ckpt_path}")
ckpt = None  # free the memory

raw_model = model  # the plain module: its state_dict has clean names
moe = raw_model.params.n_experts > 0  # a mixture of experts
if compile:
    if master:
        print("compiling the model...")
    model = torch.compile(model)
eval_model = model  # evaluation runs on rank 0 only, so never through DDP's collectives
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None)


# -----------------------------------------------------------------------------
# losses and evaluation

def dpo_loss(m, x, y):
    """Rows 0..B-1 are the chosen answers, B..2B-1 the rejected ones (see rlhf.dpo_loss).
    Returns (loss, reward margins, log-prob margins)."""
    B = x.size(0) // 2
    pi = rlhf.token_logps(m, x, y).sum(-1)
    with torch.no_grad():
        ref = rlhf.token_logps(ref_model, x, y).sum(-1)
    loss, margin = rlhf.dpo_loss(pi, ref, beta, rpo_alpha, (y[:B] != -1).sum(-1).clamp(min=1))
    return loss, margin, pi[:B] - pi[B:]


def rm_loss(m, x, y):
    """The reward of each answer, read at its closing <|im_end|>; Bradley-Terry loss."""
    return rlhf.reward_model_loss(m(x, y))


def lm_loss(m, x, y):
    """Pretraining and SFT: the next-token loss on the targets that are not -1"""
    return m(x, y)[1]


LOSSES = {'pretrain': lm_loss, 'sft': lm_loss, 'dpo': lambda m, x, y: dpo_loss(m, x, y)[0],
          'rm': lambda m, x, y: rm_loss(m, x, y)[0]}
compute_loss = LOSSES[task]


@torch.no_grad()
def evaluate():
    """Losses on fixed batches (the same every time, so evals compare), and for pretraining
    and SFT the val bits per byte (val nats / the UTF-8 bytes of the targets / ln 2), which
    compares models across tokenizers. For DPO and the reward model, over every held-out
    pair: preference accuracy (the chosen answer gets the higher log-probability, or reward)
    and the mean margin."""
    eval_model.eval()
    out = {}
    if task in ('dpo', 'rm'):
        stats = [[] for _ in range(4)]
        for x, y in splits['val'].in_order():
            with autocast:
                if task == 'dpo':
                    loss, margin, logp_margin = dpo_loss(eval_model, *to_device(x, y))
                else:  # the reward model's margin is its preference
                    (loss, margin), logp_margin = rm_loss(eval_model, *to_device(x, y)), None
            prefers = logp_margin if task == 'dpo' else margin
            for s, v in zip(stats, (loss.expand(len(margin)), margin, prefers, prefers > 0)):
                s.append(v.float().cpu())
        loss, margin, logp_margin, acc = (torch.cat(s).mean().item() for s in stats)
        out = (dict(val=loss, reward_margin=margin, logp_margin=logp_margin, pref_acc=acc)
               if task == 'dpo' else dict(val=loss, rm_acc=acc, rm_margin=margin))
    else:
        nats = nbytes = load = 0
        for split in ('train', 'val'):
            ds, losses = splits[split], []
            for k in range(eval_iters):
                x, y = to_device(*ds.batch(ds.rng(EVAL_BATCHES + k)))
                with autocast:
                    losses.append(compute_loss(eval_model, x, y).item())
                if split == 'val':  # the loss is a mean over the counted targets
                    counted = y[y != -1]
                    nats += losses[-1] * counted.numel()
                    nbytes += token_bytes[counted].sum().item()
                    if moe:
                        load = load + raw_model.expert_load() / eval_iters
            out[split] = sum(losses) / len(losses)
        out['val_bpb'] = nats / max(nbytes, 1) / math.log(2)  # bits per UTF-8 byte of text
        if moe:  # which share of the token choices each expert took, per layer
            out['max_load'] = load.max().item()  # the busiest expert's (1/n_experts: even)
            print("expert load on val:", "; ".join(
                f"layer {i} " + " ".join(f"{v:.2f}" for v in row) for i, row in enumerate(load)))
    eval_model.train()
    return out


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def save_checkpoint():
    """Write to a temporary file, then rename over ckpt.pt: a crash at any moment leaves
    either the old checkpoint or the new one, never half of one."""
    weights = lora_weights(raw_model) if lora else raw_model.state_dict()  # LoRA: adapters only
    ckpt = dict(model=weights, optimizer=optimizer.state_dict(),
                model_args=model_args, iter_num=iter_num, best_val_loss=best_val_loss,
                config=config, tokenizer=tokenizer_bytes, task=task,
                chat_template=dict(message=CHAT_TEMPLATE, generation_prompt=GENERATION_PROMPT))
    if scaler.is_enabled():
        ckpt['scaler'] = scaler.state_dict()
    if lora:  # what finds and checks the base: see checkpoint.py
        ckpt['lora'] = lora
    elif ref_model is not None:  # (with LoRA the reference is the base, found as above)
        ckpt['ref_model'] = ref_model.state_dict()
    if task == 'rm':
        ckpt['rm_likelihood'] = raw_model.likelihood
    save_run(ckpt_path, ckpt, log)  # with the log's rows, from which log.csv is written
    global saved_at
    saved_at = iter_num
    print(f"saved {ckpt_path} at iteration {iter_num}")


saved_at = None  # the iteration this run last saved


def kept():
    """What a run that diverged leaves behind, for its last words."""
    if saved_at is not None:
        return f"{ckpt_path} holds iteration {saved_at}, from before"
    if init_from != 'scratch':
        return f"{ckpt_path if init_from == 'resume' else init_from} is unchanged"
    return "no checkpoint was written"


def peak():
    if peak_flops:
        return peak_flops
    if device_type == 'cuda':  # dense bf16/fp16 tensor-core peaks
        name = torch.cuda.get_device_name()
        for key, flops in (('H200', 989e12), ('H100', 989e12), ('A100', 312e12),
                           ('L40', 181e12), ('4090', 165e12), ('A10', 125e12), ('L4', 121e12)):
            if key in name:
                return flops
    return 0.0


# -----------------------------------------------------------------------------
# the training loop

out_dir_lock = claim_out_dir(out_dir) if master else None
log_path = os.path.join(out_dir, 'log.csv')
# columns beside the losses: what evals measure, and (RL) what the steps saw
eval_extra = {'dpo': ['pref_acc', 'logp_margin', 'reward_margin'],
              'rm': ['rm_acc', 'rm_margin']}.get(task, ['val_bpb'])
step_extra = []
if moe:  # a mixture of experts: its load-balancing loss, and at evals its busiest expert
    eval_extra = eval_extra + ['max_load'] * (task in ('pretrain', 'sft'))
    step_extra = step_extra + ['aux_loss']
log_extra = eval_extra + step_extra
log = RunLog(log_path, ['iter', 'train_loss', 'val_loss', 'lr', 'tokens_per_sec'] + log_extra,
             resume=(resume_log, iter_num) if init_from == 'resume' else None) if master else None


if master:
    print(f"{task} on {data_folder}: {tokens_per_iter:,} tokens per iteration = "
          f"{gradient_accumulation_steps} accumulation steps x {world_size} processes x "
          f"{batch_size} x {max_seq_len}; "
          f"{sum(p.numel() for p in raw_model.parameters()):,} parameters"
          + (f" ({raw_model.active_params():,} active per token)" if moe else "")
          + lora_note(raw_model, lora)
          + f"; {device} {dtype}"
          + (f"; MFU of {peak() / 1e12:.0f} TFLOP/s" if peak() else ""))
    ignored = [f"--{k}={config[k]}" for k in SHAPE if init_from != 'scratch'
               and config[k] != shape_defaults[k] and model_args.get(k) != config[k]]
    if ignored:
        print(f"note: {' '.join(ignored)} ignored: {path} brings its own shape ("
              + ", ".join(f"{k}={model_args.get(k)}" for k in SHAPE) + ")", file=sys.stderr)
    trackers = Trackers(config, out_dir)  # wandb, swanlab: what log.csv gets, if asked for


def track(metrics):
    if master:
        trackers.log(metrics, iter_num)


ctrl_c = StopOnCtrlC()  # Ctrl-C: finish the step, save, exit
batches = iter(torch.utils.data.DataLoader(
    BatchStream(splits['train'], start=iter_num * gradient_accumulation_steps),
    batch_size=None, num_workers=num_workers))
X, Y = to_device(*next(batches))
t0, local_iter, running_mfu = time.time(), 0, -1.0
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for group in optimizer.param_groups:
        group['lr'] = lr
    last = iter_num >= max_iters
    resumed_here = init_from == 'resume' and local_iter == 0  # just loaded, just saved
    if master and (last or iter_num % eval_interval == 0) and not resumed_here:
        losses = evaluate()
        print(f"iter {iter_num}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        train_loss = f"{losses['train']:.6f}" if 'train' in losses else ''
        log.add([iter_num, train_loss, f"{losses['val']:.6f}", f"{lr:.3e}", '']
                + [f"{losses[k]:.6f}" if k in losses else '' for k in log_extra])
        track({f'eval/{k}': v for k, v in losses.items()})
        if not all(math.isfinite(v) for v in losses.values()):
            die(f"evaluation loss is not finite at iteration {iter_num} — stopped; "
                f"{kept()}; lower --learning_rate")
        if iter_num > 0 and (losses['val'] < best_val_loss or always_save_checkpoint):
            best_val_loss = min(best_val_loss, losses['val'])
            save_checkpoint()
    if last or eval_only:
        break

    # forward, backward, update; gradients are summed over the micro-steps
    loss_sum, aux_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    for micro_step in range(gradient_accumulation_steps):
        if ddp:  # synchronise gradients across processes only on the last micro-step
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        with autocast:
            loss = compute_loss(model, X, Y) / gradient_accumulation_steps
            if moe:  # the experts' load balancing (the loss reported stays the task's)
                aux = raw_model.aux_loss() / gradient_accumulation_steps
                aux_sum = aux_sum + aux.detach()
        X, Y = to_device(*next(batches))  # the next batch loads while the GPU works
        scaler.scale(loss + aux_loss_coef * aux if moe else loss).backward()
        loss_sum += loss.detach()
    lossf = loss_sum.item()
    if not math.isfinite(lossf):
        die(f"loss is {lossf} at iteration {iter_num} — stopped before the next checkpoint; "
            f"{kept()}; lower --learning_rate")
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    t1 = time.time()
    dt, t0 = t1 - t0, t1
    if master and (iter_num % log_interval == 0 or iter_num == max_iters - 1):  # and the last step
        tok_s = tokens_per_iter / dt
        mfu_txt = ''
        if peak() and local_iter >= 5:  # let the first steps (compilation) pass
            mfu = raw_model.estimate_mfu(batch_size * gradient_accumulation_steps * world_size, dt, peak())
            running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
            mfu_txt = f" | mfu {running_mfu * 100:.1f}%"
        aux_txt = f" | aux {aux_sum.item():.3f}" if moe else ""
        print(f"iter {iter_num} | loss {lossf:.4f}{aux_txt} | lr {lr:.2e} | "
              f"{dt * 1000:.1f} ms | {tok_s:,.0f} tok/s{mfu_txt}", flush=True)
        step = {'aux_loss': aux_sum.item()} if moe else {}
        log.add([iter_num, f"{lossf:.6f}", '', f"{lr:.3e}", f"{tok_s:.0f}"]
                + [f"{step[k]:.6f}" if k in step else '' for k in log_extra])
        track({'train/loss': lossf, 'lr': lr, 'tok_s': tok_s,
               **{f'train/{k}': v for k, v in step.items()}})
    iter_num += 1
    local_iter += 1

    if ctrl_c.requested(ddp, device):
        if master:
            print(f"interrupted: saving at iteration {iter_num}")
            save_checkpoint()
        break

if ddp:  # leave together: the other ranks stop at the last iteration while rank 0 still
    dist.barrier()  # evaluates and saves, and one that tears down its process group then can abort
    dist.destroy_process_group()
