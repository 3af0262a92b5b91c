"""Budget -> ranks. A "plan" maps a module's dotted name to its rank; modules absent stay dense.

Budget is the paper's: the fraction of the WHOLE model's parameters kept (embeddings count).

Factors are stored as a pair (B, A) of r (d_in + d_out) numbers, the paper's form, or in the
interpolative form (llmrom.factor.interp) of r (d_in + d_out - r) numbers plus min(d_in, d_out) indices; a
module budget buys the largest rank its form can store.

With a sparse residual (--sparse s), a plan's rank r still names the module's parameter budget,
P = factor_params(r), and plans are made (and the budget met) exactly as without one. The module
spends at most P: factors of rank floor((1 - s) r) plus a CSR sparse residual filling the rest
(LinearShape.split; P or P - 1, as a nonzero costs 2), or the plain rank-r factors where those fit
the calibration data better (llmrom.sparse.low_rank_plus_sparse).
"""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import BudgetError, LlmromError


@dataclass(frozen=True)
class LinearShape:
    name: str
    block: int
    d_in: int
    d_out: int
    added_bias: int = 0  # d_out when centring must add a bias the dense layer lacks
    sparse: float = 0.0  # fraction of the module's budget given to a sparse residual
    interp: bool = False  # factors stored in the interpolative form (llmrom.factor.interp)
    # speed limits (llmrom.plan.latency, --prefer speed): factorize only below this fraction of the dense
    # parameters, where the form was measured faster than the dense layer; 1 is no limit
    max_kept: float = 1.0  # the factor pair
    interp_max_kept: float = 1.0  # the interpolative form; above it, an interp shape falls back to a pair

    @classmethod
    def of(cls, name, block, weight, has_bias, centered, sparse=0.0, interp=False):
        d_out, d_in = weight.shape
        return cls(name, block, d_in, d_out, d_out if centered and not has_bias else 0, sparse, interp)

    @property
    def dense_params(self):
        return self.d_in * self.d_out

    @property
    def interp_indices(self):
        """Indices the interpolative form stores: one per entry of its identity's (the smaller) side."""
        return min(self.d_in, self.d_out)

    def uses_interp(self, rank):
        """Whether rank-`rank` factors are stored in the interpolative form: asked for, cheaper there (it
        saves rank^2 numbers and stores `interp_indices`) and, under a speed limit, still faster than dense
        (else the pair, with one call fewer, may be)."""
        if not (self.interp and rank < self.interp_indices and rank * rank > self.interp_indices):
            return False
        stored = rank * (self.d_in + self.d_out - rank) + self.interp_indices
        return self.interp_max_kept >= 1 or stored < self.interp_max_kept * self.dense_params

    def factor_params(self, rank):
        """Stored numbers of rank-`rank` factors: r (d_in + d_out) as a pair, or in the interpolative
        form r (d_in + d_out - r) plus min(d_in, d_out) indices (one each, like the sparse indices)."""
        if self.uses_interp(rank):
            return rank * (self.d_in + self.d_out - rank) + self.interp_indices + self.added_bias
        return rank * (self.d_in + self.d_out) + self.added_bias

    def sparse_params(self, nnz):
        """Stored entries of a CSR residual: nnz values + nnz int32 column indices + d_out + 1 row pointers."""
        return 2 * nnz + self.d_out + 1 if nnz else 0

    def split(self, rank):
        """(factor rank, nonzeros) spending the budget P = factor_params(rank) of a plan's `rank`:
        factors of rank max(1, floor((1 - sparse) rank)), then as many nonzeros as the rest pays for.
        (rank, 0) when sparse is 0 or the rest cannot pay for the row pointers and one nonzero."""
        low = max(1, int((1 - self.sparse) * rank + 1e-9)) if self.sparse else rank
        if low >= rank:
            return rank, 0
        nnz = min((self.factor_params(rank) - self.factor_params(low) - self.d_out - 1) // 2,
                  self.d_in * self.d_out)
        return (low, nnz) if nnz >= 1 else (rank, 0)

    def stored_params(self, low, nnz):
        """Parameters stored by factors of rank `low` (with any added bias) plus a residual of `nnz`
        nonzeros; for split(rank) at most factor_params(rank), the budget plans count."""
        return self.factor_params(low) + self.sparse_params(nnz)

    def paper_rank(self, module_budget):
        """Largest rank whose factors keep at most `module_budget` of the matrix's parameters (the bias
        centring adds aside): the paper's floor(b d_in d_out / (d_in + d_out)) for a pair, the smaller
        root of r (d_in + d_out - r) + min(d_in, d_out) = b d_in d_out in the interpolative form (capped
        by its speed limit, above which the pair's rank is the answer)."""
        target = module_budget * self.d_in * self.d_out
        pair = max(1, math.floor(target / (self.d_in + self.d_out)))
        if not self.interp:
            return pair
        s, side = self.d_in + self.d_out, self.interp_indices
        cap = target if self.interp_max_kept >= 1 else min(target, self.interp_max_kept * self.dense_params)
        r = math.floor((s - math.sqrt(max(s * s - 4 * (cap - side), 0.0))) / 2)
        r = max(pair, min(r, side - 1))
        while r > pair and self.factor_params(r) - self.added_bias > target:  # float rounding; a pair above the cap
            r -= 1
        return r

    def worthwhile(self, rank):
        """A factorization is stored only if it is strictly smaller than the dense matrix and, under a
        speed limit, below the size at which its form stops being faster than the dense layer."""
        limit = self.interp_max_kept if self.uses_interp(rank) else self.max_kept
        return 0 < rank and self.factor_params(rank) < limit * self.dense_params


