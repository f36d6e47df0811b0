"""Bad simulation settings are refused before anything starts, with the setting named."""
from __future__ import annotations

import pytest

from lifl.cli import main
from lifl.sim.config import SimConfigError, load


@pytest.mark.parametrize("overrides, match", [
    ({"trace.kind": "sometimes"}, "unknown trace kind 'sometimes'"),
    ({"workload.clients_per_round": -5}, "clients_per_round must be between 1"),
    ({"workload.rounds": 0}, "rounds must be >= 1"),
    ({"workload.population": 10, "workload.clients_per_round": 20}, "population .10. is smaller"),
    ({"workload.dropout": 1.0}, "dropout must be in"),
    ({"trace.window_s": -1.0}, "window_s must be a finite number >= 0"),
    ({"trace.kind": "file"}, "needs trace.path"),
    ({"run.variants": "lifl,eager_ish"}, "unknown variant"),
    ({"run.variants": "lifl,no_shm", "server.runtime": "ray"}, "variant 'no_shm' .*local runtime only"),
    ({"run.mode": "dream"}, "run.mode must be one of"),
    ({"run.sizes": "10,x"}, "sizes must be integers"),
    ({"workload.rounds": 1.5}, "must be an integer"),
    ({"server.leaves": 0}, r"\[server\]: leaves and workers must be >= 1"),
    ({"server.colour": "red"}, r"\[server\]: unknown setting"),
    ({"bogus.x": 1}, "unknown table"),
])
def test_bad_settings_are_named(overrides, match):
    with pytest.raises(SimConfigError, match=match):
        load(None, overrides)


def test_toml_file_and_overrides(tmp_path):
    p = tmp_path / "sim.toml"
    p.write_text('[workload]\nclients_per_round = 7\nrounds = 2\n[trace]\nkind = "uniform"\nwindow_s = 3\n'
                 '[run]\nvariants = ["lifl", "flat"]\n[server]\nleaves = 2\n')
    cfg = load(p, {"workload.rounds": 3})
    assert (cfg.workload.clients_per_round, cfg.workload.rounds, cfg.trace.window_s) == (7, 3, 3.0)
    assert cfg.run.variants == ("lifl", "flat") and cfg.server == {"leaves": 2}
    p.write_text("[workload\n")
    with pytest.raises(SimConfigError, match="cannot read"):
        load(p)


def test_cli_reports_a_bad_config_in_one_line(tmp_path, capsys):
    assert main(["sim", "run", "--trace", "sometimes", "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "unknown trace kind 'sometimes'" in err and not (tmp_path / "o").exists()
    missing = tmp_path / "none.jsonl"
    assert main(["sim", "run", "--trace", "file", "--trace-file", str(missing), "-o", str(tmp_path / "o")]) == 1
    assert "cannot read trace" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["sim", "report", str(tmp_path / "nothing.json")]) == 1
    assert "cannot read run record" in capsys.readouterr().err
