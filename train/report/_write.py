"""Writing a :class:`NetworkReport`: ``report.json``, ``report.md`` and two plots."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from train.report import _stages
from train.report._types import METHOD_KINDS
from train.report._types import NetworkReport

JSON_NAME = "report.json"
MARKDOWN_NAME = "report.md"
SPECTRA_PLOT = "spectra.png"
NORMS_PLOT = "norms.png"
#: The lower bound's witness (``np.savez``: ``kind``, ``value``, ``x`` and ``y`` or ``v``, the
#: search's pairs ``pairs_x`` / ``pairs_y``); :func:`train.report.recompute_lower_bound` reads it.
WITNESS_NAME = "lower_bound_witness.npz"


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def report_markdown(report: NetworkReport, title: str = "Spectral report") -> str:
    """The report as Markdown: the network's Lipschitz bracket, then one row per layer."""
    net = report.network
    lines = [f"# {title}", "", "## Network (ℓ2 Lipschitz constant)", ""]
    lines += [
        f"- certified upper bound: **{_fmt(net.get('lipschitz_upper'))}** — "
        f"{net.get('lipschitz_upper_note')}",
        f"- lower bound: **{_fmt(net.get('lipschitz_lower'))}** — "
        f"{net.get('lipschitz_lower_method')}",
        f"- gap (upper / lower): {_fmt(net.get('lipschitz_gap'))}",
        f"- lower bound witness: {_witness_line(net.get('lipschitz_lower_witness'))}",
        f"- soundness check: {_soundness_line(net.get('soundness'))}",
        f"- upper bound kind: {net.get('lipschitz_upper_kind')} (failure probability δ = "
        f"{_fmt(net.get('lipschitz_upper_delta'))}; method: {net.get('lipschitz_upper_method')})",
        f"- naive upper bound (composition: product of the layer norms): "
        f"{_fmt(net.get('lipschitz_upper_naive'))}; factor gained over it: "
        f"{_fmt(net.get('lipschitz_upper_factor'))}",
        f"- same composition with the layers' σ_max ({net.get('lipschitz_upper_uncertified_note')}"
        f"): {_fmt(net.get('lipschitz_upper_uncertified'))}",
        f"- product of the layers' upper bounds: {_fmt(net.get('product_of_layer_upper_bounds'))}",
        "",
    ]
    blocks = net.get("blocks") or []
    if blocks:
        lines += [
            "### Midpoint bound per nonlinearity input",
            "",
            "| target | bound | kind | rule |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {b['target']} | {_fmt(b['bound'])} | {b['kind']} | {b['rule']} |" for b in blocks
        ]
        lines.append("")
    lines += [
        "## Layers",
        "",
    ]
    headers = [
        "#",
        "layer",
        "op",
        "kernel (HWIO)",
        "input",
        "stride",
        "padding",
        "σ_max",
        "method",
        "residual",
        "upper bound",
        "bound",
        "reshaped σ_max",
        "‖A‖_F",
        "stable rank",
        "σ_min",
        "BN-folded σ_max",
    ]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for i, r in enumerate(report.layers):
        cells = [
            i,
            f"`{r.name}`",
            r.op,
            "×".join(map(str, r.kernel_shape)),
            "×".join(map(str, r.input_shape)) if r.input_shape else None,
            r.strides,
            r.padding,
            r.sigma_max,
            r.sigma_max_method,
            r.sigma_max_residual,
            r.upper_bound,
            r.upper_bound_name,
            r.reshaped_sigma_max,
            r.frobenius,
            r.stable_rank,
            r.sigma_min,
            r.bn_folded_sigma_max,
        ]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    for e in net.get("errors") or []:
        lines.insert(4, f"- **stage `{e['stage']}` failed**: {e['type']}: {e['message']}")
    lines += [
        "",
        "Methods: " + "; ".join(f"`{k}`: {v}" for k, v in METHOD_KINDS.items()),
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items()),
        "",
    ]
    return "\n".join(lines)


def _witness_line(w) -> str:
    if not w:
        return "—"
    return f"`{w['file']}` (kind `{w['kind']}`; `train.report.recompute_lower_bound`)"


def _soundness_line(s) -> str:
    if not s:
        return "not run"
    return (
        f"{s['violations']} violations on {s['num_pairs']} pairs (max ratio / upper "
        f"{s['max_ratio_over_upper']:.4g}, rounding tolerance {s['rtol']:g})"
    )


def plot_spectra(report: NetworkReport, path: pathlib.Path) -> pathlib.Path:
    """Singular value vs (relative) rank per layer, coloured by depth (Sedghi et al.'s figure);
    dashed lines are approximate spectra (Yi's spectral density)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = [r for r in report.layers if r.spectrum is not None]
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(layers):
        ranks = np.asarray(r.spectrum_ranks, np.float64) / max(r.num_singular_values or 1, 1)
        style = "--" if r.spectrum_method == "spectral_density" else "-"
        ax.plot(ranks, r.spectrum, style, color=cmap(i / max(len(layers) - 1, 1)), lw=1)
    ax.set_xlabel("rank / number of singular values")
    ax.set_ylabel("singular value")
    ax.set_title("Singular values per layer (colour: depth; dashed: approximate)")
    if layers:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(layers) - 1))
        fig.colorbar(sm, ax=ax, label="layer index")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_norms(report: NetworkReport, path: pathlib.Path) -> pathlib.Path:
    """Bar chart per layer: exact σ_max, reshaped-matrix σ_max, certified upper bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.layers
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 2), 4))
    width = 0.27
    ax.bar(x - width, [r.sigma_max for r in layers], width, label="σ_max (exact)")
    ax.bar(x, [r.reshaped_sigma_max for r in layers], width, label="reshaped kernel σ_max")
    ax.bar(x + width, [r.upper_bound for r in layers], width, label="certified upper bound")
    ax.set_xticks(x, [str(i) for i in x], fontsize=7)
    ax.set_xlabel("layer index")
    ax.set_ylabel("operator norm")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(
    report: NetworkReport, out_dir, *, title: str = "Spectral report", plots: bool = True
) -> dict[str, pathlib.Path]:
    """Writes ``report.json``, ``report.md`` and (``plots``) ``spectra.png``, ``norms.png``.

    Returns:
      ``{kind: path}`` of the files written.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / JSON_NAME, "markdown": out_dir / MARKDOWN_NAME}
    if report.witness is not None:
        paths["witness"] = out_dir / WITNESS_NAME
        np.savez(paths["witness"], **{k: np.asarray(v) for k, v in report.witness.items()})

    def write_text():
        paths["json"].write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False))
        paths["markdown"].write_text(report_markdown(report, title))

    write_text()  # Before the plots: a plot that fails loses no number.
    if plots:
        errors = []
        for kind, plot, name in (
            ("spectra_plot", plot_spectra, SPECTRA_PLOT),
            ("norms_plot", plot_norms, NORMS_PLOT),
        ):
            try:
                paths[kind] = plot(report, out_dir / name)
            except Exception as e:  # Recorded in report.json; the numbers are written.
                errors.append(_stages.error_record(kind, e))
        if errors:
            report.network.setdefault("errors", []).extend(errors)
            write_text()
    return paths
