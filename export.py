"""
Export a checkpoint for run.c (llama2.c's file formats), for Hugging Face, or for llama.cpp.

$ python export.py out/model.bin --checkpoint=out/ckpt.pt              # version 0, float32
$ python export.py out/model.bin --checkpoint=out/ckpt.pt --version=1  # float32, 256-byte header
$ python export.py out/model_q80.bin --checkpoint=out/ckpt.pt --version=2   # int8 (Q8_0)
$ python export.py out/hf --checkpoint=out/ckpt.pt --version=hf        # a transformers folder
$ python export.py out/model.gguf --checkpoint=out/ckpt.pt --version=gguf --dtype=q8_0  # llama.cpp
$ python export.py out_sft/peft --checkpoint=out_sft/ckpt.pt --version=peft  # a LoRA, for PEFT

A LoRA checkpoint (--lora_rank in training) is merged into its base, W + (alpha / r) B A, for
every format, so run.c, transformers and llama.cpp run the fine-tuned model as any other;
--version=peft writes the adapter alone instead, for PEFT on top of the base's hf export.

Beside a .bin model it writes tokenizer.bin, from the tokenizer stored in the checkpoint,
so run.c finds the right one. Arrays are written whole with numpy (llama2.c packs floats
one by one with struct, minutes for 110M parameters), and every file is written to a
temporary name and renamed, so an interrupted export never leaves a half file behind.
"""

import itertools
import json
import os
import struct
import sys
from types import SimpleNamespace

import numpy as np

from checkpoint import (FolderLock, check_lora, check_model, fit_adapters, lora_base,
                        nonfinite_weights, read_checkpoint, same_file, write_atomic, write_folder)
from configurator import configure, die
from export_gguf import gguf_chunks
from tokenizer import (CHAT_TEMPLATE, GENERATION_PROMPT, IM_END, IM_START, checkpoint_tokenizer,
                       is_tokenizer_bin, jinja_chat_template, tokenizer_bin)

# -----------------------------------------------------------------------------
checkpoint = 'out/ckpt.pt'
version = '0'            # 0 (float32, llama2.c's legacy format) | 1 (float32) | 2 (int8 Q8_0)
                         # | 3 (a mixture of experts, --dtype=f32|q8_0) | hf (a transformers
                         # folder) | gguf (llama.cpp, Ollama) | peft (a LoRA checkpoint's adapter)
group_size = 64          # version 2: values per quantization group (halved until it fits)
dtype = 'f32'            # gguf, 3: the matrices as f32, f16 (gguf) or q8_0 (norms stay f32)
# -----------------------------------------------------------------------------
MOE_VERSIONS = ('3', 'hf', 'gguf')  # the formats that hold a mixture of experts


# -----------------------------------------------------------------------------
# llama2.c's formats, for run.c

