"""A lower bound on a network's Lipschitz constant that searches, its witness, and a check of an
upper bound on pairs of inputs.

Every number :func:`search_lower_bound` returns is *realised*: either a ratio
``||f(x) - f(y)|| / ||x - y||`` at a pair of inputs, or ``||J(x) v|| / ||v||`` at an input ``x``
and a direction ``v``. Both are at most the ℓ2 Lipschitz constant of ``f`` (the first by its
definition; the second because ``J(x) v`` is the limit of such ratios), so the value is a true
lower bound (up to the floating-point rounding of the one evaluation that gives it), however the
search that found the witness went.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.report import _empirical

#: Witness kinds: ``'pair'`` (arrays ``x``, ``y``: the value is ``||f(x)-f(y)|| / ||x-y||``) and
#: ``'jacobian'`` (arrays ``x``, ``v``: the value is ``||J(x) v|| / ||v||``).
WITNESS_KINDS = ("pair", "jacobian")
#: Rounds of the ascent after which the pairs' distances go back to ``eps`` (``shrink`` 0.3:
#: down to 0.027 eps).
SHRINK_CYCLE = 4


@dataclasses.dataclass
class LowerBound:
    """The result of :func:`search_lower_bound`.

    Attributes:
      value: the realised ratio or Jacobian norm of ``witness`` (a lower bound of the ℓ2
        Lipschitz constant).
      kind: ``'pair'`` or ``'jacobian'`` (:data:`WITNESS_KINDS`).
      witness: ``{'kind', 'value', 'x', 'y'}`` or ``{'kind', 'value', 'x', 'v'}`` (each input
        with its batch axis of 1), plus ``pairs_x``, ``pairs_y``: ``(P, 1, ...)`` pairs the
        search reached (the ascent's best pair per restart, and each Jacobian witness ``x``
        with ``x + h v``), for an adversarial check of an upper bound.
      stages: the best value of each stage: ``power`` (power iteration at the start points),
        ``ascent`` (pair ascent), ``refine`` (power iteration at the ascent's best points);
        ``None`` for a stage that did not run.
      per_point: the power stage's value per start point.
      counts: the power stage's iteration count per start point.
      ascent_steps: ascent steps run (``0``: skipped, e.g. out of time).
      refine_counts: the refine stage's iteration counts (empty if it did not run).
      rounds: ascent rounds started (each after a power iteration at the last round's pairs).
    """

    value: float
    kind: str
    witness: dict[str, Any]
    stages: dict[str, float | None]
    per_point: np.ndarray
    counts: np.ndarray
    ascent_steps: int
    refine_counts: np.ndarray
    rounds: int = 1

    def method(self, source: str, power_iterations: int, power_rtol: float) -> str:
        """A one-line description of how the value was found (for ``lipschitz_lower_method``)."""
        stages = ", ".join(
            f"{k} {v:.6g}" if v is not None else f"{k} not run" for k, v in self.stages.items()
        )
        return (
            f"search (a true lower bound: a realised "
            f"{'ratio ||f(x)-f(y)||/||x-y||' if self.kind == 'pair' else '||J(x) v||/||v||'}, "
            f"witness kind '{self.kind}', float{8 * np.dtype(self.witness['x'].dtype).itemsize}"
            "): max of jacobian_power_iteration at "
            f"{len(self.per_point)} {source} points (iterations "
            f"{', '.join(map(str, self.counts))}), pair_ascent (adam, {len(self.per_point)} "
            f"restarts, {self.ascent_steps} steps in {self.rounds} rounds) and "
            "jacobian_power_iteration at the ascent's "
            f"best points (at most {power_iterations} iterations, rtol {power_rtol:g}; used "
            f"{', '.join(map(str, self.refine_counts)) or 'none'}); stages: {stages}"
        )


def _tiny(dtype) -> float:
    return float(jnp.finfo(dtype).tiny)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _ascent_step(flat, optimizer, params, carry, scale, eps):
    """One adam step on every restart's pair, tracking each restart's best realised ratio.

    A restart's pair is ``x = scale * z`` and ``y = x + r u / ||u||`` (``r = eps * scale *
    sqrt(size)``, about ``eps ||x||``: a fixed distance per restart, so that the float32 rounding
    of ``f(y) - f(x)`` stays small beside it); the loss is ``-log(||f(y) - f(x)|| /
    ||y - x||)``. Returns the new carry and the ratios of the pairs before the step (``||y -
    x||`` computed from the rounded ``y``: the ratio of the stored pair).
    """
    z, u, opt_state, best, best_x, best_y = carry
    tiny = _tiny(z.dtype)

    expand = (-1,) + (1,) * (z.ndim - 1)

    def losses(z, u):
        x = scale.reshape(expand) * z
        root_size = float(np.sqrt(np.prod(u.shape[1:])))  # A Python float: keeps the dtype.
        u_norm = jnp.sqrt(jnp.sum(u * u, axis=tuple(range(1, u.ndim)))).reshape(expand)
        r = (eps * scale * root_size).reshape(expand)
        y = x + r * u / jnp.maximum(u_norm, tiny)
        # x and y of every restart in one batch: one forward (and one backward) in the program,
        # not two (XLA:CPU compiles half as much).
        out = jax.vmap(lambda a: flat(params, a))(jnp.concatenate([x, y]))
        n = z.shape[0]
        d = out[n:] - out[:n]
        num2 = jnp.sum(d * d, axis=1)
        den2 = jnp.sum((y - x).reshape(n, -1) ** 2, axis=1)
        loss = 0.5 * (jnp.log(den2 + tiny) - jnp.log(num2 + tiny))
        return jnp.sum(loss), (jnp.sqrt(num2) / jnp.sqrt(den2), x, y)

    grad_fn = jax.value_and_grad(losses, argnums=(0, 1), has_aux=True)
    (_, (ratio, x, y)), grads = grad_fn(z, u)
    updates, opt_state = optimizer.update(grads, opt_state, (z, u))
    z, u = optax.apply_updates((z, u), updates)
    better = jnp.isfinite(ratio) & (ratio > best)
    best = jnp.where(better, ratio, best)
    best_x = jnp.where(better.reshape(expand), x, best_x)
    best_y = jnp.where(better.reshape(expand), y, best_y)
    return (z, u, opt_state, best, best_x, best_y), ratio


@functools.lru_cache(maxsize=8)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(learning_rate)


def _realised_jacobian(values: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``||J v|| / ||v||`` (``v`` is unit only to rounding)."""
    norms = np.linalg.norm(v.reshape(len(v), -1).astype(np.float64), axis=1)
    return values / norms


def search_lower_bound(
    fn: Callable,
    points: np.ndarray,
    params: Any = (),
    *,
    power_iterations: int = 20,
    power_rtol: float = 0.0,
    ascent_steps: int = 100,
    start_iterations: int = 5,
    eps: tuple[float, float] = (0.1, 1.0),
    learning_rate: float = 0.05,
    seed: int = 0,
    stop: Callable[[], bool] | None = None,
    round_steps: int = 50,
    shrink: float = 0.3,
) -> LowerBound:
    """A lower bound of ``fn``'s ℓ2 Lipschitz constant in ``x``, by search, with its witness.

    Three stages, each a compiled JAX program driven by a host loop (one program per step; on a
    2-core CPU XLA ran convolutions inside ``lax.while_loop`` bodies ~6x slower, see
    :func:`train.report.jacobian_lower_bound`):

    1. ``power``: power iteration on ``J(x)ᵀJ(x)`` at every point of ``points``
       (``start_iterations``; ``power_iterations`` when there is no ascent).
    2. ``ascent``: pair ascent, as the LBDN / LiResNet empirical checks do: from each point ``x``
       (one restart each, all restarts ``vmap``ped in one program) and ``y = x + δ``, ``δ`` along
       the power stage's vector with ``||δ|| = eps · ||x||`` (about, ``eps`` spread over the
       restarts; the distance is kept, the direction and ``x`` move), adam (``optax``) on
       ``(x, δ)`` maximising ``log ||f(x) - f(y)|| - log ||x - y||`` (variables scaled by the
       point's RMS). A ReLU network's Jacobian is piecewise constant, so ascent on ``||J(x) v||``
       alone has no gradient; a pair at a finite distance has one.
    3. ``refine``: power iteration at points along the best pair's segment (where ``||J δ̂||``
       reaches the pair's ratio somewhere), started along ``y - x`` (``power_iterations``).

    The ascent runs in rounds of ``round_steps`` steps: after each round but the last, power
    iteration (``start_iterations``) at each restart's pair midpoint, and the next round starts
    there, along the refined vectors, with the pairs' distances times ``shrink`` (back to
    ``eps`` every :data:`SHRINK_CYCLE` rounds). Measured on the quick-preset ResNet-8
    (baseline, 8 test images, 200 / 400 steps): one round 41.6 / 43 (1000 steps), rounds of 50
    steps 62.0 / 74.0.

    The value is the largest realised quantity found: a pair's ``||f(x)-f(y)|| / ||x-y||`` or
    ``||J(x) v|| / ||v||``, each evaluated by the compiled program that ran ``fn`` (in ``fn``'s
    own precision: a float32 value carries its rounding, relative ~1e-6 for a Jacobian value,
    more for a pair at a short distance; :func:`recompute_lower_bound` re-evaluates a witness,
    in float64 if asked). Whatever the search did, the value is a true lower bound.

    Args:
      fn: ``fn(params, x)`` maps one input (with its batch axis of 1) to the network's outputs
        (a pytree; its float leaves are stacked).
      points: ``(num_points, 1, ...)`` start points (data, or random).
      params: passed to ``fn`` (an argument of the programs, not a constant in them).
      power_iterations: power iterations per point of the ``refine`` stage (of the ``power``
        stage when ``ascent_steps=0``), at most.
      power_rtol: a point's power iteration stops once ``||JᵀJ v||`` changes by at most this
        (relative) in one iteration.
      ascent_steps: adam steps of the ``ascent`` stage, at most (``0``: no ascent, no refine).
      start_iterations: power iterations per point of the ``power`` stage, at most, when there
        is an ascent (its vectors only start the pairs; measured on ResNet-20 @32², 4 points:
        30 ascent steps took the lower bound from 3.19 (power iteration) to 6.67).
      eps: ``(smallest, largest)`` start distance of the pairs, relative to the point's norm,
        spread geometrically over the restarts. Measured on a 2-layer ReLU network (8-16-4):
        pairs at ``0.1``-``1`` of the norm cross activation regions and reached 18.69 (of a
        sampled 18.94) where ``1e-2`` stayed at the power iteration's 17.76.
      learning_rate: adam's step on the RMS-scaled variables.
      seed: for the start vectors.
      stop: ``stop()`` is asked between steps; ``True`` ends the search (the time budget): the
        first power stage still runs two iterations and one evaluation; the search ends at most
        one step (one ascent step or one power step and its evaluation) after it.
      round_steps: ascent steps per round (``ascent_steps // round_steps`` rounds, at least
        one).
      shrink: the pairs' distance factor from one round to the next, in ``(0, 1]``.

    Returns:
      :class:`LowerBound`.

    Raises:
      ValueError: ``points`` is not ``(num_points >= 1, 1, ...)``; bad ``eps``,
        ``round_steps`` or ``shrink``.

    Example:
      >>> import numpy as np
      >>> w = np.diag([3.0, 1.0]).astype(np.float32)
      >>> lb = search_lower_bound(lambda p, x: x @ p, np.ones((2, 1, 2), np.float32), w,
      ...                         ascent_steps=5)
      >>> round(lb.value, 4), lb.kind in ('jacobian', 'pair')
      (3.0, True)
    """
    points = np.asarray(points)
    if points.ndim < 2 or points.shape[0] < 1 or points.shape[1] != 1:
        raise ValueError(f"points must have shape (num_points >= 1, 1, ...); got {points.shape}")
    stop_fn = stop if stop is not None else (lambda: False)
    flat = _empirical.flat_outputs(fn)
    rng = np.random.default_rng(seed)
    n = points.shape[0]
    dtype = points.dtype
    v0 = _empirical.unit_vectors(rng, points.shape, dtype)
    power_args = (flat, params, points, v0, np.ones(n, bool))
    step = _empirical.compiled(_empirical._power_step, power_args)
    params = jax.device_put(params)
    values, v_dev, counts = _empirical.power_iterate(
        step,
        params,
        jax.device_put(points),
        jax.device_put(v0),
        num_iterations=power_iterations if ascent_steps <= 0 else start_iterations,
        rtol=power_rtol,
        stop=stop_fn,
    )
    v = np.asarray(jax.device_get(v_dev))
    per_point = _realised_jacobian(values, v)
    best_i = int(np.argmax(per_point))
    candidates = [(per_point[best_i], "jacobian", points[best_i], v[best_i])]
    pairs_x, pairs_y = [], []
    for i in range(n):  # Each Jacobian witness as a pair at a short distance.
        h = 1e-3 * max(float(np.linalg.norm(points[i])), 1.0)
        pairs_x.append(points[i])
        pairs_y.append((points[i] + h * v[i] / np.linalg.norm(v[i])).astype(dtype))
    stages: dict[str, float | None] = {
        "power": float(per_point.max()),
        "ascent": None,
        "refine": None,
    }
    steps_run = 0
    rounds_run = 0
    refine_counts = np.zeros(0, np.int32)
    if ascent_steps > 0 and not stop_fn():
        lo, hi = (float(e) for e in eps)
        if not 0 < lo <= hi:
            raise ValueError(
                f"eps must be (smallest, largest) with 0 < smallest <= largest; got {eps}"
            )
        if round_steps < 1 or not 0 < shrink <= 1:
            raise ValueError(
                f"round_steps must be >= 1 and shrink in (0, 1]; got {round_steps}, {shrink}"
            )
        rounds = max(1, int(ascent_steps) // int(round_steps))
        per_round = [int(ascent_steps) // rounds + (r < int(ascent_steps) % rounds)
                     for r in range(rounds)]
        axes = tuple(range(1, points.ndim))
        expand = (-1,) + (1,) * (points.ndim - 1)
        size = np.prod(points.shape[1:])
        optimizer = _adam(float(learning_rate))
        starts, start_v = points, v
        ascent = None
        ascent_best = -np.inf
        for r in range(rounds):
            if stop_fn():
                break
            rounds_run = r + 1
            # Variables scaled by each point's RMS: adam's step is relative to the input's size.
            scale = np.sqrt(np.mean(starts.astype(np.float64) ** 2, axis=axes))
            scale = np.where(scale > 0, scale, 1.0).astype(dtype)
            z = (starts / scale.reshape(expand)).astype(dtype)
            u = (start_v * np.sqrt(size)).astype(dtype)  # Unit-RMS coordinates, as z's.
            opt_state = optimizer.init((z, u))
            carry = (z, u, opt_state, np.full(n, -np.inf, dtype), starts.copy(), starts.copy())
            # Each round shrinks the pairs' distances (``shrink`` per round; back to ``eps``
            # every ``SHRINK_CYCLE`` rounds: shorter pairs would be rounding-dominated).
            f = float(shrink) ** (r % SHRINK_CYCLE)
            eps_arr = (
                np.geomspace(lo * f, hi * f, n).astype(dtype)
                if n > 1
                else np.full(1, hi * f, dtype)
            )
            if ascent is None:
                ascent = _empirical.compiled(
                    _ascent_step, (flat, optimizer, params, carry, scale, eps_arr)
                )
            carry = jax.device_put(carry)
            scale_dev, eps_dev = jax.device_put(scale), jax.device_put(eps_arr)
            for _ in range(per_round[r]):
                if stop_fn():
                    break
                carry, ratio = ascent(params, carry, scale_dev, eps_dev)
                ratio.block_until_ready()  # One step at a time: the budget is checked per step.
                steps_run += 1
            best, best_x, best_y = (np.asarray(a) for a in jax.device_get(carry[3:]))
            best = best.astype(np.float64)
            j = int(np.argmax(best))
            if np.isfinite(best[j]):
                # The ratio of the stored pair as the ascent's program evaluated it (fn's own
                # precision; the distance is fixed per restart, so rounding stays relative
                # ~1e-5).
                ascent_best = max(ascent_best, float(best[j]))
                stages["ascent"] = ascent_best
                candidates.append((best[j], "pair", best_x[j], best_y[j]))
            pairs_x.extend(best_x[np.isfinite(best)])  # A restart that never moved: x = y.
            pairs_y.extend(best_y[np.isfinite(best)])
            if power_iterations <= 0 or not np.any(np.isfinite(best)) or stop_fn():
                break
            # With w the unit vector of f(y) - f(x), a pair's ratio is the mean of
            # <w, J(x + t(y-x)) (y-x)/||y-x||> over t, so some point of the segment has
            # ||J δ̂|| at least the ratio (where f is differentiable along it). Last round: n
            # points along the best pair's segment; before it: each restart's midpoint (the
            # next round starts there, along the refined vectors).
            d = (best_y - best_x).astype(np.float64)
            dn = np.linalg.norm(d.reshape(n, -1), axis=1).reshape(expand)
            ok = np.isfinite(best).reshape(expand) & (dn > 0)
            dirs = np.where(ok, d / np.where(dn > 0, dn, 1.0), start_v).astype(dtype)
            if r == rounds - 1:
                t = ((np.arange(n) + 0.5) / n).reshape(expand)
                refine_x = (best_x[j][None] + t * d[j][None]).astype(dtype)
                v_start = np.broadcast_to(dirs[j], refine_x.shape).copy()
            else:
                refine_x = np.where(ok, best_x + 0.5 * d, starts).astype(dtype)
                v_start = dirs
            values, v_dev, refine_counts = _empirical.power_iterate(
                step,
                params,
                jax.device_put(refine_x),
                jax.device_put(v_start),
                num_iterations=power_iterations if r == rounds - 1 else start_iterations,
                rtol=power_rtol,
                stop=stop_fn,
                min_iterations=0,  # Out of time: one evaluation (of ||J δ̂|| along the segment).
            )
            v_ref = np.asarray(jax.device_get(v_dev))
            refined = _realised_jacobian(values, v_ref)
            k = int(np.argmax(refined))
            stages["refine"] = max(stages["refine"] or -np.inf, float(refined[k]))
            candidates.append((refined[k], "jacobian", refine_x[k], v_ref[k]))
            starts, start_v = refine_x, v_ref / np.linalg.norm(
                v_ref.reshape(n, -1), axis=1
            ).reshape(expand)
    value, kind, wx, w2 = max(candidates, key=lambda c: c[0] if np.isfinite(c[0]) else -1.0)
    witness = {"kind": kind, "value": float(value), "x": np.asarray(wx)}
    witness["y" if kind == "pair" else "v"] = np.asarray(w2)
    witness["pairs_x"] = np.stack(pairs_x)
    witness["pairs_y"] = np.stack(pairs_y)
    return LowerBound(
        value=float(value),
        kind=kind,
        witness=witness,
        stages=stages,
        per_point=per_point,
        counts=counts,
        ascent_steps=steps_run,
        refine_counts=refine_counts,
        rounds=rounds_run,
    )


def _load_witness(witness) -> dict[str, Any]:
    if isinstance(witness, dict):
        return witness
    with np.load(witness, allow_pickle=False) as data:
        out = {k: data[k] for k in data.files}
    out["kind"] = str(out["kind"])
    return out


def _cast(tree, dtype):
    def cast(a):
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree.map(cast, tree)


def recompute_lower_bound(
    apply_fn: Callable, params: Any, witness, *args: Any, dtype=None, **kwargs: Any
) -> float:
    """Re-evaluates a lower bound's witness: a true lower bound of the Lipschitz constant.

    Independent of the search's programs: a ``'pair'`` witness is evaluated by two forward
    passes (``||f(x) - f(y)|| / ||x - y||``, the norms in float64 on the host), a
    ``'jacobian'`` one by ``jax.jvp`` (``||J(x) v|| / ||v||``). ``f`` is
    ``x -> apply_fn(params, x, *args, **kwargs)`` with its float outputs stacked.

    Args:
      apply_fn: the network, as given to :func:`train.report.network_report`.
      params: its parameters.
      witness: a dict (``report.witness`` or :attr:`LowerBound.witness`) or the path of the
        ``.npz`` file :func:`train.report.write_report` writes (``lower_bound_witness.npz``).
      *args: the other arguments of ``apply_fn``, held fixed.
      dtype: ``None`` (the witness's own dtype) or e.g. ``np.float64``: the inputs and float
        params are cast to it (float64 needs ``jax_enable_x64``, e.g. ``with
        jax.enable_x64(True)``) and the value recomputed at that precision.
      **kwargs: keyword arguments of ``apply_fn``.

    Returns:
      The realised ratio or Jacobian norm (float).

    Raises:
      ValueError: an unknown witness kind.
    """
    w = _load_witness(witness)
    kind = str(w["kind"])
    if kind not in WITNESS_KINDS:
        raise ValueError(f"witness kind must be one of {WITNESS_KINDS}; got {kind!r}")
    dt = np.dtype(dtype) if dtype is not None else np.asarray(w["x"]).dtype
    p = _cast(params, dt)
    flat = _empirical.flat_outputs(lambda q, x: apply_fn(q, x, *args, **kwargs))
    x = jnp.asarray(np.asarray(w["x"]).astype(dt))
    if kind == "pair":
        y = jnp.asarray(np.asarray(w["y"]).astype(dt))
        fx = np.asarray(flat(p, x), np.float64)
        fy = np.asarray(flat(p, y), np.float64)
        dx = np.asarray(y, np.float64) - np.asarray(x, np.float64)
        return float(np.linalg.norm(fy - fx) / np.linalg.norm(dx))
    v = jnp.asarray(np.asarray(w["v"]).astype(dt))
    _, jv = jax.jvp(lambda a: flat(p, a), (x,), (v,))
    return float(np.linalg.norm(np.asarray(jv, np.float64)) / np.linalg.norm(np.asarray(v)))


def random_pairs(
    x_shape, num: int, *, seed: int = 0, dtype=np.float32, centres: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` random pairs ``(x, y)``, each ``(num, *x_shape)``, near and far.

    ``x`` is standard normal (or ``centres[i % len(centres)]`` plus a small perturbation);
    ``y = x + r g`` with ``g`` standard normal and ``r`` cycling through ``1e-3, 1e-2, 1e-1, 1``.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num, *x_shape))
    if centres is not None and len(centres):
        centres = np.asarray(centres, np.float64).reshape((-1, *x_shape))
        x = centres[np.arange(num) % len(centres)] + 1e-2 * x
    r = np.array([1e-3, 1e-2, 1e-1, 1.0])[np.arange(num) % 4]
    y = x + r.reshape((-1,) + (1,) * len(x_shape)) * rng.standard_normal(x.shape)
    return x.astype(dtype), y.astype(dtype)


@functools.partial(jax.jit, static_argnums=(0,))
def _pair_outputs(flat, params, xs, ys):
    return jax.vmap(lambda a: flat(params, a))(xs), jax.vmap(lambda a: flat(params, a))(ys)


def _pair_ratios(flat, params, xs, ys) -> np.ndarray:
    """``||f(x) - f(y)|| / ||x - y||`` per pair (outputs in ``f``'s precision, the rest float64)."""
    fx, fy = jax.device_get(_pair_outputs(flat, params, xs, ys))
    m = len(xs)
    diff = (np.asarray(fy, np.float64) - np.asarray(fx, np.float64)).reshape(m, -1)
    dx = (np.asarray(ys, np.float64) - np.asarray(xs, np.float64)).reshape(m, -1)
    return np.linalg.norm(diff, axis=1) / np.linalg.norm(dx, axis=1)


def check_upper_bound(
    apply_fn: Callable,
    params: Any,
    upper: float,
    pairs: tuple[np.ndarray, np.ndarray],
    *args: Any,
    rtol: float | None = None,
    batch_size: int = 32,
    **kwargs: Any,
) -> dict[str, Any]:
    """Counts the pairs whose realised ratio exceeds ``upper``: a soundness check of a bound.

    ``ratio_i = ||f(x_i) - f(y_i)|| / ||x_i - y_i||`` (outputs in ``apply_fn``'s precision, the
    differences and norms in float64 on the host). A sound upper bound of the Lipschitz
    constant has no pair with ``ratio > upper``; ``violations`` counts ``ratio > upper (1 +
    rtol)``, the tolerance covering the rounding of a ratio evaluated in float32 (``rtol=None``:
    ``1e-4`` for float32 outputs, ``1e-9`` for float64); ``strict_violations`` counts ``ratio >
    upper``.

    Args:
      apply_fn: ``apply_fn(params, x, *args, **kwargs)``.
      params: its parameters.
      upper: the bound to check.
      pairs: ``(xs, ys)``, each ``(P, 1, ...)`` (each input with its batch axis of 1).
      *args: the other arguments of ``apply_fn``, held fixed.
      rtol: see above.
      batch_size: pairs per call of the compiled program (the last batch is padded).
      **kwargs: keyword arguments of ``apply_fn``.

    Returns:
      ``{'num_pairs', 'violations', 'strict_violations', 'rtol', 'upper', 'max_ratio',
      'max_ratio_over_upper', 'ratios'}``.

    Raises:
      ValueError: ``pairs`` are not two arrays of the same shape ``(P >= 1, 1, ...)``, or
        ``upper`` is not a positive finite number.
    """
    xs, ys = (np.asarray(a) for a in pairs)
    if xs.shape != ys.shape or xs.ndim < 2 or xs.shape[0] < 1 or xs.shape[1] != 1:
        raise ValueError(
            f"pairs must be two arrays of shape (P >= 1, 1, ...); got {xs.shape}, {ys.shape}"
        )
    if upper is None or not np.isfinite(upper) or upper <= 0:
        raise ValueError(f"upper must be a positive finite number; got {upper}")
    flat = _empirical.flat_outputs(lambda q, x: apply_fn(q, x, *args, **kwargs))
    num = xs.shape[0]
    batch = min(int(batch_size), num)
    ratios = np.zeros(num)
    out_dtype = None
    for s in range(0, num, batch):
        bx, by = xs[s : s + batch], ys[s : s + batch]
        m = len(bx)
        if m < batch:  # Same shape every call: one program.
            bx = np.concatenate([bx, np.repeat(bx[-1:], batch - m, 0)])
            by = np.concatenate([by, np.repeat(by[-1:], batch - m, 0)])
        fx, fy = jax.device_get(_pair_outputs(flat, params, bx, by))
        out_dtype = fx.dtype
        diff = np.asarray(fy, np.float64)[:m] - np.asarray(fx, np.float64)[:m]
        dx = (np.asarray(by, np.float64) - np.asarray(bx, np.float64))[:m].reshape(m, -1)
        ratios[s : s + m] = np.linalg.norm(diff, axis=1) / np.linalg.norm(dx, axis=1)
    if rtol is None:
        rtol = 1e-9 if np.dtype(out_dtype) == np.float64 else 1e-4
    upper = float(upper)
    return {
        "num_pairs": int(num),
        "violations": int(np.sum(ratios > upper * (1 + rtol))),
        "strict_violations": int(np.sum(ratios > upper)),
        "rtol": float(rtol),
        "upper": upper,
        "max_ratio": float(ratios.max()),
        "max_ratio_over_upper": float(ratios.max() / upper),
        "ratios": ratios,
    }


def soundness_pairs(
    witness: dict[str, Any] | None,
    x_shape,
    num_random: int = 256,
    *,
    seed: int = 0,
    dtype=np.float32,
    centres: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of a soundness check: the lower bound's own (adversarial) pairs and random ones.

    Args:
      witness: a lower bound's witness (its ``pairs_x`` / ``pairs_y`` and, for a ``'pair'``
        witness, its ``x`` / ``y``), or ``None``.
      x_shape: one input's shape (with its batch axis of 1).
      num_random: random pairs (:func:`random_pairs`) added.
      seed: for the random pairs.
      dtype: of the random pairs.
      centres: optional data points the random pairs start near.

    Returns:
      ``(xs, ys)``, each ``(P, *x_shape)``.
    """
    xs, ys = [], []
    if witness is not None:
        w = _load_witness(witness)
        if "pairs_x" in w:
            xs.append(np.asarray(w["pairs_x"], dtype))
            ys.append(np.asarray(w["pairs_y"], dtype))
        if str(w["kind"]) == "pair":
            xs.append(np.asarray(w["x"], dtype)[None])
            ys.append(np.asarray(w["y"], dtype)[None])
    rx, ry = random_pairs(tuple(x_shape), num_random, seed=seed, dtype=dtype, centres=centres)
    xs.append(rx)
    ys.append(ry)
    return np.concatenate(xs), np.concatenate(ys)
