import numpy as np
import pytest

from safeinfer_local.core.vectors import SafetyVector
from safeinfer_local.errors import VectorError


def _vec(n=16, layers=(2, 5)):
    rng = np.random.default_rng(0)
    return SafetyVector({i: rng.normal(size=n).astype(np.float32) for i in layers}, model_hint="m",
                        method="mean-diff", gamma=0.5, layers=(5,), positions="last", source_model="m.gguf",
                        demos_sha256="abc", meta={"heads": [{"layer": 1, "head": 2}]})


def test_gguf_round_trip_identical(tmp_path):
    v = _vec()
    p = v.save(tmp_path / "v.gguf")
    w = SafetyVector.load(p)
    assert sorted(w.directions) == [2, 5]
    for i in v.directions:
        assert np.array_equal(v.directions[i], w.directions[i])
    assert (w.model_hint, w.method, w.gamma, w.layers, w.positions, w.source_model, w.demos_sha256) == (
        "m", "mean-diff", 0.5, (5,), "last", "m.gguf", "abc")
    assert w.meta == v.meta


def test_file_has_llama_cpp_control_vector_keys(tmp_path):
    import gguf

    p = _vec().save(tmp_path / "v.gguf")
    r = gguf.GGUFReader(str(p))
    assert r.fields["general.architecture"].contents() == "controlvector"
    assert r.fields["controlvector.model_hint"].contents() == "m"
    assert r.fields["controlvector.layer_count"].contents() == 2
    t = {x.name: x for x in r.tensors}
    assert set(t) == {"direction.2", "direction.5"}
    assert all(x.tensor_type == gguf.GGMLQuantizationType.F32 and len(x.shape) == 1 for x in t.values())


def test_npy_and_npz_import_match(tmp_path):
    v = _vec()
    arr = np.zeros((8, 16), np.float32)
    for i, a in v.directions.items():
        arr[i] = a
    np.save(tmp_path / "v.npy", arr)
    a = SafetyVector.load(tmp_path / "v.npy")
    np.savez(tmp_path / "v.npz", **{f"direction.{i}": x for i, x in v.directions.items()})
    b = SafetyVector.load(tmp_path / "v.npz")
    for w in (a, b):
        assert sorted(w.directions) == [2, 5]
        for i in v.directions:
            assert np.array_equal(v.directions[i], w.directions[i])


def test_repeng_style_gguf_imports(tmp_path):
    """repeng's export_gguf writes only the llama.cpp keys; it must load as an imported vector."""
    import gguf

    p = tmp_path / "repeng.gguf"
    w = gguf.GGUFWriter(str(p), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 2)
    w.add_tensor("direction.1", np.ones(16, np.float32))
    w.add_tensor("direction.3", np.full(16, 2.0, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    v = SafetyVector.load(p)
    assert v.method == "imported" and v.model_hint == "llama" and v.layers == (1, 3)
    assert np.array_equal(v.directions[3], np.full(16, 2.0, np.float32))


def test_buffer_layout_and_full_size():
    v = _vec()
    buf = v.buffer(n_layer=8, gamma=2.0).reshape(7, 16)
    assert np.array_equal(buf[4], v.directions[5] * 2)  # block 5 -> row 4; only recommended layers
    assert not buf[1].any()
    buf2 = v.buffer(n_layer=8, gamma=1.0, layers=(2, 5)).reshape(7, 16)
    assert np.array_equal(buf2[1], v.directions[2])
    with pytest.raises(VectorError, match="out of range"):
        v.buffer(n_layer=5, gamma=1.0)


def test_invalid_vectors_rejected(tmp_path):
    with pytest.raises(VectorError, match="NaN"):
        SafetyVector({3: np.array([1.0, np.nan])})
    with pytest.raises(VectorError, match="block 0"):
        SafetyVector({0: np.ones(4)})
    with pytest.raises(VectorError, match="finite"):
        SafetyVector({3: np.ones(4)}, gamma=float("inf"))
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(VectorError, match="not a readable GGUF"):
        SafetyVector.load(tmp_path / "x.gguf")
    with pytest.raises(VectorError, match="not found"):
        SafetyVector.load(tmp_path / "missing.gguf")


def test_arithmetic():
    v = _vec()
    w = v + (-v) * 0.5
    assert np.allclose(w.directions[5], v.directions[5] * 0.5)
