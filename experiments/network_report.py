"""The spectral report of trained ResNets: baseline vs projected vs Yi-regularised.

Each model is trained with :func:`train.train_and_evaluate`, restored from its checkpoint
(:func:`train.restore_model`, BatchNorm in eval mode) and reported with
:func:`train.report.network_report_nnx`. Per model: the **certified** ℓ2 Lipschitz upper bound
of the whole network (composition over its jaxpr of exact / certified layer norms with
BatchNorm folded into the convs, exact activation and pooling constants), the **lower bound**
(:func:`train.report.search_lower_bound` from test images: Jacobian power iteration, pair
ascent, power iteration along the best pair; a realised ratio or ``||J(x) v||``, so a true lower
bound, with its witness), the soundness check of the upper bound on the lower bound's own pairs
and random pairs near the test images (:func:`train.report.check_upper_bound`), their gap, the
largest exact layer σ_max, the largest σ_max of a BN-folded conv (the operator the network
really applies), and the product of the layers' norms (the naive bound, without BN).

Variants: the ``sedghi_training`` set-up (quick: ResNet-8 of width 8 on 12x12 digits);
``projected``: :func:`train.project_conv_operator_norm` (certified, ``c = 1``, every 10 steps);
``BN-aware``: the same with ``project_bn_aware`` (:mod:`train.bn_aware`: the BatchNorm-folded
operators projected and certified instead of the kernels);
``yi``: :func:`train.spectral_penalty` (Gram iteration bound, ``λ = 10^-2``).
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from experiments import _report
from experiments import sedghi_training as common  # Sets the CPU deadlock workaround.
from train import loop
from train.checkpoint import make_run_dir

NAME = "network_report"

_VARIANTS = (
    ("baseline", {}),
    ("projected c=1, every 10", dict(project_max_norm=1.0, project_every=10)),
    ("BN-aware projected c=1, every 10",
     dict(project_max_norm=1.0, project_every=10, project_bn_aware=True)),
    ("yi λ=0.01", dict(penalty_weight=1e-2, penalty_bound="gram_iteration")),
)

PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(
        base=common.QUICK_BASE, seeds=(0,), variants=_VARIANTS, num_points=8, ascent_steps=400
    ),
    "paper": dict(
        base=common.PAPER_BASE, seeds=(0, 1, 2), variants=_VARIANTS, num_points=64, ascent_steps=500
    ),
    "test": dict(
        base=common.TEST_BASE, seeds=(0,), variants=_VARIANTS[:2], num_points=2, ascent_steps=10
    ),
}

HEADERS = (
    "model",
    "seed",
    "test error %",
    "Lipschitz upper naive (composition)",
    "Lipschitz upper tight (sound)",
    "kind",
    "factor gained",
    "Lipschitz lower",
    "lower: witness (stage values)",
    "gap upper/lower",
    "violations / pairs",
    "max layer σ_max",
    "max BN-folded σ_max",
    "Π layer bounds",
)


def test_points(config, num: int) -> np.ndarray:
    """The first ``num`` test images, zero padded and normalised with the train statistics."""
    from train import datasets

    x_train, _ = datasets.load_split(config.dataset, "train", data_dir=config.data_dir)
    x_test, _ = datasets.load_split(config.dataset, "test", data_dir=config.data_dir)
    if config.image_pad:
        pad = ((0, 0), (config.image_pad,) * 2, (config.image_pad,) * 2, (0, 0))
        x_train, x_test = np.pad(x_train, pad), np.pad(x_test, pad)
    mean, std = datasets.channel_stats(x_train)
    return ((x_test[:num] - mean) / std).astype(np.float32)


#: Random pairs of the soundness check (plus the lower bound's own pairs).
CHECK_PAIRS = 256


def report_once(
    config, root: pathlib.Path, prefix: str, num_points: int, ascent_steps: int = 200
) -> dict[str, Any]:
    """Trains ``config`` in a fresh run folder, restores it and reports it.

    The lower bound's search runs its ``ascent_steps`` in full (``lower_bound_budget=None``: the
    table does not depend on the machine's speed).
    """
    from train import report

    run_dir = make_run_dir(root, prefix)
    result = loop.train_and_evaluate(config, run_dir)
    r = report.report_run(
        run_dir,
        data=test_points(config, num_points),
        num_points=num_points,
        compute_spectra=False,
        ascent_steps=ascent_steps,
        lower_bound_budget=None,
        check_pairs=CHECK_PAIRS,
    )
    net = r.network
    folded = [layer.bn_folded_sigma_max for layer in r.layers if layer.bn_folded_sigma_max]
    return {
        "test_error": result["test_error"],
        "upper": net["lipschitz_upper"],
        "naive": net.get("lipschitz_upper_naive"),
        "kind": net.get("lipschitz_upper_kind"),
        "factor": net.get("lipschitz_upper_factor"),
        "tight_seconds": r.timings.get("tight_bound"),
        "note": net["lipschitz_upper_note"],
        "lower": net["lipschitz_lower"],
        "lower_method": _lower_method(net),
        "soundness": net.get("soundness"),
        "gap": net["lipschitz_gap"],
        "max_sigma": max(layer.sigma_max for layer in r.layers if layer.op == "conv"),
        "max_folded": max(folded) if folded else None,
        "product": net["product_of_layer_upper_bounds"],
        "report": r,
    }


_fmt = _report.fmt_or_dash


def _lower_method(net) -> str:
    """``witness kind (power a, ascent b, refine c)`` of the lower bound's search."""
    w, stages = net.get("lipschitz_lower_witness"), net.get("lipschitz_lower_stages") or {}
    if not w:
        return "—"
    values = ", ".join(f"{k} {v:.4g}" for k, v in stages.items() if v is not None)
    return f"{w['kind']} ({values})"


