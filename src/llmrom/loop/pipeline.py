"""The sequential block loop (GPTQ-style); `compress_block` is one step, shared with llmrom.stream.

capture block 0's inputs -> for each block: for each group of linears sharing an input, stream
that input's moments (the block's forward stops at the group, so finished parts are not re-run),
factorize the group's linears, swap them in -> run the compressed block to get the next block's
inputs. Only one copy of the calibration hidden states is kept; outputs overwrite inputs.

Once the attention groups are final, the residual stream after attention is kept (float32, in a
scratch store of the same kind) and the MLP groups' statistics and the block's outputs run only the
MLP half from it (arch.MLP_HALVES), instead of re-running attention for each of them.

With `rom`, a group of one linear with fewer outputs than inputs (down_proj) streams the moments
of its outputs W x instead (`rom_from_outputs`): d_out^2 statistics and work per token instead of
d_in^2, and the same factors.

Error correction (`correct`): from the first block that has something to compress, a second store
carries the DENSE model's hidden states. Each such block is copied before it is compressed; for every
group the dense copy runs on the dense states and the compressed block on the compressed states, both
stopping at the group's first linear, and the joint moments of the two inputs (stats.CrossMoments)
feed methods.rom_corrected. At the end of the block each stream runs its own block to the next inputs.
"""

import contextlib
import copy
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from . import distributed
from .activations import MemoryStore, activation_store, copied_store, parse_dtype, scratch_store
from ..modeling.arch import trace_groups, weight_matrix
from .capture import StopForward, block0_input, record_calls, run_block, to_device
from ..eval.cost import return_free_memory
from ..errors import LlmromError, NonFiniteError
from ..modeling.factorized import FactorizedLinear, joint_modules, replace_module
from ..factor.interp import interpolative, side_for
from ..factor.methods import METHODS, rom_corrected, rom_from_outputs
from ..plan.ranks import LinearShape
from ..factor.sparse import low_rank_plus_sparse
from ..factor.stats import CrossMoments, Moments

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


def check_correction(correct, sequential, method, sparse):
    """Refuse --correct where it cannot work (one place for CompressConfig and LoopOptions)."""
    if not correct:
        return
    if not sequential:
        raise LlmromError("--correct calibrates toward the dense model from the compressed model's inputs; "
                          "with --no-sequential both are the dense ones: drop one of the two")
    if method != "rom":
        raise LlmromError(f"--correct is implemented for --method rom only, not {method}")
    if sparse:
        raise LlmromError("--correct and --sparse cannot be combined yet (the sparse part is fitted to the "
                          "layer's own inputs); drop one of them")


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
    output_stats: bool = True  # rom, sequential: factorize d_out < d_in single-linear groups from output moments
    correct: bool = False  # calibrate toward the dense model's outputs (needs sequential and rom)
    sparse: float = 0.0  # fraction of each module's budget given to a sparse residual (llmrom.factor.sparse)
    sparse_select: str = "entries"  # its support: entries or channels
    sparse_rounds: int = 3  # alternating rounds of factors and sparse part
    sparse_modules: str = "all"  # lean: no sparse part where rom fits from output statistics (CompressConfig)
    interp: bool = False  # store the factors in the interpolative form (llmrom.factor.interp; CompressConfig.factors)
    pair_modules: frozenset = frozenset()  # with interp: linears stored as pairs, the only fast form at their rank
    joint_modules: frozenset = frozenset()  # linears fitted with their group through one basis (--factors joint)
    distributed: bool = False  # sum every moment across the torch.distributed ranks (llmrom.loop.distributed)

    def __post_init__(self):
        check_correction(self.correct, self.sequential, self.method, self.sparse)

    def for_plan(self, plan_info):
        """These options with the forms the plan chose per linear (pair_modules, joint_modules)."""
        return dataclasses.replace(self, pair_modules=frozenset(plan_info.get("pair_modules", ())),
                                   joint_modules=frozenset(plan_info.get("joint_modules", ())))

    @property
    def outputs_streamable(self):
        """Whether a single linear with fewer outputs than inputs may be fitted from its output moments."""
        return self.output_stats and self.sequential and self.method == "rom"


