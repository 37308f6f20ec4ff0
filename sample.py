"""
Sample from a trained model, or chat with a fine-tuned one.

$ python sample.py --checkpoint=out/ckpt.pt --start="Once upon a time" --num_samples=3
$ python sample.py --start=FILE:prompt.txt --temperature=0          # greedy
$ python sample.py --checkpoint=out_sft/ckpt.pt --chat [--system="..."] [--start="first message"]
$ python sample.py --checkpoint=out_sft/ckpt.pt --eval_instruct=100 # instruction-following rate

Generation uses the KV cache and stops at BOS or EOS, as run.c does; the output is only
the samples (prompt + continuation), separated by a line of dashes, so other tools can
compare it. Chat prints "Assistant: " before each reply and reads the next user message
after "User: "; end of input ends the chat.
"""

import sys

import torch

from checkpoint import checkpoint_tokenizer, load_model
from configurator import check, check_device, configure, die
from model import KVCache, sample_next

# -----------------------------------------------------------------------------
checkpoint = 'out/ckpt.pt'
start = ''               # the prompt, or FILE:path to read it from a file
num_samples = 1
max_new_tokens = 256     # per sample; in chat, per reply
temperature = 1.0        # 0 = greedy
top_k = 0                # 0 = off
top_p = 0.9              # 0 or 1 = off
seed = 1337
device = 'cuda' if torch.cuda.is_available() else 'cpu'
chat = False             # multi-turn chat with the chat template
system = ''              # chat: a system prompt
eval_instruct = 0        # > 0: run this many held-out synth instructions and report the rate
# -----------------------------------------------------------------------------
configure(globals())
check(globals(), {
    'num_samples': (lambda v: v >= 1, "at least 1"),
    'max_new_tokens': (lambda v: v >= 1, "at least 1"),
    'temperature': (lambda v: v == v and 0 <= v < float('inf'), "0 (greedy) or more"),
    'top_k': (lambda v: v >= 0, "0 (off) or more"),
    'top_p': (lambda v: 0 <= v <= 1, "between 0 and 1 (0 or 1: off)"),
    'seed': (lambda v: v >= 0, "0 or more"),
    'eval_instruct': (lambda v: v >= 0, "0 (off) or more"),
})
check_device(device)
torch.manual_seed(seed)
if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        die(f"--start=FILE:{start[5:]}: cannot read it as UTF-8 text "
            f"({getattr(e, 'strerror', None) or e.reason})")

model, ckpt = load_model(checkpoint, device)
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
    out = model.generate(idx, max_new_tokens, temperature, top_k, top_p, stop_ids)[0].tolist()
    new = out[len(ids):]
    return ids + new[:next((i for i, t in enumerate(new) if t in stop_ids), len(new))]


class ContextFull(Exception):
    pass


class Chat:
    """A conversation kept in its own KV cache: each turn only feeds its new tokens."""
    def __init__(self):
        self.cache, self.pending = KVCache(model, 1, max_seq_len), [tok.bos_id]
        if system:
            self.pending += tok.encode_message('system', system)[0]

    def feed(self, ids):
        x = torch.tensor([ids], dtype=torch.long, device=device)
        with torch.inference_mode():
            logits, _ = model(x, cache=self.cache)
        return logits[:, -1, :]

    def reply(self, user):
        """Greedy or sampled reply to one user message; stops at <|im_end|>."""
        head = self.pending + tok.encode_message('user', user)[0] + tok.generation_prompt()
        if self.cache.pos + len(head) >= max_seq_len:  # as run.c: leave room for a reply
            raise ContextFull
        logits, out = self.feed(head), []
        room = max_seq_len - self.cache.pos  # as run.c: a reply ends where the context does
        while len(out) < min(max_new_tokens, room):
            nxt = int(sample_next(logits, temperature, top_k, top_p)[0])
            if nxt in (tok.im_end_id,) + stop_ids:
                break
            out.append(nxt)
            logits = self.feed([nxt])
        # close the turn as the template does; it enters the cache with the next message
        self.pending = [tok.im_end_id] + tok.encode("\n", dummy_prefix=False)
        return tok.decode_continuation(head, out)


def read_user():
    print("User: ", end='', flush=True)
    line = sys.stdin.readline()
    return line.rstrip('\n') if line else None


if eval_instruct:
    import synth
    rows = synth.instructions(eval_instruct, heldout=True)
    ok = 0
    for messages, wanted in rows:
        try:
            ok += synth.follows(Chat().reply(messages[0]['content']), wanted)
        except ContextFull:  # the request does not even fit: not followed
            pass
    print(f"instruction following: {ok}/{len(rows)} = {ok / len(rows):.1%} "
          f"({checkpoint}, temperature {temperature})")
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
