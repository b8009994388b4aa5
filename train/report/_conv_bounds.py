"""Certified norms of the linear equations the Lipschitz composition meets with constant
operands: convs (:func:`conv_eqn_bound`), window sums (:func:`window_sum_bound`) and gathers
(:func:`selection_counts`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

import spectra.numpy as snp
from spectra import ConvSpec
from train.report import _windows

#: Dense layers whose operator is densified to compute an on-the-fly conv norm.
_MAX_DENSE_DIM = 4096


def selection_counts(eqn, operand_shape, idx) -> float:
    """Largest number of outputs that read one operand element (gather with constant indices)."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(bind_params, tuple):
        bind_params = bind_params[1]
    dtype = eqn.invars[0].aval.dtype

    def f(op):
        return eqn.primitive.bind(op, jnp.asarray(idx), **bind_params)

    zeros = jnp.zeros(operand_shape, dtype)
    out, vjp = jax.vjp(f, zeros)
    (counts,) = vjp(jnp.ones(out.shape, dtype))
    return float(jnp.max(counts)) if counts.size else 0.0


def conv_eqn_bound(params: dict, lhs_shape, kernel: np.ndarray) -> float:
    """Certified bound on the norm of a ``conv_general_dilated`` with a constant kernel.

    2-D forward convs: exact (dense SVD) when small, else the smallest of the certified bounds
    of :mod:`spectra` on the spec read from the equation; otherwise (transposed convs, other
    ranks) the Schur bound ``sqrt(max row abs-sum * max column abs-sum)``, valid for any conv.
    """
    dn = params["dimension_numbers"]
    lhs_spec, rhs_spec = dn.lhs_spec, dn.rhs_spec
    groups = int(params["feature_group_count"])
    schur = _conv_schur(kernel.transpose(list(rhs_spec[2:]) + [rhs_spec[1], rhs_spec[0]]), groups)
    schur = snp.round_up(schur, snp.matrix_rtol(1, kernel.size))  # Sums of |entries|, a sqrt.
    if (
        len(lhs_spec) != 4
        or any(d != 1 for d in params["lhs_dilation"])
        or params.get("batch_group_count", 1) != 1
        or any(p < 0 for pair in params["padding"] for p in pair)
    ):
        return schur
    hwio = kernel.transpose(rhs_spec[2], rhs_spec[3], rhs_spec[1], rhs_spec[0])
    spec = ConvSpec(
        input_shape=(lhs_shape[lhs_spec[2]], lhs_shape[lhs_spec[3]]),
        strides=tuple(params["window_strides"]),
        padding=tuple(tuple(int(v) for v in p) for p in params["padding"]),
        kernel_dilation=tuple(params["rhs_dilation"]),
        feature_group_count=groups,
    )
    # On the host in float64 (spectra.numpy): no program compiled per equation.
    hwio = np.asarray(hwio, np.float64)
    # Each value exact to rounding: rounded up by its allowance (spectra.numpy.rounding_rtol).
    if max(spec.in_dim(hwio.shape), spec.out_dim(hwio.shape)) <= _MAX_DENSE_DIM:
        dense = float(np.linalg.norm(snp.dense_operator(hwio, spec), 2))
        return snp.round_up(
            dense, snp.matrix_rtol(spec.out_dim(hwio.shape), spec.in_dim(hwio.shape))
        )
    values = [
        schur,
        snp.round_up(
            snp.symbol_grid_bound(hwio, spec), snp.rounding_rtol(hwio.shape, spec, ["symbol_grid"])
        ),
        snp.round_up(
            snp.tap_sum_bound(hwio, spec), snp.rounding_rtol(hwio.shape, spec, ["tap_sum"])
        ),
    ]
    return min(values)


def _conv_schur(kernel: np.ndarray, groups: int) -> float:
    """``sqrt(max_o Σ|K[..., :, o]| * max_c Σ|K[..., c, o in group]|)`` for a ``(..., I, O)``
    kernel with ``groups`` groups: each output reads each tap at most once, each input is read
    by each (tap, output channel) at most once."""
    k = np.abs(np.asarray(kernel, np.float64))
    rows = k.reshape(-1, k.shape[-1]).sum(axis=0).max()
    cig, cout = k.shape[-2:]
    per_group = k.reshape(-1, cig, groups, cout // groups).sum(axis=(0, 3))
    return float(math.sqrt(rows * per_group.max()))


def window_sum_bound(params: dict, shape) -> float:
    """Norm of a ``reduce_window_sum``: exact (the single-channel window operator, dense SVD)
    when at most two axes are windowed and it is small, else the Schur bound."""
    win, strides, pads = params["window_dimensions"], params["window_strides"], params["padding"]
    count = _windows.max_window_count(
        shape, win, strides, pads, params["window_dilation"], params["base_dilation"]
    )
    schur = _windows.sum_pool_schur_bound(win, count)
    axes = [
        i
        for i, (k, s, p) in enumerate(zip(win, strides, pads))
        if k != 1 or s != 1 or tuple(p) != (0, 0)
    ]
    if (
        len(axes) > 2
        or any(d != 1 for d in params["window_dilation"])
        or any(d != 1 for d in params["base_dilation"])
        or any(v < 0 for p in pads for v in p)
    ):
        return schur
    axes = (axes + [a for a in range(len(shape)) if a not in axes])[:2]
    size = tuple(int(shape[a]) for a in axes)
    if size[0] * size[1] > _MAX_DENSE_DIM:
        return schur
    spec = ConvSpec(
        input_shape=size,
        strides=tuple(int(strides[a]) for a in axes),
        padding=tuple(tuple(int(v) for v in pads[a]) for a in axes),
    )
    kernel = np.ones((int(win[axes[0]]), int(win[axes[1]]), 1, 1))
    exact = float(np.linalg.norm(snp.dense_operator(kernel, spec), 2))
    return min(schur, exact * (1 + 1e-6))
