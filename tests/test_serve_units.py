"""The server's parts that need no model: the engine thread's scheduling over generators that share llama.cpp
contexts (with fake generators that record which requests each one holds), and the wire format's checks."""

import dataclasses
import threading
from collections import deque

import pytest

pytest.importorskip("fastapi")

from safeinfer_local.api import Route  # noqa: E402
from safeinfer_local.decode.batch import Event, GenConfig, Result, Step  # noqa: E402
from safeinfer_local.serve import protocol as p  # noqa: E402
from safeinfer_local.serve.scheduler import Busy, Done, Failed, Job, Scheduler  # noqa: E402

# -- the scheduler, on fakes --------------------------------------------------------------------------------
SIDES = {"base": ("plain",), "sa": ("plain",), "sgds": ("target", "guide"), "safeinfer": ("target", "guide")}
"""As in the decoder: base and sa share the plain context; sgds and safeinfer (negative guidance) share two."""


class FakeSide:
    def __init__(self, name):
        self.name = name
        self.holders: set = set()  # generators holding requests on this side right now


class FakeGen:
    """Holds each request for ``steps`` steps, then finishes it; asserts no other generator holds its sides."""

    log: list = []

    def __init__(self, variant, sides, slots, steps=3):
        self.variant, self.slots, self.steps = variant, slots, steps
        self.target, self.guide = sides[0], sides[1] if len(sides) > 1 else None
        self.pending, self.active = deque(), {}

    def _sides(self):
        return [s for s in (self.target, self.guide) if s is not None]

    def insert(self, key, tokens, cfg, prompt="", handoff=None):
        self.pending.append(key)
        self._update()

    def remove(self, key):
        if key in self.pending:
            self.pending.remove(key)
        self.active.pop(key, None)
        self._update()
        return True

    def __bool__(self):
        return bool(self.pending or self.active)

    def _update(self):
        for s in self._sides():
            (s.holders.add if self else s.holders.discard)(self)

    def step(self):
        while self.pending and len(self.active) < self.slots:
            self.active[self.pending.popleft()] = 0
        self._update()
        for s in self._sides():
            assert s.holders == {self}, f"{s.name} held by {len(s.holders)} generators at once"
        FakeGen.log.append((self.variant, tuple(self.active)))
        events = []
        for k in list(self.active):
            self.active[k] += 1
            if self.active[k] >= self.steps:
                del self.active[k]
                step = Step(1, "x", finish="max_tokens")
                events.append(Event(k, step, Result("p", "x", self.variant, 1, 0.0, 0.0, "max_tokens")))
            else:
                events.append(Event(k, Step(1, "x")))
        self._update()
        return events


@dataclasses.dataclass(frozen=True)
class FakeSettings:
    variant: str = "safeinfer"
    refusal: str = "no"

    def describe(self, variant=None):
        return {"variant": variant or self.variant}


class FakeSI:
    n_ctx = 4096

    def __init__(self, variant="safeinfer"):
        self.settings = FakeSettings(variant)
        self.sides = {n: FakeSide(n) for n in ("plain", "target", "guide")}

    def default_variant(self):
        return self.settings.variant

    def active_gate(self, variant=None):
        return None

    def encode_prompt(self, prompt, frame=None):
        if prompt == "too long":
            return list(range(5000)), ()
        return [1, 2, 3], ()

    def route(self, tokens, variant=None, frame="template"):
        return Route(variant or self.settings.variant)

    def batch(self, variant, slots, layout="auto", prefill_chunk=0):
        assert layout == "split"  # the server keeps the two-context layout (see scheduler._group)
        return FakeGen(variant, [self.sides[n] for n in SIDES[variant]], slots)

    def with_(self, variant):
        other = FakeSI.__new__(FakeSI)
        other.__dict__.update(self.__dict__)
        other.settings = FakeSettings(variant)
        return other


def _run(jobs_spec, parallel=2, queue=16):
    """Submit (variant, prompt) jobs, all before the engine thread starts (so that it sees them in one round);
    return {index: last update} once all are done."""
    si = FakeSI()
    sched = Scheduler(si, parallel, queue, warm=False)
    out, done = {}, threading.Event()

    def sink_for(i):
        def sink(u):
            if isinstance(u, (Done, Failed)):
                out[i] = u
                if len(out) == len(jobs_spec):
                    done.set()
        return sink

    FakeGen.log = []
    for i, (variant, prompt) in enumerate(jobs_spec):
        sched.submit(Job(si.with_(variant), variant, prompt, "template", GenConfig(max_tokens=3), sink_for(i)))
    sched.start()
    try:
        assert done.wait(10), out
    finally:
        sched.close()
    return out


def test_generators_on_a_shared_context_never_hold_requests_at_once():
    # base and sa share the plain side; sgds and safeinfer share target + guide. FakeGen.step asserts exclusivity.
    spec = [(v, f"q{i}") for i, v in enumerate(["base", "sa", "sgds", "safeinfer"] * 3)]
    out = _run(spec)
    assert all(isinstance(u, Done) for u in out.values())
    assert {u.applied for u in out.values()} == {"base", "sa", "sgds", "safeinfer"}


def test_groups_on_disjoint_contexts_are_decoded_in_the_same_rounds():
    _run([("base", "a"), ("safeinfer", "b"), ("base", "c"), ("safeinfer", "d")])
    variants_per_round = [v for v, _ in FakeGen.log]
    # both groups step while both have work: the log alternates instead of running one group to the end
    assert variants_per_round[:4] in (["base", "safeinfer"] * 2, ["safeinfer", "base"] * 2), variants_per_round


