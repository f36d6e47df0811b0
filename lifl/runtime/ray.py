"""Ray runtime: aggregator functions are Ray actors pinned to the nodes the placement chose.

The control plane (dispatcher, planner, placement, autoscaler) runs in the
head process unchanged; this module is only mechanism:

* **Nodes.** Every alive Ray node with CPUs is a node of the placement model.
  The head's own node uses the head's arena and gateway; every other node gets
  a ``NodeAgent`` (pinned with ``NodeAffinitySchedulingStrategy(soft=False)``)
  that owns that node's shared memory and runs its gateway.
* **Functions** are ``FunctionActor``s started on demand on a given node and
  killed when the autoscaler stops them (explicit lifetimes, no detached
  actors). One command at a time, like a local function; a thread per function
  waits for its reply, so the dispatcher sees the same ``on_message`` events.
* **Bytes between nodes.** A command may name segments of its own node only;
  for any other (a child's partial sum on another node; an update, if a leaf
  was placed off its home) this module asks the owning node for the bytes as an
  object-store array and passes the reference as an argument, so Ray moves it
  node to node and the function reads a zero-copy view. Every such transfer is
  counted (``lifl_cross_node_bytes{kind}``); the finished model travels once to
  the head, which serves Pull (kind ``result``).
* **Faults.** A dead function is reported like a dead local process (the
  dispatcher re-runs its commands on a replacement on the same node). A node
  whose agent stops answering is reported lost (``events.on_node_lost``).
* **Off the engine's lock.** Exporting a command's inputs (``ray.put`` of model-sized
  arrays) happens in the function's own reply thread, not in ``send``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import queue
import re
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..control.model import Node
from ..metrics import RetiredCounts
from ..shm import SHM_DIR, list_segments, reclaim_stale
from .base import NodeEvents, OnMessage, deliver, log

_SEG = re.compile(r"^(.*)-\d+-\d+$")


def _ray():
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("the ray runtime needs Ray: pip install 'lifl[ray]'") from e
    return ray


def _affinity(ray_id: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return NodeAffinitySchedulingStrategy(node_id=ray_id, soft=False)


@dataclass
class SegRef:
    """A segment on another node, known by name only."""
    name: str


class HeadStore:
    """The head node's segments: this process's arena."""

    def __init__(self, arena):
        self.arena = arena

    def scratch(self, size: int):
        return self.arena.scratch(size)

    def release_scratch(self, name: str) -> None:
        self.arena.release_scratch(name)

    def release_slot(self, name: str) -> None:
        self.arena.release_slot(name)

    def export(self, name: str):
        return _ray().put(self.arena.get(name).array(np.uint8))

    def write(self, name: str, data: np.ndarray) -> None:
        np.copyto(self.arena.get(name).array(np.uint8), data)


class AgentStore:
    """Another node's segments, through its agent (release calls are fire-and-forget)."""

    def __init__(self, agent, timeout_s: float):
        self.agent, self.timeout_s = agent, timeout_s

    def scratch(self, size: int) -> SegRef:
        return SegRef(_ray().get(self.agent.scratch.remote(size), timeout=self.timeout_s))

    def release_scratch(self, name: str) -> None:
        self.agent.release_scratch.remote(name)

    def release_slot(self, name: str) -> None:
        self.agent.release_slot.remote(name)

    def export(self, name: str):
        return self.agent.export.remote(name)


@dataclass
class RayNode:
    name: str
    ray_id: str
    cores: float
    memory: int
    prefix: str                 # its segments are named "{prefix}-{pid}-{n}"
    store: object = None
    agent: object = None
    gateway: str = ""
    alive: bool = True


