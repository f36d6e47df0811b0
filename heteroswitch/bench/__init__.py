"""``heteroswitch bench``: the device-heterogeneity benchmark.

One job per module: :mod:`.config` (what an experiment is), :mod:`.job` (one
(seed, method) run), :mod:`.runner` (every job, in worker processes when asked),
:mod:`.report` (summary, tables, plots), :mod:`.presets` (named sizes and
data).  The command line, :mod:`heteroswitch.cli`, imports this package; nothing
here imports it back.

Methods (all FedAvg-aggregated through :mod:`heteroswitch.aggregate`: a LIFL
server at ``lifl_address``, or in process with LIFL's finalize):

* ``fedavg``        plain local SGD
* ``isp``           random ISP transformation always on
* ``swad``          SWAD always on
* ``isp_swad``      both always on (the compute reference for the switch)
* ``heteroswitch``  the bias switch decides per client and round

Every method gets the same client learning rate per round (cosine decay by
default, :func:`round_lr`); HeteroSwitch clients get the server reference
loss of :class:`~heteroswitch.bias.ServerReference` (median of the previous
round's reported pre-training losses, EMA-smoothed).  Besides the final round,
every round of the last ``tail_rounds`` is evaluated and reported averaged.

Per seed, the federated dataset is rendered once and shared by all methods, the
initial model and the client sample of each round are identical across
methods, so differences are the methods' own.  Each (seed, method) is a *job*;
jobs can run in parallel worker processes (``--workers``), which exchange only
JSON files and ``.npz`` arrays (no pickle).

Outputs in ``--out``: ``results.json`` (config, every job's history and final
per-device metrics, the summary and the goal check), ``table.md`` (mean +- std
over seeds), ``per_device_ap.png``, ``variance_over_rounds.png``, and the
Pareto report of accuracy/fairness against client cost (``pareto.md``,
``pareto.json``, ``pareto_<cost>.png``; :mod:`heteroswitch.pareto`).
"""

from __future__ import annotations

from .config import METHODS, PRIMARY, BenchConfig, config_from_dict, config_to_dict, round_lr
from .job import run_job
from .report import render_table, report_from_jobs, summarize
from .runner import run_bench

__all__ = ["METHODS", "PRIMARY", "BenchConfig", "run_job", "run_bench", "summarize", "render_table",
           "report_from_jobs", "config_from_dict", "config_to_dict", "round_lr"]
