"""`llmrom eval`: perplexity protocol, fidelity to the dense model, cost, speed, JSON output."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import llmrom
from llmrom.config import CompressConfig
from llmrom.errors import LlmromError, NonFiniteError
from llmrom.eval.evaluate import evaluate, format_results
from llmrom.eval.fidelity import fidelity
from llmrom.eval.perplexity import perplexity
from llmrom.eval.speed import measure_speed
from llmrom.data.textdata import eval_windows

from conftest import TinyTokenizer, calib_tokens, tiny_model
from test_cli import run  # the in-process CLI runner

TEXT = "The quick brown fox jumps over the lazy dog while the python interpreter evaluates. " * 120


def compressed(model):
    m, _ = llmrom.compress(copy.deepcopy(model), TinyTokenizer(),
                           CompressConfig(last_blocks=2, module_budget=0.3, nsamples=8, seqlen=16),
                           tokens=calib_tokens(), progress=False)
    return m


def test_fidelity_of_a_model_to_itself_is_perfect_and_kl_matches_by_hand():
    dense = tiny_model("llama")
    windows = eval_windows(TinyTokenizer(), TEXT, 32, 6)
    same = fidelity(dense, copy.deepcopy(dense), windows)
    assert same["kl_mean"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert same["tokens"] == 6 * 32
    small = compressed(dense)
    got = fidelity(small, dense, windows, batch_size=4)  # batches must not change the means
    with torch.no_grad():
        p = F.log_softmax(dense(windows).logits.double(), -1)
        q = F.log_softmax(small(windows).logits.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()  # KL(dense || compressed)
    assert got["kl_mean"] == pytest.approx(float(kl), rel=1e-4) and got["kl_mean"] > 1e-4
    assert got["top1_agreement"] == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).double().mean()))


def test_fidelity_refuses_a_reference_with_another_vocabulary():
    other = tiny_model("gpt2")
    other.resize_token_embeddings(100)
    with pytest.raises(LlmromError, match="vocabulary"):
        fidelity(tiny_model("llama"), other, eval_windows(TinyTokenizer(), TEXT, 16, 2))


@pytest.mark.parametrize("seqlen", [128, 512, 2048])
def test_perplexity_protocol_at_paper_lengths(seqlen):
    tok = TinyTokenizer()
    text = TEXT * 3
    res = evaluate(tiny_model("llama"), tok, ppl=_file(text), seqlen=seqlen, max_windows=None, speed=False,
                   progress=False)
    p = res["perplexity"]
    assert p["windows"] == len(text) // seqlen and p["predicted_tokens"] == p["windows"] * (seqlen - 1)
    assert f"x {seqlen} tokens" in p["protocol"] and 1 < p["model"] < 1000  # random tiny model: near uniform (128)


def test_non_finite_loss_names_the_window():
    model = tiny_model("llama")
    windows = eval_windows(TinyTokenizer(), TEXT, 16, 4)
    with torch.no_grad():
        model.lm_head.weight[int(windows[2, 5])] = float("nan")  # tied: the embedding of that token too
    with pytest.raises(NonFiniteError, match="window"):
        perplexity(model, windows, batch_size=1)


def test_evaluate_side_by_side_cost_speed_and_table():
    dense = tiny_model("qwen2")
    small = compressed(dense)
    res = evaluate(small, TinyTokenizer(), reference=dense, ppl=_file(TEXT), seqlen=64, max_windows=4,
                   fidelity_windows=2, speed_rounds=1, progress=False)
    assert res["model"]["parameters"] < res["reference"]["parameters"]
    assert res["model"]["macs_per_token"] < res["reference"]["macs_per_token"]
    assert res["model"]["bytes"] < res["reference"]["bytes"]
    assert res["perplexity"]["reference"] == pytest.approx(perplexity(dense, eval_windows(TinyTokenizer(), TEXT, 64, 4)))
    assert res["fidelity"]["windows"] == 2 and res["fidelity"]["tokens"] == 2 * 64
    for who in ("model", "reference"):
        s = res["speed"][who]
        assert s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0
    text = format_results(res)
    for label in ("parameters", "perplexity", "prefill tokens/s", "decode tokens/s", "KL", "top-1", "protocol"):
        assert label in text
    json.dumps(res)  # everything is JSON-able


def test_speed_measures_every_model_it_is_given():
    models = {"a": tiny_model("llama"), "b": tiny_model("gemma3")}
    res = measure_speed(models, prefill_tokens=32, prompt_tokens=4, new_tokens=4, rounds=2)
    assert set(res) == {"a", "b"} and all(r["decode_tokens_per_s"] > 0 for r in res.values())
    assert all(r["protocol"].endswith(f"{torch.get_num_threads()} threads") for r in res.values())


def _file(text, name="held.txt"):
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp())
    (d / name).write_text(text)
    return str(d / name)


def test_cli_eval_of_a_compressed_folder_against_its_recorded_source(tiny_folder, tmp_path, capsys):
    held = tmp_path / "held.txt"
    held.write_text(TEXT)
    out = tmp_path / "small"
    code, _, err = run(capsys, "compress", tiny_folder, "--budget", "0.85", "--out", out, "--nsamples", "8",
                       "--seqlen", "32", "--calib", "pydoc")
    assert code == 0, err
    code, stdout, err = run(capsys, "eval", out, "--ppl", held, "--seqlen", "64", "--windows", "3",
                            "--fidelity-windows", "2", "--no-speed", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert torch.is_grad_enabled()  # in-process callers keep their autograd mode
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["reference"]["source"] == str(tiny_folder)  # 'auto' found the dense source in the report
    assert res["model"]["bytes_of"].startswith("safetensors") and res["model"]["bytes"] < res["reference"]["bytes"]
    assert res["perplexity"]["windows"] == 3 and 0 <= res["fidelity"]["top1_agreement"] <= 1
    assert "KL(reference || model)" in stdout and "perplexity protocol" in stdout
    # the dense folder alone: no reference, no fidelity
    code, stdout, err = run(capsys, "eval", tiny_folder, "--ppl", held, "--seqlen", "64", "--windows", "3",
                            "--no-speed", "--json", tmp_path / "d.json")
    d = json.loads((tmp_path / "d.json").read_text())
    assert code == 0 and "fidelity" not in d and "reference" not in d
    assert d["perplexity"]["model"] == pytest.approx(res["perplexity"]["reference"])
    assert math.isfinite(d["perplexity"]["model"])


@pytest.mark.parametrize("argv,message", [
    (["--seqlen", "0"], "--seqlen must be"),
    (["--windows", "-1"], "--windows must be"),
    (["--ppl", "/no/such/text.txt"], "not found"),
    (["--ppl", "pydoc", "--reference", "/no/such/dense"], "does not exist"),
    (["--device", "tpu9"], "is not a device"),
    (["--device", "mps"], "use cpu or cuda"),
    pytest.param(["--device", "cuda"], "sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has a GPU")),
])
def test_cli_eval_bad_input_is_one_clear_line(tiny_folder, capsys, argv, message):
    code, _, err = run(capsys, "eval", tiny_folder, "--no-speed", *argv)
    assert code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err


def test_cli_eval_refuses_the_calibration_text(tiny_folder, tmp_path, capsys):
    out = tmp_path / "small"
    assert run(capsys, "compress", tiny_folder, "--budget", "0.9", "--out", out, "--nsamples", "4",
               "--seqlen", "16", "--calib", "pydoc")[0] == 0
    code, _, err = run(capsys, "eval", out, "--ppl", "pydoc", "--no-speed")
    assert code == 2 and "calibrated on" in err


def test_generation_shows_both_models_greedy_continuations():
    """`--generate`: each model's greedy continuation (equal to argmax decoding by hand), printed by name."""
    from conftest import trained_tokenizer
    tok, model = trained_tokenizer(), tiny_model("llama")
    res = evaluate(model, tok, reference=copy.deepcopy(model), ppl=None, speed=False, generate="def f(x):",
                   new_tokens=6, progress=False)
    g = res["generation"]
    assert g["new_tokens"] == 6 and g["prompt"] == "def f(x):" and g["model"] == g["reference"]
    ids = tok("def f(x):", return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(6):  # greedy by hand: full forward, argmax of the last position
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert g["model"] == tok.decode(ids[0, -6:], skip_special_tokens=True)
    text = format_results(res)
    assert "greedy continuation of 'def f(x):' (6 tokens):" in text and "  model:" in text and "reference:" in text
