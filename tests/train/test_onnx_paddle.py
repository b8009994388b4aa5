"""A real paddle2onnx export whose weights are all ``Constant`` nodes: the PP-OCR direction
classifier shipped in the ``rapidocr-onnxruntime`` wheel.

``ch_ppocr_mobile_v2.0_cls_infer.onnx`` (0.6 MB, opset 11, IR 7, no initializers: 308
``Constant`` nodes, 53 convs, 35 BatchNormalizations, weights also through ``Reshape``) is
extracted from the wheel fetched with ``pip download`` once per module (the only network
access); the tests are skipped, with the reason, when it cannot be fetched.
"""

import dataclasses
import shutil

import jax
import numpy as np
import onnx
import pytest

import train
from tests.train.onnx_graphs import assert_outputs_close
from tests.train.onnx_graphs import fetch_wheel_member
from tests.train.onnx_graphs import run_ort
from train.models import fold_batch_norm
from train.models import from_onnx

WHEEL = "rapidocr-onnxruntime==1.4.4"
MEMBER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
# Height 160 as before the small-input work; inputs smaller than a kernel are
# covered by tests/spectra/test_small_inputs.py.
INPUT_SHAPE = (1, 3, 160, 192)


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rapidocr")
    path = fetch_wheel_member(directory, WHEEL, "rapidocr_onnxruntime-*.whl", MEMBER)
    yield path
    shutil.rmtree(directory, ignore_errors=True)


def test_constant_weights_are_params_and_every_conv_is_found(onnx_path, tmp_path):
    source = onnx.load(onnx_path)
    assert not source.graph.initializer
    n_convs = sum(n.op_type == "Conv" for n in source.graph.node)
    model = from_onnx(onnx_path, input_shape=INPUT_SHAPE)
    specs = train.find_convs(model.apply_fn, model.params, *model.example_inputs())
    found = [k for k, e in specs.items() if e.get("W") is not None]
    assert n_convs == 53 and len(found) == n_convs
    bns = [s for s in model.program.steps if s.info.op_type == "BatchNormalization"]
    assert bns and all(s.info.name in model.params for s in bns)
    x = np.random.default_rng(0).uniform(size=INPUT_SHAPE).astype(np.float32)
    got = jax.jit(model.apply_fn)(model.params, x)
    assert_outputs_close(got, run_ort(source, {"x": x}))

    # The way back, BatchNorm folded: no Constant weights, no BatchNormalization left, and
    # onnxruntime computes the folded model on new weights.
    params = jax.tree.map(lambda a: np.asarray(a) * np.float32(0.9), model.params)
    path = tmp_path / "cls_folded.onnx"
    written = model.to_onnx(params, path, fold_bn=True)
    assert not any(n.op_type == "BatchNormalization" for n in written.graph.node)
    assert len(written.graph.initializer) >= n_convs
    folded, folds = fold_batch_norm(dataclasses.replace(model, params=params))
    assert len(folds) == len(bns)
    want = jax.jit(folded.apply_fn)(folded.params, x)
    assert_outputs_close(run_ort(onnx.load(str(path)), {"x": x}), [np.asarray(w) for w in want])
    again = from_onnx(str(path), input_shape=INPUT_SHAPE)
    assert sorted(again.params) == sorted(folded.params)
