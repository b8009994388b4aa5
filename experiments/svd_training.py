"""Yang et al. (2020), SVD training: accuracy vs FLOPs after energy pruning (Pareto front).

For every model of the preset: the undecomposed baseline, then for every (decomposition,
sparsity) pair (channel / spatial x L1 / Hoyer) the four-stage pipeline of
:func:`train.svd_pipeline.run_svd_pipeline`: (1) train the network in SVD form with the
orthogonality term λ_o, (2) continue with the sparsity term λ_s, (3) prune every layer's
singular values by energy ``e`` (the removed energy of each layer is at most the fraction
``e`` of its ``Σ s²``), (4) fine-tune each pruned, compact network (λ_s = 0, λ_o kept).

Reported per ``e``: test accuracy after pruning (before fine-tuning) with the BatchNorm running
statistics of the unpruned network and after re-estimating them on training batches
(:func:`train.batchnorm.recalibrate_batch_stats`, stage 3 of the pipeline), after fine-tuning,
%FLOPs reduction relative to the undecomposed baseline (MACs per example of the convs and
matmuls, exact, counted on the traced forward pass by :func:`train.flops.count_flops`; the
paper's FLOPs convention), trainable parameters, and the mean over the SVD layers of the kept
rank / full rank. The full-rank decomposed network after stage 2 is also listed (``e = -``;
its FLOPs are above the baseline's: a full-rank factorisation costs more than the conv).

Quick preset: digits zero-padded to 12x12, a CIFAR ResNet-20 of width 8, a few hundred steps
per stage on a CPU (a few CPU minutes; the caption reports the measured wall time): a
smoke-scale run whose numbers are not comparable with the paper's. Paper preset: CIFAR-10,
ResNet-20/32/56/110, Adam lr 1e-3, batch 100, 164 epochs per stage, lr x0.1 at epochs 81 and
122, crop + flip augmentation, λ_o = 1 and the released λ_s of the reference notes §3 (only the
(depth, decomposition, sparsity) triples with a released λ_s are run). The paper's accuracies
are not known here (notes §3, [NR]): nothing is compared with a number from the paper.
"""

from __future__ import annotations

import dataclasses
import pathlib
import statistics
import time
from typing import Any

from experiments import _report
from train import loop
from train.batches import example_input
from train.builders import build_data
from train.checkpoint import CHECKPOINT_DIR
from train.config import TrainConfig
from train.lapack_workaround import avoid_cpu_lapack_deadlock

avoid_cpu_lapack_deadlock()  # Before the first JAX computation of this process, if any.

NAME = "svd_training"

#: Digits padded to 12x12, a width-8 CIFAR ResNet-20, Adam; stage lengths in ``stage_steps``.
QUICK_BASE = TrainConfig(
    dataset="digits",
    image_pad=2,
    model="resnet20",
    width=8,
    batch_size=64,
    eval_batch_size=512,
    num_steps=200,
    optimizer="adam",
    lr=3e-3,
    schedule="cosine",
    weight_decay=0.0,
    orth_weight=1.0,
    log_every=50,
    progress=False,
)

#: CIFAR-10, the paper's optimiser: Adam lr 1e-3, batch 100, 164 epochs (500 steps each),
#: lr x0.1 at epochs 81 and 122; crop + flip augmentation; λ_o = 1.
_CIFAR_EPOCH = 50000 // 100
PAPER_BASE = TrainConfig(
    dataset="cifar10",
    augment=True,
    model="resnet20",
    width=16,
    batch_size=100,
    eval_batch_size=1000,
    num_steps=164 * _CIFAR_EPOCH,
    optimizer="adam",
    lr=1e-3,
    schedule="piecewise",
    boundaries=(81 / 164, 122 / 164),
    decay_factor=0.1,
    weight_decay=0.0,
    orth_weight=1.0,
    log_every=500,
    checkpoint_every=5 * _CIFAR_EPOCH,
    progress=True,
)

TEST_BASE = dataclasses.replace(
    QUICK_BASE, model="simple_cnn", image_pad=0, width=4, batch_size=32, num_steps=3, log_every=3
)

#: Released λ_s of Yang et al. 2020 (reference notes §3) per (depth, decomposition, sparsity).
RELEASED_SPARSITY_WEIGHTS: dict[tuple[int, str, str], float] = {
    (20, "channel", "hoyer"): 0.07,
    (20, "channel", "l1"): 0.3,
    (20, "spatial", "hoyer"): 0.1,
    (20, "spatial", "l1"): 0.3,
    (32, "channel", "hoyer"): 0.03,
    (32, "channel", "l1"): 0.1,
    (56, "channel", "hoyer"): 1e-3,
    (56, "channel", "l1"): 0.3,
    (110, "channel", "hoyer"): 1e-3,
    (110, "channel", "l1"): 0.1,
}

