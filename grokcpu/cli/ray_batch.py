"""grok-cli batch --ray: one batch spread over the nodes of a Ray cluster.

The driver (this process) reads the input, writes the error records and every result exactly as
the local command does (BatchRun); it never loads the model. Each worker, a Ray actor (one per
node unless --ray-actors says otherwise), loads the model from the same path on its own node and
runs generate_batch over a feed of jobs that the driver tops up in small shards, so a worker
always has its next prompts at hand. A record is written by the driver, once, when it comes back;
a worker that dies has its unfinished jobs handed to the others, and a killed driver resumes
from the output file like the local command. Seeds are per prompt (Job.make), so a result does
not depend on which worker ran it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import deque
from pathlib import Path

from .. import engine
from ..errors import GrokError
from .app import Loaded, Run, err, model_stats_line
from .batch import BatchRun, Job, run_jobs

STEP_WAIT_S = 0.5                 # a worker's step() returns after this long even with nothing finished
LOCAL_STORE_BYTES = 100 * 2**20   # object store of a Ray instance started here (records are small)
SAME_PATH = "every node needs the model (and --tokenizer) at the same path: copy it there or use a shared folder"


def import_ray():
    try:
        import ray
    except ImportError:
        raise GrokError("--ray needs the ray package", hint="pip install 'grokcpu[ray]' on every node") from None
    return ray


def check_ray(run: Run, actors) -> None:
    """The --ray options, checked before anything is read or started."""
    import_ray()
    if actors is not None and actors < 1:
        raise GrokError(f"--ray-actors {actors} is out of range", hint="use an integer >= 1 (default: one per node)")
    if run.options.routing_trace is not None:
        raise GrokError("--routing-trace does not work with --ray", hint="trace a local run (leave --ray out)")


# -- a worker (a Ray actor) -------------------------------------------------------------------------

class Worker:
    """One model on one node: jobs in and finished records out through step(); the prompts run
    in a thread of their own, one generate_batch over a feed that never runs dry while the
    driver has work."""

    def __init__(self, run: Run, batch_size: int, share: int):
        self.run, self.batch_size, self.share = run, batch_size, share
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.done: list[tuple] = []              # (line, record) not yet handed to the driver
        self.cond = threading.Condition()
        self.failed: str | None = None
        self.in_flight = 0                       # jobs taken and not yet recorded (its thread only)

    def load(self) -> dict:
        """Load the model and ready the kernels; where this worker runs and with what, or the
        error (as data: message and hint) that stopped it."""
        from ray.util import get_node_ip_address
        info = {"node": socket.gethostname(), "ip": get_node_ip_address(), "pid": os.getpid()}
        t = time.perf_counter()
        try:
            self.L = Loaded(self.local_run())
            engine.warm_up(self.L.model, batch=True)
            info.update(threads=self.L.model.threads, context=self.L.model.context,
                        load_s=round(time.perf_counter() - t, 2))
        except GrokError as e:
            info.update(error=e.message, hint=e.hint)
            return info
        threading.Thread(target=self.loop, name="grokcpu-batch", daemon=True).start()
        return info

    def local_run(self) -> Run:
        """The command's options for this node: the demo built here if no --model, and with
        `share` workers on the node, each its share of the cores and of the 'auto' expert budget."""
        from .. import demo
        from ..backends.cpu import physical_cores
        run, opts = self.run, self.run.options
        if run.model is None:
            run = dataclasses.replace(run, model=demo.ensure_demo()[0])
        if self.share > 1 and opts.threads is None:
            opts = dataclasses.replace(opts, threads=max(1, physical_cores() // self.share))
        if self.share > 1 and opts.expert_cache_gb == "auto":
            from .. import open_checkpoint
            from ..expert_cache import GB, auto_budget
            # headers only (a GGUF's load reads just its norms and routers): the workers read the weights
            ck = open_checkpoint(run.model, weights=False)
            try:
                budget = auto_budget(ck, opts.context or ck.config.sequence_len, share=self.share)
            finally:
                ck.close()
            opts = dataclasses.replace(opts, expert_cache_gb=budget / GB)
        return dataclasses.replace(run, options=opts)

    def step(self, jobs: list[Job], wait: float) -> dict:
        """Take `jobs`; return the (line, record)s finished since the last call (waiting up to `wait`
        seconds for one) and whether the worker failed."""
        for job in jobs:
            self.inbox.put(job)
        with self.cond:
            self.cond.wait_for(lambda: self.done or self.failed, timeout=wait)
            done, self.done = self.done, []
            return {"done": done, "failed": self.failed}

    def stats(self) -> dict:
        return self.L.model.stats()

    def loop(self) -> None:
        def emit(job, rec):
            self.in_flight -= 1
            self.put((job.line, rec))
        try:
            run_jobs(self.L.model, self.L.tok, self.feed(), self.batch_size, emit)
        except BaseException as e:     # not a user's mistake: the driver gives this worker's jobs to others
            with self.cond:
                self.failed = f"{type(e).__name__}: {e}"
                self.cond.notify_all()

    def feed(self):
        """The jobs; None ("none yet") while others run, blocking while none does."""
        while True:
            try:
                job = self.inbox.get(block=self.in_flight == 0)
            except queue.Empty:
                yield None
                continue
            self.in_flight += 1
            yield job

    def put(self, done: tuple) -> None:
        with self.cond:
            self.done.append(done)
            self.cond.notify_all()


# -- the driver -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Handle:
    """The driver's view of one worker."""
    actor: object
    name: str
    node: str
    info: dict = dataclasses.field(default_factory=dict)
    jobs: dict = dataclasses.field(default_factory=dict)    # line -> Job: handed out, not yet written
    tokens: int = 0
    records: int = 0
    calls: int = 0                      # step() calls: Ray round trips
    alive: bool = True


