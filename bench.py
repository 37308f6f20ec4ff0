"""
Benchmarks: our run.c, sample.py, export.py, train.py and preprocess.py, each beside
karpathy/llama2.c (the peer) on the same input, on the same machine; run.c also beside
llama.cpp (through llama-cpp-python, a benchmark-only dependency) on the same weights.

$ make bench                                 # everything; the peer is ../llama2.c if present
$ make bench LLAMA2C=/path/to/llama2.c BENCH_ARGS="--only=decode,prefill --rounds=3"
$ python bench.py --only=decode --rounds=3   # items: decode,prefill,sample,export,train,pretok,memory,gpu
$ python bench.py --only=decode --models=15M --classes=avx2 --llamacpp=avx2=/path/to/llamacpp-avx2
$ python bench.py --quick                    # tiny step counts, 15M shape only: for development

Nothing is downloaded: the models are random weights in llama2.c's 15M and 110M shapes,
exported by our export.py, and tokenizer.bin is synthetic. Everything generated stays in
--dir and is reused by the next run. Both run.c's are built with the Makefile's runomp
flags, and for decode and prefill once per instruction set the CPU runs (--classes):
native, AVX2 code on an AVX-512 CPU, plain x86-64. Ours and the peers run alternately
(ours, llama2.c, llama.cpp, ours, ...) for --rounds rounds, so a busy moment hits all;
cells are median [min-max]. "ours better by" is > 1 when ours wins: ours/peer for a rate,
peer/ours for seconds and megabytes. llama.cpp's rates are its own timer's (its perf
counters around each decode), not Python's.
"""

import datetime
import json
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version as package_version

from configurator import configure
from preprocess import dataset_name

# -----------------------------------------------------------------------------
only = 'decode,prefill,sample,export,train,pretok,memory,gpu'  # the items to run
rounds = 0               # A/B rounds; 0 = 5 (1 with --quick); export and train take at most 3
quick = False            # tiny step counts and the 15M shape only, to try the script out
llama2c = 'auto'         # the peer's checkout: 'auto' = ../llama2.c if it exists, '' = none
dir = '/tmp/bench'       # build folder outside git: binaries, models, data (shadows dir())
gpu_device = 'cuda'      # the gpu item's device; 'cpu' (with --quick) tries it out without one
gpu_models = '15M,110M,default'  # the gpu item's models (see GPU_TRAIN)
models = '15M,110M'      # the shapes of the run.c items (decode, prefill, memory)
classes = 'auto'         # decode and prefill built for: native, avx2, x86-64 (see CLASS_FLAGS);
                         # 'auto' = every one this CPU runs
llamacpp = 'auto'        # llama.cpp per class: 'class=folder,...', each folder a llama-cpp-python
                         # built for that class (pip install --target); 'auto' = the installed
                         # package as native (pip builds it for this CPU); '' = none
# -----------------------------------------------------------------------------
configure(globals())
rounds = rounds or (1 if quick else 5)
REPO = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.abspath(dir)
if llama2c == 'auto':
    llama2c = os.path.join(os.path.dirname(REPO), 'llama2.c')
PEER = os.path.abspath(llama2c) if llama2c and os.path.exists(os.path.join(llama2c, 'run.c')) else None
CC, PY = os.environ.get('CC', 'gcc'), sys.executable
FIXTURES = os.path.abspath(os.environ.get('FIXTURES', os.path.join(REPO, '..', 'shared', 'fixtures')))

# llama2.c's two pretrained shapes; both projects' ModelArgs have exactly these fields
SHAPES = {
    '15M': dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, hidden_dim=768, vocab_size=32000,
                max_seq_len=256, multiple_of=32, norm_eps=1e-5, dropout=0.0),
    '110M': dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, hidden_dim=2048, vocab_size=32000,
                 max_seq_len=1024, multiple_of=32, norm_eps=1e-5, dropout=0.0)}
shapes = ['15M'] if quick else models.split(',')
steps = 64 if quick else 256          # run.c -n; new tokens for sample
train_iters = 6 if quick else 15      # per train.py run; the first 3 are not counted
ROWS, COMMANDS = [], []               # for the table at the end


class Failed(Exception):
    pass


def run(cmd, threads=None, cwd=None):
    """Run cmd to its end: (stdout, stderr, wall seconds, peak RSS in MB). os.wait4 gives
    the child's peak RSS, which subprocess.run does not."""
    env = dict(os.environ, **({'OMP_NUM_THREADS': str(threads)} if threads else {}))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        o, e = out.read().decode(errors='replace'), err.read().decode(errors='replace')
    if p.returncode != 0:
        raise Failed(f"{shlex.join(cmd)} exited with {p.returncode}:\n{(o + e)[-1500:]}")
    return o, e, wall, usage.ru_maxrss / 1024


def ab(ours, *peers, n=None):
    """Call ours() and each peer (None: absent) alternately, n times each: ours' results, then
    each peer's. A failing peer is reported and left out; a failing ours stops the benchmark."""
    calls, results = [ours, *peers], [[] for _ in range(1 + len(peers))]
    for _ in range(n or rounds):
        results[0].append(ours())
        for k in range(1, len(calls)):
            try:
                if calls[k]:
                    results[k].append(calls[k]())
            except Failed as e:
                print(f"  a peer failed, left out: {e}", flush=True)
                calls[k], results[k] = None, []
    return results


def cell(values):
    f = lambda v: f'{v:.0f}' if abs(v) >= 100 else f'{v:.3g}'
    if not values:
        return '-'
    m = f(statistics.median(values))
    return m if len(values) == 1 else f'{m} [{f(min(values))}-{f(max(values))}]'


