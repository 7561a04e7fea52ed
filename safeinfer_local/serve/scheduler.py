"""The server's engine thread: one thread owns the model and every llama.cpp call, and decodes the requests of
all HTTP clients together through the one decode loop (:class:`~safeinfer_local.decode.batch.BatchGenerator`).

Requests are grouped by what they decode with: the variant the harm gate routes them to (a prompt judged benign
runs ``base``) and the settings that shape that variant (γ, blocks, positions, guidance, λ). Each group has its
own ``BatchGenerator`` with ``parallel`` slots, made by :meth:`SafeInfer.batch`. Generators run on the decoder's
sides, which are llama.cpp contexts kept per role, guidance and slot count and shared by every settings copy:
``base`` and ``sa`` both run on the ``plain`` side, ``sgds`` and ``safeinfer`` with ``negative`` guidance both on
``target-plain`` + ``guide-plain``, and so does any γ or λ. Two generators on a common side cannot hold requests
at the same time (their slot ``i`` is the same KV sequence). So:

- groups whose sides are disjoint are *live* together and stepped in turn, one ``step()`` each per round (the
  gate's two outcomes, ``base`` on ``plain`` and ``safeinfer`` on ``target-plain``/``guide-plain``, are such a
  pair);
- groups that share a side take turns: a group becomes live only when no live group uses its sides, and a live
  group takes no new request while an older request waits for one of its sides (first come, first served across
  the groups in conflict), so it drains and hands the sides over.

The HTTP side talks to this thread through a thread-safe inbox (:meth:`Scheduler.submit`, :meth:`cancel`,
:meth:`call`) and gets updates through each job's ``sink`` (the server passes ``loop.call_soon_threadsafe``).
At most ``parallel + queue`` jobs are accepted at a time; one more raises :class:`Busy`.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import schema
from ..api import SafeInfer
from ..core.settings import check_parallel
from ..decode.batch import BatchGenerator, GenConfig, Result, Step
from ..errors import ContextOverflowError, SafeInferError, SettingError, UsageError

MAX_GROUPS = 32
"""Idle groups (a generator and its buffers each; the llama.cpp sides are the decoder's) kept for reuse."""


class Busy(SafeInferError):
    """Every slot is taken and the queue is full (HTTP 503 with Retry-After)."""


# -- what the engine thread sends back ----------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    """A new piece of the reply (streaming jobs only)."""

    step: Step


@dataclass(frozen=True)
class Done:
    """The request finished: its last step (with any held-back text), its result, and what was applied."""

    step: Step
    result: Result
    prompt_tokens: int
    applied: str
    """The variant decoded: the one asked for, ``base`` for a prompt the gate judged benign, or the asked one with
    a refusal under ``on_flag=refuse`` (``result.stop_reason == 'refused'``)."""


@dataclass(frozen=True)
class Failed:
    """The request could not run (``error``: a ``UsageError`` is the client's fault, anything else the server's)."""

    error: BaseException


Update = Token | Done | Failed


@dataclass
class Job:
    """One generation request: the settings copy it runs under, its prompt (a string or chat messages) in a frame,
    its sampling, and where updates go (called from the engine thread)."""

    si: SafeInfer
    variant: str
    prompt: str | list[dict]
    frame: str
    cfg: GenConfig
    sink: Callable[[Update], None]
    stream: bool = False
    id: int = field(default_factory=itertools.count().__next__)
    # filled in by the engine thread
    tokens: list[int] = field(default_factory=list, repr=False)
    route: object = None
    group: object = None

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[-1].get("content", "")


@dataclass
class _Group:
    key: tuple
    gen: BatchGenerator
    waiting: deque[Job] = field(default_factory=deque)
    live: bool = False
    jobs: dict[int, Job] = field(default_factory=dict)  # inserted into gen, not finished

    @property
    def sides(self) -> set[int]:
        return {id(s) for s in (self.gen.target, self.gen.guide) if s is not None}

    def busy(self) -> bool:
        return bool(self.jobs or self.waiting)


PREFILL_CHUNK = 256
"""Most prompt tokens a long prompt that arrives while others stream decodes per step (chunked prefill; each piece
is sized to add about ``batch.PREFILL_BUDGET`` of a step, so running streams keep going: benchmarks/
prefill_latency.py)."""


def group_key(si: SafeInfer, run: str) -> tuple:
    """What a generator for ``run`` under ``si``'s settings decodes with (the gate's settings choose ``run``,
    they do not enter the decode)."""
    d = si.settings.describe(run)
    return tuple(sorted((k, str(v)) for k, v in d.items() if k in schema.GROUP))


class Scheduler:
    """Owns ``si``'s model in one thread; see the module docstring for how requests share it."""

    def __init__(self, si: SafeInfer, parallel: int = 4, queue_size: int = 16, warm: bool = True) -> None:
        self.si, self.parallel = si, check_parallel(parallel)
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 0:
            raise SettingError(f"--queue must be an integer >= 0, not {queue_size}")
        self.capacity = parallel + queue_size
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._accepted = 0
        self._groups: dict[tuple, _Group] = {}
        self._where: dict[int, _Group] = {}  # job id -> its group, while waiting or decoding
        self._seq = itertools.count()
        self._order: dict[int, int] = {}  # job id -> arrival order (first come, first served across groups)
        self.stats = {"active": 0, "waiting": 0, "steps": 0}
        """Read by /health from the event loop (plain ints written by the engine thread)."""
        self._warm = warm
        self._thread = threading.Thread(target=self._run, name="safeinfer-engine", daemon=True)
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    # -- the HTTP side ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the thread; jobs still running are cancelled (the server has drained its requests before)."""
        if self._thread.is_alive():
            self._inbox.put(("stop",))
            self._thread.join(timeout)

    def _take(self) -> None:
        with self._lock:
            if self._accepted >= self.capacity:
                raise Busy(f"the server is busy: {self.parallel} requests decoding and "
                           f"{self.capacity - self.parallel} waiting; retry later")
            self._accepted += 1

    def _give(self) -> None:
        with self._lock:
            self._accepted -= 1

    def submit(self, job: Job) -> None:
        """Queue a generation (raises :class:`Busy` when ``parallel + queue`` jobs are already in)."""
        self._take()
        self._inbox.put(("job", job))

    def cancel(self, job_id: int) -> None:
        """Drop a job (its client went away); its slot is free at the next step."""
        self._inbox.put(("cancel", job_id))

    def call(self, fn: Callable[[SafeInfer], object], sink: Callable[[object], None]) -> None:
        """Run ``fn(si)`` on the engine thread between steps (moderation scores) and pass the value, or the
        exception it raised, to ``sink``. Counts against the capacity like a job."""
        self._take()
        self._inbox.put(("call", fn, sink))

    # -- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self._warm:  # make the default variant's sides (and base's, for the gate) before the first request
                self._group(self.si, self.si.default_variant())
                if self.si.active_gate() is not None:
                    self._group(self.si, "base")
        except BaseException as e:  # noqa: BLE001  (reported to start())
            self._startup_error = e
        self._ready.set()
        if self._startup_error is not None:
            return
        stopping = False
        while not stopping:
            busy = any(g.busy() for g in self._groups.values())
            try:
                msg = self._inbox.get(block=not busy)
            except queue.Empty:
                msg = None
            while msg is not None:
                stopping |= self._handle(msg)
                try:
                    msg = self._inbox.get_nowait()
                except queue.Empty:
                    msg = None
            if stopping:
                break
            try:
                self._schedule()
                self._step()
            except Exception as e:  # noqa: BLE001  (a bug here must not leave every client waiting forever)
                self._fail_all(e)
        self._fail_all(SafeInferError("the server is shutting down"))

    def _fail_all(self, error: BaseException) -> None:
        for g in list(self._groups.values()):
            for job in list(g.waiting) + list(g.jobs.values()):
                if job.id in g.jobs:
                    g.gen.remove(job.id)
                self._finish(job, Failed(error))
            g.live = False
        self._publish()

    def _handle(self, msg: tuple) -> bool:
        kind = msg[0]
        if kind == "stop":
            return True
        if kind == "cancel":
            g = self._where.pop(msg[1], None)
            if g is not None:
                for job in list(g.waiting):
                    if job.id == msg[1]:
                        g.waiting.remove(job)
                if g.jobs.pop(msg[1], None) is not None:
                    g.gen.remove(msg[1])
                self._order.pop(msg[1], None)
                self._give()
        elif kind == "call":
            _, fn, sink = msg
            try:
                value = fn(self.si)
            except Exception as e:  # noqa: BLE001  (the caller maps it to an HTTP error)
                value = e
            self._give()
            sink(value)
        else:
            self._prepare(msg[1])
        self._publish()
        return False

    def _prepare(self, job: Job) -> None:
        """Encode, route through the gate, and queue the job in its group (or answer it at once)."""
        try:
            toks, stops = job.si.encode_prompt(job.prompt, frame=job.frame)
            if len(toks) >= job.si.n_ctx:
                raise ContextOverflowError(f"the prompt is {len(toks)} tokens but the context holds {job.si.n_ctx} "
                                           "(shorten it, or start the server with a larger --n-ctx)")
            job.tokens = toks
            job.cfg = dataclasses.replace(job.cfg, stop=job.cfg.stop + tuple(stops))
            job.route = r = job.si.route(toks, job.variant, job.frame)
            if r.refuse:
                step, res = r.refusal(job.text, job.variant, job.si.settings.refusal)
                self._give()
                job.sink(Done(step, res, len(toks), job.variant))
                return
            g = self._group(job.si, r.variant)
        except Exception as e:  # noqa: BLE001  (UsageError: the client's; anything else: reported as the server's)
            self._give()
            job.sink(Failed(e))
            return
        job.group = g
        g.waiting.append(job)
        self._where[job.id] = g
        self._order[job.id] = next(self._seq)

    def _group(self, si: SafeInfer, run: str) -> _Group:
        key = group_key(si, run)
        g = self._groups.get(key)
        if g is None:
            if len(self._groups) >= MAX_GROUPS:
                for k, old in list(self._groups.items()):
                    if not old.busy() and len(self._groups) >= MAX_GROUPS:
                        del self._groups[k]
            # split layout: a request is often alone on a server, and one request in a shared context decodes its
            # 2 rows in one batch, which is ~2x slower here than the split layout's two side-by-side one-row decodes
            # (benchmarks/serve_concurrency.py: 0.99 vs 2.1 requests/s one at a time)
            g = self._groups[key] = _Group(key, si.batch(run, self.parallel, layout="split",
                                                          prefill_chunk=PREFILL_CHUNK))
        return g

    def _schedule(self) -> None:
        """Make groups live (disjoint sides only) and move waiting jobs into live generators' free slots."""
        live = [g for g in self._groups.values() if g.live]
        pending = sorted((g for g in self._groups.values() if not g.live and g.waiting),
                         key=lambda g: self._order[g.waiting[0].id])
        for g in pending:
            if not any(g.sides & h.sides for h in live):
                g.live = True
                live.append(g)
        for g in live:
            blocked = [self._order[h.waiting[0].id] for h in pending
                       if not h.live and g.sides & h.sides]
            first_blocked = min(blocked) if blocked else None
            while g.waiting and len(g.jobs) < self.parallel:
                job = g.waiting[0]
                if first_blocked is not None and first_blocked < self._order[job.id]:
                    break  # an older request waits for these sides: drain, then hand them over
                g.waiting.popleft()
                g.jobs[job.id] = job
                handoff = job.route.handoff if job.route is not None else None
                g.gen.insert(job.id, job.tokens, job.cfg, job.text, handoff)
                job.route = dataclasses.replace(job.route, handoff=None)  # the KV bytes are the generator's now

    def _step(self) -> None:
        for g in list(self._groups.values()):
            if not g.live:
                continue
            if g.gen:
                try:
                    events = g.gen.step()
                except Exception as e:  # noqa: BLE001  (llama.cpp failed: fail this group's requests, go on)
                    for job in list(g.jobs.values()):
                        g.gen.remove(job.id)
                        self._finish(job, Failed(e))
                    events = []
                self.stats["steps"] += 1
                for ev in events:
                    job = g.jobs.get(ev.key)
                    if job is None:
                        continue
                    if ev.error is not None:
                        self._finish(job, Failed(ev.error))
                    elif ev.result is not None:
                        r = job.route
                        self._finish(job, Done(ev.step, r.tag(ev.result, job.variant), len(job.tokens), r.variant))
                    elif job.stream:
                        job.sink(Token(ev.step))
            if not g.jobs:
                g.live = False  # drained: its sides may go to another group
        self._publish()

    def _finish(self, job: Job, update: Update) -> None:
        g = self._where.pop(job.id, None)
        if g is not None:
            g.jobs.pop(job.id, None)
            if job in g.waiting:
                g.waiting.remove(job)
            self._order.pop(job.id, None)
            self._give()
        job.sink(update)

    def _publish(self) -> None:
        self.stats["active"] = sum(len(g.jobs) for g in self._groups.values())
        self.stats["waiting"] = sum(len(g.waiting) for g in self._groups.values())


def is_client_error(e: BaseException) -> bool:
    """A request's own fault (HTTP 4xx) rather than the server's (5xx)."""
    return isinstance(e, UsageError)
