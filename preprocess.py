"""
Data: download or write a corpus, train the tokenizer, and turn text into token shards.

    python preprocess.py download                      # TinyStories (~1.5 GB) into data/
    python preprocess.py synth                         # the embedded offline corpus instead
    python preprocess.py train_vocab --vocab_size=4096 [--dataset=...]
    python preprocess.py pretokenize --vocab_size=4096 [--dataset=...]
    python preprocess.py sft --vocab_size=4096 --dataset=synth|chats.jsonl
    python preprocess.py dpo --vocab_size=4096 --dataset=synth|prefs.jsonl

--dataset is `tinystories` (default), `synth`, or a path: a .txt file (documents separated
by a line `<|endoftext|>`, TinyStories' own format, or else by blank lines), a .jsonl file
with a "text" field per line, or a folder of such files. Shards go to
data/{name}/tok{vocab_size}/: train_000.bin ... and val.bin, uint16 token ids (uint32 when
the vocabulary does not fit), every document starting with BOS. The validation set is the
slice documents[::val_every] (every 100th document, starting with the first); training
gets all the others. meta.json records the dtype and counts, and a copy of the tokenizer
travels with the shards so training always stores the tokenizer that made them.

The loaders train.py uses (pretraining windows, SFT rows, DPO pairs) are at the bottom.
"""

import glob
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import tarfile
import time
import zipfile

import numpy as np

from checkpoint import read_checkpoint, write_atomic, write_folder
from configurator import configure, die, on_interrupt
from tokenizer import Tokenizer, train_tokenizer

# -----------------------------------------------------------------------------
# config: python preprocess.py STAGE --key=value
dataset = 'tinystories'  # tinystories | synth | path to a .txt/.jsonl file or a folder
vocab_size = 4096        # tokenizer size; shards go to data/{name}/tok{vocab_size}
data_dir = 'data'
url = 'https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz'
num_stories = 20000      # synth: how many distinct stories
zh_fraction = 0.1        # synth: share of Chinese stories
num_chats = 6000         # synth sft/dpo: how many training conversations / pairs
seed = 0                 # synth: the corpus is a function of this seed
val_every = 100          # documents[::val_every] form the validation set
shard_docs = 100_000     # documents per train shard
character_coverage = 0.9995  # tokenizer: share of characters kept (the rest -> bytes)
input_sentence_size = 200_000  # tokenizer: documents sampled for training, bounds memory
num_workers = 0          # pretokenize processes; 0 = all cores
tokenizer = ''           # pretokenize, sft, dpo: encode with this tokenizer, a .model file or a
                         # checkpoint (its own); default: the one train_vocab made for --dataset


# -----------------------------------------------------------------------------
# download, resumable, with a safe unpack

def download_file(src, dst, chunk=1 << 16):
    """Stream src to dst through dst.part, resuming a partial file with a Range request;
    dst only appears once the whole file is there."""
    import requests
    part = dst + '.part'
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {'Range': f'bytes={have}-'} if have else {}
    try:
        r = requests.get(src, stream=True, headers=headers, timeout=30)
    except requests.exceptions.ConnectionError:
        die(f"cannot reach {src} (offline?) — run `python preprocess.py synth` for the "
            "embedded corpus, or pass your own text with --dataset=path/to/file.txt")
    if r.status_code == 416:  # the partial file is already complete
        total = have
    else:
        if r.status_code not in (200, 206):
            die(f"{src}: HTTP {r.status_code}")
        if r.status_code == 200:
            have = 0  # the server ignored the Range header: start over
        total = have + int(r.headers.get('content-length', 0))
        t0, done = time.time(), 0
        with open(part, 'ab' if have else 'wb') as f:
            try:
                for block in r.iter_content(chunk):
                    f.write(block)
                    done += len(block)
                    rate = done / max(time.time() - t0, 1e-6)
                    eta = (total - have - done) / rate if total else 0
                    print(f"\r{(have + done) / 1e6:9.1f} / {total / 1e6:.1f} MB  "
                          f"{rate / 1e6:6.1f} MB/s  ETA {eta:5.0f}s", end='', flush=True)
            except requests.exceptions.RequestException:
                print()
                die(f"the download of {src} broke off after {(have + done) / 1e6:.1f} MB — "
                    "run the same command again to resume")
        print()
    if total and os.path.getsize(part) != total:
        die(f"{dst}: got {os.path.getsize(part)} of {total} bytes — run again to resume")
    os.replace(part, dst)


