"""Output-side statistics: `rom_from_outputs` equals `rom`, and the pipeline uses it for d_out < d_in linears."""

import pytest
import torch

from llmrom.plan.choose import linear_shapes
from llmrom.modeling.arch import layout_for, weight_matrix
from llmrom.factor.methods import METHODS, rom, rom_from_outputs
from llmrom.loop.pipeline import LoopOptions, compress_blocks, uses_output_stats
from llmrom.factor.stats import Moments

from conftest import calib_tokens, tiny_model
from test_math import data, empirical_error


def exact_moments(v):
    """Moments of the rows of `v` in float64 throughout (Moments.update rounds chunks to float32)."""
    return Moments(v.T @ v, v.sum(0), v.shape[0])


def both_sides(d_in, d_out, bias, seed=0):
    x, w, b, _ = data(d_in, d_out, bias=bias, seed=seed)
    return x, w, b, exact_moments(x), exact_moments(x @ w.T)


@pytest.mark.parametrize("d_in,d_out", [(40, 16), (17, 16)])
@pytest.mark.parametrize("rank", [1, 5, 15, 16])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_rom_from_outputs_equals_rom(d_in, d_out, rank, centered, bias):
    x, w, b, inputs, outputs = both_sides(d_in, d_out, bias)
    f_in, f_out = rom(w, b, inputs, rank, centered), rom_from_outputs(w, b, outputs, rank, centered)
    scale = float(w.abs().max())
    assert f_out.first.shape == (rank, d_in) and f_out.second.shape == (d_out, rank)
    assert torch.allclose(f_out.second @ f_out.first, f_in.second @ f_in.first, rtol=0, atol=1e-9 * scale)
    assert torch.allclose(f_out.second.T @ f_out.second, torch.eye(rank, dtype=torch.float64), atol=1e-12)
    if f_in.bias is None:
        assert f_out.bias is None
    else:
        mean_out = outputs.mean().abs().max() + (b.abs().max() if b is not None else 0)  # the bias's terms
        assert torch.allclose(f_out.bias, f_in.bias, rtol=0, atol=1e-9 * float(mean_out))
    assert torch.allclose(f_out.spectrum, f_in.spectrum, rtol=1e-9, atol=1e-12 * float(f_in.spectrum[0]))
    assert f_out.output_energy == pytest.approx(f_in.output_energy, rel=1e-10)
    assert f_out.residual == pytest.approx(f_in.residual, rel=1e-6, abs=1e-10 * f_in.output_energy)
    assert f_out.residual == pytest.approx(empirical_error(x, w, b, f_out), rel=1e-6, abs=1e-10 * f_in.output_energy)
    assert f_out.explained == pytest.approx(f_in.explained, rel=1e-10)


def test_rom_from_outputs_reads_a_low_precision_weight_without_copying_it_whole():
    x, w, b, _ = data(3000, 8, n=4000, bias=True)  # more columns than one block of W
    w32, b32 = w.float(), b.float()
    f = rom_from_outputs(w32, b32, exact_moments(x @ w32.double().T), 3, centered=True)
    ref = rom(w32, b32, exact_moments(x), 3, centered=True)
    assert f.first.dtype == torch.float64
    assert torch.allclose(f.second @ f.first, ref.second @ ref.first, atol=1e-9 * float(w.abs().max()))
    assert torch.allclose(f.bias, ref.bias, atol=1e-9 * float(f.bias.abs().max()))


def test_rom_from_outputs_refuses_input_moments():
    x, w, b, inputs, outputs = both_sides(20, 8, bias=False)
    with pytest.raises(ValueError, match="output moments are"):
        rom_from_outputs(w, b, inputs, 3)


def compress(family, centered, output_stats, tokens):
    model = tiny_model(family)
    layout = layout_for(model)
    plan = {s.name: s.paper_rank(0.6) for s in linear_shapes(model, layout, centered)}
    opts = LoopOptions("rom", centered, batch_size=5, progress=False, output_stats=output_stats)
    records = compress_blocks(model, layout, tokens, plan, opts)
    return model, {r.name: r for r in records}


@pytest.mark.parametrize("family,down", [("llama", "mlp.down_proj"), ("gpt2", "mlp.c_proj")])
@pytest.mark.parametrize("centered", [False, True])
def test_pipeline_output_stats_give_the_same_model(family, down, centered, monkeypatch):
    """Same logits as input-side statistics; the d_out < d_in linear got d_out x d_out moments only."""
    tokens = calib_tokens()
    seen_in, seen_out = [], []

    def spy_in(weight, bias, moments, rank, c):
        seen_in.append((tuple(weight.shape), tuple(moments.xx.shape)))
        return rom(weight, bias, moments, rank, c)

    def spy_out(weight, bias, moments, rank, c):
        seen_out.append((tuple(weight.shape), tuple(moments.xx.shape)))
        return rom_from_outputs(weight, bias, moments, rank, c)

    monkeypatch.setitem(METHODS, "rom", spy_in)
    monkeypatch.setattr("llmrom.loop.pipeline.rom_from_outputs", spy_out)
    old, old_records = compress(family, centered, False, tokens)
    assert not seen_out
    seen_in.clear()
    new, new_records = compress(family, centered, True, tokens)

    dense = tiny_model(family)
    d_out, d_in = weight_matrix(dense.get_submodule(f"{layout_for(dense).blocks_path}.0.{down}")).shape
    assert d_out < d_in
    assert seen_out == [((d_out, d_in), (d_out, d_out))] * 2  # one per block, statistics d_out x d_out
    assert all(w != (d_out, d_in) for w, _ in seen_in)  # and never from its d_in x d_in inputs
    with torch.no_grad():
        a, b = old(tokens).logits, new(tokens).logits
    assert torch.allclose(a, b, rtol=0, atol=2e-5 * float(a.abs().max()))  # measured: ~3e-6 x max (fp32 GEMMs)
    for name, r in old_records.items():
        assert new_records[name].rank == r.rank
        assert new_records[name].relative_error == pytest.approx(r.relative_error, rel=0, abs=5e-6)


def test_output_stats_only_for_sequential_rom_single_linears_with_fewer_outputs():
    block = tiny_model("llama").model.layers[0]
    rom_opts = LoopOptions("rom")
    assert uses_output_stats(block, ("mlp.down_proj",), rom_opts)
    assert not uses_output_stats(block, ("self_attn.o_proj",), rom_opts)  # square
    assert not uses_output_stats(block, ("mlp.gate_proj",), rom_opts)  # d_out > d_in
    assert not uses_output_stats(block, ("self_attn.q_proj", "self_attn.v_proj"), rom_opts)
    for opts in (LoopOptions("svd"), LoopOptions("whitened_svd"), LoopOptions("rom", sequential=False),
                 LoopOptions("rom", output_stats=False)):
        assert not uses_output_stats(block, ("mlp.down_proj",), opts)
