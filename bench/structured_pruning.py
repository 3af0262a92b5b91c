"""Structured pruning at a parameter budget: the paper's LLM-Pruner row, through torch-pruning.

LLM-Pruner's block-wise recipe, as the paper compares against it: inside a window of blocks (LLaMA-7B's
layers 4..30 of 32, scaled to the model's depth) remove whole attention heads and whole MLP channels with
the same share in every block, ranked by first-order Taylor importance (|w * dL/dw| of the language-model
loss on the calibration windows, summed over every weight the head or channel owns); the embedding, the
head, the norms and the blocks outside the window stay as they are. The parameter count is matched to
llmrom's: the kept fraction is at most `budget`, as close to it as whole channels allow.

Grouped-query attention keeps its key/value heads: query heads are removed in equal numbers from every
key/value group (a head owns its rows of q_proj and its columns of o_proj), so each block still repeats
its key/value heads the same number of times, which the attention module reads from its
`num_key_value_groups`. An MLP channel owns its rows of gate_proj and up_proj and its column of down_proj.
torch-pruning's pruning functions do the surgery (weights, biases, in/out features); the groups come from
llmrom's layout because torch-pruning's dependency graph, traced through transformers' attention, does
not finish grouping one q_proj of SmolLM2 in ten minutes (measured) and has no notion of GQA groups.

The result differs in width from block to block, so it lives in memory (scored by bench/zeroshot.py), not
as a transformers folder.
"""

import math

import torch
import torch_pruning as tp
from tqdm.auto import tqdm

from llmrom.errors import LlmromError
from llmrom.eval.cost import count_params
from llmrom.modeling.arch import layout_for

NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def window(n_blocks):
    """LLM-Pruner's LLaMA-7B window (blocks 4 to 30 of 32) scaled to `n_blocks`: [start, end)."""
    return round(4 * n_blocks / 32), n_blocks - round(2 * n_blocks / 32)


def _blocks(model):
    layout = layout_for(model)
    blocks = model.get_submodule(layout.blocks_path)
    present = {n for n, _ in blocks[0].named_modules()}
    if not layout.known or any(n not in present for n in NAMES):
        raise LlmromError(f"structured pruning handles LLaMA-like blocks ({', '.join(NAMES)}); "
                          f"{model.config.model_type!r} is not one")
    return blocks


def taylor_gradients(model, windows, batch_size=8, progress=True):
    """Sum over `windows` of dLoss/dW for the window's linears (name -> tensor); the model is left frozen."""
    blocks = _blocks(model)
    start, end = window(len(blocks))
    linears = {f"{i}.{n}": blocks[i].get_submodule(n) for i in range(start, end) for n in NAMES}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in linears.values():
        m.weight.requires_grad_(True)
        m.weight.grad = None
    with torch.enable_grad():
        for i in tqdm(range(0, len(windows), batch_size), desc="Taylor importance", disable=not progress):
            ids = windows[i:i + batch_size]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise LlmromError("non-finite calibration loss while ranking heads and channels")
            (loss * len(ids) / len(windows)).backward()
    grads = {k: m.weight.grad.detach() for k, m in linears.items()}
    for m in linears.values():
        m.weight.grad = None
        m.weight.requires_grad_(False)
    return grads


def _owned(block, grads, prefix, heads, head_dim):
    """Importance per query head and per MLP channel of one block: sums of |w * g| over what each owns."""
    def imp(name):
        return (block.get_submodule(name).weight.detach() * grads[f"{prefix}.{name}"]).abs()
    q, o = imp("self_attn.q_proj"), imp("self_attn.o_proj")
    per_head = q.sum(1).view(heads, head_dim).sum(1) + o.sum(0).view(heads, head_dim).sum(1)
    per_channel = imp("mlp.gate_proj").sum(1) + imp("mlp.up_proj").sum(1) + imp("mlp.down_proj").sum(0)
    return per_head, per_channel


def _shares(block, heads, kv_heads, head_dim, remove):
    """(query heads removed per key/value group, MLP channels removed) in one block so that at least
    `remove` parameters go, heads and channels cut by about the same share as LLM-Pruner does."""
    q, gate, up = block.self_attn.q_proj, block.mlp.gate_proj, block.mlp.up_proj
    per_head = head_dim * q.in_features * 2 + (head_dim if q.bias is not None else 0)  # q rows (+ bias), o columns
    per_channel = 3 * q.in_features + (gate.bias is not None) + (up.bias is not None)
    group = heads // kv_heads
    total = heads * per_head + gate.out_features * per_channel
    per_group = min(group - 1, round(remove / total * group))
    channels = math.ceil(max(0, remove - per_group * kv_heads * per_head) / per_channel)
    if channels >= gate.out_features:
        raise LlmromError(f"the budget cannot be reached by pruning the window's heads and channels "
                          f"({remove} parameters per block asked, {total} there)")
    return per_group, channels


def prune(model, budget, grads):
    """Prune `model` in place to at most `budget` of its parameters; returns the record of what went."""
    blocks = _blocks(model)
    start, end = window(len(blocks))
    before = count_params(model)
    remove = before - math.floor(budget * before)
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    per_block = math.ceil(remove / (end - start))
    record = {"method": "structured pruning (LLM-Pruner block-wise, first-order Taylor)",
              "window": [start, end], "parameters_before": before, "blocks": []}
    group = heads // kv_heads
    head_dims = {i: blocks[i].self_attn.q_proj.out_features // heads for i in range(start, end)}
    # every block's share first: an unreachable budget is refused before any block is cut
    shares = {i: _shares(blocks[i], heads, kv_heads, head_dims[i], per_block) for i in range(start, end)}
    for i in range(start, end):
        block, attn, head_dim, (per_group, channels) = blocks[i], blocks[i].self_attn, head_dims[i], shares[i]
        per_head, per_channel = _owned(block, grads, i, heads, head_dim)
        drop_heads = [g * group + int(h) for g in range(kv_heads)
                      for h in torch.argsort(per_head.view(kv_heads, group)[g])[:per_group]]
        rows = [h * head_dim + j for h in sorted(drop_heads) for j in range(head_dim)]
        drop_channels = sorted(int(c) for c in torch.argsort(per_channel)[:channels])
        if rows:
            tp.prune_linear_out_channels(attn.q_proj, rows)
            tp.prune_linear_in_channels(attn.o_proj, rows)
        tp.prune_linear_out_channels(block.mlp.gate_proj, drop_channels)
        tp.prune_linear_out_channels(block.mlp.up_proj, drop_channels)
        tp.prune_linear_in_channels(block.mlp.down_proj, drop_channels)
        attn.num_key_value_groups = group - per_group  # the attention forward repeats k/v by this
        if hasattr(attn, "num_heads"):
            attn.num_heads = heads - per_group * kv_heads
        record["blocks"].append({"block": i, "query_heads": sorted(drop_heads), "channels": drop_channels})
    for p in model.parameters():  # torch-pruning makes new Parameters, which require gradients
        p.requires_grad_(False)
    record["parameters_after"] = count_params(model)
    record["kept_fraction"] = record["parameters_after"] / before
    if record["kept_fraction"] > budget:
        raise AssertionError(f"pruning kept {record['kept_fraction']:.4f} > budget {budget}")
    return record


def pruned_linears(model, record):
    """Names of the linears pruning changed (what the recovery fine-tune trains, as llmrom heal does factors)."""
    path = layout_for(model).blocks_path
    return [f"{path}.{b['block']}.{n}" for b in record["blocks"] for n in NAMES
            if n not in ("self_attn.k_proj", "self_attn.v_proj") and (b["query_heads"] or "mlp" in n)]
