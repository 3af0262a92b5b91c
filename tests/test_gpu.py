"""--device cuda: the same pipeline on a GPU (skipped where torch sees none; CI has none).

Run on a GPU machine with `python -m pytest tests/test_gpu.py`. The CPU run of the same options is
the reference: the factors come from eigendecompositions, whose GPU and CPU results agree to
rounding, so the compressed models' logits must agree to a small tolerance and the plans exactly.
"""

import pytest
import torch

import llmrom
from llmrom.config import CompressConfig
from llmrom.loop.stream import compress_streaming

from conftest import calib_tokens, tiny_model
from test_stream import CFG, in_memory, logits, sharded

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (--device cuda)")

OPTIONS = {
    "default": {},  # interpolative factors
    "pair": dict(factors="pair"),
    "uncentred": dict(centered=False),
    "non-sequential": dict(sequential=False),
    "correct": dict(correct=True),
    "sparse": dict(sparse=0.25),
    "svd": dict(method="svd", factors="pair"),  # the baselines, in their own factor form (as bench/run.py runs them)
    "whitened_svd": dict(method="whitened_svd", factors="pair"),
}


PLANS = {  # --budget alone: the plan is made from calibration statistics collected on --device
    "automatic last-N": {},
    "welore": dict(policy="welore"),
    "global": dict(policy="global"),
    "loss": dict(policy="loss"),
}
BUDGET_ONLY = dict(budget=0.8, nsamples=40, seqlen=16, batch_size=8)


def compressed(family, device, plan=False, **options):
    model = tiny_model(family)
    config = CompressConfig(**(BUDGET_ONLY if plan else CFG), device=device, **options)
    tokens = calib_tokens(n=config.nsamples, seqlen=config.seqlen)
    model, report = llmrom.compress(model, None, config, progress=False, tokens=tokens)
    return model, report


def close(a, b):
    """Logits agree to rounding: max difference under 1e-3 of their spread."""
    return (a - b).abs().max().item() <= 1e-3 * b.std().item()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_cuda_compression_matches_cpu(family, option):
    tokens = calib_tokens(n=4, seed=1)
    cpu, cpu_report = compressed(family, "cpu", **OPTIONS[option])
    gpu, gpu_report = compressed(family, "cuda", **OPTIONS[option])
    assert next(gpu.parameters()).device.type == "cpu"  # blocks go back where they came from
    assert [m["rank"] for m in gpu_report["modules"]] == [m["rank"] for m in cpu_report["modules"]]
    assert gpu_report["totals"]["parameters_after"] == cpu_report["totals"]["parameters_after"]
    with torch.no_grad():
        a, b = gpu(tokens).logits, cpu(tokens).logits
    assert close(a, b), (a - b).abs().max().item()
    dense = tiny_model(family)
    with torch.no_grad():
        assert not close(dense(tokens).logits, b)  # the tolerance is far below what compression changes


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_cuda_plans_match_cpu(plan):
    """Plans computed from statistics on the GPU and weights on the CPU (the model stays home)."""
    cpu, cpu_report = compressed("llama", "cpu", plan=True, **PLANS[plan])
    gpu, gpu_report = compressed("llama", "cuda", plan=True, **PLANS[plan])
    for key in ("policy", "last_blocks", "module_budget", "kept"):
        assert gpu_report["plan"].get(key) == cpu_report["plan"].get(key), key
    per_block = [(r["plan"].get("per_block_plan") or {}).get("per_block") for r in (gpu_report, cpu_report)]
    assert per_block[0] == per_block[1]
    assert [m["rank"] for m in gpu_report["modules"]] == [m["rank"] for m in cpu_report["modules"]]
    assert gpu_report["totals"]["kept_fraction"] == cpu_report["totals"]["kept_fraction"] <= 0.8


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cuda_streaming_equals_cuda_in_memory(family, tmp_path):
    folder = sharded(family, tmp_path / "src")
    tokens, config = calib_tokens(), CompressConfig(**CFG, device="cuda")
    ref, ref_report = in_memory(folder, config, tokens, tmp_path)
    report = compress_streaming(folder, tmp_path / "out", config, tokens=tokens, progress=False)
    with torch.no_grad():
        assert close(logits(tmp_path / "out", tokens), ref(tokens).logits)
    assert [m["rank"] for m in report["modules"]] == [m["rank"] for m in ref_report["modules"]]
    assert report["totals"]["parameters_after"] == ref_report["totals"]["parameters_after"]


def test_cuda_eval_matches_cpu_and_names_the_gpu(tiny_folder, tmp_path, capsys):
    """`llmrom eval --device cuda`: the same perplexity and fidelity as on the CPU, GPU speed named."""
    import json

    from test_eval import TEXT
    from test_cli import run

    held, out = tmp_path / "held.txt", tmp_path / "small"
    held.write_text(TEXT)
    assert run(capsys, "compress", tiny_folder, "--budget", "0.85", "--out", out, "--nsamples", "8",
               "--seqlen", "32", "--calib", "pydoc")[0] == 0
    res = {}
    for device in ("cpu", "cuda"):
        code, _, err = run(capsys, "eval", out, "--ppl", held, "--seqlen", "64", "--windows", "3",
                           "--fidelity-windows", "2", "--device", device, "--json", tmp_path / f"{device}.json")
        assert code == 0, err
        res[device] = json.loads((tmp_path / f"{device}.json").read_text())
    for who in ("model", "reference"):
        assert res["cuda"]["perplexity"][who] == pytest.approx(res["cpu"]["perplexity"][who], rel=1e-4)
    assert res["cuda"]["fidelity"]["kl_mean"] == pytest.approx(res["cpu"]["fidelity"]["kl_mean"], rel=1e-3, abs=1e-6)
    assert torch.cuda.get_device_name() in res["cuda"]["speed"]["model"]["protocol"]
    assert res["cpu"]["speed"]["model"]["protocol"].endswith("threads")
