"""The factorized linear layer and the class factory that puts it into a Hugging Face model.

This file is deliberately self-contained (it imports only torch): `llmrom.save` copies its source
into every saved folder as the `trust_remote_code` modeling file, so a compressed model loads with
plain `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` where llmrom is not
installed. Keep it free of llmrom imports.

Metadata lives in `config.llmrom`:
    {"format_version": 1, "method": "rom", "base_architecture": "LlamaForCausalLM",
     "modules": {"model.layers.29.mlp.down_proj": {"rank": 123, "bias": false}, ...}}
"""

import torch
from torch import nn

FORMAT_VERSION = 1


class FactorizedLinear(nn.Module):
    """y = second(first(x)): `first` (rank x in) is V_r^T W, `second` (out x rank) is V_r.

    `second` carries the bias: the original bias plus, for centred PCA, the restored mean.
    """

    def __init__(self, in_features, out_features, rank, bias, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x):
        return self.second(self.first(x))

    @property
    def weight(self):
        """The merged (out x in) weight; for code that inspects `.weight` (e.g. dtype checks)."""
        return self.second.weight @ self.first.weight

    @property
    def bias(self):
        return self.second.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def replace_module(root, dotted_name, new_module):
    """setattr on the parent of `dotted_name` (PEFT-style replacement by name)."""
    parent_name, _, child = dotted_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new_module)


def apply_factorization(model, meta, dtype=None, device=None):
    """Swap every module named in `meta["modules"]` for an empty FactorizedLinear of its rank."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"llmrom format_version {meta.get('format_version')} is not {FORMAT_VERSION}; "
            "upgrade llmrom to read this folder"
        )
    for name, spec in meta["modules"].items():
        old = model.get_submodule(name)
        out_f, in_f = _linear_shape(old)
        w = old.weight
        new = FactorizedLinear(
            in_f, out_f, spec["rank"], spec["bias"],
            dtype=dtype or w.dtype, device=device if device is not None else w.device,
        )
        replace_module(model, name, new)
    return model


def _linear_shape(module):
    """(out_features, in_features) of nn.Linear or GPT-2 style Conv1D (weight stored in x out)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D":
        return module.nf, module.weight.shape[0]
    raise TypeError(f"cannot factorize {type(module).__name__}: not a linear layer")


def make_factorized_class(base):
    """A subclass of the original architecture class that builds factorized modules in __init__,
    so `from_pretrained` handles dtype, sharding, tied weights and buffers as for any model."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_factorization(self, config.llmrom)

    return type(f"Llmrom{base.__name__}", (base,), {"__init__": __init__})
