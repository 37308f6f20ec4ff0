"""
GGUF, the file llama.cpp reads (and Ollama and LM Studio, which are built on it):

$ python export.py out/model.gguf --checkpoint=out/ckpt.pt --version=gguf [--dtype=f32|f16|q8_0]

Written by hand, as export.py writes safetensors: the format is a header, key-value metadata
and tensors, and the writer is shorter than the code that would adapt our checkpoint to
llama.cpp's `gguf` package (which the tests use to read the file back, field by field).

    "GGUF", uint32 version 3, uint64 tensor count, uint64 metadata count
    metadata: key, uint32 value type, value        (a string is uint64 length + UTF-8)
    tensor infos: name, uint32 n_dims, uint64 dims (innermost first), uint32 type, uint64 offset
    zero padding to 32 bytes, then the tensors, each starting at a multiple of 32

We write the stock `llama` architecture, so llama.cpp needs nothing of ours. Its RoPE for
`llama` rotates adjacent pairs (x[2i], x[2i+1]) as model.py does, so wq and wk are written as
they are (the Hugging Face export has to permute them; llama.cpp's converter undoes that).
"""

import struct

import numpy as np

from tokenizer import CHAT_TEMPLATE, GENERATION_PROMPT, IM_END, jinja_chat_template

# value types of metadata, tensor types (ggml), llama.cpp's token types
U32, I32, F32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9
SCALAR = {U32: '<I', I32: '<i', F32: '<f', BOOL: '<?'}
GGML_TYPE = {'f32': 0, 'f16': 1, 'q8_0': 8}
FILE_TYPE = {'f32': 0, 'f16': 1, 'q8_0': 7}  # general.file_type: "all F32", "mostly F16", ...
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
ALIGN = 32


def string(s):
    b = s.encode('utf-8')
    return struct.pack('<Q', len(b)) + b


def value(kind, v):
    """The bytes of a metadata value; an array is (element kind, list or numpy array)."""
    if kind == STRING:
        return string(v)
    if kind == ARRAY:
        elem, items = v
        head = struct.pack('<IQ', elem, len(items))
        if elem == STRING:
            return head + b''.join(string(s) for s in items)
        return head + np.asarray(items, dtype=SCALAR[elem]).tobytes()
    return struct.pack(SCALAR[kind], v)


def quantize_q8_0(a):
    """GGUF's Q8_0, as llama.cpp's quantize_row_q8_0_ref computes it: blocks of 32 values,
    each an fp16 scale d = max|x| / 127 and 32 int8 round(x / d), 34 bytes per block."""
    x = a.reshape(-1, 32).astype(np.float32)
    d = np.abs(x).max(axis=1) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    y = x * inv[:, None]
    q = np.trunc(y + np.copysign(np.float32(0.5), y))  # C's roundf: halves away from zero
    blocks = np.empty(len(x), dtype=[('d', '<f2'), ('qs', 'i1', 32)])
    blocks['d'], blocks['qs'] = d, q
    return blocks


def encode_tensor(name, a, dtype):
    """(bytes, ggml type) of a float32 array. Norms (1-D) and a mixture's routers stay
    float32, as llama.cpp keeps them; a matrix whose rows are not whole blocks of 32 falls
    back to f16."""
    if a.ndim == 1 or dtype == 'f32' or 'ffn_gate_inp' in name:
        return a.astype('<f4').tobytes(), GGML_TYPE['f32']
    if dtype == 'q8_0' and a.shape[-1] % 32 == 0:
        return quantize_q8_0(a).tobytes(), GGML_TYPE['q8_0']
    return a.astype('<f2').tobytes(), GGML_TYPE['f16']


def tensors(w, p):
    """llama.cpp's names for our weights. output.weight is written even when tied (it is the
    embedding again): llama.cpp would share it too, but not every reader of GGUF does."""
    t = {'token_embd.weight': w['tok_embeddings.weight'], 'output_norm.weight': w['norm.weight'],
         'output.weight': w['tok_embeddings.weight' if p.shared else 'output.weight']}
    names = {'attention_norm': 'attn_norm', 'attention.wq': 'attn_q', 'attention.wk': 'attn_k',
             'attention.wv': 'attn_v', 'attention.wo': 'attn_output', 'ffn_norm': 'ffn_norm'}
    ffn = {'w1': 'ffn_gate', 'w2': 'ffn_down', 'w3': 'ffn_up'}
    for i in range(p.n_layers):
        for ours, theirs in names.items():
            t[f'blk.{i}.{theirs}.weight'] = w[f'layers.{i}.{ours}.weight']
        if not p.n_experts:
            for ours, theirs in ffn.items():
                t[f'blk.{i}.{theirs}.weight'] = w[f'layers.{i}.feed_forward.{ours}.weight']
            continue
        # a mixture of experts: the router, and each kind of matrix of all experts as one
        # (n_experts, rows, cols) tensor
        t[f'blk.{i}.ffn_gate_inp.weight'] = w[f'layers.{i}.feed_forward.gate.weight']
        for ours, theirs in ffn.items():
            experts = [f'layers.{i}.feed_forward.experts.{e}.{ours}.weight'
                       for e in range(p.n_experts)]
            t[f'blk.{i}.{theirs}_exps.weight'] = np.stack([w[name] for name in experts])
    return t


