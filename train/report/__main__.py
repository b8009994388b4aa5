"""``python -m train.report`` / ``convspectra-report``: the spectral report of a network.

* ``--onnx FILE --input-shape 1,3,H,W``: a model imported with ``train.models.from_onnx``.
* ``--run RUN_DIR``: the latest checkpoint of a run of :func:`train.train_and_evaluate`.

Writes ``OUT/report.json``, ``OUT/report.md``, ``OUT/spectra.png``, ``OUT/norms.png`` and the
lower bound's witness ``OUT/lower_bound_witness.npz``. Finished stages are checkpointed in
``OUT/stages/`` (the layer rows as soon as the layer stage ends): a crash loses no layer work, and
running the same command again reuses them. A stage that fails is recorded in ``report.json``
(``network.errors``) and the other stages' numbers are still written.
"""

from __future__ import annotations

import argparse
import pathlib
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convspectra-report",
        description="Exact per-layer operator norms and a Lipschitz bracket of a network.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--onnx", type=pathlib.Path, help="an ONNX model file")
    source.add_argument("--run", type=pathlib.Path, help="a run folder of train_and_evaluate")
    parser.add_argument("--input-shape", help="input shape for --onnx, e.g. 1,3,224,224")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="output folder")
    parser.add_argument(
        "--num-points",
        type=int,
        default=4,
        help="random points for the Jacobian lower bound (default 4)",
    )
    parser.add_argument(
        "--power-iterations",
        type=int,
        default=20,
        help="power iterations per point for the Jacobian lower bound (default 20)",
    )
    parser.add_argument(
        "--ascent-steps",
        type=int,
        default=100,
        help="pair-ascent steps of the lower bound search, at most (default 100; the search "
        "also stops when the layer stage is done)",
    )
    parser.add_argument(
        "--check-pairs",
        type=int,
        default=0,
        help="check the upper bound on the lower bound's pairs and this many random pairs",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the plots")
    args = parser.parse_args(argv)

    from train.lapack_workaround import avoid_cpu_lapack_deadlock

    avoid_cpu_lapack_deadlock()
    from train.models.onnx.model import parse_input_shape
    from train.report._options import ReportOptions
    from train.report._sources import report_onnx
    from train.report._sources import report_run
    from train.report._write import write_report

    options = ReportOptions(
        num_points=args.num_points,
        power_iterations=args.power_iterations,
        ascent_steps=args.ascent_steps,
        check_pairs=args.check_pairs,
        checkpoint_dir=args.out,
        compute_spectra=not args.no_plots,  # the spectra are only plotted
        progress=True,
    )
    if args.onnx is not None:
        shape = parse_input_shape(args.input_shape) if args.input_shape else None
        report = report_onnx(args.onnx, shape, options=options)
        title = f"Spectral report: {args.onnx.name}"
    else:
        report = report_run(args.run, options=options)
        title = f"Spectral report: {args.run}"
    paths = write_report(report, args.out, title=title, plots=not args.no_plots)
    net = report.network
    print(
        f"lipschitz upper {net['lipschitz_upper']} ({net['lipschitz_upper_note']}); "
        f"lower {net['lipschitz_lower']}"
    )
    if net.get("soundness"):
        s = net["soundness"]
        print(f"soundness: {s['violations']} violations on {s['num_pairs']} pairs")
    for e in net.get("errors") or []:
        print(f"stage {e['stage']} failed: {e['type']}: {e['message']}")
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
