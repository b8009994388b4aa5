"""Folding eval-mode BatchNormalization into the conv that feeds it."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from train.models.onnx._graph import ParamRef
from train.models.onnx._graph import Step
from train.models.onnx.model import OnnxModel
from train.models.onnx.model import model_from_program


class FoldedBatchNorm(NamedTuple):
    """One fold: the ``Conv`` node (its key in ``params``) and the BatchNormalization removed."""

    conv: str
    batch_norm: str


def _consumers(steps, name: str) -> list[int]:
    return [i for i, step in enumerate(steps) if name in step.inputs]


def fold_batch_norm(model: OnnxModel) -> tuple[OnnxModel, tuple[FoldedBatchNorm, ...]]:
    r"""The model with every foldable eval-mode BatchNormalization folded into its conv.

    A ``BatchNormalization`` (inference mode) is folded when its input is the output of a
    ``Conv`` used by nothing else (no other node, not a graph output) and that conv's kernel is
    a parameter not shared with another node. With :math:`f = \gamma / \sqrt{\mathrm{var} +
    \epsilon}` per output channel, the folded conv has kernel ``W * f`` (over the HWIO output
    axis) and bias ``(b - mean) * f + beta``; it computes the same function (up to float
    rounding). The folded conv keeps its params key, so the raw and folded operators of a layer
    are ``model.params[conv]['W']`` and ``folded.params[conv]['W']`` and :func:`train.find_convs`
    gives both the same :class:`spectra.ConvSpec`. The BatchNormalization's parameters leave
    ``params``; a conv without bias gains ``params[conv]['B']``. The values used are the
    model's current ``params``.

    Args:
      model: an imported model (:func:`train.models.from_onnx`).

    Returns:
      ``(folded_model, folds)``: the new model and one :class:`FoldedBatchNorm` per fold, in
      graph order (empty when nothing was folded; ``model`` itself is unchanged).

    Example:
      >>> import numpy as np
      >>> from onnx import TensorProto, helper, numpy_helper
      >>> inits = [numpy_helper.from_array(np.ones(s, np.float32), n) for n, s in
      ...          [('w', (2, 1, 3, 3)), ('g', (2,)), ('b', (2,)), ('m', (2,)), ('v', (2,))]]
      >>> graph = helper.make_graph(
      ...     [helper.make_node('Conv', ['x', 'w'], ['c'], name='conv'),
      ...      helper.make_node('BatchNormalization', ['c', 'g', 'b', 'm', 'v'], ['y'],
      ...                       name='bn')],
      ...     'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 1, 5, 5])],
      ...     [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 2, 3, 3])], inits)
      >>> from train.models import from_onnx
      >>> folded, folds = fold_batch_norm(from_onnx(helper.make_model(graph)))
      >>> folds, sorted(folded.params['conv'])
      ((FoldedBatchNorm(conv='conv', batch_norm='bn'),), ['B', 'W'])
    """
    program = model.program
    steps = list(program.steps)
    refs = dict(program.param_refs)
    dtypes = dict(program.param_dtypes)
    params = {key: dict(entries) for key, entries in model.params.items()}
    producer = {out: i for i, step in enumerate(steps) for out in step.outputs if out}
    folds, removed = [], set()

    def value(name: str):
        if name in refs:
            ref = refs[name]
            return params[ref.node][ref.slot]
        return jnp.asarray(program.constants[name])

    for index, bn in enumerate(steps):
        if bn.info.op_type != "BatchNormalization" or bn.inputs[0] not in producer:
            continue
        conv_index = producer[bn.inputs[0]]
        conv = steps[conv_index]
        if conv.info.op_type != "Conv" or conv_index in removed:
            continue
        conv_out = conv.outputs[0]
        if _consumers(steps, conv_out) != [index] or conv_out in program.output_names:
            continue
        kernel_name = conv.inputs[1]
        ref = refs.get(kernel_name)
        if ref is None or ref.layout != "HWIO" or len(_consumers(steps, kernel_name)) != 1:
            continue
        scale, beta, mean, var = (value(name) for name in bn.inputs[1:5])
        eps = bn.info.attr("epsilon", 1e-5)
        factor = scale / jnp.sqrt(var + eps)
        kernel = params[ref.node][ref.slot]
        params[ref.node][ref.slot] = (kernel * factor).astype(kernel.dtype)
        bias_name = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2] else None
        bias = value(bias_name) if bias_name else jnp.zeros(factor.shape, kernel.dtype)
        new_bias = ((bias - mean) * factor + beta).astype(kernel.dtype)
        new_bias_name = f"{ref.node}/folded_bias"
        params[ref.node]["B"] = new_bias
        refs[new_bias_name] = ParamRef(ref.node, "B", "ONNX", 1)
        if kernel_name in dtypes:
            dtypes[new_bias_name] = dtypes[kernel_name]
        steps[conv_index] = Step(
            conv.info, (conv.inputs[0], kernel_name, new_bias_name), (bn.outputs[0],)
        )
        removed.add(index)
        folds.append(FoldedBatchNorm(ref.node, bn.info.name))
    if not folds:
        return model, ()
    steps = [step for i, step in enumerate(steps) if i not in removed]
    used = {name for step in steps for name in step.inputs}
    refs = {name: ref for name, ref in refs.items() if name in used}
    kept = {(ref.node, ref.slot) for ref in refs.values()}
    params = {
        key: {slot: leaf for slot, leaf in entries.items() if (key, slot) in kept}
        for key, entries in params.items()
    }
    params = {key: entries for key, entries in params.items() if entries}
    shapes = dict(program.shapes)
    for name, ref in refs.items():
        if name not in shapes:
            leaf = params[ref.node][ref.slot]
            shapes[name] = jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
    new_program = dataclasses.replace(
        program,
        steps=tuple(steps),
        param_refs=refs,
        shapes=shapes,
        param_dtypes={name: dtypes[name] for name in refs if name in dtypes},
        folds=tuple(program.folds) + tuple((f.conv, f.batch_norm) for f in folds),
    )
    return model_from_program(new_program, params), tuple(folds)
