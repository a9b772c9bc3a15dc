#!/usr/bin/env python3
"""Randomized model checker for the clusterfunk shard-lease / failover protocol
(DESIGN.md rules 3-6 and "Protocol detail").

Discrete real time in 1 ms steps, event driven (we jump to the next ms at which
anything can happen: a message delivery, a fault, or a timer that is due on some
node's drifting local clock).  The single-owner invariant is checked after every
ms at which anything happened; between such instants the set of serving nodes can
only shrink (leases expire), so this is equivalent to checking every ms.

Usage:  python3 leasesim.py --seeds 0:1000 [--variant base] [--trace SEED]

Additions for the receipt rule (tests/model/README.md, RESULTS.md):
- openraft 0.9's vote lease (variant flag 'vote_lease'): a node whose vote is committed (it
  follows a known leader, or leads) refuses every RequestVote, without adopting its term, until
  et_hi (openraft: election_timeout_max) has passed on its own clock since the vote was last
  touched (each accepted AppendEntries/heartbeat, becoming leader); a follower with a committed
  vote starts an election only after et_hi + a random election timeout.  After a restart
  openraft 0.9.25 sets the vote's time to the process start (storage/helper.rs), so a restarted
  node whose stored vote was committed refuses votes for et_hi after its start; flag
  'vl_free_restart' models a restart that grants at once instead.
- the receipt rule (flag 'receipt_wait'): every node records the local time of every
  AppendEntries/heartbeat it receives (before raft looks at it) and of every one it sends as
  leader; after a restart it starts from its own start time.  A vote grant carries the time
  elapsed since then on the voter's clock, e.  The new leader notes, per granting voter
  (itself included, e = elapsed at its election start), c_recv - e, where c_recv is its own
  clock when the grant arrived, and waits until
      min(election, max over granting voters of (c_recv - e)) + L*(1+rho)/(1-rho)
  on its own clock before it marks a node down (and still L*(1+rho)/(1-rho) after its own last
  grant to that node).
"""
import argparse
import heapq
import math
import random
import sys
import time

S = 12            # shards
INF = float('inf')


class Cfg:
    def __init__(self, **kw):
        self.L = 500.0              # lease length (local ms)
        self.renew = 125.0          # renewal period L/4
        self.hb = 50.0              # heartbeat / replication period
        self.et_lo, self.et_hi = 150.0, 300.0
        self.drift = 0.05           # actual clock rate error bound (each clock)
        self.dbound = 0.10          # the protocol's drift bound, wait L*(1+dbound)
        self.T = 30000              # simulated ms
        self.variant = set()        # see VARIANTS
        self.harsh = False
        for k, v in kw.items():
            setattr(self, k, v)


AMENDED_VL = frozenset({'fixA', 'renew_on_new_leader', 'drift_ratio', 'vote_lease', 'renew_on_epoch'})

VARIANTS = {
    'base': set(),
    # weakened variants (should fail)
    'no_md_rule': {'no_uncommitted_md_rule'},
    'no_elect_wait': {'no_election_wait'},
    'no_drift': {'no_drift_margin'},
    'stale_round': {'round_before_arrival'},
    # strengthened variants (proposed amendments)
    'fixA': {'fixA'},
    'fixA_no_md_rule': {'fixA', 'no_uncommitted_md_rule'},
    # drift margin L*(1+rho)/(1-rho) instead of L*(1+rho)
    'drift_ratio': {'drift_ratio'},
    'renew_now': {'renew_on_new_leader'},
    'fixA_renew_now': {'fixA', 'renew_on_new_leader'},
    'amended': {'fixA', 'renew_on_new_leader', 'drift_ratio'},
    # openraft 0.9 as the code runs it, on top of the amended protocol: the vote lease (and
    # openraft's order of checks in a vote request), and a node renews at once when it applies a
    # new allocation epoch (guide: concepts, "Leases")
    'vote_lease': {'vote_lease'},
    'amended_vl': AMENDED_VL,
    # the receipt rule: the new leader's wait starts from the latest receipt, over every voter
    # that granted its vote, of an AppendEntries from a lower-term leader
    'receipt_wait': {'receipt_wait'},
    'amended_receipt': AMENDED_VL | {'receipt_wait'},
    'amended_receipt_novl': (AMENDED_VL - {'vote_lease'}) | {'receipt_wait'},
    'amended_receipt_freerestart': AMENDED_VL | {'receipt_wait', 'vl_free_restart'},
    # weakened receipt rules (should fail)
    'receipt_min': AMENDED_VL | {'receipt_wait', 'receipt_min'},        # earliest receipt, not latest
    'receipt_self_only': AMENDED_VL | {'receipt_wait', 'receipt_self_only'},   # own receipt only
    # a restarted voter reports the receipt it persisted with its last log write
    'receipt_stale_restart': AMENDED_VL | {'receipt_wait', 'receipt_stale_restart'},
    # a restarted voter that has not heard from a leader since reports "never" (ignored)
    'receipt_restart_never': AMENDED_VL | {'receipt_wait', 'receipt_restart_never'},
    # a former leader reports its last receipt from another leader, forgetting its own leadership
    'receipt_no_lead': AMENDED_VL | {'receipt_wait', 'receipt_no_lead'},
    # credits the voter's elapsed time e as e*(1+rho)/(1-rho) instead of e
    'receipt_drift_short': AMENDED_VL | {'receipt_wait', 'receipt_drift_short'},
}


