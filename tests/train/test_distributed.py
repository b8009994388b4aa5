"""`train.distributed`: the data-parallel loop on simulated CPU devices, in subprocesses.

Each check runs `tests/train/distributed_worker.py` in a fresh interpreter, because the device
count is fixed when JAX starts (``XLA_FLAGS=--xla_force_host_platform_device_count=4``).
Tolerances: 1 and N devices compute the same sums in a different order (per-device partial sums
of the batch, then a cross-device sum), so float32 results agree to rounding, not bitwise.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest

from tests import xla_flags
from train import distributed

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")
ROOT = pathlib.Path(__file__).resolve().parents[2]
#: Relative tolerance per logged step (mean loss of that step), float32.
RTOL = 1e-5


def _env(devices: int | None) -> dict[str, str]:
    flags = [] if devices is None else [f"--xla_force_host_platform_device_count={devices}"]
    env = xla_flags.with_flags(os.environ, *flags)  # Also LLVM -O0: compilation is the cost.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _run(args: list[str], devices: int | None, timeout: float = 900) -> None:
    done = subprocess.run(
        [sys.executable, str(WORKER), *args], env=_env(devices), capture_output=True, text=True,
        timeout=timeout,
    )
    if done.returncode:
        raise AssertionError(f"worker {args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FourDevicesTest(absltest.TestCase):
    """One worker process with 4 simulated devices runs every single-process check."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.TemporaryDirectory()
        out = pathlib.Path(cls.tmp.name) / "single.json"
        _run(["single", str(out)], devices=4)
        cls.report = json.loads(out.read_text())

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()
        super().tearDownClass()

    def test_batch_is_sharded_over_data(self):
        self.assertEqual(self.report["device_count"], 4)
        sharding = self.report["sharding"]
        self.assertEqual(sharding["spec"], [distributed.DATA_AXIS])
        self.assertEqual(sharding["mesh_axis_names"], [distributed.DATA_AXIS])
        self.assertEqual((sharding["num_shards"], sharding["shard_rows"]), (4, [2]))

    def test_four_devices_train_the_one_device_model(self):
        one, four = self.report["losses_1"], self.report["losses_4"]
        self.assertLen(one, 6)
        self.assertLess(one[-1], one[0])  # It trains.
        np.testing.assert_allclose(four, one, rtol=RTOL)
        np.testing.assert_allclose(self.report["test_4"], self.report["test_1"], rtol=RTOL)
        self.assertEqual(self.report["test_4"][1], 359)  # Every test example once.
        np.testing.assert_allclose(self.report["params_4"], self.report["params_1"], rtol=RTOL)

    def test_projection_over_the_mesh_trains_the_one_device_model(self):
        # 'power' every step + a certified rescale every 3rd update, then a certified final.
        one, four = self.report["proj_losses_1"], self.report["proj_losses_4"]
        self.assertLen(one, 6)
        np.testing.assert_allclose(four, one, rtol=RTOL)
        # Per-leaf sums of |params|: small leaves (BN biases, sums ~0.04) differ by ~3e-6
        # absolute (measured), float32 reduction-order noise carried through 6 steps.
        np.testing.assert_allclose(
            self.report["proj_params_4"], self.report["proj_params_1"], rtol=RTOL, atol=1e-5
        )
        for n in (1, 4):
            self.assertTrue(self.report[f"proj_certified_{n}"])
            self.assertLessEqual(self.report[f"proj_bound_{n}"], 1.0 + 1e-4)
        # On 4 devices the projection's groups are constrained onto the 'data' axis.
        self.assertGreater(self.report["proj_sharded_4"], 0)

    def test_fsdp_shards_the_params_and_trains_the_same_model(self):
        # Every conv kernel of the width-4 ResNet-8 has 4, 8 or 16 output channels.
        self.assertEqual(self.report["fsdp_sharded_kernels"], self.report["num_kernels"])
        self.assertGreater(self.report["num_kernels"], 0)
        np.testing.assert_allclose(self.report["losses_fsdp"], self.report["losses_1"], rtol=RTOL)

    def test_run_folder_records_the_mesh(self):
        for n in (1, 4):
            mesh = self.report[f"mesh_{n}"]
            self.assertEqual(
                (mesh["num_devices"], mesh["mesh_shape"], mesh["mesh_axis_names"]),
                (n, [n], ["data"]),
            )
        segments = self.report["mesh_4to1"]["segments"]
        self.assertEqual(
            [(s["from_step"], s["num_devices"]) for s in segments], [(0, 4), (3, 1)]
        )
        self.assertEqual(self.report["mesh_4to1"]["num_devices"], 1)

    def test_checkpoints_move_between_device_counts(self):
        for a, b in ((4, 1), (1, 4)):
            # The state written on `a` devices is read exactly on `b` devices ...
            self.assertTrue(self.report[f"restore_exact_{a}to{b}"], (a, b))
            # ... and the run continues as the uninterrupted one (same history rows).
            np.testing.assert_allclose(
                self.report[f"losses_{a}to{b}"], self.report[f"losses_{a}"], rtol=RTOL
            )

    def test_indivisible_batch_raises(self):
        message = self.report["indivisible"]
        self.assertIsNotNone(message)
        self.assertIn("batch_size=30", message)
        self.assertIn("4", message)


class TwoProcessesTest(absltest.TestCase):
    """Two processes (one CPU device each, gloo collectives on 127.0.0.1) against one."""

    def test_two_processes_match_one(self):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = pathlib.Path(tmp)
            port = _free_port()
            env = _env(None)
            procs = [
                subprocess.Popen(
                    [sys.executable, str(WORKER), "process", str(i), str(port),
                     str(tmp / f"p{i}.json"), str(tmp)],
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                )
                for i in (0, 1)
            ]
            outputs = [p.communicate(timeout=900)[0] for p in procs]
            for p, output in zip(procs, outputs):
                self.assertEqual(p.returncode, 0, output[-6000:])
            _run(["reference", str(tmp / "ref.json")], devices=None)
            reports = [json.loads((tmp / f"p{i}.json").read_text()) for i in (0, 1)]
            reference = json.loads((tmp / "ref.json").read_text())
        self.assertEqual([r["process_count"] for r in reports], [2, 2])
        self.assertEqual([r["device_count"] for r in reports], [2, 2])
        self.assertIsNone(reports[1]["losses"])  # Process 0 alone writes the metrics.
        np.testing.assert_allclose(reports[0]["losses"], reference["losses"], rtol=RTOL)
        for r in reports:
            np.testing.assert_allclose(r["test"], reference["test"], rtol=RTOL)


if __name__ == "__main__":
    absltest.main()
