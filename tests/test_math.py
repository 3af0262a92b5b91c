"""The math with known answers: factorizations, streamed statistics, rank and budget arithmetic."""

import math

import pytest
import torch

from llmrom.errors import LlmromError
from llmrom.factor.methods import METHODS, output_eigh, rom, rom_corrected, svd, whitened_svd
from llmrom.plan.ranks import (LinearShape, check_budget, feasible_last_n, kept_params, last_blocks_plan,
                          module_budget_for, read_ranks_file, smallest_reachable)
from llmrom.factor.stats import CrossMoments, Moments


def data(d_in, d_out, n=2000, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d_in, dtype=torch.float64)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix + 0.5  # correlated, non-zero mean
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64) if bias else None
    m = Moments.zeros(d_in)
    m.update(x)
    return x, w, b, m


def empirical_error(x, w, b, f):
    y = x @ w.T + (b if b is not None else 0)
    yhat = (x @ f.first.T) @ f.second.T + (f.bias if f.bias is not None else 0)
    return ((y - yhat) ** 2).sum(1).mean().item()


@pytest.mark.parametrize("d_in,d_out", [(24, 16), (16, 24)])
@pytest.mark.parametrize("centered", [False, True])
def test_full_rank_reproduces_w(d_in, d_out, centered):
    x, w, b, m = data(d_in, d_out, bias=True)
    f = rom(w, b, m, min(d_in, d_out), centered)
    assert torch.allclose(f.second @ f.first, w, atol=1e-8)
    assert f.relative_error < 1e-6


@pytest.mark.parametrize("d_in,d_out", [(32, 20), (20, 32)])
@pytest.mark.parametrize("rank", [2, 5, 10])
def test_rom_never_worse_than_weight_svd(d_in, d_out, rank):
    x, w, b, m = data(d_in, d_out)
    f_rom, f_svd = rom(w, b, m, rank), svd(w, b, m, rank)
    e_rom, e_svd = empirical_error(x, w, b, f_rom), empirical_error(x, w, b, f_svd)
    assert e_rom <= e_svd * (1 + 1e-9)
    assert e_rom < 0.9 * e_svd  # on correlated inputs the data-aware optimum is clearly better


@pytest.mark.parametrize("d_in,d_out", [(32, 20), (20, 32)])
@pytest.mark.parametrize("rank", [2, 5, 10])
def test_whitened_svd_is_uncentred_rom(d_in, d_out, rank):
    """SVD-LLM's truncation is the optimum of uncentred output PCA: equal error at equal rank."""
    x, w, b, m = data(d_in, d_out)
    f_w, f_rom = whitened_svd(w, b, m, rank), rom(w, b, m, rank)
    assert f_w.residual == pytest.approx(f_rom.residual, rel=1e-6)
    assert empirical_error(x, w, b, f_w) == pytest.approx(empirical_error(x, w, b, f_rom), rel=1e-6)
    assert torch.allclose(f_w.spectrum[:rank], f_rom.spectrum[:rank], rtol=1e-8)


def test_whitened_svd_damps_a_singular_second_moment_and_full_rank_reproduces_w():
    x, w, b, m = data(12, 8)
    x = torch.cat([x, torch.zeros(len(x), 2, dtype=x.dtype)], 1)  # two dead inputs: S is singular
    w = torch.cat([w, torch.randn(8, 2, dtype=w.dtype)], 1)
    dead = Moments.zeros(14)
    dead.update(x)
    f = whitened_svd(w, None, dead, 8)
    assert torch.isfinite(f.first).all()
    assert empirical_error(x, w, None, f) < 1e-6 * (x @ w.T).pow(2).sum(1).mean().item()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("d_in,d_out", [(20, 12), (12, 20)])  # both branches of output_eigh
def test_reported_error_is_the_empirical_error(method, centered, d_in, d_out):
    x, w, b, m = data(d_in, d_out, bias=True)
    f = METHODS[method](w, b, m, 4, centered)
    assert f.residual == pytest.approx(empirical_error(x, w, b, f), rel=1e-6)
    y = x @ w.T + b
    assert f.output_energy == pytest.approx((y ** 2).sum(1).mean().item(), rel=1e-6)  # fp32 chunk GEMMs
    assert 0 < f.explained < 1


@pytest.mark.parametrize("method", sorted(METHODS))
def test_centred_restores_the_mean(method):
    x, w, b, m = data(20, 12)
    f = METHODS[method](w, None, m, 3, centered=True)
    err = x @ w.T - ((x @ f.first.T) @ f.second.T + f.bias)
    assert err.mean(0).abs().max() < 1e-6 * err.abs().mean()
    assert METHODS[method](w, None, m, 3, centered=False).bias is None


def test_centred_is_best_among_projections_plus_bias():
    x, w, b, m = data(20, 12)
    assert rom(w, None, m, 3, True).residual <= rom(w, None, m, 3, False).residual * (1 + 1e-9)


def cross(x, x_hat, chunk=None):
    c = CrossMoments.zeros(x.shape[1])
    for a, b in zip(x.split(chunk or len(x)), x_hat.split(chunk or len(x))):
        c.update(a, b)
    return c


