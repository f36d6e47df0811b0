"""Asynchronous (FedBuff) jobs on a real server on loopback: real gRPC, real function processes, real
shared memory. Published versions equal an independent float64 FedBuff (Flower's strategies as the
server step); every refusal has its status, names the current version and changes nothing."""
from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest

from support import expect
from lifl.cli import main as cli_main
from lifl.client import Client, RpcFailure
from lifl.engine.buffered import AsyncSpec, Staleness
from lifl.engine.optimizers import ServerOptimizer
from lifl.v1 import aggregation_pb2 as pb

pytest.importorskip("flwr")
from fedbuff_ref import FlowerStep, Reference  # noqa: E402

SHAPES = {"w": ((33, 7), np.float32), "b": ((5,), np.float64), "h": ((2, 3, 4), np.float32)}


def model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(dt) for k, (s, dt) in SHAPES.items()}


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], np.float64).ravel() for k in SHAPES])


def unflat(x: np.ndarray) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for k, (s, dt) in SHAPES.items():
        n = int(np.prod(s))
        out[k] = x[pos:pos + n].reshape(s).astype(dt)
        pos += n
    return out


@pytest.mark.parametrize("opt,leaves", [(("sgd", dict(lr=0.8)), 2), (("fedadam", dict(lr=0.05)), 3)])
def test_published_versions_equal_independent_fedbuff(make_server, opt, leaves):
    """12 clients of different speeds against K=3: stale updates weigh less, every version exact."""
    srv = make_server(workers=leaves, leaves=leaves, fan_in=2)
    kind, kw = opt
    K, C = 3, 5
    x0 = model(0)
    spec = AsyncSpec(buffer_size=K, concurrency=C, staleness=Staleness("polynomial", 0.5),
                     optimizer=ServerOptimizer.of(kind, **kw), keep_versions=8)
    ref = Reference(flat(x0), K, C, "polynomial", 0.5, 0, 0.0, 0, FlowerStep(kind, flat(x0), **kw))
    rng = np.random.default_rng(1)
    # client c returns every speed[c] ticks; each trains on the version it pulled last
    speed = [1, 1, 2, 3, 5]
    base = [0] * C
    with Client(srv.address) as c:
        st = c.open_async(x0, spec, job="fb")
        assert (st.mode, st.version, st.buffer_size) == ("async", 0, K)
        pushed = refused = 0
        for tick in range(1, 13):
            for i in range(C):
                if tick % speed[i]:
                    continue
                delta = unflat(rng.normal(scale=0.05, size=flat(x0).size))
                w = float(rng.integers(1, 40))
                tau = len(ref.versions) - 1 - base[i]
                want = ref.push(f"c{i}", base[i], w, flat(delta))
                try:
                    r = c.push(0, delta, w, f"c{i}", job="fb", base_version=base[i])
                except RpcFailure as e:
                    assert e.code.name == want, e
                    refused += 1
                    continue      # a fast client that already has an update in this buffer waits
                assert want == "OK" and r.staleness == tau
                pushed += 1
                if r.accepted == K:       # this update sealed a buffer: wait until its version is out
                    c.pull_version(r.version, job="fb", wait_s=30)
                base[i] = c.job_info("fb").version
        info = c.job_info("fb")
        assert info.accepted == pushed and info.version == len(ref.versions) - 1 >= 4 and refused > 0
        for v in range(max(0, info.version - 7), info.version + 1):
            got_v, got = c.pull_version(v, job="fb")
            assert got_v == v
            np.testing.assert_allclose(flat(got), ref.versions[v], rtol=1e-6, atol=1e-7)
        v, latest = c.pull_version("latest", job="fb")
        assert v == info.version
        np.testing.assert_allclose(flat(latest), ref.versions[-1], rtol=1e-6, atol=1e-7)


