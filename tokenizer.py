"""
The tokenizer: SentencePiece BPE with byte fallback, for English and Chinese.

    python tokenizer.py -t data/tinystories/tok4096.model  # writes tok4096.bin beside it, for run.c

Training is done by `python preprocess.py train_vocab --vocab_size=N`, which calls
train_tokenizer() below on a sample of the corpus. The ids are laid out like Llama 2's:

    0 <unk>  1 <s> (BOS)  2 </s> (EOS)  3 <|im_start|>  4 <|im_end|>
    5..260 <0x00>..<0xFF> (byte fallback)  261.. learned merges, best first

The chat template lives here too (encode_chat), because it is a tokenizer matter: the two
chat tokens are reserved from the start, so fine-tuning never needs a new tokenizer.
"""

import io
import os
import re
import struct
import sys

import sentencepiece as spm

from checkpoint import write_atomic
from configurator import die

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# One chat template (ChatML), used by SFT data, sample.py --chat, run.c -m chat and the
# Hugging Face export. A conversation is BOS followed by messages rendered as:
CHAT_TEMPLATE = IM_START + "{role}\n{content}" + IM_END + "\n"
GENERATION_PROMPT = IM_START + "assistant\n"


# -----------------------------------------------------------------------------
# training

def train_tokenizer(sentences, vocab_size, character_coverage=0.9995, input_sentence_size=200_000):
    """Train a BPE model on an iterator of strings (documents); returns the model's bytes
    (the same bytes for the same documents and settings).

    input_sentence_size makes SentencePiece keep a random sample of that many documents
    (reservoir sampling) instead of all of them: the seed tutorials saw 135 GB peaks
    training on a whole multi-GB corpus without it."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small: 261 ids are taken by "
                         "special and byte tokens; use at least 300 (512 or more is typical)")
    f = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=f,
        model_type='bpe', vocab_size=vocab_size,
        # these follow Llama 2's tokenizer: text round-trips byte for byte
        normalization_rule_name='identity',  # no NFKC: fullwidth '，' stays '，'
        remove_extra_whitespaces=False,       # runs of spaces survive
        add_dummy_prefix=True,                # "Hello" and " Hello" share a token
        allow_whitespace_only_pieces=True,
        byte_fallback=True,                   # unseen characters become <0xNN> bytes
        split_digits=True,                    # numbers are spelled digit by digit
        character_coverage=character_coverage,  # <1.0 drops only the rarest Han chars
        max_sentencepiece_length=16,
        max_sentence_length=16384,            # bytes; longer documents are skipped
        input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
        user_defined_symbols=[IM_START, IM_END],  # always one id, even inside text
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    return f.getvalue()


# -----------------------------------------------------------------------------
# encode / decode

class Tokenizer:
    def __init__(self, model):
        """model: a path to a .model file, or its bytes (as stored in a checkpoint)."""
        if isinstance(model, (bytes, bytearray)):
            self.model_bytes = bytes(model)
        else:
            if not os.path.isfile(model):
                raise FileNotFoundError(f"tokenizer {model} not found — run "
                                        "`python preprocess.py train_vocab` first")
            with open(model, 'rb') as f:
                self.model_bytes = f.read()
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.im_start_id = self.sp.piece_to_id(IM_START)
        self.im_end_id = self.sp.piece_to_id(IM_END)
        # the chat tokens the text is cut at (a tokenizer without them has none)
        self.chat_ids = {p: i for i, p in ((self.im_start_id, IM_START), (self.im_end_id, IM_END))
                         if self.sp.id_to_piece(i) == p}
        self._chat_split = re.compile('(' + '|'.join(map(re.escape, self.chat_ids)) + ')')
        # SentencePiece puts a "dummy prefix" space before the text; to encode a piece of
        # text in the middle of a sequence without it, we encode it behind a special token
        # (which never merges with its neighbours) and cut that token off again.
        self._cut = self.sp.encode(IM_START)

    def encode(self, s, bos=False, eos=False, dummy_prefix=True):
        """Text -> ids. A chat token written in the text becomes its id, and the text after
        it is encoded as a text of its own, with the dummy prefix ("<|im_start|>user" ->
        <|im_start|>, '▁user'): that is how llama.cpp and Hugging Face tokenize a rendered
        chat template (SentencePiece alone would not prefix it). Text without chat tokens is
        encoded exactly as SentencePiece does."""
        assert isinstance(s, str)
        ids = [self.bos_id] * bos
        parts = self._chat_split.split(s) if self.chat_ids else [s]
        for k, part in enumerate(parts):
            if k % 2:  # a chat token
                ids.append(self.chat_ids[part])
            elif k == 0 and not dummy_prefix:
                t = self.sp.encode(IM_START + part)
                assert t[:len(self._cut)] == self._cut
                ids += t[len(self._cut):]
            elif part:
                ids += self.sp.encode(part)
        return ids + [self.eos_id] * eos

    def decode(self, ids):
        """ids -> text; the dummy prefix after a chat token is dropped, as encode added it"""
        out, seg, chat = [], [], set(self.chat_ids.values())
        for i in map(int, ids):
            if i in chat:
                out += [self.sp.decode(seg), self.sp.id_to_piece(i)]
                seg = []
            else:
                seg.append(i)
        return ''.join(out) + self.sp.decode(seg)

    def decode_continuation(self, context, ids):
        """The text that ids add after context, decoded as part of the whole sequence
        (so a leading space is kept, as run.c prints it). context must end on a complete
        UTF-8 character, e.g. after a chat header."""
        return self.decode(list(context) + list(ids))[len(self.decode(context)):]

    def encode_message(self, role, content):
        """One chat message: ids and loss mask (1 on an assistant's content and its
        <|im_end|>, the tokens a chat model must learn to produce). The header and the
        content are encoded separately so the content starts on a token boundary, exactly
        as it does at generation time after the generation prompt. Text right after a chat
        token has the dummy prefix ('▁user', '▁\n'), as encode() gives it, so that llama.cpp
        and Hugging Face, tokenizing the rendered template, give these ids."""
        head = [self.im_start_id] + self.encode(role + "\n")
        body = self.encode(content, dummy_prefix=False) + [self.im_end_id]
        tail = self.encode("\n")
        learn = int(role == 'assistant')
        return head + body + tail, [0] * len(head) + [learn] * len(body) + [0] * len(tail)

    def encode_chat(self, messages, add_generation_prompt=False):
        """messages: [{"role": ..., "content": ...}]. Returns (ids, mask), ids starting
        with BOS; with add_generation_prompt the ids end with '<|im_start|>assistant\\n'."""
        ids, mask = [self.bos_id], [0]
        for m in messages:
            i, k = self.encode_message(m['role'], m['content'])
            ids += i
            mask += k
        if add_generation_prompt:
            gen = self.generation_prompt()
            ids, mask = ids + gen, mask + [0] * len(gen)
        return ids, mask

    def token_bytes(self):
        """The number of UTF-8 bytes of text each id stands for: a byte token <0xNN> is 1,
        a piece its length with '▁' as a space, a control or chat token 0 (it is not text).
        Nats summed over tokens / bytes summed over the same tokens / ln 2 = bits per byte,
        which compares models across tokenizers (nanochat's evaluation)."""
        sp, special = self.sp, self.special_ids()
        return [0 if i in special or sp.is_control(i) or sp.is_unknown(i) else 1 if sp.is_byte(i)
                else len(sp.id_to_piece(i).replace('▁', ' ').encode('utf-8'))
                for i in range(self.n_words)]

    def special_ids(self):
        """BOS, EOS and the chat tokens this tokenizer has (the repetition penalty skips them)"""
        return {self.bos_id, self.eos_id, *self.chat_ids.values()}

    def generation_prompt(self):
        return [self.im_start_id] + self.encode("assistant\n")


def checkpoint_tokenizer(path, ckpt):
    """The checkpoint's own tokenizer, which must fit its vocabulary."""
    blob = ckpt.get('tokenizer')
    if not isinstance(blob, (bytes, bytearray)):
        die(f"{path} holds no tokenizer — it was not written by our train.py")
    try:
        tok = Tokenizer(blob)
    except Exception as e:  # SentencePiece raises RuntimeError on a foreign blob
        die(f"{path}: its tokenizer is not a SentencePiece model ({str(e).strip()[:80]})")
    if tok.n_words != ckpt['model_args']['vocab_size']:
        die(f"{path}: its tokenizer has {tok.n_words} tokens but the model "
            f"{ckpt['model_args']['vocab_size']} — the checkpoint was put together wrongly")
    return tok


def render_chat(messages, add_generation_prompt=False):
    """The chat as one string (what encode_chat tokenizes, BOS aside)."""
    s = "".join(CHAT_TEMPLATE.format(**m) for m in messages)
    return s + (GENERATION_PROMPT if add_generation_prompt else "")


def jinja_chat_template(chat):
    """A chat template (str.format fields, as stored in checkpoints) as the Jinja string that
    Hugging Face's apply_chat_template and GGUF readers (llama.cpp, Ollama) run."""
    message = chat['message'].replace('{role}', "{{ message['role'] }}")
    message = message.replace('{content}', "{{ message['content'] }}")
    return ("{{ bos_token }}{% for message in messages %}" + message + "{% endfor %}"
            "{% if add_generation_prompt %}" + chat['generation_prompt'] + "{% endif %}")


# -----------------------------------------------------------------------------
# export to llama2.c's tokenizer.bin

def tokenizer_bin(tok):
    """llama2.c's format, as bytes: uint32 max_token_length, then per token: float32 score,
    int32 byte length, the UTF-8 bytes (with SentencePiece's '▁' turned back into ' ')."""
    pieces, scores = [], []
    for i in range(tok.n_words):
        p = tok.sp.id_to_piece(i)
        if i == tok.bos_id:
            p = '\n<s>\n'       # as llama2.c writes them; run.c never prints control tokens
        elif i == tok.eos_id:
            p = '\n</s>\n'
        pieces.append(p.replace('▁', ' ').encode('utf-8'))
        scores.append(tok.sp.get_score(i))
    out = bytearray(struct.pack('I', max(len(p) for p in pieces)))
    for p, s in zip(pieces, scores):
        out += struct.pack('fI', s, len(p)) + p
    return bytes(out)


def is_tokenizer_bin(path, limit=1 << 26):
    """The file at path is in tokenizer.bin's format: every entry whole, up to the last byte."""
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > limit:
            return False
        data = open(path, 'rb').read()
    except OSError:
        return False
    if len(data) < 4:
        return False
    longest, at, n = struct.unpack_from('I', data)[0], 4, 0
    while at + 8 <= len(data):
        length = struct.unpack_from('I', data, at + 4)[0]
        if length > longest:
            return False
        at, n = at + 8 + length, n + 1
    return at == len(data) and n > 0


if __name__ == '__main__':
    if len(sys.argv) != 3 or sys.argv[1] not in ('-t', '--tokenizer-model'):
        print("usage: python tokenizer.py -t data/synth/tok1024.model   (writes tok1024.bin beside "
              "it)", file=sys.stderr)
        sys.exit(2)
    model_path = sys.argv[2]
    try:
        tok = Tokenizer(model_path)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {model_path}: {e}", file=sys.stderr)
        sys.exit(1)
    bin_path = os.path.splitext(model_path)[0] + '.bin'
    # the output is named after the input: it never replaces the input, nor a file that is
    # not an earlier tokenizer.bin (a model exported as data/tok4096.bin, say)
    if os.path.abspath(bin_path) == os.path.abspath(model_path) or (
            os.path.lexists(bin_path) and not is_tokenizer_bin(bin_path)):
        print(f"error: {bin_path} exists and is not a tokenizer.bin written from a tokenizer "
              f"— move it, or copy {model_path} to a name of its own and convert that",
              file=sys.stderr)
        sys.exit(1)
    blob = tokenizer_bin(tok)
    write_atomic(bin_path, lambda f: f.write(blob))
    print(f"wrote {bin_path} ({tok.n_words} tokens)")
