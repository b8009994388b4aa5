"""`train.models.registry`: every model the loop builds, rebuilt from a run's config.json."""

import dataclasses
import pathlib
import shutil
import tempfile

import jax
import numpy as np
from absl.testing import absltest
from flax import nnx

from tests.train import fixtures
from train import loop
from train import model_io
from train.config import TrainConfig
from train.lapack_workaround import avoid_cpu_lapack_deadlock
from train.models import garipov
from train.models import registry
from train.models import resnet

avoid_cpu_lapack_deadlock()  # Effective when this file runs first in its process.

# A tiny Garipov conv net with TT conv layers 2-3 on 16x16 digits (image_pad=4), as the TT
# experiment builds them.
NET, TT, CONFIG = fixtures.GARIPOV_NET, fixtures.GARIPOV_TT, fixtures.GARIPOV_TT_CONFIG


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


class RegistryTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.root = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

    def test_names_and_errors(self):
        self.assertEqual(
            registry.model_names(), ("garipov", "lipresnet", "resnet<int>", "simple_cnn"))
        with self.assertRaisesRegex(ValueError, "model='vgg16'"):
            registry.build_model(TrainConfig(model="vgg16"), 10, 1)
        with self.assertRaisesRegex(ValueError, "depth=9"):
            registry.build_model(TrainConfig(model="resnet9"), 10, 1)
        with self.assertRaisesRegex(ValueError, "already registered"):
            registry.register_model("garipov")(lambda *a: None)

    def test_builds_what_the_constructors_build(self):
        config = TrainConfig(model="resnet8", width=4, seed=3)
        built = registry.build_model(config, 10, 1)
        direct = resnet.ResNet(8, 10, in_channels=1, width=4, rngs=nnx.Rngs(3))
        for a, b in zip(_leaves(built), _leaves(direct), strict=True):
            np.testing.assert_array_equal(a, b)
        built = registry.build_model(CONFIG, 10, 1)
        direct = garipov.GaripovNet(**NET, **TT, in_channels=1, input_shape=(16, 16),
                                    rngs=nnx.Rngs(0))
        for a, b in zip(_leaves(built), _leaves(direct), strict=True):
            np.testing.assert_array_equal(a, b)

    def test_restore_model_rebuilds_a_garipov_run(self):
        # Trained from a TT-SVD of a dense net (decompose_tt), as the experiment's decomposed
        # rows are: the registry's GaripovNet(**model_kwargs) has the same structure.
        dense = registry.build_model(dataclasses.replace(CONFIG, model_kwargs=NET), 10, 1)
        model = garipov.decompose_tt(dense, **TT)
        result = loop.train_and_evaluate(CONFIG, self.root / "run", model=model)
        restored, config, meta = model_io.restore_model(self.root / "run")
        self.assertEqual(config, CONFIG)
        self.assertEqual(meta["step"], 2)
        self.assertIsInstance(restored, garipov.GaripovNet)
        for a, b in zip(_leaves(result["model"]), _leaves(restored), strict=True):
            np.testing.assert_array_equal(a, b)


if __name__ == "__main__":
    absltest.main()