def test_first_come_first_served_across_groups_that_share_a_context():
    # a base request arrives first, then sa, then more base: the later base requests must not overtake sa
    spec = [("base", "a"), ("sa", "b"), ("base", "c"), ("base", "d")]
    _run(spec, parallel=4)
    order = []
    for v, keys in FakeGen.log:
        if keys and (not order or order[-1] != (v, keys)):
            order.append((v, keys))
    assert [v for v, _ in order][:3] == ["base", "sa", "base"], order


def test_a_prompt_too_long_fails_alone_and_a_full_server_is_busy():
    out = _run([("base", "too long"), ("base", "fine")])
    assert isinstance(out[0], Failed) and "context" in str(out[0].error) and isinstance(out[1], Done)
    si = FakeSI()
    sched = Scheduler(si, 1, 1, warm=False)  # not started: what is submitted stays in
    for _ in range(2):
        sched.submit(Job(si, "base", "q", "template", GenConfig(), lambda u: None))
    with pytest.raises(Busy):
        sched.submit(Job(si, "base", "q", "template", GenConfig(), lambda u: None))


# -- the wire format ----------------------------------------------------------------------------------------
def _gen(**kw):
    return p.ChatRequest(messages=[{"role": "user", "content": "hi"}], **kw)


@pytest.mark.parametrize("kw, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"seed": -1}, "seed"), ({"stop": ["ok", ""]}, "stop"), ({"n": 3}, "n"), ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_sampling_errors_name_their_field(kw, param):
    with pytest.raises(p.ApiError) as e:
        p.gen_config(_gen(**kw), 128)
    assert e.value.status == 400 and e.value.param == param
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_sampling_defaults_and_fields_that_mean_nothing_are_accepted():
    cfg = p.gen_config(_gen(logprobs=False, presence_penalty=0, user="me", stop="END"), 77)
    assert (cfg.max_tokens, cfg.temperature, cfg.stop) == (77, 0.8, ("END",))
    assert p.gen_config(_gen(max_tokens=5, max_completion_tokens=9, temperature=0), 1).max_tokens == 9


def test_chat_content_parts_and_finish_reasons():
    req = p.ChatRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                               {"type": "text", "text": "b"}]}])
    assert p.chat_messages(req) == [{"role": "user", "content": "ab"}]
    with pytest.raises(p.ApiError):
        p.chat_messages(p.ChatRequest(messages=[{"role": "user", "content": [{"type": "image_url"}]}]))
    # every way a request can end maps to one of OpenAI's finish reasons; a cut-off reply is "length"
    from safeinfer_local.decode.batch import FINISH_REASONS

    assert set(p.FINISH) == set(FINISH_REASONS)
    assert set(p.FINISH.values()) <= {"stop", "length", "content_filter", "tool_calls", "function_call"}
    assert p.FINISH["max_tokens"] == p.FINISH["context"] == "length"
    assert p.sse({"a": 1}) == 'data: {"a": 1}\n\n' and p.DONE == "data: [DONE]\n\n"


# -- the body limit -----------------------------------------------------------------------------------------
def _limited_app(limit):
    from fastapi import FastAPI
    from pydantic import BaseModel

    from safeinfer_local.serve.app import BodyLimit, _too_large, _TooLarge

    class Body(BaseModel):
        text: str

    app = FastAPI()
    app.add_middleware(BodyLimit, limit=limit)
    seen = []

    @app.exception_handler(_TooLarge)
    async def _h(request, e):
        return _too_large(e.limit)

    @app.post("/echo")
    async def echo(b: Body):
        seen.append(len(b.text))
        return {"n": len(b.text)}

    return app, seen


def test_a_body_over_the_limit_gets_413_before_it_is_parsed():
    from fastapi.testclient import TestClient

    app, seen = _limited_app(4096)
    c = TestClient(app)
    assert c.post("/echo", json={"text": "a" * 1000}).json() == {"n": 1000}
    r = c.post("/echo", json={"text": "a" * 10_000})  # Content-Length says so: refused unread
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "4096 bytes" in err["message"]

    def chunks():  # no Content-Length: refused once the bytes read pass the limit
        yield b'{"text": "'
        for _ in range(100):
            yield b"a" * 1000
        yield b'"}'

    r = c.post("/echo", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert seen == [1000]  # neither large body reached the handler


def test_the_default_body_limit_follows_the_context():
    from safeinfer_local.serve.app import default_max_body

    assert default_max_body(2048) == (1 << 20) + 256 * 2048 < 30_000_000  # the 30 MB body of the issue
    assert default_max_body(131072) > default_max_body(2048)


def test_a_full_engine_queue_is_one_503_for_every_route():
    """Completions and moderations hand their work over through one helper: Busy becomes 503 with Retry-After
    and an OpenAI-style body; anything submitted otherwise goes through unchanged."""
    from safeinfer_local.serve.routes import _submit_or_503

    def full(*args):
        raise Busy("the queue is full (16 waiting)")

    with pytest.raises(p.ApiError) as e:
        _submit_or_503(full, "job")
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"}
    assert e.value.body()["error"]["code"] == "server_busy" and "queue is full" in e.value.body()["error"]["message"]
    got = []
    _submit_or_503(lambda *a: got.append(a), "fn", "sink")
    assert got == [("fn", "sink")]
