"""Loading an ONNX graph and turning it into a static :class:`Program` for JAX.

Import walks the nodes once (they are topologically sorted in a valid ONNX graph). Every value is
either a constant (a NumPy array known at import: initializers that are not trained, ``Constant``
nodes and everything computed from them alone, e.g. shape subgraphs once the input shapes are
fixed) or a traced value whose shape and dtype are found with :func:`jax.eval_shape`. Only nodes
with a traced input remain in the :class:`Program` that ``apply_fn`` runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from train.models.onnx import _layers  # noqa: F401 - registers the layer operators.
from train.models.onnx import _tensor  # noqa: F401 - registers the tensor operators.
from train.models.onnx._ops import OPS
from train.models.onnx._ops import NodeInfo

#: Layouts of a stored parameter: ``'ONNX'`` (as in the file) or ``'HWIO'`` (a conv kernel
#: ``(O, I, kh, kw)`` stored as ``(kh, kw, I, O)``; a 1-D kernel ``(O, I, k)`` as ``(1, k, I, O)``).
LAYOUTS = ("ONNX", "HWIO")


@dataclasses.dataclass(frozen=True)
class ParamRef:
    """Where an initializer lives in ``params``: ``params[node][slot]``, in ``layout``."""

    node: str
    slot: str
    layout: str
    onnx_ndim: int


@dataclasses.dataclass(frozen=True)
class Step:
    """One node that ``apply_fn`` runs: its operator, inputs and outputs by value name."""

    info: NodeInfo
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Program:
    """A graph with static shapes: constants, parameter locations and the nodes to run.

    Attributes:
      steps: the nodes with a traced input, in order.
      constants: value name -> NumPy array known at import.
      param_refs: initializer name -> :class:`ParamRef`.
      input_names: graph inputs (without initializers), in order.
      input_shapes: their fixed shapes.
      input_dtypes: their dtypes.
      output_names: graph outputs, in order.
      shapes: value name -> ``jax.ShapeDtypeStruct`` of every traced value.
      opset: the default-domain opset.
      param_dtypes: parameter value name -> its dtype in the file (what
        :meth:`~train.models.onnx.OnnxModel.to_onnx` writes back).
      lifted: parameter value names that the file computes with ``Constant`` nodes (possibly
        through ``Identity``, ``Cast`` and shape operators), not initializers.
      lifted_nodes: keys of the nodes that computed them (not run; dropped by ``to_onnx``).
      folds: ``(conv key, batch-norm key)`` of every BatchNormalization folded into its conv
        (:func:`~train.models.onnx.fold_batch_norm`).
      source: the imported ``onnx.ModelProto`` (what ``to_onnx`` rewrites).
    """

    steps: tuple[Step, ...]
    constants: Mapping[str, np.ndarray]
    param_refs: Mapping[str, ParamRef]
    input_names: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    input_dtypes: tuple[np.dtype, ...]
    output_names: tuple[str, ...]
    shapes: Mapping[str, jax.ShapeDtypeStruct]
    opset: int
    param_dtypes: Mapping[str, np.dtype] = dataclasses.field(default_factory=dict)
    lifted: tuple[str, ...] = ()
    lifted_nodes: frozenset[str] = frozenset()
    folds: tuple[tuple[str, str], ...] = ()
    source: onnx.ModelProto | None = dataclasses.field(default=None, repr=False, compare=False)


# ------------------------------------------------------------------------------------ loading
def load_model(source: Any) -> onnx.ModelProto:
    """Reads and checks an ONNX model (a path, or a ``ModelProto``), external data included."""
    if isinstance(source, onnx.ModelProto):
        model = source
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"path_or_model_proto={path!r} is not a file")
        try:
            model = onnx.load(path, load_external_data=True)
        except (DecodeError, RuntimeError, ValueError, OSError) as e:
            raise ValueError(
                f"path_or_model_proto={path!r} is not a readable ONNX model ({e})"
            ) from e
    else:
        raise ValueError(
            "path_or_model_proto must be a path to an .onnx file or an onnx.ModelProto; got "
            f"{type(source).__name__}"
        )
    if not model.HasField("graph") or not model.graph.node:
        raise ValueError(
            "path_or_model_proto is not an ONNX model: it has no graph nodes (a file that is not "
            "ONNX, or a truncated one)"
        )
    try:  # A path lets the checker find external data and models over 2 GB.
        onnx.checker.check_model(model if isinstance(source, onnx.ModelProto) else path)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise ValueError(f"path_or_model_proto is not a valid ONNX model: {e}") from e
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("the ONNX model imports no default-domain ('ai.onnx') opset")


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    attrs = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        attrs[attr.name] = value
    return attrs


def _slot_names(op_type: str, opset: int, count: int) -> list[str]:
    """Input names from the operator schema (``W``, ``B``, ...), indexed when variadic."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
        names = [i.name for i in schema.inputs]
    except onnx.defs.SchemaError:
        names = []
    out = []
    for i in range(count):
        name = names[min(i, len(names) - 1)] if names else "input"
        if i >= len(names) - 1 and count > len(names):
            name = f"{name}_{i}"
        out.append(name)
    return out


