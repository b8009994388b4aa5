"""The midpoint (LipLT) network bound and the composite-norm bounds it is built from."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from spectra import _composite
from train.report import _network_bound
from train.report import network_report


def _bound(fn, params, x_shape, **kw):
    leaves, treedef = jax.tree.flatten(params)
    leaves = [np.asarray(v) for v in leaves]

    def flat(lv, x):
        return fn(jax.tree.unflatten(treedef, lv), x)

    closed = jax.make_jaxpr(flat)(leaves, jnp.zeros(x_shape, jnp.float32))
    return _network_bound.midpoint_bound(closed, leaves, x_shape, **kw)


# ----------------------------------------------------------------------------- composite norms
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (3, 7), (90, 90), (200, 40)])
def test_dense_norm_upper_is_a_tight_upper_bound(shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.standard_normal(shape)
    if min(shape) > 2:
        a[:, 0] = a[:, 1]  # Rank deficient.
    exact = np.linalg.svd(a, compute_uv=False)[0]
    b = _composite.dense_norm_upper(a)
    assert b.kind == "proven" and b.delta == 0.0
    assert exact <= b.upper <= exact * (1 + 1e-3)


def test_dense_norm_upper_zero_and_bad_input():
    assert _composite.dense_norm_upper(np.zeros((3, 2))).upper == 0.0
    with pytest.raises(ValueError, match="matrix"):
        _composite.dense_norm_upper(np.zeros(3))


def test_kw_formula_round_trip_and_validation():
    for delta, n, k in [(1e-6, 100, 30), (1e-8, 16384, 60), (0.1, 5, 3)]:
        eps = _composite.kw_epsilon(delta, n, k)
        assert eps == pytest.approx((math.log(1.648 * math.sqrt(n) / delta) / (2 * k - 1)) ** 2)
        if eps < 1:
            assert _composite.kw_failure_probability(eps, n, k) == pytest.approx(delta)
    with pytest.raises(ValueError, match="delta"):
        _composite.kw_epsilon(0.0, 10, 10)
    with pytest.raises(ValueError, match="k must"):
        _composite.kw_epsilon(0.1, 10, 1)


def test_lanczos_norm_upper_on_known_operator():
    n = 500
    s = np.linspace(0.0, 2.0, n)  # ||A|| = 2, a dense top of the spectrum.
    b = _composite.lanczos_norm_upper(lambda v: s**2 * v, n, delta=1e-6, num_steps=60)
    eps = _composite.kw_epsilon(1e-6, n, 60)
    assert b.kind == "probabilistic" and b.delta == 1e-6
    assert 2.0 <= b.upper <= 2.0 / math.sqrt(1 - eps) * (1 + 1e-9)
    assert b.estimate <= 2.0 * (1 + 1e-9)


def test_lanczos_failure_rate_is_below_delta():
    # Few steps, large δ: the bound may fail, but at most with probability δ.
    n, delta = 200, 0.2
    s = np.concatenate([[1.0], np.full(n - 1, 0.999)])
    lam = np.concatenate([[1.0], np.linspace(0, 0.9, n - 1)])
    fails = 0
    trials = 200
    for seed in range(trials):
        b = _composite.lanczos_norm_upper(lambda v: lam * v, n, delta=delta, num_steps=3, seed=seed)
        fails += b.upper < 1.0
    assert fails / trials <= delta
    del s


def test_composite_norm_upper_dense_and_lanczos():
    a = np.random.default_rng(0).standard_normal((30, 20))
    exact = np.linalg.norm(a, 2)
    d = _composite.composite_norm_upper(lambda v: a @ v, lambda w: a.T @ w, 20, 30)
    p = _composite.composite_norm_upper(
        lambda v: a @ v, lambda w: a.T @ w, 20, 30, max_dense_entries=10, num_steps=25
    )
    assert d.kind == "proven" and exact <= d.upper <= exact * 1.001
    assert p.kind == "probabilistic" and exact <= p.upper <= exact * 1.5


# ------------------------------------------------------------------------------ whole networks
def test_linear_network_bound_is_its_exact_norm():
    rng = np.random.default_rng(1)
    p = {
        k: rng.standard_normal(s).astype(np.float32)
        for k, s in [("a", (6, 5)), ("b", (5, 4)), ("c", (6, 4))]
    }

    def f(p, x):
        return (x @ p["a"]) @ p["b"] + x @ p["c"] + 1.0

    r = _bound(f, p, (1, 6))
    exact = np.linalg.norm(p["a"].astype(np.float64) @ p["b"] + p["c"].astype(np.float64), 2)
    assert r.kind == "proven" and r.num_nodes == 0
    assert exact <= r.upper <= exact * 1.001


def test_residual_block_formula():
    rng = np.random.default_rng(2)
    w1, w2 = rng.standard_normal((2, 5, 5)).astype(np.float32)

    def f(p, x):
        return x + jax.nn.relu(x @ p[0]) @ p[1]

    r = _bound(f, [w1, w2], (1, 5), grouped_norms=False)
    a, b = w1.astype(np.float64).T, w2.astype(np.float64).T  # Row-vector convention.
    n2 = lambda m: np.linalg.norm(m, 2)  # noqa: E731
    expected = n2(np.eye(5) + 0.5 * b @ a) + 0.5 * n2(b) * n2(a)
    assert r.upper == pytest.approx(expected, rel=1.5e-3)
    assert r.upper >= expected
    assert r.upper < 1 + n2(a) * n2(b)  # Strictly better than the composition here.
    # Grouped: ||[I + ½BA, ½B ||A|| / sqrt(p)]||-type bound over the two terms, never looser.
    grouped = _bound(f, [w1, w2], (1, 5))
    assert grouped.upper <= r.upper
    xs = np.random.default_rng(0).standard_normal((4096, 1, 5)).astype(np.float32)
    ys = xs + 0.3 * np.random.default_rng(1).standard_normal(xs.shape).astype(np.float32)
    diff = np.asarray(jax.vmap(lambda u, v: f([w1, w2], u) - f([w1, w2], v))(xs, ys))
    ratios = np.linalg.norm(diff, axis=(1, 2)) / np.linalg.norm(xs - ys, axis=(1, 2))
    assert ratios.max() <= grouped.upper


def _tiny_relu_apply(p, x):
    h = jax.nn.relu(x @ p[0] + p[1])
    return jax.nn.relu(h @ p[2] + p[3]) @ p[4]


def _tiny_relu_net(seed):
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((2, 4)),
        rng.standard_normal(4),
        rng.standard_normal((4, 3)),
        rng.standard_normal(3),
        rng.standard_normal((3, 2)),
    ]


def _exact_relu_lipschitz(p):
    """max ||J|| over the activation regions with non-empty interior (LP-checked)."""
    w1, b1, w2, b2, w3 = (np.asarray(v, np.float64) for v in p)
    best = 0.0
    for s1 in itertools.product([0, 1], repeat=4):
        d1 = np.diag(s1)
        for s2 in itertools.product([0, 1], repeat=3):
            d2 = np.diag(s2)
            # Pre-activations as affine functions of x (row vector): z1 = x w1 + b1,
            # z2 = (z1 d1) w2 + b2; the region: sign(z) = s, with margin t.
            a1, c1 = w1, b1
            a2, c2 = w1 @ d1 @ w2, b1 @ d1 @ w2 + b2
            sg1 = 2 * np.array(s1) - 1
            sg2 = 2 * np.array(s2) - 1
            # -sg*(x a + c) + t <= 0  for all rows; maximise t <= 1.
            a_ub = np.concatenate([-(a1 * sg1).T, -(a2 * sg2).T])
            b_ub = np.concatenate([c1 * sg1, c2 * sg2])
            a_ub = np.concatenate([a_ub, np.ones((len(a_ub), 1))], axis=1)
            res = scipy.optimize.linprog(
                [0, 0, -1], A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * 2 + [(None, 1)]
            )
            if res.status == 0 and -res.fun > 1e-9:
                best = max(best, np.linalg.norm(w1 @ d1 @ w2 @ d2 @ w3, 2))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_relu_network_against_region_enumeration(seed):
    p = _tiny_relu_net(seed)

    exact = _exact_relu_lipschitz(p)
    r = _bound(_tiny_relu_apply, [np.asarray(v, np.float32) for v in p], (1, 2))
    naive = np.prod(
        [
            np.linalg.norm(np.asarray(w, np.float32).astype(np.float64), 2)
            for w in (p[0], p[2], p[4])
        ]
    )
    assert exact <= r.upper <= naive * (1 + 1e-3)
    assert r.upper <= 3 * exact


def test_a_halved_slope_range_would_be_caught(monkeypatch):
    # An unsound rule (ReLU slopes claimed in [1/4, 3/4]) gives a "bound" below the exact
    # constant of x -> sum(relu(x)) (sqrt(2)): the test above would fail.
    def f(p, x):
        return jnp.sum(jax.nn.relu(x), axis=1, keepdims=True) * p

    assert _bound(f, np.float32(1.0), (1, 2)).upper >= math.sqrt(2)
    monkeypatch.setitem(_network_bound._SLOPES, "max", (0.25, 0.75))
    assert _bound(f, np.float32(1.0), (1, 2)).upper < math.sqrt(2)


def _small_cnn(activation, pool):
    rng = np.random.default_rng(3)
    p = {
        "k1": (rng.standard_normal((3, 3, 2, 4)) * 0.5).astype(np.float32),
        "s1": rng.uniform(0.5, 2.0, 4).astype(np.float32),
        "k2": (rng.standard_normal((3, 3, 4, 4)) * 0.5).astype(np.float32),
        "w": rng.standard_normal((4, 3)).astype(np.float32),
    }

    def conv(x, k):
        return jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def f(p, x):
        h = activation(conv(x, p["k1"]) * p["s1"] + 0.1)
        h = h + activation(conv(h, p["k2"]))
        if pool:
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return jnp.mean(h, axis=(1, 2)) @ p["w"]

    return f, p


@pytest.mark.parametrize(
    "activation,pool",
    [(jax.nn.relu, False), (jax.nn.silu, False), (jax.nn.relu, True), (jnp.tanh, False)],
)
def test_bound_exceeds_realised_ratios(activation, pool):
    f, p = _small_cnn(activation, pool)
    shape = (1, 6, 6, 2)
    r = _bound(f, p, shape)
    assert r.upper is not None and r.kind == "proven"

    def ratio(x, y):
        return jnp.linalg.norm(f(p, x) - f(p, y)) / jnp.linalg.norm(x - y)

    rng = np.random.default_rng(0)
    xs = rng.standard_normal((128, *shape)).astype(np.float32)
    scale = rng.uniform(0.01, 2, (128, 1, 1, 1, 1))
    ys = (xs + rng.standard_normal(xs.shape) * scale).astype(np.float32)
    ratios = jax.vmap(ratio)(jnp.asarray(xs), jnp.asarray(ys))
    # Adversarial pairs: gradient ascent on the ratio.
    grad = jax.jit(jax.vmap(jax.grad(lambda x, y: ratio(x, y), argnums=(0, 1))))
    x, y = jnp.asarray(xs[:32]), jnp.asarray(xs[:32] + 0.05 * ys[:32])
    for _ in range(30):
        gx, gy = grad(x, y)
        x, y = x + 0.05 * gx, y + 0.05 * gy
    adv = jax.vmap(ratio)(x, y)
    best = float(max(ratios.max(), adv.max()))
    assert best <= r.upper * (1 + 1e-5)
    assert r.upper < 50 * best  # Not vacuous.


def test_unsupported_op_gives_none():
    def f(p, x):
        return jnp.exp(x) * p

    r = _bound(f, np.float32(1.0), (1, 3))
    assert r.upper is None and "exp" in r.note


def test_network_report_fields():
    rng = np.random.default_rng(4)
    p = {
        "w1": rng.standard_normal((5, 5)).astype(np.float32),
        "w2": rng.standard_normal((5, 5)).astype(np.float32),
    }

    def f(p, x):
        return x + jax.nn.relu(x @ p["w1"]) @ p["w2"]

    r = network_report(f, p, jnp.zeros((1, 5)), num_points=1, compute_spectra=False)
    n = r.network
    assert n["lipschitz_upper"] <= n["lipschitz_upper_naive"]
    assert n["lipschitz_upper_method"] == "midpoint"
    assert n["lipschitz_upper_kind"] == "proven" and n["lipschitz_upper_delta"] == 0.0
    assert n["lipschitz_upper_factor"] >= 1.0
    assert n["blocks"] and n["blocks"][-1]["target"] == "output"
    assert n["lipschitz_upper"] >= n["lipschitz_lower"]
    assert r.to_dict()["network"]["lipschitz_upper_kind"] == "proven"


def test_softmax_head_is_bounded_and_sound():
    rng = np.random.default_rng(5)
    p = [
        rng.standard_normal((4, 6)).astype(np.float32) * 2,
        rng.standard_normal((6, 3)).astype(np.float32),
    ]

    def f(p, x):
        return jax.nn.softmax(x @ p[0], axis=-1) @ p[1]

    r = _bound(f, p, (1, 4))
    assert r.upper is not None and r.num_nodes == 1  # The max it subtracts is pruned.
    w0, w1 = (np.asarray(w, np.float64) for w in p)
    assert r.upper <= 0.5 * np.linalg.norm(w0, 2) * np.linalg.norm(w1, 2) * (1 + 1e-3)
    xs = rng.standard_normal((512, 1, 4)).astype(np.float32) * 3
    ys = xs + 0.01 * rng.standard_normal(xs.shape).astype(np.float32)
    num = np.linalg.norm(np.asarray(jax.vmap(lambda a, b: f(p, a) - f(p, b))(xs, ys)), axis=(1, 2))
    assert np.max(num / np.linalg.norm(xs - ys, axis=(1, 2))) <= r.upper


def test_windows_and_lanczos_paths_are_sound():
    rng = np.random.default_rng(6)
    ws = [rng.standard_normal((6, 6)).astype(np.float32) / 2 for _ in range(5)]

    def f(p, x):
        h = jax.nn.relu(x @ p[0])
        h = jax.nn.relu(h + jax.nn.relu(h @ p[1]) @ p[2])  # Residual block: its output is a cut.
        h = jax.nn.relu(h + jax.nn.relu(h @ p[3]) @ p[4])
        return h

    full = _bound(f, ws, (1, 6))
    windowed = _bound(f, ws, (1, 6), windows=True)
    lanczos = _bound(f, ws, (1, 6), max_dense_entries=0, max_work=10**6)
    assert full.kind == windowed.kind == "proven"
    assert lanczos.kind == "probabilistic" and 0 < lanczos.delta <= 1e-6
    assert "4 windows" in windowed.note  # x | relu | block | block | output.
    assert full.upper <= windowed.upper * (1 + 1e-9)
    xs = rng.standard_normal((2048, 1, 6)).astype(np.float32)
    ys = xs + rng.standard_normal(xs.shape).astype(np.float32) * 0.1
    diff = np.asarray(jax.vmap(lambda a, b: f(ws, a) - f(ws, b))(xs, ys))
    best = np.max(np.linalg.norm(diff, axis=(1, 2)) / np.linalg.norm(xs - ys, axis=(1, 2)))
    assert best <= min(full.upper, windowed.upper, lanczos.upper)
    skipped = _bound(f, ws, (1, 6), max_dense_entries=0, max_work=10)
    assert skipped.upper is None and "skipped" in skipped.note


def test_lanczos_path_on_a_linear_network_brackets_its_norm():
    w = np.random.default_rng(7).standard_normal((40, 30)).astype(np.float32)
    r = _bound(lambda p, x: x @ p, w, (1, 40), max_dense_entries=0, max_work=10**6)
    exact = np.linalg.norm(w.astype(np.float64), 2)
    eps = _composite.kw_epsilon(1e-6, 40, 60)
    assert r.kind == "probabilistic"
    assert exact <= r.upper <= exact / math.sqrt(1 - eps) * (1 + 1e-9)


# ------------------------------------------------------------------------ grouped norms
def _sup_sum_brute_force(mats, radii, restarts=20, steps=300):
    """A lower estimate of ``sup ||Σ A_j z_j||`` over ``||z_j|| <= c_j`` (projected ascent)."""
    rng = np.random.default_rng(0)
    best = 0.0
    for _ in range(restarts):
        zs = [rng.standard_normal(a.shape[1]) for a in mats]
        for _ in range(steps):
            zs = [c * z / max(np.linalg.norm(z), 1e-300) for z, c in zip(zs, radii)]
            s = sum(a @ z for a, z in zip(mats, zs))
            best = max(best, float(np.linalg.norm(s)))
            zs = [a.T @ s for a in mats]  # The maximiser of <s, Σ A_j z_j> on the spheres.
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_norm_upper_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    mats = [rng.standard_normal((6, n)) for n in (3, 5, 8)]
    radii = rng.uniform(0.2, 3.0, 3)
    g = _composite.grouped_norm_upper(mats, radii)
    triangle = sum(c * np.linalg.norm(a, 2) for a, c in zip(mats, radii))
    brute = _sup_sum_brute_force(mats, radii)
    assert g.kind == "proven" and g.method == "grouped"
    assert brute <= g.upper <= triangle * (1 + 1e-9)
    assert g.upper <= 1.25 * brute  # Near the true supremum on these.


def test_grouped_norm_upper_exact_cases():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((5, 4))
    # Equal blocks: the supremum is the triangle inequality's Σ c_j ||A||.
    g = _composite.grouped_norm_upper([a, a, a], [1.0, 2.0, 0.5])
    assert g.upper == pytest.approx(3.5 * np.linalg.norm(a, 2), rel=1e-6)
    assert g.upper >= 3.5 * np.linalg.norm(a, 2)
    # Blocks with orthogonal ranges: sqrt(Σ c_j² ||A_j||²), not the triangle's sum.
    b1 = np.zeros((4, 2))
    b1[:2] = rng.standard_normal((2, 2))
    b2 = np.zeros((4, 3))
    b2[2:] = rng.standard_normal((2, 3))
    exact = math.hypot(2 * np.linalg.norm(b1, 2), 3 * np.linalg.norm(b2, 2))
    g = _composite.grouped_norm_upper([b1, b2], [2.0, 3.0])
    assert exact <= g.upper <= exact * 1.02  # 6 damped weight updates: within 2 %.
    # Blocks with one range and different top directions: the supremum is
    # max_u Σ_j ||A_jᵀ u|| = 2 sqrt(0.505) at u = (1, 1)/sqrt(2), not the triangle's 2.
    d1, d2 = np.diag([1.0, 0.1]), np.diag([0.1, 1.0])
    exact = 2 * math.sqrt(0.505)
    g = _composite.grouped_norm_upper([d1, d2], [1.0, 1.0])
    assert exact <= g.upper <= exact * 1.001
    assert _sup_sum_brute_force([d1, d2], [1.0, 1.0]) == pytest.approx(exact, rel=1e-6)
    assert _composite.grouped_norm_upper([a, np.zeros((5, 2))], [0.0, 1.0]).upper == 0.0
    with pytest.raises(ValueError, match="radii"):
        _composite.grouped_norm_upper([a], [-1.0])
    with pytest.raises(ValueError, match="blocks"):
        _composite.grouped_norm_upper([a, np.zeros((3, 2))], [1.0, 1.0])


def test_grouped_norm_without_the_weights_would_be_caught(monkeypatch):
    # The same blocks scaled by c_j alone (no 1/sqrt(p_j)): below the supremum, so the
    # brute-force test above would fail.
    rng = np.random.default_rng(1)
    mats = [rng.standard_normal((4, 3)) for _ in range(3)]
    radii = [1.0, 1.0, 1.0]
    wrong = np.linalg.norm(np.concatenate(mats, axis=1), 2)
    assert wrong < _sup_sum_brute_force(mats, radii)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_dp_is_sound_and_not_looser(seed):
    p = _tiny_relu_net(seed)

    exact = _exact_relu_lipschitz(p)
    p32 = [np.asarray(v, np.float32) for v in p]
    grouped = _bound(_tiny_relu_apply, p32, (1, 2))
    summed = _bound(_tiny_relu_apply, p32, (1, 2), grouped_norms=False)
    assert exact <= grouped.upper <= summed.upper