class RayWorker:
    """A function actor. It is usable at once: Ray queues calls to an actor that is still
    starting, so a cold start never blocks the dispatcher (or a client's push); the reply
    thread first waits for the actor to report where it runs and checks that node."""

    _ids = itertools.count(1)
    async_start = True  # reports its own cold-start time once ready

    def __init__(self, runtime: "RayRuntime", actor, node: RayNode, on_message: OnMessage, t0: float):
        self.id = f"ray-fn-{next(self._ids)}"
        self.runtime, self.actor, self.node, self.pid = runtime, actor, node.name, 0
        self.started = time.time()
        self.start_seconds = 0.0
        self._t0, self._ray_id = t0, node.ray_id
        self._ready = actor.ready.remote()
        self._on_message = on_message
        self._commands: queue.Queue = queue.Queue()
        self._dead = threading.Event()
        self.stopping = False
        threading.Thread(target=self._wait_replies, name=f"lifl-{self.id}", daemon=True).start()

    def _await_ready(self) -> bool:
        from ray.exceptions import RayActorError
        try:
            info = json.loads(_ray().get(self._ready, timeout=self.runtime.timeout_s))
        except (RayActorError, Exception):
            return False
        if info["ray_node"] != self._ray_id:  # node affinity is hard; this would be a Ray bug
            self.kill()
            return False
        self.pid = info["pid"]
        self.start_seconds = time.perf_counter() - self._t0
        self.runtime.metrics.cold_start_seconds.observe(self.start_seconds)
        return True

    def send(self, cmd: dict, payloads=()) -> None:
        """Queue a command; the reply thread submits it (its inputs' export may block). Inputs
        always travel through Ray's object store (no ``payloads``)."""
        if self._dead.is_set():
            raise OSError(f"{self.id} is dead")
        self._commands.put(cmd)

    def _wait_replies(self) -> None:
        ray = _ray()
        from ray.exceptions import RayActorError, RayTaskError
        while self._await_ready():
            cmd = self._commands.get()
            if cmd is None:
                break
            try:
                reply_ref, out_ref, returns, kinds = self.runtime.submit(self, cmd)
                reply = json.loads(ray.get(reply_ref))
                if reply.get("ok"):
                    self.runtime.count_crossed(kinds, reply.pop("given_bytes", {}))
                    if returns:
                        self.runtime.receive_result(returns, ray.get(out_ref))
            except RayActorError:
                break
            except RayTaskError as e:  # an input came from a node that is gone
                reply = {"ok": False, "lost_input": True, "error": f"an input was lost: {type(e.cause).__name__}"}
            except Exception as e:  # e.g. an object lost with its node
                reply = {"ok": False, "lost_input": True, "error": f"an input was lost: {type(e).__name__}: {e}"}
            deliver(self._on_message, self, reply)
        self._dead.set()
        if not self.stopping:
            self.runtime.check_node(self.node)
            deliver(self._on_message, self, None)

    def alive(self) -> bool:
        return not self._dead.is_set()

    def kill(self) -> None:
        _ray().kill(self.actor, no_restart=True)

    def stop(self) -> None:
        self.stopping = True
        self.kill()
        self._commands.put(None)