def test_refusals_name_the_current_version_and_change_nothing(make_server):
    srv = make_server(metrics_port=0)
    x0 = model(2)
    spec = AsyncSpec(buffer_size=2, concurrency=2, max_staleness=1, keep_versions=2)
    ref = Reference(flat(x0), 2, 2, "constant", 0.5, 0, 0.0, 1, FlowerStep("sgd", flat(x0), lr=1.0))
    d = [unflat(np.random.default_rng(i).normal(scale=0.1, size=flat(x0).size)) for i in range(8)]
    with Client(srv.address, retry_s=0) as c:
        c.open_async(x0, spec, job="fb")
        c.open_round(x0, expected=1, job="sync")

        def push(i, client, base, job="fb"):
            r = c.push(0, d[i], 1.0, client, job=job, base_version=base)
            assert ref.push(client, base, 1.0, flat(d[i])) == "OK"
            return r

        push(0, "a", 0)
        expect(grpc.StatusCode.ALREADY_EXISTS, "already has an update in the buffer for version 1; the current "
               "version is 0", c.push, 0, d[1], 1.0, "a", job="fb", base_version=0)
        expect(grpc.StatusCode.OUT_OF_RANGE, "base version 5 has not been published; the current version is 0",
               c.push, 0, d[1], 1.0, "b", job="fb", base_version=5)
        push(1, "b", 0)
        c.pull_version(1, job="fb", wait_s=30)
        push(2, "a", 1); push(3, "b", 0)
        c.pull_version(2, job="fb", wait_s=30)
        expect(grpc.StatusCode.FAILED_PRECONDITION, "update on version 0 is 2 versions stale (max 1); the current "
               "version is 2", c.push, 0, d[4], 1.0, "c", job="fb", base_version=0)
        expect(grpc.StatusCode.INVALID_ARGUMENT, "is asynchronous: set base_version", c.push, 0, d[4], 1.0, "c",
               job="fb")
        expect(grpc.StatusCode.INVALID_ARGUMENT, "base_version is only for asynchronous jobs", c.push, 1, x0, 1.0,
               "c", job="sync", base_version=0)
        bad = dict(d[4]); bad["w"] = bad["w"][:-1]
        expect(grpc.StatusCode.INVALID_ARGUMENT, "asynchronous job 'fb'", c.push, 0, bad, 1.0, "c", job="fb",
               base_version=2)
        nan = {k: v.copy() for k, v in d[4].items()}; nan["b"][0] = np.nan
        expect(grpc.StatusCode.INVALID_ARGUMENT, "NaN/Inf", c.push, 0, nan, 1.0, "c", job="fb", base_version=2)
        expect(grpc.StatusCode.NOT_FOUND, "version 0 is no longer kept; versions 1..2 are kept", c.pull_version, 0,
               job="fb")
        expect(grpc.StatusCode.FAILED_PRECONDITION, "version 3 is not published yet; the current version is 2",
               c.pull_version, 3, job="fb")
        expect(grpc.StatusCode.ALREADY_EXISTS, "already open (version 2)", c.open_async, x0, spec, job="fb")
        expect(grpc.StatusCode.FAILED_PRECONDITION, "is asynchronous", c.open_round, x0, expected=1, job="fb")
        expect(grpc.StatusCode.INVALID_ARGUMENT, "is not asynchronous", c.pull_version, "latest", job="sync")
        expect(grpc.StatusCode.INVALID_ARGUMENT, "tensor 'n' is bool or unsigned", c.open_async,
               {"n": np.arange(3, dtype=np.uint8)}, job="ints")
        h = pb.OpenRoundHeader(job="opts", mode=pb.JOB_MODE_ASYNC, total_size=64)
        h.async_options.staleness = "hinge"
        with grpc.insecure_channel(srv.address) as ch, pytest.raises(grpc.RpcError) as e:
            ch.stream_unary("/lifl.v1.Admin/OpenRound")(iter([pb.OpenRoundRequest(header=h).SerializeToString()]))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown staleness function 'hinge'" in e.value.details()
        # nothing refused was counted or folded: one more push completes version 3 as the reference says
        info = c.job_info("fb")
        assert (info.version, info.accepted, info.buffer_fill, info.refused_stale) == (2, 4, 0, 1)
        push(5, "c", 2); push(6, "a", 2)
        v, got = c.pull_version(3, job="fb", wait_s=30)
        np.testing.assert_allclose(flat(got), ref.versions[3], rtol=1e-6, atol=1e-7)
        status = c.status()
        row = [r for r in status.rounds if r.mode == pb.JOB_MODE_ASYNC]
        assert [(r.job, r.version) for r in row] == [("fb", 3)]
        # closing: the open buffer is discarded, the name has no asynchronous job, and may be opened again
        push(7, "a", 3)
        closed = c.close_job("fb")
        assert (closed.state, closed.version, closed.buffer_fill) == ("done", 3, 1)
        expect(grpc.StatusCode.INVALID_ARGUMENT, "has no asynchronous job open", c.push, 0, d[0], 1.0, "b",
               job="fb", base_version=3)
        expect(grpc.StatusCode.NOT_FOUND, "round 0 of job 'fb' does not exist", c.close_job, "fb")
        assert c.open_async(x0, spec, job="fb").version == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    assert 'lifl_async_versions_published_total{job="fb"} 3.0' in text
    assert 'lifl_async_refused_stale_total{job="fb"} 1.0' in text
    assert 'lifl_async_staleness_count{job="fb"} 7.0' in text
    assert 'lifl_async_staleness_bucket{job="fb",le="0.0"} 6.0' in text    # b's second update was 1 stale


