"""The sequential block loop (GPTQ-style); `compress_block` is one step, shared with llmrom.stream.

capture block 0's inputs -> for each block: for each group of linears sharing an input, stream
that input's moments (the block's forward stops at the group, so finished parts are not re-run),
factorize the group's linears, swap them in -> run the compressed block to get the next block's
inputs. Only one copy of the calibration hidden states is kept; outputs overwrite inputs.
"""

import logging
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .activations import MemoryStore, activation_store, parse_dtype
from .arch import trace_groups, weight_matrix
from .capture import StopForward, block0_input, record_calls, run_block, to_device
from .errors import NonFiniteError
from .factorized import FactorizedLinear, replace_module
from .methods import METHODS
from .ranks import LinearShape
from .sparse import low_rank_plus_sparse
from .stats import Moments

log = logging.getLogger(__name__)


@dataclass
class ModuleRecord:
    name: str
    d_in: int
    d_out: int
    rank: int | None  # None: kept dense
    params_before: int
    params_after: int
    explained_variance: float | None
    relative_error: float | None
    seconds: float
    note: str = ""
    explained_curve: list | None = None  # explained variance at ranks CURVE_FRACTIONS * min(d_in, d_out)
    nnz: int = 0  # nonzeros of the sparse residual (params_after counts 2 each plus d_out + 1 row pointers)

    def to_dict(self):
        return asdict(self)


@dataclass(frozen=True)
class LoopOptions:
    method: str = "rom"
    centered: bool = True
    sequential: bool = True
    batch_size: int = 16
    device: str = "cpu"
    progress: bool = True
    activations: str = "cpu"  # where the hidden states live between blocks: cpu or disk
    activations_dtype: str | None = None  # their dtype; None: the model's
    sparse: float = 0.0  # fraction of each module's budget given to a sparse residual (llmrom.sparse)
    sparse_select: str = "entries"  # its support: entries or channels
    sparse_rounds: int = 3  # alternating rounds of factors and sparse part


def compress_blocks(model, layout, tokens, plan, opts, timings=None):
    """Compress in place the linears named in `plan` ({name: rank}); returns ModuleRecords."""
    blocks = model.get_submodule(layout.blocks_path)
    calls, hidden = prepare_inputs(model, blocks, tokens, opts)
    records, groups = [], layout.groups
    with activation_store(hidden, opts.activations, parse_dtype(opts.activations_dtype)) as store:
        for i in tqdm(range(len(blocks)), desc="blocks", unit="block", disable=not opts.progress):
            block = blocks[i]
            home = next(block.parameters()).device
            block.to(opts.device)
            done, groups = compress_block(block, f"{layout.blocks_path}.{i}.", i, groups, calls, store, plan, opts,
                                          timings)
            records += done
            store.end_block()
            block.to(home)
    return records


def compress_block(block, prefix, i, groups, calls, hidden, plan, opts, timings=None):
    """Compress block i (named `prefix`) in place and replace the hidden states by its outputs.

    `hidden` is an activation store (llmrom.activations); `groups` are the layout's groups, or None
    to trace them on this block. Returns (ModuleRecords, groups). `timings` (a dict) accumulates
    seconds of forward passes (hooks included), covariance updates and factorizations.
    """
    timings = {} if timings is None else timings
    forward = _block_forward(block, calls, i, opts.device, timings)
    if groups is None:
        groups = trace_groups(block, lambda: forward(hidden[0]))
        log.info("traced linear groups: %s", groups)
    todo = [[n for n in g if prefix + n in plan] for g in groups]
    records = []
    with torch.no_grad():
        if opts.sequential:
            for group in todo:
                if group:
                    moments = _collect(block, group[:1], hidden, forward, stop=True, timings=timings)[group[0]]
                    for n in group:
                        records.append(_compress_one(block, prefix, n, moments, plan, opts, timings))
        elif any(todo):
            wanted = [n for g in todo for n in g[:1]]
            shared = {n: g[0] for g in todo for n in g}
            moments = _collect(block, wanted, hidden, forward, stop=False, outputs=i, timings=timings)
            for n in shared:
                records.append(_compress_one(block, prefix, n, moments[shared[n]], plan, opts, timings))
        if opts.sequential or not any(todo):
            for j, h in enumerate(tqdm(hidden, desc=f"block {i} outputs", total=len(hidden), leave=False,
                                       disable=not opts.progress)):
                _store(hidden, j, forward(h), i)
    return records, groups


def prepare_inputs(model, blocks, tokens, opts):
    """Every block's call per micro-batch size, and the hidden states entering block 0."""
    batches = list(tokens.split(opts.batch_size))
    calls = {}
    for b in batches:
        if b.shape[0] not in calls:
            calls[b.shape[0]] = record_calls(model, blocks, b)
    return calls, [block0_input(model, blocks, b) for b in batches]


def _block_forward(block, calls, i, device, timings):
    """forward(h, stop_ok): block i on `device` with its recorded call; None if a hook stopped it.
    Stored hidden states (maybe bf16) are cast to the block's dtype."""
    dtype = next(block.parameters()).dtype
    block_calls = {k: type(c[i])(to_device(c[i].args, device), to_device(c[i].kwargs, device))
                   for k, c in calls.items()}

    def forward(h, stop_ok=False):
        t0 = time.perf_counter()
        try:
            return run_block(block, h.to(device=device, dtype=dtype), block_calls[h.shape[0]])
        except StopForward:
            if not stop_ok:
                raise
            return None
        finally:
            timings["forward"] = timings.get("forward", 0.0) + time.perf_counter() - t0
    return forward


