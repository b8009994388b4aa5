"""Both backends of ``spectra`` (JAX, and the NumPy host ``spectra.numpy``) against the dense
operator, in float64, on one grid.

Ground truth: ``spectra.dense_operator`` (built from the real ``lax.conv_general_dilated``) and
its NumPy SVD. The grid is the shared one of ``tests/spectra/layers.py`` (k 1/2/3/5,
c_in != c_out, strides, dilation, groups, depthwise, SAME/VALID/FULL/explicit
asymmetric/CIRCULAR, non-square inputs) plus layers it lacks: patchify, 1x1 strided with
asymmetric pads, circular with a stride not dividing the input, and inputs smaller than the
(dilated) kernel whose padded input is not.
"""

import dataclasses

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import spectra
import spectra.numpy as snp
from spectra import ConvSpec
from tests.spectra.layers import dense_operator
from tests.spectra.layers import exact_singular_values
from tests.spectra.layers import layer_cases
from tests.spectra.layers import random_kernel

SMALL_INPUTS = [
    ("small_k3_SAME_2x2", (3, 3, 2, 3), ConvSpec((2, 2), 1, "SAME")),
    ("small_dilated3_SAME", (3, 3, 2, 2), ConvSpec((4, 5), 1, "SAME", 3)),
    ("small_k3_CIRCULAR_2x2", (3, 3, 2, 3), ConvSpec((2, 2), 1, "CIRCULAR")),
    ("small_depthwise_k5_stride2_CIRCULAR", (5, 5, 1, 4), ConvSpec((2, 4), 2, "CIRCULAR", 1, 4)),
    ("small_dilated_groups2_CIRCULAR", (3, 2, 1, 2), ConvSpec((3, 2), 1, "CIRCULAR", (2, 3), 2)),
    ("small_stride2_explicit", (3, 3, 2, 2), ConvSpec((2, 3), 2, ((1, 1), (1, 2)))),
    ("small_depthwise_FULL", (3, 3, 1, 3), ConvSpec((1, 2), 1, "FULL", 1, 3)),
]
CASES = (
    layer_cases()
    + [
        ("patchify_VALID", (2, 2, 3, 4), ConvSpec((6, 7), 2, "VALID")),
        ("patchify2x3_SAME", (2, 3, 3, 4), ConvSpec((6, 7), (2, 3), "SAME")),
        ("k1_stride2_explicit", (1, 1, 3, 5), ConvSpec((7, 6), 2, ((1, 0), (0, 2)))),
        ("k1_groups2_stride2_SAME", (1, 1, 2, 6), ConvSpec((5, 6), 2, "SAME", 1, 2)),
        ("stride2_CIRCULAR_odd", (3, 3, 2, 3), ConvSpec((7, 6), 2, "CIRCULAR")),
    ]
    + SMALL_INPUTS
)
_SMALL = {c[0] for c in SMALL_INPUTS}
# The JAX backend compiles per layer shape (~1-3 s each): a subset covering every padding mode,
# stride, dilation, groups, depthwise, non-square input and an input smaller than the kernel.
_JAX_NAMES = {
    "k1_VALID",
    "k2_nonsquare_in_FULL",
    "k3x2_explicit",
    "stride2_CIRCULAR",
    "groups2_dilation2_stride2_VALID",
    "depthwise_CIRCULAR",
    "depthwise_mult2_stride2_SAME",
    "small_k3_SAME_2x2",
}
# The JAX reference of the approximation compiles per shape (~1 s each): a subset.
_DENSITY_NAMES = {
    "k2_nonsquare_in_FULL",
    "dilation2x1_stride2_VALID",
    "depthwise_mult2_stride2_SAME",
    "depthwise_CIRCULAR",
    "stride2_CIRCULAR_odd",
}


def _fft_applies(spec):
    return spec.is_circular and all(n % s == 0 for n, s in zip(spec.input_shape, spec.strides))


