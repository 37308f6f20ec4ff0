"""
Sample from a trained model, or chat with a fine-tuned one.

$ python sample.py --checkpoint=out/ckpt.pt --start="Once upon a time" --num_samples=3
$ python sample.py --start=FILE:prompt.txt --temperature=0          # greedy
$ python sample.py --checkpoint=out_sft/ckpt.pt --chat [--system="..."] [--start="first message"]
$ python sample.py --checkpoint=out_sft/ckpt.pt --eval_instruct=500 --best_of=8  # held-out
$ python sample.py --checkpoint=out/ckpt.pt --eval=data/val.txt     # loss, perplexity, bits/byte
$ python sample.py --reward=out_rm/ckpt.pt --start="a request" --answers=FILE:answers.txt
$ python sample.py --reward=out_rm/ckpt.pt --checkpoint=out_sft/ckpt.pt --start="..." --num_samples=4

Generation uses the KV cache and stops at BOS or EOS, as run.c does; the output is only
the samples (prompt + continuation), separated by a line of dashes, so other tools can
compare it. Chat prints "Assistant: " before each reply and reads the next user message
after "User: "; end of input ends the chat. With --reward, a reward model (train.py
--task=rm) scores answers to the request --start: the lines of --answers, or else
num_samples replies of --checkpoint; they are printed best first, each after its score.
With --eval, the model reads a .txt or .jsonl file (documents split as preprocess.py splits
them) in windows of max_seq_len, and prints its loss per token, the perplexity and the bits per
byte: nats over every token / the text's UTF-8 bytes / ln 2, which compares across tokenizers.
"""

import json
import math
import os
import sys
import time

import numpy as np
import torch

from checkpoint import load_model, same_file, write_atomic
from configurator import check, check_device, configure, die, on_interrupt
from model import FastDecoder, KVCache, RewardModel, Seen, penalize_repeats, sample_next
from preprocess import rows_of
from tokenizer import checkpoint_tokenizer

# -----------------------------------------------------------------------------
checkpoint = 'out/ckpt.pt'
start = ''               # the prompt, or FILE:path to read it from a file
num_samples = 1
max_new_tokens = 256     # per sample; in chat, per reply
temperature = 1.0        # 0 = greedy
top_k = 0                # 0 = off
top_p = 0.9              # 0 or 1 = off
repetition_penalty = 1.0 # > 1 makes tokens already in the context less likely; 1 = off (run.c -r)
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
chat = False             # multi-turn chat with the chat template
system = ''              # chat: a system prompt
eval_instruct = 0        # > 0: answer this many held-out synth requests greedily: the share
                         # that follow, by class, with the standard error
best_of = 0              # with --eval_instruct: also the best of this many answers at
                         # temperature 1 (the ceiling RL's sharpening can reach)
eval_out = ''            # with --eval_instruct: also write each request's result to this
                         # .json file (report.py reads them)
reward = ''              # a reward model's checkpoint: score answers to --start (see above)
answers = ''             # with --reward: the answers to score, one per line, or FILE:path
eval = ''                # a .txt or .jsonl file: report loss, perplexity and bits per byte on it
batch_size = 8           # --eval: windows per forward pass
# -----------------------------------------------------------------------------
configure(globals())
check(globals(), {
    'num_samples': (lambda v: v >= 1, "at least 1"),
    'max_new_tokens': (lambda v: v >= 1, "at least 1"),
    'temperature': (lambda v: v == v and 0 <= v < float('inf'), "0 (greedy) or more"),
    'top_k': (lambda v: v >= 0, "0 (off) or more"),
    'top_p': (lambda v: 0 <= v <= 1, "between 0 and 1 (0 or 1: off)"),
    'repetition_penalty': (lambda v: 1e-3 <= v <= 1e3, "in [0.001, 1000] (1: off, 1.1-1.3 usual)"),
    'seed': (lambda v: v >= 0, "0 or more"),
    'eval_instruct': (lambda v: v >= 0, "0 (off) or more"),
    'best_of': (lambda v: v >= 0, "0 (off) or more"),
    'batch_size': (lambda v: v >= 1, "at least 1"),
})
check_device(device)
torch.manual_seed(seed)


