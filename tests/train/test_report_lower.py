"""`train.report`'s searched lower bound, its witness, the soundness check, and a report that does
not lose work when a stage fails."""

import itertools
import json
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from flax import nnx
from scipy.optimize import linprog

from train import report
from train.report import _api
from train.report import _empirical
from train.report import _lower


def _tmpdir(test: absltest.TestCase) -> pathlib.Path:
    path = pathlib.Path(tempfile.mkdtemp())
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def _relu_net(seed=0, d_in=2, hidden=6, d_out=2):
    rng = np.random.default_rng(seed)
    p = {
        "w1": rng.normal(size=(d_in, hidden)),
        "b1": rng.normal(size=hidden),
        "w2": rng.normal(size=(hidden, d_out)),
    }

    def f(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]

    return f, p


def _exact_relu_constant(p) -> float:
    """max over the feasible (full-dimensional) activation regions of ||W2 D W1||.

    Each of the 2^hidden sign patterns is checked with a linear program: maximise the margin
    t with s_i (w_i . x + b_i) >= t in a box; the region is full-dimensional iff t > 0. The
    Lipschitz constant of a continuous piecewise-linear map is the largest ||J|| over them.
    """
    w1, b1, w2 = p["w1"], p["b1"], p["w2"]
    d_in, hidden = w1.shape
    best = 0.0
    for signs in itertools.product((1.0, -1.0), repeat=hidden):
        s = np.array(signs)
        # Variables (x, t): minimise -t s.t. -s_i (w_i . x + b_i) + t <= 0, t <= 1, |x| <= 1e3.
        a_ub = np.concatenate([-(s[:, None] * w1.T), np.ones((hidden, 1))], axis=1)
        b_ub = s * b1
        res = linprog(
            np.r_[np.zeros(d_in), -1.0],
            A_ub=a_ub,
            b_ub=b_ub,
            bounds=[(-1e3, 1e3)] * d_in + [(None, 1.0)],
        )
        if res.status == 0 and -res.fun > 1e-9:
            d = (s > 0).astype(float)
            best = max(best, np.linalg.norm(w1 @ np.diag(d) @ w2, 2))
    return float(best)