def pair_modules(shapes, plan):
    """Planned linears of an interpolative run stored as factor pairs because only the pair is fast enough
    at their rank (speed limits); the loop must store them so (LoopOptions.pair_modules)."""
    return frozenset(s.name for s in shapes if s.interp and s.interp_max_kept < 1 and s.name in plan
                     and not s.uses_interp(plan[s.name])
                     and dataclasses.replace(s, interp_max_kept=1.0).uses_interp(plan[s.name]))


def _groups_of_several(shapes, layout):
    """The LinearShapes of each block's groups of several linears that read the same input, in block order;
    none where the groups are traced later (unknown families)."""
    by_name = {s.name: s for s in shapes}
    for i in sorted({s.block for s in shapes}):
        for group in (g for g in layout.groups or () if len(g) > 1):
            yield [by_name[f"{layout.blocks_path}.{i}.{n}"] for n in group]


def joint_groups(shapes, layout):
    """{name: (d_in, sizes of its group)} of every linear in a group of several that read the same input
    (the members --factors joint fits through one basis)."""
    return {m.name: (m.d_in, tuple(x.d_out for x in members))
            for members in _groups_of_several(shapes, layout) for m in members}


def joint_plan(shapes, layout, plan):
    """(plan, joint members) for --factors joint: each group of linears that read the same input (q/k/v,
    gate/up) with at least one planned member is fitted as one stacked map through one shared basis
    (llmrom.modeling.factorized.JointFactorizedLinear), of the largest rank whose factors (in the
    interpolative form where the run uses it, plus any bias centring adds) fit what the plan gave the
    group: its planned members' factors and its other members' dense weights. Every member gets that rank
    in the plan; the budget still holds, as no group stores more than before. Groups the joint rank cannot
    shrink keep the plan's own forms."""
    out, joint = dict(plan), set()
    for members in _groups_of_several(shapes, layout):
        planned = [s for s in members if s.name in plan and s.worthwhile(plan[s.name])]
        if not planned:
            continue
        given = sum(s.factor_params(plan[s.name]) if s in planned else s.dense_params for s in members)
        stacked = stacked_shape(members)
        rank = stacked.paper_rank((given - stacked.added_bias) / stacked.dense_params)
        if not stacked.factor_params(rank) <= given or not stacked.worthwhile(rank):
            continue
        out.update({s.name: rank for s in members})
        joint.update(s.name for s in members)
    return out, frozenset(joint)


