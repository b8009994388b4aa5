"""`train.layers.svd`: SVDConv / SVDDense forward, from_dense, init, decompose, svd_layers."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

import spectra
from train.layers import svd
from train.layers import svd_decompose
from train.models.resnet import ResNet
from train.models.resnet import SimpleCNN
from train.models.resnet import count_params

PADDINGS = {
    "same": "SAME",
    "valid": "VALID",
    "circular": "CIRCULAR",
    "explicit": ((1, 2), (0, 1)),
}
STRIDES = {"s1": 1, "s2": 2, "s21": (2, 1)}
FORWARD_CASES = [
    dict(
        testcase_name=f"{dec}_{sname}_{pname}_d{dil}",
        decomposition=dec, strides=stride, padding=pad, dilation=dil,
    )
    for dec, (sname, stride), (pname, pad), dil in itertools.product(
        svd.DECOMPOSITIONS, STRIDES.items(), PADDINGS.items(), (1, 2)
    )
]


def random_layer(decomposition, kernel_size, seed=0, **kwargs):
    layer = svd.SVDConv(
        3, 5, kernel_size, decomposition=decomposition, use_bias=True,
        param_dtype=jnp.float64, rngs=nnx.Rngs(seed), **kwargs,
    )
    layer.bias = nnx.Param(jnp.asarray(np.random.default_rng(seed).normal(size=5)))
    return layer


class SVDConvForwardTest(parameterized.TestCase):

    @parameterized.named_parameters(*FORWARD_CASES)
    def test_matches_dense_conv(self, decomposition, strides, padding, dilation):
        x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 8, 3)))
        for kernel_size in ((1, 1), (3, 3), (3, 2)):
            layer = random_layer(
                decomposition, kernel_size, strides=strides, padding=padding,
                kernel_dilation=dilation,
            )
            spec = spectra.ConvSpec(
                (9, 8), strides=strides, padding=padding, kernel_dilation=dilation
            )
            expected = spectra.conv(layer.to_dense(), x, spec) + layer.bias[...]
            np.testing.assert_allclose(layer(x), expected, atol=1e-12, err_msg=str(kernel_size))

    @parameterized.product(
        decomposition=svd.DECOMPOSITIONS, padding=("SAME", "CIRCULAR", "REFLECT", 1)
    )
    def test_matches_nnx_conv(self, decomposition, padding):
        x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 10, 7, 3)))
        layer = random_layer(decomposition, (3, 3), strides=2, padding=padding)
        conv = nnx.Conv(
            3, 5, (3, 3), strides=2, padding=padding, param_dtype=jnp.float64, rngs=nnx.Rngs(0)
        )
        conv.kernel = nnx.Param(layer.to_dense())
        conv.bias = nnx.Param(layer.bias[...])
        np.testing.assert_allclose(layer(x), conv(x), atol=1e-12)

    @parameterized.parameters(*svd.DECOMPOSITIONS)
    def test_batch_dims(self, decomposition):
        layer = random_layer(decomposition, (3, 3), padding="SAME")
        x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 6, 6, 3)))
        batched = layer(x.reshape(6, 6, 6, 3)).reshape(2, 3, 6, 6, 5)
        np.testing.assert_allclose(layer(x), batched, atol=1e-12)
        np.testing.assert_allclose(layer(x[0, 0]), batched[0, 0], atol=1e-12)

    @parameterized.parameters(*svd.DECOMPOSITIONS)
    def test_dense_operator(self, decomposition):
        # The layer's linear map (no bias) is the conv operator of to_dense(): ground truth.
        layer = svd.SVDConv(
            2, 3, (3, 3), decomposition=decomposition, strides=2, padding="CIRCULAR",
            param_dtype=jnp.float64, rngs=nnx.Rngs(4),
        )
        spec = spectra.ConvSpec((6, 6), strides=2, padding="CIRCULAR")
        dense = np.asarray(spectra.dense_operator(layer.to_dense(), spec))
        basis = jnp.eye(6 * 6 * 2).reshape(-1, 6, 6, 2)
        columns = np.asarray(layer(basis)).reshape(basis.shape[0], -1).T
        np.testing.assert_allclose(columns, dense, atol=1e-12)

    @parameterized.parameters(*svd.DECOMPOSITIONS)
    def test_jit_gradient_matches_finite_differences(self, decomposition):
        # float64: central differences along a random direction of every parameter (U, s, V,
        # bias), against the jitted gradient; and a real SGD step lowers the loss.
        layer = random_layer(decomposition, (3, 3), strides=2, kernel_dilation=(1, 2))
        x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 8, 3)))
        graphdef, params = nnx.split(layer)
        weights = jnp.asarray(np.random.default_rng(2).normal(size=layer(x).shape))

        @jax.jit
        def loss(p):
            return jnp.sum(jnp.tanh(nnx.merge(graphdef, p)(x)) * weights)

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        rng = np.random.default_rng(3)
        direction = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), params)
        eps = 1e-6
        plus = jax.tree.map(lambda p, d: p + eps * d, params, direction)
        minus = jax.tree.map(lambda p, d: p - eps * d, params, direction)
        numeric = (float(loss(plus)) - float(loss(minus))) / (2 * eps)
        analytic = sum(float(jnp.vdot(g, d)) for g, d in
                       zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6)
        for name in ("svd_u", "svd_s", "svd_v", "bias"):
            self.assertGreater(float(jnp.linalg.norm(grads[name][...])), 0.0, name)
        lr = 1e-3
        squared_norm = sum(float(jnp.vdot(g, g)) for g in jax.tree.leaves(grads))
        stepped = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        self.assertLess(float(loss(stepped)), float(value) - 0.5 * lr * squared_norm)


class SVDConvParamsTest(parameterized.TestCase):

    @parameterized.parameters(
        ("channel", (3, 3), 4, 6, (6, 36)),
        ("spatial", (3, 3), 4, 6, (12, 18)),
        ("channel", (3, 2), 2, 5, (5, 12)),
        ("spatial", (3, 2), 2, 5, (6, 10)),
        ("channel", (1, 1), 4, 6, (6, 4)),
    )
    def test_shapes_and_param_count(self, decomposition, kernel_size, c_in, c_out, ab):
        a, b = ab
        r = min(a, b)
        layer = svd.SVDConv(c_in, c_out, kernel_size, decomposition=decomposition, rngs=nnx.Rngs(0))
        self.assertEqual(layer.factor_shape, ab)
        self.assertEqual((layer.rank, layer.max_rank), (r, r))
        self.assertEqual(layer.svd_u.shape, (a, r))
        self.assertEqual(layer.svd_s.shape, (r,))
        self.assertEqual(layer.svd_v.shape, (b, r))
        self.assertEqual(count_params(layer), r * (a + b + 1))
        self.assertEqual(layer.to_dense().shape, (*kernel_size, c_in, c_out))
        low = svd.SVDConv(
            c_in, c_out, kernel_size, decomposition=decomposition, rank=2, use_bias=True,
            rngs=nnx.Rngs(0),
        )
        self.assertEqual(low.rank, 2)
        self.assertEqual(count_params(low), 2 * (a + b + 1) + c_out)

    def test_flops(self):
        channel = svd.SVDConv(3, 8, (3, 3), strides=2, rank=4, rngs=nnx.Rngs(0))
        self.assertEqual(channel.output_shape((9, 8)), (5, 4))
        self.assertEqual(channel.flops((9, 8)), 5 * 4 * (9 * 3 * 4 + 4 * 8))
        self.assertEqual(channel.dense_flops((9, 8)), 5 * 4 * 9 * 3 * 8)
        spatial = svd.SVDConv(3, 8, (3, 2), decomposition="spatial", strides=2, rank=4,
                              padding="VALID", rngs=nnx.Rngs(0))
        y = spatial(jnp.ones((1, 9, 8, 3)))
        self.assertEqual(spatial.output_shape((9, 8)), y.shape[1:3])  # (4, 4).
        self.assertEqual(spatial.flops((9, 8)), 4 * 8 * 3 * 3 * 4 + 4 * 4 * 2 * 4 * 8)
        dense = svd.SVDDense(6, 4, rank=2, rngs=nnx.Rngs(0))
        self.assertEqual((dense.flops(), dense.dense_flops()), (2 * 10, 24))

    def test_paper_init_statistics(self):
        layer = svd.SVDConv(16, 32, (3, 3), param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        a, b = layer.factor_shape  # (32, 144), r = 32.
        r = layer.rank
        np.testing.assert_allclose(np.var(layer.svd_u[...]), 2.0 / r, rtol=0.2)
        np.testing.assert_allclose(np.var(layer.svd_v[...]), 2.0 / b, rtol=0.2)
        np.testing.assert_allclose(np.var(layer.svd_s[...]), 1.0, rtol=0.6)
        self.assertEqual(layer.svd_u.dtype, jnp.float64)
        other = svd.SVDConv(16, 32, (3, 3), param_dtype=jnp.float64, rngs=nnx.Rngs(1))
        self.assertFalse(np.allclose(other.svd_u[...], layer.svd_u[...]))

    def test_errors(self):
        rngs = nnx.Rngs(0)
        with self.assertRaisesRegex(ValueError, "rank"):
            svd.SVDConv(2, 3, 3, rank=4, rngs=rngs)  # channel: min(3, 18) = 3.
        with self.assertRaisesRegex(ValueError, "rank"):
            svd.SVDConv(2, 3, 3, rank=0, rngs=rngs)
        with self.assertRaisesRegex(ValueError, "rank"):
            svd.SVDConv(2, 3, 3, decomposition="spatial", rank=7, rngs=rngs)  # min(6, 9) = 6.
        with self.assertRaisesRegex(ValueError, "feature_group_count"):
            svd.SVDConv(2, 4, 3, feature_group_count=2, rngs=rngs)
        with self.assertRaisesRegex(ValueError, "decomposition"):
            svd.SVDConv(2, 3, 3, decomposition="tucker", rngs=rngs)
        with self.assertRaisesRegex(ValueError, "padding"):
            svd.SVDConv(2, 3, 3, padding="CAUSAL", rngs=rngs)
        with self.assertRaisesRegex(ValueError, "strides"):
            svd.SVDConv(2, 3, 3, strides=0, rngs=rngs)
        with self.assertRaisesRegex(ValueError, "rank"):
            svd.SVDDense(4, 3, rank=4, rngs=rngs)
        with self.assertRaisesRegex(ValueError, "kernel"):
            svd.SVDConv.from_dense(jnp.ones((3, 3, 2)))
        with self.assertRaisesRegex(ValueError, "rngs"):
            svd.SVDConv(2, 3, 3)
        with self.assertRaisesRegex(ValueError, "factors"):
            svd.SVDConv(2, 3, 3, factors=(jnp.ones((3, 2)), jnp.ones(2), jnp.ones((17, 2))))

    def test_given_factors(self):
        u, s, v = jnp.ones((3, 2)), jnp.asarray([2.0, -1.0]), jnp.ones((18, 2))
        layer = svd.SVDConv(2, 3, 3, factors=(u, s, v), param_dtype=jnp.float64)
        self.assertEqual(layer.rank, 2)
        np.testing.assert_array_equal(layer.svd_s[...], s)
        expected = svd.matrix_to_kernel(u @ jnp.diag(jnp.abs(s)) @ v.T, "channel", (3, 3, 2, 3))
        np.testing.assert_allclose(layer.to_dense(), expected)
        dense = svd.SVDDense(4, 3, factors=(jnp.ones((4, 1)), jnp.ones(1), jnp.ones((3, 1))))
        np.testing.assert_allclose(dense.to_dense(), jnp.ones((4, 3)))


class FromDenseTest(parameterized.TestCase):

    @parameterized.product(decomposition=svd.DECOMPOSITIONS, kernel_shape=((3, 3, 2, 5),
                                                                           (3, 2, 4, 3),
                                                                           (1, 1, 3, 2)))
    def test_full_rank_round_trip(self, decomposition, kernel_shape):
        kernel = jnp.asarray(np.random.default_rng(0).normal(size=kernel_shape))
        bias = jnp.arange(kernel_shape[3], dtype=jnp.float64)
        layer = svd.SVDConv.from_dense(kernel, decomposition=decomposition, bias=bias)
        np.testing.assert_allclose(layer.to_dense(), kernel, atol=1e-12)
        s = np.asarray(layer.svd_s[...])
        self.assertTrue(np.all(s >= 0) and np.all(np.diff(s) <= 0))
        np.testing.assert_array_equal(layer.bias[...], bias)
        matrix = svd.kernel_to_matrix(kernel, decomposition)
        np.testing.assert_allclose(s, np.linalg.svd(matrix, compute_uv=False), rtol=1e-12)
        np.testing.assert_array_equal(
            svd.matrix_to_kernel(matrix, decomposition, kernel_shape), kernel
        )

    @parameterized.parameters(*svd.DECOMPOSITIONS)
    def test_truncation_is_eckart_young(self, decomposition):
        kernel = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 4, 6)))
        full = np.linalg.svd(
            np.asarray(svd.kernel_to_matrix(kernel, decomposition)), compute_uv=False
        )
        for rank in (1, 3, 5):
            layer = svd.SVDConv.from_dense(kernel, decomposition=decomposition, rank=rank)
            self.assertEqual(layer.rank, rank)
            error = np.linalg.norm(np.asarray(layer.to_dense() - kernel))
            np.testing.assert_allclose(error, np.sqrt(np.sum(full[rank:] ** 2)), rtol=1e-10)

    def test_from_dense_keeps_conv_options(self):
        kernel = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 2, 3)))
        layer = svd.SVDConv.from_dense(
            kernel, decomposition="spatial", strides=(2, 1), padding="VALID", kernel_dilation=2,
            param_dtype=jnp.float32,
        )
        self.assertEqual(layer.svd_u.dtype, jnp.float32)
        x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 9, 9, 2)), jnp.float32)
        spec = spectra.ConvSpec((9, 9), strides=(2, 1), padding="VALID", kernel_dilation=2)
        np.testing.assert_allclose(layer(x), spectra.conv(kernel, x, spec), atol=1e-4)


class SVDDenseTest(absltest.TestCase):

    def test_forward_and_from_dense(self):
        rng = np.random.default_rng(0)
        layer = svd.SVDDense(5, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        layer.bias = nnx.Param(jnp.asarray(rng.normal(size=3)))
        self.assertEqual(
            (layer.svd_u.shape, layer.svd_s.shape, layer.svd_v.shape), ((5, 3), (3,), (3, 3))
        )
        self.assertEqual(count_params(layer), 3 * (5 + 3 + 1) + 3)
        x = jnp.asarray(rng.normal(size=(2, 4, 5)))
        np.testing.assert_allclose(layer(x), x @ layer.to_dense() + layer.bias[...], atol=1e-12)
        kernel = jnp.asarray(rng.normal(size=(6, 4)))
        dense = svd.SVDDense.from_dense(kernel, bias=jnp.ones(4))
        np.testing.assert_allclose(dense.to_dense(), kernel, atol=1e-12)
        np.testing.assert_allclose(dense(x[..., :1].repeat(6, -1)),
                                   x[..., :1].repeat(6, -1) @ kernel + 1, atol=1e-12)
        low = svd.SVDDense.from_dense(kernel, rank=2)
        self.assertIsNone(low.bias)
        s = np.linalg.svd(np.asarray(kernel), compute_uv=False)
        np.testing.assert_allclose(
            np.linalg.norm(np.asarray(low.to_dense() - kernel)), np.sqrt(np.sum(s[2:] ** 2)),
            rtol=1e-10,
        )


def random_batch_stats(model, seed=0):
    """Random BatchNorm running statistics (away from (0, 1)), then eval mode."""
    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            shape = module.mean.shape
            module.mean = nnx.BatchStat(jnp.asarray(rng.normal(size=shape)))
            module.var = nnx.BatchStat(jnp.asarray(rng.uniform(0.5, 2.0, size=shape)))
            module.scale = nnx.Param(jnp.asarray(rng.uniform(0.5, 2.0, size=shape)))
            module.bias = nnx.Param(jnp.asarray(rng.normal(size=shape)))
    model.eval()
    return model


class DecomposeTest(parameterized.TestCase):

    @parameterized.product(
        decomposition=svd.DECOMPOSITIONS, padding=("SAME", "CIRCULAR"), shortcut=("A", "B")
    )
    def test_resnet_same_logits(self, decomposition, padding, shortcut):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)))
        model = ResNet(
            8, 10, in_channels=1, width=4, padding=padding, shortcut=shortcut,
            param_dtype=jnp.float64, rngs=nnx.Rngs(0),
        )
        model = random_batch_stats(model)
        new = svd_decompose.decompose(model, decomposition)
        np.testing.assert_allclose(new(x), model(x), atol=1e-10)
        self.assertIsInstance(model.conv, nnx.Conv)  # The input is untouched.
        self.assertIsInstance(model.head, nnx.Linear)
        paths = [path for path, _ in svd_decompose.svd_layers(new)]
        expected = ["conv", "blocks/0/conv1", "blocks/0/conv2", "blocks/1/conv1",
                    "blocks/1/conv2", "blocks/2/conv1", "blocks/2/conv2", "head"]
        if shortcut == "B":
            expected += ["blocks/1/proj", "blocks/2/proj"]
        self.assertCountEqual(paths, expected)
        self.assertEqual(svd_decompose.svd_layers(model), [])
        layer = new.blocks[1].conv1
        self.assertEqual(layer.strides, (2, 2))
        self.assertEqual(layer.decomposition, decomposition)
        a, b = layer.factor_shape
        self.assertEqual(
            sum(int(v.size) for v in jax.tree.leaves(nnx.state(layer, nnx.Param))),
            min(a, b) * (a + b + 1),
        )

    def test_simple_cnn_list_and_options(self):
        x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 1)))
        model = SimpleCNN(10, in_channels=1, features=(4, 6), param_dtype=jnp.float64,
                          rngs=nnx.Rngs(0))
        new = svd_decompose.decompose(model, "spatial", dense=False)
        np.testing.assert_allclose(new(x), model(x), atol=1e-10)
        self.assertIsInstance(new.convs[0], svd.SVDConv)
        self.assertIsNotNone(new.convs[0].bias)
        self.assertIsInstance(new.head, nnx.Linear)
        self.assertEqual([p for p, _ in svd_decompose.svd_layers(new)], ["convs/0", "convs/1"])
        low = svd_decompose.decompose(model, rank=2)
        self.assertEqual([m.rank for _, m in svd_decompose.svd_layers(low)], [2, 2, 2])
        per_layer = svd_decompose.decompose(model, rank={"convs/1": 3})
        self.assertEqual([m.rank for _, m in svd_decompose.svd_layers(per_layer)], [4, 3, 6])
        with self.assertRaisesRegex(ValueError, "rank"):
            svd_decompose.decompose(model, rank={"head": 7})

    def test_random_init_and_errors(self):
        model = SimpleCNN(10, in_channels=1, features=(4, 6), rngs=nnx.Rngs(0))
        new = svd_decompose.decompose(model, "channel", init="random", rngs=nnx.Rngs(1))
        self.assertEqual(new(jnp.ones((1, 8, 8, 1))).shape, (1, 10))
        self.assertFalse(np.allclose(new.convs[1].to_dense(), model.convs[1].kernel[...]))
        self.assertEqual(new.convs[1].svd_u.dtype, jnp.float32)
        with self.assertRaisesRegex(ValueError, "rngs"):
            svd_decompose.decompose(model, init="random")
        with self.assertRaisesRegex(ValueError, "init"):
            svd_decompose.decompose(model, init="zeros")
        with self.assertRaisesRegex(ValueError, "decomposition"):
            svd_decompose.decompose(model, "tucker")

    def test_grouped_conv_left_alone(self):
        class Net(nnx.Module):
            def __init__(self, rngs):
                self.depthwise = nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=rngs)
                self.pointwise = nnx.Conv(4, 2, (1, 1), rngs=rngs)

            def __call__(self, x):
                return self.pointwise(self.depthwise(x))

        model = Net(nnx.Rngs(0))
        new = svd_decompose.decompose(model)
        self.assertIsInstance(new.depthwise, nnx.Conv)
        self.assertIsInstance(new.pointwise, svd.SVDConv)
        x = jnp.ones((1, 5, 5, 4), jnp.float32)
        np.testing.assert_allclose(new(x), model(x), atol=1e-5)


if __name__ == "__main__":
    absltest.main()
