"""Worker of `tests/train/test_distributed.py`, run in a subprocess (devices fixed at start-up).

``python distributed_worker.py single OUT_JSON`` (with ``XLA_FLAGS=
--xla_force_host_platform_device_count=4``): sharding, 1 vs 4 devices, checkpoints 4 -> 1 and
1 -> 4, the batch-size check. ``python distributed_worker.py process ID PORT OUT_JSON``: one of
two processes (gloo collectives on 127.0.0.1) training the two-process run.
``python distributed_worker.py reference OUT_JSON``: the same run in one process, one device.
"""

import dataclasses
import json
import pathlib
import sys
import tempfile

from tests.train.fixtures import RESNET8_DISTRIBUTED_FIELDS as CONFIG_FIELDS


def _losses(result):
    return [row["loss"] for row in result["history"]]


def single(out: str) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from train import distributed
    from train import loop
    from train import model_io
    from train.config import TrainConfig

    report = {"device_count": jax.device_count()}
    config = TrainConfig(**CONFIG_FIELDS)
    root = pathlib.Path(tempfile.mkdtemp())
    mesh = distributed.make_mesh(4)
    (x,) = distributed.shard_batch(mesh, np.zeros((8, 3), np.float32))
    report["sharding"] = {
        "spec": [str(a) for a in x.sharding.spec],
        "mesh_axis_names": list(x.sharding.mesh.axis_names),
        "shard_rows": sorted({s.data.shape[0] for s in x.addressable_shards}),
        "num_shards": len(x.addressable_shards),
    }
    runs = {}
    for n in (1, 4):
        result = loop.train_and_evaluate(
            dataclasses.replace(config, num_devices=n), root / f"straight{n}"
        )
        runs[n] = result
        report[f"losses_{n}"] = _losses(result)
        report[f"test_{n}"] = [result["test_loss"], result["test_count"]]
        report[f"mesh_{n}"] = json.loads((root / f"straight{n}" / "mesh.json").read_text())
        report[f"params_{n}"] = [
            float(np.abs(np.asarray(v)).sum())
            for v in jax.tree.leaves(nnx.state(result["model"], nnx.Param))
        ]
    # FSDP: params and optimiser state split over the devices, the same training.
    fsdp = loop.train_and_evaluate(
        dataclasses.replace(config, num_devices=4, fsdp=True), root / "fsdp"
    )
    report["losses_fsdp"] = _losses(fsdp)
    report["fsdp_sharded_kernels"] = sum(
        "data" in [str(a) for a in v.sharding.spec]
        for v in jax.tree.leaves(nnx.state(fsdp["model"], nnx.Param))
        if v.ndim == 4
    )
    report["num_kernels"] = sum(
        v.ndim == 4 for v in jax.tree.leaves(nnx.state(fsdp["model"], nnx.Param))
    )
    # The projection ('power' every step, a certified rescale every 3rd) on 1 and 4 devices:
    # on 4, its groups of kernels are spread over the mesh (sharding constraints on 'data').
    projected = dataclasses.replace(
        config, project_max_norm=1.0, project_method="power", project_certify_every=3
    )
    for n in (1, 4):
        result = loop.train_and_evaluate(
            dataclasses.replace(projected, num_devices=n), root / f"projected{n}"
        )
        report[f"proj_losses_{n}"] = _losses(result)
        report[f"proj_params_{n}"] = [
            float(np.abs(np.asarray(v)).sum())
            for v in jax.tree.leaves(nnx.state(result["model"], nnx.Param))
        ]
        report[f"proj_certified_{n}"] = result["certification"]["certified"]
        report[f"proj_bound_{n}"] = result["certification"]["certified_max_upper_bound"]
    report["proj_sharded_4"] = _projection_constraints(
        dataclasses.replace(projected, num_devices=4), 4
    )
    # Checkpoints: written on `a` devices at step 3, resumed on `b`.
    for a, b in ((4, 1), (1, 4)):
        run = root / f"resume{a}to{b}"
        first = loop.train_and_evaluate(
            dataclasses.replace(config, num_devices=a), run, until_step=3
        )
        written = [np.asarray(v) for v in jax.tree.leaves(nnx.state(first["model"]))]
        restored, _, meta = model_io.restore_model(run, mesh_devices=b)
        read = [np.asarray(v) for v in jax.tree.leaves(nnx.state(restored))]
        report[f"restore_exact_{a}to{b}"] = meta["step"] == 3 and all(
            np.array_equal(u, v) for u, v in zip(written, read, strict=True)
        )
        resumed = loop.train_and_evaluate(
            dataclasses.replace(config, num_devices=b), run, resume=True
        )
        report[f"losses_{a}to{b}"] = _losses(resumed)
        report[f"mesh_{a}to{b}"] = json.loads((run / "mesh.json").read_text())
    try:
        loop.train_and_evaluate(
            dataclasses.replace(config, num_devices=4, batch_size=30), root / "bad"
        )
        report["indivisible"] = None
    except ValueError as e:
        report["indivisible"] = str(e)
    pathlib.Path(out).write_text(json.dumps(report))


