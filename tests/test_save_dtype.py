"""Output dtype: folders are saved in the source's float dtype (bfloat16 for GGUF) or --save-dtype's,
integer buffers keep theirs, and the folder reloads with the logits of the cast weights."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import llmrom
from llmrom import cli
from llmrom.config import CompressConfig
from llmrom.eval.cost import disk_bytes
from llmrom.loop.stream import compress_streaming
from llmrom.modeling.io import stored_dtype

from conftest import calib_tokens, tiny_model, trained_tokenizer

FAST = ["--nsamples", "8", "--seqlen", "32", "--batch-size", "4", "--calib", "pydoc"]


def stored(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            out.update({k: st.get_tensor(k).dtype for k in st.keys()})
    return out


def compressed(tokens):
    model = tiny_model("llama")
    model, report = llmrom.compress(model, None, CompressConfig(budget=0.8, batch_size=4), progress=False,
                                    tokens=tokens)
    return model, report


def test_bfloat16_folder_halves_the_bytes_and_reloads_the_cast_weights(tmp_path):
    tokens = calib_tokens()
    model, report = compressed(tokens)
    f32 = llmrom.save(model, None, tmp_path / "f32", dict(report))
    bf16 = llmrom.save(model, None, tmp_path / "bf16", dict(report), dtype="bfloat16")
    kinds = stored(bf16)
    assert {d for d in kinds.values() if d.is_floating_point} == {torch.bfloat16}
    assert any(k.endswith(".order") and d == torch.int32 for k, d in kinds.items())  # interpolative index kept
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((bf16 / "llmrom_report.json").read_text())["saved_dtype"] == "bfloat16"
    assert 0.45 < disk_bytes(bf16) / disk_bytes(f32) < 0.55
    loaded, _ = llmrom.load(bf16)
    assert next(loaded.parameters()).dtype == torch.bfloat16  # dtype auto: what the folder stores
    up, _ = llmrom.load(bf16, dtype=torch.float32)  # computed in float32 from the stored bfloat16 weights
    cast = {k: v.to(torch.bfloat16).float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(cast)
    with torch.no_grad():
        assert torch.equal(up(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize("source, asked, want", [("bfloat16", "auto", "bfloat16"), ("float32", "auto", "float32"),
                                                 ("bfloat16", "float16", "float16"),
                                                 ("float32", "bfloat16", "bfloat16")])
def test_cli_saves_in_the_source_dtype_unless_told(tmp_path, capsys, source, asked, want):
    folder = tmp_path / "src"
    tiny_model("llama").to(getattr(torch, source)).save_pretrained(folder)
    trained_tokenizer().save_pretrained(folder)
    assert stored_dtype(folder) == source
    out = tmp_path / "out"
    assert cli.main(["compress", str(folder), "--budget", "0.8", "--out", str(out), "--save-dtype", asked, *FAST]) == 0
    assert {d for d in stored(out).values() if d.is_floating_point} == {getattr(torch, want)}
    report = json.loads((out / "llmrom_report.json").read_text())
    assert report["saved_dtype"] == want and report["source"]["dtype"] == source


def test_gguf_source_is_stored_as_bfloat16():
    assert stored_dtype("/nowhere", "model.Q4_1.gguf") == "bfloat16"


def test_unknown_save_dtype_is_one_line_and_writes_nothing(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["compress", str(tiny_folder), "--budget", "0.8", "--out", str(out), "--save-dtype", "int8",
                     *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "llmrom: error: --save-dtype must be auto, float32, bfloat16 or float16" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_streaming_saves_the_same_bfloat16_folder_as_in_memory(tmp_path):
    folder = tmp_path / "src"
    tiny_model("qwen2").to(torch.bfloat16).save_pretrained(folder, max_shard_size="20KB")
    tokens = calib_tokens()
    config = CompressConfig(last_blocks=2, module_budget=0.5, nsamples=12, seqlen=16, batch_size=5)
    report = compress_streaming(folder, tmp_path / "streamed", config, tokens=tokens, progress=False)
    assert report["saved_dtype"] == "bfloat16"
    assert {d for d in stored(tmp_path / "streamed").values() if d.is_floating_point} == {torch.bfloat16}
    model, _ = llmrom.load_model(str(folder))  # float32 compute, as the streaming run
    model, mem_report = llmrom.compress(model, None, config, progress=False, tokens=tokens)
    llmrom.save(model, None, tmp_path / "in-memory", mem_report)
    a, b = llmrom.load(tmp_path / "streamed", dtype=torch.float32)[0], llmrom.load(tmp_path / "in-memory",
                                                                                    dtype=torch.float32)[0]
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)