class RayRuntime:
    name = "ray"

    def __init__(self, config, arena, metrics):
        ray = _ray()
        self.config, self.arena, self.metrics = config, arena, metrics
        self._own_ray = not ray.is_initialized()
        if self._own_ray:
            ray.init(address=config.ray_address or None, include_dashboard=False, log_to_driver=False,
                     namespace="lifl")
        self.timeout_s = 120.0
        self.ray_address = ray.get_runtime_context().gcs_address  # for other servers to join
        head_id = ray.get_runtime_context().get_node_id()
        # replaced, never changed in place: other threads read it without a lock
        self.nodes: dict[str, RayNode] = {n.name: n for n in self._alive_nodes(head_id, {})}
        self.head = f"node-{head_id[:8]}"
        if self.head not in self.nodes:
            raise RuntimeError("the LIFL head must run on a Ray node with CPUs")
        self.nodes[self.head].store = HeadStore(arena)
        self._by_prefix = {n.prefix: n for n in self.nodes.values()}
        self._workers: list[RayWorker] = []
        self._lock = threading.Lock()
        self.events = NodeEvents()        # the engine and the server subscribe
        self.crossed: dict[str, int] = {"partial": 0, "update": 0, "result": 0, "step": 0}
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._link: tuple[str, str] | None = None   # (head address, secret) node agents call back
        self._capacity: list[dict] | None = None     # the last request_resources bundles
        self._metrics_lock = threading.Lock()
        self._last_metrics: dict[str, list[bytes]] = {}   # node -> its agent's last metrics answer
        self._retired_metrics = RetiredCounts()          # nodes gone: their counts as last answered

    # -- nodes -------------------------------------------------------------------------
    def _alive_nodes(self, head_id: str, known: dict) -> list[RayNode]:
        """Ray's alive nodes with CPUs that ``known`` does not have yet (the head first)."""
        out = []
        for n in sorted(_ray().nodes(), key=lambda n: (n["NodeID"] != head_id, n["NodeID"])):
            cores = float(n["Resources"].get("CPU", 0.0))
            name = f"node-{n['NodeID'][:8]}"
            if not n["Alive"] or cores <= 0 or name in known:
                continue
            prefix = self.arena.prefix if n["NodeID"] == head_id else f"{self.arena.prefix}-n{n['NodeID'][:8]}"
            out.append(RayNode(name, n["NodeID"], cores, int(n["Resources"].get("memory", 0)), prefix))
        return out

    def _start_agents(self, nodes: list[RayNode]) -> None:
        """Start these nodes' agents (shared memory + gateway, calling back the head); blocks on
        their answers, so never under the engine's lock."""
        ray = _ray()
        from .ray_actors import NodeAgent
        cfg = json.dumps(dataclasses.asdict(self.config))
        head_address, secret = self._link
        for n in nodes:
            n.agent = NodeAgent.options(scheduling_strategy=_affinity(n.ray_id)).remote(
                n.name, n.prefix, cfg, head_address, secret)
        for n, raw in zip(nodes, ray.get([n.agent.info.remote() for n in nodes], timeout=self.timeout_s)):
            info = json.loads(raw)
            if info["ray_node"] != n.ray_id:
                raise RuntimeError(f"the agent of {n.name} started on another node ({info['ray_node'][:8]})")
            n.gateway, n.store = info["address"], AgentStore(n.agent, self.timeout_s)

    def start_gateways(self, head_address: str, secret: str) -> None:
        """Start every other node's agent; they call back ``head_address``. From then on nodes that
        join the Ray cluster (an autoscaler's) are adopted by the node watcher."""
        self._link = (head_address, secret)
        self._start_agents([n for n in self.nodes.values() if n.name != self.head])
        self._monitor = threading.Thread(target=self._watch_nodes, name="lifl-ray-nodes", daemon=True)
        self._monitor.start()

    def adopt_new_nodes(self) -> list[str]:
        """Nodes that joined since the last look get an agent and become usable: the next rounds'
        trees may place leaves there. Returns their names."""
        new = self._alive_nodes(self.nodes[self.head].ray_id, self.nodes)
        if not new:
            return []
        self._start_agents(new)
        with self._lock:
            self.nodes = {**self.nodes, **{n.name: n for n in new}}
            self._by_prefix = {n.prefix: n for n in self.nodes.values()}
        for n in new:
            self.events.on_node_joined(n.name)
        return [n.name for n in new]

    def request_capacity(self, bundles: list[dict]) -> None:
        """Tell Ray's autoscaler what LIFL wants room for (``control.autoscaler.capacity_bundles``);
        an empty list withdraws the request so idle nodes may go."""
        if bundles == self._capacity:
            return
        from ray.autoscaler.sdk import request_resources
        request_resources(bundles=bundles)
        self._capacity = bundles

    def node_models(self) -> list[Node]:
        shm = self.config.shm_budget_mb * 2**20
        return [Node(n.name, n.cores, n.memory, shm) for n in self.nodes.values() if n.alive]

    def function_slots(self, node: str) -> int:
        n = self.nodes.get(node)
        return max(1, int(n.cores // self.config.function_cpus)) if n is not None else 0

    def prepare(self) -> None:
        """Nothing to warm: actors start on demand."""

    def node_alive(self, node: str) -> bool:
        return self.nodes[node].alive

    def gateways(self) -> dict[str, str]:
        return {n.name: n.gateway for n in self.nodes.values() if n.alive and n.gateway}

    def metrics_texts(self, timeout_s: float = 3.0) -> list[bytes]:
        """Every live node agent's gateway metrics (its pool's processes too), for the head's
        /metrics to sum. One bounded wait for all agents: an agent that is slow or failing
        counts with its last answer (a warning), never holding /metrics up. A node that is gone
        (lost, or left when idle) keeps the counters and histograms of its last answer in the
        sum, so the cluster's counters never go back. Nothing after close()."""
        live = [n for n in self.nodes.values() if n.alive and n.agent is not None]
        if self._stop.is_set():
            return []
        ray = _ray()
        answers: dict[str, list[bytes]] = {}
        try:
            refs = [n.agent.metrics_texts.remote() for n in live]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
        except Exception as e:
            log.warning("node gateways' metrics: none this scrape (%s: %s); their last answers count", type(e).__name__, e)
            refs, ready = [None] * len(live), []
        for n, ref in zip(live, refs):
            try:
                if ref in ready:
                    answers[n.name] = ray.get(ref)
                    continue
                why = f"none within {timeout_s:.1f} s"
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
            log.warning("node %s: no gateway metrics (%s); its last answer counts", n.name, why)
        with self._metrics_lock:
            self._last_metrics.update(answers)
            for name in [k for k in self._last_metrics if k not in {n.name for n in live}]:
                self._retired_metrics.add_texts(self._last_metrics.pop(name))
            return [t for texts in self._last_metrics.values() for t in texts] + [self._retired_metrics.text()]

    def store(self, node: str):
        return self.nodes[node].store

    def node_of(self, segment: str) -> str:
        m = _SEG.match(segment)
        if not m or m.group(1) not in self._by_prefix:
            raise KeyError(f"segment {segment} belongs to no known node")
        return self._by_prefix[m.group(1)].name

    def store_of(self, segment: str):
        return self.nodes[self.node_of(segment)].store

    def check_node(self, node: str) -> None:
        """A function on ``node`` died: is the node itself gone? (then report it first)."""
        from ray.exceptions import RayActorError
        n = self.nodes[node]
        if n.agent is None or not n.alive:
            return
        try:
            _ray().get(n.agent.ping.remote(), timeout=10)
        except RayActorError:  # Ray says the agent is dead: its node is gone
            self._lose(n)
        except Exception:  # nosec B110  # slow is not dead: the watcher decides after repeated silence
            pass  # slow is not dead: the watcher decides after repeated silence

    def _lose(self, n: RayNode) -> None:
        with self._lock:
            if not n.alive:
                return
            n.alive = False
        self.events.on_node_lost(n.name)

    def _watch_nodes(self, every_s: float = 1.0, silent_limit: int = 6) -> None:
        """Ping every agent each second. Lost = Ray reports the agent dead, or ``silent_limit``
        pings in a row went unanswered for 10 s each (a loaded node is slow, not gone)."""
        ray = _ray()
        from ray.exceptions import RayActorError
        silent: dict[str, int] = {}
        looks = 0
        while not self._stop.wait(every_s):
            looks += 1
            if looks % 3 == 0:   # every few seconds: nodes that joined
                try:
                    self.adopt_new_nodes()
                except Exception:
                    log.exception("adopting a node that joined the Ray cluster failed; trying again later")
            live = [n for n in self.nodes.values() if n.alive and n.agent is not None]
            if not live:
                continue
            refs = [n.agent.ping.remote() for n in live]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
            for n, ref in zip(live, refs):
                if self._stop.is_set():
                    return
                if ref not in ready:
                    silent[n.name] = silent.get(n.name, 0) + 1
                    if silent[n.name] >= silent_limit:
                        self._lose(n)
                    continue
                silent[n.name] = 0
                try:
                    ray.get(ref)
                except RayActorError:
                    self._lose(n)
                except Exception:  # nosec B110  # an answer that failed otherwise is not a loss; silence is counted above
                    pass

    # -- functions ------------------------------------------------------------------------
    def start_worker(self, on_message: OnMessage, node: str) -> RayWorker:
        from .ray_actors import FunctionActor
        n = self.nodes[node]
        if not n.alive:
            raise RuntimeError(f"node {n.name} is lost; no function can start there")
        t0 = time.perf_counter()
        actor = FunctionActor.options(scheduling_strategy=_affinity(n.ray_id),
                                      num_cpus=self.config.function_cpus).remote([n.prefix])
        w = RayWorker(self, actor, n, on_message, t0)
        with self._lock:
            self._workers.append(w)
        return w

    def stop_worker(self, worker: RayWorker) -> None:
        worker.stop()
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)

    def workers(self) -> list[RayWorker]:
        with self._lock:
            return [w for w in self._workers if w.alive()]

    def submit(self, w: RayWorker, cmd: dict):
        """Send one command; segments of other nodes go along as object-store references. What a
        finalize writes on another node's segments (the result; a server step's state and master
        copy) comes back in one array (``returns``: names and sizes, in order)."""
        kinds, refs = {}, []
        for name, kind in _inputs(cmd):
            src = self.node_of(name)
            if src == w.node or name in kinds:
                continue
            kinds[name] = kind
            refs.append(self.nodes[src].store.export(name))
        returns = [[name, self.arena.get(name).size, kind] for name, kind in _writes(cmd)
                   if self.node_of(name) != w.node]
        if returns:
            cmd = {**cmd, "returns": returns}
        reply_ref, out_ref = w.actor.run.remote(json.dumps(cmd), list(kinds), *refs)
        return reply_ref, out_ref, returns, kinds

    def count_crossed(self, kinds: dict[str, str], given_bytes: dict[str, int]) -> None:
        """Count the bytes a function received from other nodes (it reports what it was given)."""
        for name, nbytes in given_bytes.items():
            kind = kinds.get(name, "update")
            self.crossed[kind] += nbytes
            self.metrics.cross_node_bytes.labels(kind).inc(nbytes)

    def receive_result(self, returns: list, data: np.ndarray) -> None:
        """Write back what a function on another node wrote for the head's segments: the result,
        then a server step's master copy and state (the round finishes only after this)."""
        store, at = self.nodes[self.head].store, 0
        for name, size, kind in returns:
            store.write(name, data[at:at + size])
            at += size
            self.crossed[kind] += size
            self.metrics.cross_node_bytes.labels(kind).inc(size)

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        ray = _ray()
        self._stop.set()
        with self._lock:
            workers, self._workers = self._workers, []
        for w in workers:
            w.stop()
        agents = [n for n in self.nodes.values() if n.agent is not None]
        for n in agents:
            if n.alive:
                try:
                    ray.get(n.agent.close.remote(), timeout=30)
                except Exception:  # nosec B110  # closing an agent already gone: its segments are reclaimed below
                    pass
            ray.kill(n.agent)
        for n in agents:  # a lost node's segments are left only when it shared this machine
            if not n.alive:
                for name in list_segments(n.prefix):
                    (SHM_DIR / name).unlink(missing_ok=True)
            reclaim_stale(n.prefix)
        if self._own_ray:
            ray.shutdown()



def _inputs(cmd: dict):
    """(segment, kind) a command reads; the accumulator it writes is always its own node's."""
    for name, _ in cmd.get("updates", ()):
        yield name, "update"
    for name in cmd.get("partials", ()):
        yield name, "partial"
    st = cmd.get("step")
    if st is not None:   # a server step reads its state and base (initial model, or master copy)
        yield st["state"], "step"
        yield st["x_in"] if "x_in" in st else st["base"], "step"


def _writes(cmd: dict):
    """(segment, kind) a finalize writes on the head: the result, a server step's master copy, then
    its state. (A span of a flat finalize writes part of them: spans run on the head's node only.)"""
    if cmd.get("op") != "finalize":
        return
    yield cmd["out"], "result"
    st = cmd.get("step")
    if st is not None:
        if "x_out" in st:
            yield st["x_out"], "step"
        yield st["state"], "step"

