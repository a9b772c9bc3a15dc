#!/usr/bin/env python3
"""Availability after a crash: no faults except one node killed (never restarted)
at a random time after the cluster is stable; measure, per shard the victim was
serving, the time until another node serves it.  Also measures the pauses of healthy
shards (served at the kill by another node): how many lose service meanwhile and the
longest pause (service is sampled every ms from the kill on).

usage: python3 avail.py DMAX VARIANT NSEEDS [L ETLO ETHI HB [DBOUND]] [--who leader|follower]
                        [--N 3|5]"""
import statistics
import sys

import leasesim as ls


TIMING = {}


def one(seed, N, who, dmax, variant='base', loss=0.0):
    cfg = ls.Cfg(T=9000, variant=ls.VARIANTS[variant], **TIMING)
    res = {}

    def faults(sim):
        sim.loss, sim.dup, sim.dmin, sim.dmax = loss, 0.0, 1, dmax
        sim.profile = {}
        r = sim.rng
        for n in sim.nodes:
            n.rate = r.uniform(1 - cfg.drift, 1 + cfg.drift)
        tc = 4000 + r.randrange(1000)

        def kill(s):
            leaders = [n for n in s.nodes if n.role == 'L']
            ld = leaders[0].id if leaders else 0
            if who == 'leader':
                x = ld
            else:
                x = r.choice([i for i in range(s.N) if i != ld])
            n = s.nodes[x]
            res['victim'] = x
            res['tc'] = s.now
            res['shards'] = set(n.served) if (n.clock() < n.lease_exp) else set()
            res['healthy'] = {sh for m in s.nodes if m.id != x and m.clock() < m.lease_exp for sh in m.served}
            s.apply_fault('crash', (x,))
        sim.faults.append((tc, 'call', (kill,)))
        # sample every ms for 2.5 s after the kill, so that a lease lapsing between two events
        # is seen when it lapses (the observer otherwise runs only when something happens)
        noop = lambda s: None
        for t in range(tc + 1, tc + 2500):
            sim.faults.append((t, 'call', (noop,)))

    sim = ls.Sim(seed, cfg, N=N, faults=faults)
    back = {}
    gap_start = {}
    longest = {}

    def obs(s):
        if 'tc' not in res:
            return
        served = set()
        for n in s.serving():
            served |= n.served
        for sh in res['shards']:
            if sh not in back and sh in served:
                back[sh] = s.now - res['tc']
        for sh in res['healthy']:
            if sh not in served:
                gap_start.setdefault(sh, s.now)
            elif sh in gap_start:
                d = s.now - gap_start.pop(sh)
                longest[sh] = max(longest.get(sh, 0), d)
    r = sim.run(observer=obs)
    assert r is None, r
    for sh, t0 in gap_start.items():                  # still unserved at the end
        longest[sh] = max(longest.get(sh, 0), sim.now - t0)
    times = [back.get(sh, None) for sh in res['shards']]
    return times, len(longest), max(longest.values(), default=0)


def main():
    argv = sys.argv[1:]
    whos, Ns = ('follower', 'leader'), (3, 5)
    if '--who' in argv:
        i = argv.index('--who')
        whos = (argv[i + 1],)
        del argv[i:i + 2]
    if '--N' in argv:
        i = argv.index('--N')
        Ns = (int(argv[i + 1]),)
        del argv[i:i + 2]
    dmax = int(argv[0]) if len(argv) > 0 else 5
    variant = argv[1] if len(argv) > 1 else 'base'
    nseeds = int(argv[2]) if len(argv) > 2 else 100
    if len(argv) > 3:     # L et_lo et_hi hb
        L, lo, hi, hb = map(float, argv[3:7])
        TIMING.update(L=L, renew=L / 4, et_lo=lo, et_hi=hi, hb=hb)
    if len(argv) > 7:
        TIMING.update(dbound=float(argv[7]))
    print('timing', TIMING or 'L=500 et=150-300 hb=50')
    for N in Ns:
        for who in whos:
            allt = []
            missing = 0
            hg = 0
            hmax = []
            for seed in range(nseeds):
                times, g, m = one(seed, N, who, dmax, variant)
                hg += g
                hmax.append(m)
                for t in times:
                    if t is None:
                        missing += 1
                    else:
                        allt.append(t)
            allt.sort()
            q = lambda p: allt[min(len(allt) - 1, int(p * len(allt)))]
            print('N=%d %-8s delay 1-%dms %s: shards=%d median %d ms p10 %d p90 %d max %d; never back %d; '
                  'healthy shards interrupted %d (in %d of %d runs), longest healthy pause %d ms' % (
                      N, who, dmax, variant, len(allt), statistics.median(allt), q(0.1), q(0.9), allt[-1],
                      missing, hg, sum(1 for m in hmax if m), nseeds, max(hmax)), flush=True)


if __name__ == '__main__':
    main()
