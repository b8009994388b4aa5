"""`train.svd_pipeline`: the four stages of SVD training, pruning and resumption."""

import dataclasses
import json
import pathlib
import shutil
import tempfile
import time

import jax
import numpy as np
from absl.testing import absltest
from flax import nnx

from tests.train import fixtures
from train import batchnorm
from train import builders
from train import checkpoint
from train import flops
from train import loop
from train import metrics
from train import model_io
from train import pruning
from train import svd_pipeline
from train.config import TrainConfig
from train.lapack_workaround import avoid_cpu_lapack_deadlock
from train.layers import svd
from train.layers import svd_decompose
from train.models.registry import build_model

avoid_cpu_lapack_deadlock()  # Effective when this file runs first in its process.

# A channel-decomposed SimpleCNN (no BatchNorm, cheap) on the 8x8 digits; stages 1 and 2 have
# the same length so that they share one compilation.
CONFIG = fixtures.SVD_SIMPLE_CNN
STAGE_STEPS = (6, 6, 3)
ENERGIES = (0.05, 0.3)
SPARSITY_WEIGHT = 0.1
EXAMPLE = np.zeros((1, 8, 8, 1), np.float32)


def _run(root, config=CONFIG, **kwargs):
    options = dict(sparsity_weight=SPARSITY_WEIGHT, energies=ENERGIES, stage_steps=STAGE_STEPS)
    options.update(kwargs)
    return svd_pipeline.run_svd_pipeline(config, root, **options)


def _numbers(result):
    """The reported numbers of every stage (what a rerun must give back unchanged)."""
    keys = ("test_error", "test_accuracy", "test_loss", "params", "flops", "ranks")
    pruned_keys = ("pruned_test_error", "pruned_test_accuracy", "pruned_test_loss",
                   "recalibrated")
    out = {k: {kk: result[k][kk] for kk in keys} for k in ("stage1", "stage2")}
    for stage in ("stage3", "stage4"):
        for e, summary in result[stage].items():
            extra = pruned_keys if stage == "stage3" else ()
            out[f"{stage}_{e}"] = {kk: summary[kk] for kk in keys + extra}
    return out