# ---------------------------------------------------------------- state machine
class State:
    __slots__ = ('epoch', 'owner', 'pending', 'draining', 'down', 'members')

    def __init__(self, members):
        self.members = tuple(members)
        self.epoch = 0
        self.owner = [None] * S
        self.pending = {}           # s -> (from, to, pending_epoch)
        self.draining = set()
        self.down = set()

    def apply(self, cmd):
        k = cmd[0]
        if k == 'init':
            for s in range(S):
                self.owner[s] = self.members[s % len(self.members)]
            self.epoch = 1
        elif k == 'noop':
            pass
        elif k == 'drain':
            X, b = cmd[1], cmd[2]
            if b and X not in self.draining:
                self.draining.add(X)
                self.alloc()
            elif not b and X in self.draining:
                self.draining.discard(X)
                self.alloc()
        elif k == 'md':
            if cmd[1] not in self.down:
                self.down.add(cmd[1])
                self.alloc()
        elif k == 'mu':
            if cmd[1] in self.down:
                self.down.discard(cmd[1])
                self.alloc()
        elif k == 'rel':
            s, pe, X = cmd[1], cmd[2], cmd[3]
            p = self.pending.get(s)
            if p and p[0] == X and p[2] == pe:
                self.owner[s] = p[1]
                del self.pending[s]
        else:
            raise ValueError(cmd)

    def alloc(self):
        if self.epoch == 0:
            return
        elig = [m for m in self.members if m not in self.draining and m not in self.down]
        target = [(self.pending[s][1] if s in self.pending else self.owner[s]) for s in range(S)]
        if elig:
            cnt = {m: 0 for m in elig}
            orphans = []
            for s in range(S):
                if target[s] in cnt:
                    cnt[target[s]] += 1
                else:
                    orphans.append(s)
            for s in orphans:
                m = min(elig, key=lambda m: (cnt[m], m))
                target[s] = m
                cnt[m] += 1
            while True:
                mx = max(elig, key=lambda m: (cnt[m], -m))
                mn = min(elig, key=lambda m: (cnt[m], m))
                if cnt[mx] - cnt[mn] <= 1:
                    break
                s = max(s for s in range(S) if target[s] == mx)
                target[s] = mn
                cnt[mx] -= 1
                cnt[mn] += 1
        newe = self.epoch + 1
        for s in range(S):
            cur, d = self.owner[s], target[s]
            if d == cur:
                self.pending.pop(s, None)
            elif cur in self.down:          # old owner's lease known expired: direct move
                self.owner[s] = d
                self.pending.pop(s, None)
            else:                           # planned move: needs Released
                p = self.pending.get(s)
                if not (p and p[1] == d):
                    self.pending[s] = (cur, d, newe)
        self.epoch = newe

    def served_by(self, X):
        return frozenset(s for s in range(S) if self.owner[s] == X and s not in self.pending)


