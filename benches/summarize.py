#!/usr/bin/env python3
"""Summarize a benches/run.sh results dir: tables per workload (medians across rounds) and ratios.

Usage: summarize.py RESULTS_DIR [--noise FRAC]

Reads RESULTS_DIR/runs.tsv (and header.txt), writes RESULTS_DIR/runs.jsonl, summary.txt,
summary.md and latency.svg (latency percentile curves per workload; needs the lat_pct_ms column
that run.sh writes since the chart was added), and prints summary.txt.
"""
import csv
import json
import math
import os
import re
import statistics as st
import sys
from xml.sax.saxutils import escape

NOISE_FRAC = 0.10
ORDER = ['direct', 'pgbouncer', 'pgrelay', 'pgrelay-noobs', 'pgrelay-busypoll']
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


def parse_pcts(text):
    """'p1=0.120;...;max=9.800' -> {'p1': 0.12, ..., 'max': 9.8}; {} when absent (older results dirs)."""
    out = {}
    for part in (text or '').split(';'):
        k, _, v = part.partition('=')
        if k and num(v) is not None:
            out[k] = num(v)
    return out


def load(d):
    rows = list(csv.DictReader(open(os.path.join(d, 'runs.tsv')), delimiter='\t'))
    for r in rows:
        for k in NUMERIC:
            r[k] = num(r.get(k))
        r['round'] = int(r['round'])
        r['lat_pct_ms'] = parse_pcts(r.get('lat_pct_ms'))
        r['skipped'] = r.get('skipped') or '-'
    return rows


def skipped(r):
    return r['skipped'] not in ('-', '')


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
    if skipped(r):
        return False
    return (r['rc'] != 0 or (r['aborted_clients'] or 0) > 0 or (r['failed_tx'] or 0) > 0
            or r.get('proxy_alive') == 'no' or r['tps'] is None)


def per_tx(r, v):
    return v * 1e6 / r['n_tx'] if r['n_tx'] and v is not None else None


def per_tx_n(r, v):
    return v / r['n_tx'] if r['n_tx'] and v is not None else None


# ---------- latency chart ----------

PCT_ORDER = ['p1', 'p5', 'p10', 'p25', 'p50', 'p75', 'p90', 'p95', 'p99', 'p99.5', 'p99.9', 'p99.99']
COLOURS = {'direct': '#6b6b6b', 'pgbouncer': '#1f6fb4', 'pgrelay': '#e07b00', 'pgrelay-noobs': '#2a9d4a', 'pgrelay-busypoll': '#9b3fb5'}
X_MAX = 4.0      # p99.99 on the -log10(1 - q) axis
X_OF_MAX = 4.7   # where the max point is drawn, past p99.99


def pct_x(name):
    """Position on the percentile axis: -log10(1 - q), so p90 = 1, p99 = 2, p99.9 = 3, p99.99 = 4."""
    if name == 'max':
        return X_OF_MAX
    return -math.log10(1 - float(name[1:]) / 100)


def pct_curves(by_t):
    """target -> {percentile name: median over that target's rounds}, for targets whose runs have percentiles."""
    curves = {}
    for t, rs in by_t.items():
        runs = [r['lat_pct_ms'] for r in rs if r['lat_pct_ms']]
        if runs:
            curves[t] = {k: med([p.get(k) for p in runs]) for k in PCT_ORDER + ['max']}
            curves[t] = {k: v for k, v in curves[t].items() if v is not None and v > 0}
    return {t: c for t, c in curves.items() if c}


def nice_ticks(lo, hi):
    """1-2-5 ticks covering [lo, hi] (log axis)."""
    ticks = []
    e = math.floor(math.log10(lo))
    while True:
        for m in (1, 2, 5):
            v = m * 10 ** e
            if v > hi * 1.0001:
                return ticks
            if v >= lo * 0.9999:
                ticks.append(v)
        e += 1


def tick_label(v):
    return f'{v:g}' if v >= 0.001 else f'{v:.0e}'