def test_cli_job_open_push_pull_latest(server, tmp_path, capsys):
    x0, d = model(3), model(4)
    np.savez(tmp_path / "x0.npz", **x0)
    np.savez(tmp_path / "d.npz", **d)
    a = ["--address", server.address, "--job", "cli"]
    assert cli_main(["job", "open", *a, "--async", "--model", str(tmp_path / "x0.npz"), "--buffer-size", "1",
                     "--concurrency", "1", "--server-lr", "0.5"]) == 0
    assert "version 0, buffer 0/1" in capsys.readouterr().out
    assert cli_main(["push", *a, "--client", "p", "--num-examples", "3", "--base-version", "0",
                     str(tmp_path / "d.npz")]) == 0
    assert "into the buffer of version 1 (staleness 0)" in capsys.readouterr().out
    with Client(server.address) as c:
        c.pull_version(1, job="cli", wait_s=30)
    assert cli_main(["pull", *a, "--version", "latest", "-o", str(tmp_path / "v.npz")]) == 0
    assert "(version 1)" in capsys.readouterr().out
    with np.load(tmp_path / "v.npz") as z:
        for k in SHAPES:    # sgd, lr 0.5, K = 1: x1 = x0 + 0.5·d
            np.testing.assert_allclose(z[k], x0[k].astype(np.float64) + 0.5 * d[k].astype(np.float64), rtol=1e-6)
    assert cli_main(["job", "info", *a]) == 0
    assert "version 1, buffer 0/1, 1 updates accepted" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--version takes 'latest' or a version number"):
        cli_main(["pull", *a, "--version", "-2", "-o", str(tmp_path / "v.npz")])


def test_cli_round_open_with_a_server_optimizer(server, tmp_path, capsys):
    x0, m = model(5), model(6)
    np.savez(tmp_path / "x0.npz", **x0)
    np.savez(tmp_path / "m.npz", **m)
    a = ["--address", server.address, "--job", "cli"]
    assert cli_main(["round", "open", *a, "--model", str(tmp_path / "x0.npz"), "--expected", "1",
                     "--optimizer", "sgd", "--server-lr", "0.25"]) == 0
    rid = int(capsys.readouterr().out.strip())
    assert cli_main(["push", *a, "--round", str(rid), "--client", "p", "--num-examples", "2",
                     str(tmp_path / "m.npz")]) == 0
    assert cli_main(["pull", *a, "--round", str(rid), "--wait", "30", "-o", str(tmp_path / "r.npz")]) == 0
    with np.load(tmp_path / "r.npz") as z:
        for k in SHAPES:    # one update: mean = m, x1 = x0 + 0.25·(m − x0)
            x = x0[k].astype(np.float64)
            np.testing.assert_allclose(z[k], x + 0.25 * (m[k].astype(np.float64) - x), rtol=1e-6)


def test_function_killed_mid_fold_nothing_folded_twice_nothing_lost(make_server):
    """Functions pause after each fold, before replying; we SIGKILL busy ones while deltas stream in.
    Every version still equals the independent FedBuff: a fold is re-run exactly once, never lost."""
    import os
    import signal
    import time

    srv = make_server(workers=2, leaves=2, fan_in=2, fault_fold_delay_s=0.15)
    x0 = model(7)
    K = 4
    spec = AsyncSpec(buffer_size=K, concurrency=K, optimizer=ServerOptimizer.of("fedavgm", lr=0.9, momentum=0.5))
    ref = Reference(flat(x0), K, K, "constant", 0.5, 0, 0.0, 0, FlowerStep("fedavgm", flat(x0), lr=0.9,
                                                                           momentum=0.5))
    rng = np.random.default_rng(3)
    killed = 0
    with Client(srv.address) as c:
        c.open_async(x0, spec, job="fb")
        for v in range(2):
            for i in range(K):
                d, w = unflat(rng.normal(scale=0.1, size=flat(x0).size)), float(i + 1)
                c.push(0, d, w, f"c{i}", job="fb", base_version=v)
                assert ref.push(f"c{i}", v, w, flat(d)) == "OK"
                time.sleep(0.05)
                busy = [x for x in c.status().workers if x.state == "busy"]
                if busy and killed < 3:
                    os.kill(busy[0].pid, signal.SIGKILL)
                    killed += 1
            c.pull_version(v + 1, job="fb", wait_s=60)
        for v in (1, 2):
            np.testing.assert_allclose(flat(c.pull_version(v, job="fb")[1]), ref.versions[v], rtol=1e-6, atol=1e-7)
    assert killed >= 1
    assert srv.metrics.registry.get_sample_value("lifl_tasks_retried_total") >= 1


