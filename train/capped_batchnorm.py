"""A BatchNorm that caps the folded conv operator inside the forward pass (spectral-norm style).

A conv ``K`` followed by BatchNorm applies the **folded** operator ``K · diag(s)``,
``s = gamma / sqrt(var + eps)`` (``var`` the batch variance in training mode, the running
variance in evaluation mode), then a translation. :class:`CappedBatchNorm` multiplies the layer's
whole output ``s * (x - mean) + beta`` by

.. math::

    r = \\min(1, c / \\hat\\sigma), \\qquad \\hat\\sigma = \\lVert (K v) \\cdot s \\rVert_2,

where ``v`` (unit norm) is a persistent power-iteration vector of the folded operator (one step
per training-mode call, under ``jax.lax.stop_gradient``, as in spectral normalisation, Miyato et
al. 2018). Both modes apply the capped operator ``r K · diag(s)`` with their own ``s``: training
and evaluation see the same constraint, instead of an after-step projection of gamma that
training-mode BatchNorm's batch statistics undo (:mod:`train.bn_aware`). The cap is invariant
to the scale of ``(gamma, beta)`` once active (``r`` shrinks as they grow), so it commutes with
the rescale of gamma and beta that :func:`train.bn_aware.certify_folded` applies.

Soundness: ``σ̂`` is a Rayleigh-quotient **estimate** from below (``||F v|| <= σ_max(F)`` for a
unit ``v``), so the capped operator's σ_max may exceed ``c`` by the estimate's deficit. With
``estimate='circulant'`` ``σ̂`` estimates the σ_max of the circulant embedding
(:func:`spectra.circulant_embedding`), an upper bound of the zero-padded layer's and the quantity
that the certification (:func:`train.certify.certified_upper_bound`) bounds; with
``'padded'`` it estimates the zero-padded layer's own σ_max. The evaluation network is certified
at the end by the existing host certification (:func:`train.bn_aware.certify_folded` /
:func:`train.bn_aware.certify_folded_train_state`, which the training loop runs with
``project_bn_aware=True``): it reads gamma and the running variance, i.e. the **uncapped**
folded operator ``F``, whose certified bound is ``>=`` that of the capped one ``r F`` (``r <=
1``), and rescales (gamma, beta) by ``c / u``; the cap then recomputes to ``r' = 1`` when
``u >= σ̂`` (always up to float rounding, ``r' <= 1`` in any case), so the evaluation network
is ``(c / u) F`` with ``u`` certified ``>= σ_max(F)``: **certified** ``<= c``. The residual
excess it fixes is :func:`capped_excess` before the certification.

The layer is an ``nnx.BatchNorm`` (same ``mean``/``var``/``scale``/``bias`` variables), so
:func:`train.bn_aware.find_batchnorm_folds`, :func:`train.recalibrate_batch_stats` and the
network report (:mod:`train.report`, which folds the per-channel factor ``s · r`` it evaluates
from the traced evaluation network) treat it as a BatchNorm. The power vector is a
:class:`PowerVector` variable (not an ``nnx.BatchStat``: a re-estimation of the statistics keeps
it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import spectra
from spectra import ConvSpec

#: What :class:`CappedBatchNorm`'s power iteration estimates: the zero-padded layer's σ_max
#: (``'padded'``) or its circulant embedding's (``'circulant'``, an upper bound of the former).
ESTIMATES = ("padded", "circulant")


class PowerVector(nnx.Variable):
    """The persistent power-iteration vector of a :class:`CappedBatchNorm` (unit ℓ2 norm)."""


def check_cap(cap: Any) -> float:
    """``cap`` as a float; ``ValueError`` naming ``cap`` unless it is a finite number ``> 0``."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float, np.integer, np.floating)):
        raise ValueError(f"cap={cap!r} must be a finite number > 0")
    cap = float(cap)
    if not (np.isfinite(cap) and cap > 0):
        raise ValueError(f"cap={cap!r} must be a finite number > 0")
    return cap


def _normalise(v: jax.Array) -> jax.Array:
    norm = jnp.sqrt(jnp.sum(v * v))
    return v / jnp.maximum(norm, jnp.finfo(v.dtype).tiny)


