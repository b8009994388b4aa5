"""`train.pruning`: energy_rank, prune_by_energy (compact), mask_by_energy, kept_energy."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

from train import pruning
from train.layers import svd
from train.layers import svd_decompose
from train.models.resnet import ResNet
from train.models.resnet import SimpleCNN


class EnergyRankTest(parameterized.TestCase):

    @parameterized.parameters(
        ([3.0, 0.0, 4.0, 1.0], 0.05, 2),  # 16 + 9 = 25 >= 0.95 * 26.
        ([3.0, 0.0, 4.0, 1.0], 0.03, 3),  # 25 < 0.97 * 26 = 25.22.
        ([3.0, 0.0, 4.0, 1.0], 0.0, 3),  # Every nonzero.
        ([3.0, 0.0, 4.0, 1.0], 0.5, 1),  # 16 >= 13.
        ([-5.0, 1.0], 0.0, 2),  # Signs do not matter.
        ([1.0, 1.0, 1.0, 1.0], 0.25, 3),  # Dropping exactly e of the energy is allowed.
        ([1.0, 1.0, 1.0, 1.0], 0.2499, 4),
        ([2.0], 0.9, 1),
        ([0.0, 0.0, 0.0], 0.0, 1),  # All zero: rank 1 by convention.
        ([0.0, 0.0, 0.0], 0.5, 1),
        ([1.0, 1e-10], 0.0, 2),  # A value below rounding of the total is still kept at e = 0.
    )
    def test_hand_examples(self, s, energy, expected):
        self.assertEqual(pruning.energy_rank(jnp.asarray(s), energy), expected)

    def test_monotone_and_bound(self):
        rng = np.random.default_rng(0)
        for _ in range(5):
            s = rng.normal(size=12) * np.exp(rng.normal(size=12))
            s[rng.integers(12)] = 0.0
            ranks = [pruning.energy_rank(s, e) for e in np.linspace(0, 0.99, 40)]
            self.assertTrue(all(a >= b for a, b in zip(ranks, ranks[1:])))
            self.assertEqual(ranks[0], int(np.count_nonzero(s)))
            squares = np.sort(s**2)[::-1]
            for e, k in zip(np.linspace(0, 0.99, 40), ranks):
                self.assertGreaterEqual(squares[:k].sum(), (1 - e) * squares.sum() * (1 - 1e-12))
                if k > 1:  # Shortest: one fewer is not enough.
                    self.assertLess(squares[: k - 1].sum(), (1 - e) * squares.sum())

    def test_errors(self):
        for energy in (-0.1, 1.0, 1.5, float("nan")):
            with self.assertRaisesRegex(ValueError, "energy"):
                pruning.energy_rank([1.0, 2.0], energy)
        with self.assertRaisesRegex(ValueError, "s must"):
            pruning.energy_rank(np.ones((2, 2)), 0.1)
        with self.assertRaisesRegex(ValueError, "s must"):
            pruning.energy_rank([], 0.1)


def decomposed_resnet(decomposition="channel"):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)))
    model = ResNet(8, 10, in_channels=1, width=4, shortcut="B", param_dtype=jnp.float64,
                   rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):  # Running statistics away from (0, 1).
            module.mean = nnx.BatchStat(jnp.asarray(rng.normal(size=module.mean.shape)))
            module.var = nnx.BatchStat(jnp.asarray(rng.uniform(0.5, 2, size=module.var.shape)))
    model.eval()
    return svd_decompose.decompose(model, decomposition), x


class PruneTest(parameterized.TestCase):

    @parameterized.parameters(*svd.DECOMPOSITIONS)
    def test_compact_equals_masked_and_keeps_energy(self, decomposition):
        model, x = decomposed_resnet(decomposition)
        before = {path: layer.rank for path, layer in svd_decompose.svd_layers(model)}
        energy = 0.2
        compact, ranks = pruning.prune_by_energy(model, energy)
        masked = pruning.mask_by_energy(model, energy)
        # The input model is untouched.
        self.assertEqual({p: m.rank for p, m in svd_decompose.svd_layers(model)}, before)
        self.assertEqual(set(ranks), set(before))
        shrunk = 0
        for path, layer in svd_decompose.svd_layers(compact):
            self.assertEqual(layer.rank, ranks[path])
            self.assertEqual(layer.svd_u.shape[1], ranks[path])
            self.assertEqual(layer.svd_v.shape[1], ranks[path])
            self.assertLessEqual(ranks[path], before[path])
            shrunk += ranks[path] < before[path]
        self.assertGreater(shrunk, 0)
        compact_params = sum(x.size for x in jax.tree.leaves(nnx.state(compact, nnx.Param)))
        model_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        self.assertLess(compact_params, model_params)
        for path, layer in svd_decompose.svd_layers(masked):
            self.assertEqual(layer.rank, before[path])
            self.assertEqual(int(np.count_nonzero(layer.svd_s[...])), ranks[path])
        for kept in (pruning.kept_energy(model, compact), pruning.kept_energy(model, masked)):
            self.assertEqual(set(kept), set(before))
            for path, fraction in kept.items():
                self.assertGreaterEqual(fraction, 1 - energy - 1e-12, path)
                self.assertLessEqual(fraction, 1 + 1e-12)
        np.testing.assert_allclose(compact(x), masked(x), atol=1e-10)
        self.assertGreater(float(jnp.max(jnp.abs(compact(x) - model(x)))), 1e-6)

    def test_energy_zero_keeps_function(self):
        model, x = decomposed_resnet("spatial")
        compact, ranks = pruning.prune_by_energy(model, 0.0)
        for path, layer in svd_decompose.svd_layers(model):
            self.assertEqual(ranks[path], int(np.count_nonzero(layer.svd_s[...])))
        np.testing.assert_allclose(compact(x), model(x), atol=1e-10)
        np.testing.assert_allclose(pruning.mask_by_energy(model, 0.0)(x), model(x), atol=1e-12)

    def test_compact_jit_and_sorting(self):
        # Unsorted, signed s (as after training): the largest |s| are kept.
        model = svd_decompose.decompose(
            SimpleCNN(10, in_channels=1, features=(3, 4), param_dtype=jnp.float64,
                      rngs=nnx.Rngs(0)),
            init="random", rngs=nnx.Rngs(1),
        )
        layer = model.convs[1]
        layer.svd_s = nnx.Param(jnp.asarray([0.1, -3.0, 0.0, 2.0]))
        compact, ranks = pruning.prune_by_energy(model, {"convs/0": 0.0, "convs/1": 0.01,
                                                         "head": 0.5})
        self.assertEqual(ranks["convs/1"], 2)
        np.testing.assert_array_equal(compact.convs[1].svd_s[...], [-3.0, 2.0])
        np.testing.assert_array_equal(compact.convs[1].svd_u[...], layer.svd_u[...][:, [1, 3]])
        x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 1)))
        masked = pruning.mask_by_energy(model, {"convs/0": 0.0, "convs/1": 0.01, "head": 0.5})
        np.testing.assert_array_equal(masked.convs[1].svd_s[...], [0.0, -3.0, 0.0, 2.0])
        forward = nnx.jit(lambda m, x: m(x))
        np.testing.assert_allclose(forward(compact, x), masked(x), atol=1e-10)

    def test_errors(self):
        model, _ = decomposed_resnet()
        for energy in (-0.5, 1.0):
            with self.assertRaisesRegex(ValueError, "energy"):
                pruning.prune_by_energy(model, energy)
            with self.assertRaisesRegex(ValueError, "energy"):
                pruning.mask_by_energy(model, energy)
        with self.assertRaisesRegex(ValueError, "energy"):
            pruning.prune_by_energy(model, {"conv": 0.1})  # Missing paths.
        paths = {path: 0.1 for path, _ in svd_decompose.svd_layers(model)}
        with self.assertRaisesRegex(ValueError, "energy"):
            pruning.prune_by_energy(model, {**paths, "nowhere": 0.1})
        with self.assertRaisesRegex(ValueError, r"energy\['head'\]"):
            pruning.prune_by_energy(model, {**paths, "head": 2.0})
        with self.assertRaisesRegex(ValueError, "model_after"):
            pruning.kept_energy(model, SimpleCNN(10, in_channels=1, rngs=nnx.Rngs(0)))


if __name__ == "__main__":
    absltest.main()