def panel_svg(x0, y0, w, h, title, subtitle, series, notes):
    """One workload: series = [(target, [curve per round], median curve)], curves are {percentile: ms}."""
    left, right, top, bottom = 58, 14, 40, 72   # legend and notes go under the x axis, clear of the curves
    pw, ph = w - left - right, h - top - bottom
    vals = [v for _, rounds, m in series for c in rounds + [m] for v in c.values()]
    out = [f'<g transform="translate({x0},{y0})">',
           f'<text x="{left}" y="16" font-size="14" font-weight="bold">{escape(title)}</text>',
           f'<text x="{left}" y="31" font-size="11" fill="#555">{escape(subtitle)}</text>']
    if not vals:
        out.append(f'<text x="{left + 10}" y="{top + ph / 2}" font-size="12" fill="#888">no latency data</text></g>')
        return '\n'.join(out)
    lo, hi = min(vals), max(vals)
    lo_l, hi_l = math.log10(lo), math.log10(hi)
    if hi_l - lo_l < 0.5:
        mid = (hi_l + lo_l) / 2
        lo_l, hi_l = mid - 0.25, mid + 0.25
    pad = (hi_l - lo_l) * 0.05
    lo_l, hi_l = lo_l - pad, hi_l + pad

    def px(name):
        return left + pct_x(name) / X_OF_MAX * pw

    def py(v):
        return top + ph - (math.log10(v) - lo_l) / (hi_l - lo_l) * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fcfcfc" stroke="#999"/>')
    for v in nice_ticks(10 ** lo_l, 10 ** hi_l):
        y = py(v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{left - 5}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{tick_label(v)}</text>')
    for name, label in (('p50', '50'), ('p90', '90'), ('p99', '99'), ('p99.9', '99.9'), ('p99.99', '99.99'),
                        ('max', 'max')):
        x = px(name)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 14}" font-size="10" text-anchor="middle">{label}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 28}" font-size="11" text-anchor="middle">percentile</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2})">latency ms (log)</text>')

    def path(c):
        pts = [(px(k), py(c[k])) for k in PCT_ORDER if k in c]
        d = 'M' + ' L'.join(f'{x:.1f},{y:.1f}' for x, y in pts)
        tail = ''
        if 'max' in c and pts:
            tail = f'M{pts[-1][0]:.1f},{pts[-1][1]:.1f} L{px("max"):.1f},{py(c["max"]):.1f}'
        return d, tail

    for t, rounds, m in series:
        col = COLOURS.get(t, '#8e44ad')
        for c in rounds:
            d, tail = path(c)
            out.append(f'<path d="{d} {tail}" fill="none" stroke="{col}" stroke-width="0.8" stroke-opacity="0.35"/>')
        d, tail = path(m)
        out.append(f'<path d="{d}" fill="none" stroke="{col}" stroke-width="2"/>')
        if tail:
            out.append(f'<path d="{tail}" fill="none" stroke="{col}" stroke-width="1.5" stroke-dasharray="4 3"/>')
        for k in PCT_ORDER + ['max']:
            if k in m:
                out.append(f'<circle cx="{px(k):.1f}" cy="{py(m[k]):.1f}" r="2.2" fill="{col}">'
                           f'<title>{escape(t)} {k}: {m[k]:.3f} ms</title></circle>')
    lx, ly = left, top + ph + 44
    for t, _, m in series:
        col = COLOURS.get(t, '#8e44ad')
        label = f'{t} (p99 {m["p99"]:.3g} ms)' if 'p99' in m else t
        out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 18}" y2="{ly - 4}" stroke="{col}" stroke-width="2"/>')
        out.append(f'<text x="{lx + 22}" y="{ly}" font-size="10">{escape(label)}</text>')
        lx += 30 + 6 * len(label)
    for n in notes:
        ly += 14
        out.append(f'<text x="{left}" y="{ly}" font-size="10" fill="#888">{escape(n)}</text>')
    out.append('</g>')
    return '\n'.join(out)