VARIANTS = (("channel", "l1"), ("channel", "hoyer"), ("spatial", "l1"), ("spatial", "hoyer"))

#: Each preset: ``models`` = ``[(model name, [(decomposition, sparsity, λ_s)])]``.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(
        base=QUICK_BASE,
        models=[("resnet20", [(d, s, RELEASED_SPARSITY_WEIGHTS[(20, d, s)]) for d, s in VARIANTS])],
        energies=(0.02, 0.1),
        stage_steps=(200, 200, 100),
        note=(
            "ResNet-20 at width 8 (instead of 16) for CPU time. λ_s: the released ResNet-20 "
            "values."
        ),
    ),
    "paper": dict(
        base=PAPER_BASE,
        models=[
            (f"resnet{depth}", [
                (d, s, RELEASED_SPARSITY_WEIGHTS[(depth, d, s)]) for d, s in VARIANTS
                if (depth, d, s) in RELEASED_SPARSITY_WEIGHTS
            ])
            for depth in (20, 32, 56, 110)
        ],
        energies=(1e-4, 1e-3, 1e-2, 5e-2, 0.1, 0.3),
        stage_steps=(164 * _CIFAR_EPOCH,) * 3,
        note=(
            "Spatial-wise ResNet-32/56/110 are not run: their λ_s is not among the released "
            "commands (reference notes §3)."
        ),
    ),
    "test": dict(
        base=TEST_BASE,
        models=[("simple_cnn", [("channel", "l1", 0.3), ("spatial", "hoyer", 0.1)])],
        energies=(0.1,),
        stage_steps=(3, 3, 2),
        note="The hidden test preset: a tiny SimpleCNN.",
    ),
}

HEADERS = (
    "model", "decomposition", "sparsity", "λ_s", "e", "test acc % (pruned)",
    "test acc % (pruned + BN recal.)", "test acc % (final)", "%FLOPs reduction",
    "MACs / example", "params", "mean kept rank fraction",
)


def _train_baseline(config: TrainConfig, run_dir: pathlib.Path, data: dict[str, Any]):
    """Trains (or resumes, or reads back) the undecomposed baseline in ``run_dir``."""
    from train import flops

    resume = (run_dir / CHECKPOINT_DIR).exists()
    result = loop.train_and_evaluate(config, run_dir, resume=resume, **data)
    example = example_input(data["train_data"])
    return {
        "test_accuracy": result["test_accuracy"],
        "params": flops.count_params(result["model"]),
        "flops": flops.count_flops(result["model"], example),
    }


def _kept_fraction(ranks: dict[str, int], full: dict[str, int]) -> float:
    return statistics.fmean(ranks[p] / full[p] for p in full)