def test_encoded_deltas_and_integer_tensors_equal_a_float64_replay(make_server):
    """Deltas pushed as float16, bfloat16, int8 and raw, into a model with signed integer tensors;
    three buffers pushed back to back (each buffer's step waits for the one before it). Every version
    equals a float64 FedBuff replay of the *decoded* deltas; integer tensors ride in the float64 master
    copy and are published rounded to nearest."""
    from support import decode, wire_bytes

    srv = make_server(workers=2, leaves=2, fan_in=2)
    shapes = {"w": ((300, 70), np.float32), "b": ((9,), np.float64), "n": ((4,), np.int64), "c": ((), np.int32)}
    rng = np.random.default_rng(11)
    x0 = {k: (rng.integers(-100, 100, size=s) if np.dtype(dt).kind == "i" else rng.normal(size=s)).astype(dt)
          for k, (s, dt) in shapes.items()}
    K = 3
    kw = dict(lr=0.05)
    spec = AsyncSpec(buffer_size=K, concurrency=K, optimizer=ServerOptimizer.of("fedadam", **kw), keep_versions=8)

    def f64(a):
        return np.concatenate([np.asarray(a[k], np.float64).ravel() for k in shapes])

    ref = Reference(f64(x0), K, K, "constant", 0.5, 0, 0.0, 0, FlowerStep("fedadam", f64(x0), **kw))
    names = ["float16", "bfloat16", "int8", "raw"]
    with Client(srv.address) as c:
        c.open_async(x0, spec, job="enc")
        for i in range(3 * K):     # no waiting between buffers: later buffers fold while earlier ones step
            d = {k: (rng.integers(-3, 4, size=s) if np.dtype(dt).kind == "i" else rng.normal(scale=0.1, size=s))
                 .astype(dt) for k, (s, dt) in shapes.items()}
            nm, w = names[i % 4], float(1 + i)
            r = c.push(0, d, w, f"c{i}", job="enc", base_version=0, encoding=None if nm == "raw" else nm)
            assert r.version == 1 + i // K
            assert ref.push(f"c{i % K}-{i // K}", 0, w, f64(decode(d, wire_bytes(d, nm), nm))) == "OK"
        for v in (1, 2, 3):
            got_v, got = c.pull_version(v, job="enc", wait_s=60)
            want = ref.versions[v]
            pos = 0
            for k, (s, dt) in shapes.items():
                n = int(np.prod(s))
                part = want[pos:pos + n].reshape(s)
                pos += n
                assert got[k].dtype == np.dtype(dt)
                if np.dtype(dt).kind == "i":
                    np.testing.assert_array_equal(got[k], np.rint(part).astype(dt), err_msg=f"version {v}, {k}")
                else:
                    np.testing.assert_allclose(got[k], part, rtol=1e-6, atol=1e-7, err_msg=f"version {v}, {k}")


def test_buffers_sealed_at_once_step_in_order(make_server):
    """K = 1 and six clients pushing at once: buffers seal nearly together, so a buffer's finalize is
    ready while the one before it still steps; the engine holds it until that step is done (each step
    reads the master copy and moments the previous one wrote). Versions equal a float64 FedAdam replay
    in the order the receipts say the deltas were accepted."""
    import threading

    srv = make_server(workers=3, leaves=1)
    rng = np.random.default_rng(21)
    x0 = {"w": rng.normal(size=(600, 500)).astype(np.float32), "b": rng.normal(size=7)}
    spec = AsyncSpec(buffer_size=1, concurrency=6, optimizer=ServerOptimizer.of("fedadam", lr=0.02), keep_versions=8)
    f64 = lambda a: np.concatenate([np.asarray(a[k], np.float64).ravel() for k in x0])  # noqa: E731
    deltas = [{k: rng.normal(scale=0.1, size=v.shape).astype(v.dtype) for k, v in x0.items()} for _ in range(6)]
    got: dict[int, int] = {}
    with Client(srv.address) as c:
        c.open_async(x0, spec, job="fast")

        def push(i):
            got[c.push(0, deltas[i], 1.0 + i, f"c{i}", job="fast", base_version=0).version] = i
        ts = [threading.Thread(target=push, args=(i,)) for i in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert sorted(got) == [1, 2, 3, 4, 5, 6]
        ref = Reference(f64(x0), 1, 6, "constant", 0.5, 0, 0.0, 0, FlowerStep("fedadam", f64(x0), lr=0.02))
        for v in range(1, 7):
            i = got[v]
            assert ref.push(f"c{i}", 0, 1.0 + i, f64(deltas[i])) == "OK"
            np.testing.assert_allclose(f64(c.pull_version(v, job="fast", wait_s=60)[1]), ref.versions[v],
                                       rtol=1e-6, atol=1e-7, err_msg=f"version {v}")
