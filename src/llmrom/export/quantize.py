"""Weight-only quantization of a compressed model's linears through torchao, saved so that transformers'
own TorchAoConfig loads it (with or without llmrom installed).

After the low-rank step every nn.Linear (the factors `first` and `second`, the linears kept dense, a
factorized head's `down`) gets int8 weights with one scale per output row, or per group of
`group_size` inputs (torchao's Int8WeightOnlyConfig). The token embedding table and the output layer
stay in the saved float dtype: transformers keeps them out of quantization by default, and a tied
table is the same tensor as the lookup. Quantization comes after the cast to the saved dtype, so the
scales are stored in it too.

int4 is refused here on purpose: torchao's CPU int4 weight-only form (IntxWeightOnlyConfig) stores each
int4 value unpacked in an int8, so it is no smaller on disk than int8, and its packed int4 forms run
only on CUDA (tinygemm / mslk kernels). docs/quantization.md has the measurements and the alternative.
"""

import torch
from torch import nn

from ..errors import LlmromError

SCHEMES = ("none", "int8")


def check_scheme(scheme, group_size):
    """One line for a scheme or group size that cannot work, before any compression runs."""
    if scheme == "int4":
        raise LlmromError("--quantize int4 is not offered: torchao's CPU int4 stores each value in a full byte "
                          "(no smaller than int8) and its packed int4 kernels need CUDA; use --quantize int8")
    if scheme not in SCHEMES:
        raise LlmromError(f"--quantize must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size < 1):
        raise LlmromError(f"--quant-group-size must be a positive integer (or unset: one scale per row), "
                          f"got {group_size!r}")
    if scheme != "none":
        torchao_config(scheme, group_size)  # the library is there


def torchao_config(scheme, group_size=None):
    try:
        from torchao.quantization import Int8WeightOnlyConfig, PerGroup, PerRow
    except ImportError as e:
        raise LlmromError(f"--quantize {scheme} needs torchao ({e}); pip install 'llmrom[quant]'") from None
    return Int8WeightOnlyConfig(granularity=PerRow() if group_size is None else PerGroup(group_size))


def quantizable(model, group_size=None):
    """Names of the linears that get quantized: every nn.Linear but the output layer, whose inputs a
    group size divides (the others stay in float; a group size that fits none is refused)."""
    head = model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    if group_size is None:
        return names
    fits = [n for n in names if model.get_submodule(n).in_features % group_size == 0]
    if not fits:
        raise LlmromError(f"--quant-group-size {group_size} divides the inputs of none of the linears; choose a "
                          "divisor of the ranks and widths (e.g. 32) or leave it unset (one scale per row)")
    return fits


def quantize(model, scheme, group_size=None, dtype=None):
    """Quantize `model`'s linears in place (after casting it to `dtype`, a torch dtype, if given) and set
    `config.quantization_config` so that `from_pretrained` restores them; returns the quantized names."""
    check_scheme(scheme, group_size)
    if scheme == "none":
        return []
    from torchao.quantization import quantize_
    from transformers import TorchAoConfig
    if dtype is not None:  # parameters only: buffers such as rotary tables stay as loading leaves them (float32)
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    names = set(quantizable(model, group_size))
    config = torchao_config(scheme, group_size)
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
    skipped = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in names]
    # the exact list, even empty: given None, transformers would skip its own defaults (tied, last, head)
    model.config.quantization_config = TorchAoConfig(quant_type=config, modules_to_not_convert=skipped)
    return sorted(names)
