"""Capture the inputs of the decoder blocks and replay single blocks.

A block is called by its model with the hidden states plus positional and keyword arguments that
may differ per block (Gemma 3 passes sliding or global masks and rotary tables by layer type). We
record every block's full call once per micro-batch size by swapping each block's forward for a
recorder that returns its input unchanged, so only the embeddings run. The arguments depend on the
batch shape, never on token values (no padding is used), so one record serves all micro-batches.
"""

from dataclasses import dataclass

import torch

from ..errors import LlmromError


class StopForward(Exception):
    """Raised by a hook or recorder to end a forward pass early."""


@dataclass
class BlockCall:
    args: tuple  # positional arguments after the hidden states
    kwargs: dict


def run_patched(model, blocks, make_forward, input_ids):
    """Run the model with each block's forward replaced by make_forward(i) (an instance attribute,
    removed afterwards); its output, or None where a replacement raised StopForward."""
    try:
        for i, b in enumerate(blocks):
            b.forward = make_forward(i)
        with torch.no_grad():
            return model(input_ids=input_ids, use_cache=False)
    except StopForward:
        return None
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)


def record_calls(model, blocks, input_ids):
    """The BlockCall of every block for a batch shaped like `input_ids`."""
    calls = [None] * len(blocks)

    def make(i):
        def fwd(hidden, *args, **kwargs):
            calls[i] = BlockCall(args, _without_cache(kwargs))
            if i == len(blocks) - 1:
                raise StopForward
            return hidden
        return fwd

    run_patched(model, blocks, make, input_ids)
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing:
        raise LlmromError(f"blocks {missing} were never called by {type(model).__name__}.forward; "
                          "this architecture is not supported")
    return calls


def block0_input(model, blocks, input_ids):
    """The hidden states entering block 0 for `input_ids` (embeddings and anything before block 0)."""
    got = {}

    def make(i):
        def fwd(hidden, *args, **kwargs):
            got["h"] = hidden
            raise StopForward
        return fwd

    run_patched(model, blocks, make, input_ids)
    return got["h"]


def _without_cache(kwargs):
    return {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}


def run_block(block, hidden, call):
    """One block forward with its recorded arguments; returns the output hidden states tensor."""
    out = block(hidden, *call.args, **call.kwargs)
    if isinstance(out, tuple):  # older transformers: (hidden_states, ...); never index a bare tensor
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.shape != hidden.shape:
        raise LlmromError(f"{type(block).__name__} returned {type(out).__name__} "
                          f"{getattr(out, 'shape', '')}, not hidden states shaped {tuple(hidden.shape)}")
    return out


def to_device(obj, device):
    """Move tensors inside (nested) args/kwargs to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