def _projection_constraints(config, n: int) -> int:
    """Sharding constraints over ``'data'`` in the lowered train step of ``config``'s run on
    ``n`` devices. Only the projection spread over the mesh makes them: the state is constrained
    replicated and the batch is sharded by its argument's sharding (measured: 0 on 1 device, and
    0 on 4 devices when the loop does not pass the mesh to the optimiser; 30 when it does).

    The state comes from the model as the loop builds it (only its structure, shapes and
    placement enter the lowered program): its power vectors are warmed by the program the runs
    above compiled (kernels replicated over 4 devices would compile another one)."""
    import numpy as np

    from train import distributed
    from train import steps as steps_lib
    from train.models.registry import build_model

    mesh = distributed.make_mesh(n)
    example = np.zeros((1, 12, 12, 1), np.float32)
    specs, graphdef_train, graphdef_eval, params, rest = steps_lib.split_model(
        build_model(config, 10, 1, example.shape[1:3]), example
    )
    steps = steps_lib.make_steps(graphdef_train, graphdef_eval, specs, config, mesh)
    state = distributed.place_state(
        steps_lib.init_train_state(config, specs, params, rest), mesh, config.fsdp
    )
    batch = distributed.shard_batch(
        mesh, np.zeros((config.batch_size, 12, 12, 1), np.float32),
        np.zeros(config.batch_size, np.int32), np.ones(config.batch_size, np.float32),
    )
    hyper = distributed.place_state(steps_lib.step_hyperparameters(config), mesh)
    text = steps.train_step.lower(state, *batch, hyper).as_text()
    return sum(
        '{"data"}' in line for line in text.splitlines() if "sharding_constraint" in line
    )


def process(index: int, port: int, out: str, root: str) -> None:
    from train import loop
    from train.config import TrainConfig

    config = TrainConfig(
        **CONFIG_FIELDS, coordinator_address=f"127.0.0.1:{port}", num_processes=2,
        process_id=index,
    )
    result = loop.train_and_evaluate(config, pathlib.Path(root) / "run")
    import jax

    report = {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "test": [result["test_loss"], result["test_count"]],
        "losses": _losses(result) if result["history"] is not None else None,
    }
    pathlib.Path(out).write_text(json.dumps(report))


def reference(out: str) -> None:
    from train import loop
    from train.config import TrainConfig

    result = loop.train_and_evaluate(
        TrainConfig(**CONFIG_FIELDS), pathlib.Path(tempfile.mkdtemp()) / "run"
    )
    report = {"losses": _losses(result), "test": [result["test_loss"], result["test_count"]]}
    pathlib.Path(out).write_text(json.dumps(report))


if __name__ == "__main__":
    from train.lapack_workaround import avoid_cpu_lapack_deadlock

    avoid_cpu_lapack_deadlock()
    command, *args = sys.argv[1:]
    if command == "single":
        single(*args)
    elif command == "process":
        process(int(args[0]), int(args[1]), args[2], args[3])
    else:
        reference(*args)