def _node_keys(nodes: Sequence[onnx.NodeProto]) -> list[str]:
    keys, seen = [], set()
    for index, node in enumerate(nodes):
        key = node.name or f"{node.op_type}_{index}"
        while key in seen:
            key = f"{key}_{index}"
        seen.add(key)
        keys.append(key)
    return keys


# ------------------------------------------------------------------------------ input shapes
def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def resolve_input_shapes(inputs, input_shape) -> list[tuple[int, ...]]:
    """Fixed shape of each graph input, from the graph and ``input_shape``."""
    names = [i.name for i in inputs]
    if input_shape is None:
        given = [None] * len(inputs)
    elif isinstance(input_shape, Mapping):
        unknown = sorted(set(input_shape) - set(names))
        if unknown:
            raise ValueError(f"input_shape names {unknown}, not graph inputs; inputs: {names}")
        given = [input_shape.get(n) for n in names]
    elif len(input_shape) and all(isinstance(d, (int, np.integer)) for d in input_shape):
        if len(inputs) != 1:
            raise ValueError(
                f"input_shape={tuple(input_shape)} is one shape but the graph has {len(inputs)} "
                f"inputs {names}; pass a dict name -> shape or one shape per input"
            )
        given = [input_shape]
    else:
        if len(input_shape) != len(inputs):
            raise ValueError(
                f"input_shape has {len(input_shape)} shapes; the graph has inputs {names}"
            )
        given = list(input_shape)
    shapes = []
    for value, shape in zip(inputs, given):
        dims = value.type.tensor_type.shape.dim
        declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        if shape is None:
            symbolic = [d for d in declared if not isinstance(d, int)]
            if symbolic:
                raise ValueError(
                    f"graph input {value.name!r} has symbolic dims {symbolic} (shape {declared}); "
                    "pass input_shape with its fixed shape"
                )
            shapes.append(tuple(declared))
            continue
        shape = tuple(int(d) for d in shape)
        if len(shape) != len(declared):
            raise ValueError(
                f"input_shape {shape} for graph input {value.name!r} has rank {len(shape)}; the "
                f"input has rank {len(declared)} (shape {declared})"
            )
        for axis, (d, g) in enumerate(zip(declared, shape)):
            if g < 1 or (isinstance(d, int) and d > 0 and d != g):
                raise ValueError(
                    f"input_shape {shape} for graph input {value.name!r}: dim {axis} is {g}; "
                    f"the graph declares {declared}"
                )
        shapes.append(shape)
    return shapes


# ------------------------------------------------------------------------------------ analysis
def _static_values(nodes, keys, opset) -> set[str]:
    """Values that must be known at import: static operator inputs and what they depend on."""
    needed: set[str] = set()
    for node in reversed(nodes):
        op = OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if op is None:
            continue
        for index in op.static(opset):
            if index < len(node.input) and node.input[index]:
                needed.add(node.input[index])
        # Shape and Size read only the (fixed) shape of their input, never its values.
        if node.op_type not in ("Shape", "Size") and any(o in needed for o in node.output):
            needed.update(i for i in node.input if i)
    return needed


def _param_owners(nodes, keys, opset, trainable, initializers) -> dict[str, ParamRef]:
    """Where each trainable initializer is stored: under its first conv consumer (as the HWIO
    kernel) when a ``Conv`` reads it as its weight, else under its first consumer."""
    refs: dict[str, ParamRef] = {}
    for conv_pass in (True, False):
        for node, key in zip(nodes, keys):
            if conv_pass and node.op_type != "Conv":
                continue
            slots = _slot_names(node.op_type, opset, len(node.input))
            for index, name in enumerate(node.input):
                if name not in trainable or name in refs:
                    continue
                ndim = initializers[name].ndim
                if conv_pass and (index != 1 or ndim not in (3, 4)):
                    continue
                layout = "HWIO" if conv_pass else "ONNX"
                refs[name] = ParamRef(key, slots[index], layout, ndim)
    return refs


