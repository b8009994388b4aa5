"""Time one training step of ResNet-20 (32x32, batch 128) without and with the projection.

One jitted training step (forward, backward, BatchNorm batch statistics, weight decay 5e-4 on
kernels, SGD with momentum 0.9 at lr 0.1, as ``train``'s default optimiser) of ResNet-20
(width 16, zero padding, shortcut A, 10 classes) on a fixed random batch of 128 images
32x32x3, float32, compared with the same step where :func:`train.project_conv_operator_norm`
(last in the chain, radius ``c``) projects all 19 conv kernels:

* every step with one method (``--methods``: ``certified``, ``sedghi``, ``dykstra``,
  ``rescale``, ``power``; ``--rounds`` rounds / power iterations);
* the **hybrid** (``--certify-every``): ``method='power'`` every step plus a certified rescale
  (``--certify-method``) after every k-th update, one row per ``k``;
* the same hybrid through the training loop's optimiser (``--loop-certify-every k``, default
  10; ``0``: no such row): ``train.make_optimizer(TrainConfig(schedule='constant', ...,
  project_method='power', project_certify_every=k))``, i.e. the same chain wrapped in
  ``optax.inject_hyperparams`` (traced learning rate and radius), as ``python -m train`` runs it;
* the **capped BatchNorm** ResNet-20 (``--capped``, on by default: ``norm='capped'``, cap ``c``,
  :class:`train.capped_batchnorm.CappedBatchNorm`, one power step of the folded circulant
  embedding per BatchNorm call, nothing projected after the step); its end column is the
  certified bound of its evaluation-mode applied folded operators over ``c``;
* the **BatchNorm-aware** projection through the loop's optimiser (``--bn-aware method:k``,
  default ``certified:10 power:1``): ``train.make_optimizer(TrainConfig(..., project_bn_aware=
  True, project_method=method, project_every=k), specs, folds=folds)``
  (:func:`train.bn_aware.project_batchnorm_folded`: gamma and beta of the 19 BatchNorms rescaled
  so that every BN-folded conv has σ_max <= c with the step's running variances, passed as
  ``batch_stats``), each beside the same row without ``project_bn_aware`` (the kernels alone).

All variants run in one process, interleaved (one step of each per round, timed with
``benchmarks/_timing.time_all``, so that load drifts hit all alike), ``--steps`` measured steps
after ``--warmup`` steps (compilation excluded), each to ``block_until_ready``. Printed per
variant: the median step, the mean step over the measured steps (it contains the certified
steps in their proportion), the overhead of the mean over the plain median, and for hybrids the
median of the certifying steps and the amortised overhead ``((k-1) median_power + median_certify)
/ k / median_plain - 1``. At every certified point of a hybrid and at the end, the largest
σ_max / c over the convs: Lanczos (``spectra.spectral_norm(..., 'lanczos')``, exact to its
tolerance, a lower value) and the certified float64 upper bound of
:func:`train.certify.certified_upper_bound` (circulant embedding, ``>=`` exact). At the end,
every variant's final params also go through :func:`train.certify.certify_conv_operator_norm`.

Usage: ``python benchmarks/bench_train_step.py [--steps 50] [--warmup 2] [--methods power]
[--certify-every 10 50]``.
"""

from __future__ import annotations

from train.lapack_workaround import avoid_cpu_lapack_deadlock

avoid_cpu_lapack_deadlock()  # Before the first JAX computation (see its docstring).

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import spectra  # noqa: E402
from benchmarks._timing import markdown  # noqa: E402
from benchmarks._timing import time_all  # noqa: E402
from train import discovery  # noqa: E402
from train.bn_aware import find_batchnorm_folds  # noqa: E402
from train.capped_batchnorm import capped_excess  # noqa: E402
from train.capped_batchnorm import resnet_kernels  # noqa: E402
from train.certify import certified_upper_bound  # noqa: E402
from train.certify import certify_conv_operator_norm  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.models.resnet import ResNet  # noqa: E402
from train.optim import make_optimizer  # noqa: E402
from train.transforms import CERTIFIED_METHODS  # noqa: E402
from train.transforms import PROJECT_METHODS  # noqa: E402
from train.transforms import project_conv_operator_norm  # noqa: E402


