"""Every imported graph that runs can be differentiated under ``jit`` (``vjp``, ``linearize``),
so the report's lower bound works on it: classic architectures' op patterns (AlexNet with LRN,
VGG-11-BN, DenseNet-121 exports) and every operator case of ``test_onnx_ops``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from onnx import helper

import train
from tests.train.onnx_graphs import assert_outputs_close
from tests.train.onnx_graphs import make_model
from tests.train.onnx_graphs import run_ort
from tests.train.test_onnx_ops import CASES
from train.models import from_onnx

node = helper.make_node


class _Builder:
    """Nodes and initializers of a small graph, named as a PyTorch export names them."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.count = [], {}, 0

    def _name(self, prefix):
        self.count += 1
        return f"{prefix}{self.count}"

    def add(self, op, inputs, **attrs):
        out = self._name(op.lower())
        self.nodes.append(node(op, inputs, [out], name=f"/{out}/{op}", **attrs))
        return out

    def weight(self, *shape, scale=None):
        name = self._name("w")
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = np.sqrt(2.0 / fan_in) if scale is None else scale
        self.inits[name] = (scale * self.rng.standard_normal(shape)).astype(np.float32)
        return name

    def conv(self, x, c_in, c_out, k, **attrs):
        w, b = (
            self.weight(c_out, c_in // attrs.get("group", 1), k, k),
            self.weight(c_out, scale=0.1),
        )
        return self.add("Conv", [x, w, b], kernel_shape=[k, k], **attrs)

    def bn(self, x, c):
        g = self._name("g")
        self.inits[g] = (1 + 0.1 * self.rng.standard_normal(c)).astype(np.float32)
        b, m = self.weight(c, scale=0.1), self.weight(c, scale=0.1)
        v = self._name("v")
        self.inits[v] = (0.5 + self.rng.random(c)).astype(np.float32)
        return self.add("BatchNormalization", [x, g, b, m, v], epsilon=1e-5)

    def gemm(self, x, c_in, c_out):
        return self.add(
            "Gemm", [x, self.weight(c_out, c_in), self.weight(c_out, scale=0.1)], transB=1
        )


def alexnet_like():
    g = _Builder(0)
    h = g.add("Relu", [g.conv("x", 3, 8, 5, strides=[2, 2], pads=[2, 2, 2, 2])])
    h = g.add("LRN", [h], size=5, alpha=1e-4, beta=0.75, bias=2.0)  # The original AlexNet's.
    h = g.add("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2])
    h = g.add("Relu", [g.conv(h, 8, 12, 3, pads=[1, 1, 1, 1])])
    h = g.add("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    # adaptive_avg_pool2d to 2x2 of a 3x3 map: overlapping windows.
    h = g.add("AveragePool", [h], kernel_shape=[2, 2], strides=[1, 1])
    h = g.add("Flatten", [h], axis=1)
    h = g.add("Dropout", [h])
    h = g.add("Relu", [g.gemm(h, 48, 16)])
    h = g.add("Dropout", [h])
    return g, g.gemm(h, 16, 5), (1, 3, 29, 29)


def vgg11_bn_like():
    g = _Builder(1)
    h, c = "x", 3
    for c_out in (8, "M", 12, "M", 16, 16, "M"):
        if c_out == "M":
            h = g.add("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
            continue
        h = g.add("Relu", [g.bn(g.conv(h, c, c_out, 3, pads=[1, 1, 1, 1]), c_out)])
        c = c_out
    # adaptive_avg_pool2d (3x3 -> 3x3 after this pad-including pool), as exporters write it.
    h = g.add("AveragePool", [h], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    h = g.add("Flatten", [h], axis=1)
    h = g.add("Dropout", [g.add("Relu", [g.gemm(h, 16 * 9, 20)])])
    return g, g.gemm(h, 20, 5), (1, 3, 24, 24)


def densenet_like():
    g = _Builder(2)
    h = g.add("Relu", [g.bn(g.conv("x", 3, 8, 7, strides=[2, 2], pads=[3, 3, 3, 3]), 8)])
    h = g.add("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c = 8
    for block in range(2):
        for _ in range(2):  # Dense layers: BN-ReLU-1x1-BN-ReLU-3x3, concatenated.
            y = g.conv(g.add("Relu", [g.bn(h, c)]), c, 8, 1)
            y = g.conv(g.add("Relu", [g.bn(y, 8)]), 8, 4, 3, pads=[1, 1, 1, 1])
            h, c = g.add("Concat", [h, y], axis=1), c + 4
        if block == 0:  # Transition: BN-ReLU-1x1 conv-AvgPool 2x2 (and a ceil_mode one).
            h = g.conv(g.add("Relu", [g.bn(h, c)]), c, c // 2, 1)
            c //= 2
            h = g.add("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    h = g.add("Relu", [g.bn(h, c)])
    h = g.add("GlobalAveragePool", [h])
    h = g.add("Flatten", [h], axis=1)
    return g, g.gemm(h, c, 5), (1, 3, 23, 23)


ARCHITECTURES = {"alexnet": alexnet_like, "vgg11_bn": vgg11_bn_like, "densenet": densenet_like}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_classic_architectures_linearize_under_jit(name):
    g, out, shape = ARCHITECTURES[name]()
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    model = make_model(g.nodes, {"x": x}, [out], g.inits)
    imported = from_onnx(model)

    def f(v):
        return imported.apply_fn(imported.params, v)[0]

    def forward_and_jvp(x, v):
        y, jvp = jax.linearize(f, x)
        return y, jvp(v)

    ct = jnp.asarray(np.random.default_rng(4).standard_normal((1, 5)), jnp.float32)
    v = jnp.asarray(np.random.default_rng(5).standard_normal(shape), jnp.float32)
    (vjp_ct,) = jax.jit(lambda x: jax.vjp(f, x)[1](ct))(x)
    y, jvp_v = jax.jit(forward_and_jvp)(x, v)
    assert_outputs_close([y], run_ort(model, {"x": x}))
    # The two are transposes of one linear map: <ct, J v> = <J^T ct, v>.
    np.testing.assert_allclose(jnp.vdot(ct, jvp_v), jnp.vdot(vjp_ct, v), rtol=1e-4)
    specs = train.find_convs(imported.apply_fn, imported.params, *imported.example_inputs())
    n_convs = sum(step.info.op_type == "Conv" for step in imported.program.steps)
    assert sum(e.get("W") is not None for e in specs.values()) == n_convs


def test_report_lower_bound_on_a_densenet_pattern():
    """The report's lower-bound stage (jvp and transpose in one jitted step, vmapped over points)
    on the pattern whose linearization failed: concat, BN, average pools, global pool, gemm."""
    g, out, shape = densenet_like()
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    imported = from_onnx(make_model(g.nodes, {"x": x}, [out], g.inits))
    points = np.random.default_rng(6).standard_normal((2, *shape)).astype(np.float32)
    lower, per_point = train.report.jacobian_lower_bound(
        lambda p, x: imported.apply_fn(p, x), points, imported.params, num_iterations=3
    )
    assert np.all(np.asarray(per_point) > 0) and lower == max(per_point)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_operator_case_has_a_vjp_and_a_linearization_under_jit(name):
    """Traced only (no compilation): a staged reduce_window init value, or any other primitive
    without a transpose rule, fails at trace time."""
    opset, nodes, inputs, inits = CASES[name]
    outputs = [o for n in nodes for o in n.output]
    imported = from_onnx(make_model(nodes, inputs, outputs, inits, opset=opset))
    xs = [np.asarray(inputs[n]) for n in imported.input_names]
    floating = [i for i, x in enumerate(xs) if np.issubdtype(x.dtype, np.floating)]

    def f(params, *float_inputs):
        args = list(xs)
        for i, v in zip(floating, float_inputs):
            args[i] = v
        outs = imported.apply_fn(params, *args)
        return [o for o in outs if jnp.issubdtype(o.dtype, jnp.floating)]

    args = (imported.params, *(xs[i] for i in floating))

    def vjp(*a):
        out, pullback = jax.vjp(f, *a)
        return pullback(jax.tree.map(jnp.ones_like, out))

    jax.make_jaxpr(vjp)(*args)
    jax.make_jaxpr(lambda *a: jax.linearize(f, *a)[1](*a))(*args)
