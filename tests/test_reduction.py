"""The pure reduction, run in-process with the real fold kernels under random schedules: any
arrival and completion order, replayed replies, commands killed and re-sent, a node lost.
The result must equal an independent float64 FedAvg of the updates that survived."""
import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from support import assert_matches, fedavg64
from lifl import fold
from lifl.control.planner import plan_static
from lifl.engine.reduction import Finalize, Fold, Reduction, Update
from lifl.layout import Layout

MODEL = {"conv.w": np.zeros((3, 5), np.float32), "bn.count": np.zeros((), np.int64),
         "head.b": np.zeros(7, np.float16), "big": np.zeros(fold.PIECE + 100, np.float32)}
LAYOUT = Layout.from_arrays(MODEL)


def update(seed):
    rng = np.random.default_rng(seed)
    return {k: (rng.integers(0, 50, v.shape) if v.dtype.kind == "i" else rng.standard_normal(v.shape)).astype(v.dtype)
            for k, v in MODEL.items()}


class Functions:
    """Executes commands as lifl.function does, over in-process accumulators and journals."""

    def __init__(self, n_leaves):
        self.accs, self.journals, self.bufs, self.lost = {}, {}, {}, set()
        self.grow(n_leaves)
        self.out = bytearray(LAYOUT.total_size)   # the round's result segment
        self.result = None

    def grow(self, n):
        for i in range(len(self.accs), n):
            self.accs[i] = np.full(LAYOUT.numel, 7.0)            # garbage: a fresh leaf starts from zero
            self.journals[i] = bytearray(fold.journal_bytes(LAYOUT.numel))

    def put(self, slot, arrays):
        b = bytearray(LAYOUT.total_size)
        LAYOUT.pack_into(arrays, b)
        self.bufs[slot] = b

    def lose(self, leaves):
        for i in leaves:
            self.lost.add(i)
            self.accs[i][:] = np.nan                              # that memory is gone

    def run(self, cmd, cut_short=False):
        """What a function does with a command (``lifl.function``): the same fold calls."""
        acc, out = self.accs[cmd.leaf], self.out
        fused = isinstance(cmd, Finalize) and (cmd.updates or cmd.children)
        if isinstance(cmd, Finalize) and cmd.span is not None:   # one span of a flat finalize
            add = fold.add_updates(LAYOUT, [fold.UpdateViews(LAYOUT, self.bufs[u.slot]) for u in cmd.updates],
                                   [u.weight for u in cmd.updates]) if cmd.updates else None
            fold.finalize_span(LAYOUT, *cmd.span, [self.accs[c] for c in cmd.children], add, cmd.weight, out)
            self.result = LAYOUT.views(out)
            return
        if isinstance(cmd, Finalize) and not fused:
            fold.finalize(acc, LAYOUT, cmd.weight, out)
            self.result = LAYOUT.views(out)
            return
        journal = fold.Journal(self.journals[cmd.leaf], LAYOUT.numel)
        if cmd.updates:
            add = fold.add_updates(LAYOUT, [fold.UpdateViews(LAYOUT, self.bufs[u.slot]) for u in cmd.updates],
                                   [u.weight for u in cmd.updates])
        else:
            add = fold.add_partials([self.accs[c] for c in cmd.children])
        if cut_short:          # killed after the first piece: the journal must make a re-send exact
            inner = add
            calls = [0]

            def add(out, e0, e1):
                calls[0] += 1
                if calls[0] > 1:
                    raise KeyboardInterrupt
                inner(out, e0, e1)
        try:
            if fused:      # the last fold and the finalize in one pass
                fold.fold_and_finalize(acc, journal, cmd.gen, cmd.base or None, add, LAYOUT, cmd.weight, out)
                self.result = LAYOUT.views(out)
            else:
                fold.fold_in_place(acc, journal, cmd.gen, cmd.base or None, add)
        except KeyboardInterrupt:
            pass


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 24), leaves=st.integers(1, 6), fan_in=st.integers(2, 4),
       lose_at=st.one_of(st.none(), st.integers(0, 60)))
