"""One settings schema (``safeinfer_local.schema.SETTINGS``), and every place that lists settings derived from it:
``SafeInfer.__init__`` (checks before any model loads), ``with_``, ``values``, ``describe``, ``fingerprint``, the
CLI's options and ``options.load_from``, serve's ``SafetyOptions``, ``settings_for`` and group key, and
``ray.settings_of``. Each test walks the schema, so a derivation that drops a field fails here."""

import inspect

import pytest

from safeinfer_local import schema
from safeinfer_local.api import SafeInfer
from safeinfer_local.cli import options as o
from safeinfer_local.errors import UsageError

from .test_options import _commands, _opts

NAMES = {s.name for s in schema.SETTINGS}

BAD = {  # a value each checked setting refuses
    "gamma": 1e9, "layers": "6,x", "positions": "middle", "guidance": "nonsense", "lam": 1.0, "speculate": 99,
    "variant": "greedy", "gate": "maybe", "gate_threshold": float("nan"), "on_flag": "shrug", "refusal": "  ",
    "n_ctx": 8, "n_threads": 0, "n_gpu_layers": -2,
}

CHANGES = {  # a valid new value for each setting with_ may change (on the default model and vector)
    "gamma": 0.25, "layers": (12,), "positions": "all", "guidance": "none", "lam": 0.3, "speculate": 2,
    "variant": "sa", "gate": "off", "gate_threshold": 0.5, "on_flag": "steer", "refusal": "No.",
}


def test_the_schema_is_well_formed():
    flags = [s.flag for s in schema.SETTINGS]
    assert len(flags) == len(set(flags)) and len(NAMES) == len(schema.SETTINGS)
    for s in schema.SETTINGS:
        assert s.flag.startswith("--") and s.help.strip(), s.name
        assert not (s.load and (s.request or s.group)), s.name  # fixed at load: one value per server
        if s.group:
            assert s.variants, s.name  # describe() records what shapes a decode


def test_every_checked_setting_is_refused_before_any_model_loads(tmp_path):
    """A bad value of any setting is one clear error, raised before the model is even looked for."""
    assert set(BAD) == {s.name for s in schema.SETTINGS if s.check is not None}
    missing = str(tmp_path / "no-such-model.gguf")
    for name, bad in BAD.items():
        with pytest.raises(UsageError) as e:
            SafeInfer(model=missing, vector=None, **{name: bad})
        assert "no-such-model" not in str(e.value), name
        # the CLI path: the option reaches SafeInfer by its schema name
        params = {"model": missing, "vector": "none", ("threads" if name == "n_threads" else name): bad}
        with pytest.raises(UsageError):
            o.load_from(params)


def test_safeinfer_takes_every_setting_and_with_refuses_load_ones():
    params = inspect.signature(SafeInfer.__init__).parameters
    assert NAMES <= set(params)
    assert set(schema.CHANGEABLE) == set(CHANGES)
    for name, p in params.items():
        if name in NAMES and name not in ("model", "vector", "on_flag"):
            assert p.default == schema.BY_NAME[name].default, name
    with pytest.raises(TypeError, match="fixed when the model loads"):
        schema.check_settings({"n_ctx": 512}, schema.CHANGEABLE)
    with pytest.raises(TypeError, match="unknown setting"):
        schema.check_settings({"gama": 1.0})


def test_the_cli_options_are_the_schema_s():
    """Every setting has one option (flag, help and default from the schema), and the commands that load a model
    with every setting expose them all."""
    for s in schema.SETTINGS:
        opt = o.option(s.name)
        assert s.flag in opt.param_decls and opt.help == s.help and opt.default == s.default, s.name
    cmds = dict(_commands())
    for name in ("generate", "chat", "filter", "serve"):  # score: teacher-forced, nothing to speculate
        opts = _opts(cmds[name])
        for s in schema.SETTINGS:
            assert s.flag in opts and opts[s.flag].help == s.help, (name, s.flag)


def test_serve_request_options_are_the_schema_s():
    from safeinfer_local.serve.protocol import SafetyOptions

    assert set(SafetyOptions.model_fields) == set(schema.REQUEST) | {"frame"}


@pytest.mark.model
def test_values_rebuild_the_same_object_and_ray_sends_them_all(si):
    from safeinfer_local.ray import settings_of

    vals = si.values()
    assert set(vals) == NAMES
    assert set(settings_of(si)) == NAMES and settings_of(si, 3)["n_threads"] == 3
    again = SafeInfer(**(vals | {"model": si.model}))
    assert again.fingerprint() == si.fingerprint() and again.values().keys() == vals.keys()


@pytest.mark.model
def test_each_change_reaches_values_fingerprint_describe_and_the_group_key(si):
    from safeinfer_local.serve.scheduler import group_key

    base = si.with_(gate="auto")
    fp, run = base.fingerprint(), "safeinfer"
    for name, value in CHANGES.items():
        s = schema.BY_NAME[name]
        new = base.with_(**{name: value})
        got = new.values()[name]
        assert (str(got) if name == "guidance" else got) == value, name
        changed = base.values()[name] != got
        if not changed:
            continue  # the default vector's own value (its one block)
        assert (new.fingerprint() != fp) == s.fingerprint, name
        if name != "variant":
            assert (group_key(new, run) != group_key(base, run)) == s.group, name
        if s.group or run in s.variants:
            assert name in new.settings.describe(run) or name == "variant", name


@pytest.mark.model
def test_settings_for_checks_each_request_setting_by_its_field(si):
    from safeinfer_local.serve.protocol import ApiError, SafetyOptions, settings_for

    for name in schema.REQUEST:
        with pytest.raises(ApiError) as e:
            settings_for(si, SafetyOptions(**{name: BAD[name]}))
        assert e.value.status == 400 and e.value.param == f"safeinfer.{name}", name
        out, variant, _ = settings_for(si, SafetyOptions(**{name: CHANGES[name]}))
        assert out.values()[name] is not None and variant == (CHANGES[name] if name == "variant" else
                                                             si.default_variant())