class CappedBatchNorm(nnx.BatchNorm):
    r"""BatchNorm whose folded conv operator is capped at ``σ_max <= cap`` in the forward pass.

    ``y = r · (s · (x - mean) + beta)`` with ``s = gamma / sqrt(var + eps)`` and
    ``r = min(1, cap / σ̂)``, ``σ̂ = ||conv(v, kernel) · s||`` (see the module docstring). ``x``
    is the output of the conv whose ``kernel`` (HWIO, no conv bias between the conv and this
    layer, ``spec`` its layer) is passed with it. Training mode: batch statistics (running
    averages updated as ``nnx.BatchNorm`` does) and ``power_iterations`` power steps on ``v``
    (stored; no gradient through ``v``, gradients flow through ``σ̂`` to the kernel and gamma);
    evaluation mode: running statistics and the stored ``v``.

    Args:
      num_features: channels (the conv's ``c_out``).
      cap: ``c > 0``.
      spec: the conv's :class:`spectra.ConvSpec` (input size, strides, padding).
      kernel_shape: the conv kernel's HWIO shape ``(kh, kw, c_in, num_features)`` (the power
        vector has the shape ``(H, W, c_in)`` of :meth:`power_spec`'s input).
      estimate: one of :data:`ESTIMATES`.
      power_iterations: power steps per training-mode call (``>= 1``).
      momentum, epsilon, use_running_average, param_dtype: as ``nnx.BatchNorm``.
      rngs: ``nnx.Rngs`` (``params`` stream: the initial power vector).

    Raises:
      ValueError: naming ``cap``, ``estimate``, ``power_iterations``, ``kernel_shape`` or
        ``spec`` when invalid.

    Example:
      >>> spec = ConvSpec((6, 6))
      >>> bn = CappedBatchNorm(4, cap=1.0, spec=spec, kernel_shape=(3, 3, 2, 4),
      ...                      rngs=nnx.Rngs(0))
      >>> kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))
      >>> x = spectra.conv(kernel, jnp.ones((8, 6, 6, 2)), spec)
      >>> bn(x, kernel).shape
      (8, 6, 6, 4)
    """

    def __init__(
        self,
        num_features: int,
        *,
        cap: float,
        spec: ConvSpec,
        kernel_shape: Sequence[int],
        estimate: str = "circulant",
        power_iterations: int = 1,
        use_running_average: bool = False,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.cap = check_cap(cap)
        if estimate not in ESTIMATES:
            raise ValueError(f"estimate={estimate!r}: expected one of {ESTIMATES}")
        if isinstance(power_iterations, bool) or not (
            isinstance(power_iterations, (int, np.integer)) and power_iterations >= 1
        ):
            raise ValueError(f"power_iterations={power_iterations!r} must be an int >= 1")
        kernel_shape = tuple(kernel_shape)
        if len(kernel_shape) != 4 or any(
            isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1
            for n in kernel_shape
        ) or kernel_shape[3] != num_features:
            raise ValueError(
                f"kernel_shape={kernel_shape!r} must be 4 ints >= 1, HWIO with c_out = "
                f"num_features={num_features}"
            )
        if not isinstance(spec, ConvSpec):
            raise ValueError(f"spec={spec!r} must be a spectra.ConvSpec")
        super().__init__(
            num_features,
            use_running_average=use_running_average,
            momentum=momentum,
            epsilon=epsilon,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.spec = spec
        self.estimate = estimate
        self.power_iterations = int(power_iterations)
        self.kernel_shape = tuple(int(n) for n in kernel_shape)
        self.in_features = self.kernel_shape[2]
        self.power_shape = (*self.power_spec(self.kernel_shape).input_shape, self.in_features)
        v = jax.random.normal(rngs.params(), self.power_shape, jnp.float32)
        self.power_vector = PowerVector(_normalise(v))

    def power_spec(self, kernel_shape: Sequence[int]) -> ConvSpec:
        """The layer the power iteration runs on: ``spec`` or its circulant embedding."""
        if self.estimate == "circulant":
            return spectra.circulant_embedding(self.spec, tuple(kernel_shape))
        return self.spec

    def _check_kernel(self, kernel: jax.Array) -> None:
        shape = tuple(kernel.shape)
        if shape != self.kernel_shape:
            raise ValueError(f"kernel has shape {shape}: expected kernel_shape={self.kernel_shape}")

    def folded_sigma_estimate(self, kernel: jax.Array, scale: jax.Array) -> jax.Array:
        """``σ̂ = ||conv(v, kernel) · scale||`` with the stored unit vector ``v`` (no update)."""
        spec = self.power_spec(kernel.shape)
        v = jax.lax.stop_gradient(self.power_vector[...]).astype(kernel.dtype)
        # The folded kernel K · diag(s): its own array, not the conv's params leaf (the conv
        # discovery of train.discovery gives each params kernel one ConvSpec).
        w = spectra.conv(kernel * scale, v, spec)
        return jnp.sqrt(jnp.sum(w * w))

    def _folded_scale(self, var: jax.Array) -> jax.Array:
        """``s = gamma / sqrt(var + eps)`` (``1 / sqrt(var + eps)`` without a scale)."""
        inv = jax.lax.rsqrt(var + self.epsilon)
        return inv if self.scale is None else self.scale[...] * inv

    def _ratio(self, kernel: jax.Array, scale: jax.Array) -> jax.Array:
        """``r = min(1, c / σ̂)`` (``σ̂`` floored at the dtype's tiny: no division by 0)."""
        sigma = self.folded_sigma_estimate(kernel, scale)
        return jnp.minimum(1.0, self.cap / jnp.maximum(sigma, jnp.finfo(sigma.dtype).tiny))

    def _power_step(self, kernel: jax.Array, scale: jax.Array) -> None:
        spec = self.power_spec(kernel.shape)
        folded = jax.lax.stop_gradient(kernel * scale)
        v = self.power_vector[...].astype(kernel.dtype)
        for _ in range(self.power_iterations):
            v = _normalise(spectra.conv_transpose(folded, spectra.conv(folded, v, spec), spec))
        self.power_vector[...] = jax.lax.stop_gradient(v).astype(self.power_vector[...].dtype)

    def __call__(  # type: ignore[override]
        self, x: jax.Array, kernel: jax.Array, use_running_average: bool | None = None
    ) -> jax.Array:
        """``r · (s · (x - mean) + beta)`` over the last axis of the conv output ``x``."""
        ura = self.use_running_average if use_running_average is None else use_running_average
        kernel = jnp.asarray(kernel)
        self._check_kernel(kernel)
        if x.shape[-1] != self.num_features:
            raise ValueError(
                f"x has {x.shape[-1]} features on its last axis; expected "
                f"num_features={self.num_features}"
            )
        dtype = jnp.result_type(x, self.mean[...])
        x = jnp.asarray(x, dtype)
        if ura:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axis=axes)
            var = jnp.maximum(jnp.mean(x * x, axis=axes) - mean * mean, 0.0)
            m = self.momentum
            # The statistics keep their own dtype (a float64 input must not upcast them).
            self.mean[...] = jax.lax.stop_gradient(
                m * self.mean[...] + (1 - m) * mean).astype(self.mean[...].dtype)
            self.var[...] = jax.lax.stop_gradient(
                m * self.var[...] + (1 - m) * var).astype(self.var[...].dtype)
        scale = self._folded_scale(var)
        if not ura:
            self._power_step(kernel, scale)
        ratio = self._ratio(kernel, scale)
        y = (x - mean) * (scale * ratio)
        if self.bias is not None:
            y = y + self.bias[...] * ratio
        return y

    def applied_scale(self, kernel: Any) -> np.ndarray:
        """The evaluation-mode per-channel factor ``s · r`` (float64 host array): the eval
        layer is the folded kernel ``kernel · diag(applied_scale)`` then a translation."""
        kernel = jnp.asarray(kernel)
        scale = self._folded_scale(self.var[...])
        ratio = self._ratio(kernel, scale)
        return np.asarray(scale * ratio, np.float64)


def capped_layers(model: nnx.Module) -> list[tuple[str, CappedBatchNorm]]:
    """``[(path, layer)]`` of every :class:`CappedBatchNorm` of ``model`` (``'blocks/0/bn1'``)."""
    return [
        ("/".join(str(p) for p in path), module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, CappedBatchNorm)
    ]


#: The conv attribute of each capped BatchNorm attribute in :class:`train.models.resnet.ResNet`
#: and its blocks.
RESNET_PAIRS = {"bn": "conv", "bn1": "conv1", "bn2": "conv2", "proj_bn": "proj"}


def resnet_kernels(model: nnx.Module) -> dict[str, jax.Array]:
    """``{capped layer path: its conv's kernel}`` for the ResNets of
    :mod:`train.models.resnet` (the attribute pairs of :data:`RESNET_PAIRS`)."""
    out = {}
    for path, module in nnx.iter_modules(model):
        for bn, conv in RESNET_PAIRS.items():
            layer = getattr(module, bn, None)
            if isinstance(layer, CappedBatchNorm):
                name = "/".join(str(p) for p in (*path, bn))
                out[name] = getattr(module, conv).kernel[...]
    return out


def capped_excess(model: nnx.Module, kernels: dict[str, Any]) -> dict[str, float]:
    """Per capped layer, the certified bound of its **evaluation-mode applied** folded operator
    over its cap: :func:`train.bn_aware.folded_upper_bound` of ``kernel · diag(s · r)`` / ``c``
    (``> 1``: the estimate ``σ̂`` fell short and the final certification must rescale by that
    factor; float64).

    Args:
      model: holding :class:`CappedBatchNorm` layers.
      kernels: ``{layer path: conv kernel}`` (:func:`resnet_kernels` for the ResNets).

    Returns:
      ``{layer path: bound / cap}``.
    """
    from train.bn_aware import folded_upper_bound

    out = {}
    for path, layer in capped_layers(model):
        if path not in kernels:
            raise ValueError(f"kernels has no kernel for the capped layer {path!r}")
        kernel = np.asarray(kernels[path])
        u = folded_upper_bound(kernel, layer.applied_scale(kernel), layer.spec)
        out[path] = u / layer.cap
    return out


__all__ = [
    "ESTIMATES",
    "CappedBatchNorm",
    "PowerVector",
    "RESNET_PAIRS",
    "capped_excess",
    "capped_layers",
    "check_cap",
    "resnet_kernels",
]
