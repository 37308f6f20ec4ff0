"""
End-to-end tests: each trains, runs or downloads something real and compares it with a
reference (SentencePiece, the PyTorch model, an uninterrupted run, the corpus text).

    python -m pytest -q -rs test_all.py

Real data from outside the project is found through FIXTURES (default ../shared/fixtures);
tests that need it are reported as skipped where it is absent.
"""

import contextlib
import copy
import csv
from dataclasses import asdict
import decimal
import glob
import hashlib
import http.server
import importlib
import io
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
import zipfile

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.environ.get('FIXTURES', os.path.join(ROOT, '..', 'shared', 'fixtures'))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import rlhf  # noqa: E402
import synth  # noqa: E402
from checkpoint import (load_model, read_checkpoint, weights_sha256, write_atomic,
                        write_folder)  # noqa: E402
from export_gguf import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED  # noqa: E402
from model import (add_lora, FastDecoder, KVCache, last_tokens, LoRA, LORA_TARGETS, lora_weights,
                   merge_lora, ModelArgs, penalize_repeats, precompute_freqs, RewardModel,
                   sample_next, Transformer, without_adapters)  # noqa: E402
from preprocess import (ChatRows, dataset_name, load_sequences, PreferencePairs, PretokWindows,
                        read_txt, rows_of)  # noqa: E402
from tokenizer import jinja_chat_template, render_chat, Tokenizer, tokenizer_bin  # noqa: E402


VOCAB = 1024
TINY = ['--dim=96', '--n_layers=4', '--n_heads=4', '--n_kv_heads=2', '--max_seq_len=256']
CPU = ['--device=cpu', '--compile=False']


def consumer(name):
    """A package that a test checks our files against (transformers, gguf, llama_cpp): where it
    is missing the test is skipped, but in CI, where .ci/run installs it, that is a failure."""
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get('CI'):
            pytest.fail(f"{name} is not installed, though .ci/run installs it")
        pytest.skip(f"{name} is not installed (.ci/run shows how to install it)")


def py(script, *args, cwd, check=True, env=None, timeout=900):
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd,
                       capture_output=True, text=True, env=env, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(args)} failed ({r.returncode}):\n"
            f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
    return r


def train(cwd, out, *extra):
    args = ['--dataset=synth', f'--vocab_size={VOCAB}', *TINY, *CPU, '--batch_size=16',
            '--gradient_accumulation_steps=1', '--learning_rate=3e-3', '--min_lr=3e-4',
            '--warmup_iters=20', '--eval_iters=10', '--log_interval=1', f'--out_dir={out}', *extra]
    return py('train.py', *args, cwd=cwd)


def train_cmd(out, *extra):
    """The command of a tiny train.py run on the synth corpus, for a test that starts (and
    stops or kills) it itself"""
    return [sys.executable, os.path.join(ROOT, 'train.py'), '--dataset=synth',
            f'--vocab_size={VOCAB}', *TINY, *CPU, '--gradient_accumulation_steps=1',
            '--log_interval=1', f'--out_dir={out}', *extra]


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def snapshot(root):
    """{path: sha256 of its bytes} of every file under root, and every folder (as None)"""
    files = {}
    for d, dirs, names in os.walk(root):
        files.update({os.path.join(d, n): None for n in dirs})
        for n in names:
            p = os.path.join(d, n)
            files[p] = hashlib.sha256(open(
                p, 'rb').read()).hexdigest() if os.path.isfile(p) else 'special'
    return files


def one_error_line(r):
    err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode(errors='replace')
    lines = err.splitlines()
    return r.returncode == 1 and len(lines) == 1 and lines[0].startswith('error: '), err[-2000:]


CASE_RUNNER = r"""
import contextlib, gc, io, json, os, runpy, sys, traceback
results = []
sys.path.insert(0, os.path.dirname(json.loads(sys.argv[1])[0][0]))
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        sys.argv = argv
        try:
            runpy.run_path(argv[0], run_name='__main__')
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            code = 'traceback'
            traceback.print_exc()
    gc.collect()  # the script's globals (train.py's lock on out_dir) go with it
    results.append((code, err.getvalue()))
print(json.dumps(results))
"""


def refused(script, cases, cwd):
    """Run script once per case in one Python process (torch is imported once, so dozens
    of cases take seconds) and check each answer: exit status 1 and exactly one line,
    'error: ...'. cases: {name: [args]}; returns {name: that line}."""
    argvs = [[os.path.join(ROOT, script), *args] for args in cases.values()]
    r = subprocess.run([sys.executable, '-c', CASE_RUNNER, json.dumps(argvs)], cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    answers = {}
    for name, (code, err) in zip(cases, json.loads(r.stdout.splitlines()[-1])):
        lines = err.splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith('error: '), (name, code,
                                                                                  err[-2000:])
        answers[name] = lines[0]
    return answers


def random_checkpoint(path, tokenizer_bytes, vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      seq=512, seed=0, hidden_dim=0, **moe):
    """An untrained model whose BOS and EOS can never win the argmax, so greedy runs go on
    for the whole context (and wander through byte tokens and half characters)."""
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                              vocab_size=vocab, max_seq_len=seq, hidden_dim=hidden_dim, **moe))
    with torch.no_grad():
        m.tok_embeddings.weight[1:3] = 0
    torch.save(
        {
            'model': m.state_dict(),
            'model_args': asdict(m.params),
            'tokenizer': tokenizer_bytes
        }, path)
    return path


def export(work, ckpt, out, *extra):
    py('export.py', str(out), f'--checkpoint={ckpt}', *extra, cwd=work)
    return str(out)


def build(target):
    r = subprocess.run(['make', '-s', target], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return os.path.join(ROOT, target)


def run_c(exe, *args, stdin=subprocess.DEVNULL, check=True):
    r = subprocess.run(
        [exe, *[a.encode('utf-8', 'surrogateescape') if isinstance(a, str) else a
                for a in args]], capture_output=True, stdin=stdin, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr.decode(errors='replace')
    return r


def run_binaries():
    names = os.environ.get('RUN_BINARIES')
    if names:
        return [os.path.abspath(n) for n in names.split(',')]
    return [build('run'), build('runasan')]


def instruct_rate(work, ckpt, n=60):
    r = py('sample.py', f'--checkpoint={ckpt}', '--device=cpu', '--temperature=0',
           f'--eval_instruct={n}', '--max_new_tokens=160', cwd=work)
    k, total = re.search(r'instruction following \(greedy, [^)]*\): (\d+)/(\d+)', r.stdout).groups()
    return int(k) / int(total)


def unigram_entropy(ids, vocab):
    p = np.bincount(ids, minlength=vocab) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def F_cross_entropy(logits, targets):
    return float(torch.nn.functional.cross_entropy(logits, targets))


def safetensors_header(path):
    blob = open(path, 'rb').read()
    n = struct.unpack('<Q', blob[:8])[0]
    return json.loads(blob[8:8 + n])


def other_tokenizer_model(work, path):
    """A small random model with the 2048-token tokenizer: another model's tokenizer.bin"""
    tok2048 = open(os.path.join(work, 'data', 'synth', 'tok2048.model'), 'rb').read()
    return random_checkpoint(str(path), tok2048, 2048, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                             seq=64)


# -----------------------------------------------------------------------------
# shared fixtures: one corpus, one tokenizer, one small trained model (and its fine-tuned
# copy and its exports) per session

@pytest.fixture(scope='session')
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp('work')
    py('preprocess.py', 'synth', cwd=d)
    for v in (VOCAB, 2048):
        py('preprocess.py', 'train_vocab', '--dataset=synth', f'--vocab_size={v}', cwd=d)
    py('preprocess.py', 'pretokenize', '--dataset=synth', f'--vocab_size={VOCAB}', cwd=d)
    return d


@pytest.fixture(scope='session')
def tiny(work):
    """A small model trained for a few hundred steps: (folder, checkpoint path)."""
    train(work, 'out_tiny', '--max_iters=400', '--eval_interval=200')
    return work, os.path.join(work, 'out_tiny', 'ckpt.pt')


@pytest.fixture(scope='session')
def tuned(tiny):
    """SFT then DPO of the tiny model: (work, sft ckpt, dpo ckpt)."""
    work, base = tiny
    py('preprocess.py', 'sft', '--dataset=synth', f'--vocab_size={VOCAB}', cwd=work)
    py('preprocess.py', 'dpo', '--dataset=synth', f'--vocab_size={VOCAB}', cwd=work)
    tune = [
        '--dataset=synth', f'--vocab_size={VOCAB}', *CPU, '--batch_size=16',
        '--gradient_accumulation_steps=1', '--warmup_iters=10', '--eval_iters=10',
        '--log_interval=1'
    ]
    py('train.py', '--task=sft', f'--init_from={base}', '--out_dir=out_sft', *tune,
       '--learning_rate=1e-3', '--min_lr=1e-4', '--max_iters=300', '--eval_interval=150', cwd=work)
    py('train.py', '--task=dpo', '--init_from=out_sft/ckpt.pt', '--out_dir=out_dpo', *tune,
       '--learning_rate=1e-4', '--min_lr=1e-5', '--beta=0.1', '--max_iters=100',
       '--eval_interval=100', '--batch_size=8', cwd=work)
    return work, os.path.join(work, 'out_sft', 'ckpt.pt'), os.path.join(work, 'out_dpo', 'ckpt.pt')


@pytest.fixture(scope='session')
def runc():
    return build('run')


@pytest.fixture(scope='session')
def exported(tiny, tmp_path_factory):
    """The trained tiny model and a random one, as checkpoints and version-0 files."""
    work, ckpt = tiny
    d = tmp_path_factory.mktemp('exported')
    tok_bytes = torch.load(ckpt, weights_only=True)['tokenizer']
    rnd = random_checkpoint(str(d / 'random.pt'), tok_bytes, VOCAB)
    (d / 'trained').mkdir()
    (d / 'random').mkdir()
    return {'trained': (ckpt, export(work, ckpt, d / 'trained' / 'model.bin')),
            'random': (rnd, export(work, rnd, d / 'random' / 'model.bin')), 'work': work, 'dir': d}


# -----------------------------------------------------------------------------
# the corpus: downloads (against a local HTTP server), real TinyStories text, other formats

class Server(http.server.ThreadingHTTPServer):
    pass


def serve(files, cut_first=None):
    """files: {path: bytes}. Supports Range; with cut_first=n the first full response
    sends only n bytes and then drops the connection."""
    log = []

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = files.get(self.path)
            rng = self.headers.get('Range')
            log.append((self.path, rng))
            if body is None:
                self.send_error(404)
                return
            start = int(re.match(r'bytes=(\d+)-', rng).group(1)) if rng else 0
            self.send_response(206 if rng else 200)
            self.send_header('Content-Length', str(len(body) - start))
            self.end_headers()
            if cut_first and not rng and len([l for l in log if not l[1]]) == 1:
                self.wfile.write(body[:cut_first])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body[start:])
    srv = Server(('127.0.0.1', 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, log


def make_tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz') as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_download_resume_and_safety(tmp_path):
    stories = [{"story": f"Story number {i}. " + os.urandom(300).hex()} for i in range(1000)]
    good = make_tar({'data00.json': json.dumps(stories).encode()})
    evil = make_tar({'../escaped.txt': b'gotcha', 'ok.json': b'[]'})
    srv, log = serve({'/TinyStories_all_data.tar.gz': good, '/evil.tar.gz': evil},
                     cut_first=len(good) // 3)
    base = f'http://127.0.0.1:{srv.server_address[1]}'
    try:
        # the first attempt is cut off: a clear error, a .part file, no final file
        r = py('preprocess.py', 'download', f'--url={base}/TinyStories_all_data.tar.gz',
               cwd=tmp_path, check=False)
        assert r.returncode != 0
        part = tmp_path / 'data' / 'TinyStories_all_data.tar.gz.part'
        assert part.exists() and 0 < part.stat().st_size < len(good)
        assert r.stderr.count('\n') == 1 and 'again to resume' in r.stderr
        cut = part.stat().st_size
        assert not (tmp_path / 'data' / 'TinyStories_all_data.tar.gz').exists()
        # the second resumes with a Range request and completes
        r = py('preprocess.py', 'download', f'--url={base}/TinyStories_all_data.tar.gz',
               cwd=tmp_path)
        assert log[-1] == ('/TinyStories_all_data.tar.gz', f'bytes={cut}-')
        assert (tmp_path / 'data' / 'TinyStories_all_data.tar.gz').read_bytes() == good
        assert json.load(open(tmp_path / 'data' / 'TinyStories_all_data' /
                              'data00.json')) == stories
        assert 'MB/s' in r.stdout
        # the downloaded corpus feeds the pipeline
        py('preprocess.py', 'train_vocab', '--vocab_size=300', cwd=tmp_path)
        py('preprocess.py', 'pretokenize', '--vocab_size=300', cwd=tmp_path)
        assert (tmp_path / 'data' / 'tinystories' / 'tok300' / 'val.bin').exists()
        # an archive member that escapes the target folder is refused
        r = py('preprocess.py', 'download', f'--url={base}/evil.tar.gz', cwd=tmp_path, check=False)
        assert r.returncode != 0 and 'refusing' in r.stderr
        assert not (tmp_path / 'escaped.txt').exists() and not (tmp_path / 'data' /
                                                                'escaped.txt').exists()
    finally:
        srv.shutdown()
    # offline: one line that points to synth
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()
    r = py('preprocess.py', 'download', f'--url=http://127.0.0.1:{port}/x.tar.gz', cwd=tmp_path,
           check=False)
    assert r.returncode != 0 and r.stderr.count('\n') == 1 and 'synth' in r.stderr


def test_real_tinystories_sample(tmp_path):
    src = os.path.join(FIXTURES, 'tinystories_train_2MiB.txt')
    if not os.path.exists(src):
        pytest.skip(f"{src} not found (set FIXTURES)")
    py('preprocess.py', 'train_vocab', f'--dataset={src}', f'--vocab_size={VOCAB}', cwd=tmp_path)
    py('preprocess.py', 'pretokenize', f'--dataset={src}', f'--vocab_size={VOCAB}', cwd=tmp_path)
    out = tmp_path / 'out'
    py('train.py', f'--dataset={src}', f'--vocab_size={VOCAB}', *TINY, *CPU, '--batch_size=16',
       '--gradient_accumulation_steps=1', '--learning_rate=3e-3', '--min_lr=3e-4',
       '--warmup_iters=20', '--max_iters=120', '--eval_interval=120', '--eval_iters=10',
       f'--out_dir={out}', cwd=tmp_path)
    val = np.fromfile(tmp_path / 'data' / dataset_name(src) / f'tok{VOCAB}' / 'val.bin',
                      dtype=np.uint16)
    h1 = unigram_entropy(val, VOCAB)
    last = float([r for r in read_log(out / 'log.csv') if r['val_loss']][-1]['val_loss'])
    print(f"real TinyStories 2 MiB: val loss {last:.3f} after 120 steps; unigram entropy {h1:.3f}")
    assert last < h1


def test_corpus_formats(tmp_path):
    """.txt with blank lines, .jsonl with a broken line, a folder, and Chinese text."""
    (tmp_path / 'c').mkdir()
    (tmp_path / 'c' / 'a.txt').write_text("第一个故事。\n很短。\n\n第二个故事。\n", encoding='utf-8')
    (tmp_path / 'c' / 'b.jsonl').write_text('{"text": "third story"}\nnot json\n{"other": 1}\n'
                                            '{"text": "fourth 故事"}\n', encoding='utf-8')
    r = py('preprocess.py', 'train_vocab', '--dataset=c', '--vocab_size=300',
           '--character_coverage=1.0', cwd=tmp_path)
    assert 'skipped 2 line(s)' in r.stderr and 'line 2' in r.stderr
    py('preprocess.py', 'pretokenize', '--dataset=c', '--vocab_size=300', '--val_every=2',
       cwd=tmp_path)
    name = dataset_name(str(tmp_path / 'c'))  # the folder's name and a hash of its path
    tok = Tokenizer(str(tmp_path / 'data' / name / 'tok300.model'))
    folder = tmp_path / 'data' / name / 'tok300'
    docs = []
    for f in ('val.bin', 'train_000.bin'):
        ids = np.fromfile(folder / f, dtype=np.uint16)
        docs.append([tok.decode(d) for d in np.split(ids, np.flatnonzero(ids == tok.bos_id)[1:])])
    # documents[::2] are validation: a.txt's two documents, then b.jsonl's two good lines
    assert docs == [["第一个故事。\n很短。", "third story"], ["第二个故事。", "fourth 故事"]]
    empty = tmp_path / 'empty.txt'
    empty.write_text("\n\n")
    r = py('preprocess.py', 'pretokenize', f'--dataset={empty}', '--vocab_size=300', cwd=tmp_path,
           check=False)
    assert r.returncode != 0 and 'no documents' in r.stderr
    r = py('preprocess.py', 'pretokenize', '--dataset=nope', cwd=tmp_path, check=False)
    assert r.returncode != 0 and r.stderr.count('\n') == 1
    # a corpus that fails halfway, an unknown one (the tokenizer exists), too few chat rows:
    # one line each, at once, and the shards of the last good run are left as they were
    shards = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    with open(tmp_path / 'c' / 'a.txt', 'ab') as f:
        f.write(b'\xff\xfe not UTF-8\n')
    one = tmp_path / 'one.jsonl'
    one.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                   '{"role": "assistant", "content": "hello"}]}\n')
    for stage, ds, words in (('pretokenize', 'c', 'not UTF-8'), ('pretokenize', 'nope', 'neither'),
                             ('sft', str(one), 'no usable conversations')):
        r = py('preprocess.py', stage, f'--dataset={ds}', '--vocab_size=300', cwd=tmp_path,
               check=False, timeout=120,
               *[f'--tokenizer=data/{name}/tok300.model'] * (stage == 'sft'))
        assert r.returncode == 1 and r.stderr.count('\n') == 1 and words in r.stderr, (stage, ds,
                                                                                       r.stderr)
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == shards
    assert not glob.glob(str(tmp_path / 'data' / 'nope*'))


# -----------------------------------------------------------------------------
# the tokenizer and the chat template

ROUNDTRIP = ["Once upon a time, there was a little cat.", "从前有一只小兔子，它很开心。",
             "emoji 😀🎉 and ✨", "digits 1234567890 3.14", "  two leading spaces",
             "trailing  ", "tabs\tand\nnew\n\nlines", "", " ", "\n", "mixed 中文 and English 123",
             "<|im_start|>user\nhi<|im_end|>\n", "a\u00a0non-breaking space", "ｆｕｌｌｗｉｄｔｈ！"]


def test_tokenizer_roundtrip_and_chat_tokens(work):
    tok = Tokenizer(os.path.join(work, 'data', 'synth', f'tok{VOCAB}.model'))
    for s in ROUNDTRIP:
        assert tok.decode(tok.encode(s)) == s, s
        assert tok.decode(tok.encode(s, bos=True, eos=True)) == s, s
    assert tok.sp.encode("<|im_start|>") == [tok.sp.piece_to_id('▁'), tok.im_start_id]
    assert tok.encode("<|im_start|>") == [tok.im_start_id]  # no text before it, as llama.cpp
    # after a chat token, text is encoded as new text (llama.cpp's and HF's rule, not
    # SentencePiece's)
    assert tok.encode("<|im_end|>user") == [tok.im_end_id, *tok.sp.encode("user")]
    assert tok.sp.encode("<|im_end|>user") != tok.encode("<|im_end|>user")
    ids = tok.encode("x<|im_end|>y", dummy_prefix=False)
    assert ids.count(tok.im_end_id) == 1 and (tok.im_start_id, tok.im_end_id) == (3, 4)
    assert tok.encode("Hi", dummy_prefix=False) != tok.encode("Hi")  # no '▁Hi'
    assert tok.decode(tok.encode("Hi there", dummy_prefix=False)) == "Hi there"
    # Chinese characters of the corpus are real tokens, not only byte fallback
    assert not any(tok.sp.is_byte(i) for i in tok.encode("小兔子"))
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.n_words == VOCAB


def test_chat_template_mask(work):
    tok = Tokenizer(os.path.join(work, 'data', 'synth', f'tok{VOCAB}.model'))
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there!"}, {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "你好"}]
    ids, mask = tok.encode_chat(msgs)
    assert tok.decode(ids) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello there!<|im_end|>\n<|im_start|>user\nAgain"
        "<|im_end|>\n<|im_start|>assistant\n你好<|im_end|>\n")
    # text right after a chat token carries the dummy prefix ('▁system', '▁\n'), as llama.cpp
    # and Hugging Face tokenize the rendered template
    assert tok.encode_chat(msgs[:1])[0] == [
        tok.bos_id, tok.im_start_id, *tok.sp.encode("system\n"),
        *tok.encode("Be kind.", dummy_prefix=False), tok.im_end_id, *tok.sp.encode("\n")
    ]
    learned = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(learned) == "Hello there!<|im_end|>你好<|im_end|>"
    # the masked span is exactly each assistant content plus its <|im_end|>
    runs = re.findall(r'1+', ''.join(map(str, mask)))
    assert len(runs) == 2


# -----------------------------------------------------------------------------
# token shards and batches

def test_pretokenize_and_loader(work):
    tok = Tokenizer(os.path.join(work, 'data', 'synth', f'tok{VOCAB}.model'))
    folder = os.path.join(work, 'data', 'synth', f'tok{VOCAB}')
    meta = json.load(open(os.path.join(folder, 'meta.json')))
    assert meta['dtype'] == 'uint16' and meta['vocab_size'] == VOCAB
    text = open(os.path.join(work, 'data', 'synth', 'stories.txt'), encoding='utf-8').read()
    docs = [d.strip() for d in text.split('<|endoftext|>') if d.strip()]

    def split_docs(path):
        ids = np.fromfile(path, dtype=np.uint16)
        assert ids[0] == tok.bos_id
        cuts = np.flatnonzero(ids == tok.bos_id)
        return [tok.decode(d) for d in np.split(ids, cuts[1:])]
    val = split_docs(os.path.join(folder, 'val.bin'))
    train = split_docs(os.path.join(folder, 'train_000.bin'))
    assert val == docs[::100]                       # the documented slice
    assert not set(val) & set(train)                # disjoint
    assert len(val) + len(train) == len(docs)
    # random windows decode back to corpus text, deterministically per (seed, rank, k)
    ds = PretokWindows(folder, 'train', 4, 64, seed=7, rank=0)
    x, y = ds.batch(ds.rng(3))
    assert np.array_equal(x[:, 1:], y[:, :-1]) and x.shape == (4, 64)
    for row in x:  # documents inside a window are separated by BOS
        for doc in np.split(row, np.flatnonzero(row == tok.bos_id)):
            piece = tok.decode(doc).strip()
            assert piece[3:-3] in text  # the ends may hold part of a word or character
    x2, _ = PretokWindows(folder, 'train', 4, 64, seed=7, rank=0).batch(ds.rng(3))
    assert np.array_equal(x, x2)
    other_rank, _ = PretokWindows(folder, 'train', 4, 64, seed=7, rank=1).batch(
        PretokWindows(folder, 'train', 4, 64, seed=7, rank=1).rng(3))
    assert not np.array_equal(x, other_rank)


# -----------------------------------------------------------------------------
# the model: the KV cache, generation, sampling, one expert

@pytest.mark.parametrize('threads', [1, 2, 3])
def test_kv_cache_generation_equals_full_forward(threads, monkeypatch):
    """Generation with the KV cache gives the tokens and logits of the plain full forward,
    through forward() itself and through FastDecoder (q|k|v and w1|w3 fused into one matmul
    each, transposed weights in a block of columns per thread: 3 threads divide neither the
    vocabulary (256) nor q|k|v (128), which fall back to 2 blocks, while w1|w3 (384) takes 3)."""
    monkeypatch.setattr(torch, 'get_num_threads', lambda: threads)
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256,
                              max_seq_len=96)).eval()
    prompt = torch.randint(3, 256, (2, 9))
    slow = prompt
    with torch.no_grad():
        for _ in range(60):  # no cache: the whole sequence every step
            logits, _ = m(slow, torch.zeros_like(slow))
            slow = torch.cat([slow, logits[:, -1].argmax(-1, keepdim=True)], 1)
    for fast in (False, True):
        assert torch.equal(m.generate(prompt, 60, temperature=0, fast=fast), slow), fast
    # incremental logits equal the full forward's at every position, also in blocks
    x = torch.randint(0, 256, (1, 40))
    full, _ = m(x, torch.zeros_like(x))
    blocks = ((0, 10), (10, 11), (11, 25), (25, 40))
    with torch.no_grad():
        cache, fast_cache = KVCache(m, 1, 40), KVCache(m, 1, 40)
        step = FastDecoder(m, fast_cache)
        for a, b in blocks:
            plain, fast = m(x[:, a:b], cache=cache)[0][:, -1], step(x[:, a:b])[:, -1]
            assert torch.allclose(plain, full[:, b - 1], atol=1e-5)
            assert torch.allclose(fast, full[:, b - 1], atol=1e-5)
        assert cache.pos == fast_cache.pos == 40


def test_generation_leaves_training_unchanged():
    """A model that generated, and whose KV cache is still alive (as in a chat), trains as an
    identical model that never generated: equal gradients, equal weights after an AdamW step."""
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=48)
    used, fresh = Transformer(args), Transformer(args)
    fresh.load_state_dict(used.state_dict())
    used.generate(torch.randint(3, 256, (2, 5)), 20, temperature=0)
    cache = KVCache(used, 1, 48)
    used(torch.randint(3, 256, (1, 7)), cache=cache)
    # generation left nothing on the model's modules
    assert all(vars(a).keys() == vars(b).keys() for a, b in zip(used.modules(), fresh.modules()))
    x, y = torch.randint(0, 256, (2, 4, 48))
    opts = [m.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu') for m in (used, fresh)]
    for m in (used, fresh):
        m.train()(x, y)[1].backward()
    for (name, a), b in zip(used.named_parameters(), fresh.parameters()):
        assert a.grad is not None and torch.equal(a.grad, b.grad), name
    for opt in opts:
        opt.step()
    for (name, a), b in zip(used.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


def test_sampler_distribution():
    """Top-k and top-p sampling draw from exactly the renormalised nucleus (checked
    against the analytic distribution), and temperature 0 is the argmax."""
    logits = torch.log(torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]]))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # token perm[i] has the i-th largest probability
    shuffled = torch.empty_like(logits)
    shuffled[0, perm] = logits[0]
    g = torch.Generator().manual_seed(0)
    n = 40000
    for top_k, top_p, keep in ((0, 0.0, 6), (0, 0.7, 3), (0, 0.9, 4), (2, 0.0, 2), (4, 0.5, 2)):
        draws = sample_next(shuffled.expand(n, -1), 1.0, top_k, top_p, generator=g)
        freq = torch.bincount(draws, minlength=6).float()[perm] / n  # back in probability order
        want = torch.zeros(6)
        want[:keep] = logits.exp()[0, :keep] / logits.exp()[0, :keep].sum()
        assert torch.allclose(freq, want, atol=0.01), (top_k, top_p, freq, want)
    assert sample_next(shuffled, 0.0).item() == 3


