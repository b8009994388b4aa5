"""Tests for the shared polyphase form and symbol of spectra/_fourier.py.

``_bounds`` (certified bounds) and ``_density`` (the spectral-density approximation) both build
on these; each is checked here against an independent NumPy computation.
"""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from spectra import _fourier


def _numpy_symbol(kernel, omegas, dilation, groups):
    """``F_g(ω)[o, c] = Σ_pq K[p, q, c, g cog + o] e^{-i (p d1 ω1 + q d2 ω2)}`` by loops."""
    kh, kw, cig, cout = kernel.shape
    cog = cout // groups
    out = np.zeros((*omegas.shape[:-1], groups, cog, cig), complex)
    for p in range(kh):
        for q in range(kw):
            angle = p * dilation[0] * omegas[..., 0] + q * dilation[1] * omegas[..., 1]
            phase = np.exp(-1j * angle)
            taps = kernel[p, q].reshape(cig, groups, cog).transpose(1, 2, 0)  # (g, cog, cig)
            out += phase[..., None, None, None] * taps
    return out


def _numpy_polyphase(kernel, strides, dilation):
    """Tap ``a`` of phase ``r`` is the dilated tap ``s a + r`` per axis; channels (c, r1, r2)."""
    kh, kw, cig, cout = kernel.shape
    keff = [(k - 1) * d + 1 for k, d in zip((kh, kw), dilation)]
    taps = [-(-k // s) for k, s in zip(keff, strides)]
    dilated = np.zeros((taps[0] * strides[0], taps[1] * strides[1], cig, cout))
    dilated[: keff[0] : dilation[0], : keff[1] : dilation[1]] = kernel
    out = np.zeros((taps[0], taps[1], cig, strides[0], strides[1], cout))
    for a in range(taps[0]):
        for b in range(taps[1]):
            for r1 in range(strides[0]):
                for r2 in range(strides[1]):
                    out[a, b, :, r1, r2] = dilated[strides[0] * a + r1, strides[1] * b + r2]
    return out.reshape(taps[0], taps[1], cig * strides[0] * strides[1], cout)


class FourierTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("plain", (3, 3, 2, 4), (1, 1), 1),
        ("dilated_rectangular", (2, 3, 3, 2), (2, 1), 1),
        ("groups", (3, 2, 2, 4), (1, 2), 2),
    )
    def test_symbol_matches_numpy(self, shape, dilation, groups):
        kernel = np.random.default_rng(0).standard_normal(shape)
        omegas = np.random.default_rng(1).uniform(-4, 4, (5, 3, 2))
        np.testing.assert_allclose(
            _fourier.symbol(kernel, omegas, dilation, groups),
            _numpy_symbol(kernel, omegas, dilation, groups), atol=1e-12)

    @parameterized.named_parameters(
        ("square", (3, 3, 2, 4), 1, (8, 8)),
        ("groups_odd_grid", (2, 3, 2, 4), 2, (5, 7)),
        ("single_tap_axis", (1, 3, 2, 2), 1, (1, 6)),
    )
    def test_symbol_on_grid_is_symbol_at_the_dft_points(self, shape, groups, grid):
        kernel = np.random.default_rng(0).standard_normal(shape)
        on_grid = _fourier.symbol_on_grid(_fourier.group_taps(kernel, groups), grid)
        u = 2 * np.pi * np.arange(grid[0]) / grid[0]
        v = 2 * np.pi * np.arange(grid[1] // 2 + 1) / grid[1]
        omegas = np.stack(np.meshgrid(u, v, indexing="ij"), axis=-1)
        direct = np.moveaxis(_numpy_symbol(kernel, omegas, (1, 1), groups), 2, 0)
        np.testing.assert_allclose(on_grid, direct, atol=1e-12)

    @parameterized.named_parameters(
        ("stride2", (3, 3, 2, 3), (2, 2), (1, 1)),
        ("stride2_dilation2", (3, 2, 2, 3), (2, 1), (2, 2)),
        ("stride3_dilation2", (2, 3, 1, 2), (3, 3), (2, 1)),
        ("stride1_dilated", (2, 2, 2, 2), (1, 1), (3, 2)),
    )
    def test_polyphase_kernel_matches_numpy(self, shape, strides, dilation):
        kernel = np.random.default_rng(0).standard_normal(shape)
        np.testing.assert_array_equal(
            _fourier.polyphase_kernel(kernel, strides, dilation),
            _numpy_polyphase(kernel, strides, dilation))

    def test_drop_empty_phases_keeps_the_phases_holding_taps(self):
        # Dilation 2, stride 2: every tap is in phase 0; phase 1 is empty and dropped.
        kernel = np.random.default_rng(0).standard_normal((3, 1, 2, 2))
        full = np.asarray(_fourier.polyphase_axis(kernel, 0, 2, 2))
        dropped = np.asarray(_fourier.polyphase_axis(kernel, 0, 2, 2, drop_empty_phases=True))
        self.assertEqual(full.shape, (3, 1, 4, 2))
        np.testing.assert_array_equal(full[:, :, 1::2], 0.0)
        np.testing.assert_array_equal(dropped, full[:, :, 0::2])


if __name__ == "__main__":
    absltest.main()
