"""`train.spectral_penalty`: value, gradient, jit, NNX state, errors."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

import spectra
import train
from spectra._bounds import UPPER_BOUNDS

SPECS = {
    "circular": spectra.ConvSpec((8, 8), padding="CIRCULAR"),
    "same_stride2": spectra.ConvSpec((8, 8), strides=2, padding="SAME"),
    "valid_depthwise": spectra.ConvSpec((8, 6), padding="VALID", feature_group_count=2),
}
KSHAPES = {"circular": (3, 3, 2, 3), "same_stride2": (3, 3, 3, 2), "valid_depthwise": (3, 2, 1, 2)}
BOUNDS = ("gram_iteration", "singla_feizi", "l1_matrix", "symbol_grid")


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    params = {name: jnp.asarray(rng.normal(size=shape)) for name, shape in KSHAPES.items()}
    params["head"] = {"w": jnp.asarray(rng.normal(size=(4, 2))), "b": jnp.zeros(2)}
    return params


def make_specs():
    return {**SPECS, "head": {"w": None, "b": None}}


def exact_norm(kernel, spec) -> float:
    dense = np.asarray(spectra.dense_operator(kernel, spec))
    return float(np.linalg.svd(dense, compute_uv=False)[0])


class SpectralPenaltyTest(parameterized.TestCase):

    @parameterized.parameters(*BOUNDS)
    def test_sum_of_upper_bounds(self, bound):
        params, specs = make_params(), make_specs()
        penalty = jax.jit(lambda p: train.spectral_penalty(p, specs, bound=bound))(params)
        layer_bound = jax.jit(UPPER_BOUNDS[bound], static_argnums=1)
        per_layer = [float(layer_bound(params[n], s)) for n, s in SPECS.items()]
        np.testing.assert_allclose(float(penalty), sum(per_layer), rtol=1e-12)
        exact = [exact_norm(params[n], s) for n, s in SPECS.items()]
        for upper, value in zip(per_layer, exact):
            self.assertGreaterEqual(upper, value * (1 - 1e-9))
        if bound == "l1_matrix":
            maximum = train.spectral_penalty(params, specs, bound=bound, reduce="max")
            np.testing.assert_allclose(float(maximum), max(per_layer), rtol=1e-12)

    def test_exact(self):
        params = make_params()
        exact = [exact_norm(params[n], s) for n, s in SPECS.items()]
        penalty = train.spectral_penalty(params, make_specs(), bound="exact")
        np.testing.assert_allclose(float(penalty), sum(exact), rtol=1e-6)

    @parameterized.parameters("l1_matrix", "exact")
    def test_gradient_is_sum_of_layer_gradients(self, bound):
        params, specs = make_params(), make_specs()
        grads = jax.jit(jax.grad(lambda p: train.spectral_penalty(p, specs, bound=bound)))(params)
        for name, spec in SPECS.items():
            self.assertTrue(np.all(np.isfinite(grads[name])))
            fn = spectra.spectral_norm if bound == "exact" else UPPER_BOUNDS[bound]
            expected = jax.jit(jax.grad(lambda k, s=spec, f=fn: f(k, s)))(params[name])
            np.testing.assert_allclose(grads[name], expected, rtol=1e-6, atol=1e-9)
        jax.tree.map(lambda g: np.testing.assert_array_equal(g, 0.0), grads["head"])

    @parameterized.parameters("sum", "max")
    def test_jit_matches_dense_ground_truth(self, reduce):
        # Under jit, against an independent computation: NumPy SVD of each layer's dense matrix.
        params, specs = make_params(), make_specs()
        penalty = jax.jit(
            lambda p: train.spectral_penalty(p, specs, bound="exact", reduce=reduce))(params)
        exact = [exact_norm(params[n], s) for n, s in SPECS.items()]
        expected = sum(exact) if reduce == "sum" else max(exact)
        np.testing.assert_allclose(float(penalty), expected, rtol=1e-6)

    def test_no_conv_is_zero(self):
        params = {"w": jnp.ones((2, 2))}
        self.assertEqual(float(train.spectral_penalty(params, {"w": None})), 0.0)

    def test_nnx_model_and_grad(self):
        model = nnx.Sequential(
            nnx.Conv(2, 3, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0)),
            nnx.Conv(3, 2, (3, 3), strides=2, rngs=nnx.Rngs(1)),
        )
        specs = train.find_convs_nnx(model, jnp.ones((1, 8, 8, 2)))

        def loss(m):
            return train.spectral_penalty(nnx.state(m, nnx.Param), specs, bound="symbol_grid")

        value, grads = nnx.value_and_grad(loss)(model)
        kernels = [layer.kernel.get_value() for layer in model.layers]
        layer_specs = [s["kernel"] for s in specs["layers"].values()]
        expected = sum(UPPER_BOUNDS["symbol_grid"](k, s) for k, s in zip(kernels, layer_specs))
        np.testing.assert_allclose(value, expected, rtol=1e-6)
        for g in jax.tree.leaves(grads):
            self.assertTrue(np.all(np.isfinite(g)))
        self.assertGreater(float(jnp.abs(grads["layers"][0]["kernel"].get_value()).sum()), 0)

    def test_errors(self):
        params, specs = make_params(), make_specs()
        with self.assertRaisesRegex(ValueError, "bound='nope'"):
            train.spectral_penalty(params, specs, bound="nope")
        with self.assertRaisesRegex(ValueError, "reduce='mean'"):
            train.spectral_penalty(params, specs, reduce="mean")
        with self.assertRaisesRegex(ValueError, "specs"):
            train.spectral_penalty(params, {"circular": SPECS["circular"]})


if __name__ == "__main__":
    absltest.main()