def compress_blocks(model, layout, tokens, plan, opts, timings=None):
    """Compress in place the linears named in `plan` ({name: rank}); returns ModuleRecords."""
    blocks = model.get_submodule(layout.blocks_path)
    calls, hidden = prepare_inputs(model, blocks, tokens, opts)
    records, groups = [], layout.groups
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(activation_store(hidden, opts.activations, parse_dtype(opts.activations_dtype)))
        dense = None  # the dense model's hidden states: equal to `store` until the first compressed block
        for i in tqdm(range(len(blocks)), desc="blocks", unit="block", disable=not opts.progress):
            block, prefix = blocks[i], f"{layout.blocks_path}.{i}."
            if opts.correct and dense is None and any(name.startswith(prefix) for name in plan):
                dense = stack.enter_context(copied_store(store))
            home = next(block.parameters()).device
            block.to(opts.device)
            done, groups = compress_block(block, prefix, i, groups, calls, store, plan, opts, timings, dense=dense,
                                          mlp_half=layout.mlp_half)
            records += done
            store.end_block()
            if dense is not None:
                dense.end_block()
            block.to(home)
            return_free_memory()
    return records


def compress_block(block, prefix, i, groups, calls, hidden, plan, opts, timings=None, dense=None, mlp_half=None):
    """Compress block i (named `prefix`) in place and replace the hidden states by its outputs.

    `hidden` is an activation store (llmrom.loop.activations); `groups` are the layout's groups, or None
    to trace them on this block. Returns (ModuleRecords, groups). `timings` (a dict) accumulates
    seconds of forward passes (hooks included), covariance updates and factorizations. `dense`
    (error correction) is a store of the dense model's hidden states entering the block: each group
    is calibrated toward a dense copy of the block run on them, and they are replaced by its outputs.
    `mlp_half` (arch.MLP_HALVES) lets the sequential loop keep the residual stream after attention
    once the attention groups are final, and run only the MLP half from it for the remaining groups
    and the block's outputs (checked against the whole block on micro-batch 0).
    """
    timings = {} if timings is None else timings
    if dense is not None and not (opts.correct and opts.sequential):
        raise LlmromError("dense hidden states are used by sequential error correction only (opts.correct)")
    forward = _block_forward(block, calls, i, opts.device, timings)
    if groups is None:
        groups = trace_groups(block, lambda: forward(hidden[0]))
        log.info("traced linear groups: %s", groups)
    todo = [[n for n in g if prefix + n in plan] for g in groups]
    dense_block = dense_forward = None
    if dense is not None:  # the block as it is now, kept dense (itself when nothing in it is compressed)
        dense_block = copy.deepcopy(block) if any(todo) else block
        dense_forward = _block_forward(dense_block, calls, i, opts.device, timings)
    half = mlp_half if opts.sequential and dense is None else None
    records = []
    with torch.no_grad(), contextlib.ExitStack() as stack:
        mid = None  # the residual stream after attention, once every attention group is final
        if opts.sequential:
            for group in todo:
                if not group:
                    continue
                src, fwd = hidden, forward
                if half is not None and all(n.startswith(half[1] + ".") for n in group):
                    if mid is None:
                        mid = stack.enter_context(scratch_store(hidden, torch.float32))
                        _fill_mid(block, half, hidden, mid, forward)
                        half_forward = _half_forward(block, half, opts.device, timings)
                    src, fwd = mid, half_forward
                if dense is None:
                    method, moments = _group_statistics(block, group, src, fwd, opts, timings)
                else:
                    method, moments = rom_corrected, _collect_joint(block, dense_block, group[0], hidden, dense,
                                                                    forward, dense_forward, timings, opts.distributed)
                records += _compress_group(block, prefix, group, method, moments, plan, opts, timings)
        elif any(todo):
            moments = _collect(block, [g[0] for g in todo if g], hidden, forward, stop=False, outputs=i,
                               timings=timings, reduce=opts.distributed)
            for group in (g for g in todo if g):
                records += _compress_group(block, prefix, group, METHODS[opts.method], moments[group[0]], plan,
                                           opts, timings)
        if opts.sequential or not any(todo):
            if mid is not None:
                _check_half(forward(hidden[0]), half_forward(mid[0]), i, half)
                _advance(mid, hidden, half_forward, i, f"block {i} outputs", opts.progress)
            else:
                _advance(hidden, hidden, forward, i, f"block {i} outputs", opts.progress)
            if dense is not None:
                _advance(dense, dense, dense_forward, i, f"block {i} dense outputs", opts.progress)
    return records, groups


