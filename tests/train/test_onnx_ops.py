"""Every supported ONNX operator and attribute combination, against onnxruntime (float32)."""

import numpy as np
import pytest
from onnx import TensorProto
from onnx import helper
from onnx import numpy_helper

from tests.train.onnx_graphs import check_against_ort
from tests.train.onnx_graphs import make_model
from tests.train.onnx_graphs import randn

node = helper.make_node
I64 = np.int64


def conv_case(x_shape, w_shape, bias=True, opset=13, **attrs):
    c_out = w_shape[0]
    inits = {"w": randn(*w_shape, seed=1)}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = randn(c_out, seed=2)
        inputs.append("b")
    return (opset, [node("Conv", inputs, ["y"], **attrs)], {"x": randn(*x_shape)}, inits)


def unary(op, x=None, opset=13, **attrs):
    x = randn(2, 3, 4, 5) if x is None else x
    return (opset, [node(op, ["x"], ["y"], **attrs)], {"x": x}, {})


def binary(op, a, b, opset=13):
    return (opset, [node(op, ["a", "b"], ["y"])], {"a": a}, {"b": b})


def pool(op, x_shape=(1, 2, 7, 8), opset=13, **attrs):
    return (opset, [node(op, ["x"], ["y"], **attrs)], {"x": randn(*x_shape)}, {})


def const(name, value):
    return node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


POSITIVE = np.abs(randn(2, 3, 4, 5)) + 0.1

