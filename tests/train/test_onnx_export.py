"""ONNX weights in every form (initializer, Constant node, old-IR input) and the way back:
``OnnxModel.to_onnx`` against onnxruntime, BatchNorm kept or folded, opsets 13 and 17."""

import dataclasses

import jax
import numpy as np
import onnx
import pytest
from onnx import helper
from onnx import numpy_helper

import train
from tests.train.onnx_graphs import assert_outputs_close
from tests.train.onnx_graphs import make_model
from tests.train.onnx_graphs import randn
from tests.train.onnx_graphs import run_ort
from train.models import from_onnx

node = helper.make_node
FORMS = ("initializer", "constant", "old_ir")


def _weights() -> dict:
    rng = np.random.default_rng(7)

    def normal(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    return {
        "w1": normal(6, 3, 3, 3),
        "b1": normal(6),
        "g1": (1.0 + 0.2 * rng.standard_normal(6)).astype(np.float32),
        "beta1": normal(6),
        "m1": normal(6),
        "v1": (0.5 + rng.random(6)).astype(np.float32),
        "w2": normal(4, 6, 3, 3),
        "wf": normal(5, 16),
        "bf": normal(5),
        "wm": normal(5, 3),
        "bm": normal(3),
    }


def small_net(form: str, opset: int = 13):
    """conv -> BN -> relu -> conv (stride 2) -> avgpool -> reshape -> gemm -> relu -> matmul
    -> add, weights stored as ``form``; a float scale and the reshape target are Constant
    nodes in every form (not weights). Returns ``(model, x, weights)``."""
    weights = _weights()
    x = randn(1, 3, 8, 8, seed=5)
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        node("BatchNormalization", ["c1", "g1", "beta1", "m1", "v1"], ["n1"], name="bn1"),
        node("Relu", ["n1"], ["r1"], name="relu1"),
        node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        node("AveragePool", ["c2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        node(
            "Constant",
            [],
            ["shape"],
            name="shape_const",
            value=numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
        ),
        node("Reshape", ["p", "shape"], ["f"], name="flatten"),
        node(
            "Constant",
            [],
            ["half"],
            name="half_const",
            value=numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        ),
        node("Mul", ["f", "half"], ["fh"], name="scale"),
        node("Gemm", ["fh", "wf", "bf"], ["g"], name="fc", transB=1),
        node("Relu", ["g"], ["r2"], name="relu2"),
        node("MatMul", ["r2", "wm"], ["mm"], name="head"),
        node("Add", ["mm", "bm"], ["y"], name="head_bias"),
    ]
    initializers = dict(weights)
    if form == "constant":
        initializers = {}
        lifted = []
        for name, value in weights.items():
            if name == "w2":  # Constant -> Identity.
                lifted.append(
                    node(
                        "Constant",
                        [],
                        ["w2_raw"],
                        name="w2_const",
                        value=numpy_helper.from_array(value, "w2_raw"),
                    )
                )
                lifted.append(node("Identity", ["w2_raw"], ["w2"], name="w2_identity"))
            elif name == "bm":  # float64 Constant -> Cast to float32.
                lifted.append(
                    node(
                        "Constant",
                        [],
                        ["bm64"],
                        name="bm_const",
                        value=numpy_helper.from_array(value.astype(np.float64), "bm64"),
                    )
                )
                lifted.append(
                    node("Cast", ["bm64"], ["bm"], name="bm_cast", to=onnx.TensorProto.FLOAT)
                )
            else:
                lifted.append(
                    node(
                        "Constant",
                        [],
                        [name],
                        name=f"{name}_const",
                        value=numpy_helper.from_array(value, name),
                    )
                )
        nodes = lifted + nodes
    model = make_model(nodes, {"x": x}, ["y"], initializers, opset=opset)
    if form == "old_ir":  # Initializers also listed as graph inputs (keep_initializers_as_inputs).
        model.graph.input.extend(
            helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, value.shape)
            for name, value in weights.items()
        )
        onnx.checker.check_model(model)
    return model, x, weights


def _hwio(w):
    return w.transpose(2, 3, 1, 0)


