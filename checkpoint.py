"""
Our files on disk: every file is written whole or not at all, and a checkpoint is read as
data, with or without torch, and checked before anything is built from it.

write_atomic() writes to a temporary name beside the file and renames it over the file, so a
crash at any moment leaves the old file or the new one, never half of one; write_folder() does
the same for a folder. A temporary's name is this process's alone and is made exclusively, so
it never replaces a file that is there, and it is removed on every way out.

read_checkpoint() reads what train.py saved (torch.save's zip) without importing torch, for
export.py: importing torch takes longer than writing a 110M model. torch.save writes a zip:
data.pkl, the pickled dict in which every tensor is a reference to data/<key>, a raw
little-endian storage kept uncompressed. The storages are mapped, not copied, and only the
arrays asked for are touched (the model's, not the optimizer's, twice as large); only plain
data is unpickled, as torch.load(weights_only=True) does. Every size the pickle declares is
bounded by the bytes the file holds, so a small damaged file cannot claim gigabytes.

check_model() holds every checkpoint to its model_args: sane numbers, and each weight the
shape they imply; load_model() (sample.py, train.py) and export.py both call it.

A LoRA checkpoint holds only adapters, and names its base checkpoint by path and by a hash of
its weights; the last section finds the base, checks the hash and fits the adapters to it.
"""

import atexit
import codecs
import collections
import csv
import fcntl
import hashlib
import importlib
import itertools
import os
import pickle
import shutil
import struct
import zipfile

import numpy as np

from configurator import die


# -----------------------------------------------------------------------------
# writing: whole files and folders, under temporary names that are this process's alone

def new_name(path, make):
    """A name beside path for a temporary: {path}.tmp{pid}, or {path}.tmp{pid}-1, -2, ... if
    something of that name is there. make(name) creates the file or folder and fails with
    FileExistsError where the name is taken, so a temporary never replaces a user's file."""
    for k in itertools.count():
        name = f"{path}.tmp{os.getpid()}" + (f"-{k}" if k else "")
        try:
            make(name)
            return name
        except FileExistsError:
            pass


def write_atomic(path, write, mode='wb'):
    """Call write(f) on a new temporary file beside path, then rename it over path; the
    temporary is removed on every way out."""
    make = lambda name: os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    tmp = new_name(path, make)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def write_folder(folder, fill):
    """Make folder anew: fill(tmp) writes its files into a new temporary folder beside it,
    which then takes folder's place, and the old folder is removed last. A crash leaves the
    old folder or the new one, whole, never a mix of the two."""
    tmp = new_name(folder, os.mkdir)
    try:
        fill(tmp)
        old = None
        if os.path.lexists(folder):
            old = new_name(folder + '.old', os.mkdir)  # reserved: renaming onto an empty folder
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old)


class FolderLock:
    """An flock on the folder itself (no lock file is made), held while this object lives:
    scripts that write there take turns, and the kernel drops it when the process ends,
    however it ends. With wait=False, BlockingIOError if another process holds it."""
    def __init__(self, folder, wait=True):
        self.fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise

    def release(self):
        if getattr(self, 'fd', None) is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = release

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_holder(folder):
    """The process that holds an flock on folder, where the system says (Linux's /proc/locks,
    matched by inode: its device numbers differ from stat's on some filesystems); else None."""
    try:
        ino = os.stat(folder).st_ino
        with open('/proc/locks') as f:  # "1: FLOCK ADVISORY WRITE 1234 fd:01:5678 0 EOF"
            for parts in map(str.split, f):
                if len(parts) > 5 and parts[1] == 'FLOCK' and parts[5].endswith(f':{ino}'):
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


def peek_task(path):
    """The task of the checkpoint at path, without torch; None where it cannot be read"""
    try:
        ckpt = CheckpointReader(path).load()
        return ckpt.get('task', 'pretrain') if isinstance(ckpt, dict) else None
    except Exception:  # whatever is there, it is not a checkpoint we can name
        return None