def read_text(flag, value):
    """value, or the text of the file value names as FILE:path"""
    if not value.startswith('FILE:'):
        return value
    try:
        with open(value[5:], encoding='utf-8') as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        die(f"--{flag}=FILE:{value[5:]}: cannot read it as UTF-8 text "
            f"({getattr(e, 'strerror', None) or e.reason})")


def utf8(flag, text):
    """text that came from the command line or the terminal, refused if it is not UTF-8
    (Python holds the bad bytes as surrogates, which no tokenizer takes)"""
    try:
        text.encode('utf-8')
    except UnicodeEncodeError as e:
        die(f"{flag} is not UTF-8 text (byte {e.start}) — type or convert it as UTF-8")
    return text


modes = [f for f, on in (('--chat', chat), ('--eval', eval), ('--eval_instruct', eval_instruct),
                         ('--reward', reward)) if on]
if len(modes) > 1:
    die(f"{' and '.join(modes)} are different modes — give one of them")
if answers and not reward:
    die("--answers are scored by a reward model — give it with --reward=out_rm/ckpt.pt")
if system and not chat:
    die("--system is the system prompt of a chat — give it with --chat")
if start and (eval or eval_instruct):
    die(f"{modes[0]} reads its own text, not --start — give one or the other")
if (best_of or eval_out) and not eval_instruct:
    die(f"--{'best_of' if best_of else 'eval_out'} goes with --eval_instruct=N — give both")
if eval_out and (not eval_out.endswith('.json') or same_file(eval_out, checkpoint)):
    die(f"--eval_out={eval_out}: give a new .json file's name (it is written, not read)")
on_interrupt("stopped")
answers_flag = answers
start = utf8('--start', read_text('start', start))
answers = utf8('--answers', read_text('answers', answers))
if reward:
    reward_model, reward_ckpt = load_model(reward, device)
    if not isinstance(reward_model, RewardModel):
        die(f"--reward={reward} is a language model, not a reward model (train.py --task=rm)")
    reward_model.eval()
    reward_tok = checkpoint_tokenizer(reward, reward_ckpt)
    if not start:
        die("--reward scores answers to a request: give it as --start=\"...\"")


def show_scores(texts):
    """Each answer to the request start, scored by the reward model, best first."""
    scores = []
    for k, a in enumerate(texts):
        ids, mask = reward_tok.encode_chat([{'role': 'user', 'content': start},
                                            {'role': 'assistant', 'content': a}])
        n = reward_model.params.max_seq_len  # a long request loses its start
        if len(ids) > n + 1:
            print(f"note: answer {k + 1} with its request is {len(ids)} tokens; the reward model "
                  f"reads only the last {n + 1}", file=sys.stderr)
        ids, mask = np.array(ids[-n - 1:]), np.array(mask[-n - 1:])
        x, y = rows_of([(ids, mask)], len(ids) - 1)  # the answer as targets, as in training
        with torch.inference_mode():
            scores.append(reward_model(torch.as_tensor(x, device=device),
                                       torch.as_tensor(y, device=device)).item())
    for s, a in sorted(zip(scores, texts), key=lambda p: -p[0]):
        print(f"{s:+.3f}  {a}")


if reward and answers_flag:
    if not answers.strip():
        die(f"--answers={answers_flag} holds no answers — give them one per line")
    show_scores([a for a in answers.splitlines() if a.strip()])
    sys.exit(0)

model, ckpt = load_model(checkpoint, device)
if isinstance(model, RewardModel):
    die(f"{checkpoint} is a reward model: it scores answers (--reward={checkpoint}), it does "
        "not write them — sample from a language model")