def legacy_tensors(w, p):
    """Version 0's order: embedding, then each weight type for all layers, the final norm,
    RoPE tables (run.c computes its own, but the layout has room for them), classifier."""
    yield w['tok_embeddings.weight']
    for name in LAYER_WEIGHTS:
        yield from layers(w, p, name)
    yield w['norm.weight']
    yield from precompute_freqs(p.dim // p.n_heads, p.max_seq_len)
    if not p.shared:
        yield w['output.weight']


def config_ints(p):
    return [p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, p.vocab_size, p.max_seq_len]


def write_chunks(path, chunks):
    """chunks: bytes or numpy arrays, written in order, whole arrays at a time (through
    f.write, not ndarray.tofile, which turns a Ctrl-C inside it into a TypeError)."""
    def write(f):
        for c in chunks:
            f.write(np.ascontiguousarray(c).data if isinstance(c, np.ndarray) else c)
    write_atomic(path, write)


def export_v0(w, p, path):
    header = config_ints(p)
    if not p.shared:
        header[5] = -header[5]  # the legacy format's flag for a separate classifier
    write_chunks(path, [struct.pack('7i', *header), *legacy_tensors(w, p)])


def v12_header(p, version, gs, tuned):
    """Versions 1 and 2 begin with 256 bytes: magic "ak42", the version, the 7 ints, the
    shared-classifier byte, the group size (version 2); we add byte 41, which llama2.c
    leaves 0: 1 = pretrained only, 2 = fine-tuned to chat, so that run.c -m chat can say
    when a model was never taught to chat. Version 3, ours, a mixture of experts, has the
    same fields (group size 0: float32), then n_experts and n_experts_per_tok."""
    h = struct.pack('<Ii7iBiB', 0x616b3432, version, *config_ints(p), int(p.shared), gs, tuned)
    if version == 3:
        h += struct.pack('<ii', p.n_experts, p.n_experts_per_tok)
    return h + b'\0' * (256 - len(h))


def export_v1(w, p, path, tuned, version=1):
    """llama2.c's version 1: the 256-byte header, all norms, then the float32 matrices."""
    matrices = [w[name + '.weight'] for name in matrix_names(p)]
    write_chunks(path, [v12_header(p, version, 0, tuned)] + norms_first(w, p) + matrices)


def norms_first(w, p):
    return layers(w, p, 'attention_norm') + layers(w, p, 'ffn_norm') + [w['norm.weight']]


def matrix_names(p):
    """The matrices of versions 1 to 3, in file order: each kind for all layers in turn. A
    mixture of experts (version 3) has, after wo, each layer's router (always float32),
    then w1 of each layer's experts, then their w2, then their w3."""
    L = range(p.n_layers)
    names = ['tok_embeddings'] + [f'layers.{i}.attention.{m}' for m in ('wq', 'wk', 'wv', 'wo')
                                  for i in L]
    if p.n_experts:
        names += [f'layers.{i}.feed_forward.gate' for i in L]
        names += [f'layers.{i}.feed_forward.experts.{e}.{m}' for m in ('w1', 'w2', 'w3')
                  for i in L for e in range(p.n_experts)]
    else:
        names += [f'layers.{i}.feed_forward.{m}' for m in ('w1', 'w2', 'w3') for i in L]
    return names if p.shared else names + ['output']


def quantize_q80(w, gs):
    """Symmetric int8 per group of gs values: w ≈ q * scale, q in [-127, 127].
    Returns (q int8, scale float32, largest absolute error)."""
    w = w.reshape(-1, gs)
    scale = np.abs(w).max(axis=1) / 127.0
    q = np.round(w / np.where(scale == 0, 1, scale)[:, None]).astype(np.int8)
    err = np.abs(q.astype(np.float32) * scale[:, None] - w).max()
    return q, scale.astype(np.float32), float(err)


def export_v2(w, p, path, tuned, version=2):
    """llama2.c's version 2 (runq.c): a 256-byte header, the norms in float32, then
    every matrix as int8 groups followed by their float32 scales."""
    gs = group_size
    while p.dim % gs or p.hidden_dim % gs:  # activations are quantized in groups too
        gs //= 2
    if gs < group_size:
        print(f"group size {group_size} does not divide dim {p.dim} and hidden_dim "
              f"{p.hidden_dim}: using {gs}")
    chunks = [v12_header(p, version, gs, tuned)] + norms_first(w, p)
    worst = 0.0
    for name in matrix_names(p):
        a = w[name + '.weight']
        if name.endswith('.gate'):  # a router: small, and float32 keeps its choices exact
            chunks.append(a)
            continue
        q, s, err = quantize_q80(a, gs)
        chunks += [q, s]
        worst = max(worst, err)
        print(f"{name:28s} {str(a.shape):14s} max abs error {err:.6f}")
    print(f"largest quantization error: {worst:.6f} (group size {gs})")
    write_chunks(path, chunks)

# -----------------------------------------------------------------------------
# Hugging Face: a folder that LlamaForCausalLM and AutoTokenizer load with from_pretrained

def hf_permute(w, n_heads):
    """Our RoPE rotates adjacent pairs (x[2i], x[2i+1]) of each head, HF's rotates halves
    (x[i], x[i + head_dim/2]). Moving each head's even rows of wq/wk to its first half
    and its odd rows to its second half makes HF rotate the same pairs; q·k is unchanged
    because q and k are reordered alike. w (n_heads * head_dim, dim)"""
    rows, dim = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(rows, dim)


def hf_tensors(w, p):
    """HF's parameter names -> float32 arrays. A tied classifier is stored once, as
    embed_tokens (config.json's tie_word_embeddings tells HF to share it)."""
    t = {'model.embed_tokens.weight': w['tok_embeddings.weight']}
    for i in range(p.n_layers):
        ours, pre = (lambda name: w[f'layers.{i}.{name}.weight']), f'model.layers.{i}.'
        t[pre + 'input_layernorm.weight'] = ours('attention_norm')
        t[pre + 'self_attn.q_proj.weight'] = hf_permute(ours('attention.wq'), p.n_heads)
        t[pre + 'self_attn.k_proj.weight'] = hf_permute(ours('attention.wk'), p.n_kv_heads)  # GQA: fewer rows
        t[pre + 'self_attn.v_proj.weight'] = ours('attention.wv')  # v is not rotated
        t[pre + 'self_attn.o_proj.weight'] = ours('attention.wo')
        t[pre + 'post_attention_layernorm.weight'] = ours('ffn_norm')
        if p.n_experts:  # Mixtral's names: the router is the gate, w1/w2/w3 as ours
            t[pre + 'block_sparse_moe.gate.weight'] = ours('feed_forward.gate')
            for e, n in itertools.product(range(p.n_experts), ('w1', 'w2', 'w3')):
                expert = f'experts.{e}.{n}'
                t[pre + f'block_sparse_moe.{expert}.weight'] = ours(f'feed_forward.{expert}')
            continue
        t[pre + 'mlp.gate_proj.weight'] = ours('feed_forward.w1')
        t[pre + 'mlp.down_proj.weight'] = ours('feed_forward.w2')
        t[pre + 'mlp.up_proj.weight'] = ours('feed_forward.w3')
    t['model.norm.weight'] = w['norm.weight']
    if not p.shared:
        t['lm_head.weight'] = w['output.weight']
    return t


def safetensors_chunks(tensors):
    """The safetensors format: uint64 header length, a JSON header giving each tensor's
    dtype, shape and byte range, then the raw little-endian data."""
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for name, a in tensors.items():
        header[name] = {'dtype': 'F32', 'shape': list(a.shape),
                        'data_offsets': [offset, offset + a.nbytes]}
        offset += a.nbytes
    h = json.dumps(header).encode()
    h += b' ' * (-len(h) % 8)  # pad with spaces so the data starts 8-byte aligned
    return [struct.pack('<Q', len(h)) + h] + [a.astype('<f4', copy=False) for a in tensors.values()]


def hf_config(p, tok):
    config = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_size': p.dim,
              'intermediate_size': p.hidden_dim, 'num_hidden_layers': p.n_layers,
              'num_attention_heads': p.n_heads, 'num_key_value_heads': p.n_kv_heads,
              'head_dim': p.dim // p.n_heads, 'vocab_size': p.vocab_size,
              'max_position_embeddings': p.max_seq_len, 'rms_norm_eps': p.norm_eps,
              'rope_theta': 10000.0, 'hidden_act': 'silu', 'tie_word_embeddings': p.shared,
              'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id, 'torch_dtype': 'float32'}
    if p.n_experts:  # a mixture of experts is Mixtral: Llama with MoE feed-forwards
        config.update(architectures=['MixtralForCausalLM'], model_type='mixtral',
                      num_local_experts=p.n_experts, num_experts_per_tok=p.n_experts_per_tok,
                      sliding_window=None, output_router_logits=False)
    return config


def hf_tokenizer_json(tok, special):
    """tokenizer.json, for the fast (Rust) tokenizer: the same BPE as SentencePiece's.
    SentencePiece merges the adjacent pair whose joined piece scores highest; HF's BPE
    merges the pair listed first. So list every split of every piece, best piece first
    (as transformers' SentencePieceExtractor does), leaving out special and byte pieces
    so that nothing merges into them."""
    sp = tok.sp
    vocab = {sp.id_to_piece(i): i for i in range(tok.n_words)}
    normal = {p: i for p, i in vocab.items() if i not in special and not sp.is_byte(i)}
    best_first = sorted(normal, key=lambda p: -sp.get_score(normal[p]))
    merges = [[p[:k], p[k:]] for p in best_first for k in range(1, len(p))
              if p[:k] in normal and p[k:] in normal]
    bos = sp.id_to_piece(tok.bos_id)
    s, a, b = ({'SpecialToken': {'id': bos, 'type_id': 0}}, {'Sequence': {'id': 'A', 'type_id': 0}},
               {'Sequence': {'id': 'B', 'type_id': 1}})
    return {
        'version': '1.0', 'truncation': None, 'padding': None,
        'added_tokens': [{'id': i, 'content': sp.id_to_piece(i), 'special': True, 'normalized': False,
                          'single_word': False, 'lstrip': False, 'rstrip': False} for i in special],
        # SentencePiece's dummy prefix: ' ' -> '▁', then one '▁' before the text and after
        # each special token (as tokenizer.encode_chat and llama.cpp do). Metaspace alone adds
        # none when the text starts with a space (Llama's HF quirk), so spaces become '▁'
        # first, Metaspace then adds a ' ', and a second Metaspace turns it into '▁'. split
        # False: the whole text is one word, as SentencePiece's BPE sees it.
        'normalizer': {'type': 'Replace', 'pattern': {'String': ' '}, 'content': '▁'},
        'pre_tokenizer': {'type': 'Sequence', 'pretokenizers': [
            {'type': 'Metaspace', 'replacement': ' ', 'prepend_scheme': 'always', 'split': False},
            {'type': 'Metaspace', 'replacement': '▁', 'prepend_scheme': 'never', 'split': False}]},
        'post_processor': {'type': 'TemplateProcessing', 'single': [s, a], 'pair': [s, a, s, b],
                           'special_tokens': {bos: {'id': bos, 'ids': [tok.bos_id], 'tokens': [bos]}}},
        # decoding: '▁' -> ' ', <0xNN> pieces -> bytes -> UTF-8, then drop the dummy prefix
        'decoder': {'type': 'Sequence', 'decoders': [
            {'type': 'Replace', 'pattern': {'String': '▁'}, 'content': ' '}, {'type': 'ByteFallback'},
            {'type': 'Fuse'}, {'type': 'Strip', 'content': ' ', 'start': 1, 'stop': 0}]},
        'model': {'type': 'BPE', 'unk_token': sp.id_to_piece(sp.unk_id()), 'fuse_unk': True,
                  'byte_fallback': True, 'vocab': vocab, 'merges': merges}}


def hf_tokenizer_files(p, tok, ckpt):
    sp = tok.sp
    special = [i for i in range(tok.n_words) if sp.is_control(i) or sp.is_unknown(i)]
    # the chat tokens too: one token even inside text, and hidden by skip_special_tokens
    special += [tok.im_start_id, tok.im_end_id]
    names = {'unk_token': sp.id_to_piece(sp.unk_id()), 'bos_token': sp.id_to_piece(tok.bos_id),
             'eos_token': sp.id_to_piece(tok.eos_id), 'additional_special_tokens': [IM_START, IM_END]}
    chat = ckpt.get('chat_template') or dict(message=CHAT_TEMPLATE, generation_prompt=GENERATION_PROMPT)
    # not LlamaTokenizer: transformers 5 rebuilds that class's pre-tokenizer from scratch,
    # losing the leading-space fix in hf_tokenizer_json
    config = dict(names, tokenizer_class='PreTrainedTokenizerFast', add_bos_token=True,
                  add_eos_token=False, clean_up_tokenization_spaces=False,
                  model_max_length=p.max_seq_len, chat_template=jinja_chat_template(chat))
    return {'tokenizer.json': hf_tokenizer_json(tok, special), 'tokenizer_config.json': config,
            'special_tokens_map.json': names, 'tokenizer.model': tok.model_bytes}


def export_hf(w, p, tok, ckpt, out_dir):
    """Write out_dir/ (config, weights, tokenizer) into a temporary folder, then swap it in,
    so a crash leaves the previous export whole."""
    write_folder(os.path.normpath(out_dir), lambda tmp: write_hf_files(w, p, tok, ckpt, tmp))
    print(f"wrote {out_dir}/ for transformers' from_pretrained")


def write_hf_files(w, p, tok, ckpt, folder):
    files = {'config.json': hf_config(p, tok),
             # stop where sample.py does (BOS starts the next document, EOS) and at <|im_end|>
             'generation_config.json': {'bos_token_id': tok.bos_id,
                                        'eos_token_id': [tok.eos_id, tok.bos_id, tok.im_end_id]},
             **hf_tokenizer_files(p, tok, ckpt)}
    for name, content in files.items():
        if not isinstance(content, bytes):
            content = json.dumps(content, indent=2, ensure_ascii=False).encode()
        with open(os.path.join(folder, name), 'wb') as f:
            f.write(content)
    write_chunks(os.path.join(folder, 'model.safetensors'), safetensors_chunks(hf_tensors(w, p)))


# -----------------------------------------------------------------------------
# PEFT: a LoRA checkpoint's adapter, which peft.PeftModel.from_pretrained puts on the base's
# Hugging Face export

PEFT_NAMES = {'wq': 'self_attn.q_proj', 'wk': 'self_attn.k_proj', 'wv': 'self_attn.v_proj',
              'wo': 'self_attn.o_proj', 'w1': 'mlp.gate_proj', 'w2': 'mlp.down_proj',
              'w3': 'mlp.up_proj'}


def peft_tensors(pairs, p):
    """PEFT's names for each (A, B): base_model.model.model.layers.0.self_attn.q_proj.lora_A
    .weight, ... The rows of q_proj and k_proj are permuted in the HF export (hf_permute), so
    theirs are in B (out, r); A (r, in) reads the input, whose order is unchanged."""
    t = {}
    for prefix, (A, B) in pairs.items():  # prefix: layers.{i}.attention.wq, ...
        _, i, _, ours = prefix.split('.')
        if ours in ('wq', 'wk'):
            B = hf_permute(B, p.n_heads if ours == 'wq' else p.n_kv_heads)
        name = f'base_model.model.model.layers.{i}.{PEFT_NAMES[ours]}'
        t[name + '.lora_A.weight'], t[name + '.lora_B.weight'] = A, B
    return t


def export_peft(lora, pairs, p, out_dir):
    config = {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': lora['rank'],
              'lora_alpha': lora['alpha'], 'lora_dropout': lora['dropout'],
              'target_modules': sorted(PEFT_NAMES[t].split('.')[1] for t in lora['targets']),
              'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': False, 'use_dora': False,
              'inference_mode': True, 'base_model_name_or_path': None}

    def fill(folder):
        with open(os.path.join(folder, 'adapter_config.json'), 'w') as f:
            json.dump(config, f, indent=2)
        write_chunks(os.path.join(folder, 'adapter_model.safetensors'),
                     safetensors_chunks(peft_tensors(pairs, p)))
    write_folder(os.path.normpath(out_dir), fill)
    print(f"wrote {out_dir}/ for peft's PeftModel.from_pretrained, on the Hugging Face export "
          f"of {lora['base']}")


# -----------------------------------------------------------------------------
# the checkpoint's weights, as float32 numpy arrays (checkpoint.py reads the file)

LAYER_WEIGHTS = ('attention_norm', 'attention.wq', 'attention.wk', 'attention.wv', 'attention.wo',
                 'ffn_norm', 'feed_forward.w1', 'feed_forward.w2', 'feed_forward.w3')


def model_weights(ckpt, path):
    """The model's float32 arrays by state-dict name and its shape, once check_model has held
    every array to model_args; weights that hold NaN or inf are refused. A LoRA checkpoint's
    are its base's, with each adapted W replaced by W + (alpha / r) B A."""
    if 'lora' in ckpt:
        lora, pairs, w, p = lora_weights(ckpt, path)
        for prefix, (A, B) in pairs.items():
            w[prefix + '.weight'] = w[prefix + '.weight'] + lora['alpha'] / lora['rank'] * (B @ A)
        return w, p
    stored, hidden_dim = check_model(path, ckpt)
    w = {}
    for name, t in stored.items():
        a = t.numpy()
        if a.dtype.kind != 'f':
            die(f"{path}: the weight {name} is not a tensor of floats — not a model of ours")
        w[name] = a.astype(np.float32, copy=False)
        if not np.isfinite(w[name]).all():
            nonfinite_weights(path, name)
    a = ckpt['model_args']
    p = SimpleNamespace(dim=a['dim'], hidden_dim=hidden_dim, n_layers=a['n_layers'],
                        n_heads=a['n_heads'], n_kv_heads=a.get('n_kv_heads') or a['n_heads'],
                        vocab_size=a['vocab_size'], max_seq_len=a['max_seq_len'],
                        norm_eps=a.get('norm_eps', 1e-5), n_experts=a.get('n_experts', 0),
                        n_experts_per_tok=a.get('n_experts_per_tok', 2))
    emb = w['tok_embeddings.weight']
    p.shared = np.array_equal(w.setdefault('output.weight', emb), emb)  # tied: stored twice
    return w, p


def lora_weights(ckpt, path):
    """A LoRA checkpoint: its settings, its adapters as float32 (A, B) by the name of the
    weight they adapt, and its base's weights and shape (the base found and its hash checked)"""
    lora, adapters = check_lora(path, ckpt)
    base_path, base = lora_base(path, ckpt)
    if base.get('task') == 'rm':
        die(f"{path}: its base {base_path} is a reward model — not a LoRA checkpoint of ours")
    w, p = model_weights(base, base_path)
    pairs = {}
    for prefix, ab in fit_adapters(path, lora, adapters, w).items():
        pairs[prefix] = tuple(t.numpy().astype(np.float32) for t in ab)
        if not all(np.isfinite(a).all() for a in pairs[prefix]):
            nonfinite_weights(path, prefix + '.lora_A/B')
    return lora, pairs, w, p


def layers(w, p, name):
    return [w[f'layers.{i}.{name}.weight'] for i in range(p.n_layers)]


def precompute_freqs(head_dim, end, theta=10000.0):
    """model.py's RoPE tables, in numpy: cos and sin of pos * theta^(-2i/head_dim)"""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angles = np.outer(np.arange(end, dtype=np.float32), freqs)
    return np.cos(angles), np.sin(angles)


# -----------------------------------------------------------------------------

def existing_kind(path):
    """What the file at path is, by its bytes: 'model' (llama2.c's formats, for run.c),
    'gguf', 'checkpoint' (a zip, as torch.save writes), 'tokenizer' (run.c's tokenizer.bin),
    or None (anything else)."""
    if not os.path.isfile(path):  # (a FIFO would block the read)
        return None
    try:
        with open(path, 'rb') as f:
            head = f.read(28)
        size = os.path.getsize(path)
    except OSError:
        return None
    if head[:4] in (b'GGUF', b'PK\x03\x04'):
        return 'gguf' if head[:4] == b'GGUF' else 'checkpoint'
    if len(head) == 28 and (head[:4] == struct.pack('<I', 0x616b3432)
                            or size == v0_size(*struct.unpack('<7i', head))):
        return 'model'
    return 'tokenizer' if is_tokenizer_bin(path) else None


def v0_size(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len):
    """The bytes of a version 0 file with this header (run.c's expected_size), or -1"""
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, max_seq_len) < 1 or dim % n_heads:
        return -1
    head_dim = dim // n_heads
    kv_dim, vocab = n_kv_heads * head_dim, abs(vocab_size)
    layer = 2 * dim + 2 * dim * dim + 2 * kv_dim * dim + 3 * hidden_dim * dim
    floats = vocab * dim * (1 + (vocab_size < 0)) + n_layers * layer + dim + max_seq_len * head_dim
    return 28 + 4 * floats


