"""The automatic last-N choice for a model streamed from disk: every candidate scored in one pass over the blocks.

The in-memory proxy (plan.autoplan.ProjectionProxy) holds the whole dense model and runs it once per
candidate. A streamed model has one block in memory at a time, so `StreamedProxy` turns the loops around:
each block is read once, and while it is resident

1. the dense hidden states of the profile windows run through it, giving its linears' input moments and
   from them their top output eigenvectors (plan.autoplan.proxy_basis, the same basis as in memory);
2. every candidate plan that compresses this block runs its own hidden states of the held windows through
   it with its linears projected (plan.autoplan.projected); a candidate that has not reached its first
   compressed block still shares the dense trajectory, from which it branches when it does;
3. the dense held states run through it too, for the candidates that branch later.

After the last block, the model's own tail (final norm, head, any logit soft-capping) turns each candidate's
final states into the mean next-token loss on the held windows, exactly as mean_nll does in memory. Memory:
one block, its eigenbases, and one copy of the held windows' hidden states per candidate; compute: what the
in-memory proxy spends. Only blocks-only candidates are scored (a streamed run keeps the embedding dense),
so no trial compressions are needed (plan.autoplan: trials compare kinds of candidates).
"""

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..modeling.arch import trace_groups
from ..plan.autoplan import projected, proxy_basis
from .activations import MemoryStore
from .capture import run_patched
from .pipeline import _block_forward, _collect
from .checkpoint import capture, materialize, reading_outside_blocks, release


class StreamedProxy:
    """Calibration losses on `held` of the dense model and of each plan in `plans` ({name: rank}, blocks
    only), computed in one streamed pass; `loss(plan)` looks them up."""

    inputs = None  # the in-memory proxy's cached block inputs (none here)

    def __init__(self, model, layout, ckpt, ties, max_ranks, profile, held, plans, opts):
        blocks = model.get_submodule(layout.blocks_path)
        calls, prof, _ = capture(model, blocks, profile, opts, ckpt, ties)
        held_calls, dense, _ = capture(model, blocks, held, opts, ckpt, ties)
        calls.update(held_calls)  # keyed by micro-batch size: same sequence length, same call
        prof = MemoryStore(prof)
        keys = [frozenset(p.items()) for p in plans]
        states, failed, timings = {}, set(), {}
        for i in tqdm(range(len(blocks)), desc="planning (streamed)", unit="block", disable=not opts.progress):
            block, prefix = blocks[i], f"{layout.blocks_path}.{i}."
            materialize(block, prefix, ckpt, ties)
            home = next(block.parameters()).device
            block.to(opts.device)
            forward = _block_forward(block, calls, i, opts.device, timings)
            with torch.no_grad():
                groups = layout.groups or trace_groups(block, lambda: forward(prof[0]))
                moments = _collect(block, [g[0] for g in groups], prof, forward, stop=False, outputs=i)
                eig = {n: proxy_basis(block.get_submodule(n), moments[g[0]], max_ranks[prefix + n])[0]
                       for g in groups for n in g if prefix + n in max_ranks}
                del moments
                for key, plan in zip(keys, plans):
                    here = {name[len(prefix):]: r for name, r in plan.items() if name.startswith(prefix)}
                    if key in failed or (key not in states and not here):
                        continue  # failed, or still on the dense trajectory
                    with projected(block, here, eig):
                        out = [forward(h) for h in states.get(key, dense)]
                    if all(torch.isfinite(o).all() for o in out):
                        states[key] = out
                    else:
                        failed.add(key)
                        states.pop(key, None)
                dense = [forward(h) for h in dense]
            block.to(home)
            release(block)
        with reading_outside_blocks(model, blocks, ckpt, ties):
            self.dense_loss = _tail_loss(model, blocks, held, dense, opts)
            self._losses = {key: _tail_loss(model, blocks, held, states[key], opts) for key in states}
        self._losses.update({key: math.inf for key in failed})

    def loss(self, plan):
        return self._losses[frozenset(plan.items())] if plan else self.dense_loss


@torch.no_grad()
def _tail_loss(model, blocks, windows, finals, opts):
    """Mean next-token loss of `windows` (in micro-batches of opts.batch_size) when the last block outputs
    `finals` (one tensor per micro-batch): the model runs with every block passing its input through and the
    last one returning the final states, so its own tail (norm, head, soft-capping) makes the logits."""
    total, last = 0.0, len(blocks) - 1
    pairs = ((ids[k:k + 1], h[k:k + 1]) for ids, h in zip(windows.split(opts.batch_size), finals)
             for k in range(len(ids)))  # window by window: one window's logits at a time (vocab x seqlen)
    for ids, h in pairs:
        def final(hidden, *args, _h=h, **kwargs):
            return _h.to(device=hidden.device, dtype=hidden.dtype)
        logits = run_patched(model, blocks, lambda i: final if i == last else _passthrough, ids).logits.float()
        total += float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
    return total / (windows.numel() - len(windows)) if math.isfinite(total) else math.inf


def _passthrough(hidden, *args, **kwargs):
    return hidden
