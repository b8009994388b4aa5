"""MaxMin / GroupSort in the network report: 1-Lipschitz (per-group sorting), in both bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.lipschitz_layers import group_sort
from train.lipschitz_layers import max_min
from train.report import network_report


def _conv(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _pairs(h):
    return h.reshape(*h.shape[:-1], 2, h.shape[-1] // 2)


def _stacked(h):  # MaxMin written with `stack` over a trailing pair axis.
    q = h.reshape(*h.shape[:-1], h.shape[-1] // 2, 2)
    return jnp.stack([q.min(-1), q.max(-1)], -1).reshape(h.shape)


ACTIVATIONS = {
    "maxmin": max_min,
    "groupsort4": lambda h: group_sort(h, 4),
    "stack": _stacked,
}
# Mutated patterns: not a sorting, must keep sqrt(2) (or more).
MUTANTS = {
    "max_max": lambda h: jnp.concatenate([_pairs(h).max(-2), _pairs(h).max(-2)], -1),
    "max_min_other_axis": lambda h: jnp.concatenate(
        [_pairs(h).max(-2), _pairs(h).min(-1)], -1
    ),
    "max_min_other_operand": lambda h: jnp.concatenate(
        [_pairs(h).max(-2), _pairs(2.0 * h).min(-2)], -1
    ),
}


def _net(act):
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, 3, 2, 4))
    # sigma-normalise the conv (circular-free SAME conv: the dense operator's norm).
    x_shape = (1, 4, 4, 2)
    op = jax.jacfwd(lambda x: _conv(x, jnp.asarray(k, jnp.float32)))(
        jnp.zeros(x_shape, jnp.float32)
    ).reshape(4 * 4 * 4, 4 * 4 * 2)
    k = k / np.linalg.norm(np.asarray(op, np.float64), 2)
    p = {
        "k": k.astype(np.float32),
        "w": rng.standard_normal((4 * 16, 3)).astype(np.float32),
    }

    def f(p, x):
        return act(_conv(x, p["k"])).reshape(x.shape[0], -1) @ p["w"]

    return f, p, x_shape


def _realised(f, p, x_shape) -> float:
    def ratio(x, y):
        return jnp.linalg.norm(f(p, x) - f(p, y)) / jnp.linalg.norm(x - y)

    rng = np.random.default_rng(1)
    xs = jnp.asarray(rng.standard_normal((32, *x_shape)), jnp.float32)
    ys = xs + 0.3 * jnp.asarray(rng.standard_normal(xs.shape), jnp.float32)
    best = jax.vmap(ratio)(xs, ys)
    grad = jax.jit(jax.vmap(jax.grad(ratio, argnums=(0, 1))))
    x, y = xs[:16], ys[:16]
    for _ in range(20):  # Adversarial pairs: gradient ascent on the ratio.
        gx, gy = grad(x, y)
        x, y = x + 0.05 * gx, y + 0.05 * gy
    return float(max(best.max(), jax.vmap(ratio)(x, y).max()))


def _report(f, p, x_shape):
    r = network_report(f, p, jnp.zeros(x_shape, jnp.float32), num_points=1, compute_spectra=False)
    return r.network


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_sorting_activation_counts_one(name):
    f, p, x_shape = _net(ACTIVATIONS[name])
    n = _report(f, p, x_shape)
    dense = np.linalg.norm(p["w"].astype(np.float64), 2)
    # conv (sigma = 1) -> sorting (1) -> dense: the product with the activation counted 1.
    assert n["lipschitz_upper_naive"] <= dense * (1 + 1e-4)
    assert n["lipschitz_upper_tight"] is not None
    assert n["lipschitz_upper_tight"] <= dense * (1 + 1e-3)
    assert n["lipschitz_upper"] <= dense * (1 + 1e-4)
    assert _realised(f, p, x_shape) <= n["lipschitz_upper"] * (1 + 1e-5)
    assert "over 1 nonlinearities" in n["lipschitz_upper_tight_note"]


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutated_patterns_are_not_counted_one(name):
    f, p, x_shape = _net(MUTANTS[name])
    n = _report(f, p, x_shape)
    dense = np.linalg.norm(p["w"].astype(np.float64), 2)
    assert n["lipschitz_upper"] is not None
    assert _realised(f, p, x_shape) <= n["lipschitz_upper"] * (1 + 1e-5)
    realised = _realised(f, p, x_shape)
    assert realised <= n["lipschitz_upper"] * (1 + 1e-5)
    # The composition keeps sqrt(2) for the concatenation of two 1-Lipschitz branches.
    assert n["lipschitz_upper_naive"] >= np.sqrt(2) * dense * (1 - 1e-4)
    # The midpoint bound keeps one node per reduction (no MaxMin node).
    assert n["lipschitz_upper_tight"] is not None
    assert realised <= n["lipschitz_upper_tight"] * (1 + 1e-5)
    assert "over 2 nonlinearities" in n["lipschitz_upper_tight_note"]