def test_moe_with_one_expert_is_the_dense_model():
    """n_experts=1, n_experts_per_tok=1 computes exactly the dense model (its one expert holds
    the dense feed-forward); with 4 experts, 2 per token, KV-cache generation equals the full
    forward pass, every expert gets a gradient (also one that no token chose), and the
    load-balancing loss is 1 when the router is even and 2 when two of four take all."""
    torch.manual_seed(0)
    args = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=64)
    dense, one = Transformer(ModelArgs(**args)), Transformer(
        ModelArgs(**args, n_experts=1, n_experts_per_tok=1))
    sd = {
        k.replace('feed_forward.', 'feed_forward.experts.0.'): v
        for k, v in dense.state_dict().items()
    }
    sd.update({k: v for k, v in one.state_dict().items() if k.endswith('feed_forward.gate.weight')})
    one.load_state_dict(sd)
    x = torch.randint(0, 300, (3, 40))
    a, loss_a = dense(x, x)
    b, loss_b = one(x, x)
    assert torch.equal(a, b) and torch.equal(loss_a, loss_b)
    assert one.aux_loss().item() == 1.0 and dense.aux_loss() == 0.0

    moe = Transformer(ModelArgs(**args, n_experts=4, n_experts_per_tok=2))
    out = moe.generate(x[:, :5], 20, temperature=0)
    with torch.no_grad():
        full, _ = moe(out[:, :-1], out[:, :-1])
    assert torch.equal(out[:, 5:], full[:, 4:].argmax(-1))
    ffn = moe.layers[0].feed_forward
    x = torch.rand(10, 1, 64)  # positive inputs, so the router's rows below decide for every token
    with torch.no_grad():
        ffn.gate.weight.zero_()
    ffn(x)
    assert ffn.aux_loss.item() == pytest.approx(1.0)  # an even router
    with torch.no_grad():  # experts 0 and 1 take every token, 2 and 3 none
        ffn.gate.weight.copy_(torch.tensor([1.0, 1.0, -1.0, -1.0])[:, None].expand(4, 64) * 100)
    ffn(x).sum().add(ffn.aux_loss).backward()
    assert ffn.load.tolist() == [0.5, 0.5, 0.0, 0.0]
    assert ffn.aux_loss.item() == pytest.approx(4 * (0.5 * 0.5 + 0.5 * 0.5), abs=1e-4)  # 2
    assert all(p.grad is not None for p in ffn.parameters())  # those that no token chose too


# -----------------------------------------------------------------------------
# training: learning, resume, DDP, compile, interruptions, trackers

def test_training_learns(tiny):
    work, ckpt_path = tiny
    rows = read_log(os.path.join(work, 'out_tiny', 'log.csv'))
    evals = [r for r in rows if r['val_loss']]
    first, last = float(evals[0]['val_loss']), float(evals[-1]['val_loss'])
    val = np.fromfile(os.path.join(work, 'data', 'synth', f'tok{VOCAB}', 'val.bin'),
                      dtype=np.uint16)
    h1 = unigram_entropy(val, VOCAB)
    print(f"val loss {first:.3f} -> {last:.3f}; unigram entropy {h1:.3f} nats")
    assert first > math.log(VOCAB) - 0.3   # starts near uniform
    assert last < first / 4 and last < h1 * 0.5
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config',
            'tokenizer'} <= ckpt.keys() and ckpt['iter_num'] == 400
    assert Tokenizer(ckpt['tokenizer']).n_words == VOCAB


def test_resume_matches_uninterrupted(work):
    """The resumed half also cuts its batches in 2 DataLoader workers: the same stream."""
    common = ['--max_iters=24', '--lr_decay_iters=24', '--eval_interval=12', '--warmup_iters=5']
    train(work, 'out_straight', *common)
    train(work, 'out_split', *common[1:], '--max_iters=12')
    ck = torch.load(os.path.join(work, 'out_split', 'ckpt.pt'), weights_only=True)
    assert ck['iter_num'] == 12
    train(work, 'out_split', *common, '--init_from=resume', '--num_workers=2')
    a = read_log(os.path.join(work, 'out_straight', 'log.csv'))
    b = read_log(os.path.join(work, 'out_split', 'log.csv'))
    steps = lambda rows: [(r['iter'], r['lr']) for r in rows
                          if r['train_loss'] and not r['val_loss']]
    assert steps(a) == steps(b) and len(steps(a)) == 24
    la = [float(r['train_loss']) for r in a if not r['val_loss']]
    lb = [float(r['train_loss']) for r in b if not r['val_loss']]
    assert np.allclose(la, lb, rtol=1e-4, atol=1e-5)
    fa = torch.load(os.path.join(work, 'out_straight', 'ckpt.pt'), weights_only=True)
    fb = torch.load(os.path.join(work, 'out_split', 'ckpt.pt'), weights_only=True)
    assert fa['iter_num'] == fb['iter_num'] == 24
    # Float rounding may differ between machines' runs, so the weights are measured against the
    # distance the second half moved them (a resume on another data stream is off by 0.28 of it).
    dist = lambda p, q: math.sqrt(sum(float(((p[k] - q[k]) ** 2).sum()) for k in p))
    off, moved = dist(fa['model'], fb['model']), dist(fa['model'], ck['model'])
    worst = max(float((fa['model'][k] - fb['model'][k]).abs().max()) for k in fa['model'])
    assert off < 1e-3 * moved, \
        f"resumed weights off by {off:.3g} of {moved:.3g} moved (max {worst:.3g})"


@pytest.mark.parametrize('experts', [[], ['--n_experts=4', '--n_experts_per_tok=1']],
                         ids=['dense', 'moe'])
def test_torchrun_ddp_cpu(work, experts):
    out = os.path.join(work, f'out_ddp{len(experts)}')
    args = [
        '--standalone', '--nproc_per_node=2',
        os.path.join(ROOT, 'train.py'), '--dataset=synth', f'--vocab_size={VOCAB}', *TINY, *CPU,
        '--batch_size=8', '--gradient_accumulation_steps=2', '--max_iters=6', '--eval_interval=3',
        '--eval_iters=2', '--log_interval=1', f'--out_dir={out}', *experts
    ]
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', *args], cwd=work,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[:4000]  # the first failing rank's traceback comes first
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.csv']  # (the lock is on the folder itself)
    rows = read_log(os.path.join(out, 'log.csv'))
    iters = [int(r['iter']) for r in rows if not r['val_loss']]
    assert iters == list(range(6))  # written once, by rank 0
    assert r.stdout.count('saved ') == 2
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num'] == 6


def test_torch_compile_on_cpu_matches_eager(work):
    """--compile=True (Inductor, which builds C++ kernels on the CPU) trains to the same
    losses as eager mode from the same seed, and saves a checkpoint with plain names."""
    losses = {}
    for mode in ('False', 'True'):
        out = os.path.join(work, f'out_compile_{mode}')
        args = [
            '--dataset=synth', f'--vocab_size={VOCAB}', '--dim=32', '--n_layers=2', '--n_heads=4',
            '--n_kv_heads=2', '--max_seq_len=64', '--device=cpu', f'--compile={mode}',
            '--batch_size=8', '--max_iters=4', '--eval_interval=100', '--eval_iters=1',
            '--log_interval=1', f'--out_dir={out}'
        ]
        py('train.py', *args, cwd=work)
        losses[mode] = [
            float(r['train_loss']) for r in read_log(os.path.join(out, 'log.csv'))
            if not r['val_loss']
        ]
        small = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                      vocab_size=VOCAB))
        assert torch.load(os.path.join(out, 'ckpt.pt'),
                          weights_only=True)['model'].keys() == small.state_dict().keys()
    assert len(losses['True']) == 4 and np.allclose(losses['True'], losses['False'],
                                                    rtol=1e-4), losses


def test_bad_flags_one_line(work):
    for flag, words in (('--batch_sise=8', 'batch_size'), ('--batch_size=abc', 'expected int')):
        r = py('train.py', flag, cwd=work, check=False)
        assert r.returncode != 0 and r.stderr.count('\n') == 1 and words in r.stderr, r.stderr
        assert r.stderr.startswith('error:')
    r = py('train.py', '--dataset=nothing_here', cwd=work, check=False)
    assert r.returncode != 0 and r.stderr.count('\n') == 1 and 'preprocess.py' in r.stderr


