"""Speed, bytes and quality of compressed models against their dense original, measured side by side.

    python bench/speed.py                                         # SmolLM2, the default at 0.9/0.8/0.7
    python bench/speed.py --model gemma3-270m --variants rom,rom-quality
    python bench/speed.py --table                                 # markdown tables and the plot from the files

Each (budget, variant) of bench/run.py is compressed once with the benchmark's calibration (pydoc,
128 x 128, seed 0) and saved as an ordinary llmrom folder under --folders (in the source's dtype, as
`llmrom compress` writes it), so an interrupted run resumes and a re-measurement does not recompress;
`bench/run.py --keep-folders out/bench-speed` leaves the same folders behind while it writes its rows.
Every folder is then loaded as a user loads it (float32 compute on the CPU) and measured against the
dense model in one process by llmrom.eval.speed: prefill 1 x 512 and greedy decoding with KV cache at
batch 1 and 8, rounds interleaved (dense, compressed, dense, ...), median, in eager mode (--compiled:
under torch.compile). Perplexity on the Python tutorial (the benchmark's protocol) and bytes on disk
stand beside the ratios. Compressions run first and measurements last, so they never share the CPU
with each other; run it alone on the machine. Writes bench/results/speed/<model>_<mode>.json.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/run.py
import run  # noqa: E402

import llmrom  # noqa: E402
from llmrom.config import CompressConfig  # noqa: E402
from llmrom.data.textdata import calib_windows, eval_windows, load_text  # noqa: E402
from llmrom.eval.cost import count_params, disk_bytes, parameter_bytes  # noqa: E402
from llmrom.eval.evaluate import environment  # noqa: E402
from llmrom.eval.perplexity import perplexity  # noqa: E402
from llmrom.eval.speed import measure_speed, speed_ratios  # noqa: E402
from llmrom.modeling.io import is_llmrom_folder, load_model, write_json_atomic  # noqa: E402

RESULTS = run.RESULTS / "speed"
FOLDERS = Path(__file__).resolve().parent.parent / "out" / "bench-speed"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="0.9,0.8,0.7")
    ap.add_argument("--variants", default="rom", help=f"any of {', '.join(run.VARIANTS)}")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compiled", action="store_true", help="measure under torch.compile instead of eager")
    ap.add_argument("--eval", default="python-docs:tutorial", help="held-out text for perplexity")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--folders", default=str(FOLDERS), help="where the compressed folders are kept between runs")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--table", action="store_true", help="print the markdown tables of every results file")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in run.VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(run.VARIANTS)}")
    return args


def folder_for(args, budget, variant):
    """The compressed folder of one row, compressed now if it is not there yet."""
    folder = Path(args.folders) / f"{run.stem(args.model)}_{budget:g}_{variant}"
    if is_llmrom_folder(folder):
        return folder
    fields = {"budget": budget, "nsamples": args.nsamples, "seqlen": args.seqlen, **run.VARIANTS[variant]}
    if fields.get("last_blocks") == "all" or run.same_blocks(variant):
        raise SystemExit(f"variant {variant} compresses the benchmark's reference blocks; measure it with "
                         "bench/run.py --speed-rounds instead")
    model, tok = load_model(args.model)
    tokens = calib_windows(tok, "pydoc", args.nsamples, args.seqlen, 0)
    model, report = llmrom.compress(model, tok, CompressConfig(**fields), tokens=tokens,
                                    progress=sys.stderr.isatty())
    llmrom.save(model, tok, folder, report, overwrite=True)
    return folder


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(tables(Path(args.results)))
        print(f"plot: {plot(Path(args.results))}")
        return
    budgets = [float(b) for b in args.budgets.split(",")]
    variants = args.variants.split(",")
    rows = [(b, v, folder_for(args, b, v)) for b in budgets for v in variants]  # compress first, measure after
    dense, tok = load_model(args.model)
    windows = eval_windows(tok, load_text(args.eval), args.eval_seqlen, args.eval_windows)
    mode = "compiled" if args.compiled else "eager"
    path = Path(args.results) / f"{run.stem(args.model)}_{mode}.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    out = {"model": args.model, "mode": mode, "dense": done.get("dense") or {
        "parameters": count_params(dense), "bytes_float32": parameter_bytes(dense),
        "perplexity": perplexity(dense, windows)}, "rows": done.get("rows", {})}
    out["protocol"] = (f"calibration pydoc {args.nsamples} x {args.seqlen}, seed 0; folders as saved (source dtype), "
                       f"loaded in float32; perplexity {args.eval}, first {len(windows)} windows x "
                       f"{args.eval_seqlen}; speed "
                       f"by llmrom.eval.speed ({mode}), each folder interleaved with the dense model, "
                       f"median of {args.rounds} rounds")
    for budget, variant, folder in rows:
        key = f"{budget:g} {variant}"
        model, _ = load_model(str(folder), None, "float32")
        speed = measure_speed({"model": model, "reference": dense}, rounds=args.rounds, compiled=args.compiled)
        report = json.loads((folder / "llmrom_report.json").read_text())
        out["rows"][key] = {"budget": budget, "variant": variant, "parameters": count_params(model),
                            "bytes_on_disk": disk_bytes(folder), "saved_dtype": report.get("saved_dtype"),
                            "perplexity": perplexity(model, windows), "plan": _plan_summary(report),
                            "speed_vs_dense": speed_ratios(speed), "speed": speed}
        out["environment"] = {**environment(), "load_average": os.getloadavg()}
        write_json_atomic(path, out)  # after every row: an interrupted run keeps what it measured
        r = out["rows"][key]
        print(f"{key}: perplexity {r['perplexity']:.3f} (dense {out['dense']['perplexity']:.3f}), "
              + ", ".join(f"{k} x{v:.3f}" for k, v in r["speed_vs_dense"].items()), flush=True)
        del model
    print(f"written to {path}")


def _plan_summary(report):
    plan = report.get("plan", {})
    emb = plan.get("embedding") or {}
    modules = report.get("modules", [])
    return {"last_blocks": plan.get("last_blocks"), "module_budget": plan.get("module_budget"),
            "embedding_rank": emb.get("rank"), "factorized_linears": sum(m.get("rank") is not None for m in modules),
            "speed_limits": plan.get("speed_limits")}


def _result_files(results):
    """This script's results files (the 7B-shaped benchmark writes its own beside them)."""
    return sorted(p for mode in ("eager", "compiled") for p in results.glob(f"*_{mode}.json"))


