"""``network_report``: every layer exact, the network's Lipschitz constant bracketed."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import spectra.numpy as snp
from train import discovery
from train.lapack_workaround import limit_blas_threads
from train.lapack_workaround import numpy_huge_pages
from train.report import _layers
from train.report import _lower
from train.report import _network_bound
from train.report import _stages
from train.report._lipschitz import Composer
from train.report._options import ReportOptions
from train.report._options import split_options
from train.report._types import LayerReport
from train.report._types import NetworkReport
from train.report._write import WITNESS_NAME


def _path_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def network_report(
    apply_fn: Callable[..., Any],
    params: Any,
    *example_args: Any,
    data: Any = None,
    options: ReportOptions | None = None,
    **kwargs: Any,
) -> NetworkReport:
    """The spectral report of a network: per-layer exact σ_max and bounds, Lipschitz bracket.

    The network is ``x -> apply_fn(params, x, *example_args[1:], **example_kwargs)``: the
    Lipschitz constant is with respect to the first positional input ``x`` (ℓ2 norms of the
    whole input and of all float outputs stacked), per example (traced with a batch of 1).
    Conv layers are the params leaves :func:`train.find_convs` reads; dense layers
    (``dot_general`` with a 2-D params weight) are added when ``include_dense``.

    * Per layer: see :func:`train.report.analyse_convs` (``sigma_max`` exact: FFT / dense /
      Lanczos with its residual; ``upper_bound`` the tightest certified bound, named;
      ``frobenius`` exact; ``reshaped_sigma_max``; ``sigma_min`` where exact; the σ_max of the
      kernel with a following per-channel scaling, e.g. eval-mode BatchNorm, folded in).
    * ``network['lipschitz_upper']``: **certified** upper bound by composition over the jaxpr
      (``train.report._lipschitz``), built from the layers' certified ``upper_bound``s; ``None``
      with the blocking operation in ``lipschitz_upper_note`` when composition cannot certify.
      ``lipschitz_upper_uncertified`` is the same composition with ``sigma_max`` values.
    * ``network['lipschitz_lower']``: a **lower bound** found by search
      (:func:`train.report.search_lower_bound`: power iteration on the Jacobian at ``data``
      (first ``num_points`` examples) or at standard normal inputs, pair ascent from them,
      power iteration at the best points): a realised ratio ``||f(x)-f(y)||/||x-y||`` or
      ``||J(x) v||/||v||``, its witness in ``report.witness`` (``lipschitz_lower_witness``
      names the file :func:`train.report.write_report` saves it to;
      :func:`train.report.recompute_lower_bound` re-evaluates it).
    * A stage that raises (``layers``, ``composition``, ``lower_bound``) is recorded in
      ``network['errors']`` (stage, exception type and message); the others are still reported.

    Args:
      apply_fn: ``apply_fn(params, x, ...)``; BatchNorm must be in inference mode.
      params: the parameters (conv kernels HWIO).
      *example_args: ``x`` (any batch size; only its shape and dtype are used) then the other
        arguments, held fixed.
      data: optional inputs ``(N, ...)`` like ``x`` at which the Jacobian is probed.
      options: how the report is computed (:class:`train.report.ReportOptions`; default: its
        defaults).
      **kwargs: options by name (the fields of :class:`train.report.ReportOptions`, e.g.
        ``num_points=2``), applied on top of ``options``; the other keyword arguments are
        ``apply_fn``'s, held fixed.

    Returns:
      :class:`NetworkReport`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def apply(p, x):
      ...   y = jax.lax.conv_general_dilated(
      ...       x, p['w'], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      ...   return jax.nn.relu(y)
      >>> p = {'w': jnp.ones((3, 3, 1, 1)) / 9}
      >>> r = network_report(apply, p, jnp.zeros((1, 6, 6, 1)), num_points=1)
      >>> r.layers[0].sigma_max_method, r.network['lipschitz_upper'] >= r.layers[0].sigma_max
      ('dense', True)
    """
    if not example_args:
        raise ValueError("example_args must hold at least the input x")
    changes, example_kwargs = split_options(kwargs)
    options = ReportOptions.merged(options, **changes)
    with limit_blas_threads(options.blas_threads), numpy_huge_pages(options.huge_pages):
        return _network_report(apply_fn, params, example_args, example_kwargs, data, options)


def _network_report(
    apply_fn, params, example_args, example_kwargs, data, options: ReportOptions
) -> NetworkReport:
    o = options
    timings: dict[str, float] = {}
    start = t0 = time.perf_counter()
    x_example = jnp.asarray(example_args[0])
    if x_example.ndim < 1 or x_example.shape[0] < 1:
        raise ValueError(f"x must have a leading batch axis; got shape {x_example.shape}")
    x1 = x_example[:1]
    rest = example_args[1:]
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [_path_name(p) for p, _ in path_leaves]
    leaves = [np.asarray(v) for _, v in path_leaves]

    def fn(leaf_values, x):
        return apply_fn(jax.tree.unflatten(treedef, leaf_values), x, *rest, **example_kwargs)

    specs = discovery.find_convs(apply_fn, params, x1, *rest, **example_kwargs)
    leaf_specs = treedef.flatten_up_to(specs)
    closed = jax.make_jaxpr(fn)(leaves, x1)
    timings["trace"] = time.perf_counter() - t0

    points = _points(data, x1, o.num_points, o.seed)
    x64 = bool(jax.config.jax_enable_x64)
    errors: list[dict[str, str]] = []
    layer_key = lower_key = None
    checkpoint = None
    if o.checkpoint_dir is not None:
        t0 = time.perf_counter()
        network_key = _stages.fingerprint(str(closed), names, leaves, x1.shape, str(x1.dtype))
        layer_key = _stages.fingerprint(
            network_key, o.max_dense_dim, o.compute_spectra, o.include_dense, o.backend
        )
        lower_key = _stages.fingerprint(
            network_key, points, o.power_iterations, o.power_rtol, o.ascent_steps, o.seed, x64
        )
        checkpoint = _stages.Checkpoint(o.checkpoint_dir, layer_key)
        timings["fingerprint"] = time.perf_counter() - t0
    cached_layers = checkpoint.load("layers") if checkpoint else None
    cached_lower = None
    if checkpoint is not None:
        cached_lower = _stages.Checkpoint(o.checkpoint_dir, lower_key).load("lower_bound")
    layers_done = threading.Event()
    layers_started = threading.Event()  # The overlapped lower bound starts with the layer stage.
    stop = _stages.budget_stop(
        o.lower_bound_budget,
        layers_done,
        lambda: None if o.overlap_lower_bound else timings.get("layers"),
        o.lower_bound_share if o.overlap_lower_bound else 1.0,
    )

    def lower_bound():
        if o.overlap_lower_bound:
            layers_started.wait()
        t = time.perf_counter()
        if cached_lower is not None:
            return cached_lower, 0.0
        try:
            with jax.enable_x64(x64):  # The caller's setting, also when it is a thread-local one.
                result = _lower.search_lower_bound(
                    fn,
                    points,
                    leaves,
                    power_iterations=o.power_iterations,
                    power_rtol=o.power_rtol,
                    ascent_steps=o.ascent_steps,
                    seed=o.seed,
                    stop=stop,
                )
        except Exception as e:  # Recorded; the other stages' numbers are still reported.
            return e, time.perf_counter() - t
        if checkpoint is not None:
            _stages.Checkpoint(o.checkpoint_dir, lower_key).save("lower_bound", result)
        return result, time.perf_counter() - t

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(lower_bound) if o.overlap_lower_bound else None
        try:
            if cached_layers is not None:
                stage = cached_layers
                timings["layers_reused"] = 1.0
            else:
                stage = _layers_and_composition(
                    closed,
                    leaves,
                    leaf_specs,
                    names,
                    x1,
                    timings,
                    o,
                    on_layers_done=layers_done.set,
                    on_layers_start=layers_started.set,
                    errors=errors,
                )
                if checkpoint is not None and not errors:
                    rows = [r.to_dict() for r in stage[4]]
                    checkpoint.save("layers", stage, rows=rows)
        except Exception as e:  # Recorded; the lower bound is still reported.
            errors.append(_stages.error_record("layers", e))
            stage = (
                None,
                f"not computed: the layer stage failed ({type(e).__name__})",
                None,
                [],
                [],
            )
        finally:
            layers_started.set()
            layers_done.set()
        upper, note, uncertified, reports, layers = stage
        tight = _network_bound.network_upper_fields(
            closed, leaves, x1.shape, upper, enabled=o.tight_bound, max_work=o.tight_max_work
        )
        timings["o.tight_bound"] = tight.pop("seconds")
        if pending is not None:
            lower_result, timings["lower_bound"] = pending.result()
    if pending is None:
        lower_result, timings["lower_bound"] = lower_bound()
    if cached_lower is not None:
        timings["lower_bound_reused"] = 1.0
    lower = witness = None
    lower_method = None
    if isinstance(lower_result, Exception):
        errors.append(_stages.error_record("lower_bound", lower_result))
        lower_method = f"failed: {type(lower_result).__name__}: {lower_result}"[:500]
    else:
        lower, witness = lower_result.value, lower_result.witness
        lower_method = lower_result.method(
            "data" if data is not None else "standard normal", o.power_iterations, o.power_rtol
        )
    soundness = None
    if o.check_pairs > 0 and tight["lipschitz_upper"] is not None:
        t0 = time.perf_counter()
        try:
            pairs = _lower.soundness_pairs(
                witness, x1.shape, o.check_pairs, seed=o.seed, dtype=x1.dtype, centres=points
            )
            soundness = _lower.check_upper_bound(fn, leaves, tight["lipschitz_upper"], pairs)
            soundness.pop("ratios")
        except Exception as e:
            errors.append(_stages.error_record("soundness", e))
        timings["soundness"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    all_certified = all(r.sigma_max_certified for r in reports)
    network = {
        "lipschitz_upper": upper,
        "lipschitz_upper_note": note
        if upper is None
        else (
            f"certified ({note} of the layers' exact norms (fft, dense, matrix) or certified upper "
            "bounds (lanczos layers) and exact activation, pooling and normalisation constants)"
        ),
        **tight,
        "lipschitz_upper_uncertified": uncertified,
        "lipschitz_upper_uncertified_note": (
            "estimate: the same composition with each layer's sigma_max"
            + (
                " (all layers certified: this is also a certified bound)"
                if all_certified
                else " (Lanczos values not certified by a bound within tolerance)"
            )
        ),
        "lipschitz_lower": lower,
        "lipschitz_lower_method": lower_method,
        "lipschitz_lower_per_point": None if lower is None else lower_result.per_point,
        "lipschitz_lower_stages": None if lower is None else lower_result.stages,
        "lipschitz_lower_witness": None
        if witness is None
        else {"file": WITNESS_NAME, "kind": witness["kind"], "value": witness["value"]},
        "lipschitz_gap": (tight["lipschitz_upper"] / lower)
        if (tight["lipschitz_upper"] is not None and lower)
        else None,
        "soundness": soundness,
        "errors": errors,
        "layer_backend": o.backend,
        "num_conv_layers": len(reports),
        "num_dense_layers": len(layers) - len(reports),
        "max_layer_sigma_max": max((r.sigma_max for r in layers), default=None),
        "product_of_layer_upper_bounds": float(np.prod([r.upper_bound for r in layers]))
        if layers
        else None,
    }
    network["lipschitz_upper_naive_note"] = network["lipschitz_upper_note"]
    if network["lipschitz_upper_method"] == "midpoint":
        network["lipschitz_upper_note"] = network["lipschitz_upper_tight_note"]
    return NetworkReport(layers, network, timings, witness=witness)


def _layers_and_composition(
    closed,
    leaves,
    leaf_specs,
    names,
    x1,
    timings,
    options: ReportOptions,
    *,
    on_layers_done=None,
    on_layers_start=None,
    errors=None,
):
    """Composition pass 1 (BatchNorm scales), the per-layer analysis, the certified composition."""
    # Pass 1: which convs are followed by per-channel scalings (BatchNorm), in network order.
    t0 = time.perf_counter()
    const_cache: dict = {}
    composer = Composer(leaf_specs, lambda leaf, scale: 1.0 if scale is None else None, const_cache)
    composer.run(closed, leaves, x1.shape)
    order = list(composer.conv_uses) + [
        i for i, s in enumerate(leaf_specs) if s is not None and i not in composer.conv_uses
    ]
    conv_layers = [
        _layers.ConvLayer(
            names[i],
            leaves[i],
            leaf_specs[i],
            composer.conv_uses[i].scale if i in composer.conv_uses else None,
        )
        for i in order
    ]
    timings["compose_pass1"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if on_layers_start is not None:
        on_layers_start()
    reports = _layers.analyse_convs(
        conv_layers,
        max_dense_dim=options.max_dense_dim,
        compute_spectra=options.compute_spectra,
        progress=options.progress,
        backend=options.backend,
        on_last_started=on_layers_done,
    )
    timings["layers"] = time.perf_counter() - t0
    if on_layers_done is not None:
        # The lower bound's time budget ends with the layer stage (already once its last jobs
        # have started: its last step then overlaps them).
        on_layers_done()
    by_leaf = dict(zip(order, reports))

    # Pass 2: the certified bound (layers' upper bounds); pass 3: the same with σ_max values.
    t0 = time.perf_counter()
    scales = {i: layer.bn_scale for i, layer in zip(order, conv_layers)}
    args = (closed, leaves, leaf_specs, x1.shape, by_leaf, scales, const_cache)
    try:
        upper, note = _compose(*args, certified=True)
        uncertified, _ = _compose(*args, certified=False)
    except Exception as e:  # Recorded; the layers' numbers are still reported.
        if errors is None:
            raise
        errors.append(_stages.error_record("composition", e))
        upper, uncertified = None, None
        note = f"not computed: the composition failed ({type(e).__name__}: {e})"[:500]
    timings["compose"] = time.perf_counter() - t0

    layers: list[LayerReport] = [by_leaf[i] for i in order]
    if options.include_dense:
        for leaf, mat in composer.dense_uses.items():
            layers.append(_layers.analyse_dense(names[leaf], mat))

    return upper, note, uncertified, reports, layers


def _compose(closed, leaves, leaf_specs, x_shape, by_leaf, scales, const_cache, *, certified):
    def norm(leaf, scale):
        if scale is not None and (
            scales.get(leaf) is None or not np.array_equal(scale, scales[leaf])
        ):
            return None  # Not the scaling analysed: the unfolded bound is used.
        # Certified: the exact value for exact methods (FFT, dense SVD), else the best bound.
        r = by_leaf[leaf]
        exact = r.sigma_max_method in _layers.EXACT_METHODS
        rho = r.rounding_rtol or 0.0  # Exact values are exact to rounding: rounded up by it.
        if scale is None:
            if not certified:
                return r.sigma_max
            return snp.round_up(r.sigma_max, rho) if exact else r.upper_bound
        if not certified:
            return r.bn_folded_sigma_max
        return snp.round_up(r.bn_folded_sigma_max, rho) if exact else r.bn_folded_upper_bound

    return Composer(leaf_specs, norm, const_cache).run(closed, leaves, x_shape)


def _points(data, x1, num_points: int, seed: int) -> np.ndarray:
    if data is not None:
        data = np.asarray(data)
        if data.shape[1:] != x1.shape[1:]:
            raise ValueError(
                f"data must have shape (N, {', '.join(map(str, x1.shape[1:]))}); got {data.shape}"
            )
        return data[:num_points, None].astype(x1.dtype)
    rng = np.random.default_rng(seed)
    return rng.standard_normal((num_points, *x1.shape)).astype(x1.dtype)


def network_report_nnx(model: nnx.Module, *example_args: Any, **kwargs: Any) -> NetworkReport:
    """:func:`network_report` for a Flax NNX model (call ``model.eval()`` first).

    The report covers the model's ``nnx.Param`` leaves; the other state (BatchNorm
    statistics) is held fixed. The model is not modified.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = nnx.Conv(1, 2, (3, 3), padding='CIRCULAR', rngs=nnx.Rngs(0))
      >>> r = network_report_nnx(model, jnp.zeros((1, 8, 8, 1)), num_points=1)
      >>> r.layers[0].name, r.layers[0].sigma_max_method
      ('kernel', 'fft')
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure, rest = nnx.as_pure(params), nnx.as_pure(rest)

    def apply(p, x, *args, **kw):
        return nnx.merge(graphdef, p, rest)(x, *args, **kw)

    return network_report(apply, pure, *example_args, **kwargs)
