"""`train.config`: sections validated once, flat names through one alias table, old files load."""

import dataclasses
import json
import pathlib
import re
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from train import checkpoint
from train import config as config_lib
from train import discovery
from train import transforms
from train.config import CheckpointConfig
from train.config import DataConfig
from train.config import DistributedConfig
from train.config import LogConfig
from train.config import LossConfig
from train.config import NetworkConfig
from train.config import OptimConfig
from train.config import PenaltyConfig
from train.config import ProjectionConfig
from train.config import SVDConfig
from train.config import TrainConfig
from train.config import apply_overrides

#: ``TrainConfig(...).to_json()`` of main before the sections (flat fields), non-default values.
FLAT_FIXTURE = pathlib.Path(__file__).parent / "data" / "config_flat_main.json"


class SectionsTest(parameterized.TestCase):

    @parameterized.parameters(
        (DataConfig, dict(batch_size=0), "data.batch_size=0"),
        (DataConfig, dict(image_pad=-1), "data.image_pad=-1"),
        (NetworkConfig, dict(padding="VALID"), "network.padding='VALID'"),
        (NetworkConfig, dict(kwargs=3), "network.kwargs=3"),
        (OptimConfig, dict(name="lion"), "optim.name='lion'"),
        (OptimConfig, dict(schedule="linear"), "optim.schedule='linear'"),
        (LossConfig, dict(temperature=0.0), "loss.temperature=0.0"),
        (LossConfig, dict(margin=-0.1), "loss.margin=-0.1"),
        (LossConfig, dict(margin=float("nan")), "loss.margin=nan"),
        (PenaltyConfig, dict(weight=-1.0), "penalty.weight=-1.0"),
        (SVDConfig, dict(decomposition="tucker"), "svd.decomposition='tucker'"),
        (SVDConfig, dict(sparsity_weight=-1), "svd.sparsity_weight=-1"),
        (ProjectionConfig, dict(max_norm=0.0), "project.max_norm=0.0"),
        (ProjectionConfig, dict(every=0), "project.every=0"),
        (ProjectionConfig, dict(method="clip"), "project.method='clip'"),
        (ProjectionConfig, dict(rounds=-1), "project.rounds=-1"),
        (ProjectionConfig, dict(certify_every=True), "project.certify_every=True"),
        (ProjectionConfig, dict(certify_method="power"), "project.certify_method='power'"),
        (ProjectionConfig, dict(certify_recalibration_batches=2.0),
         "project.certify_recalibration_batches=2.0"),
        (ProjectionConfig, dict(bn_aware=True), "project.bn_aware=True needs project.max_norm"),
        (ProjectionConfig, dict(lipschitz_target=2.0, method="sedghi"),
         "project.lipschitz_target needs project.method"),
        (ProjectionConfig, dict(lipschitz_target=float("inf")), "project.lipschitz_target=inf"),
        (LogConfig, dict(every=0), "log.every=0"),
        (CheckpointConfig, dict(max_to_keep=0), "checkpoint.max_to_keep=0"),
        (DistributedConfig, dict(num_devices=-1), "distributed.num_devices=-1"),
    )
    def test_a_section_names_its_bad_field(self, cls, kwargs, message):
        with self.assertRaisesRegex(ValueError, "^" + re.escape(message)):
            cls(**kwargs)
        # The same value through TrainConfig, by section and by its flat name.
        section = cls.SECTION
        with self.assertRaisesRegex(ValueError, section):
            TrainConfig(**{section: kwargs})
        flat = {config_lib.DOTTED_NAMES[f"{section}.{k}"]: v for k, v in kwargs.items()}
        with self.assertRaisesRegex(ValueError, f"flat names .*{next(iter(flat))}"):
            TrainConfig(**flat)

    def test_top_level_and_unknown_names(self):
        with self.assertRaisesRegex(ValueError, "num_steps=0"):
            TrainConfig(num_steps=0)
        with self.assertRaisesRegex(TypeError, "learning_rate"):
            TrainConfig(learning_rate=0.1)
        with self.assertRaisesRegex(ValueError, "project=3 must be a ProjectionConfig"):
            TrainConfig(project=3)

    def test_one_projection_validator(self):
        # The transform and the config section raise the same check, with their own names.
        with self.assertRaisesRegex(ValueError, r"^every_k_steps=0 must be a positive int"):
            transforms.project_conv_operator_norm(1.0, None, every_k_steps=0)
        with self.assertRaisesRegex(ValueError, r"^project\.every=0 must be a positive int"):
            ProjectionConfig(every=0)
        with self.assertRaisesRegex(ValueError, r"^rounds=-1 must be a non-negative int"):
            transforms.check_projection_args(num_rounds=-1, names={"num_rounds": "rounds"})
        self.assertIs(transforms._is_spec_or_none, discovery.is_spec_or_none)

    def test_sections_are_frozen_and_hashable(self):
        config = TrainConfig(project_max_norm=1.0)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.project.max_norm = 2.0
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.seed = 2
        self.assertEqual(hash(config), hash(TrainConfig(project=ProjectionConfig(max_norm=1.0))))
        self.assertEqual(len({config, TrainConfig(project_max_norm=1.0), TrainConfig()}), 2)


