"""ONNX import: conv discovery, exact spectra, gradients, fine-tuning, BN folding, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import optax
import pytest
from onnx import helper

import spectra
import train
from tests.train.onnx_graphs import check_against_ort
from tests.train.onnx_graphs import make_model
from tests.train.onnx_graphs import randn
from tests.train.onnx_graphs import run_ort
from train.models import fold_batch_norm
from train.models import from_onnx

node = helper.make_node


def _specs(model):
    specs = train.find_convs(model.apply_fn, model.params, *model.example_inputs())
    return {key: entry["W"] for key, entry in specs.items() if "W" in entry}


# ------------------------------------------------------------------------- find_convs specs
# (attrs, input (H, W), kernel (kh, kw), c_in, groups, expected padding): the expected pads are
# worked out by hand from the ONNX rules, not by the code under test.
CONV_LAYERS = {
    "explicit_asymmetric": (
        dict(pads=[0, 1, 2, 1], strides=[2, 3]),
        (9, 8),
        (3, 2),
        3,
        1,
        ((0, 2), (1, 1)),
    ),
    "same_upper": (dict(auto_pad="SAME_UPPER", strides=[2, 2]), (7, 8), (3, 4), 3, 1, "SAME"),
    # SAME_LOWER, H: out 4, total 3*2+4-7=3 -> (2, 1); W: out 3, total 2*3+3-8=1 -> (1, 0).
    "same_lower_odd": (
        dict(auto_pad="SAME_LOWER", strides=[2, 3]),
        (7, 8),
        (4, 3),
        3,
        1,
        ((2, 1), (1, 0)),
    ),
    "valid": (dict(auto_pad="VALID"), (6, 7), (3, 3), 2, 1, "VALID"),
    "depthwise_dilated": (
        dict(group=4, dilations=[2, 2], pads=[2, 2, 2, 2]),
        (8, 8),
        (3, 3),
        4,
        4,
        "SAME",
    ),
    "grouped_full": (dict(group=2, pads=[2, 2, 2, 2]), (5, 6), (3, 3), 4, 2, "FULL"),
}


@pytest.mark.parametrize("name", sorted(CONV_LAYERS))
def test_find_convs_reads_the_onnx_attributes(name):
    attrs, (h, w), (kh, kw), c_in, groups, padding = CONV_LAYERS[name]
    weight = randn(8, c_in // groups, kh, kw, seed=3)
    x = randn(1, c_in, h, w)
    model = make_model(
        [node("Conv", ["x", "w"], ["y"], name="conv", **attrs)], {"x": x}, ["y"], {"w": weight}
    )
    imported = check_against_ort(model, {"x": x})
    np.testing.assert_array_equal(imported.params["conv"]["W"], weight.transpose(2, 3, 1, 0))
    spec = _specs(imported)["conv"]
    assert spec == spectra.ConvSpec(
        input_shape=(h, w),
        strides=tuple(attrs.get("strides", (1, 1))),
        padding=padding,
        kernel_dilation=tuple(attrs.get("dilations", (1, 1))),
        feature_group_count=groups,
        in_features=c_in,
    )


def test_wrap_pad_then_conv_is_circular():
    x = randn(1, 2, 6, 6)
    nodes = [
        node("Pad", ["x", "p"], ["xp"], mode="wrap"),
        node("Conv", ["xp", "w"], ["y"], name="conv"),
    ]
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)  # Flax's wrap pads for k=3.
    model = make_model(nodes, {"x": x}, ["y"], {"p": pads, "w": randn(3, 2, 3, 3)}, opset=19)
    imported = check_against_ort(model, {"x": x})
    assert _specs(imported)["conv"] == spectra.ConvSpec((6, 6), padding="CIRCULAR", in_features=2)


def test_one_d_conv_is_a_two_d_conv_of_height_one():
    x = randn(1, 3, 10)
    model = make_model(
        [node("Conv", ["x", "w"], ["y"], name="c", pads=[1, 1], strides=[2])],
        {"x": x},
        ["y"],
        {"w": randn(4, 3, 3)},
    )
    imported = check_against_ort(model, {"x": x})
    assert imported.params["c"]["W"].shape == (1, 3, 3, 4)
    assert _specs(imported)["c"] == spectra.ConvSpec(
        (1, 10), strides=(1, 2), padding=((0, 0), (1, 1)), in_features=3
    )


def _onnx_dense_operator(model: onnx.ModelProto, in_shape) -> np.ndarray:
    """The matrix of a bias-free linear ONNX graph (batch dim symbolic), from onnxruntime."""
    n = int(np.prod(in_shape))
    basis = np.eye(n, dtype=np.float32).reshape(n, *in_shape[1:])
    return run_ort(model, {"x": basis})[0].reshape(n, -1).T.astype(np.float64)


@pytest.mark.parametrize("name", ["explicit_asymmetric", "same_lower_odd", "depthwise_dilated"])
def test_exact_sigma_max_equals_the_onnx_operator(name):
    attrs, (h, w), (kh, kw), c_in, groups, _ = CONV_LAYERS[name]
    x = randn(1, c_in, h, w)
    model = make_model(
        [node("Conv", ["x", "w"], ["y"], name="conv", **attrs)],
        {"x": x},
        ["y"],
        {"w": randn(8, c_in // groups, kh, kw, seed=3)},
        input_dims={"x": ["n", c_in, h, w]},
    )
    imported = from_onnx(model, input_shape=x.shape)
    spec = _specs(imported)["conv"]
    kernel = np.asarray(imported.params["conv"]["W"], np.float64)
    dense = _onnx_dense_operator(model, x.shape)
    want = np.linalg.svd(dense, compute_uv=False)
    got = spectra.singular_values(kernel, spec, method="dense")
    np.testing.assert_allclose(got[: len(want)], want[: len(got)], rtol=1e-5, atol=1e-5 * want[0])
    lanczos = spectra.spectral_norm(kernel, spec, method="lanczos")
    np.testing.assert_allclose(
        lanczos, np.linalg.svd(spectra.dense_operator(kernel, spec), compute_uv=False)[0], rtol=1e-9
    )


# -------------------------------------------------------------------------- a small CNN
def small_cnn(symbolic: bool = False) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(7)

    def r(*s):
        return (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)

    inits = {
        "w1": r(6, 3, 3, 3),
        "b1": r(6),
        "g": 1 + 0.1 * r(6),
        "beta": r(6),
        "mean": r(6),
        "var": 1 + np.abs(r(6)),
        "w2": r(8, 3, 3, 3),
        "b2": r(8),
        "w3": r(8, 1, 3, 3),
        "fc": r(5, 8),
        "fcb": r(5),
    }
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["n1"], name="bn1"),
        node("Relu", ["n1"], ["a1"]),
        node(
            "Conv",
            ["a1", "w2", "b2"],
            ["c2"],
            name="conv2",
            group=2,
            strides=[2, 2],
            auto_pad="SAME_UPPER",
        ),
        node("Sigmoid", ["c2"], ["s2"]),
        node("Mul", ["c2", "s2"], ["a2"]),
        node("Conv", ["a2", "w3"], ["c3"], name="conv3", group=8, pads=[0, 1, 2, 1]),
        node("GlobalAveragePool", ["c3"], ["p"]),
        node("Flatten", ["p"], ["f"]),
        node("Gemm", ["f", "fc", "fcb"], ["y"], name="fc", transB=1),
    ]
    x = randn(2, 3, 8, 8)
    dims = {"x": ["batch", 3, "h", "w"]} if symbolic else None
    return make_model(nodes, {"x": x}, ["y"], inits, input_dims=dims), x


def test_symbolic_dims_need_input_shape():
    model, x = small_cnn(symbolic=True)
    with pytest.raises(ValueError, match=r"'x' has symbolic dims \['batch', 'h', 'w'\]"):
        from_onnx(model)
    imported = check_against_ort(model, {"x": x}, input_shape=x.shape)
    assert imported.input_shape == x.shape
    with pytest.raises(ValueError, match="rank 3"):
        from_onnx(model, input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match="dim 1 is 4"):
        from_onnx(model, input_shape=(2, 4, 8, 8))


def test_jit_and_vmap_agree_with_onnxruntime():
    model, x = small_cnn()
    imported = from_onnx(model)
    stacked = np.stack([x, 2 * x, -x])
    got = jax.jit(jax.vmap(imported.apply_fn, in_axes=(None, 0)))(imported.params, stacked)[0]
    for i in range(3):
        np.testing.assert_allclose(
            got[i], run_ort(model, {"x": stacked[i]})[0], rtol=1e-5, atol=1e-6
        )


def test_grad_matches_finite_differences():
    model, x = small_cnn()
    imported = from_onnx(model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), imported.params)
    direction = jax.tree.map(lambda a: rng.standard_normal(a.shape), params)
    x64, dx = np.asarray(x, np.float64), rng.standard_normal(x.shape)

    def loss(p, inp):
        return jnp.sum(jnp.sin(imported.apply_fn(p, inp)[0]))

    @jax.jit
    def analytic_and_numeric(p, inp):
        g_params, g_x = jax.grad(loss, argnums=(0, 1))(p, inp)
        analytic = sum(
            jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(g_params), jax.tree.leaves(direction))
        )
        analytic += jnp.vdot(g_x, dx)
        h = 1e-5
        plus = loss(jax.tree.map(lambda a, d: a + h * d, p, direction), inp + h * dx)
        minus = loss(jax.tree.map(lambda a, d: a - h * d, p, direction), inp - h * dx)
        return analytic, (plus - minus) / (2 * h)

    analytic, numeric = analytic_and_numeric(params, x64)
    assert abs(float(analytic)) > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def test_fine_tune_with_projection_keeps_every_conv_below_c():
    model, x = small_cnn()
    imported = from_onnx(model)
    specs = train.find_convs(imported.apply_fn, imported.params, *imported.example_inputs())
    found = {k: v["W"] for k, v in specs.items() if "W" in v and v["W"] is not None}
    assert sorted(found) == ["conv1", "conv2", "conv3"]
    c = 0.5
    tx = optax.chain(optax.adam(1e-2), train.project_conv_operator_norm(c, specs))
    target = jnp.asarray(randn(2, 5, seed=5))

    def loss(p):
        return jnp.mean((imported.apply_fn(p, jnp.asarray(x))[0] - target) ** 2)

    @jax.jit
    def step(p, state):
        value, g = jax.value_and_grad(loss)(p)
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state, value

    params, state = imported.params, tx.init(imported.params)
    losses = []
    for _ in range(10):
        params, state, value = step(params, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    for key, spec in found.items():
        before = float(
            spectra.spectral_norm(
                np.asarray(imported.params[key]["W"], np.float64), spec, method="dense"
            )
        )
        after = float(
            spectra.spectral_norm(np.asarray(params[key]["W"], np.float64), spec, method="dense")
        )
        assert after <= c * (1 + 1e-4), (key, before, after)
    assert any(
        float(
            spectra.spectral_norm(
                np.asarray(imported.params[k]["W"], np.float64), s, method="dense"
            )
        )
        > c
        for k, s in found.items()
    )


# ----------------------------------------------------------------------------- BN folding
def test_fold_batch_norm():
    model, x = small_cnn()
    imported = from_onnx(model)
    folded, folds = fold_batch_norm(imported)
    assert folds == (train.models.FoldedBatchNorm("conv1", "bn1"),)
    assert "bn1" not in folded.params and "bn1" in imported.params
    np.testing.assert_allclose(
        folded.apply_fn(folded.params, x)[0], run_ort(model, {"x": x})[0], rtol=1e-5, atol=1e-6
    )
    # Same spec; the folded operator is diag(f) times the raw one, f = γ / sqrt(var + ε).
    assert _specs(folded)["conv1"] == _specs(imported)["conv1"]
    spec = _specs(imported)["conv1"]
    bn = {k: np.asarray(v, np.float64) for k, v in imported.params["bn1"].items()}
    factor = bn["scale"] / np.sqrt(bn["var"] + 1e-5)  # Opset 13 names the inputs so.
    raw = spectra.dense_operator(np.asarray(imported.params["conv1"]["W"], np.float64), spec)
    new = spectra.dense_operator(np.asarray(folded.params["conv1"]["W"], np.float64), spec)
    np.testing.assert_allclose(
        new, np.tile(factor, raw.shape[0] // 6)[:, None] * raw, rtol=1e-6, atol=1e-7
    )


def test_fold_batch_norm_skips_a_conv_output_used_twice():
    x = randn(1, 2, 5, 5)
    inits = {
        "w": randn(3, 2, 3, 3),
        "g": randn(3),
        "b": randn(3),
        "m": randn(3),
        "v": np.ones(3, np.float32),
    }
    nodes = [
        node("Conv", ["x", "w"], ["c"], name="conv"),
        node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
        node("Add", ["c", "n"], ["y"]),
    ]
    imported = from_onnx(make_model(nodes, {"x": x}, ["y"], inits))
    folded, folds = fold_batch_norm(imported)
    assert folds == () and folded is imported


# ------------------------------------------------------------------------------ loading
def test_external_data(tmp_path):
    model, x = small_cnn()
    path = tmp_path / "model.onnx"
    saved = onnx.ModelProto()
    saved.CopyFrom(model)  # save_model moves the data of the proto it is given to the file.
    onnx.save_model(
        saved,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (tmp_path / "weights.bin").stat().st_size > 0
    assert path.stat().st_size < 2000  # The weights are outside the model file.
    imported = from_onnx(str(path))
    in_memory = from_onnx(model)
    jax.tree.map(np.testing.assert_array_equal, imported.params, in_memory.params)
    np.testing.assert_allclose(
        imported.apply_fn(imported.params, x)[0], run_ort(model, {"x": x})[0], rtol=1e-5, atol=1e-6
    )


def test_bad_files(tmp_path):
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("this is not a protobuf\n" * 10)
    with pytest.raises(ValueError, match="path_or_model_proto"):
        from_onnx(not_onnx)
    model, _ = small_cnn()
    data = model.SerializeToString()
    truncated = tmp_path / "truncated.onnx"
    for cut in (len(data) // 3, len(data) - 7):
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="path_or_model_proto"):
            from_onnx(truncated)
    with pytest.raises(ValueError, match="not a file"):
        from_onnx(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="ModelProto"):
        from_onnx(123)


def test_unsupported_op_names_type_node_and_opset():
    model = make_model(
        [node("Relu", ["x"], ["r"]), node("Det", ["r"], ["y"], name="my_det")],
        {"x": randn(3, 3)},
        ["y"],
    )
    with pytest.raises(
        ValueError, match=r"unsupported ONNX operator Det \(node 'my_det', opset 13"
    ):
        from_onnx(model)


def test_shape_from_graph_values_is_an_error():
    graph = helper.make_graph(
        [node("Reshape", ["y0", "x"], ["y"], name="reshape")],
        "g",
        [
            helper.make_tensor_value_info("y0", onnx.TensorProto.FLOAT, [24]),
            helper.make_tensor_value_info("x", onnx.TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["a", "b"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with pytest.raises(ValueError, match="'reshape'.*must be known at import"):
        from_onnx(model)


def test_apply_fn_checks_input_shapes():
    model, x = small_cnn()
    imported = from_onnx(model)
    with pytest.raises(ValueError, match=r"imported for \(2, 3, 8, 8\)"):
        imported.apply_fn(imported.params, x[:1])
    with pytest.raises(ValueError, match="takes 1 inputs"):
        imported.apply_fn(imported.params, x, x)


def test_shape_subgraph_is_folded_at_import():
    model, x = small_cnn(symbolic=True)
    nodes = list(model.graph.node) + [
        node("Shape", ["c3"], ["s"]),
        node("Slice", ["s", "zero", "one"], ["n"]),
        node("Concat", ["n", "minus_one"], ["shape"], axis=0),
        node("Reshape", ["c3", "shape"], ["z"]),
    ]
    inits = list(model.graph.initializer) + [
        onnx.numpy_helper.from_array(np.array([v], np.int64), name)
        for name, v in [("zero", 0), ("one", 1), ("minus_one", -1)]
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        model.graph.input,
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["batch", "k"])],
        inits,
    )
    with_shape = helper.make_model(graph, opset_imports=model.opset_import, ir_version=8)
    imported = check_against_ort(with_shape, {"x": x}, input_shape=x.shape)
    ops = [step.info.op_type for step in imported.program.steps]
    assert "Shape" not in ops and "Reshape" in ops