def test_two_runs_on_one_out_dir(work):
    """A second train.py on an out_dir in use stops at once, naming the process that holds
    it; the first run's checkpoint and log are its own; once it ends, the lock is free."""
    out = os.path.join(work, 'out_twice')
    args = train_cmd(out, '--batch_size=4', '--eval_interval=10', '--eval_iters=1')
    first = subprocess.Popen(args + ['--max_iters=30'], cwd=work, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    while not first.stdout.readline().startswith('iter 0'):
        assert first.poll() is None, first.stderr.read()
    second = subprocess.run(args + ['--max_iters=5'], cwd=work, capture_output=True, text=True)
    rest, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 1 and second.stderr.count('\n') == 1, second.stderr
    assert f'in use by another training run (process {first.pid})' in second.stderr
    steps = [int(r['iter']) for r in read_log(os.path.join(out, 'log.csv')) if not r['val_loss']]
    assert steps == list(range(30))
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num'] == 30
    again = subprocess.run(args + ['--max_iters=31', '--init_from=resume'], cwd=work,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]


def test_sigkill_during_saves_never_corrupts(work):
    """Kill train.py with SIGKILL while it writes checkpoints (every iteration), many
    times; each time the checkpoint on disk loads, and resuming continues from it."""
    out = os.path.join(work, 'out_kill')
    args = train_cmd(out, '--batch_size=4', '--eval_interval=1', '--eval_iters=1')
    kills_mid_save, trials, last_iter = 0, int(os.environ.get('KILL_TRIALS',
                                                              6)), 0  # more: KILL_TRIALS=40
    for trial in range(trials):
        init = ['--init_from=resume'] if os.path.exists(os.path.join(out, 'ckpt.pt')) else []
        for tmp in glob.glob(os.path.join(out, 'ckpt.pt.tmp*')):  # left by the last kill
            os.remove(tmp)
        p = subprocess.Popen(args + init + ['--max_iters=1000'], cwd=work, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        # let trial % 3 saves complete, then kill during the next one (its temporary file)
        saves = 0
        while saves < trial % 3:
            saves += p.stdout.readline().startswith('saved ')
        tmp = os.path.join(out, f'ckpt.pt.tmp{p.pid}')  # write_atomic's name
        deadline = time.time() + 120
        while not os.path.exists(tmp) and time.time() < deadline and p.poll() is None:
            time.sleep(0.0005)
        mid = os.path.exists(tmp)
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills_mid_save += mid
        if not os.path.exists(os.path.join(out, 'ckpt.pt')):  # killed in the very first save
            assert last_iter == 0
            continue
        ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)  # never corrupt
        assert ck['iter_num'] >= last_iter
        last_iter = ck['iter_num']
        load_model(os.path.join(out, 'ckpt.pt'))
    print(f"{trials} SIGKILLs, {kills_mid_save} while a checkpoint was being written; "
          f"0 corrupt; last iteration {last_iter}")
    assert kills_mid_save >= trials // 2 and last_iter > 0
    r = subprocess.run(args + ['--init_from=resume', f'--max_iters={last_iter + 2}'],
                       cwd=work, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"iter {last_iter} |" in r.stdout and torch.load(
        os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num'] == last_iter + 2


def test_sigint_saves_and_exits(work):
    out = os.path.join(work, 'out_int')
    p = subprocess.Popen(train_cmd(out, '--batch_size=4', '--max_iters=100000',
                                   '--eval_interval=100000'),
                         cwd=work, stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith('iter 3 |'):
            p.send_signal(signal.SIGINT)
            break
    rest = p.stdout.read()
    assert p.wait() == 0
    n = int(re.search(r'interrupted: saving at iteration (\d+)', rest).group(1))
    assert torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)['iter_num'] == n >= 4


def test_nan_loss_stops_and_keeps_checkpoint(work):
    out = os.path.join(work, 'out_nan')
    train(work, out, '--max_iters=4', '--eval_interval=4')
    before = open(os.path.join(out, 'ckpt.pt'), 'rb').read()
    r = py('train.py', '--dataset=synth', f'--vocab_size={VOCAB}', *CPU, '--batch_size=4',
           '--gradient_accumulation_steps=1', '--learning_rate=1e30', '--warmup_iters=0',
           '--grad_clip=0', '--max_iters=50', '--eval_interval=10', f'--out_dir={out}',
           '--init_from=resume', cwd=work, check=False)
    assert r.returncode == 1 and re.search(r'at iteration \d+', r.stderr), r.stderr
    assert r.stderr.count('\n') == 1
    assert open(os.path.join(out, 'ckpt.pt'), 'rb').read() == before
    # a fresh run that diverges before its first checkpoint leaves the log beside ckpt.pt too
    log = open(os.path.join(out, 'log.csv'), 'rb').read()
    r = py('train.py', '--dataset=synth', f'--vocab_size={VOCAB}', *TINY, *CPU, '--batch_size=4',
           '--learning_rate=1e30', '--warmup_iters=0', '--grad_clip=0', '--max_iters=50',
           '--eval_interval=10', f'--out_dir={out}', cwd=work, check=False)
    assert r.returncode == 1 and r.stderr.count('\n') == 1, r.stderr
    assert open(os.path.join(out, 'ckpt.pt'), 'rb').read() == before
    assert open(os.path.join(out, 'log.csv'), 'rb').read() == log


def test_unwritable_or_full_out_dir(work, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    r = py('train.py', '--dataset=synth', f'--vocab_size={VOCAB}', *TINY, *CPU, '--max_iters=1',
           f'--out_dir={blocker}/out', cwd=work, check=False)
    assert r.returncode == 1 and r.stderr.count('\n') == 1 and 'out_dir' in r.stderr
    # a full disk: the next checkpoint cannot be written, the previous one stays intact
    out = os.path.join(work, 'out_full')
    train(work, out, '--max_iters=2', '--eval_interval=2')
    before = open(os.path.join(out, 'ckpt.pt'), 'rb').read()
    log = open(os.path.join(out, 'log.csv'), 'rb').read()

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, len(before) // 2))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
    r = subprocess.run([
        sys.executable,
        os.path.join(ROOT, 'train.py'), '--dataset=synth', f'--vocab_size={VOCAB}', *CPU,
        '--batch_size=4', '--gradient_accumulation_steps=1', '--max_iters=4', '--eval_interval=2',
        '--eval_iters=1', f'--out_dir={out}', '--init_from=resume'
    ], cwd=work, capture_output=True, text=True, preexec_fn=small_files)
    assert r.returncode == 1 and 'previous checkpoint and its log are intact' in r.stderr, r.stderr
    assert open(os.path.join(out, 'ckpt.pt'), 'rb').read() == before
    assert open(os.path.join(out, 'log.csv'), 'rb').read() == log  # no row the checkpoint lacks
    assert not glob.glob(os.path.join(out, 'ckpt.pt.tmp*'))


def test_short_shard_is_a_clear_error(work, tmp_path):
    short = tmp_path / 'short.txt'
    short.write_text("A tiny story.\n<|endoftext|>\nAnother one.\n<|endoftext|>\n")
    py('preprocess.py', 'pretokenize', f'--dataset={short}', f'--vocab_size={VOCAB}',
       f'--tokenizer={work}/data/synth/tok{VOCAB}.model', f'--data_dir={work}/data', cwd=tmp_path)
    r = py('train.py', f'--dataset={short}', f'--vocab_size={VOCAB}', *TINY, *CPU, '--max_iters=1',
           f'--data_dir={work}/data', f'--out_dir={tmp_path}/out', cwd=tmp_path, check=False)
    assert r.returncode == 1 and r.stderr.count('\n') == 1
    assert 'val.bin' in r.stderr or 'train_000.bin' in r.stderr
    assert 'max_seq_len' in r.stderr


def swanlab_run(out_dir):
    """The run SwanLab kept in out_dir/swanlog (offline mode), read with SwanLab's own reader
    of its run file (pinned with swanlab in .ci/run): its start record, and {key: {step: value}}
    of every scalar logged, less SwanLab's own (__swanlab__.cpu.pct, ...)."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader
    path, = glob.glob(os.path.join(out_dir, 'swanlog', 'run-*', 'run-*.swanlab'))
    reader, start, scalars = DataStoreReader(), None, {}
    reader.open(path)
    for blob in reader:
        rec = Record()
        rec.ParseFromString(blob)
        if rec.WhichOneof('record_type') == 'start':
            start = rec.start
        if rec.WhichOneof('record_type') == 'scalar' and not rec.scalar.key.startswith('__'):
            scalars.setdefault(rec.scalar.key, {})[rec.scalar.step] = rec.scalar.value.number
    reader.close()
    return start, scalars


LOG_COLUMNS = ('iter', 'train_loss', 'val_loss', 'lr', 'tokens_per_sec')  # every task's


def tracked(rows):
    """What a tracker must be sent, from log.csv's rows: {key: {iter: the logged text}}. An
    eval row's numbers go under eval/, a step's loss and extras under train/ (train.py's
    columns, or train_rl.py's, whose eval rows are those with an instruct)."""
    want = {}
    for r in rows:
        if 'instruct' in r:  # train_rl.py
            names = {k: ('lr' if k == 'lr' else ('eval/' if r['instruct'] else 'train/') + k)
                     for k in r if k != 'iter'}
        else:
            kind = 'eval/' if r['val_loss'] else 'train/'
            names = {'val_loss': 'eval/val', 'train_loss': 'eval/train'} if r['val_loss'] else \
                {'train_loss': 'train/loss', 'lr': 'lr', 'tokens_per_sec': 'tok_s'}
            names.update({k: kind + k for k in r if k not in LOG_COLUMNS})  # the task's extras
        for column, key in [('iter', 'iter'), *names.items()]:
            if r[column]:
                want.setdefault(key, {})[int(r['iter'])] = r[column]
    return want


def test_swanlab_logs_what_log_csv_holds(tuned, tmp_path):
    """--swanlab_log=True in offline mode (no network): a pretraining run of a mixture of
    experts (val bits per byte, expert load, aux loss) and a few RL steps (rewards, KL; no
    tokens/s) send SwanLab every number of their log.csv, at its iteration, and nothing else,
    under the project and run name given."""
    consumer('swanlab')
    work, sft, _ = tuned
    swan = ['--swanlab_log=True', '--swanlab_mode=offline', '--swanlab_project=tiny']
    runs = {'pretrain': ['--n_experts=4', '--n_experts_per_tok=1', '--batch_size=4',
                         '--max_seq_len=64', '--max_iters=4', '--eval_interval=2',
                         '--eval_iters=2'],
            'rl': [*RL, f'--init_from={sft}', '--max_new_tokens=24', '--eval_iters=2',
                   '--max_iters=2', '--eval_interval=2']}
    for task, args in runs.items():
        out = str(tmp_path / task)
        if task == 'rl':
            py('train_rl.py', *args, *swan, f'--swanlab_run_name={task}-run', f'--out_dir={out}',
               cwd=work)
        else:
            train(work, out, *args, *swan, f'--swanlab_run_name={task}-run')
        start, got = swanlab_run(out)
        want = tracked(read_log(os.path.join(out, 'log.csv')))
        assert (start.project, start.name) == ('tiny', f'{task}-run')
        assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}
        for key, steps in want.items():
            for step, text in steps.items():  # equal to the digits log.csv printed
                last_digit = 10.0 ** decimal.Decimal(text).as_tuple().exponent
                assert abs(got[key][step] - float(text)) <= 0.51 * last_digit, (task, key, step)
        print(f"swanlab, {task}: {sum(map(len, want.values()))} values of {len(want)} keys, "
              "as in log.csv")


# -----------------------------------------------------------------------------
# fine-tuning: SFT and DPO

def test_sft_loss_mask(work):
    """The targets are exactly the assistant spans, and masked positions get no gradient."""
    py('preprocess.py', 'sft', '--dataset=synth', f'--vocab_size={VOCAB}', cwd=work)
    tok = Tokenizer(os.path.join(work, 'data', 'synth', f'tok{VOCAB}.model'))
    rows = [json.loads(l) for l in open(os.path.join(work, 'data', 'synth', 'sft_train.jsonl'))]
    ds = ChatRows(os.path.join(work, 'data', 'synth', f'sft{VOCAB}', 'train.npz'), 4, 256)
    x, y = torch.from_numpy(ds.x[0]), torch.from_numpy(ds.y[0])
    first = [m for m in rows[0]['messages']]
    # the first row starts with the first conversation; its targets spell its answer
    assert tok.decode(x[:20].tolist()).startswith("<|im_start|>user\n")
    learned = [int(t) for t in y if t != -1]
    answer = first[1]['content'] + "<|im_end|>"
    assert tok.decode(learned).startswith(answer)
    # padding never counts
    x2, y2 = rows_of([(np.array([1, 5, 6, 7]), np.array([0, 0, 1, 1]))], 8)
    assert y2.tolist() == [[-1, 6, 7, -1, -1, -1, -1, -1]]
    m = Transformer(
        ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=VOCAB, max_seq_len=256))
    logits, loss = m(x[None], y[None])
    logits.retain_grad()
    loss.backward()
    masked = (y == -1)
    assert masked.any() and (~masked).any()
    assert logits.grad[0][masked].abs().max() == 0 and logits.grad[0][~masked].abs().max() > 0


def test_sft_follows_instructions_better(tiny, tuned):
    work, base = tiny
    _, sft, _ = tuned
    before, after = instruct_rate(work, base), instruct_rate(work, sft)
    print(f"held-out instruction following: pretrained {before:.1%}, SFT {after:.1%}")
    assert after >= before + 0.15
    ck = torch.load(sft, weights_only=True)
    assert ck['task'] == 'sft' and ck['chat_template'][
        'generation_prompt'] == "<|im_start|>assistant\n"


def test_dpo_raises_preference_accuracy(tuned):
    work, _, dpo = tuned
    evals = [r for r in read_log(os.path.join(work, 'out_dpo', 'log.csv')) if r['val_loss']]
    first, last = evals[0], evals[-1]
    print(f"DPO held-out: accuracy {first['pref_acc']} -> {last['pref_acc']}, "
          f"log-prob margin {first['logp_margin']} -> {last['logp_margin']}")
    assert float(last['pref_acc']) > float(first['pref_acc'])
    assert float(last['logp_margin']) > float(first['logp_margin'])
    assert float(last['val_loss']) < float(first['val_loss'])
    assert torch.load(dpo, weights_only=True)['task'] == 'dpo'


# -----------------------------------------------------------------------------
# after SFT: the reward model and RL (rlhf.py against hand computations, train_rl.py)

def test_reward_rule_on_hand_written_answers():
    """RL's reward counts what the held-out check counts (synth.follows), on answers written by
    hand: a story must introduce the asked-for animal as its hero, so the loophole of a story
    about another animal with the asked-for one as its helper scores 0, in English and in
    Chinese; a question's answer must name the asked-for fact and no other character."""
    dog = {"kind": "story_en", "hero": ["dog"], "want": ["kite"]}
    right = "Once upon a time, there was a little dog named Max. Max wanted a kite. It was stuck."
    no_wish = "Once upon a time, there was a little dog named Max. Max wanted a ball."
    helper = ("Once upon a time, there was a little cat named Max. Max wanted a kite. Luna the dog "
              "climbed the tree and brought the kite down. Max was happy.")
    cut = "Once upon a time, there was a little dog named Max. Max wanted a kite and"
    xiao = {"kind": "story_zh", "hero": ["小狗"], "want": ["风筝"]}
    zh_right = "从前，有一只小狗，名叫豆豆。豆豆想要一只风筝。豆豆又开心起来了。"
    zh_helper = "从前，有一只小猫，名叫豆豆。豆豆想要一只风筝。小狗乐乐跑得飞快，把风筝追了回来。"
    cases = [(right, dog, 1.2), (no_wish, dog, 1.0), (helper, dog, 0.0), (cut, dog, 0.0),
             (zh_right, xiao, 1.2), (zh_helper, xiao, 0.0)]
    for answer, check, want in cases:
        assert synth.reward(answer, check, stopped=True) == pytest.approx(want), answer
        assert synth.follows(answer, check) == (want >= 1)  # the reward is the check's
        assert synth.reward(answer, check, stopped=False) == 0.0  # never stopped: nothing
    assert synth.passes(right, dog) and not synth.passes(no_wish, dog)
    # a question's answer is right or wrong: the asked-for name, and no other one
    (_, answer), question = next((m, c) for m, c in synth.instructions(200)
                                 if "Question: Who helped" in m[0]['content'])
    helper, hero = answer['content'].split(' helped ')  # "Ned helped Otto."
    other = next(n for n, _ in synth.NAMES if n not in (helper, hero.rstrip('.')))
    assert question['must'] == [
        helper
    ] and other in question['not'] and hero.rstrip('.') not in question['not']
    assert synth.reward(f"{helper} helped {hero}", question, stopped=True) == 1.0
    # the two loopholes RL found: name everyone, or no one
    for loophole in (f"{other} helped {hero} Now {helper} was glad.", f"{other} helped {hero}",
                     f"They helped {hero}"):
        assert synth.reward(loophole, question, stopped=True) == 0.0
        assert not synth.follows(loophole, question)
    # every synth request's reference answer follows it, and names the wish of a story
    for messages, c in synth.instructions(200):
        assert synth.passes(messages[1]['content'], c) and c['kind'] in synth.KINDS
        assert ('want' in c) == messages[0]['content'].startswith(
            ('Tell', 'Write', 'Can', '给', '请'))


def test_group_advantages_and_loss_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    adv, kept = rlhf.group_advantages(rewards, normalize=False)
    assert kept.tolist() == [True, False]  # the second group teaches nothing: skipped
    assert torch.allclose(adv, torch.tensor([[0.5, -0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    adv_n, _ = rlhf.group_advantages(rewards, normalize=True)
    std = math.sqrt((0.25 + 0.25 + 0 + 0) / 3)  # the unbiased standard deviation of [1, 0, .5, .5]
    assert torch.allclose(adv_n[0], torch.tensor([0.5, -0.5, 0.0, 0.0]) / std)
    # the loss over two answers of 2 and 1 tokens (the third position is padding), sampled
    # by the policy itself (old = logp: the ratio is 1, the first update on a batch)
    logp = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -9.0, -9.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-0.25, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    a, beta = torch.tensor([2.0, -1.0]), 0.1
    loss, kl, clipped = rlhf.ppo_loss(logp, logp.detach(), ref, a, mask, 0.2, beta)
    k3 = lambda lp, r: math.exp(r - lp) - (r - lp) - 1
    kls = [k3(-1.0, -1.5), k3(-2.0, -2.0), k3(-0.5, -0.25)]
    # each answer's mean over its tokens, then the mean over the 2 answers
    want = (((-2.0 + beta * kls[0]) + (-2.0 + beta * kls[1])) / 2 + (1.0 + beta * kls[2])) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6) and kl.item() == pytest.approx(
        sum(kls) / 3, rel=1e-6)
    assert clipped.item() == 0.0
    loss.backward()
    # d/dlogp of -adv * ratio + beta * k3 is -adv + beta * (1 - exp(ref - logp)), over the
    # answer's n tokens and the 2 answers
    g = lambda adv, lp, r, n: (-adv + beta * (1 - math.exp(r - lp))) / n / 2
    want_grad = [[g(2, -1, -1.5, 2), g(2, -2, -2, 2), 0], [g(-1, -0.5, -0.25, 1), 0, 0]]
    assert torch.allclose(logp.grad, torch.tensor(want_grad), atol=1e-7)


def test_clipped_update_by_hand():
    """A later update on the same samples: each token's ratio to the sampling policy is
    clipped to 1 +- clip where that lowers the objective (PPO), and there the gradient is 0."""
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0], [-1.5, -1.0]])  # ratios e^0.5 = 1.65 and e^-1 = 0.37
    ref = old.clone()
    a, clip = torch.tensor([2.0, -1.0]), 0.2
    loss, kl, clipped = rlhf.ppo_loss(logp, old, ref, a, torch.ones(2, 2), clip, beta=0.0)
    r = [math.exp(0.5), math.exp(-1.0)]
    # advantage 2: min(1.65 * 2, 1.2 * 2) is clipped, min(0.37 * 2, 0.8 * 2) is not;
    # advantage -1: min(-1.65, -1.2) is not, min(-0.37, -0.8) is clipped
    per_token = [[-1.2 * 2, -r[1] * 2], [r[0], 0.8]]
    assert loss.item() == pytest.approx(sum(sum(row) / 2 for row in per_token) / 2, rel=1e-6)
    assert clipped.item() == pytest.approx(0.5)
    loss.backward()
    want = [[0.0, -2 * r[1] / 4], [r[0] / 4, 0.0]]  # d(-ratio * adv)/dlogp = -adv * ratio
    assert torch.allclose(logp.grad, torch.tensor(want), atol=1e-6)


def test_zero_advantage_and_beta_leave_weights_and_kl_is_zero_at_reference():
    torch.manual_seed(0)
    m = Transformer(
        ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16))
    ref = copy.deepcopy(m).requires_grad_(False)
    answers = rlhf.sample_group(m, [1, 5, 9], 4, 10, stop_ids=2,
                                generator=torch.Generator().manual_seed(0))
    x = torch.tensor([[1, 5, 9] + a[:-1] + [0] * (10 - len(a)) for a, _ in answers])[:, :12]
    y = torch.tensor([[-1, -1] + a + [-1] * (10 - len(a)) for a, _ in answers])[:, :12]
    logp = rlhf.token_logps(m, x, y)
    loss, kl, _ = rlhf.ppo_loss(logp, logp.detach(), rlhf.token_logps(ref, x, y), torch.zeros(4), y
                                != -1, beta=0.0)
    assert kl.item() == 0.0  # the policy is the reference
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in m.parameters())
    before = copy.deepcopy(m.state_dict())
    opt = m.configure_optimizers(0.0, 1e-2, (0.9, 0.95), 'cpu')
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_reward_model_learns_to_order_pairs():
    """A tiny reward model on a toy preference: the chosen answer ends where the prompt's
    first token says (token 10 + it), the rejected one elsewhere. Trained on 256 pairs with the
    Bradley-Terry loss, the head alone (likelihood=False, the textbook reward model) orders
    32 held-out pairs as wanted."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)

    def pairs(n):
        cue = torch.randint(0, 4, (n,), generator=g)
        body = torch.randint(20, 60, (n, 6), generator=g)
        chosen = torch.cat([cue[:, None], body, 10 + cue[:, None]], 1)
        rejected = torch.cat([cue[:, None], body, 10 + (cue[:, None] + 1) % 4], 1)
        x = torch.cat([chosen, rejected])
        y = torch.full_like(x, -1)
        y[:, -2] = x[:, -1]  # the last counted target: the answer's last token, read at -1
        return x, y
    rm = RewardModel(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=16),
                     likelihood=False)
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    (x, y), (vx, vy) = pairs(256), pairs(32)
    assert (last_tokens(y) == x.size(1) - 1).all()
    for _ in range(100):
        loss, _ = rlhf.reward_model_loss(rm(x, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, margin = rlhf.reward_model_loss(rm(vx, vy))
    print(
        f"toy reward model: held-out accuracy {(margin > 0).float().mean():.2f}, "
        f"loss {loss.item():.3f}"
    )
    assert (margin > 0).all()


def test_reward_model_with_likelihood_adds_the_answers_log_probs():
    """With likelihood=True (train.py's default) the reward is the head's value at the last
    token plus the answer's summed log-probabilities, computed here with a plain Transformer
    holding the same weights and rlhf.token_logps."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=16)
    rm, lm = RewardModel(args), Transformer(args)
    torch.nn.init.normal_(rm.reward_head.weight)
    lm.load_state_dict(rm.state_dict(), strict=False)
    x = torch.randint(0, 64, (3, 12))
    y = torch.full_like(x, -1)
    y[0, 4:9], y[1, 2:11], y[2, 6:] = x[0, 5:10], x[1, 3:12], 7  # row 2 cut at the end
    with torch.no_grad():
        h = lm.norm(lm.layers[1](lm.layers[0](lm.tok_embeddings(x), lm.freqs_cos[:12],
                                              lm.freqs_sin[:12]), lm.freqs_cos[:12],
                                 lm.freqs_sin[:12]))
        head = torch.stack([rm.reward_head(h[r, p]) for r, p in enumerate([9, 11, 11])]).squeeze(-1)
        assert last_tokens(y).tolist() == [9, 11, 11]
        by_hand = head + rlhf.token_logps(lm, x, y).sum(1)
        assert torch.allclose(rm(x, y), by_hand, atol=1e-5)
        rm.likelihood = False
        assert torch.allclose(rm(x, y), head, atol=1e-6)


@pytest.fixture(scope='session')
def rlhf_runs(tuned):
    """A reward model and a few RL steps, each from the tuned SFT checkpoint."""
    work, sft, _ = tuned
    tune = ['--dataset=synth', f'--vocab_size={VOCAB}', *CPU, '--gradient_accumulation_steps=1',
            '--warmup_iters=5', '--log_interval=1', f'--init_from={sft}']
    py('train.py', '--task=rm', '--out_dir=out_rm', *tune, '--batch_size=16', '--eval_iters=10',
       '--learning_rate=1e-3', '--min_lr=1e-4', '--max_iters=60', '--eval_interval=30', cwd=work)
    return work, tune


RL = ['--batch_size=2', '--group_size=4', '--max_new_tokens=48', '--eval_iters=4', '--probe=2',
      '--rl_prompts=300', '--learning_rate=1e-4', *CPU[:1], '--log_interval=1']


def test_reward_model_stage(rlhf_runs, tmp_path):
    work, _ = rlhf_runs
    rows = [r for r in read_log(os.path.join(work, 'out_rm', 'log.csv')) if r['val_loss']]
    print(f"reward model held-out: accuracy {rows[0]['rm_acc']} -> {rows[-1]['rm_acc']}, "
          f"margin {rows[0]['rm_margin']} -> {rows[-1]['rm_margin']}")
    # before training the head is 0: the score is the SFT model's log-likelihood of the
    # answer, so the first eval's accuracy is how often the SFT model prefers the chosen one
    sft_model, _ = load_model(os.path.join(work, 'out_sft', 'ckpt.pt'))
    pairs = PreferencePairs(os.path.join(work, 'data', 'synth', f'dpo{VOCAB}', 'val.npz'), 16,
                            sft_model.params.max_seq_len, 0, 0)
    with torch.no_grad():
        prefers = [(lambda s: s[:len(s) // 2] > s[len(s) // 2:])(
            rlhf.token_logps(sft_model, torch.as_tensor(x), torch.as_tensor(y)).sum(1))
            for x, y in pairs.in_order()]
    assert abs(float(rows[0]['rm_acc']) - torch.cat(prefers).float().mean().item()) < 1e-5
    assert float(rows[-1]['val_loss']) < float(rows[0]['val_loss'])
    rm = os.path.join(work, 'out_rm', 'ckpt.pt')
    assert torch.load(rm, weights_only=True)['task'] == 'rm'
    assert torch.load(rm, weights_only=True)['rm_likelihood'] is True
    # export refuses it; sample.py --reward ranks what it is given, best first, by its scores
    r = py('export.py', str(tmp_path / 'rm.bin'), f'--checkpoint={rm}', cwd=work, check=False)
    assert r.returncode == 1 and 'reward model' in r.stderr and r.stderr.count('\n') == 1
    assert not os.listdir(tmp_path)
    answers = tmp_path / 'answers.txt'
    answers.write_text("Once there was a fox named Tom. Tom wanted a kite. He was very happy.\n"
                       "Once there was a fox named Tom. Tom wanted a\n")
    r = py('sample.py', f'--reward={rm}', '--device=cpu', f'--answers=FILE:{answers}',
           '--start=Tell me a story about a fox who wants a kite.', cwd=work)
    lines = r.stdout.splitlines()
    scores = [float(s.split()[0]) for s in lines]
    assert len(lines) == 2 and scores[0] >= scores[1]
    # the scores are the reward model's own: recompute the first by hand
    model, ck = load_model(rm)
    tok = Tokenizer(ck['tokenizer'])
    text = lines[0].split('  ', 1)[1]
    ids = tok.encode_chat([{
        'role': 'user',
        'content': 'Tell me a story about a fox who wants a kite.'
    }, {
        'role': 'assistant',
        'content': text
    }])[0]
    answer = tok.encode(text, dummy_prefix=False) + [tok.im_end_id]
    start = len(ids) - len(tok.encode("\n")) - len(answer)  # the answer, then "\n"
    assert ids[start:start + len(answer)] == answer
    targets = torch.full((1, len(ids) - 1), -1)
    targets[0, start - 1:start - 1 + len(answer)] = torch.tensor(answer)  # predicted one early
    with torch.no_grad():
        by_hand = model(torch.tensor([ids[:-1]]), targets).item()
    assert abs(by_hand - scores[0]) < 1e-3
    # a reward model from before the likelihood term (no rm_likelihood) reads the head alone
    old = torch.load(rm, weights_only=True)
    del old['rm_likelihood']
    torch.save(old, tmp_path / 'old_rm.pt')
    assert load_model(rm)[0].likelihood and not load_model(tmp_path / 'old_rm.pt')[0].likelihood
    r = py('train.py', '--task=rm', f'--init_from={rm}', '--out_dir=out_no', '--dataset=synth',
           f'--vocab_size={VOCAB}', '--rm_likelihood=False', *CPU, cwd=work, check=False)
    assert r.returncode == 1 and '--rm_likelihood=True' in r.stderr and r.stderr.count('\n') == 1
    r = py('train.py', '--task=sft', f'--init_from={rm}', '--out_dir=out_no', '--dataset=synth',
           f'--vocab_size={VOCAB}', *CPU, cwd=work, check=False)
    assert r.returncode == 1 and 'reward model' in r.stderr
    # RL refuses a reward model (or policy) whose context is too short for its prompts
    sft = rm.replace('out_rm', 'out_sft')
    for name, path in (('short_rm.pt', rm), ('short_sft.pt', sft)):
        short = torch.load(path, weights_only=True)
        short['model_args']['max_seq_len'] = 64
        torch.save(short, tmp_path / name)
    for init, rm_flag, words in ((sft, tmp_path / 'short_rm.pt', 'a request with its answer'),
                                 (tmp_path / 'short_sft.pt', '', "RL's requests take")):
        r = py('train_rl.py', *RL, f'--init_from={init}', f'--reward_model={rm_flag}',
               '--out_dir=out_no', cwd=work, check=False)
        assert r.returncode == 1 and r.stderr.count('\n') == 1 and words in r.stderr, r.stderr


def test_rl_resume_continues_identically(rlhf_runs):
    """RL for 6 steps straight, and 3 + 3 with a resume between: the same logged rewards,
    losses and KL at every step, and the same weights (the answers are sampled from a
    seed of each step, and the reference model and the class weights travel in the
    checkpoint)."""
    work, tune = rlhf_runs
    sft = os.path.join(work, 'out_sft', 'ckpt.pt')
    rl = [*RL, '--reward_model=out_rm/ckpt.pt', '--eval_interval=3']
    py('train_rl.py', *rl, f'--init_from={sft}', '--out_dir=out_rl', '--max_iters=6', cwd=work)
    py('train_rl.py', *rl, f'--init_from={sft}', '--out_dir=out_rl2', '--max_iters=3', cwd=work)
    py('train_rl.py', *rl, '--init_from=resume', '--out_dir=out_rl2', '--max_iters=6', cwd=work)
    a, b = (read_log(os.path.join(work, d, 'log.csv')) for d in ('out_rl', 'out_rl2'))
    steps = lambda rows: [(r['iter'], r['reward'], r['follows'], r['kept'], r['drawn'], r[
        'answer_len']) for r in rows if r['loss']]
    assert len(steps(a)) == 6 and steps(a) == steps(b)
    for col in ('loss', 'kl', 'clipped'):
        la, lb = ([float(r[col]) for r in rows if r['loss']] for rows in (a, b))
        assert np.allclose(la, lb, rtol=1e-4, atol=1e-6), col
    evals = [r for r in a if r['instruct']]
    assert [r['iter'] for r in evals] == ['0', '3', '6']
    fa, fb = (torch.load(os.path.join(work, d, 'ckpt.pt'), weights_only=True)
              for d in ('out_rl', 'out_rl2'))
    assert fa['task'] == 'rl' and 'ref_model' in fa and fa['iter_num'] == fb['iter_num'] == 6
    assert fa['weights'] == fb['weights'] and sum(fa['weights'].values()) == pytest.approx(1)
    for k in fa['model']:
        assert torch.allclose(fa['model'][k], fb['model'][k], atol=1e-5), k
    assert any(not torch.equal(fa['model'][k], fa['ref_model'][k])
               for k in fa['model'])  # it learned


def test_rl_torchrun_ddp_cpu(rlhf_runs):
    """train_rl.py on 2 processes (gloo): each samples its own requests, the gradients are
    averaged (however many passes each rank's batch takes), rank 0 evaluates and writes."""
    work, _ = rlhf_runs
    out = os.path.join(work, 'out_rl_ddp')
    r = subprocess.run([
        sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
        os.path.join(ROOT, 'train_rl.py'), *RL, f'--init_from={work}/out_sft/ckpt.pt',
        f'--out_dir={out}', '--max_iters=2', '--eval_interval=2'
    ], cwd=work, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[:4000]
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.csv'] and r.stdout.count('saved ') == 1
    rows = read_log(os.path.join(out, 'log.csv'))
    assert [r['iter'] for r in rows if r['loss']] == ['0', '1']  # logged once, by rank 0
    ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ck['iter_num'] == 2 and any(not torch.equal(ck['model'][k], ck['ref_model'][k])
                                       for k in ck['model'])


def test_heldout_eval_by_class(tuned):
    """sample.py --eval_instruct's counts, by class, are those of greedy answers generated
    here through the plain forward pass (not FastDecoder) and checked with synth.follows;
    --best_of's line, printed beside, adds up by class too."""
    work, sft, _ = tuned
    r = py('sample.py', f'--checkpoint={sft}', '--device=cpu', '--eval_instruct=30', '--best_of=2',
           '--max_new_tokens=160', cwd=work)
    model, ck = load_model(sft)
    tok = Tokenizer(ck['tokenizer'])
    counts = {}
    for messages, check in synth.instructions(30, heldout=True):
        ids = tok.encode_chat(messages[:1], add_generation_prompt=True)[0]
        out = model.eval().generate(torch.tensor([ids]), 160, temperature=0, fast=False,
                                    stop_id={tok.im_end_id, tok.bos_id,
                                             tok.eos_id})[0, len(ids):].tolist()
        stop = next((i for i, t in enumerate(out) if t in (tok.im_end_id, tok.bos_id, tok.eos_id)),
                    None)
        ok = stop is not None and synth.follows(tok.decode(out[:stop]), check)
        hits, n = counts.get(check['kind'], (0, 0))
        counts[check['kind']] = (hits + ok, n + 1)
    lines = r.stdout.splitlines()
    total = sum(h for h, _ in counts.values())
    assert lines[0].startswith(f"instruction following (greedy, {sft}): {total}/30 = "), lines[0]
    assert lines[1].strip() == " | ".join(f"{k} {h}/{n} {h / n:.0%}" for k in synth.KINDS
                                          if k in counts for h, n in [counts[k]])
    best = re.match(r'best of 2 at temperature 1: (\d+)/30', lines[4]).group(1)
    assert sum(int(m) for m in re.findall(r' (\d+)/\d+ ', lines[5] + ' ')) == int(best)
    print('\n'.join(lines))


def test_report_table_and_picture(tmp_path):
    """report.py's table gives each run's share of held-out requests followed, by class, with
    its standard error, the paired difference to SFT and the best-of-K ceiling, computed
    here from the same per-request results; and it writes the PNG of the curves."""
    consumer('matplotlib')
    rng = random.Random(0)
    kinds = ('story_en', 'story_zh', 'q_name', 'q_thing', 'q_friend', 'q_animal')
    runs = {}
    for run, p in (('out', 0.05), ('out_sft', 0.6), ('out_dpo', 0.65), ('out_rl', 0.7)):
        os.makedirs(tmp_path / run)
        rows = [dict(kind=kinds[i % 6], follows=rng.random() < p, passes=False) for i in range(60)]
        runs[run] = rows
        (tmp_path / run / 'eval.json').write_text(json.dumps({'results': rows}))
        log = [dict(iter=i, train_loss=3 - i / 10, val_loss='', kl=0.01 * i, loss=0.1, follows=p,
                    instruct='') for i in range(5)]
        with open(tmp_path / run / 'log.csv', 'w', newline='') as f:
            w = csv.DictWriter(f, list(log[0]))
            w.writeheader()
            w.writerows(log)
    best = [
        dict(r, best_of_8=r['follows'] or i % 2 == 0) for i, r in enumerate(runs['out_sft'][:40])
    ]
    (tmp_path / 'out_sft' / 'best_of.json').write_text(json.dumps({'results': best}))
    os.makedirs(tmp_path / 'out_rm')
    (tmp_path / 'out_rm' / 'log.csv').write_text('iter,val_loss,rm_acc\n100,0.3,0.925\n')
    r = py('report.py', '--png=curves.png', cwd=tmp_path)
    lines = r.stdout.splitlines()
    for name, run in zip(('pretrained', 'SFT', 'DPO', 'RL'), runs.values()):
        p = sum(x['follows'] for x in run) / 60
        row = next(l for l in lines if l.startswith(name + ' '))
        assert f"{p:.1%} ± {math.sqrt(p * (1 - p) / 60):.1%}" in row, row
        story_en = [x['follows'] for x in run if x['kind'] == 'story_en']
        assert row.split()[-6] == f"{sum(story_en) / len(story_en):.0%}", row
    d = [b['follows'] - a['follows'] for a, b in zip(runs['out_sft'], runs['out_rl'])]
    se = np.std(d, ddof=1) / math.sqrt(len(d))
    assert f"RL - SFT: {np.mean(d):+.1%} ± {se:.1%}" in r.stdout, r.stdout
    ceiling = sum(b['best_of_8'] for b in best) / 40
    assert f"best of 8 answers at temperature 1 follows {ceiling:.1%}" in r.stdout
    assert '92.5% of the held-out pairs' in r.stdout
    assert (tmp_path / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# -----------------------------------------------------------------------------
# evaluation: bits per byte

def test_bits_per_byte(exported, tiny, tmp_path):
    """The bytes each id stands for add up to the text's UTF-8 bytes (+1 for the dummy-prefix
    space); sample.py --eval equals a hand computation on a text that fits one window, gives
    the same with any batch size and for the same documents as .jsonl; train.py's val_bpb
    agrees with sample.py --eval on the validation documents (other windows: within 5%)."""
    work = exported['work']
    tok = Tokenizer(os.path.join(work, 'data', 'synth', f'tok{VOCAB}.model'))
    table = tok.token_bytes()
    for s in ROUNDTRIP[:11]:
        assert sum(table[i]
                   for i in tok.encode(s, bos=True, eos=True)) == len(s.encode()) + (s != ''), s

    def evaluate(path, ckpt, *extra):
        out = py('sample.py', f'--checkpoint={ckpt}', '--device=cpu', f'--eval={path}', *extra,
                 cwd=work).stdout
        loss, bpb = re.search(
            r'loss ([\d.]+) nats per token, perplexity [\d.]+, ([\d.]+) bits per byte',
            out).groups()
        return float(loss), float(bpb)

    docs = ["Once upon a time, a cat sat.", "从前有一只小兔子。 😀"]
    (tmp_path / 'two.txt').write_text('\n<|endoftext|>\n'.join(docs) + '\n')
    (tmp_path / 'two.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    rnd = random_checkpoint(str(tmp_path / 'r.pt'), tok.model_bytes, VOCAB, dim=32, seq=64)
    ids = [i for d in docs for i in tok.encode(d, bos=True)]
    assert len(ids) <= 64
    model, _ = load_model(rnd)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
        nats = torch.nn.functional.cross_entropy(logits[0], torch.tensor(ids[1:]),
                                                 reduction='sum').item()
    want = (nats / (len(ids) - 1), nats / sum(len(d.encode()) for d in docs) / math.log(2))
    for path in ('two.txt', 'two.jsonl'):
        got = evaluate(tmp_path / path, rnd)
        assert got == pytest.approx(want, abs=2e-4), (path, got, want)
    stories = read_txt(os.path.join(work, 'data', 'synth', 'stories.txt'))
    (tmp_path / 'some.txt').write_text('\n<|endoftext|>\n'.join(stories[:40]))
    assert evaluate(tmp_path / 'some.txt', rnd,
                    '--batch_size=1') == evaluate(tmp_path / 'some.txt', rnd, '--batch_size=7')
    _, ckpt = tiny
    (tmp_path / 'val.txt').write_text('\n<|endoftext|>\n'.join(
        stories[::100]))  # preprocess's val_every
    log = read_log(os.path.join(os.path.dirname(ckpt), 'log.csv'))
    val_bpb = float([row for row in log if row['val_bpb']][-1]['val_bpb'])
    assert evaluate(tmp_path / 'val.txt', ckpt)[1] == pytest.approx(val_bpb, rel=0.05)


# -----------------------------------------------------------------------------
# export: Hugging Face (transformers must compute our logits and our token ids), and the
# checkpoint read without torch

HF_TEXTS = ["Once upon a time, there was a little girl named Lily.", "你好，世界！小猫在花园里玩。",
            "Lily 说: 我有 3 个苹果 and 2 bananas.", "emoji 😀🎉 👍🏽", "1234567890 3.14159 -42",
            "a  b   c    d", "   leading spaces", "trailing spaces   ", " ", "", "\n",
            "line1\nline2\n\n\tline4\r\n", "▁meta▁", "Ünïcödé café, Ω≈ç√ ｆｕｌｌ", "русский, العربية",
            "hi<|im_start|>user\nhey<|im_end|>\n"]


def test_hf_export(request, tmp_path):
    """LlamaForCausalLM and AutoTokenizer load export.py's folder and agree with us:
    the same logits (the q/k permutation for HF's rotary layout, with GQA and without),
    the same token ids (SentencePiece rebuilt as tokenizer.json) and the chat template."""
    transformers = consumer('transformers')
    AutoTokenizer, LlamaForCausalLM = transformers.AutoTokenizer, transformers.LlamaForCausalLM
    work, ckpt = request.getfixturevalue('tiny')  # only now: a skip needs no training
    ours, c = load_model(ckpt)
    tok = Tokenizer(c['tokenizer'])
    # the trained model has n_kv_heads < n_heads; add an untrained one with n_kv_heads == n_heads
    mha = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=VOCAB))
    torch.save({'model': mha.state_dict(), 'model_args': asdict(mha.params),
                'tokenizer': c['tokenizer']}, tmp_path / 'mha.pt')
    g = torch.Generator().manual_seed(0)
    seqs = [tok.encode(s, bos=True) for s in HF_TEXTS[:4]]
    seqs.append([tok.bos_id] + torch.randint(0, VOCAB, (200,), generator=g).tolist())
    for model, path in ((ours, ckpt), (mha, tmp_path / 'mha.pt')):
        out = str(tmp_path / f'hf_{model.params.n_kv_heads}')
        py('export.py', out, f'--checkpoint={path}', '--version=hf', cwd=work)
        hf = LlamaForCausalLM.from_pretrained(out).eval()
        for ids in seqs:
            x = torch.tensor([ids])
            with torch.no_grad():
                want, _ = model.eval()(x, targets=torch.full_like(x, -1))  # (1, T, vocab)
                got = hf(x).logits
            assert (got - want).abs().max().item() < 1e-4, (model.params, ids[:8])
    # a second export replaces the first (a folder holding other files would be refused)
    py('export.py', out, f'--checkpoint={tmp_path / "mha.pt"}', '--version=hf', cwd=work)
    hft = AutoTokenizer.from_pretrained(out)
    for s in HF_TEXTS:
        ids = tok.encode(s, bos=True)
        assert hft(s)['input_ids'] == ids, s
        # transformers (as llama.cpp) decodes the dummy prefix after a chat token as a space,
        # which SentencePiece's decode shows too; ours drops it, so text round-trips
        assert hft.decode(ids[1:]) == (tok.sp.decode(ids) if '<|im' in s else tok.decode(ids)), s
    # a chat renders to our template and tokenizes to the ids the SFT data holds
    msgs = [{'role': 'system', 'content': 'Be kind.'},
            {'role': 'user', 'content': '你好 there!\n  Hi?'},
            {'role': 'assistant', 'content': 'Fine 😀'}, {'role': 'user', 'content': ' 3 + 4 '}]
    chat = hft.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert chat == hft.bos_token + render_chat(msgs, add_generation_prompt=True)
    assert hft(chat, add_special_tokens=False)['input_ids'] == tok.encode_chat(msgs, True)[0]


def test_export_reads_checkpoints_without_torch(work, tmp_path):
    """export.py reads torch.save's zip itself: its version-0 file holds exactly the tensors
    torch.load returns, in llama2.c's order, for float32, bfloat16, float16 and transposed
    (non-contiguous) tensors and an untied classifier, next to an optimizer state it skips;
    and it never imports torch."""
    torch.manual_seed(0)
    m = Transformer(
        ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=16))
    opt = torch.optim.AdamW(m.parameters())
    x = torch.randint(0, VOCAB, (1, 8))
    m(x, targets=x)[1].backward()
    opt.step()
    sd = m.state_dict()
    sd['output.weight'] = torch.randn_like(sd['output.weight'])  # a classifier of its own
    sd['layers.0.attention.wq.weight'] = sd['layers.0.attention.wq.weight'].t().contiguous().t()
    sd['layers.1.feed_forward.w2.weight'] = sd['layers.1.feed_forward.w2.weight'].bfloat16()
    sd['layers.0.ffn_norm.weight'] = sd['layers.0.ffn_norm.weight'].half() + 0.5
    tok = open(os.path.join(work, 'data', 'synth', f'tok{VOCAB}.model'), 'rb').read()
    ckpt, out = str(tmp_path / 'c.pt'), str(tmp_path / 'm.bin')
    torch.save({'model': sd, 'optimizer': opt.state_dict(), 'model_args': asdict(m.params),
                'tokenizer': tok}, ckpt)
    code = (
        "import runpy, sys; sys.argv = ['export.py', sys.argv[1], '--checkpoint=' + sys.argv[2]]; "
        "runpy.run_path('export.py', run_name='__main__'); "
        "print('torch imported:', 'torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, '-c', code, out, ckpt], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0 and 'torch imported: False' in r.stdout, r.stdout + r.stderr
    data = open(out, 'rb').read()
    assert np.frombuffer(data[:28],
                         np.int32).tolist() == [32, m.params.hidden_dim, 2, 4, 2, -VOCAB, 16]
    body = np.frombuffer(data[28:], np.float32)
    order = ['tok_embeddings'] + [
        f'layers.{i}.{name}' for name in ('attention_norm', 'attention.wq', 'attention.wk',
                                          'attention.wv', 'attention.wo', 'ffn_norm',
                                          'feed_forward.w1', 'feed_forward.w2', 'feed_forward.w3')
        for i in range(2)
    ] + ['norm']
    loaded = torch.load(ckpt, weights_only=True)['model']
    want = np.concatenate([loaded[k + '.weight'].float().numpy().ravel() for k in order])
    cos, sin = (t.numpy().ravel() for t in precompute_freqs(8, 16))
    n, f = want.size, cos.size
    assert np.array_equal(body[:n], want)
    assert np.allclose(body[n:n + f], cos, atol=1e-6) and np.allclose(body[n + f:n + 2 * f], sin,
                                                                      atol=1e-6)
    assert np.array_equal(body[n + 2 * f:], loaded['output.weight'].numpy().ravel())
    # a pickle may claim a tensor larger than its storage: refused, never read past the end
    storage = np.arange(10, dtype=np.float32)
    reader = type('Reader', (), {'storage': lambda self, key, kind: storage})()
    for offset, shape, stride in ((0, (4, 4), (4, 1)), (3, (2, 4), (4, 1)), (-1, (2,), (1,))):
        with pytest.raises(ValueError):
            checkpoint.Stored(reader, ('0', 'FloatStorage'), offset, shape, stride).numpy()
    assert checkpoint.Stored(reader, ('0', 'FloatStorage'), 2, (2, 4), (1, 2)).numpy().tolist() == \
        [[2, 4, 6, 8], [3, 5, 7, 9]]


# -----------------------------------------------------------------------------
# GGUF, llama.cpp and its OpenAI-compatible server

def test_gguf_export_fields(tiny, tmp_path):
    """llama.cpp's own reader (the gguf package) reads back every field of the file as it
    was meant: hyperparameters, the vocabulary with scores and token types, special ids,
    template; every tensor under llama.cpp's name and shape, equal to our weight in f32, within
    f16's rounding in f16, and in q8_0 byte for byte what llama.cpp's reference quantizer
    makes of it. A matrix whose rows are not blocks of 32 falls back to f16."""
    consumer('gguf')
    from gguf import GGUFReader, GGMLQuantizationType as Q
    from gguf.quants import quantize
    work, ckpt = tiny
    model, c = load_model(ckpt)
    tok, p = Tokenizer(c['tokenizer']), model.params
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    odd = random_checkpoint(str(tmp_path / 'odd.pt'), c['tokenizer'], VOCAB, dim=48, n_heads=4,
                            n_kv_heads=2)
    names = {
        'attn_norm': 'attention_norm',
        'attn_q': 'attention.wq',
        'attn_k': 'attention.wk',
        'attn_v': 'attention.wv',
        'attn_output': 'attention.wo',
        'ffn_norm': 'ffn_norm',
        'ffn_gate': 'feed_forward.w1',
        'ffn_down': 'feed_forward.w2',
        'ffn_up': 'feed_forward.w3'
    }

    def ours(name):
        if name in ('token_embd.weight', 'output.weight'):
            return sd['tok_embeddings.weight']
        if name == 'output_norm.weight':
            return sd['norm.weight']
        _, i, n, _ = name.split('.')
        return sd[f'layers.{i}.{names[n]}.weight']

    for dtype in ('f32', 'f16', 'q8_0'):
        path = tmp_path / f'm_{dtype}.gguf'
        py('export.py', str(path), f'--checkpoint={ckpt}', '--version=gguf', f'--dtype={dtype}',
           cwd=work)
        r = GGUFReader(str(path))
        f = {k: v.contents() for k, v in r.fields.items()}
        want = {
            'GGUF.version': 3,
            'general.architecture': 'llama',
            'general.alignment': 32,
            'general.file_type': {
                'f32': 0,
                'f16': 1,
                'q8_0': 7
            }[dtype],
            'llama.context_length': p.max_seq_len,
            'llama.embedding_length': p.dim,
            'llama.block_count': p.n_layers,
            'llama.feed_forward_length': p.hidden_dim,
            'llama.attention.head_count': p.n_heads,
            'llama.attention.head_count_kv': p.n_kv_heads,
            'llama.rope.dimension_count': p.dim // p.n_heads,
            'llama.rope.freq_base': 10000.0,
            'llama.vocab_size': VOCAB,
            'tokenizer.ggml.model': 'llama',
            'tokenizer.ggml.tokens': [tok.sp.id_to_piece(i) for i in range(VOCAB)],
            'tokenizer.ggml.bos_token_id': 1,
            'tokenizer.ggml.eos_token_id': 2,
            'tokenizer.ggml.unknown_token_id': 0,
            'tokenizer.ggml.add_bos_token': True,
            'tokenizer.ggml.add_eos_token': False,
            'tokenizer.ggml.add_space_prefix': True,
            'tokenizer.ggml.eot_token_id': 4,
            'GGUF.tensor_count': 3 + 9 * p.n_layers
        }
        for k, v in want.items():
            assert f[k] == v, (dtype, k, f[k], v)
        assert f['llama.attention.layer_norm_rms_epsilon'] == pytest.approx(p.norm_eps, rel=1e-6)
        assert np.allclose(f['tokenizer.ggml.scores'], [tok.sp.get_score(i) for i in range(VOCAB)])
        types = f['tokenizer.ggml.token_type']
        assert types[:5] == [UNKNOWN, CONTROL, CONTROL, USER_DEFINED, USER_DEFINED]
        assert types[5:261] == [BYTE] * 256 and set(types[261:]) == {NORMAL}
        assert tok.decode(tok.encode_chat([{'role': 'user', 'content': 'Hi'}], True)[0]) == \
            render_chat([{'role': 'user', 'content': 'Hi'}], True)
        msgs = [{'role': 'system', 'content': 'Be kind.'}, {'role': 'user', 'content': '你好'}]
        template = consumer('jinja2').Template(f['tokenizer.chat_template'])
        assert template.render(messages=msgs, bos_token='<s>', add_generation_prompt=True) == \
            '<s>' + render_chat(msgs, add_generation_prompt=True)
        assert {t.name
                for t in r.tensors
                } == {'token_embd.weight', 'output_norm.weight', 'output.weight'
                      } | {f'blk.{i}.{n}.weight'
                           for i in range(p.n_layers)
                           for n in names}
        for t in r.tensors:
            a = ours(t.name)
            assert list(t.shape) == list(a.shape[::-1]), t.name  # innermost dimension first
            if a.ndim == 1 or dtype == 'f32':
                assert t.tensor_type == Q.F32 and np.array_equal(t.data.reshape(a.shape), a), t.name
            elif dtype == 'f16':
                assert t.tensor_type == Q.F16 and np.array_equal(t.data.reshape(a.shape),
                                                                 a.astype(np.float16))
            else:
                assert t.tensor_type == Q.Q8_0, t.name
                assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1),
                                      quantize(a, Q.Q8_0).view(np.uint8).reshape(-1)), t.name
    py('export.py', str(tmp_path / 'odd.gguf'), f'--checkpoint={odd}', '--version=gguf',
       '--dtype=q8_0', cwd=work)
    r = GGUFReader(str(tmp_path / 'odd.gguf'))
    kinds = {t.name: t.tensor_type for t in r.tensors}
    assert kinds['blk.0.attn_q.weight'] == Q.F16 and kinds['output_norm.weight'] == Q.F32
    assert kinds['blk.0.ffn_down.weight'] == Q.Q8_0  # its rows (hidden_dim 128) are whole blocks


def llama_cpp_model(llama_cpp, path, **kw):
    """A GGUF file loaded in llama.cpp: float32 KV cache (its default is f16), logits of every
    position kept, and its plain CPU kernels: on a CPU with AMX (Intel Sapphire Rapids on) a
    native build repacks q8_0 weights for its AMX kernels, which crash in the first decode
    (a llama.cpp bug, reported upstream; here on our files too). Llama() has no argument for it."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain_kernels():
        p = defaults()
        p.use_extra_bufts = False
        return p
    llama_cpp.llama_cpp.llama_model_default_params = plain_kernels
    try:
        return llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False,
                               type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kw)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def llama_cpp_greedy(llm, ids, n):
    """llama.cpp's greedy continuation of ids: up to n tokens, ending before BOS or EOS"""
    llm.reset()
    llm.eval(ids)
    out = []
    while len(out) < n:
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt in (1, 2):
            break
        out.append(nxt)
        llm.eval([nxt])
    return out


def test_llama_cpp_tokenizes_as_we_do(tiny, tmp_path):
    """llama.cpp's tokenizer, reading only our GGUF's vocabulary, gives our ids: English,
    Chinese, emoji, spaces, newlines, chat tokens inside text, and rendered chats (the chat
    template as llama.cpp tokenizes it, a dummy prefix after each chat token)."""
    llama_cpp = consumer('llama_cpp')
    work, ckpt = tiny
    tok = Tokenizer(torch.load(ckpt, weights_only=True)['tokenizer'])
    path = export(work, ckpt, tmp_path / 'm.gguf', '--version=gguf')
    vocab = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    for s in ENCODE_TEXTS + HF_TEXTS:
        assert vocab.tokenize(s.encode(), add_bos=True, special=True) == tok.encode(s, bos=True), s
    chats = [[{'role': 'user', 'content': 'Tell me a story about a fox.'}],
             [{'role': 'system', 'content': 'Be kind.'},
              {'role': 'user', 'content': '你好 there!\n  Hi?'},
            {'role': 'assistant', 'content': 'Fine 😀'}, {'role': 'user', 'content': ' 3 + 4 '}]]
    for msgs in chats:
        text = tok.sp.id_to_piece(tok.bos_id) + render_chat(msgs, add_generation_prompt=True)
        assert vocab.tokenize(text.encode(), add_bos=False,
                              special=True) == tok.encode_chat(msgs, True)[0]


def test_llama_cpp_runs_our_gguf_as_run_c(tiny, runc, tmp_path):
    """llama.cpp computes our model: on three prompts its float32 logits at every position are
    PyTorch's within 1e-4 (of logits up to ~17), its greedy continuation is run.c's at -t 0,
    token for token, and the q8_0 file continues the same way at least for the first tokens
    (the point where rounding makes it diverge is printed)."""
    llama_cpp = consumer('llama_cpp')
    work, ckpt = tiny
    model, c = load_model(ckpt)
    tok = Tokenizer(c['tokenizer'])
    f32 = llama_cpp_model(llama_cpp, export(work, ckpt, tmp_path / 'm.gguf', '--version=gguf'))
    q80 = llama_cpp_model(llama_cpp, export(work, ckpt, tmp_path / 'q.gguf', '--version=gguf',
                                            '--dtype=q8_0'))
    model_bin = export(work, ckpt, tmp_path / 'model.bin')
    for prompt in ["Once upon a time", "Lily wanted a red kite.", "小猫"]:
        ids = tok.encode(prompt, bos=True)
        out = llama_cpp_greedy(f32, ids, 100)
        x = torch.tensor([ids + out])
        with torch.no_grad():
            want, _ = model.eval()(x, targets=torch.full_like(x, -1))
        got = np.array(f32.scores[:x.size(1)])
        assert np.abs(got - want[0].numpy()).max() < 1e-4, prompt
        r = run_c(runc, model_bin, '-t', '0', '-n', str(len(ids) + 100 - 1), '-i', prompt)
        assert r.stdout.decode() == tok.decode(ids + out) + '\n', prompt
        q = llama_cpp_greedy(q80, ids, 100)
        same = next((i for i, (a, b) in enumerate(zip(out, q)) if a != b), min(len(out), len(q)))
        # q8_0 on float32's tokens: its logits a rounding away, its choices nearly all the same
        q80.reset()
        q80.eval(ids + out)
        qlog = np.array(q80.scores[:x.size(1)])
        agree = (qlog.argmax(-1) == got.argmax(-1)).mean()
        print(f"q8_0 in llama.cpp, {prompt!r}: greedy as float32 for {same} of {len(out)} tokens; "
              f"on float32's tokens the same choice at {agree:.0%} of positions, logits within "
              f"{np.abs(qlog - got).max():.3f}")
        assert q[0] == out[0] and agree >= 0.9 and np.abs(qlog - got).max() < 0.5, prompt


def test_llama_cpp_chat_equals_run_c(tuned, runc, tmp_path):
    """The fine-tuned model in llama.cpp, chatting through the template our GGUF carries
    (llama-cpp-python's create_chat_completion, greedy), answers what ./run -m chat -t 0
    answers, with a system prompt and without, in English and Chinese, over two turns."""
    llama_cpp = consumer('llama_cpp')
    work, sft, _ = tuned
    llm = llama_cpp_model(llama_cpp, export(work, sft, tmp_path / 'sft.gguf', '--version=gguf'))
    model_bin = export(work, sft, tmp_path / 'model.bin')
    turns = [["Tell me a story about a fox who wants a kite."],
             ["给我讲一个关于小兔子想要风筝的故事。"],
             ["Write a short story about a cat and a ball.", "Who is the story about?"]]
    for system in ("", "You tell short stories."):
        for first, *rest in turns:
            sys_c = ['-y', system] if system else []
            c = subprocess.run([runc, model_bin, '-m', 'chat', '-t', '0', '-i', first, *sys_c],
                               input=''.join(m + '\n' for m in rest).encode(), capture_output=True,
                               timeout=300)
            assert c.returncode == 0, c.stderr
            msgs = [{'role': 'system', 'content': system}] if system else []
            replies = []
            for user in [first, *rest]:
                msgs.append({'role': 'user', 'content': user})
                r = llm.create_chat_completion(messages=msgs, temperature=0, top_k=1, top_p=1,
                                               min_p=0, repeat_penalty=1, max_tokens=200)
                replies.append(r['choices'][0]['message']['content'])
                msgs.append({'role': 'assistant', 'content': replies[-1]})
            want = ''.join(f"Assistant: {a}\nUser: " for a in replies) + "\n"
            assert c.stdout.decode() == want, (first, system)


@contextlib.contextmanager
def llama_cpp_server(gguf, log, timeout=90):
    """llama-cpp-python's OpenAI-compatible server on a free port of 127.0.0.1, as README
    starts it (no --chat_format: the template comes from the GGUF; --n_ctx 0: the model's
    context) with a float32 KV cache, as run.c's, and one thread: two threads on a shared,
    busy 2-core machine wait on each other at every op (a reply took up to a minute, not
    0.2 s). Yields its /v1 URL and stops it on the way out, whatever happened."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    f32 = '0'  # GGML_TYPE_F32
    server = subprocess.Popen([sys.executable, '-m', 'llama_cpp.server', '--model', gguf,
                               '--host', '127.0.0.1', '--port', str(port), '--n_ctx', '0',
                               '--n_threads', '1', '--n_threads_batch', '1',
                               '--type_k', f32, '--type_v', f32],
                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f'http://127.0.0.1:{port}/v1'
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert server.poll() is None, f"the server exited ({server.returncode})"
            assert time.monotonic() < deadline, f"the server did not answer in {timeout} s"
            try:
                with urllib.request.urlopen(url + '/models', timeout=2):
                    break
            except OSError:
                time.sleep(0.25)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_openai_server_chat_equals_run_c(tuned, runc, tmp_path):
    """The fine-tuned model's GGUF behind llama-cpp-python's OpenAI-compatible server, asked
    through the openai client at temperature 0, in English and Chinese with a system message:
    the reply, whole or streamed, is ./run -m chat -t 0's, ending with finish_reason 'stop';
    max_tokens=8 gives run.c's first 8 tokens (-n 8) and 'length'; a stop string ends the
    reply just before it. The server applied the template it read from the file."""
    consumer('llama_cpp')
    openai = consumer('openai')
    consumer('llama_cpp.server.app')  # the server's packages: fastapi, uvicorn, sse-starlette
    work, sft, _ = tuned
    gguf = export(work, sft, tmp_path / 'sft.gguf', '--version=gguf')  # f32: no repacked kernels
    model_bin = export(work, sft, tmp_path / 'model.bin')
    chats = [("You tell short stories.", "Tell me a story about a fox who wants a kite."),
             ("你会讲短故事。", "给我讲一个关于小兔子想要风筝的故事。")]

    def run_c_reply(system, user, *n):
        out = run_c(runc, model_bin, '-m', 'chat', '-t', '0', '-y', system, '-i', user, *n)
        text = out.stdout.decode()
        assert text.startswith("Assistant: ") and text.endswith("\nUser: \n"), text
        return text[len("Assistant: "):-len("\nUser: \n")]

    template = jinja_chat_template(torch.load(sft, weights_only=True)['chat_template'])
    with open(tmp_path / 'server.log', 'w+') as log, llama_cpp_server(gguf, log) as url:
        client = openai.OpenAI(base_url=url, api_key='none', timeout=60, max_retries=0)

        def ask(messages, stream, **kw):
            # repeat_penalty: llama-cpp-python's server penalizes repeats (1.1) by default,
            # even at temperature 0; run.c -t 0 does not
            r = client.chat.completions.create(model='sft', messages=messages, temperature=0,
                                               stream=stream, extra_body={'repeat_penalty': 1},
                                               **kw)
            if not stream:
                return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
            chunks = [c.choices[0] for c in r if c.choices]
            finish = [c.finish_reason for c in chunks if c.finish_reason]
            assert len(finish) == 1 and chunks[-1].finish_reason, finish  # once, at the end
            return ''.join(c.delta.content or '' for c in chunks), finish[0], None

        for system, user in chats:
            messages = [{'role': 'system', 'content': system}, {'role': 'user', 'content': user}]
            want, first8 = run_c_reply(system, user), run_c_reply(system, user, '-n', '8')
            cut = want.index(want[len(want) // 2:][:3])  # a stop string from the middle
            stop = want[cut:cut + 3]
            assert len(first8) < len(want) and 0 < cut, (want, first8)
            for stream in (False, True):
                text, finish, usage = ask(messages, stream)
                assert (text, finish) == (want, 'stop'), (user, stream)
                text, finish, usage = ask(messages, stream, max_tokens=8)
                assert (text, finish) == (first8, 'length'), (user, stream)
                assert want.startswith(text)
                assert stream or usage.completion_tokens == 8
                text, finish, _ = ask(messages, stream, stop=[stop])
                assert (text, finish) == (want[:cut], 'stop'), (user, stream, stop)
            print(f"server, {user!r}: {want!r}")
        log.seek(0)
        assert f"Using gguf chat template: {template}\n" in log.read()  # not a guessed one


# -----------------------------------------------------------------------------
# run.c: the same tokens, logits and ids as PyTorch and SentencePiece, on every CPU class

PROMPTS = ["Once upon a time", "", "从前，有一只小猫"]


def test_run_c_generates_what_sample_py_generates(exported, runc):
    work = exported['work']
    tok = Tokenizer(os.path.join(work, 'data', 'synth', f'tok{VOCAB}.model'))
    lengths = []
    for name in ('trained', 'random'):
        ckpt, model_bin = exported[name]
        for prompt in PROMPTS:
            n_prompt = len(tok.encode(prompt, bos=True))
            logits = str(exported['dir'] / 'l.bin')
            c = run_c(runc, model_bin, '-t', '0', '-n', '256', '-i', prompt, '-L', logits).stdout
            p = py('sample.py', f'--checkpoint={ckpt}', '--device=cpu', '--temperature=0',
                   f'--start={prompt}', f'--max_new_tokens={256 - n_prompt + 1}', cwd=work).stdout
            assert c.decode() == p, (name, prompt)
            lengths.append(os.path.getsize(logits) // (4 * VOCAB))
    print(f"run.c == sample.py on {len(lengths)} runs of {lengths} positions")
    assert min(lengths[3:]) >= 200  # the random model never stops early


def test_repetition_penalty_by_hand_and_same_in_c_and_python(exported, runc):
    """The penalty on a hand-made row; then greedy text at several penalties (one below 1,
    which favours repeats) is the same from run.c -r and sample.py --repetition_penalty, in
    generation and chat, and differs from the text without it."""
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.0]])
    seen = torch.tensor([[True, True, False, True]])
    assert penalize_repeats(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, 0.0]]
    assert penalize_repeats(logits, seen, 1.0) is logits
    work, (ckpt, model_bin) = exported['work'], exported['trained']
    tok = Tokenizer(os.path.join(work, 'data', 'synth', f'tok{VOCAB}.model'))
    texts = {}
    for prompt in ("Once upon a time", "从前，有一只小猫"):
        n_prompt = len(tok.encode(prompt, bos=True))
        for r in ('1', '1.3', '2', '0.8'):
            c = run_c(runc, model_bin, '-t', '0', '-n', '160', '-r', r, '-i',
                      prompt).stdout.decode()
            p = py('sample.py', f'--checkpoint={ckpt}', '--device=cpu', '--temperature=0',
                   f'--start={prompt}', f'--max_new_tokens={160 - n_prompt + 1}',
                   f'--repetition_penalty={r}', cwd=work).stdout
            assert c == p, (prompt, r)
            texts[prompt, r] = c
        assert len({texts[prompt, r] for r in ('1', '1.3', '2', '0.8')}) == 4, prompt
    for r in ('1', '1.5'):
        c = subprocess.run([
            runc, model_bin, '-m', 'chat', '-t', '0', '-n', '60', '-r', r, '-i', 'Tell me a story.'
        ], input=b'And another one.\n', capture_output=True, timeout=300).stdout.decode()
        p = subprocess.run([
            sys.executable,
            os.path.join(ROOT, 'sample.py'), f'--checkpoint={ckpt}', '--device=cpu', '--chat',
            '--temperature=0', '--start=Tell me a story.', '--max_new_tokens=60',
            f'--repetition_penalty={r}'
        ], input='And another one.\n', capture_output=True, text=True, cwd=work).stdout
        assert c == p and c.count('Assistant: ') == 2, r
        texts['chat', r] = c
    assert texts['chat', '1'] != texts['chat', '1.5']


def test_run_c_logits_match_pytorch(exported, runc):
    work = exported['work']
    tok = Tokenizer(os.path.join(work, 'data', 'synth', f'tok{VOCAB}.model'))
    text = open(os.path.join(work, 'data', 'synth', 'stories.txt'), encoding='utf-8').read()[:600]
    ids = tok.encode(text, bos=True)[:150]
    prompt = tok.decode(ids)
    assert tok.encode(prompt, bos=True) == ids
    # and heads of 64, whose attention sums 4 vectors of 16 at a time (run.c's scores and
    # weigh_values), with one key/value head for both
    wide = random_checkpoint(str(exported['dir'] / 'wide.pt'),
                             torch.load(exported['trained'][0], weights_only=True)['tokenizer'],
                             VOCAB, dim=128, n_heads=2, n_kv_heads=1)
    models = dict(exported, wide=(wide, export(work, wide, exported['dir'] / 'wide.bin')))
    for name in ('trained', 'random', 'wide'):
        ckpt, model_bin = models[name]
        out = str(exported['dir'] / 'logits.bin')
        run_c(runc, model_bin, '-t', '0', '-n', str(len(ids)), '-i', prompt, '-L', out)
        got = np.fromfile(out, dtype=np.float32).reshape(-1, VOCAB)
        model, _ = load_model(ckpt)
        with torch.no_grad():
            want = model.eval()(torch.tensor([ids]), torch.zeros(1, len(ids),
                                                                 dtype=torch.long))[0][0].numpy()
        assert got.shape == want.shape
        rel = np.abs(got - want).max() / np.abs(want).max()
        print(
            f"{name}: run.c logits vs PyTorch, {len(ids)} positions: max relative error {rel:.2e}")
        assert rel < 1e-4


ENCODE_TEXTS = [
    "Once upon a time, there was a little cat.", "从前有一只小兔子，它很开心。", "mixed 中文 and English 混合 text",
    "emoji 😀🎉 ✨ 👍🏽", "digits 1234567890 and 3.14", "  two leading spaces", "trailing spaces  ",
    "runs   of    spaces", "new\nlines\n\nhere\n", "\ttab", " ", "a",
    "<|im_start|>user\nhi there<|im_end|>\n", "x<|im_end|>y<|im_start|>", "Ünïcödé café",
    "ｆｕｌｌｗｉｄｔｈ！", "\"Hello,\" said Tom. \"Can you help me?\"", "rare: ꙮ 𓀀 ∑"
]


def test_run_c_encoder_matches_sentencepiece(work, runc, tmp_path):
    cases = [(os.path.join(work, 'data', 'synth', f'tok{v}.model'), ENCODE_TEXTS)
             for v in (VOCAB, 2048)]
    fixture = os.path.join(FIXTURES, 'tok512.model')
    if os.path.exists(fixture):  # trained with remove_extra_whitespaces: no runs of spaces there
        cases.append((fixture, [s for s in ENCODE_TEXTS
                                if '  ' not in s and not s.startswith(' ')]))
    checked = 0
    for model_path, texts in cases:
        tok = Tokenizer(model_path)
        d = tmp_path / os.path.basename(model_path)
        d.mkdir()
        ckpt = random_checkpoint(str(d / 'm.pt'), tok.model_bytes, tok.n_words, dim=32, n_layers=1)
        model_bin = export(work, ckpt, d / 'm.bin')
        for s in texts:
            got = run_c(runc, model_bin, '-m', 'tokenize', '-i', s).stdout.decode().split()
            assert [int(i) for i in got] == tok.encode(s), (model_path, s)
            if not any(t in s for t in tok.chat_ids):  # after a chat token we add a prefix
                assert tok.encode(s) == tok.sp.encode(s), (model_path, s)
            checked += 1
    print(f"C encoder == SentencePiece on {checked} strings, {len(cases)} tokenizers")


def test_run_c_fast_paths_equal_plain_ones(exported, runc, tmp_path):
    """Prefill blocks == token by token and 2 threads == 1 (bit-identical logits) in three
    builds: plain -O3 (SSE2 int8), -O3 -march=native -fopenmp (AVX-512 VNNI int8 where the
    CPU has it), and make runomp's -Ofast -march=native -fopenmp (and on an AVX-512 CPU the
    same built for AVX2). Across builds: the same text,
    and float32 logits within 1e-5 (-O3) or 1e-4 (-Ofast) of the plain build's largest logit:
    only the order of float operations differs. For int8 such differences move a few
    activations across a rounding boundary to the next int8 step, and that shows in later
    positions, so there the bound is 1e-2, and a greedy pick can differ where two logits are
    that close: the logits are compared up to the first pick that differs, after which the
    builds read different tokens. int8 files with groups of 32 (trained: dim 96, 3
    groups a row, hidden 256, 8) and of 64 (random: dim 128, 2 groups, hidden 576, 9; heads of
    64, so attention's 4-vector sums) take
    each packed path: rows of whole blocks of 8 groups, blocks and a rest, and only a rest, in
    slabs of 4 rows; a third (dim 160, kv_dim 10) has row counts that are not all multiples of
    4, so its rows are not interleaved and decoding reads one row at a time."""
    ckpt, model_bin = exported['trained']
    q80 = export(exported['work'], ckpt, exported['dir'] / 'trained' / 'model_q80.bin',
                 '--version=2')
    tok_bytes = torch.load(ckpt, weights_only=True)['tokenizer']
    rnd = random_checkpoint(str(tmp_path / 'random.pt'), tok_bytes, VOCAB, dim=128, n_heads=2,
                            n_kv_heads=1, hidden_dim=576)
    q80_64 = export(exported['work'], rnd, tmp_path / 'model_q80.bin', '--version=2')
    assert np.frombuffer(open(q80_64, 'rb').read()[37:41], np.int32)[0] == 64  # the group size
    odd = random_checkpoint(str(tmp_path / 'odd.pt'), tok_bytes, VOCAB, dim=160, n_layers=1,
                            n_heads=16, n_kv_heads=1)
    q80_odd = export(exported['work'], odd, tmp_path / 'odd_q80.bin', '--version=2')
    builds, variants = {'plain': runc}, [('native', ['-O3']), ('runomp', ['-Ofast'])]
    if 'avx512f' in open('/proc/cpuinfo').read():  # and the AVX2 code that most laptops run
        variants.append(('avx2', ['-Ofast', '-mno-avx512f', '-mno-avxvnni']))
    for name, flags in variants:
        builds[name] = str(tmp_path / name)
        subprocess.run([
            'gcc', *flags, '-fopenmp', '-march=native', '-o', builds[name],
            os.path.join(ROOT, 'run.c'), '-lm'
        ], check=True)
    prompt = ("Once upon a time, there was a little fox named Tom. He loved to sing songs. "
              "One day, Tom")
    for path, tols in ((model_bin, (1e-5, 1e-4)), (q80, (1e-2, 1e-2)), (q80_64, (1e-2, 1e-2)),
                       (q80_odd, (1e-2, 1e-2))):
        first = {}
        for name, exe in builds.items():
            outs = []
            for threads, b in (('1', '1'), ('1', '7'), ('1', '64'), ('2', '1'), ('2', '64')):
                f = str(tmp_path / 'logits.bin')
                r = subprocess.run(
                    [exe, path, '-t', '0', '-n', '120', '-b', b, '-i', prompt, '-L', f],
                    capture_output=True, env=dict(os.environ, OMP_NUM_THREADS=threads), timeout=300)
                assert r.returncode == 0, r.stderr
                outs.append((r.stdout, open(f, 'rb').read()))
                counts = re.search(rb'prefill: (\d+) tokens.*decode: (\d+)', r.stderr).groups()
            assert all(o == outs[0]
                       for o in outs), (name, path)  # the same text and bit-identical logits
            n_pre, n_new = map(int, counts)  # the prompt's rows, then one per generated token
            logits = np.frombuffer(outs[0][1], np.float32).reshape(n_pre + n_new, -1)
            first[name] = (outs[0][0], logits)
        text, plain = first['plain']
        for name, flags in variants:
            tol = tols['-Ofast' in flags]
            logits = first[name][1]
            n = min(len(plain), len(logits))  # from row n_pre - 1 on, each argmax is the next token
            differ = np.nonzero(plain[n_pre - 1:n].argmax(1) != logits[n_pre - 1:n].argmax(1))[0]
            upto = n_pre + differ[0] if len(differ) else n  # the rows that read the same tokens
            bound = tol * np.abs(plain).max()
            assert np.abs(logits[:upto] - plain[:upto]).max() <= bound, (name, path)
            # so a pick can differ only where plain's two best logits are within 2 * bound
            assert first[name][0] == text or len(differ), (name, path)


def test_int8_close_to_float32(exported, runc):
    """Teacher-forced over held-out text: the int8 file's top-1 next token agrees with
    float32's on at least 95% of positions, and its loss is within 2%."""
    ckpt, model_bin = exported['trained']
    work = exported['work']
    q80 = export(work, ckpt, exported['dir'] / 'trained' / 'model_q80.bin', '--version=2')
    tok = Tokenizer(os.path.join(work, 'data', 'synth', f'tok{VOCAB}.model'))
    val = np.fromfile(os.path.join(work, 'data', 'synth', f'tok{VOCAB}', 'val.bin'),
                      dtype=np.uint16)
    docs = [d for d in np.split(val,
                                np.flatnonzero(val == tok.bos_id)[1:]) if 20 < len(d) <= 256][:12]
    agree, n, loss = 0, 0, {'f32': 0.0, 'q80': 0.0}
    for doc in docs:
        prompt = tok.decode(doc)
        ids = tok.encode(prompt, bos=True)
        top = {}
        for name, path in (('f32', model_bin), ('q80', q80)):
            f = str(exported['dir'] / f'{name}.logits')
            run_c(runc, path, '-t', '0', '-n', str(len(ids)), '-i', prompt, '-L', f)
            lg = torch.from_numpy(np.fromfile(f, dtype=np.float32).reshape(-1, VOCAB))[:-1]
            loss[name] += F_cross_entropy(lg, torch.tensor(ids[1:])) * (len(ids) - 1)
            top[name] = lg.argmax(-1)
        agree += int((top['f32'] == top['q80']).sum())
        n += len(ids) - 1
    f32, q80_loss = loss['f32'] / n, loss['q80'] / n
    print(f"int8 vs float32 over {n} held-out positions: top-1 agreement {agree / n:.2%}, "
          f"val loss {f32:.4f} (float32) vs {q80_loss:.4f} (int8)")
    assert agree / n >= 0.95 and abs(q80_loss - f32) <= 0.02 * f32


def test_stories260k_published_outputs(runc):
    """llama2.c's own model and tokenizer: its published greedy and sampled outputs."""
    model, tok_bin = os.path.join(FIXTURES, 'stories260K.bin'), os.path.join(FIXTURES, 'tok512.bin')
    if not os.path.exists(model):
        pytest.skip(f"{model} not found (set FIXTURES)")
    greedy = run_c(runc, model, '-z', tok_bin, '-t', '0').stdout.decode()
    assert greedy.startswith(
        "Once upon a time, there was a little girl named Lily. She loved to play "
        "outside in the park. One day, she saw a big, red ball. She wanted to play "
        "with it, but it was too high.")
    sampled = run_c(runc, model, '-z', tok_bin, '-t', '1.0', '-p', '0.9', '-s',
                    '133742').stdout.decode()
    assert sampled.startswith(
        "Once upon a time, there was a little boy named Timmy. Timmy loved to "
        "play with his toys and eat sandwiches.")


def test_chat_context_full_same_in_c_and_python(work, runc, tmp_path):
    """A reply runs to the end of the context and the chat ends quietly; a message that does
    not fit is a stop the user must act on: exit 1 and one line, the same in run.c and
    sample.py, with the same text before it."""
    tok = open(os.path.join(work, 'data', 'synth', f'tok{VOCAB}.model'), 'rb').read()
    ckpt = random_checkpoint(str(tmp_path / 'c.pt'), tok, VOCAB, dim=32, seq=64)
    model_bin = export(work, ckpt, tmp_path / 'm.bin')
    for first, rest, code in (('Hi', '', 0), ('Hi', 'more\n', 1), ('word ' * 80, '', 1)):
        c = subprocess.run([runc, model_bin, '-m', 'chat', '-t', '0', '-i', first],
                           input=rest.encode(), capture_output=True, timeout=300)
        p = subprocess.run([sys.executable, os.path.join(ROOT, 'sample.py'), f'--checkpoint={ckpt}',
                            '--device=cpu', '--chat', '--temperature=0', f'--start={first}'],
                           input=rest, capture_output=True, text=True, cwd=work)
        assert c.returncode == p.returncode == code and c.stdout.decode() == p.stdout, (first, rest)
        if code:  # before it, each says the model was never fine-tuned, in its own words
            assert c.stderr.decode().splitlines()[-1] == p.stderr.splitlines(
            )[-1] and 'context' in p.stderr


def test_chat_says_when_a_model_was_never_fine_tuned(exported, runc, tmp_path):
    """Versions 1 and 2 record in header byte 41 whether the checkpoint was fine-tuned; run.c
    -m chat says so for a pretrained-only model, as sample.py --chat does, and nothing for a
    fine-tuned one. A version 0 file cannot record it, and run.c says that. Version 1 runs the
    same tokens as version 0 (which the other tests hold to PyTorch)."""
    pre = exported['random'][0]
    sft = str(tmp_path / 'sft.pt')
    ck = torch.load(pre, weights_only=True)
    torch.save(dict(ck, task='sft'), sft)
    for name, ckpt, flag in (('pre', pre, 1), ('sft', sft, 2)):
        out = {}
        for v in '012':
            path = export(exported['work'], ckpt, tmp_path / f'{name}{v}.bin', f'--version={v}')
            if v != '0':
                assert open(path, 'rb').read(42)[41] == flag, (name, v)
            r = subprocess.run([runc, path, '-m', 'chat', '-t', '0', '-n', '12', '-i', 'Hi'],
                               capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               timeout=120)
            assert r.returncode == 0, r.stderr
            out[v] = r.stdout
            if v == '0':
                assert 'version 0' in r.stderr and 'cannot record' in r.stderr, r.stderr
            elif flag == 1:
                assert 'pretrained only' in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
            else:
                assert r.stderr == '', r.stderr
        assert out['1'] == out['0'] and out['0'].startswith('Assistant: ') and len(
            out['0']) > 15, out
    p = subprocess.run([
        sys.executable,
        os.path.join(ROOT, 'sample.py'), f'--checkpoint={pre}', '--device=cpu', '--chat',
        '--temperature=0', '--start=Hi', '--max_new_tokens=4'
    ], capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=exported['work'])
    assert p.returncode == 0 and 'pretrained only' in p.stderr, p.stderr


def test_run_c_chat_matches_sample_py(tuned, runc):
    """The same turns at temperature 0: run.c -m chat and sample.py --chat say the same."""
    work, sft, _ = tuned
    model_bin = export(work, sft, os.path.join(work, 'out_sft', 'model.bin'))
    turns = [("Tell me a story about a fox who wants a kite.", ""),
             ("Write a short story about a cat and a ball.", "Who is the story about?\n"),
             ("给我讲一个关于小兔子想要风筝的故事。", "")]
    for system in ("", "You tell short stories."):
        for first, rest in turns:
            sys_c = ['-y', system] if system else []
            c = subprocess.run([runc, model_bin, '-m', 'chat', '-t', '0', '-i', first, *sys_c],
                               input=rest.encode(), capture_output=True, timeout=300)
            p = subprocess.run([
                sys.executable,
                os.path.join(ROOT, 'sample.py'), f'--checkpoint={sft}', '--device=cpu', '--chat',
                '--temperature=0', f'--start={first}', f'--system={system}'
            ], input=rest, capture_output=True, text=True, cwd=work)
            assert c.returncode == 0 and p.returncode == 0, (c.stderr, p.stderr)
            assert c.stdout.decode() == p.stdout, (first, system)
            assert c.stdout.decode().count("Assistant: ") == 1 + rest.count("\n")


@pytest.mark.parametrize('cc', ['gcc', 'clang'])
def test_run_c_builds_without_warnings(cc, tmp_path):
    """-Wall -Wextra -Werror, plain and fast (OpenMP, this CPU's vector instructions)."""
    if not shutil.which(cc):
        pytest.skip(f"{cc} not installed (.ci/run installs it)")
    for flags in (['-O3'], ['-Ofast', '-march=native', '-fopenmp']):
        r = subprocess.run([cc, *flags, '-Wall', '-Wextra', '-Werror', '-o', str(tmp_path / 'run'),
                            os.path.join(ROOT, 'run.c'), '-lm'], capture_output=True, text=True)
        assert r.returncode == 0, (cc, flags, r.stderr[-3000:])


def test_run_c_aarch64_prints_what_x86_prints(exported, runc, tmp_path):
    """run.c built for aarch64 (the portable path: no x86 kernels) and run under qemu prints
    the same text and the same logits, bit for bit, as the x86-64 build at -t 0: float32 and
    int8 files, and llama2.c's model."""
    if not (shutil.which('aarch64-linux-gnu-gcc') and shutil.which('qemu-aarch64')):
        pytest.skip("aarch64-linux-gnu-gcc or qemu-aarch64 not installed (.ci/run installs them)")
    build('runarm')
    arm = os.path.join(ROOT, 'run-aarch64')
    ckpt, model_bin = exported['trained']
    q80 = export(exported['work'], ckpt, tmp_path / 'q80.bin', '--version=2')
    tok = os.path.join(os.path.dirname(model_bin), 'tokenizer.bin')
    cases = [(model_bin, tok, 'Once upon a time'), (q80, tok, 'Once upon a time'),
             (model_bin, tok, '从前，有一只小猫')]
    if os.path.exists(os.path.join(FIXTURES, 'stories260K.bin')):
        cases.append((os.path.join(FIXTURES,
                                   'stories260K.bin'), os.path.join(FIXTURES, 'tok512.bin'), ''))
    for model, tok_bin, prompt in cases:
        args = [model, '-z', tok_bin, '-t', '0', '-n', '200', '-i', prompt, '-L']
        x86 = run_c(runc, *args, str(tmp_path / 'x86.bin')).stdout
        r = subprocess.run(['qemu-aarch64', arm, *args, str(tmp_path / 'arm.bin')],
                           capture_output=True, timeout=600)
        assert r.returncode == 0, r.stderr.decode(errors='replace')
        assert r.stdout == x86 and len(x86) > 50, (model, prompt)
        same_bits = (tmp_path / 'arm.bin').read_bytes() == (tmp_path / 'x86.bin').read_bytes()
        assert same_bits, (model, prompt)  # every logit, not only the text


# The CPU classes the spill check builds run.c's kernels for: (compiler, disassembler, flags)
SPILL_TARGETS = {'x86-64-sse2': ('gcc', 'objdump', ['-march=x86-64']),
                 'x86-64-avx2': ('gcc', 'objdump', ['-march=haswell']),
                 'x86-64-avx512': ('gcc', 'objdump', ['-march=x86-64-v4']),
                 'x86-64-avx512-vnni': ('gcc', 'objdump', ['-march=x86-64-v4', '-mavx512vnni']),
                 'aarch64': ('aarch64-linux-gnu-gcc', 'aarch64-linux-gnu-objdump', [])}


# run.c's functions that hold decoding's loops: a row at a time (tile_1x1), int8 rows in slabs
# of 4 (tile_Rx1), the int8 rows in the file's order (q8_row), attention's sums. (Prefill's 4 x 4 int8
# tile on VNNI keeps more sums than there are registers: it spills a few and is still faster.)
KERNELS = ('tile_1x1', 'tile_Rx1', 'q8_row', 'attention_scores', 'attention_values')


def innermost_loops(objdump, obj, functions):
    """The innermost loops of the named functions (and of their OpenMP bodies) in an object
    file, each a list of (mnemonic, operands): the code from a conditional branch's earlier
    target down to the branch, with no other such loop inside."""
    text = subprocess.run([objdump, '-d', '--no-show-raw-insn', str(obj)], capture_output=True,
                          text=True, check=True).stdout
    loops = []
    for fn, body in re.findall(r'^[0-9a-f]+ <([^>]+)>:\n(.*?)(?=\n\n|\Z)', text, re.M | re.S):
        if fn.split('._omp_fn')[0] not in functions:
            continue
        # (spaces and tabs, not \s: after an instruction without operands, nop, \s would take
        # the next line as its operands)
        insns = re.findall(r'^[ \t]*([0-9a-f]+):[ \t]+(\S+)[ \t]*(.*)$', body, re.M)
        at = {int(a, 16): i for i, (a, _, _) in enumerate(insns)}
        spans = []
        for i, (a, op, args) in enumerate(insns):
            target = re.search(r'([0-9a-f]+) <', args)
            back = target and int(target[1], 16) in at and int(target[1], 16) <= int(a, 16)
            if op.startswith(('j', 'b.', 'cb', 'tb')) and op != 'jmp' and back:
                spans.append((at[int(target[1], 16)], i))
        loops += [[insns[k][1:] for k in range(f, l + 1)] for f, l in spans
                  if not any(o != (f, l) and f <= o[0] and o[1] <= l for o in spans)]
    return loops


@pytest.mark.parametrize('target', SPILL_TARGETS)
def test_run_c_kernels_keep_their_sums_in_registers(target, tmp_path):
    """No loop of run.c's decoding kernels stores to the stack, built for each CPU class with
    make run's and make runomp's flags: a vector type wider than the target's registers (16
    floats on AVX2 or NEON), or more sums than it has registers, is spilled and reloaded at
    every step. ARM speed cannot be timed here, so its code is read instead. The loops checked
    are the innermost ones that multiply: float32 and int8 dot products and attention's sums."""
    cc, objdump, flags = SPILL_TARGETS[target]
    if not (shutil.which(cc) and shutil.which(objdump)):
        pytest.skip(f"{cc} or {objdump} not installed (.ci/run installs them)")
    x86 = objdump == 'objdump'
    if x86:
        mul = re.compile(r'fmadd|mulp|muls|pmaddwd|pdpbusd|pmull')
        ints = re.compile(r'pmaddwd|pdpbusd|pmull')
        store = lambda op, args: (not op.startswith(('cmp', 'test')) and args.endswith(')')
                                  and re.search(r',\s*[-\w]*\(%(rsp|rbp)[,)]', args))
    else:
        mul = re.compile(r'^(fmla|fmul|fmadd|[su]mull|[su]mlal|mla|mul|sdot)')
        ints = re.compile(r'^([su]mull|[su]mlal|mla|mul|sdot)')
        store = lambda op, args: op.startswith('st') and re.search(r'\[(sp|x29)\b', args)
    spills = []
    for opt in (['-O3'], ['-Ofast', '-fopenmp']):
        obj = tmp_path / 'run.o'
        r = subprocess.run([cc, *opt, *flags, '-c', '-o', str(obj), os.path.join(ROOT, 'run.c')],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        loops = [l for l in innermost_loops(objdump, obj, KERNELS)
                 if any(mul.search(op) for op, _ in l)]
        assert any(any(ints.search(op) for op, _ in l) for l in loops), (opt, 'no int8 loop')
        assert any(not any(ints.search(op) for op, _ in l) for l in loops), (opt, 'no float loop')
        spills += [(opt, len(l), [' '.join(i) for i in l if store(*i)][:4]) for l in loops
                   if any(store(*i) for i in l)]
    assert not spills, spills


# -----------------------------------------------------------------------------
# mixture of experts

@pytest.fixture(scope='session')
def moe_run(work):
    """A small mixture of experts (4 experts, 2 per token) trained on the synth corpus."""
    out = os.path.join(work, 'out_moe')
    r = py('train.py', '--dataset=synth', f'--vocab_size={VOCAB}', *CPU, '--dim=64', '--n_layers=2',
           '--n_heads=4', '--n_kv_heads=2', '--max_seq_len=128', '--batch_size=16',
           '--gradient_accumulation_steps=1', '--learning_rate=3e-3', '--min_lr=3e-4',
           '--warmup_iters=20', '--max_iters=200', '--eval_interval=100', '--eval_iters=5',
           '--log_interval=10', '--n_experts=4', '--n_experts_per_tok=2', f'--out_dir={out}',
           cwd=work)
    return work, os.path.join(out, 'ckpt.pt'), r.stdout


def test_moe_trains_and_runs_in_transformers_and_run_c(moe_run, runc, tmp_path):
    """train.py logs the load-balancing loss and each expert's share; the checkpoint samples
    in sample.py, loads in transformers as MixtralForCausalLM and in llama.cpp as GGUF with
    our logits (1e-4), and as version 3 runs in run.c: float32 logits within 1e-4 of
    PyTorch's and the same greedy text as sample.py, in every build (AddressSanitizer too);
    int8 agrees with float32 on the next token at >= 90% of held-out positions. The formats
    that cannot hold experts say so, and a checkpoint whose expert counts do not add up is
    refused with one line."""
    work, ckpt, stdout = moe_run
    log = read_log(os.path.join(os.path.dirname(ckpt), 'log.csv'))
    steps, evals = [r for r in log if not r['val_loss']], [r for r in log if r['val_loss']]
    assert all(0.9 < float(r['aux_loss']) < 4 for r in steps) and float(evals[-1]['val_loss']) < 3
    assert all(0.25 <= float(r['max_load']) <= 1
               for r in evals) and 'expert load on val: layer 0' in stdout
    model, c = load_model(ckpt)
    tok = Tokenizer(c['tokenizer'])
    assert model.params.n_experts == 4 and model.active_params() < sum(p.numel()
                                                                       for p in model.parameters())

    transformers = consumer('transformers')
    py('export.py', str(tmp_path / 'hf'), f'--checkpoint={ckpt}', '--version=hf', cwd=work)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf')).eval()
    assert type(hf).__name__ == 'MixtralForCausalLM'
    ids = tok.encode("Once upon a time, a little fox wanted a red kite. 从前有一只小猫。", bos=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        want = model.eval()(x, torch.full_like(x, -1))[0]
        assert (hf(x).logits - want).abs().max().item() < 1e-4

    gguf = export(work, ckpt, tmp_path / 'moe.gguf', '--version=gguf')
    reader = consumer('gguf').GGUFReader(gguf)
    assert reader.fields['llama.expert_count'].contents() == 4
    assert reader.fields['llama.expert_used_count'].contents() == 2
    shapes = {t.name: list(t.shape) for t in reader.tensors}  # innermost dimension first
    dim, hidden = model.params.dim, model.params.hidden_dim
    assert shapes['blk.1.ffn_gate_inp.weight'] == [dim, 4]
    assert shapes['blk.1.ffn_down_exps.weight'] == [hidden, dim, 4]
    assert shapes['blk.1.ffn_up_exps.weight'] == shapes['blk.1.ffn_gate_exps.weight'] == [
        dim, hidden, 4
    ]
    llm = llama_cpp_model(consumer('llama_cpp'), gguf)
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[:len(ids)]) - want[0].numpy()).max() < 1e-4

    f32 = export(work, ckpt, tmp_path / 'moe.bin', '--version=3')
    q80 = export(work, ckpt, tmp_path / 'moe_q80.bin', '--version=3', '--dtype=q8_0')
    logits = str(tmp_path / 'l.bin')
    run_c(runc, f32, '-t', '0', '-n', str(len(ids)), '-i', tok.decode(ids), '-L', logits)
    got = np.fromfile(logits, dtype=np.float32).reshape(-1, VOCAB)
    assert np.abs(got - want[0].numpy()).max() / want.abs().max().item() < 1e-4
    for prompt in ("Once upon a time", "小兔子"):
        n_prompt = len(tok.encode(prompt, bos=True))
        p = py('sample.py', f'--checkpoint={ckpt}', '--device=cpu', '--temperature=0',
               f'--start={prompt}', f'--max_new_tokens={128 - n_prompt + 1}', cwd=work).stdout
        for exe in run_binaries() if prompt == "小兔子" else [runc]:
            assert run_c(exe, f32, '-t', '0', '-n', '128', '-i',
                         prompt).stdout.decode() == p, (exe, prompt)
        assert run_c(runc, q80, '-t', '0', '-n', '128', '-i', prompt).returncode == 0

    val = np.fromfile(os.path.join(work, 'data', 'synth', f'tok{VOCAB}', 'val.bin'),
                      dtype=np.uint16)
    docs = [d for d in np.split(val,
                                np.flatnonzero(val == tok.bos_id)[1:]) if 20 < len(d) <= 128][:8]
    agree = n = 0
    for doc in docs:
        prompt = tok.decode(doc)
        top = []
        for path in (f32, q80):
            run_c(runc, path, '-t', '0', '-n', str(len(tok.encode(prompt, bos=True))), '-i', prompt,
                  '-L', logits)
            top.append(np.fromfile(logits, dtype=np.float32).reshape(-1, VOCAB)[:-1].argmax(-1))
        agree, n = agree + int((top[0] == top[1]).sum()), n + len(top[0])
    print(
        f"mixture of experts, int8 vs float32 in run.c: the same next token at "
        f"{agree / n:.1%} of {n} positions"
    )
    assert agree / n >= 0.9

    for version in ('0', '1', '2'):
        r = py('export.py', str(tmp_path / 'no.bin'), f'--checkpoint={ckpt}',
               f'--version={version}', cwd=work, check=False)
        assert r.returncode == 1 and r.stderr.startswith(
            'error: ') and 'mixture of experts' in r.stderr
    bad = dict(torch.load(ckpt, weights_only=True))
    bad['model_args'] = dict(bad['model_args'], n_experts_per_tok=5)
    torch.save(bad, tmp_path / 'bad.pt')
    r = py('sample.py', f'--checkpoint={tmp_path / "bad.pt"}', '--device=cpu', cwd=work,
           check=False)
    assert r.returncode == 1 and r.stderr.count('\n') == 1 and 'n_experts_per_tok=5' in r.stderr


# -----------------------------------------------------------------------------
# LoRA: adapters on a frozen model, merged into every export, loaded in PEFT

LORA_SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=96)


def with_random_adapters(base, targets, rank=4, alpha=8.0, seed=1):
    """A copy of base with LoRA on targets, B set random (as after training) unless seed is None"""
    m = add_lora(copy.deepcopy(base), rank, alpha, 0.0, targets)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, LoRA):
                    mod.lora_B.copy_(torch.randn(mod.lora_B.shape, generator=g) * 0.05)
    return m.eval()


