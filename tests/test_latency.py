"""--prefer speed: measured factor-form latencies, the kept-fraction limits they give, and plans that
factorize only where that is faster while the budget still holds exactly."""

import json
import logging

import pytest
import torch

from conftest import TinyTokenizer, calib_tokens, tiny_model
from llmrom import api
from llmrom.config import CompressConfig
from llmrom.errors import LlmromError
from llmrom.eval.cost import count_params
from llmrom.modeling.factorized import FactorizedLinear
from llmrom.plan import latency
from llmrom.plan.latency import FormLatency, MIN_KEPT, measure, speed_limits
from llmrom.plan.ranks import LinearShape, kept_params, last_blocks_plan, module_budget_for, pair_modules


def test_max_kept_is_where_the_line_meets_the_dense_time():
    lat = FormLatency(100.0, {"pair": (20.0, 1e-4), "interpolative": (60.0, 1e-4)})
    assert lat.max_kept("pair", 1_000_000) == pytest.approx(0.8)  # 20 + 1e-4 * 8e5 = 100
    assert lat.max_kept("interpolative", 1_000_000) == pytest.approx(0.4)
    assert FormLatency(100.0, {"pair": (95.0, 1e-4)}).max_kept("pair", 1_000_000) == 0.0  # only below MIN_KEPT
    assert FormLatency(100.0, {"pair": (100.0 - MIN_KEPT * 100, 1e-4)}).max_kept("pair", 1_000_000) == \
        pytest.approx(MIN_KEPT)
    assert FormLatency(100.0, {"pair": (20.0, -1e-6)}).max_kept("pair", 1_000_000) == 0.0  # a falling line
    assert FormLatency(100.0, {"pair": (0.0, 1e-6)}).max_kept("pair", 1_000_000) == 1.0  # capped at dense
    # rounded down to LIMIT_STEP, so jitter of a few percent in the timings does not change the plan
    assert FormLatency(100.0, {"pair": (20.0, 1.02e-4)}).max_kept("pair", 1_000_000) == pytest.approx(0.75)
    assert FormLatency(100.0, {"pair": (20.0, 0.98e-4)}).max_kept("pair", 1_000_000) == pytest.approx(0.8)


@pytest.mark.measured_latency
def test_measurement_is_cached_per_machine_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMROM_CACHE", str(tmp_path))
    shapes = [LinearShape("a", 0, 48, 32), LinearShape("b", 0, 48, 32, interp=True), LinearShape("c", 1, 32, 48)]
    first = measure(shapes, progress=False)
    assert set(first) == {(48, 32), (32, 48)}
    for lat in first.values():
        assert lat.dense_us > 0 and set(lat.lines) == {"pair", "interpolative"}
    stored = json.loads((tmp_path / latency.CACHE_NAME).read_text())
    (key, entries), = stored.items()
    assert "cpu" in key and "float32" in key and set(entries) == {"48x32", "32x48"}
    monkeypatch.setattr(latency, "measure_shape", lambda *a: pytest.fail("measured again despite the cache"))
    assert measure(shapes, progress=False) == first
    limits = speed_limits(shapes, "speed")
    assert set(limits) == {"a", "b", "c"} and all(0 <= v <= 1 for pair in limits.values() for v in pair)
    assert speed_limits(shapes, "quality") == {}
    with pytest.raises(LlmromError, match="--prefer must be one of speed, quality"):
        speed_limits(shapes, "fast")


@pytest.mark.measured_latency
def test_joint_groups_are_measured_as_groups_and_limit_their_members(tmp_path, monkeypatch):
    """--factors joint: a grouped linear's limit is its group's joint form against the dense group (cached
    under the group's shape); the single linears keep their own forms' limits."""
    monkeypatch.setenv("LLMROM_CACHE", str(tmp_path))
    shapes = [LinearShape("q", 0, 48, 32), LinearShape("k", 0, 48, 16), LinearShape("o", 0, 32, 48)]
    groups = {"q": (48, (32, 16)), "k": (48, (32, 16))}
    limits = speed_limits(shapes, "speed", groups=groups)
    (key, entries), = json.loads((tmp_path / latency.CACHE_NAME).read_text()).items()
    assert set(entries) == {"48x32+16", "32x48"} and set(entries["48x32+16"]["lines"]) == {"joint"}
    assert limits["q"] == limits["k"] and limits["q"][0] == limits["q"][1]
    joint = latency.measure_groups({(48, (32, 16))}, progress=False)[48, (32, 16)]
    assert limits["q"][0] == joint.max_kept("joint", 48 * 48)
    assert limits["o"] == speed_limits(shapes[2:], "speed")["o"]


def _shapes(limit_kv):
    """Two blocks of a GQA-like layout: q 64x64, k 64x16 (limit `limit_kv`), mlp 64x128 and 128x64."""
    out = []
    for b in range(2):
        out += [LinearShape(f"b{b}.q", b, 64, 64), LinearShape(f"b{b}.k", b, 64, 16, max_kept=limit_kv),
                LinearShape(f"b{b}.up", b, 64, 128, max_kept=0.7), LinearShape(f"b{b}.down", b, 128, 64)]
    return out


