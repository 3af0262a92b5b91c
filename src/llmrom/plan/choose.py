"""From a budget to a plan: which linears get which rank, and the token embedding's rank.

`choose_plan` is the one place where the options of a run (budget, policy, last blocks, ranks file,
embedding budget) become {module: rank}; the in-memory and streaming runs both call it.
"""

import dataclasses
import logging

from ..errors import BudgetError, LlmromError
from ..modeling.arch import is_linear, layout_for, weight_matrix
from .autoplan import EMBEDDING_GRID, choose_last_n
from .embedding import check_embedding_budget, embedding_shape
from .latency import speed_limits
from .policies import plan_by_policy
from .ranks import (LinearShape, check_budget, check_last_blocks, feasible_last_n, joint_groups, joint_plan,
                    kept_params, last_blocks_plan, module_budget_for, pair_modules, read_ranks_file)

log = logging.getLogger(__name__)


def joins_groups(cfg):
    """Whether a run fits each group of linears that read one input through one basis (--factors joint): not
    with --sparse (its residual is fitted per linear) nor --ranks-file (the user's ranks are per linear),
    where each linear is stored alone in the interpolative form."""
    return cfg.factors == "joint" and not cfg.sparse and not cfg.ranks_file


def linear_shapes(model, layout, centered, interp=False):
    """LinearShape of every block linear; `interp`: factors in the interpolative form (llmrom.factor.interp)."""
    blocks = model.get_submodule(layout.blocks_path)
    shapes = []
    for i, block in enumerate(blocks):
        names = [n for g in layout.groups for n in g] if layout.groups else \
            [n for n, m in block.named_modules() if is_linear(m)]
        for n in names:
            mod = block.get_submodule(n)
            shapes.append(LinearShape.of(f"{layout.blocks_path}.{i}.{n}", i, weight_matrix(mod),
                                         mod.bias is not None, centered, interp=interp))
    return shapes


def planned_shapes(model, layout, cfg, progress=True):
    """linear_shapes for a run's configuration. With --prefer speed and a plan derived from --budget, each
    carries the largest kept fraction at which its factorized form is faster than dense on the run's
    device (llmrom.plan.latency, measured once per machine; with --factors joint, a grouped linear's is its
    group's joint form's); explicit ranks (--ranks-file, --module-budget) are the user's and are left as asked."""
    shapes = linear_shapes(model, layout, cfg.centered, cfg.interpolative)
    if cfg.budget is None or cfg.budget >= 1 or cfg.ranks_file or cfg.module_budget is not None:
        return shapes
    groups = joint_groups(shapes, layout) if joins_groups(cfg) else None
    limits = speed_limits(shapes, cfg.prefer, cfg.dtype, cfg.device, progress, groups)
    return [dataclasses.replace(s, max_kept=limits[s.name][0], interp_max_kept=limits[s.name][1])
            if s.name in limits else s for s in shapes]


def check_dense_exportable(model):
    """Centring adds biases; a dense export of the original architecture can hold them only where
    the block linears already have biases. Checked before compressing, not after."""
    layout = layout_for(model)
    missing = [s.name for s in linear_shapes(model, layout, centered=True) if s.added_bias]
    if missing:
        raise LlmromError(f"--export dense cannot hold the biases that centring adds ({missing[0]} and "
                          f"{len(missing) - 1} more have none in this architecture); add --no-centered")


def choose_plan(model, layout, shapes, total, tokens, cfg, opts, make_proxy=None):
    """({module: rank}, embedding rank or None, a description of how they were chosen).

    With speed limits on `shapes` (planned_shapes, --prefer speed) the budget still holds exactly: where
    factorizations that are faster than dense cannot remove enough (tiny models, whose products are all
    call overhead), the plan is made without the limits, with a warning, and the report says so."""
    try:
        return _choose_plan(model, layout, shapes, total, tokens, cfg, opts, make_proxy)
    except BudgetError as e:
        if all(s.max_kept >= 1 and s.interp_max_kept >= 1 for s in shapes):
            raise  # no speed limits to relax: the budget is out of reach
        free = [dataclasses.replace(s, max_kept=1.0, interp_max_kept=1.0) for s in shapes]
        plan, emb_rank, info = _choose_plan(model, layout, free, total, tokens, cfg, opts, make_proxy)  # or raises
        log.warning("--prefer speed: %s with only the factorizations measured faster than dense on this device; "
                    "planned for quality instead (the result may decode slower than dense)", str(e).split(";")[0])
        info["speed_limits"] = {"prefer": cfg.prefer, "relaxed": True, "why": str(e)}
        return plan, emb_rank, info


def limit_key(shape, grouped):
    """How the report names a shape's speed limit: d_in x d_out, or a joint group's d_in x the sum of its outputs."""
    if shape.name in grouped:
        d_in, sizes = grouped[shape.name]
        return f"{d_in}x{'+'.join(map(str, sizes))} (joint)"
    return f"{shape.d_in}x{shape.d_out}"


