"""`train.certified_accuracy` against brute force on linear classifiers (exact constant ||W||_2):
the exact distance to every decision boundary and a PGD attack in the ℓ2 ball."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx

import train
from train import robustness

D, K, N = 6, 4, 400


def _linear_problem(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((D, K))
    b = rng.standard_normal(K) * 0.1
    x = rng.standard_normal((N, D))
    # Labels: the classifier's own prediction, flipped for 15% of the points (errors).
    y = np.argmax(x @ w + b, axis=1)
    flip = rng.uniform(size=N) < 0.15
    y[flip] = (y[flip] + 1) % K
    return w, b, x, y


def _boundary_distances(w, b, x, y):
    """Exact ℓ2 distance from each x to the set where some class j ties or beats y."""
    dist = np.full(len(x), np.inf)
    for j in range(K):
        d = w[:, y] - w[:, [j]]  # (D, N)
        gap = np.einsum("nd,dn->n", x, d) + b[y] - b[j]
        norm = np.linalg.norm(d, axis=0)
        dist = np.where(y == j, dist, np.minimum(dist, gap / np.where(norm > 0, norm, 1)))
    return dist  # Negative when misclassified.


def _pgd(apply, x, y, eps, target, steps=20):
    """Targeted ℓ2 PGD (normalised gradient steps, projection on the ball) maximising
    ``f_target - f_y``; returns the attacked points."""

    def loss(delta):
        logits = apply(x + delta)
        true = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
        return jnp.sum(logits[:, target] - true)

    grad = jax.jit(jax.grad(loss))
    delta = np.random.default_rng(target).standard_normal(x.shape) * 1e-3
    for _ in range(steps):
        g = np.array(grad(jnp.asarray(delta)))
        g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        delta = delta + 0.25 * eps * g
        norm = np.linalg.norm(delta, axis=1, keepdims=True)
        delta = delta * np.minimum(1.0, eps / np.maximum(norm, 1e-12))
    return x + delta


def _fooled(apply, x, y, eps):
    """Points that some targeted PGD attack in the ε ball misclassifies."""
    fooled = np.zeros(len(y), bool)
    for target in range(K):
        adv = _pgd(apply, jnp.asarray(x), jnp.asarray(y), eps, target)
        fooled |= np.argmax(np.asarray(apply(jnp.asarray(adv))), axis=1) != y
    return fooled


class CertifiedAccuracyTest(absltest.TestCase):

    def test_linear_model_against_exact_margins_and_pgd(self):
        w, b, x, y = _linear_problem()
        lipschitz = float(np.linalg.norm(w, 2))  # Exact constant of x -> x W + b.

        def apply(z):
            return z @ jnp.asarray(w) + jnp.asarray(b)

        radii = np.array([0.0, 0.05, 0.2, 0.5])
        acc = robustness.certified_accuracy(apply, (x, y), radii, lipschitz=lipschitz)
        self.assertEqual(acc.shape, (4,))
        self.assertTrue(np.all(np.diff(acc) <= 0))
        distances = _boundary_distances(w, b, x, y)
        np.testing.assert_allclose(acc[0], np.mean(distances > 0))  # Clean accuracy.
        radius = robustness.certified_radii(np.asarray(apply(x)), y, lipschitz)
        for eps, a in zip(radii[1:], acc[1:]):
            certified = radius > eps
            self.assertAlmostEqual(a, certified.mean())
            self.assertGreater(certified.sum(), 20)  # Not vacuous.
            # (b) Exact: every certified point is farther than eps from every boundary.
            self.assertTrue(np.all(distances[certified] > eps))
            # (a) Attack: PGD in the eps ball misclassifies no certified point...
            fooled = _fooled(apply, x, y, eps)
            self.assertFalse(np.any(fooled & certified))
            # ...and does fool the correctly classified points the exact formula says it can
            # (the attack is strong enough for the check to mean something).
            breakable = (distances > 0) & (distances < 0.9 * eps)
            self.assertTrue(np.all(fooled[breakable]))
            # The certificate is sound but not exact: certified <= exactly robust.
            self.assertLessEqual(certified.sum(), np.sum(distances > eps))

    def test_two_class_certificate_is_exact(self):
        # K = 2: f_0 - f_1 = (w_0 - w_1) x has constant ||w_0 - w_1|| = sqrt(2) ||W||_2 when
        # w_1 = -w_0, so the certified radius equals the exact distance.
        w = np.array([[1.0, -1.0], [2.0, -2.0]])
        x = np.random.default_rng(0).standard_normal((50, 2))
        y = (x @ w[:, 0] < 0).astype(int)
        radius = robustness.certified_radii(x @ w, y, float(np.linalg.norm(w, 2)))
        np.testing.assert_allclose(radius, np.abs(x @ w[:, 0]) / math.sqrt(5.0), rtol=1e-12)

    def test_nnx_module_and_scalar_eps(self):
        model = nnx.Linear(D, K, rngs=nnx.Rngs(0))
        w, b = np.asarray(model.kernel[...]), np.asarray(model.bias[...])
        _, _, x, y = _linear_problem(1)
        x = x.astype(np.float32)
        lipschitz = float(np.linalg.norm(w, 2))
        acc = train.certified_accuracy(model, (x, y), 0.1, lipschitz=lipschitz, batch_size=64)
        self.assertIsInstance(acc, float)
        margin = robustness.margins(x @ w + b, y)
        self.assertAlmostEqual(acc, np.mean(margin > math.sqrt(2) * 0.1 * lipschitz), places=6)

    def test_bad_arguments(self):
        x, y = np.zeros((2, 3)), np.array([0, 1])
        with self.assertRaisesRegex(ValueError, "lipschitz=None"):
            train.certified_accuracy(lambda z: z, (x, y), 0.1, lipschitz=None)
        with self.assertRaisesRegex(ValueError, "eps="):
            train.certified_accuracy(lambda z: z, (x, y), -0.1, lipschitz=1.0)
        with self.assertRaisesRegex(ValueError, "labels must lie"):
            train.certified_accuracy(lambda z: z, (x, np.array([0, 3])), 0.1, lipschitz=1.0)
        with self.assertRaisesRegex(ValueError, "model_or_apply"):
            train.certified_accuracy(3, (x, y), 0.1, lipschitz=1.0)


if __name__ == "__main__":
    absltest.main()
