"""Tests for train._jaxpr: the one walker over nested jaxprs with per-primitive rule tables."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from jax import lax

from train import _jaxpr


def _taint_walker(log=None):
    """A walker whose values are "depends on the input" flags; records the rules it runs."""
    log = [] if log is None else log

    def default(w, frame, eqn, vals):
        log.append(("default", eqn.primitive.name))
        return [any(vals)] * len(eqn.outvars)

    def call(w, frame, eqn, vals, body):
        log.append(("call", eqn.primitive.name))
        return w.call(frame, body, eqn.invars, vals)

    def first(w, frame, eqn, vals):  # Unlike the default, looks at its first operand only.
        log.append(("mul", eqn.primitive.name))
        return [vals[0]]

    walker = _jaxpr.Walker(
        {"mul": first}, default, call=call, missing=False, literal=lambda lit: False
    )
    return walker, log


class HelpersTest(absltest.TestCase):
    def test_is_var_and_split_closed(self):
        closed = jax.make_jaxpr(lambda x: x + 1.0)(1.0)
        (eqn,) = closed.jaxpr.eqns
        self.assertEqual([_jaxpr.is_var(v) for v in eqn.invars], [True, False])
        jaxpr, consts = _jaxpr.split_closed(closed)
        self.assertIs(jaxpr, closed.jaxpr)
        self.assertEqual(list(consts), list(closed.consts))
        self.assertEqual(_jaxpr.split_closed(jaxpr), (jaxpr, ()))

    def test_sub_jaxprs_and_call_body(self):
        def f(x):
            y = jax.jit(jnp.sin)(x)
            return lax.cond(x.sum() > 0, jnp.cos, jnp.tan, y)

        eqns = jax.make_jaxpr(f)(jnp.ones(3)).jaxpr.eqns
        pjit = next(e for e in eqns if e.primitive.name in ("pjit", "jit"))
        cond = next(e for e in eqns if e.primitive.name == "cond")
        self.assertLen(_jaxpr.sub_jaxprs(pjit), 1)
        self.assertIsNotNone(_jaxpr.call_body(pjit))
        self.assertLen(_jaxpr.sub_jaxprs(cond), 2)
        self.assertIsNone(_jaxpr.call_body(cond))  # Branches take the operands after the index.
        add = jax.make_jaxpr(lambda x: x + 1)(1.0).jaxpr.eqns[0]
        self.assertEqual(_jaxpr.sub_jaxprs(add), [])
        self.assertIsNone(_jaxpr.call_body(add))
        # A scan body has one invar per operand but runs per slice: never a call.
        scan = jax.make_jaxpr(lambda x: lax.scan(lambda c, r: (c + r, c), 0.0, x))(jnp.ones(3))
        self.assertIsNone(_jaxpr.call_body(scan.jaxpr.eqns[0]))

    def test_bind_eqn_matches_the_function(self):
        x = np.arange(6.0).reshape(2, 3)
        closed = jax.make_jaxpr(lambda x: jnp.transpose(x) * 2.0)(x)
        env = {closed.jaxpr.invars[0]: x}
        for eqn in closed.jaxpr.eqns:
            vals = [env[v] if _jaxpr.is_var(v) else v.val for v in eqn.invars]
            env.update(zip(eqn.outvars, _jaxpr.eval_eqn(eqn, vals)))
        np.testing.assert_array_equal(env[closed.jaxpr.outvars[0]], x.T * 2.0)


class WalkerTest(absltest.TestCase):
    def test_rule_table_lookup_and_default(self):
        walker, log = _taint_walker()
        closed = jax.make_jaxpr(lambda x, c: (jnp.sin(x) * c, c * x))(1.0, 2.0)
        out = walker.run(closed.jaxpr, [True, False])
        self.assertEqual(out, [True, False])  # The default rule would give c * x: True.
        self.assertEqual(log, [("default", "sin"), ("mul", "mul"), ("mul", "mul")])

    def test_frames_know_their_producers_consumers_and_labels(self):
        seen = []

        def default(w, frame, eqn, vals):
            seen.append((w.eqn_label(frame, eqn), frame.producers.get(eqn.invars[0], -1)))
            return [None] * len(eqn.outvars)

        closed = jax.make_jaxpr(lambda x: jnp.cos(jnp.sin(x)))(1.0)
        _jaxpr.Walker({}, default).run(closed.jaxpr, [None], where="f")
        self.assertEqual(seen, [("eqn 0 (`sin`) in f", -1), ("eqn 1 (`cos`) in f", 0)])

    def test_nested_pjit_and_custom_jvp_go_through_the_call_hook(self):
        f = jax.jit(lambda x: jnp.sin(x) * x)

        @jax.custom_jvp
        def g(x):
            return jnp.exp(x)

        g.defjvp(lambda p, t: (g(p[0]), g(p[0]) * t[0]))
        walker, log = _taint_walker()
        closed = jax.make_jaxpr(lambda x, c: (f(x), g(c), g(x)))(1.0, 2.0)
        out = walker.run(closed.jaxpr, [True, False])
        self.assertEqual(out, [True, False, True])
        calls = [name for kind, name in log if kind == "call"]
        self.assertLen(calls, 3)  # One jit and two custom_jvp calls.
        self.assertIn(("default", "exp"), log)  # Inside the custom_jvp body.
        self.assertIn(("mul", "mul"), log)  # Inside the jit: the table applies there too.

    def test_nested_frames_alias_the_outer_operands(self):
        parents = []

        def default(w, frame, eqn, vals):
            if frame.parent is not None:
                (inner,) = [v for v in eqn.invars if _jaxpr.is_var(v)]
                outer_frame, outer = frame.alias[inner]
                parents.append((outer_frame is frame.parent, outer in outer_frame.env))
            return [None] * len(eqn.outvars)

        def call(w, frame, eqn, vals, body):
            return w.call(frame, body, eqn.invars, vals)

        closed = jax.make_jaxpr(jax.jit(jnp.sin))(1.0)
        _jaxpr.Walker({}, default, call=call).run(closed.jaxpr, [None])
        self.assertEqual(parents, [(True, True)])

    def test_unknown_primitive_without_call_hook_goes_to_default(self):
        walker, log = _taint_walker()
        walker.call_rule = None
        closed = jax.make_jaxpr(jax.jit(jnp.sin))(1.0)
        self.assertEqual(walker.run(closed.jaxpr, [True]), [True])
        self.assertLen(log, 1)
        self.assertEqual(log[0][0], "default")

    def test_cond_and_scan_rules_walk_their_bodies(self):
        visited = []

        def default(w, frame, eqn, vals):
            visited.append((eqn.primitive.name, frame.parent is not None))
            return [any(vals)] * len(eqn.outvars)

        def cond(w, frame, eqn, vals):
            outs = [
                w.call(frame, _jaxpr.split_closed(b), eqn.invars[1:], vals[1:])
                for b in eqn.params["branches"]
            ]
            return [any(o[i] for o in outs) for i in range(len(eqn.outvars))]

        def scan(w, frame, eqn, vals):
            return w.call(frame, _jaxpr.split_closed(eqn.params["jaxpr"]), eqn.invars, vals)

        def f(x, c):
            y = lax.cond(c > 0, jnp.sin, jnp.cos, x)
            return lax.scan(lambda carry, t: (carry * t, jnp.tanh(t)), c, jnp.ones(3) * y)

        closed = jax.make_jaxpr(f)(1.0, 2.0)
        walker = _jaxpr.Walker(
            {"cond": cond, "scan": scan}, default, missing=False, literal=lambda lit: False
        )
        carry, ys = walker.run(closed.jaxpr, [True, False])
        self.assertTrue(carry)  # carry * t, t depends on x through the cond.
        self.assertTrue(ys)
        nested = {name for name, inner in visited if inner}
        self.assertTrue({"sin", "cos", "tanh", "mul"} <= nested, nested)


class TablesTest(absltest.TestCase):
    """The analyses are tables on the one walker."""

    def test_analyses_share_the_walker(self):
        from train import discovery
        from train import flops
        from train.report import _lipschitz
        from train.report import _network_bound

        for cls in (
            discovery._Discovery,
            flops._Counter,
            _lipschitz.Composer,
            _network_bound.LinearisedNetwork,
        ):
            self.assertTrue(issubclass(cls, _jaxpr.Walker), cls)
        self.assertIn("conv_general_dilated", discovery.RULES)
        self.assertIn("scan", flops.RULES)
        self.assertIn("logistic", _lipschitz.RULES)
        self.assertIn("sort", _network_bound.RULES)

    def test_count_flops_through_nested_calls(self):
        from train.flops import count_flops

        w = jnp.ones((4, 5))
        inner = jax.jit(lambda x: x @ w)
        fn = jax.checkpoint(lambda x: inner(x) @ jnp.ones((5, 2)))
        self.assertEqual(count_flops(fn, jnp.zeros((3, 4))), 4 * 5 + 5 * 2)


if __name__ == "__main__":
    absltest.main()