class SearchTest(absltest.TestCase):
    def test_linear_network_is_tight_and_below_exact(self):
        rng = np.random.default_rng(0)
        p = {"a": rng.normal(size=(3, 3, 2, 3)), "b": rng.normal(size=(2, 2, 3, 2))}
        dn = ("NHWC", "HWIO", "NHWC")

        def f(p, x):
            y = jax.lax.conv_general_dilated(x, p["a"], (1, 1), "SAME", dimension_numbers=dn)
            return jax.lax.conv_general_dilated(y, p["b"], (2, 2), "VALID", dimension_numbers=dn)

        full = jax.jacobian(lambda x: f(p, x).ravel())(jnp.zeros((1, 6, 6, 2)))
        exact = np.linalg.svd(np.asarray(full).reshape(full.shape[0], -1), compute_uv=False)[0]
        points = rng.normal(size=(3, 1, 6, 6, 2))
        lb = report.search_lower_bound(f, points, p, ascent_steps=20, power_iterations=100)
        self.assertLessEqual(lb.value, exact * (1 + 1e-9))
        self.assertGreaterEqual(lb.value, 0.99 * exact)
        for stage in lb.stages.values():  # Every stage's value is also a lower bound.
            self.assertLessEqual(stage, exact * (1 + 1e-9))

    def test_relu_network_beats_power_iteration_and_stays_below_exact(self):
        for seed in range(3):
            f, p = _relu_net(seed)
            exact = _exact_relu_constant(p)
            points = np.random.default_rng(seed).normal(size=(4, 1, 2))
            old, _ = report.jacobian_lower_bound(f, points, p, num_iterations=20)
            lb = report.search_lower_bound(f, points, p, ascent_steps=60)
            self.assertGreaterEqual(lb.value, old * (1 - 1e-12))
            self.assertLessEqual(lb.value, exact * (1 + 1e-9))
            self.assertLessEqual(old, exact * (1 + 1e-9))
            self.assertGreater(lb.value, 0.5 * exact)

    def test_stop_ends_the_power_iteration_after_min_iterations(self):
        # stop() is asked once every point has min_iterations steps; True ends the iteration
        # there (one more call only evaluates ||J v|| at the final vectors).
        f, p = _relu_net(1)
        points = np.random.default_rng(1).normal(size=(3, 1, 2)).astype(np.float32)
        v0 = _empirical.unit_vectors(np.random.default_rng(0), points.shape, points.dtype)
        active = np.ones(len(points), bool)
        args = (_empirical.flat_outputs(f), p, points, v0, active)
        step = _empirical.compiled(_empirical._power_step, args)
        calls = []

        def counted(*a):
            calls.append(1)
            return step(*a)

        for min_iterations in (0, 2, 3):
            calls.clear()
            asked = []
            _, _, counts = _empirical.power_iterate(
                counted, p, points, v0, num_iterations=20, min_iterations=min_iterations,
                stop=lambda asked=asked: asked.append(1) or True,
            )
            np.testing.assert_array_equal(counts, min_iterations)
            self.assertLen(calls, min_iterations + 1)
            self.assertLen(asked, 1)
        _, _, counts = _empirical.power_iterate(counted, p, points, v0, num_iterations=4)
        np.testing.assert_array_equal(counts, 4)  # No stop: the full count.

    def test_witness_recomputed_independently(self):
        f, p = _relu_net(1, d_in=5, hidden=12, d_out=3)
        points = np.random.default_rng(1).normal(size=(4, 1, 5))
        for steps in (0, 40):
            lb = report.search_lower_bound(f, points, p, ascent_steps=steps)
            if steps == 0:
                self.assertEqual(lb.kind, "jacobian")
            value = report.recompute_lower_bound(f, p, lb.witness)
            self.assertAlmostEqual(value / lb.value, 1.0, delta=1e-9)
            # A pair witness is a ratio; a Jacobian one a unit direction's ||J v||.
            if lb.kind == "pair":
                x, y = lb.witness["x"], lb.witness["y"]
                r = np.linalg.norm(f(p, y) - f(p, x)) / np.linalg.norm(y - x)
            else:
                x, v = lb.witness["x"], lb.witness["v"]
                jac = np.asarray(jax.jacobian(lambda a: f(p, a).ravel())(x)).reshape(-1, x.size)
                r = np.linalg.norm(jac @ v.ravel()) / np.linalg.norm(v)
            self.assertAlmostEqual(r / lb.value, 1.0, delta=1e-9)

    def test_float32_witness_in_float64(self):
        f, p = _relu_net(2, d_in=4, hidden=10, d_out=3)
        p32 = jax.tree.map(lambda a: np.asarray(a, np.float32), p)
        points = np.random.default_rng(2).normal(size=(2, 1, 4)).astype(np.float32)
        lb = report.search_lower_bound(f, points, p32, ascent_steps=30)
        self.assertEqual(lb.witness["x"].dtype, np.float32)
        v64 = report.recompute_lower_bound(f, p32, lb.witness, dtype=np.float64)
        self.assertAlmostEqual(v64 / lb.value, 1.0, delta=1e-4)  # float32 rounding only.

    def test_rounds_stay_below_exact_and_their_witness_recomputes(self):
        for seed in range(3):
            f, p = _relu_net(seed, d_in=3, hidden=8)
            exact = _exact_relu_constant(p)
            points = np.random.default_rng(seed).normal(size=(4, 1, 3))
            lb = report.search_lower_bound(f, points, p, ascent_steps=60, round_steps=10)
            for stage in lb.stages.values():
                self.assertLessEqual(stage, exact * (1 + 1e-9))
            self.assertGreater(lb.value, 0.5 * exact)
            value = report.recompute_lower_bound(f, p, lb.witness)
            self.assertAlmostEqual(value / lb.value, 1.0, delta=1e-9)
            xs, ys = lb.witness["pairs_x"], lb.witness["pairs_y"]
            self.assertTrue(np.all(np.linalg.norm((xs - ys).reshape(len(xs), -1), axis=1) > 0))
        with self.assertRaisesRegex(ValueError, "round_steps"):
            report.search_lower_bound(f, points, p, ascent_steps=5, round_steps=0)
        with self.assertRaisesRegex(ValueError, "shrink"):
            report.search_lower_bound(f, points, p, ascent_steps=5, shrink=0.0)

    def test_bad_points(self):
        f, p = _relu_net()
        with self.assertRaisesRegex(ValueError, "points"):
            report.search_lower_bound(f, np.zeros((3, 2)), p)
        with self.assertRaisesRegex(ValueError, "kind"):
            report.recompute_lower_bound(f, p, {"kind": "guess", "x": np.zeros((1, 2))})


