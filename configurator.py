"""
Command-line overrides for scripts whose config is a block of plain globals
(nanoGPT's configurator.py, made strict). Usage inside a script:

    batch_size = 32          # every knob is a module-level global with a default
    ...
    config, _ = configure(globals())   # parses sys.argv: the resolved config dict, and
                                       # the positional arguments asked for (none here)

Arguments are `--key=value` (the value is parsed as a Python literal, else kept as a
string), `--key` alone for a boolean set to True, or a path to a Python file whose
top-level assignments are applied the same way. Unlike nanoGPT's exec() version, an
unknown key or a value of the wrong type stops the program with one line that names it,
instead of silently creating a new variable nobody reads.

die() is that one line for every script: a user's mistake is reported as
"error: what is wrong — what to do" and exit status 1, never a traceback.
"""

import ast
import difflib
import signal
import sys

CONFIG_TYPES = (int, float, bool, str)


def config_keys(g):
    """The globals that are knobs: lowercase names bound to int/float/bool/str."""
    return [k for k, v in g.items()
            if not k.startswith('_') and k.islower() and type(v) in CONFIG_TYPES]


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def check(g, rules):
    """Stop at the first knob that breaks its rule. rules: {key: (ok(value), 'what it must
    be')}, checked after configure() so that a value is judged whatever set it."""
    for key, (ok, want) in rules.items():
        if not ok(g[key]):
            die(f"--{key}={g[key]!r}: must be {want}")


def check_device(device):
    """cpu, cuda, cuda:N or mps, and present on this machine."""
    import torch
    kind, _, index = device.partition(':')
    if kind not in ('cpu', 'cuda', 'mps') or (index and not (kind == 'cuda' and index.isdigit())):
        die(f"--device={device}: use cpu, cuda, cuda:N or mps")
    if kind == 'cuda' and not torch.cuda.is_available():
        die(f"--device={device}: this machine has no CUDA GPU (or PyTorch was built without "
            "CUDA) — use --device=cpu")
    if kind == 'cuda' and index and int(index) >= torch.cuda.device_count():
        die(f"--device={device}: this machine has {torch.cuda.device_count()} GPU(s), "
            "numbered from 0")
    if kind == 'mps' and not torch.backends.mps.is_available():
        die(f"--device={device}: Apple's MPS is not available here — use --device=cpu")


def coerce(key, value, default):
    """Return value converted to the type of default, or stop with a message."""
    want = type(default)
    if want is bool and str(value).lower() in ('true', 'false'):
        return str(value).lower() == 'true'
    if want is float and type(value) is int:
        return float(value)
    if want is str and type(value) is not str:
        return str(value)       # --start=42 is the string "42" when start is a string knob
    if type(value) is not want:
        die(f"--{key}={value!r}: expected {want.__name__} (default {default!r}), "
             f"got {type(value).__name__}")
    return value


def parse_value(s):
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return s  # a bare word such as --device=cpu is a string


def read_config_file(path, keys):
    """A config file, nanoGPT style: plain Python assignments -> {name: value}. Anything else
    (a checkpoint given where --checkpoint= was meant, a line that fails) is one line."""
    try:
        raw = open(path, 'rb').read()
    except OSError as e:
        die(f"cannot read config file {path}: {e.strerror}")
    if raw.startswith(b'PK\x03\x04'):  # a zip: torch.save's checkpoints are
        flag = next((k for k in ('checkpoint', 'init_from') if k in keys), None)
        die(f"{path} is a checkpoint, not a config file — options are --key=value"
            + (f": give it as --{flag}={path}" if flag else ""))
    try:
        code = compile(raw.decode('utf-8'), path, 'exec')
    except (SyntaxError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        line = f" (line {e.lineno})" if getattr(e, 'lineno', None) else ""
        die(f"config file {path}: {getattr(e, 'msg', None) or e}{line} — it holds plain Python "
            "assignments such as batch_size = 16")
    scope = {}
    try:
        exec(code, {}, scope)
    except Exception as e:  # a NameError, a ZeroDivisionError, ...: the user's line, not ours
        tb, line = e.__traceback__, '?'
        while tb:
            if tb.tb_frame.f_code.co_filename == path:
                line = tb.tb_lineno
            tb = tb.tb_next
        die(f"config file {path}, line {line}: {type(e).__name__}: {e} — it holds plain Python "
            "assignments such as batch_size = 16")
    return {k: v for k, v in scope.items() if not k.startswith('_')}


class StopOnCtrlC:
    """A training loop's Ctrl-C: the first asks it to finish its step, save and exit; a second
    stops at once. Under DDP every rank must stop at the same step, or the next all-reduce
    hangs, so requested() asks them all."""

    def __init__(self):
        self.pressed = False
        signal.signal(signal.SIGINT, self.press)

    def press(self, signum, frame):
        self.pressed = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def requested(self, ddp=False, device='cpu'):
        if ddp:
            import torch
            import torch.distributed as dist
            flag = torch.tensor(float(self.pressed), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.pressed = bool(flag.item())
        return self.pressed


def on_interrupt(what):
    """Ctrl-C ends the script with one line that says what was kept, not a traceback, and
    exit status 130 (128 + SIGINT); temporaries are still removed (finally blocks run)."""
    def stop(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C stops at once
        print(f"\ninterrupted: {what}", file=sys.stderr)
        sys.exit(130)
    signal.signal(signal.SIGINT, stop)


def configure(g, argv=None, positional=0):
    """Apply overrides from argv to the globals dict g. Returns (config, positionals):
    config is {key: value} for every knob, positionals the first `positional` non-flag
    arguments (e.g. the STAGE of preprocess.py), which are not treated as config files."""
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(g)
    positionals = []

    def apply(key, value):
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            die(f"unknown option --{key}{hint}; valid options: "
                 + " ".join(f"--{k}" for k in sorted(keys)))
        g[key] = coerce(key, value, g[key])

    for arg in argv:
        if arg.startswith('--'):
            key, eq, val = arg[2:].partition('=')
            key = key.replace('-', '_')
            if not eq:
                if key in keys and type(g[key]) is not bool:
                    die(f"--{key} needs a value: --{key}=...")
                apply(key, True)
            else:
                apply(key, parse_value(val))
        elif len(positionals) < positional:
            positionals.append(arg)
        else:
            for key, value in read_config_file(arg, keys).items():
                apply(key, value)
    return {k: g[k] for k in keys}, positionals
