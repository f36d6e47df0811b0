"""/metrics scraped over HTTP; the `lifl` CLI against a real `lifl serve` process."""
import json
import signal
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import assert_matches, fedavg64, perturb, small_model
from lifl.client import Client, RpcFailure
from lifl.demo import start_server
from lifl.layout import Layout
from lifl.shm import list_segments

BASE = small_model()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_endpoint(make_server):
    srv = make_server(metrics_port=0)
    with Client(srv.address) as c:
        rid = c.open_round(BASE, expected=2)
        c.push(rid, perturb(BASE, 1), 1, "a")
        assert c.push(rid, perturb(BASE, 1), 1, "a").duplicate        # a retry: counted, not folded
        with pytest.raises(RpcFailure, match="content differs"):
            c.push(rid, perturb(BASE, 3), 1, "a")
        c.push(rid, perturb(BASE, 2), 1, "b")
        c.pull(rid, wait_s=10)
    m = scrape(srv.metrics_port)
    assert m[("lifl_updates_received_total", (("job", "default"),))] == 2
    assert m[("lifl_updates_rejected_total", (("reason", "already_exists"),))] == 1
    assert m[("lifl_updates_duplicate_total", (("job", "default"),))] == 1
    assert m[("lifl_bytes_ingested_total", ())] == 2 * Layout.from_arrays(BASE).total_size
    assert m[("lifl_rounds_total", (("outcome", "done"),))] == 1
    assert m[("lifl_post_arrival_seconds_count", ())] == 1
    assert m[("lifl_fold_seconds_count", (("level", "leaf"),))] >= 1
    assert m[("lifl_cold_starts_total", ())] == 2


def run_cli(*args, ok=True):
    p = subprocess.run([sys.executable, "-m", "lifl", *args], capture_output=True, text=True, timeout=60)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def test_cli_end_to_end(tmp_path, shm_prefix):
    proc, info = start_server(["--workers", "2", "--leaves", "2"], shm_prefix)
    addr = ["--address", info["address"]]
    try:
        np.savez(tmp_path / "init.npz", **BASE)
        ups = [perturb(BASE, i) for i in range(3)]
        for i, u in enumerate(ups):
            np.savez(tmp_path / f"u{i}.npz", **u)
        rid = run_cli("round", "open", *addr, "--model", str(tmp_path / "init.npz"), "--expected", "3").stdout.strip()
        assert rid == "1"
        js = json.loads(run_cli("round", "info", *addr, "--round", rid, "--json").stdout)
        assert js["state"] == "open" and js["expected"] == 3
        for i in range(3):
            out = run_cli("push", *addr, "--round", rid, "--client", f"c{i}", "--num-examples", str(10 * (i + 1)),
                          str(tmp_path / f"u{i}.npz")).stdout
            assert "accepted" in out
        run_cli("pull", *addr, "--round", rid, "--wait", "20", "-o", str(tmp_path / "g.npz"))
        with np.load(tmp_path / "g.npz") as z:
            got = {k: z[k] for k in z.files}
        assert_matches(got, fedavg64(ups, [10, 20, 30]))
        st = json.loads(run_cli("status", *addr, "--json").stdout)
        assert 1 <= len(st["workers"]) <= 2 and st["rounds"][0]["state"] == "ROUND_STATE_DONE"
        human = run_cli("status", *addr).stdout
        assert "fn-" in human and "done" in human
        # failures: one line on stderr, non-zero exit
        bad = run_cli("push", *addr, "--round", "42", "--client", "x", "--num-examples", "1",
                      str(tmp_path / "u0.npz"), ok=False)
        assert bad.returncode == 1 and bad.stderr.startswith("lifl: NOT_FOUND") and bad.stderr.count("\n") == 1
        bad = run_cli("pull", *addr, "--round", "1", "-o", str(tmp_path / "x.npz"), "--initial", ok=False)
        assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "no longer kept" in bad.stderr
        bad = run_cli("round", "open", *addr, "--model", str(tmp_path / "missing.npz"), "--expected", "1", ok=False)
        assert bad.returncode == 1 and "cannot read model file" in bad.stderr
        dead = run_cli("status", "--address", "127.0.0.1:1", ok=False)
        assert dead.returncode == 1 and "UNAVAILABLE" in dead.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert list_segments(shm_prefix) == []


def test_config_file_env_and_flags(tmp_path):
    from lifl.config import load_config
    f = tmp_path / "lifl.toml"
    f.write_text('[server]\nport = 6000\nleaves = 3\nreject_nonfinite = false\n')
    cfg = load_config(f, env={"LIFL_LEAVES": "5", "LIFL_TOKENS": "a,b"}, overrides={"port": 7000})
    assert (cfg.port, cfg.leaves, cfg.reject_nonfinite, cfg.tokens) == (7000, 5, False, ["a", "b"])
    f.write_text("bogus = 1\n")
    with pytest.raises(ValueError, match="unknown setting"):
        load_config(f, env={})
    with pytest.raises(ValueError, match="fan_in"):
        load_config(None, env={"LIFL_FAN_IN": "1", "LIFL_LEAVES": "3"})


def test_a_taken_metrics_port_names_the_address(make_server):
    first = make_server(metrics_port=0)
    with pytest.raises(OSError, match=f"127.0.0.1:{first.metrics_port}.*metrics_port"):
        make_server(metrics_port=first.metrics_port)


def test_the_switch_interval_is_set_while_serving_and_restored(make_server):
    before = sys.getswitchinterval()
    srv = make_server(switch_interval_ms=0.25)
    assert sys.getswitchinterval() == pytest.approx(min(before, 0.00025))
    srv.stop()
    assert sys.getswitchinterval() == before


def test_retired_counts_keep_counters_and_histograms_not_gauges():
    """Pure: what gone processes or nodes last reported sums into counters and histograms;
    gauges and creation times are not kept (they describe what is gone)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from lifl.metrics import RetiredCounts

    def scrape_of(n: int) -> bytes:
        r = CollectorRegistry()
        Counter("lifl_x", "x", ["job"], registry=r).labels("a").inc(n)
        Gauge("lifl_g", "g", registry=r).set(n)
        Histogram("lifl_h", "h", buckets=(1, 10), registry=r).observe(n)
        return generate_latest(r)
    retired = RetiredCounts()
    assert list(text_string_to_metric_families(retired.text().decode())) == []
    retired.add_texts([scrape_of(3), scrape_of(20)])
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(retired.text().decode()) for s in f.samples}
    assert got[("lifl_x_total", (("job", "a"),))] == 23
    assert got[("lifl_h_count", ())] == 2 and got[("lifl_h_sum", ())] == 23
    assert got[("lifl_h_bucket", (("le", "10.0"),))] == 1 and got[("lifl_h_bucket", (("le", "+Inf"),))] == 2
    assert not any(name.startswith("lifl_g") or name.endswith("_created") for name, _ in got)
