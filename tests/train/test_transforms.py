"""`train.project_conv_operator_norm`: feasibility against the dense SVD, no-op inside the ball,
the hybrid (cheap every step, certified every k), sharding over simulated devices, optax
composition (chain, masked, multi_transform, inject_hyperparams, nnx.Optimizer) and errors."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

import spectra
import train
from tests import xla_flags
from tests.spectra import layers
from train import transforms
from train.transforms import CERTIFIED_METHODS

ROOT = pathlib.Path(__file__).resolve().parents[2]

SPECS = {
    "circular": spectra.ConvSpec((8, 8), padding="CIRCULAR"),
    "same": spectra.ConvSpec((8, 8), padding="SAME"),
    "valid_stride2": spectra.ConvSpec((8, 8), strides=2, padding="VALID"),
    "explicit_dilated": spectra.ConvSpec((8, 6), padding=((2, 0), (1, 1)), kernel_dilation=2),
    "depthwise_circular_stride2": spectra.ConvSpec(
        (8, 8), strides=2, padding="CIRCULAR", feature_group_count=3
    ),
}
KSHAPES = {
    "circular": (3, 3, 3, 3),
    "same": (3, 3, 3, 2),
    "valid_stride2": (3, 3, 3, 3),
    "explicit_dilated": (2, 3, 3, 3),
    "depthwise_circular_stride2": (3, 3, 1, 3),
}


def exact_norm(kernel, spec) -> float:
    """Ground truth: largest singular value of the dense operator (NumPy, float64)."""
    dense = np.asarray(spectra.dense_operator(jnp.asarray(kernel, jnp.float64), spec))
    return float(np.linalg.svd(dense, compute_uv=False)[0])


def make_params(scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    params = {name: jnp.asarray(scale * rng.normal(size=shape)) for name, shape in KSHAPES.items()}
    params["bias"] = jnp.asarray(rng.normal(size=3))
    params["dense"] = jnp.asarray(rng.normal(size=(2, 2, 2, 2)))  # 4-D, not a conv.
    return params


def make_specs():
    return {**SPECS, "bias": None, "dense": None}


def step(tx, params, grads, state=None):
    state = tx.init(params) if state is None else state
    updates, state = jax.jit(tx.update)(grads, state, params)
    return optax.apply_updates(params, updates), updates, state


class ProjectionTest(parameterized.TestCase):

    def test_one_step_is_feasible(self):
        params, max_norm = make_params(), 0.5
        for name in SPECS:
            self.assertGreater(exact_norm(params[name], SPECS[name]), 2 * max_norm)
        tx = optax.chain(optax.sgd(0.01), train.project_conv_operator_norm(max_norm, make_specs()))
        grads = jax.tree.map(jnp.ones_like, params)
        new, _, state = step(tx, params, grads)
        for name, spec in SPECS.items():
            self.assertEqual(new[name].shape, params[name].shape)
            self.assertEqual(new[name].dtype, params[name].dtype)
            self.assertLessEqual(exact_norm(new[name], spec), max_norm * (1 + 1e-4), name)
        # Non-conv leaves: plain SGD.
        for name in ("bias", "dense"):
            np.testing.assert_array_equal(new[name], params[name] - 0.01)
        self.assertIsInstance(state[1], train.ProjectConvOperatorNormState)
        self.assertEqual(int(state[1].count), 1)
        self.assertLessEqual(float(state[1].feasibility_gap), 1e-6)

    @parameterized.parameters("rescale", "sedghi")
    def test_other_methods(self, method):
        spec, max_norm = SPECS["valid_stride2"], 0.5
        params = {"w": make_params()["valid_stride2"]}
        tx = train.project_conv_operator_norm(max_norm, {"w": spec}, method=method, num_rounds=3)
        new, _, state = step(tx, params, {"w": jnp.zeros_like(params["w"])})
        sigma = exact_norm(new["w"], spec)
        self.assertLess(sigma, 0.5 * exact_norm(params["w"], spec))
        if method == "rescale":  # Certified.
            self.assertLessEqual(sigma, max_norm * (1 + 1e-4))
        # The recorded gap bounds the real layer's excess: sigma - c <= gap.
        self.assertLessEqual(sigma - max_norm, float(state.feasibility_gap) + 1e-6)

    def test_power_tracks_the_exact_norm(self):
        # Every layer kind of SPECS (circular, zero padding, strides, dilation, depthwise).
        # init converges the vectors on the initial kernels, so the first projection is already
        # accurate; then small updates (1% of the kernel per step) keep the warm start good.
        params, max_norm = make_params(), 0.5
        specs = make_specs()
        tx = train.project_conv_operator_norm(max_norm, specs, method="power", num_rounds=2)
        new, _, state = step(tx, params, jax.tree.map(jnp.zeros_like, params))
        self.assertEqual(len(state.vectors), 5)  # One group per distinct (shape, dtype, spec).
        for name, spec in SPECS.items():
            self.assertAlmostEqual(exact_norm(new[name], spec), max_norm, delta=1e-6 * max_norm)
        np.testing.assert_array_equal(new["bias"], params["bias"])
        rng = np.random.default_rng(1)
        for _ in range(5):
            grads = {k: jnp.asarray(0.01 * rng.normal(size=np.shape(v)) * np.std(v))
                     for k, v in new.items()}
            new, _, state = step(tx, new, grads, state)
        for name, spec in SPECS.items():
            sigma = exact_norm(new[name], spec)
            self.assertLessEqual(sigma, max_norm * (1 + 1e-3), name)
            self.assertGreater(sigma, max_norm * (1 - 1e-2), name)  # Not over-shrunk.
        # The gap is the estimate of the input kernels: >= 0 after a step leaving the ball.
        self.assertGreater(float(state.feasibility_gap), -max_norm)

    def test_power_every_k_steps_keeps_vectors_on_skipped_steps(self):
        params = {"w": make_params()["same"]}
        tx = train.project_conv_operator_norm(
            0.5, {"w": SPECS["same"]}, method="power", every_k_steps=2
        )
        _, _, s1 = step(tx, params, {"w": jnp.zeros_like(params["w"])})
        _, _, s2 = step(tx, params, {"w": jnp.zeros_like(params["w"])}, s1)
        np.testing.assert_array_equal(s1.vectors[0], s2.vectors[0])  # Step 1 skipped.
        self.assertEqual(int(s2.count), 2)

    def test_inside_the_ball_is_a_no_op(self):
        params = make_params(scale=0.01)
        grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
        sgd = optax.sgd(0.01)
        tx = optax.chain(sgd, train.project_conv_operator_norm(1.0, make_specs()))
        new, _, _ = step(tx, params, grads)
        plain, _, _ = step(sgd, params, grads)
        jax.tree.map(np.testing.assert_array_equal, new, plain)  # Bit-identical.

    def test_stacked_kernels_match_individual_projection(self):
        spec = SPECS["circular"]
        rng = np.random.default_rng(3)
        params = {f"k{i}": jnp.asarray(rng.normal(size=(3, 3, 3, 3))) for i in range(3)}
        max_norm = {"k0": 0.5, "k1": 1.0, "k2": 2.0}
        tx = train.project_conv_operator_norm(max_norm, {k: spec for k in params})
        zeros = jax.tree.map(jnp.zeros_like, params)
        new, _, _ = step(tx, params, zeros)
        for name, kernel in params.items():
            expected = spectra.clip_operator_norm(kernel, spec, max_norm[name]).kernel
            np.testing.assert_allclose(new[name], expected, rtol=0, atol=1e-12)
            self.assertLessEqual(exact_norm(new[name], spec), max_norm[name] * (1 + 1e-4))

    def test_repeated_projection_is_monotone(self):
        spec = SPECS["same"]
        params = {"w": jnp.asarray(np.random.default_rng(4).normal(size=(3, 3, 3, 3)))}
        tx = train.project_conv_operator_norm(1.0, {"w": spec}, method="sedghi")
        state, zeros = tx.init(params), {"w": jnp.zeros((3, 3, 3, 3))}
        norms = [exact_norm(params["w"], spec)]
        for _ in range(4):
            params, _, state = step(tx, params, zeros, state)
            norms.append(exact_norm(params["w"], spec))
        self.assertTrue(all(b <= a * (1 + 1e-9) for a, b in zip(norms, norms[1:])), norms)
        self.assertLess(norms[-1], norms[0])

    def test_every_k_steps(self):
        spec, max_norm, k = SPECS["circular"], 1.0, 3
        params = {"w": jnp.asarray(np.random.default_rng(5).normal(size=(3, 3, 3, 3)))}
        tx = train.project_conv_operator_norm(max_norm, {"w": spec}, every_k_steps=k)
        state = tx.init(params)
        update = jax.jit(chex.assert_max_traces(tx.update, n=1))
        projected = []
        for t in range(7):
            grads = {"w": 0.5 * params["w"]}  # Pushes the kernel out of the ball every step.
            updates, state = update(grads, state, params)
            target = params["w"] + grads["w"]
            params = optax.apply_updates(params, updates)
            projected.append(not np.array_equal(params["w"], target))
            if projected[-1]:
                self.assertLessEqual(exact_norm(params["w"], spec), max_norm * (1 + 1e-4))
            self.assertEqual(int(state.count), t + 1)
        self.assertEqual(projected, [t % k == 0 for t in range(7)])


def hybrid_cases():
    """Layers of the shared grid (tests/spectra/layers.py), one padding per shape in turn, so
    that every padding, strides, dilation and groups appear (circular with strides dividing)."""
    tags = ("k1", "k3x2", "stride2", "dilation2x1_stride2", "groups2", "depthwise")
    paddings = ("CIRCULAR", "SAME", "VALID", "FULL", "explicit")
    wanted = {f"{t}_{paddings[i % len(paddings)]}" for i, t in enumerate(tags)}
    return {name: (kshape, spec) for name, kshape, spec in layers.layer_cases()
            if name in wanted}


class HybridTest(parameterized.TestCase):
    """``method='power', certify_every=k``: power every update, certified after every k-th."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The plain power transform, the reference of both parameterisations: compiled once.
        cls.k, cls.max_norm = 3, 0.5
        cases = hybrid_cases()
        cls.specs = {name: spec for name, (_, spec) in cases.items()}
        cls.params = {name: jnp.asarray(layers.random_kernel(kshape, seed=i))
                      for i, (name, (kshape, _)) in enumerate(cases.items())}
        power = train.project_conv_operator_norm(cls.max_norm, cls.specs, method="power")
        cls.power_update = staticmethod(jax.jit(power.update))  # Not bound to the test.

    @parameterized.parameters(*CERTIFIED_METHODS)
    def test_certified_every_k_and_power_in_between(self, certify_method):
        chex.clear_trace_counter()  # Parameterised: the counters are per function name.
        k, max_norm, specs, params = self.k, self.max_norm, self.specs, self.params
        hybrid = train.project_conv_operator_norm(
            max_norm, specs, method="power", certify_every=k, certify_method=certify_method
        )
        state = jax.jit(chex.assert_max_traces(hybrid.init, n=1))(params)
        update = jax.jit(chex.assert_max_traces(hybrid.update, n=1))
        power_update = self.power_update
        rng = np.random.default_rng(0)
        for t in range(2 * k):
            # Grow every kernel by 10% plus noise: each update leaves the ball.
            grads = {n: jnp.asarray(0.1 * p + 0.05 * np.std(p) * rng.normal(size=p.shape))
                     for n, p in params.items()}
            ref_updates, ref_state = power_update(grads, state[0], params)
            updates, state = update(grads, state, params)
            chex.assert_trees_all_equal(state[0], ref_state)  # The power part is plain power.
            powered = optax.apply_updates(params, ref_updates)
            params = optax.apply_updates(params, updates)
            self.assertEqual(int(state[1].step), t + 1)
            if (t + 1) % k:
                chex.assert_trees_all_equal(params, powered)  # Not a certify point.
                continue
            self.assertEqual(int(state[1].inner_state.count), (t + 1) // k)
            self.assertLessEqual(float(state[1].inner_state.feasibility_gap), 1e-9)
            for name, spec in specs.items():
                sigma = exact_norm(params[name], spec)
                self.assertLessEqual(sigma, max_norm * (1 + 1e-4), f"{name} at update {t + 1}")
                # A pure certified rescale of the power output: same direction.
                expected = spectra.clip_operator_norm(
                    powered[name], spec, max_norm, method=certify_method, num_rounds=0
                ).kernel
                np.testing.assert_allclose(params[name], expected, rtol=0, atol=1e-12)
        # Power alone, after the same number of steps, is only approximately feasible: its
        # estimate can sit below the exact value (zero-padded layers, where the certified
        # rescale of the circular embedding also shrinks more).
        self.assertTrue(any(
            exact_norm(powered[n], s) > max_norm * (1 + 1e-9) for n, s in specs.items()
        ))

    def test_in_a_chain_with_sgd(self):
        spec, max_norm = SPECS["same"], 1.0
        params = {"w": jnp.asarray(layers.random_kernel((3, 3, 3, 2), seed=2)), "b": jnp.ones(2)}
        tx = optax.chain(
            optax.sgd(0.1),
            train.project_conv_operator_norm(
                max_norm, {"w": spec, "b": None}, method="sedghi", certify_every=1,
                certify_method="certified",
            ),
        )
        new, _, _ = step(tx, params, {"w": -params["w"], "b": jnp.ones(2)})
        self.assertLessEqual(exact_norm(new["w"], spec), max_norm * (1 + 1e-4))
        np.testing.assert_allclose(new["b"], params["b"] - 0.1)

    def test_inject_hyperparams_traced_radius(self):
        chex.clear_trace_counter()
        spec = SPECS["valid_stride2"]
        params = {"w": jnp.asarray(layers.random_kernel((3, 3, 3, 3), seed=3))}
        factory = optax.inject_hyperparams(
            train.project_conv_operator_norm,
            static_args=("every_k_steps", "num_rounds", "certify_every"),
        )
        tx = factory(max_norm=1.0, specs={"w": spec}, method="power", certify_every=1)
        state = tx.init(params)
        update = jax.jit(chex.assert_max_traces(tx.update, n=1))
        zeros = {"w": jnp.zeros_like(params["w"])}
        for c in (1.0, 0.3):  # A new radius without a new trace.
            state.hyperparams["max_norm"] = jnp.asarray(c)
            updates, state = update(zeros, state, params)
            new = optax.apply_updates(params, updates)
            self.assertLessEqual(exact_norm(new["w"], spec), c * (1 + 1e-4))
            self.assertGreater(exact_norm(new["w"], spec), 0.9 * c)


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import spectra, train
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("data",))  # Explicit axes (the default); Auto works too.
    rng = np.random.default_rng(0)
    specs, params = {}, {}
    # Groups of 3 (padded to 4), 5 (padded to 8) and 1 kernels; circular and zero padded.
    for name, n, kshape, spec in (
        ("a", 3, (3, 3, 3, 4), spectra.ConvSpec((8, 8), padding="SAME")),
        ("b", 5, (3, 3, 2, 2), spectra.ConvSpec((6, 6), padding="CIRCULAR")),
        ("c", 1, (2, 2, 2, 4), spectra.ConvSpec((8, 6), strides=2, padding="VALID")),
    ):
        for i in range(n):
            specs[f"{name}{i}"] = spec
            params[f"{name}{i}"] = jnp.asarray(rng.normal(size=kshape))
    grads = jax.tree.map(lambda p: 0.1 * p, params)
    out = {}
    for label, kwargs in (
        ("certified", dict(method="certified")),
        ("hybrid", dict(method="power", certify_every=1, certify_method="rescale")),
    ):
        results = []
        for m in (None, mesh):
            tx = train.project_conv_operator_norm(0.5, specs, mesh=m, **kwargs)
            state = jax.jit(tx.init)(params)
            updates, state = jax.jit(tx.update)(grads, state, params)
            results.append((updates, state))
        diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), *results)
        out[label] = max(jax.tree.leaves(diff))
        hlo = jax.jit(tx.update).lower(grads, state, params).as_text()
        out[label + "_names_axis"] = '{"data"}' in hlo
    # Spectral core on a stack sharded over the devices (12 kernels: 3 per device).
    spec = spectra.ConvSpec((6, 6), padding="CIRCULAR")
    stack = jnp.asarray(rng.normal(size=(12, 3, 3, 2, 3)))
    # Auto axes: circular_norm_bracket's scan rejects a stack on an Explicit mesh outside
    # jax.set_mesh (jax 0.10).
    auto = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    by_data = jax.sharding.NamedSharding(auto, jax.sharding.PartitionSpec("data"))
    sharded = jax.device_put(stack, by_data)
    out["stack_sharding_names_axis"] = "data" in str(sharded.sharding.spec)
    for label, fn in (
        ("spectral_norm", lambda k: spectra.spectral_norm(k, spec, "fft")),
        ("singular_values", lambda k: spectra.singular_values(k, spec, "fft")),
        ("gram_bound", lambda k: spectra.circular_norm_bracket(k, spec)[1]),
    ):
        f = jax.jit(jax.vmap(fn))
        a, b = np.asarray(f(stack)), f(sharded)
        out[label] = float(np.max(np.abs(a - np.asarray(b))))
        out[label + "_out_sharded"] = "data" in str(b.sharding.spec)
    json.dump(out, sys.stdout)
    """
)


class ShardedTest(absltest.TestCase):
    """Projection and spectral core on 4 simulated CPU devices (a subprocess: XLA_FLAGS must be
    set before JAX starts)."""

    def test_sharded_equals_unsharded(self):
        env = xla_flags.with_flags(  # Also LLVM -O0: compilation is the cost.
            dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"),
            "--xla_force_host_platform_device_count=4",
        )
        proc = subprocess.run(
            [sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True,
            timeout=600, cwd=ROOT,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        out = json.loads(proc.stdout)
        for label in ("certified", "hybrid"):
            self.assertLessEqual(out[label], 1e-6, label)
            self.assertTrue(out[label + "_names_axis"], label)
        self.assertTrue(out["stack_sharding_names_axis"])
        for label in ("spectral_norm", "singular_values", "gram_bound"):
            self.assertLessEqual(out[label], 1e-6, label)
            self.assertTrue(out[label + "_out_sharded"], label)


class CompositionTest(parameterized.TestCase):

    def test_masked(self):
        params, specs = make_params(), make_specs()
        mask = {name: name != "same" for name in params}
        tx = optax.masked(train.project_conv_operator_norm(0.5, specs), mask)
        zeros = jax.tree.map(jnp.zeros_like, params)
        new, _, _ = step(tx, params, zeros)
        np.testing.assert_array_equal(new["same"], params["same"])
        for name in SPECS:
            if name != "same":
                self.assertLessEqual(exact_norm(new[name], SPECS[name]), 0.5 * (1 + 1e-4))

    def test_masked_with_prefix_mask(self):
        params = {"convs": {"a": jnp.ones((3, 3, 2, 2))}, "head": {"w": jnp.ones((4, 2))}}
        specs = {"convs": {"a": SPECS["same"]}, "head": {"w": None}}
        tx = optax.masked(train.project_conv_operator_norm(1.0, specs), {"convs": True,
                                                                            "head": False})
        new, _, _ = step(tx, params, jax.tree.map(jnp.zeros_like, params))
        self.assertLessEqual(exact_norm(new["convs"]["a"], SPECS["same"]), 1 + 1e-4)
        np.testing.assert_array_equal(new["head"]["w"], params["head"]["w"])

    def test_multi_transform(self):
        params, specs = make_params(), make_specs()
        labels = {name: "conv" if name in SPECS else "other" for name in params}
        tx = optax.multi_transform(
            {
                "conv": optax.chain(optax.sgd(0.01),
                                    train.project_conv_operator_norm(0.5, specs)),
                "other": optax.sgd(0.1),
            },
            labels,
        )
        grads = jax.tree.map(jnp.ones_like, params)
        new, _, _ = step(tx, params, grads)
        np.testing.assert_allclose(new["bias"], params["bias"] - 0.1)
        for name, spec in SPECS.items():
            self.assertLessEqual(exact_norm(new[name], spec), 0.5 * (1 + 1e-4))

    def test_jitted_training_loop(self):
        spec = SPECS["same"]
        rng = np.random.default_rng(6)
        teacher = jnp.asarray(0.2 * rng.normal(size=(3, 3, 3, 2)))
        xs = jnp.asarray(rng.normal(size=(16, 8, 8, 3)))
        ys = spectra.conv(teacher, xs, spec)
        params = {"w": jnp.asarray(rng.normal(size=(3, 3, 3, 2)))}
        max_norm = 1.5 * exact_norm(teacher, spec)

        def loss_fn(p):
            return jnp.mean((spectra.conv(p["w"], xs, spec) - ys) ** 2)

        tx = optax.chain(optax.sgd(0.05), train.project_conv_operator_norm(max_norm, {"w": spec}))

        @jax.jit
        def train_step(p, state):
            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, state = tx.update(grads, state, p)
            return optax.apply_updates(p, updates), state, loss

        state, losses = tx.init(params), []
        for _ in range(15):
            params, state, loss = train_step(params, state)
            losses.append(float(loss))
            self.assertLessEqual(exact_norm(params["w"], spec), max_norm * (1 + 1e-4))
        self.assertLess(float(loss_fn(params)), 0.5 * losses[0])

    def test_nnx_optimizer(self):
        class Net(nnx.Module):
            def __init__(self, rngs):
                self.c1 = nnx.Conv(3, 4, (3, 3), padding="CIRCULAR", rngs=rngs,
                                   param_dtype=jnp.float64)
                self.c2 = nnx.Conv(4, 2, (3, 3), strides=2, rngs=rngs, param_dtype=jnp.float64)

            def __call__(self, x):
                return self.c2(nnx.relu(self.c1(x)))

        rng = np.random.default_rng(7)
        xs = jnp.asarray(rng.normal(size=(8, 8, 8, 3)))
        ys = Net(nnx.Rngs(1))(xs)
        model = Net(nnx.Rngs(0))
        specs = train.find_convs_nnx(model, xs)
        max_norm = 2.0
        tx = optax.chain(optax.adam(0.02), train.project_conv_operator_norm(max_norm, specs))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        def loss_fn(m):
            return jnp.mean((m(xs) - ys) ** 2)

        @nnx.jit
        def train_step(m, opt):
            loss, grads = nnx.value_and_grad(loss_fn)(m)
            opt.update(m, grads)
            return loss

        losses = [float(train_step(model, optimizer)) for _ in range(25)]
        self.assertLess(float(loss_fn(model)), 0.7 * losses[0])
        for name in ("c1", "c2"):
            kernel = getattr(model, name).kernel.get_value()
            spec = specs[name]["kernel"]
            self.assertEqual(kernel.shape, (3, 3, 3 if name == "c1" else 4, 4 if name == "c1"
                                            else 2))
            self.assertLessEqual(exact_norm(kernel, spec), max_norm * (1 + 1e-4))


class ErrorTest(parameterized.TestCase):

    def test_missing_params(self):
        params = {"w": jnp.ones((3, 3, 2, 2))}
        tx = train.project_conv_operator_norm(1.0, {"w": SPECS["same"]})
        with self.assertRaisesRegex(ValueError, "params"):
            tx.update(params, tx.init(params))

    @parameterized.parameters(0.0, -1.0)
    def test_max_norm_not_positive(self, value):
        with self.assertRaisesRegex(ValueError, "max_norm"):
            train.project_conv_operator_norm(value, {"w": SPECS["same"]})
        with self.assertRaisesRegex(ValueError, r"max_norm\['w'\]"):
            train.project_conv_operator_norm(
                {"w": value, "b": 0.0}, {"w": SPECS["same"], "b": None}
            )

    def test_max_norm_wrong_structure(self):
        with self.assertRaisesRegex(ValueError, "max_norm"):
            train.project_conv_operator_norm({"x": 1.0}, {"w": SPECS["same"]})

    def test_spec_on_a_non_kernel_leaf(self):
        params = {"w": jnp.ones((3, 3, 2, 2)), "b": jnp.ones(2)}
        tx = train.project_conv_operator_norm(1.0, {"w": SPECS["same"], "b": SPECS["same"]})
        with self.assertRaisesRegex(ValueError, r"\['b'\].*4-D"):
            tx.init(params)
        with self.assertRaisesRegex(ValueError, r"\['b'\].*4-D"):
            tx.update(params, optax.EmptyState(), params)

    def test_specs_structure(self):
        tx = train.project_conv_operator_norm(1.0, {"w": SPECS["same"]})
        with self.assertRaisesRegex(ValueError, "specs"):
            tx.init({"v": jnp.ones((3, 3, 2, 2))})
        with self.assertRaisesRegex(ValueError, "specs"):
            train.project_conv_operator_norm(1.0, {"w": "SAME"})

    @parameterized.named_parameters(
        ("every_k_steps", dict(every_k_steps=0), "every_k_steps"),
        ("method", dict(method="svd"), "method"),
        ("num_rounds", dict(num_rounds=-1), "num_rounds"),
        ("certify_every_zero", dict(certify_every=0), "certify_every"),
        ("certify_every_float", dict(certify_every=2.0), "certify_every"),
        ("certify_every_bool", dict(certify_every=True), "certify_every"),
        ("certify_method_approximate", dict(certify_method="sedghi"), "certify_method"),
        ("certify_method_power", dict(certify_method="power"), "certify_method"),
        ("mesh", dict(mesh="data"), "mesh"),
        ("mesh_axis", dict(mesh=jax.make_mesh((1,), ("data",)), mesh_axis="model"), "mesh_axis"),
    )
    def test_bad_options(self, kwargs, name):
        with self.assertRaisesRegex(ValueError, name):
            train.project_conv_operator_norm(1.0, {"w": SPECS["same"]}, **kwargs)


class HelpersTest(parameterized.TestCase):
    """The module-level pieces of the transform, one at a time."""

    def test_check_projection_args(self):
        self.assertEqual(transforms.check_projection_args(2.0), (2.0, None))
        self.assertEqual(transforms.check_projection_args(), (None, None))
        specs = {"w": SPECS["same"], "b": None}
        self.assertEqual(
            transforms.check_projection_args({"w": 0.5, "b": None}, specs), (None, [None, 0.5])
        )
        names = {"method": "project_method", "max_norm": "project_max_norm",
                 "every_k_steps": "project_every"}
        with self.assertRaisesRegex(ValueError, "^project_method="):
            transforms.check_projection_args(method="svd", names=names)
        with self.assertRaisesRegex(ValueError, "^project_max_norm="):
            transforms.check_projection_args(-1.0, names=names)
        with self.assertRaisesRegex(ValueError, "^project_every="):
            transforms.check_projection_args(every_k_steps=0, names=names)
        with self.assertRaisesRegex(ValueError, "^certify_every="):  # Not renamed.
            transforms.check_projection_args(certify_every=0, names=names)

    def test_conv_leaves_and_groups(self):
        params, specs = make_params(), make_specs()
        per_leaf = {name: (float(i + 1) if spec else None) for i, (name, spec) in
                    enumerate(specs.items())}
        _, spec_norms = transforms.check_projection_args(per_leaf, specs)
        convs = transforms._conv_leaves(params, specs, None, spec_norms)
        names = sorted(params)  # dict leaves are flattened in sorted key order
        self.assertEqual([names[i] for i, _, _ in convs], sorted(SPECS))
        for i, spec, norm in convs:
            self.assertIs(spec, SPECS[names[i]])
            self.assertEqual(norm, per_leaf[names[i]])
        # Two equal kernels with one spec form one group; a third shape another.
        params = {"a": jnp.ones((3, 3, 2, 2)), "b": jnp.zeros((3, 3, 2, 2)),
                  "c": jnp.ones((1, 1, 2, 2))}
        spec = SPECS["same"]
        convs = transforms._conv_leaves(params, dict.fromkeys(params, spec))
        groups = transforms._group_convs(jax.tree.leaves(params), convs)
        self.assertEqual([[i for i, _ in m] for m in groups.values()], [[0, 1], [2]])
        self.assertEqual(list(groups)[0], ((3, 3, 2, 2), jnp.result_type(params["a"]), spec))

    @parameterized.parameters("certified", "rescale", "power")
    def test_project_group(self, method):
        spec = SPECS["same"]
        rng = np.random.default_rng(1)
        kernels = [jnp.asarray(rng.normal(size=(3, 3, 3, 2)), jnp.float32) for _ in range(2)]
        kernels.append(0.01 * kernels[0])  # Inside the ball: its update is kept.
        updates = [jnp.full((3, 3, 3, 2), 0.01, jnp.float32) for _ in kernels]
        updates[2] = 0.001 * updates[2]
        vectors = None
        if method == "power":
            flat = kernels
            groups = transforms._group_convs(flat, [(i, spec, 1.0) for i in range(3)])
            (vectors,) = transforms._init_power_vectors(flat, groups)
            self.assertEqual(vectors.shape, (3, 8, 8, 3))
        new, gap, new_vectors = transforms._project_group(
            spec, kernels, updates, [1.0] * 3, method=method, num_rounds=50, vectors=vectors
        )
        self.assertEqual(gap.dtype, jnp.float32)
        self.assertEqual(new_vectors is None, method != "power")
        np.testing.assert_array_equal(new[2], updates[2])
        for k, u in zip(kernels[:2], new[:2]):
            slack = 1e-4 if method != "power" else 1e-2
            self.assertLessEqual(exact_norm(k + u, spec), 1.0 + slack)
        # One kernel at a time gives the same result as the stacked group.
        for j in range(3):
            one, _, _ = transforms._project_group(
                spec, kernels[j:j + 1], updates[j:j + 1], [1.0], method=method, num_rounds=50,
                vectors=None if vectors is None else vectors[j:j + 1],
            )
            np.testing.assert_allclose(one[0], new[j], rtol=1e-5, atol=1e-6)

    def test_init_power_vectors_is_the_eager_warm_up_compiled_once(self):
        # The jitted warm-up gives bit for bit the vectors of the per-group eager loop it
        # replaced (same start, same iterations), on groups of 2 and 1 kernels, one grouped and
        # strided; kernels restored onto a one-device mesh reuse the compiled programs (one
        # per group).
        names = ("same", "depthwise_circular_stride2")
        params = {f"{n}{j}": jnp.asarray(layers.random_kernel(KSHAPES[n], seed=j), jnp.float32)
                  for n in names for j in range(2 if n == "same" else 1)}
        specs = {key: SPECS[key.rstrip("01")] for key in params}
        flat = jax.tree.leaves(params)
        groups = transforms._group_convs(flat, transforms._conv_leaves(params, specs))
        self.assertEqual(sorted(len(m) for m in groups.values()), [1, 2])

        def eager(flat_params):  # The implementation before it was jitted, as it was.
            vectors = []
            for g, ((shape, dtype, spec), members) in enumerate(groups.items()):
                vshape = (len(members), *spec.input_shape, spec.channels(shape)[0])
                key = jax.random.fold_in(jax.random.PRNGKey(0), g)
                start = jax.random.normal(key, vshape, dtype)
                kernels = jnp.stack([flat_params[i] for i, _ in members])
                if vectors:
                    start = start + 0 * jnp.sum(vectors[-1]).astype(dtype)

                def warm(kernel, vector, spec=spec):
                    return spectra.clip_operator_norm_power(
                        kernel, spec, 1.0, vector,
                        num_iterations=transforms.POWER_INIT_ITERATIONS,
                    ).vector

                vectors.append(jax.vmap(warm)(kernels, start))
            return tuple(vectors)

        expected = eager(flat)
        compiled = transforms._warm_power_vectors._cache_size()
        got = transforms._init_power_vectors(flat, groups)
        self.assertEqual(transforms._warm_power_vectors._cache_size(), compiled + 2)
        mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        on_mesh = jax.device_put(flat, jax.sharding.NamedSharding(mesh, jax.P()))
        again = transforms._init_power_vectors(on_mesh, groups)
        self.assertEqual(transforms._warm_power_vectors._cache_size(), compiled + 2)
        for a, b, c in zip(expected, got, again, strict=True):
            self.assertEqual(b.shape, a.shape)
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
            np.testing.assert_array_equal(np.asarray(c), np.asarray(a))


if __name__ == "__main__":
    absltest.main()
