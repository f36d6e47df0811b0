"""The image's exact command, run here as the container would run it, answering health checks
and exporting every metric the dashboard and the alerts name.

Inside the image: WORKDIR /srv/lifl, `lifl serve --config config/lifl.toml`, the settings a
ConfigMap mounted at config/, tokens from a Secret as LIFL_* variables. Here: the same argv
from deploy/Dockerfile in a temporary directory standing for /srv/lifl, the ConfigMap's file
as kustomize renders it, the Dockerfile's ENV plus the Secret's LIFL_* variables as Helm
renders them, and LIFL_* overrides to stay on loopback with free ports.
"""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lifl.client import Client, RpcFailure
from lifl.config import load_config
from lifl.errors import LiflError
from lifl.shm import list_segments
from support import assert_matches, fedavg64, perturb, small_model

from .image import final_stage
from .probes import NOT_SERVING, SERVING, check, watch
from .render import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# labels Prometheus adds to every scraped series (target labels), and histograms' bucket label
SCRAPE_LABELS = {"namespace", "pod", "le"}


def _configmap_file(objs) -> str:
    return next(o["data"]["lifl.toml"] for o in objs if o["kind"] == "ConfigMap" and "lifl.toml" in o["data"])


@pytest.fixture(scope="module")
def served(tools, tmp_path_factory):
    """`lifl serve` started from the Dockerfile's ENTRYPOINT in a directory laid out like the image."""
    from .render import OVERLAYS, PROFILES
    stage = final_stage(DOCKERFILE)
    single = next(p for p in OVERLAYS if p.name == "single-node")
    workdir = tmp_path_factory.mktemp("srv-lifl")
    (workdir / "config").mkdir()
    (workdir / "config" / "lifl.toml").write_text(_configmap_file(tools.kustomize(single)))
    secret = next(o for o in tools.helm_template(PROFILES["tls-auth"]) if o["kind"] == "Secret")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFL_")}
    env.update(stage.env)
    env.update(secret["stringData"])                      # envFrom: LIFL_TOKENS, LIFL_ADMIN_TOKEN
    prefix = f"lifltest{uuid.uuid4().hex[:8]}"
    env.update(LIFL_HOST="127.0.0.1", LIFL_PORT="0", LIFL_METRICS_PORT="0", LIFL_SHM_PREFIX=prefix,
               LIFL_SHM_BUDGET_MB="64")
    # the image's PATH starts with its venv's bin; here that is this interpreter's
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    proc = subprocess.Popen(stage.command, cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
    log, m, deadline = [], None, time.monotonic() + 60
    while m is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            log.append(lines.get(timeout=0.5))
        except queue.Empty:
            continue
        m = re.search(r"serving on (\S+) .*metrics on :(\d+)", log[-1])
    if m is None:
        proc.kill()
        proc.wait(10)
        while not lines.empty():
            log.append(lines.get_nowait())
        pytest.fail("lifl serve did not start:\n" + "".join(log))
    yield {"proc": proc, "address": m.group(1), "metrics": f"http://127.0.0.1:{m.group(2)}/metrics",
           "tokens": secret["stringData"]["LIFL_TOKENS"].split(","), "admin": secret["stringData"]["LIFL_ADMIN_TOKEN"],
           "prefix": prefix, "log": log, "lines": lines}
    if proc.poll() is None:  # a test failed before SIGTERM: stop it the same way
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert list_segments(prefix) == [], "shared-memory segments left behind"


def test_dockerfile_runs_what_the_manifests_expect(all_renders):
    stage = final_stage(DOCKERFILE)
    assert stage.command == ["lifl", "serve", "--config", "config/lifl.toml"]
    assert stage.workdir == "/srv/lifl" and stage.user.split(":")[0] == "10001"
    assert ("deploy/kustomize/base/lifl.toml", "/srv/lifl/config/lifl.toml") in stage.copies
    assert ("deploy/ray-head.sh", "/opt/lifl/bin/lifl-ray-head") in stage.copies
    assert stage.env["PATH"].startswith("/opt/lifl/bin:")
    for name, objs in all_renders.items():
        for o in objs:
            if o["kind"] == "RayCluster":
                assert o["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["command"] == ["lifl-ray-head"]
            spec = (o["spec"]["template"]["spec"] if o["kind"] == "Deployment" else
                    o["spec"]["headGroupSpec"]["template"]["spec"] if o["kind"] == "RayCluster" else None)
            if spec is not None:
                assert spec["securityContext"]["runAsUser"] == int(stage.user.split(":")[0]), name
                for m in spec["containers"][0]["volumeMounts"]:
                    assert not m["mountPath"].startswith(stage.workdir) or m["mountPath"] in (
                        f"{stage.workdir}/config", f"{stage.workdir}/tls", f"{stage.workdir}/client-ca",
                        f"{stage.workdir}/token-key", f"{stage.workdir}/revoked"), f"{name}: {m}"
    # the image listens where it says, by its baked-in settings and ENV
    cfg = load_config(ROOT / "deploy" / "kustomize" / "base" / "lifl.toml",
                      env={k: v for k, v in stage.env.items() if k.startswith("LIFL_")})
    assert sorted(stage.expose) == sorted([cfg.port, cfg.metrics_port]) and cfg.host == "0.0.0.0"


def test_serves_health_to_probes_without_a_token(served):
    for service in ("", "lifl.v1.Aggregation", "lifl.v1.Admin"):
        assert check(served["address"], service) == SERVING
    with pytest.raises(grpc.RpcError) as e:
        check(served["address"], "no.such.Service")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # the tokens from the Secret are in force: the LIFL services refuse a caller without one
    with Client(served["address"], retry_s=0) as c, pytest.raises(RpcFailure) as e:
        c.status()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def _exprs() -> list[str]:
    dash = json.loads((ROOT / "deploy" / "grafana" / "lifl-dashboard.json").read_text())
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for v in dash["templating"]["list"]:  # Grafana's label_values(<selector>, <label>)
        if isinstance(v.get("query"), dict):
            m = re.fullmatch(r"label_values\((.*), *(\w+)\)", v["query"]["query"])
            out.append(f"count by ({m.group(2)}) ({m.group(1)})")
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheusrule.yaml").read_text())
    out += [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    return out


def _selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, labels it matches on or aggregates by) for each selector, by Prometheus' grammar
    (promql-parser); a syntax error in a query fails here."""
    tree = promql_parser.parse(expr.replace("$__rate_interval", "5m"))
    out, by = [], set()

    def visit(node):
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            by.update(node.modifier.labels)
        if isinstance(node, promql_parser.VectorSelector):
            out.append((node.name, {m.name for m in node.matchers.matchers}))

    promql_parser.walk(tree, visit)
    return [(name, used | by) for name, used in out]


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def test_every_metric_the_dashboard_and_alerts_name_is_exported(served):
    addr, (client_token, _), admin = served["address"], served["tokens"], served["admin"]
    model = small_model(1)
    updates = [perturb(model, s) for s in (2, 3)]
    with Client(addr, token=admin) as a, Client(addr, token=client_token) as c:
        rid = a.open_round(model, expected=2)
        for i, u in enumerate(updates):
            c.push(rid, u, num_examples=10 * (i + 1), client_id=f"c{i}")
        assert_matches(c.pull(rid, wait_s=60), fedavg64(updates, [10, 20]))
        with pytest.raises(RpcFailure) as e:
            c.push(rid + 1000, updates[0], num_examples=1, client_id="late")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
    deadline = time.monotonic() + 20  # gauges of shared memory are sampled every 0.5 s
    while True:
        fams = _scrape(served["metrics"])
        shm = {s.labels.get("kind") for s in fams["lifl_shm_bytes"].samples}
        if "slots" in shm or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    exposed = {f"{n}{sfx}": f for n, f in fams.items() for sfx in _SUFFIXES.get(f.type, ("",))}
    named = set()
    for expr in _exprs():
        for metric, labels_used in _selectors(expr):
            named.add(metric)
            assert metric in exposed, f"{metric} (in {expr!r}) is not exported by lifl serve"
            fam = exposed[metric]
            if fam.samples:
                labels = {k for s in fam.samples for k in s.labels}
                assert labels_used - SCRAPE_LABELS <= labels, f"{metric}: labels {labels_used - labels} unknown"
    assert len(named) >= 15, named
    # label values the alerts match: as the server writes them
    assert {s.labels["outcome"] for s in fams["lifl_rounds"].samples} >= {"done"}
    assert {s.labels["reason"] for s in fams["lifl_updates_rejected"].samples} == {"not_found"}
    assert LiflError("RESOURCE_EXHAUSTED", "").reason == "resource_exhausted"
    assert "slots" in shm


def test_sigterm_turns_health_not_serving_then_exits_cleanly(served):
    """Kubernetes stops a pod with SIGTERM: the health service says NOT_SERVING first (readiness
    fails, the Service stops routing), then the server exits 0 and unlinks its shared memory."""
    proc = served["proc"]
    seen = watch(served["address"])
    assert seen.get(timeout=10) == SERVING
    proc.send_signal(signal.SIGTERM)
    assert seen.get(timeout=30) == NOT_SERVING
    assert proc.wait(60) == 0
    assert list_segments(served["prefix"]) == []
