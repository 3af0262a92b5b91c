"""Streaming compression (llmrom.loop.stream): same folder as in memory, bounded memory, resume after a kill."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import llmrom
from llmrom import cli
from llmrom.config import CompressConfig
from llmrom.eval.cost import count_params
from llmrom.errors import LlmromError
from llmrom.loop.stream import Partial, compress_streaming
from llmrom.modeling.io import stored_dtype

from conftest import calib_tokens, tiny_model, trained_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(last_blocks=2, module_budget=0.5, nsamples=12, seqlen=16, batch_size=5)


def _script():
    spec = importlib.util.spec_from_file_location("make_llama7b_shaped", ROOT / "scripts" / "make_llama7b_shaped.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    """A few-MB bf16 LLaMA-shaped random checkpoint in 5 shards, written by the benchmark's script."""
    out = tmp_path_factory.mktemp("ckpt") / "llama-random"
    return _script().make(out, hidden=64, layers=3, intermediate=160, heads=4, kv_heads=2, vocab=320,
                          shard_mb=0, tokenizer=True, progress=False)


def sharded(family, folder):
    tiny_model(family).save_pretrained(folder, max_shard_size="20KB")
    assert len(list(folder.glob("*.safetensors"))) > 3
    return folder


def in_memory(folder, config, tokens, tmp_path):
    """The ordinary path: load the whole model, compress, save, load the folder back."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, config.dtype)).eval()
    model, report = llmrom.compress(model, None, config, progress=False, tokens=tokens)
    # saved as the streaming run saves: in the source checkpoint's stored dtype (--save-dtype auto)
    loaded, _ = llmrom.load(llmrom.save(model, None, tmp_path / "in-memory", report, dtype=stored_dtype(folder)))
    return loaded, report


def logits(folder, tokens):
    model, _ = llmrom.load(folder)
    with torch.no_grad():
        return model(tokens).logits


def tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def same_folder(a, b):
    """Byte-identical weights, index and config (the report differs only in timings)."""
    names = sorted(p.name for p in Path(a).iterdir())
    assert names == sorted(p.name for p in Path(b).iterdir())
    for name in names:
        if name.endswith((".safetensors", ".json")) and name != "llmrom_report.json":
            assert (Path(a) / name).read_bytes() == (Path(b) / name).read_bytes(), name
    ra, rb = (json.loads((Path(x) / "llmrom_report.json").read_text()) for x in (a, b))
    strip = [{k: v for k, v in m.items() if k != "seconds"} for m in ra["modules"]]
    assert strip == [{k: v for k, v in m.items() if k != "seconds"} for m in rb["modules"]]
    assert ra["totals"]["parameters_after"] == rb["totals"]["parameters_after"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_streaming_equals_in_memory(family, tmp_path):
    folder = sharded(family, tmp_path / "src")
    tokens, config = calib_tokens(), CompressConfig(**CFG)
    ref, ref_report = in_memory(folder, config, tokens, tmp_path)
    report = compress_streaming(folder, tmp_path / "out", config, tokens=tokens, progress=False)
    with torch.no_grad():
        assert torch.equal(logits(tmp_path / "out", tokens), ref(tokens).logits)
    assert report["totals"]["parameters_after"] == ref_report["totals"]["parameters_after"]
    assert report["totals"]["macs_per_token_after"] == ref_report["totals"]["macs_per_token_after"]
    assert [m["rank"] for m in report["modules"]] == [m["rank"] for m in ref_report["modules"]]
    assert set(report["seconds"]["loop"]) >= {"forward", "covariance", "factorize", "read", "write"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left


def test_random_checkpoint_streams_within_one_block_of_memory(random_ckpt, tmp_path):
    """The CI version of the benchmark: bf16 shards from the script, disk activations in bf16."""
    tokens = calib_tokens(n=10, seqlen=16)
    config = CompressConfig(**{**CFG, "activations": "disk", "activations_dtype": "bfloat16"})
    ref, _ = in_memory(random_ckpt, config, tokens, tmp_path)
    skeleton = transformers.AutoModelForCausalLM.from_pretrained(random_ckpt)
    embeddings = skeleton.model.embed_tokens.weight.numel()
    one_block = sum(p.numel() for p in skeleton.model.layers[0].parameters())
    events = []
    compress_streaming(random_ckpt, tmp_path / "out", config, tokens=tokens, progress=False,
                       monitor=lambda event, model, resident: events.append((event, resident)))
    with torch.no_grad():
        assert torch.equal(logits(tmp_path / "out", tokens), ref(tokens).logits)
    assert max(r for _, r in events) <= embeddings + one_block
    assert dict(events)["capture"] == embeddings  # the head is never read for the capture
    assert [r for e, r in events if e == "block loaded"] == [one_block] * 3
    assert all(r == 0 for e, r in events if e == "block released")
    assert all(0 < r < one_block for e, r in events[-2:-1] if e == "block compressed")  # last block is compressed


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_resident_memory_stays_flat_over_compressed_blocks(tmp_path):
    """Freed heap pages go back to the OS after every block: without that, the 7B run's RSS grew by one d x d
    float64 matrix per compressed block (this 768-wide shape grew about 70 MiB over its 5 compressed blocks)."""
    ckpt = _script().make(tmp_path / "ckpt", hidden=768, layers=7, intermediate=2048, heads=12, vocab=500,
                          tokenizer=False, progress=False)
    rss = []
    compress_streaming(ckpt, tmp_path / "out", CompressConfig(budget=0.8, last_blocks=6, nsamples=32, seqlen=64,
                                                              batch_size=16),
                       tokens=calib_tokens(n=32, seqlen=64), progress=False,
                       monitor=lambda event, model, resident: rss.append(_rss_mib()) if event == "block released"
                       else None)
    assert len(rss) == 7
    assert max(rss[2:]) - rss[1] < 8, rss  # flat after the first compressed block (allocator pools settle there)


class Boom(Exception):
    pass


def test_resume_after_an_error_mid_block_gives_the_same_folder(tmp_path, monkeypatch):
    folder = sharded("llama", tmp_path / "src")
    tokens, config = calib_tokens(), CompressConfig(**{**CFG, "activations": "disk"})
    compress_streaming(folder, tmp_path / "whole", config, tokens=tokens, progress=False)

    import llmrom.loop.stream as stream
    real = stream.compress_block

    def failing(block, prefix, i, *args, **kwargs):
        if i == 1:
            raise Boom
        return real(block, prefix, i, *args, **kwargs)

    monkeypatch.setattr(stream, "compress_block", failing)
    out = tmp_path / "out"
    with pytest.raises(Boom):
        compress_streaming(folder, out, config, tokens=tokens, progress=False)
    assert not out.exists()
    partial = Partial(out).path
    assert partial.is_dir() and not (partial / "config.json").exists()
    assert json.loads((partial / "journal.json").read_text())["blocks_done"] == 1
    with pytest.raises(LlmromError, match="--resume"):
        compress_streaming(folder, out, config, tokens=tokens, progress=False)
    with pytest.raises(LlmromError, match="different config"):
        compress_streaming(folder, out, CompressConfig(**{**CFG, "module_budget": 0.4}), tokens=tokens,
                           progress=False, resume=True)
    monkeypatch.setattr(stream, "compress_block", real)
    report = compress_streaming(folder, out, config, tokens=tokens, progress=False, resume=True)
    assert report["streaming"]["sessions"] == 2
    same_folder(out, tmp_path / "whole")
    assert not partial.exists()
    with pytest.raises(LlmromError, match="nothing to resume"):
        compress_streaming(folder, tmp_path / "other", config, tokens=tokens, progress=False, resume=True)


def test_resume_between_blocks_in_memory_activations(tmp_path):
    folder = sharded("qwen2", tmp_path / "src")
    tokens, config = calib_tokens(), CompressConfig(**CFG)
    compress_streaming(folder, tmp_path / "whole", config, tokens=tokens, progress=False)
    assert compress_streaming(folder, tmp_path / "out", config, tokens=tokens, progress=False, max_blocks=1) is None
    assert not (tmp_path / "out").exists()
    compress_streaming(folder, tmp_path / "out", config, tokens=tokens, progress=False, resume=True)
    same_folder(tmp_path / "out", tmp_path / "whole")


KILLER = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from conftest import calib_tokens
from llmrom.config import CompressConfig
from llmrom.loop.stream import compress_streaming
seen = []
def monitor(event, model, resident):
    seen.append(event)
    if event == {event!r} and seen.count(event) == {count}:
        os.kill(os.getpid(), signal.SIGKILL)
compress_streaming({src!r}, {out!r}, CompressConfig(**{cfg!r}), tokens=calib_tokens(), progress=False,
                   monitor=monitor)
"""


