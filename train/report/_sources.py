"""Reports of models from elsewhere: an ONNX file, the checkpoint of a training run."""

from __future__ import annotations


def report_onnx(path, input_shape=None, **kwargs):
    """The report of an ONNX model imported with ``train.models.from_onnx`` (NCHW input).

    Args:
      path: the ``.onnx`` file.
      input_shape: ``(1, C, H, W)``; the model's own input shape when ``None``.
      **kwargs: passed to :func:`network_report`: ``options`` (a
        :class:`train.report.ReportOptions`) and / or options by name.

    Raises:
      ImportError: when ``train.models.from_onnx`` is not available.
    """
    import jax.numpy as jnp

    try:
        from train.models import from_onnx
    except ImportError as e:
        raise ImportError(
            "--onnx needs train.models.from_onnx (ONNX import), which this installation does not "
            f"have: {e}"
        ) from e
    from train.report._api import network_report

    model = from_onnx(str(path), input_shape=input_shape)
    shape = tuple(input_shape) if input_shape is not None else tuple(model.input_shape)
    x = jnp.zeros(shape, jnp.float32)
    return network_report(model.apply_fn, model.params, x, **kwargs)


def report_run(run_dir, data=None, **kwargs):
    """The report of the latest checkpoint of a training run (:func:`train.restore_model`).

    Args:
      run_dir: a folder written by :func:`train.train_and_evaluate`.
      data: optional inputs ``(N, H, W, C)`` for the Jacobian lower bound.
      **kwargs: passed to :func:`network_report_nnx`: ``options`` (a
        :class:`train.report.ReportOptions`) and / or options by name.
    """
    import numpy as np

    from train import data as train_data
    from train.model_io import restore_model
    from train.report._api import network_report_nnx

    model, config, _ = restore_model(run_dir)
    h, w, c = train_data.dataset_info(config.data.dataset).image_shape
    pad = config.data.image_pad
    x = np.zeros((1, h + 2 * pad, w + 2 * pad, c), np.float32)
    return network_report_nnx(model, x, data=data, **kwargs)
