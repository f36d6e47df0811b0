"""Run every (seed, method) job of an experiment: render the datasets once, then the jobs in
this process or in worker processes, then the report."""

from __future__ import annotations

import json
import os
import subprocess  # nosec B404  # runs this package's own training jobs
import sys
import time
from pathlib import Path

from ..flair_bench import load_flair_dataset
from ..scenes import load_dataset, make_federated_dataset, save_dataset
from ..trainer import resolve_device
from .config import BenchConfig, config_to_dict
from .job import data_path, run_job
from .report import write_report

def _prepare_data(cfg: BenchConfig, out: Path, log) -> None:
    dev = resolve_device(cfg.device)
    for s in cfg.seeds:
        p = data_path(out, s)
        if not p.exists():
            t = time.perf_counter()
            ds = load_flair_dataset(cfg.flair, seed=s, device=dev) if cfg.flair is not None else \
                make_federated_dataset(cfg.data, seed=s, device=dev)
            save_dataset(ds, p)
            log(f"rendered dataset seed={s} -> {p} ({time.perf_counter() - t:.1f}s)")


def _job_cmd(cfg_path: Path, seed: int, method: str, out_json: Path) -> list[str]:
    return [sys.executable, "-m", "heteroswitch.bench", "_job", str(cfg_path), str(seed), method, str(out_json)]


LAUNCH_STAGGER_S = 1.0  # seconds between worker start-ups
JOB_RETRIES = 1  # a worker killed by a signal (e.g. SIGKILL by the OOM killer) is started again this often


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Run every (seed, method) job, write results, table and plots; return the summary."""
    if cfg.aggregator == "lifl" and not cfg.lifl_address:  # say so before rendering any data
        raise ValueError("--aggregator lifl needs --lifl-address HOST:PORT of a running LIFL server "
                         "(start one with `lifl serve --port 50051`)")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _prepare_data(cfg, out, log)
    jobs_spec = [(s, m) for s in cfg.seeds for m in cfg.methods]
    results: list[dict] = []
    failed: list[str] = []
    # one LIFL server (the caller's, at cfg.lifl_address) for the whole experiment, one LIFL job per
    # (seed, method); every job makes its own aggregator from the config
    log(f"aggregator: {cfg.aggregator_name}" + (f" at {cfg.lifl_address}" if cfg.aggregator_name == "lifl" else ""))
    if cfg.workers <= 1:
        for s, m in jobs_spec:
            results.append(run_job(cfg, load_dataset(data_path(out, s)), s, m, log=log))
    else:
        cfg_path = out / "config.json"
        cfg_path.write_text(json.dumps(config_to_dict(cfg), indent=1))
        pending = [(s, m, 0) for s, m in jobs_spec]
        running: list[tuple[subprocess.Popen, Path, tuple]] = []
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        while pending or running:
            while pending and len(running) < cfg.workers:
                s, m, tries = spec = pending.pop(0)
                oj = out / f"job_{m}_s{s}.json"
                running.append((subprocess.Popen(_job_cmd(cfg_path, s, m, oj), env=env), oj, spec))  # nosec B603  # argv from _job_cmd, no shell
                # stagger start-ups: many processes initialising torch/CUDA at once can exhaust host
                # memory on a VM whose memory grows on demand (jobs were SIGKILLed at start-up there)
                time.sleep(LAUNCH_STAGGER_S)
            time.sleep(0.5)
            for p, oj, (s, m, tries) in list(running):
                if p.poll() is not None:
                    running.remove((p, oj, (s, m, tries)))
                    if p.returncode < 0 and tries < JOB_RETRIES:  # killed by a signal: run it again once
                        log(f"WARNING: bench job {oj.name} killed by signal {-p.returncode}; restarting it")
                        pending.insert(0, (s, m, tries + 1))
                        continue
                    if p.returncode != 0:  # keep going: report what finished, say what did not
                        failed.append(f"{oj.name} (exit code {p.returncode})")
                        log(f"WARNING: bench job {oj.name} failed with exit code {p.returncode}")
                        continue
                    results.append(json.loads(oj.read_text()))
    if not results:
        raise RuntimeError(f"every bench job failed: {failed}")
    return write_report(cfg, results, out, time.perf_counter() - t0, log, failed)


