"""--factors joint: linears that read the same input (q/k/v, gate/up) fitted as one stacked map through
one shared basis (JointFactorizedLinear + JointPart), planned within the budget, saved and loaded."""

import json

import pytest
import torch
import transformers

import llmrom
from llmrom.config import CompressConfig
from llmrom.eval.cost import count_params
from llmrom.factor.methods import rom
from llmrom.factor.stats import Moments
from llmrom.modeling.arch import layout_for
from llmrom.modeling.factorized import JOINT_FORMAT_VERSION, JointFactorizedLinear, JointPart, joint_modules
from llmrom.plan.choose import linear_shapes
from llmrom.plan.ranks import joint_plan, last_blocks_plan, stacked_shape

from conftest import TinyTokenizer, calib_tokens, tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("interp", [None, "in"])
def test_joint_module_shares_one_product_and_slices_the_stacked_map(interp):
    """Each member returns its rows of the stacked factorized map; members called in turn on the same tensor
    reuse the first member's product (one factorized product per group), another tensor gets its own;
    parameters are stored once, under the first member."""
    torch.manual_seed(0)
    root = torch.nn.Module()
    for n, d_out in (("q", 12), ("k", 4), ("v", 4)):
        root.add_module(n, torch.nn.Linear(16, d_out))
    joint = joint_modules(root, ["q", "k", "v"], [12, 4, 4], 6, True, interp=interp)
    with torch.no_grad():
        for p in joint.parameters():
            p.copy_(torch.randn_like(p))
        if interp:
            joint.stacked.order.copy_(torch.randperm(16).int())
    calls = []
    real = joint.products
    joint.products = lambda x: calls.append(x) or real(x)
    x, other = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    full = x @ joint.stacked.weight.T + joint.stacked.bias
    q, k, v = root.q(x), root.k(x), root.v(x)
    assert len(calls) == 1 and joint._last is None  # nothing kept once the last member read its part
    torch.testing.assert_close(torch.cat([q, k, v], -1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(root.k(other), other @ root.k.weight.T + root.k.bias, atol=1e-5, rtol=1e-5)
    assert len(calls) == 2
    assert isinstance(root.k, JointPart) and isinstance(root.q, JointFactorizedLinear)
    assert all(k.startswith("q.stacked.") for k in root.state_dict())
    torch.testing.assert_close(torch.cat([root.q.weight, root.k.weight, root.v.weight]), joint.stacked.weight)


def test_joint_factors_are_rom_of_the_stacked_map():
    """The joint group's factors are the paper's output PCA of [W_1; W_2] on their shared input: its error is
    no larger than two separate fits that store as many numbers between them."""
    torch.manual_seed(1)
    x = torch.randn(4000, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)
    w1, w2 = torch.randn(32, 24, dtype=torch.float64), torch.randn(32, 24, dtype=torch.float64)
    w2 = w2 + w1  # correlated outputs, as gate and up are
    m = Moments.zeros(24)
    m.update(x.float())
    stacked = torch.cat([w1, w2])
    f = rom(stacked, None, m, 12, centered=True)
    err = x @ stacked.T - (x @ f.first.T @ f.second.T + f.bias)
    assert float((err ** 2).sum(1).mean()) == pytest.approx(f.residual, rel=1e-6)
    budget = 12 * (24 + 64)
    rank = budget // (2 * (24 + 32))  # the separate pair ranks of the same stored numbers
    sep = sum(rom(w, None, m, rank, centered=True).residual for w in (w1, w2))
    assert f.residual < sep


def _shapes_and_plan(family, module_budget=0.5):
    model = tiny_model(family)
    layout = layout_for(model)
    shapes = linear_shapes(model, layout, centered=True, interp=True)
    return model, layout, shapes, last_blocks_plan(shapes, 2, 2, module_budget)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_joint_plan_spends_each_groups_share_and_never_more(family):
    model, layout, shapes, plan = _shapes_and_plan(family)
    joint_p, members = joint_plan(shapes, layout, plan)
    by_name = {s.name: s for s in shapes}
    assert members and all(joint_p[n] for n in members)
    groups = [g for g in layout.groups if len(g) > 1]
    assert len(members) == 2 * sum(len(g) for g in groups)  # every multi-linear group of both blocks
    for i in range(2):
        for g in groups:
            names = [f"{layout.blocks_path}.{i}.{n}" for n in g]
            ranks = {joint_p[n] for n in names}
            assert len(ranks) == 1
            r = ranks.pop()
            stacked = stacked_shape([by_name[n] for n in names])
            assert stacked.d_out == sum(by_name[n].d_out for n in names) and stacked.uses_interp(r)
            given = sum(by_name[n].factor_params(plan[n]) for n in names)
            assert stacked.factor_params(r) <= given < stacked.factor_params(r + 1)  # the largest rank that fits
    # single-linear groups keep their own ranks and forms
    assert all(joint_p[n] == plan[n] for n in plan if n not in members)


def test_joint_plan_leaves_unplanned_groups_and_unknown_layouts_alone():
    model, layout, shapes, plan = _shapes_and_plan("llama")
    only_o = {n: r for n, r in plan.items() if n.endswith("o_proj")}
    assert joint_plan(shapes, layout, only_o) == (only_o, frozenset())
    generic = type(layout)(layout.blocks_path, None, False)
    assert joint_plan(shapes, generic, plan) == (plan, frozenset())


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_joint_compression_meets_the_budget_and_saves_and_loads_exactly(family, tmp_path):
    """A whole run with --factors joint: the budget holds, every q/k/v and gate/up group is one joint module,
    and the folder loads with llmrom and with plain transformers (trust_remote_code) to the same logits."""
    dense = tiny_model(family)
    total = count_params(dense)
    model, report = llmrom.compress(tiny_model(family), TinyTokenizer(), CompressConfig(budget=0.8, factors="joint"),
                                    tokens=calib_tokens(), progress=False)
    assert count_params(model) <= 0.8 * total
    assert report["totals"]["parameters_after"] == count_params(model)
    joint = [m for m in model.modules() if isinstance(m, JointFactorizedLinear)]
    assert len(joint) == 2 * len([g for g in layout_for(dense).groups if len(g) > 1])
    assert sorted(report["plan"]["joint_modules"]) == sorted(
        r["name"] for r in report["modules"] if r["note"].startswith("joint"))
    # the records' parameters of the joint members add up to what the joint modules store (indices included)
    assert sum(r["params_after"] for r in report["modules"] if r["note"].startswith("joint")) == sum(
        p.numel() for m in joint for p in m.parameters()) + sum(m.stacked.stored_indices for m in joint)
    assert any(m.stacked.interp == "in" for m in joint)  # the default run stores them in the interpolative form
    ids = calib_tokens(2, 16, seed=7)
    want = logits(model, ids)
    llmrom.save(model, None, tmp_path / "out", report)
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["llmrom"]
    assert meta["format_version"] == JOINT_FORMAT_VERSION and len(meta["joint"]) == len(joint)
    loaded, _ = llmrom.load(tmp_path / "out")
    torch.testing.assert_close(logits(loaded, ids), want, atol=1e-5, rtol=1e-5)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    torch.testing.assert_close(logits(plain.eval(), ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{"correct": True}, {"sequential": False}, {"method": "whitened_svd",
                                                                               "centered": False}])
def test_joint_groups_with_other_calibrations(options):
    """--correct (toward the dense outputs), --no-sequential and the SVD-LLM baseline fit joint groups too;
    the dense export (no centring) merges each member back to its own weight."""
    model, report = llmrom.compress(tiny_model("qwen2"), TinyTokenizer(),
                                    CompressConfig(budget=0.8, factors="joint", **options), tokens=calib_tokens(),
                                    progress=False)
    assert any(isinstance(m, JointFactorizedLinear) for m in model.modules())
    assert report["totals"]["parameters_after"] == count_params(model) <= 0.8 * count_params(tiny_model("qwen2"))


def test_joint_dense_export_merges_each_member(tmp_path):
    model, report = llmrom.compress(tiny_model("qwen2"), TinyTokenizer(),
                                    CompressConfig(budget=0.8, factors="joint", centered=False),
                                    tokens=calib_tokens(), progress=False)
    ids = calib_tokens(2, 16, seed=3)
    want = logits(model, ids)
    llmrom.save(model, None, tmp_path / "dense", report, export_dense=True)
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(logits(dense.eval(), ids), want, atol=1e-5, rtol=1e-5)
