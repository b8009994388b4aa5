"""Writing an imported model back to ONNX with new weights (:meth:`OnnxModel.to_onnx`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper

from train.models.onnx._graph import Program
from train.models.onnx._graph import _node_keys

#: Initializer bytes above which the weights are written as external data beside the file
#: (protobuf cannot serialise a message of 2 GiB or more).
EXTERNAL_DATA_BYTES = 1 << 30


def onnx_layout(array: np.ndarray, layout: str, onnx_ndim: int) -> np.ndarray:
    """Stored layout -> ONNX layout (the inverse of ``_graph.to_layout``), in NumPy."""
    if layout == "HWIO":
        array = np.transpose(array, (3, 2, 0, 1))
        array = array[:, :, 0, :] if onnx_ndim == 3 else array
    return np.asarray(array, order="C")  # Keeps 0-d arrays 0-d (ascontiguousarray does not).


def param_arrays(program: Program, params: Any) -> dict[str, np.ndarray]:
    """Every parameter value of ``program`` from ``params``, in ONNX layout and file dtype."""
    if not isinstance(params, Mapping):
        raise ValueError(
            f"params must be a dict {{node: {{input: array}}}} like OnnxModel.params; got "
            f"{type(params).__name__}"
        )
    known = {(ref.node, ref.slot) for ref in program.param_refs.values()}
    unknown = sorted(
        f"{node}/{slot}"
        for node, entries in params.items()
        for slot in (entries if isinstance(entries, Mapping) else {"?": None})
        if (node, slot) not in known
    )
    if unknown:
        raise ValueError(f"params has entries {unknown} that are not parameters of this model")
    arrays = {}
    for name, ref in program.param_refs.items():
        try:
            leaf = params[ref.node][ref.slot]
        except (KeyError, TypeError) as e:
            raise ValueError(f"params has no entry [{ref.node!r}][{ref.slot!r}]") from e
        leaf = np.asarray(getattr(leaf, "value", leaf))
        array = onnx_layout(leaf, ref.layout, ref.onnx_ndim)
        want = tuple(program.shapes[name].shape) if name in program.shapes else None
        if want is not None and array.shape != want:
            raise ValueError(
                f"params[{ref.node!r}][{ref.slot!r}] has shape {leaf.shape} ({ref.layout}); the "
                f"model's is {want} in ONNX layout"
            )
        if not np.all(np.isfinite(array)):
            raise ValueError(f"params[{ref.node!r}][{ref.slot!r}] has non-finite values")
        arrays[name] = array.astype(program.param_dtypes.get(name, array.dtype))
    return arrays


def export_proto(program: Program, params: Any) -> onnx.ModelProto:
    """The imported model's graph with ``params`` as initializers (see ``OnnxModel.to_onnx``)."""
    if program.source is None:
        raise ValueError("this model has no source ONNX graph (it was not made by from_onnx)")
    arrays = param_arrays(program, params)
    model = onnx.ModelProto()
    model.CopyFrom(program.source)
    graph = model.graph
    nodes = list(graph.node)
    keys = _node_keys(nodes)
    steps = {step.info.name: step for step in program.steps}
    dropped = set(program.lifted_nodes) | {bn for _, bn in program.folds}
    kept = []
    for node, key in zip(nodes, keys):
        if key in dropped:
            continue
        if any(key == conv for conv, _ in program.folds):  # Inputs and output of the fold.
            step = steps[key]
            del node.input[:]
            node.input.extend(step.inputs)
            del node.output[:]
            node.output.extend(step.outputs)
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)

    used = {name for node in kept for name in node.input if name}
    used.update(o.name for o in graph.output)
    produced = {o for node in kept for o in node.output if o}
    clash = sorted(name for name in arrays if name in produced)
    if clash:
        raise ValueError(f"parameter names {clash} are also node outputs of the graph")
    initializers = []
    for tensor in graph.initializer:
        if tensor.name not in used:
            continue  # Read only by removed nodes (folded BatchNormalization, old conv bias).
        if tensor.name in arrays:
            tensor = numpy_helper.from_array(arrays.pop(tensor.name), tensor.name)
        initializers.append(tensor)
    new_names = [name for name in arrays if name in used]
    written = {name: arrays[name] for name in new_names}
    initializers.extend(numpy_helper.from_array(arrays[name], name) for name in new_names)
    del graph.initializer[:]
    graph.initializer.extend(initializers)

    names = {t.name for t in initializers}
    listed = {i.name for i in graph.input}
    inputs = [i for i in graph.input if i.name in names or i.name in program.input_names]
    if model.ir_version < 4:  # Old IR: every initializer is also a graph input.
        for name in new_names:
            if name not in listed:
                array = written[name]
                inputs.append(
                    helper.make_tensor_value_info(
                        name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape
                    )
                )
    del graph.input[:]
    graph.input.extend(inputs)
    known = produced | names | set(program.input_names)
    value_info = [v for v in graph.value_info if v.name in known]
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:  # pragma: no cover - a bug here.
        raise ValueError(f"the written graph is not valid ONNX: {e}") from e
    return model


def save(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Saves ``model``; weights over :data:`EXTERNAL_DATA_BYTES` go to ``<file>.data`` beside."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"path={path!r}: the folder {folder!r} does not exist")
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=os.path.basename(path) + ".data",
        )
    else:
        onnx.save_model(model, path)