EXPECTED = {  # params[node][slot] -> the weight, as from_onnx lays it out.
    ("conv1", "W"): ("w1", _hwio),
    ("conv1", "B"): ("b1", None),
    ("bn1", "scale"): ("g1", None),
    ("bn1", "B"): ("beta1", None),
    ("bn1", "mean"): ("m1", None),
    ("bn1", "var"): ("v1", None),
    ("conv2", "W"): ("w2", _hwio),
    ("fc", "B"): ("wf", None),
    ("fc", "C"): ("bf", None),
    ("head", "B"): ("wm", None),
    ("head_bias", "B"): ("bm", None),
}


@pytest.mark.parametrize("form", FORMS)
def test_weights_in_every_form_are_the_same_params(form):
    model, x, weights = small_net(form)
    imported = from_onnx(model)
    assert imported.input_names == ("x",)
    got = {
        (k, s): np.asarray(v) for k, entries in imported.params.items() for s, v in entries.items()
    }
    assert sorted(got) == sorted(EXPECTED)
    for key, (name, layout) in EXPECTED.items():
        want = weights[name] if layout is None else layout(weights[name])
        np.testing.assert_array_equal(got[key], want)
    assert ("scale", "B") not in got  # A float Constant that is not a weight stays folded.
    specs = train.find_convs(imported.apply_fn, imported.params, *imported.example_inputs())
    assert sorted(k for k, e in specs.items() if e.get("W") is not None) == ["conv1", "conv2"]
    assert specs["conv2"]["W"].strides == (2, 2)
    out = jax.jit(imported.apply_fn)(imported.params, x)
    assert_outputs_close(out, run_ort(model, {"x": x}))


def test_report_and_projection_see_constant_weights():
    model, x, _ = small_net("constant")
    imported = from_onnx(model)
    report = train.report.network_report(
        imported.apply_fn,
        imported.params,
        x,
        num_points=1,
        power_iterations=3,
        compute_spectra=False,
    )
    assert report.network["num_conv_layers"] == 2
    assert report.network["lipschitz_lower"] > 0
    specs = train.find_convs(imported.apply_fn, imported.params, *imported.example_inputs())
    projected, cert = train.certify_conv_operator_norm(imported.params, specs, 0.5)
    assert len(cert.layers) == 2 and cert.certified and cert.any_changed


def _perturbed(params, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: np.asarray(a) * (1 + 0.1 * rng.standard_normal(np.shape(a))).astype(a.dtype),
        params,
    )


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("fold_bn", [False, True])
def test_to_onnx_round_trip_equals_apply_fn(tmp_path, form, opset, fold_bn):
    model, x, _ = small_net(form, opset)
    imported = from_onnx(model)
    params = _perturbed(imported.params)
    path = tmp_path / "out.onnx"
    written = imported.to_onnx(params, path, fold_bn=fold_bn)
    reloaded = onnx.load(str(path))
    assert reloaded.opset_import[0].version == opset
    ops = [n.op_type for n in reloaded.graph.node]
    assert "Identity" not in ops and "Cast" not in ops  # The weight chains are gone.
    assert ops.count("Constant") == 2  # The reshape target and the scale stay.
    assert ("BatchNormalization" in ops) != fold_bn
    assert [i.name for i in reloaded.graph.input][:1] == ["x"]
    if form != "old_ir":
        assert [i.name for i in reloaded.graph.input] == ["x"]
    want = jax.jit(imported.apply_fn)(params, x)
    assert_outputs_close(run_ort(written, {"x": x}), [np.asarray(w) for w in want])
    again = from_onnx(str(path))
    if not fold_bn:  # Same params back, bit for bit, whatever the form.
        jax.tree.map(np.testing.assert_array_equal, again.params, params)
    else:
        folded, _ = train.models.fold_batch_norm(dataclasses.replace(imported, params=params))
        np.testing.assert_allclose(
            again.params["conv1"]["W"], folded.params["conv1"]["W"], rtol=0, atol=0
        )
        assert "bn1" not in again.params