def test_limited_linears_stay_dense_and_the_rest_meet_the_budget_exactly():
    shapes, total = _shapes(0.0), 40_000
    plan = last_blocks_plan(shapes, 2, 2, 0.8)
    assert not any(n.endswith(".k") or n.endswith(".up") for n in plan)  # k never faster; up only below 0.7
    assert set(plan) == {"b0.q", "b0.down", "b1.q", "b1.down"}
    plan = last_blocks_plan(shapes, 2, 2, 0.5)
    assert {n for n in plan if n.endswith(".up")} == {"b0.up", "b1.up"}
    b = module_budget_for(0.8, total, shapes, 2, 2)
    assert kept_params(total, shapes, last_blocks_plan(shapes, 2, 2, b)) <= 0.8 * total
    assert kept_params(total, shapes, last_blocks_plan(shapes, 2, 2, b + 2e-3)) > 0.8 * total
    unlimited = [LinearShape(s.name, s.block, s.d_in, s.d_out) for s in shapes]
    assert module_budget_for(0.8, total, unlimited, 2, 2) > b  # fewer linears cut: each cut deeper


def _compress(monkeypatch, limit, budget=0.8, **cfg):
    monkeypatch.setattr("llmrom.plan.choose.speed_limits",
                        lambda shapes, prefer, *a, **k: {} if prefer == "quality" else {
                            s.name: (limit(s), limit(s)) for s in shapes})
    model = tiny_model("llama")
    total = count_params(model)
    cfg = {"factors": "interpolative", **cfg}  # each linear alone: its own form's limit (joint groups: below)
    config = CompressConfig(budget=budget, nsamples=12, seqlen=16, plan_trials=0, **cfg)
    model, report = api.compress(model, TinyTokenizer(), config, progress=False, tokens=calib_tokens())
    return model, report, total


def test_speed_plan_keeps_slow_linears_dense_and_holds_the_budget(monkeypatch):
    model, report, total = _compress(monkeypatch, lambda s: 0.0 if s.d_out < s.d_in else 1.0,
                                     embedding_budget=1.0, last_blocks=2)
    factorized = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    assert factorized and not any(n.endswith(("k_proj", "v_proj", "down_proj")) for n in factorized)
    assert count_params(model) <= 0.8 * total
    assert report["plan"]["speed_limits"]["prefer"] == "speed"
    assert report["plan"]["speed_limits"]["max_kept_by_shape"] == {
        "64x32": {"pair": 0.0, "interpolative": 0.0}, "128x64": {"pair": 0.0, "interpolative": 0.0}}


