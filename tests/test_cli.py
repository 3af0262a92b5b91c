"""The command line in-process: the happy path and every bad input the issue names."""

import json
import os

import pytest
import torch
import transformers

import llmrom
from llmrom.eval.cost import count_params
from llmrom import cli

FAST = ["--nsamples", "8", "--seqlen", "32", "--batch-size", "4", "--calib", "pydoc"]


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_info_and_reload(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", tiny_folder, "--budget", "0.9", "--out", out, *FAST,
                            "--eval", tiny_folder / "notes.txt")
    assert code == 2 and "notes.txt" in err  # held-out text file missing: clear error, nothing written
    assert not out.exists()
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("Hello world, this is held-out evaluation text for the tiny model. " * 200)
    code, stdout, err = run(capsys, "compress", tiny_folder, "--budget", "0.9", "--out", out, *FAST,
                            "--eval", held_out, "--eval-seqlen", "64", "--eval-windows", "4")
    assert code == 0, err
    assert torch.is_grad_enabled()  # in-process callers keep their autograd mode
    assert "kept 0.8" in stdout and "perplexity on" in stdout and str(out) in stdout
    report = json.loads((out / "llmrom_report.json").read_text())
    assert report["totals"]["kept_fraction"] <= 0.9
    assert report["evaluation"]["perplexity_after"] > 0
    sec, floor = report["seconds"], report["floor"]  # where the time went, and the loop's arithmetic floor
    assert {"speed_limits", "plan", "embedding", "loop"} <= set(sec) and sec["loop"]["total"] > 0
    assert {"forward", "covariance", "factorize"} <= set(sec["loop"])
    parts = sec["speed_limits"] + sec["plan"] + sec["embedding"] + sec["loop"]["total"]
    assert parts <= report["totals"]["wall_seconds"] + 1e-3
    assert floor["wall_over_floor"] > 1 and "arithmetic floor" in stdout and "plan " in stdout
    model, tok = llmrom.load(out)
    assert tok is not None and count_params(model) == report["totals"]["parameters_after"]
    code, stdout, _ = run(capsys, "info", out)
    assert code == 0 and "model.layers.1.mlp.down_proj" in stdout and "rank" in stdout
    code, stdout, _ = run(capsys, "info", out, "--json")
    assert json.loads(stdout)["totals"] == report["totals"]
    code, _, err = run(capsys, "compress", out, "--budget", "0.8", "--out", tmp_path / "again", *FAST)
    assert code == 2 and "already compressed" in err and not (tmp_path / "again").exists()


def test_existing_output_is_refused_then_overwritten(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "compress", tiny_folder, "--budget", "0.9", "--out", out, *FAST)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run(capsys, "compress", tiny_folder, "--last-blocks", "1", "--module-budget", "0.5",
                       "--out", out, "--overwrite", *FAST)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


@pytest.mark.parametrize("argv,message", [
    (["/nonexistent/model", "--budget", "0.9"], "does not exist"),
    (["{tiny}", "--budget", "1.5"], "(0, 1]"),
    (["{tiny}", "--budget", "0"], "(0, 1]"),
    (["{tiny}", "--budget", "0.05"], "smallest reachable is --budget"),
    (["{tiny}"], "say how much to keep"),
    (["{tiny}", "--budget", "0.9", "--method", "magic"], "unknown --method"),
    (["{tiny}", "--budget", "0.9", "--nsamples", "4", "--seqlen", "100000000"], "tokens"),
    (["{tiny}", "--budget", "0.9", "--calib", "/no/such/calib.txt"], "not found"),
    (["{tiny}", "--budget", "0.99", "--last-blocks", "7"], "between 1 and 2"),
    (["{tiny}", "--budget", "0.9", "--ranks-file", "/no/ranks.json"], "ranks file"),
    (["{tiny}", "--budget", "0.9", "--device", "tpu9"], "is not a device"),
    (["{tiny}", "--budget", "0.9", "--plan-trials", "-1"], "--plan-trials must be a whole number"),
    (["{tiny}", "--budget", "0.9", "--centered", "--export", "dense"], "add --no-centered"),
    (["{tiny}", "--budget", "0.9", "--correct", "--no-sequential"], "--no-sequential"),
    (["{tiny}", "--budget", "0.9", "--correct", "--method", "svd"], "--method rom only"),
    (["{tiny}", "--last-blocks", "1", "--module-budget", "0.5", "--correct", "--stream"],
     "not supported with --stream"),
])
def test_bad_input_is_one_clear_line(tiny_folder, tmp_path, capsys, argv, message):
    argv = [a.replace("{tiny}", str(tiny_folder)) for a in argv]
    code, _, err = run(capsys, "compress", *FAST, *argv, "--out", tmp_path / "o")  # later flags win
    assert code == 2
    last = err.strip().splitlines()[-1]  # earlier lines are progress bars from loading
    assert last.startswith("llmrom: error:") and message in last and err.count("llmrom: error") == 1
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_unsupported_model_is_refused(tmp_path, capsys):
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8)
    transformers.CLIPVisionModel(cfg).save_pretrained(tmp_path / "clip")
    code, _, err = run(capsys, "compress", tmp_path / "clip", "--budget", "0.9", "--out", tmp_path / "o")
    assert code == 2 and "cannot load" in err and "causal LM" in err


def test_non_finite_activations_name_the_layer(tmp_path, capsys):
    from conftest import tiny_model, trained_tokenizer
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "bad")
    trained_tokenizer().save_pretrained(tmp_path / "bad")
    code, _, err = run(capsys, "compress", tmp_path / "bad", "--last-blocks", "2", "--module-budget", "0.5",
                       "--out", tmp_path / "o", *FAST)
    assert code == 2 and "non-finite" in err and "layers.1" in err
    assert not (tmp_path / "o").exists()


def test_interrupted_save_leaves_nothing(tiny_folder, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("llmrom.modeling.io.write_safetensors", boom)
    code, _, err = run(capsys, "compress", tiny_folder, "--budget", "0.9", "--out", tmp_path / "o", *FAST)
    assert code == 130 and "no output folder" in err
    assert os.listdir(tmp_path) == []


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compress", "--help"])
    text = capsys.readouterr().out
    for flag in ("--budget", "--last-blocks", "--module-budget", "--ranks-file", "--centered", "--no-sequential",
                 "--correct", "--no-correct", "--calib", "--nsamples", "--seqlen", "--seed", "--export", "--overwrite",
                 "--gguf-file"):
        assert flag in text
