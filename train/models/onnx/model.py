"""Importing an ONNX model as a pure JAX function: :func:`from_onnx` and :class:`OnnxModel`."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import onnx

from train.models.onnx._graph import Program
from train.models.onnx._graph import build_program
from train.models.onnx._graph import load_model
from train.models.onnx._graph import run_program

InputShape = Sequence[int] | Sequence[Sequence[int]] | Mapping[str, Sequence[int]] | None


@dataclasses.dataclass(frozen=True)
class OnnxModel:
    """An ONNX graph as a pure JAX function of its weights and inputs.

    Attributes:
      apply_fn: ``apply_fn(params, *inputs) -> tuple`` of the graph outputs, in graph order.
        Inputs are taken exactly as onnxruntime takes them (NCHW images) with the shapes of
        ``input_shapes``. Pure: works under ``jax.jit``, ``jax.grad`` and ``jax.vmap``.
      params: ``{node_name: {input_name: array}}``: the graph's floating point initializers
        (weights, biases, BatchNormalization statistics, constants multiplied into activations)
        and the float ``Constant`` nodes that feed weight inputs (``Conv`` / ``ConvTranspose``
        W and B, ``Gemm`` / ``MatMul`` operands, BatchNormalization / Instance- / LayerNorm
        scale, bias, mean and var, ``PRelu`` slope, a per-channel ``Add`` after a linear layer;
        also through ``Identity``, ``Cast``, ``Reshape``, ``Unsqueeze``, ``Squeeze``,
        ``Transpose``, ``Flatten``), keyed by the node that reads them and the
        operator's input name (``'W'``, ``'B'``, ``'scale'``...). Conv kernels are stored
        **HWIO** ``(kh, kw, c_in // group, c_out)`` (ONNX stores OIHW; a 1-D conv kernel
        ``(O, I, k)`` becomes ``(1, k, I, O)``), so that :func:`train.find_convs` gives every
        conv's :class:`spectra.ConvSpec`. Initializers that fix shapes (``Reshape`` targets,
        ``Resize`` scales) and integer ones are constants of the program, not params.
      input_names: graph inputs (initializers excluded), in order.
      input_shapes: their fixed shapes.
      input_dtypes: their dtypes (as JAX holds them: float64 is float32 without x64).
      output_names: graph outputs, in order.
      output_shapes: their shapes.
      program: the static graph that ``apply_fn`` runs (constants, nodes, parameter locations).
    """

    apply_fn: Callable[..., tuple]
    params: dict[str, dict[str, jax.Array]]
    input_names: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[np.dtype, ...]
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[int, ...], ...]
    program: Program

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of the only graph input (``ValueError`` for a multi-input graph)."""
        if len(self.input_shapes) != 1:
            raise ValueError(
                f"the model has {len(self.input_names)} inputs {list(self.input_names)}; use "
                "input_shapes"
            )
        return self.input_shapes[0]

    def to_onnx(
        self, params: Any, path: str | os.PathLike | None, *, fold_bn: bool = False
    ) -> onnx.ModelProto:
        """Writes the imported graph with ``params`` as its weights (the way back to ONNX).

        The written file is the original graph (same nodes, attributes, inputs, outputs and
        opset) with every parameter as an initializer under its original value name: conv
        kernels go back from HWIO to ONNX's ``(O, I, kh, kw)`` (``(O, I, k)`` for 1-D convs),
        dtypes back to the file's (float64 initializers included). Weights that the source
        computed with ``Constant`` nodes (and ``Identity`` / ``Cast`` / shape operators) are
        written as initializers and those nodes are dropped. Other constants (shape subgraphs,
        integer initializers) are kept as they were. onnxruntime on the written file computes
        ``apply_fn(params, ...)`` up to float rounding (tested to ~1e-5 relative in float32).

        Args:
          params: weights with the structure of ``self.params`` (e.g. fine-tuned, projected by
            :func:`train.project_conv_operator_norm` or certified by
            :func:`train.certify_conv_operator_norm`).
          path: the ``.onnx`` file to write (weights over 1 GiB go to ``<file>.data`` beside
            it); ``None``: only return the model.
          fold_bn: fold every eval-mode BatchNormalization that follows a conv into it first
            (:func:`train.models.onnx.fold_batch_norm` on ``params``: ``W' = W γ/√(var+ε)``,
            ``b' = (b − mean) γ/√(var+ε) + β``) and write the graph without those nodes. A
            model returned by ``fold_batch_norm`` is written folded whatever ``fold_bn``.

        Returns:
          The written ``onnx.ModelProto`` (checked with ``onnx.checker``).

        Raises:
          ValueError: ``params`` misses a parameter, has one this model does not, or has a
            wrong shape or non-finite values; the model was not made by :func:`from_onnx`; the
            folder of ``path`` does not exist.

        Example:
          >>> import numpy as np
          >>> from onnx import TensorProto, helper, numpy_helper
          >>> w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), 'w')
          >>> graph = helper.make_graph(
          ...     [helper.make_node('Conv', ['x', 'w'], ['y'], name='conv', pads=[1, 1, 1, 1])],
          ...     'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 3, 8, 8])],
          ...     [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 4, 8, 8])], [w])
          >>> model = from_onnx(helper.make_model(graph))
          >>> params = {'conv': {'W': model.params['conv']['W'] * 0.5}}
          >>> written = model.to_onnx(params, None)
          >>> float(numpy_helper.to_array(written.graph.initializer[0]).max())
          0.5
        """
        from train.models.onnx import _export
        from train.models.onnx._fold import fold_batch_norm

        model = self
        if fold_bn:
            _export.param_arrays(self.program, params)  # Checks params before folding.
            model, _ = fold_batch_norm(dataclasses.replace(self, params=params))
            params = model.params
        proto = _export.export_proto(model.program, params)
        if path is not None:
            _export.save(proto, path)
        return proto

    def with_program(self, program: Program, params: dict) -> OnnxModel:
        """The model that runs ``program`` with ``params`` (e.g. a folded graph)."""
        return model_from_program(program, params)

    def example_inputs(self) -> tuple[jax.ShapeDtypeStruct, ...]:
        """``jax.ShapeDtypeStruct`` of every input: what :func:`train.find_convs` needs."""
        return tuple(
            jax.ShapeDtypeStruct(s, d) for s, d in zip(self.input_shapes, self.input_dtypes)
        )