def _choose_plan(model, layout, shapes, total, tokens, cfg, opts, make_proxy=None):
    n_blocks = len(model.get_submodule(layout.blocks_path))
    emb = embedding_shape(model) if make_proxy is None else None  # a streamed model keeps its embedding dense
    automatic = (cfg.budget is not None and cfg.budget < 1 and cfg.policy == "last-blocks"
                 and cfg.last_blocks is None and cfg.module_budget is None and cfg.ranks_file is None)
    emb_rank, budget = None, cfg.budget
    if cfg.embedding_budget is not None and cfg.embedding_budget < 1:
        emb_rank = check_embedding_budget(cfg.embedding_budget, emb)
        if budget is not None:  # the blocks meet what the embedding leaves of the budget
            budget = min(1.0, (budget * total + emb.removed(emb_rank)) / total)
        automatic = automatic and budget < 1
    elif cfg.embedding_budget is not None or not automatic:
        emb = None  # dense: asked for, or a plan the embedding does not take part in
    if cfg.budget is not None:  # the embedding at its asked-for rank, or the smallest the automatic plan tries
        rank = emb_rank or (emb.rank_for(min(EMBEDDING_GRID)) if emb is not None else None)
        cut = emb.removed(rank) if rank else 0
        check_budget(cfg.budget, total, shapes, cut, f" and the token embedding at rank {rank}" if cut else "")
    if cfg.last_blocks is not None:
        check_last_blocks(cfg.last_blocks, n_blocks)
    if cfg.policy != "last-blocks" and budget < 1:
        plan, info = plan_by_policy(cfg.policy, model, layout, shapes, total, budget, tokens, opts, cfg.centered)
    elif cfg.ranks_file:
        plan, info = read_ranks_file(cfg.ranks_file, shapes), {"policy": "ranks-file", "file": cfg.ranks_file}
    elif cfg.last_blocks is not None and cfg.module_budget is not None:
        plan = last_blocks_plan(shapes, n_blocks, cfg.last_blocks, cfg.module_budget)
        info = {"policy": "last-blocks", "last_blocks": cfg.last_blocks, "module_budget": cfg.module_budget}
    elif budget >= 1:
        plan, info = {}, {"policy": "none (budget 1 keeps every block)"}
    elif cfg.last_blocks is not None:
        b = module_budget_for(budget, total, shapes, n_blocks, cfg.last_blocks)
        if b is None:
            raise BudgetError(f"budget {cfg.budget:g} cannot be met by compressing only the last "
                              f"{cfg.last_blocks} blocks; compress more blocks or drop --last-blocks")
        plan = last_blocks_plan(shapes, n_blocks, cfg.last_blocks, b)
        info = {"policy": "last-blocks", "last_blocks": cfg.last_blocks, "module_budget": b}
    else:
        candidates = feasible_last_n(budget, total, shapes, n_blocks)
        (rank, last_n, b), auto = choose_last_n(model, layout, shapes, n_blocks, candidates, tokens, opts,
                                                embedding=emb if emb_rank is None else None, total=total,
                                                budget=budget, trial_windows=cfg.plan_trials, make_proxy=make_proxy)
        emb_rank = emb_rank if rank is None else rank
        plan = last_blocks_plan(shapes, n_blocks, last_n, b) if last_n else {}
        info = {"policy": "last-blocks (automatic)", "last_blocks": last_n, "module_budget": b, "auto": auto}
    grouped = joint_groups(shapes, layout) if joins_groups(cfg) else {}
    limited = {limit_key(s, grouped): {"pair": round(s.max_kept, 4), **({"interpolative": round(
        s.interp_max_kept, 4)} if s.interp else {})} for s in shapes if min(s.max_kept, s.interp_max_kept) < 1}
    if limited:
        info["speed_limits"] = {"prefer": cfg.prefer, "max_kept_by_shape": limited,
                                "note": "a linear is factorized only below this fraction of its dense parameters, "
                                        "where its factors were measured faster than the dense layer at batch 1"}
    pairs = pair_modules(shapes, plan)
    if pairs:  # the loop must store these as pairs (LoopOptions.pair_modules)
        info["pair_modules"] = sorted(pairs)
    if emb_rank is not None:  # emb is set: an asked-for rank needs it, and so does the automatic choice
        info["embedding"] = {**emb.spec(emb_rank), "kept": emb.factor_params(emb_rank) / emb.dense_params}
    kept = kept_params(total, shapes, plan) - (emb.removed(emb_rank) if emb_rank is not None else 0)
    if cfg.budget is not None and kept > cfg.budget * total:
        raise LlmromError(f"the requested ranks keep {kept / total:.4f} of the parameters, above --budget "
                          f"{cfg.budget:g}; lower --module-budget or the ranks, or raise --budget")
    if joins_groups(cfg):  # each group's share of the plan spent on one shared basis: never more parameters
        plan, joint = joint_plan(shapes, layout, plan)
        if joint:
            info["joint_modules"] = sorted(joint)
    return plan, emb_rank, info