def perturbed(x, seed=1, scale=0.3):
    """x_hat = what an upstream compression gives: x through a structured perturbation, plus noise."""
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    mix = torch.eye(d, dtype=x.dtype) + scale * torch.randn(d, d, generator=g, dtype=x.dtype) / d ** 0.5
    return x @ mix + 0.1 * scale * torch.randn(x.shape, generator=g, dtype=x.dtype) + 0.05


def dense_error(x, x_hat, w, b, f):
    """Empirical E||A x_hat + c - (W x + b)||^2: the factors fed compressed inputs, against the dense output."""
    y = x @ w.T + (b if b is not None else 0)
    yhat = (x_hat @ f.first.T) @ f.second.T + (f.bias if f.bias is not None else 0)
    return ((y - yhat) ** 2).sum(1).mean().item()


@pytest.mark.parametrize("d_in,d_out", [(24, 16), (16, 24)])
@pytest.mark.parametrize("centered", [False, True])
def test_corrected_equals_rom_when_inputs_are_dense(d_in, d_out, centered):
    x, w, b, m = data(d_in, d_out, bias=True)
    f_c, f_r = rom_corrected(w, b, cross(x, x), 5, centered), rom(w, b, m, 5, centered)
    for a, r in ((f_c.first, f_r.first), (f_c.second, f_r.second), (f_c.bias, f_r.bias), (f_c.spectrum, f_r.spectrum)):
        assert torch.allclose(a, r, rtol=1e-9, atol=1e-9 * float(r.abs().max()))
    assert f_c.residual == pytest.approx(f_r.residual, rel=1e-9)
    assert f_c.output_energy == pytest.approx(f_r.output_energy, rel=1e-12)


@pytest.mark.parametrize("d_in,d_out", [(32, 20), (20, 32)])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("rank", [3, 8])
def test_corrected_beats_rom_against_the_dense_target(d_in, d_out, centered, rank):
    """x_hat = perturbed x: ROM on x_hat reproduces W x_hat; the correction aims at W x and gets closer,
    and its reported residual and energy are exactly the empirical ones against the dense output."""
    x, w, b, _ = data(d_in, d_out, bias=True)
    x_hat = perturbed(x)
    hat = Moments.zeros(d_in)
    hat.update(x_hat)
    f_c, f_r = rom_corrected(w, b, cross(x, x_hat, chunk=300), rank, centered), rom(w, b, hat, rank, centered)
    e_c, e_r = dense_error(x, x_hat, w, b, f_c), dense_error(x, x_hat, w, b, f_r)
    assert e_c < 0.9 * e_r
    assert f_c.residual == pytest.approx(e_c, rel=1e-5)  # float32 rounding: 1.4e-6 seen on a fresh machine
    y = x @ w.T + b
    assert f_c.output_energy == pytest.approx((y ** 2).sum(1).mean().item(), rel=1e-6)
    assert 0 < f_c.explained < 1 and 0 < f_c.relative_error < 1


@pytest.mark.parametrize("centered", [False, True])
def test_undamped_full_rank_correction_is_least_squares(centered):
    """damp=0 at full rank: the map is the ordinary least-squares fit of W x + b on x_hat (with an
    intercept when centred; the bias fixed to b when not); the reported residual is its error."""
    x, w, b, _ = data(12, 8, bias=True)
    x_hat = perturbed(x, scale=1.0)
    f = rom_corrected(w, b, cross(x, x_hat), 8, centered, damp=0.0)
    y = x @ w.T + b
    if centered:
        design, target = torch.cat([x_hat, torch.ones(len(x), 1, dtype=x.dtype)], 1), y
    else:
        design, target = x_hat, y - b
    sol = torch.linalg.lstsq(design, target).solution
    fitted = design @ sol + (0 if centered else b)
    assert torch.allclose(f.second @ f.first, sol[:12].T, atol=1e-3 * float(sol.abs().max()))  # fp32 moments
    best = ((fitted - y) ** 2).sum(1).mean().item()
    assert f.residual == pytest.approx(best, rel=1e-5)
    assert dense_error(x, x_hat, w, b, f) == pytest.approx(best, rel=1e-6)


def test_cross_moments_refuse_non_finite_and_mismatched_inputs():
    c = CrossMoments.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        c.update(torch.zeros(4, 3), torch.zeros(4, 2))
    c.update(torch.tensor([[1.0, float("inf"), 0.0]]), torch.zeros(1, 3))
    with pytest.raises(LlmromError, match="dense model"):
        c.check_finite("layers.0.self_attn.q_proj")


def test_streamed_moments_equal_one_shot():
    x, *_ = data(16, 4, n=1000)
    streamed = Moments.zeros(16)
    for chunk in x.split(77):
        streamed.update(chunk.float())
    one = x.float().double()
    assert torch.allclose(streamed.second_moment(), one.T @ one / len(one), rtol=1e-6, atol=1e-6)
    assert torch.allclose(streamed.mean(), one.mean(0), atol=1e-6)
    assert streamed.n == 1000


