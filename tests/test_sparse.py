"""Low-rank plus sparse (--sparse): honest parameter accounting, the math, save/load, bad values."""

import copy
import json

import pytest
import torch
import transformers

import llmrom
from llmrom import cli
from llmrom.plan.choose import linear_shapes
from llmrom.modeling.arch import layout_for
from llmrom.config import CompressConfig
from llmrom.eval.cost import count_params
from llmrom.errors import LlmromError
from llmrom.modeling.factorized import FactorizedLinear, apply_factorization
from llmrom.factor.methods import rom
from llmrom.plan.ranks import LinearShape, kept_params, last_blocks_plan
from llmrom.factor.sparse import add_sparse, low_rank_plus_sparse
from llmrom.factor.stats import Moments

from conftest import TinyTokenizer, calib_tokens, tiny_model


# ---- parameter accounting ---------------------------------------------------------------------------

@pytest.mark.parametrize("sparse", [0.1, 0.25, 0.5, 0.9])
def test_split_spends_the_module_budget_and_no_more(sparse):
    for d_in, d_out, added_bias in ((64, 64, 0), (64, 256, 256), (256, 64, 0)):
        s = LinearShape("m", 0, d_in, d_out, added_bias, sparse)
        for rank in (2, 5, 17, 40):
            low, nnz = s.split(rank)
            budget = s.factor_params(rank)
            assert s.stored_params(*s.split(rank)) == s.factor_params(low) + (2 * nnz + d_out + 1 if nnz else 0)
            assert s.stored_params(*s.split(rank)) <= budget
            if nnz:  # the rest is spent up to the odd parameter a nonzero (2) cannot use
                assert low == max(1, int((1 - sparse) * rank + 1e-9)) and budget - s.stored_params(*s.split(rank)) <= 1
    off = LinearShape("m", 0, 64, 64)
    assert off.split(17) == (17, 0) and off.stored_params(*off.split(17)) == off.factor_params(17)
    assert LinearShape("m", 0, 64, 64, 0, 0.25).split(1) == (1, 0)  # rank 1 has nothing to give