def safe_extract(archive, target):
    """Unpack a .tar(.gz), refusing any member that would land outside target."""
    root = os.path.realpath(target)
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            path = os.path.realpath(os.path.join(root, m.name))
            bad = not (path == root or path.startswith(root + os.sep))
            if m.issym() or m.islnk():
                link = os.path.realpath(os.path.join(os.path.dirname(path), m.linkname))
                bad = bad or not link.startswith(root + os.sep)
            if bad or not (m.isfile() or m.isdir()):
                die(f"{archive}: refusing member {m.name!r}, it would be written outside "
                    f"{target} — the archive is corrupt or malicious")
        os.makedirs(root, exist_ok=True)
        tar.extractall(root, members=members)


def download():
    os.makedirs(data_dir, exist_ok=True)
    name = os.path.basename(url.split('?')[0])
    dst = os.path.join(data_dir, name)
    if not os.path.exists(dst):
        print(f"downloading {url} to {dst}")
        download_file(url, dst)
    target = os.path.join(data_dir, re.sub(r'\.(tar\.gz|tgz|tar)$', '', name))
    safe_extract(dst, target)
    print(f"unpacked {len(os.listdir(target))} files into {target}")


# -----------------------------------------------------------------------------
# reading documents from any corpus

def dataset_name(ds):
    """The folder under data_dir for what is prepared from ds: tinystories and synth by name,
    any other corpus by its file name and a hash of its whole path, so that two inputs never
    share one (mine/synth.jsonl is not synth, 'my data.jsonl' is not 'my-data.jsonl')."""
    if ds in ('tinystories', 'synth'):
        return ds
    path = os.path.realpath(ds)
    stem = re.sub(r'\W+', '_', os.path.splitext(os.path.basename(path))[0]).strip('_') or 'data'
    return f"{stem}-{hashlib.sha256(os.fsencode(path)).hexdigest()[:8]}"


def dataset_source(ds, kind='tok'):
    """What a prepared folder records it was made from: the name (with the synth sets' seed
    and size), or the whole path"""
    if ds == 'synth' and kind in ('sft', 'dpo'):
        return f"synth {kind} sets (--seed={seed}, --num_chats={num_chats})"
    return ds if ds in ('tinystories', 'synth') else os.path.realpath(ds)


def read_txt(path):
    raw = open(path, 'rb').read()
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        line = raw.count(b'\n', 0, e.start) + 1
        die(f"{path}: line {line} is not UTF-8 text (byte {e.start}) — convert the file, e.g. "
            "iconv -f GB18030 -t UTF-8")
    sep = r'\n?^<\|endoftext\|>$\n?' if re.search(r'^<\|endoftext\|>$', text, re.M) else r'\n\s*\n'
    return [d.strip() for d in re.split(sep, text, flags=re.M) if d.strip()]


def read_jsonl(path, field='text'):
    """Yields (line_number, value); lines that are not UTF-8 JSON, lack the field or hold
    no text in it are counted and reported, never silently dropped."""
    bad = []
    with open(path, 'rb') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode('utf-8'))
                value = row[field] if field else row
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
                bad.append(n)
                continue
            if field and not isinstance(value, str):  # null is no document, not "None"
                bad.append(n)
                continue
            yield n, value
    if bad:
        what = f" or have no text in {field!r}" if field else ""
        print(f"warning: {path}: skipped {len(bad)} line(s) that are not UTF-8 JSON{what} "
              f"(first: line {bad[0]})", file=sys.stderr)