model.eval()
tok = checkpoint_tokenizer(checkpoint, ckpt)
max_seq_len = model.params.max_seq_len
if (chat or eval_instruct) and ckpt.get('task', 'pretrain') == 'pretrain':
    print(f"note: {checkpoint} was pretrained only, never fine-tuned to chat, so it answers "
          "with stories — fine-tune it first: python train.py --task=sft ...", file=sys.stderr)
stop_ids = (tok.bos_id, tok.eos_id)


def generate(ids):
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    if idx.size(1) > max_seq_len:
        die(f"the prompt is {idx.size(1)} tokens, longer than the model's context of "
            f"{max_seq_len} — shorten it")
    out = model.generate(idx, max_new_tokens, temperature, top_k, top_p, stop_ids,
                         repetition_penalty=repetition_penalty, exempt=tok.special_ids())
    out = out[0].tolist()
    new = out[len(ids):]
    return ids + new[:next((i for i, t in enumerate(new) if t in stop_ids), len(new))]


class ContextFull(Exception):
    pass


class Chat:
    """A conversation kept in its own KV cache: each turn only feeds its new tokens."""
    def __init__(self):
        self.cache, self.pending = KVCache(model, 1, max_seq_len), [tok.bos_id]
        self.step = FastDecoder(model, self.cache)
        self.seen = Seen(1, model.params.vocab_size, tok.special_ids())  # the whole conversation
        if system:
            self.pending += tok.encode_message('system', system)[0]

    def feed(self, ids):
        x = torch.tensor([ids], dtype=torch.long, device=device)
        self.seen.add(x)
        with torch.inference_mode():
            logits = self.step(x)
        return logits[:, -1, :]

    def reply(self, user):
        """Greedy or sampled reply to one user message; stops at <|im_end|>."""
        head = self.pending + tok.encode_message('user', user)[0] + tok.generation_prompt()
        if self.cache.pos + len(head) >= max_seq_len:  # as run.c: leave room for a reply
            raise ContextFull
        logits, out = self.feed(head), []
        room = max_seq_len - self.cache.pos  # as run.c: a reply ends where the context does
        self.stopped = False  # by the model, not by a limit
        while len(out) < min(max_new_tokens, room):
            logits = penalize_repeats(logits, self.seen.mask, repetition_penalty)
            nxt = int(sample_next(logits, temperature, top_k, top_p)[0])
            if nxt in (tok.im_end_id,) + stop_ids:
                self.stopped = True
                break
            out.append(nxt)
            logits = self.feed([nxt])
        # close the turn as the template does; it enters the cache with the next message
        self.pending = [tok.im_end_id] + tok.encode("\n")
        return tok.decode_continuation(head, out)


def read_user():
    print("User: ", end='', flush=True)
    try:
        line = sys.stdin.readline()
    except UnicodeDecodeError as e:
        die(f"the message typed is not UTF-8 text (byte {e.start}) — type it as UTF-8")
    return utf8('the message typed', line.rstrip('\n')) if line else None




class Progress:
    """A line on stderr every few seconds while a long evaluation runs: done, left, time left"""
    def __init__(self, total, what):
        self.total, self.what = total, what
        self.t0 = self.last = time.time()

    def show(self, done, extra=''):
        now = time.time()
        if now - self.last >= 5 and done:
            left = (now - self.t0) / done * (self.total - done)
            print(f"{done}/{self.total} {self.what}, about {left:.0f} s left"
                  + (f"; {extra}" if extra else ""), file=sys.stderr, flush=True)
            self.last = now


