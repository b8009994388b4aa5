"""A real pretrained CNN end to end: the YOLOv8n detector shipped in the ``nudenet`` wheel.

The wheel is fetched from PyPI with ``pip download`` once per session (the only network access)
and ``320n.onnx`` (12 MB, 64 convs, opset 17, PyTorch 2.3 export with symbolic batch / height /
width and shape subgraphs in the detection head) is extracted from it; the tests are skipped,
with the reason, when the wheel cannot be fetched. The σ_max of every conv at its real input size
is a heavy computation (the 320×320 stem alone takes minutes of Lanczos on 2 cores): it runs
only with ``CONVSPECTRA_SLOW_TESTS=1``; the default run checks a representative subset. It runs
in a subprocess compiled at XLA's default optimisation level (``tests.xla_flags.optimised``):
the suite's level 0 made it 20x slower to run. ``python -m tests.train.test_onnx_nudenet FILE
KEY...`` is that subprocess.
"""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

import spectra
import train
from tests import xla_flags
from tests.train.onnx_graphs import fetch_wheel_member
from tests.train.onnx_graphs import run_ort
from train.models import fold_batch_norm
from train.models import from_onnx

WHEEL = "nudenet==3.4.2"
INPUT_SHAPE = (1, 3, 320, 320)
SLOW = os.environ.get("CONVSPECTRA_SLOW_TESTS") == "1"


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nudenet")
    path = fetch_wheel_member(directory, WHEEL, "nudenet-*.whl", "nudenet/320n.onnx")
    yield path
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def imported(onnx_path):
    return from_onnx(onnx_path, input_shape=INPUT_SHAPE)


@pytest.fixture(scope="module")
def specs(imported):
    found = train.find_convs(imported.apply_fn, imported.params, *imported.example_inputs())
    return {key: entry["W"] for key, entry in found.items() if entry.get("W") is not None}


def test_outputs_match_onnxruntime(onnx_path, imported):
    x = np.random.default_rng(0).uniform(size=INPUT_SHAPE).astype(np.float32)
    (got,) = jax.jit(imported.apply_fn)(imported.params, x)
    (want,) = run_ort(onnx.load(onnx_path), {"images": x})
    assert got.shape == want.shape == (1, 22, 2100)
    # Rows 0-3 are boxes in pixels (up to 320), rows 4-21 class probabilities. 64 float32 convs
    # accumulate in a different order in XLA and onnxruntime (MLAS): measured differences are
    # ~5e-7 of the output range, bounded here by 1e-5 of it.
    boxes, want_boxes = np.asarray(got[:, :4]), want[:, :4]
    np.testing.assert_allclose(boxes, want_boxes, rtol=1e-5, atol=1e-5 * np.abs(want_boxes).max())
    np.testing.assert_allclose(np.asarray(got[:, 4:]), want[:, 4:], rtol=1e-5, atol=1e-6)


def test_every_conv_is_found_with_its_onnx_spec(onnx_path, imported, specs):
    model = onnx.load(onnx_path)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    # The real input size of every conv, from onnxruntime: conv inputs made graph outputs.
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(c.input[0]) for c in convs)
    x = np.zeros(INPUT_SHAPE, np.float32)
    values = run_ort(probe, {"images": x})[len(model.graph.output) :]
    shapes = {conv.input[0]: value.shape for conv, value in zip(convs, values)}
    weights = {t.name: t for t in model.graph.initializer}
    assert len(convs) == 64 and sorted(specs) == sorted(n.name for n in convs)
    for conv in convs:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
        w = onnx.numpy_helper.to_array(weights[conv.input[1]])
        spec = specs[conv.name]
        kernel = imported.params[conv.name]["W"]
        np.testing.assert_array_equal(kernel, w.transpose(2, 3, 1, 0))
        pads = attrs.get("pads", [0, 0, 0, 0])
        assert attrs.get("auto_pad", b"NOTSET") == b"NOTSET"
        assert spec.input_shape == shapes[conv.input[0]][2:]
        assert spec.in_features == shapes[conv.input[0]][1]
        assert spec.strides == tuple(attrs.get("strides", (1, 1)))
        assert spec.kernel_dilation == tuple(attrs.get("dilations", (1, 1)))
        assert spec.feature_group_count == attrs.get("group", 1)
        assert spec.pads(kernel.shape) == ((pads[0], pads[2]), (pads[1], pads[3]))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _power_iteration(kernel, spec, num_iterations):
    """A float64 lower estimate of σ_max with the real conv and its transpose."""
    v = jax.random.normal(jax.random.PRNGKey(1), (*spec.input_shape, spec.in_features))

    def step(_, v):
        w = spectra.conv_transpose(kernel, spectra.conv(kernel, v, spec), spec)
        return w / jnp.linalg.norm(w)

    v = jax.lax.fori_loop(0, num_iterations, step, v / jnp.linalg.norm(v))
    return jnp.linalg.norm(spectra.conv(kernel, v, spec))


