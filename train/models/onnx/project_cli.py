"""``convspectra-project``: make every conv of an ONNX model c-Lipschitz, with a certificate.

``convspectra-project --onnx in.onnx --input-shape 1,3,H,W --max-norm c --out out.onnx
[--fold-bn]`` (also ``python -m train.models.onnx.project_cli``) imports the model
(:func:`train.models.from_onnx`), optionally folds every eval-mode BatchNormalization into the
conv before it (:func:`train.models.fold_batch_norm`), projects every conv kernel with
:func:`spectra.clip_operator_norm` (``method='certified'``) at the given input size, writes the
model (:meth:`train.models.OnnxModel.to_onnx`) and a certificate JSON beside it
(``out.certificate.json``). The library function is :func:`project_onnx`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

#: Largest operator side (``max(in_dim, out_dim)``) whose σ_max the certificate computes with a
#: dense SVD in float64; larger layers use float64 Lanczos (exact to its residual).
MAX_DENSE_DIM = 2048

#: Relative allowance of the certificate's ``certified`` flag (bounds are made ``<= c`` below;
#: this covers float64 rounding of the bound itself).
TOLERANCE = 1e-4

_BOUND_METHOD = (
    "sigma_max of the circular operator that contains the layer (spectra.circulant_embedding "
    "of the layer at its input size; exact per-frequency SVD in float64): an upper bound on "
    "the layer's exact sigma_max for zero padding, equal to it for circular padding"
)


def _spec_dict(spec, kernel_shape) -> dict[str, Any]:
    padding = spec.padding if isinstance(spec.padding, str) else [list(p) for p in spec.padding]
    return {
        "input_shape": list(spec.input_shape),
        "kernel_shape": list(kernel_shape),
        "strides": list(spec.strides),
        "padding": padding,
        "kernel_dilation": list(spec.kernel_dilation),
        "groups": int(spec.feature_group_count),
        "in_features": spec.in_features,
        "output_shape": list(spec.output_shape(kernel_shape)),
    }


def exact_sigma_max(kernel: Any, spec: Any, max_dense_dim: int = MAX_DENSE_DIM) -> dict:
    """The layer's exact σ_max in float64: dense SVD when small, else Lanczos.

    Returns:
      ``{'value', 'method', 'residual'}``: ``'dense'`` (exact, ``residual`` ``None``) or
      ``'lanczos'`` (exact to its relative residual ``||AᵀA v − θ v|| / θ``).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    import spectra

    with jax.enable_x64(True):
        k = jnp.asarray(np.asarray(kernel, np.float64))
        if max(spec.in_dim(k.shape), spec.out_dim(k.shape)) <= max_dense_dim:
            value = spectra.spectral_norm(k, spec, "dense")
            return {"value": float(value), "method": "dense", "residual": None}
        result = spectra.lanczos_spectral_norm(k, spec)
        return {
            "value": float(result.value),
            "method": "lanczos",
            "residual": float(result.residual),
        }


_NO_EXACT = {"value": None, "method": None, "residual": None}


def _certify_below(kernel: Any, spec: Any, max_norm: float) -> tuple[Any, float]:
    """``kernel`` rescaled (if needed, by a few ulps) so that its float64 bound is ``<= c``."""
    import numpy as np

    from train.certify import certified_upper_bound

    kernel = np.asarray(kernel)
    eps = np.finfo(kernel.dtype).eps
    for attempt in range(8):
        bound = certified_upper_bound(kernel, spec)
        if bound <= max_norm:
            return kernel, bound
        factor = max_norm / bound * (1.0 - 2.0**attempt * eps)
        kernel = (kernel.astype(np.float64) * factor).astype(kernel.dtype)
    return kernel, certified_upper_bound(kernel, spec)