class Variant:
    """One variant's jitted train step and its state (compiled by the first step)."""

    def __init__(
        self, projection, batch: tuple, certify_every: int | None = None, make_tx=None,
        folded: bool = False, model_kwargs: dict | None = None,
    ):
        self.model_kwargs = dict(model_kwargs or {})
        model = ResNet(20, 10, in_channels=3, padding="SAME", rngs=nnx.Rngs(0),
                       **self.model_kwargs)
        self.specs = discovery.find_convs_nnx(model, batch[0][:1])
        folds = find_batchnorm_folds(model, batch[0][:1]) if folded else ()
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params, rest = nnx.as_pure(params), nnx.as_pure(rest)
        parts = [
            optax.add_decayed_weights(5e-4, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
            optax.sgd(0.1, momentum=0.9),
        ]
        if projection is not None:
            parts.append(projection(self.specs))
        if make_tx is None:
            tx = optax.chain(*parts)
        elif folded:
            tx = make_tx(self.specs, folds)
        else:
            tx = make_tx(self.specs)
        self.certify_every = certify_every
        self.state = (params, rest, tx.init(params))
        self.batch = batch
        self.num_updates = 0
        self.times: list[float] = []
        self.certify_times: list[float] = []
        self.checks: list[tuple[int, float, float]] = []

        def loss_fn(params, rest, image, label):
            model = nnx.merge(graphdef, params, rest)
            logits = model(image)
            new_rest = nnx.as_pure(nnx.split(model, nnx.Param, ...)[2])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()
            return loss, new_rest

        @jax.jit
        def step(state, image, label):
            params, rest, opt_state = state
            grads, rest = jax.grad(loss_fn, has_aux=True)(params, rest, image, label)
            extra = {"batch_stats": rest} if folded else {}
            updates, opt_state = tx.update(grads, opt_state, params, **extra)
            return optax.apply_updates(params, updates), rest, opt_state

        self._step = step
        self.graphdef = graphdef

    @property
    def capped(self) -> bool:
        return self.model_kwargs.get("norm") == "capped"

    def capped_ratio(self) -> float:
        """Max over the capped layers of the certified bound of the evaluation-mode applied
        folded operator over its cap (:func:`train.capped_batchnorm.capped_excess`)."""
        model = nnx.merge(self.graphdef, self.state[0], self.state[1])
        model.eval()
        return max(capped_excess(model, resnet_kernels(model)).values())

    def certifies_next(self) -> bool:
        return self.certify_every is not None and (self.num_updates + 1) % self.certify_every == 0

    def step(self) -> None:
        self.state = self._step(self.state, *self.batch)
        jax.block_until_ready(self.state)
        self.num_updates += 1

    def kernels(self, params=None):
        params = self.state[0] if params is None else params
        leaves = jax.tree.leaves(params)
        aligned = discovery.align_with_params(params, self.specs, "specs")
        return [(k, s) for k, s in zip(leaves, aligned) if s is not None]

    def sigma_ratios(self, max_norm: float, params=None) -> tuple[float, float]:
        """``(max Lanczos σ_max / c, max certified upper bound / c)`` over the convs."""
        lanczos, bound = [], []
        for kernel, spec in self.kernels(params):
            lanczos.append(float(spectra.spectral_norm(kernel, spec, "lanczos")))
            bound.append(certified_upper_bound(kernel, spec))
        return max(lanczos) / max_norm, max(bound) / max_norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--methods", nargs="*", default=list(PROJECT_METHODS),
                        choices=PROJECT_METHODS, help="projections every step to time")
    parser.add_argument("--rounds", type=int, nargs="+", default=[1],
                        help="num_rounds values (power iterations for 'power') to time")
    parser.add_argument("--certify-every", type=int, nargs="*", default=[10, 50],
                        help="hybrid rows: power every step, certified every k-th update")
    parser.add_argument("--certify-method", default="rescale", choices=CERTIFIED_METHODS)
    parser.add_argument("--loop-certify-every", type=int, default=10,
                        help="the hybrid through train.make_optimizer, certified every k-th "
                        "update (0: no such row)")
    parser.add_argument("--bn-aware", nargs="*", default=["certified:10", "power:1"],
                        help="BN-aware rows 'method:k' (projection every k-th update), each "
                        "with its kernel-only counterpart")
    parser.add_argument("--capped", action=argparse.BooleanOptionalAction, default=True,
                        help="a row for the ResNet-20 with CappedBatchNorm (norm='capped', cap "
                        "c: the folded conv + BatchNorm capped in the forward pass, nothing "
                        "projected)")
    args = parser.parse_args()
    c = args.max_norm

    rng = np.random.default_rng(0)
    batch = (
        jnp.asarray(rng.normal(size=(args.batch, 32, 32, 3)).astype(np.float32)),
        jnp.asarray(rng.integers(0, 10, size=args.batch).astype(np.int32)),
    )

    def projection(**kwargs):
        return lambda specs: project_conv_operator_norm(c, specs, **kwargs)

    configs = [("plain SGD", None, None, None, False, None)]
    for m in args.methods:
        for r in args.rounds:
            label = f"{m}, {r} round{'s' * (r > 1)}, every step"
            configs.append((label, projection(method=m, num_rounds=r), None, None, False, None))
    for k in args.certify_every:
        label = f"power every step + {args.certify_method} every {k}"
        kw = dict(method="power", certify_every=k, certify_method=args.certify_method)
        configs.append((label, projection(**kw), k, None, False, None))
    if args.loop_certify_every:
        k = args.loop_certify_every
        config = TrainConfig(
            lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="constant", project_max_norm=c,
            project_method="power", project_certify_every=k,
            project_certify_method=args.certify_method,
        )
        label = f"train.make_optimizer: power + {args.certify_method} every {k}"
        configs.append((label, None, k, lambda specs: make_optimizer(config, specs), False,
                        None))
    for item in args.bn_aware:
        m, k = item.split(":")
        for bn in (False, True):
            config = TrainConfig(
                lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="constant",
                project_max_norm=c, project_method=m, project_every=int(k), project_bn_aware=bn,
            )
            label = f"make_optimizer: {'BN-aware ' if bn else ''}{m}, every {k}"

            def make(specs, folds=(), config=config):
                return make_optimizer(config, specs, folds=folds)

            configs.append((label, None, None, make, bn, None))
    if args.capped:
        capped = dict(norm="capped", cap=c, input_size=(32, 32))
        configs.append((f"CappedBatchNorm c={c:g} (forward-pass cap, no projection)", None, None,
                        None, False, capped))

    print(f"# ResNet-20, 32x32x3, batch {args.batch}, float32, device "
          f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs "
          f"visible, 1 BLAS thread (threadpoolctl); {args.steps} interleaved steps per variant "
          f"after {args.warmup} warm-up steps; c = {c}")
    runs = {}
    for label, proj, k, make_tx, folded, model_kwargs in configs:
        t0 = time.perf_counter()
        runs[label] = Variant(proj, batch, k, make_tx, folded, model_kwargs)
        for _ in range(args.warmup):
            runs[label].step()
        print(f"  compiled {label} ({time.perf_counter() - t0:.0f} s)", flush=True)

    for _ in range(args.steps):
        for label, run in runs.items():
            certifying = run.certifies_next()
            seconds = time_all({label: run.step}, 1)[label]
            (run.certify_times if certifying else run.times).append(seconds)
            if certifying:
                run.checks.append((run.num_updates, *run.sigma_ratios(c)))

    plain = statistics.median(runs["plain SGD"].times)
    # Certifying steps of all hybrids (same certify method): a k with no certified point among
    # the measured steps still gets its amortised overhead from them.
    pooled = [t for run in runs.values() for t in run.certify_times]
    headers = ["variant", "median step", "mean step", "overhead (mean)", "certify step",
               "amortised overhead", "max σ/c end (Lanczos)", "max bound/c end"]
    rows = []
    for label, run in runs.items():
        all_times = run.times + run.certify_times
        mean = statistics.fmean(all_times)
        median = statistics.median(run.times)
        if run.capped:  # The folded applied operators, not the (uncapped) kernels.
            lanczos_text, bound_text = "-", f"{run.capped_ratio():.6f} (folded, eval)"
        else:
            lanczos, bound = run.sigma_ratios(c)
            lanczos_text, bound_text = f"{lanczos:.6f}", f"{bound:.6f}"
        certify, amortised = "-", "-"
        if run.certify_every:
            k = run.certify_every
            if pooled:
                med_c = statistics.median(run.certify_times or pooled)
                certify = f"{1e3 * med_c:.0f} ms" + ("" if run.certify_times else " (pooled)")
                amortised = f"{100 * (((k - 1) * median + med_c) / k / plain - 1):.1f}%"
        rows.append([label, f"{1e3 * median:.0f} ms", f"{1e3 * mean:.0f} ms",
                     f"{100 * (mean / plain - 1):.1f}%", certify, amortised,
                     lanczos_text, bound_text])
    print()
    print(markdown(headers, rows))

    print("\nCertified points of the hybrids (after update n; max over the 19 convs):")
    for label, run in runs.items():
        for n, lanczos, bound in run.checks:
            print(f"  {label}: n={n}: σ/c (Lanczos) {lanczos:.6f}, certified bound/c {bound:.6f}")

    print("\nAt the end, certify_conv_operator_norm(method='certified') on each variant's params:")
    for label, run in runs.items():
        if run.capped:  # Its kernels are not what it caps (train.bn_aware certifies it).
            continue
        certified, report = certify_conv_operator_norm(run.state[0], run.specs, c)
        lanczos, _ = run.sigma_ratios(c, certified)
        print(f"  {label}: certified={report.certified}, changed={report.any_changed}, "
              f"max bound/c {report.max_ratio:.6f}, max σ/c (Lanczos) {lanczos:.6f}")
    print(f"\nTarget: hybrid overhead <= 25% with every layer's σ_max <= c (1 + 1e-4) at each "
          f"certified point and at the end. Median and mean over {args.steps} steps; the "
          "amortised column is derived from the medians of the plain-power and certifying steps.")


if __name__ == "__main__":
    with threadpool_limits(limits=1, user_api="blas"):
        main()