def test_any_schedule_with_replays_kills_and_a_lost_node_is_exact(seed, n, leaves, fan_in, lose_at):
    rnd = random.Random(seed)
    if lose_at is not None:
        leaves = max(leaves, 2)
    hier = plan_static(leaves, fan_in)
    one_node = lose_at is None and rnd.random() < 0.5     # then the round ends in a flat finalize
    nodes = [("a" if i % 2 == 0 or one_node else "b") for i in range(hier.leaves)]
    red = Reduction(1, hier, [(nd, nd) for nd in nodes], numel=LAYOUT.numel, flat_on="a")
    fns = Functions(hier.leaves)
    data = {f"c{i}": (update(seed + i), float(rnd.randint(1, 40))) for i in range(n)}
    arrivals = list(data)
    rnd.shuffle(arrivals)
    survivors = set()
    started, serial, step, cut = [], 0, 0, set()
    while not red.done:
        step += 1
        assert step < 5000, "no progress"
        if lose_at is not None and step == lose_at:
            gone = [lf.index for lf in red.leaves if lf.node == "b"]
            red.lose("b")
            fns.lose(gone)
            started = [c for c in started if c.leaf not in gone]
            lose_at = None
        if red.can_rebuild():
            loss = red.rebuild(fan_in, rank=lambda lf: lf.node)
            survivors -= set(loss.clients)
            if red.phase.value == "open":
                arrivals += loss.clients                # they push again, to a node that is still there
            if not red.alive or (red.phase.value != "open" and not survivors):
                return                                   # nothing left: the engine fails the round
        choice = rnd.random()
        if arrivals and choice < 0.35:
            c = arrivals.pop()
            serial += 1
            slot = f"s{serial}"
            fns.put(slot, data[c][0])
            red.add(red.route(rnd.choice(["a", "b"])), Update(slot, data[c][1], c))
            survivors.add(c)
            continue
        if not arrivals and red.phase.value == "open":
            red.close()
        early = rnd.random() < 0.5   # the engine asks the tree first after a commit: finalize may fuse
        if early:
            started += red.ready()
        for lf in red.leaves:
            cmd = red.take_fold(lf.index)
            if cmd is not None:
                started.append(cmd)
        if not early:
            started += red.ready()
        if not started:
            continue
        cmd = started.pop(rnd.randrange(len(started)))
        if any(ch in fns.lost for ch in cmd.children):
            red.abandon(cmd, torn=cmd in cut)            # the runtime reports a lost input
            continue
        r = rnd.random()
        if r < 0.15 and (isinstance(cmd, Fold) or cmd.updates or cmd.children) and not getattr(cmd, "span", None):
            # killed mid-command: re-sent later (a span only reads its inputs: re-running it is trivially safe)
            fns.run(cmd, cut_short=True)
            cut.add(cmd)
            started.append(cmd)
            continue
        fns.run(cmd)
        red.commit(cmd)
        if r > 0.85:                                     # a replayed reply changes nothing
            assert red.commit(cmd) == []
    assert_matches(fns.result, fedavg64([data[c][0] for c in sorted(survivors)],
                                         [data[c][1] for c in sorted(survivors)]))


def test_a_replayed_or_stale_reply_frees_nothing_and_changes_nothing():
    red = Reduction(7, plan_static(1, 2), [("local", "local")])
    red.add(0, Update("s1", 2.0, "a"))
    cmd = red.take_fold(0)
    assert red.take_fold(0) is None                       # one command in flight per leaf
    assert red.commit(cmd) == ["s1"]
    assert red.commit(cmd) == []                          # replay
    red.add(0, Update("s2", 3.0, "b"))
    nxt = red.take_fold(0)
    assert nxt.base == cmd.gen and nxt.gen > cmd.gen      # from the committed generation
    red.close()
    assert red.ready() == []                              # leaf not complete yet
    red.commit(nxt)
    (fin,) = red.ready()
    assert isinstance(fin, Finalize) and fin.weight == 5.0 and red.ready() == []
    red.commit(fin)
    assert red.done


