"""Layers whose input is smaller than the (dilated) kernel, against the dense ground truth.

Every layer that ``lax.conv_general_dilated`` accepts is a valid :class:`spectra.ConvSpec`: the
padded input needs to be at least the dilated kernel, not the input itself. The grid below has
inputs smaller than the kernel, dilations wider than the input, strides with padding, c_in !=
c_out, groups (depthwise included), non-square inputs, and CIRCULAR (the kernel wraps around
the input more than once: Flax's ``jnp.pad(mode='wrap')`` repeats the input), SAME, explicit and
FULL padding. Each layer's results are checked in float64 against the SVD of the dense operator
built from the real conv, which is itself checked against ``flax.nnx.Conv``.

One jitted program per layer computes every result (so they are all checked under ``jax.jit``;
compiling a program per function and layer would take minutes); a few layers also run under
``jax.vmap``. Grouped and depthwise layers with adversarial warm starts (a start vector in one
group's invariant subspace) are checked at the end.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx

import spectra
import spectra.numpy as snp
from tests.spectra import layers

F64_TOL = 1e-10

# (name, kernel (kh, kw), c_in, c_out, input (H, W), strides, padding, dilation, groups)
_SMALL = (
    ("same_3x3_on_1x1", (3, 3), 3, 2, (1, 1), 1, "SAME", 1, 1),
    ("same_7x7_on_5x3", (7, 7), 2, 2, (5, 3), 1, "SAME", 1, 1),
    ("same_dilation4_on_8x8", (3, 3), 1, 2, (8, 8), 1, "SAME", 4, 1),
    ("stride2_pad1_on_2x3", (3, 3), 2, 3, (2, 3), 2, 1, 1, 1),
    ("stride2_dilation2_same_on_1x3", (3, 3), 3, 2, (1, 3), (1, 2), "SAME", 2, 1),
    ("explicit_asymmetric_k4_on_2x2", (4, 4), 2, 3, (2, 2), 1, ((2, 1), (0, 3)), 1, 1),
    ("full_groups2_on_2x1", (3, 3), 4, 4, (2, 1), 1, "FULL", 1, 2),
    ("depthwise_stride2_same_on_2x2", (3, 3), 3, 3, (2, 2), 2, "SAME", 1, 3),
    ("circular_dilation3_on_2x2", (3, 3), 2, 2, (2, 2), 1, "CIRCULAR", 3, 1),
    ("circular_stride2_dilation3_groups2", (3, 3), 2, 4, (4, 4), 2, "CIRCULAR", 3, 2),
    ("circular_depthwise_mult2_on_2x3", (5, 5), 2, 4, (2, 3), 1, "CIRCULAR", 1, 2),
    ("circular_stride2_not_dividing_3x3", (5, 3), 2, 2, (3, 3), 2, "CIRCULAR", 1, 1),
)


def small_input_cases():
    """``(name, kernel_shape, spec)``; every layer has an input smaller than its kernel."""
    cases = []
    for name, (kh, kw), cin, cout, n, s, pad, d, g in _SMALL:
        spec = spectra.ConvSpec(n, s, pad, d, g, in_features=cin)
        keff = spec.dilated_kernel_size((kh, kw))
        assert any(a < k for a, k in zip(spec.input_shape, keff)), name
        cases.append((name, (kh, kw, cin // g, cout), spec))
    return cases


def _fft_applies(spec):
    return spec.is_circular and all(n % s == 0 for n, s in zip(spec.input_shape, spec.strides))


def _everything(kernel, spec, max_norm):
    """Every spectra result on one layer (run under ``jit(vmap)`` below: one program)."""
    out = {
        "sv_auto": spectra.singular_values(kernel, spec),  # 'fft' where it applies, else 'dense'.
        "norm_auto": spectra.spectral_norm(kernel, spec),  # 'fft' or 'lanczos'.
        "bounds": {name: f(kernel, spec) for name, f in spectra.UPPER_BOUNDS.items()},
        "density": spectra.spectral_density_singular_values(kernel, spec),
        "circulant": spectra.circulant_singular_values(kernel, spec),
        "frobenius_sq": spectra.frobenius_norm_squared(kernel, spec),
        "clip": {m: spectra.clip_operator_norm(kernel, spec, max_norm, method=m)
                 for m in spectra.CLIP_METHODS},
    }
    if _fft_applies(spec):
        out["sv_dense"] = spectra.singular_values(kernel, spec, "dense")
        out["norm_lanczos"] = spectra.spectral_norm(kernel, spec, "lanczos")
        out["norm_fft_gram"] = spectra.spectral_norm(kernel, spec, "fft_gram", num_squarings=8)
        fm = spectra.frequency_matrices(kernel, spec).matrices
        out["round_trip"] = spectra.kernel_from_frequency_matrices(fm, spec, kernel.shape)
    return out


@functools.partial(jax.jit, static_argnums=(1,))
def _everything_batched(kernels, spec, max_norms):
    return jax.vmap(_everything, in_axes=(0, None, 0))(kernels, spec, max_norms)


def _sigma_max(kernel, spec):
    return float(layers.exact_singular_values(kernel, spec)[0])


def _embedding_index(spec, kshape):
    """Rows and columns of ``dense(circulant_embedding)`` that form the zero-padded operator.

    The circular layer ``C`` reads ``x[(s i + p d - lo_c) mod N]`` (Flax's shift ``lo_c =
    (k_eff - 1) // 2``); the zero-padded one reads input pixel ``s i + p d - lo``. So output
    ``i`` is row ``i`` of ``C``, and input pixel ``j`` is column ``(j + lo - lo_c) mod N``.
    """
    cspec = spectra.circulant_embedding(spec, kshape)
    keff = spec.dilated_kernel_size(kshape)
    (c_in, c_out), n_grid = spec.channels(kshape), cspec.input_shape
    m_grid = cspec.output_shape(kshape)
    out_axes, in_axes = [], []
    for n, m, (lo, _), k, big_n in zip(spec.input_shape, spec.output_shape(kshape),
                                       spec.pads(kshape), keff, n_grid):
        out_axes.append(np.arange(m))
        in_axes.append((np.arange(n) + lo - (k - 1) // 2) % big_n)
    rows = ((out_axes[0][:, None] * m_grid[1] + out_axes[1][None, :])[..., None] * c_out
            + np.arange(c_out)).ravel()
    cols = ((in_axes[0][:, None] * n_grid[1] + in_axes[1][None, :])[..., None] * c_in
            + np.arange(c_in)).ravel()
    return cspec, rows, cols


class SmallInputTest(parameterized.TestCase):

    @parameterized.named_parameters(*small_input_cases())
    def test_conv_equals_flax_and_lax(self, kshape, spec):
        kernel = layers.random_kernel(kshape, seed=1)
        cin, cout = spec.channels(kshape)
        padding = spec.pads(kshape) if spec.padding == "FULL" else spec.padding
        layer = nnx.Conv(
            cin, cout, kshape[:2], strides=spec.strides, padding=padding,
            kernel_dilation=spec.kernel_dilation, feature_group_count=spec.feature_group_count,
            use_bias=False, precision=jax.lax.Precision.HIGHEST, param_dtype=np.float64,
            kernel_init=lambda key, shape, dtype: jnp.asarray(kernel, dtype), rngs=nnx.Rngs(0),
        )
        x = np.random.default_rng(2).normal(size=(2, *spec.input_shape, cin))
        y = layer(x)
        self.assertEqual(y.shape, (2, *spec.output_shape(kshape), cout))
        np.testing.assert_allclose(spectra.conv(kernel, x, spec), y, atol=1e-12)
        dense = layers.dense_operator(kernel, spec)
        np.testing.assert_allclose(dense @ x[0].ravel(), np.ravel(y[0]), atol=1e-12)
        if not spec.is_circular:  # lax with the spec's zero pads gives the same operator.
            y_lax = jax.lax.conv_general_dilated(
                x, kernel, spec.strides, spec.pads(kshape), rhs_dilation=spec.kernel_dilation,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=spec.feature_group_count,
                precision=jax.lax.Precision.HIGHEST)
            np.testing.assert_allclose(y_lax, y, atol=1e-12)

    @parameterized.named_parameters(*small_input_cases())
    def test_every_result_against_dense_under_jit_and_vmap(self, kshape, spec):
        kernels = np.stack([layers.random_kernel(kshape, seed=s) for s in (3, 4)])
        exacts = [layers.exact_singular_values(k, spec) for k in kernels]
        max_norms = np.array([0.5 * e[0] for e in exacts])
        batched = jax.device_get(_everything_batched(kernels, spec, max_norms))
        for i, (kernel, exact, max_norm) in enumerate(zip(kernels, exacts, max_norms)):
            out = jax.tree.map(lambda x, i=i: x[i], batched)
            self._check(kernel, spec, exact, max_norm, out)

    def _check(self, kernel, spec, exact, max_norm, out):
        top = exact[0]
        atol = F64_TOL * top
        # Exact spectra and norms.
        for key in ("sv_auto", "sv_dense"):
            if key in out:
                self.assertEqual(out[key].shape, exact.shape, msg=key)
                np.testing.assert_allclose(out[key], exact, rtol=0, atol=atol, err_msg=key)
        np.testing.assert_allclose(out["norm_auto"], top, rtol=1e-9)
        if _fft_applies(spec):
            np.testing.assert_allclose(out["norm_lanczos"], top, rtol=1e-9)
            self.assertLessEqual(out["norm_fft_gram"], top * (1 + F64_TOL))
            np.testing.assert_allclose(out["norm_fft_gram"], top, rtol=1e-8)
            round_trip = layers.dense_operator(out["round_trip"], spec)
            np.testing.assert_allclose(round_trip, layers.dense_operator(kernel, spec),
                                       atol=1e-12)

        # Certified upper bounds.
        for name, value in out["bounds"].items():
            self.assertGreaterEqual(value, top * (1 - F64_TOL), msg=name)
        if _fft_applies(spec):
            np.testing.assert_allclose(out["bounds"]["symbol_grid"], top, rtol=F64_TOL)

        # ||A||_F^2 from the kernel (circular: taps that wrap onto one pixel add first).
        np.testing.assert_allclose(out["frobenius_sq"], np.sum(exact**2), rtol=1e-12)
        # Approximations: right length, sorted, finite; Yi's has the exact Frobenius norm.
        for key in ("density", "circulant"):
            values = out[key]
            self.assertEqual(values.shape, exact.shape, msg=key)
            self.assertTrue(np.all(np.isfinite(values)) and np.all(values >= 0), msg=key)
            self.assertTrue(np.all(np.diff(values) <= 1e-12 * top), msg=key)
        if _fft_applies(spec):  # Both are the exact circular spectrum there.
            np.testing.assert_allclose(out["density"], exact, atol=atol)
        elif not spec.is_circular:
            np.testing.assert_allclose(np.sum(out["density"] ** 2), np.sum(exact**2),
                                       rtol=1e-6)

        # Projection: certified methods are feasible; every gap is that of the circular
        # operator containing the layer, so it bounds the layer's own excess.
        for method, result in out["clip"].items():
            self.assertEqual(result.kernel.shape, kernel.shape)
            sigma = _sigma_max(result.kernel, spec)
            self.assertLessEqual(sigma, max_norm + result.feasibility_gap + atol, msg=method)
            if method in ("certified", "rescale"):
                self.assertLessEqual(sigma, max_norm * (1 + 1e-9), msg=method)
                self.assertLessEqual(result.feasibility_gap, atol, msg=method)

    @parameterized.named_parameters(
        *[c for c in small_input_cases() if not c[2].is_circular]
    )
    def test_circulant_embedding_contains_the_layer(self, kshape, spec):
        kernel = layers.random_kernel(kshape, seed=5)
        cspec, rows, cols = _embedding_index(spec, kshape)
        self.assertTrue(cspec.is_circular)
        np.testing.assert_array_equal(layers.dense_operator(kernel, cspec)[np.ix_(rows, cols)],
                                      layers.dense_operator(kernel, spec))

    @parameterized.named_parameters(
        ("same_3x3", (3, 3, 2, 3), spectra.ConvSpec((3, 3), padding="SAME"), (4, 4)),
        ("same_3x3_stride2", (3, 3, 2, 3), spectra.ConvSpec((6, 5), 2, "SAME"), (8, 6)),
        ("kernel_wraps", (5, 5, 1, 2), spectra.ConvSpec((2, 3), padding=((2, 2), (2, 2))), (4, 5)),
        # Pads wider than the kernel on both sides: outputs that read only zeros; the grid
        # n + lo + hi, in which no read wraps.
        ("wide_pads", (3, 3, 2, 2), spectra.ConvSpec((4, 4), padding=((3, 3), (3, 3))), (10, 10)),
        ("one_sided", (3, 3, 1, 2), spectra.ConvSpec((5, 5), padding=((0, 2), (2, 0))), (7, 7)),
    )
    def test_embedding_size(self, kshape, spec, size):
        # N = ceil((n + max(lo, hi)) / s) s when every output gets its own row of the circulant:
        # fewer frequencies than n + lo + hi, and still the layer is a submatrix of it.
        kernel = layers.random_kernel(kshape, seed=6)
        cspec, rows, cols = _embedding_index(spec, kshape)
        self.assertEqual(cspec.input_shape, size)
        np.testing.assert_array_equal(layers.dense_operator(kernel, cspec)[np.ix_(rows, cols)],
                                      layers.dense_operator(kernel, spec))
        self.assertGreaterEqual(snp.symbol_grid_bound(kernel, spec) * (1 + 1e-12),
                                _sigma_max(kernel, spec))

    def test_circular_taps_fold_modulo_the_input(self):
        # A 1-channel 5-tap row kernel on a 2-pixel circular input: taps 0, 2, 4 read one
        # pixel, taps 1, 3 the other, so the operator is the 2x2 circulant of the folded sums.
        kernel = np.arange(1.0, 6.0).reshape(1, 5, 1, 1)
        spec = spectra.ConvSpec((1, 2), padding="CIRCULAR")
        a, b = 1.0 + 3.0 + 5.0, 2.0 + 4.0
        dense = layers.dense_operator(kernel, spec)
        self.assertEqual(sorted(dense.ravel()), sorted([a, a, b, b]))
        np.testing.assert_allclose(spectra.singular_values(kernel, spec, "fft"),
                                   [a + b, a - b], atol=1e-12)

    def test_empty_output_is_a_clear_error(self):
        spec = spectra.ConvSpec((2, 2), padding="VALID")
        with self.assertRaisesRegex(ValueError, r"input_shape=\(2, 2\).*empty output"):
            spectra.dense_operator(np.ones((3, 3, 1, 1)), spec)
        spec = spectra.ConvSpec((2, 8), padding=((0, 0), (1, 1)))
        with self.assertRaisesRegex(ValueError, r"padded input \(2, 10\).*dilated kernel"):
            spectra.spectral_norm(np.ones((3, 3, 1, 1)), spec)


def _adversarial_depthwise(groups=6, big=4, scale=3.0, seed=0):
    """A depthwise kernel whose group ``big`` has ``scale`` times the others' norm, and a warm
    start that is zero outside group 0's channel (group 0's invariant subspace)."""
    kernel = layers.random_kernel((3, 3, 1, groups), seed=seed)
    kernel[..., big] *= scale
    spec = spectra.ConvSpec((5, 5), padding="SAME", feature_group_count=groups)
    start = np.zeros((5, 5, groups))
    start[..., 0] = np.random.default_rng(seed).normal(size=(5, 5))
    return kernel, spec, start


def _per_group_sigma(kernel, spec, groups):
    """Exact σ_max of every group, from each group's own dense operator."""
    single = spectra.ConvSpec(spec.input_shape, spec.strides, spec.padding, spec.kernel_dilation)
    cog = kernel.shape[3] // groups
    return np.array([_sigma_max(kernel[..., g * cog:(g + 1) * cog], single)
                     for g in range(groups)])