# ------------------------------------------------------------------ convspectra-project
def projection_net():
    """Stride-2, grouped and depthwise convs, two BatchNormalizations, a Gemm head."""
    rng = np.random.default_rng(11)

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def bn(name, c):
        return {
            f"{name}_g": (1.5 + 0.5 * rng.random(c)).astype(np.float32),
            f"{name}_b": normal(c, scale=0.1),
            f"{name}_m": normal(c, scale=0.1),
            f"{name}_v": (0.2 + rng.random(c)).astype(np.float32),
        }

    inits = {
        "w1": normal(8, 4, 3, 3),
        "b1": normal(8, scale=0.1),
        "w2": normal(8, 4, 3, 3),
        "w3": normal(8, 1, 3, 3),
        "w4": normal(6, 8, 1, 1),
        "b4": normal(6, scale=0.1),
        "wf": normal(3, 6),
        **bn("bn1", 8),
        **bn("bn2", 8),
    }

    def bn_node(name, x, y):
        return node("BatchNormalization", [x] + [f"{name}_{s}" for s in "gbmv"], [y], name=name)

    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        bn_node("bn1", "c1", "n1"),
        node("Relu", ["n1"], ["r1"], name="relu1"),
        node("Conv", ["r1", "w2"], ["c2"], name="grouped", pads=[1, 1, 1, 1], group=2),
        bn_node("bn2", "c2", "n2"),
        node("Relu", ["n2"], ["r2"], name="relu2"),
        node(
            "Conv",
            ["r2", "w3"],
            ["c3"],
            name="depthwise",
            pads=[1, 1, 1, 1],
            strides=[2, 2],
            group=8,
        ),
        node("Relu", ["c3"], ["r3"], name="relu3"),
        node("Conv", ["r3", "w4", "b4"], ["c4"], name="pointwise"),
        node("GlobalAveragePool", ["c4"], ["p"], name="gap"),
        node("Flatten", ["p"], ["f"], name="flatten"),
        node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1),
    ]
    x = randn(1, 4, 12, 12, seed=2)
    return make_model(nodes, {"x": x}, ["y"], inits, input_dims={"x": ["n", 4, "h", "w"]}), x


@pytest.mark.parametrize("fold_bn", [False, True])
def test_convspectra_project_certifies_every_conv(tmp_path, fold_bn):
    import json

    import spectra
    from train.models.onnx import project_cli

    model, x = projection_net()
    src, out, c = tmp_path / "in.onnx", tmp_path / "out.onnx", 1.5
    onnx.save(model, str(src))
    argv = ["--onnx", str(src), "--input-shape", "1,4,12,12", "--max-norm", str(c)]
    # The folded run skips the exact sigma_max (--no-exact): the bounds alone are certified.
    argv += ["--out", str(out)] + (["--fold-bn", "--no-exact"] if fold_bn else [])
    assert project_cli.main(argv) == 0
    cert = json.loads((tmp_path / "out.certificate.json").read_text())
    assert cert["certified"] and cert["fold_bn"] == fold_bn and cert["max_norm"] == c
    names = ["conv1", "grouped", "depthwise", "pointwise"]
    assert [layer["name"] for layer in cert["layers"]] == names
    bns = {"conv1": "bn1", "grouped": "bn2"}
    for layer in cert["layers"]:
        assert layer["batch_norm"] == bns.get(layer["name"])
        assert layer["batch_norm_included"] == (fold_bn and layer["name"] in bns)
        assert layer["certified_upper_bound_after"] <= c
        if fold_bn:
            assert layer["sigma_max_after"] is layer["sigma_max_method"] is None
            continue
        assert layer["sigma_max_method"] == "dense"
        assert layer["sigma_max_after"] <= layer["certified_upper_bound_after"] * (1 + 1e-9)
    assert all(layer["changed"] for layer in cert["layers"])
    assert ("NOT included" in cert["batch_norm_note"]) != fold_bn

    written = onnx.load(str(out))
    ops = [n.op_type for n in written.graph.node]
    assert ops.count("BatchNormalization") == (0 if fold_bn else 2)
    again = from_onnx(str(out), input_shape=(1, 4, 12, 12))
    specs = train.find_convs(again.apply_fn, again.params, *again.example_inputs())
    with jax.enable_x64(True):
        for layer in cert["layers"]:
            kernel = np.asarray(again.params[layer["name"]]["W"], np.float64)
            dense = np.asarray(spectra.dense_operator(kernel, specs[layer["name"]]["W"]))
            sigma = np.linalg.svd(dense, compute_uv=False)[0]
            assert sigma <= c * (1 + 1e-4), (layer["name"], sigma)
            if not fold_bn:
                np.testing.assert_allclose(sigma, layer["sigma_max_after"], rtol=1e-6)
                assert layer["sigma_max_before"] > c
    want = jax.jit(again.apply_fn)(again.params, x)
    assert_outputs_close(run_ort(written, {"x": x}), [np.asarray(w) for w in want])
    # Only the convs changed: the head is the input's.
    np.testing.assert_array_equal(
        again.params["fc"]["B"], from_onnx(model, (1, 4, 12, 12)).params["fc"]["B"]
    )