def test_one_leaf_folds_its_last_updates_and_finalizes_in_one_command():
    red = Reduction(3, plan_static(1, 2), [("local", "local")])
    red.add(0, Update("s1", 2.0, "a"))
    first = red.take_fold(0)
    red.add(0, Update("s2", 3.0, "b"))
    red.close()
    assert red.ready() == []                              # the first fold is still running
    assert red.commit(first) == ["s1"]
    (fin,) = red.ready()                                  # the engine asks the tree before taking a fold
    assert isinstance(fin, Finalize) and [u.slot for u in fin.updates] == ["s2"]
    assert fin.base == first.gen and fin.gen > first.gen and fin.weight == 5.0
    assert red.take_fold(0) is None and red.ready() == []
    assert red.commit(fin) == ["s2"] and red.done
    fns = Functions(1)                                    # and the fused pass is exact
    ups = [update(1), update(2)]
    for slot, u in zip(("s1", "s2"), ups):
        fns.put(slot, u)
    fns.run(first)
    fns.run(fin, cut_short=True)                          # killed after one piece, then re-sent
    fns.run(fin)
    assert_matches(fns.result, fedavg64(ups, [2.0, 3.0]))


def test_the_tops_last_partial_fold_and_the_finalize_are_one_command():
    red = Reduction(4, plan_static(2, 2), [("local", "local")] * 2)
    red.add(0, Update("s1", 1.0, "a"))
    red.add(1, Update("s2", 4.0, "b"))
    folds = [red.take_fold(0), red.take_fold(1)]
    red.close()
    for f in folds:
        red.commit(f)
    (fin,) = red.ready()
    assert isinstance(fin, Finalize) and fin.children == (1,) and fin.leaf == 0 and fin.weight == 5.0
    fns = Functions(2)
    ups = [update(3), update(4)]
    for slot, u in zip(("s1", "s2"), ups):
        fns.put(slot, u)
    for f in folds:
        fns.run(f)
    fns.run(fin)
    assert_matches(fns.result, fedavg64(ups, [1.0, 4.0]))


def test_leaves_on_one_node_end_in_spans_written_in_parallel_from_every_sum_and_pending_update():
    red = Reduction(5, plan_static(3, 2), [("n", "n")] * 3, numel=LAYOUT.numel, flat_on="n")
    red.add(0, Update("s1", 1.0, "a"))
    red.add(1, Update("s2", 2.0, "b"))
    first = red.take_fold(0)
    red.add(2, Update("s3", 4.0, "c"))
    red.close()
    assert red.ready() == []                              # a fold is in flight: wait for it
    red.commit(first)
    spans = red.ready()
    assert len(spans) == 2 and {c.leaf for c in spans} == {0, 1}   # a model of two pieces: two spans
    assert all(c.children == (0,) and [u.slot for u in c.updates] == ["s2", "s3"] for c in spans)
    assert sorted(c.span for c in spans)[0][0] == 0 and sorted(c.span for c in spans)[-1][1] == LAYOUT.numel
    fns = Functions(3)
    ups = [update(5), update(6), update(7)]
    for slot, u in zip(("s1", "s2", "s3"), ups):
        fns.put(slot, u)
    fns.run(first)
    assert red.commit(spans[0]) == [] and not red.done    # the other span still reads the updates
    for c in spans:
        fns.run(c)
    assert red.commit(spans[1]) == ["s2", "s3"] and red.done
    assert_matches(fns.result, fedavg64(ups, [1.0, 2.0, 4.0]))


def test_no_updates_after_close_and_tree_changes_only_while_open():
    red = Reduction(1, plan_static(2, 2), [("local", "local")] * 2)
    red.extend(plan_static(3, 2), [("local", "local")])
    assert len(red.leaves) == 3
    red.close()
    with pytest.raises(ValueError, match="no more updates"):
        red.add(0, Update("s", 1.0, "x"))
    with pytest.raises(ValueError, match="only while it is open"):
        red.extend(plan_static(4, 2), [("local", "local")])