class AdversarialStartTest(parameterized.TestCase):
    """A warm start in one group's invariant subspace must not hide the largest group."""

    @parameterized.named_parameters(("depthwise", 6, 1), ("groups2", 2, 2))
    def test_power_and_lanczos_find_the_largest_group(self, groups, cig):
        kernel = layers.random_kernel((5, 5, cig, 2 * groups), seed=1)
        cog = 2
        kernel[..., (groups - 1) * cog:] *= 3.0  # The last group dominates.
        # An input smaller than the kernel, as everywhere in this file.
        spec = spectra.ConvSpec((3, 2), padding="SAME", feature_group_count=groups)
        exact = _sigma_max(kernel, spec)
        per_group = _per_group_sigma(kernel, spec, groups)
        np.testing.assert_allclose(per_group.max(), exact, rtol=1e-12)
        self.assertLess(per_group[0], 0.6 * exact)  # A start in group 0 alone would see this.
        start = np.zeros((3, 2, groups * cig))
        start[..., :cig] = np.random.default_rng(2).normal(size=(3, 2, cig))
        power = spectra.clip_operator_norm_power(kernel, spec, 0.5 * exact, start,
                                                 num_iterations=100)
        self.assertLessEqual(float(power.sigma), exact * (1 + F64_TOL))
        np.testing.assert_allclose(float(power.sigma), exact, rtol=1e-8)
        self.assertLessEqual(_sigma_max(power.kernel, spec), 0.5 * exact * (1 + 1e-8))
        # The vector carries every group (norm 1/sqrt(g) each): a later call still sees them.
        blocks = np.asarray(power.vector).reshape(3, 2, groups, cig)
        np.testing.assert_allclose(np.sqrt(np.sum(blocks**2, axis=(0, 1, 3))),
                                   np.full(groups, groups**-0.5), rtol=1e-10)
        lanczos = spectra.lanczos_spectral_norm(kernel, spec, initial_vector=start)
        np.testing.assert_allclose(float(lanczos.value), exact, rtol=1e-9)

    def test_one_power_step_from_a_start_in_another_group(self):
        # A carried vector that converged while group 0 dominated has (in float32) exactly zero
        # components on the other groups once they underflow; then group 4 grows. One step
        # must already see it: the estimate is per group.
        kernel, spec, start = _adversarial_depthwise()
        exact = _sigma_max(kernel, spec)
        per_group = _per_group_sigma(kernel, spec, 6)
        self.assertEqual(int(np.argmax(per_group)), 4)
        self.assertLess(per_group[0], 0.6 * exact)
        result = spectra.clip_operator_norm_power(
            kernel.astype(np.float32), spec, 1.0, start.astype(np.float32), num_iterations=1)
        self.assertEqual(result.sigma.dtype, np.float32)
        self.assertEqual(result.vector.dtype, np.float32)
        # One step per group from a random block: a lower estimate, above every other group.
        self.assertLessEqual(float(result.sigma), exact * (1 + 1e-6))
        self.assertGreater(float(result.sigma), 1.2 * np.sort(per_group)[-2])


if __name__ == "__main__":
    absltest.main()