def report(item, case, unit, ours, peer, better='higher', note='', cmds=(), lcpp=()):
    """One result line, printed now and kept for the table (lcpp: llama.cpp's results)."""
    def ratio(other):
        if not (ours and other):
            return '-'
        a, b = statistics.median(ours), statistics.median(other)
        return f'{(a / b if better == "higher" else b / a):.2f}x'
    ROWS.append([item, case, unit, cell(ours), cell(peer), cell(lcpp), ratio(peer), ratio(lcpp), note])
    print('  ' + ' | '.join(ROWS[-1]), flush=True)
    COMMANDS.extend(f'{item} {case}, {who}: {c}' for who, c in zip(('ours', 'llama2.c', 'llama.cpp'), cmds)
                    if c)


def shell(cmd, threads=None, cwd=None):
    """cmd as a line to paste into a shell"""
    cmd = ['python' if c == PY else c for c in cmd]
    return (f'cd {cwd} && ' if cwd else '') + (f'OMP_NUM_THREADS={threads} ' if threads else '') + shlex.join(cmd)

# -----------------------------------------------------------------------------
# the C programs, built with the flags of the Makefile's runomp target, its -march=native
# replaced by those of an instruction set (a class of CPU)

CLASS_FLAGS = {'native': ['-march=native'],  # this CPU's own
               # AVX2 and FMA as a CPU without AVX-512 has them (AVX-VNNI too is left out:
               # Zen 3 and older lack it)
               'avx2': ['-march=native', '-mno-avx512f', '-mno-avxvnni'],
               'x86-64': ['-march=x86-64']}  # SSE2, what every x86-64 CPU runs
BUILT = set()  # the compile commands, once each in the commands at the end


def macros(flags):
    """The names the compiler predefines for flags (__AVX512F__, __x86_64__, ...)"""
    out = subprocess.run([CC, *flags, '-dM', '-E', '-x', 'c', os.devnull], capture_output=True, text=True).stdout
    return set(re.findall(r'^#define (\w+)', out, re.M))


def cpu_classes():
    """native, and on x86-64 the classes below it that this CPU runs too: AVX2 (where native
    has AVX-512) and plain x86-64"""
    native = macros(CLASS_FLAGS['native'])
    return ['native'] + (['avx2'] if '__AVX512F__' in native and '__AVX2__' in native else []) + (
        ['x86-64'] if '__x86_64__' in native and '__AVX__' in native else [])


def build(src, exe, cls='native'):
    """Compile a copy of src (so an edit in progress cannot change it midway) into exe,
    unless the source and flags are those of the previous build. src: a path or bytes."""
    text = open(os.path.join(REPO, 'Makefile')).read()
    m = re.search(r'^runomp:.*\n\t\$\(CC\) (.*) -o run run\.c (.*)$', text, re.M)
    if not m:
        raise Failed("the Makefile's runomp recipe is not '$(CC) FLAGS -o run run.c LIBS' any more")
    flags, libs = m.group(1).split(), m.group(2).split()
    flags = [f for f in flags if f != '-march=native'] + CLASS_FLAGS[cls]
    code = src if isinstance(src, bytes) else open(src, 'rb').read()
    key = (shlex.join([CC, *flags, *libs]) + '\n').encode() + code
    if not isinstance(src, bytes) and exe not in BUILT:
        BUILT.add(exe)
        COMMANDS.append(f'build: {shlex.join([CC, *flags, "-o", exe, src, *libs])}')
    if os.path.exists(exe) and os.path.exists(exe + '.key') and open(exe + '.key', 'rb').read() == key:
        return exe
    os.makedirs(os.path.dirname(exe), exist_ok=True)
    open(exe + '.c', 'wb').write(code)
    r = subprocess.run([CC, *flags, '-o', exe, exe + '.c', *libs], capture_output=True, text=True)
    if r.returncode != 0:
        raise Failed(f"{CC} {exe}.c failed:\n{r.stderr[-1500:]}")
    open(exe + '.key', 'wb').write(key)
    return exe


def runners(cls='native'):
    """Our run and the peer's run (float32) and runq (int8) for a class; None for a missing peer."""
    sub = '' if cls == 'native' else f'-{cls}'
    ours = build(f'{REPO}/run.c', f'{BENCH}/ours{sub}/run', cls)
    try:
        return ours, *(build(f'{PEER}/{n}.c', f'{BENCH}/peer{sub}/{n}', cls) if PEER else None
                       for n in ('run', 'runq'))
    except (Failed, OSError) as e:
        print(f"  llama2.c's runners do not build, left out: {e}", flush=True)
        return ours, None, None