def to_layout(array: np.ndarray, layout: str) -> np.ndarray:
    """ONNX layout -> stored layout."""
    if layout == "HWIO":
        if array.ndim == 3:
            array = array[:, :, None, :]
        return np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)))
    return array


def from_layout(array, layout: str, onnx_ndim: int):
    """Stored layout -> ONNX layout (traced)."""
    if layout == "HWIO":
        array = jnp.transpose(array, (3, 2, 0, 1))
        return array[:, :, 0, :] if onnx_ndim == 3 else array
    return array


def _unsupported(node, key, opset) -> ValueError:
    domain = f" in domain {node.domain!r}" if node.domain not in ("", "ai.onnx") else ""
    return ValueError(
        f"unsupported ONNX operator {node.op_type}{domain} (node {key!r}, opset {opset}); "
        f"supported: {', '.join(sorted(OPS))}"
    )


def _info(node, key, opset, layout="ONNX") -> NodeInfo:
    return NodeInfo(node.op_type, key, opset, _attributes(node), len(node.output), layout)


def _evaluate_constant(op, info, values):
    if op.numpy:
        return tuple(np.asarray(v) for v in op.fn(info, np, *values))
    with jax.ensure_compile_time_eval():
        return tuple(np.asarray(v) for v in op.fn(info, jnp, *values))


#: Inputs that hold weights, by operator: a float ``Constant`` feeding one of them (directly or
#: through the operators of ``_CHAIN_OPS``) becomes a parameter, as an initializer would.
WEIGHT_INPUTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2, 3, 4),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "PRelu": (1,),
}
#: Operators whose constant operand is a bias when the other operand is a linear layer's output.
_BIAS_OPS = ("Add",)
_LINEAR_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
#: Operators between a ``Constant`` and the weight input it feeds that import folds into the
#: lifted value (their other inputs must be constants: ``Reshape`` targets, ``Unsqueeze`` axes).
_CHAIN_OPS = ("Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Flatten")


def _constant_size(name, producer) -> int:
    """Number of entries of a ``Constant`` node's value (``-1`` when not a ``Constant``)."""
    while name in producer and producer[name][0].op_type in _CHAIN_OPS:
        name = producer[name][0].input[0]
    if name not in producer or producer[name][0].op_type != "Constant":
        return -1
    for attr in producer[name][0].attribute:
        if attr.name == "value":
            return int(np.prod(attr.t.dims, dtype=np.int64))
        if attr.name in ("value_floats", "value_ints"):
            return len(attr.floats) + len(attr.ints)
    return 1


def _traced_values(nodes, input_names) -> set[str]:
    """Values that depend on the graph inputs' values (``Shape`` / ``Size`` read only shapes)."""
    traced = set(input_names)
    for node in nodes:
        if node.op_type in ("Shape", "Size"):
            continue
        if any(name in traced for name in node.input if name):
            traced.update(o for o in node.output if o)
    return traced


