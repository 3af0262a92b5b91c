"""Rank allocation policies: budgets met exactly, the right modules kept dense, the right ones cut."""

import copy

import pytest
import torch

import llmrom
from llmrom.eval.cost import count_params
from llmrom.modeling.arch import weight_matrix
from llmrom.config import CompressConfig
from llmrom.errors import LlmromError
from llmrom.plan.policies import threshold_plan
from llmrom.plan.ranks import LinearShape, kept_params

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
    cfg = CompressConfig(budget=0.85, policy=policy, nsamples=8, seqlen=16, factors="interpolative")
    model, report = llmrom.compress(copy.deepcopy(dense), TinyTokenizer(), cfg, tokens=calib_tokens(), progress=False)
    kept = report["totals"]["parameters_after"]
    assert kept <= 0.85 * total and kept == count_params(model)
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
                                    CompressConfig(budget=0.85, policy="global", nsamples=8, seqlen=16,
                                                   factors="interpolative"),
                                    tokens=tokens, progress=False)
        plans.append({m["name"]: m["rank"] for m in report["modules"]})
    assert plans[0] != plans[1]


@pytest.mark.parametrize("where,policy", [("plan.policies", "global"), ("plan.autoplan", "last-blocks")],
                         ids=["global-policy", "automatic-last-N"])
def test_profiling_holds_one_block_of_statistics(monkeypatch, where, policy):
    """Both profiling passes (the global policy's, the automatic last-N choice's) turn each block's
    moments into spectra before the next block's exist."""
    import importlib
    import weakref

    from llmrom.loop import pipeline
    from llmrom.factor.stats import Moments

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
                                CompressConfig(budget=0.85, policy=policy, nsamples=8, seqlen=16,
                                               factors="interpolative"),
                                tokens=calib_tokens(), progress=False)
    n_blocks, groups = len(dense.model.layers), 4  # q/k/v, o, gate/up, down
    assert len(seen) >= 7 and max(seen) <= groups  # never two blocks' moments at once
    if where == "plan.autoplan":  # the automatic choice: the finalist with the lowest trial loss, within budget
        auto = report["plan"]["auto"]
        best = min((c for c in auto["candidates"] if "trial_calib_loss" in c), key=lambda c: c["trial_calib_loss"])
        assert report["plan"]["last_blocks"] == best["last_blocks"] and report["totals"]["kept_fraction"] <= 0.85
    else:
        assert len(seen) == 7 * n_blocks


def test_policy_needs_a_bare_budget():
    with pytest.raises(LlmromError, match="--budget alone"):
        CompressConfig(budget=0.8, policy="global", last_blocks=2)
    with pytest.raises(LlmromError, match="unknown --policy"):
        CompressConfig(budget=0.8, policy="magic")


def test_knapsack_finds_the_cheapest_choice_that_removes_enough():
    import itertools

    from llmrom.plan.autoplan import knapsack
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        units = 40
        options = [[(0, 0.0, (i, "dense"))] + [(int(torch.randint(0, 25, (1,), generator=g)),
                                                float(torch.rand(1, generator=g)), (i, j)) for j in range(3)]
                   for i in range(4)]
        need = units  # one unit per parameter here, so the rounding down inside cannot matter
        picks = knapsack(options, need, units=units)
        feasible = [c for c in itertools.product(*options) if sum(o[0] for o in c) >= need]
        if not feasible:
            assert picks is None
            continue
        by_label = {o[2]: o for opts in options for o in opts}
        assert sum(by_label[p][0] for p in picks) >= need
        assert sum(by_label[p][1] for p in picks) == pytest.approx(min(sum(o[1] for o in c) for c in feasible))


@pytest.mark.parametrize("centered", [False, True], ids=["uncentred", "centred"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_projection_proxy_scores_what_non_sequential_rom_gives(family, centered, tmp_path):
    """A plan's proxy score is the loss of the model compressed by non-sequential ROM with those ranks
    (centred: with the mean of the dropped directions in a bias), whether it runs from a cached block
    input (every family whose forward accepts it unchanged) or from the tokens (GPT-2 adds positions);
    and the dense weights are back in place afterwards."""
    import json

    from llmrom.modeling.arch import layout_for
    from llmrom.plan.autoplan import ProjectionProxy
    from llmrom.eval.perplexity import mean_nll

    model = tiny_model(family)
    layout = layout_for(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = f"{layout.blocks_path}.1.{layout.groups[-1][0]}"  # the MLP's output linear of block 1
    profile, held = calib_tokens(), calib_tokens(seed=1)
    with torch.no_grad():
        proxy = ProjectionProxy(model, layout, {name: 4}, profile, held,
                                CompressConfig(budget=0.9).loop_options(progress=False), centered)
        assert (proxy.inputs is None) == (family == "gpt2")
        assert proxy.eig[name].shape[1] == 4  # truncated at the largest rank asked for
        loss = proxy.loss({name: 3})
        assert set(model.state_dict()) == set(before)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert loss != pytest.approx(proxy.dense_loss, rel=1e-6)
    (tmp_path / "ranks.json").write_text(json.dumps({name: 3}))
    cfg = CompressConfig(ranks_file=str(tmp_path / "ranks.json"), sequential=False, centered=centered,
                         nsamples=len(profile), seqlen=profile.shape[1])
    compressed, _ = llmrom.compress(model, TinyTokenizer(), cfg, tokens=profile, progress=False)
    assert loss == pytest.approx(mean_nll(compressed, held), rel=1e-5)


@pytest.mark.parametrize("with_last_n", [True, False], ids=["against-last-N", "per-block-only"])
def test_loss_policy_meets_the_budget_with_one_module_budget_per_block(monkeypatch, with_last_n):
    from llmrom.plan import autoplan
    if not with_last_n:  # nothing to compare with: the per-block plan itself must come out
        monkeypatch.setattr(autoplan, "feasible_last_n", lambda *a: [])
    dense = tiny_model("qwen2")
    total = sum(p.numel() for p in dense.parameters())
    cfg = CompressConfig(budget=0.8, policy="loss", nsamples=12, seqlen=16, factors="interpolative")
    model, report = llmrom.compress(copy.deepcopy(dense), TinyTokenizer(), cfg, tokens=calib_tokens(n=40),
                                    progress=False)
    plan = report["plan"]
    assert report["totals"]["parameters_after"] <= 0.8 * total
    assert plan["policy"] == "loss" and len(plan["block_increase"]) == 3 * len(dense.model.layers)
    per_block = plan["per_block_plan"]
    best_last = min((c["proxy_calib_loss"] for c in plan["last_n_candidates"]), default=float("inf"))
    if plan["kept"] == "per-block":
        assert per_block["proxy_calib_loss"] <= best_last
        shapes = {m["name"]: m for m in report["modules"]}
        for name, m in shapes.items():
            b = per_block["per_block"][int(name.split(".")[2])]
            shape = LinearShape(name, 0, m["d_in"], m["d_out"], interp=True)
            want = shape.paper_rank(b) if b < 1 and shape.worthwhile(shape.paper_rank(b)) else None
            assert m["rank"] == want, name
    else:
        assert with_last_n and best_last < per_block["proxy_calib_loss"]
