#!/usr/bin/env python3
"""Summarize a benches/run.sh results dir: tables per workload (medians across rounds) and ratios.

Usage: summarize.py RESULTS_DIR [--noise FRAC]

Reads RESULTS_DIR/runs.tsv (and header.txt), writes RESULTS_DIR/runs.jsonl, summary.txt and
summary.md, and prints summary.txt.
"""
import csv
import json
import os
import statistics as st
import sys

NOISE_FRAC = 0.10
ORDER = ['direct', 'pgbouncer', 'pgrelay', 'pgrelay-noobs']
NUMERIC = ('tps', 'lat_avg_ms', 'p50_ms', 'p99_ms', 'p999_ms', 'n_tx', 'failed_tx', 'aborted_clients', 'rc',
           'proxy_user_s', 'proxy_sys_s', 'proxy_vcs', 'proxy_nvcs', 'pg_cpu_s', 'pgbench_cpu_s',
           'sys_busy_s', 'sys_ctxt', 'wall_s')


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def med(v):
    v = [x for x in v if x is not None]
    return st.median(v) if v else None


def fmt(x, p=1):
    return '-' if x is None else f'{x:,.{p}f}'


def load(d):
    rows = list(csv.DictReader(open(os.path.join(d, 'runs.tsv')), delimiter='\t'))
    for r in rows:
        for k in NUMERIC:
            r[k] = num(r.get(k))
        r['round'] = int(r['round'])
    return rows


def is_proxy(r):
    return r['target'] != 'direct'


def other_s(r):
    """Machine busy CPU not explained by proxy + postgres tree + pgbench (neighbours, kthreads)."""
    parts = [r['sys_busy_s'], r['pg_cpu_s'], r['pgbench_cpu_s']]
    if None in parts:
        return None
    proxy = (r['proxy_user_s'] or 0) + (r['proxy_sys_s'] or 0)
    return parts[0] - proxy - parts[1] - parts[2]


def noisy(r, ncpu, frac):
    o, wall = other_s(r), r['wall_s']
    return bool(o is not None and wall and o > frac * ncpu * wall)


def bad(r):
    return (r['rc'] != 0 or (r['aborted_clients'] or 0) > 0 or (r['failed_tx'] or 0) > 0
            or r.get('proxy_alive') == 'no' or r['tps'] is None)


def per_tx(r, v):
    return v * 1e6 / r['n_tx'] if r['n_tx'] and v is not None else None


def per_tx_n(r, v):
    return v / r['n_tx'] if r['n_tx'] and v is not None else None


