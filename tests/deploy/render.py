"""Render the chart and the overlays with the real tools, and look inside what they render."""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "lifl"
KUSTOMIZE = ROOT / "deploy" / "kustomize"
HERE = Path(__file__).parent
PROFILES = {"default": [], **{p.stem: [p] for p in sorted((HERE / "values").glob("*.yaml"))}}
BAD_VALUES = sorted((HERE / "bad").glob("*.yaml"))
OVERLAYS = sorted(p for p in (KUSTOMIZE / "overlays").iterdir() if p.is_dir())
# overlays as an operator composes them (overlay + deploy/kustomize/components/tls)
COMPOSED = sorted(p for p in (HERE / "kustomize").iterdir() if p.is_dir())


@dataclass
class Tools:
    helm: Path
    kubectl: Path

    def run(self, *argv, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
        if check and r.returncode:
            raise AssertionError(f"{' '.join(map(str, argv))} failed ({r.returncode}):\n{r.stderr}")
        return r

    def helm_template(self, values: list[Path], *extra: str) -> list[dict]:
        args = [a for v in values for a in ("-f", v)]
        out = self.run(self.helm, "template", "lifl", CHART, "--namespace", "fl", *args, *extra).stdout
        return docs(out)

    def kustomize(self, path: Path) -> list[dict]:
        return docs(self.run(self.kubectl, "kustomize", path).stdout)


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def pod_templates(obj: dict) -> list[tuple[str, dict, dict]]:
    """(role, pod metadata labels incl. what KubeRay adds, pod spec) of a workload object."""
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        t = obj["spec"]["template"]
        return [(kind, t["metadata"].get("labels", {}), t["spec"])]
    if kind == "RayCluster":
        name = obj["metadata"]["name"]
        head = obj["spec"]["headGroupSpec"]["template"]
        out = [("head", {**head["metadata"].get("labels", {}), "ray.io/cluster": name, "ray.io/node-type": "head"},
                head["spec"])]
        for g in obj["spec"].get("workerGroupSpecs", []):
            t = g["template"]
            out.append((g["groupName"], {**t["metadata"].get("labels", {}), "ray.io/cluster": name,
                                         "ray.io/node-type": "worker", "ray.io/group": g["groupName"]}, t["spec"]))
        return out
    return []


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "": 1}


def quantity_bytes(q: str | int) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]i|[kMG])?", str(q))
    assert m, f"unexpected quantity {q!r}"
    return int(m.group(1)) * _UNITS[m.group(2) or ""]


def cpu_count(q: str | int) -> float:
    s = str(q)
    return int(s[:-1]) / 1000 if s.endswith("m") else float(s)