def spiky_model(family, seed=0):
    """A tiny model whose block linears carry a few large weights (outliers that rank spends badly on)."""
    model = tiny_model(family, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".h." in name or ".layers." in name:
                if p.ndim == 2:
                    idx = torch.randperm(p.numel(), generator=g)[:p.numel() // 50]
                    p.view(-1)[idx] += 20 * p.std() * torch.randn(len(idx), generator=g)
    return model


def compress_tiny(family, **cfg):
    model = spiky_model(family)
    tokens = calib_tokens()
    config = CompressConfig(**{"nsamples": len(tokens), "seqlen": tokens.shape[1], "batch_size": 5,
                               "factors": "interpolative", **cfg})  # each linear alone, as --sparse stores them
    model, report = llmrom.compress(model, TinyTokenizer(), config, progress=False, tokens=tokens)
    return model, report, tokens


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_report_counts_the_sparse_part_and_meets_the_budget(family):
    dense = spiky_model(family)
    total = count_params(dense)
    model, report, _ = compress_tiny(family, last_blocks=2, module_budget=0.5, sparse=0.25, sparse_rounds=2,
                                      factors="pair")  # the interpolative form's count: test_interp
    t, rows = report["totals"], report["modules"]
    sparse_rows = [r for r in rows if r["nnz"]]
    assert sparse_rows
    index_entries = sum(r["nnz"] + r["d_out"] + 1 for r in sparse_rows)
    assert t["parameters_after"] == count_params(model) == sum(p.numel() for p in model.parameters()) + index_entries
    assert t["parameters_after"] == t["parameters_before"] + sum(r["params_after"] - r["params_before"] for r in rows)
    for r in rows:
        m = model.get_submodule(r["name"])
        bias = sum(p.numel() for p in (m.second.bias,) if p is not None)
        assert m.nnz == r["nnz"] and m.rank == r["rank"]
        assert r["params_after"] == (m.first.weight.numel() + m.second.weight.numel() + bias
                                     + (2 * m.nnz + m.out_features + 1 if m.nnz else 0))
    # every module spends at most what the plan grants it (P, or P - 1 when a nonzero's 2 do not fit)
    layout = layout_for(dense)
    shapes = linear_shapes(dense, layout, centered=True)
    planned = kept_params(total, shapes, last_blocks_plan(shapes, 2, 2, 0.5))
    assert planned - len(sparse_rows) <= t["parameters_after"] <= planned
    assert t["macs_per_token_after"] > 0 and report["config"]["sparse"] == 0.25


@pytest.mark.parametrize("sparse", [0.1, 0.25])
def test_whole_model_budget_is_met(sparse):
    _, report, _ = compress_tiny("llama", budget=0.8, last_blocks=2, sparse=sparse)
    _, plain, _ = compress_tiny("llama", budget=0.8, last_blocks=2)
    assert report["totals"]["kept_fraction"] <= 0.8
    assert report["plan"] == plain["plan"]  # the same plan: the sparse part lives inside each module's grant
    n_sparse = sum(r["nnz"] > 0 for r in report["modules"])
    after, plain_after = report["totals"]["parameters_after"], plain["totals"]["parameters_after"]
    assert plain_after - n_sparse <= after <= plain_after


def test_lean_sparse_leaves_output_statistics_modules_plain():
    """--sparse-modules lean: down_proj (fewer outputs than inputs, alone in its group) keeps plain factors
    at its planned rank and is fitted from its output statistics; the other linears still get sparse parts."""
    from llmrom.loop.pipeline import LoopOptions, uses_output_stats
    cfg = dict(last_blocks=2, module_budget=0.5, sparse=0.25)
    _, lean, _ = compress_tiny("llama", **cfg, sparse_modules="lean")
    _, every, _ = compress_tiny("llama", **cfg)
    _, plain, _ = compress_tiny("llama", last_blocks=2, module_budget=0.5)
    rank = {r["name"]: r["rank"] for r in plain["modules"]}
    for report, down_sparse in ((lean, False), (every, True)):
        down = [r for r in report["modules"] if r["name"].endswith("down_proj")]
        assert len(down) == 2 and all(bool(r["nnz"]) == down_sparse for r in down)
        assert any(r["nnz"] for r in report["modules"] if not r["name"].endswith("down_proj"))
    assert all(r["rank"] == rank[r["name"]] for r in lean["modules"] if r["name"].endswith("down_proj"))
    assert lean["totals"]["kept_fraction"] <= plain["totals"]["kept_fraction"]
    block = tiny_model("llama").model.layers[0]
    assert uses_output_stats(block, ("mlp.down_proj",), LoopOptions(sparse=0.25, sparse_modules="lean"))
    assert not uses_output_stats(block, ("mlp.down_proj",), LoopOptions(sparse=0.25))
    with pytest.raises(LlmromError, match="--sparse-modules must be all or lean"):
        CompressConfig(budget=0.8, sparse=0.25, sparse_modules="some")


# ---- the math ------------------------------------------------------------------------------------------

def heavy_tailed(d_in=48, d_out=40, n=4000, seed=0, spikes=40, bias=True):
    """W = a rank-6 matrix + a few large entries; inputs correlated with a few loud channels."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(d_out, 6, generator=g, dtype=torch.float64) @ torch.randn(6, d_in, generator=g,
                                                                               dtype=torch.float64))
    idx = torch.randperm(d_out * d_in, generator=g)[:spikes]
    w.view(-1)[idx] += 8 * torch.randn(spikes, generator=g, dtype=torch.float64)
    scale = torch.ones(d_in, dtype=torch.float64)
    scale[:4] = 5.0
    mix = torch.eye(d_in, dtype=torch.float64) + 0.3 * torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    x = (torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix) * scale + 0.3
    b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    m = Moments.zeros(d_in)
    m.update(x)
    return x, w, b, m


def reconstruct(f, d_in):
    w_hat = f.second @ f.first
    return w_hat + f.sparse.dense(d_in) if f.sparse is not None else w_hat


def error(x, w, b, f):
    y = x @ w.T + (b if b is not None else 0)
    yhat = x @ reconstruct(f, w.shape[1]).T + (f.bias if f.bias is not None else 0)
    return ((y - yhat) ** 2).sum(1).mean().item()


@pytest.mark.parametrize("centered", [False, True])
def test_low_rank_plus_sparse_beats_low_rank_at_equal_parameters(centered):
    x, w, b, m = heavy_tailed()
    rank = 10
    plain = rom(w, b, m, rank, centered)
    shape = LinearShape("m", 0, w.shape[1], w.shape[0], 0, 0.3)
    low, nnz = shape.split(rank)
    assert low < rank and nnz > 0 and shape.stored_params(*shape.split(rank)) <= shape.factor_params(rank)
    base = rom(w, b, m, low, centered)
    one = add_sparse(w, b, m, base, nnz, centered)
    raw = add_sparse(w, b, m, base, nnz, centered, refit=False)
    alt = low_rank_plus_sparse(rom, w, b, m, low, nnz, centered, rounds=4, plain_rank=rank)
    e_plain, e_one, e_raw, e_alt = (error(x, w, b, f) for f in (plain, one, raw, alt))
    assert e_one <= e_raw * (1 + 1e-9) and e_raw < e_plain  # one pass helps; the least-squares refit never hurts
    assert e_alt < 0.25 * e_plain and e_alt <= e_one  # alternating: the spikes go to S, the rest to the factors
    for f, e in ((one, e_one), (raw, e_raw), (alt, e_alt)):
        assert f.residual == pytest.approx(e, rel=1e-6)  # the reported error is the true error
        assert f.sparse.nnz == nnz and f.first.shape[0] == low
    assert alt.output_energy == pytest.approx(plain.output_energy) and alt.relative_error < plain.relative_error


def test_plain_factors_win_where_sparse_does_not_help():
    x, w, b, m = heavy_tailed(spikes=0)  # exactly rank 6: the plain rank-6 factors are exact
    shape = LinearShape("m", 0, w.shape[1], w.shape[0], 0, 0.3)
    low, nnz = shape.split(6)
    f = low_rank_plus_sparse(rom, w, b, m, low, nnz, True, rounds=2, plain_rank=6)
    assert f.sparse is None and f.first.shape[0] == 6 and f.relative_error < 1e-6


def test_saliency_uses_the_input_scale():
    """Equal residual entries: the one on the loud input channel is kept, the quiet one dropped."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 8, generator=g, dtype=torch.float64)
    x[:, 0] *= 10.0
    m = Moments.zeros(8)
    m.update(x)
    w = torch.zeros(4, 8, dtype=torch.float64)
    w[1, 0], w[2, 5] = 1.0, 1.5  # the bigger weight sits on a quiet channel
    f = rom(w, None, m, 1)
    f = f.__class__(f.first * 0, f.second, None, f.spectrum, f.residual, f.output_energy)  # empty factors
    kept = add_sparse(w, None, m, f, 1)
    assert kept.sparse.rows().tolist() == [1] and kept.sparse.col.tolist() == [0]


def test_channel_selection_keeps_whole_input_columns():
    x, w, b, m = heavy_tailed()
    base = rom(w, b, m, 4, True)
    f = add_sparse(w, b, m, base, 2 * w.shape[0] + 7, True, select="channels")
    assert f.sparse.nnz == 2 * w.shape[0] and len(set(f.sparse.col.tolist())) == 2
    assert f.residual < base.residual and f.residual == pytest.approx(error(x, w, b, f), rel=1e-6)


def test_module_forward_equals_the_dense_reconstruction():
    x, w, b, m = heavy_tailed()
    f = add_sparse(w, b, m, rom(w, b, m, 5, True), 150, True)
    mod = FactorizedLinear(w.shape[1], w.shape[0], 5, True, dtype=torch.float64, nnz=f.sparse.nnz)
    with torch.no_grad():
        mod.first.weight.copy_(f.first)
        mod.second.weight.copy_(f.second)
        mod.second.bias.copy_(f.bias)
        mod.sparse_values.copy_(f.sparse.values)
        mod.sparse_col.copy_(f.sparse.col)
        mod.sparse_crow.copy_(f.sparse.crow)
        w_hat = reconstruct(f, w.shape[1])
        assert torch.allclose(mod.weight, w_hat, atol=1e-12)
        xs = x[:64].reshape(4, 16, -1)
        assert torch.allclose(mod(xs), xs @ w_hat.T + f.bias, atol=1e-10)
    assert mod.stored_indices == f.sparse.nnz + w.shape[0] + 1
    # bfloat16 takes the gather / index_add path (CPU CSR kernels lack it), in chunks of tokens
    half = copy.deepcopy(mod).to(torch.bfloat16)
    with torch.no_grad():
        y_half = half.sparse_forward(xs.to(torch.bfloat16), chunk_elements=1000)
        ref = (xs @ f.sparse.dense(w.shape[1]).T).to(torch.bfloat16)
        assert torch.allclose(y_half.float(), ref.float(), rtol=0.05, atol=0.05 * float(ref.abs().max()))
    # the values train (healing): the CSR path's gradient is that of the dense product
    xs32, single = xs.float(), copy.deepcopy(mod).float()
    single.sparse_forward(xs32).square().sum().backward()
    rows, cols = f.sparse.rows(), f.sparse.col.long()
    dense = torch.zeros(w.shape, requires_grad=True)
    (xs32 @ dense.T + (xs32 @ f.sparse.dense(w.shape[1]).float().T).detach()).square().sum().backward()
    assert torch.allclose(single.sparse_values.grad, dense.grad[rows, cols], rtol=1e-4, atol=1e-3)
    assert f.sparse.crow.dtype == f.sparse.col.dtype == torch.int32


def test_sparse_residual_with_interpolative_factors_round_trips(tmp_path):
    """The default factor form with a sparse residual: every stored index counted (the output order's
    d_out and the CSR ones), the budget met, and the folder reloads to the same logits."""
    dense = spiky_model("llama")
    total = count_params(dense)
    model, report, tokens = compress_tiny("llama", last_blocks=2, module_budget=0.5, sparse=0.25)
    mods = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert any(m.nnz and m.interp for m in mods)
    indices = sum((m.nnz + m.out_features + 1 if m.nnz else 0) + (m.order.numel() if m.interp else 0)
                  for m in mods)  # one int per nonzero's column, d_out + 1 row pointers, the form's indices
    assert report["totals"]["parameters_after"] == count_params(model) == \
        sum(p.numel() for p in model.parameters()) + indices
    shapes = linear_shapes(dense, layout_for(dense), centered=True, interp=True)
    assert count_params(model) <= kept_params(total, shapes, last_blocks_plan(shapes, 2, 2, 0.5))
    out = llmrom.save(model, None, tmp_path / "out", report)
    loaded, _ = llmrom.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


# ---- save and load ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_load_round_trip_gives_identical_logits(family, tmp_path):
    model, report, tokens = compress_tiny(family, budget=0.9, sparse=0.25, embedding_budget=1.0, factors="pair")
    with torch.no_grad():
        ref = model(tokens).logits
    out = llmrom.save(model, None, tmp_path / "out", report)
    meta = json.loads((out / "config.json").read_text())["llmrom"]
    nnz = {n: m.nnz for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    assert meta["format_version"] == 2 and {n: v.get("nnz", 0) for n, v in meta["modules"].items()} == nnz
    assert 0 < sum(v > 0 for v in nnz.values()) < len(nnz)  # a mix: sparse residuals where they fit better
    loaded, _ = llmrom.load(out)
    remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, ref)
        assert torch.equal(remote(tokens).logits, ref)
    assert count_params(loaded) == count_params(remote) == report["totals"]["parameters_after"]
    half, _ = llmrom.load(out, dtype=torch.bfloat16)
    mod = next(m for m in half.modules() if isinstance(m, FactorizedLinear))
    assert mod.sparse_values.dtype == torch.bfloat16 and mod.sparse_col.dtype == torch.int32
    with torch.no_grad():
        assert torch.isfinite(half(tokens).logits).all()


def test_dense_export_merges_the_sparse_part(tmp_path):
    model, report, tokens = compress_tiny("llama", budget=0.9, sparse=0.25, centered=False)
    with torch.no_grad():
        ref = model(tokens).logits
    out = llmrom.save(model, None, tmp_path / "dense", report, export_dense=True)
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(plain(tokens).logits, ref, atol=1e-4, rtol=1e-4)


def test_without_sparse_the_folder_stays_format_1(tmp_path):
    model, report, _ = compress_tiny("llama", budget=0.9, embedding_budget=1.0, factors="pair")
    out = llmrom.save(model, None, tmp_path / "out", report)
    meta = json.loads((out / "config.json").read_text())["llmrom"]
    assert meta["format_version"] == 1 and not any("nnz" in v for v in meta["modules"].values())


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="format_version 6"):
        apply_factorization(tiny_model("llama"), {"format_version": 6, "modules": {}})


def test_streaming_equals_in_memory_with_sparse(tmp_path):
    from llmrom.loop.stream import compress_streaming
    folder = tmp_path / "src"
    tiny_model("llama").save_pretrained(folder, max_shard_size="20KB")
    tokens = calib_tokens()
    config = CompressConfig(last_blocks=2, module_budget=0.5, nsamples=12, seqlen=16, batch_size=5, sparse=0.25)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model, ref = llmrom.compress(model, None, config, progress=False, tokens=tokens)
    report = compress_streaming(folder, tmp_path / "out", config, tokens=tokens, progress=False)
    loaded, _ = llmrom.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    assert report["totals"]["parameters_after"] == ref["totals"]["parameters_after"] == count_params(loaded)
    assert [m["nnz"] for m in report["modules"]] == [m["nnz"] for m in ref["modules"]]


def test_healing_trains_the_sparse_values():
    from llmrom.heal.train import HealConfig, _trainable
    model, _, _ = compress_tiny("llama", budget=0.9, sparse=0.25, factors="pair")
    names = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    params, _ = _trainable(copy.deepcopy(model), HealConfig(), names)
    assert any(k.endswith("sparse_values") for k in params)


# ---- bad values ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, float("nan"), "0.1", True, None])
def test_sparse_outside_zero_one_is_refused(value):
    with pytest.raises(LlmromError, match=r"--sparse must be a fraction in \[0, 1\)"):
        CompressConfig(budget=0.9, sparse=value)


def test_bad_selection_and_nonzero_counts_are_refused():
    with pytest.raises(LlmromError, match="--sparse-select must be entries or channels"):
        CompressConfig(budget=0.9, sparse=0.1, sparse_select="rows")
    x, w, b, m = heavy_tailed()
    f = rom(w, b, m, 3)
    for nnz in (0, w.numel() + 1):
        with pytest.raises(LlmromError, match="nonzeros"):
            add_sparse(w, b, m, f, nnz)
    with pytest.raises(LlmromError, match="unknown sparse selection"):
        add_sparse(w, b, m, f, 5, select="rows")


def test_cli_refuses_sparse_one_in_one_line(tiny_folder, tmp_path, capsys):
    code = cli.main(["compress", str(tiny_folder), "--budget", "0.9", "--sparse", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines()[-1].startswith("llmrom: error: --sparse must be a fraction")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["rom", "svd", "whitened_svd"])
def test_every_method_is_nested_so_the_plain_fit_can_be_truncated(method):
    """low_rank_plus_sparse takes round 1's factors as a prefix of the plain rank's; that must equal the
    method at the lower rank (up to the bias, which add_sparse recomputes)."""
    from llmrom.factor.methods import METHODS
    x, w, b, m = heavy_tailed()
    hi, lo = METHODS[method](w, b, m, 10, True), METHODS[method](w, b, m, 7, True)
    assert torch.allclose(hi.first[:7], lo.first, atol=1e-9) and torch.allclose(hi.second[:, :7], lo.second, atol=1e-9)
    f = low_rank_plus_sparse(METHODS[method], w, b, m, 7, 100, True, rounds=1, plain_rank=10)
    g = add_sparse(w, b, m, lo, 100, True)
    assert f.sparse is not None and f.residual == pytest.approx(g.residual, rel=1e-9)
    assert torch.allclose(f.bias, g.bias, atol=1e-9) and torch.equal(f.sparse.col, g.sparse.col)


def test_cli_compress_with_sparse_and_info(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["compress", str(tiny_folder), "--last-blocks", "2", "--module-budget", "0.5", "--sparse", "0.25",
                     "--sparse-rounds", "2", "--nsamples", "8", "--seqlen", "32", "--batch-size", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "llmrom_report.json").read_text())
    assert report["config"]["sparse"] == 0.25 and report["config"]["sparse_rounds"] == 2
    capsys.readouterr()
    assert cli.main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert ("nonzeros" in text) == any(m["nnz"] for m in report["modules"])
