"""Plans chosen by measured calibration loss: the paper's last N (automatic) and per-block budgets.

Both score plans by one cheap proxy: profile the dense model once on a few calibration windows
(input moments of every linear), project a plan's linears onto their top output eigenvectors (the
non-sequential ROM, a weight edit, no re-calibration), and measure the calibration loss on other
calibration windows. The last-N choice projects uncentred (as the committed benchmark's default runs
were planned); policy `loss` projects as the compression will (centred: eigenvectors of the output
covariance, the mean of the dropped directions restored in a bias), because the two disagree: on
SmolLM2 at 0.8 a per-block plan chosen by the uncentred proxy lost to last-N once compressed centred.

* `choose_last_n`: the paper picked N by hand. Every feasible N has one module budget b that meets
  the whole-model budget; a handful of them are scored and the lowest loss wins. Given the model's
  token embedding (llmrom.plan.embedding), the embedding's share of the cut is chosen in the same way:
  for each kept fraction of the embedding in embedding.GRID, the embedding is projected onto its top
  output eigenvectors and the blocks' feasible (N, b) for the rest of the budget are scored with it.
  The proxy's best candidate of each kind (blocks alone, embedding alone, both) is then compressed
  for real (a trial of the sequential loop on a few calibration windows) and the lowest held-out
  loss wins: the proxy cannot see the loop's sequential correction.
* `choose_block_budgets` (policy `loss`): every block gets its own module budget from a grid (or
  stays dense). Each block is projected alone at each grid budget and the loss increase over the
  dense model is measured; the per-block choices that minimise the summed increase under the
  whole-model budget are solved exactly (a multiple-choice knapsack, dynamic programming over the
  parameters removed). The paper's last-N plans are scored by the same proxy and one of them is
  kept instead when it scores lower, so the policy never loses to last-N on its own criterion.

The eigenvectors are kept only up to the largest rank any plan asks for, and the dense weights are
swapped back rather than copied, so the proxy costs about one set of truncated eigenbases.
"""

import contextlib
import copy
import dataclasses
import logging
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..modeling.arch import weight_matrix
from .embedding import GRID as EMBEDDING_GRID, embedding_basis, head_input_moment
from ..errors import BudgetError, NonFiniteError
from ..factor.methods import output_eigh
from ..eval.perplexity import mean_nll
from ..loop.pipeline import compress_blocks, profile_blocks
from .ranks import feasible_last_n, kept_params, last_blocks_plan, pair_modules

log = logging.getLogger(__name__)

GRID = (0.25, 0.5, 0.75)  # module budgets a block may get under policy `loss` (besides staying dense)


def thin(candidates, k):
    """At most k candidates evenly spread over the feasible N (always keeping the smallest and largest)."""
    if len(candidates) <= k:
        return candidates
    idx = sorted({round(i * (len(candidates) - 1) / (k - 1)) for i in range(k)})
    return [candidates[i] for i in idx]


