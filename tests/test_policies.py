"""Rank allocation policies: budgets met exactly, the right modules kept dense, the right ones cut."""

import copy

import pytest
import torch

import llmrom
from llmrom.config import CompressConfig
from llmrom.errors import LlmromError
from llmrom.policies import threshold_plan
from llmrom.ranks import LinearShape, kept_params

from conftest import TinyTokenizer, calib_tokens, tiny_model


def shapes_and_scores():
    shapes = [LinearShape(f"m{i}", i, 64, 64) for i in range(4)]
    flat = torch.ones(64)
    steep = torch.logspace(0, -6, 64)
    return shapes, {"m0": flat, "m1": steep, "m2": steep.sqrt(), "m3": flat * 0.5}


@pytest.mark.parametrize("budget", [0.95, 0.8, 0.6, 0.4])
def test_threshold_plan_meets_the_budget_tightly(budget):
    shapes, scores = shapes_and_scores()
    total = 4 * 64 * 64 + 1000  # plus parameters no policy touches
    plan, tau = threshold_plan(scores, shapes, total, budget)
    kept = kept_params(total, shapes, plan)
    assert kept <= budget * total
    assert kept > budget * total - 2 * 128  # integer ranks: within two rank-1 units of the target
    assert all(s.worthwhile(plan[s.name]) for s in shapes if s.name in plan)


def test_steep_spectra_are_cut_first_and_flat_ones_stay_dense():
    shapes, scores = shapes_and_scores()
    plan, _ = threshold_plan(scores, shapes, 4 * 64 * 64, 0.8)
    assert "m0" not in plan and "m3" not in plan  # flat: no rank that pays off keeps them close
    assert plan["m1"] < plan["m2"]


def test_unreachable_budget_is_refused():
    shapes, scores = shapes_and_scores()
    with pytest.raises(LlmromError, match="rank 1"):
        threshold_plan(scores, shapes, 4 * 64 * 64 + 10**6, 0.3)


@pytest.mark.parametrize("policy", ["welore", "global"])
def test_policies_compress_a_model_within_budget(policy):
    dense = tiny_model("qwen2")
    total = sum(p.numel() for p in dense.parameters())
    cfg = CompressConfig(budget=0.85, policy=policy, nsamples=8, seqlen=16)
    model, report = llmrom.compress(copy.deepcopy(dense), TinyTokenizer(), cfg, tokens=calib_tokens(), progress=False)
    kept = report["totals"]["parameters_after"]
    assert kept <= 0.85 * total and kept == sum(p.numel() for p in model.parameters())
    assert report["plan"]["policy"] == policy and report["plan"]["modules_factorized"] == \
        report["totals"]["modules_factorized"] > 0
    with torch.no_grad():
        assert torch.isfinite(model(calib_tokens(2)).logits).all()


def test_global_policy_is_data_aware():
    """Two calibration sets with different statistics give different allocations."""
    dense = tiny_model("llama")
    plans = []
    for tokens in (calib_tokens(seed=0), torch.full((12, 16), 7) + torch.arange(16) % 3):
        _, report = llmrom.compress(copy.deepcopy(dense), TinyTokenizer(),
                                    CompressConfig(budget=0.85, policy="global", nsamples=8, seqlen=16),
                                    tokens=tokens, progress=False)
        plans.append({m["name"]: m["rank"] for m in report["modules"]})
    assert plans[0] != plans[1]


@pytest.mark.parametrize("where,policy", [("policies", "global"), ("autoplan", "last-blocks")],
                         ids=["global-policy", "automatic-last-N"])
def test_profiling_holds_one_block_of_statistics(monkeypatch, where, policy):
    """Both profiling passes (the global policy's, the automatic last-N choice's) turn each block's
    moments into spectra before the next block's exist."""
    import importlib
    import weakref

    from llmrom import pipeline
    from llmrom.stats import Moments

    module = importlib.import_module(f"llmrom.{where}")
    refs = []  # weak references to every Moments made (a dataclass: not hashable, so no WeakSet)

    class Tracked(Moments):
        @classmethod
        def zeros(cls, dim, device="cpu"):
            m = super().zeros(dim, device)
            refs.append(weakref.ref(m))
            return m

    seen, real_eigh = [], module.output_eigh
    monkeypatch.setattr(pipeline, "Moments", Tracked)
    monkeypatch.setattr(module, "output_eigh", lambda w, s, **kw: (seen.append(sum(r() is not None for r in refs)),
                                                                   real_eigh(w, s, **kw))[1])
    dense = tiny_model("llama")
    _, report = llmrom.compress(copy.deepcopy(dense), TinyTokenizer(),
                                CompressConfig(budget=0.85, policy=policy, nsamples=8, seqlen=16),
                                tokens=calib_tokens(), progress=False)
    n_blocks, groups = len(dense.model.layers), 4  # q/k/v, o, gate/up, down
    assert len(seen) >= 7 and max(seen) <= groups  # never two blocks' moments at once
    if where == "autoplan":  # the automatic choice: the candidate with the lowest proxy loss, within budget
        auto = report["plan"]["auto"]
        best = min(auto["candidates"], key=lambda c: c["proxy_calib_loss"])
        assert report["plan"]["last_blocks"] == best["last_blocks"] and report["totals"]["kept_fraction"] <= 0.85
    else:
        assert len(seen) == 7 * n_blocks


def test_policy_needs_a_bare_budget():
    with pytest.raises(LlmromError, match="--budget alone"):
        CompressConfig(budget=0.8, policy="global", last_blocks=2)
    with pytest.raises(LlmromError, match="unknown --policy"):
        CompressConfig(budget=0.8, policy="magic")
