"""One contract over every architecture family, on tiny models built in-process."""

import json

import pytest
import torch
import transformers

import llmrom
from llmrom.eval.cost import count_params
from llmrom.modeling import arch
from llmrom.modeling.arch import SPECS, find_blocks, layout_for, trace_groups
from llmrom.loop.capture import block0_input, record_calls, run_block
from llmrom.config import CompressConfig
from llmrom.modeling.factorized import FactorizedLinear, compressed_linears

from conftest import TinyTokenizer, calib_tokens, tiny_model


def test_spec_equals_traced_groups(family):
    model = tiny_model(family)
    layout = layout_for(model)
    assert layout.known and layout.groups == SPECS[model.config.model_type]
    _, blocks = find_blocks(model)
    ids = calib_tokens(2)
    calls = record_calls(model, blocks, ids)
    h = block0_input(model, blocks, ids)
    with torch.no_grad():
        assert trace_groups(blocks[0], lambda: run_block(blocks[0], h, calls[0])) == layout.groups


def test_capture_and_replay_equal_the_full_forward(family):
    model = tiny_model(family)
    _, blocks = find_blocks(model)
    ids = calib_tokens(3)
    seen, handles = [], [b.register_forward_hook(lambda m, a, out: seen.append(out)) for b in blocks]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for hd in handles:
        hd.remove()
    seen = [s[0] if isinstance(s, tuple) else s for s in seen]
    with torch.no_grad():
        calls, h = record_calls(model, blocks, ids), block0_input(model, blocks, ids)
        for i, block in enumerate(blocks):
            h = run_block(block, h, calls[i])
            assert h.shape == seen[i].shape
            assert torch.equal(h, seen[i]), f"block {i} replay differs"


def test_mlp_half_from_the_residual_stream_reproduces_the_block(family):
    model = tiny_model(family)
    layout = layout_for(model)
    norm, mlp, post = layout.mlp_half
    _, blocks = find_blocks(model)
    ids = calib_tokens(3)
    calls, h = record_calls(model, blocks, ids), block0_input(model, blocks, ids)
    for i, block in enumerate(blocks):
        got = {}
        handle = block.get_submodule(norm).register_forward_pre_hook(lambda m, a: got.setdefault("mid", a[0]))
        with torch.no_grad():
            full = run_block(block, h, calls[i])
            handle.remove()
            y = block.get_submodule(mlp)(block.get_submodule(norm)(got["mid"]))
            via_half = got["mid"] + (block.get_submodule(post)(y) if post else y)
        assert torch.equal(via_half, full), f"block {i}"
        h = full


def test_mlp_resume_gives_the_same_model_and_runs_attention_less(family, monkeypatch):
    """Re-running only the MLP half once attention is final changes no factor, and saves forwards."""
    def run():
        model = tiny_model(family)
        attn = [m for n, m in model.named_modules() if n.endswith(("self_attn", ".attn"))]
        calls = []
        for m in attn:
            m.register_forward_hook(lambda *a: calls.append(1))
        config = CompressConfig(budget=0.9, nsamples=len(tokens), seqlen=tokens.shape[1], batch_size=5, last_blocks=2)
        model, _ = llmrom.compress(model, TinyTokenizer(), config, progress=False, tokens=tokens)
        return model, len(calls)

    tokens = calib_tokens()
    resumed, n_resumed = run()
    monkeypatch.setattr(arch, "MLP_HALVES", {})  # every family runs the whole block for every group
    whole, n_whole = run()
    assert n_resumed < n_whole
    for (name, a), b in zip(resumed.state_dict().items(), whole.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def compress_tiny(family, **cfg):
    model = tiny_model(family)
    tokens = calib_tokens()
    config = CompressConfig(**{"budget": 0.9, "nsamples": len(tokens), "seqlen": tokens.shape[1],
                               "batch_size": 5, **cfg})
    model, report = llmrom.compress(model, TinyTokenizer(), config, progress=False, tokens=tokens)
    return model, report, tokens


@pytest.mark.parametrize("options", [{}, {"centered": False}, {"sequential": False}],
                         ids=["default", "uncentred", "non-sequential"])
def test_compress_save_load_identical_logits(family, options, tmp_path):
    model, report, tokens = compress_tiny(family, **options)
    assert report["totals"]["kept_fraction"] <= 0.9
    assert report["totals"]["parameters_after"] == count_params(model)
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    with torch.no_grad():
        ref = model(tokens).logits
    out = llmrom.save(model, None, tmp_path / "out", report)
    meta = json.loads((out / "config.json").read_text())["llmrom"]
    assert meta["modules"] and all(v["rank"] > 0 for v in meta["modules"].values())
    loaded, _ = llmrom.load(out)
    remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, ref)
        assert torch.equal(remote(tokens).logits, ref)
    assert count_params(loaded) == report["totals"]["parameters_after"]


