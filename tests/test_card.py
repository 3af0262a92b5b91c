"""The model card every saved folder gets: Hugging Face YAML header, plan, bytes, how to load."""

import json

import torch
from huggingface_hub import ModelCard

import llmrom
from llmrom.config import CompressConfig
from llmrom.modeling.card import base_model_id, model_card

from conftest import calib_tokens, tiny_model


def test_saved_folder_has_a_card_that_huggingface_hub_reads(tmp_path):
    model, report = llmrom.compress(tiny_model("llama"), None, CompressConfig(budget=0.8, batch_size=4),
                                    progress=False, tokens=calib_tokens())
    report["source"] = {"model": "smollm2-135m", "gguf_file": None, "dtype": "bfloat16"}
    out = llmrom.save(model, None, tmp_path / "out", report)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and "llmrom" in card.data.tags
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    saved = json.loads((out / "llmrom_report.json").read_text())
    assert f"| bytes on disk (bfloat16) | | {size:,} |" in card.text
    assert f"| parameters | {saved['totals']['parameters_before']:,} | {saved['totals']['parameters_after']:,} |" \
        in card.text
    assert "trust_remote_code=True" in card.text and "| down_proj | 2 | 0 |" in card.text
    dense = llmrom.save(model, None, tmp_path / "dense", report, export_dense=False, dtype="float32")
    assert ModelCard.load(dense / "README.md").data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_base_model_only_for_a_hub_id():
    assert base_model_id({"model": "Qwen/Qwen2.5-0.5B"}) == "Qwen/Qwen2.5-0.5B"
    assert base_model_id({"model": "/data/models/llama"}) is None
    assert base_model_id({"model": "./llama"}) is None
    assert base_model_id({}) is None


def test_dense_export_card_needs_no_remote_code(tmp_path):
    report = {"totals": {"parameters_before": 10, "parameters_after": 8, "kept_fraction": 0.8,
                         "macs_per_token_before": 9, "macs_per_token_after": 7}, "modules": []}
    text = model_card(report, dense_export=True)
    assert "trust_remote_code" not in text and "base_model" not in text and torch.__version__
