"""The singular values of every conv layer of a trained network (Sedghi et al. 2019's figure).

For every conv kernel of a trained model, at the input size the layer really sees (from
:func:`train.find_convs_nnx` on one input image), all singular values of the layer's operator,
sorted and plotted against their rank, coloured by depth. Methods, per layer:

* ``'fft'`` (exact) for circular padding (Sedghi et al. 2019's per-frequency SVD);
* ``'dense'`` (exact) for zero padding when the operator has at most ``max_dense_dim`` rows and
  columns (SVD of the dense operator);
* otherwise ``'spectral_density'`` (an **approximation**: Yi 2020's spectral-density sampling,
  labelled as such in the table and the plot).

Without a checkpoint (the default), quick models are trained first (or reused when
:mod:`experiments.sedghi_training` trained the same configuration in this process): its baseline
(seed 0) and the same model with every conv projected to σ_max ≤ 1 (certified) every step, so the
figure shows what the projection does to the whole spectrum.
With ``--run-dir DIR`` (a folder written by :func:`train.loop.train_and_evaluate`), that run's
latest checkpoint is used instead. Sedghi et al.'s own figure (a pretrained ImageNet ResNet-v2)
needs a checkpoint not available here.

Layers are ordered by depth: decreasing input resolution, then increasing input channels, then
name (the forward order of the ResNets and SimpleCNN of :mod:`train.models`).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import numpy as np

from experiments import _report
from experiments import sedghi_training as common  # The ResNet runs shared with that table.
from spectra import ConvSpec
from spectra import singular_values
from train import discovery
from train import model_io
from train.builders import example_input
from train.conv_norms import conv_layers
from train.lapack_workaround import avoid_cpu_lapack_deadlock

avoid_cpu_lapack_deadlock()  # Before the first JAX computation of this process, if any.

NAME = "layer_spectra"

PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(
        base=common.QUICK_BASE,
        variants=[("baseline", {}), ("certified c=1, every step", dict(project_max_norm=1.0))],
        max_dense_dim=4096,
    ),
    "paper": dict(
        base=common.PAPER_BASE,
        variants=[
            ("baseline", {}),
            ("sedghi c=1, every 100",
             dict(project_max_norm=1.0, project_method="sedghi", project_every=100)),
        ],
        max_dense_dim=4096,
    ),
    "test": dict(
        base=common.TEST_BASE, variants=[("baseline", {})], max_dense_dim=4096
    ),
}

HEADERS = ("model", "layer", "input (H×W×C)", "stride", "padding", "method", "#σ", "σ_max",
           "median σ", "σ_min")


def spectrum_method(spec: ConvSpec, kshape: tuple[int, ...], max_dense_dim: int) -> str:
    """``'fft'`` (exact, circular), ``'dense'`` (exact, small) or ``'spectral_density'``."""
    if spec.is_circular and all(n % s == 0 for n, s in zip(spec.input_shape, spec.strides)):
        return "fft"
    if max(spec.in_dim(kshape), spec.out_dim(kshape)) <= max_dense_dim:
        return "dense"
    return "spectral_density"


def layer_spectra(model, example_input, max_dense_dim: int = 4096) -> list[dict[str, Any]]:
    """All singular values of every conv layer of ``model``, in depth order.

    Args:
      model: a Flax NNX model.
      example_input: one input batch ``(1, H, W, C)`` (only its shape matters).
      max_dense_dim: largest operator dimension densified for the exact ``'dense'`` method.

    Returns:
      One dict per conv: ``name``, ``spec``, ``method`` (``'fft'``/``'dense'``: exact;
      ``'spectral_density'``: approximate), ``values`` (numpy, sorted descending, length
      ``spec.num_singular_values(kernel.shape)``).
    """
    from flax import nnx

    specs = discovery.find_convs_nnx(model, example_input)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    named = conv_layers(specs)
    leaves = jax.tree.leaves(params, is_leaf=discovery.is_leaf_or_hole)
    aligned = discovery.align_with_params(params, specs, "specs")
    conv_kernels = [leaf for leaf, spec in zip(leaves, aligned) if spec is not None]
    kernels = dict(zip([n for n, _ in named], conv_kernels))
    out = []
    for name, spec in common.depth_ordered(specs):
        kernel = np.asarray(kernels[name])
        method = spectrum_method(spec, kernel.shape, max_dense_dim)
        values = np.asarray(singular_values(kernel, spec, method))
        out.append({"name": name, "spec": spec, "method": method, "values": values,
                    "shape": kernel.shape})
    return out


def _train_models(preset: str, out_dir: pathlib.Path) -> list[tuple[str, Any, Any]]:
    """Trains (or reuses from :mod:`experiments.sedghi_training`'s memo) the preset's models."""
    setting = PRESETS[preset]

    def run_one(config, root, seed):
        return common.train_once(config, root, "spectra"), example_input(config)

    runs = _report.run_variants(
        preset, out_dir, setting["base"], setting["variants"], (0,), run_one
    )
    return [
        (f"{label} (test error {100 * result['test_error']:.2f}%)", result["model"], example)
        for label, _, [(result, example)] in runs
    ]


def run(preset: str, out_dir: pathlib.Path, run_dir: str | pathlib.Path | None = None) -> str:
    """Spectra of every conv of the quick models (or of ``run_dir``'s checkpoint)."""
    import matplotlib.pyplot as plt
    from matplotlib import cm
    from matplotlib import colors

    max_dense_dim = _report.preset_config(PRESETS, preset)["max_dense_dim"]
    out_dir = pathlib.Path(out_dir)
    if run_dir is not None:
        model, config, meta = model_io.restore_model(run_dir)
        models = [(f"{pathlib.Path(run_dir).name} (step {meta['step']})", model,
                   example_input(config))]
        source = f"the checkpoint of `{run_dir}` (step {meta['step']}, {config.model})"
    else:
        models = _train_models(preset, out_dir)
        base = PRESETS[preset]["base"]
        source = (
            f"{base.model} (width {base.width}, {base.padding} padding) trained for "
            f"{base.num_steps} steps on {base.dataset} (seed 0), as in `sedghi_training`"
        )

    spectra_by_model = [(label, layer_spectra(model, example, max_dense_dim))
                        for label, model, example in models]
    rows = []
    for label, layers in spectra_by_model:
        for layer in layers:
            spec, values = layer["spec"], layer["values"]
            h, w = spec.input_shape
            exactness = "exact" if layer["method"] in ("fft", "dense") else "approximate"
            rows.append([
                label.split(" (")[0], layer["name"].replace(".kernel", ""),
                f"{h}×{w}×{layer['shape'][2] * spec.feature_group_count}",
                f"{spec.strides[0]}", str(spec.padding), f"{layer['method']} ({exactness})",
                str(values.size), float(values[0]), float(np.median(values)),
                float(values[-1]),
            ])

    fig, axes = plt.subplots(1, len(spectra_by_model), figsize=(6.5 * len(spectra_by_model), 4.5),
                             squeeze=False)
    for ax, (label, layers) in zip(axes[0], spectra_by_model):
        norm = colors.Normalize(vmin=0, vmax=max(len(layers) - 1, 1))
        cmap = plt.get_cmap("viridis")
        for depth, layer in enumerate(layers):
            values = layer["values"]
            style = "-" if layer["method"] in ("fft", "dense") else "--"
            ax.plot(np.arange(1, values.size + 1), values, style, color=cmap(norm(depth)),
                    lw=1.2)
        ax.set_xlabel("rank")
        ax.set_ylabel("singular value")
        ax.set_title(label, fontsize=9)
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer depth")
    if any(layer["method"] == "spectral_density" for _, ls in spectra_by_model for layer in ls):
        fig.text(0.5, -0.02, "dashed: approximate (Yi spectral density); solid: exact",
                 ha="center", fontsize=8)
    fig.tight_layout()
    _report.save_figure(fig, out_dir, NAME)

    text = (
        "## Singular values of every conv layer (Sedghi et al. 2019, figure)\n\n"
        f"Source: {source}. Every conv layer at the input size it sees (from "
        "`train.find_convs_nnx`); all singular values of its operator with multiplicity, "
        "method per layer as labelled (fft / dense: exact; spectral_density: approximate). "
        "Layers in depth order.\n\n"
        + _report.markdown_table(HEADERS, rows)
        + f"\n![Layer spectra]({NAME}.png)\n"
    )
    _report.write_markdown(text, out_dir, NAME)
    return text


def main() -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--run-dir", type=pathlib.Path, default=None,
                        help="a run folder of train.loop (default: train quick models)")
    args, rest = parser.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    _report.cli(functools.partial(run, run_dir=args.run_dir),
                "Singular values of every conv layer of a trained network "
                "(--run-dir DIR for a checkpoint).")


if __name__ == "__main__":
    main()