def _fill_mid(block, half, hidden, mid, forward):
    """mid[j] = the residual stream after attention (the input of the norm `half[0]`) for every
    micro-batch of `hidden`; each forward stops there."""
    got = {}

    def grab(mod, args):
        got["h"] = args[0]
        raise StopForward

    handle = block.get_submodule(half[0]).register_forward_pre_hook(grab)
    try:
        for j, h in enumerate(hidden):
            forward(h, stop_ok=True)
            mid[j] = got.pop("h").to(torch.float32)
    finally:
        handle.remove()
    mid.end_block()


def _half_forward(block, half, device, timings):
    """forward(h_mid, stop_ok): the block's MLP half, h_mid + post(mlp(norm(h_mid))) (arch.MLP_HALVES)."""
    norm, mlp = block.get_submodule(half[0]), block.get_submodule(half[1])
    post = block.get_submodule(half[2]) if half[2] else (lambda y: y)
    dtype = next(block.parameters()).dtype

    def run(h):
        h = h.to(dtype)
        return h + post(mlp(norm(h)))
    return _timed(run, device, timings)


def _check_half(full, via_half, i, half):
    """The MLP half run from the stored residual stream must reproduce the whole block."""
    scale = float(full.abs().max()) or 1.0
    tol = 1e-5 if full.dtype == torch.float32 else 1e-2
    err = float((full - via_half.to(full.dtype)).abs().max())
    if not err <= tol * scale:
        raise LlmromError(f"block {i}: running its MLP half {half} from the residual stream after attention "
                          f"differs from the whole block by {err:.3g} (max |output| {scale:.3g}): the family's "
                          "entry in llmrom.arch.MLP_HALVES does not fit this transformers version; please report it")


def _advance(src, dst, forward, i, desc, progress):
    """dst[j] = block i's outputs for the micro-batches of `src` (dst may be src)."""
    for j, h in enumerate(tqdm(src, desc=desc, total=len(src), leave=False, disable=not progress)):
        _store(dst, j, forward(h), i)


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
    return _timed(lambda h: run_block(block, h.to(dtype), block_calls[h.shape[0]]), device, timings)


def _timed(run, device, timings):
    """forward(h, stop_ok=False) = run(h on `device`), its seconds added to timings["forward"]; a
    StopForward raised by a hook returns None when stop_ok, else propagates."""
    def forward(h, stop_ok=False):
        t0 = time.perf_counter()
        try:
            return run(h.to(device=device))
        except StopForward:
            if not stop_ok:
                raise
            return None
        finally:
            timings["forward"] = timings.get("forward", 0.0) + time.perf_counter() - t0
    return forward


def uses_output_stats(block, group, opts):
    """Whether a sequential group is factorized from the moments of its outputs: `rom`, one linear,
    d_out < d_in (its output statistics are then the smaller ones); not when --sparse (all modules)
    needs its input statistics."""
    sparse_here = opts.sparse and opts.sparse_modules == "all"
    if not (opts.outputs_streamable and len(group) == 1 and not sparse_here):
        return False
    d_out, d_in = weight_matrix(block.get_submodule(group[0])).shape
    return d_out < d_in


