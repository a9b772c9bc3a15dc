#!/usr/bin/env python3
"""Directed schedules for the receipt rule (a new leader waits L*(1+rho)/(1-rho) from the latest
receipt, over every voter that granted its vote, of an AppendEntries from a lower-term leader).
Three nodes: A the leader, B and C followers.  Every fault used is in the model's fault space
(message loss on chosen links and kinds, a partition, a crash/restart); delays are 1-2 ms.

  partial  A's AppendEntries/heartbeats to C are lost from T1 (C still renews: its RenewLease
           and A's grants pass), and C's RequestVotes to A are lost.  C times out and keeps
           asking; B refuses while A's heartbeats reach it (openraft's vote lease).  At T3 = T1
           + 600 ms A is isolated (it still serves until its lease ends).  B's lease ends, C
           wins with votes {C, B}: C last heard from A at T1, B at T3.
           Breaks: receipt_min and receipt_self_only (they start from T1).
  restart  as partial, but at T3 B also crashes and restarts 10 ms later: B's report must be
           its own start.  Breaks: receipt_restart_never ("never"), receipt_stale_restart
           (the receipt it wrote with its last log write).
  lead     A's AppendEntries/heartbeats and RenewLeases to C are lost from T1 (RequestVote
           replies pass).  C times out; B refuses, A (its vote lease long over) steps down and
           votes for C: V = {C, A}, and A was the leader itself until that moment.
           Breaks: receipt_no_lead (a former leader reports its last receipt from another
           leader instead of its own leadership).
  drift    partial with every clock at the bound (rho = 0.10 = the protocol's bound): A's clock
           slow (1-rho), B's and C's fast (1+rho).  Checks the conversion of a voter's elapsed
           time e: c_recv - e is safe (tight), crediting e*(1+rho)/(1-rho) is not.
           Breaks: receipt_drift_short.

usage: python3 scenario_receipt.py CASE [variant] [nseeds] [trace-seed]"""
import sys

import leasesim as ls

CASES = ('partial', 'restart', 'lead', 'drift')


def build(case, seed, variant, tracing=False):
    rho = 0.10
    kw = dict(T=5000, variant=ls.VARIANTS[variant])
    if case == 'drift':
        kw.update(drift=rho, dbound=rho)
    cfg = ls.Cfg(**kw)

    def faults(sim):
        sim.loss, sim.dup, sim.dmin, sim.dmax = 0.0, 0.0, 1, 2
        sim.profile = {'scenario': case}
        for n in sim.nodes:
            n.rate = 1.0
        N = sim.N
        T1 = 1500 + sim.rng.randrange(200)
        T3 = T1 + 600 + sim.rng.randrange(int(cfg.renew))    # random phase against renewals

        def iso(x):
            return frozenset([(x, p) for p in range(N) if p != x] + [(p, x) for p in range(N) if p != x])

        def start(s):
            ld = [n for n in s.nodes if n.role == 'L']
            if not ld:
                s.log_ev('scenario: no leader at T1, not applicable')
                return
            A = ld[0].id
            B, C = [i for i in range(N) if i != A]
            s.A, s.B, s.C = A, B, C
            s.log_ev('scenario %s: A=n%d (leader) B=n%d C=n%d' % (case, A, B, C))
            if case == 'drift':
                s.nodes[A].set_rate(1 - rho)
                s.nodes[B].set_rate(1 + rho)
                s.nodes[C].set_rate(1 + rho)
            if case == 'lead':
                s.drop_filter = lambda s_, src, dst, m: (src == A and dst == C and m[0] in ('AE', 'HB', 'RL'))
            else:
                s.drop_filter = lambda s_, src, dst, m: (
                    (src == A and dst == C and m[0] in ('AE', 'HB', 'AER', 'HBR')) or
                    (src == C and dst == A and m[0] == 'RV'))
            extra = []
            if case != 'lead':
                extra.append((T3, 'part_on', (1, iso(A), 'isolate A=n%d' % A)))
            if case == 'restart':
                extra += [(T3, 'crash', (B,)), (T3 + 10, 'restart', (B,))]
            s.faults[s.fi:] = sorted(s.faults[s.fi:] + extra, key=lambda f: f[0])

        sim.faults.append((T1, 'call', (start,)))

    return ls.Sim(seed, cfg, N=3, tracing=tracing, faults=faults)


def run(case, variant, nseeds):
    fails = 0
    first = None
    for seed in range(nseeds):
        sim = build(case, seed, variant)
        r = sim.run()
        if r:
            fails += 1
            if first is None:
                first = (seed, r)
    return fails, first


def main():
    case = sys.argv[1] if len(sys.argv) > 1 else 'partial'
    variant = sys.argv[2] if len(sys.argv) > 2 else 'amended_receipt'
    nseeds = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    if len(sys.argv) > 4:
        sim = build(case, int(sys.argv[4]), variant, tracing=True)
        r = sim.run()
        for t, s in sim.trace:
            if t >= 1400:
                print('%6d %s' % (t, s))
        print('result', r)
        return
    fails, first = run(case, variant, nseeds)
    print('scenario %s variant %s: %d/%d seeds violate%s' % (
        case, variant, fails, nseeds, (' (first: seed %d t=%d %s)' % (first[0], first[1][0], first[1][1]))
        if first else ''))


if __name__ == '__main__':
    main()
