"""`train.regularizers`: SVD-training losses (orthogonality, sparsity) and a short digits run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

from train import pruning
from train import regularizers
from train.data import load_digits_split
from train.layers import svd
from train.layers import svd_decompose
from train.models.resnet import SimpleCNN


def orthonormal(rows, cols, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(rows, cols)))
    return jnp.asarray(q)


def factor_tree(s_values, seed=0):
    s = jnp.asarray(s_values, jnp.float64)
    r = s.shape[0]
    return {"a": {"svd_u": orthonormal(5, r, seed), "svd_s": s,
                  "svd_v": orthonormal(7, r, seed + 1), "bias": jnp.zeros(5)}}


def small_model(seed=0):
    model = SimpleCNN(10, in_channels=1, features=(3, 4), param_dtype=jnp.float64,
                      rngs=nnx.Rngs(seed))
    return svd_decompose.decompose(model, "channel", init="random", rngs=nnx.Rngs(seed + 1))


class SVDFactorsTest(absltest.TestCase):

    def test_state_pure_dict_and_paths(self):
        model = small_model()
        state = nnx.split(model, nnx.Param, ...)[1]
        found = regularizers.svd_factors(state)
        self.assertEqual([p for p, *_ in found], [p for p, _ in svd_decompose.svd_layers(model)])
        pure = regularizers.svd_factors(nnx.to_pure_dict(state))
        for (p1, *a1), (p2, *a2) in zip(found, pure):
            self.assertEqual(p1, p2)
            for x, y in zip(a1, a2):
                np.testing.assert_array_equal(x, y)
        _, u, s, v = found[1]
        layer = model.convs[1]
        np.testing.assert_array_equal(u, layer.svd_u[...])
        np.testing.assert_array_equal(s, layer.svd_s[...])
        np.testing.assert_array_equal(v, layer.svd_v[...])
        self.assertEqual(regularizers.svd_factors({"w": jnp.ones(3)}), [])
        self.assertEqual(float(regularizers.orthogonality_loss({"w": jnp.ones(3)})), 0.0)
        self.assertEqual(float(regularizers.sparsity_loss({"w": jnp.ones(3)})), 0.0)


class OrthogonalityTest(absltest.TestCase):

    def test_zero_for_orthonormal_factors(self):
        self.assertLess(float(regularizers.orthogonality_loss(factor_tree([3.0, 1.0, 0.5]))),
                        1e-28)
        kernel = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 2, 4)))
        for decomposition in svd.DECOMPOSITIONS:
            layer = svd.SVDConv.from_dense(kernel, decomposition=decomposition)
            params = nnx.state(layer, nnx.Param)
            self.assertLess(float(regularizers.orthogonality_loss(params)), 1e-26)

    def test_values(self):
        # V^T V = 4 I (r = 2): ||3 I||_F^2 / 4 = 4.5; U orthonormal: 0.
        params = {"svd_u": jnp.eye(3, 2), "svd_s": jnp.ones(2), "svd_v": 2 * jnp.eye(4, 2)}
        np.testing.assert_allclose(float(regularizers.orthogonality_loss(params)), 4.5)
        a = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)))
        gram = np.asarray(a.T @ a)
        np.testing.assert_allclose(
            float(regularizers.factor_orthogonality(a)),
            np.sum((gram - np.eye(3)) ** 2) / 9, rtol=1e-12,
        )
        # Wide factor (m < r): the m x m Gram, still divided by r^2.
        wide = a.T  # (3, 6)
        np.testing.assert_allclose(
            float(regularizers.factor_orthogonality(wide)),
            np.sum((gram - np.eye(3)) ** 2) / 36, rtol=1e-12,
        )

    def test_positive_for_random_factors_jit_and_grad(self):
        model = small_model()
        state = nnx.split(model, nnx.Param, ...)[1]
        value = regularizers.orthogonality_loss(state)
        self.assertGreater(float(value), 0.1)
        expected = sum(
            float(regularizers.factor_orthogonality(u) + regularizers.factor_orthogonality(v))
            for _, u, _, v in regularizers.svd_factors(state)
        )
        np.testing.assert_allclose(float(value), expected, rtol=1e-12)
        np.testing.assert_allclose(float(jax.jit(regularizers.orthogonality_loss)(state)),
                                   float(value), rtol=1e-12)
        grads = jax.grad(regularizers.orthogonality_loss)(state)
        _, gu, gs, gv = regularizers.svd_factors(grads)[0]
        self.assertTrue(np.all(np.isfinite(gu)) and np.any(gu != 0))
        np.testing.assert_array_equal(gs, 0.0)


class SparsityTest(parameterized.TestCase):

    def test_values(self):
        params = factor_tree([3.0, -4.0, 0.0])
        np.testing.assert_allclose(float(regularizers.sparsity_loss(params, "l1")), 7.0)
        np.testing.assert_allclose(float(regularizers.sparsity_loss(params, "hoyer")), 7 / 5)
        np.testing.assert_allclose(
            float(regularizers.sparsity_loss(params, "hoyer_square")), 49 / 25
        )
        two = {"x": factor_tree([1.0, 1.0])["a"], "y": factor_tree([2.0, 0.0])["a"]}
        np.testing.assert_allclose(float(regularizers.sparsity_loss(two, "hoyer")),
                                   np.sqrt(2) + 1, rtol=1e-12)

    @parameterized.parameters("hoyer", "hoyer_square")
    def test_scale_invariant(self, kind):
        s = np.random.default_rng(0).normal(size=6)
        small = regularizers.sparsity_loss(factor_tree(s), kind)
        large = regularizers.sparsity_loss(factor_tree(3.7 * s), kind)
        np.testing.assert_allclose(float(small), float(large), rtol=1e-12)
        one_hot = regularizers.sparsity_loss(factor_tree([0.0, 2.5, 0.0]), kind)
        np.testing.assert_allclose(float(one_hot), 1.0, rtol=1e-12)  # The minimum.

    @parameterized.parameters(*regularizers.SPARSITY)
    def test_zero_s_is_finite_and_jit(self, kind):
        params = factor_tree([0.0, 0.0, 0.0])
        loss = jax.jit(lambda p: regularizers.sparsity_loss(p, kind))
        self.assertEqual(float(loss(params)), 0.0)
        grads = jax.grad(lambda p: regularizers.sparsity_loss(p, kind))(params)
        for leaf in jax.tree.leaves(grads):
            self.assertTrue(np.all(np.isfinite(leaf)))
        s = factor_tree([0.5, -1.0, 0.0])
        np.testing.assert_allclose(
            float(loss(s)), float(regularizers.sparsity_loss(s, kind)), rtol=1e-12
        )
        grad_s = jax.grad(lambda p: regularizers.sparsity_loss(p, kind))(s)["a"]["svd_s"]
        self.assertTrue(np.all(np.isfinite(grad_s)))

    def test_hoyer_gradient_shrinks_small_values(self):
        # d/ds_i (||s||_1 / ||s||_2) is positive for the small entries: descent shrinks them.
        s = factor_tree([3.0, 0.2, 0.1])
        grad = jax.grad(lambda p: regularizers.sparsity_loss(p, "hoyer"))(s)["a"]["svd_s"]
        self.assertLess(float(grad[0]), 0.0)
        self.assertGreater(float(grad[2]), 0.0)

    def test_unknown_kind(self):
        with self.assertRaisesRegex(ValueError, "kind"):
            regularizers.sparsity_loss(factor_tree([1.0]), "l0")
        with self.assertRaisesRegex(ValueError, "kind"):
            regularizers.singular_value_sparsity(jnp.ones(2), "l2")


def train_effective_rank(hoyer_weight, steps=100, seed=0):
    """Adam on digits (SimpleCNN in channel SVD form, from scratch): total energy rank."""
    images, labels = load_digits_split("train")
    model = SimpleCNN(10, in_channels=1, features=(8, 16), rngs=nnx.Rngs(seed))
    model = svd_decompose.decompose(model, "channel", init="random", rngs=nnx.Rngs(seed + 1))
    graph, params = nnx.split(model, nnx.Param)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    def loss_fn(params, x, y):
        logits = nnx.merge(graph, params)(x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return (ce + 0.1 * regularizers.orthogonality_loss(params)
                + hoyer_weight * regularizers.sparsity_loss(params, "hoyer"))

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        index = rng.choice(len(labels), 64, replace=False)
        params, opt_state = step(params, opt_state, jnp.asarray(images[index]),
                                 jnp.asarray(labels[index]))
    trained = nnx.merge(graph, params)
    return sum(
        pruning.energy_rank(layer.svd_s[...], 0.01)
        for _, layer in svd_decompose.svd_layers(trained)
    )


class HoyerTrainingTest(absltest.TestCase):

    def test_hoyer_lowers_effective_rank(self):
        baseline = train_effective_rank(0.0)
        sparse = train_effective_rank(0.3)
        self.assertLess(sparse, baseline)


if __name__ == "__main__":
    absltest.main()