# ---------------------------------------------------------------- node
class Node:
    def __init__(self, sim, i):
        self.sim = sim
        self.id = i
        # persistent
        self.term = 0
        self.voted = None
        self.log = [(0, ('sentinel',)), (0, ('init',))]
        # clock
        self.rate = 1.0
        self.cbase = 0.0
        self.tbase = 0
        # process status
        self.up = True
        self.paused = False
        self.inbox = []
        self.incarnation = 0
        # openraft's stored vote is "committed" once a leader is known (persisted with the vote)
        self.vc = False
        # receipt written with the last log write (only the 'receipt_stale_restart' bug reads it)
        self.persisted_receipt = 0.0
        self.reset_volatile()

    # ---- clock
    def clock(self, t=None):
        if t is None:
            t = self.sim.now
        return self.cbase + self.rate * (t - self.tbase)

    def set_rate(self, r):
        self.cbase = self.clock()
        self.tbase = self.sim.now
        self.rate = r

    def reset_volatile(self):
        self.role = 'F'
        self.leader_id = None
        self.commit = 0
        self.applied = 0
        self.state = State(self.sim.members)
        self.served = frozenset()
        self.votes = set()
        self.lease_exp = -INF
        self.outstanding = {}
        self.reqid = 0
        c = self.clock()
        v = self.sim.cfg.variant
        # receipt rule: latest local time at which this process received an AppendEntries /
        # heartbeat (or sent one as leader); a (re)started process starts from its own start
        if self.incarnation and 'receipt_stale_restart' in v:
            self.last_receipt = self.persisted_receipt
        elif self.incarnation and 'receipt_restart_never' in v:
            self.last_receipt = -INF
        else:
            self.last_receipt = c
        self.vote_rec = {}          # candidate/leader: voter -> c_recv - e (own clock)
        self.rbase = None
        # openraft vote lease: the vote's time is the process start (committed vote survives)
        lease_on_start = 'vote_lease' in v and self.vc and 'vl_free_restart' not in v
        if 'vl_free_restart' in v:
            self.vc = False
        self.vote_utime = c
        self.election_deadline = c + (self.sim.cfg.et_hi if lease_on_start else 0.0) + \
            self.sim.rng.uniform(self.sim.cfg.et_lo, self.sim.cfg.et_hi)
        self.renew_deadline = c + self.sim.rng.uniform(0, self.sim.cfg.renew)
        self.release_deadline = c + 100.0
        self.clear_leader()

    def clear_leader(self):
        self.next_idx = {}
        self.match_idx = {}
        self.noop_idx = None
        self.elec_local = None
        self.hb_deadline = INF
        self.last_grant = {}
        self.md_prop = set()
        self.renewals = []          # (seq, X, reqid, epoch)
        self.arr_seq = 0
        self.rounds = {}            # r -> [start_seq, acks]
        self.round_ctr = 0
        self.last_round_seq = -1
        self.need_round = False

    def last(self):
        return len(self.log) - 1

    def lterm(self, i):
        return self.log[i][0]

    # ---- helpers
    def maj(self):
        return self.sim.N // 2 + 1

    def send(self, dst, msg):
        self.sim.send(self.id, dst, msg)

    def others(self):
        return [p for p in range(self.sim.N) if p != self.id]

    def log_ev(self, s):
        self.sim.log_ev('n%d %s' % (self.id, s))

    def step_down(self, term):
        if term > self.term:
            self.term = term
            self.voted = None
            self.leader_id = None
            self.vc = False
            self.vote_utime = self.clock()
        if self.role == 'L':
            self.log_ev('steps down (term %d)' % self.term)
            self.clear_leader()
        self.role = 'F'

    def reset_election_timer(self, lease=False):
        # openraft 0.9: with a committed vote (a leader is known) the next election comes only
        # after leader_lease (= election_timeout_max) + the election timeout
        extra = self.sim.cfg.et_hi if (lease and 'vote_lease' in self.sim.cfg.variant) else 0.0
        self.election_deadline = self.clock() + extra + \
            self.sim.rng.uniform(self.sim.cfg.et_lo, self.sim.cfg.et_hi)

    def vote_lease_holds(self):
        """openraft 0.9 handle_vote_req: a committed vote younger than the lease refuses."""
        return ('vote_lease' in self.sim.cfg.variant and self.vc and
                self.clock() - self.vote_utime <= self.sim.cfg.et_hi)

    # ---- receipt rule
    def note_receipt(self):
        self.last_receipt = self.clock()

    def receipt_conv(self, c_recv, e):
        """Upper bound, on this node's clock, of a voter's last receipt: the grant arrived at
        c_recv (own clock); the voter measured e on its clock since its receipt."""
        if e is None or e == INF:
            return -INF
        cfg = self.sim.cfg
        if 'receipt_drift_short' in cfg.variant:       # BUG variant: over-credits e
            return c_recv - e * (1 + cfg.dbound) / (1 - cfg.dbound)
        return c_recv - e

    def update_rbase(self):
        v = self.sim.cfg.variant
        vals = self.vote_rec
        if 'receipt_self_only' in v:                   # BUG variant
            r = vals.get(self.id, -INF)
        elif 'receipt_min' in v:                       # BUG variant
            r = min(vals.values())
        else:
            r = max(vals.values())
        # never later than the rule it replaces (the election time is also a valid bound)
        self.rbase = min(r, self.elec_local)

    def elec_base(self):
        if 'receipt_wait' in self.sim.cfg.variant:
            return self.rbase
        return self.elec_local

    # ---- timers
    def next_timer_local(self):
        d = min(self.renew_deadline, self.release_deadline)
        if self.role == 'L':
            d = min(d, self.hb_deadline, self.md_due())
        else:
            d = min(d, self.election_deadline)
        return d

    def on_timers(self):
        c = self.clock()
        cfg = self.sim.cfg
        if self.role != 'L' and c >= self.election_deadline:
            self.start_election()
        if self.role == 'L' and c >= self.hb_deadline:
            self.hb_deadline = c + cfg.hb
            for p in self.others():
                self.send_ae(p)
        if c >= self.renew_deadline:
            self.renew_deadline = c + cfg.renew
            if self.leader_id is not None:
                self.reqid += 1
                self.outstanding[self.reqid] = c
                self.send(self.leader_id, ('RL', self.id, self.reqid, self.state.epoch, self.incarnation))
            for k in [k for k, t0 in self.outstanding.items() if t0 + cfg.L < c]:
                del self.outstanding[k]
        if c >= self.release_deadline:
            self.release_deadline = c + 100.0
            self.propose_releases()
        if self.role == 'L':
            self.md_check()

    def propose_releases(self):
        for s, p in self.state.pending.items():
            if p[0] == self.id:
                self.propose(('rel', s, p[2], self.id))

    def propose(self, cmd):
        if self.role == 'L':
            self.append(cmd)
        elif self.leader_id is not None:
            self.send(self.leader_id, ('PROP', cmd))

    def append(self, cmd):
        self.log.append((self.term, cmd))
        self.match_idx[self.id] = self.last()
        if cmd[0] in ('md', 'mu', 'drain'):
            self.log_ev('leader appends %s at idx %d term %d' % (cmd, self.last(), self.term))
        for p in self.others():
            self.send_ae(p)
        self.advance_commit()

    # ---- election
    def start_election(self):
        self.term += 1
        self.voted = self.id
        self.role = 'C'
        self.leader_id = None
        self.votes = {self.id}
        c = self.clock()
        self.vote_rec = {self.id: self.receipt_conv(c, c - self.last_receipt)}
        self.vc = False
        self.vote_utime = c
        self.reset_election_timer()
        for p in self.others():
            self.send(p, ('RV', self.term, self.id, self.last(), self.lterm(self.last())))

    def become_leader(self):
        self.role = 'L'
        self.leader_id = self.id
        self.clear_leader()
        self.log.append((self.term, ('noop',)))
        self.noop_idx = self.last()
        for p in self.others():
            self.next_idx[p] = self.noop_idx
            self.match_idx[p] = 0
        self.match_idx[self.id] = self.last()
        self.elec_local = self.clock()
        self.vc = True
        self.vote_utime = self.elec_local
        self.update_rbase()
        self.hb_deadline = self.elec_local + self.sim.cfg.hb
        if 'renew_on_new_leader' in self.sim.cfg.variant:
            self.renew_deadline = min(self.renew_deadline, self.elec_local)
        self.log_ev('becomes leader term %d (log last %d, commit %d, wait from local %.1f, election %.1f, '
                    'uncommitted: %s)' % (
            self.term, self.last(), self.commit, self.elec_base(), self.elec_local,
            [(i, self.log[i]) for i in range(self.commit + 1, self.last()) if self.log[i][1][0] != 'noop']))
        self.sim.stats['elections'] += 1
        for p in self.others():
            self.send_ae(p)

    # ---- replication
    def send_ae(self, p):
        ni = self.next_idx[p]
        prev = ni - 1
        ents = tuple(self.log[ni:ni + 64])
        if 'receipt_no_lead' not in self.sim.cfg.variant:
            self.last_receipt = self.clock()       # sending as leader: contact with the leader
        self.send(p, ('AE', self.term, self.id, prev, self.lterm(prev), ents, self.commit))

    def advance_commit(self):
        old = self.commit
        for n in range(self.last(), self.commit, -1):
            if self.lterm(n) != self.term:
                break
            if sum(1 for m in self.match_idx.values() if m >= n) >= self.maj():
                self.commit = n
                break
        if self.commit > old:
            self.apply_committed()
            if self.renewals:
                self.need_round = True
            for p in self.others():
                self.send_ae(p)

    def apply_committed(self):
        while self.applied < self.commit:
            self.applied += 1
            ent = self.log[self.applied]
            self.sim.check_applied(self.id, self.applied, ent)
            cmd = ent[1]
            e0 = self.state.epoch
            self.state.apply(cmd)
            if self.state.epoch != e0 and 'renew_on_epoch' in self.sim.cfg.variant:
                self.renew_deadline = min(self.renew_deadline, self.clock())
            k = cmd[0]
            if k in ('md', 'mu', 'drain', 'init') or (k == 'rel' and self.sim.tracing):
                self.log_ev('applies idx %d %s -> epoch %d' % (self.applied, cmd, self.state.epoch))
            if self.role == 'L' and k == 'mu':
                X = cmd[1]
                self.md_prop.discard(X)
                self.last_grant[X] = self.clock()
        new = self.state.served_by(self.id)
        if new != self.served:
            self.served = new
        if any(p[0] == self.id for p in self.state.pending.values()):
            self.release_deadline = min(self.release_deadline, self.clock())

    # ---- lease (leader side)
    def md_wait(self):
        cfg = self.sim.cfg
        if 'no_drift_margin' in cfg.variant:
            return cfg.L
        if 'drift_ratio' in cfg.variant:
            return cfg.L * (1 + cfg.dbound) / (1 - cfg.dbound)
        return cfg.L * (1 + cfg.dbound)

    def md_due(self):
        if self.role != 'L':
            return INF
        W = self.md_wait()
        ew = 0.0 if 'no_election_wait' in self.sim.cfg.variant else W
        best = INF
        for X in range(self.sim.N):
            if X == self.id or X in self.state.down or X in self.md_prop:
                continue
            d = max(self.elec_base() + ew, self.last_grant.get(X, -INF) + W)
            if d < best:
                best = d
        return best

    def uncommitted_has(self, kind, X):
        for i in range(self.commit + 1, len(self.log)):
            c = self.log[i][1]
            if c[0] == kind and c[1] == X:
                return True
        return False

    def md_check(self):
        c = self.clock()
        W = self.md_wait()
        ew = 0.0 if 'no_election_wait' in self.sim.cfg.variant else W
        for X in range(self.sim.N):
            if X == self.id or X in self.state.down or X in self.md_prop:
                continue
            if c >= self.elec_base() + ew and c >= self.last_grant.get(X, -INF) + W:
                self.md_prop.add(X)
                if not self.uncommitted_has('md', X):
                    self.append(('md', X))

    def on_renew(self, X, reqid, epoch, inc):
        self.renewals.append((self.arr_seq, X, reqid, epoch, inc))
        self.arr_seq += 1
        self.need_round = True

    def maybe_start_round(self):
        if self.role != 'L' or not self.need_round:
            return
        self.need_round = False
        self.round_ctr += 1
        r = self.round_ctr
        self.rounds[r] = [self.arr_seq, {self.id}]
        if 'receipt_no_lead' not in self.sim.cfg.variant:
            self.last_receipt = self.clock()
        for p in self.others():
            self.send(p, ('HB', self.term, self.id, r))

    def on_round_ack(self, r, src):
        rd = self.rounds.get(r)
        if rd is None:
            return
        rd[1].add(src)
        if len(rd[1]) >= self.maj():
            start_seq = rd[0]
            if 'round_before_arrival' in self.sim.cfg.variant:
                start_seq = self.arr_seq     # BUG variant: also answer requests that arrived mid-round
            for k in [k for k in self.rounds if k <= r]:
                del self.rounds[k]
            keep = []
            for req in self.renewals:
                if req[0] < start_seq:
                    if self.decide(req) == 'wait':
                        keep.append(req)
                else:
                    keep.append(req)
            self.renewals = keep

    def decide(self, req):
        _, X, reqid, epoch, inc = req
        v = self.sim.cfg.variant
        st = self.state
        if 'fixA' in v and self.commit < self.noop_idx:
            return 'wait'
        if epoch != st.epoch:
            return 'refuse'
        if X in st.down:
            if not self.uncommitted_has('mu', X):
                self.append(('mu', X))
            return 'refuse'
        if 'no_uncommitted_md_rule' not in v and self.uncommitted_has('md', X):
            return 'refuse'
        if X in self.md_prop:
            return 'refuse'
        self.last_grant[X] = self.clock()
        self.send(X, ('GR', reqid, epoch, inc, self.term))
        if self.sim.tracing:
            self.log_ev('grants lease to n%d (req %d, epoch %d)' % (X, reqid, epoch))
        return 'grant'

    def learn_leader(self, lid):
        if lid != self.leader_id:
            self.leader_id = lid
            if 'renew_on_new_leader' in self.sim.cfg.variant:
                self.renew_deadline = min(self.renew_deadline, self.clock())

    # ---- message handling
    def handle(self, src, m):
        k = m[0]
        if k == 'AE':
            _, term, lid, prev, pterm, ents, lcommit = m
            self.note_receipt()         # recorded before raft looks at it
            if term < self.term:
                self.send(src, ('AER', self.term, False, 0))
                return
            if term > self.term or self.role != 'F':
                self.step_down(term)
            self.learn_leader(lid)
            self.vc = True
            self.vote_utime = self.clock()
            self.reset_election_timer(lease=True)
            if prev > self.last() or self.lterm(prev) != pterm:
                self.send(src, ('AER', self.term, False, min(prev, self.last() + 1)))
                return
            i = prev
            for e in ents:
                i += 1
                if i <= self.last():
                    if self.log[i][0] != e[0]:
                        if i <= self.commit:
                            self.sim.fail('RAFT: truncating committed entry at n%d idx %d' % (self.id, i))
                        del self.log[i:]
                        self.log.append(e)
                else:
                    self.log.append(e)
            if ents:
                self.persisted_receipt = self.last_receipt   # written with the log (bug variant)
            lastnew = prev + len(ents)
            nc = min(lcommit, lastnew)
            if nc > self.commit:
                self.commit = nc
                self.apply_committed()
            self.send(src, ('AER', self.term, True, lastnew))
        elif k == 'AER':
            _, term, ok, x = m
            if term > self.term:
                self.step_down(term)
                return
            if self.role != 'L' or term != self.term:
                return
            if ok:
                if x > self.match_idx[src]:
                    self.match_idx[src] = x
                self.next_idx[src] = max(self.next_idx[src], x + 1)
                self.advance_commit()
            else:
                self.next_idx[src] = max(self.match_idx[src] + 1, min(self.next_idx[src] - 1, x if x > 0 else 1))
                self.send_ae(src)
        elif k == 'RV':
            _, term, cand, lidx, lterm = m
            mylt = self.lterm(self.last())
            if self.vote_lease_holds():
                # openraft 0.9: leader lease not expired: refuse, keep term and vote
                self.send(src, ('RVR', self.term, False, None))
                return
            if 'vote_lease' in self.sim.cfg.variant and not (
                    lterm > mylt or (lterm == mylt and lidx >= self.last())):
                # openraft 0.9 checks the log before it looks at the term: a candidate with a
                # shorter log is refused without deposing anyone
                self.send(src, ('RVR', self.term, False, None))
                return
            if term > self.term:
                self.step_down(term)
            ok = (term == self.term and self.voted in (None, cand) and
                  (lterm > mylt or (lterm == mylt and lidx >= self.last())))
            el = None
            if ok:
                self.voted = cand
                self.vc = False
                self.vote_utime = self.clock()
                self.reset_election_timer()
                # elapsed on this node's clock since its latest receipt (or its own start)
                el = self.clock() - self.last_receipt
            self.send(src, ('RVR', self.term, ok, el))
        elif k == 'RVR':
            _, term, ok, el = m
            if term > self.term:
                self.step_down(term)
                return
            if term == self.term and ok and self.role in ('C', 'L'):
                r = self.receipt_conv(self.clock(), el)
                self.vote_rec[src] = max(r, self.vote_rec.get(src, -INF))
                if self.role == 'L':
                    self.update_rbase()      # a late grant can only move the wait later
            if self.role == 'C' and term == self.term and ok:
                self.votes.add(src)
                if len(self.votes) >= self.maj():
                    self.become_leader()
        elif k == 'HB':
            _, term, lid, r = m
            self.note_receipt()         # recorded before raft looks at it
            if term < self.term:
                self.send(src, ('HBR', self.term, r))
                return
            if term > self.term or self.role != 'F':
                self.step_down(term)
            self.learn_leader(lid)
            self.vc = True
            self.vote_utime = self.clock()
            self.reset_election_timer(lease=True)
            self.send(src, ('HBR', self.term, r))
        elif k == 'HBR':
            _, term, r = m
            if term > self.term:
                self.step_down(term)
                return
            if self.role == 'L' and term == self.term:
                self.on_round_ack(r, src)
        elif k == 'RL':
            _, X, reqid, epoch, inc = m
            if self.role == 'L':
                self.on_renew(X, reqid, epoch, inc)
        elif k == 'GR':
            _, reqid, epoch, inc, gterm = m
            if inc != self.incarnation:
                return
            t0 = self.outstanding.pop(reqid, None)
            if t0 is not None:
                exp = t0 + self.sim.cfg.L
                if exp > self.lease_exp:
                    self.lease_exp = exp
        elif k == 'PROP':
            if self.role == 'L':
                self.append(m[1])
        else:
            raise ValueError(m)