def _check_sigma_max(kernel, spec):
    """Lanczos σ_max (float32, at the layer's real input size) against references."""
    estimate = spectra.lanczos_spectral_norm(jnp.asarray(kernel, jnp.float32), spec)
    sigma = float(estimate.value)
    assert float(estimate.residual) <= 1e-5
    kernel64 = np.asarray(kernel, np.float64)
    if kernel.shape[:2] == (1, 1) and spec.strides == (1, 1):
        # A 1x1 conv applies the same (c_in, c_out) matrix at every pixel: σ_max is its norm.
        exact = np.linalg.norm(kernel64[0, 0], 2)
        np.testing.assert_allclose(sigma, exact, rtol=1e-5)
        return sigma
    lower = float(_power_iteration(jnp.asarray(kernel64), spec, 300))  # x64: tests/conftest.py
    upper = float(spectra.symbol_sup_bound(jnp.asarray(kernel64), spec))
    assert lower * (1 - 1e-5) <= sigma <= upper * (1 + 1e-5)
    np.testing.assert_allclose(sigma, lower, rtol=2e-3)  # Power iteration nearly converged.
    return sigma


def _subset(specs, imported):
    """A 1x1 conv, a 3x3 conv and a strided 3x3 conv, at their real input sizes."""
    picked = {}
    for key, spec in specs.items():
        k = imported.params[key]["W"].shape[:2]
        kind = (k, spec.strides, spec.input_shape)
        if kind in (
            ((1, 1), (1, 1), (10, 10)),
            ((3, 3), (1, 1), (10, 10)),
            ((3, 3), (2, 2), (20, 20)),
        ):
            picked.setdefault(kind, key)
    assert len(picked) == 3
    return sorted(picked.values())


def test_sigma_max_of_conv_layers_at_their_input_sizes(onnx_path, imported, specs):
    keys = sorted(specs) if SLOW else _subset(specs, imported)
    result = subprocess.run(
        [sys.executable, "-m", "tests.train.test_onnx_nudenet", onnx_path, *keys],
        capture_output=True,
        text=True,
        env=xla_flags.optimised(os.environ),
        cwd=pathlib.Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sigmas = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(sigmas) == sorted(keys)
    assert all(s > 0 for s in sigmas.values())


def _check_layers(onnx_path: str, keys: list[str]) -> dict[str, float]:
    """:func:`_check_sigma_max` on the convs ``keys`` of the imported model (float64 enabled)."""
    jax.config.update("jax_enable_x64", True)
    model = from_onnx(onnx_path, input_shape=INPUT_SHAPE)
    found = train.find_convs(model.apply_fn, model.params, *model.example_inputs())
    sigmas = {}
    for key in keys:
        sigmas[key] = _check_sigma_max(model.params[key]["W"], found[key]["W"])
        jax.clear_caches()
    return sigmas


def test_fold_batch_norm_finds_nothing_to_fold_in_a_pytorch_export(imported):
    # torch.onnx.export folds BatchNormalization into the convs in eval mode already.
    folded, folds = fold_batch_norm(imported)
    assert folds == () and folded is imported


def test_to_onnx_round_trip_of_new_weights(imported, tmp_path):
    """The way back on a real export: new weights written, onnxruntime equals apply_fn."""
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda a: (np.asarray(a) * (1 + 0.05 * rng.standard_normal(np.shape(a)))).astype(a.dtype),
        imported.params,
    )
    path = tmp_path / "yolov8n_new.onnx"
    imported.to_onnx(params, path)
    x = np.random.default_rng(0).uniform(size=INPUT_SHAPE).astype(np.float32)
    (got,) = jax.jit(imported.apply_fn)(params, x)
    (want,) = run_ort(onnx.load(str(path)), {imported.input_names[0]: x})
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * scale)


if __name__ == "__main__":
    from train.lapack_workaround import avoid_cpu_lapack_deadlock

    avoid_cpu_lapack_deadlock()
    print(json.dumps(_check_layers(sys.argv[1], sys.argv[2:])))
