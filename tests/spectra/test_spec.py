"""`ConvSpec`: normalisation, hashing, derived sizes and input validation."""

import dataclasses
import functools

import jax
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

import spectra
from tests.spectra import layers


class ConvSpecTest(parameterized.TestCase):

    def test_normalises_and_hashes(self):
        a = spectra.ConvSpec(8, 2, "same", 1, 1)
        b = spectra.ConvSpec((8, 8), (2, 2), "SAME", (1, 1))
        self.assertEqual(a, b)
        self.assertEqual(hash(a), hash(b))
        self.assertEqual(a.padding, "SAME")
        c = spectra.ConvSpec((8, 8), padding=[[1, 0], [2, 2]])
        self.assertEqual(c.padding, ((1, 0), (2, 2)))
        with self.assertRaises(dataclasses.FrozenInstanceError):
            a.strides = (1, 1)

    def test_static_under_jit(self):
        spec = spectra.ConvSpec((6, 6), padding="CIRCULAR")
        f = jax.jit(spectra.spectral_norm, static_argnums=1)
        self.assertAlmostEqual(float(f(np.eye(2)[None, None] * 3.0, spec)), 3.0)

    @parameterized.named_parameters(*layers.layer_cases())
    def test_output_shape_matches_lax(self, kshape, spec):
        # lax's own shape rule (traced by `eval_shape`: nothing compiled; the values of the conv
        # are checked against Flax on the same grid in test_operator.py).
        x = np.ones((*spec.input_shape, spec.channels(kshape)[0]))
        y = jax.eval_shape(functools.partial(spectra.conv, spec=spec), np.ones(kshape), x)
        self.assertEqual(y.shape, (*spec.output_shape(kshape), kshape[-1]))

    @parameterized.named_parameters(
        ("unknown_padding", dict(padding="REFLECT"), "padding"),
        ("bad_padding_pairs", dict(padding=((1, 2, 3), (0, 0))), "padding"),
        ("negative_padding", dict(padding=((-1, 0), (0, 0))), "padding"),
        ("zero_stride", dict(strides=0), "strides"),
        ("bad_stride_len", dict(strides=(1, 2, 3)), "strides"),
        ("bad_dilation", dict(kernel_dilation=-1), "kernel_dilation"),
        ("bad_groups", dict(feature_group_count=0), "feature_group_count"),
        ("in_features_not_multiple", dict(feature_group_count=2, in_features=3), "in_features"),
        ("bad_input_shape", dict(input_shape=(0, 3)), "input_shape"),
    )
    def test_bad_spec(self, kwargs, name):
        kwargs = {"input_shape": (8, 8), **kwargs}
        with self.assertRaisesRegex(ValueError, name):
            spectra.ConvSpec(**kwargs)

    @parameterized.named_parameters(
        ("wrong_rank", np.ones((3, 3, 2)), {}, "kernel must be 4-D"),
        ("c_in_mismatch", np.ones((3, 3, 2, 4)), dict(in_features=3), "in_features"),
        ("groups_not_dividing_c_out", np.ones((3, 3, 2, 3)), dict(feature_group_count=2), "c_out"),
        ("input_smaller_than_kernel", np.ones((5, 5, 1, 1)),
         dict(input_shape=(4, 8), padding="VALID"), "input_shape"),
        ("input_smaller_than_dilated_kernel", np.ones((3, 3, 1, 1)),
         dict(input_shape=(4, 8), kernel_dilation=2, padding="VALID"), "dilated kernel"),
        ("nan_kernel", np.full((3, 3, 1, 1), np.nan), {}, "kernel contains NaN"),
        ("inf_kernel", np.full((3, 3, 1, 1), np.inf), {}, "kernel contains NaN or inf"),
    )
    def test_bad_kernel(self, kernel, kwargs, message):
        spec = spectra.ConvSpec(**{"input_shape": (8, 8), **kwargs})
        for fn in (spectra.singular_values, spectra.spectral_norm, spectra.dense_operator):
            with self.assertRaisesRegex(ValueError, message):
                fn(kernel, spec)


if __name__ == "__main__":
    absltest.main()