HF_FILES = {'config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json',
            'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model'}
PEFT_FILES = {'adapter_config.json', 'adapter_model.safetensors'}
KIND_NAMES = {'checkpoint': 'a training checkpoint', 'tokenizer': "run.c's tokenizer.bin",
              None: 'not a model export'}


def check_outputs(out, tok_path, tok_bin):
    """An export writes out (and, for run.c, tokenizer.bin beside it), and nothing else: out
    replaces only an earlier export, never the checkpoint or a file of another kind, and
    tokenizer.bin is replaced only where no other model beside it reads the old one."""
    hint = " (did you mean --checkpoint=" + out + "?)" if existing_kind(out) == 'checkpoint' else ""
    if same_file(out, checkpoint):
        die(f"{out} is the checkpoint this export reads — give the export another path")
    if version in ('hf', 'peft'):
        if os.path.lexists(out) and not os.path.isdir(out):
            die(f"{out} exists and is not a folder — give another output path")
        ours = HF_FILES if version == 'hf' else PEFT_FILES
        other = sorted(set(os.listdir(out)) - ours) if os.path.isdir(out) else []
        if other:
            kind = 'a Hugging Face export' if version == 'hf' else 'a PEFT adapter'
            die(f"{out}/ holds files that are not {kind} ({', '.join(other[:3])}"
                f"{', ...' if len(other) > 3 else ''}), which would be lost — give a new folder")
        return
    if os.path.lexists(out) and not os.path.isfile(out):
        die(f"{out} exists and is not a regular file — give another output path")
    kind = existing_kind(out) if os.path.lexists(out) else 'model'
    if kind not in ('model', 'gguf'):
        die(f"{out} exists and is {KIND_NAMES[kind]}: an export replaces only an earlier export "
            f"— give another output path{hint}")
    if version == 'gguf':  # a GGUF file holds its tokenizer
        return
    if os.path.abspath(out) == tok_path:
        die(f"{out}: export writes the tokenizer to tokenizer.bin beside the model — give the "
            "model another name")
    if os.path.lexists(tok_path) and not (os.path.isfile(tok_path)
                                          and existing_kind(tok_path) == 'tokenizer'):
        die(f"{tok_path} exists and is not run.c's tokenizer.bin — export into another folder")
    if os.path.lexists(tok_path) and open(tok_path, 'rb').read() != tok_bin:
        folder = os.path.dirname(tok_path)
        models = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))
                        and not same_file(os.path.join(folder, f), out)
                        and existing_kind(os.path.join(folder, f)) == 'model')
        if models:
            die(f"{tok_path} is the tokenizer of {os.path.join(folder, models[0])}, and this "
                "model's is another — export into another folder (run.c reads the "
                "tokenizer.bin beside a model)")