@pytest.mark.parametrize("event,count", [("block compressed", 2), ("block loaded", 2)],
                         ids=["mid-block", "between-blocks"])
def test_sigkill_then_resume_gives_the_same_folder(event, count, tmp_path):
    folder = sharded("llama", tmp_path / "src")
    cfg = {**CFG, "activations": "cpu"}
    compress_streaming(folder, tmp_path / "whole", CompressConfig(**cfg), tokens=calib_tokens(), progress=False)
    out = tmp_path / "out"
    code = KILLER.format(tests=str(ROOT / "tests"), event=event, count=count, src=str(folder), out=str(out), cfg=cfg)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == -9, res.stderr[-2000:]
    assert not out.exists()
    assert not (Partial(out).path / "config.json").exists()
    compress_streaming(folder, out, CompressConfig(**cfg), tokens=calib_tokens(), progress=False, resume=True)
    same_folder(out, tmp_path / "whole")


def test_cli_stream_and_its_refusals(random_ckpt, tmp_path, capsys):
    fast = ["--nsamples", "6", "--seqlen", "32", "--batch-size", "4", "--calib", "pydoc"]
    out = tmp_path / "o"
    code = cli.main(["compress", str(random_ckpt), "--budget", "0.9", "--stream", "--policy", "global", "--out",
                     str(out), *fast])
    err = capsys.readouterr().err
    assert code == 2 and "drop --policy" in err and not out.exists()
    code = cli.main(["compress", str(random_ckpt), "--last-blocks", "1", "--module-budget", "0.5", "--resume",
                     "--out", str(out), *fast])
    assert code == 2 and "add --stream" in capsys.readouterr().err
    code = cli.main(["compress", str(random_ckpt), "--last-blocks", "2", "--budget", "0.95", "--stream",
                     "--activations", "disk", "--activations-dtype", "float16", "--out", str(out), *fast])
    stdout = capsys.readouterr().out
    assert code == 0 and "streamed" in stdout and "forward" in stdout
    model, tok = llmrom.load(out)
    report = json.loads((out / "llmrom_report.json").read_text())
    assert tok is not None and report["totals"]["kept_fraction"] <= 0.95
    assert report["config"]["activations_dtype"] == "float16"
    assert count_params(model) == report["totals"]["parameters_after"]