class RunLog:
    """out_dir/log.csv: the curve of exactly the iterations that out_dir/ckpt.pt holds. The
    rows travel inside the checkpoint (its 'log'), and log.csv is written from them after
    each save: it never holds an iteration the checkpoint lacks (one logged by a run that was
    then killed, or whose save failed), and a resumed run rewrites it from its checkpoint."""
    def __init__(self, path, columns, resume=None):
        self.path, self.columns, self.rows = path, columns, []
        if resume is not None:  # (the checkpoint's rows, its iteration)
            rows, iter_num = resume
            if rows is None and os.path.isfile(path):  # a checkpoint of before the rows
                with open(path, newline='') as f:  # an eval at i comes before the save at i
                    rows = [r for r in csv.DictReader(f) if r.get('iter', '').isdigit()
                            and int(r['iter']) < iter_num + bool(r.get('val_loss'))]
            self.rows = list(rows or [])
            self.write()

    def add(self, row):
        self.rows.append({k: str(v) for k, v in zip(self.columns, row)})

    def write(self):
        def put(f):
            w = csv.DictWriter(f, self.columns, extrasaction='ignore')
            w.writeheader()
            w.writerows(self.rows)
        write_atomic(self.path, put, mode='w')


# -----------------------------------------------------------------------------
# a training run's folder: train.py and train_rl.py share these

def run_out_dir(out_dir, task, init_from, default):
    """Where a run writes: --out_dir, or the default; never the folder of the checkpoint it
    starts from (unless it resumes there), nor over another task's checkpoint."""
    ckpt = os.path.join(out_dir or default, 'ckpt.pt')
    if init_from not in ('scratch', 'resume') and same_file(os.path.dirname(os.path.abspath(
            init_from)), out_dir or default):
        die(f"--out_dir={out_dir or default}{'' if out_dir else ' (the default)'} is the folder "
            f"of --init_from={init_from}: this run would write over the checkpoint it starts "
            "from and its log — give another --out_dir (or --init_from=resume to continue "
            "that run)")
    if init_from != 'resume' and peek_task(ckpt) not in (None, task):
        die(f"--out_dir={out_dir or default} holds a {peek_task(ckpt)} checkpoint, which this "
            f"{task} run would replace — give another --out_dir (or delete {ckpt} first)")
    return out_dir or default


def claim_out_dir(out_dir):
    """One run per out_dir: the returned lock is held until the process ends, however it
    ends. A folder made here is removed again if the run ends without writing anything."""
    made = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = FolderLock(out_dir, wait=False)
    except BlockingIOError:
        holder = lock_holder(out_dir)
        die(f"--out_dir={out_dir} is in use by another training run"
            + (f" (process {holder})" if holder else "")
            + " — wait for it, stop it, or choose another --out_dir")
    except OSError as e:
        die(f"cannot write to --out_dir={out_dir}: {e.strerror}")
    if made:
        atexit.register(lambda: os.path.isdir(out_dir) and not os.listdir(out_dir)
                        and os.rmdir(out_dir))
    return lock


def save_run(path, ckpt, log):
    """Write the checkpoint whole (write_atomic), with the log's rows in it, then log.csv
    from them; a save that fails is one line, and leaves the previous checkpoint and log."""
    import torch
    ckpt['log'] = list(log.rows)
    try:
        write_atomic(path, lambda f: torch.save(ckpt, f))
    except (OSError, RuntimeError) as e:  # torch's zip writer raises RuntimeError
        reason = getattr(e, 'strerror', None) or str(e).strip().splitlines()[0][:120]
        die(f"cannot write {path}: {reason} — free some space or choose another --out_dir; "
            "the previous checkpoint and its log are intact")
    log.write()


def resumed_log(ckpt):
    """The log rows a checkpoint carries (None for a checkpoint of before they did)"""
    rows = ckpt.get('log')
    return rows if isinstance(rows, list) and all(isinstance(r, dict) for r in rows) else None


