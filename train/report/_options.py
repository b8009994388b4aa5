"""``ReportOptions``: the options of :func:`train.report.network_report`, in one frozen object."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from train.report import _stages
from train.report._layers import BACKENDS
from train.report._layers import DEFAULT_MAX_DENSE_DIM
from train.report._network_bound import DEFAULT_MAX_WORK


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    """How :func:`train.report.network_report` computes a report (hashable; validated once).

    Every report entry point (:func:`~train.report.network_report`,
    :func:`~train.report.network_report_nnx`, :func:`~train.report.report_onnx`,
    :func:`~train.report.report_run`, ``python -m train.report``) takes ``options=`` and / or
    the same names as keyword arguments, which are applied on top (:meth:`merged`).

    Attributes:
      num_points: points for the lower bound.
      power_iterations: power iterations per point of the lower bound's final stage (and of its
        first stage when ``ascent_steps=0``; 5 otherwise), at most.
      power_rtol: a point's power iteration stops once its ``||JᵀJ v||`` changes by at most
        this (relative) in one step (default ``0``: always ``power_iterations``). Measured on a
        2-core CPU: one iteration of YOLOv8n @320² costs ~2 s per point, and ``1e-3`` stopped
        its points after a few iterations; on slowly converging linear maps it stops before
        the 1e-6 agreement with the exact norm that 200 iterations reach.
      max_dense_dim: layers with both dims at most this use a dense SVD.
      compute_spectra: compute the per-layer spectra (for the plots).
      include_dense: add dense layers to ``layers``.
      progress: tqdm bar over layers.
      seed: for random inputs and start vectors.
      blas_threads: limit of BLAS/LAPACK threads while the report runs (``threadpoolctl``;
        ``None``: unchanged). Measured on a shared 2-core machine: multi-threaded OpenBLAS made
        the batched SVDs of the 64-channel ResNet layers ~10x slower (26 s vs 2.5 s).
      huge_pages: whether NumPy advises transparent huge pages for its arrays while the report
        runs (:func:`train.lapack_workaround.numpy_huge_pages`; ``None``: NumPy's setting,
        unchanged). Default ``False``: measured on a 2-core VM, the advice made first-touched
        memory ~15x slower and WideResNet-50-2 @96² 51.9 s against 39.3 s without it.
      backend: how the per-layer numbers are computed (:func:`train.report.analyse_convs`):
        ``'numpy'`` (default: host NumPy / SciPy in float64, no compilation; a report runs each
        layer once, so compiling a program per layer shape, as ``'jax'`` does, dominated the
        whole report: ResNet-20 @32² layers ~25 s cold with ``'jax'`` on a 2-core CPU) or
        ``'jax'`` (compiled, on the default JAX device; for very large layers on an
        accelerator).
      overlap_lower_bound: compute the lower bound (a compiled JAX program: XLA compiles and
        runs it, mostly outside Python's GIL) in a worker thread while the layers (NumPy /
        LAPACK, also outside the GIL) are analysed: on 2 cores the two stages overlap.
        ``timings['total']`` is then the wall time, less than the sum of the stages.
      ascent_steps: pair-ascent steps of the lower bound search, at most.
      lower_bound_budget: the lower bound search's time: ``'layers'`` (default: it stops when
        the layer stage is done, or after as long as that took when not overlapping, but not
        before 1 s: ``train.report._stages.MIN_SEARCH_SECONDS``; it ends within one step of
        that), seconds, or ``None`` (only the step counts limit it: reproducible values).
      lower_bound_share: while the layer stage runs beside it, the fraction ``(0, 1]`` of the
        wall-clock time in which the search computes: after each step it waits
        ``(1 - share) / share`` times that step's duration (it wakes as soon as the layer stage
        ends), so the layer stage keeps most of the cores (``1``: no waiting). Measured
        (WideResNet-50-2 @96², 2-core CPU): with no waiting the search took one of the two
        cores from the layer stage for its whole duration.
      checkpoint_dir: optional folder: the layer stage's results are saved there as soon as it
        ends (``stages/layers.pkl`` and the readable ``stages/layers.partial.json``), the lower
        bound's when it ends, and a later report of the same network, input and options
        reuses them (``timings`` then has ``layers_reused`` / ``lower_bound_reused``).
      check_pairs: when ``> 0`` and the upper bound is a number, a soundness check
        (:func:`train.report.check_upper_bound`) on the lower bound's own pairs and this many
        random ones: ``network['soundness']``.
      tight_bound: also compute the midpoint (LipLT) bound of
        :mod:`train.report._network_bound` (sound, proven or probabilistic with
        ``δ <= 1e-6``); ``network['lipschitz_upper']`` is then the smaller of the two and
        ``lipschitz_upper_naive`` the composition (product of the layer norms).
      tight_max_work: the midpoint bound is skipped when its Lanczos norms would need more
        than this many steps (big networks; the composition is kept); ``None``: 1000 on CPU
        (ResNet-20 @32² needs 1680: ~1 min on a shared 2-core CPU), 20000 on accelerators.

    Raises:
      ValueError: naming the option and what was expected.
    """

    num_points: int = 4
    power_iterations: int = 20
    power_rtol: float = 0.0
    max_dense_dim: int = DEFAULT_MAX_DENSE_DIM
    compute_spectra: bool = True
    include_dense: bool = True
    progress: bool = False
    seed: int = 0
    blas_threads: int | None = 1
    huge_pages: bool | None = False
    backend: str = "numpy"
    overlap_lower_bound: bool = True
    ascent_steps: int = 100
    lower_bound_budget: float | str | None = "layers"
    lower_bound_share: float = 0.35
    checkpoint_dir: str | os.PathLike | None = None
    check_pairs: int = 0
    tight_bound: bool = True
    tight_max_work: int | None = DEFAULT_MAX_WORK

    def __post_init__(self):
        for name in ("num_points", "power_iterations", "ascent_steps", "check_pairs",
                     "max_dense_dim", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative int")
        if self.num_points < 1:
            raise ValueError(f"num_points={self.num_points!r} must be >= 1")
        rtol = self.power_rtol
        if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol >= 0:
            raise ValueError(f"power_rtol={rtol!r} must be a number >= 0")
        for name in ("compute_spectra", "include_dense", "progress", "overlap_lower_bound",
                     "tight_bound"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        if self.huge_pages is not None and not isinstance(self.huge_pages, bool):
            raise ValueError(f"huge_pages={self.huge_pages!r} must be a bool or None")
        for name in ("blas_threads", "tight_max_work"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name}={value!r} must be None or a positive int")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is unknown; expected one of {BACKENDS}")
        _stages.check_budget(self.lower_bound_budget)
        _stages.check_share(self.lower_bound_share)
        if self.checkpoint_dir is not None and not isinstance(
            self.checkpoint_dir, (str, os.PathLike)
        ):
            raise ValueError(
                f"checkpoint_dir={self.checkpoint_dir!r} must be a path (str or os.PathLike) "
                "or None"
            )

    @classmethod
    def merged(cls, options: ReportOptions | None = None, **changes: Any) -> ReportOptions:
        """``options`` (default: the defaults) with ``changes`` (option names) applied on top.

        Raises:
          ValueError: naming ``options`` when it is not a :class:`ReportOptions`, or an
            invalid value.
        """
        if options is None:
            options = cls()
        elif not isinstance(options, cls):
            raise ValueError(f"options must be a ReportOptions or None; got {options!r}")
        return dataclasses.replace(options, **changes) if changes else options


#: The option names (the fields of :class:`ReportOptions`).
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(ReportOptions))


def split_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``kwargs`` split into ``(options, rest)``: the :data:`OPTION_NAMES` and the others."""
    options = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}
    return options, {k: v for k, v in kwargs.items() if k not in OPTION_NAMES}