def eval_text(path):
    """Loss, perplexity and bits per byte of the model on the documents of a text file, read
    as training reads them: BOS + document, one after another, cut into windows of
    max_seq_len + 1 tokens that overlap by one (every token but the first is predicted once)."""
    from preprocess import read_jsonl, read_txt
    if not os.path.isfile(path):
        what = 'is a folder' if os.path.isdir(path) else 'no such file'
        die(f"--eval={path}: {what} — give a .txt or .jsonl file of text")
    docs = [d for _, d in read_jsonl(path)] if path.endswith('.jsonl') else read_txt(path)
    if not docs:
        die(f"--eval={path}: no text in it")
    ids = [i for d in docs for i in tok.encode(d, bos=True)]
    T, nbytes = max_seq_len, sum(len(d.encode('utf-8')) for d in docs)
    starts = list(range(0, len(ids) - 1, T))
    nats, progress = 0.0, Progress(len(starts), 'windows')
    with torch.inference_mode():
        for b in range(0, len(starts), batch_size):
            progress.show(b)
            rows = [ids[s:s + T + 1] for s in starts[b:b + batch_size]]
            width = max(len(r) for r in rows)  # the last window is shorter: pad, not counted
            x = torch.tensor([r[:-1] + [0] * (width - len(r)) for r in rows], device=device)
            y = torch.tensor([r[1:] + [-1] * (width - len(r)) for r in rows], device=device)
            _, loss = model(x, y)
            nats += loss.item() * (y != -1).sum().item()
    n = len(ids) - 1
    print(f"{path}: {len(docs):,} documents, {nbytes:,} bytes, {n:,} tokens "
          f"({nbytes / n:.2f} bytes per token): loss {nats / n:.4f} nats per token, "
          f"perplexity {math.exp(nats / n):.2f}, {nats / nbytes / math.log(2):.4f} bits per byte "
          f"({checkpoint})")


if eval:
    eval_text(eval)
elif eval_instruct:
    import rlhf
    import synth
    items = synth.instructions(eval_instruct, heldout=True)
    progress = Progress(len(items), 'requests')
    results = rlhf.heldout_eval(model, tok, items, max_new_tokens, best_of, seed, progress=lambda i, r:
                                progress.show(i, f"{sum(x[1] for x in r) / max(i, 1):.1%} followed"))

    def line(col, what):
        hits, n = sum(r[col] for r in results), len(results)
        p, se = rlhf.rate(hits, n)
        by_kind = " | ".join(f"{k} {sum(r[col] for r in results if r[0] == k)}/{m} "
                             f"{rlhf.rate(sum(r[col] for r in results if r[0] == k), m)[0]:.0%}"
                             for k in synth.KINDS if (m := sum(r[0] == k for r in results)))
        return f"{what}: {hits}/{n} = {p:.1%} ± {se:.1%}\n  {by_kind}"
    print(line(1, f"instruction following (greedy, {checkpoint})"))
    print(line(2, "every constraint, the wish too (pass@1)"))
    if best_of:
        print(line(3, f"best of {best_of} at temperature 1"))
    if eval_out:
        fields = ('kind', 'follows', 'passes', f'best_of_{best_of}')
        rows = [dict(zip(fields, r[:3 + bool(best_of)])) for r in results]
        write_atomic(eval_out, lambda f: json.dump(dict(checkpoint=checkpoint, best_of=best_of,
                                                         results=rows), f), mode='w')
    too_long = sum(len(tok.encode_chat(m[:1], True)[0]) >= max_seq_len for m, _ in items)
    if too_long:
        print(f"note: {too_long} of the requests did not fit the model's context of {max_seq_len} "
              "tokens (counted as not followed)", file=sys.stderr)
elif reward:
    if ckpt.get('tokenizer') != reward_ckpt.get('tokenizer'):
        die(f"{checkpoint} and --reward={reward} have different tokenizers")
    show_scores([Chat().reply(start) for _ in range(num_samples)])
elif chat:
    conv, user = Chat(), start or read_user()
    while user is not None:
        try:
            print(f"Assistant: {conv.reply(user)}", flush=True)
        except ContextFull:  # as run.c: a stop the user must act on
            die(f"the conversation fills the model's context of {max_seq_len} tokens — "
                "start a new chat")
        user = read_user()
    print()
else:
    for k in range(num_samples):
        if k:
            print('-' * 40)
        print(tok.decode(generate(tok.encode(start, bos=True))), flush=True)