# llama.cpp through llama-cpp-python, on the same weights as GGUF files (f32 for our float32
# file, q8_0 for int8). A fresh process per measurement, as for the C programs: it evaluates
# the token ids given (after one evaluation that llama.cpp counts as loading), then greedy
# decodes up to n positions, and prints llama.cpp's own rates: its perf counters time each
# llama_decode up to llama_synchronize, which Python's overhead around it does not touch.
LLAMACPP_WORKER = r'''
import json, sys
folder, path, threads, n, ids = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if folder:
    sys.path.insert(0, folder)
import numpy as np, llama_cpp as L
ids = [int(i) for i in (open(ids[1:]).read() if ids.startswith('@') else ids).split()]  # @file: ids in it
if 'amx' in open('/proc/cpuinfo').read():  # its AMX kernels crash in the first decode (a llama.cpp bug)
    defaults = L.llama_cpp.llama_model_default_params
    def plain_kernels():
        p = defaults()
        p.use_extra_bufts = False
        return p
    L.llama_cpp.llama_model_default_params = plain_kernels
llm = L.Llama(path, n_ctx=max(n, len(ids)) + 8, n_batch=512, n_threads=threads, n_threads_batch=threads,
              verbose=False)
ctx = llm._ctx.ctx
def decode(tokens):
    arr = (L.llama_token * len(tokens))(*tokens)
    if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(tokens))) != 0:
        sys.exit('llama_decode failed')
    L.llama_synchronize(ctx)
decode(ids[:1])
L.llama_memory_clear(L.llama_get_memory(ctx), True)
L.llama_perf_context_reset(ctx)
decode(ids)
p = L.llama_perf_context(ctx)
prefill = len(ids) / ((p.t_p_eval_ms if len(ids) > 1 else p.t_eval_ms) / 1000)
L.llama_perf_context_reset(ctx)
for _ in range(n - len(ids)):
    logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(llm.n_vocab(),))
    decode([int(np.argmax(logits))])
p = L.llama_perf_context(ctx)
print(json.dumps({'prefill': prefill, 'decode': p.n_eval / (p.t_eval_ms / 1000) if p.t_eval_ms else 0,
                  'version': L.__version__}))
'''


def llamacpp_builds():
    """{class: folder of its llama_cpp ('' = the installed package)} for --llamacpp"""
    if llamacpp == 'auto':
        found = subprocess.run([PY, '-c', 'import llama_cpp'], capture_output=True).returncode == 0
        return {'native': ''} if found else {}
    return dict(item.split('=', 1) for item in llamacpp.split(',') if item)


def llamacpp_rates(folder, gguf, threads, n, ids):
    """llama.cpp's {'prefill': tok/s of the token ids (a string; @file: in a file) as one batch,
    'decode': tok/s of the greedy tokens after them up to n positions}"""
    worker = f'{BENCH}/llamacpp_worker.py'
    if not os.path.exists(worker) or open(worker).read() != LLAMACPP_WORKER:
        write_atomic(worker, LLAMACPP_WORKER.encode())
    out = run([PY, worker, folder, gguf, str(threads), str(n), ids])[0]
    return json.loads(out.strip().splitlines()[-1])


BANDWIDTH_C = rb'''
// memory read bandwidth, GB/s: the best of 10 passes summing the words of a file read into
// memory as run.c reads a model, in 2 MB pages where the OS gives them (integers: no float
// rounding, no float latency chain)
#define _DEFAULT_SOURCE
#include <fcntl.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) return 1;
    size_t n = st.st_size / 4;
    size_t huge = (size_t)2 << 20, cap = (st.st_size + huge - 1) / huge * huge;
    uint32_t *a = NULL;
    if (posix_memalign((void **)&a, huge, cap) != 0) return 1;
#ifdef MADV_HUGEPAGE
    madvise(a, cap, MADV_HUGEPAGE);
#endif
    if (pread(fd, a, st.st_size, 0) != st.st_size) return 1;
    double best = 1e30;
    uint32_t total = 0;
    for (int pass = 0; pass < 10; pass++) {
        double t0 = omp_get_wtime();
        uint32_t s = 0;
        #pragma omp parallel for reduction(+:s) schedule(static)
        for (size_t i = 0; i < n; i++) s += a[i];
        double dt = omp_get_wtime() - t0;
        if (dt < best) best = dt;
        total += s; // printed, so the sums are not optimised away
    }
    printf("%f %u\n", 4.0 * n / best / 1e9, total);
    return 0;
}
'''


def bandwidth(path, threads):
    """bytes/s; measured in every round beside the runs it bounds (the shared machine's
    bandwidth wanders by half between minutes)"""
    return float(run([build(BANDWIDTH_C, f'{BENCH}/bandwidth'), path], threads)[0].split()[0]) * 1e9

# -----------------------------------------------------------------------------
# inputs, generated once and kept in BENCH


def tokenizer_bin(vocab_size=32000):
    """llama2.c's tokenizer.bin format: <unk> <s> </s>, the byte pieces <0x00>..<0xFF> at
    3..258 (where llama2.c's byte fallback expects them), ' ' and a..z, then fillers
    'X<n>'. No two of ' ', a..z merge, so a prompt of letters is one token per letter in
    both programs."""
    path = f'{BENCH}/tok{vocab_size}.bin'
    if not os.path.exists(path):
        pieces = ['<unk>', '<s>', '</s>'] + [f'<0x{b:02X}>' for b in range(256)] + [' ']
        pieces += [chr(c) for c in range(ord('a'), ord('z') + 1)]
        pieces += [f'X{i}' for i in range(vocab_size - len(pieces))]
        data = struct.pack('i', max(map(len, pieces))) + b''.join(
            struct.pack('fi', 0.0, len(p)) + p.encode() for p in pieces)
        write_atomic(path, data)
    return path


def write_atomic(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path + '.tmp', 'wb').write(data)
    os.replace(path + '.tmp', path)


def synth_data():
    """The demo's data: the synth corpus, a 1024-token tokenizer and its shards."""
    data = f'{BENCH}/data'
    if not os.path.exists(f'{data}/synth/tok1024/meta.json'):
        for stage in ('synth', 'train_vocab', 'pretokenize'):
            run([PY, f'{REPO}/preprocess.py', stage, '--dataset=synth', '--vocab_size=1024', f'--data_dir={data}'])
    return data


