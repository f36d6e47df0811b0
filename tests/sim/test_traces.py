"""Traces: generators, our JSONL/CSV format, FedScale's pickles through the restricted unpickler."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from lifl.sim.config import SimConfigError, TraceSpec
from lifl.sim.fedscale import UnsafePickle, load_fedscale
from lifl.sim.traces import build, generate, read_file, write_file


def test_generators_are_deterministic_and_shaped():
    for kind in ("all_at_once", "uniform", "bursty", "diurnal", "straggler"):
        a = generate(TraceSpec(kind=kind, window_s=5.0), 1000, seed=3)
        b = generate(TraceSpec(kind=kind, window_s=5.0), 1000, seed=3)
        assert len(a) == 1000 and np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.compute_s, b.compute_s)
    assert not generate(TraceSpec(kind="all_at_once"), 10).arrival_s.any()
    u = generate(TraceSpec(kind="uniform", window_s=5.0), 1000).arrival_s
    assert 0 <= u.min() and u.max() <= 5.0
    bursty = generate(TraceSpec(kind="bursty", window_s=100.0, bursts=3, burst_width_s=0.01), 3000).arrival_s
    # three tight clusters: almost every arrival is within 0.1 s of one of three values
    centres = np.unique(np.round(bursty, 1))
    assert len(np.unique(np.floor(bursty))) <= 6 and len(centres) < 30
    s = generate(TraceSpec(kind="straggler"), 20000)
    assert np.median(s.compute_s) == pytest.approx(1.0, rel=0.05) and s.compute_s.max() > 20  # lognormal tail


def test_diurnal_availability_matches_each_clients_window():
    spec = TraceSpec(kind="diurnal", period_s=100.0, active_fraction=0.3)
    tr = generate(spec, 2000, seed=1)
    share = np.mean([tr.available(t).mean() for t in np.linspace(0, 99, 50)])
    assert share == pytest.approx(0.3, abs=0.03)
    # every client online exactly when t mod 100 falls in its (possibly wrapped) window
    for i in range(0, 2000, 97):
        (s, e), (s2, e2) = tr.windows(i)
        for t in (3.0, 47.0, 151.0, 299.5):
            tm = t % 100
            assert tr.available(t)[i] == (s <= tm <= e or s2 <= tm <= e2)


def test_our_format_round_trips_jsonl_and_csv(tmp_path):
    rows = ['{"client": "a", "arrival_s": 1.5, "compute_s": 2, "upload_mbps": 8, "num_examples": 30, '
            '"active": [[0, 10], [50, 60]], "period_s": 100}',
            '# a comment line',
            '{"client": "b"}']
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(rows) + "\n")
    tr = read_file(p)
    assert tr.ids == ("a", "b")
    assert tr.arrival_s.tolist() == [1.5, 0.0] and tr.upload_Bps[0] == 1e6 and np.isinf(tr.upload_Bps[1])
    # a: 1.5 + 2 + 1 MB / 1 MB/s = 4.5 s; b: no delay at all
    assert tr.ready_s(10**6).tolist() == [4.5, 0.0]
    assert tr.available(55.0).tolist() == [True, True] and tr.available(130.0).tolist() == [False, True]
    assert tr.available(205.0).tolist() == [True, True]  # 205 mod 100 = 5, inside [0, 10]
    for name in ("back.csv", "back.jsonl"):
        write_file(tr, tmp_path / name)
        again = read_file(tmp_path / name)
        assert again.ids == tr.ids and again.windows(0) == [(0.0, 10.0), (50.0, 60.0)]
        assert np.array_equal(again.ready_s(10**6), tr.ready_s(10**6))
        assert np.array_equal(again.period_s, tr.period_s) and np.array_equal(again.num_examples, tr.num_examples)


@pytest.mark.parametrize("text, match", [
    ("", "names no clients"),
    ('{"client": "a"}\n{"client": "a"}\n', "appears twice"),
    ('{"client": "a", "arrival_s": -1}\n', "arrival_s must be a finite number >= 0"),
    ('{"client": "a", "speed": 3}\n', "unknown column"),
    ('{"arrival_s": 1}\n', "needs a client id"),
    ('{"client": "a", "active": [[5, 1]]}\n', "start <= end"),
    ("not json\n", "not JSON"),
])
def test_bad_trace_files_are_refused_with_the_line(tmp_path, text, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    with pytest.raises(SimConfigError, match=match):
        read_file(p)


def test_csv_without_rows_names_no_clients(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("client,arrival_s\n")
    with pytest.raises(SimConfigError, match="names no clients"):
        read_file(p)


def _dump(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


def test_fedscale_import_follows_its_replay_semantics(tmp_path):
    behave = _dump(tmp_path / "client_behave_trace", {
        2: {"duration": 500, "active": [10, 200], "inactive": [50, 300], "finish_time": 1000, "model": "x"},
        1: {"duration": 900, "active": [0], "inactive": [100], "finish_time": 400, "model": "y"}})
    cap = _dump(tmp_path / "client_device_capacity", {1: {"computation": 50.0, "communication": 8000.0},
                                                       2: {"computation": 10.0, "communication": 800.0}})
    tr = load_fedscale(behave, cap, batch_size=10, local_steps=5)
    assert tr.ids == ("1", "2")
    # computation: 3 x batch x steps x ms/sample / 1000; communication: kbit / (kbit/s)
    assert tr.compute_s.tolist() == [3 * 10 * 5 * 50 / 1000, 3 * 10 * 5 * 10 / 1000]
    # 125,000 bytes = 1000 kbit up: 1000/8000 s and 1000/800 s
    assert tr.ready_s(125_000).tolist() == pytest.approx([7.5 + 0.125, 1.5 + 1.25])
    # t mod finish_time against [active_k, inactive_k], ends included
    for t, want in [(0, [True, False]), (30, [True, True]), (100, [True, False]), (250, [False, True]),
                    (430, [True, False]), (1030, [False, True]), (1250, [True, True])]:
        assert tr.available(t).tolist() == want, t
    full = build(TraceSpec(kind="fedscale", path=str(behave), capacity_path=str(cap)), 1)
    assert full.ids == ("1",)


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    _Boom.marker = tmp_path / "pwned"
    evil = _dump(tmp_path / "client_behave_trace", {1: {"active": [0], "inactive": [1], "finish_time": 2,
                                                       "model": _Boom()}})
    with pytest.raises(UnsafePickle, match="refusing pickle global"):
        load_fedscale(evil)
    assert not _Boom.marker.exists()
    numpy_scalar = _dump(tmp_path / "cap", {1: {"computation": np.float64(1.0), "communication": 1.0}})
    ok = _dump(tmp_path / "behave", {1: {"active": [0], "inactive": [1], "finish_time": 2}})
    with pytest.raises(UnsafePickle):
        load_fedscale(ok, numpy_scalar)


def test_fedscale_records_are_checked(tmp_path):
    bad = _dump(tmp_path / "b", {1: {"active": [0, 5], "inactive": [1], "finish_time": 2}})
    with pytest.raises(SimConfigError, match="equal length"):
        load_fedscale(bad)
    with pytest.raises(SimConfigError, match="names no clients"):
        load_fedscale(_dump(tmp_path / "e", {}))
    with pytest.raises(SimConfigError, match="expected a dict"):
        load_fedscale(_dump(tmp_path / "l", [1, 2]))
