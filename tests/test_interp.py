"""The interpolative form of the factors: the same map as the pair, r^2 - d_out fewer stored numbers."""

import json

import pytest
import torch
import transformers

import llmrom
from llmrom.config import CompressConfig
from llmrom.eval.cost import count_params, linear_macs_per_token
from llmrom.errors import LlmromError
from llmrom.modeling.factorized import INTERP_FORMAT_VERSION, FactorizedLinear
from llmrom.factor.interp import interpolative, maxvol_rows, side_for
from llmrom.plan.ranks import LinearShape

from conftest import TinyTokenizer, calib_tokens, tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("d_out,rank,d_in", [(48, 20, 64), (48, 47, 16), (200, 60, 64), (16, 3, 96)])
def test_interpolative_form_is_the_same_matrix(d_out, rank, d_in):
    """P [I; C] A' equals B A; the identity really sits in `rank` rows, and no |C| exceeds 2 (maxvol)."""
    torch.manual_seed(d_out + rank)
    b = torch.randn(d_out, rank, dtype=torch.float64) * torch.logspace(0, -3, rank, dtype=torch.float64)
    a = torch.randn(rank, d_in, dtype=torch.float64)
    first, coef, order = interpolative(b, a)
    assert first.shape == (rank, d_in) and coef.shape == (d_out - rank, rank) and order.dtype == torch.int32
    assert sorted(order.tolist()) == list(range(d_out))
    full = torch.cat([torch.eye(rank, dtype=torch.float64), coef]).index_select(0, order)
    torch.testing.assert_close(full @ first, b @ a, atol=1e-10, rtol=1e-10)
    assert float(coef.abs().max()) <= 2 + 1e-9


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("d_in,d_out,rank", [(64, 48, 20), (16, 96, 10), (40, 40, 39)])
def test_module_in_either_form_computes_the_factors_map(side, d_in, d_out, rank):
    """FactorizedLinear with the identity on either side: forward, merged weight and bias equal the
    pair's B A x + c, with the side's min(d_in, d_out)-or-other index count."""
    torch.manual_seed(rank)
    b, a, c = torch.randn(d_out, rank), torch.randn(rank, d_in), torch.randn(d_out)
    m = FactorizedLinear(d_in, d_out, rank, True, interp=side)
    first, second, order = interpolative(b, a, side)
    with torch.no_grad():
        m.first.weight.copy_(first)
        m.second.weight.copy_(second)
        m.order.copy_(order)
        m.bias.copy_(c)
        x = torch.randn(3, 5, d_in)
        torch.testing.assert_close(m(x), x @ (b @ a).T + c, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.weight, b @ a, atol=1e-4, rtol=1e-4)
    assert m.stored_indices == (d_in if side == "in" else d_out)
    stored = sum(p.numel() for p in m.parameters()) - d_out
    assert stored == rank * (d_in + d_out - rank)
    assert side_for(d_in, d_out) == ("in" if d_in <= d_out else "out")


def test_maxvol_swaps_away_a_bad_pivot():
    """LU's pivots alone can leave |C| large; the swaps bring it to <= 1 + tol."""
    torch.manual_seed(0)
    b = torch.randn(60, 10, dtype=torch.float64)
    rows, coef = maxvol_rows(b, tol=0.01)
    assert float(coef.abs().max()) <= 1.01 + 1e-9
    torch.testing.assert_close(coef[rows], torch.eye(10, dtype=torch.float64))
    _, coef_lu = maxvol_rows(b, max_swaps=0)
    assert float(coef_lu.abs().max()) > 1.01  # this matrix needed the swaps: the test would catch their loss


def test_singular_second_factor_is_refused_by_name():
    b = torch.zeros(10, 3)
    with pytest.raises(torch.linalg.LinAlgError):
        interpolative(b, torch.randn(3, 5))


@pytest.mark.parametrize("d_in,d_out", [(64, 64), (64, 16), (16, 96), (576, 1536)])
def test_budget_buys_the_largest_rank_that_fits(d_in, d_out):
    pair = LinearShape("m", 0, d_in, d_out)
    interp = LinearShape("m", 0, d_in, d_out, interp=True)
    for b in (0.1, 0.3, 0.5, 0.8, 0.9):
        r = interp.paper_rank(b)
        side = min(d_in, d_out)
        want = r * (d_in + d_out - r) + side if r * r > side else r * (d_in + d_out)  # the cheaper form
        assert interp.factor_params(r) == want
        assert interp.factor_params(r) <= b * d_in * d_out
        if r + 1 < min(d_in, d_out):
            assert interp.factor_params(r + 1) > b * d_in * d_out
        assert r >= pair.paper_rank(b)
    assert interp.paper_rank(0.85) > 1.3 * pair.paper_rank(0.85) if d_in == d_out else True