def iter_documents(ds):
    if ds == 'tinystories':
        files = sorted(glob.glob(os.path.join(data_dir, 'TinyStories_all_data', '*.json')))
        if not files:
            die(f"no TinyStories in {data_dir}/TinyStories_all_data — "
                + recipe(ds, vocab_size, data_dir))
        for fn in files:
            for ex in json.load(open(fn)):
                yield ex['story'].strip()
        return
    if ds == 'synth':
        ds = os.path.join(data_dir, 'synth', 'stories.txt')
        if not os.path.exists(ds):
            die(f"{ds} not found — " + recipe('synth', vocab_size, data_dir))
    if os.path.isdir(ds):
        files = sorted(glob.glob(os.path.join(ds, '**', '*.txt'), recursive=True)
                       + glob.glob(os.path.join(ds, '**', '*.jsonl'), recursive=True))
        if not files:
            die(f"{ds}: no .txt or .jsonl files in this folder")
    elif os.path.isfile(ds):
        files = [ds]
    else:
        die(f"dataset {ds!r} is neither tinystories, synth, nor an existing file or folder")
    for fn in files:
        if fn.endswith('.jsonl'):
            yield from (t for _, t in read_jsonl(fn) if t.strip())
        else:
            yield from read_txt(fn)


# -----------------------------------------------------------------------------
# stages: synth, train_vocab, pretokenize

def recipe(ds, vocab, data, kind='tok'):
    """Every preprocess.py command still needed before train.py can read
    {data}/{name}/{kind}{vocab}, in one line, with the offline way where the corpus is missing."""
    flags = f" --dataset={ds} --vocab_size={vocab}" + (f" --data_dir={data}" if data != 'data' else '')
    steps = []
    corpus = {'tinystories': os.path.join(data, 'TinyStories_all_data'),
              'synth': os.path.join(data, 'synth', 'stories.txt')}.get(ds, ds)
    if not os.path.exists(corpus):
        steps.append({'tinystories': 'download', 'synth': 'synth'}.get(ds, '') or None)
    tokenizer_given = kind in ('sft', 'dpo') and ds not in ('tinystories', 'synth')
    if not tokenizer_given and not os.path.exists(tokenizer_path(ds, vocab, data)):
        steps.append('train_vocab' + flags)
    steps.append({'tok': 'pretokenize'}.get(kind, kind) + flags
                 + (" --tokenizer=out/ckpt.pt (the model you will fine-tune)" if tokenizer_given
                    else ""))
    if None in steps:
        return (f"{ds} is neither tinystories, synth, nor an existing .txt/.jsonl file or folder "
                "— give one, e.g. --dataset=synth after python preprocess.py synth")
    how = "run: " + " && ".join(f"python preprocess.py {s}" for s in steps)
    if ds == 'tinystories' and 'download' in steps:
        how += (" (downloads 1.5 GB; offline, or to try everything in minutes, use --dataset=synth "
                "with train.py too, after python preprocess.py synth)")
    return how


def tokenizer_path(ds=None, vocab=None, data=None):
    """train_vocab's tokenizer of a corpus: data/{name}/tok{vocab}.model, beside its shards"""
    name, vocab = dataset_name(ds or dataset), vocab or vocab_size
    return os.path.join(data or data_dir, name, f'tok{vocab}.model')


def shard_dir(ds=None, kind='tok'):
    return os.path.join(data_dir, dataset_name(ds or dataset), f'{kind}{vocab_size}')


def load_tokenizer(kind='tok'):
    """The tokenizer to encode with: --tokenizer (a .model file, or a checkpoint's own), else
    train_vocab's for --dataset. Returns (Tokenizer, where it came from)."""
    path = tokenizer or tokenizer_path()
    if not os.path.isfile(path):
        if tokenizer:
            die(f"--tokenizer={tokenizer}: no such file — give a tokenizer's .model file, or "
                "the checkpoint of the model you will train (it holds its tokenizer)")
        die(f"{path} not found — " + recipe(dataset, vocab_size, data_dir, kind))
    blob = open(path, 'rb').read()
    if blob.startswith(b'PK\x03\x04'):  # a checkpoint: the tokenizer it was trained with
        blob = read_checkpoint(path).get('tokenizer')
        if not isinstance(blob, bytes):
            die(f"--tokenizer={path} holds no tokenizer — it was not written by our train.py")
    try:
        tok = Tokenizer(blob)
    except RuntimeError as e:
        die(f"{path} is not a SentencePiece model ({str(e).strip()[:80]}) — give a .model file "
            "that train_vocab wrote, or a checkpoint")
    if tok.n_words != vocab_size:
        die(f"{path} has {tok.n_words} tokens, not --vocab_size={vocab_size} — give "
            f"--vocab_size={tok.n_words}")
    return tok, path


