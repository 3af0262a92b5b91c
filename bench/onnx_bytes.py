"""Bytes, quality and speed in a second engine: dense and compressed models exported to ONNX Runtime, in
float32 and quantized by ONNX Runtime's own weight-only quantizer (the same library for both).

    python bench/onnx_bytes.py                            # SmolLM2: dense and the default at 0.9/0.8/0.7
    python bench/onnx_bytes.py --table                    # the markdown table and the plot from the results file

The compressed folders are bench/speed.py's (compressed there if missing, the same calibration). Each
source is exported once by `llmrom export onnx` (llmrom.export.onnx) under --work, and each quantized form
is a copy of that export quantized by llmrom.export.onnxquant, so an interrupted run resumes. Every row is
then measured the same way in ONNX Runtime (threads = torch's): perplexity on the Python tutorial (the
benchmark's protocol), KL divergence and top-1 agreement against the dense float32 export, and speed by
llmrom.eval.speed, each row interleaved with the dense float32 export (prefill 1 x 512, greedy decoding
with KV cache at batch 1 and 8, median of rounds). Quality is measured first and speed last, so run it
alone on the machine. Writes bench/results/onnx/<model>.json.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402
import speed  # noqa: E402

from llmrom.data.textdata import eval_windows, load_text  # noqa: E402
from llmrom.eval.evaluate import environment  # noqa: E402
from llmrom.eval.fidelity import fidelity  # noqa: E402
from llmrom.eval.perplexity import perplexity  # noqa: E402
from llmrom.eval.speed import measure_speed, speed_ratios  # noqa: E402
from llmrom.export.onnx import MANIFEST, OnnxLM, export_bytes, export_onnx  # noqa: E402
from llmrom.export.onnxquant import quantize_export  # noqa: E402
from llmrom.modeling.io import load_model, write_json_atomic  # noqa: E402

RESULTS = run.RESULTS / "onnx"
WORK = Path(__file__).resolve().parent.parent / "out" / "bench-onnx"
FORMS = {"float32": None, "int8": ("int8", "rtn"), "int4-rtn": ("int4", "rtn"), "int4-hqq": ("int4", "hqq")}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budgets", default="0.9,0.8,0.7")
    ap.add_argument("--forms", default=",".join(FORMS), help=f"any of {', '.join(FORMS)}")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eval", default="python-docs:tutorial")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--fidelity-windows", type=int, default=16)
    ap.add_argument("--work", default=str(WORK), help="where the exports are kept between runs")
    ap.add_argument("--folders", default=str(speed.FOLDERS), help="bench/speed.py's compressed folders")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--table", action="store_true")
    return ap.parse_args(argv)


def export_for(args, source, name):
    """The float32 export of `source` (a model spec or a folder), exported now if it is not there yet."""
    out = Path(args.work) / f"{run.stem(args.model)}_{name}_float32"
    if not (out / MANIFEST).is_file():
        model, tok = load_model(str(source))
        export_onnx(model, tok, out, overwrite=True, source=str(source), progress=lambda line: None)
    return out


def quantized_for(args, float_export, form):
    if FORMS[form] is None:
        return float_export
    out = float_export.parent / float_export.name.replace("_float32", f"_{form}")
    if not (out / "quantization.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(float_export, out)
        done = quantize_export(out, *FORMS[form], block_size=args.block_size)
        (out / "quantization.json").write_text(json.dumps(done, indent=2) + "\n")
    return out


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(table(Path(args.results) / f"{run.stem(args.model)}.json"))
        print(f"plot: {plot(Path(args.results) / f'{run.stem(args.model)}.json')}")
        return
    forms = args.forms.split(",")
    sources = {"dense": args.model}
    for b in [float(b) for b in args.budgets.split(",")]:
        sources[f"{b:g}"] = speed.folder_for(args, b, "rom")
    rows = {}
    for name, source in sources.items():  # every export and quantization first
        exported = export_for(args, source, name)
        for form in forms:
            rows[f"{name} {form}"] = quantized_for(args, exported, form)
    path = Path(args.results) / f"{run.stem(args.model)}.json"
    out = json.loads(path.read_text()) if path.is_file() else {"model": args.model, "rows": {}}
    out["protocol"] = (f"ONNX Runtime on the CPU, threads = torch's; perplexity {args.eval}, first "
                       f"{args.eval_windows} windows x {args.eval_seqlen}; KL and top-1 against the dense float32 "
                       f"export on the first {args.fidelity_windows}; quantization by onnxruntime's MatMulNBits "
                       f"quantizer, blocks of {args.block_size}; speed by llmrom.eval.speed, each row interleaved "
                       f"with the dense float32 export, median of {args.rounds} rounds")
    reference = OnnxLM(rows["dense float32"])
    tok_folder = rows["dense float32"]
    from transformers import AutoTokenizer
    windows = eval_windows(AutoTokenizer.from_pretrained(tok_folder), load_text(args.eval), args.eval_seqlen,
                           args.eval_windows)
    for key, folder in rows.items():  # quality, then speed, so that nothing else runs while timing
        row = out["rows"].setdefault(key, {})
        if "perplexity" in row:
            continue
        engine = OnnxLM(folder)
        name, form = key.split(" ")
        row.update({"source": name, "form": form, "bytes": export_bytes(folder),
                    "perplexity": perplexity(engine, windows, batch_size=4),
                    "fidelity": fidelity(engine, reference, windows[:args.fidelity_windows], batch_size=4)})
        write_json_atomic(path, out)
        print(f"{key}: {row['bytes'] / 1e6:.0f} MB, perplexity {row['perplexity']:.2f}, "
              f"KL {row['fidelity']['kl_mean']:.3f}", flush=True)
    for key, folder in rows.items():
        row = out["rows"][key]
        if "speed_vs_dense" in row:
            continue
        measured = measure_speed({"model": OnnxLM(folder), "reference": reference}, rounds=args.rounds)
        row.update({"speed": measured, "speed_vs_dense": speed_ratios(measured)})
        out["environment"] = {**environment(), "load_average": os.getloadavg(),
                              "onnxruntime": __import__("onnxruntime").__version__}
        write_json_atomic(path, out)
        print(f"{key}: " + ", ".join(f"{k} x{v:.2f}" for k, v in row["speed_vs_dense"].items()), flush=True)
    print(f"written to {path}")


def table(path):
    d = json.loads(path.read_text())
    env = d.get("environment", {})
    lines = [f"**{d['model']}** in ONNX Runtime {env.get('onnxruntime')} ({env.get('cpu')}, {env.get('threads')} "
             f"threads); speed as row / dense float32 export, measured side by side\n",
             "| model | weights | MB | perplexity | KL to dense | top-1 | prefill | decode b1 | decode b8 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = {f: i for i, f in enumerate(FORMS)}
    for r in sorted(d["rows"].values(), key=lambda r: (r["source"] != "dense", -float(r["source"].replace(
            "dense", "1")), order.get(r["form"], 9))):
        s = r.get("speed_vs_dense", {})
        name = "dense" if r["source"] == "dense" else f"llmrom {r['source']}"
        lines.append(f"| {name} | {r['form']} | {r['bytes'] / 1e6:.0f} | {r['perplexity']:.2f} | "
                     f"{r['fidelity']['kl_mean']:.3f} | {r['fidelity']['top1_agreement']:.3f} | "
                     + " | ".join(f"{s[k]:.2f}x" if k in s else "-"
                                  for k in ("prefill", "decode batch 1", "decode batch 8")) + " |")
    return "\n".join(lines)


def plot(path):
    """Perplexity against bytes, one line per source (its forms from float32 down to int4); rows beyond 10x
    the dense perplexity (collapsed) are left off and named in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = json.loads(path.read_text())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    limit = 10 * d["rows"]["dense float32"]["perplexity"]
    off = [k for k, r in d["rows"].items() if r["perplexity"] > limit]
    for source in sorted({r["source"] for r in d["rows"].values()}, key=lambda s: s != "dense"):
        rows = sorted((r for r in d["rows"].values() if r["source"] == source and r["perplexity"] <= limit),
                      key=lambda r: r["bytes"])
        ax.plot([r["bytes"] / 1e6 for r in rows], [r["perplexity"] for r in rows], marker="o",
                label="dense" if source == "dense" else f"llmrom {source}")
        for r in rows:
            ax.annotate(r["form"], (r["bytes"] / 1e6, r["perplexity"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set(xlabel="MB (ONNX graph and weights)", ylabel="perplexity (tutorial, 512; log scale)",
           title=f"{d['model']} in ONNX Runtime: quality against bytes"
                 + (f"\noff the chart (perplexity > {limit:.0f}): {', '.join(off)}" if off else ""))
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