class Trackers:
    """Weights & Biases and SwanLab, each only if asked for (--wandb_log, --swanlab_log in
    config) and imported only then: neither is needed to train. log() sends every tracker
    that is on the same numbers at the same iteration, what log.csv gets."""
    def __init__(self, config, out_dir):
        self.on = []
        for name in ('wandb', 'swanlab'):
            if not config.get(f'{name}_log'):
                continue
            try:
                module = importlib.import_module(name)
            except ImportError:
                die(f"--{name}_log=True needs the {name} package: pip install {name}")
            kw = dict(project=config[f'{name}_project'], name=config[f'{name}_run_name'],
                      config=config)
            if name == 'swanlab':  # SwanLab's files go with the run's
                kw.update(mode=config['swanlab_mode'], log_dir=os.path.join(out_dir, 'swanlog'))
            try:  # online mode with no login and no terminal to ask for one fails here
                module.init(**kw)
            except Exception as e:
                why = str(e).strip().splitlines()[0][:200].rstrip('.') if str(e).strip() else \
                    type(e).__name__
                die(f"{name} did not start: {why} — run `{name} login`"
                    + (", or keep the run on disk with --swanlab_mode=offline"
                       if name == 'swanlab' else ""))
            self.on.append(module)

    def log(self, metrics, step):
        for t in self.on:
            t.log({'iter': step, **metrics}, step=step)


def same_file(a, b):
    """a and b are one file (both exist, and one inode: a link or another spelling counts)"""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def unreadable(path, e):
    """The one answer to a checkpoint that cannot be read, whoever reads it."""
    if isinstance(e, FileNotFoundError):
        die(f"{path} not found — train a model first (python train.py)")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    die(f"{path} is not a readable checkpoint ({first[:160]}) — was it truncated, or written "
        "by another program?")


def check_is_ours(path, ckpt):
    if not isinstance(ckpt, dict) or not {'model', 'model_args'} <= ckpt.keys():
        die(f"{path} has no 'model' and 'model_args' — not a checkpoint of ours")
    return ckpt


# -----------------------------------------------------------------------------
# reading without torch

STORAGES = {'FloatStorage': '<f4', 'HalfStorage': '<f2', 'DoubleStorage': '<f8',
            'BFloat16Storage': 'bfloat16', 'LongStorage': '<i8', 'IntStorage': '<i4',
            'ShortStorage': '<i2', 'CharStorage': 'i1', 'ByteStorage': 'u1', 'BoolStorage': '?'}


class Stored:
    """A tensor in the zip: its storage (key, type), offset, shape and strides in elements."""
    def __init__(self, reader, storage, offset, size, stride, *_):
        self.reader, self.storage, self.offset = reader, storage, offset
        self.shape, self.stride = tuple(size), tuple(stride)

    def numpy(self):
        a = self.reader.storage(*self.storage)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        if 0 not in self.shape and (min((self.offset, *self.stride)) < 0 or last >= len(a)
                                    or np.prod(self.shape, dtype=np.float64) > len(a)):
            # as_strided would read any memory, and a zero stride would repeat a few values
            # into an array of any size
            raise ValueError("a tensor reaches outside its storage")
        return np.lib.stride_tricks.as_strided(a[self.offset:], self.shape,
                                               [s * a.itemsize for s in self.stride])


class CheckpointReader(pickle.Unpickler):
    def __init__(self, path):
        self.zip, self.file = zipfile.ZipFile(path), np.memmap(path, np.uint8, 'r')
        names = self.zip.namelist()
        pkl = [n for n in names if n.endswith('data.pkl')]
        if not pkl:
            raise ValueError("no data.pkl in the zip")
        self.prefix, self.storages = pkl[0][:-len('data.pkl')], {}
        if self.prefix + 'byteorder' in names and self.zip.read(self.prefix + 'byteorder') != b'little':
            raise ValueError("a big-endian checkpoint")
        super().__init__(self.zip.open(pkl[0]))

    def find_class(self, module, name):
        if (module, name) == ('collections', 'OrderedDict'):
            return collections.OrderedDict
        if (module, name) == ('_codecs', 'encode'):  # how pickle protocol 2 stores bytes
            return codecs.encode
        if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
            return lambda *args: Stored(self, *args)
        if module == 'torch' and name in STORAGES:
            return name
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")

    def persistent_load(self, pid):  # ('storage', storage type, key, location, numel)
        kind, key, numel = pid[1], pid[2], pid[4]
        if kind not in STORAGES:
            raise pickle.UnpicklingError(f"storage type {kind!r} is not plain data")
        itemsize = 2 if STORAGES[kind] == 'bfloat16' else np.dtype(STORAGES[kind]).itemsize
        size = self.zip.getinfo(f'{self.prefix}data/{key}').file_size
        if not isinstance(numel, int) or not 0 <= numel * itemsize <= size:
            raise ValueError(f"storage {key} claims {numel} values but holds {size} bytes")
        return key, kind

    def storage(self, key, kind):
        if key not in self.storages:
            info = self.zip.getinfo(f'{self.prefix}data/{key}')
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"storage {key} is compressed")
            # the data follows a 30-byte local header, the name and an extra field
            name_len, extra_len = struct.unpack('<HH', self.file[info.header_offset + 26:][:4])
            start = info.header_offset + 30 + name_len + extra_len
            raw = self.file[start:start + info.file_size]
            if STORAGES[kind] == 'bfloat16':  # the top half of a float32
                self.storages[key] = (raw.view('<u2').astype('<u4') << 16).view('<f4')
            else:
                self.storages[key] = raw.view(STORAGES[kind])
        return self.storages[key]