CASES = {
    # ------------------------------------------------------------------------------ conv
    "conv_pads": conv_case((1, 3, 8, 8), (4, 3, 3, 3), pads=[1, 1, 1, 1]),
    "conv_asymmetric_pads_stride": conv_case(
        (2, 3, 9, 8), (4, 3, 3, 2), pads=[0, 1, 2, 1], strides=[2, 3]
    ),
    "conv_same_upper": conv_case((1, 3, 7, 8), (4, 3, 3, 4), auto_pad="SAME_UPPER", strides=[2, 2]),
    "conv_same_lower": conv_case((1, 3, 7, 8), (4, 3, 4, 3), auto_pad="SAME_LOWER", strides=[2, 3]),
    "conv_valid_no_bias": conv_case((1, 3, 7, 8), (5, 3, 3, 3), bias=False, auto_pad="VALID"),
    "conv_groups": conv_case((1, 4, 6, 6), (6, 2, 3, 3), group=2, pads=[1, 1, 1, 1]),
    "conv_depthwise": conv_case((1, 4, 6, 7), (4, 1, 3, 3), group=4, pads=[1, 0, 1, 2]),
    "conv_dilation": conv_case(
        (1, 2, 9, 9), (3, 2, 3, 3), dilations=[2, 1], pads=[2, 1, 2, 1], kernel_shape=[3, 3]
    ),
    "conv_1d": conv_case((2, 3, 10), (4, 3, 3), pads=[1, 2], strides=[2]),
    "conv_transpose": (
        13,
        [node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 0, 1, 1])],
        {"x": randn(1, 3, 5, 6)},
        {"w": randn(3, 2, 3, 3, seed=1), "b": randn(2)},
    ),
    "conv_transpose_groups_output_padding": (
        13,
        [
            node(
                "ConvTranspose",
                ["x", "w"],
                ["y"],
                strides=[2, 3],
                group=2,
                output_padding=[1, 2],
                dilations=[1, 2],
            )
        ],
        {"x": randn(1, 4, 4, 5)},
        {"w": randn(4, 3, 3, 2, seed=1)},
    ),
    "conv_transpose_output_shape": (
        13,
        [node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], output_shape=[10, 11])],
        {"x": randn(1, 2, 5, 5)},
        {"w": randn(2, 3, 3, 3, seed=1)},
    ),
    # ----------------------------------------------------------------------- normalisation
    "batch_norm": (
        13,
        [node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], epsilon=1e-3)],
        {"x": randn(2, 3, 4, 5)},
        {"g": randn(3), "b": randn(3, seed=1), "m": randn(3, seed=2), "v": POSITIVE[0, :, 0, 0]},
    ),
    "instance_norm": (
        13,
        [node("InstanceNormalization", ["x", "g", "b"], ["y"])],
        {"x": randn(2, 3, 4, 5)},
        {"g": randn(3), "b": randn(3, seed=1)},
    ),
    "softmax_13": unary("Softmax", axis=1),
    "softmax_11_coerced": unary("Softmax", opset=11, axis=2),
    "log_softmax": unary("LogSoftmax", axis=-1),
    # ------------------------------------------------------------------------------ linear
    "gemm": (
        13,
        [node("Gemm", ["a", "b", "c"], ["y"], transB=1, alpha=0.5, beta=2.0)],
        {"a": randn(3, 4)},
        {"b": randn(5, 4, seed=1), "c": randn(5, seed=2)},
    ),
    "gemm_trans_a": (
        13,
        [node("Gemm", ["a", "b"], ["y"], transA=1)],
        {"a": randn(4, 3)},
        {"b": randn(4, 5, seed=1)},
    ),
    "matmul": binary("MatMul", randn(2, 3, 4), randn(4, 5)),
    # ------------------------------------------------------------------------ elementwise
    "add": binary("Add", randn(2, 3, 4, 5), randn(3, 1, 1, seed=1)),
    "sub": binary("Sub", randn(2, 3, 4, 5), randn(5, seed=1)),
    "mul": binary("Mul", randn(2, 3, 4, 5), randn(1, 3, 1, 1, seed=1)),
    "div": binary("Div", randn(2, 3, 4, 5), POSITIVE[0]),
    "pow": binary("Pow", POSITIVE, np.array(1.7, np.float32)),
    "max": binary("Max", randn(2, 3), randn(3, seed=1)),
    "min": binary("Min", randn(2, 3), randn(3, seed=1)),
    "prelu": binary("PRelu", randn(2, 3, 4, 5), randn(3, 1, 1, seed=1)),
    "where_equal": (
        13,
        [node("Greater", ["x", "t"], ["c"]), node("Where", ["c", "x", "z"], ["y"])],
        {"x": randn(2, 3, 4)},
        {"t": np.float32(0.1), "z": randn(4, seed=1)},
    ),
    "sqrt": unary("Sqrt", POSITIVE),
    "exp": unary("Exp"),
    "log": unary("Log", POSITIVE),
    "neg": unary("Neg"),
    "abs": unary("Abs"),
    "floor": unary("Floor"),
    "ceil": unary("Ceil"),
    "reciprocal": unary("Reciprocal", POSITIVE),
    "relu": unary("Relu"),
    "leaky_relu": unary("LeakyRelu", alpha=0.2),
    "leaky_relu_default": unary("LeakyRelu"),
    "sigmoid": unary("Sigmoid"),
    "hard_sigmoid": unary("HardSigmoid", alpha=0.3, beta=0.4),
    "hard_swish": unary("HardSwish", randn(2, 3, 4, 5) * 4, opset=14),
    "tanh": unary("Tanh"),
    "erf": unary("Erf"),
    "elu": unary("Elu", alpha=0.5),
    "softplus": unary("Softplus"),
    "identity": unary("Identity"),
    "dropout": unary("Dropout"),
    "gelu_tanh": unary("Gelu", opset=20, approximate="tanh"),
    "clip_6": unary("Clip", opset=6, min=-0.5, max=0.7),
    "clip_13": (
        13,
        [node("Clip", ["x", "lo", "hi"], ["y"])],
        {"x": randn(2, 3, 4)},
        {"lo": np.float32(-0.3), "hi": np.float32(0.6)},
    ),
    "clip_13_max_only": (
        13,
        [node("Clip", ["x", "", "hi"], ["y"])],
        {"x": randn(2, 3, 4)},
        {"hi": np.float32(0.6)},
    ),
    "cast": unary("Cast", randn(2, 3) * 10, to=TensorProto.INT32),
    # ----------------------------------------------------------------------------- pooling
    "max_pool": pool("MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "max_pool_ceil": pool("MaxPool", kernel_shape=[3, 2], strides=[2, 3], ceil_mode=1),
    "max_pool_ceil_pads": pool(
        "MaxPool", (1, 2, 8, 9), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=1
    ),
    "max_pool_dilation": pool("MaxPool", kernel_shape=[2, 2], dilations=[2, 2], strides=[1, 2]),
    "max_pool_same_upper": pool(
        "MaxPool", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"
    ),
    "avg_pool": pool("AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "avg_pool_include_pad": pool(
        "AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1
    ),
    "avg_pool_ceil": pool("AveragePool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    "avg_pool_ceil_include_pad": pool(
        "AveragePool",
        (1, 2, 8, 9),
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 0, 0, 1],
        ceil_mode=1,
        count_include_pad=1,
    ),
    "avg_pool_same_lower": pool(
        "AveragePool", kernel_shape=[2, 3], strides=[2, 2], auto_pad="SAME_LOWER"
    ),
    "global_avg_pool": pool("GlobalAveragePool"),
    "global_max_pool": pool("GlobalMaxPool"),
    # -------------------------------------------------------------------------- reductions
    "reduce_mean_13": unary("ReduceMean", axes=[2, 3], keepdims=1),
    "reduce_mean_18": (
        18,
        [node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)],
        {"x": randn(2, 3, 4, 5)},
        {"axes": np.array([1, -1], I64)},
    ),
    "reduce_max": unary("ReduceMax", axes=[1], keepdims=0),
    "reduce_sum_13": (
        13,
        [node("ReduceSum", ["x", "axes"], ["y"])],
        {"x": randn(2, 3, 4, 5)},
        {"axes": np.array([2], I64)},
    ),
    "argmax": unary("ArgMax", axis=1, keepdims=0),
    # ------------------------------------------------------------------------------ shapes
    "concat": (
        13,
        [node("Concat", ["a", "b"], ["y"], axis=-1)],
        {"a": randn(2, 3, 4)},
        {"b": randn(2, 3, 2)},
    ),
    "split_11": (
        11,
        [node("Split", ["x"], ["y1", "y2"], axis=1, split=[1, 2])],
        {"x": randn(2, 3, 4)},
        {},
    ),
    "split_13": (
        13,
        [node("Split", ["x", "s"], ["y1", "y2"], axis=2)],
        {"x": randn(2, 3, 5)},
        {"s": np.array([3, 2], I64)},
    ),
    "split_13_equal": (13, [node("Split", ["x"], ["y1", "y2"], axis=2)], {"x": randn(2, 3, 4)}, {}),
    "split_18_num_outputs": (
        18,
        [node("Split", ["x"], ["y1", "y2", "y3"], axis=2, num_outputs=3)],
        {"x": randn(2, 3, 7)},
        {},
    ),
    "slice_9": unary("Slice", opset=9, starts=[1, 0], ends=[3, -1], axes=[1, 3]),
    "slice_13": (
        13,
        [node("Slice", ["x", "s", "e", "a", "st"], ["y"])],
        {"x": randn(2, 3, 6, 7)},
        {
            "s": np.array([-1, 1], I64),
            "e": np.array([-(2**63) + 1, 2**63 - 1], I64),
            "a": np.array([2, 3], I64),
            "st": np.array([-2, 3], I64),
        },
    ),
    "gather_scalar": (
        13,
        [node("Gather", ["x", "i"], ["y"], axis=1)],
        {"x": randn(2, 3, 4)},
        {"i": np.array(-1, I64)},
    ),
    "gather_indices": (
        13,
        [node("Gather", ["x", "i"], ["y"], axis=2)],
        {"x": randn(2, 3, 4)},
        {"i": np.array([[0, 3], [-2, 1]], I64)},
    ),
    "reshape": (
        13,
        [node("Reshape", ["x", "s"], ["y"])],
        {"x": randn(2, 3, 4)},
        {"s": np.array([0, -1, 2], I64)},
    ),
    "flatten": unary("Flatten", axis=2),
    "transpose": unary("Transpose", perm=[0, 2, 3, 1]),
    "squeeze_11": unary("Squeeze", randn(2, 1, 3, 1), opset=11, axes=[1, -1]),
    "squeeze_13": (
        13,
        [node("Squeeze", ["x", "a"], ["y"])],
        {"x": randn(2, 1, 3, 1)},
        {"a": np.array([3], I64)},
    ),
    "unsqueeze_11": unary("Unsqueeze", randn(2, 3), opset=11, axes=[0, -1]),
    "unsqueeze_13": (
        13,
        [node("Unsqueeze", ["x", "a"], ["y"])],
        {"x": randn(2, 3)},
        {"a": np.array([1, 3], I64)},
    ),
    "tile": (
        13,
        [node("Tile", ["x", "r"], ["y"])],
        {"x": randn(2, 3)},
        {"r": np.array([2, 1], I64)},
    ),
    # --------------------------------------------------------------- shape subgraph folding
    "shape_subgraph": (
        15,
        [
            node("Shape", ["x"], ["s"]),
            const("i0", np.array(0, I64)),
            node("Gather", ["s", "i0"], ["n"], axis=0),
            node("Unsqueeze", ["n", "ax"], ["n1"]),
            const("rest", np.array([-1], I64)),
            node("Concat", ["n1", "rest"], ["shape"], axis=0),
            node("Reshape", ["x", "shape"], ["y"]),
            node("Shape", ["y"], ["ys"], start=1),
            node(
                "ConstantOfShape",
                ["ys"],
                ["ones"],
                value=numpy_helper.from_array(np.array([2.0], np.float32)),
            ),
            node("Add", ["y", "ones"], ["z"]),
            const("start", np.array(0, I64)),
            const("step", np.array(1, I64)),
            node("Gather", ["ys", "i0"], ["len"], axis=0),
            node("Range", ["start", "len", "step"], ["r"]),
            node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
            node("Expand", ["rf", "s2"], ["e"]),
            node("Mul", ["z", "e"], ["w"]),
            node("Size", ["w"], ["size"]),
        ],
        {"x": randn(2, 3, 4)},
        {"ax": np.array([0], I64), "s2": np.array([2, 1], I64)},
    ),
    # ---------------------------------------------------------------------------- padding
    "pad_2_attrs": unary("Pad", opset=2, pads=[0, 0, 1, 2, 0, 0, 2, 1], value=1.5),
    "pad_13_constant": (
        13,
        [node("Pad", ["x", "p", "v"], ["y"])],
        {"x": randn(2, 3, 4, 5)},
        {"p": np.array([0, 1, 2, 0, 0, 0, 1, -1], I64), "v": np.float32(-2.0)},
    ),
    "pad_13_reflect": (
        13,
        [node("Pad", ["x", "p"], ["y"], mode="reflect")],
        {"x": randn(2, 3, 4, 5)},
        {"p": np.array([0, 0, 2, 3, 0, 0, 1, 2], I64)},
    ),
    "pad_13_edge": (
        13,
        [node("Pad", ["x", "p"], ["y"], mode="edge")],
        {"x": randn(2, 3, 4, 5)},
        {"p": np.array([0, 0, 2, 3, 0, 0, 1, 2], I64)},
    ),
    "pad_19_wrap_axes": (
        19,
        [node("Pad", ["x", "p", "", "a"], ["y"], mode="wrap")],
        {"x": randn(2, 3, 4, 5)},
        {"p": np.array([1, 2, 2, 1], I64), "a": np.array([2, 3], I64)},
    ),
    # ----------------------------------------------------------------------------- resize
    "resize_10_nearest": (
        10,
        [node("Resize", ["x", "s"], ["y"], mode="nearest")],
        {"x": randn(1, 2, 3, 4)},
        {"s": np.array([1, 1, 2, 3], np.float32)},
    ),
    "resize_13_nearest_asymmetric_floor": (
        13,
        [
            node(
                "Resize",
                ["x", "", "s"],
                ["y"],
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
            )
        ],
        {"x": randn(1, 2, 3, 4)},
        {"s": np.array([1, 1, 2, 2], np.float32)},
    ),
    "resize_13_nearest_half_pixel": (
        13,
        [node("Resize", ["x", "", "s"], ["y"], mode="nearest")],
        {"x": randn(1, 2, 5, 4)},
        {"s": np.array([1, 1, 1.5, 0.5], np.float32)},
    ),
    "resize_13_linear_half_pixel": (
        13,
        [node("Resize", ["x", "", "s"], ["y"], mode="linear")],
        {"x": randn(1, 2, 5, 4)},
        {"s": np.array([1, 1, 2.0, 1.5], np.float32)},
    ),
    "resize_13_linear_align_corners_sizes": (
        13,
        [
            node(
                "Resize",
                ["x", "", "", "sz"],
                ["y"],
                mode="linear",
                coordinate_transformation_mode="align_corners",
            )
        ],
        {"x": randn(1, 2, 5, 4)},
        {"sz": np.array([1, 2, 9, 7], I64)},
    ),
    "resize_13_linear_pytorch_half_pixel_down": (
        13,
        [
            node(
                "Resize",
                ["x", "", "s"],
                ["y"],
                mode="linear",
                coordinate_transformation_mode="pytorch_half_pixel",
            )
        ],
        {"x": randn(1, 2, 8, 6)},
        {"s": np.array([1, 1, 0.5, 0.5], np.float32)},
    ),
    "resize_11_linear_asymmetric": (
        11,
        [
            node(
                "Resize",
                ["x", "roi", "s"],
                ["y"],
                mode="linear",
                coordinate_transformation_mode="asymmetric",
            )
        ],
        {"x": randn(1, 2, 3, 4)},
        {"roi": np.zeros(0, np.float32), "s": np.array([1, 1, 2, 2.5], np.float32)},
    ),
    "upsample_7_nearest_attr": unary(
        "Upsample", randn(1, 2, 3, 4), opset=7, mode="nearest", scales=[1.0, 1.0, 2.0, 3.0]
    ),
    "upsample_9_nearest": (
        9,
        [node("Upsample", ["x", "s"], ["y"], mode="nearest")],
        {"x": randn(1, 2, 3, 4)},
        {"s": np.array([1, 1, 2, 3], np.float32)},
    ),
    "lrn": unary("LRN", randn(2, 7, 4, 5), size=5, alpha=1e-2, beta=0.75, bias=2.0),
    "lrn_defaults": unary("LRN", randn(1, 6, 3, 3), size=3),
    "upsample_9_linear": (
        9,
        [node("Upsample", ["x", "s"], ["y"], mode="linear")],
        {"x": randn(1, 2, 3, 4)},
        {"s": np.array([1, 1, 2, 2], np.float32)},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_onnxruntime(name):
    opset, nodes, inputs, inits = CASES[name]
    outputs = [o for n in nodes for o in n.output]
    model = make_model(nodes, inputs, outputs, inits, opset=opset)
    check_against_ort(model, inputs)


def test_only_graph_outputs_are_returned():
    nodes = [node("Relu", ["x"], ["r"]), node("Neg", ["r"], ["y"])]
    model = make_model(nodes, {"x": randn(2, 3)}, ["y"])
    imported = check_against_ort(model, {"x": randn(2, 3)})
    assert imported.output_names == ("y",)
    assert imported.output_shapes == ((2, 3),)


def test_params_are_float_initializers_keyed_by_node_and_slot():
    opset, nodes, inputs, inits = CASES["gemm"]
    model = make_model(nodes, inputs, ["y"], inits, opset=opset)
    imported = check_against_ort(model, inputs)
    assert sorted(imported.params) == ["Gemm_0"]
    assert sorted(imported.params["Gemm_0"]) == ["B", "C"]
    np.testing.assert_array_equal(imported.params["Gemm_0"]["B"], inits["b"])
