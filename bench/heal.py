"""Measure recovery fine-tuning (`llmrom heal`): held-out perplexity before/after each mode, on the
compressed model and, as a control, on the dense model (same modules, same data, same steps).

If healing the dense model gains as much as healing the compressed one, the gain is adaptation to
the Python-docs domain, not recovery of what compression lost; the difference is the recovery.
Training text: python-docs:library; held-out: python-docs:tutorial (checked disjoint). Reported
perplexity: the first --eval-windows windows of 512 tokens of the tutorial; early stopping looks
only at the LAST --val-windows windows of the tutorial, so model selection never sees the reported
windows. Compressed folders are cached in --work. Writes bench/results/heal_<model>_<budget>.json
and .md after every run; runs already in that file with the same protocol are kept and skipped,
so an interrupted benchmark resumes (delete a run from the file to redo it).

    python bench/heal.py --model smollm2-135m --budgets 0.8
"""

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import transformers

import llmrom
from llmrom.heal.train import HealConfig, check_held_out, factorized_names, heal
from llmrom.eval.perplexity import mean_nll
from llmrom.data.textdata import eval_windows, load_text

MODES = {"factors": dict(mode="factors"), "lora": dict(mode="lora"), "lora+ggpo": dict(mode="lora", ggpo=True)}


def ppl(model, windows):
    with torch.no_grad():
        return math.exp(mean_nll(model, windows, progress=True))


def write(out, name, result):
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", table(result))):
        tmp = out / f".{name}{suffix}.partial"
        tmp.write_text(text)
        os.replace(tmp, out / f"{name}{suffix}")


def table(r):
    lines = [f"# Recovery fine-tuning: {r['model']} at budget {r['budget']}", "",
             f"Training text {r['data']} ({r['heal']['tokens']:,} tokens budget, seqlen {r['heal']['seqlen']}, "
             f"batch {r['heal']['batch_size']}); perplexity on the first {r['eval']['windows']} x 512 tokens of "
             f"{r['eval']['source']}; early stopping on its last {r['eval']['val_windows']} windows. "
             f"Dense perplexity {r['dense_perplexity']:.3f}; compressed with CompressConfig(budget={r['budget']}, "
             f"nsamples={r['calibration_windows']}). On the dense model the same modules are healed: "
             "'factors' trains their full weights, 'lora' puts one adapter on each.", "",
             "| model | mode | perplexity before | after | change | steps | train s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        lines.append(f"| {x['model']} | {x['mode']} | {x['perplexity_before']:.3f} | {x['perplexity_after']:.3f} | "
                     f"{x['perplexity_after'] - x['perplexity_before']:+.3f} | {x['steps']} | "
                     f"{x['train_seconds']:.0f} | {x['peak_rss_bytes'] / 2**30:.2f} |")
    if r.get("not_run"):
        lines += ["", "Not run: " + ", ".join(r["not_run"])]
    return "\n".join(lines) + "\n"


def previous_runs(path, result):
    """Runs already in `path` when it was made with the same protocol (so a benchmark resumes), else []."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    same = all(old.get(k) == result[k] for k in ("calibration_windows", "data", "eval", "heal"))
    return old["runs"] if same else []


def compressed_folder(work, model_name, budget, nsamples, dense, tok):
    folder = work / f"{model_name}_{budget}_n{nsamples}"
    if not folder.exists():
        cfg = llmrom.CompressConfig(budget=budget, nsamples=nsamples)
        model, report = llmrom.compress(copy.deepcopy(dense), tok, cfg)
        report["source"] = {"model": model_name, "gguf_file": None}
        llmrom.save(model, tok, folder, report)
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="0.8", help="comma-separated, e.g. 0.8,0.7")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    ap.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                    help="also heal the dense model (the domain-adaptation control)")
    ap.add_argument("--nsamples", type=int, default=512, help="calibration windows of the compression (the "
                                                                  "library default 512; fewer compress faster)")
    ap.add_argument("--data", default="python-docs:library")
    ap.add_argument("--eval", default="python-docs:tutorial")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--val-windows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "llmrom" / "heal_bench"),
                    help="where compressed folders are cached")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",")]
    train_text, eval_text = load_text(args.data), load_text(args.eval)
    check_held_out(args.data, train_text, args.eval, eval_text)
    dense, tok = llmrom.load_model(args.model)
    windows = eval_windows(tok, eval_text, 512)
    if len(windows) < args.eval_windows + args.val_windows:
        raise SystemExit(f"{args.eval} has only {len(windows)} windows of 512 tokens")
    report_w, val_w = windows[:args.eval_windows], windows[-args.val_windows:]
    dense_ppl = ppl(dense, report_w)
    for budget in [float(b) for b in args.budgets.split(",")]:
        folder = compressed_folder(Path(args.work), args.model, budget, args.nsamples, dense, tok)
        small, _ = llmrom.load(folder)
        names = factorized_names(small)
        small_ppl = ppl(small, report_w)
        del small
        common = dict(tokens=args.tokens, seqlen=args.seqlen, batch_size=args.batch_size,
                      eval_every=args.eval_every, patience=args.patience)
        result = {"model": args.model, "budget": budget, "calibration_windows": args.nsamples,
                  "data": args.data, "dense_perplexity": dense_ppl,
                  "compressed_perplexity": small_ppl, "factorized_modules": len(names),
                  "eval": {"source": args.eval, "windows": len(report_w), "val_windows": len(val_w),
                           "protocol": "non-overlapping 512-token windows, exp(mean next-token cross-entropy)"},
                  "heal": {"tokens": args.tokens, "seqlen": args.seqlen, "batch_size": args.batch_size,
                           "eval_every": args.eval_every, "patience": args.patience},
                  "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                  "transformers": transformers.__version__, "cpus": os.cpu_count(),
                                  "machine": platform.machine()},
                  "runs": [], "not_run": []}
        name = f"heal_{args.model}_{budget}"
        result["runs"] = previous_runs(Path(args.out) / f"{name}.json", result)
        done = {(x["model"], x["mode"]) for x in result["runs"]}
        jobs = [(w, m) for m in modes for w in (("compressed", "dense") if args.dense else ("compressed",))
                if (w, m) not in done]
        for which, mode in jobs:
            model = llmrom.load(folder)[0] if which == "compressed" else copy.deepcopy(dense)
            cfg = HealConfig(**MODES[mode], **common)
            t0 = time.perf_counter()
            rec = heal(model, tok, train_text, cfg, eval_windows=val_w, modules=names)
            after = ppl(model, report_w)
            result["runs"].append({
                "model": which, "mode": mode, "perplexity_before": small_ppl if which == "compressed" else dense_ppl,
                "perplexity_after": after, "steps": rec["steps"], "tokens": rec["tokens"],
                "stopped_early": rec["stopped_early"], "best_step": rec["evaluation"]["best_step"],
                "trainable_parameters": rec["trainable_parameters"], "lr": cfg.learning_rate, "config": cfg.to_dict(),
                "train_seconds": rec["train_seconds"], "wall_seconds": time.perf_counter() - t0,
                "peak_rss_bytes": rec["peak_rss_bytes"], "val_history": rec["evaluation"]["history"]})
            print(f"{which} {mode}: {result['runs'][-1]['perplexity_before']:.3f} -> {after:.3f}", flush=True)
            write(Path(args.out), name, result)
            del model


if __name__ == "__main__":
    main()