def stem(shape):
    """Generated files are named by every number of their shape: a changed shape is a new file."""
    s = SHAPES[shape]
    return f'{BENCH}/models/{shape}_' + '_'.join(str(s[k]) for k in (
        'dim', 'n_layers', 'n_heads', 'n_kv_heads', 'hidden_dim', 'vocab_size', 'max_seq_len'))


def sentencepiece_model(vocab_size):
    """A SentencePiece model of vocab_size pieces (export.py checks that the checkpoint's
    tokenizer fits the model), trained in a second on random words"""
    path = f'{BENCH}/sp{vocab_size}.model'
    if not os.path.exists(path):
        from tokenizer import train_tokenizer
        rng = random.Random(0)
        words = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(3, 9)))
                 for _ in range(40000)]
        model = train_tokenizer((' '.join(rng.choice(words) for _ in range(200))
                                 for _ in range(3000)), vocab_size)
        with open(path, 'wb') as f:
            f.write(model)
    return path


def checkpoint(shape):
    """Random weights in our checkpoint format (model, model_args, tokenizer). Its
    model_args hold only fields llama2.c's ModelArgs has too, so llama2.c's export.py
    and model.py load the same file."""
    path = stem(shape) + '.pt'
    if not os.path.exists(path):
        import torch
        from model import ModelArgs, Transformer
        torch.manual_seed(0)
        model = Transformer(ModelArgs(**SHAPES[shape]))
        with torch.no_grad():  # near-zero BOS and EOS rows: greedy decoding never picks
            model.tok_embeddings.weight[1:3] *= 1e-3  # them, so no run ends early
        tok = open(sentencepiece_model(SHAPES[shape]['vocab_size']), 'rb').read()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(dict(model=model.state_dict(), model_args=SHAPES[shape], tokenizer=tok), path + '.tmp')
        os.replace(path + '.tmp', path)
    return path


def model_file(shape, kind):
    """The fp32 (version 0) or int8 (version 2) file of our export.py, which both programs
    read. (For 15M, whose dim 288 is no multiple of 64, export.py picks groups of 32.)"""
    path = f'{stem(shape)}_{kind}.bin'
    if not os.path.exists(path):
        run([PY, f'{REPO}/export.py', path, f'--checkpoint={checkpoint(shape)}',
             f'--version={0 if kind == "fp32" else 2}'])
    return path


