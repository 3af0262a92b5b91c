"""Weight-only quantization of an ONNX export by ONNX Runtime's own quantizer (MatMulNBits).

Every matrix product with a constant weight (both factors of a compressed linear, the linears kept
dense, the output layer) becomes a `MatMulNBits` node: 4 or 8 bits per weight packed in bytes, one
scale per block of `block_size` inputs, run by ONNX Runtime's CPU kernels without unpacking the
model. At 4 bits the token-embedding lookup becomes `GatherBlockQuantized` with the same blocks
(ONNX Runtime quantizes lookups to 4 bits only: at 8 bits the table stays in float). Two algorithms,
both calibration-free: round-to-nearest (`rtn`, symmetric) and HQQ (`hqq`, 4 bits, asymmetric with
optimized float zero points; ONNX Runtime applies it to products only, so the lookup table gets rtn).

A tied output layer reads the embedding table through a transpose, and the quantizer takes only
constant weights: at 4 bits that transpose is stored as a weight of its own first (one 4-bit copy for
the lookup, one for the product, together smaller than the float table they replace); at 8 bits the
float table stays shared and the output layer stays in float.

Measured on SmolLM2 (docs/quantization.md): the dense model keeps its quality at 8 and 4 bits; llmrom's
factors lose 5-8% perplexity at 8 bits and collapse at 4.
"""

import logging
from pathlib import Path

from ..errors import LlmromError

SCHEMES = {"int4": 4, "int8": 8}
ALGORITHMS = ("rtn", "hqq")
GRAPH = "model.onnx"


def check_quantize(scheme, algorithm="rtn", block_size=32):
    """One line for a scheme, algorithm or block size that cannot work, before anything is exported."""
    if scheme not in ("none", *SCHEMES):
        raise LlmromError(f"--quantize must be none, int4 or int8, got {scheme!r}")
    if algorithm not in ALGORITHMS:
        raise LlmromError(f"--quant-algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 \
            or block_size & (block_size - 1):
        raise LlmromError(f"--block-size must be a power of two, at least 16 (ONNX Runtime's MatMulNBits), "
                          f"got {block_size!r}")
    if algorithm == "hqq" and scheme == "int8":
        raise LlmromError("--quant-algorithm hqq quantizes to 4 bits only in ONNX Runtime; use --quantize int4 "
                          "or --quant-algorithm rtn")


def untie_transposed_weights(model):
    """Replace each Transpose of a constant 2-D weight by the transposed weight itself (in place)."""
    from onnx import numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        source = weights.get(node.input[0]) if node.op_type == "Transpose" and node.input else None
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if source is None or len(source.dims) != 2 or perm not in ([], [[1, 0]]):
            keep.append(node)
            continue
        graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(source).T.copy(), node.output[0]))
    if len(keep) < len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    return model


def quantize_export(folder, scheme, algorithm="rtn", block_size=32):
    """Quantize the export in `folder` (its GRAPH and weights file) in place; returns what was done."""
    check_quantize(scheme, algorithm, block_size)
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    path = Path(folder) / GRAPH
    bits = SCHEMES[scheme]
    model = onnx.load(str(path))
    if bits == 4:  # ONNX Runtime quantizes a lookup to 4 bits only; at 8 bits the float table stays, shared
        model = untie_transposed_weights(model)
    configs, rtn_ops = [], ("MatMul", "Gather") if bits == 4 else ("MatMul",)
    if algorithm == "hqq":
        configs.append(HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=("MatMul",)))
        rtn_ops = ("Gather",)
    configs.append(DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits,
                                                accuracy_level=4, op_types_to_quantize=rtn_ops))
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, quiet.level = quiet.level, logging.CRITICAL  # a line per node otherwise
    try:
        for config in configs:
            quantizer = MatMulNBitsQuantizer(model, algo_config=config)
            quantizer.process()
            model = quantizer.model.model
    finally:
        quiet.level = level
    for f in path.parent.glob(GRAPH + "*"):
        f.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=GRAPH + ".data", size_threshold=1024)
    counts = {}
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"scheme": scheme, "bits": bits, "algorithm": algorithm, "block_size": block_size, "nodes": counts,
            "library": "onnxruntime.quantization.matmul_nbits_quantizer"}