def _jax_lanczos(kernel, spec):
    return float(spectra.lanczos_spectral_norm(kernel, spec, rtol=1e-10).value)


#: Per backend: the exact spectrum by a method, σ_max matrix-free, two certified bounds and the
#: Frobenius norm. The JAX backend's per-frequency functions on inputs smaller than the kernel
#: belong to the 'smallin' change of ``spectra``; here it is checked on them through the
#: operator (dense, Lanczos) and the kernel-only bound.
BACKENDS = {
    "jax": {
        "singular_values": lambda k, s, m: np.asarray(spectra.singular_values(k, s, m)),
        "lanczos": _jax_lanczos,
        "tap_sum": lambda k, s: float(spectra.tap_sum_bound(k, s)),
        "symbol_grid": lambda k, s: float(spectra.symbol_grid_bound(k, s)),
        "frobenius": lambda k, s: float(np.sqrt(spectra.frobenius_norm_squared(k, s))),
    },
    "numpy": {
        "singular_values": snp.singular_values,
        "lanczos": lambda k, s: snp.lanczos_spectral_norm(k, s, rtol=1e-10).value,
        "tap_sum": snp.tap_sum_bound,
        "symbol_grid": snp.symbol_grid_bound,
        "frobenius": snp.frobenius_norm,
    },
}
_GRID = [
    (f"{backend}_{name}", backend, i)
    for backend in BACKENDS
    for i, (name, _, _) in enumerate(CASES)
    if backend == "numpy" or name in _JAX_NAMES
]


def _case(index):
    name, kshape, spec = CASES[index]
    kernel = random_kernel(kshape, seed=index)
    return name, kernel, spec, exact_singular_values(kernel, spec)


class BothBackendsTest(parameterized.TestCase):
    @parameterized.named_parameters(*_GRID)
    def test_against_dense_operator(self, backend, index):
        name, kernel, spec, exact = _case(index)
        fns = BACKENDS[backend]
        full = backend == "numpy" or name not in _SMALL
        atol = 1e-10 * exact[0]
        methods = ["dense"] + (["fft"] if _fft_applies(spec) and full else [])
        for method in methods:  # The full sorted spectrum, exactly.
            got = fns["singular_values"](kernel, spec, method)
            np.testing.assert_allclose(got, exact, atol=atol, err_msg=method)
        self.assertAlmostEqual(fns["lanczos"](kernel, spec) / exact[0], 1.0, delta=1e-8)
        # Certified upper bounds: >= the exact value everywhere (to rounding).
        names = ["tap_sum"] + (["symbol_grid"] if full else [])
        for bound in names:
            self.assertGreaterEqual(fns[bound](kernel, spec), exact[0] * (1 - 1e-12), bound)
        if _fft_applies(spec) and full:  # The circulant bound is then the exact value.
            self.assertAlmostEqual(fns["symbol_grid"](kernel, spec) / exact[0], 1.0, delta=1e-10)
        if kernel.shape[:2] == (1, 1):  # tap_sum is exact for 1x1 kernels.
            self.assertAlmostEqual(fns["tap_sum"](kernel, spec) / exact[0], 1.0, delta=1e-10)
        if full:
            frob = fns["frobenius"](kernel, spec)
            self.assertAlmostEqual(frob / np.sqrt(np.sum(exact**2)), 1.0, delta=1e-12)


_NUMPY = [(c[0], i) for i, c in enumerate(CASES)]


