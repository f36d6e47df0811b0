"""The chart and the overlays, rendered by the real Helm and kubectl and checked offline.

Every rendered object is validated against the Kubernetes schemas (kubernetes-validate, the
oldest Kubernetes the chart supports and the newest the package knows, strict: no unknown
fields), RayClusters against KubeRay's CRD, ServiceMonitor/PrometheusRule against the
Prometheus operator's CRDs. The rest checks that what the manifests say agrees with what
`lifl serve` reads (lifl.config) and with each other (selectors, ports, memory).
"""
from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from lifl.config import ServerConfig, load_config

from .image import final_stage
from .render import (BAD_VALUES, CHART, HERE, OVERLAYS, PROFILES, ROOT, cpu_count, pod_templates,
                     quantity_bytes)

K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
CONFIG_FIELDS = {f.name for f in fields(ServerConfig)}
HEAD_SCRIPT = ROOT / "deploy" / "ray-head.sh"
IMAGE = final_stage(ROOT / "deploy" / "Dockerfile")
MiB = 2**20


def _strict(schema):
    """Unknown fields are errors, as with `kubectl apply --validate=strict` (where the CRD does not
    say x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    return [_strict(v) for v in schema] if isinstance(schema, list) else schema


def _crd_schema(path: Path, version: str = "v1") -> jsonschema.Draft7Validator:
    """OpenAPI v3 schema of a CRD version (OpenAPI's subset of draft 7; Go regexes left unchecked)."""
    crd = yaml.safe_load(path.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    schema = _strict(schema)
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by Kubernetes itself
    return jsonschema.Draft7Validator(schema)


CRDS = {(f"{g}/v1", kind): _crd_schema(HERE / "data" / f) for g, kind, f in (
    ("ray.io", "RayCluster", "ray.io_rayclusters.yaml"),
    ("monitoring.coreos.com", "ServiceMonitor", "monitoring.coreos.com_servicemonitors.yaml"),
    ("monitoring.coreos.com", "PrometheusRule", "monitoring.coreos.com_prometheusrules.yaml"))}


def _config_of(objs: list[dict], tmp_path: Path) -> ServerConfig:
    """The settings the serving container's `lifl serve` reads: the rendered ConfigMap's file, then
    the image's and the container's LIFL_* variables (load_config refuses unknown keys)."""
    cms = [o for o in objs if o["kind"] == "ConfigMap" and "lifl.toml" in o.get("data", {})]
    assert len(cms) == 1, "exactly one ConfigMap with lifl.toml"
    path = tmp_path / "lifl.toml"
    path.write_text(cms[0]["data"]["lifl.toml"])
    env = {k: v for k, v in IMAGE.env.items() if k.startswith("LIFL_")}
    serving = [c for o in objs for _, labels, spec in pod_templates(o)
               if labels.get("app.kubernetes.io/component") == "gateway" for c in spec["containers"]]
    assert len(serving) == 1, "exactly one serving container"
    env.update((e["name"], e["value"]) for e in serving[0].get("env", []) if "value" in e)
    return load_config(path, env=env)


# -- the tools themselves -------------------------------------------------------------------
@pytest.mark.parametrize("profile", PROFILES)
def test_helm_lint_passes_for_every_profile(tools, profile):
    args = [a for v in PROFILES[profile] for a in ("-f", v)]
    r = tools.run(tools.helm, "lint", CHART, "--strict", *args, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


_BAD_MESSAGES = {  # what values.schema.json answers, by file
    "runtime": "/runtime", "tls-without-secret": "/tls/secretName", "unknown-setting": "worker",
    "chart-owned-setting": "port", "shm-zero": "/shm/budgetMb", "token-with-comma": "/auth/tokens/0",
    "ray-no-workers": "/ray/workerGroups", "planner-typo": "/config/planner"}


@pytest.mark.parametrize("bad", BAD_VALUES, ids=lambda p: p.stem)
def test_bad_values_are_refused_with_a_message_naming_the_value(tools, bad):
    assert set(_BAD_MESSAGES) == {p.stem for p in BAD_VALUES}
    for verb in ("lint", "template"):
        r = tools.run(tools.helm, verb, *(["lifl"] if verb == "template" else []), CHART, "-f", bad, check=False)
        assert r.returncode != 0, f"helm {verb} accepted {bad.name}"
        assert _BAD_MESSAGES[bad.stem] in r.stdout + r.stderr, r.stdout + r.stderr


def test_every_profile_and_overlay_renders_what_it_should(helm_renders, kustomize_renders):
    kinds = {name: sorted({o["kind"] for o in objs}) for name, objs in helm_renders.items()}
    assert "Deployment" in kinds["default"] and "RayCluster" not in kinds["default"]
    assert "RayCluster" in kinds["ray"] and "Deployment" not in kinds["ray"]
    assert {"ServiceMonitor", "PrometheusRule"} <= set(kinds["metrics-on"])
    assert not {"ServiceMonitor", "PrometheusRule", "NetworkPolicy", "PodDisruptionBudget"} & set(kinds["metrics-off"])
    assert "Secret" in kinds["tls-auth"] and "Secret" not in kinds["default"]
    assert {"Deployment", "Service", "ConfigMap", "NetworkPolicy", "PodDisruptionBudget"} <= {
        o["kind"] for o in kustomize_renders["single-node"]}
    assert "RayCluster" in {o["kind"] for o in kustomize_renders["ray"]}
    assert set(kustomize_renders) == {"single-node", "ray", "single-node-tls", "ray-tls"}


def test_every_rendered_object_is_valid(all_renders, tools):
    renders = dict(all_renders, prometheus=tools.kustomize(ROOT / "deploy" / "prometheus"))
    checked = 0
    for name, objs in renders.items():
        for obj in objs:
            where = f"{name}: {obj['kind']}/{obj['metadata']['name']}"
            crd = CRDS.get((obj["apiVersion"], obj["kind"]))
            if crd is not None:
                for e in crd.iter_errors(obj):
                    pytest.fail(f"{where}: {e.message} at {list(e.absolute_path)}")
            else:
                for v in K8S_VERSIONS:
                    try:
                        kubernetes_validate.validate(obj, v, strict=True)
                    except kubernetes_validate.ValidationError as e:
                        pytest.fail(f"{where} (Kubernetes {v}): {e.message} at {list(e.path)}")
            for role, labels, spec in pod_templates(obj) if obj["kind"] == "RayCluster" else []:
                # the CRD leaves pod specs loose: check them as core PodTemplates
                tpl = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                       "template": {"metadata": {"labels": labels}, "spec": spec}}
                for v in K8S_VERSIONS:
                    kubernetes_validate.validate(tpl, v, strict=True)
            checked += 1
    assert checked >= 40


def test_a_wrong_object_is_caught_by_the_same_validation(helm_renders):
    """The validators are not vacuous: one typo in a pod spec and a RayCluster without its head fail."""
    dep = next(o for o in helm_renders["default"] if o["kind"] == "Deployment")
    bad = json.loads(json.dumps(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["resurces"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)
    rc = json.loads(json.dumps(next(o for o in helm_renders["ray"] if o["kind"] == "RayCluster")))
    rc["spec"]["workerGroupSpecs"][0]["replica"] = 2
    del rc["spec"]["headGroupSpec"]
    errors = {e.validator for e in CRDS[("ray.io/v1", "RayCluster")].iter_errors(rc)}
    assert errors == {"required", "additionalProperties"}


# -- agreement with `lifl serve` ------------------------------------------------------------
def test_schema_config_keys_are_settings_lifl_serve_reads():
    schema = json.loads((CHART / "values.schema.json").read_text())
    keys = set(schema["properties"]["config"]["properties"])
    assert keys <= CONFIG_FIELDS, keys - CONFIG_FIELDS
    owned = {"host", "port", "metrics_port", "shm_budget_mb", "runtime", "ray_address", "node_gateway_port",
             "tls_cert", "tls_key", "tokens", "admin_token"}
    assert keys | owned == CONFIG_FIELDS, "a ServerConfig setting the chart neither sets nor accepts"


def _containers(objs):
    for obj in objs:
        for role, labels, spec in pod_templates(obj):
            for c in spec["containers"]:
                yield obj, role, labels, spec, c


def test_configs_env_and_ports_agree_with_lifl_serve(all_renders, tmp_path):
    script_vars = set(re.findall(r"\$\{?(LIFL_[A-Z_]+)", HEAD_SCRIPT.read_text()))
    for name, objs in all_renders.items():
        cfg = _config_of(objs, tmp_path)
        assert cfg.host == "0.0.0.0", f"{name}: must listen beyond loopback in a pod"
        secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
        for s in secrets.values():
            for key in s.get("stringData", {}):
                assert key.startswith("LIFL_") and key[5:].lower() in CONFIG_FIELDS, f"{name}: secret key {key}"
        for obj, role, labels, spec, c in _containers(objs):
            assert re.fullmatch(r"lifl:0\.1\.0(-ray)?", c["image"]) and c["image"].endswith("-ray") == (
                obj["kind"] == "RayCluster"), f"{name}: image {c['image']} (the Ray image has the ray extra)"
            for e in c.get("env", []):
                if e["name"].startswith("LIFL_"):
                    assert e["name"][5:].lower() in CONFIG_FIELDS or e["name"] in script_vars, f"{name}: {e['name']}"
            for ref in c.get("envFrom", []):
                sec = ref["secretRef"]
                assert sec["name"] in secrets or sec.get("optional") or name == "helm:metrics-off", \
                    f"{name}: envFrom names a Secret that is neither rendered nor optional"
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            if labels.get("app.kubernetes.io/component") == "gateway":
                assert ports["grpc"] == cfg.port
                if cfg.metrics_port >= 0:
                    assert ports["metrics"] == cfg.metrics_port
                else:
                    assert "metrics" not in ports
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    p = c[probe]
                    target = p["grpc"]["port"] if "grpc" in p else ports[p["tcpSocket"]["port"]]
                    assert target == cfg.port, f"{name}: {probe} checks port {target}"
                    assert ("grpc" in p) == (not cfg.tls_cert), "gRPC probes are plaintext: TCP with TLS"
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                assert "/srv/lifl/config" in mounts, "config/lifl.toml relative to WORKDIR /srv/lifl"
                if cfg.tls_cert:
                    assert cfg.tls_cert.startswith(("tls/", "/srv/lifl/tls/")) and "/srv/lifl/tls" in mounts
            elif role != "Deployment":  # a Ray worker: its LIFL gateway
                assert ports["gateway"] == cfg.node_gateway_port
        kinds = {o["kind"] for o in objs}
        if "RayCluster" in kinds:
            assert cfg.runtime == "ray" and cfg.ray_address == "auto" and cfg.node_gateway_port > 0
        else:
            assert cfg.runtime == "local"


def test_key_files_the_config_names_are_mounted_where_lifl_reads_them(all_renders, tmp_path):
    """TLS, the client CA (mutual TLS), the token key and the revocation list: every file the rendered
    config names is in a volume mounted at its directory in every LIFL container — the head and, on
    Ray, each worker, whose node gateway serves the same TLS — from the Secret/ConfigMap the values
    name; the revocation list as a directory (not a subPath), so that edits reach the running pod."""
    checked = set()
    for name, objs in all_renders.items():
        cfg = _config_of(objs, tmp_path)
        files = [f for f in (cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca, cfg.token_key, cfg.token_revoked) if f]
        for obj, role, labels, spec, c in _containers(objs):
            if not c["image"].startswith("lifl:"):
                continue
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for f in files:
                d = f.rsplit("/", 1)[0] if f.startswith("/") else "/srv/lifl/" + f.rsplit("/", 1)[0]  # WORKDIR
                assert d in mounts, f"{name}: {role} does not mount {d} for {f}"
                assert "subPath" not in mounts[d] and mounts[d].get("readOnly"), f"{name}: {d}"
                vol = volumes[mounts[d]["name"]]
                source = vol.get("secret", {}).get("secretName") or vol.get("configMap", {}).get("name")
                assert source, f"{name}: {d} comes from no Secret or ConfigMap"
                checked.add(f)
        if name == "helm:mtls-keys":
            assert cfg.tls_client_ca and cfg.tls_operators == ["ops-1", "ops-2"]
            assert cfg.token_key and cfg.token_revoked
    assert {"/srv/lifl/client-ca/ca.crt", "/srv/lifl/token-key/lifl.pub", "/srv/lifl/revoked/revoked.txt"} <= checked


def test_shared_memory_and_cpus_add_up(all_renders, tmp_path):
    """/dev/shm holds LIFL's slots + accumulators/results (+ Ray's object store); tmpfs pages are
    charged to the pod, so the memory limit holds the volume plus room for the processes."""
    for name, objs in all_renders.items():
        cfg = _config_of(objs, tmp_path)
        total_cpus = 0.0
        for obj, role, labels, spec, c in _containers(objs):
            vols = {v["name"]: v for v in spec["volumes"]}
            shm = [vols[m["name"]] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert len(shm) == 1 and shm[0]["emptyDir"]["medium"] == "Memory", f"{name}/{role}: /dev/shm"
            size = quantity_bytes(shm[0]["emptyDir"]["sizeLimit"])
            need = cfg.shm_budget_mb * MiB
            if obj["kind"] == "RayCluster":
                group = (obj["spec"]["headGroupSpec"] if labels["ray.io/node-type"] == "head" else
                         next(g for g in obj["spec"]["workerGroupSpecs"] if g["groupName"] == role))
                need += int(group["rayStartParams"]["object-store-memory"])
                total_cpus += float(group["rayStartParams"]["num-cpus"]) * group.get("replicas", 1)
                assert float(group["rayStartParams"]["num-cpus"]) < cpu_count(c["resources"]["limits"]["cpu"]), \
                    f"{name}/{role}: a core must stay with the node's gateway"
            else:
                total_cpus += cpu_count(c["resources"]["limits"]["cpu"])
            assert size >= need + 256 * MiB, f"{name}/{role}: /dev/shm {size} < slots+store {need} + results"
            limits, requests = c["resources"]["limits"], c["resources"]["requests"]
            assert quantity_bytes(limits["memory"]) >= size + 1024 * MiB, f"{name}/{role}: memory limit"
            assert requests["memory"] == limits["memory"], f"{name}/{role}: evicting it fails rounds"
        assert cfg.workers <= total_cpus, f"{name}: {cfg.workers} functions on {total_cpus} CPUs"
        assert cfg.leaves <= cfg.workers


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_and_references_find_their_objects(all_renders):
    for name, objs in all_renders.items():
        pods = [labels for obj in objs for _, labels, _ in pod_templates(obj)]
        by_kind = {}
        for o in objs:
            by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
        for o in objs:
            sel = {"Service": lambda s: s.get("selector"),
                   "PodDisruptionBudget": lambda s: s["selector"]["matchLabels"],
                   "NetworkPolicy": lambda s: s["podSelector"]["matchLabels"],
                   "Deployment": lambda s: s["selector"]["matchLabels"]}.get(o["kind"], lambda s: None)(o.get("spec", {}))
            if sel:
                assert any(_matches(sel, p) for p in pods), f"{name}: {o['kind']}/{o['metadata']['name']} selects no pod"
            if o["kind"] == "ServiceMonitor":
                svcs = [s for s in by_kind["Service"].values()
                        if _matches(o["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
                assert len(svcs) == 1 and {p["name"] for p in svcs[0]["spec"]["ports"]} >= {"metrics"}
            if o["kind"] == "Service":
                targets = {p["name"] for _, labels, spec in (t for obj in objs for t in pod_templates(obj))
                           if _matches(o["spec"]["selector"], labels) for c in spec["containers"]
                           for p in c.get("ports", [])}
                for port in o["spec"]["ports"]:
                    assert port["targetPort"] in targets, f"{name}: Service {o['metadata']['name']} -> {port}"
        for obj in objs:
            for _, _, spec in pod_templates(obj):
                for v in spec.get("volumes", []):
                    if "configMap" in v and v["name"] != "revoked":   # the operator's own list (auth.revokedConfigMap)
                        assert v["configMap"]["name"] in by_kind["ConfigMap"], f"{name}: volume {v['name']}"


def test_prometheus_rules_in_deploy_are_the_charts(helm_renders, tools):
    chart = next(o for o in helm_renders["metrics-on"] if o["kind"] == "PrometheusRule")
    plain = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheusrule.yaml").read_text())
    assert plain["spec"] == chart["spec"]
    sm = next(o for o in tools.kustomize(ROOT / "deploy" / "prometheus") if o["kind"] == "ServiceMonitor")
    svc = next(o for o in tools.kustomize(OVERLAYS[0]) if o["metadata"]["name"] == "lifl-metrics")
    assert _matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    dash = next(o for o in helm_renders["metrics-on"] if o["kind"] == "ConfigMap" and "lifl.json" in o["data"])
    assert json.loads(dash["data"]["lifl.json"]) == json.loads((ROOT / "deploy/grafana/lifl-dashboard.json").read_text())


@pytest.mark.parametrize("profile", ["default", "tls-auth", "ray"])
def test_notes_name_the_rendered_service_and_warn_without_tokens(tools, helm_renders, profile):
    args = [a for v in PROFILES[profile] for a in ("-f", v)]
    out = tools.run(tools.helm, "install", "lifl", CHART, "--namespace", "fl", "--dry-run=client", *args).stdout
    notes = out[out.index("NOTES:"):]
    svc = next(o for o in helm_renders[profile] if o["kind"] == "Service" and o["spec"]["ports"][0]["name"] == "grpc")
    assert f"{svc['metadata']['name']}.fl.svc:{svc['spec']['ports'][0]['port']}" in notes
    assert ("WARNING: no tokens" in notes) == (not any(o["kind"] == "Secret" for o in helm_renders[profile]))
    assert ("raycluster" in notes) == (profile == "ray")


def test_ray_autoscaling_is_off_by_default_and_bounded_when_on(helm_renders):
    def cluster(profile):
        return next(o for o in helm_renders[profile] if o["kind"] == "RayCluster")["spec"]
    off, on = cluster("ray"), cluster("ray-autoscaling")
    assert off["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in off
    assert all(g["minReplicas"] == g["maxReplicas"] == g["replicas"] for g in off["workerGroupSpecs"])
    assert on["enableInTreeAutoscaling"] is True and on["autoscalerOptions"]["idleTimeoutSeconds"] == 120
    (group,) = on["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (0, 1, 8)