class SoundnessTest(absltest.TestCase):
    def test_counter_flags_a_too_small_bound(self):
        f, p = _relu_net(0, d_in=3, hidden=8)
        exact = _exact_relu_constant(p)
        points = np.random.default_rng(0).normal(size=(4, 1, 3))
        lb = report.search_lower_bound(f, points, p, ascent_steps=30)
        pairs = report.soundness_pairs(lb.witness, (1, 3), 256, dtype=np.float64)
        self.assertGreaterEqual(len(pairs[0]), 256)
        sound = report.check_upper_bound(f, p, exact, pairs)
        self.assertEqual(sound["violations"], 0)
        self.assertEqual(sound["num_pairs"], len(pairs[0]))
        self.assertLessEqual(sound["max_ratio"], exact * (1 + 1e-9))
        # A "bound" below the realised lower bound: the witness's own pairs violate it.
        bad = report.check_upper_bound(f, p, 0.9 * lb.value, pairs)
        self.assertGreater(bad["violations"], 0)
        with self.assertRaisesRegex(ValueError, "upper"):
            report.check_upper_bound(f, p, float("inf"), pairs)
        with self.assertRaisesRegex(ValueError, "pairs"):
            report.check_upper_bound(f, p, 1.0, (pairs[0], pairs[1][:3]))

    def test_report_soundness_and_witness_file(self):
        model = nnx.Sequential(
            nnx.Conv(1, 3, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0)),
            nnx.relu,
            nnx.Conv(3, 2, (3, 3), strides=2, rngs=nnx.Rngs(1)),
        )
        r = report.network_report_nnx(
            model, jnp.zeros((1, 6, 6, 1)), num_points=2, check_pairs=256, ascent_steps=20
        )
        net = r.network
        self.assertEqual(net["soundness"]["violations"], 0)
        self.assertGreaterEqual(net["soundness"]["num_pairs"], 256)
        self.assertEqual(net["errors"], [])
        out = _tmpdir(self)
        paths = report.write_report(r, out, plots=False)
        data = json.loads(paths["json"].read_text())
        w = data["network"]["lipschitz_lower_witness"]
        self.assertEqual(w["file"], report.WITNESS_NAME)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def apply(p, x):
            return nnx.merge(graphdef, p, rest)(x)

        value = report.recompute_lower_bound(apply, params, out / w["file"])
        self.assertAlmostEqual(value / net["lipschitz_lower"], 1.0, delta=1e-5)
        self.assertLessEqual(net["lipschitz_lower"], net["lipschitz_upper"] * (1 + 1e-5))


def _no_forward_mode(x):
    return x


_no_forward_mode = jax.custom_vjp(_no_forward_mode)
_no_forward_mode.defvjp(lambda x: (x, None), lambda _, g: (g,))