def weight_bytes(shape, path):
    """Bytes read per generated token: every matrix, and the classifier (the shared
    embedding table). The norms and the one embedding row are negligible."""
    s = SHAPES[shape]
    dim, hidden, kv_dim = s['dim'], s['hidden_dim'], s['dim'] * s['n_kv_heads'] // s['n_heads']
    n = s['n_layers'] * (2 * dim * dim + 2 * kv_dim * dim + 3 * dim * hidden) + s['vocab_size'] * dim
    head = open(path, 'rb').read(41)
    versioned = struct.unpack('I', head[:4])[0] == 0x616b3432  # "ak42": a 256-byte header
    group = struct.unpack('i', head[37:41])[0] if versioned else 0
    return 4 * n if group == 0 else n + 4 * (n // group)  # int8: + one float32 scale per group

# -----------------------------------------------------------------------------
# 1, 2. run.c: decode and prefill, tokens per second

DECODE, TEXT = {}, {}  # our decode tok/s by (class, shape, kind, threads); what each program printed


def tok_s(exe, args, threads, pattern=r'achieved tok/s: ([\d.]+)'):
    TEXT[exe], err, _, _ = run([exe, *args], threads)
    return float(re.search(pattern, err).group(1))


def gguf_file(shape, kind):
    """The same weights as GGUF for llama.cpp: f32 beside our float32 file, q8_0 beside int8
    (llama.cpp's groups of 32 values with a scale, as ours for these shapes)"""
    dtype = 'f32' if kind == 'fp32' else 'q8_0'
    path = f'{stem(shape)}_{dtype}.gguf'
    if not os.path.exists(path):
        run([PY, f'{REPO}/export.py', path, f'--checkpoint={checkpoint(shape)}', '--version=gguf', f'--dtype={dtype}'])
    return path


def run_classes():
    return cpu_classes() if classes == 'auto' else classes.split(',')


def llamacpp_for(cls, shape, kind, threads, n, ids, key):
    """A call that measures llama.cpp built for cls (None where there is none); key: 'decode' or
    'prefill'. Also its command line, for the commands at the end."""
    folder = llamacpp_builds().get(cls)
    if folder is None:
        return None, None
    text = ' '.join(map(str, ids))
    if len(ids) > 1:  # a prompt: its ids in a file, for a command line one can read
        write_atomic(f'{BENCH}/prompt_{len(ids)}.ids', text.encode())
        text = f'@{BENCH}/prompt_{len(ids)}.ids'
    args = [folder, gguf_file(shape, kind), threads, n, text]
    return (lambda: llamacpp_rates(*args)[key]), shell([PY, f'{BENCH}/llamacpp_worker.py', *map(str, args)])


def bench_decode():
    for cls in run_classes():
        ours, prun, prunq = runners(cls)
        for shape in shapes:
            for kind in ('fp32', 'int8'):
                path, peer = model_file(shape, kind), prun if kind == 'fp32' else prunq
                args = [path, '-z', tokenizer_bin(), '-n', str(steps), '-t', '0', '-s', '1']  # greedy
                for threads in (1, 2):
                    bws = []
                    lcpp, lcpp_cmd = llamacpp_for(cls, shape, kind, threads, steps, [1], 'decode')  # from BOS
                    a, b, c = ab(lambda: bws.append(bandwidth(path, threads)) or tok_s(ours, args, threads),
                                 peer and (lambda: tok_s(peer, args, threads)), lcpp)
                    DECODE[cls, shape, kind, threads] = statistics.median(a)
                    bw = statistics.median(bws)
                    limit = bw / weight_bytes(shape, path)
                    note = (f'read {bw / 1e9:.1f} [{min(bws) / 1e9:.0f}-{max(bws) / 1e9:.0f}] GB/s: '
                            f'limit {limit:.0f} tok/s, ours {statistics.median(a) / limit:.0%}')
                    if b:  # greedy on the same weights: the same text, so the same work
                        note += f', llama2.c {statistics.median(b) / limit:.0%}, ' + (
                            'same text' if TEXT[ours] == TEXT[peer] else 'TEXT DIFFERS')
                    if c:
                        note += f', llama.cpp {statistics.median(c) / limit:.0%}'
                    report('decode', f'{shape} {kind} {threads} thr, {cls}', 'tok/s', a, b, note=note, lcpp=c,
                           cmds=[shell([ours, *args], threads), peer and shell([peer, *args], threads), lcpp_cmd])


def bench_prefill():
    """Our run.c runs the prompt in blocks of tokens, llama2.c one position at a time,
    llama.cpp in one batch. The C programs get -n = the prompt's length: the whole prompt,
    then one sampled token; llama2.c's achieved tok/s is then its prompt rate (its clock
    starts after the first position)."""
    prompt = ('abcdefghij' * 25)[:248]  # BOS, ' ' (the dummy prefix), 248 letters
    for cls in run_classes():
        ours, prun, prunq = runners(cls)
        for shape in shapes:
            tok = tokenizer_bin()
            # -m tokenize prints the prompt's ids, without the BOS that generation puts first
            ids = [1] + [int(i) for i in run([ours, model_file(shape, 'fp32'), '-z', tok, '-m', 'tokenize',
                                              '-i', prompt])[0].split()]
            n = len(ids)
            for kind in ('fp32', 'int8'):
                path, peer = model_file(shape, kind), prun if kind == 'fp32' else prunq
                args = [path, '-z', tok, '-n', str(n), '-t', '0', '-i', prompt]
                lcpp, lcpp_cmd = llamacpp_for(cls, shape, kind, 2, n, ids, 'prefill')
                a, b, c = ab(lambda: tok_s(ours, args, 2, r'prefill: \d+ tokens, ([\d.]+) tok/s'),
                             peer and (lambda: tok_s(peer, args, 2)), lcpp)
                if (cls, shape, kind, 2) not in DECODE:  # our one-token rate, unless decode measured it
                    DECODE[cls, shape, kind, 2] = statistics.median(
                        [tok_s(ours, [path, '-z', tok, '-n', str(steps), '-t', '0'], 2) for _ in range(rounds)])
                d = DECODE[cls, shape, kind, 2]
                first = lambda r: f'{1000 * n / statistics.median(r):.0f} ms'  # until the first new token
                note = (f'ours prefill/decode ({d:.0f} tok/s) = {statistics.median(a) / d:.1f}x (target >= 5x); '
                        f'first new token after: ours {first(a)}' + (f', llama2.c {first(b)}' if b else '')
                        + (f', llama.cpp {first(c)}' if c else ''))
                report('prefill', f'{shape} {kind} {n}-token prompt 2 thr, {cls}', 'tok/s', a, b, note=note, lcpp=c,
                       cmds=[shell([ours, *args], 2), peer and shell([peer, *args], 2), lcpp_cmd])

# -----------------------------------------------------------------------------
# 3. generation in PyTorch: ours (KV cache) vs llama2.c's (the whole sequence each step)

# A worker per program, started once (importing torch takes seconds): it loads the
# checkpoint into that program's model.py, then answers each "threads tokens" line with
# tokens per second of model.generate from BOS, with llama2.c's sample.py settings.
SAMPLE_WORKER = r'''
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from model import ModelArgs, Transformer
ckpt = torch.load(sys.argv[2], weights_only=True)
model = Transformer(ModelArgs(**ckpt['model_args']))
model.load_state_dict(ckpt['model'], strict=False)
model.eval()
def rate(n):
    t0 = time.perf_counter()
    out = model.generate(torch.tensor([[1]]), n, temperature=1.0, top_k=300)
    return (out.size(1) - 1) / (time.perf_counter() - t0)
rate(8)  # warm-up
for line in sys.stdin:
    threads, n = map(int, line.split())
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(rate(n), flush=True)
'''


def bench_sample():
    workers = {repo: subprocess.Popen([PY, '-c', SAMPLE_WORKER, repo, checkpoint('15M')], text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE) for repo in (REPO, PEER) if repo}

    def ask(repo, threads):
        workers[repo].stdin.write(f'{threads} {steps}\n')
        workers[repo].stdin.flush()
        line = workers[repo].stdout.readline()
        if not line:
            raise Failed(f'the sample worker for {repo} died')
        return float(line)
    for threads in (1, 2):
        a, b = ab(lambda: ask(REPO, threads), PEER and (lambda: ask(PEER, threads)))
        report('sample', f'15M {steps} tokens {threads} thr', 'tok/s', a, b,
               note='model.generate(BOS, temperature=1, top_k=300); target >= 8x')
    for w in workers.values():
        w.stdin.close()
        w.wait()

# -----------------------------------------------------------------------------
# 4. export.py: checkpoint -> model file, the whole process (what a user waits for)


def bench_export():
    shape = '15M' if quick else '110M'
    ckpt, out = checkpoint(shape), f'{BENCH}/export/model.bin'  # (export.py also writes tokenizer.bin there)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    imports = statistics.median([run([PY, '-c', 'import torch'])[2] for _ in range(3)])

    def export(repo, version):
        wall = run([PY, f'{repo}/export.py', out, f'--checkpoint={ckpt}', f'--version={version}'])[2]
        os.remove(out)  # (110M in float32 is 440 MB)
        return wall
    for version in (0, 2):
        a, b = ab(lambda: export(REPO, version), PEER and (lambda: export(PEER, version)), n=min(rounds, 3))
        report('export', f'{shape} version {version}', 's', a, b, better='lower',
               note=f'ours reads the checkpoint without torch, whose import alone takes {imports:.1f} s; target >= 10x',
               cmds=[shell([PY, f'{r}/export.py', out, f'--checkpoint={ckpt}', f'--version={version}'])
                     for r in (REPO, PEER) if r])

# -----------------------------------------------------------------------------
# 5. train.py on the CPU: tokens per second, same model, same data

TRAIN = {'demo 128x4 B32': dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, batch_size=32, max_seq_len=256),
         '288x6 B8': dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, batch_size=8, max_seq_len=256)}