def _group_statistics(block, group, hidden, forward, opts, timings):
    """(method, moments) of a sequential group: the moments of the group's shared input for the
    configured method, or those of the output of its single linear for `rom_from_outputs`."""
    if uses_output_stats(block, group, opts):
        return rom_from_outputs, _collect(block, group, hidden, forward, stop=True, timings=timings,
                                          of="outputs", reduce=opts.distributed)[group[0]]
    return METHODS[opts.method], _collect(block, group[:1], hidden, forward, stop=True, timings=timings,
                                          reduce=opts.distributed)[group[0]]


def _collect(block, names, hidden, forward, stop, outputs=None, timings=None, of="inputs", reduce=False):
    """Moments of the inputs (of="outputs": of the outputs W x, bias excluded) of the named linears
    over all micro-batches.

    stop=True ends each forward at the (single) named linear, before it runs (inputs) or right after
    (outputs); outputs=i (the block's index) stores the full block outputs back into `hidden` (the
    non-sequential variant, whose next inputs are dense). `reduce`: sum them across the torch.distributed
    ranks, each of which ran its own share of the windows (llmrom.loop.distributed).
    """
    if of not in ("inputs", "outputs"):
        raise ValueError(f"_collect: of={of!r}, expected 'inputs' or 'outputs'")
    timings = {} if timings is None else timings
    moments, handles = {}, []

    def add(name, x):
        t0 = time.perf_counter()
        if name not in moments:
            moments[name] = Moments.zeros(x.shape[-1], x.device)
        moments[name].update(x)
        timings["covariance"] = timings.get("covariance", 0.0) + time.perf_counter() - t0
        if stop:
            raise StopForward

    def register(name):
        module = block.get_submodule(name)
        if of == "inputs":
            return module.register_forward_pre_hook(lambda mod, args: add(name, args[0]))
        return module.register_forward_hook(lambda mod, args, out: add(name, _without_bias(mod, out)))

    try:
        for n in names:
            handles.append(register(n))
        for j, h in enumerate(hidden):
            out = forward(h, stop_ok=stop)
            if outputs is not None:
                _store(hidden, j, out, outputs)
    finally:
        for hd in handles:
            hd.remove()
    if reduce:
        t0 = time.perf_counter()
        for n in names:
            distributed.sum_moments(moments[n])
        timings["all_reduce"] = timings.get("all_reduce", 0.0) + time.perf_counter() - t0
    return moments


def _without_bias(module, out):
    """W x from a linear's output W x + b (in float32, the dtype the moments are accumulated from)."""
    out = out.to(torch.float32)
    return out if module.bias is None else out - module.bias.to(torch.float32)


def _collect_joint(block, dense_block, name, hidden, dense, forward, dense_forward, timings, reduce=False):
    """CrossMoments of the input of linear `name`: dense copy on the dense states, compressed block on
    the compressed ones, micro-batch by micro-batch (same tokens), both forwards stopped at the linear;
    `reduce`: summed across the torch.distributed ranks."""
    got, moments = {}, [None]

    def grab_dense(mod, args):
        got["x"] = args[0]
        raise StopForward

    def update(mod, args):
        t0 = time.perf_counter()
        x_hat = args[0]
        if moments[0] is None:
            moments[0] = CrossMoments.zeros(x_hat.shape[-1], x_hat.device)
        moments[0].update(got.pop("x"), x_hat)
        timings["covariance"] = timings.get("covariance", 0.0) + time.perf_counter() - t0
        raise StopForward

    handles = [dense_block.get_submodule(name).register_forward_pre_hook(grab_dense),
               block.get_submodule(name).register_forward_pre_hook(update)]
    try:
        if len(hidden) != len(dense):
            raise ValueError("the dense and compressed hidden states hold different micro-batches")
        for h, hd in zip(hidden, dense):
            dense_forward(hd, stop_ok=True)
            forward(h, stop_ok=True)
    finally:
        for hd in handles:
            hd.remove()
    return distributed.sum_moments(moments[0]) if reduce else moments[0]