def _lift_constants(nodes, keys, opset, input_names, static_needed, initializers):
    """Float ``Constant`` values (through ``_CHAIN_OPS``) that feed weight inputs.

    Returns ``(lifted, lifted_nodes)``: value name -> its array, and the keys of the nodes that
    compute them and nothing else (the chain is then not run).
    """
    producer = {o: (node, key) for node, key in zip(nodes, keys) for o in node.output if o}
    traced = _traced_values(nodes, input_names)

    def side_value(name):
        """A chain node's other input: an initializer or a ``Constant`` node's value."""
        if not name:
            return None
        if name in initializers:
            return initializers[name]
        node, key = producer[name]
        return _evaluate_constant(OPS["Constant"], _info(node, key, opset), [])[0]

    def is_side(name):
        return (
            not name
            or name in initializers
            or (name in producer and producer[name][0].op_type == "Constant")
        )

    def chain(name):
        """The nodes ``Constant -> (Identity | Cast | Reshape ...)*`` computing ``name``, last
        first, and the ``Constant`` nodes of their other inputs."""
        found, side = [], []
        while name in producer and name not in initializers:
            node, key = producer[name]
            if node.domain not in ("", "ai.onnx"):
                return None
            if node.op_type == "Constant":
                return [*found, (node, key)], side
            if node.op_type not in _CHAIN_OPS or not node.input or not node.input[0]:
                return None
            if not all(is_side(other) for other in node.input[1:]):
                return None
            side.extend(producer[o] for o in node.input[1:] if o and o not in initializers)
            found.append((node, key))
            name = node.input[0]
        return None

    candidates = []
    for node in nodes:
        if node.domain not in ("", "ai.onnx"):
            continue
        slots = WEIGHT_INPUTS.get(node.op_type, ())
        if node.op_type in _BIAS_OPS and len(node.input) == 2:
            linear = [
                i
                for i, name in enumerate(node.input)
                if name in producer and producer[name][0].op_type in _LINEAR_OPS
            ]
            # A bias has one value per channel: a scalar added to a layer's output (an offset
            # such as YOLO's anchor 0.5) stays a constant.
            slots = tuple(1 - i for i in linear)
            if all(_constant_size(node.input[i], producer) <= 1 for i in slots):
                slots = ()
        if not any(name in traced for name in node.input if name):
            continue  # All-constant: folded at import.
        candidates.extend(
            node.input[i]
            for i in slots
            if i < len(node.input) and node.input[i] and node.input[i] not in traced
        )
    lifted: dict[str, np.ndarray] = {}
    chain_nodes: dict[str, onnx.NodeProto] = {}
    for name in candidates:
        if name in lifted or name in static_needed or name in initializers:
            continue
        result = chain(name)
        if result is None:
            continue
        found, side = result
        value = None
        for node, key in reversed(found):
            args = [] if node.op_type == "Constant" else [value]
            args += [side_value(other) for other in node.input[1:]]
            value = _evaluate_constant(OPS[node.op_type], _info(node, key, opset), args)[0]
        if not np.issubdtype(value.dtype, np.floating):
            continue
        lifted[name] = value
        chain_nodes.update((key, node) for node, key in found + side)
    # A chain node is not run when every consumer of its outputs is a chain node or a lifted
    # value's producer (its outputs are then params or feed only them).
    consumers: dict[str, set[str]] = {}
    for node, key in zip(nodes, keys):
        for name in node.input:
            consumers.setdefault(name, set()).add(key)
    dropped: set[str] = set()
    changed = True
    while changed:
        changed = False
        for key, node in chain_nodes.items():
            if key in dropped:
                continue
            used = [
                c
                for o in node.output
                if o and o not in lifted
                for c in consumers.get(o, ())
                if c not in dropped
            ]
            if not used:
                dropped.add(key)
                changed = True
    return lifted, frozenset(dropped)


