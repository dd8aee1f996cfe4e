"""What a variant executes: the operator types it runs, and which of them do integer arithmetic.

A variant's name is a promise: one named int8 that runs no integer operator is refused rather than
timed and tabled. ONNX variants are read as ONNX Runtime will run them, after its graph
optimisations (which fuse QuantizeLinear/DequantizeLinear pairs into integer kernels); torch
variants by the modules their network holds.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

from torch import nn

from forgeml.compression.variants import Variant
from forgeml.errors import ForgeError

# ONNX Runtime's CPU kernels that multiply integers (standard and com.microsoft contrib ops).
INTEGER_ONNX_OPS = {
    "MatMulInteger",
    "ConvInteger",
    "QLinearMatMul",
    "QLinearConv",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QAttention",
    "DynamicQuantizeLSTM",
}
BLOCKWISE = "MatMulNBits"  # block-wise quantised weights; integer arithmetic only with int8 compute
INT8_COMPUTE = 4  # MatMulNBits' accuracy_level for int8 activations


def onnx_operators(model_path: Path) -> Counter[str]:
    """Operator types of the graph ONNX Runtime runs for ``model_path`` (after its fusions);
    block-wise MatMulNBits is named with its compute precision."""
    import onnx

    from forgeml.compression.onnx import session

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(model_path, threads=1, optimized_to=optimized)
        graph = onnx.load(str(optimized), load_external_data=False).graph
    found: Counter[str] = Counter()
    for node in graph.node:
        name = node.op_type
        if name == BLOCKWISE:
            level = next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
            name = f"{BLOCKWISE} (int8 compute)" if level == INT8_COMPUTE else f"{BLOCKWISE} (float compute)"
        found[name] += 1
    return found


def torch_operators(network: nn.Module) -> Counter[str]:
    """The modules that compute, by type: leaves, and quantised modules as a whole (their packed
    weights are storage, not a computation of their own)."""
    found: Counter[str] = Counter()

    def walk(module: nn.Module) -> None:
        kind = type(module)
        package = kind.__module__.split(".modules")[0].removeprefix("torch.ao.nn.").removeprefix("torch.")
        if package.startswith("quantized") or next(module.children(), None) is None:
            found[f"{package}.{kind.__name__}"] += 1
            return
        for child in module.children():
            walk(child)

    walk(network)
    return found


def is_integer(operator: str) -> bool:
    return operator in INTEGER_ONNX_OPS or operator == f"{BLOCKWISE} (int8 compute)" or operator.startswith("quantized")


def operators(variant: Variant) -> dict[str, int]:
    """What ``variant`` executes, most frequent first."""
    if variant.backend == "onnxruntime":
        found = onnx_operators(variant.folder / variant.weights[0])
    else:
        found = torch_operators(variant.family.network)
    return dict(found.most_common())


def integer_operators(ops: dict[str, int]) -> dict[str, int]:
    return {name: count for name, count in ops.items() if is_integer(name)}


def check_promise(name: str, ops: dict[str, int]) -> None:
    """A variant named int8 must run integer arithmetic."""
    if "int8" in name and not integer_operators(ops):
        shown = ", ".join(f"{op} x{count}" for op, count in list(ops.items())[:6])
        raise ForgeError(
            f"compress: variant {name} is named int8 but runs no integer arithmetic (it runs {shown}); "
            "its quantiser did not produce integer kernels for this model, so it is not offered; "
            "leave it out of compress.methods or report the model"
        )
