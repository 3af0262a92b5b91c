"""Measure the method options (centred or not, sequential or not) side by side on a real model.

One model load, the same compressed blocks for every variant (N chosen automatically once, or
--last-blocks), the module budget solved per variant to meet the same whole-model budget, each
variant compressed from a fresh copy of the dense weights and evaluated on held-out text. Writes
bench/results/options_<model>_<budget>.json and a Markdown table beside it.

    python bench/options.py --model smollm2-135m --budget 0.9
"""

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
import transformers

import llmrom
from llmrom.config import CompressConfig
from llmrom.cost import peak_rss_bytes
from llmrom.perplexity import perplexity
from llmrom.textdata import calibration_windows, eval_windows, load_text

VARIANTS = {  # name: (centered, sequential)
    "sequential, uncentred": (False, True),
    "sequential, centred": (True, True),
    "non-sequential, uncentred": (False, False),
    "non-sequential, centred": (True, False),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.9)
    ap.add_argument("--calib", default="pydoc")
    ap.add_argument("--eval", default="python-docs:tutorial")
    ap.add_argument("--nsamples", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--last-blocks", type=int, help="fix N instead of choosing it automatically once")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    dense, tok = llmrom.load_model(args.model)
    windows = eval_windows(tok, load_text(args.eval), 512, args.eval_windows)
    tokens = calibration_windows(tok, load_text(args.calib), args.nsamples, args.seqlen, 0)
    rows = [{"variant": "dense", "parameters": sum(p.numel() for p in dense.parameters()),
             "perplexity": perplexity(dense, windows)}]
    last_n, chosen = args.last_blocks, "given"
    for name, (centered, sequential) in VARIANTS.items():
        model = copy.deepcopy(dense)
        # same blocks for every variant; the module budget is re-solved so each meets the same budget
        # (centring adds biases that must be paid for)
        extra = {"budget": args.budget, **({"last_blocks": last_n} if last_n else {})}
        cfg = CompressConfig(**extra, centered=centered, sequential=sequential, calib=args.calib,
                             nsamples=args.nsamples, seqlen=args.seqlen)
        t0 = time.perf_counter()
        model, report = llmrom.compress(model, tok, cfg, tokens=tokens)
        seconds = time.perf_counter() - t0
        if last_n is None:
            last_n, chosen = report["plan"]["last_blocks"], "chosen automatically for the first variant"
        rows.append({"variant": name, "parameters": report["totals"]["parameters_after"],
                     "module_budget": report["plan"]["module_budget"],
                     "kept_fraction": report["totals"]["kept_fraction"], "perplexity": perplexity(model, windows),
                     "compress_seconds": seconds})
        print(rows[-1], flush=True)
        del model
    result = {"model": args.model, "budget": args.budget, "last_blocks": last_n, "last_blocks_chosen": chosen,
              "calibration": f"{args.calib}, {args.nsamples} x {args.seqlen}, seed 0",
              "evaluation": f"{args.eval}, first {len(windows)} non-overlapping windows of 512 tokens",
              "rows": rows, "peak_rss_bytes": peak_rss_bytes(),
              "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "llmrom": llmrom.__version__, "machine": platform.machine(),
                              "cpus": torch.get_num_threads()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"options_{args.model}_{args.budget:g}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"### {args.model}, budget {args.budget:g}: last {last_n} blocks ({chosen})", "",
             "| variant | module budget | parameters | perplexity |", "|---|---:|---:|---:|"]
    for r in rows:
        b = f"{r['module_budget']:.4f}" if "module_budget" in r else "-"
        lines.append(f"| {r['variant']} | {b} | {r['parameters']:,} | {r['perplexity']:.3f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