@pytest.mark.parametrize('experts', [{}, dict(n_experts=4, n_experts_per_tok=2)],
                         ids=['dense', 'moe'])
def test_lora_starts_at_the_base_merges_and_generates(experts):
    """B = 0: the model with adapters on every target computes the base exactly. With B != 0
    (as after training) it computes something else, its merged weights W + (alpha/r) B A give
    its logits (1e-5), KV-cache generation through forward() and through FastDecoder (which
    fuses copies of the weights) gives the full forward's greedy tokens and logits, and
    without_adapters is the base itself: the same logits, the very same tensors."""
    torch.manual_seed(0)
    base = Transformer(ModelArgs(**LORA_SMALL, **experts)).eval()
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        want = base(x, x)[0]
        fresh = with_random_adapters(base, LORA_TARGETS, seed=None)
        per_layer = 4 + 3 * experts.get('n_experts', 1)  # wq wk wv wo, and w1 w2 w3 per expert
        assert sum(isinstance(m, LoRA) for m in fresh.modules()) == per_layer * 2
        assert torch.equal(fresh(x, x)[0], want)
        m = with_random_adapters(base, LORA_TARGETS)
        got = m(x, x)[0]
        assert (got - want).abs().max() > 0.1  # the adapters matter
        assert (merge_lora(copy.deepcopy(m))(x, x)[0] - got).abs().max() < 1e-5
        ref = without_adapters(m)
        assert torch.equal(ref(x, x)[0], want)
        assert {id(p) for p in ref.parameters()} <= {id(p) for p in m.parameters()}  # no copy
        slow = x[:, :6]
        for _ in range(40):  # no cache: the whole sequence every step
            nxt = m(slow, torch.zeros_like(slow))[0][:, -1].argmax(-1, keepdim=True)
            slow = torch.cat([slow, nxt], 1)
        for fast in (False, True):
            assert torch.equal(m.generate(x[:, :6], 40, temperature=0, fast=fast), slow), fast
        cache = KVCache(m, 2, 40)
        step = FastDecoder(m, cache)
        for a, b in ((0, 11), (11, 12), (12, 40)):
            assert torch.allclose(step(x[:, a:b])[:, -1], got[:, b - 1], atol=1e-5)


