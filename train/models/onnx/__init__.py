"""Import ONNX models (PyTorch, TensorFlow, JAX exports) as pure JAX functions.

* :func:`from_onnx`: an ``.onnx`` file -> :class:`OnnxModel` (``apply_fn``, ``params`` with
  HWIO conv kernels), so :func:`train.find_convs`, the exact spectra of :mod:`spectra` and
  :func:`train.project_conv_operator_norm` work on it unchanged.
* :func:`fold_batch_norm`: the same model with eval-mode BatchNormalization folded into the
  preceding convs, and the list of what was folded.
* :meth:`OnnxModel.to_onnx`: the way back, the original graph with new weights (BatchNorm kept
  or folded); ``convspectra-project`` (:mod:`train.models.onnx.project_cli`) projects every
  conv of a file to ``σ_max <= c`` and writes it with a certificate
  (:func:`train.models.onnx.project_cli.project_onnx` in Python).
"""

from train.models.onnx._fold import FoldedBatchNorm
from train.models.onnx._fold import fold_batch_norm
from train.models.onnx._ops import OPS as _OPS
from train.models.onnx.model import OnnxModel
from train.models.onnx.model import from_onnx

#: The ONNX operator types :func:`from_onnx` supports (default domain).
SUPPORTED_OPS = tuple(sorted(_OPS))

__all__ = [
    "SUPPORTED_OPS",
    "FoldedBatchNorm",
    "OnnxModel",
    "fold_batch_norm",
    "from_onnx",
]