def write_array(path, arr):
    # f.write, not arr.tofile, which turns a Ctrl-C inside it into a TypeError
    write_atomic(path, lambda f: f.write(np.ascontiguousarray(arr).data))


def write_generated(path, text):
    """Write text that this script generates (the synth sets) to path, unless another text is
    there: a corpus of another --seed, or a file the user edited, is never replaced."""
    data = text.encode('utf-8')
    if os.path.lexists(path):
        if os.path.isfile(path) and open(path, 'rb').read() == data:
            return
        die(f"{path} exists and differs from what this command writes (another --seed or "
            "size, or edited by hand), and data may have been prepared from it — move it away "
            "to write it anew, or give another --data_dir")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, lambda f: f.write(data))


PREPARED = re.compile(r'meta\.json|tokenizer\.model|(train_\d+|val)\.bin|(train|val)\.npz')


def write_prepared(out, fill, tok, kind='tok'):
    """Write the prepared folder out whole (checkpoint.write_folder): fill(folder) writes the
    data. An earlier folder is replaced only if it holds the same input prepared with the
    same tokenizer (a model trained on it needs that tokenizer), and nothing else."""
    if os.path.lexists(out):
        if not os.path.isdir(out):
            die(f"{out} exists and is not a folder — give another --data_dir")
        other = sorted(f for f in os.listdir(out) if not PREPARED.fullmatch(f))
        if other:
            die(f"{out}/ holds files that are not prepared data ({', '.join(other[:3])}) — move "
                "them away, or give another --data_dir")
        old_tok = os.path.join(out, 'tokenizer.model')
        if os.path.exists(old_tok) and open(old_tok, 'rb').read() != tok.model_bytes:
            die(f"{out}/ was prepared with another tokenizer, which models trained on it need — "
                "delete the folder to prepare it anew, or give another --data_dir")
        try:
            source = json.load(open(os.path.join(out, 'meta.json'))).get('source')
        except (OSError, ValueError, AttributeError):
            source = None
        if source not in (None, dataset_source(dataset, kind)):
            die(f"{out}/ holds data prepared from {source}, not {dataset_source(dataset, kind)} "
                "— delete the folder to prepare it anew, or give another --data_dir")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_folder(out, fill)


def synth():
    import synth as grammar
    out = os.path.join(data_dir, 'synth', 'stories.txt')
    docs = grammar.stories(num_stories, seed=seed, zh_fraction=zh_fraction)
    write_generated(out, ''.join(d + '\n<|endoftext|>\n' for d in docs))
    print(f"wrote {len(docs)} stories ({os.path.getsize(out) / 1e6:.1f} MB) to {out}")


def train_vocab():
    """data/{name}/tok{vocab_size}.model for the corpus --dataset. Training again on the same
    corpus with the same settings gives the same bytes; a different tokenizer never replaces
    one that data may have been prepared with."""
    def pieces():  # SentencePiece skips documents over 16 KB: feed long ones in parts
        for doc in iter_documents(dataset):
            while len(doc) > 4000:
                cut = doc.rfind('\n', 0, 4000) + 1 or 4000
                yield doc[:cut]
                doc = doc[cut:]
            yield doc
    try:
        model = train_tokenizer(pieces(), vocab_size, character_coverage, input_sentence_size)
    except (RuntimeError, ValueError) as e:
        die(f"training a {vocab_size}-token tokenizer on {dataset} failed: {str(e).strip()}"
            " — try another --vocab_size")
    path = tokenizer_path()
    if os.path.lexists(path) and open(path, 'rb').read() != model:
        die(f"{path} exists and differs from the tokenizer trained now (other settings, or the "
            "corpus changed); data prepared with it and models trained on it need it — delete "
            "it to replace it, or use another --vocab_size")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, lambda f: f.write(model))
    print(f"wrote {path}")


_tok = None


def _init_worker(model_bytes):
    global _tok
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to answer
    _tok = Tokenizer(model_bytes)


