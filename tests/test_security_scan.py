"""Static security check (bandit) over the shipped packages: no finding may stand unless it is
justified in place (``# nosec Bxxx  # why`` on its line)."""
import json
import subprocess  # nosec B404  # runs bandit
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bandit_finds_nothing_unjustified():
    pytest.importorskip("bandit")
    run = subprocess.run([sys.executable, "-m", "bandit", "-r", "lifl", "heteroswitch", "-f", "json", "-q"],  # nosec B603
                         cwd=ROOT, capture_output=True, text=True, timeout=240)
    report = json.loads(run.stdout)
    assert not report["errors"], report["errors"]
    assert not report["results"], "\n".join(
        f"{r['filename']}:{r['line_number']} {r['test_id']} {r['issue_text']}" for r in report["results"])