class TinyBNNet(nnx.Module):
    """conv -> BatchNorm -> relu -> strided conv -> BatchNorm -> relu -> mean -> linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(4, 8, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(axis=(1, 2)))


def _tiny_bn_model():
    return svd_decompose.decompose(
        TinyBNNet(nnx.Rngs(0)), "channel", init="random", rngs=nnx.Rngs(1)
    )


def _bn_stats(model):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.BatchStat)))]


class SVDPipelineTest(absltest.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = pathlib.Path(tempfile.mkdtemp())
        cls.root = cls.tmp / "pipeline"
        cls.result = _run(cls.root)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def test_all_stages_and_folders(self):
        result = self.result
        self.assertTrue(all(result[k]["trained"] for k in ("stage1", "stage2")))
        self.assertEqual(result["stage1"]["step"], STAGE_STEPS[0])
        self.assertEqual(result["stage2"]["step"], STAGE_STEPS[1])
        for name in ("pipeline.json", "stage1_decomposed", "stage2_sparse",
                     "stage3_prune_e0.05", "stage3_prune_e0.3",
                     "stage4_finetune_e0.05", "stage4_finetune_e0.3"):
            self.assertTrue((self.root / name).exists(), name)
        # Stage configs: λ_s only in stage 2, λ_o everywhere, a fresh schedule per stage.
        saved = {
            name: TrainConfig.load(self.root / name / checkpoint.CONFIG_FILE)
            for name in ("stage1_decomposed", "stage2_sparse", "stage4_finetune_e0.3")
        }
        self.assertEqual([c.sparsity_weight for c in saved.values()], [0.0, SPARSITY_WEIGHT, 0.0])
        self.assertEqual([c.orth_weight for c in saved.values()], [1.0, 1.0, 1.0])
        self.assertEqual([c.num_steps for c in saved.values()], [6, 6, 3])
        history2 = metrics.read_history(self.root / "stage2_sparse")
        self.assertEqual(history2[0]["step"], 3)  # Stage 2 counts its own steps from 0.
        self.assertIn("sparsity", history2[0])
        # Full rank before pruning: every SVD layer of the decomposed SimpleCNN.
        model = build_model(CONFIG, 10, 1)
        full = {path: layer.max_rank for path, layer in svd_decompose.svd_layers(model)}
        self.assertEqual(result["stage1"]["ranks"], full)
        self.assertEqual(result["stage1"]["params"], flops.count_params(model))
        self.assertEqual(result["stage1"]["flops"], flops.count_flops(model, EXAMPLE))

    def test_compact_models_are_smaller(self):
        full = self.result["stage2"]
        previous = full
        for e in ENERGIES:  # Increasing energy: never larger.
            pruned, tuned = self.result["stage3"][e], self.result["stage4"][e]
            self.assertEqual(pruned["energy"], e)
            self.assertEqual(pruned["ranks"], tuned["ranks"])
            self.assertEqual((pruned["params"], pruned["flops"]), (tuned["params"], tuned["flops"]))
            self.assertTrue(all(pruned["ranks"][p] <= full["ranks"][p] for p in full["ranks"]))
            self.assertLessEqual(pruned["params"], previous["params"])
            self.assertLessEqual(pruned["flops"], previous["flops"])
            previous = pruned
        self.assertLess(self.result["stage3"][0.3]["params"], full["params"])
        self.assertLess(self.result["stage3"][0.3]["flops"], full["flops"])
        self.assertEqual(self.result["stage4"][0.3]["step"], STAGE_STEPS[2])

    def test_pruned_error_equals_masked_error(self):
        stage2, _, _ = model_io.restore_model(
            self.root / "stage2_sparse", model=build_model(CONFIG, 10, 1),
            example_input=EXAMPLE,
        )
        test = builders.build_data(CONFIG)[1]
        for e in ENERGIES:
            masked = pruning.mask_by_energy(stage2, e)
            error = model_io.evaluate_model(masked, CONFIG, test, EXAMPLE)["error"]
            summary = self.result["stage3"][e]
            self.assertAlmostEqual(error, summary["pruned_test_error"], places=12)
            # No BatchNorm in the SimpleCNN: nothing to recalibrate, the saved model is the
            # pruned one.
            self.assertFalse(summary["recalibrated"])
            self.assertEqual(summary["test_error"], summary["pruned_test_error"])
            # The saved compact model is rebuilt from ranks.json and restored.
            ranks = json.loads((self.root / f"stage3_prune_e{e:g}" / "ranks.json").read_text())
            self.assertEqual(ranks, self.result["stage3"][e]["ranks"])
            compact, _, meta = model_io.restore_model(
                self.root / f"stage3_prune_e{e:g}",
                model=pruning.rebuild_pruned(build_model(CONFIG, 10, 1), ranks),
                example_input=EXAMPLE,
            )
            self.assertEqual(meta["step"], 0)
            self.assertEqual(pruning.svd_ranks(compact), ranks)
            self.assertEqual(
                model_io.evaluate_model(compact, CONFIG, test, EXAMPLE)["error"],
                self.result["stage3"][e]["test_error"],
            )

    def test_rerun_reads_back_without_training(self):
        start = time.perf_counter()
        again = _run(self.root)
        elapsed = time.perf_counter() - start
        self.assertEqual(_numbers(again), _numbers(self.result))
        self.assertFalse(again["stage1"]["trained"] or again["stage2"]["trained"])
        self.assertFalse(any(s["trained"] for s in again["stage3"].values()))
        self.assertFalse(any(s["trained"] for s in again["stage4"].values()))
        self.assertLess(elapsed, 20.0)  # Loads the data only: no model, no compilation.
        # A new energy adds its stage 3/4 folders and reuses stages 1 and 2.
        more = _run(self.root, energies=(0.3, 0.5))
        self.assertFalse(more["stage2"]["trained"] or more["stage3"][0.3]["trained"])
        self.assertTrue(more["stage3"][0.5]["trained"] and more["stage4"][0.5]["trained"])
        self.assertLessEqual(more["stage3"][0.5]["params"], more["stage3"][0.3]["params"])

    def test_different_setup_on_the_same_root_raises(self):
        with self.assertRaisesRegex(ValueError, "config.lr"):
            _run(self.root, config=dataclasses.replace(CONFIG, lr=0.5))
        with self.assertRaisesRegex(ValueError, "sparsity_weight"):
            _run(self.root, sparsity_weight=0.2)
        with self.assertRaisesRegex(ValueError, "stage_steps"):
            _run(self.root, stage_steps=(6, 6, 4))
        with self.assertRaisesRegex(ValueError, "recalibration_batches"):
            _run(self.root, recalibration_batches=5)
        # Resumable changes (progress, checkpointing) are allowed.
        _run(self.root, config=dataclasses.replace(CONFIG, max_to_keep=3))
        foreign = self.tmp / "foreign"
        foreign.mkdir()
        (foreign / "notes.txt").write_text("x")
        with self.assertRaisesRegex(ValueError, "root="):
            _run(foreign)

    def test_interrupted_stage_resumes_bit_identically(self):
        # A copy of the finished stage 1, then stage 2 stopped after 4 of its 6 steps.
        root = self.tmp / "interrupted"
        root.mkdir()
        shutil.copy(self.root / "pipeline.json", root / "pipeline.json")
        shutil.copytree(self.root / "stage1_decomposed", root / "stage1_decomposed")
        configs = svd_pipeline.stage_configs(CONFIG, SPARSITY_WEIGHT, STAGE_STEPS)
        start, _, _ = model_io.restore_model(
            root / "stage1_decomposed", model=build_model(CONFIG, 10, 1),
            example_input=EXAMPLE,
        )
        first = loop.train_and_evaluate(
            configs["stage2"], root / "stage2_sparse", until_step=4, model=start
        )
        self.assertIsNone(first["test_error"])
        result = _run(root, energies=(0.3,))
        self.assertFalse(result["stage1"]["trained"])
        self.assertTrue(result["stage2"]["trained"])
        expected = _numbers(self.result)
        self.assertEqual(_numbers(result)["stage2"], expected["stage2"])
        self.assertEqual(_numbers(result)["stage4_0.3"], expected["stage4_0.3"])

    def test_argument_errors(self):
        root = self.tmp / "errors"
        with self.assertRaisesRegex(ValueError, "config.decomposition"):
            _run(root, config=dataclasses.replace(CONFIG, decomposition=None))
        with self.assertRaisesRegex(ValueError, "sparsity_weight"):
            _run(root, sparsity_weight=0.0)
        with self.assertRaisesRegex(ValueError, "energies"):
            _run(root, energies=(0.1, 1.0))
        with self.assertRaisesRegex(ValueError, "energies"):
            _run(root, energies=())
        with self.assertRaisesRegex(ValueError, "stage_steps"):
            _run(root, stage_steps=(1, 2))
        for bad in (-1, 1.5, True):
            with self.assertRaisesRegex(ValueError, "recalibration_batches"):
                _run(root, recalibration_batches=bad)
        self.assertFalse(root.exists())  # Checked before anything is written.

    def test_rebuild_pruned_checks_ranks(self):
        model = build_model(CONFIG, 10, 1)
        with self.assertRaisesRegex(ValueError, "not SVD layers"):
            pruning.rebuild_pruned(model, {"nope": 1})
        with self.assertRaisesRegex(ValueError, "ranks"):
            pruning.rebuild_pruned(model, {"head": 99})
        small = pruning.rebuild_pruned(model, {"head": 2})
        self.assertEqual(pruning.svd_ranks(small)["head"], 2)
        self.assertEqual(pruning.svd_ranks(model)["head"], 8)  # The input is unchanged.
        self.assertIsInstance(small.head, svd.SVDDense)
        self.assertEqual(nnx.state(small.head, nnx.Param)["svd_u"].shape, (8, 2))


class BatchNormRecalibrationTest(absltest.TestCase):
    """Stage 3 on a model with BatchNorm: the pruned model's statistics are re-estimated."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = pathlib.Path(tempfile.mkdtemp())
        cls.root = cls.tmp / "bn"
        cls.train, cls.test = builders.build_data(CONFIG)[:2]
        cls.result = _run(cls.root, energies=(0.3,), model=_tiny_bn_model(),
                          train_data=cls.train, test_data=cls.test)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def _restore(self, name, ranks=None):
        template = _tiny_bn_model()
        if ranks is not None:
            template = pruning.rebuild_pruned(template, ranks)
        model, _, _ = model_io.restore_model(
            self.root / name, model=template, example_input=EXAMPLE
        )
        return model

    def test_pruned_and_recalibrated_errors_compare_like_with_like(self):
        summary = self.result["stage3"][0.3]
        self.assertTrue(summary["recalibrated"])
        stage2 = self._restore("stage2_sparse")
        masked = pruning.mask_by_energy(stage2, 0.3)
        # Pruned, stage 2's statistics: the masked model with stage 2's statistics.
        error = model_io.evaluate_model(masked, CONFIG, self.test, EXAMPLE)["error"]
        self.assertAlmostEqual(error, summary["pruned_test_error"], places=12)
        # Pruned + recalibrated: the masked model recalibrated on the same training batches.
        masked_recal = batchnorm.recalibrate_batch_stats(masked, self.train)
        error = model_io.evaluate_model(masked_recal, CONFIG, self.test, EXAMPLE)["error"]
        self.assertAlmostEqual(error, summary["test_error"], places=12)
        # The saved compact model holds the recalibrated statistics (one epoch of batches).
        compact = self._restore("stage3_prune_e0.3", summary["ranks"])
        for saved, expected in zip(_bn_stats(compact), _bn_stats(masked_recal)):
            np.testing.assert_allclose(saved, expected, rtol=1e-5, atol=1e-6)
        for saved, old in zip(_bn_stats(compact), _bn_stats(stage2)):
            self.assertFalse(np.allclose(saved, old))
        self.assertEqual(model_io.evaluate_model(compact, CONFIG, self.test, EXAMPLE)["error"],
                         summary["test_error"])
        self.assertEqual(self.result["stage4"][0.3]["step"], STAGE_STEPS[2])

    def test_no_recalibration(self):
        # Stages 1 and 2 copied, the record rewritten for recalibration_batches=0.
        root = self.tmp / "off"
        root.mkdir()
        for name in ("stage1_decomposed", "stage2_sparse"):
            shutil.copytree(self.root / name, root / name)
        record = json.loads((self.root / "pipeline.json").read_text())
        self.assertEqual(record["recalibration_batches"], "one epoch")
        record["recalibration_batches"] = 0
        (root / "pipeline.json").write_text(json.dumps(record))
        result = _run(root, energies=(0.3,), model=_tiny_bn_model(), train_data=self.train,
                      test_data=self.test, recalibration_batches=0)
        summary, recal = result["stage3"][0.3], self.result["stage3"][0.3]
        self.assertFalse(summary["recalibrated"])
        self.assertEqual(summary["test_error"], summary["pruned_test_error"])
        self.assertEqual(summary["pruned_test_error"], recal["pruned_test_error"])
        compact = pruning.rebuild_pruned(_tiny_bn_model(), summary["ranks"])
        compact, _, _ = model_io.restore_model(root / "stage3_prune_e0.3", model=compact,
                                           example_input=EXAMPLE)
        for saved, old in zip(_bn_stats(compact), _bn_stats(self._restore("stage2_sparse"))):
            np.testing.assert_array_equal(saved, old)


if __name__ == "__main__":
    absltest.main()
