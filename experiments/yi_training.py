"""Yi (2020), training: a spectral-norm upper bound of every conv as a regulariser (λ sweep).

The loss is ``cross entropy + λ · Σ_layers B(K_l)`` with ``B`` a certified upper bound on each
layer's σ_max (:func:`train.spectral_penalty`, default ``'gram_iteration'``: Gram iteration on
the layer's exact circulant embedding, Delattre et al. 2023, matmuls only, differentiable). Yi's
own bounds and regularisation weights are not known from the abstract (reference notes §1, [NR]);
the abstract only says that such bounds, used as regularisers, improve the generalisation of
ResNets. Reported per λ (and the unregularised baseline): test error (mean ± std over seeds) and
the exact σ_max of every conv layer at the end (dense SVD of the zero-padded operator at the
layer's real input size).

Quick preset: the ResNet-8 / 12x12 digits set-up of :mod:`experiments.sedghi_training` (the
baseline runs are shared with it when both run in one process). Paper preset: CIFAR-10 ResNet-32,
λ in {1e-4, 1e-3, 1e-2}.
"""

from __future__ import annotations

import pathlib
import statistics
from typing import Any

from experiments import _report
from experiments import sedghi_training as common  # Its presets, runs and plots.
from train.lapack_workaround import avoid_cpu_lapack_deadlock

avoid_cpu_lapack_deadlock()  # Before the first JAX computation of this process, if any.

NAME = "yi_training"

PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(base=common.QUICK_BASE, seeds=(0, 1, 2, 3, 4), weights=(1e-3, 1e-2, 1e-1),
                  bound="gram_iteration"),
    "paper": dict(base=common.PAPER_BASE, seeds=(0, 1, 2), weights=(1e-4, 1e-3, 1e-2),
                  bound="gram_iteration"),
    "test": dict(base=common.TEST_BASE, seeds=(0,), weights=(1e-2,), bound="gram_iteration"),
}

HEADERS = ("λ", "bound", "seeds", "test error % (mean ± std)", "max layer σ_max (mean)",
           "Σ layer σ_max (mean)", "step ms (median)")


def run(preset: str, out_dir: pathlib.Path) -> str:
    """Trains the baseline and every λ over the seeds; writes ``yi_training.md`` and ``.png``."""

    setting = _report.preset_config(PRESETS, preset)
    out_dir = pathlib.Path(out_dir)
    base, seeds, bound = setting["base"], setting["seeds"], setting["bound"]
    weights = (0.0, *setting["weights"])
    variants = [
        (weight, dict(penalty_weight=weight, penalty_bound=bound) if weight else {})
        for weight in weights
    ]
    results = [
        (weight, per_seed)
        for weight, _, per_seed in _report.run_variants(
            preset, out_dir, base, variants, seeds,
            lambda config, root, seed: common.train_once(config, root, f"yi_s{seed}"),
        )
    ]

    layer_names = results[0][1][0]["layers"]  # Depth order.
    rows, layer_rows = [], []
    for weight, per_seed in results:
        rows.append([
            "0 (baseline)" if weight == 0 else f"{weight:g}",
            "-" if weight == 0 else bound,
            str(len(per_seed)),
            common.format_mean_std([r["test_error"] for r in per_seed]),
            f"{statistics.fmean(max(r['sigma_max'].values()) for r in per_seed):.3f}",
            f"{statistics.fmean(sum(r['sigma_max'].values()) for r in per_seed):.3f}",
            f"{1000 * statistics.median(r['step_time_s'] for r in per_seed):.1f}",
        ])
    for name in layer_names:
        layer_rows.append([name.replace(".kernel", "")] + [
            f"{statistics.fmean(r['sigma_max'][name] for r in per_seed):.3f}"
            for _, per_seed in results
        ])
    layer_headers = ["layer"] + [
        "baseline" if w == 0 else f"λ={w:g}" for w, _ in results
    ]

    common.plot_error_and_sigma(
        [("baseline" if w == 0 else f"λ = {w:g}", per_seed) for w, per_seed in results],
        out_dir, NAME, sigma_log=False,
    )

    text = (
        "## Yi 2020: spectral-norm-bound regularisation\n\n"
        f"Set-up ({preset} preset): the model and optimiser of `sedghi_training` "
        f"({base.model}, width {base.width}, {base.dataset}, {base.num_steps} steps, seeds "
        f"{list(seeds)}); loss = cross entropy + λ · Σ_layers `{bound}` bound (a certified "
        "upper bound on each layer's σ_max). σ_max columns: exact (dense SVD of each layer's "
        "operator at its real input size) at the end of training.\n\n"
        + _report.markdown_table(HEADERS, rows)
        + "\nExact σ_max per layer (depth order) at the end (mean over seeds):\n\n"
        + _report.markdown_table(layer_headers, layer_rows)
        + "\nYi's own bounds, λ values and accuracies are not known from the abstract; nothing "
        "here is compared with a number from the paper. With BatchNorm after every conv the "
        "penalty mostly rescales the kernels (BatchNorm undoes a scale), so lower σ_max need "
        "not change the function; differences smaller than the std over seeds are noise.\n\n"
        f"![Yi training]({NAME}.png)\n"
    )
    _report.write_markdown(text, out_dir, NAME)
    return text


if __name__ == "__main__":
    _report.cli(run, "Yi 2020: spectral-norm-bound regularisation, a λ sweep.")