def test_speed_plan_that_cannot_meet_the_budget_plans_for_quality_and_says_so(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        model, report, total = _compress(monkeypatch, lambda s: 0.0, budget=0.7, embedding_budget=1.0)
    assert count_params(model) <= 0.7 * total  # the budget holds
    assert report["plan"]["speed_limits"]["relaxed"] is True
    assert "planned for quality instead" in caplog.text


def test_quality_preference_and_explicit_ranks_are_not_limited(monkeypatch):
    model, report, _ = _compress(monkeypatch, lambda s: 0.0, prefer="quality", embedding_budget=1.0, last_blocks=2)
    assert "speed_limits" not in report["plan"]
    model, report, _ = _compress(monkeypatch, lambda s: 0.0, budget=None, last_blocks=1, module_budget=0.5)
    assert "speed_limits" not in report["plan"]
    assert sum(isinstance(m, FactorizedLinear) for m in model.modules()) == 7


def test_bad_preference_is_one_clear_line():
    with pytest.raises(LlmromError, match="--prefer must be one of speed, quality, got 'fast'"):
        CompressConfig(budget=0.8, prefer="fast")


@pytest.mark.parametrize("interp", [None, "in", "out"])
def test_fast_forward_equals_the_forward_through_the_factor_modules(interp):
    torch.manual_seed(0)
    m = FactorizedLinear(24, 40 if interp != "out" else 12, 9, True, interp=interp)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        if interp:
            m.order.copy_(torch.randperm(m.order.numel()).to(torch.int32))
    x = torch.randn(3, 5, 24)
    fast = m(x)
    assert fast.shape == (3, 5, m.out_features)
    torch.testing.assert_close(fast, m._forward_modules(x), rtol=1e-5, atol=1e-5)
    second, first = m.factor_matrices()
    torch.testing.assert_close(fast, x @ (second @ first).T + m.bias, rtol=1e-4, atol=1e-4)


def test_interpolative_above_its_limit_falls_back_to_the_pair_where_that_is_fast():
    free = LinearShape("q", 0, 576, 576, interp=True)
    limited = LinearShape("q", 0, 576, 576, interp=True, max_kept=0.8, interp_max_kept=0.5)
    assert limited.paper_rank(0.4) == free.paper_rank(0.4) and limited.uses_interp(limited.paper_rank(0.4))
    r = limited.paper_rank(0.7)  # interpolative only below 0.5: the pair's rank at 0.7, stored as a pair
    assert r == LinearShape("q", 0, 576, 576).paper_rank(0.7) and not limited.uses_interp(r)
    assert limited.worthwhile(r) and limited.factor_params(r) <= 0.7 * 576 * 576
    assert not limited.worthwhile(limited.paper_rank(0.85))  # neither form is fast there
    plan = {"q": r, "k": 40}
    shapes = [limited, LinearShape("k", 0, 576, 192, interp=True)]
    assert pair_modules(shapes, plan) == {"q"}  # the loop stores it as a pair


def test_fallen_back_pairs_are_stored_as_pairs_and_the_budget_holds(monkeypatch):
    model, report, total = _compress(monkeypatch, lambda s: 0.95, embedding_budget=1.0, last_blocks=2)
    assert "pair_modules" not in report["plan"]
    monkeypatch.setattr("llmrom.plan.choose.speed_limits", lambda shapes, prefer, *a, **k: {
        s.name: (0.95, 0.3 if s.name.endswith("q_proj") else 0.95) for s in shapes})
    model = tiny_model("llama")
    config = CompressConfig(budget=0.8, nsamples=12, seqlen=16, plan_trials=0, embedding_budget=1.0, last_blocks=2,
                            factors="interpolative")
    model, report = api.compress(model, TinyTokenizer(), config, progress=False, tokens=calib_tokens())
    pairs = set(report["plan"]["pair_modules"])
    assert pairs == {n for n, m in model.named_modules() if isinstance(m, FactorizedLinear) and n.endswith("q_proj")}
    assert all(model.get_submodule(n).interp is None for n in pairs)
    others = [m for n, m in model.named_modules() if isinstance(m, FactorizedLinear) and n not in pairs]
    assert others and all(m.interp is not None for m in others if m.rank * m.rank > min(m.in_features, m.out_features))
    assert count_params(model) <= 0.8 * total


@pytest.mark.parametrize("interp", [None, "in", "out"])
def test_every_form_compiles_as_one_graph_with_the_same_output(interp):
    """The saved modeling file's forward works under torch.compile without graph breaks (the fast path
    a user may choose; docs/speed.md)."""
    torch.manual_seed(0)
    m = FactorizedLinear(24, 40 if interp != "out" else 12, 9, True, interp=interp)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        x = torch.randn(2, 3, 24)
        torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x))


def test_joint_groups_compile_as_one_graph_with_the_same_output():
    """A joint group's members, called in turn on one tensor as attention calls them, compile without graph
    breaks (the kept product is an attribute the compiled graph writes and reads) and compute the same."""
    from llmrom.modeling.factorized import joint_modules
    torch.manual_seed(0)
    root = torch.nn.Module()
    for n, d_out in (("q", 24), ("k", 8), ("v", 8)):
        root.add_module(n, torch.nn.Linear(24, d_out))
    joint = joint_modules(root, ["q", "k", "v"], [24, 8, 8], 12, True, interp="in")
    with torch.no_grad():
        for p in joint.parameters():
            p.normal_()
        x = torch.randn(2, 3, 24)

        def attention_inputs(h):
            return root.q(h), root.k(h), root.v(h)

        for got, want in zip(torch.compile(attention_inputs, fullgraph=True)(x), attention_inputs(x)):
            torch.testing.assert_close(got, want)
    assert joint._last is None


def test_speed_plan_with_joint_groups_uses_the_groups_limit(monkeypatch):
    """--factors joint (the default) with --prefer speed: the members of q/k/v and gate/up take the limit their
    group's joint form was measured at; the report names it by the group's shape."""
    monkeypatch.setattr("llmrom.plan.choose.speed_limits", lambda shapes, prefer, dtype, device, progress, groups: {
        s.name: ((0.9, 0.9) if s.name in (groups or {}) else (0.0, 0.0)) for s in shapes})
    model = tiny_model("llama")
    total = count_params(model)
    config = CompressConfig(budget=0.85, nsamples=12, seqlen=16, plan_trials=0, embedding_budget=1.0, last_blocks=2)
    model, report = api.compress(model, TinyTokenizer(), config, progress=False, tokens=calib_tokens())
    assert not any(isinstance(m, FactorizedLinear) and not n.endswith(".stacked") for n, m in model.named_modules())
    assert len(report["plan"]["joint_modules"]) == 2 * 5 and count_params(model) <= 0.85 * total
    assert report["plan"]["speed_limits"]["max_kept_by_shape"] == {
        "64x64+32+32 (joint)": {"pair": 0.9, "interpolative": 0.9}, "64x128+128 (joint)": {"pair": 0.9,
                                                                                        "interpolative": 0.9},
        "64x64": {"pair": 0.0, "interpolative": 0.0}, "128x64": {"pair": 0.0, "interpolative": 0.0}}