def read_checkpoint(path):
    """The checkpoint dict, tensors left as Stored; one line and exit for a bad file."""
    try:
        ckpt = CheckpointReader(path).load()
    except Exception as e:  # truncated zips, foreign pickles, garbage: all mean "unreadable"
        unreadable(path, e)
    return check_is_ours(path, ckpt)


# -----------------------------------------------------------------------------
# checking a checkpoint against its model_args

MAX_SEQ_LEN = 1 << 20   # positions: larger is a damaged header, not a model
MAX_EXPERTS = 256       # experts in a mixture-of-experts layer (DeepSeek-V3 has 256)


def layer_shapes(dim, hidden_dim, n_heads, n_kv_heads, n_experts=0):
    head_dim = dim // n_heads
    shapes = {'attention_norm': (dim,), 'attention.wq': (n_heads * head_dim, dim),
              'attention.wk': (n_kv_heads * head_dim, dim),
              'attention.wv': (n_kv_heads * head_dim, dim),
              'attention.wo': (dim, n_heads * head_dim), 'ffn_norm': (dim,)}
    ffn = {'w1': (hidden_dim, dim), 'w2': (dim, hidden_dim), 'w3': (hidden_dim, dim)}
    if not n_experts:
        return shapes | {f'feed_forward.{w}': shape for w, shape in ffn.items()}
    shapes['feed_forward.gate'] = (n_experts, dim)  # a mixture of experts: the router
    return shapes | {f'feed_forward.experts.{e}.{w}': shape
                     for e in range(n_experts) for w, shape in ffn.items()}


