"""Speed of ``train.report.network_report``: whole reports, cold (first call, compiling) and warm.

Run ``python benchmarks/bench_report.py [--quick] [--threads N]``. Models (float32, random
init, BatchNorm in eval mode):

* ``resnet20@32``: ``train.models.resnet20`` (19 convs + classifier) at 32x32, SAME padding
  (every conv: exact σ_max by Lanczos + certified bounds, spectra by the Yi approximation;
  per-layer work on the host, ``backend='numpy'``, the default; ``--backend jax`` for the
  compiled path);
* ``resnet20-circ@32``: the same with CIRCULAR padding (every conv: exact FFT spectrum);
* ``yolov8n@320``: the YOLOv8n detector (64 convs) shipped in the ``nudenet==3.4.2`` wheel,
  imported with ``train.models.from_onnx`` (``--onnx PATH`` to its ``320n.onnx``; fetched with
  ``pip download`` when not given);
* ``detector@320``: when the wheel cannot be fetched, a synthetic 43-conv detection-like
  backbone + neck at 320x320 (stride-2 stages 320 -> 10, 3x3 and 1x1 convs, SiLU, residuals,
  nearest upsampling) built here as an NNX model (``--quick``: at 160x160).

Per model it prints the cold time (first call in the process: tracing + compilation + run),
the warm time (second call), the per-stage split of the cold call (``report.timings``; the
``lower_bound`` stage runs in a worker thread during ``compose_pass1`` / ``layers`` /
``compose``, so the stages add up to more than the wall time), and the targets of issue 13
(ResNet-20 @32² ≤ 3 s cold, detector @320² ≤ 30 s cold). The numbers are one run on whatever
machine runs it: on a shared machine they move with the load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import time

# benchmarks/_timing.py: the script's folder is on sys.path.
from _timing import fmt_time
from _timing import limit_threads
from _timing import markdown

#: network_report options set from the command line.
OPTIONS = {"backend": "numpy", "power_rtol": 0.0}


def _detector(size: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class ConvBN(nnx.Module):
        def __init__(self, cin, cout, k, stride, rngs):
            self.conv = nnx.Conv(cin, cout, (k, k), strides=stride, use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(cout, rngs=rngs)

        def __call__(self, x):
            return jax.nn.silu(self.bn(self.conv(x)))

    class Block(nnx.Module):
        def __init__(self, c, rngs):
            self.a = ConvBN(c, c, 1, 1, rngs)
            self.b = ConvBN(c, c, 3, 1, rngs)

        def __call__(self, x):
            return x + self.b(self.a(x))

    class Detector(nnx.Module):
        """Stem, 5 stride-2 stages of residual blocks, a top-down neck and heads: 43 convs."""

        def __init__(self, rngs):
            widths = (16, 32, 64, 128, 128)
            blocks = (1, 2, 4, 4, 3)
            self.stem = ConvBN(3, 16, 3, 2, rngs)
            self.downs, self.stages = nnx.List(), nnx.List()
            cin = 16
            for w, n in zip(widths, blocks):
                self.downs.append(ConvBN(cin, w, 3, 2 if w != 16 else 1, rngs))
                self.stages.append(nnx.List([Block(w, rngs) for _ in range(n)]))
                cin = w
            self.laterals = nnx.List([ConvBN(w, 64, 1, 1, rngs) for w in widths[2:]])
            self.smooth = nnx.List([ConvBN(64, 64, 3, 1, rngs) for _ in widths[2:]])
            self.heads = nnx.List([nnx.Conv(64, 16, (1, 1), rngs=rngs) for _ in widths[2:]])

        def __call__(self, x):
            x = self.stem(x)
            feats = []
            for down, stage in zip(self.downs, self.stages):
                x = down(x)
                for block in stage:
                    x = block(x)
                feats.append(x)
            outs, top = [], None
            for i in reversed(range(3)):
                y = self.laterals[i](feats[i + 2])
                if top is not None:
                    n, h, w, c = top.shape
                    y = y + jax.image.resize(top, (n, 2 * h, 2 * w, c), "nearest")
                top = self.smooth[i](y)
                outs.append(self.heads[i](top))
            return tuple(outs)

    model = Detector(nnx.Rngs(0))
    model.eval()
    return _nnx_report(model, jnp.zeros((1, size, size, 3), jnp.float32))


def _nnx_report(model, x):
    from train.report import network_report_nnx

    return lambda: network_report_nnx(model, x, **OPTIONS)


def _yolo(path: str, size: int):
    import jax.numpy as jnp

    from train.models import from_onnx
    from train.report import network_report

    model = from_onnx(path, input_shape=(1, 3, size, size))
    x = jnp.zeros((1, 3, size, size), jnp.float32)
    return lambda: network_report(model.apply_fn, model.params, x, **OPTIONS)


def _fetch_yolo() -> str | None:
    """``320n.onnx`` from the ``nudenet==3.4.2`` wheel (``pip download``), or ``None``."""
    import subprocess
    import sys
    import tempfile
    import zipfile

    directory = tempfile.mkdtemp(prefix="bench_report_")
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "nudenet==3.4.2"]
            + ["-d", directory],
            capture_output=True,
            timeout=300,
            check=True,
        )
        wheel = next(pathlib.Path(directory).glob("nudenet-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            return z.extract("nudenet/320n.onnx", directory)
    except (OSError, subprocess.SubprocessError, StopIteration, KeyError) as e:
        print(f"[bench_report] nudenet wheel not available ({e}): synthetic detector instead")
        return None


def _resnet(padding: str):
    import jax.numpy as jnp
    from flax import nnx

    from train.models import resnet20

    model = resnet20(10, padding=padding, rngs=nnx.Rngs(0))
    model.eval()
    return _nnx_report(model, jnp.zeros((1, 32, 32, 3), jnp.float32))


def _fmt3(v) -> str:
    return "null" if v is None else f"{v:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="detector at 160x160")
    parser.add_argument(
        "--threads", type=int, default=0, help="BLAS/XLA threads (0: leave the environment alone)"
    )
    parser.add_argument("--skip-detector", action="store_true")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--backend", default="numpy", help="per-layer backend: numpy or jax")
    parser.add_argument(
        "--power-rtol", type=float, default=0.0, help="network_report(power_rtol=...)"
    )
    parser.add_argument("--onnx", help="path to nudenet's 320n.onnx (else pip download)")
    args = parser.parse_args()
    OPTIONS.update(backend=args.backend, power_rtol=args.power_rtol)
    if args.threads:
        limit_threads(args.threads)
    from train.lapack_workaround import avoid_cpu_lapack_deadlock

    avoid_cpu_lapack_deadlock()
    import jax

    size = 160 if args.quick else 320
    models = []
    if not args.skip_resnet:
        models += [
            ("resnet20@32 SAME", lambda: _resnet("SAME"), 3.0),
            ("resnet20@32 CIRCULAR", lambda: _resnet("CIRCULAR"), 3.0),
        ]
    if not args.skip_detector:
        onnx_path = args.onnx or _fetch_yolo()
        if onnx_path is not None:
            models.append((f"yolov8n@{size} (ONNX)", lambda: _yolo(onnx_path, size), 30.0))
        else:
            models.append((f"detector@{size}", lambda: _detector(size), 30.0))
    rows = []
    for name, build, target in models:
        report_fn = build()
        times, reports = [], []
        for _ in range(2):
            start = time.perf_counter()
            reports.append(report_fn())
            times.append(time.perf_counter() - start)
        r = reports[0]
        split = ", ".join(f"{k} {v:.1f}" for k, v in r.timings.items() if k != "total")
        methods = sorted({layer.sigma_max_method for layer in r.layers})
        upper = r.network["lipschitz_upper"]
        rows.append(
            [
                name,
                str(len(r.layers)),
                "/".join(methods),
                fmt_time(times[0]),
                fmt_time(times[1]),
                f"≤ {target:g} s",
                split,
                "null" if upper is None else f"{upper:.3g}",
                _fmt3(r.network.get("lipschitz_upper_naive")),
                _fmt3(r.network.get("lipschitz_upper_factor")),
                f"{r.timings.get('tight_bound', 0.0):.1f} s",
                f"{r.network['lipschitz_lower']:.3g}",
            ]
        )
        print(
            f"[bench_report] {name}: cold {times[0]:.1f} s, warm {times[1]:.1f} s, tight bound "
            f"{r.timings.get('tight_bound', 0.0):.1f} s "
            f"({r.network.get('lipschitz_upper_tight_note')})",
            flush=True,
        )
        jax.clear_caches()
    print()
    print(
        f"bench_report, {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"{platform.platform()}, {os.cpu_count()} CPUs, JAX {jax.__version__}, "
        f"threads {args.threads or 'default'}, backend {args.backend}, "
        f"power_rtol {args.power_rtol:g}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        markdown(
            [
                "model",
                "layers",
                "σ_max methods",
                "cold",
                "warm",
                "target (cold)",
                "cold split (s)",
                "Lipschitz upper",
                "naive (composition)",
                "factor gained",
                "tight-bound time (cold)",
                "lower",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