def _collect(block, names, hidden, forward, stop, outputs=None, timings=None):
    """Moments of the inputs of the named linears over all micro-batches.

    stop=True ends each forward at the (single) named linear; outputs=i (the block's index) stores
    the full block outputs back into `hidden` (the non-sequential variant, whose next inputs are dense).
    """
    timings = {} if timings is None else timings
    moments, handles = {}, []

    def hook(name):
        def pre(mod, args):
            x = args[0]
            t0 = time.perf_counter()
            if name not in moments:
                moments[name] = Moments.zeros(x.shape[-1], x.device)
            moments[name].update(x)
            timings["covariance"] = timings.get("covariance", 0.0) + time.perf_counter() - t0
            if stop:
                raise StopForward
        return pre

    try:
        for n in names:
            handles.append(block.get_submodule(n).register_forward_pre_hook(hook(n)))
        for j, h in enumerate(hidden):
            out = forward(h, stop_ok=stop)
            if outputs is not None:
                _store(hidden, j, out, outputs)
    finally:
        for hd in handles:
            hd.remove()
    return moments


def _compress_one(block, prefix, name, moments, plan, opts, timings):
    t0 = time.perf_counter()
    try:
        return _factorize_into(block, prefix, name, moments, plan, opts, t0)
    finally:
        timings["factorize"] = timings.get("factorize", 0.0) + time.perf_counter() - t0


def _factorize_into(block, prefix, name, moments, plan, opts, t0):
    full = prefix + name
    moments.check_finite(full)
    module = block.get_submodule(name)
    w = weight_matrix(module)
    shape = LinearShape.of(full, -1, w, module.bias is not None, opts.centered, opts.sparse)
    rank = plan[full]
    if not shape.worthwhile(rank):
        return ModuleRecord(full, shape.d_in, shape.d_out, None, shape.dense_params, shape.dense_params,
                            None, None, time.perf_counter() - t0,
                            f"kept dense: rank {rank} would need {shape.factor_params(rank)} >= "
                            f"{shape.dense_params} parameters")
    if not torch.isfinite(w).all():
        raise NonFiniteError(f"non-finite weights in {full}: the checkpoint is damaged or overflowed on loading")
    low, nnz = shape.split(rank)
    bias_in = module.bias.detach() if module.bias is not None else None
    try:
        if nnz:
            f = low_rank_plus_sparse(METHODS[opts.method], w.detach(), bias_in, moments, low, nnz, opts.centered,
                                     opts.sparse_select, opts.sparse_rounds, plain_rank=rank)
        else:
            f = METHODS[opts.method](w.detach(), bias_in, moments, low, opts.centered)
    except NonFiniteError as e:
        raise NonFiniteError(f"{full}: {e}") from None
    low, nnz = f.first.shape[0], f.sparse.nnz if f.sparse is not None else 0  # the plain fit may have won
    new = FactorizedLinear(shape.d_in, shape.d_out, low, f.bias is not None, dtype=w.dtype, device=w.device, nnz=nnz)
    new.first.weight.copy_(f.first)
    new.second.weight.copy_(f.second)
    if f.bias is not None:
        new.second.bias.copy_(f.bias)
    if nnz:
        new.sparse_values.copy_(f.sparse.values)
        new.sparse_col.copy_(f.sparse.col)
        new.sparse_crow.copy_(f.sparse.crow)
    replace_module(block, name, new)
    bias = shape.d_out if module.bias is not None else 0
    params_before = shape.dense_params + bias
    params_after = shape.factor_params(low) + shape.sparse_params(nnz) + bias
    return ModuleRecord(full, shape.d_in, shape.d_out, low, params_before, params_after,
                        f.explained, f.relative_error, time.perf_counter() - t0,
                        explained_curve=explained_curve(f.spectrum, min(shape.d_in, shape.d_out)), nnz=nnz)


CURVE_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def explained_curve(spectrum, full_rank):
    """Fraction of the output variance kept at rank round(f * full_rank) for f in CURVE_FRACTIONS."""
    s = spectrum.clamp_min(0).double()
    cum = s.cumsum(0) / s.sum() if float(s.sum()) > 0 else torch.ones_like(s)
    return [round(float(cum[max(1, round(f * full_rank)) - 1]), 6) for f in CURVE_FRACTIONS]


def _store(hidden, j, out, i):
    """hidden[j] = out (in the store's dtype), refusing non-finite values (named by block i)."""
    out = out.to(device="cpu", dtype=hidden.dtype)
    if not torch.isfinite(out).all():
        raise NonFiniteError(f"non-finite hidden states at the output of block {i}: the model overflows on "
                             "the calibration text in this dtype; load it in float32 (--dtype float32)"
                             + (" and keep --activations-dtype float32" if hidden.dtype != torch.float32 else ""))
    hidden[j] = out


def profile_moments(model, layout, tokens, opts):
    """Input moments of every group of every block of the DENSE model ({first linear: Moments})."""
    blocks = model.get_submodule(layout.blocks_path)
    calls, hidden = prepare_inputs(model, blocks, tokens, opts)
    hidden = MemoryStore(hidden)
    out, timings = {}, {}
    for i in tqdm(range(len(blocks)), desc="profiling", unit="block", disable=not opts.progress):
        block, prefix = blocks[i], f"{layout.blocks_path}.{i}."
        home = next(block.parameters()).device
        block.to(opts.device)
        forward = _block_forward(block, calls, i, opts.device, timings)
        groups = layout.groups or trace_groups(block, lambda: forward(hidden[0]))
        with torch.no_grad():
            moments = _collect(block, [g[0] for g in groups], hidden, forward, stop=False, outputs=i)
        for g in groups:
            for n in g:
                out[prefix + n] = moments[g[0]]
        block.to(home)
    return out