def test_streaming_leaves_the_callers_grad_mode_alone(tmp_path):
    folder = sharded("llama", tmp_path / "src")
    assert torch.is_grad_enabled()  # no earlier test left it off
    compress_streaming(folder, tmp_path / "out", CompressConfig(**CFG), tokens=calib_tokens(), progress=False)
    assert torch.is_grad_enabled()


def test_loop_floor_counts_each_pass_the_scheme_needs():
    """loop/report.loop_floor by hand: block 0 dense once; block 1 (compressed) dense + compressed + the
    Gram products of q/k/v's shared input (64^2), o's (64^2), gate/up's (64^2) and down's outputs (64^2)."""
    from llmrom.loop.pipeline import ModuleRecord
    from llmrom.loop.report import loop_floor
    from llmrom.plan.ranks import LinearShape

    dims = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
            "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128),
            "mlp.down_proj": (128, 64)}
    shapes = [LinearShape(f"model.layers.{b}.{n}", b, d_in, d_out) for b in (0, 1) for n, (d_in, d_out) in dims.items()]
    dense = sum(i * o for i, o in dims.values())
    records = [ModuleRecord("model.layers.1.mlp.down_proj", 128, 64, 8, 128 * 64, 8 * 192, None, None, 0.0)]
    groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    f = loop_floor(shapes, records, groups, n_tokens=10, flops_per_second=1e9)
    macs = dense + (dense + (dense - 128 * 64 + 8 * 192) + 4 * 64 * 64)
    assert f["flop"] == 2 * macs * 10 and f["seconds"] == round(2 * macs * 10 / 1e9, 6)
    assert loop_floor(shapes, [], groups, 10, 1e9)["flop"] == 2 * 2 * dense * 10  # nothing compressed: one pass each


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streamed_dense_export_equals_the_in_memory_one(family, tmp_path):
    """--stream --export dense: each block written with its compressed linears merged (GPT-2's Conv1D
    transposed), a folder plain transformers loads without llmrom, with the in-memory export's logits."""
    folder = sharded(family, tmp_path / "src")
    tokens, config = calib_tokens(), CompressConfig(**CFG, centered=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model, report = llmrom.compress(model, None, config, progress=False, tokens=tokens)
    llmrom.save(model, None, tmp_path / "in-memory", report, export_dense=True, dtype=stored_dtype(folder))
    compress_streaming(folder, tmp_path / "out", config, tokens=tokens, progress=False, export_dense=True)
    config_json = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "llmrom" not in config_json and "auto_map" not in config_json
    assert not (tmp_path / "out" / "llmrom_modeling.py").exists()
    assert sorted(tensors(tmp_path / "out")) == sorted(tensors(tmp_path / "in-memory"))
    assert sum(r["rank"] is not None for r in report["modules"]) > 0
    outs = []
    for d in ("in-memory", "out"):
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d).eval()
        with torch.no_grad():
            outs.append(plain(tokens).logits)
    assert torch.equal(outs[0], outs[1])
    with torch.no_grad():
        assert not torch.allclose(outs[1], transformers.AutoModelForCausalLM.from_pretrained(folder)(tokens).logits)


