"""Where the decoder blocks and their linears are, and which linears share an input.

A spec is data only: the ordered groups of linears (names relative to a block) that read the same
input. Families are keyed by `config.model_type`; the decoder blocks are found from the model's own
`_no_split_modules`. An unknown architecture gets a generic spec: its groups are discovered by
tracing one block forward and grouping the linears that receive the very same input tensor, in
execution order (the contract tests check that the known specs equal what tracing finds).
"""

import logging
from dataclasses import dataclass

from torch import nn

from ..errors import LlmromError

log = logging.getLogger(__name__)

_LLAMA_LIKE = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_GPT2 = (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))

SPECS = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE, "gemma3": _LLAMA_LIKE, "gemma3_text": _LLAMA_LIKE,
    "gpt2": _GPT2,
}


# How a block's second half runs from the residual stream h after attention ("h_mid"): the name of
# the norm that reads h_mid, the MLP, and the norm after the MLP (or None); the block's output is
# h_mid + post(mlp(norm(h_mid))). The sequential loop re-runs only this half for the MLP's own
# statistics and the block's outputs once attention is final (pipeline); checked against the
# whole block on every block it is used in, and by the contract tests on every family.
_LLAMA_HALF = ("post_attention_layernorm", "mlp", None)
_GEMMA2_HALF = ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm")
MLP_HALVES = {
    "llama": _LLAMA_HALF, "mistral": _LLAMA_HALF, "qwen2": _LLAMA_HALF, "qwen3": _LLAMA_HALF, "gemma": _LLAMA_HALF,
    "gemma2": _GEMMA2_HALF, "gemma3": _GEMMA2_HALF, "gemma3_text": _GEMMA2_HALF,
    "gpt2": ("ln_2", "mlp", None),
}


def is_linear(module):
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_matrix(module):
    """The (d_out, d_in) weight of a Linear or of a GPT-2 Conv1D (which stores it transposed)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


def find_blocks(model):
    """(dotted path, ModuleList) of the decoder blocks, from the model's `_no_split_modules`."""
    block_types = set(getattr(model, "_no_split_modules", None) or ())
    candidates = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0
        and all(type(m).__name__ in block_types for m in mod)
    ]
    if not candidates:
        raise LlmromError(
            f"{type(model).__name__} is not supported: cannot find its decoder blocks (no ModuleList of "
            f"{sorted(block_types) or 'declared _no_split_modules'}); llmrom handles decoder-only causal LMs"
        )
    return max(candidates, key=lambda c: len(c[1]))


@dataclass(frozen=True)
class Layout:
    blocks_path: str
    groups: tuple  # tuple of tuples of names relative to a block; None until traced (generic)
    known: bool
    mlp_half: tuple | None = None  # MLP_HALVES entry of the family; None: always run the whole block


def layout_for(model):
    """The layout of a model; for unknown families, groups are traced later (`groups=None`)."""
    path, blocks = find_blocks(model)
    model_type = getattr(model.config, "model_type", None)
    groups = SPECS.get(model_type)
    if groups is not None:
        present = {n for n, m in blocks[0].named_modules() if is_linear(m)}
        missing = [n for g in groups for n in g if n not in present]
        if missing:
            raise LlmromError(f"model_type {model_type!r} has no {missing} in its blocks: the spec does not "
                              "fit this checkpoint; please report it")
        return Layout(path, groups, True, MLP_HALVES.get(model_type))
    log.warning("model_type %r is not one of the verified families %s: using a generic spec "
                "(groups traced from one forward pass)", model_type, sorted(SPECS))
    return Layout(path, None, False)


def trace_groups(block, run):
    """Group the block's linears by identity of their input tensor, in first-call order.

    `run()` performs one forward of `block`; linears called with the same input object share a group.
    """
    order, by_input, handles, alive = [], {}, [], []  # `alive` keeps ids from being reused

    def hook(name):
        def pre(_mod, args):
            key = id(args[0])
            alive.append(args[0])
            if key not in by_input:
                by_input[key] = []
                order.append(key)
            if name not in by_input[key]:
                by_input[key].append(name)
        return pre

    try:
        for name, mod in block.named_modules():
            if is_linear(mod):
                handles.append(mod.register_forward_pre_hook(hook(name)))
        run()
    finally:
        for h in handles:
            h.remove()
    return tuple(tuple(by_input[k]) for k in order)