def project_onnx(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    max_norm: float,
    input_shape: Sequence[int] | None = None,
    *,
    fold_bn: bool = False,
    num_rounds: int = 1,
    certificate_path: str | os.PathLike | None = None,
    tolerance: float = TOLERANCE,
    exact: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    r"""Projects every conv of an ONNX model to ``σ_max <= max_norm``; writes model and certificate.

    Each ONNX ``Conv`` whose kernel is a weight is replaced by
    :func:`spectra.clip_operator_norm` ``(kernel, spec, c, method='certified',
    num_rounds=num_rounds)`` at the layer's input size (``num_rounds`` alternating
    Sedghi-et-al. rounds, then the exact rescale by ``min(1, c / σ_max(C))`` of the circular
    operator ``C`` that contains the layer: **always feasible**); a kernel already inside is
    kept bit-identical. A final check recomputes the certified bound ``σ_max(C)`` in float64 on
    the kernel as written (float32) and, when rounding left it above ``c``, rescales it by a
    few ulps until it is ``<= c``. Every other weight is unchanged.

    With ``fold_bn``, every eval-mode BatchNormalization that follows a conv is folded into it
    first (``W' = W γ/√(var+ε)``, ``b' = (b − mean) γ/√(var+ε) + β``), the folded kernels are
    projected and the folded graph is written: the written convs, which now include the BN
    scaling, are ``<= c``. Without it, the raw kernels are projected and a following
    BatchNormalization (a per-channel scaling by ``γ/√(var+ε)``) is **not** included in the
    bound: the certificate says so per layer.

    Args:
      onnx_path: the input ``.onnx`` file.
      out_path: the ``.onnx`` file to write.
      max_norm: ``c > 0``.
      input_shape: the input shape, e.g. ``(1, 3, H, W)`` (the bounds hold at this size);
        ``None``: the model's own fixed shape.
      fold_bn: fold BatchNormalization into the convs first.
      num_rounds: Sedghi rounds before the certified rescale (``0``: rescale only).
      certificate_path: where to write the certificate; default ``out_path`` with suffix
        ``.certificate.json``.
      tolerance: the certificate's ``certified`` flag is ``max(bound / c) <= 1 + tolerance``.
      exact: also compute every layer's exact σ_max before and after (float64 dense SVD or
        Lanczos: the costly part on large inputs); ``False``: only the certified bounds (the
        ``sigma_max_*`` fields are then ``None``).
      progress: print one line per layer as it is done (to stderr).

    Returns:
      The certificate (also written as JSON): ``layers`` (per conv: ``name``, ``spec``,
      ``sigma_max_before``, ``sigma_max_after`` (exact, float64: ``sigma_max_method`` ``'dense'``
      or ``'lanczos'`` with its residual), ``certified_upper_bound_after`` (a proven bound, see
      ``bound_method``), ``changed``, ``batch_norm`` and ``batch_norm_included``), ``certified``,
      ``max_norm``, ``fold_bn``, ``projection``, ``tolerance``, ``not_projected`` and the
      written file's ``sha256``.

    Raises:
      ValueError: ``max_norm`` not positive, ``num_rounds`` negative, and as
        :func:`train.models.from_onnx`.
    """
    import jax
    import numpy as np

    import spectra
    from train import discovery
    from train.models.onnx._fold import fold_batch_norm
    from train.models.onnx.model import from_onnx

    if not np.ndim(max_norm) == 0 or not float(max_norm) > 0 or not np.isfinite(max_norm):
        raise ValueError(f"max_norm={max_norm!r} must be a positive finite number")
    if not isinstance(num_rounds, (int, np.integer)) or num_rounds < 0:
        raise ValueError(f"num_rounds={num_rounds!r} must be a non-negative int")
    if not float(tolerance) >= 0:
        raise ValueError(f"tolerance={tolerance!r} must be >= 0")
    max_norm = float(max_norm)
    out_path = pathlib.Path(out_path)
    if certificate_path is None:
        certificate_path = out_path.with_suffix(".certificate.json")
    model = from_onnx(os.fspath(onnx_path), input_shape=input_shape)
    _, possible_folds = fold_batch_norm(model)
    bn_of = {f.conv: f.batch_norm for f in possible_folds}
    if fold_bn:
        model, _ = fold_batch_norm(model)
    specs = discovery.find_convs(model.apply_fn, model.params, *model.example_inputs())
    params = {key: dict(entries) for key, entries in model.params.items()}
    layers, not_projected = [], []
    for step in model.program.steps:
        key = step.info.name
        if step.info.op_type == "ConvTranspose":
            not_projected.append({"name": key, "reason": "ConvTranspose is not projected"})
            continue
        if step.info.op_type != "Conv":
            continue
        spec = specs.get(key, {}).get("W") if isinstance(specs.get(key), dict) else None
        if spec is None:
            not_projected.append({"name": key, "reason": "its kernel is not a weight"})
            continue
        kernel = np.asarray(params[key]["W"])
        t0 = time.perf_counter()
        before = exact_sigma_max(kernel, spec) if exact else _NO_EXACT
        clipped = spectra.clip_operator_norm(
            kernel, spec, max_norm, method="certified", num_rounds=int(num_rounds)
        ).kernel
        new_kernel, bound = _certify_below(np.asarray(clipped), spec, max_norm)
        params[key]["W"] = jax.numpy.asarray(new_kernel)
        after = exact_sigma_max(new_kernel, spec) if exact else _NO_EXACT
        batch_norm = bn_of.get(key)
        if progress:
            print(
                f"[{len(layers) + 1}] {key}: bound {bound:.6g} <= {max_norm:g} "
                f"({time.perf_counter() - t0:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        layers.append(
            {
                "name": key,
                "spec": _spec_dict(spec, kernel.shape),
                "sigma_max_before": before["value"],
                "sigma_max_after": after["value"],
                "sigma_max_method": after["method"],
                "sigma_max_residual": after["residual"],
                "certified_upper_bound_after": bound,
                "bound_method": "circulant_embedding_fft_svd_float64",
                "certified": bound <= max_norm * (1 + tolerance),
                "changed": not np.array_equal(kernel, new_kernel),
                "batch_norm": batch_norm,
                "batch_norm_included": bool(batch_norm and fold_bn),
            }
        )
    model.to_onnx(params, out_path)
    digest = hashlib.sha256(out_path.read_bytes()).hexdigest()
    remaining = [s.info.name for s in model.program.steps if s.info.op_type == "BatchNormalization"]
    certificate = {
        "input": os.fspath(onnx_path),
        "output": os.fspath(out_path),
        "sha256": digest,
        "input_shape": list(model.input_shape) if len(model.input_shapes) == 1 else None,
        "max_norm": max_norm,
        "certified": all(layer["certified"] for layer in layers),
        "tolerance": tolerance,
        "projection": (
            f"spectra.clip_operator_norm(method='certified', num_rounds={int(num_rounds)}) at "
            "the input size, then a float64 check of the bound on the written kernel"
        ),
        "bound_method": _BOUND_METHOD,
        "sigma_max_note": (
            "sigma_max_before / sigma_max_after: the layer's exact sigma_max at the input size, "
            "float64 ('dense': SVD of the dense operator; 'lanczos': exact to its residual)"
        ),
        "fold_bn": bool(fold_bn),
        "batch_norm_note": (
            "BatchNormalization layers that follow convs are folded into them: the bounds are "
            "those of the written (folded) convs"
            if fold_bn
            else "BatchNormalization is NOT included: the bounds are those of the raw conv "
            "kernels; a following BatchNormalization scales each output channel by "
            "gamma / sqrt(var + eps) (run with --fold-bn to include it)"
        ),
        "batch_norm_not_folded": remaining if fold_bn else None,
        "scope": (
            "per-layer bounds of the ONNX Conv layers only; dense layers (Gemm, MatMul) and all "
            "other weights are unchanged; this is not a bound on the whole network"
        ),
        "num_layers": len(layers),
        "layers": layers,
        "not_projected": not_projected,
    }
    pathlib.Path(certificate_path).write_text(json.dumps(certificate, indent=2) + "\n")
    certificate["certificate_path"] = os.fspath(certificate_path)
    return certificate


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``convspectra-project``; returns the exit status (1: not certified)."""
    parser = argparse.ArgumentParser(
        prog="convspectra-project",
        description=(
            "Project every conv of an ONNX model to sigma_max <= c (certified at the input "
            "size) and write the model with a certificate JSON beside it."
        ),
    )
    parser.add_argument("--onnx", type=pathlib.Path, required=True, help="input .onnx file")
    parser.add_argument("--input-shape", help="input shape, e.g. 1,3,224,224")
    parser.add_argument("--max-norm", type=float, required=True, help="c > 0")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="output .onnx file")
    parser.add_argument(
        "--fold-bn",
        action="store_true",
        help="fold BatchNormalization into the convs first (the bound then includes it)",
    )
    parser.add_argument(
        "--num-rounds",
        type=int,
        default=1,
        help="Sedghi projection rounds before the certified rescale (default 1; 0: rescale)",
    )
    parser.add_argument(
        "--certificate", type=pathlib.Path, help="certificate path (default OUT.certificate.json)"
    )
    parser.add_argument(
        "--no-exact",
        action="store_true",
        help="skip the exact sigma_max before/after (only the certified bounds; faster)",
    )
    args = parser.parse_args(argv)
    from train.models.onnx.model import parse_input_shape

    shape = parse_input_shape(args.input_shape) if args.input_shape else None

    from train.lapack_workaround import avoid_cpu_lapack_deadlock
    from train.lapack_workaround import set_numpy_huge_pages

    avoid_cpu_lapack_deadlock()
    set_numpy_huge_pages(False)  # The host certificates' fresh memory: see numpy_huge_pages.
    cert = project_onnx(
        args.onnx,
        args.out,
        args.max_norm,
        shape,
        fold_bn=args.fold_bn,
        num_rounds=args.num_rounds,
        certificate_path=args.certificate,
        exact=not args.no_exact,
        progress=True,
    )
    for layer in cert["layers"]:
        sigma = (
            f"sigma_max {layer['sigma_max_before']:.6g} -> {layer['sigma_max_after']:.6g} "
            if layer["sigma_max_after"] is not None
            else ""
        )
        print(
            f"{layer['name']}: {sigma}(certified bound {layer['certified_upper_bound_after']:.6g}"
            f"{', BN folded' if layer['batch_norm_included'] else ''})"
        )
    for entry in cert["not_projected"]:
        print(f"{entry['name']}: not projected ({entry['reason']})")
    print(
        f"{'certified' if cert['certified'] else 'NOT certified'}: {cert['num_layers']} convs "
        f"<= {cert['max_norm']:g}; {cert['batch_norm_note']}"
    )
    print(f"wrote {cert['output']} and {cert['certificate_path']}")
    return 0 if cert["certified"] else 1


if __name__ == "__main__":
    sys.exit(main())