def test_lora_step_trains_only_the_adapters():
    """AdamW with weight decay, from configure_optimizers, on a model with adapters: it holds
    only A and B, a few steps change them, and every byte of the base (weights, norms, the
    embedding) is as it was; the reference (without_adapters) still computes the base."""
    torch.manual_seed(0)
    base = Transformer(ModelArgs(**LORA_SMALL))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    m = with_random_adapters(base, LORA_TARGETS, seed=None).train()
    adapters = {k: v.clone() for k, v in lora_weights(m).items()}
    opt = m.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu')
    r_in_out = sum(4 * sum(w.shape) for name, w in base.named_parameters()  # r (in + out) each
                   if name.split('.')[-2] in LORA_TARGETS)
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == r_in_out
    x, y = torch.randint(0, 256, (2, 4, 96))
    for _ in range(3):
        m(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the base, to the bit
    assert all(not torch.equal(after[k], v) for k, v in adapters.items() if k.endswith('lora_B'))
    with torch.no_grad():
        assert torch.equal(without_adapters(m)(x, y)[0], base.eval()(x, y)[0])
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(adapters)  # still


LORA_TUNE = ['--dataset=synth', f'--vocab_size={VOCAB}', *CPU, '--batch_size=16',
             '--gradient_accumulation_steps=1', '--warmup_iters=5', '--eval_iters=10',
             '--log_interval=1']


@pytest.fixture(scope='session')
def lora_runs(tiny):
    """LoRA SFT (r=8) from the tiny pretrained model, then LoRA DPO (r=4) from that LoRA
    checkpoint: (work, stdout of each)."""
    work, base = tiny
    py('preprocess.py', 'sft', '--dataset=synth', f'--vocab_size={VOCAB}', cwd=work)
    py('preprocess.py', 'dpo', '--dataset=synth', f'--vocab_size={VOCAB}', cwd=work)
    sft = py('train.py', '--task=sft', f'--init_from={os.path.relpath(base, work)}',
             '--out_dir=out_lora_sft', *LORA_TUNE, '--lora_rank=8', '--learning_rate=1e-2',
             '--min_lr=1e-3', '--max_iters=40', '--eval_interval=20', cwd=work)
    dpo = py('train.py', '--task=dpo', '--init_from=out_lora_sft/ckpt.pt', '--out_dir=out_lora_dpo',
             *LORA_TUNE, '--batch_size=8', '--lora_rank=4', '--learning_rate=1e-3', '--min_lr=1e-4',
             '--beta=0.1', '--max_iters=4', '--eval_interval=2', cwd=work)
    return work, sft.stdout, dpo.stdout


def test_lora_sft_and_dpo_runs(lora_runs, tuned):
    """LoRA SFT: the log line counts the parameters that train (the adapters: r (in + out) for
    each of wq, wk, wv, wo), under 5% of the model; its first eval is the full SFT run's to
    the digit (B = 0: the base model exactly); it learns; the checkpoint holds the adapters
    and the base's name and hash, nothing else of the model, no reference model. LoRA DPO from
    that LoRA checkpoint: the reference is the model DPO starts from (the first eval's reward
    margin is 0 to the digit, while the two answers' log-probs differ), and nothing of it is
    saved; it loads in sample.py through both checkpoints and both bases."""
    work, sft_out, dpo_out = lora_runs
    base, _ = load_model(os.path.join(work, 'out_tiny', 'ckpt.pt'))
    r_in_out = sum(8 * sum(w.shape) for name, w in base.named_parameters()
                   if name.split('.')[-2] in ('wq', 'wk', 'wv', 'wo'))
    total = sum(p.numel() for p in base.parameters()) + r_in_out
    assert f"{total:,} parameters, of which {r_in_out:,} train ({r_in_out / total:.2%}: LoRA r=8 " \
           "on wq,wk,wv,wo)" in sft_out and r_in_out / total < 0.05
    rows = [r for r in read_log(os.path.join(work, 'out_lora_sft', 'log.csv')) if r['val_loss']]
    full = [r for r in read_log(os.path.join(work, 'out_sft', 'log.csv')) if r['val_loss']]
    assert rows[0]['iter'] == full[0]['iter'] == '0' and rows[0]['val_loss'] == full[0]['val_loss']
    assert float(rows[-1]['val_loss']) < float(rows[0]['val_loss']) - 0.1
    ck = torch.load(os.path.join(work, 'out_lora_sft', 'ckpt.pt'), weights_only=True)
    assert sum(v.numel() for v in ck['model'].values()) == r_in_out and 'ref_model' not in ck
    assert all(k.endswith(('.lora_A', '.lora_B')) for k in ck['model'])
    tiny_path = os.path.join('out_tiny', 'ckpt.pt')
    assert ck['lora'] == dict(rank=8, alpha=16.0, dropout=0.0, targets=['wq', 'wk', 'wv', 'wo'],
                              base=tiny_path, base_from_here=os.path.join('..', tiny_path),
                              base_sha256=weights_sha256(tiny_path, read_checkpoint(
                                  os.path.join(work, tiny_path))))
    dpo = [r for r in read_log(os.path.join(work, 'out_lora_dpo', 'log.csv')) if r['val_loss']]
    assert dpo[0]['reward_margin'] == '0.000000' and abs(float(dpo[0]['logp_margin'])) > 0.1
    assert float(dpo[-1]['reward_margin']) != 0 and 'of which' in dpo_out
    ck = torch.load(os.path.join(work, 'out_lora_dpo', 'ckpt.pt'), weights_only=True)
    assert ck['lora']['base'] == 'out_lora_sft/ckpt.pt' and 'ref_model' not in ck
    r = py('sample.py', '--checkpoint=out_lora_dpo/ckpt.pt', '--device=cpu', '--temperature=0',
           '--start=Once upon a time', '--max_new_tokens=20', cwd=work)
    assert r.stdout.startswith('Once upon a time') and len(r.stdout) > 30


def test_lora_resume_continues_identically(tiny):
    """LoRA SFT for 12 steps straight, and 6 + 6 with a resume between: the same losses at every
    step and the same adapters (the optimizer state of the adapters travels in the checkpoint)."""
    work, base = tiny
    py('preprocess.py', 'sft', '--dataset=synth', f'--vocab_size={VOCAB}', cwd=work)
    common = ['--task=sft', '--init_from=out_tiny/ckpt.pt', *LORA_TUNE, '--lora_rank=4',
              '--lora_targets=wq,wv,w2', '--learning_rate=1e-2', '--eval_interval=6',
              '--eval_iters=2', '--lr_decay_iters=12']
    py('train.py', *common, '--out_dir=out_lora_straight', '--max_iters=12', cwd=work)
    py('train.py', *common, '--out_dir=out_lora_split', '--max_iters=6', cwd=work)
    py('train.py', *common, '--out_dir=out_lora_split', '--max_iters=12', '--init_from=resume',
       cwd=work)
    a, b = (read_log(os.path.join(work, d, 'log.csv'))
            for d in ('out_lora_straight', 'out_lora_split'))
    la, lb = ([float(r['train_loss']) for r in rows if not r['val_loss']] for rows in (a, b))
    assert len(la) == 12 and np.allclose(la, lb, rtol=1e-4, atol=1e-6)
    ea, eb = ([(int(r['iter']), float(r['val_loss'])) for r in rows if r['val_loss']]
              for rows in (a, b))
    assert [i for i, _ in ea] == [i for i, _ in eb] == [0, 6, 12]
    assert np.allclose([v for _, v in ea], [v for _, v in eb], rtol=1e-4, atol=1e-6)
    fa, fb = (torch.load(os.path.join(work, d, 'ckpt.pt'), weights_only=True)
              for d in ('out_lora_straight', 'out_lora_split'))
    assert fa['iter_num'] == fb['iter_num'] == 12 and fa['model'].keys() == fb['model'].keys()
    assert {k.split('.')[-2] for k in fa['model']} == {'wq', 'wv', 'w2'}
    for k in fa['model']:
        assert torch.allclose(fa['model'][k], fb['model'][k], atol=1e-5), k
    # a resume must keep the run's LoRA settings
    for flags, words in ((['--lora_rank=0'], '--lora_rank=4'),
                         (['--lora_alpha=8'], '--lora_alpha=16')):
        r = py('train.py', *common, '--out_dir=out_lora_split', '--max_iters=14',
               '--init_from=resume', *flags, cwd=work, check=False)
        assert one_error_line(r)[0] and words in r.stderr, r.stderr


def test_lora_rl_starts_as_full_rl_and_resumes_identically(tuned):
    """train_rl.py --lora_rank=4 from the SFT checkpoint: the log line counts the adapters
    (r (in + out) for each of wq, wk, wv, wo). B = 0, so its first step is full RL's with the
    same seed, to the digit (the classes measured, the answers sampled and scored, the loss),
    and its KL to the reference is 0 (the reference is the SFT model, before any update: one
    PPO epoch). 4 steps straight and 2 + 2 with a resume between log the same steps and end
    with the same adapters, which moved. The checkpoint holds the adapters and names the SFT
    checkpoint by path and hash, with no reference model; the SFT checkpoint is unchanged to
    the byte; a resume with other LoRA flags is one line."""
    work, sft, _ = tuned
    sft_before = snapshot(os.path.dirname(sft))
    rl = [*RL, '--ppo_epochs=1', '--eval_interval=2', '--init_from=out_sft/ckpt.pt']
    lora = ['--lora_rank=4', '--learning_rate=2e-3']
    py('train_rl.py', *rl, '--out_dir=out_rl_full1', '--max_iters=1', cwd=work)
    out = py('train_rl.py', *rl, *lora, '--out_dir=out_lora_rl', '--max_iters=4', cwd=work).stdout
    py('train_rl.py', *rl, *lora, '--out_dir=out_lora_rl2', '--max_iters=2', cwd=work)
    py('train_rl.py', *RL, '--ppo_epochs=1', '--eval_interval=2', *lora, '--init_from=resume',
       '--out_dir=out_lora_rl2', '--max_iters=4', cwd=work)
    base, _ = load_model(sft)
    r_in_out = sum(4 * sum(w.shape) for name, w in base.named_parameters()
                   if name.split('.')[-2] in ('wq', 'wk', 'wv', 'wo'))
    total = sum(p.numel() for p in base.parameters()) + r_in_out
    assert f"{total:,} parameters, of which {r_in_out:,} train ({r_in_out / total:.2%}: " \
           "LoRA r=4 on wq,wk,wv,wo)" in out
    full, a, b = (read_log(os.path.join(work, d, 'log.csv'))
                  for d in ('out_rl_full1', 'out_lora_rl', 'out_lora_rl2'))
    first = ['iter', 'reward', 'follows', 'wish', 'answer_len', 'kept', 'drawn', 'loss', 'kl']
    steps = lambda rows: [r for r in rows if r['loss']]
    assert [steps(full)[0][c] for c in first] == [steps(a)[0][c] for c in first]
    assert float(steps(a)[0]['kl']) == 0 and int(steps(a)[0]['kept']) > 0
    assert [r['instruct'] for r in full if r['instruct']][0] == \
           [r['instruct'] for r in a if r['instruct']][0]  # iteration 0's eval, greedy
    assert len(steps(a)) == 4 and [(r['iter'], r['reward'], r['kept'], r['answer_len'])
                                   for r in steps(a)] == [(r['iter'], r['reward'], r['kept'],
                                                           r['answer_len']) for r in steps(b)]
    for col in ('loss', 'kl', 'clipped'):
        la, lb = ([float(r[col]) for r in steps(rows)] for rows in (a, b))
        assert np.allclose(la, lb, rtol=1e-4, atol=1e-6), col
    ff, fa, fb = (torch.load(os.path.join(work, d, 'ckpt.pt'), weights_only=True)
                  for d in ('out_rl_full1', 'out_lora_rl', 'out_lora_rl2'))
    assert fa['weights'] == fb['weights'] == ff['weights']
    assert fa['iter_num'] == fb['iter_num'] == 4 and fa['task'] == 'rl' and 'ref_model' not in fa
    assert sum(v.numel() for v in fa['model'].values()) == r_in_out
    for k in fa['model']:
        assert torch.allclose(fa['model'][k], fb['model'][k], atol=1e-5), k
    assert any(v.abs().max() > 0 for k, v in fa['model'].items() if k.endswith('lora_B'))
    rel = os.path.join('out_sft', 'ckpt.pt')
    assert fa['lora'] == dict(rank=4, alpha=16.0, dropout=0.0, targets=['wq', 'wk', 'wv', 'wo'],
                              base=rel, base_from_here=os.path.join('..', rel),
                              base_sha256=weights_sha256(sft, read_checkpoint(sft)))
    assert snapshot(os.path.dirname(sft)) == sft_before
    r = py('sample.py', '--checkpoint=out_lora_rl/ckpt.pt', '--device=cpu', '--temperature=0',
           '--start=Once upon a time', '--max_new_tokens=20', cwd=work)
    assert r.stdout.startswith('Once upon a time')
    run_before = snapshot(os.path.join(work, 'out_lora_rl'))
    for flags, words in ((['--lora_rank=0'], '--lora_rank=4'),
                         (['--lora_rank=4', '--lora_targets=wq,w2'], '--lora_targets=wq,wk,wv,wo'),
                         (['--lora_rank=4', '--lora_dropout=1'], 'lora_dropout')):
        r = py('train_rl.py', *RL, *flags, '--init_from=resume', '--out_dir=out_lora_rl',
               '--max_iters=6', cwd=work, check=False)
        assert one_error_line(r)[0] and words in r.stderr, r.stderr
    assert snapshot(os.path.join(work, 'out_lora_rl')) == run_before


def test_lora_exports_run_in_run_c_transformers_peft_and_llama_cpp(lora_runs, runc, tmp_path):
    """The LoRA checkpoints (SFT on the base, DPO on the SFT adapter), merged: run.c's float32
    file gives sample.py's greedy tokens and the PyTorch model's logits (1e-4 of the largest),
    int8 runs, transformers reads the Hugging Face folder and llama.cpp the GGUF file with our
    logits (1e-4). The PEFT folder, put by peft.PeftModel on the Hugging Face export of the
    base, gives our logits (1e-4), where the base alone does not."""
    work, _, _ = lora_runs
    tok = Tokenizer(os.path.join(work, 'data', 'synth', f'tok{VOCAB}.model'))
    text = open(os.path.join(work, 'data', 'synth', 'stories.txt'), encoding='utf-8').read()[:400]
    ids = tok.encode(text, bos=True)[:100]
    x = torch.tensor([ids])
    logits = str(tmp_path / 'l.bin')
    for name in ('out_lora_sft', 'out_lora_dpo'):
        ckpt = os.path.join(work, name, 'ckpt.pt')
        model, _ = load_model(ckpt)
        with torch.no_grad():
            want = model.eval()(x, torch.full_like(x, -1))[0][0]
        (tmp_path / name).mkdir()
        f32 = export(work, ckpt, tmp_path / name / 'model.bin')
        for prompt in ("Once upon a time", "<|im_start|>user\nTell me a story about a fox."
                                           "<|im_end|>\n<|im_start|>assistant\n"):
            n = len(tok.encode(prompt, bos=True))
            p = py('sample.py', f'--checkpoint={ckpt}', '--device=cpu', '--temperature=0',
                   f'--start={prompt}', f'--max_new_tokens={256 - n + 1}', cwd=work).stdout
            assert run_c(runc, f32, '-t', '0', '-n', '256', '-i', prompt).stdout.decode() == p, name
        run_c(runc, f32, '-t', '0', '-n', str(len(ids)), '-i', tok.decode(ids), '-L', logits)
        got = np.fromfile(logits, dtype=np.float32).reshape(-1, VOCAB)
        assert np.abs(got - want.numpy()).max() / want.abs().max().item() < 1e-4
        q80 = export(work, ckpt, tmp_path / name / 'model_q80.bin', '--version=2')
        assert run_c(runc, q80, '-t', '0', '-n', '40', '-i', 'Once').returncode == 0

    transformers, peft = consumer('transformers'), consumer('peft')
    hf = export(work, ckpt, tmp_path / 'hf', '--version=hf')
    with torch.no_grad():
        hf_logits = transformers.LlamaForCausalLM.from_pretrained(hf).eval()(x).logits[0]
        assert (hf_logits - want).abs().max() < 1e-4
    gguf = export(work, ckpt, tmp_path / 'model.gguf', '--version=gguf')
    llm = llama_cpp_model(consumer('llama_cpp'), gguf)
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[:len(ids)]) - want.numpy()).max() < 1e-4
    # PEFT: the DPO adapter on the Hugging Face export of its base, the SFT LoRA checkpoint
    base_hf = export(work, os.path.join(work, 'out_lora_sft', 'ckpt.pt'), tmp_path / 'base_hf',
                     '--version=hf')
    adapter = export(work, ckpt, tmp_path / 'peft', '--version=peft')
    assert sorted(os.listdir(adapter)) == ['adapter_config.json', 'adapter_model.safetensors']
    with torch.no_grad():
        base = transformers.LlamaForCausalLM.from_pretrained(base_hf).eval()
        assert (base(x).logits[0] - want).abs().max() > 1e-3  # the adapter is needed
        tuned = peft.PeftModel.from_pretrained(base, adapter).eval()
        assert (tuned(x).logits[0] - want).abs().max() < 1e-4


