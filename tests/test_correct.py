"""Error correction (--correct): each compressed layer calibrated toward the dense model's outputs."""

import pytest
import torch
import torch.nn.functional as F

import llmrom
from llmrom.config import CompressConfig
from llmrom.errors import LlmromError
from llmrom.loop.pipeline import LoopOptions
from llmrom.loop.stream import compress_streaming

from conftest import TinyTokenizer, calib_tokens, tiny_model

PLAN = dict(budget=None, last_blocks=2, module_budget=0.4)


def compress(tokens, **cfg):
    config = CompressConfig(**{"nsamples": len(tokens), "seqlen": tokens.shape[1], "batch_size": 5, **PLAN, **cfg})
    model, report = llmrom.compress(tiny_model("llama"), TinyTokenizer(), config, progress=False, tokens=tokens)
    return model, report


def fidelity(model, tokens):
    """(KL(dense || model) per token, output MSE of the logits) on `tokens`."""
    with torch.no_grad():
        ref, out = tiny_model("llama")(tokens).logits, model(tokens).logits
    kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    return float(kl), float((out - ref).pow(2).mean())


@pytest.mark.parametrize("centered", [True, False])
def test_correction_brings_the_model_closer_to_dense_on_the_calibration_tokens(centered):
    tokens = calib_tokens(n=24, seqlen=32)
    kl_off, mse_off = fidelity(compress(tokens, centered=centered)[0], tokens)
    model, report = compress(tokens, centered=centered, correct=True)
    kl_on, mse_on = fidelity(model, tokens)
    assert report["config"]["correct"] is True
    assert report["totals"]["kept_fraction"] == compress(tokens, centered=centered)[1]["totals"]["kept_fraction"]
    assert kl_on < 0.9 * kl_off and mse_on < 0.9 * mse_off, (kl_on, kl_off, mse_on, mse_off)


def test_correction_starts_where_compression_starts_and_is_exact_there():
    """Only block 1 compressed: its first group sees the dense model's inputs (no upstream error), so
    its factors equal plain ROM's; o_proj sees the compressed q, k, v and is corrected."""
    tokens = calib_tokens()
    plain, _ = compress(tokens, last_blocks=1)
    corrected, _ = compress(tokens, last_blocks=1, correct=True)
    for name, same in (("q_proj", True), ("v_proj", True), ("o_proj", False)):
        a = plain.get_submodule(f"model.layers.1.self_attn.{name}")
        b = corrected.get_submodule(f"model.layers.1.self_attn.{name}")
        wa, wb = a.weight, b.weight  # merged factors (a joint group's member: its rows of the stacked map)
        assert torch.allclose(wa, wb, atol=1e-5) == same, name
    assert not isinstance(corrected.model.layers[0].self_attn.q_proj, type(corrected.model.layers[1].self_attn.q_proj))


def test_disk_activations_give_the_same_model():
    tokens = calib_tokens()
    mem, _ = compress(tokens, correct=True)
    disk, _ = compress(tokens, correct=True, activations="disk")
    with torch.no_grad():
        assert torch.equal(mem(tokens).logits, disk(tokens).logits)


@pytest.mark.parametrize("cfg,message", [
    ({"sequential": False}, "--no-sequential"),
    ({"method": "svd"}, "--method rom only"),
    ({"method": "whitened_svd"}, "--method rom only"),
])
def test_refusals(cfg, message):
    with pytest.raises(LlmromError, match=message):
        CompressConfig(budget=0.9, correct=True, **cfg)
    with pytest.raises(LlmromError, match="rom only" if "method" in cfg else "sequential"):
        LoopOptions(**{"correct": True, **cfg})


def test_streaming_refuses_correction(tiny_folder, tmp_path):
    config = CompressConfig(last_blocks=1, module_budget=0.5, nsamples=4, seqlen=16, correct=True)
    with pytest.raises(LlmromError, match="--correct is not supported with --stream"):
        compress_streaming(tiny_folder, tmp_path / "out", config, tokens=calib_tokens(4), progress=False)
    assert not (tmp_path / "out").exists()