def test_certificate_sigma_max_lanczos_equals_dense_on_a_grouped_layer():
    import spectra
    from train.models.onnx.project_cli import exact_sigma_max

    kernel = randn(3, 3, 2, 6, seed=4)
    spec = spectra.ConvSpec((7, 7), strides=(2, 2), padding="SAME", feature_group_count=3)
    dense = exact_sigma_max(kernel, spec)
    lanczos = exact_sigma_max(kernel, spec, max_dense_dim=0)
    assert (dense["method"], lanczos["method"]) == ("dense", "lanczos")
    assert lanczos["residual"] <= 1e-8
    np.testing.assert_allclose(lanczos["value"], dense["value"], rtol=1e-9)


def test_a_per_channel_constant_added_to_a_conv_is_a_bias_a_scalar_is_not():
    x = randn(1, 2, 5, 5)

    def const(name, value):
        return node(
            "Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(value, name)
        )

    nodes = [
        const("bias_flat", randn(3, seed=2)),  # paddle2onnx: bias (C,) reshaped to (1, C, 1, 1).
        const("bias_shape", np.array([1, 3, 1, 1], np.int64)),
        node("Reshape", ["bias_flat", "bias_shape"], ["bias"], name="bias_reshape"),
        const("offset", np.array(0.5, np.float32)),
        # A TF-layout (HWIO) constant kernel transposed to OIHW.
        const("w_hwio", randn(3, 2, 3, 3, seed=1).transpose(2, 3, 1, 0).copy()),
        node("Transpose", ["w_hwio"], ["w"], name="w_transpose", perm=[3, 2, 0, 1]),
        node("Conv", ["x", "w"], ["c"], name="conv"),
        node("Add", ["c", "bias"], ["cb"], name="add_bias"),
        node("Conv", ["cb", "w2"], ["c2"], name="conv2"),
        node("Add", ["c2", "offset"], ["y"], name="add_offset"),
    ]
    model = make_model(nodes, {"x": x}, ["y"], {"w2": randn(3, 3, 1, 1, seed=3)})
    imported = from_onnx(model)
    assert sorted(imported.params) == ["add_bias", "conv", "conv2"]
    assert imported.params["add_bias"]["B"].shape == (1, 3, 1, 1)
    np.testing.assert_array_equal(imported.params["add_bias"]["B"].ravel(), randn(3, seed=2))
    np.testing.assert_array_equal(
        imported.params["conv"]["W"], randn(3, 2, 3, 3, seed=1).transpose(2, 3, 1, 0)
    )
    assert_outputs_close(imported.apply_fn(imported.params, x), run_ort(model, {"x": x}))
    written = imported.to_onnx(imported.params, None)
    assert [n.name for n in written.graph.node] == [
        "offset_const",
        "conv",
        "add_bias",
        "conv2",
        "add_offset",
    ]
    assert_outputs_close(run_ort(written, {"x": x}), run_ort(model, {"x": x}))


@pytest.mark.parametrize("fold_bn", [False, True])
def test_to_onnx_ir3_lists_every_initializer_as_an_input(fold_bn):
    """IR version 3 requires initializers among the graph inputs: the folded bias is added."""
    x = randn(1, 3, 6, 6)
    inits = {
        "w": randn(4, 3, 3, 3),
        "g": randn(4) + 2,
        "b": randn(4),
        "m": randn(4),
        "v": np.abs(randn(4)) + 0.5,
    }
    nodes = [
        node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"),
    ]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)] + [
        helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, v.shape) for k, v in inits.items()
    ]
    graph = helper.make_graph(
        nodes,
        "ir3",
        inputs,
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    imported = from_onnx(model)
    assert imported.input_names == ("x",)
    written = imported.to_onnx(_perturbed(imported.params), None, fold_bn=fold_bn)
    names = [i.name for i in written.graph.input]
    assert names[0] == "x" and set(names[1:]) == {t.name for t in written.graph.initializer}
    assert len(names) == (3 if fold_bn else 6)
    want = imported.apply_fn(_perturbed(imported.params), x)
    assert_outputs_close(run_ort(written, {"x": x}), [np.asarray(w) for w in want])