def stacked_shape(members):
    """The LinearShape of a joint group's stacked map [W_1; ...; W_k] (d_in x the sum of the outputs), in the
    members' form (interpolative or pair), without speed limits (the plan applied the group's already)."""
    first = members[0]
    return LinearShape(first.name, first.block, first.d_in, sum(s.d_out for s in members),
                       sum(s.added_bias for s in members), interp=first.interp)


def kept_params(total, shapes, plan):
    """Whole-model parameters after applying `plan` (unfactorizable entries count as dense)."""
    saved = sum(s.dense_params - s.factor_params(plan[s.name]) for s in shapes
                if s.name in plan and s.worthwhile(plan[s.name]))
    return total - saved


def last_blocks_plan(shapes, n_blocks, last_n, module_budget):
    """The paper's policy: the last `last_n` blocks, every linear at module budget b; a linear whose
    factors at that budget would not be worthwhile (not smaller, or not faster) stays dense."""
    check_last_blocks(last_n, n_blocks)
    if not 0 < module_budget < 1:
        raise LlmromError(f"--module-budget must be in (0, 1), got {module_budget}")
    first = n_blocks - last_n
    ranks = ((s, s.paper_rank(module_budget)) for s in shapes if s.block >= first)
    return {s.name: r for s, r in ranks if s.worthwhile(r)}


def check_last_blocks(last_n, n_blocks):
    if not 1 <= last_n <= n_blocks:
        raise LlmromError(f"--last-blocks must be between 1 and {n_blocks} (the model has {n_blocks} blocks)")


def smallest_reachable(total, shapes):
    """Kept fraction when every block linear is cut to rank 1: no block-wise policy goes lower."""
    return kept_params(total, shapes, {s.name: 1 for s in shapes}) / total


def check_budget(budget, total, shapes, embedding_cut=0, embedding_note=""):
    """Refuse a budget below the smallest reachable one; `embedding_cut` parameters more can be removed
    by factorizing the token embedding (`embedding_note` says how, for the message)."""
    if not 0 < budget <= 1:
        raise LlmromError(f"--budget must be in (0, 1] (fraction of parameters kept), got {budget}")
    floor = smallest_reachable(total, shapes) - embedding_cut / total
    if budget < floor:
        raise BudgetError(
            f"budget {budget:g} cannot be reached: even with every block linear at rank 1{embedding_note} the "
            f"model keeps {floor:.4f} of its parameters (embeddings, norms, head); the smallest reachable is "
            f"--budget {math.ceil(floor * 1000) / 1000:g}"
        )


def module_budget_for(budget, total, shapes, n_blocks, last_n):
    """Largest module budget b (to 1e-4) whose last-`last_n` plan keeps <= budget; None if none does."""
    target = budget * total
    if kept_params(total, shapes, last_blocks_plan(shapes, n_blocks, last_n, 1e-4)) > target:
        return None
    lo, hi = 1e-4, 1.0 - 1e-4
    if kept_params(total, shapes, last_blocks_plan(shapes, n_blocks, last_n, hi)) <= target:
        return hi
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        if kept_params(total, shapes, last_blocks_plan(shapes, n_blocks, last_n, mid)) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def feasible_last_n(budget, total, shapes, n_blocks):
    """All (last_n, module_budget) pairs of the paper's policy that meet the budget."""
    out = []
    for last_n in range(1, n_blocks + 1):
        b = module_budget_for(budget, total, shapes, n_blocks, last_n)
        if b is not None:
            out.append((last_n, b))
    return out


def read_ranks_file(path, shapes):
    """A JSON object {module name: rank}; every name must be a compressible linear of the model."""
    p = Path(path)
    if not p.is_file():
        raise LlmromError(f"ranks file {path} not found; pass a JSON object mapping module names to ranks")
    try:
        plan = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LlmromError(f"ranks file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(plan, dict):
        raise LlmromError(f"ranks file {path} must hold a JSON object {{module name: rank}}")
    known = {s.name: s for s in shapes}
    for name, rank in plan.items():
        if name not in known:
            raise LlmromError(f"ranks file names {name!r}, which is not a compressible linear of this model "
                              f"(e.g. {next(iter(known))!r}); see `llmrom info MODEL`")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise LlmromError(f"ranks file: rank of {name!r} must be a positive integer, got {rank!r}")
    return plan