def test_cli_streamed_dense_export_and_its_refusal(random_ckpt, tmp_path, capsys):
    fast = ["--nsamples", "6", "--seqlen", "32", "--batch-size", "4", "--calib", "pydoc", "--last-blocks", "2",
            "--module-budget", "0.5", "--stream", "--export", "dense"]
    code = cli.main(["compress", str(random_ckpt), "--out", str(tmp_path / "o"), *fast])
    assert code == 2 and "add --no-centered" in capsys.readouterr().err  # centring adds biases LLaMA lacks
    assert not list(tmp_path.iterdir())  # nothing written, no partial folder
    code = cli.main(["compress", str(random_ckpt), "--out", str(tmp_path / "o"), "--no-centered", *fast])
    assert code == 0 and "dense export, streamed" in capsys.readouterr().out
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert count_params(plain) == count_params(transformers.AutoModelForCausalLM.from_pretrained(random_ckpt))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_streamed_automatic_plan_equals_the_in_memory_one(family, tmp_path):
    """--stream with --budget alone: the automatic last-N choice scores its candidates in one streamed pass
    (llmrom.loop.streamplan), with the in-memory proxy's losses (1e-6) and plan, and the same folder."""
    folder = sharded(family, tmp_path / "src")
    tokens = calib_tokens(60, 16)
    config = CompressConfig(budget=0.8, nsamples=60, seqlen=16, batch_size=5)
    ref, ref_report = in_memory(folder, dataclasses.replace(config, embedding_budget=1.0), tokens, tmp_path)
    report = compress_streaming(folder, tmp_path / "out", config, tokens=tokens, progress=False)
    ours, theirs = report["plan"], ref_report["plan"]
    assert ours["auto"]["proxy"] == "StreamedProxy" and theirs["auto"]["proxy"] == "ProjectionProxy"
    assert (ours["last_blocks"], ours["module_budget"]) == (theirs["last_blocks"], theirs["module_budget"])
    assert len(ours["auto"]["candidates"]) == len(theirs["auto"]["candidates"]) >= 2
    for a, b in zip(ours["auto"]["candidates"], theirs["auto"]["candidates"]):
        assert a["last_blocks"] == b["last_blocks"]
        assert abs(a["proxy_calib_loss"] - b["proxy_calib_loss"]) < 1e-6 * b["proxy_calib_loss"]
    with torch.no_grad():
        assert torch.equal(logits(tmp_path / "out", tokens), ref(tokens).logits)