def test_small_space_eigh_matches_direct():
    x, w, b, m = data(12, 40)
    vals, vecs = output_eigh(w, m.second_moment())
    direct_vals, direct_vecs = torch.linalg.eigh(w @ m.second_moment() @ w.T)
    assert torch.allclose(vals, direct_vals.flip(0), rtol=1e-8, atol=1e-8 * float(direct_vals.max()))
    for r in (3, 12):
        p1, p2 = vecs[:, :r] @ vecs[:, :r].T, direct_vecs[:, -r:] @ direct_vecs[:, -r:].T
        assert torch.allclose(p1, p2, atol=1e-7)
        assert torch.allclose(output_eigh(w, m.second_moment(), top=r)[1], vecs[:, :r], atol=1e-12)  # top r only
    assert torch.allclose(vecs.T @ vecs, torch.eye(vecs.shape[1], dtype=vecs.dtype), atol=1e-8)  # orthonormal


def test_moments_refuse_non_finite():
    m = Moments.zeros(3)
    m.update(torch.tensor([[1.0, float("nan"), 0.0]]))
    with pytest.raises(LlmromError, match="layers.3.mlp.up_proj"):
        m.check_finite("layers.3.mlp.up_proj")


def shapes(n_blocks=4):
    return [LinearShape(f"b.{i}.{n}", i, d_in, d_out) for i in range(n_blocks)
            for n, d_in, d_out in (("q", 64, 64), ("up", 64, 256), ("down", 256, 64))]


def test_paper_rank_formula_and_worthwhile():
    s = LinearShape("x", 0, 256, 64)
    assert s.paper_rank(0.5) == int(0.5 * 256 * 64 / 320)
    assert s.factor_params(s.paper_rank(0.999)) < s.dense_params
    assert not s.worthwhile(64) and s.worthwhile(51) and not s.worthwhile(0)


def test_module_budget_meets_budget_and_is_tight():
    sh, total = shapes(), 200_000
    for budget in (0.95, 0.9, 0.8):
        for last_n in (2, 3, 4):
            b = module_budget_for(budget, total, sh, 4, last_n)
            if b is None:
                continue
            assert kept_params(total, sh, last_blocks_plan(sh, 4, last_n, b)) <= budget * total
            if b < 0.999:
                assert kept_params(total, sh, last_blocks_plan(sh, 4, last_n, b + 2e-3)) > budget * total
    assert feasible_last_n(smallest_reachable(total, sh) / 2, total, sh, 4) == []
    assert [n for n, _ in feasible_last_n(0.999, total, sh, 4)] == [1, 2, 3, 4]


def test_plans_never_store_larger_than_dense():
    sh = shapes()
    plan = {s.name: 10_000 for s in sh}
    assert kept_params(123_456, sh, plan) == 123_456


def test_budget_errors_name_the_fix():
    sh = shapes()
    with pytest.raises(LlmromError, match=r"\(0, 1\]"):
        check_budget(1.5, 200_000, sh)
    floor = smallest_reachable(200_000, sh)
    with pytest.raises(LlmromError, match=f"smallest reachable is --budget {math.ceil(floor * 1000) / 1000:g}"):
        check_budget(floor / 2, 200_000, sh)
    check_budget(floor + 0.01, 200_000, sh)


def test_ranks_file(tmp_path):
    sh = shapes()
    f = tmp_path / "r.json"
    f.write_text('{"b.3.q": 8}')
    assert read_ranks_file(f, sh) == {"b.3.q": 8}
    f.write_text('{"b.9.q": 8}')
    with pytest.raises(LlmromError, match="not a compressible linear"):
        read_ranks_file(f, sh)
    f.write_text('{"b.3.q": 0}')
    with pytest.raises(LlmromError, match="positive integer"):
        read_ranks_file(f, sh)
    f.write_text('{"b.3.q": ')
    with pytest.raises(LlmromError, match="not valid JSON"):
        read_ranks_file(f, sh)


def test_config_round_trips_and_rejects_other_versions():
    from llmrom.config import CompressConfig
    cfg = CompressConfig(budget=0.8, centered=False, nsamples=64)
    d = cfg.to_dict()
    assert d["type"] == "CompressConfig" and CompressConfig.from_dict(d) == cfg
    with pytest.raises(LlmromError, match="incompatible"):
        CompressConfig.from_dict({**d, "version": 99})


def test_group_linears_share_one_cached_input_eigh_until_the_next_update():
    x, w, b, m = data(6, 10)  # d_out > d_in: the branch that decomposes the input statistics
    rom(w, None, m, 3, True)
    cached = m.eigh(True)
    rom(torch.randn(9, 6, dtype=w.dtype), None, m, 3, True)  # a second linear of the group
    assert m.eigh(True) is cached
    more = torch.randn(50, 6, dtype=x.dtype)
    m.update(more)
    assert m.eigh(True) is not cached  # new tokens, new statistics
    fresh = Moments.zeros(6)
    fresh.update(torch.cat([x, more]))
    a, b = rom(w, None, m, 3, True), rom(w, None, fresh, 3, True)
    assert torch.allclose(a.second @ a.first, b.second @ b.first, rtol=1e-4, atol=1e-5)  # fp32 chunk GEMMs
