"""Plain Sedghi clip vs the in-forward capped BatchNorm on the quick digits ResNet-8.

For each ``c`` and recipe: the plain clip (``project_max_norm=c``, every 10 steps, the loop's
certification) and the ResNet with ``norm='capped'`` (:mod:`train.capped_batchnorm`), trained
without projection, then certified by :func:`train.bn_aware.certify_folded_train_state` (what
the loop runs with ``project_bn_aware=True``). Prints test error and the certified network
bound (:func:`train.report.network_report_nnx`'s ``lipschitz_upper``) of each, the capped
model's largest ``capped_excess`` before certification (how much the certification had to
rescale) and its network bound before certification.

Usage: ``PYTHONPATH=$PWD python benchmarks/capped_bn_digits.py --c 3 --recipe sgd``.
"""

from __future__ import annotations

from train.lapack_workaround import avoid_cpu_lapack_deadlock

avoid_cpu_lapack_deadlock()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from flax.core import FrozenDict  # noqa: E402

RECIPES = {
    "sgd": {},  # The quick preset's: SGD lr 0.1 cosine, wd 5e-4, 300 steps, cross entropy.
    "lip": dict(optimizer="adam", lr=3e-3, weight_decay=0.0, num_steps=800,
                loss_temperature=64.0, loss_margin=0.25),
}


def _evaluate(model, config, label):
    from experiments.certified_robustness import test_set
    from train import report
    from train import robustness

    model.eval()
    x, labels = test_set(config)
    err = float(1 - np.mean(robustness.margins(robustness.logits_of(model, x), labels) > 0))
    t = time.perf_counter()
    r = report.network_report_nnx(
        model, x[:1], data=x[:4], num_points=4, compute_spectra=False, ascent_steps=10,
        power_iterations=5, lower_bound_budget=None)
    upper = r.network["lipschitz_upper"]
    print(f"  [{label}] test error {100 * err:.2f}%  certified upper {upper:.4g}  "
          f"(report {time.perf_counter() - t:.0f}s)", flush=True)
    return err, upper


def plain(c: float, recipe: str, seed: int = 0) -> dict:
    from experiments import sedghi_training as common
    from train import loop

    config = dataclasses.replace(common.QUICK_BASE, seed=seed, project_max_norm=c,
                                 project_every=10, **RECIPES[recipe])
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        out = loop.train_and_evaluate(config, f"{d}/run")
    print(f"plain c={c} {recipe}: trained in {time.perf_counter() - t:.0f}s", flush=True)
    err, upper = _evaluate(out["model"], config, "plain certified")
    return dict(error=err, upper=upper)


def capped(c: float, recipe: str, seed: int = 0, estimate: str = "circulant",
           project_every: int | None = None) -> dict:
    """The capped ResNet; ``project_every``: also the loop's BN-aware projection every that many
    steps and its certification (else no projection, certified here after training)."""
    from experiments import sedghi_training as common
    from train import bn_aware
    from train import distributed
    from train import loop
    from train.capped_batchnorm import capped_excess
    from train.capped_batchnorm import resnet_kernels
    from train.certify import batch_stats_recalibrator

    config = dataclasses.replace(
        common.QUICK_BASE, seed=seed,
        model_kwargs=FrozenDict(norm="capped", cap=float(c), cap_estimate=estimate),
        **RECIPES[recipe])
    if project_every is not None:
        config = dataclasses.replace(config, project_bn_aware=True, project_max_norm=float(c),
                                     project_every=project_every)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        out = loop.train_and_evaluate(config, f"{d}/run")
    print(f"capped c={c} {recipe} {estimate}: trained in {time.perf_counter() - t:.0f}s",
          flush=True)
    model = out["model"]
    if project_every is not None:
        meta = out["certification"]
        print(f"  loop certification: rounds {meta['bn_certify_rounds']}, last ratio "
              f"{meta['bn_last_round_ratio']:.4f}", flush=True)
        err, upper = _evaluate(model, config, f"capped + projection every {project_every}")
        return dict(error=err, upper=upper, rounds=meta["bn_certify_rounds"])
    err0, upper0 = _evaluate(model, config, "capped, before certification")
    excess = capped_excess(model, resnet_kernels(model))
    print(f"  largest certified bound / c of an applied capped layer: {max(excess.values()):.4f}"
          f" (mean {np.mean(list(excess.values())):.4f})", flush=True)

    # The certification the loop runs with project_bn_aware=True, on the trained model.
    cfg = dataclasses.replace(config, project_bn_aware=True, project_max_norm=float(c))
    _, train_data, _, example = loop._data_and_model(cfg, model, None, None)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    folds = bn_aware.find_batchnorm_folds(model, example)
    state = types.SimpleNamespace(params=nnx.as_pure(params), rest=nnx.as_pure(rest))
    mesh = distributed.make_mesh(cfg.distributed.num_devices)
    recal = batch_stats_recalibrator(cfg, graphdef, train_data, mesh)
    params, rest, _, meta = bn_aware.certify_folded_train_state(
        cfg, out["specs"], state, mesh, recal, folds)
    nnx.update(model, params, rest)
    print(f"  certification: rounds {meta['bn_certify_rounds']}, last ratio "
          f"{meta['bn_last_round_ratio']:.4f}, stats match {meta['bn_stats_match_params']}",
          flush=True)
    err, upper = _evaluate(model, config, "capped certified")
    return dict(error=err, upper=upper, error_before=err0, upper_before=upper0,
                excess=max(excess.values()), rounds=meta["bn_certify_rounds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--c", type=float, nargs="+", default=[3.0])
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="sgd")
    parser.add_argument("--which", choices=("both", "plain", "capped"), default="both")
    parser.add_argument("--estimate", default="circulant")
    parser.add_argument("--project-every", type=int, default=None,
                        help="capped rows: also project_bn_aware every this many steps")
    parser.add_argument("--json", default=None, help="append results as JSON lines here")
    args = parser.parse_args()
    for c in args.c:
        row = dict(c=c, recipe=args.recipe, estimate=args.estimate,
                   project_every=args.project_every)
        if args.which in ("both", "plain"):
            row["plain"] = plain(c, args.recipe)
        if args.which in ("both", "capped"):
            row["capped"] = capped(c, args.recipe, estimate=args.estimate,
                                   project_every=args.project_every)
        if "plain" in row and "capped" in row:
            row["ratio"] = row["plain"]["upper"] / row["capped"]["upper"]
            print(f"c={c} {args.recipe}: ratio plain/capped upper {row['ratio']:.3g}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
