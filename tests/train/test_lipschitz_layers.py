"""`train.lipschitz_layers` and `train.models.LipResNet`: 1-Lipschitz blocks, checked against
brute force, Jacobians and the dense operator (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

import spectra
import train
from train import lipschitz_layers as ll
from train.config import TrainConfig
from train.models.registry import build_model

ACTIVATIONS = {
    "maxmin": ll.max_min,
    "groupsort2": lambda x: ll.group_sort(x, 2),
    "groupsort4": lambda x: ll.group_sort(x, 4),
}


def _rng(seed=0):
    return np.random.default_rng(seed)


class ActivationTest(parameterized.TestCase):

    def test_maxmin_reference(self):
        x = _rng().standard_normal((5, 3, 8))
        a, b = x[..., :4], x[..., 4:]
        expected = np.concatenate([np.maximum(a, b), np.minimum(a, b)], axis=-1)
        np.testing.assert_array_equal(ll.MaxMin()(jnp.asarray(x)), expected)

    def test_groupsort_reference(self):
        x = _rng(1).standard_normal((7, 12))
        expected = np.sort(x.reshape(7, 3, 4), axis=-1).reshape(7, 12)
        np.testing.assert_array_equal(ll.GroupSort(4)(jnp.asarray(x)), expected)
        np.testing.assert_array_equal(ll.GroupSort(1)(jnp.asarray(x)), x)

    def test_groupsort2_is_maxmin_up_to_a_channel_permutation(self):
        x = jnp.asarray(_rng(2).standard_normal((4, 6)))
        # MaxMin pairs channel i with i + C/2; interleave them, GroupSort(2) sorts each pair.
        order = np.stack([np.arange(3), np.arange(3) + 3], axis=-1).ravel()
        gs = ll.group_sort(x[:, order], 2)  # (min, max) of each pair
        mm = ll.max_min(x)
        np.testing.assert_array_equal(gs[:, 1::2], mm[:, :3])
        np.testing.assert_array_equal(gs[:, 0::2], mm[:, 3:])

    @parameterized.named_parameters(*ACTIVATIONS.items())
    def test_norm_preserving_and_1_lipschitz(self, fn):
        rng = _rng(3)
        x = rng.standard_normal((2000, 8))
        # Pairs at all scales, including close ones (where the order of entries can flip).
        y = x + rng.standard_normal((2000, 8)) * np.logspace(-3, 1, 2000)[:, None]
        fx, fy = np.asarray(fn(jnp.asarray(x))), np.asarray(fn(jnp.asarray(y)))
        np.testing.assert_allclose(np.linalg.norm(fx, axis=1), np.linalg.norm(x, axis=1),
                                   rtol=1e-12)
        ratio = np.linalg.norm(fx - fy, axis=1) / np.linalg.norm(x - y, axis=1)
        self.assertLessEqual(ratio.max(), 1.0 + 1e-12)
        self.assertGreater(ratio.max(), 1.0 - 1e-9)  # Attained: the constant is exactly 1.

    @parameterized.named_parameters(*ACTIVATIONS.items())
    def test_jacobian_is_a_permutation_gradient_norm_preserving(self, fn):
        for seed in range(5):
            x = jnp.asarray(_rng(seed).standard_normal(8))
            jac = np.asarray(jax.jacobian(fn)(x))
            np.testing.assert_allclose(jac.T @ jac, np.eye(8), atol=1e-12)
            self.assertTrue(np.all(np.isin(jac, (0.0, 1.0))))
            g = jnp.asarray(_rng(seed + 10).standard_normal(8))
            vjp = jax.vjp(fn, x)[1](g)[0]
            np.testing.assert_allclose(np.linalg.norm(vjp), np.linalg.norm(g), rtol=1e-12)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "divisible by 2"):
            ll.max_min(jnp.zeros((2, 3)))
        with self.assertRaisesRegex(ValueError, "group_size"):
            ll.GroupSort(0)
        with self.assertRaisesRegex(ValueError, "activation='swish'"):
            ll.activation_fn("swish")


def _project(model, x, max_norm=1.0):
    """One update of zeros through the certified projection: the projected model."""
    specs = train.find_convs_nnx(model, x)
    tx = train.project_conv_operator_norm(max_norm, specs, method="certified")
    params = nnx.state(model, nnx.Param)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)
    nnx.update(model, optax.apply_updates(params, updates))
    return specs


class ResidualBlockTest(parameterized.TestCase):

    @parameterized.parameters("SAME", "CIRCULAR")
    def test_block_is_identity_plus_residual_as_one_kernel(self, padding):
        block = ll.LipResidualBlock(4, padding=padding, activation=None, init_scale=0.5,
                                    rngs=nnx.Rngs(0))
        x = jnp.asarray(_rng().standard_normal((2, 6, 6, 4)), jnp.float32)
        residual = jax.lax.conv_general_dilated(
            jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap" if padding == "CIRCULAR"
                    else "constant"),
            block.residual_kernel, (1, 1), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        np.testing.assert_allclose(block(x), x + residual + block.conv.bias[...], atol=1e-5)

    @parameterized.parameters("SAME", "CIRCULAR")
    def test_certified_constant_after_projection_against_the_dense_operator(self, padding):
        block = ll.LipResidualBlock(3, padding=padding, activation=None, init_scale=1.0,
                                    rngs=nnx.Rngs(1))
        x = jnp.zeros((1, 5, 5, 3))
        spec = train.find_convs_nnx(block, x)["conv"]["kernel"]
        dense = lambda k: np.asarray(spectra.dense_operator(  # noqa: E731
            jnp.asarray(k, jnp.float64), spec))
        kernel = np.asarray(block.conv.kernel[...])
        sigma = np.linalg.svd(dense(kernel), compute_uv=False)
        eye = np.asarray(ll.identity_kernel(3, 3, jnp.float64))
        sigma_w = np.linalg.svd(dense(kernel - eye), compute_uv=False)[0]
        self.assertGreater(sigma[0], 1.0)  # Outside the ball before the projection,
        self.assertLess(sigma[0], 1.0 + sigma_w)  # and tighter than the triangle inequality.
        _project(block, x)
        projected = np.linalg.svd(dense(block.conv.kernel[...]), compute_uv=False)
        self.assertLessEqual(projected[0], 1.0 + 1e-5)
        self.assertGreater(projected[0], 0.9)
        # The block as a map: its finite differences never exceed the exact constant.
        rng = _rng(4)
        u, v = (jnp.asarray(rng.standard_normal((64, 5, 5, 3)), jnp.float32) for _ in range(2))
        ratio = (np.linalg.norm(np.asarray(block(u) - block(v)).reshape(64, -1), axis=1)
                 / np.linalg.norm(np.asarray(u - v).reshape(64, -1), axis=1))
        self.assertLessEqual(ratio.max(), projected[0] * (1 + 1e-5))


class NormalizedDenseTest(absltest.TestCase):

    def test_spectral_and_rows(self):
        layer = ll.NormalizedDense(6, 4, normalize="spectral", rngs=nnx.Rngs(0))
        layer.kernel[...] = 3.0 * layer.kernel[...]
        w = np.asarray(ll.normalized_weight(layer.kernel[...], "spectral"))
        np.testing.assert_allclose(np.linalg.svd(w, compute_uv=False)[0], 1.0, rtol=1e-6)
        small = 1e-3 * layer.kernel[...]
        np.testing.assert_allclose(ll.normalized_weight(small, "spectral"), small)  # Inside.
        rows = np.asarray(ll.normalized_weight(layer.kernel[...], "rows"))
        np.testing.assert_allclose(np.linalg.norm(rows, axis=0), 1.0, rtol=1e-6)
        x = jnp.asarray(_rng().standard_normal((3, 6)), jnp.float32)
        np.testing.assert_allclose(layer(x), x @ w + layer.bias[...], rtol=1e-5, atol=1e-6)
        with self.assertRaisesRegex(ValueError, "normalize='frobenius'"):
            ll.NormalizedDense(6, 4, normalize="frobenius", rngs=nnx.Rngs(0))

    def test_orthogonal(self):
        kernel = jnp.asarray(_rng(5).standard_normal((6, 4)), jnp.float32)
        w = np.asarray(ll.normalized_weight(kernel, "orthogonal"), np.float64)
        # All singular values 1 (float64 SVD of the applied weight), the polar factor U Vᵀ.
        np.testing.assert_allclose(np.linalg.svd(w, compute_uv=False), 1.0, rtol=1e-5)
        u, _, vt = np.linalg.svd(np.asarray(kernel, np.float64), full_matrices=False)
        np.testing.assert_allclose(w, u @ vt, atol=1e-5)
        # Norm preserving on the row space: ||v W|| = ||v|| for every v in span(W's rows).
        v = _rng(6).standard_normal((3, 4)) @ w.T
        np.testing.assert_allclose(
            np.linalg.norm(v @ w, axis=1), np.linalg.norm(v, axis=1), rtol=1e-5)


class OrthogonalConvTest(parameterized.TestCase):

    def _dense(self, conv, input_shape):
        spec = spectra.ConvSpec(input_shape=input_shape, strides=(conv.stride,) * 2,
                                padding="SAME")
        return np.asarray(spectra.dense_operator(jnp.asarray(conv.kernel(), jnp.float64), spec))

    @parameterized.parameters((2, 8), (4, 8), (2, 3))
    def test_stride_k_every_nonzero_singular_value_is_one(self, c_in, c_out):
        # 2x2 stride 2, non-overlapping patches: block diagonal with blocks polar(M)ᵀ.
        conv = ll.OrthogonalConv(c_in, c_out, kernel_size=2, stride=2, rngs=nnx.Rngs(0))
        sigma = np.linalg.svd(self._dense(conv, (4, 6)), compute_uv=False)  # Sorted.
        rank = 2 * 3 * min(c_out, 4 * c_in)
        # 1 - 2⁻¹⁶ (the margin over the float32 SVD's rounding): <= 1 in float64.
        self.assertLessEqual(sigma[0], 1.0)
        np.testing.assert_allclose(sigma[:rank], 1.0, rtol=1e-4)
        np.testing.assert_allclose(sigma[rank:], 0.0, atol=1e-5)

    def test_stride_1_norm_at_most_one_isometry_inside_the_border(self):
        conv = ll.OrthogonalConv(1, 10, kernel_size=3, stride=1, use_bias=False,
                                 rngs=nnx.Rngs(1))
        dense = self._dense(conv, (6, 6))
        sigma = np.linalg.svd(dense, compute_uv=False)
        self.assertLessEqual(sigma[0], 1.0)
        self.assertGreater(sigma[0], 1.0 - 1e-4)  # Reached: the bound is exact.
        self.assertLess(sigma[-1], 0.99)  # Not an isometry at the border (zero padding),
        inside = np.zeros((6, 6, 1))  # but one on images with a zero border (C_out >= 9).
        inside[1:-1, 1:-1] = _rng(2).standard_normal((4, 4, 1))
        np.testing.assert_allclose(
            np.linalg.norm(dense @ inside.ravel()), np.linalg.norm(inside), rtol=1e-4)
        x = jnp.asarray(inside[None], jnp.float32)
        np.testing.assert_allclose(np.asarray(conv(x)).ravel(), dense @ inside.ravel(),
                                   atol=1e-5)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "stride=3"):
            ll.OrthogonalConv(2, 4, kernel_size=2, stride=3, rngs=nnx.Rngs(0))
        with self.assertRaisesRegex(ValueError, "kernel_size=2"):
            ll.OrthogonalConv(2, 4, kernel_size=2, stride=1, rngs=nnx.Rngs(0))
        with self.assertRaisesRegex(ValueError, "in_channels=0"):
            ll.OrthogonalConv(0, 4, rngs=nnx.Rngs(0))


class LipResNetTest(absltest.TestCase):

    def test_orthogonal_stem_and_transition_certified_at_most_one(self):
        config = TrainConfig(dataset="digits", model="lipresnet", width=4,
                             model_kwargs={"depths": (1, 1), "init_scale": 0.5,
                                           "activation": "maxmin", "orthogonal": True})
        model = build_model(config, 10, 1, (8, 8))
        self.assertIsInstance(model.stem, ll.OrthogonalConv)
        self.assertIsInstance(model.down, ll.OrthogonalConv)
        x = jnp.zeros((1, 8, 8, 1))
        specs = _project(model, x)  # Only the blocks' kernels are params convs.
        self.assertLen([s for s in jax.tree.leaves(specs) if s is not None], 2)
        r = train.report.network_report_nnx(model, x, num_points=2, power_iterations=10,
                                            compute_spectra=False)
        n = r.network
        self.assertLessEqual(n["lipschitz_upper"], 1.0)
        self.assertLessEqual(n["lipschitz_lower"], n["lipschitz_upper"] * (1 + 1e-6))
        with self.assertRaisesRegex(ValueError, "orthogonal=True"):
            train.models.LipResNet(10, in_channels=1, input_shape=(8, 8), width=4,
                                   padding="CIRCULAR", orthogonal=True, rngs=nnx.Rngs(0))

    def test_network_report_certifies_at_most_one(self):
        config = TrainConfig(dataset="digits", model="lipresnet", width=4,
                             model_kwargs={"depths": (1, 1), "init_scale": 0.5})
        model = build_model(config, 10, 1, (8, 8))
        self.assertIsInstance(model, train.models.LipResNet)
        x = jnp.zeros((1, 8, 8, 1))
        specs = _project(model, x)
        self.assertLen([s for s in jax.tree.leaves(specs) if s is not None], 4)
        r = train.report.network_report_nnx(model, x, num_points=2, power_iterations=10,
                                            compute_spectra=False)
        upper, lower = r.network["lipschitz_upper"], r.network["lipschitz_lower"]
        self.assertLessEqual(upper, 1.0 + 1e-5)
        self.assertLessEqual(lower, upper * (1 + 1e-6))
        self.assertGreater(lower, 0.0)
        for layer in r.layers:  # Every conv's exact σ_max <= 1.
            self.assertLessEqual(layer.sigma_max, 1.0 + 1e-5)

    def test_maxmin_network_certified_at_most_its_logit_scale(self):
        # MaxMin is 1-Lipschitz (per-pair sorting), not sqrt(2): a projected MaxMin LipResNet
        # with logit scale L is certified <= L by both the composition and the midpoint bound.
        scale = 4.0
        config = TrainConfig(dataset="digits", model="lipresnet", width=4,
                             model_kwargs={"depths": (1, 1), "init_scale": 0.5,
                                           "activation": "maxmin", "lipschitz": scale})
        model = build_model(config, 10, 1, (8, 8))
        x = jnp.zeros((1, 8, 8, 1))
        _project(model, x)
        r = train.report.network_report_nnx(model, x, num_points=2, power_iterations=10,
                                            compute_spectra=False)
        n = r.network
        self.assertLessEqual(n["lipschitz_upper_naive"], scale * (1 + 1e-5))
        self.assertLessEqual(n["lipschitz_upper"], scale * (1 + 1e-5))
        self.assertIsNotNone(n["lipschitz_upper_tight"])
        self.assertLessEqual(n["lipschitz_upper_tight"], scale * (1 + 1e-3))
        self.assertLessEqual(n["lipschitz_lower"], n["lipschitz_upper"] * (1 + 1e-6))
        self.assertGreater(n["lipschitz_lower"], 0.0)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "width=3"):
            train.models.LipResNet(10, in_channels=1, input_shape=(8, 8), width=3,
                                   rngs=nnx.Rngs(0))
        with self.assertRaisesRegex(ValueError, "activation='gelu'"):
            train.models.LipResNet(10, in_channels=1, input_shape=(8, 8), width=4,
                                   activation="gelu", rngs=nnx.Rngs(0))


if __name__ == "__main__":
    absltest.main()
