"""`train.loop`: loss decreases on digits, bit-identical resume, run folders, CSV, config."""

import csv
import dataclasses
import json
import pathlib
import shutil
import tempfile

import jax
import numpy as np
from absl.testing import absltest
from flax import nnx

import spectra
from tests.spectra import layers
from tests.train import fixtures
from train import builders
from train import checkpoint
from train import discovery
from train import loop
from train import metrics
from train import model_io
from train import optim
from train import steps as steps_lib
from train.batchnorm import recalibrate_batch_stats
from train.config import TrainConfig
from train.config import apply_overrides
from train.lapack_workaround import avoid_cpu_lapack_deadlock
from train.models.registry import build_model

avoid_cpu_lapack_deadlock()  # Effective when this file runs first in its process.

# A small ResNet-8 (BatchNorm: the state has running statistics) on 12x12 digits. Every test
# uses the same step-relevant fields, so the jitted steps compile once per test process.
CONFIG = fixtures.RESNET8


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


class LoopTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.root = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

    def test_training_reduces_loss_and_writes_csv(self):
        result = loop.train_and_evaluate(CONFIG, self.root / "run")
        history = result["history"]
        losses = [row["loss"] for row in history if "loss" in row]
        self.assertLen(losses, 3)  # Means over steps 1-4, 5-8, 9-12.
        self.assertLess(losses[-1], losses[0] - 0.1)
        self.assertEqual(result["test_count"], 359)  # Every test example counted once.
        self.assertAlmostEqual(result["test_error"], 1 - result["test_accuracy"])
        # CSV: header with one σ_max column per conv; σ rows at steps 6 and 12.
        with (self.root / "run" / metrics.METRICS_FILE).open() as f:
            rows = list(csv.DictReader(f))
        names = sorted(result["sigma_max"])
        self.assertLen(names, 7)  # Stem + 3 blocks of 2 convs (shortcut option A).
        self.assertEqual([r["step"] for r in rows], ["4", "6", "8", "12"])
        self.assertEqual([bool(r[f"sigma/{names[0]}"]) for r in rows], [False, True, False, True])
        self.assertEqual([bool(r["loss"]) for r in rows], [True, False, True, True])
        self.assertNotEqual(rows[-1]["test_accuracy"], "")
        self.assertTrue((self.root / "run" / checkpoint.CONFIG_FILE).exists())
        self.assertEqual(result["certification"], {"certified": False})  # No projection.
        # TensorBoard: the same scalars, read back from the event file.
        from tensorboard.backend.event_processing import event_accumulator

        events = event_accumulator.EventAccumulator(str(self.root / "run" / "tensorboard"))
        events.Reload()
        self.assertEqual([e.step for e in events.Scalars("loss")], [4, 8, 12])
        self.assertIn(f"sigma/{names[0]}", events.Tags()["scalars"])

    def test_sigma_max_is_exact(self):
        result = loop.train_and_evaluate(CONFIG, self.root / "run")
        model, specs = result["model"], result["specs"]
        kernel = np.asarray(model.conv.kernel[...], np.float64)
        dense = np.asarray(spectra.dense_operator(kernel, specs["conv"]["kernel"]))
        expected = layers.exact_sigma_max(dense)
        np.testing.assert_allclose(result["sigma_max"]["conv.kernel"], expected, rtol=1e-5)

    def test_resume_is_bit_identical(self):
        # Projection every 5 steps and the penalty on: their states must survive the restart.
        config = dataclasses.replace(
            CONFIG, project_max_norm=2.0, project_every=5, penalty_weight=1e-3
        )
        straight = loop.train_and_evaluate(config, self.root / "straight")
        first = loop.train_and_evaluate(config, self.root / "resumed", until_step=7)
        self.assertIsNone(first["test_error"])
        self.assertEqual(first["step"], 7)
        resumed = loop.train_and_evaluate(config, self.root / "resumed", resume=True)
        self.assertEqual(resumed["step"], 12)
        for a, b in zip(_params(straight["model"]), _params(resumed["model"]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

        def strip(history):
            return [{k: v for k, v in r.items() if k != "step_time_s"} for r in history]

        self.assertEqual(strip(straight["history"]), strip(resumed["history"]))
        self.assertEqual(straight["test_accuracy"], resumed["test_accuracy"])
        self.assertEqual(straight["sigma_max"], resumed["sigma_max"])
        # The projection ran at step 11: the exact σ_max moved little in the one step after.
        self.assertLessEqual(max(straight["sigma_max"].values()), 2.0 * 1.1)
        restored, saved_config, meta = model_io.restore_model(
            self.root / "resumed", model=build_model(config, 10, 1),
            example_input=np.zeros((1, 12, 12, 1), np.float32),
        )
        self.assertEqual(saved_config, config)
        self.assertEqual(meta["step"], 12)
        for a, b in zip(_params(straight["model"]), _params(restored), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def test_run_dir_is_never_overwritten(self):
        config = CONFIG
        run = self.root / "run"
        loop.train_and_evaluate(config, run, until_step=1)
        with self.assertRaisesRegex(FileExistsError, "resume=True"):
            loop.train_and_evaluate(config, run)
        with self.assertRaisesRegex(ValueError, "lr"):
            loop.train_and_evaluate(dataclasses.replace(config, lr=0.5), run, resume=True)
        with self.assertRaisesRegex(FileNotFoundError, "no checkpoint"):
            loop.train_and_evaluate(config, self.root / "other", resume=True)
        first, second = checkpoint.make_run_dir(self.root), checkpoint.make_run_dir(self.root)
        self.assertEqual((first.name, second.name), ("run_000", "run_001"))

    def test_schedules_and_adam(self):
        config = dataclasses.replace(
            CONFIG, num_steps=100, schedule="piecewise", boundaries=(0.5, 0.75), warmup_steps=10
        )
        schedule = optim.learning_rate_schedule(config)
        np.testing.assert_allclose(
            [float(schedule(s)) for s in (0, 5, 10, 49, 50, 74, 75, 99)],
            [0.0, 0.05, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6,
        )
        cosine = optim.learning_rate_schedule(dataclasses.replace(CONFIG, num_steps=100))
        np.testing.assert_allclose([float(cosine(0)), float(cosine(100))], [0.1, 0.0], atol=1e-7)
        params = {"w": np.ones((3, 3, 1, 1), np.float32), "b": np.ones((1,), np.float32)}
        tx = optim.make_optimizer(dataclasses.replace(CONFIG, optimizer="adam", weight_decay=0.1))
        updates, _ = tx.update(params, tx.init(params), params)
        # Adam's first step is -lr * sign(g); weight decay (0.1 w) only on the 4-D kernel.
        np.testing.assert_allclose(updates["w"], -0.1 * np.ones((3, 3, 1, 1)), rtol=1e-4)
        np.testing.assert_allclose(updates["b"], -0.1 * np.ones(1), rtol=1e-4)

    def test_overrides(self):
        config = apply_overrides(
            TrainConfig(),
            ["--config.lr=0.05", "nesterov=true", "project_max_norm=none",
             "boundaries=0.3,0.6", "model=resnet8"],
        )
        self.assertEqual(
            (config.lr, config.nesterov, config.project_max_norm, config.boundaries,
             config.model),
            (0.05, True, None, (0.3, 0.6), "resnet8"),
        )
        with self.assertRaisesRegex(ValueError, "not a TrainConfig field"):
            apply_overrides(TrainConfig(), ["learning_rate=0.1"])
        with self.assertRaisesRegex(ValueError, "optimizer"):
            apply_overrides(TrainConfig(), ["optimizer=lion"])
        with self.assertRaisesRegex(ValueError, "project_method"):
            apply_overrides(TrainConfig(), ["project_method=clip"])
        self.assertEqual(
            apply_overrides(TrainConfig(), ["project_method=power"]).project_method, "power"
        )
        hybrid = apply_overrides(
            TrainConfig(), ["project_certify_every=100", "project_certify_method=certified"]
        )
        self.assertEqual(
            (hybrid.project_certify_every, hybrid.project_certify_method), (100, "certified")
        )
        self.assertIsNone(
            apply_overrides(hybrid, ["project_certify_every=none"]).project_certify_every
        )
        for bad in (dict(project_certify_every=0), dict(project_certify_every=True),
                    dict(project_certify_method="power"),
                    dict(project_certify_recalibration_batches=-1),
                    dict(project_certify_recalibration_batches=2.0)):
            with self.assertRaisesRegex(ValueError, next(iter(bad))):
                TrainConfig(**bad)
        self.assertEqual(TrainConfig.from_json(config.to_json()), config)

    def test_step_cache_key_is_derived_from_the_config(self):
        model = build_model(CONFIG, 10, 1)
        specs, graphdef_train, graphdef_eval, _, _ = steps_lib.split_model(
            model, np.zeros((1, 12, 12, 1), np.float32)
        )

        def steps(**changes):
            config = dataclasses.replace(CONFIG, **changes)
            return steps_lib.make_steps(graphdef_train, graphdef_eval, specs, config)

        # Traced values (peak lr, λ, c) and fields no step reads share the compiled steps.
        self.assertIs(steps(), steps(lr=0.5, seed=3, log_every=1, batch_size=16))
        self.assertIs(steps(penalty_weight=1e-3), steps(penalty_weight=0.5))
        self.assertIs(steps(project_max_norm=1.0), steps(project_max_norm=2.0))
        # Their on/off pattern and every other field change the program.
        self.assertIsNot(steps(), steps(penalty_weight=1e-3))
        self.assertIsNot(steps(), steps(project_max_norm=1.0))
        # The certified rescale every k updates (and its method) is part of the program.
        hybrid = dict(project_max_norm=1.0, project_method="power", project_certify_every=5)
        self.assertIsNot(steps(**hybrid), steps(**{**hybrid, "project_certify_every": None}))
        self.assertIsNot(steps(**hybrid), steps(**hybrid, project_certify_method="certified"))
        self.assertIs(steps(**hybrid), steps(**{**hybrid, "project_max_norm": 3.0}))
        for change in (dict(momentum=0.5), dict(num_steps=13), dict(weight_decay=0.0),
                       dict(sigma_method="dense"), dict(penalty_reduce="max")):
            self.assertIsNot(steps(), steps(**change), change)
        names = set(CONFIG.flat())  # Flat names (train.config.FLAT_NAMES) and top-level ones.
        self.assertContainsSubset(steps_lib.TRACED_FIELDS + steps_lib.UNUSED_FIELDS, names)
        # The traced peak learning rate lives in the optimiser state.
        state = steps_lib.init_train_state(
            dataclasses.replace(CONFIG, lr=0.25), specs, *steps_lib.split_model(
                model, np.zeros((1, 12, 12, 1), np.float32))[3:]
        )
        self.assertEqual(float(state.opt_state.hyperparams[optim.LEARNING_RATE]), 0.25)

    def test_command_line(self):
        from train import cli

        run = self.root / "cli"
        overrides = ["dataset=digits", "model=resnet8", "width=8", "image_pad=2",
                     "batch_size=64", "eval_batch_size=128", "num_steps=12", "--config.lr=0.1",
                     "log_every=4", "sigma_every=6", "progress=false"]
        cli.main(["--run-dir", str(run), *overrides])
        saved = TrainConfig.load(run / checkpoint.CONFIG_FILE)
        self.assertEqual(saved, dataclasses.replace(CONFIG, lr=0.1))
        self.assertEqual([r["step"] for r in metrics.read_history(run)], [4, 6, 8, 12])
        with self.assertRaisesRegex(ValueError, "not a TrainConfig field"):
            cli.main(["--run-dir", str(self.root / "bad"), "learning_rate=1"])

    def test_command_line_resume_uses_the_saved_config(self):
        from train import cli

        # A run started with overrides (model, width, ... differ from the defaults), preempted
        # after its step-8 checkpoint: the step-12 checkpoint and its metric rows are lost.
        run = self.root / "cli"
        overrides = ["dataset=digits", "model=resnet8", "width=8", "image_pad=2",
                     "batch_size=64", "eval_batch_size=128", "num_steps=12", "lr=0.1",
                     "log_every=4", "sigma_every=6", "progress=false", "checkpoint_every=4"]
        cli.main(["--run-dir", str(run), *overrides])
        example = np.zeros((1, 12, 12, 1), np.float32)
        straight, _, _ = model_io.restore_model(run, example_input=example)
        history = metrics.read_history(run)
        shutil.rmtree(run / checkpoint.CHECKPOINT_DIR / "12")
        # Resume without retyping the overrides: config.json, then bit-identical steps 9-12.
        cli.main(["--run-dir", str(run), "--resume"])
        resumed, saved, meta = model_io.restore_model(run, example_input=example)
        self.assertEqual((saved, meta["step"]), (dataclasses.replace(CONFIG, checkpoint_every=4),
                                                 12))
        for a, b in zip(_params(straight), _params(resumed), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

        def strip(rows):
            return [{k: v for k, v in r.items() if k != "step_time_s"} for r in rows]

        self.assertEqual(strip(metrics.read_history(run)), strip(history))
        # Extend the finished run: steps 13-16 follow the cosine rebuilt for num_steps=16.
        cli.main(["--run-dir", str(run), "--resume", "num_steps=16", "eval_every=2"])
        self.assertEqual(TrainConfig.load(run / checkpoint.CONFIG_FILE).num_steps, 16)
        rows = {int(r["step"]): r for r in metrics.read_history(run)}
        self.assertEqual(max(rows), 16)
        self.assertIn("test_accuracy", rows[14])  # The new eval_every.
        old = optim.learning_rate_schedule(CONFIG)
        new = optim.learning_rate_schedule(dataclasses.replace(CONFIG, num_steps=16))
        self.assertAlmostEqual(rows[12]["lr"], float(old(11)), places=6)
        self.assertAlmostEqual(rows[16]["lr"], float(new(15)), places=6)
        self.assertGreater(rows[16]["lr"], 0.0)  # Not the finished cosine's 0.
        self.assertEqual(model_io.restore_model(run, example_input=example)[2]["step"], 16)
        # Fields that change the run may not change; the message names field and values.
        with self.assertRaisesRegex(ValueError, r"lr: saved 0\.1, given 0\.5"):
            cli.main(["--run-dir", str(run), "--resume", "lr=0.5", "num_steps=20"])
        with self.assertRaisesRegex(ValueError, "num_steps=12 is below the step 16"):
            cli.main(["--run-dir", str(run), "--resume", "num_steps=12"])
        with self.assertRaisesRegex(ValueError, "--resume needs --run-dir"):
            cli.main(["--resume"])

    def test_num_steps_extension_of_a_constant_schedule_is_a_longer_run(self):
        # The schedule is rebuilt for the new num_steps: with one that does not depend on it,
        # 8 steps extended to 12 are the 12-step run, bit for bit.
        config = dataclasses.replace(CONFIG, schedule="constant", num_steps=8)
        longer = dataclasses.replace(config, num_steps=12)
        loop.train_and_evaluate(config, self.root / "run")
        extended = loop.train_and_evaluate(longer, self.root / "run", resume=True)
        straight = loop.train_and_evaluate(longer, self.root / "straight")
        self.assertEqual(extended["step"], 12)
        for a, b in zip(_params(straight["model"]), _params(extended["model"]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        self.assertEqual(extended["test_accuracy"], straight["test_accuracy"])

    def test_resume_config(self):
        run = self.root / "run"
        run.mkdir()
        # A flat config.json written before some fields existed: they load with their defaults.
        saved = dataclasses.replace(CONFIG, model="resnet8", width=8)
        old = {k: v for k, v in saved.to_flat_dict().items()
               if k not in ("fsdp", "project_certify_every", "sparsity", "max_to_keep")}
        (run / checkpoint.CONFIG_FILE).write_text(json.dumps(old))
        self.assertEqual(checkpoint.resume_config(run), saved)
        self.assertEqual(
            checkpoint.resume_config(run, ["num_steps=40", "--config.log_every=2",
                                           "progress=true", "model=resnet8"]),
            dataclasses.replace(saved, num_steps=40, log_every=2, progress=True),
        )
        for override, message in (
            ("model=resnet20", "model: saved 'resnet8', given 'resnet20'"),
            ("width=16", "width: saved 8, given 16"),
            ("schedule=constant", "schedule: saved 'cosine', given 'constant'"),
            ("warmup_steps=5", "warmup_steps: saved 0, given 5"),
        ):
            with self.assertRaisesRegex(ValueError, message):
                checkpoint.resume_config(run, [override])
        with self.assertRaisesRegex(FileNotFoundError, "config.json"):
            checkpoint.resume_config(self.root / "none")


def _exact_sigmas(model, specs) -> list[float]:
    """The exact σ_max of every conv of ``model``: float64, of its dense operator."""
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    aligned = discovery.align_with_params(params, specs, "specs")
    out = []
    with jax.enable_x64(True):
        for kernel, spec in zip(jax.tree.leaves(params), aligned, strict=True):
            if spec is not None:
                dense = spectra.dense_operator(np.asarray(kernel, np.float64), spec)
                out.append(layers.exact_sigma_max(dense))
    return out


class CertifiedLoopTest(absltest.TestCase):
    """'power' every step, a certified rescale every 5th update, certified checkpoints."""

    def setUp(self):
        super().setUp()
        self.root = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

    def test_checkpoints_and_final_model_are_certified_and_resume_is_bit_identical(self):
        c = 0.5  # Small enough that 'power' alone ends above c (the training params below).
        config = dataclasses.replace(
            CONFIG, project_max_norm=c, project_method="power", project_certify_every=5,
            checkpoint_every=5, max_to_keep=3,
        )
        straight = loop.train_and_evaluate(config, self.root / "straight")
        model, specs = straight["model"], straight["specs"]
        # The returned (certified) model: every conv's exact σ_max <= c (1 + 1e-4), and so is
        # the σ_max the loop logged at the end.
        exact = _exact_sigmas(model, specs)
        self.assertLen(exact, 7)
        self.assertLessEqual(max(exact), c * (1 + 1e-4))
        self.assertLessEqual(max(straight["sigma_max"].values()), c * (1 + 1e-4))
        np.testing.assert_allclose(sorted(straight["sigma_max"].values()), sorted(exact),
                                   rtol=1e-5)
        # The final checkpoint says so, with per-layer bounds >= the exact σ_max (the
        # intermediate ones are checked by the resumed run below).
        restored, _, meta = model_io.restore_model(self.root / "straight")
        self.assertEqual(meta["step"], 12)
        self.assertTrue(meta["certified"])
        self.assertEqual(meta["certify_method"], "rescale")
        self.assertEqual(meta["certify_tolerance"], 1e-4)
        self.assertLessEqual(meta["certified_max_upper_bound"], c * (1 + 1e-4))
        bounds = [layer["upper_bound"] for layer in meta["certified_layers"]]
        for sigma, bound in zip(exact, bounds, strict=True):
            self.assertLessEqual(sigma, bound * (1 + 1e-6))
        # The final checkpoint restores exactly the returned model, and its report.
        for a, b in zip(_params(model), _params(restored), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        self.assertEqual(
            {k: v for k, v in meta.items() if k.startswith("certif")}, straight["certification"]
        )
        # The train state kept the training params (2 'power' updates after the certified
        # update 10): above c (measured 1.016 c), the certified params are saved beside them.
        self.assertTrue(meta["certified_params_separate"])
        _, _, _, params, rest = steps_lib.split_model(restored, np.zeros((1, 12, 12, 1)))
        manager = checkpoint.checkpoint_manager(self.root / "straight", config)
        self.addCleanup(manager.close)
        state, _ = checkpoint.restore_checkpoint(
            manager, steps_lib.init_train_state(config, specs, params, rest), 12
        )
        # The certified model's BatchNorm statistics were re-estimated for its (rescaled)
        # kernels on 20 training batches: exactly what recalibrate_batch_stats measures for
        # the certified params, not the training statistics of the state.
        self.assertTrue(meta["certified_batch_stats_recalibrated"])
        certified_stats = jax.tree.leaves(nnx.state(restored, nnx.BatchStat))
        for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.BatchStat)), certified_stats,
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        nnx.update(restored, state.params, state.rest)
        self.assertGreater(max(_exact_sigmas(restored, specs)), c * (1 + 1e-3))
        training_stats = jax.tree.leaves(nnx.state(restored, nnx.BatchStat))
        nnx.update(restored, params)  # Certified params, training statistics.
        train_data = builders.build_data(config)[0]
        expected = recalibrate_batch_stats(restored, train_data, 20)
        for a, b in zip(jax.tree.leaves(nnx.state(expected, nnx.BatchStat)), certified_stats,
                        strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
        self.assertFalse(all(
            np.allclose(np.asarray(a), np.asarray(b))
            for a, b in zip(training_stats, certified_stats, strict=True)
        ))

        # Stopped at step 7 (checkpoints 5 and 7, certified), resumed: the uninterrupted run.
        first = loop.train_and_evaluate(config, self.root / "resumed", until_step=7)
        self.assertTrue(first["certification"]["certified"])
        self.assertLessEqual(max(_exact_sigmas(first["model"], specs)), c * (1 + 1e-4))
        _, _, meta = model_io.restore_model(self.root / "resumed")
        self.assertEqual((meta["step"], meta["certified"]), (7, True))
        resumed = loop.train_and_evaluate(config, self.root / "resumed", resume=True)
        for a, b in zip(_params(model), _params(resumed["model"]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

        def strip(history):
            return [{k: v for k, v in r.items() if k != "step_time_s"} for r in history]

        self.assertEqual(strip(straight["history"]), strip(resumed["history"]))
        self.assertEqual(straight["sigma_max"], resumed["sigma_max"])
        self.assertEqual(straight["certification"], resumed["certification"])


# SVD training (Yang et al. 2020): a channel-decomposed ResNet-8 of width 4, logged every step.
SVD_CONFIG = dataclasses.replace(
    CONFIG, width=4, num_steps=6, log_every=1, sigma_every=0, decomposition="channel",
    orth_weight=1.0, sparsity="hoyer", sparsity_weight=0.5, optimizer="adam", lr=1e-2,
)


class SVDTrainingLoopTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.root = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

    def test_config_validation(self):
        with self.assertRaisesRegex(ValueError, "decomposition='tucker'"):
            TrainConfig(decomposition="tucker")
        with self.assertRaisesRegex(ValueError, "sparsity='l2'"):
            TrainConfig(sparsity="l2")
        with self.assertRaisesRegex(ValueError, "orth_weight=-1"):
            TrainConfig(orth_weight=-1.0)
        with self.assertRaisesRegex(ValueError, "sparsity_weight"):
            TrainConfig(sparsity_weight=float("nan"))
        config = apply_overrides(
            TrainConfig(), ["decomposition=spatial", "decompose_dense=false", "orth_weight=1"]
        )
        self.assertEqual(
            (config.decomposition, config.decompose_dense, config.orth_weight),
            ("spatial", False, 1.0),
        )
        self.assertEqual(TrainConfig.from_json(config.to_json()), config)
        self.assertIsNone(apply_overrides(config, ["decomposition=none"]).decomposition)

    def test_build_model_decomposes(self):
        from train.layers import svd_decompose

        model = build_model(SVD_CONFIG, 10, 1)
        layers = svd_decompose.svd_layers(model)
        self.assertLen(layers, 8)  # 7 convs + the classifier.
        self.assertTrue(all(layer.rank == layer.max_rank for _, layer in layers))
        self.assertEqual(layers[0][1].decomposition, "channel")
        no_dense = build_model(
            dataclasses.replace(SVD_CONFIG, decompose_dense=False, decomposition="spatial"), 10, 1
        )
        self.assertLen(svd_decompose.svd_layers(no_dense), 7)
        self.assertIsInstance(no_dense.head, nnx.Linear)
        # Seeded: the same config gives the same initial values.
        again = build_model(SVD_CONFIG, 10, 1)
        for a, b in zip(_params(model), _params(again), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def test_terms_logged_and_resume_bit_identical(self):
        from train.regularizers import orthogonality_loss
        from train.regularizers import sparsity_loss

        initial = nnx.state(build_model(SVD_CONFIG, 10, 1), nnx.Param)
        straight = loop.train_and_evaluate(SVD_CONFIG, self.root / "straight")
        history = straight["history"]
        self.assertEqual([r["step"] for r in history], [1, 2, 3, 4, 5, 6])
        # Step 1 logs the terms at the initial params (before the first update).
        np.testing.assert_allclose(
            history[0]["orth"], float(orthogonality_loss(initial)), rtol=1e-5
        )
        np.testing.assert_allclose(
            history[0]["sparsity"], float(sparsity_loss(initial, "hoyer")), rtol=1e-5
        )
        with (self.root / "straight" / metrics.METRICS_FILE).open() as f:
            header = next(csv.reader(f))
        self.assertIn("orth", header)
        self.assertIn("sparsity", header)
        self.assertEqual(straight["sigma_max"], {})  # SVD convs have no plain kernel leaf.

        loop.train_and_evaluate(SVD_CONFIG, self.root / "resumed", until_step=4)
        resumed = loop.train_and_evaluate(SVD_CONFIG, self.root / "resumed", resume=True)
        for a, b in zip(_params(straight["model"]), _params(resumed["model"]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

        def strip(rows):
            return [{k: v for k, v in r.items() if k != "step_time_s"} for r in rows]

        self.assertEqual(strip(history), strip(resumed["history"]))

    def test_weights_are_traced_and_act(self):
        from train.regularizers import sparsity_loss

        # Runs differing only in λ_o / λ_s (both > 0, or the model decomposed) share the steps.
        model = build_model(SVD_CONFIG, 10, 1)
        example = np.zeros((1, 12, 12, 1), np.float32)
        specs = discovery.find_convs_nnx(model, example)
        graphdef = nnx.split(model, nnx.Param, ...)[0]
        steps = [
            steps_lib.make_steps(graphdef, graphdef, specs, dataclasses.replace(SVD_CONFIG, **kw))
            for kw in ({}, dict(orth_weight=0.0, sparsity_weight=0.0), dict(sparsity_weight=5.0))
        ]
        self.assertIs(steps[0], steps[1])
        self.assertIs(steps[0], steps[2])
        self.assertIsNot(
            steps[0],
            steps_lib.make_steps(graphdef, graphdef, specs,
                            dataclasses.replace(SVD_CONFIG, sparsity="l1")),
        )
        # A large λ_s lowers the Hoyer measure of the singular values more than λ_s = 0.
        final = {}
        for weight in (0.0, 5.0):
            config = dataclasses.replace(SVD_CONFIG, sparsity_weight=weight)
            result = loop.train_and_evaluate(config, self.root / f"w{weight}")
            final[weight] = float(sparsity_loss(nnx.state(result["model"], nnx.Param), "hoyer"))
            rows = result["history"]
            self.assertTrue(all("sparsity" in r and "orth" in r for r in rows))
        self.assertLess(final[5.0], final[0.0])


if __name__ == "__main__":
    absltest.main()