def test_lora_checkpoint_needs_its_own_base(lora_runs, tmp_path):
    """A LoRA checkpoint whose base holds other weights (here: a base path that names another
    checkpoint), or is gone, is refused by sample.py, export.py and a resume in one line, and
    nothing is written. A project moved whole still finds its base from the checkpoint's
    folder, from anywhere. Slips with the LoRA flags are one line too."""
    work, _, _ = lora_runs
    ck = torch.load(os.path.join(work, 'out_lora_sft', 'ckpt.pt'), weights_only=True)
    cases = {'wrong': (os.path.join(work, 'out_sft', 'ckpt.pt'), 'holds other weights'),
             'gone': (os.path.join(work, 'no_such', 'ckpt.pt'), 'which is not there')}
    for name, (base, words) in cases.items():
        (tmp_path / name).mkdir()
        torch.save(dict(ck, lora=dict(ck['lora'], base=base, base_from_here='nothing')),
                   tmp_path / name / 'ckpt.pt')
        before = snapshot(tmp_path)
        ckpt = str(tmp_path / name / 'ckpt.pt')
        for r in (py('sample.py', f'--checkpoint={ckpt}', '--device=cpu', '--max_new_tokens=4',
                     cwd=work, check=False),
                  py('export.py', str(tmp_path / name / 'model.bin'), f'--checkpoint={ckpt}',
                     cwd=work, check=False),
                  py('export.py', str(tmp_path / name / 'peft'), f'--checkpoint={ckpt}',
                     '--version=peft', cwd=work, check=False),
                  py('train.py', '--task=sft', '--init_from=resume', f'--out_dir={tmp_path / name}',
                     *LORA_TUNE, '--lora_rank=8', cwd=work, check=False)):
            assert one_error_line(r)[0] and words in r.stderr, r.stderr
        assert snapshot(tmp_path) == before
    moved = tmp_path / 'moved'
    for d in ('out_tiny', 'out_lora_sft'):
        (moved / d).mkdir(parents=True)
        shutil.copy(os.path.join(work, d, 'ckpt.pt'), moved / d / 'ckpt.pt')
    args = ['--device=cpu', '--temperature=0', '--start=Once upon a time', '--max_new_tokens=30']
    here = py('sample.py', '--checkpoint=out_lora_sft/ckpt.pt', *args, cwd=work).stdout
    there = py('sample.py', f'--checkpoint={moved / "out_lora_sft" / "ckpt.pt"}', *args, cwd=ROOT)
    assert there.stdout == here
    sft = os.path.join(work, 'out_sft', 'ckpt.pt')
    for flags, words in ((['--task=rm', f'--init_from={sft}', '--lora_rank=8'], 'not rm'),
                         (['--task=sft', f'--init_from={sft}', '--lora_rank=8',
                           '--lora_targets=wq,gate'], 'lora_targets'),
                         (['--task=sft', f'--init_from={sft}', '--lora_rank=-1'], 'lora_rank')):
        r = py('train.py', *flags, '--out_dir=out_no', *LORA_TUNE, cwd=work, check=False)
        assert one_error_line(r)[0] and words in r.stderr, r.stderr
    r = py('export.py', str(tmp_path / 'peft'), f'--checkpoint={sft}', '--version=peft', cwd=work,
           check=False)
    assert one_error_line(r)[0] and 'not a LoRA checkpoint' in r.stderr
    assert not os.path.exists(os.path.join(work, 'out_no'))
    assert not os.path.exists(tmp_path / 'peft')


def test_lora_on_experts_merges_into_version_3(moe_run, runc, tmp_path):
    """Adapters on every expert's w1, w2, w3 and on attention of the trained mixture of
    experts, in a LoRA checkpoint as train.py writes one: export.py merges them into version 3,
    which run.c runs with the PyTorch model's logits (1e-4 of the largest) and greedy tokens;
    PEFT, which cannot reach transformers' fused experts, is refused in one line."""
    work, ckpt, _ = moe_run
    base, c = load_model(ckpt)
    m = with_random_adapters(base, LORA_TARGETS, rank=2, alpha=4.0)
    lora = dict(rank=2, alpha=4.0, dropout=0.0, targets=list(LORA_TARGETS), base=ckpt,
                base_from_here='nothing', base_sha256=weights_sha256(ckpt, read_checkpoint(ckpt)))
    torch.save({'model': lora_weights(m), 'model_args': c['model_args'],
                'tokenizer': c['tokenizer'], 'task': 'sft', 'lora': lora}, tmp_path / 'lora.pt')
    tok = Tokenizer(c['tokenizer'])
    ids = tok.encode("Once upon a time, a little fox wanted a red kite.", bos=True)
    x, y = torch.tensor([ids]), torch.full((1, len(ids)), -1)
    with torch.no_grad():
        want = m(x, y)[0][0].numpy()
        assert np.abs(want - base.eval()(x, y)[0][0].numpy()).max() > 1e-2
    f32 = export(work, tmp_path / 'lora.pt', tmp_path / 'moe.bin', '--version=3')
    logits = str(tmp_path / 'l.bin')
    run_c(runc, f32, '-t', '0', '-n', str(len(ids)), '-i', tok.decode(ids), '-L', logits)
    got = np.fromfile(logits, dtype=np.float32).reshape(-1, VOCAB)
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    p = py('sample.py', f'--checkpoint={tmp_path / "lora.pt"}', '--device=cpu', '--temperature=0',
           '--start=Once upon a time', '--max_new_tokens=124', cwd=work).stdout
    assert run_c(runc, f32, '-t', '0', '-n', '128', '-i', 'Once upon a time').stdout.decode() == p
    r = py('export.py', str(tmp_path / 'peft'), f'--checkpoint={tmp_path / "lora.pt"}',
           '--version=peft', cwd=work, check=False)
    assert one_error_line(r)[0] and 'experts' in r.stderr


