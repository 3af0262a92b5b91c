"""Choose the paper's (last N blocks, module budget b) for a whole-model budget automatically.

The paper picked N by hand. Every feasible N has one b that meets the budget; we score a handful of
them by a cheap proxy: profile the dense model once on a few calibration windows (input moments of
every linear), project each candidate's linears onto their top output eigenvectors (the
non-sequential ROM, a weight edit, no re-calibration), and measure the calibration loss on other
calibration windows. The candidate with the lowest loss wins; the table goes into the report.
"""

import logging
import math
import time

import torch
from tqdm.auto import tqdm

from .arch import weight_matrix
from .errors import NonFiniteError
from .methods import output_eigh
from .perplexity import mean_nll
from .pipeline import profile_blocks
from .ranks import last_blocks_plan

log = logging.getLogger(__name__)


def thin(candidates, k):
    """At most k candidates evenly spread over the feasible N (always keeping the smallest and largest)."""
    if len(candidates) <= k:
        return candidates
    idx = sorted({round(i * (len(candidates) - 1) / (k - 1)) for i in range(k)})
    return [candidates[i] for i in idx]


@torch.no_grad()
def choose_last_n(model, layout, shapes, n_blocks, candidates, tokens, opts, n_profile=32, n_eval=16, k=8):
    """Returns ((last_n, module_budget), info dict with the scored table and the seconds spent)."""
    t0 = time.perf_counter()
    candidates = thin(candidates, k)
    profile, held = tokens[:n_profile], tokens[n_profile:n_profile + n_eval]
    if len(held) == 0:  # too few windows for a disjoint split: score on the profiled windows
        held = tokens[:n_eval]
    widest = last_blocks_plan(shapes, n_blocks, max(n for n, _ in candidates), 0.5)
    eig, saved = {}, {}
    for _, moments in profile_blocks(model, layout, profile, opts):  # one block's moments at a time
        for name in (n for n in moments if n in widest):
            w = weight_matrix(model.get_submodule(name))
            eig[name] = output_eigh(w.detach().to(torch.float64), moments[name].second_moment())[1].to(w.dtype)
            saved[name] = w.detach().clone()
        del moments
    table = []
    try:
        for last_n, b in tqdm(candidates, desc="candidates", disable=not opts.progress, leave=False):
            plan = last_blocks_plan(shapes, n_blocks, last_n, b)
            for name, rank in plan.items():
                v = eig[name][:, :rank]
                weight_matrix(model.get_submodule(name)).copy_(v @ (v.T @ saved[name]))
            try:
                loss = mean_nll(model, held)
            except NonFiniteError:  # this candidate collapses the model: it scores infinitely bad
                loss = math.inf
            table.append({"last_blocks": last_n, "module_budget": b, "proxy_calib_loss": loss})
            for name in plan:
                weight_matrix(model.get_submodule(name)).copy_(saved[name])
    finally:
        for name, w in saved.items():
            weight_matrix(model.get_submodule(name)).copy_(w)
    best = min(table, key=lambda r: r["proxy_calib_loss"])
    info = {"criterion": "calibration loss of the non-sequential ROM projection", "profile_windows": len(profile),
            "scored_windows": len(held), "candidates": table, "seconds": time.perf_counter() - t0}
    log.info("auto last-N choice: %s", best)
    return (best["last_blocks"], best["module_budget"]), info