def test_resumed_automatic_plan_is_not_planned_again(tmp_path, monkeypatch):
    """An interrupted --budget stream run resumes with the plan its first session chose (kept in the journal):
    no second planning pass, and the folder of an uninterrupted run."""
    import llmrom.loop.streamplan as streamplan
    folder = sharded("llama", tmp_path / "src")
    tokens = calib_tokens(60, 16)
    config = CompressConfig(budget=0.8, nsamples=60, seqlen=16, batch_size=5)
    compress_streaming(folder, tmp_path / "whole", config, tokens=tokens, progress=False)
    passes = []
    real = streamplan.StreamedProxy.__init__

    def counted(self, *args, **kwargs):
        passes.append(1)
        real(self, *args, **kwargs)
    monkeypatch.setattr(streamplan.StreamedProxy, "__init__", counted)
    assert compress_streaming(folder, tmp_path / "out", config, tokens=tokens, progress=False, max_blocks=1) is None
    report = compress_streaming(folder, tmp_path / "out", config, tokens=tokens, progress=False, resume=True)
    assert len(passes) == 1 and report["plan"]["auto"]["proxy"] == "StreamedProxy"
    assert report["seconds"]["plan"] > 0  # the first session's planning time
    same_folder(tmp_path / "whole", tmp_path / "out")


@pytest.mark.parametrize("export_dense", [False, True])
def test_streamed_joint_groups_resume_and_equal_the_in_memory_run(export_dense, tmp_path):
    """--stream --factors joint: the joint groups are kept in the journal, so a run stopped after one block
    and resumed writes the in-memory run's folder (factorized, or merged back with --export dense)."""
    folder = sharded("llama", tmp_path / "src")
    tokens = calib_tokens()
    config = CompressConfig(**CFG, factors="joint", centered=not export_dense)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model, report = llmrom.compress(model, None, config, progress=False, tokens=tokens)
    assert report["plan"]["joint_modules"]
    llmrom.save(model, None, tmp_path / "in-memory", report, export_dense=export_dense, dtype=stored_dtype(folder))
    assert compress_streaming(folder, tmp_path / "out", config, tokens=tokens, progress=False, max_blocks=1,
                              export_dense=export_dense) is None
    compress_streaming(folder, tmp_path / "out", config, tokens=tokens, progress=False, resume=True,
                       export_dense=export_dense)
    assert sorted(tensors(tmp_path / "out")) == sorted(tensors(tmp_path / "in-memory"))
    load = (lambda d: transformers.AutoModelForCausalLM.from_pretrained(d).eval()) if export_dense else \
        (lambda d: llmrom.load(d)[0])
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "out")(tokens).logits, load(tmp_path / "in-memory")(tokens).logits)
