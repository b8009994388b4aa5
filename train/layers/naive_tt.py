"""The naive TT conv of Garipov et al. (2016): a conv whose 4-D kernel is a TT tensor.

:class:`NaiveTTConv` is the "TT-conv (naive)" baseline of T. Garipov, D. Podoprikhin,
A. Novikov, D. Vetrov, "Ultimate tensorization: compressing convolutional and FC layers alike"
(NIPS 2016 workshop, arXiv 1611.03214), in our reading (reference notes §4): a TT decomposition
of the HWIO kernel tensor itself with the modes ``(kh, kw, c_in, c_out)`` in that order (4 cores,
inner ranks ``(r1, r2, r3)``), the forward pass being a conv with the reconstructed kernel. With
1x1 filters it collapses to an ordinary low-rank matrix factorisation (``W = G3 G4``), as the
poster says. Used by :class:`train.models.garipov.GaripovNet`; Garipov's own TT-conv is
:class:`train.layers.tt.TTConv`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from spectra import tt_svd
from spectra import tt_to_full


class NaiveTTConv(nnx.Module):
    """A conv whose 4-D kernel is a TT tensor with modes ``(kh, kw, c_in, c_out)``.

    ``K[i, j, c, s] = G1[i] G2[j] G3[c] G4[s]`` with cores ``G1 (1, kh, r1)``, ``G2 (r1, kw, r2)``,
    ``G3 (r2, c_in, r3)``, ``G4 (r3, c_out, 1)``: the "TT-conv (naive)" baseline of Garipov et
    al. (2016) in our reading (module docstring). Parameters
    ``kh r1 + r1 kw r2 + r2 c_in r3 + r3 c_out``. The forward pass reconstructs the HWIO kernel
    (:meth:`kernel`) and applies one ``lax.conv_general_dilated`` (exactly the dense conv with
    that kernel). The TT ranks can usefully be at most ``r1 <= kh``, ``r2 <= kh kw``,
    ``r3 <= c_out`` (larger ones do not add expressiveness).

    Init: i.i.d. normal cores with variances whose product times ``r1 r2 r3`` is ``2 / fan_in``
    (the reconstructed kernel has He's variance; core ``k`` has variance
    ``(2 / fan_in)^(1/4) / r_k``, ``r_4 = 1``).

    Args:
      in_features: input channels ``c_in``.
      out_features: output channels ``c_out``.
      kernel_size: ``(kh, kw)`` or an int.
      ranks: the inner TT ranks ``(r1, r2, r3)``, each >= 1.
      strides: an int or a pair.
      padding: ``'SAME'``, ``'VALID'`` or explicit ``((lo, hi), (lo, hi))`` zero padding.
      param_dtype: dtype of the cores.
      rngs: ``nnx.Rngs`` with a ``params`` stream.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = NaiveTTConv(16, 32, 3, (3, 9, 8), rngs=nnx.Rngs(0))
      >>> layer(jnp.zeros((2, 8, 8, 16))).shape, layer.kernel().shape
      ((2, 8, 8, 32), (3, 3, 16, 32))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        ranks: Sequence[int],
        *,
        strides: int | Sequence[int] = 1,
        padding: str | Sequence[tuple[int, int]] = "SAME",
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kernel_size = (kernel_size,) * 2 if isinstance(kernel_size, int) else tuple(kernel_size)
        strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
        ranks = tuple(ranks)
        if len(ranks) != 3 or any(not isinstance(r, int) or r < 1 for r in ranks):
            raise ValueError(f"ranks={ranks}: expected 3 inner TT ranks (r1, r2, r3), each >= 1")
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features={in_features}, out_features={out_features}: expected >= 1"
            )
        if isinstance(padding, str) and padding not in ("SAME", "VALID"):
            raise ValueError(f"padding={padding!r}: expected 'SAME', 'VALID' or explicit pairs")
        modes = (*kernel_size, in_features, out_features)
        full_ranks = (1, *ranks, 1)
        target = 2.0 / (kernel_size[0] * kernel_size[1] * in_features)
        keys = jax.random.split(rngs.params(), 4)
        cores = []
        for k in range(4):
            std = math.sqrt(target ** 0.25 / full_ranks[k + 1])
            shape = (full_ranks[k], modes[k], full_ranks[k + 1])
            cores.append(nnx.Param(std * jax.random.normal(keys[k], shape, param_dtype)))
        self.cores = nnx.List(cores)
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.ranks = ranks
        self.strides = strides
        self.padding = padding

    def kernel(self) -> jax.Array:
        """The HWIO kernel ``(kh, kw, c_in, c_out)`` the TT cores represent (exact)."""
        return tt_to_full([c[...] for c in self.cores])

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(N, H, W, c_in) -> (N, H_out, W_out, c_out)``: the dense conv with :meth:`kernel`."""
        kernel = self.kernel()
        return lax.conv_general_dilated(
            x.astype(kernel.dtype) if x.dtype != kernel.dtype else x,
            kernel,
            window_strides=self.strides,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    @classmethod
    def from_dense(
        cls,
        kernel: jax.typing.ArrayLike,
        ranks: Sequence[int] | None = None,
        *,
        rtol: float | None = None,
        strides: int | Sequence[int] = 1,
        padding: str | Sequence[tuple[int, int]] = "SAME",
    ) -> NaiveTTConv:
        """TT-SVD (Oseledets 2011) of a dense HWIO kernel, truncated to ``ranks`` / ``rtol``.

        ``ranks=None, rtol=None`` is exact (full TT ranks); otherwise the kernel is the best
        approximation TT-SVD gives (with ``rtol``, ``||K - K_TT||_F <= rtol ||K||_F``).
        """
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 4:
            raise ValueError(f"kernel of shape {kernel.shape}: expected HWIO (kh, kw, c_in, c_out)")
        cores = tt_svd(kernel, max_rank=None if ranks is None else tuple(ranks), rtol=rtol)
        got = tuple(int(c.shape[2]) for c in cores[:-1])
        kh, kw, c_in, c_out = kernel.shape
        layer = cls(c_in, c_out, (kh, kw), got, strides=strides, padding=padding,
                    param_dtype=kernel.dtype, rngs=nnx.Rngs(0))
        for param, core in zip(layer.cores, cores):
            param[...] = jnp.asarray(core, kernel.dtype)
        return layer


__all__ = ["NaiveTTConv"]
