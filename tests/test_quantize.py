"""Quantized folders (torchao int8 weight-only after the low-rank step): smaller, and loaded with the same
logits by llmrom and by plain transformers; bad input is one line and writes nothing."""

import json
import subprocess
import sys

import pytest
import torch

import llmrom
from llmrom import cli
from llmrom.config import CompressConfig
from llmrom.errors import LlmromError
from llmrom.eval.cost import disk_bytes

from conftest import calib_tokens, tiny_model

pytest.importorskip("torchao")
FAST = ["--nsamples", "8", "--seqlen", "32", "--batch-size", "4", "--calib", "pydoc"]


def compressed(quantize="int8", group=None, factors="interpolative"):
    tokens = calib_tokens()
    cfg = CompressConfig(budget=0.8, batch_size=4, quantize=quantize, quant_group_size=group, save_dtype="bfloat16",
                         factors=factors)
    model, report = llmrom.compress(tiny_model("llama"), None, cfg, progress=False, tokens=tokens)
    return model, report, tokens


@pytest.mark.parametrize("group,factors", [(None, "interpolative"), (32, "interpolative"), (None, "joint")])
def test_int8_folder_is_smaller_and_reloads_with_identical_logits(tmp_path, group, factors):
    model, report, tokens = compressed(group=group, factors=factors)
    bf16 = llmrom.save(model, None, tmp_path / "bf16", {**report, "config": {**report["config"], "quantize": "none"}})
    out = llmrom.save(model, None, tmp_path / "int8", report)  # casts to bfloat16, quantizes in place
    with torch.no_grad():
        before = model(tokens).logits
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    saved = json.loads((out / "llmrom_report.json").read_text())["quantization"]
    assert saved["scheme"] == "int8" and saved["group_size"] == group and saved["linears"] > 5
    # the tiny model is a third embedding (kept in bfloat16), and with groups of 32 few ranks qualify
    assert disk_bytes(out) < (0.8 if group is None else 0.99) * disk_bytes(bf16)
    loaded, _ = llmrom.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, before)
    quantized = [n for n, m in loaded.named_modules()
                 if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ == "Int8Tensor"]
    assert len(quantized) == saved["linears"]  # the same linears come back quantized
    if group is not None:  # only the linears whose inputs the group size divides
        assert all(loaded.get_submodule(n).in_features % group == 0 for n in quantized)


def test_plain_transformers_loads_it_without_llmrom(tmp_path):
    model, report, tokens = compressed()
    out = llmrom.save(model, None, tmp_path / "int8", report)
    with torch.no_grad():
        before = model(tokens).logits
    torch.save(tokens, tmp_path / "tokens.pt")
    code = ("import sys, torch; sys.modules['llmrom'] = None\n"  # importing llmrom now fails
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
            f"t = torch.load({str(tmp_path / 'tokens.pt')!r})\n"
            f"torch.save(m(t).logits.detach(), {str(tmp_path / 'logits.pt')!r})\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), before)


@pytest.mark.parametrize("argv, message", [
    (["--quantize", "int4"], "--quantize int4 is not offered"),
    (["--quantize", "int3"], "--quantize must be one of none, int8"),
    (["--quantize", "int8", "--quant-group-size", "1000"], "--quant-group-size 1000 divides the inputs of none"),
    (["--quantize", "int8", "--quant-group-size", "0"], "--quant-group-size must be a positive integer"),
    (["--quantize", "int8", "--export", "dense"], "--export dense merges the factors"),
])
def test_bad_quantization_is_one_line_and_writes_nothing(tiny_folder, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code = cli.main(["compress", str(tiny_folder), "--budget", "0.8", "--out", str(out), *FAST, *argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("llmrom: error")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not out.exists()


def test_missing_torchao_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(LlmromError, match=r"needs torchao .*pip install 'llmrom\[quant\]'"):
        CompressConfig(budget=0.8, quantize="int8")