def model_from_program(program: Program, params: dict) -> OnnxModel:
    """The :class:`OnnxModel` that runs ``program`` (``params`` its initial weights)."""
    apply_fn = functools.partial(_apply, program)
    functools.update_wrapper(apply_fn, _apply)
    return OnnxModel(
        apply_fn=apply_fn,
        params=params,
        input_names=program.input_names,
        input_shapes=program.input_shapes,
        input_dtypes=program.input_dtypes,
        output_names=program.output_names,
        output_shapes=tuple(
            tuple(program.shapes[n].shape) if n in program.shapes else program.constants[n].shape
            for n in program.output_names
        ),
        program=program,
    )


def _apply(program: Program, params: Any, *inputs: Any) -> tuple:
    """Runs the imported graph: ``(params, *inputs) -> tuple of outputs``."""
    return run_program(program, params, inputs)


def from_onnx(
    path_or_model_proto: str | onnx.ModelProto, input_shape: InputShape = None
) -> OnnxModel:
    """Imports an ONNX model (PyTorch, TensorFlow, JAX exports) as a pure JAX function.

    The graph is read once: shape subgraphs (``Shape``, ``Gather``, ``Range``,
    ``ConstantOfShape``, ``Expand``, ``Reshape`` of computed shapes) are folded to constants with
    NumPy for the fixed input shapes, so ``apply_fn`` has static shapes and compiles once. The
    outputs equal onnxruntime's up to float rounding (tested to ~1e-5 relative in float32).
    Supported operators: ``train.models.onnx.SUPPORTED_OPS``; 1-D and 2-D convs.

    Args:
      path_or_model_proto: a path to an ``.onnx`` file (initializers stored as external data
        are read from beside it) or an ``onnx.ModelProto``.
      input_shape: the fixed input shape(s): one shape for a single-input graph, a sequence of
        shapes (one per input) or a dict ``input name -> shape``. Needed when the graph has
        symbolic dims (batch, height, width); a fixed dim of the graph must match.

    Returns:
      An :class:`OnnxModel`.

    Raises:
      ValueError: the file is not a (complete, valid) ONNX model; a graph input has symbolic
        dims and no ``input_shape`` (naming the input and dims); ``input_shape`` has the wrong
        rank or contradicts a fixed dim; an operator or attribute value is unsupported (naming
        the op type, node and opset); a shape depends on the graph input's values.

    Example:
      >>> import numpy as np
      >>> from onnx import TensorProto, helper, numpy_helper
      >>> w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), 'w')
      >>> graph = helper.make_graph(
      ...     [helper.make_node('Conv', ['x', 'w'], ['y'], name='conv', pads=[1, 1, 1, 1])],
      ...     'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['n', 3, 8, 8])],
      ...     [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['n', 4, 8, 8])], [w])
      >>> model = from_onnx(helper.make_model(graph), input_shape=(1, 3, 8, 8))
      >>> model.params['conv']['W'].shape, model.output_shapes
      ((3, 3, 3, 4), ((1, 4, 8, 8),))
    """
    proto = load_model(path_or_model_proto)
    program, params = build_program(proto, input_shape)
    return model_from_program(program, params)


def parse_input_shape(text: str) -> tuple[int, ...]:
    """A command line's ``--input-shape`` (``1,3,224,224`` or ``1x3x224x224``) as positive ints
    (what :func:`from_onnx`'s ``input_shape`` takes).

    Raises:
      ValueError: naming ``--input-shape`` when it is not comma-separated positive ints.
    """
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError as e:
        raise ValueError(
            f"--input-shape={text!r} must be comma-separated ints, e.g. 1,3,224,224"
        ) from e
    if not shape or any(v < 1 for v in shape):
        raise ValueError(f"--input-shape={text!r} must be positive ints, e.g. 1,3,224,224")
    return shape