def summarize(d, frac):
    rows = load(d)
    header = []
    hp = os.path.join(d, 'header.txt')
    if os.path.exists(hp):
        header = [l.rstrip('\n') for l in open(hp)]
    ncpu = os.cpu_count() or 1
    for l in header:
        if 'nproc=' in l:
            ncpu = int(l.split('nproc=')[1].split()[0])
    with open(os.path.join(d, 'runs.jsonl'), 'w') as f:
        for r in rows:
            f.write(json.dumps(r) + '\n')

    workloads = list(dict.fromkeys(r['workload'] for r in rows))
    targets = sorted(set(r['target'] for r in rows), key=lambda t: ORDER.index(t) if t in ORDER else 99)
    txt, md = [], []
    txt.append('Medians across rounds. clean = runs where machine CPU not explained by proxy + postgres + pgbench')
    txt.append(f'stayed <= {frac:.0%} of {ncpu} CPUs; medians use clean runs when there are any.')
    txt.append('vs_direct = median over rounds of TPS / direct TPS in the same round. CPU columns are microseconds')
    txt.append('per transaction: proxy = proxy process user+sys, pg = PostgreSQL process tree, machine = all CPUs busy.')
    txt.append('vcs/nvcs = proxy voluntary/nonvoluntary context switches per transaction (all threads).')
    md.append('Medians across rounds; `vs direct` is the median of same-round TPS ratios. CPU columns are '
              'microseconds per transaction (proxy process user+system, PostgreSQL process tree, whole machine). '
              '`vcs`/`nvcs` = proxy voluntary/nonvoluntary context switches per transaction, summed over threads. '
              f'`clean` = runs where machine CPU not explained by proxy, PostgreSQL and pgbench stayed <= {frac:.0%} '
              'of the CPUs (medians use clean runs when any exist). `status` BAD = non-zero pgbench exit, aborted '
              'clients, failed transactions or a dead proxy: such TPS comes from surviving clients only.')
    cols = ['target', 'status', 'clean', 'tps', 'tps min-max', 'vs direct', 'lat avg ms', 'p50 ms', 'p99 ms',
            'p99.9 ms', 'failed', 'aborted', 'proxy us/tx', 'proxy usr', 'proxy sys', 'vcs/tx', 'nvcs/tx',
            'pg us/tx', 'machine us/tx', 'other us/tx']
    for w in workloads:
        wr = [r for r in rows if r['workload'] == w]
        by_t = {t: [r for r in wr if r['target'] == t] for t in targets}
        by_t = {t: v for t, v in by_t.items() if v}
        use = {t: ([r for r in v if not noisy(r, ncpu, frac)] or v) for t, v in by_t.items()}

        def paired(a, b, key='tps', f=lambda r, x: x):
            """median over rounds of a/b (same round), preferring rounds where both runs are clean"""
            ra = {r['round']: r for r in by_t.get(a, [])}
            rb = {r['round']: r for r in by_t.get(b, [])}
            allq, cleanq = [], []
            for k in ra:
                if k in rb:
                    x, y = f(ra[k], ra[k][key]), f(rb[k], rb[k][key])
                    if x is not None and y:
                        allq.append(x / y)
                        if not noisy(ra[k], ncpu, frac) and not noisy(rb[k], ncpu, frac):
                            cleanq.append(x / y)
            q = cleanq or allq
            return (med(q), min(q) if q else None, max(q) if q else None)

        table = []
        stats = {}
        for t, rs in by_t.items():
            allr = by_t[t]
            tps = [r['tps'] for r in rs if r['tps'] is not None]
            nbad = sum(1 for r in allr if bad(r))
            proxy_cpu = med([per_tx(r, (r['proxy_user_s'] or 0) + (r['proxy_sys_s'] or 0)) for r in rs]) if is_proxy(rs[0]) else None
            s = dict(
                tps=med(tps),
                proxy=proxy_cpu,
                machine=med([per_tx(r, r['sys_busy_s']) for r in rs]),
            )
            stats[t] = s
            vd = paired(t, 'direct')[0] if 'direct' in by_t and t != 'direct' else None
            args = sorted(set(r['pgbench_args'] for r in allr))
            errs = sorted(set(r['first_error'] for r in allr if r['first_error'] not in ('-', '')))
            table.append(dict(
                target=t, args=args, errs=errs,
                cells=[t, 'ok' if nbad == 0 else f'BAD {nbad}/{len(allr)}', f'{sum(1 for r in allr if not noisy(r, ncpu, frac))}/{len(allr)}',
                       fmt(s['tps'], 0), f'{fmt(min(tps), 0) if tps else "-"}-{fmt(max(tps), 0) if tps else "-"}',
                       fmt(vd, 3) if t != 'direct' else '1',
                       fmt(med([r['lat_avg_ms'] for r in rs]), 3), fmt(med([r['p50_ms'] for r in rs]), 3),
                       fmt(med([r['p99_ms'] for r in rs]), 3), fmt(med([r['p999_ms'] for r in rs]), 3),
                       str(int(sum(r['failed_tx'] or 0 for r in allr))),
                       str(int(sum(r['aborted_clients'] or 0 for r in allr))),
                       fmt(proxy_cpu, 2),
                       fmt(med([per_tx(r, r['proxy_user_s']) for r in rs]), 2) if is_proxy(rs[0]) else '-',
                       fmt(med([per_tx(r, r['proxy_sys_s']) for r in rs]), 2) if is_proxy(rs[0]) else '-',
                       fmt(med([per_tx_n(r, r['proxy_vcs']) for r in rs]), 2) if is_proxy(rs[0]) else '-',
                       fmt(med([per_tx_n(r, r['proxy_nvcs']) for r in rs]), 3) if is_proxy(rs[0]) else '-',
                       fmt(med([per_tx(r, r['pg_cpu_s']) for r in rs]), 2),
                       fmt(s['machine'], 2),
                       fmt(med([per_tx(r, other_s(r)) for r in rs]), 2)]))
        # ---- text
        args0 = sorted(set(r['pgbench_args'] for r in wr))
        txt.append('')
        txt.append(f'== {w}: pgbench -n {args0[0]}' + ''.join(
            f'   [{row["target"]}: {row["args"][0]}]' for row in table if row['args'] != [args0[0]] and len(args0) > 1))
        wid = [max(len(c), *(len(row['cells'][i]) for row in table)) for i, c in enumerate(cols)]
        txt.append('  '.join(c.ljust(wid[i]) for i, c in enumerate(cols)))
        for row in table:
            txt.append('  '.join(c.ljust(wid[i]) for i, c in enumerate(row['cells'])))
        # ---- markdown
        md.append('')
        md.append(f'### {w}')
        md.append('')
        md.append(f'`pgbench -n {by_t[next(iter(by_t))][0]["pgbench_args"]} -T <duration>`' if len(args0) == 1 else
                  'pgbench args: ' + '; '.join(f'{row["target"]}: `-n {row["args"][0]}`' for row in table))
        md.append('')
        md.append('| ' + ' | '.join(cols) + ' |')
        md.append('|' + '|'.join('---' if i < 3 else '--:' for i in range(len(cols))) + '|')
        for row in table:
            md.append('| ' + ' | '.join(row['cells']) + ' |')
        # ---- ratios
        notes = []
        def ratio_line(a, b):
            if a not in stats or b not in stats:
                return None
            tq, tlo, thi = paired(a, b)
            cq = paired(a, b, 'proxy_user_s', lambda r, x: per_tx(r, (r['proxy_user_s'] or 0) + (r['proxy_sys_s'] or 0)))[0] \
                if a != 'direct' and b != 'direct' else None
            mq = paired(a, b, 'sys_busy_s', lambda r, x: per_tx(r, x))[0]
            s = (f'{a}/{b}: TPS x{fmt(tq, 3)} (rounds {fmt(tlo, 2)}-{fmt(thi, 2)})'
                 + (f', proxy CPU/txn x{fmt(cq, 2)}' if cq is not None else '')
                 + f', machine CPU/txn x{fmt(mq, 2)}')
            return s
        for a, b in (('pgrelay', 'pgbouncer'), ('pgrelay', 'direct'), ('pgbouncer', 'direct'),
                     ('pgrelay-noobs', 'pgrelay')):
            l = ratio_line(a, b)
            if l:
                notes.append(l)
        if 'pgrelay-noobs' in stats and 'pgrelay' in stats:
            q = paired('pgrelay-noobs', 'pgrelay')[0]
            if q:
                notes.append(f'observability on/off TPS: x{fmt(1 / q, 3)} ({fmt((1 / q - 1) * 100, 1)} %; target: '
                             f'no worse than -3 %), paired over rounds')
        for row in table:
            if row['errs']:
                notes.append(f'{row["target"]} first errors: ' + ' | '.join(e[:160] for e in row['errs'][:3]))
        if len(args0) > 1:
            notes.append('note: targets ran different pgbench args here (see above); pgbouncer 1.18 cannot run -M prepared '
                         'in transaction mode, so its row is -M extended.')
        for n in notes:
            txt.append('  ' + n)
        md.append('')
        for n in notes:
            md.append(f'- {n}')
    out = '\n'.join(txt)
    open(os.path.join(d, 'summary.txt'), 'w').write('\n'.join(header) + '\n\n' + out + '\n')
    mdh = ['# pgrelay benchmark run', '', '```'] + [l.lstrip('# ') for l in header] + ['```', '']
    open(os.path.join(d, 'summary.md'), 'w').write('\n'.join(mdh + md) + '\n')
    print(out)


if __name__ == '__main__':
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(1)
    frac = NOISE_FRAC
    if '--noise' in sys.argv:
        frac = float(sys.argv[sys.argv.index('--noise') + 1])
    summarize(sys.argv[1], frac)