def _encode_batch(batch):
    """batch: [(is_val, document)] -> (train ids, val ids, train docs, val docs)"""
    out = {True: [], False: []}
    for is_val, doc in batch:
        out[is_val].append(_tok.encode(doc, bos=True))
    flat = lambda docs: np.array([i for t in docs for i in t], dtype=np.uint32)
    return flat(out[False]), flat(out[True]), len(out[False]), len(out[True])


def batched(items, n):
    batch = []
    for x in items:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def pretokenize():
    documents = iter_documents(dataset)
    first = next(documents, None)  # an unknown dataset is refused before any folder is made
    if first is None:
        die(f"{dataset}: the corpus has no documents")
    tok, _ = load_tokenizer()
    dtype = np.uint16 if tok.n_words <= 1 << 16 else np.uint32
    out = shard_dir()
    t0, docs, tokens = time.time(), {'train': 0, 'val': 0}, {'train': 0, 'val': 0}

    def fill(folder):  # the new folder takes the old one's place only when it is whole
        shard, train, val = 0, [], []

        def flush():  # write the pending training documents as the next shard
            nonlocal shard, train
            if train:
                arr = np.concatenate(train).astype(dtype)
                write_array(os.path.join(folder, f'train_{shard:03d}.bin'), arr)
                tokens['train'] += len(arr)
                shard, train = shard + 1, []

        # documents[::val_every] are the validation set. Batches of 500 documents are encoded
        # in parallel and come back in order, so the shards never depend on the core count.
        # The documents are read here, in this process, so that an error in the corpus stops
        # it here.
        workers = num_workers or os.cpu_count() or 1
        docs_all = itertools.chain([first], documents)
        tagged = ((i % val_every == 0, d) for i, d in enumerate(docs_all))
        batches = batched(tagged, 500)
        with mp.Pool(workers, initializer=_init_worker, initargs=(tok.model_bytes,)) as pool:
            while group := list(itertools.islice(batches, 2 * workers)):
                for t_ids, v_ids, n_t, n_v in pool.map(_encode_batch, group):
                    train.append(t_ids)
                    val.append(v_ids)
                    docs['train'] += n_t
                    docs['val'] += n_v
                    if docs['train'] >= shard_docs * (shard + 1):
                        flush()
        flush()
        val = np.concatenate(val).astype(dtype)
        write_array(os.path.join(folder, 'val.bin'), val)
        tokens['val'] = len(val)
        write_atomic(os.path.join(folder, 'tokenizer.model'), lambda f: f.write(tok.model_bytes))
        meta = dict(dataset=dataset, source=dataset_source(dataset), vocab_size=tok.n_words,
                    dtype=np.dtype(dtype).name, bos_id=tok.bos_id, val_every=val_every,
                    documents=docs, tokens=tokens,
                    tokenizer_sha256=hashlib.sha256(tok.model_bytes).hexdigest())
        write_atomic(os.path.join(folder, 'meta.json'), lambda f: json.dump(meta, f, indent=1),
                     mode='w')
    write_prepared(out, fill, tok)
    dt = time.time() - t0
    print(f"{docs['train']} + {docs['val']} documents -> {tokens['train']} train + "
          f"{tokens['val']} val tokens in {out} ({dt:.1f}s)")


# -----------------------------------------------------------------------------
# stages: sft and dpo (conversations and preferences -> token ids + loss mask)

ROLES = {'system': 'system', 'user': 'user', 'human': 'user', 'assistant': 'assistant',
         'gpt': 'assistant', 'bot': 'assistant'}


def text(value):
    if not isinstance(value, str):  # null content is a broken row, not the word "None"
        raise TypeError(f"content {value!r} is not text")
    return value


def to_messages(row):
    """Both common shapes: [{"role", "content"}] (or {"messages": [...]}) and ShareGPT's
    {"conversations": [{"from": "human"|"gpt", "value"}]}."""
    if isinstance(row, dict) and 'conversations' in row:
        row = [{'role': m['from'], 'content': m['value']} for m in row['conversations']]
    elif isinstance(row, dict):
        row = row['messages']
    msgs = [{'role': ROLES[m['role']], 'content': text(m['content'])} for m in row]
    if not any(m['role'] == 'assistant' for m in msgs):
        raise ValueError('no assistant message')
    return msgs