# ---------------------------------------------------------------- simulation
class Sim:
    def __init__(self, seed, cfg, N=None, tracing=False, faults=None):
        self.seed = seed
        self.cfg = cfg
        self.rng = random.Random(seed)
        rng = self.rng
        self.N = N if N is not None else rng.choice([3, 5])
        self.members = list(range(self.N))
        self.now = 0
        self.tracing = tracing
        self.trace = []
        self.msgq = []
        self.mseq = 0
        self.stats = {'elections': 0, 'msgs': 0}
        self.failed = None
        self.applied_global = {}
        self.partitions = {}
        self.blocked = set()
        self.nodes = [Node(self, i) for i in range(self.N)]
        self.serve_start = {}
        self.drop_filter = None
        self.delay_fn = None
        self.ae_loss = 0.0
        self.faults = []
        if faults is None:
            self.gen_faults()
        else:
            faults(self)
        self.faults.sort(key=lambda f: f[0])
        self.fi = 0

    # ---- fault generation
    def gen_faults(self):
        rng = self.rng
        cfg = self.cfg
        T = cfg.T
        self.loss = rng.choice([0, 0.01, 0.05, 0.15, 0.3])
        self.dup = rng.choice([0, 0, 0.02, 0.1])
        self.dmin, self.dmax = 1, rng.choice([3, 10, 50, 50])
        part_rate = rng.choice([0, 0.3, 1, 3])
        pause_rate = rng.choice([0, 0.2, 1, 2])
        crash_rate = rng.choice([0, 0.1, 0.5, 1])
        drain_rate = rng.choice([0, 0.2, 1])
        clock_rate = rng.choice([0.1, 1])
        # harsh mode: extra loss of AppendEntries only (a follower whose disk stalls answers
        # heartbeats but not appends; modelled as the append being lost)
        self.ae_loss = rng.choice([0.3, 0.6, 0.8]) if self.cfg.harsh else 0.0
        if self.cfg.harsh:
            part_rate = rng.choice([1, 3])
            pause_rate = rng.choice([0.5, 2])
        self.profile = dict(N=self.N, loss=self.loss, dup=self.dup, dmax=self.dmax, part=part_rate,
                            pause=pause_rate, crash=crash_rate, drain=drain_rate, ae_loss=self.ae_loss)

        def rate():
            if rng.random() < 0.5:
                return rng.choice([1 - cfg.drift, 1 + cfg.drift])
            return rng.uniform(1 - cfg.drift, 1 + cfg.drift)
        for n in self.nodes:
            n.rate = rate()
        t = 0.0
        while clock_rate:
            t += rng.expovariate(clock_rate) * 1000
            if t >= T:
                break
            self.faults.append((int(t), 'rate', (rng.randrange(self.N), rate())))

        def dur(choices):
            lo, hi = rng.choice(choices)
            return int(rng.uniform(lo, hi))

        def poisson(r, start=300):
            out = []
            if r <= 0:
                return out
            t = start
            while True:
                t += rng.expovariate(r) * 1000
                if t >= T:
                    return out
                out.append(int(t))
        pid = 0
        for t in poisson(part_rate):
            pid += 1
            kind = rng.choice(['isolate', 'split', 'links', 'oneway'])
            N = self.N
            bl = set()
            if kind == 'isolate':
                x = rng.randrange(N)
                for p in range(N):
                    if p != x:
                        bl.add((x, p))
                        bl.add((p, x))
            elif kind == 'split':
                g = set(rng.sample(range(N), rng.randint(1, N - 1)))
                for a in range(N):
                    for b in range(N):
                        if (a in g) != (b in g):
                            bl.add((a, b))
            elif kind == 'links':
                for a in range(N):
                    for b in range(a + 1, N):
                        if rng.random() < 0.35:
                            bl.add((a, b))
                            bl.add((b, a))
            else:
                for a in range(N):
                    for b in range(N):
                        if a != b and rng.random() < 0.3:
                            bl.add((a, b))
            d = dur([(30, 300), (300, 1200), (1200, 4000)])
            self.faults.append((t, 'part_on', (pid, frozenset(bl), kind)))
            self.faults.append((t + d, 'part_off', (pid,)))
        for t in poisson(pause_rate):
            x = rng.randrange(self.N)
            d = dur([(10, 200), (200, 800), (800, 3000)])
            self.faults.append((t, 'pause', (x,)))
            self.faults.append((t + d, 'resume', (x,)))
        for t in poisson(crash_rate):
            x = rng.randrange(self.N)
            d = dur([(1, 60), (60, 800), (800, 4000)])
            self.faults.append((t, 'crash', (x,)))
            self.faults.append((t + d, 'restart', (x,)))
        for t in poisson(drain_rate):
            self.faults.append((t, 'drain', (rng.randrange(self.N), rng.random() < 0.6)))

    # ---- network
    def send(self, src, dst, msg):
        self.stats['msgs'] += 1
        if self.drop_filter is not None and src != dst and self.drop_filter(self, src, dst, msg):
            return
        if src == dst:
            self.mseq += 1
            heapq.heappush(self.msgq, (self.now, self.mseq, src, dst, msg))
            return
        if (src, dst) in self.blocked:
            return
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            return
        if self.ae_loss and msg[0] == 'AE' and rng.random() < self.ae_loss:
            return
        copies = 2 if (self.dup and rng.random() < self.dup) else 1
        for _ in range(copies):
            self.mseq += 1
            d = rng.randint(self.dmin, self.dmax)
            if self.delay_fn is not None:
                d2 = self.delay_fn(self, src, dst, msg)
                if d2 is not None:
                    d = d2
            heapq.heappush(self.msgq, (self.now + d, self.mseq, src, dst, msg))

    def deliver(self, src, dst, msg):
        if src != dst and (src, dst) in self.blocked:
            return
        n = self.nodes[dst]
        if not n.up:
            return
        if n.paused:
            n.inbox.append((src, msg))
            return
        n.handle(src, msg)

    # ---- faults
    def apply_fault(self, kind, a):
        if kind == 'rate':
            self.nodes[a[0]].set_rate(a[1])
        elif kind == 'part_on':
            self.partitions[a[0]] = a[1]
            self.recompute_blocked()
            self.log_ev('PARTITION %s on: blocked %s' % (a[2], sorted(a[1])))
        elif kind == 'part_off':
            self.partitions.pop(a[0], None)
            self.recompute_blocked()
            self.log_ev('partition %d healed; blocked now %s' % (a[0], sorted(self.blocked)))
        elif kind == 'pause':
            n = self.nodes[a[0]]
            if n.up and not n.paused:
                n.paused = True
                self.log_ev('n%d PAUSED' % a[0])
        elif kind == 'resume':
            n = self.nodes[a[0]]
            if n.paused:
                n.paused = False
                self.log_ev('n%d resumed (%d queued msgs)' % (a[0], len(n.inbox)))
                box, n.inbox = n.inbox, []
                for src, msg in box:
                    if n.up and not n.paused:
                        n.handle(src, msg)
        elif kind == 'crash':
            n = self.nodes[a[0]]
            if n.up:
                n.up = False
                n.paused = False
                n.inbox = []
                self.log_ev('n%d CRASHED' % a[0])
        elif kind == 'restart':
            n = self.nodes[a[0]]
            if not n.up:
                n.up = True
                n.incarnation += 1
                n.reset_volatile()
                self.log_ev('n%d restarted (term %d, log last %d)' % (a[0], n.term, n.last()))
        elif kind == 'drain':
            ls = [n for n in self.nodes if n.up and not n.paused and n.role == 'L']
            if ls:
                ld = max(ls, key=lambda n: n.term)
                ld.append(('drain', a[0], a[1]))
        elif kind == 'call':
            a[0](self)
        else:
            raise ValueError(kind)

    def recompute_blocked(self):
        b = set()
        for s in self.partitions.values():
            b |= s
        self.blocked = b

    # ---- checks
    def fail(self, why):
        if self.failed is None:
            self.failed = (self.now, why)
            self.log_ev('VIOLATION: ' + why)

    def check_applied(self, nid, idx, ent):
        g = self.applied_global.get(idx)
        if g is None:
            self.applied_global[idx] = ent
        elif g != ent:
            self.fail('RAFT: n%d applied %s at %d but others applied %s' % (nid, ent, idx, g))

    def serving(self):
        out = []
        for n in self.nodes:
            if n.up and not n.paused and n.served and n.clock() < n.lease_exp:
                out.append(n)
        return out

    def check_invariant(self):
        sv = self.serving()
        if self.tracing:
            cur = {n.id: n.served for n in sv}
            for i in range(self.N):
                if cur.get(i, frozenset()) != self.serve_start.get(i, frozenset()):
                    self.log_ev('n%d now serving %s' % (i, sorted(cur.get(i, frozenset()))))
            self.serve_start = cur
        if len(sv) < 2:
            return
        for i in range(len(sv)):
            for j in range(i + 1, len(sv)):
                both = sv[i].served & sv[j].served
                if both:
                    a, b = sv[i], sv[j]
                    self.fail('shard %s served by n%d (lease until local %.1f, now %.1f, epoch %d) and n%d '
                              '(lease until %.1f, now %.1f, epoch %d)' % (
                                  sorted(both), a.id, a.lease_exp, a.clock(), a.state.epoch,
                                  b.id, b.lease_exp, b.clock(), b.state.epoch))
                    return

    def log_ev(self, s):
        if self.tracing:
            self.trace.append((self.now, s))

    # ---- main loop
    def next_time(self):
        t = INF
        if self.msgq:
            t = self.msgq[0][0]
        if self.fi < len(self.faults):
            t = min(t, self.faults[self.fi][0])
        for n in self.nodes:
            if not n.up or n.paused:
                continue
            d = n.next_timer_local()
            c = n.clock()
            if d <= c:
                return self.now
            rt = self.now + math.ceil((d - c) / n.rate - 1e-9)
            if rt < t:
                t = rt
        return max(t, self.now + 1) if t != INF else INF

    def run(self, observer=None):
        T = self.cfg.T
        while self.now <= T and self.failed is None:
            while self.fi < len(self.faults) and self.faults[self.fi][0] <= self.now:
                _, kind, a = self.faults[self.fi]
                self.fi += 1
                self.apply_fault(kind, a)
            for _ in range(50):
                while self.msgq and self.msgq[0][0] <= self.now:
                    _, _, src, dst, msg = heapq.heappop(self.msgq)
                    self.deliver(src, dst, msg)
                for n in self.nodes:
                    if n.up and not n.paused:
                        n.on_timers()
                        n.maybe_start_round()
                if not (self.msgq and self.msgq[0][0] <= self.now):
                    break
            self.check_invariant()
            if observer:
                observer(self)
            nt = self.next_time()
            if nt == self.now:
                nt += 1
            self.now = nt
        return self.failed


