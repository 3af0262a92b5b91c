"""Other forms of a compressed model: weight-only quantization of its linears (torchao), and an ONNX export
run in ONNX Runtime, quantized there by ONNX Runtime's own quantizer.
May import: errors, modeling."""