class StagesTest(absltest.TestCase):
    def _apply(self):
        rng = np.random.default_rng(0)
        p = {"w": rng.normal(size=(3, 3, 1, 2)), "v": rng.normal(size=(3, 3, 2, 2))}
        dn = ("NHWC", "HWIO", "NHWC")

        def apply(p, x):
            y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=dn)
            y = _no_forward_mode(jax.nn.relu(y))  # No JVP: linearize raises.
            return jax.lax.conv_general_dilated(y, p["v"], (1, 1), "SAME", dimension_numbers=dn)

        return apply, p

    def test_lower_bound_failure_keeps_layers(self):
        apply, p = self._apply()
        out = _tmpdir(self)
        r = report.network_report(
            apply, p, jnp.zeros((1, 6, 6, 1)), num_points=2, checkpoint_dir=out
        )
        self.assertLen(r.layers, 2)
        self.assertIsNone(r.network["lipschitz_lower"])
        (err,) = r.network["errors"]
        self.assertEqual(err["stage"], "lower_bound")
        self.assertEqual(err["type"], "TypeError")
        self.assertIn("custom_vjp", err["message"])
        report.write_report(r, out, plots=False)
        data = json.loads((out / "report.json").read_text())
        self.assertLen(data["layers"], 2)
        self.assertEqual(data["network"]["errors"][0]["stage"], "lower_bound")
        self.assertIn("failed", (out / "report.md").read_text())
        # The layer stage was checkpointed before the lower bound's result was awaited.
        rows = json.loads((out / "stages" / "layers.partial.json").read_text())["rows"]
        self.assertEqual([row["sigma_max"] for row in rows], [x.sigma_max for x in r.layers])

    def test_crash_keeps_layers_and_rerun_reuses_them(self):
        apply, p = self._apply()
        x = jnp.zeros((1, 6, 6, 1))
        out = _tmpdir(self)

        class Crash(BaseException):
            pass

        def crash(*args, **kwargs):
            raise Crash

        original = _lower.search_lower_bound
        _lower.search_lower_bound = crash
        try:
            with self.assertRaises(Crash):
                report.network_report(apply, p, x, num_points=2, checkpoint_dir=out)
        finally:
            _lower.search_lower_bound = original
        self.assertTrue((out / "stages" / "layers.pkl").exists())

        def no_layers(*args, **kwargs):
            raise AssertionError("the layer stage must be reused, not recomputed")

        analyse = _api._layers.analyse_convs
        _api._layers.analyse_convs = no_layers
        try:
            r = report.network_report(apply, p, x, num_points=2, checkpoint_dir=out)
        finally:
            _api._layers.analyse_convs = analyse
        self.assertEqual(r.timings["layers_reused"], 1.0)
        self.assertLen(r.layers, 2)
        # Different params: the checkpoint does not match, the layers are recomputed.
        p2 = {k: 2 * v for k, v in p.items()}
        r2 = report.network_report(apply, p2, x, num_points=1, checkpoint_dir=out)
        self.assertNotIn("layers_reused", r2.timings)
        self.assertAlmostEqual(r2.layers[0].sigma_max, 2 * r.layers[0].sigma_max)

    def test_layer_and_composition_failures_are_recorded(self):
        f, _ = _relu_net()
        rng = np.random.default_rng(0)
        p = {"w": rng.normal(size=(3, 3, 1, 2))}
        dn = ("NHWC", "HWIO", "NHWC")

        def apply(p, x):
            y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=dn)
            return jax.nn.relu(y)

        def boom(*args, **kwargs):
            raise RuntimeError("boom")

        x = jnp.zeros((1, 5, 5, 1))
        for target, stage in ((_api._layers, "analyse_convs"), (_api, "_compose")):
            original = getattr(target, stage)
            setattr(target, stage, boom)
            try:
                r = report.network_report(apply, p, x, num_points=1)
            finally:
                setattr(target, stage, original)
            (err,) = r.network["errors"]
            self.assertEqual((err["type"], err["message"]), ("RuntimeError", "boom"))
            self.assertIsNone(r.network["lipschitz_upper_naive"])  # The composition's.
            self.assertGreater(r.network["lipschitz_lower"], 0.0)  # Still reported.
            if stage == "_compose":
                self.assertEqual(err["stage"], "composition")
                self.assertLen(r.layers, 1)  # The layers' numbers are kept.
            else:
                self.assertEqual(err["stage"], "layers")

    def test_plot_failure_is_recorded(self):
        model = nnx.Conv(1, 2, (3, 3), rngs=nnx.Rngs(0))
        r = report.network_report_nnx(model, jnp.zeros((1, 4, 4, 1)), num_points=1)
        out = _tmpdir(self)
        from train.report import _write

        original = _write.plot_norms
        _write.plot_norms = lambda *a: 1 / 0
        try:
            paths = report.write_report(r, out)
        finally:
            _write.plot_norms = original
        self.assertNotIn("norms_plot", paths)
        data = json.loads((out / "report.json").read_text())
        self.assertEqual(data["network"]["errors"][-1]["stage"], "norms_plot")
        self.assertEqual(data["network"]["errors"][-1]["type"], "ZeroDivisionError")

    def test_bad_budget(self):
        f, p = _relu_net()
        with self.assertRaisesRegex(ValueError, "lower_bound_budget"):
            report.network_report(
                lambda p, x: f(p, x.reshape(1, 2)), p, jnp.zeros((1, 2)), lower_bound_budget="x"
            )


class ShareTest(absltest.TestCase):
    """``budget_stop(share=...)``: the search waits in proportion to its steps while the layer
    stage runs, and not at all once it has ended."""

    def test_waits_in_proportion_then_stops_with_the_layers(self):
        import threading
        import time

        from train.report import _stages

        done = threading.Event()
        stop = _stages.budget_stop(None, done, lambda: None, share=0.25)
        stop()  # Starts the clock of the first step.
        time.sleep(0.2)  # A step of 0.2 s: then a wait of 3 x 0.2 s.
        t = time.perf_counter()
        self.assertFalse(stop())
        self.assertGreater(time.perf_counter() - t, 0.5)
        self.assertLess(time.perf_counter() - t, 0.6 + 0.5)
        time.sleep(0.2)
        done.set()  # The layer stage has ended: no wait.
        t = time.perf_counter()
        stop()
        self.assertLess(time.perf_counter() - t, 0.1)

    def test_wait_is_capped_and_wakes_when_the_layers_end(self):
        import threading
        import time

        from train.report import _stages

        done = threading.Event()
        stop = _stages.budget_stop("layers", done, lambda: None, share=0.01)
        time.sleep(0.1)  # 99 x 0.1 s would be ~10 s: capped, and woken by the event.
        threading.Timer(0.3, done.set).start()
        t = time.perf_counter()
        stop()
        waited = time.perf_counter() - t
        self.assertGreater(waited, 0.25)
        self.assertLess(waited, min(_stages.MAX_SHARE_WAIT_SECONDS, 2.0))

    def test_share_one_never_waits_and_bad_share_is_named(self):
        import threading

        from train.report import _stages

        stop = _stages.budget_stop(None, threading.Event(), lambda: None, share=1.0)
        self.assertFalse(stop())
        with self.assertRaisesRegex(ValueError, "lower_bound_share"):
            _stages.budget_stop(None, threading.Event(), lambda: None, share=0.0)


if __name__ == "__main__":
    absltest.main()
