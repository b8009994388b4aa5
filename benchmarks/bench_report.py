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
* ``--large``: ``resnet50@224`` (torchvision's ResNet-50 layout, 53 convs) and ``wrn50-2@96``
  (WideResNet-50-2), built here as NNX models (random init), cold calls only: issue 19's targets
  (≤ 60 s and ≤ 30 s cold, the lower bound stage never longer than the layer stage).

After each report, a soundness check (``--pairs``, default 256 random pairs plus the lower
bound's own pairs): :func:`train.report.check_upper_bound` counts the pairs whose realised ratio
exceeds the upper bound (column ``violations / pairs``). The ``lower`` column gives the value of
each stage of the lower bound's search (``power``, ``ascent``, ``refine``) and the
``lower bound / layers`` column the two stages' seconds.

Per model it prints the cold time (first call in the process: tracing + compilation + run),
the warm time (second call), the per-stage split of the cold call (``report.timings``; the
``lower_bound`` stage runs in a worker thread during ``compose_pass1`` / ``layers`` /
``compose``, so the stages add up to more than the wall time; the search stops when the layer
stage ends), and the targets (ResNet-20 @32² ≤ 3 s cold in issue 13, ≤ 6 s in issue 20;
detector @320² ≤ 30 s cold in issue 13, ≤ 60 s in issue 20). The numbers are one run on whatever
machine runs it: on a shared machine they move with the load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import re
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
    from flax import nnx


    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure, rest = nnx.as_pure(params), nnx.as_pure(rest)

    def apply(p, x):
        return nnx.merge(graphdef, p, rest)(x)

    return _Report(apply, pure, x)


class _Report:
    """A report call (timed) and what the soundness check after it needs."""

    def __init__(self, apply_fn, params, x):
        self.apply_fn, self.params, self.x = apply_fn, params, x

    def __call__(self):
        from train.report import network_report

        return network_report(self.apply_fn, self.params, self.x, **OPTIONS)

    def soundness(self, report, num_random: int = 256):
        """``check_upper_bound`` on the lower bound's pairs and ``num_random`` random ones."""
        from train.report import check_upper_bound
        from train.report import soundness_pairs

        upper = report.network["lipschitz_upper"]
        if upper is None:
            return None
        pairs = soundness_pairs(report.witness, self.x[:1].shape, num_random)
        return check_upper_bound(self.apply_fn, self.params, upper, pairs)


def _bottleneck_resnet(size: int, width: int, trained_bn: bool = False):
    """ResNet-50 (``width=1``) / WideResNet-50-2 (``width=2``), torchvision's layout (53 convs:
    7x7 stem, max pool, bottleneck stages 3-4-6-3), BatchNorm in eval mode, random init.

    ``trained_bn``: BatchNorm scales and running statistics drawn per channel, as a trained
    net has them (random init has one scale magnitude, which the report's layer stage reuses).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    class ConvBN(nnx.Module):
        def __init__(self, cin, cout, k, stride, rngs):
            pad = k // 2
            self.conv = nnx.Conv(
                cin, cout, (k, k), strides=stride, padding=pad, use_bias=False, rngs=rngs
            )
            self.bn = nnx.BatchNorm(cout, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.conv(x))

    class Bottleneck(nnx.Module):
        def __init__(self, cin, mid, cout, stride, rngs):
            self.a = ConvBN(cin, mid, 1, 1, rngs)
            self.b = ConvBN(mid, mid, 3, stride, rngs)
            self.c = ConvBN(mid, cout, 1, 1, rngs)
            self.down = ConvBN(cin, cout, 1, stride, rngs) if (stride, cin) != (1, cout) else None

        def __call__(self, x):
            y = self.c(jax.nn.relu(self.b(jax.nn.relu(self.a(x)))))
            return jax.nn.relu(y + (x if self.down is None else self.down(x)))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = ConvBN(3, 64, 7, 2, rngs)
            self.blocks = nnx.List()
            cin = 64
            for i, n in enumerate((3, 4, 6, 3)):
                mid, cout = 64 * 2**i * width, 256 * 2**i
                for j in range(n):
                    self.blocks.append(Bottleneck(cin, mid, cout, 2 if (j == 0 and i) else 1, rngs))
                    cin = cout
            self.fc = nnx.Linear(cin, 1000, rngs=rngs)

        def __call__(self, x):
            x = jax.nn.relu(self.stem(x))
            x = nnx.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
            for block in self.blocks:
                x = block(x)
            return self.fc(x.mean(axis=(1, 2)))

    model = Net(nnx.Rngs(0))
    model.eval()
    if trained_bn:
        import numpy as np

        rng = np.random.default_rng(0)
        for _, m in nnx.iter_graph(model):
            if isinstance(m, nnx.BatchNorm):
                c = m.scale.shape
                m.scale[...] = jnp.asarray(rng.uniform(0.3, 1.5, size=c), jnp.float32)
                m.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=c), jnp.float32)
                m.mean[...] = jnp.asarray(rng.normal(size=c), jnp.float32)
    return _nnx_report(model, jnp.zeros((1, size, size, 3), jnp.float32))


def _yolo(path: str, size: int):
    import jax.numpy as jnp

    from train.models import from_onnx
    model = from_onnx(path, input_shape=(1, 3, size, size))
    x = jnp.zeros((1, 3, size, size), jnp.float32)
    return _Report(model.apply_fn, model.params, x)


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


def _search_work(method: str | None) -> str:
    """The lower bound search's ascent steps and rounds, from ``lipschitz_lower_method``."""
    match = re.search(r"\d+ steps in \d+ rounds", method or "")
    return match.group(0) if match else "not run"


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
    parser.add_argument(
        "--lower-bound-share",
        type=float,
        default=None,
        help="network_report(lower_bound_share=...): the search's share of the wall-clock time "
        "while the layer stage runs (1: no waiting; default: the report's)",
    )
    parser.add_argument("--onnx", help="path to nudenet's 320n.onnx (else pip download)")
    parser.add_argument(
        "--large",
        action="store_true",
        help="also ResNet-50 @224² and WideResNet-50-2 @96² (NNX, random init; cold only)",
    )
    parser.add_argument(
        "--trained-bn",
        action="store_true",
        help="--large nets with per-channel BatchNorm scales and statistics (as trained nets)",
    )
    parser.add_argument(
        "--only", default="", help="comma-separated name prefixes of the models to run"
    )
    parser.add_argument(
        "--no-warm", action="store_true", help="cold calls only (no second, warm call)"
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=256,
        help="random pairs of the soundness check after each report (plus the lower bound's own "
        "pairs; 0: no check)",
    )
    args = parser.parse_args()
    OPTIONS.update(backend=args.backend, power_rtol=args.power_rtol)
    if args.lower_bound_share is not None:
        OPTIONS["lower_bound_share"] = args.lower_bound_share
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
    if args.large:
        models += [
            ("resnet50@224", lambda: _bottleneck_resnet(224, 1, args.trained_bn), 60.0),
            ("wrn50-2@96", lambda: _bottleneck_resnet(96, 2, args.trained_bn), 30.0),
        ]
    if args.only:
        prefixes = tuple(p.strip() for p in args.only.split(",") if p.strip())
        models = [m for m in models if m[0].startswith(prefixes)]
    rows = []
    for name, build, target in models:
        report_fn = build()
        times, reports, cpu = [], [], []
        warm = not (args.no_warm or name.startswith(("resnet50", "wrn50")))
        for _ in range(2 if warm else 1):
            start, cpu_start = time.perf_counter(), time.process_time()
            reports.append(report_fn())
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)  # All threads: ~2x wall when both busy.
        r = reports[0]
        if len(times) == 1:
            times.append(float("nan"))
        sound = report_fn.soundness(r, args.pairs) if args.pairs else None
        net = r.network
        lower_vs_layers = (
            f"{r.timings.get('lower_bound', 0):.1f} / {r.timings.get('layers', 0):.1f}"
        )
        stages = net.get("lipschitz_lower_stages") or {}
        lower_cell = (
            "failed"
            if net["lipschitz_lower"] is None
            else f"{net['lipschitz_lower']:.3g} ("
            + ", ".join(f"{k} {v:.3g}" for k, v in stages.items() if v is not None)
            + ")"
        )
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
                lower_cell,
                lower_vs_layers,
                "—" if sound is None else f"{sound['violations']} / {sound['num_pairs']}",
            ]
        )
        print(
            f"[bench_report] {name}: cold {times[0]:.1f} s (CPU {cpu[0]:.1f} s, load average "
            f"{os.getloadavg()[0]:.1f}), warm {times[1]:.1f} s, tight bound "
            f"{r.timings.get('tight_bound', 0.0):.1f} s "
            f"({r.network.get('lipschitz_upper_tight_note')}), "
            f"lower {lower_cell}, lower bound {lower_vs_layers} s of layers, lower bound "
            f"search: {_search_work(net.get('lipschitz_lower_method'))}",
            flush=True,
        )
        jax.clear_caches()
    print()
    print(
        f"bench_report, {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"{platform.platform()}, {os.cpu_count()} CPUs, JAX {jax.__version__}, "
        f"threads {args.threads or 'default'}, backend {args.backend}, "
        f"power_rtol {args.power_rtol:g}, "
        f"lower_bound_share {OPTIONS.get('lower_bound_share', 'default')}, "
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
                "lower (search stages)",
                "lower bound / layers (s)",
                "violations / pairs",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
