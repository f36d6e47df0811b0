import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lifl.layout import ALIGN, Layout, LayoutError, TensorSpec, from_torch, to_torch

DT = ["float32", "float16", "float64", "int64", "int32", "uint8", "bool", "bfloat16"]


def _arrays(draw_specs, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i, (dt, shape) in enumerate(draw_specs):
        npdt = ml_dtypes.bfloat16 if dt == "bfloat16" else np.dtype(dt)
        out[f"t{i}"] = (rng.standard_normal(shape) * 10).astype(npdt)
    return out


specs_st = st.lists(st.tuples(st.sampled_from(DT), st.lists(st.integers(0, 7), max_size=3).map(tuple)),
                    min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(specs_st, st.integers(1, 300))
def test_pack_and_chunks_round_trip(specs, chunk):
    arrays = _arrays(specs)
    lay = Layout.from_arrays(arrays)
    assert all(off % ALIGN == 0 for off in lay.offsets)
    buf = bytearray(lay.total_size)
    lay.pack_into(arrays, buf)
    joined = b"".join(bytes(c) for c in lay.chunks(arrays, chunk))
    assert len(joined) == lay.total_size
    # padding may differ; tensor bytes must not
    for k, v in lay.views(bytearray(joined)).items():
        assert v.dtype == arrays[k].dtype and v.tobytes() == arrays[k].tobytes()
    for k, v in lay.views(buf).items():
        assert v.tobytes() == arrays[k].tobytes()


def test_views_are_zero_copy():
    a = {"x": np.arange(10, dtype=np.float32)}
    lay = Layout.from_arrays(a)
    buf = bytearray(lay.total_size)
    v = lay.views(buf)["x"]
    v[3] = 42
    assert np.frombuffer(buf, np.float32)[3] == 42


def test_bad_specs_are_refused():
    with pytest.raises(LayoutError, match="appears twice"):
        Layout.from_specs([TensorSpec("a", "float32", (1,)), TensorSpec("a", "float32", (2,))])
    with pytest.raises(LayoutError, match="not supported"):
        Layout.from_specs([TensorSpec("a", "complex64", (1,))])
    with pytest.raises(LayoutError, match="negative"):
        Layout.from_specs([TensorSpec("a", "float32", (-1,))])
    with pytest.raises(LayoutError, match="at least one"):
        Layout.from_specs([])
    with pytest.raises(LayoutError, match="not supported"):
        Layout.from_arrays({"c": np.zeros(2, np.complex64)})
    lay = Layout.from_arrays({"a": np.zeros(3, np.float32)})
    with pytest.raises(LayoutError, match="shape"):
        lay.pack_into({"a": np.zeros(4, np.float32)}, bytearray(lay.total_size))
    with pytest.raises(LayoutError, match="dtype"):
        lay.pack_into({"a": np.zeros(3, np.float64)}, bytearray(lay.total_size))
    with pytest.raises(LayoutError, match="missing"):
        lay.pack_into({"b": np.zeros(3, np.float32)}, bytearray(lay.total_size))


def test_big_endian_input_is_stored_little_endian():
    a = {"x": np.arange(5, dtype=">f4")}
    lay = Layout.from_arrays(a)
    buf = bytearray(lay.total_size)
    lay.pack_into(a, buf)
    assert np.array_equal(lay.views(buf)["x"], np.arange(5, dtype=np.float32))


def test_torch_round_trip_including_bfloat16():
    torch = pytest.importorskip("torch")
    sd = {"w": torch.randn(3, 4), "h": torch.randn(5).to(torch.bfloat16), "n": torch.tensor(7)}
    arrays = from_torch(sd)
    assert str(arrays["h"].dtype) == "bfloat16"
    back = to_torch(arrays)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k])