class FlatNamesTest(absltest.TestCase):

    def test_alias_table_covers_every_field_once(self):
        targets = list(config_lib.FLAT_NAMES.values())
        self.assertLen(set(targets), len(targets))
        fields = {(s, f.name) for s, cls in config_lib.SECTIONS.items()
                  for f in dataclasses.fields(cls)}
        self.assertEqual(set(targets), fields)
        self.assertEqual(config_lib.FLAT_NAMES["project_max_norm"], ("project", "max_norm"))
        self.assertEqual(config_lib.FLAT_NAMES["model"], ("network", "name"))
        self.assertEqual(config_lib.DOTTED_NAMES["optim.name"], "optimizer")

    def test_flat_keywords_replace_and_reads(self):
        flat = TrainConfig(model="resnet8", width=8, lr=0.05, project_max_norm=2.0,
                           project_every=5, log_every=4, checkpoint_every=3, num_steps=12)
        sections = TrainConfig(
            network=NetworkConfig(name="resnet8", width=8), optim=OptimConfig(lr=0.05),
            project=ProjectionConfig(max_norm=2.0, every=5), log=LogConfig(every=4),
            checkpoint=CheckpointConfig(every=3), num_steps=12,
        )
        self.assertEqual(flat, sections)
        self.assertEqual(
            (flat.model, flat.lr, flat.project_max_norm, flat.log_every, flat.checkpoint_every),
            ("resnet8", 0.05, 2.0, 4, 3),
        )
        # dataclasses.replace with flat names applies them on top of the sections.
        moved = dataclasses.replace(flat, project_every=2, penalty_weight=1e-3)
        self.assertEqual((moved.project.max_norm, moved.project.every), (2.0, 2))
        self.assertEqual(moved.penalty.weight, 1e-3)
        self.assertEqual(dataclasses.replace(moved, project_every=5, penalty_weight=0.0), flat)
        # A flat name wins over the section given with it.
        both = TrainConfig(project=ProjectionConfig(max_norm=1.0), project_max_norm=3.0)
        self.assertEqual(both.project.max_norm, 3.0)
        with self.assertRaises(AttributeError):
            _ = flat.learning_rate

    def test_flat_and_dotted_overrides_agree(self):
        dotted = apply_overrides(TrainConfig(), [
            "project.max_norm=1.0", "--config.project.every=3", "optim.name=adam",
            "optim.boundaries=0.3,0.6", "network.name=resnet8", "log.every=7", "num_steps=9",
            "project.certify_every=none",
        ])
        flat = apply_overrides(TrainConfig(), [
            "project_max_norm=1.0", "--config.project_every=3", "optimizer=adam",
            "boundaries=0.3,0.6", "model=resnet8", "log_every=7", "num_steps=9",
            "project_certify_every=none",
        ])
        self.assertEqual(dotted, flat)
        self.assertEqual(
            (flat.project.max_norm, flat.project.every, flat.optim.name, flat.optim.boundaries,
             flat.network.name, flat.log.every, flat.num_steps),
            (1.0, 3, "adam", (0.3, 0.6), "resnet8", 7, 9),
        )
        self.assertIsNone(apply_overrides(flat, ["project.max_norm=none"]).project.max_norm)
        with self.assertRaisesRegex(ValueError, "not a TrainConfig field"):
            apply_overrides(TrainConfig(), ["project.radius=1.0"])
        with self.assertRaisesRegex(ValueError, r"project_method=clip.*project\.method='clip'"):
            apply_overrides(TrainConfig(), ["project_method=clip"])
        with self.assertRaisesRegex(ValueError, "optim.lr=abc"):
            apply_overrides(TrainConfig(), ["optim.lr=abc"])


class JsonTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.root = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

    def test_round_trip(self):
        config = TrainConfig(model_kwargs={"a": [1, 2], 3: {"b": None}}, boundaries=(0.2,),
                             project_max_norm=1.5, lipschitz_target=2.0, project_bn_aware=True,
                             project_method="rescale", decomposition="spatial")
        data = json.loads(config.to_json())
        self.assertEqual(data["project"]["max_norm"], 1.5)
        self.assertEqual(set(data), {*config_lib.SECTIONS, *config_lib.TOP_LEVEL})
        self.assertEqual(TrainConfig.from_json(config.to_json()), config)
        self.assertEqual(TrainConfig.from_dict(config.to_flat_dict()), config)
        self.assertEqual(TrainConfig.from_json(json.dumps(config.to_flat_dict())), config)
        # A mix: sections, then flat names on top.
        mixed = {**config.to_dict(), "project_max_norm": 3.0}
        self.assertEqual(TrainConfig.from_dict(mixed).project.max_norm, 3.0)
        with self.assertRaisesRegex(ValueError, r"unknown fields \['colour', 'project.radius'\]"):
            TrainConfig.from_dict({"colour": 1, "project": {"radius": 1.0}})

    def test_old_flat_config_json_loads(self):
        config = TrainConfig.load(FLAT_FIXTURE)
        old = json.loads(FLAT_FIXTURE.read_text())
        self.assertNotIn("project", old)  # Written by the flat TrainConfig.
        # Every old field reads back; fields added since take their defaults.
        flat = config.to_flat_dict()
        self.assertEqual({k: flat[k] for k in old}, old)
        self.assertEqual({k: flat[k] for k in set(flat) - set(old)},
                         {"loss_temperature": 1.0, "loss_margin": 0.0})
        self.assertEqual(
            (config.network.name, config.network.kwargs["tt"]["ranks"],
             config.network.kwargs["variant"], config.optim.name, config.optim.boundaries,
             config.project.max_norm,
             config.project.lipschitz_target, config.svd.decomposition, config.log.every,
             config.checkpoint.every, config.num_steps, config.seed),
            ("garipov", (2, 3), "small", "adam", (0.3, 0.6), 1.5, 3.0, "channel", 4, 6, 12, 3),
        )
        # A file written before a field existed loads with its default.
        del old["project_certify_recalibration_batches"]
        self.assertEqual(TrainConfig.from_dict(old).project.certify_recalibration_batches, 20)

    def test_resume_config_of_an_old_run_with_overrides(self):
        run = self.root / "run"
        run.mkdir()
        shutil.copy(FLAT_FIXTURE, run / checkpoint.CONFIG_FILE)
        saved = TrainConfig.load(FLAT_FIXTURE)
        resumed = checkpoint.resume_config(run, ["log.every=8", "checkpoint_every=2",
                                                 "num_steps=20"])
        self.assertEqual((resumed.log.every, resumed.checkpoint.every, resumed.num_steps),
                         (8, 2, 20))
        self.assertEqual(dataclasses.replace(resumed, log_every=4, checkpoint_every=6,
                                             num_steps=12), saved)
        self.assertEqual(checkpoint.resume_config(run, ["lr=0.05"]), saved)  # Same value.
        with self.assertRaisesRegex(ValueError, "lr: saved 0.05, given 0.1"):
            checkpoint.resume_config(run, ["optim.lr=0.1"])
        with self.assertRaisesRegex(ValueError, "project_max_norm: saved 1.5, given 2.0"):
            checkpoint.resume_config(run, ["project_max_norm=2.0"])


if __name__ == "__main__":
    absltest.main()
