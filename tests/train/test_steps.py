"""Tests for train/steps.py: the loss of :class:`train.config.LossConfig`."""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

from train import steps as steps_lib
from train.config import TrainConfig


def _reference(logits, labels, mask, temperature, margin):
    z = np.asarray(logits, np.float64).copy()
    z[np.arange(len(labels)), labels] -= margin
    z *= temperature
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -logp[np.arange(len(labels)), labels]
    correct = (np.argmax(logits, -1) == labels).astype(np.float64)
    return (ce * mask).sum(), (correct * mask).sum(), mask.sum()


class LossTest(parameterized.TestCase):

    @parameterized.parameters((1.0, 0.0), (16.0, 0.0), (1.0, 0.3), (8.0, 0.25))
    def test_scaled_offset_cross_entropy(self, temperature, margin):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(6, 5)).astype(np.float32)
        labels = rng.integers(0, 5, size=6)
        mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
        got = steps_lib._cross_entropy_sums(logits, labels, mask, temperature, margin)
        want = _reference(logits, labels, mask, temperature, margin)
        np.testing.assert_allclose([float(g) for g in got], want, rtol=2e-5)

    def test_margin_does_not_change_accuracy(self):
        # A point whose true logit leads by less than the margin is still correct.
        logits = np.array([[1.0, 0.9, 0.0]], np.float32)
        labels = np.array([0])
        mask = np.ones(1, np.float32)
        _, correct, _ = steps_lib._cross_entropy_sums(logits, labels, mask, 4.0, 0.5)
        self.assertEqual(float(correct), 1.0)

    def test_eval_step_uses_config_loss(self):
        class Linear(nnx.Module):
            def __init__(self):
                self.dense = nnx.Linear(4, 3, rngs=nnx.Rngs(0))

            def __call__(self, x):
                return self.dense(x.reshape(x.shape[0], -1))

        image = np.random.default_rng(1).normal(size=(5, 2, 2, 1)).astype(np.float32)
        label = np.array([0, 1, 2, 0, 1])
        mask = np.ones(5, np.float32)
        losses = []
        for loss in ({}, {"temperature": 3.0, "margin": 0.2}):
            model = Linear()
            config = TrainConfig(loss=loss, model="resnet8")
            specs, graphdef, graphdef_eval, params, rest = steps_lib.split_model(model, image)
            steps = steps_lib.make_steps(graphdef, graphdef_eval, specs, config)
            sums = {k: np.zeros((), np.float32) for k in ("loss", "correct", "count")}
            sums = steps.eval_step(params, rest, image, label, mask, sums)
            logits = np.asarray(model(image))
            want = _reference(logits, label, mask, config.loss.temperature, config.loss.margin)
            np.testing.assert_allclose(float(sums["loss"]), want[0], rtol=2e-5)
            losses.append(float(sums["loss"]))
        self.assertNotAlmostEqual(losses[0], losses[1], places=3)


if __name__ == "__main__":
    absltest.main()