@pytest.mark.parametrize("family_name", ["llama", "qwen2", "gpt2"])
def test_interpolative_model_equals_the_pair_at_the_same_ranks(family_name, tmp_path):
    """Same ranks, both forms: the same logits (the interpolative form is a change of basis), and
    exactly sum(rank^2 - d_out) fewer parameters; MACs fall by the same r^2 per token."""
    ranks = {}
    model = tiny_model(family_name)
    for name, m in model.named_modules():
        if ".1." in name and type(m).__name__ in ("Linear", "Conv1D") and "head" not in name:
            ranks[name] = 20  # 20^2 > every min(d_in, d_out) (64): all in the interpolative form
    path = tmp_path / "ranks.json"
    path.write_text(json.dumps(ranks))
    ids = calib_tokens(2, 12, seed=5)
    out = {}
    for form in ("pair", "interpolative"):
        cfg = CompressConfig(ranks_file=str(path), factors=form, nsamples=12, seqlen=16, batch_size=4)
        out[form], _ = llmrom.compress(tiny_model(family_name), TinyTokenizer(), cfg, tokens=calib_tokens(),
                                       progress=False)
    torch.testing.assert_close(logits(out["interpolative"], ids), logits(out["pair"], ids), atol=2e-4, rtol=2e-4)
    mods = {n: m for n, m in out["interpolative"].named_modules() if isinstance(m, FactorizedLinear)}
    assert set(mods) == set(ranks) and all(m.interp for m in mods.values())
    saved = sum(m.rank ** 2 - min(m.in_features, m.out_features) for m in mods.values())
    assert {m.interp for m in mods.values()} >= {"in"}
    assert count_params(out["pair"]) - count_params(out["interpolative"]) == saved
    macs = sum(m.rank ** 2 for m in mods.values())
    assert linear_macs_per_token(out["pair"]) - linear_macs_per_token(out["interpolative"]) == macs


@pytest.mark.parametrize("family_name", ["llama", "gemma3"])
def test_interpolative_form_meets_the_budget_and_round_trips(family_name, tmp_path):
    """Interpolative factors: the budget holds exactly as planned, the folder is format 4, and it loads with
    llmrom, with plain transformers (remote code) and as a dense export, all alike."""
    model = tiny_model(family_name)
    total = count_params(model)
    cfg = CompressConfig(budget=0.85, last_blocks=1, centered=False, nsamples=12, seqlen=16, batch_size=4,
                         factors="interpolative")
    model, report = llmrom.compress(model, TinyTokenizer(), cfg, tokens=calib_tokens(), progress=False)
    assert report["totals"]["parameters_after"] == count_params(model) <= 0.85 * total
    assert sum(r["params_after"] for r in report["modules"]) + total - sum(
        r["params_before"] for r in report["modules"]) == count_params(model)
    ids = calib_tokens(2, 12, seed=7)
    ref = logits(model, ids)
    folder = tmp_path / "m"
    llmrom.save(model, TinyTokenizer(), folder, report)
    meta = json.loads((folder / "config.json").read_text())["llmrom"]
    assert meta["format_version"] == INTERP_FORMAT_VERSION
    assert {m["interp"] for m in meta["modules"].values()} == {"in", "out"}  # o/q: in (64 <= 64), down: out
    loaded, _ = llmrom.load(folder)
    torch.testing.assert_close(logits(loaded, ids), ref, atol=1e-5, rtol=1e-5)
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    torch.testing.assert_close(logits(plain.eval(), ids), ref, atol=1e-5, rtol=1e-5)
    dense_folder = tmp_path / "d"
    llmrom.save(model, TinyTokenizer(), dense_folder, report, export_dense=True)
    dense = transformers.AutoModelForCausalLM.from_pretrained(dense_folder)
    torch.testing.assert_close(logits(dense.eval(), ids), ref, atol=1e-4, rtol=1e-4)


def test_interpolative_form_beats_the_pair_at_equal_budget():
    """The point of the form: at one whole-model budget it keeps more rank, so the compressed model is
    closer to the dense one than the pair form's."""
    dense = tiny_model("llama")
    ids = calib_tokens(4, 16, seed=9)
    ref = torch.log_softmax(logits(dense, ids), -1)
    kl = {}
    for form in ("pair", "interpolative"):
        cfg = CompressConfig(budget=0.9, last_blocks=2, factors=form, nsamples=12, seqlen=16, batch_size=4)
        model, report = llmrom.compress(tiny_model("llama"), TinyTokenizer(), cfg, tokens=calib_tokens(),
                                        progress=False)
        assert report["totals"]["kept_fraction"] <= 0.9
        out = torch.log_softmax(logits(model, ids), -1)
        kl[form] = float((ref.exp() * (ref - out)).sum(-1).mean())
    assert kl["interpolative"] < 0.7 * kl["pair"]


def test_joint_is_the_default_and_a_bad_form_is_refused():
    assert CompressConfig(budget=0.5).factors == "joint"
    with pytest.raises(LlmromError, match="--factors must be one of interpolative, pair, joint"):
        CompressConfig(budget=0.5, factors="triple")