def _violations(s) -> str:
    return "—" if not s else f"{s['violations']} / {s['num_pairs']}"


def run(preset: str, out_dir: pathlib.Path) -> str:
    """Trains and reports every variant; writes ``network_report.md`` and ``.png``."""
    setting = _report.preset_config(PRESETS, preset)
    out_dir = pathlib.Path(out_dir)
    base, seeds = setting["base"], setting["seeds"]

    def run_one(config, root, seed):
        return report_once(
            config, root, f"report_s{seed}", setting["num_points"], setting["ascent_steps"]
        )

    results = [
        (label, seed, r)
        for label, _, per_seed in _report.run_variants(
            preset, out_dir, base, setting["variants"], seeds, run_one
        )
        for seed, r in zip(seeds, per_seed)
    ]
    rows = [
        [
            label,
            str(seed),
            f"{100 * r['test_error']:.2f}",
            _fmt(r["naive"]),
            _fmt(r["upper"]),
            str(r["kind"]),
            _fmt(r["factor"]),
            _fmt(r["lower"]),
            r["lower_method"],
            _fmt(r["gap"]),
            _violations(r["soundness"]),
            _fmt(r["max_sigma"]),
            _fmt(r["max_folded"]),
            _fmt(r["product"]),
        ]
        for label, seed, r in results
    ]
    _plot(results, out_dir)
    notes = sorted({r["note"] for _, _, r in results if r["upper"] is None})
    text = (
        "## Network report: certified Lipschitz bracket of trained ResNets\n\n"
        f"Set-up ({preset} preset): {base.model}, width {base.width}, {base.dataset}, "
        f"{base.num_steps} steps, seeds {list(seeds)}; each model restored from its checkpoint "
        "(BatchNorm in eval mode) and reported by `train.report`. Upper naive: certified bound by "
        "composition over the jaxpr (exact layer norms with BatchNorm folded in; ReLU 1; "
        "average pool exact). Upper tight: the smaller of that and the midpoint (LipLT) "
        "dynamic program over the linearised network (norms of the composite linear maps "
        "between ReLUs, dense float64 with a Cholesky certificate: proven; or Lanczos with "
        "the Kuczyński–Woźniakowski bound: probabilistic, δ <= 1e-6). Lower: searched from "
        f"{setting['num_points']} test images (power iteration on the Jacobian, "
        f"{setting['ascent_steps']} steps of pair ascent, power iteration along the best pair): "
        "the largest realised ratio ||f(x)-f(y)||/||x-y|| (witness kind `pair`) or ||J(x) v|| "
        "(`jacobian`) found, so a true lower bound (each stage's best value in brackets). "
        f"Violations: pairs (the lower bound's own and {CHECK_PAIRS} random ones near the test "
        "images) whose realised ratio exceeds the upper bound (float32 rounding tolerance 1e-4). "
        "Π layer bounds: product of the layers' norms without BatchNorm (what "
        "a per-layer view suggests).\n\n"
        + _report.markdown_table(HEADERS, rows)
        + ("\nNot certified: " + "; ".join(notes) + "\n" if notes else "")
        + "\nThe gap is the research number: how much of the certified bound a real input "
        "direction attains. BatchNorm rescales after the projection, so the projected σ_max "
        "≤ 1 does not bound the BN-folded operators.\n\n" + f"![network report]({NAME}.png)\n"
    )
    _report.write_markdown(text, out_dir, NAME)
    return text


def _plot(results, out_dir: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax_b, ax_l) = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = [f"{label} (s{seed})" for label, seed, _ in results]
    x = np.arange(len(results))
    ax_b.bar(x - 0.2, [r["upper"] or np.nan for _, _, r in results], 0.4, label="certified upper")
    ax_b.bar(x + 0.2, [r["lower"] for _, _, r in results], 0.4, label="lower (Jacobian)")
    ax_b.set_yscale("log")
    ax_b.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
    ax_b.set_title("network Lipschitz bracket")
    ax_b.legend(fontsize=7)
    for i, (label, _, r) in enumerate(results):
        convs = [layer for layer in r["report"].layers if layer.op == "conv"]
        ax_l.plot(
            [layer.sigma_max for layer in convs], marker="o", color=f"C{i}", label=f"{label} σ_max"
        )
        ax_l.plot(
            [layer.bn_folded_sigma_max or np.nan for layer in convs],
            ls="--",
            color=f"C{i}",
            label=f"{label} BN-folded",
        )
    ax_l.set_xlabel("conv layer (network order)")
    ax_l.set_ylabel("exact operator norm")
    ax_l.set_yscale("log")
    ax_l.legend(fontsize=6)
    fig.tight_layout()
    _report.save_figure(fig, out_dir, NAME)


if __name__ == "__main__":
    _report.cli(run, "The spectral report of trained ResNets (baseline / projected / Yi).")