def _plan_text(plan):
    blocks = f"{plan['last_blocks']} x {plan['module_budget']:.2f}" if plan.get("last_blocks") else "no blocks"
    return f"{blocks}, {'embedding r' + str(plan['embedding_rank']) if plan.get('embedding_rank') else 'embedding dense'}"


def tables(results):
    """Markdown: one table per results file, a row per (budget, variant)."""
    out = []
    for path in _result_files(results):
        d = json.loads(path.read_text())
        env = d.get("environment", {})
        out.append(f"**{d['model']}**, {d['mode']} ({env.get('cpu')}, {env.get('threads')} threads, torch "
                   f"{env.get('torch')}, transformers {env.get('transformers')}); dense perplexity "
                   f"{d['dense']['perplexity']:.2f}, {d['dense']['parameters'] / 1e6:.1f}M parameters; speed as "
                   "compressed / dense, measured side by side\n")
        out.append("| budget | variant | plan: last N blocks x module budget, embedding rank | linears factorized | "
                   "perplexity | MB on disk (dtype) | prefill | decode b1 | "
                   "decode b8 |")
        out.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for r in sorted(d["rows"].values(), key=lambda r: (-r["budget"], r["variant"])):
            s = r["speed_vs_dense"]
            out.append(f"| {r['budget']:g} | {r['variant']} | {_plan_text(r['plan'])} | "
                       f"{r['plan']['factorized_linears']} | "
                       f"{r['perplexity']:.2f} | {r['bytes_on_disk'] / 1e6:.0f} ({r['saved_dtype']}) | "
                       f"{s['prefill']:.2f}x | "
                       f"{s.get('decode batch 1', float('nan')):.2f}x | {s.get('decode batch 8', float('nan')):.2f}x |")
        out.append("")
    return "\n".join(out)


def plot(results):
    """Perplexity against measured decode speed (batch 1, x dense), one panel per results file: the
    trade a user chooses on. Written next to the results as speed_vs_perplexity.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = _result_files(results)
    fig, axes = plt.subplots(1, max(1, len(files)), figsize=(5 * max(1, len(files)), 4), squeeze=False)
    for ax, path in zip(axes[0], files):
        d = json.loads(path.read_text())
        for variant in sorted({r["variant"] for r in d["rows"].values()}):
            rows = sorted((r for r in d["rows"].values() if r["variant"] == variant), key=lambda r: -r["budget"])
            xs = [r["speed_vs_dense"]["decode batch 1"] for r in rows]
            ys = [r["perplexity"] for r in rows]
            ax.plot(xs, ys, marker="o", label=variant)
            for x, y, r in zip(xs, ys, rows):
                ax.annotate(f"{r['budget']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.plot([1.0], [d["dense"]["perplexity"]], marker="*", color="k", ms=12, ls="", label="dense")
        ax.axvline(1.0, color="k", ls=":", lw=1)
        ax.set(title=f"{d['model']} ({d['mode']})", xlabel="decode speed, batch 1 (x dense, side by side)",
               ylabel="perplexity (tutorial, 512)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = results / "speed_vs_perplexity.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