def peer_links(peer_dir, links):
    """llama2.c's train.py reads data/tok{vocab}/*.bin under its cwd (the first file is its
    validation split) and exec()s configurator.py from its cwd: links provide them."""
    for link, target in links.items():
        if PEER and not os.path.lexists(f'{peer_dir}/{link}'):
            os.makedirs(os.path.dirname(f'{peer_dir}/{link}'), exist_ok=True)
            os.symlink(target, f'{peer_dir}/{link}')


def train_cmds(cfg, iters):
    """Both train.py's with the same model and batches of the same synth shards."""
    data, peer_dir = synth_data(), f'{BENCH}/train/peer'
    links = {'data/tok1024/0_val.bin': f'{data}/synth/tok1024/val.bin',
             'data/tok1024/1_train.bin': f'{data}/synth/tok1024/train_000.bin',
             'configurator.py': f'{PEER}/configurator.py'}
    peer_links(peer_dir, links)
    same = [f'--{k}={v}' for k, v in cfg.items()] + [
        '--vocab_size=1024', '--gradient_accumulation_steps=1', '--device=cpu',
        '--compile=False', '--dtype=float32', '--eval_iters=1', '--eval_interval=1000000', '--log_interval=1']
    ours = [PY, f'{REPO}/train.py', *same, '--dataset=synth', f'--data_dir={data}',
            f'--out_dir={BENCH}/train/ours', f'--max_iters={iters}']
    peer = [PY, f'{PEER}/train.py', *same, '--vocab_source=custom', '--out_dir=out',
            f'--max_iters={iters - 1}']  # (llama2.c runs max_iters + 1 iterations)
    return ours, peer, peer_dir


def log_rate(log, cfg, first):
    """Tokens/s of the median iteration from iteration first on, in a train.py log: ours
    'iter N | loss .. | lr .. | T ms | ..', llama2.c's 'N | loss .. | lr .. | Tms | ..'."""
    ms = [float(t) for i, t in re.findall(r'^(?:iter )?(\d+) \| loss \S+ \| lr \S+ \| ([\d.]+) ?ms', log, re.M)
          if int(i) >= first]
    return cfg['batch_size'] * cfg['max_seq_len'] / (statistics.median(ms) / 1000)


def train_rate(cmd, cfg, cwd=None):
    return log_rate(run(cmd, cwd=cwd)[0], cfg, 3)


def bench_train():
    for name, cfg in TRAIN.items():
        ours, peer, peer_dir = train_cmds(cfg, train_iters)
        a, b = ab(lambda: train_rate(ours, cfg), PEER and (lambda: train_rate(peer, cfg, peer_dir)),
                  n=min(rounds, 3))
        report('train', f'{name} T256 V1024', 'tok/s', a, b, note=f'median of iterations 3..{train_iters - 1}',
               cmds=[shell(ours), PEER and shell(peer, cwd=peer_dir)])

# -----------------------------------------------------------------------------
# 5b. training on a GPU, as llama2.c trains its models: torch.compile and bfloat16, random
# tokens. Tokens/s, MFU (PaLM's 6N + 12 L H Q T FLOPs per token over the GPU's dense bf16
# peak as our train.py reports it, for both programs) and peak CUDA memory.

GPU_TRAIN = {'15M': dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000,
                         max_seq_len=256, batch_size=128),
             '110M': dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000,
                          max_seq_len=1024, batch_size=32),
             # our train.py's defaults, at the batch size the issue names for peak memory
             'default': dict(dim=288, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=4096,
                             max_seq_len=256, batch_size=8)}
gpu_iters = 8 if quick else 30  # per run; timed from iteration gpu_iters // 3 (compiling comes first)

# runs a train.py (argv[1]; its flags after) as __main__, then prints what its log lacks
TRAIN_WRAPPER = r"""
import os, runpy, sys, torch
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as `python train.py` does
g = runpy.run_path(sys.argv[0], run_name='__main__')
m, p = g['raw_model'], g['raw_model'].params
n = sum(q.numel() for q in m.parameters())
print(f"flops per token: {6 * n + 12 * p.n_layers * p.n_heads * (p.dim // p.n_heads) * p.max_seq_len}")
if torch.cuda.is_available():
    print(f"peak cuda memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB allocated, "
          f"{torch.cuda.max_memory_reserved() / 2**20:.0f} MB reserved")
"""


