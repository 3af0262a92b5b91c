"""A tiny smoke run of the benchmark (bench/run.py + bench/report.py): files, budgets, resume, README."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"


def bench_module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_smoke(tiny_folder, tmp_path, capsys):
    held = tmp_path / "held.txt"
    held.write_text("Held-out evaluation text, different from the calibration text. " * 300)
    runs = tmp_path / "runs"
    argv = ["--models", str(tiny_folder), "--budgets", "0.9,0.8,0.05", "--variants", "rom-blocks,rom,svd,svd-llm", "--nsamples", "8",
            "--seqlen", "32", "--batch-size", "4", "--eval", str(held), "--eval-seqlen", "64", "--eval-windows", "3",
            "--fidelity-windows", "2", "--speed-rounds", "1", "--out", str(runs)]
    bench_module("run").main(argv)
    printed = capsys.readouterr().out
    assert "budget 0.05: skipped, budget 0.05 cannot be reached" in printed  # and no file for it
    assert "budget 0.05 rom: skipped, budget 0.05 cannot be reached" in printed  # tried with the embedding too
    name = tiny_folder.name
    files = sorted(p.name for p in runs.glob("*.json"))
    assert files == sorted([f"{name}_dense.json"] + [f"{name}_{b}_{v}.json" for b in ("0.9", "0.8")
                                                     for v in ("rom-blocks", "rom", "svd", "svd-llm")])
    for budget in (0.9, 0.8):
        rom, svd, default = (json.loads((runs / f"{name}_{budget:g}_{v}.json").read_text())
                             for v in ("rom-blocks", "svd", "rom"))
        assert rom["plan"]["last_blocks"] == svd["plan"]["last_blocks"]  # same blocks, only the method differs
        assert rom["config"]["embedding_budget"] == svd["config"]["embedding_budget"] == 1.0  # embedding dense
        # the default plans the embedding's share with N, as `llmrom compress --budget` does
        assert default["config"]["embedding_budget"] is None and default["totals"]["kept_fraction"] <= budget
        assert {c["embedding_rank"] is None for c in default["plan"]["auto"]["candidates"]} == {True, False}
        svd_llm = json.loads((runs / f"{name}_{budget:g}_svd-llm.json").read_text())
        assert svd_llm["plan"]["last_blocks"] == 2 and svd_llm["config"]["method"] == "whitened_svd"
        assert svd_llm["totals"]["kept_fraction"] <= budget
        for r in (rom, svd):
            assert r["totals"]["kept_fraction"] <= budget
            assert r["eval"]["fidelity"]["kl_mean"] >= 0 and r["peak_rss_bytes_during_compression"] > 0
            assert r["protocol"]["calibration"].startswith("pydoc: 8 windows x 32")
            assert all(len(m["explained_curve"]) == 14 for m in r["modules"] if m["rank"])
        # every row of a model is calibrated on the same token ids, and the fingerprint says so
        assert rom["calibration_tokens_sha256"] == svd["calibration_tokens_sha256"] == svd_llm[
            "calibration_tokens_sha256"] == json.loads((runs / f"{name}_dense.json").read_text())[
            "calibration_tokens_sha256"]
        assert len(rom["eval"]["perplexity"]["windows_sha256"]) == 64
    stamp = {p: p.stat().st_mtime_ns for p in runs.glob("*.json")}
    bench_module("run").main(argv)  # resumes: nothing is re-run
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*.json")} == stamp
    dense_file = runs / f"{name}_dense.json"
    good = dense_file.read_text()
    dense_file.write_text(json.dumps({**json.loads(good), "calibration_tokens_sha256": "0" * 64}))
    with pytest.raises(SystemExit, match="calibrated on other token ids"):  # never mixes calibrations
        bench_module("run").main(argv)
    dense_file.write_text(good)
    # a same-blocks variant run on its own still compresses the reference's N blocks
    bench_module("run").main([*argv[:2], "--budgets", "0.9", "--variants", "rom-interp", *argv[6:]])
    ref, interp = (json.loads((runs / f"{name}_0.9_{v}.json").read_text()) for v in ("rom-blocks", "rom-interp"))
    assert interp["config"]["last_blocks"] == ref["plan"]["last_blocks"] and interp["plan"]["policy"] == "last-blocks"
    assert (ref["config"]["factors"], interp["config"]["factors"]) == ("pair", "interpolative")

    readme, docs = tmp_path / "README.md", tmp_path / "docs"
    report = bench_module("report")
    readme.write_text(f"# x\n\n{report.HEADLINE_BEGIN}\nold\n{report.HEADLINE_END}\n\nafter\n")
    docs.mkdir()
    (docs / "results.md").write_text(f"# r\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    report.main(["--runs", str(runs), "--out", str(tmp_path / "results"), "--readme", str(readme),
                 "--docs", str(docs)])
    for png in ("ppl_vs_params.png", f"ranks_{name}.png", f"explained_{name}.png"):
        assert (tmp_path / "results" / png).stat().st_size > 1000
    text = (docs / "results.md").read_text()
    assert "old" not in text and text.endswith("after\n") and "| 0.8 | svd |" in text and "| 1 | dense |" in text
    assert "](../results/ppl_vs_params.png)" in text  # image links work from the docs page
    assert (tmp_path / "results" / "summary.md").read_text().strip().replace("](./", "](../results/") in text
    head = readme.read_text()  # the headline: the default against dense and SVD-LLM, with bytes
    rom = json.loads((runs / f"{name}_0.9_rom.json").read_text())
    ppl = rom["eval"]["perplexity"]["model"]
    assert "old" not in head and head.endswith("after\n") and f"| {name} | " in head and f"| {ppl:.2f} |" in head
    kept = rom["totals"]["kept_fraction"]  # bytes against dense beside quality; speed where the row measured it
    assert re.search(r"\| [\d.]+ MB \(0\.(89|90)x\) \|", head) and 0.89 < kept <= 0.9


def test_headline_takes_speed_from_the_speed_benchmark_and_marks_old_plans(tmp_path):
    """README's headline: prefill and decode ratios of bench/speed.py beside perplexity and bytes; a row
    planned before --prefer existed is marked, not passed off as the current default."""
    def row(budget, config):
        return {"variant": "rom", "budget": budget, "config": config, "totals": {"kept_fraction": budget},
                "eval": {"perplexity": {"model": 20.0, "reference": 10.0}, "model": {"bytes": 80e6},
                         "reference": {"bytes": 100e6}}}
    (tmp_path / "m_eager.json").write_text(json.dumps({"model": "m", "rows": {"0.8 rom": {
        "budget": 0.8, "variant": "rom", "speed_vs_dense": {"prefill": 1.234, "decode batch 1": 1.111}}}}))
    report = bench_module("report")
    text = report.headline_table({"m": [row(0.8, {"prefer": "speed", "factors": "joint"}), row(0.7, {}),
                                        row(0.9, {"prefer": "speed", "factors": "interpolative"})]},
                                 speed_dir=tmp_path)
    assert "| m | 0.80 | 10.00 | - | 20.00 | - | 80.0 MB (0.80x) | 1.23 | 1.11 |" in text
    assert "| m † | 0.70 |" in text and "not measured | not measured |" in text and "† planned before" in text
    assert "| m ‡ | 0.90 |" in text and "‡ the default's plan, but each linear factorized alone" in text


def test_benchmark_refuses_evaluating_on_the_calibration_text():
    with pytest.raises(SystemExit):
        bench_module("run").parse_args(["--calib", "pydoc", "--eval", "pydoc"])


def test_ablation_smoke(tiny_folder, tmp_path):
    """bench/ablate.py: one setting changed at a time, same last N blocks and budget, one table."""
    held = tmp_path / "held.txt"
    held.write_text("Held-out evaluation text, different from the calibration text. " * 300)
    name = tiny_folder.name
    (tmp_path / "runs").mkdir()  # the benchmark's dense row, fingerprinted with the benchmark's calibration
    dense = {"model": str(tiny_folder), "variant": "dense", "calibration_tokens_sha256": "f" * 64,
             "eval": {"perplexity": {"model": 123.0}}}
    (tmp_path / "runs" / f"{name}_dense.json").write_text(json.dumps(dense))
    bench_module("ablate").main(["--model", str(tiny_folder), "--budget", "0.8", "--last-blocks", "1",
                                 "--settings", "n32,len32", "--results", str(tmp_path), "--batch-size", "8",
                                 "--eval", str(held), "--eval-seqlen", "64", "--eval-windows", "2",
                                 "--fidelity-windows", "1"])
    runs = {s: json.loads((tmp_path / "ablation" / f"{name}_0.8" / s / f"{name}_0.8_rom-blocks.json").read_text())
            for s in ("n32", "len32")}
    assert runs["n32"]["protocol"]["calibration"].startswith("pydoc: 32 windows x 128")
    assert runs["len32"]["protocol"]["calibration"].startswith("pydoc: 128 windows x 32")
    assert {r["plan"]["last_blocks"] for r in runs.values()} == {1}
    for s in ("n32", "len32"):  # the dense evaluation is reused, and each setting keeps its own calibration
        copied = json.loads((tmp_path / "ablation" / f"{name}_0.8" / s / f"{name}_dense.json").read_text())
        assert copied["eval"]["perplexity"]["model"] == 123.0 and "calibration_tokens_sha256" not in copied
        assert runs[s]["eval"]["perplexity"]["reference"] == 123.0
    assert runs["n32"]["calibration_tokens_sha256"] != runs["len32"]["calibration_tokens_sha256"]
    assert all(r["totals"]["kept_fraction"] <= 0.8 for r in runs.values())
    table = (tmp_path / f"ablation_{name}_0.8.md").read_text()
    assert "| n32 |" in table and "| len32 |" in table and "| n512 |" not in table
    section = bench_module("report").ablation_section(tmp_path)  # the README's copy of the same table
    assert f"Calibration ablations: {name}, budget 0.8, last 1 blocks" in section and "(dense perplexity 123.000)" in section
    n32 = runs["n32"]["eval"]["perplexity"]["model"]
    assert f"| n32 | pydoc: 32 windows x 128 tokens, seed 0 | {runs['n32']['totals']['kept_fraction']:.4f} | {n32:.3f} | - |" in section
    assert table.split("\n", 2)[2].strip() in section


def test_report_writes_the_heal_table_from_heal_files(tmp_path):
    report = bench_module("report")
    run = {"model": "compressed", "mode": "lora", "perplexity_before": 40.0, "perplexity_after": 30.0, "steps": 8,
           "train_seconds": 50.0, "peak_rss_bytes": 2**31}
    (tmp_path / "heal_m_0.8.json").write_text(json.dumps({"model": "m", "budget": 0.8, "runs": [run]}))
    text = f"x\n{report.HEAL_BEGIN}\nold\n{report.HEAL_END}\ny\n"
    table = report.heal_table(tmp_path)
    out = report.replace_between(text, report.HEAL_BEGIN, report.HEAL_END, table, "README")
    assert "| m | 0.8 | compressed | lora | 40.00 | 30.00 | -25% | 8 | 50 | 2.00 |" in out
    assert "old" not in out and out.endswith("y\n")


def tiny_checkpoint(folder):
    """A few-MB bf16 checkpoint from the 7B script (3 blocks)."""
    script_path = BENCH.parent / "scripts" / "make_llama7b_shaped.py"
    spec = importlib.util.spec_from_file_location("make_llama7b_shaped", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.make(folder, hidden=64, layers=3, intermediate=160, heads=4, kv_heads=2, vocab=256,
                       shard_mb=0, tokenizer=False, progress=False)


STREAM_ARGS = ["--last-blocks", "2", "--nsamples", "8", "--seqlen", "16", "--batch-size", "4", "--activations", "disk",
               "--activations-dtype", "bfloat16"]


def stream_bench(argv):
    import torch
    bench_module("stream").main(argv)
    assert torch.is_grad_enabled()  # the benchmark leaves its caller's autograd mode alone


def test_stream_benchmark_smoke(tmp_path):
    """bench/stream.py --max-blocks on a few-MB checkpoint from the 7B script: one dense and one
    compressed block measured, the extrapolation and its floor written, nothing left behind."""
    ckpt, results = tiny_checkpoint(tmp_path / "ckpt"), tmp_path / "results"
    stream_bench(["--model", str(ckpt), "--max-blocks", "2", *STREAM_ARGS, "--results", str(results)])
    r = json.loads((results / "stream_llama7b-shaped_max2.json").read_text())
    assert r["blocks_run"] == 2 and len(r["block_matrix_product_gflop"]) == 2
    assert r["block_matrix_product_gflop"][1] != r["block_matrix_product_gflop"][0]  # dense vs compressed block
    ex = r["extrapolated"]
    dense, compressed = r["block_matrix_product_gflop"]
    assert ex["full_run_matrix_product_gflop"] == pytest.approx(1 * dense + 2 * compressed, abs=1e-3)  # 3 blocks
    assert {"forward", "covariance", "factorize"} <= set(r["seconds_by_step"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "results"]  # its work folder was removed


def test_stream_benchmark_full_run_resumes_in_its_work_folder(tmp_path, monkeypatch):
    """A full run interrupted after its first block is finished by the same command: every block is
    measured once, the sessions add up, and the work folder goes away at the end."""
    ckpt, results, work = tiny_checkpoint(tmp_path / "ckpt"), tmp_path / "results", tmp_path / "work"
    argv = ["--model", str(ckpt), "--work", str(work), *STREAM_ARGS, "--results", str(results)]
    mod = bench_module("stream")
    real = mod.compress_streaming

    def killed_after_one_block(*a, **kw):
        real(*a, **{**kw, "max_blocks": 1})
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "compress_streaming", killed_after_one_block)
    with pytest.raises(KeyboardInterrupt):
        mod.main(argv)
    assert len(json.loads((work / "bench_blocks.json").read_text())["blocks"]) == 1
    stream_bench(argv)  # a fresh load of the script: the real compress_streaming, resuming
    r = json.loads((results / "stream_llama7b-shaped_full.json").read_text())
    assert r["sessions"] == 2 and r["blocks_run"] == 3 and len(r["block_matrix_product_gflop"]) == 3
    assert not work.exists()


def test_options_table_compares_each_option_with_the_blocks_only_reference():
    def run(variant, budget, ppl):
        return {"variant": variant, "budget": budget, "eval": {"perplexity": {"model": ppl}}}

    by_model = {"a": [run("rom-blocks", 0.9, 10.0), run("rom-uncentred", 0.9, 12.0), run("rom-blocks", 0.8, 20.0),
                      run("rom-uncentred", 0.8, 15.0), run("rom-nonseq", 0.8, 40.0), run("rom", 0.8, 5.0)],
                "b": [run("rom-uncentred", 0.9, 5.0), run("rom", 0.9, 1.0)]}  # no reference run there: not compared
    table = bench_module("report").options_table(by_model)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert rows["rom-uncentred"] == "| rom-uncentred | 2 | 0.949 | 1 of 2 | a 0.8 |"  # sqrt(1.2 * 0.75)
    assert rows["rom-nonseq"] == "| rom-nonseq | 1 | 2.000 | 1 of 1 | - |"
    assert rows["rom"] == "| rom | 1 | 0.250 | 0 of 1 | a 0.8 |"  # the default, embedding planned with N
    assert "rom-sparse" not in rows


def test_speed_benchmark_smoke(tiny_folder, tmp_path, monkeypatch, capsys):
    """bench/speed.py: every row compressed once into a kept folder, then timed against the dense model
    (prefill, decode at batch 1 and 8) beside its perplexity and bytes; a second run reuses the folders."""
    import torch
    held = tmp_path / "held.txt"
    held.write_text("Held-out evaluation text, different from the calibration text. " * 300)
    speed = bench_module("speed")
    argv = ["--model", str(tiny_folder), "--budgets", "0.9,0.8", "--variants", "rom,rom-quality", "--nsamples", "8",
            "--seqlen", "32", "--rounds", "1", "--eval", str(held), "--eval-seqlen", "64", "--eval-windows", "2",
            "--folders", str(tmp_path / "folders"), "--results", str(tmp_path / "results")]
    speed.main(argv)
    assert torch.is_grad_enabled()
    r = json.loads((tmp_path / "results" / "llama_eager.json").read_text())
    assert set(r["rows"]) == {"0.9 rom", "0.9 rom-quality", "0.8 rom", "0.8 rom-quality"}
    for row in r["rows"].values():
        assert row["parameters"] <= row["budget"] * r["dense"]["parameters"]
        assert row["bytes_on_disk"] > 0 and row["perplexity"] > 1
        assert set(row["speed_vs_dense"]) == {"prefill", "decode batch 1", "decode batch 8"}
        assert all(v > 0 for v in row["speed_vs_dense"].values())
    monkeypatch.setattr(speed.llmrom, "compress", lambda *a, **k: pytest.fail("compressed again"))
    speed.main(argv[:5] + ["rom"] + argv[6:])  # resumes from the kept folders
    table = speed.tables(tmp_path / "results")
    assert "| 0.9 | rom | " in table and "| 0.8 | rom-quality | " in table and "decode b8" in table


def test_target_table_measures_the_default_and_the_best_option_against_half_the_gap():
    def run(variant, ppl, budget=0.9):
        return {"variant": variant, "budget": budget, "eval": {"perplexity": {"model": ppl}}}

    runs = [run("dense", 10.0, 1.0), run("rom", 20.0), run("rom-uncentred", 22.0), run("svd-llm", 40.0),
            run("rom-sparse", 15.0)]
    line = bench_module("report").target_table({"m": runs}).splitlines()[-1]
    # best baseline 22 -> target 16; rom closes (22 - 20) / 12, rom-sparse (22 - 15) / 12
    assert line == ("| m | 0.9 | 10.00 | rom-uncentred 22.00 (not run: svd) | 16.00 | 20.00 | 17% | no "
                    "| rom-sparse 15.00 | 58% | yes |")
    older = [r for r in runs if r["variant"] != "rom"] + [run("rom-pair", 18.0)]  # the default's row not run yet
    line = bench_module("report").target_table({"m": older}).splitlines()[-1]
    assert line == ("| m | 0.9 | 10.00 | rom-uncentred 22.00 (not run: svd) | 16.00 | not run | - | - "
                    "| rom-sparse 15.00 | 58% | yes |")


def test_sparse_layers_benchmark_smoke(tiny_folder, tmp_path):
    """bench/sparse_layers.py: every linear of the two measured blocks, each fit at its stated rank."""
    import torch
    bench_module("sparse_layers").main(["--model", str(tiny_folder), "--module-budget", "0.5", "--nsamples", "8",
                                        "--seqlen", "32", "--results", str(tmp_path)])
    assert torch.is_grad_enabled()
    r = json.loads((tmp_path / "sparse_layers_llama.json").read_text())
    assert r["blocks"] == [1] and len(r["rows"]) == 7  # blocks N/2 = 1 and the last: the same block here
    for row in r["rows"]:
        assert row["low_rank"] == int(0.75 * row["rank"]) and row["nnz"] > 0
        assert 0 < row["plain"] < 1
        assert row["entries/3"] <= row["entries/1"] + 1e-12  # the best of the rounds is kept; round 1 is one
    assert "| 1 | mlp.down_proj | 64 x 128 |" in (tmp_path / "sparse_layers_llama.md").read_text()


def test_report_flags_rows_calibrated_on_other_tokens_and_gpu_timings():
    report = bench_module("report")

    def run(variant, sha=None, device="cpu"):
        r = {"variant": variant, "config": {"device": device}}
        return {**r, "calibration_tokens_sha256": sha} if sha else r

    same = {"a": [run("rom", "1" * 64), run("svd", "1" * 64), run("dense")]}  # old rows have no fingerprint
    assert report.mixed_calibration(same) == []
    mixed = {"a": [run("rom", "1" * 64), run("svd", "2" * 64)], "b": [run("rom", "3" * 64)]}
    assert report.mixed_calibration(mixed) == [
        "WARNING: the rows of a were calibrated on different token ids (111111111111, 222222222222); "
        "their perplexities do not compare."]
    assert report.gpu_mark(run("rom", device="cuda")) == " (GPU)" and report.gpu_mark(run("dense")) == ""


def test_zero_shot_table_keeps_only_tasks_the_dense_model_knows(tmp_path):
    """bench/zeroshot.py: retained above chance over the tasks where dense beats chance by two stderr."""
    zs = bench_module("zeroshot")

    def row(variant, accs, budget=None):
        tasks = {t: {"acc": a, "acc_norm": a, "acc_stderr": 0.02, "acc_norm_stderr": 0.02, "samples": 100}
                 for t, a in accs.items()}
        r = {"model": "m", "variant": variant, "docs": 100, "zero_shot": {"tasks": tasks}}
        return {**r, "budget": budget} if budget else r
    dense = {"boolq": 0.45, "piqa": 0.70, "hellaswag": 0.45, "winogrande": 0.52, "arc_easy": 0.65,
             "arc_challenge": 0.30}
    half = {t: (a if t in ("boolq", "winogrande") else zs.CHANCE[t] + (a - zs.CHANCE[t]) / 2) for t, a in dense.items()}
    (tmp_path / "m_dense_100.json").write_text(json.dumps(row("dense", dense)))
    (tmp_path / "m_0.8_rom_100.json").write_text(json.dumps(row("rom", half, 0.8)))
    d = row("dense", dense)["zero_shot"]["tasks"]
    assert zs.above_chance(d) == ["piqa", "hellaswag", "arc_easy", "arc_challenge"]  # boolq below, wino within noise
    assert abs(zs.retained(row("rom", half)["zero_shot"]["tasks"], d) - 0.5) < 1e-9
    text = zs.table(tmp_path)
    assert "| m | 0.8 | rom |" in text and "| 0.50 | - | 100 |" in text and "| m | 1 | dense |" in text
    (tmp_path / "m_0.8_rom_100.json").write_text(json.dumps({**row("rom", half, 0.8), "kept_fraction": 0.79}))
    assert zs.plot(tmp_path) == [tmp_path / "m_100.png"] and (tmp_path / "m_100.png").stat().st_size > 1000


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_structured_pruning_removes_exactly_the_heads_and_channels_it_names(family):
    """bench/structured_pruning.py: the pruned model computes what the dense one computes with the removed
    query heads' o_proj columns and the removed channels' down_proj columns zeroed (GQA kept), within budget."""
    import copy

    import torch

    from conftest import calib_tokens, tiny_model
    from llmrom.eval.cost import count_params

    sp = bench_module("structured_pruning")
    model = tiny_model(family)
    masked = copy.deepcopy(model)
    grads = sp.taylor_gradients(model, calib_tokens(8, 16), batch_size=4, progress=False)
    before = count_params(model)
    record = sp.prune(model, 0.7, grads)
    assert 0.65 < record["kept_fraction"] <= 0.7 and count_params(model) == record["parameters_after"] < before
    head_dim = model.config.head_dim if family == "gemma3" else 16
    with torch.no_grad():
        for b in record["blocks"]:
            block = masked.model.layers[b["block"]]
            assert len(b["query_heads"]) == 2 and len(b["channels"]) > 0  # one query head per k/v group
            for h in b["query_heads"]:
                block.self_attn.o_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
            block.mlp.down_proj.weight[:, b["channels"]] = 0
        ids = calib_tokens(2, 24, seed=1)
        assert torch.allclose(model(ids).logits, masked(ids).logits, atol=1e-5)
        assert not any(p.requires_grad for p in model.parameters())  # left frozen for scoring
    assert set(sp.pruned_linears(model, record)) == {f"model.layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def test_structured_pruning_refuses_what_it_cannot_prune():
    import torch

    from conftest import calib_tokens, tiny_model
    from llmrom.errors import LlmromError

    sp = bench_module("structured_pruning")
    with pytest.raises(LlmromError, match="LLaMA-like blocks"):
        sp.taylor_gradients(tiny_model("gpt2"), calib_tokens(2, 8), progress=False)
    model = tiny_model("llama")
    grads = sp.taylor_gradients(model, calib_tokens(2, 8), progress=False)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(LlmromError, match="budget cannot be reached"):
        sp.prune(model, 0.05, grads)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before any cut
    assert sp.window(32) == (4, 30) and sp.window(30) == (4, 28)  # LLM-Pruner's LLaMA-7B window, scaled


@pytest.mark.measured_latency
def test_7b_shaped_speed_benchmark_smoke(tmp_path, monkeypatch):
    """bench/speed_7b.py on a small shape: the twin holds the budget and both models are timed."""
    monkeypatch.setenv("LLMROM_CACHE", str(tmp_path / "cache"))
    bench_module("speed_7b").main(["--layers", "2", "--shape", "64,160,4,256", "--budget", "0.8", "--prefer",
                                   "quality", "--rounds", "1", "--new-tokens", "2", "--results", str(tmp_path)])
    r = json.loads((tmp_path / "llama7b-shaped_2of32_0.8_quality.json").read_text())
    assert r["parameters"]["compressed"] <= 0.8 * r["parameters"]["dense"]
    assert r["plan"]["factorized_linears"] == 14 and r["bytes"]["compressed"] < r["bytes"]["dense"]
    assert r["plan"]["joint_groups"] == 2 * 2  # q/k/v and gate/up of both blocks, the default form
    assert set(r["speed_vs_dense"]) == {"prefill", "decode batch 1", "decode batch 8"}


def test_7b_shaped_speed_benchmark_follows_the_speed_limits(tmp_path, monkeypatch):
    """With --prefer speed the twin's plan obeys the measured limits: here only pairs are fast enough, and
    the budget still holds."""
    monkeypatch.setattr("llmrom.plan.choose.speed_limits",
                        lambda shapes, *a, **k: {s.name: (0.9, 0.0) for s in shapes})
    bench_module("speed_7b").main(["--layers", "2", "--shape", "64,160,4,256", "--budget", "0.8", "--rounds", "1",
                                   "--new-tokens", "2", "--results", str(tmp_path), "--factors", "interpolative"])
    r = json.loads((tmp_path / "llama7b-shaped_2of32_0.8_speed_interpolative.json").read_text())
    assert r["parameters"]["compressed"] <= 0.8 * r["parameters"]["dense"]
    assert r["plan"]["interpolative_linears"] == 0 and r["plan"]["factorized_linears"] == 14
    assert r["plan"]["max_kept_by_shape"]["64x160"] == {"pair": 0.9, "interpolative": 0.0}
    assert bench_module("speed").tables(tmp_path) == ""  # bench/speed.py --table reads only its own files


def test_compress_time_benchmark_writes_the_split_and_the_floor(tiny_folder, tmp_path):
    bench_module("compress_time").main(["--model", str(tiny_folder), "--budget", "0.8", "--results", str(tmp_path)])
    r = json.loads((tmp_path / f"{tiny_folder.name}_0.8.json").read_text())
    assert r["kept_fraction"] <= 0.8 and r["floor"]["flop"] > 0 and r["floor"]["wall_over_floor"] > 1
    assert {"plan", "loop"} <= set(r["seconds"]) and r["peak_rss_bytes"] >= r["load_peak_rss_bytes"] > 0


def test_zero_shot_benchmark_smoke(tiny_folder, tmp_path, capsys):
    """bench/zeroshot.py end to end on a tiny model and 2 documents per task: dense scored once, a row per
    (budget, variant) with retained and perplexity, resumed without re-running, then the table and plot."""
    for module in ("lm_eval", "olmo_eval", "torch_pruning"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (.ci/run installs it)")
    from llmrom.data.textdata import load_text
    from llmrom.errors import LlmromError
    try:
        load_text("python-docs:tutorial")
    except LlmromError as e:
        pytest.skip(str(e))
    zs = bench_module("zeroshot")
    argv = ["--model", str(tiny_folder), "--budgets", "0.8", "--variants", "rom,prune", "--docs", "2",
            "--nsamples", "8", "--results", str(tmp_path)]
    zs.main(argv)
    name = tiny_folder.name
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [f"{name}_0.8_prune_2.json", f"{name}_0.8_rom_2.json",
                                                              f"{name}_dense_2.json"]
    for variant in ("rom", "prune"):
        row = json.loads((tmp_path / f"{name}_0.8_{variant}_2.json").read_text())
        assert row["kept_fraction"] <= 0.8 and row["tutorial_perplexity"] > 1
        assert set(row["zero_shot"]["tasks"]) >= set(zs.PAPER_SIX)
        assert all(t["samples"] == 2 for t in row["zero_shot"]["tasks"].values())
        assert row["calibration"].startswith("pydoc: 8 windows")
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")}
    zs.main(argv)  # resumes: every row exists
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")} == stamp
    capsys.readouterr()
    zs.main(["--table", "--results", str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"| {name} | 0.8 | rom |" in printed and f"| {name} | 0.8 | prune |" in printed
    assert (tmp_path / f"{name}_2.png").exists()