def build_program(model: onnx.ModelProto, input_shape: Any) -> tuple[Program, dict]:
    """The :class:`Program` of ``model`` for fixed input shapes, and its ``params``."""
    graph = model.graph
    opset = default_opset(model)
    nodes = list(graph.node)
    keys = _node_keys(nodes)
    inputs = graph_inputs(model)
    shapes_in = resolve_input_shapes(inputs, input_shape)
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    static_needed = _static_values(nodes, keys, opset)
    for node, key in zip(nodes, keys):  # Before anything reads a node's attributes.
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
            raise _unsupported(node, key, opset)
    output_names = tuple(o.name for o in graph.output)
    lifted, lifted_nodes = _lift_constants(
        nodes,
        keys,
        opset,
        [i.name for i in inputs],
        static_needed | set(output_names),
        initializers,
    )
    initializers.update(lifted)

    constants: dict[str, np.ndarray] = {}
    traced: dict[str, jax.ShapeDtypeStruct] = {}
    dtypes_in = []
    for value, shape in zip(inputs, shapes_in):
        elem = value.type.tensor_type.elem_type
        dtype = jax.dtypes.canonicalize_dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        dtypes_in.append(np.dtype(dtype))
        traced[value.name] = jax.ShapeDtypeStruct(shape, dtype)

    # Trainable initializers: floating point ones that are not needed at import.
    trainable = {
        name
        for name, array in initializers.items()
        if np.issubdtype(array.dtype, np.floating) and name not in static_needed
    }
    for name, array in initializers.items():
        if name not in trainable:
            constants[name] = array
    params: dict[str, dict[str, Any]] = {}
    param_refs = _param_owners(nodes, keys, opset, trainable, initializers)
    stored_params: set[str] = set()
    steps = []
    for node, key in zip(nodes, keys):
        if key in lifted_nodes:
            continue
        op = OPS[node.op_type]
        for name in node.input:
            if name in param_refs and name not in stored_params:
                ref = param_refs[name]
                stored = jnp.asarray(to_layout(initializers[name], ref.layout))
                params.setdefault(ref.node, {})[ref.slot] = stored
                stored_params.add(name)
                onnx_shape = initializers[name].shape
                traced[name] = jax.ShapeDtypeStruct(onnx_shape, stored.dtype)
        for name in node.input:
            if name and name not in constants and name not in traced:
                raise ValueError(f"node {key!r} ({node.op_type}) reads {name!r}, never produced")
        static = op.static(opset)
        for index in static:
            if index < len(node.input) and node.input[index] in traced:
                raise ValueError(
                    f"node {key!r} ({node.op_type}, opset {opset}): input {index} "
                    f"({node.input[index]!r}) must be known at import (it fixes a shape) but "
                    "depends on the graph inputs or trained parameters"
                )
        layout = "ONNX"
        if node.op_type == "Conv" and len(node.input) > 1:
            ref = param_refs.get(node.input[1])
            layout = ref.layout if ref is not None else "ONNX"
        info = _info(node, key, opset, layout)
        if node.op_type in ("Shape", "Size") and node.input[0] in traced:
            outputs = op.fn(info, np, traced[node.input[0]])
            constants.update(zip(node.output, (np.asarray(o) for o in outputs)))
            continue
        if all(not name or name in constants for name in node.input):
            values = [constants[name] if name else None for name in node.input]
            outputs = _evaluate_constant(op, info, values)
            constants.update((o, v) for o, v in zip(node.output, outputs) if o)
            continue
        dynamic = [i for i, name in enumerate(node.input) if name in traced]

        def abstract(*dyn, node=node, info=info, op=op, dynamic=dynamic):
            values = [constants.get(name) if name else None for name in node.input]
            for i, v in zip(dynamic, dyn):
                values[i] = v
            return tuple(op.fn(info, jnp, *values))

        structs = [traced[node.input[i]] for i in dynamic]
        if layout == "HWIO":  # The conv reads the kernel as params store it.
            kernel = params[param_refs[node.input[1]].node][param_refs[node.input[1]].slot]
            structs[dynamic.index(1)] = jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)
        try:
            out_structs = jax.eval_shape(abstract, *structs)
        except ValueError as e:
            if str(e).startswith("ONNX node") or str(e).startswith("unsupported"):
                raise
            raise info.error(f"{e}") from e
        except TypeError as e:
            raise info.error(f"{e}") from e
        for name, struct in zip(node.output, out_structs):
            if name:
                traced[name] = jax.ShapeDtypeStruct(struct.shape, struct.dtype)
        steps.append(Step(info, tuple(node.input), tuple(node.output)))

    for name in output_names:
        if name not in traced and name not in constants:
            raise ValueError(f"graph output {name!r} is never produced")
    program = Program(
        steps=tuple(steps),
        constants=constants,
        param_refs=param_refs,
        input_names=tuple(i.name for i in inputs),
        input_shapes=tuple(shapes_in),
        input_dtypes=tuple(dtypes_in),
        output_names=output_names,
        shapes=traced,
        opset=opset,
        param_dtypes={name: np.dtype(initializers[name].dtype) for name in param_refs},
        lifted=tuple(name for name in lifted if name in param_refs),
        lifted_nodes=lifted_nodes,
        source=model,
    )
    return program, params


# ------------------------------------------------------------------------------------ running
def run_program(program: Program, params: Mapping, inputs: Sequence[Any]) -> tuple:
    """Runs ``program`` on ``params`` and the graph inputs (traceable: jit, grad, vmap)."""
    if len(inputs) != len(program.input_names):
        raise ValueError(
            f"apply_fn takes {len(program.input_names)} inputs {list(program.input_names)}; got "
            f"{len(inputs)}"
        )
    env: dict[str, Any] = {}
    for name, shape, x in zip(program.input_names, program.input_shapes, inputs):
        if tuple(np.shape(x)) != shape:
            raise ValueError(
                f"input {name!r} has shape {tuple(np.shape(x))}; the model was imported for "
                f"{shape} (from_onnx(..., input_shape=...) fixes it)"
            )
        env[name] = jnp.asarray(x)

    def value(name: str, step: Step, index: int):
        if not name:
            return None
        if name in env:
            return env[name]
        ref = program.param_refs.get(name)
        if ref is not None:
            leaf = params[ref.node][ref.slot]
            if step.info.op_type == "Conv" and index == 1 and ref.layout == "HWIO":
                return leaf
            return from_layout(leaf, ref.layout, ref.onnx_ndim)
        return program.constants[name]

    for step in program.steps:
        args = [value(name, step, i) for i, name in enumerate(step.inputs)]
        outputs = OPS[step.info.op_type].fn(step.info, jnp, *args)
        env.update((o, v) for o, v in zip(step.outputs, outputs) if o)
    return tuple(
        env[name] if name in env else jnp.asarray(program.constants[name])
        for name in program.output_names
    )