TIMING = {}


def run_seed(seed, variant='base', T=30000, tracing=False, harsh=False):
    cfg = Cfg(T=T, variant=VARIANTS[variant], harsh=harsh, **TIMING)
    sim = Sim(seed, cfg, tracing=tracing)
    r = sim.run()
    return sim, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--seeds', default='0:100')
    ap.add_argument('--variant', default='base')
    ap.add_argument('--T', type=int, default=30000)
    ap.add_argument('--trace', type=int, default=None)
    ap.add_argument('--stop', action='store_true', help='stop at first failure')
    ap.add_argument('--harsh', action='store_true', help='extra AppendEntries loss, more partitions/pauses')
    ap.add_argument('--timing', default=None, help='L,et_lo,et_hi,hb e.g. 300,100,200,30')
    args = ap.parse_args()
    if args.timing:
        v = list(map(float, args.timing.split(',')))
        L, lo, hi, hb = v[:4]
        TIMING.update(L=L, renew=L / 4, et_lo=lo, et_hi=hi, hb=hb)
        if len(v) > 4:
            TIMING.update(dbound=v[4])
    if args.trace is not None:
        sim, r = run_seed(args.trace, args.variant, args.T, tracing=True, harsh=args.harsh)
        print('profile', sim.profile)
        print('result', r)
        for t, s in sim.trace:
            print('%7d %s' % (t, s))
        return
    a, b = map(int, args.seeds.split(':'))
    t0 = time.time()
    fails = []
    simms = 0
    for seed in range(a, b):
        sim, r = run_seed(seed, args.variant, args.T, harsh=args.harsh)
        simms += min(sim.now, args.T)
        if r:
            fails.append((seed, r))
            print('FAIL seed %d t=%d %s | %s' % (seed, r[0], r[1], sim.profile), flush=True)
            if args.stop:
                break
    print('harsh' if args.harsh else 'normal', TIMING or '', end=' ')
    print('variant %s seeds %d..%d: %d failures, %.0f simulated s, %.1f wall s' % (
        args.variant, a, b, len(fails), simms / 1000, time.time() - t0))


if __name__ == '__main__':
    main()