def main():
    _, args = configure(globals(), positional=1)
    if not args:
        die("no output path — usage: python export.py OUTPUT --checkpoint=out/ckpt.pt "
            "[--version=0|1|2|3|hf|gguf|peft]")
    if version not in ('0', '1', '2', '3', 'hf', 'gguf', 'peft'):
        die(f"--version={version}: use 0, 1, 2, 3, hf, gguf or peft")
    if version == '3' and dtype == 'f16':
        die("--version=3 holds f32 or q8_0 (int8 in groups of --group_size), not f16")
    if dtype not in ('f32', 'f16', 'q8_0'):
        die(f"--dtype={dtype}: use f32, f16 or q8_0 (for --version=gguf)")
    if group_size < 1:
        die(f"--group_size={group_size}: must be at least 1 (64 is llama2.c's)")
    if dtype != 'f32' and version in ('0', '1', '2'):
        die(f"--dtype={dtype} is for --version=3 and gguf; version {version} is "
            f"{'int8 (--group_size)' if version == '2' else 'float32'}")
    out = os.path.normpath(args[0])
    folder = os.path.dirname(os.path.abspath(out))
    tok_path = os.path.join(folder, 'tokenizer.bin')
    if same_file(out, checkpoint):  # before reading it: the most natural slip of all
        die(f"{out} is the checkpoint this export reads — give the export another path")
    ckpt = read_checkpoint(checkpoint)
    if ckpt.get('task') == 'rm':
        die(f"{checkpoint} is a reward model (task rm): it scores answers, it does not write "
            "them, so it is not a language model to export — export the policy (sft, dpo, rl)")
    if ckpt.get('task') not in (None, 'pretrain', 'sft', 'dpo', 'rl'):
        die(f"{checkpoint} is a {ckpt['task']!r} model, not a language model — export the "
            "model it was trained from")
    if version == 'peft':
        if 'lora' not in ckpt:
            die(f"--version=peft writes a LoRA adapter, and {checkpoint} is a whole model, not "
                "a LoRA checkpoint (trained with --lora_rank) — export it with --version=hf")
        lora, pairs, _, p = lora_weights(ckpt, checkpoint)
        if p.n_experts and {'w1', 'w2', 'w3'} & set(lora['targets']):
            die(f"{checkpoint} has adapters on the experts, which transformers' Mixtral holds "
                "fused, out of PEFT's reach — export it merged: --version=hf")
    else:
        w, p = model_weights(ckpt, checkpoint)
    if p.n_experts and version not in MOE_VERSIONS + ('peft',):
        die(f"{checkpoint} is a mixture of experts, which --version={version} cannot hold — "
            f"use --version={' or '.join(MOE_VERSIONS)}")
    if version == '3' and not p.n_experts:
        die(f"--version=3 is for a mixture of experts, and {checkpoint} is dense — use "
            "--version=1 (float32) or 2 (int8)")
    tok = checkpoint_tokenizer(checkpoint, ckpt)
    tok_bin = tokenizer_bin(tok)
    made = None  # the folders this export made, removed again if it writes nothing
    if not os.path.isdir(folder):
        made = folder
        while not os.path.isdir(os.path.dirname(made)):
            made = os.path.dirname(made)
        try:
            os.makedirs(folder, exist_ok=True)  # (another export may make it at the same time)
        except OSError as e:
            die(f"cannot make the folder {folder} for {out}: {e.strerror} — give another "
                "output path")
    written = []
    try:
        with FolderLock(folder):  # two exports into one folder take turns
            check_outputs(out, tok_path, tok_bin)
            if version == 'hf':
                export_hf(w, p, tok, ckpt, out)
            elif version == 'peft':
                export_peft(lora, pairs, p, out)
            elif version == 'gguf':
                write_chunks(out, gguf_chunks(w, p, tok, ckpt, dtype))
                print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB, {dtype})")
            else:
                tuned = 1 if ckpt.get('task', 'pretrain') == 'pretrain' else 2  # header byte 41
                if version == '0':
                    export_v0(w, p, out)
                elif version == '3':  # float32 as version 1, int8 as version 2
                    (export_v2 if dtype == 'q8_0' else export_v1)(w, p, out, tuned, version=3)
                else:
                    (export_v1 if version == '1' else export_v2)(w, p, out, tuned)
                written.append(out)
                write_atomic(tok_path, lambda f: f.write(tok_bin))
                print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB) and {tok_path}")
    except OSError as e:  # a full disk, a read-only folder: the temporaries are gone
        die(f"cannot write {e.filename or out}: {e.strerror} — free some space or choose "
            "another output path; " + (f"only {out} was replaced" if written else
                                       "nothing was replaced"))
    except KeyboardInterrupt:
        print("\ninterrupted: " + (f"{out} was written, {tok_path} was not" if written else
                                   "nothing was replaced"), file=sys.stderr)
        sys.exit(130)
    finally:
        while made and not os.path.exists(out):  # refused or failed: no empty folders left
            try:
                os.rmdir(folder)  # only while empty
            except OSError:
                break
            if folder == made:
                break
            folder = os.path.dirname(folder)


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:  # before anything was written (main answers it after)
        print("\ninterrupted: nothing was replaced", file=sys.stderr)
        sys.exit(130)