def vocabulary(tok):
    """SentencePiece's pieces, scores and llama.cpp's token type of each."""
    sp, pieces, kinds = tok.sp, [], []
    for i in range(tok.n_words):
        piece = sp.id_to_piece(i)
        pieces.append(piece)
        kinds.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i)
                     else BYTE if sp.is_byte(i) else USER_DEFINED if i in tok.chat_ids.values()
                     else NORMAL)
    return pieces, np.array([sp.get_score(i) for i in range(tok.n_words)], np.float32), kinds


def metadata(p, tok, ckpt, dtype, name):
    pieces, scores, kinds = vocabulary(tok)
    # SentencePiece's dummy prefix: does "a" become "▁a"?
    space_prefix = tok.sp.id_to_piece(tok.sp.encode('a')[0]).startswith('▁')
    chat = ckpt.get('chat_template') or dict(message=CHAT_TEMPLATE,
                                             generation_prompt=GENERATION_PROMPT)
    return [
        ('general.architecture', STRING, 'llama'),
        ('general.name', STRING, name),
        ('general.file_type', U32, FILE_TYPE[dtype]),
        ('general.alignment', U32, ALIGN),
        ('llama.context_length', U32, p.max_seq_len),
        ('llama.embedding_length', U32, p.dim),
        ('llama.block_count', U32, p.n_layers),
        ('llama.feed_forward_length', U32, p.hidden_dim),
        ('llama.attention.head_count', U32, p.n_heads),
        ('llama.attention.head_count_kv', U32, p.n_kv_heads),
        ('llama.rope.dimension_count', U32, p.dim // p.n_heads),
        ('llama.rope.freq_base', F32, 10000.0),
        ('llama.attention.layer_norm_rms_epsilon', F32, p.norm_eps),
        ('llama.vocab_size', U32, p.vocab_size),
        ('tokenizer.ggml.model', STRING, 'llama'),  # SentencePiece
        ('tokenizer.ggml.tokens', ARRAY, (STRING, pieces)),
        ('tokenizer.ggml.scores', ARRAY, (F32, scores)),
        ('tokenizer.ggml.token_type', ARRAY, (I32, kinds)),
        ('tokenizer.ggml.bos_token_id', U32, tok.bos_id),
        ('tokenizer.ggml.eos_token_id', U32, tok.eos_id),
        ('tokenizer.ggml.unknown_token_id', U32, tok.sp.unk_id()),
        ('tokenizer.ggml.add_bos_token', BOOL, True),
        ('tokenizer.ggml.add_eos_token', BOOL, False),
        ('tokenizer.ggml.add_space_prefix', BOOL, space_prefix),
        ('tokenizer.chat_template', STRING, jinja_chat_template(chat)),
    ] + [('tokenizer.ggml.eot_token_id', U32, tok.im_end_id)] * (IM_END in tok.chat_ids) + [
        ('llama.expert_count', U32, p.n_experts), ('llama.expert_used_count', U32,
                                                    p.n_experts_per_tok)] * bool(p.n_experts)
    # (<|im_end|> ends a chat turn; llama.cpp would guess it from the name, others may not)


def gguf_chunks(w, p, tok, ckpt, dtype, name='llama from scratch'):
    """The file as a list of byte strings, in order."""
    meta = metadata(p, tok, ckpt, dtype, name)
    data = [(n, *encode_tensor(n, a, dtype), a.shape) for n, a in tensors(w, p).items()]
    head = [b'GGUF', struct.pack('<IQQ', 3, len(data), len(meta))]
    head += [string(k) + struct.pack('<I', kind) + value(kind, v) for k, kind, v in meta]
    offset, body = 0, []
    for n, blob, kind, shape in data:
        dims = struct.pack(f'<I{len(shape)}Q', len(shape), *shape[::-1])  # innermost first
        head.append(string(n) + dims + struct.pack('<IQ', kind, offset))
        pad = b'\0' * (-len(blob) % ALIGN)
        body += [blob, pad]
        offset += len(blob) + len(pad)
    size = sum(len(h) for h in head)
    return head + [b'\0' * (-size % ALIGN)] + body