def write_latency_svg(d, rows, workloads, targets):
    """Writes d/latency.svg (one panel per workload) and returns its name, or None without percentile data."""
    if not any(r['lat_pct_ms'] for r in rows):
        return None
    panels = []
    for w in workloads:
        wr = [r for r in rows if r['workload'] == w]
        series, notes = [], []
        for t in targets:
            rs = sorted((r for r in wr if r['target'] == t), key=lambda r: r['round'])
            if not rs:
                continue
            if all(skipped(r) for r in rs):
                notes.append(f'{t}: n/a ({rs[0]["skipped"]})')
                continue
            rounds = [r['lat_pct_ms'] for r in rs if r['lat_pct_ms']]
            curve = pct_curves({t: rs}).get(t)
            if curve:
                series.append((t, rounds, curve))
        args = sorted(set(r['pgbench_args'] for r in wr))
        panels.append((w, 'pgbench -n ' + ' | '.join(args), series, notes))
    cols = 2 if len(panels) > 1 else 1
    pw, ph = 520, 360
    nrows = (len(panels) + cols - 1) // cols
    width, height = cols * pw + 20, nrows * ph + 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           '<text x="20" y="26" font-size="16" font-weight="bold">Latency percentiles per workload '
           '(pgbench per-transaction log)</text>',
           '<text x="20" y="42" font-size="11" fill="#555">x: percentile on a -log10(1 - q) scale; y: latency '
           'in ms, log scale; thick = median over rounds, thin = single rounds, dashed = p99.99 to max</text>']
    for i, (w, sub, series, notes) in enumerate(panels):
        out.append(panel_svg(10 + (i % cols) * pw, 50 + (i // cols) * ph, pw, ph, w, sub, series, notes))
    out.append('</svg>')
    open(os.path.join(d, 'latency.svg'), 'w').write('\n'.join(out) + '\n')
    return 'latency.svg'


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
        na = {t: v[0]['skipped'] for t, v in by_t.items() if all(skipped(r) for r in v)}
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
        for t, rs in use.items():
            allr = by_t[t]
            if t in na:
                table.append(dict(target=t, args=sorted(set(r['pgbench_args'] for r in allr)), errs=[],
                                  cells=[t, 'n/a'] + ['n/a' if c in ('tps', 'vs direct') else '-' for c in cols[2:]]))
                continue
            tps = [r['tps'] for r in rs if r['tps'] is not None]
            tps_all = [r['tps'] for r in allr if r['tps'] is not None]   # the range shows noisy rounds too
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
                       fmt(s['tps'], 0), f'{fmt(min(tps_all), 0) if tps_all else "-"}-{fmt(max(tps_all), 0) if tps_all else "-"}',
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
            if tq is None:
                return None
            cq = paired(a, b, 'proxy_user_s', lambda r, x: per_tx(r, (r['proxy_user_s'] or 0) + (r['proxy_sys_s'] or 0)))[0] \
                if a != 'direct' and b != 'direct' else None
            mq = paired(a, b, 'sys_busy_s', lambda r, x: per_tx(r, x))[0]
            s = (f'{a}/{b}: TPS x{fmt(tq, 3)} (rounds {fmt(tlo, 2)}-{fmt(thi, 2)})'
                 + (f', proxy CPU/txn x{fmt(cq, 2)}' if cq is not None else '')
                 + f', machine CPU/txn x{fmt(mq, 2)}')
            return s
        for a, b in (('pgrelay', 'pgbouncer'), ('pgrelay', 'direct'), ('pgbouncer', 'direct'),
                     ('pgrelay-noobs', 'pgrelay'), ('pgrelay-busypoll', 'pgbouncer'), ('pgrelay-busypoll', 'pgrelay')):
            l = ratio_line(a, b)
            if l:
                notes.append(l)
        # Latency a proxy adds: its median p50 minus direct's, and that against pgBouncer's. Only with one client:
        # with more, the p50 is mostly queueing, and with -C it is mostly connecting.
        p50 = {t: med([r['p50_ms'] for r in use[t] if r['p50_ms'] is not None]) for t in stats}
        single = all(re.search(r'(^| )-c *1( |$)', a) and ' -C' not in f' {a}' for a in args0)
        if single and p50.get('direct') is not None and p50.get('pgbouncer') is not None:
            base = p50['pgbouncer'] - p50['direct']
            for t in ('pgrelay', 'pgrelay-noobs', 'pgrelay-busypoll'):
                if p50.get(t) is not None:
                    add = p50[t] - p50['direct']
                    notes.append(f'{t}: p50 added over direct {fmt(add * 1000, 1)} us, pgbouncer {fmt(base * 1000, 1)} us'
                                 + (f' (x{fmt(add / base, 2)})' if base > 0 else ''))
        if 'pgrelay-noobs' in stats and 'pgrelay' in stats:
            q = paired('pgrelay-noobs', 'pgrelay')[0]
            if q:
                notes.append(f'observability on/off TPS: x{fmt(1 / q, 3)} ({fmt((1 / q - 1) * 100, 1)} %; target: '
                             f'no worse than -3 %), paired over rounds')
        for row in table:
            if row['errs']:
                notes.append(f'{row["target"]} first errors: ' + ' | '.join(e[:160] for e in row['errs'][:3]))
        for t, why in na.items():
            notes.append(f'{t}: not run ({why})')
        curves = pct_curves(by_t)
        if curves:
            notes.append('latency ms, median over rounds: ' + '; '.join(
                f'{t} ' + ' '.join(f'{k}={fmt(c[k], 3)}' for k in ('p50', 'p90', 'p99', 'p99.9', 'p99.99', 'max') if k in c)
                for t, c in curves.items()))
        if len(args0) > 1:
            notes.append('note: targets ran different pgbench args here (see above); pgbouncer 1.18 cannot run -M prepared '
                         'in transaction mode, so its row is -M extended.')
        for n in notes:
            txt.append('  ' + n)
        md.append('')
        for n in notes:
            md.append(f'- {n}')
    chart = write_latency_svg(d, rows, workloads, targets)
    if chart:
        txt.append('')
        txt.append(f'latency percentile chart: {chart}')
        md = ['![latency percentiles per workload and target](latency.svg)', '',
              '`latency.svg`: per workload, the latency of each target at p1 ... p99.99 and max (log-log; '
              'thin lines are single rounds, thick lines the median over rounds).', ''] + md
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