class RayBatchRun(BatchRun):
    """The batch command's run on Ray workers; reading, planning and writing are BatchRun's."""

    def __init__(self, *args, address: str | None, actors: int | None):
        super().__init__(*args)
        self.address, self.actors = address, actors
        self.how = f"up to {self.batch_size} at once on each Ray worker"
        self.workers: list[Handle] = []
        self.worker_stats: list[tuple[Handle, dict]] = []
        self.ray = None
        self.ray_started = False

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.ray is not None:
                self.stop()

    def ready(self) -> None:
        self.ray = import_ray()
        self.connect()
        self.start()

    def execute(self, todo: list[Job]) -> None:
        self.drive(deque(todo))
        if self.run_opts.stats:
            self.collect_stats()

    def connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():               # a caller that set Ray up itself (the tests, a notebook)
            return
        kw = dict(log_to_driver=False, logging_level=logging.ERROR)
        where = self.address or "this machine"
        if self.address is not None:
            check_reachable(self.address)
        try:
            if self.address is not None:
                ray.init(address=self.address, **kw)
            else:
                try:
                    ray.init(address="auto", **kw)          # a cluster started here with `ray start`
                except ConnectionError:
                    ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_STORE_BYTES, **kw)
        except (ConnectionError, RuntimeError, ValueError, OSError) as e:
            raise GrokError(f"cannot connect to the Ray cluster at {where}: {' '.join(str(e).split())}",
                            hint="start it with `ray start --head` (and `ray start --address HEAD:6379` on the others)") from None
        self.ray_started = True

    def start(self) -> None:
        """One worker per node (or --ray-actors of them, spread evenly), each loading the model."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        nodes = sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeID"])
        if not nodes:
            raise GrokError("the Ray cluster has no live node", hint="check `ray status`")
        count = self.actors or len(nodes)
        where = [nodes[i % len(nodes)] for i in range(count)]
        share = {n["NodeID"]: sum(w is n for w in where) for n in nodes}
        remote = ray.remote(num_cpus=0, max_restarts=0)(Worker)
        run = self.run_opts
        run = dataclasses.replace(run, model=None if run.model is None else Path(os.path.abspath(run.model)),
                                  tokenizer=None if run.tokenizer is None else Path(os.path.abspath(run.tokenizer)))
        if run.model is None:
            from .. import demo
            err(demo.BANNER)
        token = uuid.uuid4().hex[:8]
        t = time.perf_counter()
        for i, node in enumerate(where):
            name = f"grokcpu-batch-{token}-{i}"
            actor = remote.options(name=name, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                                   ).remote(run, self.batch_size, share[node["NodeID"]])
            self.workers.append(Handle(actor, name, node.get("NodeManagerAddress", "?")))
        loads = [w.actor.load.remote() for w in self.workers]
        for w, ref in zip(self.workers, loads):
            try:
                w.info = ray.get(ref)
            except ray.exceptions.RayError as e:
                self.lost(w, f"it stopped while loading: {first_line(e)}")
                continue
            w.node = w.info["node"]
            if "error" in w.info:
                missing = any(m in w.info["error"] for m in ("no such", "no ckpt-0", "no tokenizer"))
                hint = SAME_PATH if missing else w.info["hint"]
                raise GrokError(f"the Ray worker on node {w.node} ({w.info['ip']}) cannot load the model: "
                                f"{w.info['error']}", hint=hint)
        live = [w for w in self.workers if w.alive]
        if not live:
            raise GrokError("no Ray worker could start", hint="see `ray status` and the logs in /tmp/ray/session_latest/logs")
        self.context = live[0].info["context"]
        per_node = {}
        for w in live:
            per_node.setdefault(w.node, []).append(w.info["threads"])
        err(f"batch: {len(live)} Ray workers ready in {time.perf_counter() - t:.1f} s on {len(per_node)} node(s): "
            + ", ".join(f"{node} ({len(th)} x {th[0]} threads)" for node, th in per_node.items()))

    def drive(self, queue_: deque) -> None:
        """Hand out shards, write what comes back, until every job has a record."""
        ray = self.ray
        hold = self.batch_size + max(1, self.batch_size // 2)   # its running jobs and the next few
        busy: dict = {}                       # the one step() call in flight per worker -> worker
        while True:
            for w in self.workers:
                if w.alive and w not in busy.values() and (w.jobs or queue_):
                    n = min(len(queue_), hold - len(w.jobs), self.batch_size)
                    shard = [queue_.popleft() for _ in range(n)]
                    w.jobs.update((j.line, j) for j in shard)
                    busy[w.actor.step.remote(shard, STEP_WAIT_S)] = w
                    w.calls += 1
            if not busy:
                if queue_:
                    raise GrokError(f"every Ray worker stopped; {self.written} records are safely in {self.where}",
                                    hint="see the notes above; rerun the same command to resume")
                return
            ready, _ = ray.wait(list(busy), num_returns=1, timeout=2 * STEP_WAIT_S)
            for ref in ready:
                w = busy.pop(ref)
                try:
                    got = ray.get(ref)
                except ray.exceptions.RayError as e:
                    self.lost(w, first_line(e), queue_)
                    continue
                for line, rec in got["done"]:
                    if w.jobs.pop(line, None) is None:     # never written twice
                        continue
                    self.record(rec)
                    w.records += 1
                    w.tokens += self.fmt.tally(rec)[1]
                if got["failed"]:
                    self.lost(w, got["failed"], queue_)
            self.bar()

    def lost(self, w: Handle, why: str, queue_: deque | None = None) -> None:
        """A worker that stopped: its unwritten jobs go back to the front of the queue."""
        ray = self.ray
        w.alive = False
        again = list(w.jobs.values())
        w.jobs.clear()
        if queue_ is not None:
            queue_.extendleft(reversed(again))
        err(f"note: the Ray worker {w.name} on {w.node} stopped ({why}); "
            f"its {len(again)} unfinished prompt(s) run on the other workers")
        try:
            ray.kill(w.actor, no_restart=True)
        except Exception:        # already gone
            pass

    def collect_stats(self) -> None:
        ray = self.ray
        for w in self.workers:
            if w.alive:
                try:
                    self.worker_stats.append((w, ray.get(w.actor.stats.remote(), timeout=30)))
                except (ray.exceptions.RayError, TimeoutError):
                    pass

    def stop(self) -> None:
        ray = self.ray
        for w in self.workers:
            try:
                ray.kill(w.actor, no_restart=True)
            except Exception:    # already gone
                pass
        if self.ray_started:
            ray.shutdown()

    def bar_extra(self, dt: float) -> str:
        per_node: dict[str, int] = {}
        for w in self.workers:
            per_node[w.node] = per_node.get(w.node, 0) + w.tokens
        return "; " + ", ".join(f"{node} {n / dt:.1f}" for node, n in per_node.items()) if per_node else ""

    def print_stats(self) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        for w, st in self.worker_stats:
            err(f"stats: {w.name} on {w.node}: {w.records} records, {w.tokens} tokens ({w.tokens / dt:.1f} tok/s), "
                f"{w.calls} Ray calls, load and warm-up {w.info.get('load_s', 0):.1f} s; {model_stats_line(st)}")


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT address that nothing answers on is an error now (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise GrokError(f"cannot reach the Ray cluster at {address}: {why}",
                        hint="start it with `ray start --head --port PORT` there, or check the address") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]