# -----------------------------------------------------------------------------
# bad input: one error line, never a traceback or a crash (Python and run.c)

def test_bad_checkpoints_are_refused(work, tmp_path):
    good = tmp_path / 'good.pt'
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=300, max_seq_len=32))
    torch.save({'model': m.state_dict(), 'model_args': vars(m.params)}, good)
    data = good.read_bytes()
    cases = {'truncated.pt': data[:len(data) // 2], 'empty.pt': b'', 'garbage.pt': os.urandom(4096)}
    # a pickle that would run code (or need a foreign class) when loaded without weights_only
    evil = tmp_path / 'evil.pt'
    torch.save({'model': {}, 'model_args': {}, 'x': Server}, evil)
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    for name in [*cases, 'evil.pt', 'missing.pt']:
        for script in ('sample.py', 'export.py') if name in ('truncated.pt',
                                                             'evil.pt') else ('sample.py', ):
            args = [f'--checkpoint={tmp_path / name}'
                    ] + ([str(tmp_path / 'm.bin')] if script == 'export.py' else [])
            r = py(script, *args, cwd=work, check=False)
            assert r.returncode == 1, (name, script, r.stderr)
            assert r.stderr.count('\n') == 1 and name in r.stderr, (name, r.stderr)
    assert not (tmp_path / 'm.bin').exists()


@pytest.fixture(scope='session')
def bad_checkpoints(work, tmp_path_factory):
    """Checkpoints that load as data but do not fit: {name: path}. Each is a tiny model's
    checkpoint with the VOCAB tokenizer and one thing wrong."""
    d = tmp_path_factory.mktemp('bad_ckpts')
    tok = open(os.path.join(work, 'data', 'synth', f'tok{VOCAB}.model'), 'rb').read()
    torch.manual_seed(0)
    m = Transformer(
        ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64))
    opt = torch.optim.AdamW(m.parameters())
    good = dict(model=m.state_dict(), model_args=asdict(m.params), tokenizer=tok,
                optimizer=opt.state_dict(), iter_num=2, best_val_loss=9.0, task='pretrain')

    def variant(**change):
        c = {k: (dict(v) if isinstance(v, dict) else v) for k, v in good.items()}
        for k, v in change.items():
            if '.' in k:
                part, key = k.split('.', 1)
                if v is None:
                    del c[part][key]
                else:
                    c[part][key] = v
            else:
                c[k] = v
        return c
    wq = 'layers.0.attention.wq.weight'
    other = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=VOCAB, max_seq_len=64))
    ckpts = {
        'not_ours': {
            'weights': 1
        },
        'args_str':
        variant(**{'model_args.dim': '32'}),
        'heads':
        variant(**{'model_args.n_heads': 3}),
        'zero_heads':
        variant(**{'model_args.n_heads': 0}),
        'huge_seq':
        variant(**{'model_args.max_seq_len': 10**9}),
        'wrong_shape':
        variant(**{'model.' + wq: torch.randn(16, 32)}),
        'missing_key':
        variant(**{'model.norm.weight': None}),
        'not_tensor':
        variant(**{'model.norm.weight': 'x'}),
        'extra_key':
        variant(**{'model.layers.9.attention.wq.weight': torch.randn(32, 32)}),
        'nan':
        variant(**{'model.' + wq: torch.full((32, 32), float('nan'))}),
        'inf':
        variant(**{'model.norm.weight': torch.full((32, ), float('inf'))}),
        'zero_stride':
        variant(**{'model.norm.weight': torch.ones(1).expand(32)}),
        'tok_garbage':
        variant(tokenizer=b'not a sentencepiece model'),
        'tok_other_vocab':
        variant(tokenizer=open(os.path.join(work, 'data', 'synth', 'tok2048.model'), 'rb').read()),
        'no_optimizer':
        variant(optimizer=None, iter_num=None),
        'other_optimizer':
        variant(optimizer=torch.optim.AdamW(other.parameters()).state_dict()),
    }
    paths = {}
    for name, c in ckpts.items():
        paths[name] = str(d / f'{name}.pt')
        torch.save({k: v for k, v in c.items() if v is not None}, paths[name])
    data = open(paths['heads'], 'rb').read()
    for name, blob in (('truncated', data[:len(data) // 2]), ('empty', b''), ('garbage',
                                                                              os.urandom(4096))):
        paths[name] = str(d / f'{name}.pt')
        open(paths[name], 'wb').write(blob)
    # a storage that holds 8 bytes where the pickle declares the whole tensor
    paths['short_storage'] = str(d / 'short_storage.pt')
    torch.save(good, str(d / 'good.pt'))
    with zipfile.ZipFile(str(d / 'good.pt')) as src, \
            zipfile.ZipFile(paths['short_storage'], 'w', zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            blob = src.read(info)
            dst.writestr(info, blob[:8] if info.filename.endswith('/data/0') else blob)
    paths['missing'] = str(d / 'missing.pt')
    return paths


def test_train_refuses_bad_input(work, bad_checkpoints, tmp_path):
    """Bad settings, data and checkpoints: exit 1 with one line each, and the previous run's
    checkpoint and log in --out_dir are byte-identical afterwards."""
    out = os.path.join(work, 'out_guard')
    if not os.path.exists(os.path.join(out, 'ckpt.pt')):
        train(work, out, '--max_iters=2', '--eval_interval=2', '--eval_iters=1')
    before = {f: open(os.path.join(out, f), 'rb').read() for f in ('ckpt.pt', 'log.csv')}
    # a damaged copy of the prepared data
    data = tmp_path / 'data'
    shutil.copytree(
        os.path.join(work, 'data'), data,
        ignore=lambda p, names: [n for n in names if n.startswith(('TinyStories', 'sft', 'dpo'))])

    def damaged(name, change):
        d = tmp_path / name
        shutil.copytree(data, d)
        change(d / 'synth' / f'tok{VOCAB}')
        return f'--data_dir={d}'
    config = tmp_path / 'bad_config.py'
    config.write_text('batch_size = = 3\n')
    base = [
        '--dataset=synth', f'--vocab_size={VOCAB}', *TINY, *CPU, f'--out_dir={out}',
        '--max_iters=1', '--eval_iters=1', '--batch_size=2'
    ]
    cases = {
        k: base + v
        for k, v in {
            'batch_size': ['--batch_size=0'],
            'eval_interval': ['--eval_interval=0'],
            'eval_iters': ['--eval_iters=0'],
            'log_interval': ['--log_interval=0'],
            'max_seq_len': ['--max_seq_len=0'],
            'max_seq_len<0': ['--max_seq_len=-3'],
            'dtype': ['--dtype=float8'],
            'device': ['--device=gpu'],
            'cuda': ['--device=cuda'],
            'float16_cpu': ['--dtype=float16'],
            'lr': ['--learning_rate=-1'],
            'dropout': ['--dropout=1.5'],
            'accumulation': ['--gradient_accumulation_steps=0'],
            'max_iters': ['--max_iters=-1'],
            'n_layers': ['--n_layers=0'],
            'heads': ['--n_heads=5'],
            'vocab': ['--vocab_size=70000'],
            'task': ['--task=ppo'],
            'sft_scratch': ['--task=sft'],
            'rm_scratch': ['--task=rm'],
            'rl_group': ['--task=rl', '--group_size=1'],
            'dpo_beta': ['--task=dpo', '--beta=0', '--init_from=x.pt'],
            'rl_not_synth': ['--task=rl', '--dataset=tinystories', '--init_from=x.pt'],
            'typo': ['--batch_sise=8'],
            'reward_model_not_rl': ['--reward_model=x.pt'],
            'swanlab_mode': ['--swanlab_mode=cloud'],
            'type': ['--batch_size=abc'],
            'config_syntax': [str(config)],
            'config_missing': ['nope.py'],
            'no_data': ['--dataset=nothing_here'],
            'no_tinystories': ['--dataset=tinystories'],
            'shards_deleted': [damaged('deleted', lambda s: os.remove(s / 'train_000.bin'))],
            'shard_empty': [damaged('empty', lambda s: open(s / 'train_000.bin', 'wb').close())],
            'shard_odd': [damaged('odd', lambda s: open(s / 'val.bin', 'ab').write(b'x'))],
            'shard_ids':
            [damaged('ids', lambda s: np.full(100, 60000, np.uint16).tofile(s / 'val.bin'))],
            'meta': [damaged('meta', lambda s: open(s / 'meta.json', 'w').write('{'))],
            **{
                f'ckpt_{name}': [f'--init_from={path}']
                for name, path in bad_checkpoints.items()
                if name not in ('no_optimizer', 'other_optimizer')
            },
        }.items()
    }
    # resuming: a checkpoint that cannot be resumed, in an out_dir of its own
    for name in ('no_optimizer', 'other_optimizer', 'nan', 'truncated'):
        d = tmp_path / f'resume_{name}'
        d.mkdir()
        shutil.copy(bad_checkpoints[name], d / 'ckpt.pt')
        cases[f'resume_{name}'] = base + [
            '--init_from=resume', f'--out_dir={d}', '--max_seq_len=64'
        ]
    answers = refused('train.py', cases, work)
    assert {f: open(os.path.join(out, f), 'rb').read() for f in ('ckpt.pt', 'log.csv')} == before
    assert 'run: python preprocess.py' in answers['no_data'] or 'neither' in answers['no_data']
    assert all(s in answers['no_tinystories'] for s in ('download', 'pretokenize', 'synth'))
    assert 'pretokenize' in answers['shards_deleted'] and 'no CUDA' in answers['cuda']
    assert 'NaN' in answers['ckpt_nan'] and 'NaN' in answers['resume_nan'] and 'beta' in answers[
        'dpo_beta']
    assert 'optimizer' in answers['resume_no_optimizer'] and 'optimizer' in answers[
        'resume_other_optimizer']
    print(f"{len(answers)} bad inputs to train.py, one line each:")
    print('\n'.join(f"  {k}: {v}" for k, v in answers.items()))


def test_export_refuses_bad_input(tiny, bad_checkpoints, tmp_path):
    """Bad checkpoints, output paths and settings: one line each; a previous export is
    byte-identical afterwards, a device node is never replaced, no temporary is left."""
    work, ckpt = tiny
    good = tmp_path / 'good'
    good.mkdir()
    export(work, ckpt, good / 'model.bin')
    before = {f: (good / f).read_bytes() for f in ('model.bin', 'tokenizer.bin')}
    (tmp_path / 'a_file').write_text('x')
    os.mkfifo(tmp_path / 'fifo')
    out = str(tmp_path / 'new' / 'model.bin')
    cases = {f'ckpt_{name}': [out, f'--checkpoint={path}'] for name, path in bad_checkpoints.items()
             if name not in ('no_optimizer', 'other_optimizer')}
    cases.update({
        'out_is_folder': [str(good), f'--checkpoint={ckpt}'],
        'out_under_file': [str(tmp_path / 'a_file' / 'model.bin'), f'--checkpoint={ckpt}'],
        'out_is_device': ['/dev/null', f'--checkpoint={ckpt}'],
        'out_is_fifo': [str(tmp_path / 'fifo'), f'--checkpoint={ckpt}'],
        'hf_out_is_file': [str(tmp_path / 'a_file'), f'--checkpoint={ckpt}', '--version=hf'],
        'group_size_0': [out, f'--checkpoint={ckpt}', '--version=2', '--group_size=0'],
        'group_size_neg': [out, f'--checkpoint={ckpt}', '--version=2', '--group_size=-64'],
        'version': [out, f'--checkpoint={ckpt}', '--version=3'],
        'dtype_v1': [out, f'--checkpoint={ckpt}', '--version=1', '--dtype=q8_0'],
        'out_is_checkpoint': [ckpt, f'--checkpoint={ckpt}'],
        'out_is_tokenizer': [str(good / 'tokenizer.bin'), f'--checkpoint={ckpt}'],
        'hf_over_run': [os.path.dirname(ckpt), f'--checkpoint={ckpt}', '--version=hf'],
        'no_output': [f'--checkpoint={ckpt}'], 'typo': [out, '--chekpoint=x'],
    })
    answers = refused('export.py', cases, work)
    assert not os.path.exists(tmp_path / 'new' / 'model.bin') and os.path.exists('/dev/null')
    assert {f: (good / f).read_bytes() for f in before} == before
    assert 'NaN' in answers['ckpt_nan'] and 'tokens' in answers['ckpt_tok_other_vocab']
    # a full disk while the new file is written over the good one: the good one stays

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    r = subprocess.run([
        sys.executable,
        os.path.join(ROOT, 'export.py'),
        str(good / 'model.bin'), f'--checkpoint={ckpt}'
    ], capture_output=True, text=True, preexec_fn=small_files)
    assert r.returncode == 1 and r.stderr.count(
        '\n') == 1 and 'nothing was replaced' in r.stderr, r.stderr
    assert {
        f: (good / f).read_bytes()
        for f in before
    } == before and sorted(os.listdir(good)) == sorted(before)
    print(f"{len(answers) + 1} bad inputs to export.py, one line each")


def test_sample_refuses_bad_input(tiny, bad_checkpoints, tmp_path):
    """Bad checkpoints, settings and prompts: one line each. Chat on a model that was never
    fine-tuned still runs, with one note that says so."""
    work, ckpt = tiny
    (tmp_path / 'binary.txt').write_bytes(b'\xff\xfe\x00 not text')
    cases = {f'ckpt_{name}': [f'--checkpoint={path}'] for name, path in bad_checkpoints.items()
             if name not in ('no_optimizer', 'other_optimizer')}
    flags = {
        'top_k': '--top_k=-1',
        'max_new_tokens': '--max_new_tokens=-1',
        'temperature': '--temperature=-1',
        'top_p': '--top_p=1.5',
        'num_samples': '--num_samples=0',
        'device': '--device=gpu',
        'cuda': '--device=cuda',
        'start_missing': f'--start=FILE:{tmp_path}/nope.txt',
        'start_binary': f'--start=FILE:{tmp_path}/binary.txt',
        'too_long': '--start=' + 'word ' * 600,
        'typo': '--temprature=0',
        'start_not_utf8': '--start=abc\udcff',
        'answers_no_reward': '--answers=a',
        'eval_folder': f'--eval={tmp_path}'
    }
    cases.update({
        k: [f'--checkpoint={ckpt}', '--device=cpu', v, '--max_new_tokens=2']
        for k, v in flags.items()
    })
    cases['max_new_tokens'] = [f'--checkpoint={ckpt}', '--device=cpu', '--max_new_tokens=-1']
    cases['chat_and_eval'] = [f'--checkpoint={ckpt}', '--device=cpu', '--eval_instruct=1', '--chat']
    answers = refused('sample.py', cases, work)
    assert 'NaN' in answers['ckpt_nan'] and 'tokens' in answers['ckpt_tok_other_vocab']
    assert 'no CUDA' in answers['cuda'] and 'SentencePiece' in answers['ckpt_tok_garbage']
    r = py('sample.py', f'--checkpoint={ckpt}', '--device=cpu', '--chat', '--start=Hi',
           '--max_new_tokens=8', cwd=work)
    assert r.stdout.startswith('Assistant: ') and r.stderr.count(
        '\n') == 1 and 'never fine-tuned' in r.stderr
    print(f"{len(answers)} bad inputs to sample.py, one line each")


def test_run_c_malformed_inputs(exported, tmp_path):
    """Every malformed model, tokenizer, prompt or flag: exit 1 and one line, never a
    crash, also under AddressSanitizer and UBSan."""
    ckpt, model_bin = exported['random']
    V0 = open(model_bin, 'rb').read()
    TOK = open(os.path.join(os.path.dirname(model_bin), 'tokenizer.bin'), 'rb').read()
    V2 = open(export(exported['work'], ckpt, tmp_path / 'q.bin', '--version=2'), 'rb').read()
    tok_bytes = torch.load(ckpt, weights_only=True)['tokenizer']
    moe = random_checkpoint(str(tmp_path / 'moe.pt'), tok_bytes, VOCAB, n_experts=4,
                            n_experts_per_tok=2)
    V3 = open(export(exported['work'], moe, tmp_path / 'moe.bin', '--version=3', '--dtype=q8_0'),
              'rb').read()
    names = ['dim', 'hidden_dim', 'n_layers', 'n_heads', 'n_kv_heads', 'vocab_size', 'max_seq_len']

    def v0(**kw):
        h = list(struct.unpack('<7i', V0[:28]))
        for k, v in kw.items():
            h[names.index(k)] = v
        return struct.pack('<7i', *h) + V0[28:]

    def v2(at=None, fmt='<i', value=0, **kw):
        b = bytearray(V2)
        for k, v in kw.items():
            struct.pack_into('<i', b, 8 + 4 * names.index(k), v)
        if at is not None:
            struct.pack_into(fmt, b, at, value)
        return bytes(b)

    def v3(at, value):  # a mixture of experts: n_experts at byte 42, n_experts_per_tok at 46
        b = bytearray(V3)
        struct.pack_into('<i', b, at, value)
        return bytes(b)

    def tok_entries(change=None, max_len=None, tail=b''):
        ml, ents, off = struct.unpack('<i', TOK[:4])[0], [], 4
        while off < len(TOK):
            s, n = struct.unpack('<fi', TOK[off:off + 8])
            ents.append((s, n, TOK[off + 8:off + 8 + n]))
            off += 8 + n
        ents = change(ents) if change else ents
        return struct.pack('<i', ml if max_len is None else max_len) + b''.join(
            struct.pack('<fi', s, n) + b for s, n, b in ents) + tail

    HUGE = 2**31 - 1
    cases = [  # (what, model bytes, tokenizer bytes, extra args)
        ('empty model', b'', TOK, []),
        ('27-byte model', V0[:27], TOK, []),
        ('header only', V0[:28], TOK, []),
        ('truncated by 1', V0[:-1], TOK, []),
        ('truncated half', V0[:len(V0) // 2], TOK, []),
        ('1 byte too long', V0 + b'\0', TOK, []),
        ('dim 0', v0(dim=0), TOK, []),
        ('dim -64', v0(dim=-64), TOK, []),
        ('dim huge', v0(dim=HUGE), TOK, []),
        ('hidden 0', v0(hidden_dim=0), TOK, []),
        ('layers -1', v0(n_layers=-1), TOK, []),
        ('layers huge', v0(n_layers=HUGE), TOK, []),
        ('heads 0', v0(n_heads=0), TOK, []),
        ('heads not dividing dim', v0(n_heads=3), TOK, []),
        ('kv heads not dividing heads', v0(n_kv_heads=3), TOK, []),
        ('kv heads 0', v0(n_kv_heads=0), TOK, []),
        ('odd head size', v0(dim=66, n_heads=2, n_kv_heads=2), TOK, []),
        ('vocab 0', v0(vocab_size=0), TOK, []),
        ('vocab INT_MIN', v0(vocab_size=-2**31), TOK, []),
        ('vocab negative, no classifier', v0(vocab_size=-VOCAB), TOK, []),
        ('seq 0', v0(max_seq_len=0), TOK, []),
        ('seq huge', v0(max_seq_len=HUGE), TOK, []),
        ('sizes that overflow',
         v0(dim=2**16, hidden_dim=2**18, n_layers=2**10, n_heads=2**10, n_kv_heads=2**10,
            vocab_size=2**22), TOK, []),
        ('v2 truncated', V2[:-1], TOK, []),
        ('v2 header cut', V2[:100], TOK, []),
        ('magic only', V2[:4], TOK, []),
        ('unknown version', v2(at=4, value=4), TOK, []),
        ('version -1', v2(at=4, value=-1), TOK, []),
        ('version 3 without experts', v2(at=4, value=3), TOK, []),
        ('v3 truncated', V3[:-1], TOK, []),
        ('v3 1 byte too long', V3 + b'\0', TOK, []),
        ('v3 0 experts', v3(42, 0), TOK, []),
        ('v3 257 experts', v3(42, 257), TOK, []),
        ('v3 -4 experts', v3(42, -4), TOK, []),
        ('v3 0 experts per token', v3(46, 0), TOK, []),
        ('v3 more per token than experts', v3(46, 5), TOK, []),
        ('v3 group size -1', v3(37, -1), TOK, []),
        ('v3 as float32, sizes of int8', v3(37, 0), TOK, []),
        ('shared flag 2', v2(at=36, fmt='<B', value=2), TOK, []),
        ('group size 0', v2(at=37, value=0), TOK, []),
        ('group size 3', v2(at=37, value=3), TOK, []),
        ('chat flag 3', v2(at=41, fmt='<B', value=3), TOK, []),
        ('group size huge', v2(at=37, value=HUGE), TOK, []),
        ('v2 dim huge', v2(dim=HUGE), TOK, []),
        ('GGUF file', b'GGUF' + V0[4:], TOK, []),
        ('PyTorch checkpoint', b'PK\x03\x04' + V0[4:], TOK, []),
        ('random bytes', os.urandom(5000), TOK, []),
        ('empty tokenizer', V0, b'', []),
        ('tokenizer truncated by 1', V0, TOK[:-1], []),
        ('tokenizer cut mid-entry', V0, TOK[:len(TOK) // 2], []),
        ('tokenizer extra byte', V0, TOK + b'\0', []),
        ('max_token_length 0', V0, tok_entries(max_len=0), []),
        ('max_token_length huge', V0, tok_entries(max_len=HUGE), []),
        ('token length 0', V0, tok_entries(lambda e: e[:7] + [(0.0, 0, b'')] + e[8:]), []),
        ('token length -1', V0, tok_entries(lambda e: e[:7] + [(0.0, -1, b'')] + e[8:]), []),
        ('token length past the end', V0, tok_entries(lambda e: e[:-1] + [(0.0, 9, b'ab')]), []),
        ('token length huge', V0, tok_entries(lambda e: e[:-1] + [(0.0, HUGE, b'ab')]), []),
        ('fewer tokens than the vocabulary', V0, tok_entries(lambda e: e[:-1]), []),
        ('more tokens than the vocabulary', V0, tok_entries(tail=struct.pack('<fi', 0.0, 1) + b'x'),
         []),
        ('prompt not UTF-8', V0, TOK, ['-i', 'abc\udcff']),
        ('prompt overlong UTF-8', V0, TOK, ['-i', '\udcc0\udc80']),
        ('prompt surrogate', V0, TOK, ['-i', '\udced\udca0\udc80']),
        ('prompt cut UTF-8', V0, TOK, ['-i', 'a\udce4\udcbd']),
        ('prompt longer than the context', V0, TOK, ['-i', 'hello world ' * 400]),
        ('unknown flag', V0, TOK, ['-x', '1']),
        ('flag without value', V0, TOK, ['-t']),
        ('temperature not a number', V0, TOK, ['-t', 'hot']),
        ('topp 1.5', V0, TOK, ['-p', '1.5']),
        ('steps -1', V0, TOK, ['-n', '-1']),
        ('mode unknown', V0, TOK, ['-m', 'talk']),
        ('missing tokenizer', V0, None, []),
        ('missing model', None, TOK, []),
    ]
    answers = {}
    for exe in run_binaries():
        for what, model, tokb, args in cases:
            mp, tp = str(tmp_path / 'model.bin'), str(tmp_path / 'tok.bin')
            for path, blob in ((mp, model), (tp, tokb)):
                if os.path.exists(path):
                    os.remove(path)
                if blob is not None:
                    open(path, 'wb').write(blob)
            env = dict(os.environ, ASAN_OPTIONS='exitcode=99:detect_leaks=0',
                       UBSAN_OPTIONS='halt_on_error=1:exitcode=98:print_stacktrace=1')
            r = subprocess.run([
                exe, mp, '-z', tp, '-n', '8', *[a.encode('utf-8', 'surrogateescape') for a in args]
            ], capture_output=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
            lines = r.stderr.decode('utf-8', 'replace').splitlines()
            assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith('error: '), (
                exe, what, r.returncode, lines[:5])
            answers[what] = lines[0].replace(str(tmp_path), '')
    assert 'llama.cpp' in answers['GGUF file'] and 'export.py' in answers['PyTorch checkpoint']
    print(f"{len(cases)} malformed inputs x {len(run_binaries())} binaries: one line, exit 1")
    print('\n'.join(f"  {what}: {line}" for what, line in answers.items()))


def test_run_c_refuses_fifos_nan_and_missing_files(exported, runc, tmp_path):
    """A FIFO as model or tokenizer is refused at once (it used to block in open); a model
    whose weights hold NaN stops with one line instead of printing garbage; a missing model
    says how to make one."""
    _, model_bin = exported['random']
    tok = os.path.join(os.path.dirname(model_bin), 'tokenizer.bin')
    os.mkfifo(tmp_path / 'fifo')
    blob = bytearray(open(model_bin, 'rb').read())
    blob[28 + 4 * 100:28 + 4 * 101] = struct.pack('<f', float('nan'))  # an embedding value
    (tmp_path / 'nan.bin').write_bytes(bytes(blob))
    cases = {
        'fifo model': ([str(tmp_path / 'fifo'), '-z', tok], 'not a regular file'),
        'fifo tokenizer': ([model_bin, '-z', str(tmp_path / 'fifo')], 'not a regular file'),
        'nan greedy': ([str(tmp_path / 'nan.bin'), '-z', tok, '-t', '0', '-i',
                        'a b c d e f g h'], 'NaN'),
        'nan sampled': ([str(tmp_path / 'nan.bin'), '-z', tok, '-t', '1', '-i',
                         'a b c d e f g h'], 'NaN'),
        'no model': ([str(tmp_path / 'none.bin'), '-z', tok], 'make demo')
    }
    for what, (args, words) in cases.items():
        r = run_c(runc, *args, check=False)
        lines = r.stderr.decode().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and words in lines[0], (what, lines)


def test_fuzz_regressions_and_corpus(tmp_path):
    """Every input the fuzzers keep, fuzz/corpus (seeds) and fuzz/regressions (inputs that
    once crashed run.c), through the CLI, also under ASan+UBSan: exit 0, or exit 1 with one
    line 'error: ...'; never a crash. Formats as fuzz/fuzz.c reads them: a model file; 2 bytes
    of vocab_size - 3 then a tokenizer.bin; a prompt (argv ends it at its first NUL)."""
    fuzz = os.path.join(ROOT, 'fuzz')
    tok512, model512 = os.path.join(fuzz,
                                    'tokenizer.bin'), os.path.join(fuzz, 'corpus', 'model',
                                                                   'v0_vocab512.bin')

    def model_of_vocab(vocab, dim=2, hidden=2, seq=8):  # version 0, one layer, one head
        floats = vocab * dim + 3 * dim + 4 * dim * dim + 3 * hidden * dim + seq * dim
        return struct.pack('<7i', dim, hidden, 1, 1, 1, vocab, seq) + struct.pack(
            f'<{floats}f', *[0.1] * floats)

    def tokenizer_of_vocab(vocab):
        pieces = [b'<unk>', b'<s>', b'</s>'] + [b'a%d' % i for i in range(vocab - 3)]
        return struct.pack('<i', 16) + b''.join(
            struct.pack('<fi', -i, len(p)) + p for i, p in enumerate(pieces))

    def header_vocab(m):  # the model's vocab_size, or None
        if len(m) >= 28 and m[:4] != struct.pack('<I', 0x616b3432):
            return abs(struct.unpack('<i', m[20:24])[0])
        return struct.unpack('<i', m[28:32])[0] if len(m) >= 32 else None

    def files(kind):
        return sorted(glob.glob(os.path.join(fuzz, 'corpus', kind, '*')) +
                      glob.glob(os.path.join(fuzz, 'regressions', kind, '*')))

    def write(name, data):
        path = str(tmp_path / name)
        with open(path, 'wb') as f:
            f.write(data)
        return path

    cases = []  # (input, args, exit statuses allowed)
    for f in files('model'):
        m = open(f, 'rb').read()
        cases.append((f, [f, '-z', tok512, '-n', '4', '-t', '0'], (0, 1)))
        v = header_vocab(m)
        # also with a tokenizer that fits: the forward pass runs
        if v is not None and 3 <= v <= 4096 and v != 512:
            tok = write(f'tok{v}.bin', tokenizer_of_vocab(v))
            cases.append((f, [f, '-z', tok, '-n', '4', '-t', '0'], (0, 1)))
            cases.append((f, [f, '-z', tok, '-n', '4', '-t', '1', '-p', '0.9', '-s', '1'], (0, 1)))
    for f in files('tokenizer'):
        b = open(f, 'rb').read()
        if len(b) < 2:
            continue
        vocab = 3 + struct.unpack('<H', b[:2])[0] % 2048
        mp, tp = write(f'model{vocab}.bin', model_of_vocab(vocab)), write('tok.bin', b[2:])
        cases.append(
            (f, [mp, '-z', tp, '-n', '4', '-t', '0', '-i',
                 'Once upon a time <|im_start|>'], (0, 1)))
        cases.append(
            (f, [mp, '-z', tp, '-m', 'tokenize', '-i',
                 'h\u00e9llo \u4f60\u597d\u2581x<|im_end|>'], (0, 1)))
    for f in files('prompt'):
        text = open(f, 'rb').read().split(b'\0')[0]  # what argv can carry
        try:
            text.decode('utf-8')  # strict, as run.c's valid_utf8: no overlongs, no surrogates
            ok = (0,)
        except UnicodeDecodeError:
            ok = (1,)
        cases.append((f, [model512, '-z', tok512, '-m', 'tokenize', '-i', text], ok))
        cases.append((f, [model512, '-z', tok512, '-n', '4', '-t', '0', '-i', text], (0, 1)))
    assert len(files('model')) and len(files('tokenizer')) and len(files('prompt'))

    env = dict(os.environ, ASAN_OPTIONS='exitcode=99:detect_leaks=0',
               UBSAN_OPTIONS='halt_on_error=1:exitcode=98')
    for exe in run_binaries():
        for f, args, ok in cases:
            args = [a if isinstance(a, bytes) else a.encode() for a in args]
            r = subprocess.run([exe, *args], capture_output=True, env=env, stdin=subprocess.DEVNULL,
                               timeout=60)
            lines = r.stderr.decode('utf-8', 'replace').splitlines()
            assert r.returncode in ok, (exe, os.path.relpath(f, ROOT), r.returncode, lines[-10:])
            if r.returncode == 1:
                assert len(lines) == 1 and lines[0].startswith('error: '), (exe,
                                                                            os.path.relpath(
                                                                                f,
                                                                                ROOT), lines[:10])
    print(f"{len(cases)} fuzz corpus and regression cases x {len(run_binaries())} binaries")


def test_fuzz_harness_builds_and_replays(tmp_path):
    """fuzz/fuzz.c includes run.c: all three targets build with gcc and a replay main (no
    libFuzzer), and replay fuzz/corpus and fuzz/regressions without a crash, so a change to
    run.c that breaks the harness fails here, not weeks later in `make fuzz`."""
    r = subprocess.run(['make', '-s', 'fuzz-replay', f'FUZZ_DIR={tmp_path}'], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    counts = [int(n) for n in re.findall(r'(\d+) inputs replayed', r.stdout)]
    assert len(counts) == 3 and min(counts) > 0, r.stdout


# -----------------------------------------------------------------------------
# a learner's files are never lost: each script writes only the outputs it was given

def test_outputs_are_never_inputs(tiny, runc, tmp_path):
    """An output path that is somebody's input: the checkpoint given as the output (the slip
    of `python export.py out_sft/ckpt.pt`), a log, a tokenizer, a user's file, a run's folder,
    the tokenizer.bin another model beside it reads, run.c's -L on its own model or tokenizer,
    tokenizer.py over a model. And what stays allowed: a second model with the same tokenizer
    beside the first, and a model replacing the only one in its folder, tokenizer and all."""
    work, ckpt = tiny
    shutil.copytree(os.path.dirname(ckpt), tmp_path / 'run')  # a run: its ckpt.pt and log.csv
    ck = str(tmp_path / 'run' / 'ckpt.pt')
    exp = tmp_path / 'exp'
    export(work, ck, exp / 'model.bin')
    other = other_tokenizer_model(work, tmp_path / 'other.pt')
    (tmp_path / 'notes.txt').write_text('my notes\n')
    shutil.copy(os.path.join(work, 'data', 'synth', f'tok{VOCAB}.model'), exp / 'model.model')
    before = snapshot(tmp_path)
    cases = {
        'a checkpoint as the output': [ck, f'--checkpoint={other}'],
        'the checkpoint it reads': [ck, f'--checkpoint={ck}'],
        'the checkpoint it reads, spelled otherwise':
        [str(tmp_path / 'exp' / '..' / 'run' / 'ckpt.pt'), f'--checkpoint={ck}'],
        'a log': [str(tmp_path / 'run' / 'log.csv'), f'--checkpoint={ck}'],
        'a tokenizer.bin': [str(exp / 'tokenizer.bin'), f'--checkpoint={ck}'],
        "a user's file": [str(tmp_path / 'notes.txt'), f'--checkpoint={ck}'],
        'a gguf over a checkpoint': [ck, f'--checkpoint={other}', '--version=gguf'],
        "another model's tokenizer.bin": [str(exp / 'other.bin'), f'--checkpoint={other}'],
        "hf over a run's folder": [str(tmp_path / 'run'), f'--checkpoint={ck}', '--version=hf'],
    }
    answers = refused('export.py', cases, work)
    assert f'did you mean --checkpoint={ck}' in answers['a checkpoint as the output']
    assert 'tokenizer of' in answers["another model's tokenizer.bin"]
    model, tok = str(exp / 'model.bin'), str(exp / 'tokenizer.bin')
    for args in ([model, '-n', '4', '-L', model], [model, '-n', '4', '-L', tok],
                 [model, '-z', tok, '-n', '4', '-L',
                  str(tmp_path / 'exp' / '.' / 'tokenizer.bin')]):
        ok, err = one_error_line(run_c(runc, *args, check=False))
        assert ok and 'reads' in err, (args, err)
    ok, err = one_error_line(
        py('tokenizer.py', '-t', str(exp / 'model.model'), cwd=work, check=False))
    assert ok, err
    assert snapshot(tmp_path) == before
    print('\n'.join(f"  {k}: {v}" for k, v in answers.items()))
    # allowed: the same tokenizer beside, or the only model in its folder replaced whole
    export(work, ck, exp / 'again.bin')
    solo = tmp_path / 'solo'
    export(work, ck, solo / 'model.bin')
    export(work, other, solo / 'model.bin')
    assert (solo / 'tokenizer.bin').read_bytes() == tokenizer_bin(Tokenizer(
        torch.load(other, weights_only=True)['tokenizer']))
    run_c(runc, str(solo / 'model.bin'), '-n', '4')


def test_runs_never_write_where_they_start(tuned, tmp_path):
    """Fine-tuning without --out_dir, or with the starting checkpoint's own folder (however
    it is spelled), would write over that checkpoint and its log: refused. So is a fresh run
    into a folder that holds another task's checkpoint. Without --out_dir a fine-tuning run
    writes to out_{task}, and its start stays as it was."""
    work, sft, _ = tuned
    shutil.copytree(os.path.dirname(sft), tmp_path / 'out_sft')
    shutil.copytree(os.path.join(work, 'out_tiny'), tmp_path / 'out')
    before = snapshot(tmp_path)
    data = [
        f'--data_dir={work}/data', '--dataset=synth', f'--vocab_size={VOCAB}', *CPU,
        '--max_iters=1', '--eval_iters=1', '--batch_size=2'
    ]
    cases = {
        'sft into the folder it starts from':
        ['--task=sft', '--init_from=out/ckpt.pt', '--out_dir=out'],
        'sft again without --out_dir': ['--task=sft', '--init_from=out_sft/ckpt.pt'],
        'dpo, the folder spelled otherwise':
        ['--task=dpo', '--init_from=out_sft/ckpt.pt', f'--out_dir={tmp_path}/out/../out_sft/'],
        'rm into its start':
        ['--task=rm', f'--init_from={tmp_path}/out_sft/ckpt.pt', '--out_dir=./out_sft'],
        "pretraining over an sft run": ['--out_dir=out_sft', *TINY],
        "dpo over a pretrained run": ['--task=dpo', '--init_from=out_sft/ckpt.pt', '--out_dir=out'],
    }
    answers = refused('train.py', {k: data + v for k, v in cases.items()}, tmp_path)
    assert snapshot(tmp_path) == before
    print('\n'.join(f"  {k}: {v}" for k, v in answers.items()))
    r = py('train.py', *data, '--task=sft', '--init_from=out/ckpt.pt', '--log_interval=1',
           cwd=tmp_path)
    assert 'saved out_sft/ckpt.pt' in r.stdout  # beside the pretrained run, never over it
    assert torch.load(tmp_path / 'out_sft' / 'ckpt.pt', weights_only=True)['iter_num'] == 1
    assert {p: h for p, h in snapshot(tmp_path).items() if '/out/' in p} == \
        {p: h for p, h in before.items() if '/out/' in p}


def test_prepared_data_never_shared(work, tmp_path):
    """Prepared data is keyed so that two inputs never share a folder: a user's synth.jsonl is
    not the embedded synth set, 'my data ü' is not 'my-data ü', a new corpus's tokenizer goes
    beside that corpus. A later prepare that would replace data made from another input, with
    another tokenizer, or a file the user edited, refuses in one line."""
    data = tmp_path / 'data'
    shutil.copytree(os.path.join(work, 'data', 'synth'), data / 'synth',
                    ignore=lambda p, names: [n for n in names if n.startswith(('sft', 'dpo'))])
    tok = str(data / 'synth' / f'tok{VOCAB}.model')
    flags = [f'--data_dir={data}', f'--vocab_size={VOCAB}']
    chat = lambda q, a: json.dumps({'messages': [{'role': 'user', 'content': q},
                                                 {'role': 'assistant', 'content': a}]}) + '\n'
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'synth.jsonl').write_text(chat('Who are you?', 'A tiny model.') * 30)
    (tmp_path / 'my data ü.jsonl').write_text(chat('Hi', 'Hello.') * 30)
    (tmp_path / 'my-data ü.jsonl').write_text(chat('Bye', 'Goodbye.') * 30)
    py('preprocess.py', 'sft', '--dataset=synth', *flags, '--num_chats=300', cwd=tmp_path)
    embedded = snapshot(data / 'synth')
    folders = {}
    for name in ('mine/synth.jsonl', 'my data ü.jsonl', 'my-data ü.jsonl'):
        py('preprocess.py', 'sft', f'--dataset={name}', *flags, f'--tokenizer={tok}', cwd=tmp_path)
        folders[name] = data / dataset_name(str(tmp_path / name)) / f'sft{VOCAB}'
        meta = json.load(open(folders[name] / 'meta.json'))
        assert meta['source'] == os.path.realpath(tmp_path / name)
    assert len(set(folders.values())) == 3 and snapshot(data / 'synth') == embedded
    # train.py reads the folder of the dataset it is given: 'my data ü' trains on its own rows
    ids = load_sequences(str(folders['my data ü.jsonl'] / 'train.npz'))[0][0]
    assert 'Hello.' in Tokenizer(tok).decode(ids) and 'Goodbye' not in Tokenizer(tok).decode(ids)
    # a tokenizer of another corpus goes beside it, never over synth's
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text('\n<|endoftext|>\n'.join(synth.stories(2000, seed=5)))
    py('preprocess.py', 'train_vocab', f'--dataset={corpus}', *flags, cwd=tmp_path)
    assert os.path.exists(data / dataset_name(str(corpus)) / f'tok{VOCAB}.model')
    assert snapshot(data / 'synth') == embedded
    # refusals: each would replace data made from another input or with another tokenizer
    (data / 'synth' / f'tok{VOCAB}' / 'my_notes.txt').write_text('mine')
    edited = data / 'synth' / 'dpo_train.jsonl'
    edited.write_text(chat('Hi', 'Hello.'))  # a user's own rows where the synth set goes
    before = snapshot(tmp_path)
    cases = {
        'synth with another seed': ['synth', '--seed=1'],
        'the synth sft set of another size': ['sft', '--dataset=synth', '--num_chats=200'],
        'a synth file the user edited': ['dpo', '--dataset=synth'],
        'a tokenizer trained otherwise on the same corpus':
        ['train_vocab', '--dataset=synth', '--character_coverage=0.99'],
        'prepared again with another tokenizer': [
            'sft', '--dataset=mine/synth.jsonl',
            f'--tokenizer={data / dataset_name(str(corpus))}/tok{VOCAB}.model'
        ],
        "a folder holding a user's file": ['pretokenize', '--dataset=synth'],
        'no tokenizer for a chat file': ['sft', f'--dataset={tmp_path}/my data ü.jsonl'],
    }
    answers = refused('preprocess.py', {k: v + flags for k, v in cases.items()}, tmp_path)
    assert snapshot(tmp_path) == before
    assert '--tokenizer=' in answers['no tokenizer for a chat file']
    print('\n'.join(f"  {k}: {v}" for k, v in answers.items()))


def test_temporaries_are_never_a_users_file(tiny, tmp_path):
    """Temporaries are made exclusively under a name with the process id: a user's file or
    folder of that name, or of the names used before (X.tmp, X.old), is never touched. Two
    exports into one folder at once take turns, over several rounds: the folder ends up
    whole, one model's or the other's, with no temporary left; an export killed midway
    leaves the previous export whole and does not stop the next one."""
    work, ckpt = tiny
    mine = {
        tmp_path / f'f.tmp{os.getpid()}': b'a',
        tmp_path / f'dir.tmp{os.getpid()}': b'b',
        tmp_path / 'hf.tmp' / 'x': b'c',
        tmp_path / 'hf.old' / 'x': b'd',
        tmp_path / 'hf.tmp999999' / 'x': b'e'
    }
    for p, b in mine.items():  # a user's files and folders, under the names temporaries had
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b)
    write_atomic(str(tmp_path / 'f'), lambda f: f.write(b'new'))
    write_folder(str(tmp_path / 'dir'), lambda d: open(os.path.join(d, 'x'), 'w').write('x'))
    other = other_tokenizer_model(work, tmp_path / 'other.pt')
    for _ in range(2):
        export(work, ckpt, tmp_path / 'hf', '--version=hf')
    assert all(p.read_bytes() == b
               for p, b in mine.items()) and (tmp_path / 'f').read_bytes() == b'new'
    # two exports into one folder at once: each result is one model's whole
    for rnd in range(3):
        procs = [
            subprocess.Popen([
                sys.executable,
                os.path.join(ROOT, 'export.py'),
                str(tmp_path / 'hf'), f'--checkpoint={c}', '--version=hf'
            ], cwd=work, stderr=subprocess.PIPE)
            for c in ((ckpt, other) if rnd % 2 else (other, ckpt))
        ]
        assert all(p.wait(timeout=300) == 0 for p in procs)
        config = json.load(open(tmp_path / 'hf' / 'config.json'))
        vocab = len(json.load(open(tmp_path / 'hf' / 'tokenizer.json'))['model']['vocab'])
        rows = safetensors_header(tmp_path / 'hf' /
                                  'model.safetensors')['model.embed_tokens.weight']['shape'][0]
        assert config['vocab_size'] == vocab == rows, rnd
        procs = [
            subprocess.Popen([
                sys.executable,
                os.path.join(ROOT, 'export.py'),
                str(tmp_path / 'bins' / name), f'--checkpoint={c}'
            ], cwd=work, stderr=subprocess.PIPE) for name, c in (('a.bin', ckpt), ('b.bin', other))
        ]
        codes = [p.wait(timeout=300) for p in procs]
        # the second to take the folder refuses (the first model beside reads tokenizer.bin)
        assert sorted(codes) == [0, 1], codes
        kept = 'a.bin' if codes[0] == 0 else 'b.bin'
        n = np.frombuffer((tmp_path / 'bins' / kept).read_bytes()[20:24], np.int32)[0]
        assert Tokenizer(
            torch.load(ckpt if kept == 'a.bin' else other,
                       weights_only=True)['tokenizer']).n_words == abs(n)
        shutil.rmtree(tmp_path / 'bins')
    users = {p.relative_to(tmp_path).parts[0] for p in mine}
    assert not [f for f in os.listdir(tmp_path) if '.tmp' in f and f not in users]
    assert (tmp_path / 'dir' / 'x').read_text() == 'x'


def test_data_that_cannot_teach_is_refused(tiny, tmp_path):
    """SFT whose every answer lies past max_seq_len would print a perfect loss of 0 and save
    it; DPO and the reward model on over-long prompts would sit at 0.6931 with accuracy 0:
    refused before training, naming how many rows and what to do. Where only some rows
    cannot teach, they are left out with a warning that counts them."""
    work, ckpt = tiny
    tok = f'--tokenizer={work}/data/synth/tok{VOCAB}.model'
    long = 'a fox and a cat sang by the river. ' * 40  # ~400 tokens: past a context of 256
    chat = lambda q: json.dumps({'messages': [{'role': 'user', 'content': q},
                                              {'role': 'assistant', 'content': 'Yes.'}]}) + '\n'
    pref = lambda q: json.dumps({'prompt': q, 'chosen': 'Yes.', 'rejected': 'No.'}) + '\n'
    (tmp_path / 'long_chats.jsonl').write_text(chat(long) * 20)
    (tmp_path / 'long_prefs.jsonl').write_text(pref(long) * 20)
    (tmp_path / 'some_long.jsonl').write_text(chat('Hi?') * 190 +
                                              chat(long) * 10)  # val: rows 0, 100
    flags = [f'--data_dir={tmp_path}/data', f'--vocab_size={VOCAB}']
    for kind, name in (('sft', 'long_chats'), ('dpo', 'long_prefs'), ('sft', 'some_long')):
        py('preprocess.py', kind, f'--dataset={name}.jsonl', *flags, tok, cwd=tmp_path)
    shutil.copytree(os.path.dirname(ckpt), tmp_path / 'out')
    before = snapshot(tmp_path)
    run = [
        *flags, *CPU, '--init_from=out/ckpt.pt', '--max_iters=2', '--eval_iters=1', '--batch_size=2'
    ]
    cases = {'sft, every answer past the context': ['--task=sft', '--dataset=long_chats.jsonl'],
             'dpo, every prompt past the context': ['--task=dpo', '--dataset=long_prefs.jsonl'],
             'rm, every prompt past the context': ['--task=rm', '--dataset=long_prefs.jsonl']}
    answers = refused('train.py', {k: run + v for k, v in cases.items()}, tmp_path)
    assert snapshot(tmp_path) == before
    assert all('max_seq_len' in a and 'none of its 19' in a for a in answers.values()), answers
    print('\n'.join(f"  {k}: {v}" for k, v in answers.items()))
    r = py('train.py', *run, '--task=sft', '--dataset=some_long.jsonl', cwd=tmp_path)
    assert re.search(r'warning: .*: 10 of its 198 conversations have no answer token',
                     r.stderr), r.stderr


def test_log_matches_its_checkpoint(work):
    """log.csv holds exactly the iterations its checkpoint holds. Killed (SIGKILL) at random
    moments over several rounds, a run never leaves a row the checkpoint lacks, and resumed
    each time it ends with the uninterrupted run's log, row for row."""
    common = ['--max_iters=40', '--lr_decay_iters=40', '--eval_interval=5', '--warmup_iters=5',
              '--batch_size=4', '--eval_iters=1']
    train(work, 'out_log_straight', *common)
    out = os.path.join(work, 'out_log_kill')
    shutil.rmtree(out, ignore_errors=True)
    args = train_cmd(out, '--learning_rate=3e-3', '--min_lr=3e-4', *common)
    rng = random.Random(0)
    for trial in range(4):
        resume = ['--init_from=resume'] if os.path.exists(os.path.join(out, 'ckpt.pt')) else []
        p = subprocess.Popen(args + resume, cwd=work, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        saves = 0
        while saves < 1 + trial % 2:
            line = p.stdout.readline()
            assert line, 'the run ended before it was killed'
            saves += line.startswith('saved ')
        time.sleep(rng.random() * 0.3)
        p.send_signal(signal.SIGKILL)
        p.wait()
        ck = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
        logged = read_log(os.path.join(out, 'log.csv'))
        assert logged == ck['log'][:len(logged)], trial  # never a row past the checkpoint
    r = subprocess.run(args + ['--init_from=resume'], cwd=work, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a = read_log(os.path.join(work, 'out_log_straight', 'log.csv'))
    b = read_log(os.path.join(out, 'log.csv'))
    key = lambda rows: [(r['iter'], bool(r['val_loss']), r['lr']) for r in rows]
    assert key(a) == key(b), (key(a), key(b))
    assert np.allclose([float(r['train_loss'] or 0)
                        for r in a], [float(r['train_loss'] or 0) for r in b], rtol=1e-4, atol=1e-5)


def test_slips_get_one_line(tiny, tmp_path):
    """The tracebacks a careless user met, now one line each: a checkpoint given where a
    config file goes, a config line that fails, a reward model without its head, modes that
    cannot go together, Ctrl-C during an export (which keeps the previous export whole)."""
    work, ckpt = tiny
    (tmp_path / 'name.py').write_text('batch_size = 8\nlearning_rate = lr_max / 10\n')
    (tmp_path / 'zero.py').write_text('batch_size = 8 // 0\n')
    (tmp_path / 'bytes.py').write_bytes(b'\xff\xfe\x00 binary')
    c = torch.load(ckpt, weights_only=True)
    torch.save(dict(c, task='rm'), tmp_path / 'rm_no_head.pt')
    data = [
        '--dataset=synth', f'--vocab_size={VOCAB}', *TINY, *CPU, '--max_iters=1',
        f'--out_dir={tmp_path}/o'
    ]
    train_cases = {
        'checkpoint as a config file': data + [ckpt],
        'NameError': data + [str(tmp_path / 'name.py')],
        'ZeroDivisionError': data + [str(tmp_path / 'zero.py')],
        'binary config': data + [str(tmp_path / 'bytes.py')]
    }
    m = [f'--checkpoint={ckpt}', '--device=cpu']
    rm = f'--reward={tmp_path}/rm_no_head.pt'
    sample_cases = {
        'checkpoint as a config file': [ckpt],
        'reward and chat': m + [rm, '--chat', '--start=Hi'],
        'reward and eval': m + [rm, f'--eval={tmp_path}/name.py'],
        'reward and eval_instruct': m + [rm, '--eval_instruct=3'],
        'system without chat': m + ['--system=Be kind.', '--start=Hi'],
        'start with eval_instruct': m + ['--eval_instruct=3', '--start=Hi'],
        'a reward model without its head': [rm, '--start=Hi', '--answers=Yes'],
        'eval and chat': m + ['--chat', '--eval=x.txt']
    }
    answers = {**refused('train.py', train_cases, work), **{
        'sample: ' + k: v for k, v in refused('sample.py', sample_cases, work).items()}}
    assert '--init_from=' in answers['checkpoint as a config file']
    assert '--checkpoint=' in answers['sample: checkpoint as a config file']
    assert 'line 2' in answers['NameError'] and 'reward_head' in answers[
        'sample: a reward model without its head']
    print('\n'.join(f"  {k}: {v}" for k, v in answers.items()))
    # Ctrl-C in the middle of an export: one line, exit 130, the earlier export whole
    big = random_checkpoint(str(tmp_path / 'big.pt'), c['tokenizer'], VOCAB, dim=512, n_layers=8,
                            n_heads=8)
    export(work, big, tmp_path / 'x' / 'model.bin')
    before = snapshot(tmp_path / 'x')
    p = subprocess.Popen([
        sys.executable,
        os.path.join(ROOT, 'export.py'),
        str(tmp_path / 'x' / 'model.bin'), f'--checkpoint={big}', '--version=2'
    ], cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while p.poll() is None and not glob.glob(str(tmp_path / 'x' / 'model.bin.tmp*')):
        pass
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and err.strip().startswith('interrupted: ') and len(
        err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path / 'x') == before
