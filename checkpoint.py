"""
Our files on disk: every file is written whole or not at all, and a checkpoint is read as
data, with or without torch.

write_atomic() writes to a temporary name beside the file and renames it over the file, so a
crash at any moment leaves the old file or the new one, never half of one.

read_checkpoint() reads what train.py saved (torch.save's zip) without importing torch, for
export.py: importing torch takes longer than writing a 110M model. torch.save writes a zip:
data.pkl, the pickled dict in which every tensor is a reference to data/<key>, a raw
little-endian storage kept uncompressed. The storages are mapped, not copied, and only the
arrays asked for are touched (the model's, not the optimizer's, twice as large); only plain
data is unpickled, as torch.load(weights_only=True) does.
"""

import codecs
import collections
import os
import pickle
import struct
import zipfile

import numpy as np

from configurator import die


# -----------------------------------------------------------------------------
# writing

def write_atomic(path, write, mode='wb'):
    """Call write(f) on a temporary file beside path, then rename it over path. The
    temporary name holds this process's id, so two processes never write the same one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
        if 0 not in self.shape and (min((self.offset, *self.stride)) < 0 or last >= len(a)):
            raise ValueError("a tensor reaches outside its storage")  # as_strided reads anywhere
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
        return pid[2], pid[1]

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
