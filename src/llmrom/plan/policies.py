"""Rank allocation policies beyond the paper's "last N blocks": whole-model budget -> {module: rank}.

A policy scores every rank-1 direction of every block linear and keeps, in each module, the
directions whose score is above one global threshold; the threshold is bisected until the
whole-model parameter count meets the budget (kept <= budget * total, as close as integer ranks
allow). A module whose kept rank would not make it strictly smaller stays dense (WeLore's
"non-low-rank component"); the others are factorized ("low-rank components").

* `welore` (data-agnostic, WeLore): the score of direction j of W is its normalized singular
  value s_j / s_1; heavy-tailed spectra lose many directions, flat ones stay dense.
* `global` (data-aware): the score is the share of the module's calibration output energy that
  direction carries per parameter it costs, l_j / (sum(l) (d_in + d_out)), with l the eigenvalues
  of the module's output covariance on a profiling pass over the dense model (one block resident at
  a time; only the spectra are kept, so its memory is one block's statistics). Dropping the
  lowest-scored directions first is the greedy allocation by relative output error per parameter.
* `loss` (data-aware, by calibration loss): one module budget per block from a grid, chosen from each
  block's measured loss increase (llmrom.autoplan.choose_block_budgets).
"""

import heapq
import math
import time

import torch
from tqdm.auto import tqdm

from ..modeling.arch import weight_matrix
from ..errors import BudgetError, LlmromError
from ..factor.methods import output_eigh
from .ranks import kept_params


def threshold_plan(scores, shapes, total, budget):
    """Largest-kept plan whose parameters fit the budget: ranks = #scores above a global threshold,
    then the unspent parameters (ties make the threshold coarse) go to the best next directions."""
    target = budget * total
    sorted_scores = {name: torch.sort(s.double(), descending=True).values for name, s in scores.items()}

    def plan_at(tau):
        plan = {}
        for s in shapes:
            r = int((sorted_scores[s.name] > tau).sum())
            r = max(r, 1)
            if s.worthwhile(r):
                plan[s.name] = r
        return plan

    positive = torch.cat([v[v > 0] for v in sorted_scores.values()])
    lo, hi = math.log(float(positive.min())) - 1, math.log(float(positive.max())) + 1  # lo keeps all, hi keeps rank 1
    if kept_params(total, shapes, plan_at(math.exp(hi))) > target:
        raise BudgetError(f"budget {budget:g} cannot be reached even with every block linear at rank 1; "
                          "raise --budget")
    for _ in range(60):
        mid = (lo + hi) / 2
        if kept_params(total, shapes, plan_at(math.exp(mid))) <= target:
            hi = mid
        else:
            lo = mid
    plan = plan_at(math.exp(hi))
    return _fill(plan, sorted_scores, shapes, target - kept_params(total, shapes, plan)), math.exp(hi)


def _fill(plan, sorted_scores, shapes, slack):
    """Spend what ties in the scores left unspent: give back the best next directions while they fit."""
    by_name = {s.name: s for s in shapes}
    heap = [(-float(sorted_scores[n][r]), n) for n, r in plan.items() if r < len(sorted_scores[n])]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        s, r = by_name[name], plan[name]
        cost = s.factor_params(r + 1) - s.factor_params(r)
        if cost > slack or not s.worthwhile(r + 1):
            continue
        plan[name], slack = r + 1, slack - cost
        if r + 1 < len(sorted_scores[name]):
            heapq.heappush(heap, (-float(sorted_scores[name][r + 1]), name))
    return plan


def welore_scores(model, shapes, progress=False):
    """Normalized singular values s_j / s_1 of every block linear's weight (no data)."""
    scores = {}
    for s in tqdm(shapes, desc="spectra", disable=not progress, leave=False):
        w = weight_matrix(model.get_submodule(s.name)).detach().to(torch.float32)
        sv = torch.linalg.svdvals(w).double()
        scores[s.name] = sv / sv[0].clamp_min(1e-300)
    return scores


def global_scores(model, layout, shapes, tokens, opts, centered):
    """Output-covariance eigenvalues per module from a dense profiling pass, as energy share per parameter.

    Streaming: each block's moments become spectra (d_out numbers per linear) before the next block
    is profiled, so memory holds one block's statistics, not the model's."""
    from ..loop.pipeline import profile_blocks
    wanted = {s.name: s for s in shapes}
    scores = {}
    for _, moments in profile_blocks(model, layout, tokens, opts):
        for name, m in moments.items():
            if name not in wanted:
                continue
            s = wanted[name]
            stats = m.covariance() if centered else m.second_moment()
            w = weight_matrix(model.get_submodule(name)).detach().to(device=stats.device, dtype=torch.float64)
            vals = output_eigh(w, stats, top=0)[0].clamp_min(0).cpu()  # stats live on --device
            scores[name] = vals / (vals.sum().clamp_min(1e-300) * (s.d_in + s.d_out))
        del moments
    return scores


def plan_by_policy(policy, model, layout, shapes, total, budget, tokens, opts, centered, n_profile=32):
    """(plan, info) for the registered policy `policy`."""
    t0 = time.perf_counter()
    if policy == "welore":
        scores = welore_scores(model, shapes, opts.progress)
        criterion = "normalized singular values of the weights (WeLore, data-agnostic)"
    elif policy == "global":
        scores = global_scores(model, layout, shapes, tokens[:n_profile], opts, centered)
        criterion = (f"output-covariance energy share per parameter on {min(n_profile, len(tokens))} "
                     "dense profiling windows (greedy by relative output error per parameter)")
    elif policy == "loss":
        from .autoplan import choose_block_budgets
        return choose_block_budgets(model, layout, shapes, total, budget, tokens, opts, centered)
    else:
        raise LlmromError(f"unknown rank policy {policy!r}; choose one of {sorted(POLICIES)}")
    plan, tau = threshold_plan(scores, shapes, total, budget)
    dense = [s.name for s in shapes if s.name not in plan]
    info = {"policy": policy, "criterion": criterion, "threshold": tau, "modules_factorized": len(plan),
            "modules_kept_dense": len(dense), "seconds": time.perf_counter() - t0}
    return plan, info


POLICIES = {
    "last-blocks": "the paper's: the last N blocks, every linear at one module budget (N chosen automatically)",
    "welore": "WeLore: non-uniform ranks from each weight's singular-value spectrum; flat spectra stay dense",
    "global": "data-aware: ranks across all blocks by calibration output energy per parameter",
    "loss": "data-aware: a module budget per block, minimising the summed measured calibration-loss increase",
}