def to_preference(row):
    """{"prompt": str or messages, "chosen": str or messages, "rejected": ...}"""
    answer = lambda a: a if isinstance(a, str) else to_messages(a if isinstance(a, list) else [a])[-1]['content']
    prompt = row['prompt']
    prompt = [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else [
        {'role': ROLES[m['role']], 'content': text(m['content'])} for m in prompt]
    return prompt, answer(row['chosen']), answer(row['rejected'])


def read_rows(path, convert):
    rows = []
    for n, row in read_jsonl(path, field=None):
        try:
            rows.append(convert(row))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            print(f"warning: {path}:{n}: skipped, not a usable row ({e!r})", file=sys.stderr)
    if not rows:
        die(f"{path}: no usable rows")
    return rows


def save_sequences(path, seqs):
    """seqs: [(ids, mask)] -> one .npz with the ids, masks and offsets of every sequence"""
    offsets = np.cumsum([0] + [len(i) for i, _ in seqs])
    write_atomic(path, lambda f: np.savez(
        f, tokens=np.array([t for i, _ in seqs for t in i], dtype=np.int32),
        mask=np.array([m for _, k in seqs for m in k], dtype=np.uint8), offsets=offsets))


def chat_data(kind):
    """Rows for sft or dpo: (train, val). The synth sets are written to jsonl first, so
    they go through the same reader as yours."""
    if dataset == 'synth':
        import synth as grammar
        files = []
        for split, n, held in (('train', num_chats, False), ('val', max(num_chats // 20, 50), True)):
            fn = os.path.join(data_dir, 'synth', f'{kind}_{split}.jsonl')
            if kind == 'sft':
                rows = [{'messages': m} for m, _ in grammar.instructions(n, seed, held)]
            else:
                rows = [{k: p[k] for k in ('prompt', 'chosen', 'rejected')}
                        for p in grammar.preferences(n, seed, held)]
            write_generated(fn, ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows))
            files.append(fn)
        convert = to_messages if kind == 'sft' else to_preference
        return read_rows(files[0], convert), read_rows(files[1], convert)
    if not os.path.isfile(dataset):
        die(f"{dataset}: not a file — give --dataset=synth or a .jsonl file")
    rows = read_rows(dataset, to_messages if kind == 'sft' else to_preference)
    return [r for i, r in enumerate(rows) if i % val_every], rows[::val_every]


def chats(kind):
    """preprocess.py sft|dpo: write data/{name}/{kind}{N}/train.npz and val.npz"""
    tok, _ = load_tokenizer(kind)
    splits = chat_data(kind)
    what = 'conversations' if kind == 'sft' else 'pairs'
    for split, rows in zip(('train', 'val'), splits):
        if not rows:  # rows[::val_every] are the validation set, the rest the training set
            die(f"{dataset}: no usable {what} for the {split} set (every {val_every}th row is "
                f"held out for validation) — give at least 2 well-formed rows")
    out = shard_dir(kind=kind)

    def fill(folder):
        for split, rows in zip(('train', 'val'), splits):
            if kind == 'sft':
                seqs = [tok.encode_chat(m) for m in rows]
            else:  # a pair becomes two sequences: prompt + chosen, prompt + rejected
                seqs = []
                for prompt, chosen, rejected in rows:
                    p_ids, p_mask = tok.encode_chat(prompt)
                    for answer in (chosen, rejected):
                        a_ids, a_mask = tok.encode_message('assistant', answer)
                        seqs.append((p_ids + a_ids, [0] * len(p_ids) + a_mask))
            save_sequences(os.path.join(folder, f'{split}.npz'), seqs)
            print(f"{split}: {len(rows)} {what}, "
                  f"{sum(len(i) for i, _ in seqs)} tokens -> {out}/{split}.npz")
        write_atomic(os.path.join(folder, 'tokenizer.model'), lambda f: f.write(tok.model_bytes))
        meta = dict(dataset=dataset, source=dataset_source(dataset, kind), vocab_size=tok.n_words,
                    rows={'train': len(splits[0]), 'val': len(splits[1])},
                    tokenizer_sha256=hashlib.sha256(tok.model_bytes).hexdigest())
        write_atomic(os.path.join(folder, 'meta.json'), lambda f: json.dump(meta, f, indent=1),
                     mode='w')
    write_prepared(out, fill, tok, kind)


# -----------------------------------------------------------------------------
# loaders for train.py: batch k is a pure function of (seed, rank, k), so a resumed run
# draws exactly the batches an uninterrupted one would, and no two ranks draw the same
# stream. Batches are numpy int64 arrays; train.py turns them into tensors.

class Batches:
    def __init__(self, batch_size, max_seq_len, seed=0, rank=0):
        self.B, self.T, self.seed, self.rank = batch_size, max_seq_len, seed, rank

    def rng(self, k):
        """The random stream of batch k: train.py's steps use k = 0, 1, ...; its evals use
        their own fixed range of k, far above any step's."""
        return np.random.default_rng([self.seed, self.rank, k])

    def batch(self, rng):
        raise NotImplementedError


def load_shards(folder, split):
    """The split's shards, memory-mapped, each checked: present, whole, and every id inside
    the vocabulary (a corrupt shard would fail deep inside the model)."""
    rebuild = "rebuild them with python preprocess.py pretokenize (the same --dataset and --vocab_size)"
    try:
        meta = json.load(open(os.path.join(folder, 'meta.json')))
        dtype, vocab = np.dtype(meta['dtype']), int(meta['vocab_size'])
    except FileNotFoundError:
        die(f"no pretokenized data in {folder} — run python preprocess.py pretokenize "
            "with the same --dataset and --vocab_size")
    except (ValueError, KeyError, TypeError) as e:
        die(f"{folder}/meta.json is damaged ({e!r:.60}) — {rebuild}")
    files = sorted(glob.glob(os.path.join(folder, 'train_*.bin'))) if split == 'train' \
        else [os.path.join(folder, 'val.bin')]
    if not files or not all(os.path.isfile(f) for f in files):
        die(f"{folder}: the {split} shards are missing — {rebuild}")
    shards = []
    for f in files:
        size = os.path.getsize(f)
        if size == 0 or size % dtype.itemsize:
            die(f"{f} is {size} bytes, not a whole number of {dtype.name} ids — {rebuild}")
        shard = np.memmap(f, dtype=dtype, mode='r')
        if shard.max() >= vocab:
            die(f"{f} holds the id {shard.max()}, outside its {vocab}-token vocabulary — {rebuild}")
        shards.append(shard)
    return shards, files


class PretokWindows(Batches):
    """Random windows of max_seq_len + 1 tokens from memory-mapped shards: x, y (B, T)."""
    def __init__(self, folder, split, *args, **kw):
        super().__init__(*args, **kw)
        self.shards, files = load_shards(folder, split)
        starts = [max(len(s) - self.T, 0) for s in self.shards]  # valid window starts
        self.cum = np.cumsum([0] + starts)
        if self.cum[-1] == 0:
            die(f"{', '.join(files) or folder}: fewer than max_seq_len+1 = {self.T + 1} tokens "
                f"for the {split} split — use a smaller --max_seq_len or more data")

    def batch(self, rng):
        at = rng.integers(0, self.cum[-1], self.B)
        shard = np.searchsorted(self.cum, at, side='right') - 1
        rows = np.stack([self.shards[s][o:o + self.T + 1] for s, o in zip(shard, at - self.cum[shard])])
        rows = rows.astype(np.int64)
        return rows[:, :-1], rows[:, 1:]


def load_sequences(path):
    if not os.path.exists(path):
        die(f"{path} not found — run python preprocess.py sft (or dpo) with the same "
            "--dataset and --vocab_size")
    try:
        with np.load(path) as d:  # (each d[key] would read the array from the file again)
            tokens, mask, o = d['tokens'], d['mask'], d['offsets']
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        die(f"{path} is damaged ({e!r:.60}) — rebuild it with python preprocess.py sft (or dpo)")
    return [(tokens[a:b], mask[a:b]) for a, b in zip(o[:-1], o[1:])]


def rows_of(seqs, length):
    """Pad (or cut) each sequence to length; targets are -1 wherever the mask is 0, so
    prompts and padding never contribute to the loss."""
    tok = np.zeros((len(seqs), length), dtype=np.int64)
    tgt = np.full((len(seqs), length), -1, dtype=np.int64)
    for r, (ids, mask) in enumerate(seqs):
        ids, mask = ids[:length + 1], mask[:length + 1]
        tok[r, :len(ids) - 1] = ids[:-1]
        tgt[r, :len(ids) - 1] = np.where(mask[1:] == 1, ids[1:], -1)
    return tok, tgt


def cannot_teach(path, n, total, what, T):
    """Rows with no target within the first T + 1 tokens could only add a loss of 0, a perfect
    score for nothing learned: refused when that is all of them, else left out with a warning."""
    if n == total:
        die(f"{path}: none of its {total} {what} has an answer token within the first {T + 1} "
            "tokens, so there is nothing to learn — use a larger --max_seq_len (up to the "
            "model's) or shorter conversations")
    if n:
        print(f"warning: {path}: {n} of its {total} {what} have no answer token within the "
              f"first {T + 1} tokens and are left out — use a larger --max_seq_len or shorter "
              "conversations", file=sys.stderr)


def teaches(seq, T):
    """(ids, mask) has a target in its first T + 1 tokens (position 0 is never one)"""
    return bool(seq[1][1:T + 1].any())


class ChatRows(Batches):
    """SFT: conversations packed whole, in file order, into rows of max_seq_len + 1."""
    def __init__(self, path, *args, **kw):
        super().__init__(*args, **kw)
        seqs = load_sequences(path)
        kept = [s for s in seqs if teaches(s, self.T)]
        cannot_teach(path, len(seqs) - len(kept), len(seqs), 'conversations', self.T)
        seqs = kept
        rows, cur, cut = [], [], 0
        for ids, mask in seqs:
            cut += len(ids) > self.T + 1
            if cur and sum(len(i) for i, _ in cur) + len(ids) > self.T + 1:
                rows.append(cur)
                cur = []
            cur.append((ids, mask))
        rows.append(cur)
        if cut:
            print(f"note: {path}: {cut} conversation(s) longer than max_seq_len+1 are cut")
        self.x, self.y = rows_of([(np.concatenate([i for i, _ in r]), np.concatenate([m for _, m in r]))
                                  for r in rows], self.T)

    def batch(self, rng):
        i = rng.integers(0, len(self.x), self.B)
        return self.x[i], self.y[i]


class PreferencePairs(Batches):
    """DPO: B pairs -> x, y (2B, T): rows 0..B-1 the chosen answers, B..2B-1 the rejected.
    A pair is kept when both answers have tokens inside the context."""
    def __init__(self, path, *args, **kw):
        super().__init__(*args, **kw)
        seqs = load_sequences(path)
        pairs = [(seqs[i], seqs[i + 1]) for i in range(0, len(seqs) - 1, 2)
                 if teaches(seqs[i], self.T) and teaches(seqs[i + 1], self.T)]
        cannot_teach(path, len(seqs) // 2 - len(pairs), len(seqs) // 2, 'pairs', self.T)
        self.x, self.y = rows_of([s for pair in pairs for s in pair], self.T)
        self.n = len(pairs)

    def pairs(self, i):
        return (np.concatenate([self.x[2 * i], self.x[2 * i + 1]]),
                np.concatenate([self.y[2 * i], self.y[2 * i + 1]]))

    def batch(self, rng):
        return self.pairs(rng.integers(0, self.n, self.B))

    def in_order(self):
        for a in range(0, self.n, self.B):
            yield self.pairs(np.arange(a, min(a + self.B, self.n)))


# -----------------------------------------------------------------------------

if __name__ == '__main__':
    stages = dict(download=download, synth=synth, train_vocab=train_vocab,
                  pretokenize=pretokenize, sft=lambda: chats('sft'), dpo=lambda: chats('dpo'))
    config, args = configure(globals(), positional=1)
    on_interrupt("a stage writes its files whole or not at all: the ones there are as they were")
    if not args or args[0] not in stages:
        die(f"usage: python preprocess.py STAGE [--key=value ...]; STAGE is one of "
            f"{', '.join(stages)}")
    stages[args[0]]()
