"""The Admin service: open (synchronous rounds and asynchronous jobs) and close rounds, report
status. Operators' calls; the interceptor (``lifl.auth``) has checked who may make them."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time

import numpy as np

from . import __version__
from .auth import check_scope, current
from .async_jobs import AsyncJobs
from .async_proto import optimizer_from_proto, spec_from_proto
from .engine.optimizers import ServerOptimizer
from .errors import LiflError, quote
from .fold import journal_bytes
from .layout import Layout
from .serverstep import state_dtype, state_nbytes
from .rounds import job_name
from .v1 import aggregation_pb2 as pb

from .rpc import Service, async_info, check_encoding, layout_of, round_info

log = logging.getLogger("lifl.admin")


class Admin(Service):
    def __init__(self, config, arena, dispatcher, metrics, asyncs: AsyncJobs):
        super().__init__(config, arena, dispatcher, metrics)
        self.asyncs = asyncs
        self.started = time.time()
        self._opt_states: dict[str, tuple] = {}     # job -> (optimizer, (numel, moments), state segment)
        self._opt_lock = threading.Lock()

    def open_round(self, it, context) -> pb.RoundInfo:
        h = self._first(it, pb.OpenRoundRequest, "OpenRoundHeader")
        job = job_name(h.job)
        check_scope(current(), job)
        check_encoding(h.encoding)
        if h.mode == pb.JOB_MODE_ASYNC:
            return self._open_async(h, job, it)
        if h.mode not in (pb.JOB_MODE_UNSPECIFIED, pb.JOB_MODE_SYNC):
            raise LiflError("INVALID_ARGUMENT", f"unknown job mode {h.mode}; use JOB_MODE_SYNC or JOB_MODE_ASYNC")
        if h.HasField("async_options"):
            raise LiflError("INVALID_ARGUMENT", "async_options are for mode JOB_MODE_ASYNC only")
        opt = optimizer_from_proto(h.optimizer) if h.HasField("optimizer") else None
        if opt is not None and opt.is_identity:
            opt = None
        if opt is not None and self.config.durable_dir:
            raise LiflError("UNIMPLEMENTED", "this server runs in durable mode (durable_dir), which does not cover "
                                             "server optimizers on rounds (their state spans rounds); open the "
                                             "round without one, or use a server without durable_dir")
        if self.asyncs.get(job) is not None:
            raise LiflError("FAILED_PRECONDITION", f"job {quote(job)} is asynchronous: it has versions, not rounds; "
                                                   "open rounds under another job name")
        initial = None
        try:
            if h.from_round:
                with self.dispatcher.model(job, h.from_round, False, 0.0) as (prev, seg):
                    layout = prev.round.layout
                    initial = self.arena.share(seg.name)   # the same bytes, not a copy
                if next(it, None) is not None:
                    raise LiflError("INVALID_ARGUMENT", "no model chunks may follow a header with from_round")
            else:
                layout = layout_of(h.tensors)
                if h.total_size and h.total_size != layout.total_size:
                    raise LiflError("INVALID_ARGUMENT", f"total_size {h.total_size} != {layout.total_size}, the "
                                                        "model's size in the flat layout")
                self._check_room(layout, with_initial=bool(h.total_size))
                if h.total_size:
                    initial = self.arena.segment(layout.total_size)
                    self._receive(it, initial.array(np.uint8, layout.total_size), pb.OpenRoundRequest,
                                  "initial model")
                elif next(it, None) is not None:
                    raise LiflError("INVALID_ARGUMENT", "model chunks sent but total_size is 0")
            step = None
            if opt is not None:
                if initial is None:
                    raise LiflError("INVALID_ARGUMENT", "a server optimizer steps from the round's initial model: "
                                                        "stream it after the header or open with from_round")
                step = self._optimizer_step(job, opt, layout, initial.name)
            rnd = self.dispatcher.open_round(job, layout, h.expected, h.quorum, h.deadline_seconds, initial,
                                             from_round=h.from_round, step=step)
        except BaseException:
            if initial is not None:
                self.arena.free(initial.name)
            raise
        return round_info(self.dispatcher.get(job, rnd.id))

    def _optimizer_step(self, job: str, opt: ServerOptimizer, layout: Layout, base: str) -> dict:
        """The finalize step of a round of ``job``: its optimizer state (shared memory, double
        buffered) carries over from the job's previous round when the optimizer and model size
        are the same, else it starts afresh."""
        with self._opt_lock:
            held = self._opt_states.get(job)
            if held is None or held[0] != opt or held[1] != (layout.numel, state_dtype(layout)):
                if held is not None:
                    self.arena.free(held[2].name)
                seg = self.arena.segment(state_nbytes(opt, layout))
                seg.array(np.uint8)[:] = 0
                self._opt_states[job] = held = (opt, (layout.numel, state_dtype(layout)), seg)
        return {"opt": dataclasses.asdict(opt), "base": base, "state": held[2].name, "moments": state_dtype(layout)}

    def _open_async(self, h: pb.OpenRoundHeader, job: str, it) -> pb.RoundInfo:
        if self.config.durable_dir:
            raise LiflError("UNIMPLEMENTED", "this server runs in durable mode (durable_dir), which covers "
                                             "synchronous rounds only: asynchronous (FedBuff) jobs are not "
                                             "persisted; run them on a server without durable_dir")
        spec = spec_from_proto(h.async_options, h.optimizer if h.HasField("optimizer") else None)
        if h.from_round or not h.total_size:
            raise LiflError("INVALID_ARGUMENT", "an asynchronous job opens with its initial model (version 0) "
                                                "streamed after the header; from_round is not supported")
        layout = layout_of(h.tensors)
        if h.total_size != layout.total_size:
            raise LiflError("INVALID_ARGUMENT", f"total_size {h.total_size} != {layout.total_size}, the "
                                                "model's size in the flat layout")
        self._check_room(layout, with_initial=True)
        initial = self.arena.segment(layout.total_size)
        try:
            self._receive(it, initial.array(np.uint8, layout.total_size), pb.OpenRoundRequest, "initial model")
            aj = self.asyncs.open(job, layout, initial, spec)
        except BaseException:
            self.arena.free(initial.name)
            raise
        return async_info(aj)

    def _check_room(self, layout: Layout, with_initial: bool) -> None:
        """Refuse a model no update could ever be pushed for, or one shared memory cannot hold,
        before anything is allocated: a 40-byte header may declare an exabyte."""
        limit = min(self.config.max_model_mb * 2**20, self.arena.budget)
        if layout.total_size > limit:
            raise LiflError("INVALID_ARGUMENT",
                            f"the model is {layout.total_size} bytes; this server takes models up to {limit} bytes "
                            "(max_model_mb, and an update must fit in shm_budget_mb)")
        # the initial model, one leaf's float64 sum and its journal, and the result
        need = layout.total_size * (2 if with_initial else 1) + layout.numel * 8 + journal_bytes(layout.numel)
        self.arena.ensure_room(need, f"a round of a {layout.total_size}-byte model")

    def close_round(self, req: pb.CloseRoundRequest, context) -> pb.RoundInfo:
        check_scope(current(), job_name(req.job))
        if req.round == 0 and self.asyncs.get(job_name(req.job)) is not None:
            return async_info(self.asyncs.close_job(job_name(req.job)))
        self.dispatcher.close_round(req.job, req.round, req.abort)
        return round_info(self.dispatcher.get(req.job, req.round))

    def status(self, req, context) -> pb.StatusReply:
        st = self.arena.stats()
        rep = pb.StatusReply(version=__version__, uptime_seconds=time.time() - self.started,
                             shm_budget_bytes=st.budget_bytes,
                             shm_used_bytes=st.slot_bytes_in_use + st.slot_bytes_cached + st.other_bytes,
                             slots_in_use=st.slots_in_use,
                             hierarchy=self.dispatcher.last_plan or
                             f"static: leaves={self.config.leaves} fan_in={self.config.fan_in}")
        for r in self.dispatcher.rounds()[-20:]:
            rep.rounds.append(round_info(self.dispatcher.get(r.job, r.id)))
        for aj in self.asyncs.all():
            rep.rounds.append(async_info(aj))
        for w in self.dispatcher.snapshot().functions:
            rep.workers.append(pb.WorkerInfo(id=w.id, pid=w.pid, role=w.role, state=w.state, folds=w.folds,
                                             updates_folded=w.updates_folded, node=w.node))
        rep.gateways.extend(f"{n}={a}" for n, a in sorted(self.dispatcher.runtime.gateways().items()))
        return rep
