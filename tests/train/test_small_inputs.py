"""Discovery, projection and certification on a model whose deep layers see inputs smaller than
their kernels; the 'power' projection on grouped convs with a warm start that misses a group."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

import spectra
import train
from tests.spectra import layers


class _SmallCNN(nnx.Module):
    """A 4x4 input; every conv after the first sees an input smaller than its kernel."""

    def __init__(self, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)  # SAME, 4x4 -> 2x2.
        self.c2 = nnx.Conv(8, 8, (3, 3), strides=2, padding=1, rngs=rngs)  # 2x2 -> 1x1.
        self.c3 = nnx.Conv(8, 8, (5, 5), kernel_dilation=2, rngs=rngs)  # SAME on 1x1.
        self.c4 = nnx.Conv(8, 8, (3, 3), padding="CIRCULAR", feature_group_count=8, rngs=rngs)
        self.c5 = nnx.Conv(8, 4, (3, 3), padding="CIRCULAR", kernel_dilation=3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.c1(x))
        x = nnx.relu(self.c2(x))
        return self.c5(self.c4(self.c3(x)))


_EXPECTED = {  # layer -> (input_shape, strides, padding, dilation, groups)
    "c1": ((4, 4), (2, 2), "SAME", (1, 1), 1),
    "c2": ((2, 2), (2, 2), ((1, 1), (1, 1)), (1, 1), 1),
    "c3": ((1, 1), (1, 1), "SAME", (2, 2), 1),
    "c4": ((1, 1), (1, 1), "CIRCULAR", (1, 1), 8),
    "c5": ((1, 1), (1, 1), "CIRCULAR", (3, 3), 1),
}


def _exact(kernel, spec) -> float:
    return float(layers.exact_singular_values(np.asarray(kernel, np.float64), spec)[0])


class SmallInputModelTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.model = _SmallCNN(nnx.Rngs(0))
        self.x = jnp.ones((1, 4, 4, 3))
        self.specs = train.find_convs_nnx(self.model, self.x)

    def test_find_convs_nnx(self):
        for name, (n, s, pad, d, g) in _EXPECTED.items():
            spec = self.specs[name]["kernel"]
            self.assertEqual(spec, spectra.ConvSpec(n, s, pad, d, g, in_features=spec.in_features))
            self.assertIsNone(self.specs[name]["bias"])
        # The discovered operators are those the model applies: the model with c1..c4 replaced
        # by identities would not run, so check each spec's dense operator on the layer itself.
        layer, spec = self.model.c5, self.specs["c5"]["kernel"]
        x = np.random.default_rng(0).normal(size=(1, 1, 1, 8))
        dense = layers.dense_operator(layer.kernel[...], spec)
        np.testing.assert_allclose(dense @ x.ravel() + np.asarray(layer.bias[...]),
                                   np.ravel(layer(jnp.asarray(x, jnp.float32))), rtol=1e-5,
                                   atol=1e-5)

    @parameterized.parameters("certified", "rescale", "power")
    def test_projection(self, method):
        _, params, _ = nnx.split(self.model, nnx.Param, ...)
        params = nnx.as_pure(params)
        max_norm = 0.1
        tx = train.project_conv_operator_norm(max_norm, self.specs, method=method,
                                              num_rounds=1)
        state = tx.init(params)
        updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
        projected = optax.apply_updates(params, updates)
        tol = 1e-4 if method == "power" else 1e-5  # float32 params; 'power' is approximate.
        for name in _EXPECTED:
            spec = self.specs[name]["kernel"]
            before = _exact(params[name]["kernel"], spec)
            after = _exact(projected[name]["kernel"], spec)
            self.assertGreater(before, max_norm, msg=name)  # Each layer was projected.
            self.assertLessEqual(after, max_norm * (1 + tol), msg=f"{method} {name}")
        graphdef, _, rest = nnx.split(self.model, nnx.Param, ...)
        y = nnx.merge(graphdef, projected, rest)(self.x)
        self.assertEqual(y.shape, (1, 1, 1, 4))
        self.assertTrue(np.all(np.isfinite(y)))

    def test_certify(self):
        _, params, _ = nnx.split(self.model, nnx.Param, ...)
        params = nnx.as_pure(params)
        certified, report = train.certify_conv_operator_norm(params, self.specs, 0.5)
        self.assertTrue(report.certified)
        for name in _EXPECTED:
            spec = self.specs[name]["kernel"]
            self.assertLessEqual(_exact(certified[name]["kernel"], spec), 0.5 * (1 + 1e-5))

    def test_circular_stride_not_dividing_a_small_input(self):
        # Projected on the stride-1 circular layer (whose rows contain the strided layer's).
        spec = spectra.ConvSpec((3, 3), strides=2, padding="CIRCULAR")
        params = {"w": jnp.asarray(layers.random_kernel((5, 5, 2, 2), seed=3))}
        for method in ("certified", "rescale"):
            tx = train.project_conv_operator_norm(0.5, {"w": spec}, method=method)
            updates, _ = tx.update({"w": jnp.zeros((5, 5, 2, 2))}, tx.init(params), params)
            projected = optax.apply_updates(params, updates)["w"]
            self.assertLessEqual(_exact(projected, spec), 0.5 * (1 + 1e-9), msg=method)


class PowerProjectionGroupsTest(absltest.TestCase):
    """The carried power vectors must not lose a group (block-diagonal operator)."""

    def test_a_group_that_grows_after_init_is_seen(self):
        groups = 6
        spec = spectra.ConvSpec((5, 5), padding="SAME", feature_group_count=groups)
        kernel = layers.random_kernel((3, 3, 1, groups), seed=0).astype(np.float32)
        kernel[..., 0] *= 4.0  # Group 0 dominates at init: 100 float32 power iterations drive
        # the other groups' components of a single vector to exactly zero (underflow).
        params = {"w": jnp.asarray(kernel)}
        specs = {"w": spec}
        tx = train.project_conv_operator_norm(1e3, specs, method="power", num_rounds=1)
        state = tx.init(params)
        # Now group 4 becomes the largest by far; one power step per update must see it.
        grow = np.zeros_like(kernel)
        grow[..., 4] = 20.0 * kernel[..., 4]
        new = np.asarray(kernel + grow, np.float64)
        exact = _exact(new, spec)
        self.assertGreater(exact, 2 * _exact(new[..., :1], spectra.ConvSpec((5, 5))))
        max_norm = 0.5 * exact
        tx = train.project_conv_operator_norm(max_norm, specs, method="power", num_rounds=1)
        updates, state = tx.update({"w": jnp.asarray(grow)}, state, params)
        projected = optax.apply_updates(params, updates)["w"]
        self.assertLessEqual(_exact(projected, spec), max_norm * (1 + 1e-4))
        self.assertGreater(float(state.feasibility_gap), 0.0)


if __name__ == "__main__":
    absltest.main()