def _plot(series_by_model, baselines, out_dir: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    models = list(series_by_model)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, (label, points) in enumerate(series_by_model[model]):
            xs = [p[0] for p in points]
            ax.plot(xs, [p[3] for p in points], marker="o", color=f"C{i}", label=label)
            ax.plot(xs, [p[2] for p in points], marker="+", linestyle="--", color=f"C{i}",
                    alpha=0.6)
            ax.plot(xs, [p[1] for p in points], marker="x", linestyle=":", color=f"C{i}",
                    alpha=0.6)
        ax.scatter([0.0], [100 * baselines[model]["test_accuracy"]], marker="*", s=180,
                   color="k", zorder=5, label="baseline (undecomposed)")
        ax.set_xlabel("FLOPs reduction vs baseline (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model}: fine-tuned (solid); before fine-tuning: pruned (dotted),\n"
                     "pruned + BatchNorm statistics recalibrated (dashed)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _report.save_figure(fig, out_dir, NAME)


def run(preset: str, out_dir: pathlib.Path) -> str:
    """Runs the baseline and every SVD-training pipeline; writes ``svd_training.md``/``.png``."""
    from train import svd_pipeline

    setting = _report.preset_config(PRESETS, preset)
    out_dir = pathlib.Path(out_dir)
    started = time.perf_counter()
    base, energies, stage_steps = setting["base"], setting["energies"], setting["stage_steps"]
    rows, series_by_model, baselines = [], {}, {}
    with _report.runs_folder(preset, out_dir) as root:
        train_data, test_data, _ = build_data(base)
        data = dict(train_data=train_data, test_data=test_data)
        for model_name, variants in setting["models"]:
            plain = dataclasses.replace(
                base, model=model_name, num_steps=stage_steps[0], decomposition=None,
                orth_weight=0.0, sparsity_weight=0.0,
            )
            baseline = _train_baseline(plain, root / f"{model_name}_baseline", data)
            baselines[model_name] = baseline
            rows.append([
                model_name, "none (baseline)", "-", "-", "-", "-", "-",
                f"{100 * baseline['test_accuracy']:.2f}", "0.0", str(baseline["flops"]),
                str(baseline["params"]), "-",
            ])
            series = []
            for decomposition, sparsity, weight in variants:
                config = dataclasses.replace(
                    base, model=model_name, decomposition=decomposition, sparsity=sparsity
                )
                result = svd_pipeline.run_svd_pipeline(
                    config, root / f"{model_name}_{decomposition}_{sparsity}",
                    sparsity_weight=weight, energies=energies, stage_steps=stage_steps, **data,
                )

                def reduction(macs: int, baseline_macs: int = baseline["flops"]) -> float:
                    return 100.0 * (1.0 - macs / baseline_macs)

                full = result["stage2"]
                rows.append([
                    model_name, decomposition, sparsity, f"{weight:g}", "- (full rank)",
                    "-", "-", f"{100 * full['test_accuracy']:.2f}",
                    f"{reduction(full['flops']):.1f}", str(full["flops"]), str(full["params"]),
                    "1.000",
                ])
                points = []
                for e in energies:
                    pruned, tuned = result["stage3"][e], result["stage4"][e]
                    points.append((
                        reduction(tuned["flops"]),
                        100 * pruned["pruned_test_accuracy"],
                        100 * pruned["test_accuracy"],
                        100 * tuned["test_accuracy"],
                    ))
                    rows.append([
                        model_name, decomposition, sparsity, f"{weight:g}", f"{e:g}",
                        f"{100 * pruned['pruned_test_accuracy']:.2f}",
                        f"{100 * pruned['test_accuracy']:.2f}",
                        f"{100 * tuned['test_accuracy']:.2f}",
                        f"{reduction(tuned['flops']):.1f}", str(tuned["flops"]),
                        str(tuned["params"]),
                        f"{_kept_fraction(tuned['ranks'], full['ranks']):.3f}",
                    ])
                series.append((f"{decomposition}, {sparsity} (λ_s={weight:g})", points))
            series_by_model[model_name] = series

    _plot(series_by_model, baselines, out_dir)
    elapsed = time.perf_counter() - started
    n1, n2, n4 = stage_steps
    setup = (
        f"{', '.join(series_by_model)} (width {base.width}) on {base.dataset}"
        f"{' padded to 12x12' if base.image_pad == 2 else ''}, {base.optimizer.upper()} lr "
        f"{base.lr:g} ({base.schedule}), batch {base.batch_size}, weight decay "
        f"{base.weight_decay:g}, λ_o = {base.orth_weight:g}; stage lengths {n1} (decomposed), "
        f"{n2} (+ sparsity), {n4} (fine-tuning) steps; baseline: the undecomposed network, "
        f"{n1} steps; energies e = {list(energies)}; seed {base.seed}"
    )
    text = (
        "## Yang et al. 2020: SVD training, energy pruning, accuracy vs FLOPs\n\n"
        f"Set-up ({preset} preset, {elapsed:.0f} s wall time): {setup}. {setting['note']}\n\n"
        "Columns: test accuracy of the pruned compact network before fine-tuning, with the "
        "BatchNorm running statistics of the unpruned network (pruned) and with statistics "
        "re-estimated on one epoch of training batches (pruned + BN recal.: the exact average "
        "of the batch means and variances, forward passes only, no parameter changes; the "
        "network that is saved and fine-tuned), and after fine-tuning (final; for `e = -` and "
        "the baseline: at the end of their training); "
        "%FLOPs reduction = 1 - MACs / baseline MACs (MACs per example of every conv and "
        "matmul, exact for the traced forward pass); params = trainable scalars (BatchNorm "
        "statistics excluded); mean kept rank fraction = mean over the SVD layers (convs and "
        "classifier) of kept rank / full rank. `e = -` is the full-rank decomposed network "
        "after the sparsity stage (more MACs than the baseline).\n\n"
        + _report.markdown_table(HEADERS, rows)
        + "\nWhy (pruned) can be near chance: pruning removes up to the fraction e of the "
        "energy of every layer, so the activations entering every BatchNorm change their mean "
        "and variance while the network still normalises with the statistics of the unpruned "
        "one; the mismatch compounds through the depth (at large e the network can predict "
        "one class for every image). Recalibrating the statistics removes that part of the "
        "loss; the rest is the change of the function itself, which fine-tuning recovers.\n"
        "\nThe paper's accuracies and FLOPs reductions are not known here (reference notes "
        "§3, [NR]); nothing is compared with them. One seed per row: differences of a few "
        "tenths of a percent are within seed noise.\n\n"
        f"![SVD training: accuracy vs FLOPs reduction]({NAME}.png)\n"
    )
    _report.write_markdown(text, out_dir, NAME)
    return text


if __name__ == "__main__":
    _report.cli(run, "Yang et al. 2020: SVD training, energy pruning, accuracy vs FLOPs.")
