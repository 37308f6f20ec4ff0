"""
The table and the picture at the end of `make demo-chat`: how well each model follows
held-out requests (from sample.py --eval_instruct --eval_out=.../eval.json), by class and
with standard errors, the best-of-K ceiling, the reward model's accuracy, RL's KL to the SFT
model; and one PNG of the curves a learner wants to see (pretraining's and SFT's losses, RL's
reward, instruction following and KL).

$ python report.py --png=demo_chat.png          # the folders of make demo-chat
$ python report.py --runs=out,out_sft,out_dpo,out_rl --png=''   # the table only
"""

import csv
import json
import math
import os

from checkpoint import write_atomic
from configurator import configure, die

# -----------------------------------------------------------------------------
runs = 'out,out_sft,out_dpo,out_rl'  # the runs' folders: pretrained, SFT, DPO, RL
names = 'pretrained,SFT,DPO,RL'
reward_model = 'out_rm'  # its log.csv gives the held-out pair accuracy ('' = none)
best_of = 'out_sft/best_of.json'  # sample.py --best_of's results ('' = none)
png = 'demo_chat.png'    # '' = no picture
# -----------------------------------------------------------------------------
KINDS = ('story_en', 'story_zh', 'q_name', 'q_thing', 'q_friend', 'q_animal')


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)['results']
    except (OSError, ValueError, KeyError, TypeError) as e:
        die(f"{path}: cannot read its results ({e.__class__.__name__}) — write it with "
            "python sample.py --checkpoint=... --eval_instruct=500 --eval_out=" + path)


def read_log(path):
    try:
        with open(path, newline='') as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def rate(rows, key='follows'):
    """a share and its standard error"""
    n = len(rows)
    p = sum(bool(r[key]) for r in rows) / max(n, 1)
    return p, math.sqrt(p * (1 - p) / max(n, 1))


def paired(a, b):
    """b - a on the same requests, and its standard error: the spread of the per-request
    differences (-1, 0, 1), smaller than two independent rates' when the models agree"""
    d = [bool(y['follows']) - bool(x['follows']) for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((v - mean) ** 2 for v in d) / max(len(d) - 1, 1)
    return mean, math.sqrt(var / len(d))


def table(evals):
    names_ = list(evals)
    sizes = {name: len(rows) for name, rows in evals.items()}
    fewer = ", ".join(f"{name}: first {n}" for name, n in sizes.items()
                      if n < max(sizes.values()))
    print(f"held-out instruction following, greedy: {max(sizes.values())} requests"
          f"{' (' + fewer + ')' if fewer else ''}, ± 1 standard error")
    print(f"{'model':11s} {'follows':>13s} {'pass@1':>13s}  " + " ".join(f"{k:>8s}" for k in KINDS))
    for name, rows in evals.items():
        p, se = rate(rows)
        q, qse = rate(rows, 'passes')
        by = [[r for r in rows if r['kind'] == k] for k in KINDS]
        print(f"{name:11s} {p:6.1%} ± {se:4.1%} {q:6.1%} ± {qse:4.1%}  "
              + " ".join(f"{rate(b)[0]:8.0%}" if b else f"{'':8s}" for b in by))
    if 'SFT' in evals:
        for name in names_[names_.index('SFT') + 1:]:
            if len(evals[name]) == len(evals['SFT']):
                d, se = paired(evals['SFT'], evals[name])
                print(f"{name} - SFT: {d:+.1%} ± {se:.1%} (the same requests, paired)")


def curves(path, logs):
    """One PNG: pretraining's and SFT's losses, RL's reward, held-out following and KL"""
    import matplotlib
    matplotlib.use('Agg')  # no screen needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    for a, (name, rows) in zip(ax[0], [(n, logs.get(n, [])) for n in ('pretrained', 'SFT')]):
        steps = [r for r in rows if r.get('train_loss') and not r.get('val_loss')]
        evals = [r for r in rows if r.get('val_loss')]
        a.plot([int(r['iter']) for r in steps], [float(r['train_loss']) for r in steps], label='train')
        a.plot([int(r['iter']) for r in evals], [float(r['val_loss']) for r in evals], 'o-', label='val')
        a.set(title=f"{name}: loss per token", xlabel='iteration', ylabel='nats')
        a.legend()
    rl = logs.get('RL', [])
    steps = [r for r in rl if r.get('loss')]
    evals = [r for r in rl if r.get('instruct')]
    a = ax[1][0]
    a.plot([int(r['iter']) for r in steps], [float(r['follows']) for r in steps], label='sampled answers that follow')
    a.plot([int(r['iter']) for r in evals], [float(r['instruct']) for r in evals], 'o-', label='held-out, greedy')
    a.set(title='RL: instruction following', xlabel='step', ylim=(0, 1))
    a.legend()
    a = ax[1][1]
    a.plot([int(r['iter']) for r in steps], [float(r['kl']) for r in steps])
    a.set(title='RL: KL to the SFT model, per token', xlabel='step')
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format='png', dpi=90))
    print(f"wrote {path}")


def main():
    configure(globals())
    folders, labels = runs.split(','), names.split(',')
    if len(folders) != len(labels):
        die(f"--runs has {len(folders)} folders but --names {len(labels)} names — give one each")
    evals = {n: read_json(os.path.join(f, 'eval.json')) for f, n in zip(folders, labels)}
    table(evals)
    if best_of:
        rows = read_json(best_of)
        key = next((k for k in rows[0] if k.startswith('best_of_')), None) if rows else None
        if key:
            p, se = rate(rows, key)
            g, gse = rate(rows)
            print(f"ceiling: SFT's best of {key[8:]} answers at temperature 1 follows {p:.1%} ± "
                  f"{se:.1%} (greedy {g:.1%}, the same {len(rows)})")
    logs = {n: read_log(os.path.join(f, 'log.csv')) for f, n in zip(folders, labels)}
    rl = [r for r in logs.get('RL', []) if r.get('kl')]
    if rl:
        last = rl[-5:]
        print(f"RL: KL to the SFT model {sum(float(r['kl']) for r in last) / len(last):.4f} per "
              f"token over its last {len(last)} steps")
    if reward_model:
        rows = [r for r in read_log(os.path.join(reward_model, 'log.csv')) if r.get('rm_acc')]
        if rows:
            print(f"reward model: {float(rows[-1]['rm_acc']):.1%} of the held-out pairs ordered "
                  f"right ({reward_model})")
    if png:
        curves(png, logs)


if __name__ == '__main__':
    main()
