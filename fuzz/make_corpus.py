"""
Writes the fuzzers' seed corpus, fuzz/corpus/{model,tokenizer,prompt}/: small valid files
and near-valid ones (one field or byte wrong), so that libFuzzer starts next to the checks.

    python fuzz/make_corpus.py

Models are tiny (dim 8, one layer) in all four formats of run.c; v0_vocab512.bin matches
fuzz/tokenizer.bin (vocab 512), which `make fuzz` and the tests use for prompts. A tokenizer
input is 2 bytes of vocab_size - 3 (little-endian) and then a tokenizer.bin, as fuzz.c reads it.
"""
import os
import struct

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(0)


def f32(*shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype('<f4')


def weights(dim, hidden, L, n_heads, n_kv_heads, vocab):
    kv = dim * n_kv_heads // n_heads
    return dict(tok=f32(vocab, dim), att=np.ones((L, dim), '<f4'), ffn=np.ones((L, dim), '<f4'),
                final=np.ones(dim, '<f4'), wq=f32(L, dim, dim), wk=f32(L, kv, dim), wv=f32(L, kv, dim),
                wo=f32(L, dim, dim), w1=f32(L, hidden, dim), w2=f32(L, dim, hidden), w3=f32(L, hidden, dim),
                cls=f32(vocab, dim))


def model(version, dim=8, hidden=16, L=1, n_heads=2, n_kv_heads=1, vocab=16, seq=8, shared=True, gs=4):
    w = weights(dim, hidden, L, n_heads, n_kv_heads, vocab)
    cfg = [dim, hidden, L, n_heads, n_kv_heads, vocab, seq]
    mats = ['wq', 'wk', 'wv', 'wo']
    if version == 0:  # llama2.c's legacy layout: norms between the matrices, RoPE tables at the end
        cfg[5] = vocab if shared else -vocab
        head = dim // n_heads
        parts = [w['tok'], w['att']] + [w[k] for k in mats] + [w['ffn'], w['w1'], w['w2'], w['w3'], w['final'],
                                                                np.zeros((2, seq, head // 2), '<f4')]
        return struct.pack('<7i', *cfg) + b''.join(p.tobytes() for p in parts) + (b'' if shared else w['cls'].tobytes())
    header = struct.pack('<Ii7iB', 0x616b3432, version, *cfg, int(shared))
    if version == 2:
        header += struct.pack('<i', gs)
    out = [header.ljust(256, b'\0'), w['att'].tobytes(), w['ffn'].tobytes(), w['final'].tobytes()]
    for k in ['tok'] + mats + ['w1', 'w2', 'w3'] + ([] if shared else ['cls']):
        for m in (w[k] if w[k].ndim == 3 else [w[k]]):  # one layer's matrix after another
            if version == 1:
                out.append(m.tobytes())
            else:  # int8 values, then a float32 scale per group
                g = m.reshape(-1, gs)
                s = (np.abs(g).max(axis=1) / 127).astype('<f4')
                out += [np.round(g / s[:, None]).astype('i1').tobytes(), s.tobytes()]
    return b''.join(out)


def moe_model(gs=0, n_experts=2, k=1, dim=8, hidden=16, L=1, vocab=16, seq=8):
    """Version 3, a mixture of experts: version 1 or 2's header (group size 0 for float32)
    with n_experts and n_experts_per_tok at bytes 42 and 46; after wo, the routers (float32),
    then w1 of every layer's experts, their w2, their w3."""
    w = weights(dim, hidden, L, 2, 1, vocab)
    header = struct.pack('<Ii7iBiBii', 0x616b3432, 3, dim, hidden, L, 2, 1, vocab, seq, 1, gs, 0,
                         n_experts, k)
    out = [header.ljust(256, b'\0'), w['att'].tobytes(), w['ffn'].tobytes(), w['final'].tobytes()]
    mats = [w['tok']] + [m for k in ('wq', 'wk', 'wv', 'wo') for m in w[k]]
    experts = {k: f32(L, n_experts, *w[k].shape[1:]) for k in ('w1', 'w2', 'w3')}
    routers = f32(L, n_experts, dim)
    for m in mats[:1 + 4 * L]:
        out += quantized(m, gs)
    out.append(routers.tobytes())
    for k in ('w1', 'w2', 'w3'):
        for m in experts[k].reshape(-1, *experts[k].shape[2:]):
            out += quantized(m, gs)
    return b''.join(out)


def quantized(m, gs):
    """float32 bytes (gs 0), or int8 values and then a float32 scale per group of gs"""
    if not gs:
        return [m.tobytes()]
    g = m.reshape(-1, gs)
    s = (np.abs(g).max(axis=1) / 127).astype('<f4')
    return [np.round(g / s[:, None]).astype('i1').tobytes(), s.tobytes()]


def poke(b, at, fmt, value):
    b = bytearray(b)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def tokenizer(pieces, max_len=None):
    max_len = max(len(p) for _, p in pieces) if max_len is None else max_len
    return struct.pack('<i', max_len) + b''.join(struct.pack('<fi', s, len(p)) + p for s, p in pieces)


def write(kind, name, data):  # kind: 'model', 'tokenizer', 'prompt' (in corpus/) or 'regressions/...'
    folder = os.path.join(HERE, kind if kind.startswith('regressions/') else os.path.join('corpus', kind))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), 'wb') as f:
        f.write(data)


def main():
    v0, v1, v2 = model(0), model(1), model(2)
    models = {
        'v0.bin': v0, 'v0_unshared.bin': model(0, shared=False), 'v0_vocab512.bin': model(0, vocab=512),
        'v0_gqa_2layers.bin': model(0, dim=16, hidden=8, L=2, n_heads=4, n_kv_heads=2),
        'v1.bin': v1, 'v1_unshared.bin': model(1, shared=False),
        'v2.bin': v2, 'v2_unshared_gs8.bin': model(2, shared=False, gs=8), 'v2_dim32_gs32.bin': model(2, dim=32, hidden=32, gs=32),
        'v0_truncated.bin': v0[:-1], 'v0_long.bin': v0 + b'\0', 'v0_dim_odd_heads.bin': poke(v0, 0, '<i', 6),
        'v0_vocab_intmin.bin': poke(v0, 20, '<i', -2**31), 'v1_version3.bin': poke(v1, 4, '<i', 3),
        'v1_shared2.bin': poke(v1, 36, '<B', 2), 'v2_gs3.bin': poke(v2, 37, '<i', 3),
        'v2_gs0.bin': poke(v2, 37, '<i', 0), 'v2_header_cut.bin': v2[:100],
        'v0_nan.bin': poke(v0, 28, '<f', float('nan')), 'v0_inf.bin': poke(v0, 28 + 64, '<f', float('inf')),
        'v3_moe.bin': moe_model(), 'v3_moe_int8.bin': moe_model(gs=4, n_experts=3, k=2),
        'v3_moe_k_above_n.bin': poke(moe_model(), 46, '<i', 3),
    }
    for name, data in models.items():
        write('model', name, data)
    # found by the model fuzzer: an inf or NaN scale made NaN activations, and the int8 path
    # cast them to int16 (undefined behaviour, UBSan stops). Now they quantize to 0.
    write('regressions/model', 'v2_scale_inf.bin', poke(v2, len(v2) - 4, '<f', float('inf')))
    write('regressions/model', 'v2_scale_nan.bin', poke(v2, len(v2) - 4, '<f', float('nan')))

    tok = open(os.path.join(HERE, 'tokenizer.bin'), 'rb').read()
    small = [(0.0, b'<unk>'), (0.0, b'<s>'), (0.0, b'</s>'), (0.0, b'<|im_start|>'), (0.0, b'<|im_end|>'),
             (0.0, b'<0x41>'), (0.0, b'<0xE4>'), (-1.0, b' '), (-2.0, b'a'), (-3.0, b'b'), (-4.0, b'ab'),
             (-5.0, b' ab'), (-6.0, '你'.encode()), (-7.0, b'<|x')]
    vocab = lambda n: struct.pack('<H', n - 3)
    toks = {
        'tok512.bin': vocab(512) + tok, 'tok512_as_511.bin': vocab(511) + tok, 'tok512_cut.bin': vocab(512) + tok[:-3],
        'small.bin': vocab(len(small)) + tokenizer(small),
        'small_max_len_0.bin': vocab(len(small)) + tokenizer(small, max_len=0),
        'small_len_negative.bin': vocab(len(small)) + tokenizer(small)[:-8] + struct.pack('<fi', 0, -1) + b'<|x',
        'small_nan_score.bin': vocab(len(small)) + tokenizer([(float('nan'), p) for _, p in small]),
        'small_only_specials.bin': vocab(3) + tokenizer([(0.0, b'<|a|>'), (0.0, b'<|b|>'), (0.0, b'<|ab|>')]),
    }
    for name, data in toks.items():
        write('tokenizer', name, data)

    prompts = {
        'english.txt': 'Once upon a time, there was a little girl named Lily.', 'chinese.txt': '从前有一只小狐狸。',
        'chat.txt': '<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n', 'sentencepiece_space.txt': '▁a▁▁b ▁',
        'emoji_bytes.txt': 'a😀b<0x41>\t\r\n', 'spaces.txt': '   x  ', 'special_start.txt': '<|im_end|>',
        'special_cut.txt': '<|im_sta<|im_end|<|im_end|>|>',
    }
    for name, text in prompts.items():
        write('prompt', name, text.encode())
    write('prompt', 'overlong.txt', b'a\xc0\x80b')
    write('prompt', 'surrogate.txt', b'\xed\xa0\x80')
    write('prompt', 'cut_utf8.txt', b'abc\xe4\xbd')
    write('prompt', 'nul_inside.txt', b'ab\0cd')


if __name__ == '__main__':
    main()