def _compress_group(block, prefix, group, method, moments, plan, opts, timings):
    """ModuleRecords of the group's planned linears, factorized from the moments of their shared input: through
    one shared basis when the plan made them a joint group (LoopOptions.joint_modules), else one by one."""
    if len(group) > 1 and all(prefix + n in opts.joint_modules for n in group):
        t0 = time.perf_counter()
        try:
            return _factorize_joint(block, prefix, group, method, moments, plan, opts, t0)
        finally:
            timings["factorize"] = timings.get("factorize", 0.0) + time.perf_counter() - t0
    return [_compress_one(block, prefix, n, method, moments, plan, opts, timings) for n in group]


def _factorize_joint(block, prefix, group, method, moments, plan, opts, t0):
    """Factorize the linears `group` (which read the same input) as one stacked map [W_1; ...; W_k] through
    one rank-r basis, and swap in a JointFactorizedLinear and its parts (llmrom.modeling.factorized)."""
    names = [prefix + n for n in group]
    moments.check_finite(names[0])
    mods = [block.get_submodule(n) for n in group]
    ws = [weight_matrix(m).detach() for m in mods]
    w = torch.cat(ws)
    _check_weight(w, " / ".join(names))
    biases = [m.bias for m in mods]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else x.new_zeros(x.shape[0]) for b, x in zip(biases, ws)])
    rank = plan[names[0]]
    try:
        f = method(w, bias, moments, rank, opts.centered)
    except NonFiniteError as e:
        raise NonFiniteError(f"{' / '.join(names)}: {e}") from None
    sizes = [x.shape[0] for x in ws]
    stacked = LinearShape.of(names[0], -1, w, bias is not None, opts.centered, interp=opts.interp)
    interp = side_for(stacked.d_in, stacked.d_out) if stacked.uses_interp(rank) else None
    joint = joint_modules(block, group, sizes, rank, f.bias is not None, dtype=w.dtype, device=w.device,
                          interp=interp)
    _load_factors(joint.stacked, f, " / ".join(names))
    curve = explained_curve(f.spectrum, min(w.shape))
    seconds = (time.perf_counter() - t0) / len(group)
    # the stacked map's stored numbers (indices and bias included), shared out in proportion to the members'
    # outputs (the first member takes the rounding), so each record keeps its group's kept fraction
    stored = stacked.factor_params(rank) - stacked.added_bias + (sum(sizes) if f.bias is not None else 0)
    later = [stored * n // sum(sizes) for n in sizes[1:]]
    records = []
    for i, (name, x, b) in enumerate(zip(names, ws, biases)):
        d_out, d_in = x.shape
        after = stored - sum(later) if i == 0 else later[i - 1]
        records.append(ModuleRecord(name, d_in, d_out, rank, d_out * d_in + (d_out if b is not None else 0), after,
                                    f.explained, f.relative_error, seconds,
                                    note=f"joint with {', '.join(n for n in group if n != group[i])}: one shared "
                                         f"rank-{rank} basis (stored with {group[0]})", explained_curve=curve))
    return records


def _compress_one(block, prefix, name, method, moments, plan, opts, timings):
    t0 = time.perf_counter()
    try:
        return _factorize_into(block, prefix, name, method, moments, plan, opts, t0)
    finally:
        timings["factorize"] = timings.get("factorize", 0.0) + time.perf_counter() - t0


def _factorize_into(block, prefix, name, method, moments, plan, opts, t0):
    """Factorize one linear with `method(weight, bias, moments, rank, centered)` and swap it in."""
    full = prefix + name
    moments.check_finite(full)
    module = block.get_submodule(name)
    w = weight_matrix(module)
    sparse = 0.0 if method is rom_from_outputs else opts.sparse  # --sparse-modules lean: output statistics only
    shape = LinearShape.of(full, -1, w, module.bias is not None, opts.centered, sparse, opts.interp)
    rank = plan[full]
    if not shape.worthwhile(rank):
        return ModuleRecord(full, shape.d_in, shape.d_out, None, shape.dense_params, shape.dense_params,
                            None, None, time.perf_counter() - t0,
                            f"kept dense: rank {rank} would need {shape.factor_params(rank)} >= "
                            f"{shape.dense_params} parameters")
    _check_weight(w, full)
    low, nnz = shape.split(rank)
    bias_in = module.bias.detach() if module.bias is not None else None
    try:
        if nnz:  # input moments (output-statistics modules got sparse 0 above); --correct is refused with it
            f = low_rank_plus_sparse(method, w.detach(), bias_in, moments, low, nnz, opts.centered,
                                     opts.sparse_select, opts.sparse_rounds, plain_rank=rank)
        else:
            f = method(w.detach(), bias_in, moments, low, opts.centered)
    except NonFiniteError as e:
        raise NonFiniteError(f"{full}: {e}") from None
    low, nnz = f.first.shape[0], f.sparse.nnz if f.sparse is not None else 0  # the plain fit may have won
    interp = side_for(shape.d_in, shape.d_out) if shape.uses_interp(low) and full not in opts.pair_modules else None
    new = FactorizedLinear(shape.d_in, shape.d_out, low, f.bias is not None, dtype=w.dtype, device=w.device, nnz=nnz,
                           interp=interp)
    _load_factors(new, f, full)
    replace_module(block, name, new)
    bias = shape.d_out if module.bias is not None else 0
    params_before = shape.dense_params + bias
    params_after = shape.stored_params(low, nnz) + bias
    return ModuleRecord(full, shape.d_in, shape.d_out, low, params_before, params_after,
                        f.explained, f.relative_error, time.perf_counter() - t0,
                        explained_curve=explained_curve(f.spectrum, min(shape.d_in, shape.d_out)), nnz=nnz)


def _check_weight(w, name):
    if not torch.isfinite(w).all():
        raise NonFiniteError(f"non-finite weights in {name}: the checkpoint is damaged or overflowed on loading")


def _load_factors(new, f, name):
    """Copy the Factors `f` into the empty FactorizedLinear `new`, rewritten in its interpolative form if it has one."""
    first, second = f.first, f.second
    if new.interp:
        try:
            first, second, order = interpolative(f.second, f.first, new.interp)
        except torch.linalg.LinAlgError:
            raise LlmromError(f"{name}: its factors have rank below {new.rank}, so no {new.rank} of their rows or "
                              "columns form an invertible block for the interpolative form; use --factors pair"
                              ) from None
        new.order.copy_(order)
    new.first.weight.copy_(first)
    new.second.weight.copy_(second)
    if f.bias is not None:
        new.bias.copy_(f.bias)
    if new.nnz:
        new.sparse_values.copy_(f.sparse.values)
        new.sparse_col.copy_(f.sparse.col)
        new.sparse_crow.copy_(f.sparse.crow)


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


def profile_blocks(model, layout, tokens, opts):
    """Yield (block prefix, {linear: Moments of its input}) for every block of the DENSE model in order.

    Only one block's moments exist at a time if the caller drops them before asking for the next
    (llmrom.plan.policies does); the hidden states are one copy, overwritten block by block.
    """
    blocks = model.get_submodule(layout.blocks_path)
    calls, hidden = prepare_inputs(model, blocks, tokens, opts)
    hidden = MemoryStore(hidden)
    timings = {}
    for i in tqdm(range(len(blocks)), desc="profiling", unit="block", disable=not opts.progress):
        block, prefix = blocks[i], f"{layout.blocks_path}.{i}."
        home = next(block.parameters()).device
        block.to(opts.device)
        forward = _block_forward(block, calls, i, opts.device, timings)
        groups = layout.groups or trace_groups(block, lambda: forward(hidden[0]))
        with torch.no_grad():
            moments = _collect(block, [g[0] for g in groups], hidden, forward, stop=False, outputs=i,
                               reduce=opts.distributed)
        block.to(home)
        yield prefix, {prefix + n: moments[g[0]] for g in groups for n in g}
        del moments  # not alive while the next block's are collected
