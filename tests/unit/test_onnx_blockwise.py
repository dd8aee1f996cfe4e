"""Which matrices the ONNX dynamic int8 variant quantises block-wise, on a hand-built graph."""

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from forgeml.compression.onnx import blockwise, fragile_matmuls


def two_products(path) -> None:
    """x @ even @ outlier: the second matrix holds one weight 200 times the others' size."""
    rng = np.random.default_rng(0)
    even = rng.normal(0, 0.05, (64, 64)).astype(np.float32)
    outlier = rng.normal(0, 0.05, (64, 64)).astype(np.float32)
    outlier[3, 5] = 10.0
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "even"], ["h"], "even"),
            helper.make_node("MatMul", ["h", "outlier"], ["y"], "outlier"),
        ],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(even, "even"), numpy_helper.from_array(outlier, "outlier")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(onnx.shape_inference.infer_shapes(model), str(path))


def test_only_the_matrix_int8_harms_is_chosen_and_block_wise_stays_close(tmp_path):
    two_products(tmp_path / "two.onnx")
    calibration = [{"x": torch.randn(8, 64, generator=torch.Generator().manual_seed(i))} for i in range(4)]
    assert fragile_matmuls(tmp_path / "two.onnx", calibration, 0.1) == ["outlier"]
    assert fragile_matmuls(tmp_path / "two.onnx", calibration, 1e-6) == ["even", "outlier"]

    blockwise(tmp_path / "two.onnx", ["outlier"], tmp_path / "mixed.onnx")
    ops = [node.op_type for node in onnx.load(str(tmp_path / "mixed.onnx")).graph.node]
    assert sorted(ops) == ["MatMul", "MatMulNBits"]
    x = calibration[0]["x"].numpy()
    exact = ort.InferenceSession(str(tmp_path / "two.onnx")).run(None, {"x": x})[0]
    mixed = ort.InferenceSession(str(tmp_path / "mixed.onnx")).run(None, {"x": x})[0]
    assert np.linalg.norm(mixed - exact) / np.linalg.norm(exact) < 0.05