def random_tokens(vocab):
    """Two shards (val, train) of 8M random token ids in both programs' layouts; the
    folder's tokenizer.model is empty (train.py only copies it into checkpoints)."""
    import numpy as np
    data, peer_dir = f'{BENCH}/gpu/data', f'{BENCH}/gpu/peer'
    folder = f'{data}/{dataset_name(data + "/random")}/tok{vocab}'  # train.py --dataset={data}/random
    if not os.path.exists(f'{folder}/meta.json'):
        rng = np.random.default_rng(0)
        for name in ('val.bin', 'train_000.bin'):
            write_atomic(f'{folder}/{name}', rng.integers(0, vocab, 1 << 23, dtype=np.uint16).tobytes())
        write_atomic(f'{folder}/tokenizer.model', b'')
        write_atomic(f'{folder}/meta.json', json.dumps({'dtype': 'uint16', 'vocab_size': vocab}).encode())
    links = {f'data/tok{vocab}/0_val.bin': f'{folder}/val.bin', f'data/tok{vocab}/1_train.bin': f'{folder}/train_000.bin',
             'configurator.py': f'{PEER}/configurator.py'}
    peer_links(peer_dir, links)
    return data, peer_dir


def gpu_run(cmd, cfg, cwd=None):
    """(tokens/s of the median timed iteration, flops per token, peak MB allocated, reserved,
    the peak FLOP/s our train.py names or 0)"""
    log = run([PY, '-c', TRAIN_WRAPPER, *cmd[1:]], cwd=cwd)[0]
    mem = re.search(r'^peak cuda memory: (\d+) MB allocated, (\d+) MB reserved', log, re.M)
    peak = re.search(r'MFU of (\d+) TFLOP/s', log)
    return (log_rate(log, cfg, gpu_iters // 3), int(re.search(r'^flops per token: (\d+)', log, re.M).group(1)),
            *(map(int, mem.groups()) if mem else (0, 0)), int(peak.group(1)) * 1e12 if peak else 0)


def bench_gpu():
    gpu = subprocess.run([PY, '-c', 'import torch; print(torch.cuda.is_available() and torch.cuda.get_device_name())'],
                         capture_output=True, text=True).stdout.strip()
    if gpu_device == 'cuda' and gpu in ('', 'False'):
        print('  no CUDA device: skipped (--gpu_device=cpu --quick tries the item out on the CPU)', flush=True)
        return
    for name in gpu_models.split(','):
        if name not in GPU_TRAIN:
            raise Failed(f"--gpu_models: no {name!r} among {','.join(GPU_TRAIN)}")
        cfg = GPU_TRAIN[name]
        if quick:  # a tiny model with the same head ratio
            cfg = dict(cfg, dim=64, n_layers=2, n_heads=4, n_kv_heads=4 * cfg['n_kv_heads'] // cfg['n_heads'],
                       vocab_size=512, max_seq_len=64, batch_size=4)
        data, peer_dir = random_tokens(cfg['vocab_size'])
        same = [f'--{k}={v}' for k, v in cfg.items()] + [
            '--gradient_accumulation_steps=1', f'--device={gpu_device}', '--compile=True', '--dtype=bfloat16',
            '--eval_iters=1', '--eval_interval=1000000', '--log_interval=1']
        ours = [PY, f'{REPO}/train.py', *same, f'--dataset={data}/random', f'--data_dir={data}',
                f'--out_dir={BENCH}/gpu/ours', f'--max_iters={gpu_iters}']
        peer = [PY, f'{PEER}/train.py', *same, '--vocab_source=custom', '--out_dir=out', f'--max_iters={gpu_iters - 1}']
        a, b = ab(lambda: gpu_run(ours, cfg), PEER and (lambda: gpu_run(peer, cfg, peer_dir)), n=1)
        peak = a[0][4]
        mfu = peak and ', '.join(f'{who} {100 * r[0] * r[1] / peak:.1f}%' for who, r in (('ours', a[0]), ('llama2.c', b and b[0])) if r)
        case = (f"{name}{' (tiny: --quick)' if quick else ''} B{cfg['batch_size']} T{cfg['max_seq_len']} "
                f"V{cfg['vocab_size']} {gpu if gpu_device == 'cuda' else gpu_device}")
        report('gpu train', case, 'tok/s', [a[0][0]], [r[0] for r in b],
               note=f"compile + bf16, iterations {gpu_iters // 3}..{gpu_iters - 1}; "
                    + (f"MFU of {peak / 1e12:.0f} TFLOP/s: {mfu}" if peak else "MFU: no known peak for this device"),
               cmds=[shell(ours), PEER and shell(peer, cwd=peer_dir)])
        if a[0][2]:
            report('gpu memory', case, 'MB', [a[0][2]], [r[2] for r in b], better='lower',
                   note=f"peak CUDA memory allocated; reserved: ours {a[0][3]}, llama2.c {b[0][3] if b else '-'} MB")

# -----------------------------------------------------------------------------
# 6. pretokenizing a corpus: MB of text per second of the whole process, all cores


def bench_pretok():
    corpus = os.path.join(FIXTURES, 'tinystories_train_2MiB.txt')
    if not os.path.exists(corpus):
        print(f'  {corpus} not found (set FIXTURES=folder): skipped', flush=True)
        return
    vocab, data, peer_dir = 4096, f'{BENCH}/pretok/data', f'{BENCH}/pretok/peer'
    ours = [PY, f'{REPO}/preprocess.py', 'pretokenize', f'--dataset={corpus}', f'--vocab_size={vocab}', f'--data_dir={data}']
    peer = [PY, f'{PEER}/tinystories.py', 'pretokenize', f'--vocab_size={vocab}']
    tok = os.path.join(data, dataset_name(corpus), f'tok{vocab}.model')  # train_vocab's
    if not os.path.exists(tok):  # the tokenizer, outside the timing
        run(ours[:2] + ['train_vocab'] + ours[3:])
    if PEER and not os.path.exists(f'{peer_dir}/data/tok{vocab}.model'):
        # the same stories as llama2.c's input, TinyStories json shards, one per core so
        # that its process pool (a shard per process) can use them all
        text = open(corpus, encoding='utf-8').read()
        stories = [s.strip() for s in re.split(r'^<\|endoftext\|>$', text, flags=re.M) if s.strip()]
        n = os.cpu_count() or 1
        for k in range(n):
            write_atomic(f'{peer_dir}/data/TinyStories_all_data/data{k:02d}.json',
                         json.dumps([{'story': s} for s in stories[k::n]]).encode())
        shutil.copyfile(tok, f'{peer_dir}/data/tok{vocab}.model')
    mb = os.path.getsize(corpus) / 1e6
    a, b = ab(lambda: mb / run(ours)[2], PEER and (lambda: mb / run(peer, cwd=peer_dir)[2]))
    report('pretok', f'{mb:.1f} MB of text, vocab {vocab}, {os.cpu_count()} cores', 'MB/s', a, b,
           note='wall time, python and torch imports included', cmds=[shell(ours), PEER and shell(peer, cwd=peer_dir)])

# -----------------------------------------------------------------------------
# 7. peak memory (RSS): run.c, and train.py on the demo config


def expected_mb(shape, path):
    """The model file (mapped; every page is read) + the kv cache of the positions run +
    one token's activations. (Our run.c allocates the cache for -n positions, llama2.c
    for the whole context, but only the pages written become resident.)"""
    s = SHAPES[shape]
    kv = 2 * s['n_layers'] * steps * s['dim'] * s['n_kv_heads'] // s['n_heads'] * 4
    act = 4 * (s['vocab_size'] + s['n_heads'] * steps + 6 * s['dim'] + 3 * s['hidden_dim'])
    return (os.path.getsize(path) + kv + act) / 2**20


def bench_memory():
    ours, prun, prunq = runners()
    for shape in shapes:
        for kind in ('fp32', 'int8'):
            path, peer = model_file(shape, kind), prun if kind == 'fp32' else prunq
            args = [path, '-z', tokenizer_bin(), '-n', str(steps), '-t', '0']
            report('memory', f'{shape} {kind} run -n {steps}', 'MB', [run([ours, *args], 2)[3]],
                   [run([peer, *args], 2)[3]] if peer else [], better='lower',
                   note=f'expected {expected_mb(shape, path):.0f} MB: file + kv cache + activations',
                   cmds=[shell([ours, *args], 2), peer and shell([peer, *args], 2)])
    name = next(iter(TRAIN))
    ours, peer, peer_dir = train_cmds(TRAIN[name], 4)
    report('memory', f'train.py {name}', 'MB', [run(ours)[3]], [run(peer, cwd=peer_dir)[3]] if PEER else [],
           better='lower', cmds=[shell(ours), PEER and shell(peer, cwd=peer_dir)])

# -----------------------------------------------------------------------------


def machine():
    def output(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout
        except OSError:  # not installed (a GPU machine may lack lscpu or gcc)
            return ''
    cpu = re.search(r'^Model name:\s*(.*)$', output(['lscpu']), re.M)
    gcc = output([CC, '--version']).splitlines()
    return (f"{datetime.date.today()}, {cpu.group(1) if cpu else platform.processor()}, "
            f"{os.cpu_count()} cores, {gcc[0] if gcc else CC}, Python {platform.python_version()}, "
            f"torch {package_version('torch')}, llama2.c: {PEER or 'absent'}, llama.cpp: "
            + (', '.join(f'{c} {f or "(installed)"}' for c, f in llamacpp_builds().items()) or 'absent'))


def main():
    items = dict(decode=bench_decode, prefill=bench_prefill, sample=bench_sample, export=bench_export,
                 train=bench_train, pretok=bench_pretok, memory=bench_memory, gpu=bench_gpu)
    chosen = [i.strip() for i in only.split(',') if i.strip()]
    if unknown := [i for i in chosen if i not in items]:
        sys.exit(f"error: --only: unknown item {', '.join(unknown)}; choose from {','.join(items)}")
    os.makedirs(BENCH, exist_ok=True)
    print(f"{machine()}\nin {BENCH}, {rounds} round(s){', quick' if quick else ''}", flush=True)
    try:
        for name in chosen:
            print(f'{name}:', flush=True)
            items[name]()
    except Failed as e:
        sys.exit(f'error: {e}')
    head = ['item', 'case', 'unit', 'ours', 'llama2.c', 'llama.cpp', 'ours better by', 'by, vs llama.cpp',
            'note']
    print(f'\n{machine()}\n')
    for row in [head, ['---'] * len(head)] + ROWS:
        print('| ' + ' | '.join(row) + ' |')
    print('\ncommands:\n' + '\n'.join(COMMANDS))


if __name__ == '__main__':
    main()