class HostOperatorTest(parameterized.TestCase):
    @parameterized.named_parameters(*_NUMPY)
    def test_operator_adjoint_and_dense(self, index):
        _, kernel, spec, _ = _case(index)
        dense = dense_operator(kernel, spec)
        op = snp.ConvOperator(kernel, spec)
        rng = np.random.default_rng(index)
        x = rng.standard_normal((2, *op.input_shape))
        y = rng.standard_normal((2, *op.output_shape))
        ax = snp.conv(kernel, x, spec)
        scale = np.abs(dense).sum()
        want = x.reshape(2, -1) @ dense.T
        np.testing.assert_allclose(ax.reshape(2, -1), want, atol=1e-12 * scale)
        aty = snp.conv_transpose(kernel, y, spec)
        want = y.reshape(2, -1) @ dense
        np.testing.assert_allclose(aty.reshape(2, -1), want, atol=1e-12 * scale)
        # <A x, y> = <x, Aᵀ y> (the adjoint of the operator itself, not just of the matrix).
        self.assertAlmostEqual(np.vdot(ax, y) / np.vdot(x, aty), 1.0, delta=1e-12)
        np.testing.assert_allclose(snp.dense_operator(kernel, spec), dense, atol=1e-13)
        # float32 products (the Lanczos iterations'): the same operator to float32 rounding.
        op32 = snp.ConvOperator(kernel, spec, np.float32)
        self.assertEqual(op32.apply(x).dtype, np.float32)
        np.testing.assert_allclose(op32.apply(x), ax, atol=1e-5 * scale)
        np.testing.assert_allclose(op32.adjoint(y), aty, atol=1e-5 * scale)
        # The diagonal blocks of a grouped layer are its groups' operators.
        g = spec.feature_group_count
        blocks = op.group_matrices()
        for j in range(g):
            want = snp.dense_operator(snp.group_kernel(kernel, spec, j), snp.group_spec(spec))
            np.testing.assert_allclose(blocks[j], want, atol=1e-14 * scale)

    @parameterized.named_parameters(*_NUMPY)
    def test_exact_block_methods(self, index):
        _, kernel, spec, exact = _case(index)
        dense = dense_operator(kernel, spec)
        if not _fft_applies(spec):
            with self.assertRaisesRegex(ValueError, "spec="):
                snp.singular_values(kernel, spec, "fft")
        # Disjoint windows <=> no input pixel is read twice, decided from the dense operator:
        # every column has its nonzeros (for a kernel without zeros) in one output pixel's rows.
        c_out = spec.channels(kernel.shape)[1]
        reads = (np.abs(dense) > 0).reshape(dense.shape[0] // c_out, c_out, -1).any(axis=1)
        read_twice = bool((reads.sum(axis=0) > 1).any())
        # (Circular layers are left to the FFT: disjoint_windows is False for them.)
        disjoint = not read_twice and not spec.is_circular
        self.assertEqual(snp.disjoint_windows(spec, kernel.shape), disjoint)
        if disjoint:
            got = snp.singular_values(kernel, spec, "matrix")
            np.testing.assert_allclose(got, exact, atol=1e-10 * exact[0])
        else:
            with self.assertRaisesRegex(ValueError, "spec="):
                snp.singular_values(kernel, spec, "matrix")
        # The circulant top: the bound per group bounds each group; the warm start is real input.
        top = snp.circulant_top(kernel, spec)
        self.assertEqual(top.bound, top.group_bounds.max())
        self.assertEqual(top.vector.shape, (*spec.input_shape, spec.channels(kernel.shape)[0]))
        blocks = snp.ConvOperator(kernel, spec).group_matrices()  # Tested equal to the groups.
        for j, block in enumerate(blocks):
            self.assertGreaterEqual(top.group_bounds[j], np.linalg.norm(block, 2) * (1 - 1e-12))

    @parameterized.named_parameters(*[p for p in _NUMPY if p[0] in _DENSITY_NAMES])
    def test_spectral_density_matches_spectra(self, index):
        # An approximation has no ground truth but its definition: the host port must give the
        # values of spectra's (JAX) implementation, which is itself tested against its maths.
        _, kernel, spec, exact = _case(index)
        got = snp.spectral_density_singular_values(kernel, spec)
        want = np.asarray(spectra.spectral_density_singular_values(kernel, spec))
        self.assertEqual(got.shape, exact.shape)
        np.testing.assert_allclose(got, want, atol=1e-10 * want[0])

    def test_bad_arguments(self):
        _, kshape, spec = CASES[0]
        kernel = random_kernel(kshape)
        op = snp.ConvOperator(kernel, spec)
        with self.assertRaisesRegex(ValueError, "x must have shape"):
            op.apply(np.zeros((3, 3, 1)))
        with self.assertRaisesRegex(ValueError, "y must have shape"):
            op.adjoint(np.zeros((3, 3, 1)))
        with self.assertRaisesRegex(ValueError, "initial_vector"):
            snp.lanczos_spectral_norm(kernel, spec, initial_vector=np.ones(3))
        with self.assertRaisesRegex(ValueError, "group_upper_bounds"):
            snp.lanczos_spectral_norm(kernel, spec, group_upper_bounds=np.ones(2))
        with self.assertRaisesRegex(ValueError, "method"):
            snp.singular_values(kernel, spec, "lanczos")
        with self.assertRaisesRegex(ValueError, "input_shape"):  # Padded input < kernel.
            snp.dense_operator(random_kernel((5, 5, 1, 1)), ConvSpec((3, 3), 1, "VALID"))


# Grouped and depthwise layers with adversarial starts: the Krylov space of a start vector that
# lies in one group's invariant subspace never leaves it. ``(name, kernel_shape, spec, big)``:
# group ``big`` is scaled up 20x (it holds σ_max), the warm start is concentrated in group 0.
ADVERSARIAL = [
    ("depthwise_SAME", (3, 3, 1, 6), ConvSpec((9, 8), 1, "SAME", 1, 6), 4),
    ("depthwise_mult2_stride2_VALID", (3, 3, 1, 8), ConvSpec((10, 9), 2, "VALID", 1, 4), 3),
    ("depthwise_k5_stride2_SAME", (5, 5, 1, 5), ConvSpec((10, 10), 2, "SAME", 1, 5), 2),
    ("groups4_dilation2_explicit", (3, 3, 2, 8), ConvSpec((9, 9), 1, ((2, 1), (0, 2)), 2, 4), 1),
    ("groups2_CIRCULAR_odd_stride", (3, 3, 2, 4), ConvSpec((7, 6), 2, "CIRCULAR", 1, 2), 1),
    ("depthwise_small_input_SAME", (5, 5, 1, 3), ConvSpec((3, 4), 1, "SAME", 1, 3), 2),
]


def _adversarial(index, scale_big):
    """``(kernel, spec, warm start, per-group σ_max)``: the warm start lies in the first channel
    of the group with the smallest σ_max."""
    _, kshape, spec, big = ADVERSARIAL[index]
    kernel = random_kernel(kshape, seed=50 + index)
    if scale_big:
        kernel = np.array(kernel)
        cog = kshape[3] // spec.feature_group_count
        kernel[..., big * cog : (big + 1) * cog] *= 20.0
    # Each group's exact σ_max: its diagonal block of the operator (tested equal to the groups'
    # dense operators in HostOperatorTest), by NumPy SVD.
    blocks = snp.ConvOperator(kernel, spec).group_matrices()
    groups = np.array([np.linalg.norm(b, 2) for b in blocks])
    low = int(np.argmin(groups))
    warm = np.zeros((*spec.input_shape, spec.channels(kshape)[0]))
    warm[..., low * kshape[2]] = np.random.default_rng(index).standard_normal(spec.input_shape)
    return kernel, spec, warm, groups


class GroupedLanczosTest(parameterized.TestCase):
    @parameterized.named_parameters(
        *[(f"{c[0]}_{tag}", i, scale) for i, c in enumerate(ADVERSARIAL) for tag, scale in
          (("big_group", True), ("random_kernel", False))]
    )
    def test_adversarial_starts(self, index, scale_big):
        kernel, spec, warm, groups = _adversarial(index, scale_big)
        exact = exact_singular_values(kernel, spec)[0]
        self.assertAlmostEqual(max(groups) / exact, 1.0, delta=1e-12)  # Block diagonal.
        self.assertLess(min(groups), exact * (1 - 1e-3))  # The warm start's group is not the top.
        for kwargs in (
            {"initial_vector": warm},
            {"initial_vector": warm, "group_upper_bounds": np.full(len(groups), np.inf)},
            {"circulant_start": True},
            {},
        ):
            r = snp.lanczos_spectral_norm(kernel, spec, rtol=1e-10, **kwargs)
            self.assertAlmostEqual(r.value / exact, 1.0, delta=1e-8, msg=str(kwargs.keys()))
            self.assertGreaterEqual(r.upper * (1 + 1e-12), exact)
            self.assertEqual(r.certified, r.upper <= r.value * (1 + 1e-4))
        # float32 products: the value is still a Rayleigh quotient of the float64 operator (a
        # lower bound, to float64 rounding) with the float64 residual below rtol.
        for kwargs in ({"initial_vector": warm}, {"circulant_start": True}, {}):
            r = snp.lanczos_spectral_norm(kernel, spec, rtol=1e-4, float32_products=True, **kwargs)
            self.assertLessEqual(r.value, exact * (1 + 1e-12), msg=str(kwargs.keys()))
            self.assertAlmostEqual(r.value / exact, 1.0, delta=1e-4, msg=str(kwargs.keys()))
            self.assertTrue(r.residual <= 1e-4 or r.certified, msg=str(kwargs.keys()))
        # A bracket that closes skips the groups bounded below the value: fewer runs, same value.
        r = snp.lanczos_spectral_norm(kernel, spec, rtol=1e-10)
        self.assertLessEqual(r.groups_run, spec.feature_group_count)
        if scale_big:  # The big group's bound is above every other group's: only it is run.
            self.assertEqual(r.groups_run, 1)

    def test_float32_products_fall_back_to_float64(self):
        # A tolerance below float32's reach: the runs after the first at rtol switch to float64
        # products, and the residual (always recomputed in float64) still reaches it.
        kernel = random_kernel((3, 3, 6, 8), seed=3)
        spec = ConvSpec((10, 9), 1, "SAME")
        exact = exact_singular_values(kernel, spec)[0]
        for bounds in (None, [np.inf], [exact * 1.5]):
            r = snp.lanczos_spectral_norm(
                kernel, spec, rtol=1e-9, float32_products=True, group_upper_bounds=bounds
            )
            self.assertLessEqual(r.residual, 1e-9)
            self.assertAlmostEqual(r.value / exact, 1.0, delta=1e-12)
            self.assertLessEqual(r.value, exact * (1 + 1e-13))
        fast = snp.lanczos_spectral_norm(kernel, spec, rtol=1e-4)  # float32 (the default there)
        self.assertLessEqual(fast.residual, 1e-4)
        self.assertLessEqual(fast.value, exact * (1 + 1e-13))

    def test_group_spec_drops_groups(self):
        spec = ConvSpec((5, 5), 2, "SAME", 1, 4, in_features=8)
        self.assertEqual(snp.group_spec(spec), dataclasses.replace(spec, feature_group_count=1,
                                                                   in_features=None))


# ``lanczos_spectral_norms``: a kernel and its output-scaled variants in lockstep. Input-side
# Grams (AᵀA: out_dim >= in_dim), output-side ones (AAᵀ: strided), circular, grouped (per variant).
VARIANTS = [
    ("input_side_SAME", (3, 3, 3, 5), ConvSpec((7, 6), 1, "SAME")),
    ("output_side_stride2", (3, 3, 4, 3), ConvSpec((8, 7), 2, "SAME")),
    ("CIRCULAR_dilated", (2, 3, 2, 4), ConvSpec((6, 5), 1, "CIRCULAR", (2, 1))),
    ("groups2_VALID", (3, 3, 2, 4), ConvSpec((7, 7), 1, "VALID", 1, 2)),
]


class LanczosVariantsTest(parameterized.TestCase):
    @parameterized.named_parameters(*[(c[0], i) for i, c in enumerate(VARIANTS)])
    def test_variants_against_dense(self, index):
        _, kshape, spec, = VARIANTS[index]
        kernel = random_kernel(kshape, seed=70 + index)
        rng = np.random.default_rng(index)
        c_out = kshape[3]
        scales = [rng.uniform(0.2, 3.0, c_out) * rng.choice([-1.0, 1.0], c_out),
                  np.full(c_out, 0.5)]
        exact = [exact_singular_values(kernel * c, spec)[0] for c in [np.ones(c_out)] + scales]
        results = snp.lanczos_spectral_norms(kernel, spec, scales, rtol=1e-10)
        self.assertLen(results, 3)
        for r, e in zip(results, exact):
            self.assertAlmostEqual(r.value / e, 1.0, delta=1e-9)
            self.assertLessEqual(r.value, e * (1 + 1e-12))
            self.assertLessEqual(r.residual, 1e-10)
        # float32 products: still Rayleigh quotients of the float64 operators (lower bounds).
        fast = snp.lanczos_spectral_norms(kernel, spec, scales, rtol=1e-4)
        for r, e in zip(fast, exact):
            self.assertLessEqual(r.value, e * (1 + 1e-12))
            self.assertAlmostEqual(r.value / e, 1.0, delta=1e-4)
            self.assertLessEqual(r.residual, 1e-4)
        # Certified bounds: a bracket that closes is reported so, an open one is not.
        g = spec.feature_group_count
        tight = [np.full(g, e * (1 + 1e-6)) for e in exact]
        loose = [np.full(g, e * 2.0) for e in exact]
        for bounds, certified in ((tight, True), (loose, False)):
            results = snp.lanczos_spectral_norms(
                kernel, spec, scales, rtol=1e-10, upper_bounds=bounds
            )
            for r, e in zip(results, exact):
                self.assertEqual(r.certified, certified)
                self.assertLessEqual(r.value, e * (1 + 1e-12))
                self.assertAlmostEqual(r.value / e, 1.0, delta=1e-5)

    def test_warm_start_and_errors(self):
        kernel = random_kernel((3, 3, 3, 4), seed=1)
        spec = ConvSpec((6, 6), 1, "SAME")
        exact = exact_singular_values(kernel, spec)[0]
        top = snp.circulant_top(kernel, spec)
        (warm,) = snp.lanczos_spectral_norms(kernel, spec, rtol=1e-10,
                                             initial_vectors=[top.vector])
        self.assertAlmostEqual(warm.value / exact, 1.0, delta=1e-9)
        with self.assertRaisesRegex(ValueError, "scales"):
            snp.lanczos_spectral_norms(kernel, spec, [np.ones(3)])
        with self.assertRaisesRegex(ValueError, "initial_vectors"):
            snp.lanczos_spectral_norms(kernel, spec, [np.ones(4)], initial_vectors=[None])
        with self.assertRaisesRegex(ValueError, "initial_vectors\\[0\\]"):
            snp.lanczos_spectral_norms(kernel, spec, initial_vectors=[np.ones(5)])
        with self.assertRaisesRegex(ValueError, "upper_bounds"):
            snp.lanczos_spectral_norms(kernel, spec, upper_bounds=[1.0, 2.0])

    def test_basis_restarts(self):
        # A basis of 4 vectors: restarted from the Ritz vector each time it is full, it still
        # converges to σ_max.
        kernel = random_kernel((3, 3, 4, 4), seed=2)
        spec = ConvSpec((8, 8), 1, "SAME")
        exact = exact_singular_values(kernel, spec)[0]
        r = snp.lanczos_spectral_norm(kernel, spec, rtol=1e-8, ncv=4, max_tries=50)
        self.assertAlmostEqual(r.value / exact, 1.0, delta=1e-8)
        full = snp.lanczos_spectral_norm(kernel, spec, rtol=1e-8)
        self.assertGreater(r.num_matvecs, full.num_matvecs)


if __name__ == "__main__":
    absltest.main()