class ProjectionProxy:
    """The dense model with a plan's linears projected onto their top output eigenvectors, scored by the
    calibration loss on `held` windows.

    The dense inputs of every block on `held` are kept, so a plan that leaves the first i blocks dense
    is scored by running the model from block i (the blocks before it are cut off the block list and
    block i's input is fed as `inputs_embeds`). Construction checks that this gives the full forward's
    loss; where it does not (GPT-2 adds position embeddings to `inputs_embeds`), every score runs the
    full forward."""

    def __init__(self, model, layout, max_ranks, profile, held, opts, centered=False):
        self.model, self.layout, self.held, self.eig = model, layout, held, {}
        self.out_mean = {}  # centred: the mean output W m of each linear; its dropped part goes into the bias
        for _, moments in profile_blocks(model, layout, profile, opts):  # one block's moments at a time
            for name in (n for n in moments if n in max_ranks):
                module = model.get_submodule(name)
                self.eig[name], mean = proxy_basis(module, moments[name], max_ranks[name], centered)
                if centered:
                    self.out_mean[name] = mean
            del moments
        self.blocks = model.get_submodule(layout.blocks_path)
        self.inputs = []  # cached by refresh(); None once they prove unusable
        self.refresh()
        if self.inputs is not None:  # from a middle block, the dense model must give the full forward's loss
            if not math.isclose(self._loss_from(len(self.blocks) // 2), self.dense_loss, rel_tol=1e-5):
                log.info("the loss from cached block inputs differs from the full forward: scoring with full forwards")
                self.inputs = None

    def refresh(self):
        """Loss and cached block inputs of the model as it is now (after the embedding was edited)."""
        self.dense_loss = mean_nll(self.model, self.held)
        if self.inputs is not None:
            self.inputs = self._block_inputs()

    def _block_inputs(self):
        """[input of block i on `held`] from one dense forward, or None if the model does not return them."""
        out, device = [], next(self.model.parameters()).device
        for start in range(0, len(self.held), 8):
            ids = self.held[start:start + 8].to(device)
            hs = self.model(input_ids=ids, use_cache=False, output_hidden_states=True)
            hs = getattr(hs, "hidden_states", None)
            if hs is None or len(hs) < len(self.blocks):
                return None
            out.append(hs[:len(self.blocks)])
        return [torch.cat([o[i] for o in out]) for i in range(len(self.blocks))]

    def _loss_from(self, first):
        """The loss with blocks [first:] only, fed block `first`'s dense input. Per-layer config lists
        (Gemma's layer_types, indexed by position in the loop) are cut the same way meanwhile."""
        parent_path, _, attr = self.layout.blocks_path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        config, n = self.model.config, len(self.blocks)
        per_layer = {k: v for k, v in vars(config).items() if isinstance(v, (list, tuple)) and len(v) == n}
        setattr(parent, attr, nn.ModuleList(list(self.blocks)[first:]))
        for k, v in per_layer.items():
            setattr(config, k, v[first:])
        try:
            return mean_nll(self.model, self.held, inputs_embeds=self.inputs[first])
        finally:
            setattr(parent, attr, self.blocks)
            for k, v in per_layer.items():
                setattr(config, k, v)

    def _first_block(self, plan):
        prefix = self.layout.blocks_path + "."
        return min(int(name[len(prefix):].split(".", 1)[0]) for name in plan)

    def loss(self, plan):
        """Mean calibration loss on the held windows with `plan`'s linears projected (inf if the model
        collapses); the dense weights are back in place afterwards."""
        if not plan:
            return self.dense_loss
        try:
            with projected(self.model, plan, self.eig, self.out_mean):
                if self.inputs is None:
                    return mean_nll(self.model, self.held)
                return self._loss_from(self._first_block(plan))
        except NonFiniteError:
            return math.inf


def proxy_basis(module, moments, top, centered=False):
    """(top output eigenvectors of a linear on its input `moments`, in the weight's dtype and device; with
    `centered`, its mean output W m, else None): what the proxy projects the linear onto."""
    w = weight_matrix(module).detach()
    stats = moments.covariance() if centered else moments.second_moment()  # on --device, like the profiling
    w64 = w.to(device=stats.device, dtype=torch.float64)
    vecs = output_eigh(w64, stats, top=top)[1].to(device=w.device, dtype=w.dtype)  # scored where the model lives
    return vecs, ((w64 @ moments.mean()).to(device=w.device, dtype=w.dtype) if centered else None)


@contextlib.contextmanager
def projected(root, plan, eig, out_mean=None):
    """Within the block: each linear `name` of `plan` ({name: rank}, names relative to `root`) has its weight
    replaced by its projection onto its top `rank` output eigenvectors eig[name]; with out_mean[name], the
    mean of the dropped directions is restored in a bias (centred ROM). The dense weights are put back."""
    out_mean = out_mean or {}
    dense = {name: (root.get_submodule(name).weight.data, root.get_submodule(name).bias) for name in plan}
    try:
        for name, rank in plan.items():
            module, v = root.get_submodule(name), eig[name][:, :rank]
            p = v @ (v.T @ weight_matrix(module))
            module.weight.data = p if isinstance(module, nn.Linear) else p.T.contiguous()
            if name in out_mean:  # centred ROM restores the mean of the dropped directions in a bias
                u = out_mean[name]
                dropped = u - v @ (v.T @ u)
                module.bias = nn.Parameter(dropped if module.bias is None else module.bias + dropped,
                                           requires_grad=False)
        yield
    finally:
        for name, (weight, bias) in dense.items():
            module = root.get_submodule(name)
            module.weight.data, module.bias = weight, bias


def _split(tokens, n_profile, n_eval):
    profile, held = tokens[:n_profile], tokens[n_profile:n_profile + n_eval]
    if len(held) == 0:  # too few windows for a disjoint split: score on the profiled windows
        held = tokens[:n_eval]
    return profile, held


def _score_last_n(proxy, shapes, n_blocks, candidates, progress, **extra):
    """The proxy loss of each (last N, module budget) candidate of the paper's policy; N = 0 (nothing
    left for the blocks to remove) scores the model as it is."""
    return [{**extra, "last_blocks": last_n, "module_budget": b,
             "proxy_calib_loss": proxy.loss(last_blocks_plan(shapes, n_blocks, last_n, b)) if last_n else
             proxy.dense_loss}
            for last_n, b in tqdm(candidates, desc="last-N candidates", disable=not progress, leave=False)]


def _embedding_options(emb, total, budget, shapes, n_blocks, candidates, k):
    """{embedding rank or None (dense): the blocks' (N, b) candidates for the rest of the budget}.

    Each kept fraction of embedding.GRID gets a few (N, b); once the embedding alone can meet the
    budget, its largest rank that does is the last option (N = 0): smaller ones would cut more than asked."""
    options = {None: thin(candidates, k)} if candidates else {}
    for fraction in (EMBEDDING_GRID if emb is not None else ()):
        rank = emb.rank_for(fraction)
        if rank >= emb.dim:
            continue
        rest = (budget * total + emb.removed(rank)) / total
        if rest >= 1:
            while emb.removed(rank + 1) >= total - budget * total:
                rank += 1
            options[rank] = [(0, None)]
            break
        blocks = thin(feasible_last_n(rest, total, shapes, n_blocks), max(3, k // 3))
        if blocks:
            options[rank] = blocks
    return options


def _finalists(table):
    """The candidate of lowest proxy loss of each kind: the blocks alone, the embedding alone, both."""
    best = {}
    for row in table:
        kind = (row["embedding_rank"] is not None, bool(row["last_blocks"]))
        if kind not in best or row["proxy_calib_loss"] < best[kind]["proxy_calib_loss"]:
            best[kind] = row
    return list(best.values())


def _trial_windows(tokens, n_profile, n_eval, count):
    """Up to `count` calibration windows for trial compressions, none of them a scored (held) window."""
    if len(tokens) <= n_profile:  # no held-out windows (see _split): calibrate on the scored ones
        return tokens[:count]
    return torch.cat([tokens[:n_profile], tokens[n_profile + n_eval:]])[:count]


def trial_loss(model, layout, shapes, n_blocks, row, embedding, basis, calib, held, opts):
    """Calibration loss on `held` after the candidate `row` is applied for real: the embedding
    projected onto the top eigenvectors of `basis` (embedding_basis's, the proxy's), then the last N
    blocks compressed by the sequential loop (with `opts`: centring, factor form, sparse residual) on
    `calib`. Works on copies of those blocks and puts the dense ones back, so the model is unchanged
    afterwards."""
    blocks = model.get_submodule(layout.blocks_path)
    originals, weight = list(blocks), None
    plan = last_blocks_plan(shapes, n_blocks, row["last_blocks"], row["module_budget"]) if row["last_blocks"] else {}
    try:
        if row["embedding_rank"] is not None:
            weight = model.get_submodule(embedding.name).weight
            dense = weight.data
            vecs = basis[:, :row["embedding_rank"]].to(device=dense.device, dtype=dense.dtype)
            weight.data = (dense @ vecs) @ vecs.T
        for i in range(n_blocks - row["last_blocks"], n_blocks):
            blocks[i] = copy.deepcopy(originals[i])
        if plan:
            compress_blocks(model, layout, calib, plan, dataclasses.replace(
                opts, progress=False, pair_modules=pair_modules(shapes, plan)))
        return mean_nll(model, held)
    except NonFiniteError:
        return math.inf
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        if weight is not None:
            weight.data = dense


@torch.no_grad()
def choose_last_n(model, layout, shapes, n_blocks, candidates, tokens, opts, n_profile=32, n_eval=16, k=8,
                  embedding=None, total=None, budget=None, trial_windows=64, make_proxy=None):
    """Returns ((embedding rank or None, last_n, module_budget), info dict with the scored table and
    the seconds spent). last_n is 0 when the embedding alone meets the budget. Without `embedding`
    (an llmrom.embedding.EmbeddingShape; `total` and `budget` come with it) the embedding stays dense.

    The proxy is non-sequential: it cannot see how the sequential loop corrects later blocks for the
    errors of earlier ones, while it scores the embedding almost exactly, so kinds of candidates may be
    ranked unfairly against each other. The best candidate of each kind (blocks alone, embedding
    alone, both) is therefore compressed for real on `trial_windows` calibration windows and the
    lowest held-out loss wins (0: the proxy alone decides). The embedding's basis (with a tied head's
    input moment: embedding.embedding_basis) is computed once, on the profile windows, for both.

    `make_proxy(max_ranks, profile, held, plans)` replaces the in-memory ProjectionProxy by one that scores
    the given plans in advance (llmrom.loop.streamplan: a streamed model); blocks-only candidates then."""
    t0 = time.perf_counter()
    options = _embedding_options(embedding, total, budget, shapes, n_blocks, candidates, k)
    if not options:
        raise BudgetError(f"budget {budget:g} cannot be met by the last-N policy, even with the token embedding "
                          "factorized; raise --budget")
    profile, held = _split(tokens, n_profile, n_eval)
    flat = [c for cs in options.values() for c in cs if c[0]]
    widest = {}  # the largest rank any candidate asks of each linear (a speed limit drops some at some budgets)
    for n, b in flat:
        for name, r in last_blocks_plan(shapes, n_blocks, n, b).items():
            widest[name] = max(r, widest.get(name, 0))
    if make_proxy is None:
        proxy = ProjectionProxy(model, layout, widest, profile, held, opts)
    elif set(options) != {None}:
        raise ValueError("a proxy made in advance scores blocks-only candidates: pass embedding=None")
    else:
        proxy = make_proxy(widest, profile, held, [last_blocks_plan(shapes, n_blocks, n, b) for n, b in options[None]
                                                   if n])
    t_profiled = time.perf_counter()
    table = _score_last_n(proxy, shapes, n_blocks, options.get(None, []), opts.progress, embedding_rank=None)
    basis = None
    if any(r is not None for r in options):
        w = model.get_submodule(embedding.name).weight
        dense = w.data
        basis = embedding_basis(dense, profile, head_input_moment(model, embedding, profile))[1]
        vecs = basis.to(device=dense.device, dtype=dense.dtype)
        try:
            for rank, blocks in options.items():
                if rank is not None:
                    w.data = (dense @ vecs[:, :rank]) @ vecs[:, :rank].T
                    proxy.refresh()
                    table += _score_last_n(proxy, shapes, n_blocks, blocks, opts.progress, embedding_rank=rank)
        finally:
            w.data = dense  # the proxy is discarded: its cached inputs need no refresh
    finalists = _finalists(table)
    t_scored = time.perf_counter()
    if len(finalists) > 1 and trial_windows:
        calib = _trial_windows(tokens, n_profile, n_eval, trial_windows)
        for row in tqdm(finalists, desc="trial compressions", disable=not opts.progress, leave=False):
            row["trial_calib_loss"] = trial_loss(model, layout, shapes, n_blocks, row, embedding, basis, calib, held,
                                                 opts)
        best = min(finalists, key=lambda r: r["trial_calib_loss"])
        criterion = (f"calibration loss of the non-sequential ROM projection, then of a trial compression "
                     f"(on {len(calib)} windows) of the best candidate of each kind")
    else:
        best = min(table, key=lambda r: r["proxy_calib_loss"])
        criterion = "calibration loss of the non-sequential ROM projection"
    info = {"criterion": criterion, "profile_windows": len(profile), "scored_windows": len(held),
            "candidates": table, "from_cached_block_inputs": proxy.inputs is not None,
            "proxy": type(proxy).__name__,
            "seconds": time.perf_counter() - t0,
            "seconds_split": {"profile": round(t_profiled - t0, 3), "candidates": round(t_scored - t_profiled, 3),
                              "trials": round(time.perf_counter() - t_scored, 3)}}
    log.info("auto last-N choice: %s", best)
    return (best["embedding_rank"], best["last_blocks"], best["module_budget"]), info


def _block_plans(shapes, n_blocks, grid):
    """{block: {module budget: that block's plan}}; linears that would not shrink stay dense."""
    out = {i: {} for i in range(n_blocks)}
    for b in grid:
        for s in shapes:
            r = s.paper_rank(b)
            if s.worthwhile(r):
                out[s.block].setdefault(b, {})[s.name] = r
    return out


def knapsack(options, need, units=2000):
    """Pick one (removed, cost, label) option per item so that the removed amounts sum to >= `need`
    at the least total cost; returns the labels, or None if no choice removes enough.

    Removed amounts are rounded down to units of need / units, so the chosen set removes at least `need`."""
    unit = need / units
    inf = math.inf
    best, picks = [0.0] + [inf] * units, [[] for _ in range(units + 1)]
    for opts in options:
        new, new_picks = [inf] * (units + 1), [None] * (units + 1)
        for c, cost in enumerate(best):
            if cost == inf:
                continue
            for removed, extra, label in opts:
                c2 = min(units, c + int(removed // unit))
                if cost + extra < new[c2]:
                    new[c2], new_picks[c2] = cost + extra, picks[c] + [label]
        best, picks = new, new_picks
    return picks[units] if best[units] < inf else None


@torch.no_grad()
def choose_block_budgets(model, layout, shapes, total, budget, tokens, opts, centered=False, grid=GRID,
                         n_profile=32, n_eval=8, k=8):
    """Policy `loss`: (plan, info) with a module budget per block from measured loss increases."""
    t0 = time.perf_counter()
    n_blocks = len(model.get_submodule(layout.blocks_path))
    profile, held = _split(tokens, n_profile, n_eval)
    plans = _block_plans(shapes, n_blocks, grid)
    candidates = thin(feasible_last_n(budget, total, shapes, n_blocks), k)
    top = max(grid + tuple(b for _, b in candidates))
    proxy = ProjectionProxy(model, layout, {s.name: s.paper_rank(top) for s in shapes}, profile, held, opts,
                            centered)
    dense_loss = proxy.dense_loss
    increase = {}  # (block, module budget) -> proxy loss increase with only that block projected
    steps = [(i, b) for i in range(n_blocks) for b in plans[i]]
    for i, b in tqdm(steps, desc="block budgets", disable=not opts.progress, leave=False):
        increase[i, b] = proxy.loss(plans[i][b]) - dense_loss
    options = [[(0, 0.0, (i, 1.0))] + [(total - kept_params(total, shapes, plans[i][b]), increase[i, b], (i, b))
                                       for b in plans[i]] for i in range(n_blocks)]
    picks = knapsack(options, total - budget * total)
    if picks is None:
        raise BudgetError(f"budget {budget:g} cannot be met with module budgets {list(grid)} on every block; "
                          "raise --budget or use --policy last-blocks")
    plan = {name: r for i, b in picks if b < 1 for name, r in plans[i][b].items()}
    chosen = {"per_block": [b for _, b in picks], "proxy_calib_loss": proxy.loss(plan)}
    last_n = _score_last_n(proxy, shapes, n_blocks, candidates, opts.progress)
    best_last = min(last_n, key=lambda r: r["proxy_calib_loss"]) if last_n else None
    kept = "per-block"
    if best_last is not None and best_last["proxy_calib_loss"] < chosen["proxy_calib_loss"]:
        plan, kept = last_blocks_plan(shapes, n_blocks, best_last["last_blocks"], best_last["module_budget"]), "last-N"
    info = {"policy": "loss", "criterion": "per-block loss increase of the non-sequential ROM projection, "
                                           "summed and minimised under the budget",
            "grid": list(grid), "profile_windows": len(profile), "scored_windows": len(held),
            "dense_proxy_loss": dense_loss, "block_increase": {f"{i}@{b}": v for (i, b), v in increase.items()},
            "per_block_plan": chosen, "last_n_candidates": last_n, "kept": kept,
            "from_cached_block_inputs": proxy.inputs is not None,
            "seconds": time.perf_counter() - t0}
    log.info("policy loss: kept the %s plan (%s)", kept, chosen if kept == "per-block" else best_last)
    return plan, info