def test_dense_export_loads_without_llmrom(family, tmp_path):
    model, report, tokens = compress_tiny(family, centered=False)  # centring adds biases these layers lack
    with torch.no_grad():
        ref = model(tokens).logits
    out = llmrom.save(model, None, tmp_path / "dense", report, export_dense=True)
    cfg = json.loads((out / "config.json").read_text())
    assert "llmrom" not in cfg and "auto_map" not in cfg and not (out / "llmrom_modeling.py").exists()
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code
    assert not any(isinstance(m, FactorizedLinear) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain(tokens).logits, ref, atol=1e-4, rtol=1e-4)


def test_every_module_error_is_reported(family):
    model, report, _ = compress_tiny(family)
    factorized = set(compressed_linears(model))
    rows = {r["name"]: r for r in report["modules"]}
    assert factorized == {n for n, r in rows.items() if r["rank"] is not None}
    for n in factorized:
        r = rows[n]
        assert 0 < r["explained_variance"] <= 1 and 0 <= r["relative_error"] < 1
        assert r["params_after"] < r["params_before"]


def _block1_factors(sequential, ranks):
    model, _, _ = compress_tiny("llama", sequential=sequential, ranks_file=str(ranks), budget=None)
    mod = model.get_submodule("model.layers.1.mlp.down_proj")
    return mod.second.weight @ mod.first.weight


def test_non_sequential_calibrates_on_dense_activations(tmp_path):
    """--no-sequential: block 1 sees dense inputs whatever happened to block 0; sequential: it does not."""
    names = [f"model.layers.{i}.{n}" for i in (0, 1) for g in SPECS["llama"] for n in g]
    both, only1 = tmp_path / "both.json", tmp_path / "only1.json"
    both.write_text(json.dumps({n: 4 for n in names}))
    only1.write_text(json.dumps({n: 4 for n in names if ".layers.1." in n and "down_proj" in n}))
    assert torch.allclose(_block1_factors(False, both), _block1_factors(False, only1), atol=1e-5)
    assert not torch.allclose(_block1_factors(True, both), _block1_factors(True, only1), atol=1e-3)


def test_unknown_family_falls_back_to_traced_groups(monkeypatch, caplog, tmp_path):
    monkeypatch.delitem(SPECS, "llama")
    with caplog.at_level("WARNING"):
        model, report, tokens = compress_tiny("llama", last_blocks=2, module_budget=0.5, budget=None)
    assert "generic spec" in caplog.text
    assert report["totals"]["modules_factorized"] == 14
    loaded, _ = llmrom.load(llmrom.save(model, None, tmp_path / "o", report))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_folder_loads_where_llmrom_cannot_be_imported(tmp_path):
    """The written modeling file is self-contained: load it in a process that blocks `import llmrom`."""
    import subprocess
    import sys
    model, report, tokens = compress_tiny("qwen2", centered=True)
    out = llmrom.save(model, None, tmp_path / "o", report)
    torch.save({"tokens": tokens, "logits": model(tokens).logits.detach()}, tmp_path / "ref.pt")
    code = (
        "import sys; sys.modules['llmrom'] = None\n"
        "import torch, transformers\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        "assert torch.equal(m(ref['tokens']).logits, ref['logits'])\n"
        "print('identical')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0 and "identical" in res.stdout, res.stderr[-2000:]


def test_a_wrong_mlp_half_is_refused_with_its_name(monkeypatch):
    monkeypatch.setitem(arch.MLP_HALVES, "llama", ("input_layernorm", "mlp", None))  # not where h_mid enters
    tokens = calib_tokens()
    config = CompressConfig(budget=0.9, nsamples=len(tokens), seqlen=tokens.shape[1], batch_size=5, last_blocks=2)
    with pytest.raises(llmrom.LlmromError, match="MLP_HALVES"):
        llmrom.compress(tiny_model("llama"), TinyTokenizer(), config, progress=False, tokens=tokens)
