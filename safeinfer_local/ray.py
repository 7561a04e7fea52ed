"""Ray Data over ``SafeInfer``: ``filter`` (and ``screen``'s gate scores) on a pool of actors, one model each.

A thin layer: the callables below hold one :class:`~safeinfer_local.api.SafeInfer` per actor, built once from
plain, picklable settings (:func:`settings_of` reads them off a loaded one), and turn a batch of items (the
columns ``index``, ``id``, ``prompt``, ``error``, as ``map_batches`` passes them) into exactly the records the
single-process commands write, by calling their own functions (:func:`workflows.filter.generate_records`,
:func:`workflows.screen.score_records`). Each output row is ``index``, ``id`` and ``record`` (the record as one
JSON string, so that records of any shape share one Arrow schema).

:func:`filter_run` is ``safeinfer filter --ray``: :func:`workflows.filter.run <safeinfer_local.workflows.filter.run>`
(its header, resume, append-as-you-go, input-order rewrite and ``--split``) with the pending items sent through
``ray.data`` and each record appended on the driver as soon as it comes back.

Only this module imports ``ray`` (lazily: without it, one :class:`UsageError` says to install
``safeinfer_local[ray]``).

    >>> import ray, json
    >>> from safeinfer_local import SafeInfer
    >>> from safeinfer_local.ray import FilterBatch, settings_of
    >>> ds = ray.data.from_items([{"index": 0, "id": "a", "prompt": "How do I bake bread?", "error": None}])
    >>> ds = ds.map_batches(FilterBatch, fn_constructor_kwargs={"settings": settings_of(SafeInfer.default(),
    ...                     n_threads=1), "gen": {"max_tokens": 32}}, batch_size=4, concurrency=2, num_cpus=1)
    >>> [json.loads(r["record"]) for r in ds.iter_rows()]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from . import jsonl
from .errors import SafeInferError, UsageError
from .workflows import filter as flt
from .workflows.inputs import Item
from .workflows.runs import Summary

BATCH = 4
"""Prompts per ``map_batches`` call: small, so that a lost actor redoes little and records stream back early."""
DIE_ENV = "SAFEINFER_RAY_TEST_DIE"
"""Test hook: ``INDEX:MARKER`` makes the actor that gets the item at input position INDEX exit (``os._exit(1)``)
once, when the file MARKER does not exist yet (it is created first, so the retried batch goes through)."""


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("Ray is not installed: install safeinfer_local[ray] "
                         "(pip install 'safeinfer_local[ray]')") from None
    return ray


def check() -> None:
    """Raise the one-line :class:`UsageError` when Ray is not installed (before anything is loaded)."""
    _ray()


def settings_of(si, n_threads: int | None = None) -> dict:
    """The keyword arguments that rebuild ``si`` in another process (:meth:`SafeInfer.values
    <safeinfer_local.api.SafeInfer.values>`: every setting of the schema, the model by its path, the vector itself
    so that workers need no copy of its file); ``n_threads`` per actor (default: ``si``'s)."""
    vals = si.values()
    return vals | {"n_threads": vals["n_threads"] if n_threads is None else n_threads}


def _load(settings: dict, fingerprint: dict | None):
    from .api import SafeInfer

    si = SafeInfer(**settings)
    if fingerprint is not None and (diff := jsonl.header_mismatch(fingerprint, si.fingerprint())) is not None:
        raise UsageError(f"a Ray worker loaded another model or vector than the driver ({diff}); every node needs "
                         "the same files")
    return si


def _items(batch) -> list[Item]:
    def col(name):
        v = batch[name]
        return v.tolist() if hasattr(v, "tolist") else list(v)

    def text(v):  # a missing value comes as None or, from an all-null column, as NaN
        return v if isinstance(v, str) else None

    errors = col("error") if "error" in batch else [None] * len(batch["id"])
    return [Item(int(i), str(d), text(p), text(e))
            for i, d, p, e in zip(col("index"), col("id"), col("prompt"), errors, strict=True)]


def _rows(items: list[Item], recs: dict[int, dict]) -> dict[str, list]:
    return {"index": [it.index for it in items], "id": [it.id for it in items],
            "record": [json.dumps(recs[it.index], ensure_ascii=False) for it in items]}


def _test_hook(items: list[Item]) -> None:
    spec = os.environ.get(DIE_ENV)
    if not spec:
        return
    at, marker = spec.split(":", 1)
    if any(it.index == int(at) for it in items) and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


class FilterBatch:
    """``map_batches`` callable: ``filter``'s record for every item of a batch (generation with the settings'
    variant, the refusal judge, the optional ``--judge-model``). ``gen``: the generation fields (max_tokens,
    temperature, ..., stop); ``parallel``: prompts of a batch decoded together; ``fingerprint``: the driver's
    ``SafeInfer.fingerprint()``, which the actor's model and vector must match."""

    def __init__(self, settings: dict, frame: str | None = None, gen: dict | None = None, parallel: int = 1,
                 judge_model: str | None = None, fingerprint: dict | None = None) -> None:
        self.si = _load(settings, fingerprint)
        self.judge = None
        if judge_model is not None:
            from .workflows.judge_model import ModelJudge

            self.judge = ModelJudge(judge_model, n_threads=settings.get("n_threads"))
        self.frame, self.gen, self.parallel = frame, dict(gen or {}), parallel

    def __call__(self, batch) -> dict[str, list]:
        items = _items(batch)
        _test_hook(items)
        recs = {r["index"]: r for r in flt.generate_records(self.si, items, self.frame, self.parallel, self.judge,
                                                            **self.gen)}
        return _rows(items, recs)


class ScreenBatch:
    """``map_batches`` callable: ``screen``'s record (gate score, flagged) for every item of a batch, the batch's
    prompts scored in one decode."""

    def __init__(self, settings: dict, frame: str | None = None, fingerprint: dict | None = None) -> None:
        from .core.frames import resolve_frame

        self.si = _load(settings | {"gate": "on"}, fingerprint)
        self.frame = resolve_frame(False, frame)

    def __call__(self, batch) -> dict[str, list]:
        from .workflows.screen import score_records

        items = _items(batch)
        _test_hook(items)
        return _rows(items, score_records(self.si, items, self.frame))


class Session:
    """Ray for one run: connected on first use (``address``: ``local`` starts a Ray instance of this process,
    ``auto`` joins the one running on this machine, else a cluster address such as ``ray://head:10001``; a Ray
    already initialised in this process is used as it is), shut down by :meth:`close` only when it started it."""

    def __init__(self, address: str | None = "local", num_cpus: int | None = None, quiet: bool = True) -> None:
        self.address, self.num_cpus, self.quiet = address, num_cpus, quiet
        self.ray = _ray()
        self.started = False

    def connect(self):
        ray = self.ray
        if not ray.is_initialized():
            kw = {"num_cpus": self.num_cpus} if self.address in (None, "local") else {}
            if self.quiet:
                os.environ.setdefault("RAY_DEDUP_LOGS", "0")
                kw.update(logging_level=logging.ERROR, log_to_driver=False)
            try:
                ray.init(address=self.address, include_dashboard=False, **kw)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise UsageError(f"cannot connect to Ray at {self.address!r}: {_line(e)}") from None
            self.started = True
        ctx = ray.data.DataContext.get_current()
        ctx.raise_original_map_exception = True
        if self.quiet:
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its errors come back as one exception
        return ray

    def cpus(self) -> int:
        return int(self.ray.cluster_resources().get("CPU", 1))

    def close(self) -> None:
        if self.started:
            self.started = False
            self.ray.shutdown()


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _cause(e: BaseException) -> BaseException | None:
    """Our own error behind Ray's wrappers, if any: in the exception chain, or (an actor that died in its
    constructor) only as the last line of the worker's traceback in the message."""
    from . import errors

    seen = set()
    first = e
    while e is not None and id(e) not in seen:
        if isinstance(e, SafeInferError):
            return e
        seen.add(id(e))
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    found = re.findall(r"^safeinfer_local\.errors\.(\w+): (.+)$", str(first), re.M)
    if found:
        name, msg = found[-1]
        cls = getattr(errors, name, None)
        return (cls if isinstance(cls, type) and issubclass(cls, SafeInferError) else SafeInferError)(msg)
    return None


def map_items(session: Session, items: list[Item], fn, fn_kwargs: dict, actors: int | None = None,
              threads: int = 1, batch_size: int = BATCH, max_restarts: int | None = None) -> Iterator[dict]:
    """Run ``fn`` (:class:`FilterBatch` or :class:`ScreenBatch`) over ``items`` on ``actors`` actors of
    ``threads`` CPUs each (default: as many as the cluster's CPUs allow) and yield each record as it comes back,
    in no particular order. A dead actor is restarted and its batch retried: by Ray Data's own actor fault
    tolerance (``max_restarts=-1``, ``max_task_retries=-1``: until it goes through) unless ``max_restarts`` bounds
    both (passed as Ray remote arguments, which Ray 2.5x deprecates)."""
    if not items:
        return
    ray = session.connect()
    n = actors or max(1, session.cpus() // threads)
    ds = ray.data.from_items([{"index": it.index, "id": it.id, "prompt": it.prompt, "error": it.error}
                              for it in items])
    retry = {} if max_restarts is None else {"max_restarts": max_restarts, "max_task_retries": max_restarts}
    ds = ds.map_batches(fn, fn_constructor_kwargs=fn_kwargs, batch_size=batch_size, concurrency=n, num_cpus=threads,
                        **retry)
    try:
        for row in ds.iter_rows():
            yield json.loads(row["record"])
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except Exception as e:  # noqa: BLE001  (Ray wraps worker failures in many types: one line, ours if we can)
        ours = _cause(e)
        if ours is not None:
            raise ours from None
        raise SafeInferError(f"the Ray run failed: {type(e).__name__}: {_line(e)}") from None


def filter_run(si, items: list[Item], out: Path | None = None, split: Path | None = None,
               shard: tuple[int, int] | None = None, parallel: int = 1, frame: str | None = None, judge=None,
               progress=None, on_resume=None, force: bool = False, address: str | None = "local",
               actors: int | None = None, threads: int = 1, num_cpus: int | None = None, batch_size: int = BATCH,
               max_restarts: int | None = None, quiet: bool = True, **gen) -> Summary:
    """``safeinfer filter --ray``: :func:`workflows.filter.run` (same arguments, same output, same resume) with
    the generations on Ray actors (``actors`` of ``threads`` threads each; ``address`` and ``num_cpus`` as in
    :class:`Session`). ``si`` writes the header and fixes the settings the actors rebuild (:func:`settings_of`)."""
    session = Session(address, num_cpus, quiet)
    kwargs = {"settings": settings_of(si, threads), "frame": frame, "gen": gen, "parallel": parallel,
              "judge_model": str(judge.model.path) if judge is not None else None,
              "fingerprint": si.fingerprint()}

    def records(todo: list[Item]) -> Iterator[dict]:
        return map_items(session, todo, FilterBatch, kwargs, actors, threads, max(batch_size, parallel),
                         max_restarts)

    # Ray's driver prints the errors its raylets report (a dead actor, a retried task) on sys.stdout: with the
    # records on standard output, they go to stderr for the run, and the records to the real stdout
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr if out is None else stdout):
        try:
            return flt.run(si, items, out, split, shard, parallel, frame, judge, progress, on_resume, force,
                           records=records, stream=stdout if out is None else None, **gen)
        finally:
            session.close()
