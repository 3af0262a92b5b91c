"""Other forms of a compressed model: weight-only quantization of its linears (torchao).
May import: errors, modeling."""