def check_model(path, ckpt):
    """Stop with one line unless model_args are sane and every weight has the shape they
    imply. Returns the weights by name (without torch.compile's prefix) and hidden_dim,
    which model_args may leave to be derived."""
    def bad(why):
        die(f"{path}: {why} — the checkpoint is damaged, or not a model of ours")
    a, weights = ckpt['model_args'], ckpt['model']
    if not isinstance(a, dict) or not isinstance(weights, dict):
        bad("model_args and model must be dicts")
    for key in ('dim', 'n_layers', 'n_heads', 'vocab_size', 'max_seq_len'):
        if type(a.get(key)) is not int or a[key] < 1:
            bad(f"model_args {key}={a.get(key)!r} is not a positive integer")
    for key, types in (('n_kv_heads', (int,)), ('hidden_dim', (int,)), ('multiple_of', (int,)),
                       ('norm_eps', (int, float)), ('dropout', (int, float)),
                       ('n_experts', (int,)), ('n_experts_per_tok', (int,))):
        if key in a and (type(a[key]) not in types or not 0 <= a[key] < 1e9):
            bad(f"model_args {key}={a[key]!r} is not a number of the right kind")
    dim, n_heads, n_kv_heads = a['dim'], a['n_heads'], a.get('n_kv_heads') or a['n_heads']
    if n_heads % n_kv_heads:
        bad(f"n_kv_heads={n_kv_heads!r} does not divide n_heads={n_heads}")
    if dim % n_heads or (dim // n_heads) % 2:
        bad(f"n_heads={n_heads} does not split dim={dim} into heads of an even size")
    if a['max_seq_len'] > MAX_SEQ_LEN:
        bad(f"max_seq_len={a['max_seq_len']} is beyond any model's")
    n_experts, k = a.get('n_experts', 0), a.get('n_experts_per_tok', 2)
    if n_experts and not 1 <= k <= n_experts <= MAX_EXPERTS:
        bad(f"n_experts={n_experts}, n_experts_per_tok={k}: a mixture of at most {MAX_EXPERTS} "
            "experts, each token using 1 to n_experts of them")
    weights = {str(k).removeprefix('_orig_mod.'): v for k, v in weights.items()}
    w1 = weights.get(f"layers.0.feed_forward.{'experts.0.' * bool(n_experts)}w1.weight")
    hidden_dim = a.get('hidden_dim') or (w1.shape[0] if hasattr(w1, 'shape') and w1.shape else 0)
    want = {'tok_embeddings.weight': (a['vocab_size'], dim), 'norm.weight': (dim,),
            'output.weight': (a['vocab_size'], dim)}
    for i in range(a['n_layers']):
        for name, shape in layer_shapes(dim, hidden_dim, n_heads, n_kv_heads, n_experts).items():
            want[f'layers.{i}.{name}.weight'] = shape
    if ckpt.get('task') == 'rm':  # a reward model: the scalar head on top
        want['reward_head.weight'] = (1, dim)
    for name, shape in want.items():
        t = weights.get(name)
        if t is None and name != 'output.weight':  # a tied classifier may be left out
            bad(f"the weight {name} is missing")
        if t is not None and (not hasattr(t, 'shape') or tuple(t.shape) != shape):
            got = tuple(t.shape) if hasattr(t, 'shape') else type(t).__name__
            bad(f"{name} is {got} but model_args say {shape}")
        try:
            if isinstance(t, Stored):
                t.numpy()  # a view: checks that the tensor lies inside its storage
        except ValueError as e:
            bad(f"{name}: {e}")
    extra = sorted(set(weights) - set(want))
    if extra:
        bad(f"{extra[0]} is not a weight of a model with these model_args")
    return weights, hidden_dim


def nonfinite_weights(path, name):
    die(f"{path}: the weight {name} holds NaN or inf — the run that wrote it diverged; use an "
        "earlier checkpoint, or train again with a lower --learning_rate")


def load_model(path, device='cpu'):
    """The model and the checkpoint dict, read with torch.load(weights_only=True) after the
    torch-free reader has bounded every size and check_model every shape. A LoRA checkpoint
    gives its base model with the adapters on (load_lora)."""
    import torch
    from model import ModelArgs, RewardModel, Transformer
    first = read_checkpoint(path)
    if 'lora' in first:
        return load_lora(path, first, device)
    _, hidden_dim = check_model(path, first)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        unreadable(path, e)
    weights, _ = check_model(path, check_is_ours(path, ckpt))
    for name, t in weights.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            die(f"{path}: the weight {name} is not a tensor of floats — not a model of ours")
        if not torch.isfinite(t).all():
            nonfinite_weights(path, name)
    args = {k: v for k, v in ckpt['model_args'].items() if k in ModelArgs.__dataclass_fields__}
    args = ModelArgs(**dict(args, hidden_dim=hidden_dim))
    if ckpt.get('task') == 'rm':  # older reward models read the head alone
        likelihood = ckpt.get('rm_likelihood', False)
        if not isinstance(likelihood, bool):
            die(f"{path}: rm_likelihood is {likelihood!r:.40}, not True or False — the "
                "checkpoint is damaged")
        model = RewardModel(args, likelihood)
    else:
        model = Transformer(args)
    weights.setdefault('output.weight', weights['tok_embeddings.weight'])
    model.load_state_dict(weights)
    return model.to(device), ckpt


# -----------------------------------------------------------------------------
# LoRA checkpoints: the adapters, their settings, and which base they were trained on
#
# A LoRA run (train.py or train_rl.py --lora_rank=r) saves as 'model' only the adapters
# (layers.0.attention.wq.lora_A, ...), and as 'lora' {rank, alpha, dropout, targets, base,
# base_from_here, base_sha256}: the base checkpoint's path as given to --init_from, the same
# path relative to the LoRA checkpoint's folder, and a hash of the base's weights. Whoever reads
# it (sample.py, a resume, export.py) finds the base, checks the hash and puts the adapters on.

LORA_TARGETS = ('wq', 'wk', 'wv', 'wo', 'w1', 'w2', 'w3')  # as model.py's


def weights_sha256(path, ckpt):
    """The identity a LoRA checkpoint records of its base: sha256 over the base's weights (each
    name, type, shape and stored bytes, in name order), and for a base that is itself a LoRA
    checkpoint, over its own base's hash too. Read without torch, so export.py checks it as
    train.py does; a base trained further, or another model, has another hash."""
    h = hashlib.sha256()
    try:
        for name in sorted(ckpt['model']):
            a = np.ascontiguousarray(ckpt['model'][name].numpy())
            h.update(f"{name} {a.dtype.str} {a.shape}\n".encode())
            h.update(a.view(np.uint8).reshape(-1))
    except (AttributeError, TypeError, ValueError) as e:
        die(f"{path}: its weights cannot be read ({str(e)[:80]}) — the checkpoint is damaged")
    if isinstance(ckpt.get('lora'), dict):
        h.update(str(ckpt['lora'].get('base_sha256')).encode())
    return h.hexdigest()


def check_lora(path, ckpt):
    """A LoRA checkpoint's settings and adapters, held to what a LoRA run writes; returns (the
    settings, the adapters by name). Their shapes are checked against the base (fit_adapters)."""
    def bad(why):
        die(f"{path}: {why} — the LoRA checkpoint is damaged, or not one of ours")
    lora, adapters = ckpt.get('lora'), ckpt.get('model')
    if not isinstance(lora, dict) or not isinstance(adapters, dict):
        bad("lora and model must be dicts")
    if type(lora.get('rank')) is not int or not 1 <= lora['rank'] < 1e6:
        bad(f"its rank {lora.get('rank')!r:.40} is not a positive integer")
    for key, ok in (('alpha', lambda v: 0 < v < 1e9), ('dropout', lambda v: 0 <= v < 1)):
        if type(lora.get(key)) not in (int, float) or not ok(lora[key]):
            bad(f"its {key} {lora.get(key)!r:.40} is out of range")
    targets = lora.get('targets')
    if not isinstance(targets, list) or not targets or not set(targets) <= set(LORA_TARGETS):
        bad(f"its targets {targets!r:.80} are not among {','.join(LORA_TARGETS)}")
    for key in ('base', 'base_from_here'):
        if not isinstance(lora.get(key), str) or not lora[key]:
            bad(f"it names no base checkpoint ({key})")
    sha = lora.get('base_sha256')
    if not isinstance(sha, str) or len(sha) != 64 or set(sha) - set('0123456789abcdef'):
        bad("its base_sha256 is not a sha256")
    return lora, {str(k): v for k, v in adapters.items()}


def lora_base(path, ckpt):
    """The base checkpoint of the LoRA checkpoint at path: (its path, its dict read without
    torch). Looked for where --init_from said (from the current folder), then where it was
    from the LoRA checkpoint's folder (a project moved whole, or run from elsewhere). One line
    and exit when it is in neither place, or holds other weights than the adapters learned on."""
    lora = ckpt['lora']
    places = [lora['base'], os.path.join(os.path.dirname(path), lora['base_from_here'])]
    found = next((p for p in places if os.path.isfile(p)), None)
    if found is None:
        die(f"{path} is a LoRA adapter of {lora['base']}, which is not there — put that base "
            "checkpoint back (the adapter holds only what fine-tuning changed)")
    base = read_checkpoint(found)
    if weights_sha256(found, base) != lora['base_sha256']:
        die(f"{path} is a LoRA adapter of {lora['base']} as it was when the adapter was trained, "
            f"but {found} now holds other weights (trained further, or another model) — use "
            "the adapter with its own base, or train it again from this one")
    return found, base


def fit_adapters(path, lora, adapters, weights):
    """Each adapted weight's name (layers.0.attention.wq) -> (A, B), once every adapter is
    found to fit the base's weights (A (rank, in), B (out, rank)) and every layer in the
    targets to have one. weights: the base's, by name, with .shape."""
    def bad(why):
        die(f"{path}: {why} — the LoRA checkpoint is damaged, or not one of this base's")
    r, pairs = lora['rank'], {}
    for name, w in weights.items():
        prefix = name.removesuffix('.weight')
        if name.endswith('.weight') and prefix.rsplit('.', 1)[-1] in lora['targets'] \
                and prefix.startswith('layers.'):
            A, B = adapters.get(prefix + '.lora_A'), adapters.get(prefix + '.lora_B')
            if A is None or B is None:
                bad(f"the adapter of {prefix} is missing")
            for t, want in ((A, (r, w.shape[1])), (B, (w.shape[0], r))):
                if not hasattr(t, 'shape') or tuple(t.shape) != want:
                    bad(f"an adapter of {prefix} is {getattr(t, 'shape', type(t).__name__)}, "
                        f"not {want}")
            pairs[prefix] = (A, B)
    extra = sorted(set(adapters) - {p + s for p in pairs for s in ('.lora_A', '.lora_B')})
    if extra:
        bad(f"{extra[0]} is not an adapter of a weight in its targets")
    return pairs


def load_lora(path, first, device):
    """A LoRA checkpoint's model: its base (itself merged, if it is a LoRA checkpoint too) with
    adapters on the targets, holding the checkpoint's A and B; and the checkpoint dict."""
    import torch
    from model import RewardModel, add_lora, merge_lora
    check_lora(path, first)
    base_path, _ = lora_base(path, first)
    model, _ = load_model(base_path, device)
    if isinstance(model, RewardModel):
        die(f"{path}: its base {base_path} is a reward model — not a LoRA checkpoint of ours")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        unreadable(path, e)
    lora, adapters = check_lora(path, ckpt)
    add_lora(merge_lora(model), lora['rank'], lora['alpha'], lora['dropout'], lora['targets'])
    base = {k: v for k, v in model.state_dict().items() if not k.endswith(('lora_A', 'lora_B'))}
    fit_adapters(path, lora, adapters, base)
    for name, t in adapters.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            die(f"{path}: the adapter {name} is not a tensor of floats — not a model of ours")
        if not torch.isfinite(t).all():
            nonfinite_weights(path, name)
    model.load_state_dict(adapters, strict=False)  # fit_adapters: every adapter is there
    return model, ckpt


# the LoRA flags, which train.py and train_rl.py check alike (configurator.check)
LORA_CHECKS = {
    'lora_rank': (lambda v: 0 <= v <= 4096, "0 (full fine-tuning) to 4096"),
    'lora_alpha': (lambda v: 0 < v < 1e6, "above 0"),
    'lora_dropout': (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    'lora_targets': (lambda v: v and set(v.split(',')) <= set(LORA_TARGETS),
                     "a comma-separated list of " + ",".join(LORA_TARGETS)),
}


def start_lora(model, path, ckpt, resume, out_dir, asked):
    """A fine-tuning run's LoRA settings, for its checkpoint, once its model (loaded from path)
    is ready to train: None for full fine-tuning, where a LoRA checkpoint's adapters become
    part of the weights; else new adapters on the model, every other weight frozen, naming
    path and its hash as their base; or, resumed, the run's own, which must be what is asked.
    asked: the --lora_* flags, dict(rank, alpha, dropout, targets='wq,wk,...')."""
    from model import add_lora, merge_lora
    asked = dict(asked, targets=[t for t in LORA_TARGETS if t in asked['targets'].split(',')])
    lora = ckpt.get('lora') if resume else None  # the run's, as it was saved
    if resume and (lora or {}).get('rank', 0) != asked['rank']:
        die(f"{path} is a " + (f"LoRA run (r={lora['rank']})" if lora else "full fine-tuning run")
            + f": resume it with --lora_rank={lora['rank'] if lora else 0}")
    if lora and any(lora[k] != asked[k] for k in ('alpha', 'dropout', 'targets')):
        die(f"{path} is a LoRA run with --lora_alpha={lora['alpha']} --lora_dropout="
            f"{lora['dropout']} --lora_targets={','.join(lora['targets'])}: resume it with those")
    if lora:  # load_model put the run's adapters on
        return lora
    merge_lora(model)
    if not asked['rank']:
        return None
    add_lora(model, **asked)
    return dict(asked, base=path, base_from_here=os.path.relpath(path, out_dir),
                base_sha256=weights_sha256(path, read_checkpoint(path)))


def lora_note(model, lora):
    """For a run's first log line: how many of the parameters train, when LoRA is on"""
    n = sum(p.numel() for p in model.parameters())
    k = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f", of which {k:,} train ({k / n:.2%}: LoRA r={lora['rank']} on "
            f"{','.join(lora['targets'])})") if lora else ""
