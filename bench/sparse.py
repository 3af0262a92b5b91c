"""Low-rank plus sparse on a real model: --sparse 0 vs 0.1 vs 0.25 at the same whole-model budget.

    OMP_NUM_THREADS=1 python bench/sparse.py        # writes bench/results/sparse_smollm2.json

SmolLM2-135M at budget 0.8, compressing the same last N blocks the committed benchmark chose for that
budget (bench/results/runs/smollm2-135m_0.8_rom.json, plan.last_blocks), with a short calibration
(32 windows x 128 tokens of pydoc) so the run fits a few minutes on a small CPU machine. Each variant
starts from a fresh copy of the dense weights and is evaluated on the first 10 windows x 512 tokens of
the Python tutorial (held out from the calibration text). The plan (and so the parameter grant of
every module) is the same for all variants; only how each module spends its grant differs.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import llmrom
from llmrom.config import CompressConfig
from llmrom.evaluate import environment, evaluate
from llmrom.io import write_json_atomic
from llmrom.textdata import calibration_windows, load_text

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.8)
    ap.add_argument("--plan-from", default=str(RESULTS / "runs" / "smollm2-135m_0.8_rom.json"),
                    help="results file whose plan.last_blocks gives the number of compressed blocks")
    ap.add_argument("--sparse", default="0,0.1,0.25")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval", default="python-docs:tutorial")
    ap.add_argument("--eval-windows", type=int, default=10)
    ap.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the dense model's perplexity on the same windows")
    ap.add_argument("--out", default=str(RESULTS / "sparse_smollm2.json"))
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    t_start = time.perf_counter()
    last_blocks = json.loads(Path(args.plan_from).read_text())["plan"]["last_blocks"]
    dense, tok = llmrom.load_model(args.model)
    tokens = calibration_windows(tok, load_text("pydoc"), args.nsamples, args.seqlen, 0)
    eval_kw = dict(ppl=args.eval, seqlen=512, max_windows=args.eval_windows, fidelity_windows=0, speed=False,
                   progress=False)
    out = {"model": args.model, "budget": args.budget, "last_blocks": last_blocks, "last_blocks_from": args.plan_from,
           "protocol": {"calibration": f"pydoc: {args.nsamples} windows x {args.seqlen} tokens, seed 0",
                        "evaluation": f"{args.eval}: first {args.eval_windows} windows x 512 tokens"},
           "runs": []}
    if args.dense:
        t = time.perf_counter()
        out["dense"] = {"perplexity": evaluate(dense, tok, **eval_kw)["perplexity"]["model"],
                        "eval_seconds": time.perf_counter() - t}
        print(f"dense: perplexity {out['dense']['perplexity']:.3f}", flush=True)
    for sparse in [float(s) for s in args.sparse.split(",")]:
        cfg = CompressConfig(budget=args.budget, last_blocks=last_blocks, nsamples=args.nsamples, seqlen=args.seqlen,
                             sparse=sparse)
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        model, report = llmrom.compress(model, tok, cfg, tokens=tokens, progress=sys.stderr.isatty())
        seconds = time.perf_counter() - t
        t = time.perf_counter()
        ppl = evaluate(model, tok, **eval_kw)["perplexity"]["model"]
        mods = report["modules"]
        with_sparse = [m for m in mods if m["nnz"]]
        by_kind = {}
        for m in mods:
            kind = m["name"].rsplit(".", 1)[-1]
            k = by_kind.setdefault(kind, {"modules": 0, "with_sparse": 0, "mean_relative_error": 0.0})
            k["modules"] += 1
            k["with_sparse"] += bool(m["nnz"])
            k["mean_relative_error"] += m["relative_error"] / sum(x["name"].endswith("." + kind) for x in mods)
        row = {"sparse": sparse, "sparse_rounds": cfg.sparse_rounds, "sparse_select": cfg.sparse_select,
               "perplexity": ppl, "plan": {k: v for k, v in report["plan"].items() if k != "auto"},
               "parameters_after": report["totals"]["parameters_after"],
               "kept_fraction": report["totals"]["kept_fraction"],
               "macs_per_token_after": report["totals"]["macs_per_token_after"],
               "modules": len(mods), "modules_with_sparse": len(with_sparse),
               "nonzeros": sum(m["nnz"] for m in mods),
               "mean_relative_error": sum(m["relative_error"] for m in mods) / len(mods),
               "by_kind": by_kind, "compress_seconds": seconds, "eval_seconds": time.perf_counter() - t,
               "module_rows": [{k: m[k] for k in ("name", "rank", "nnz", "params_after", "relative_error")}
                               for m in mods]}
        out["runs"].append(row)
        print(f"sparse {sparse:g}: perplexity {ppl:.3f}, kept {row['kept_fraction']:.4f}, "
              f"{len(with_sparse)}/{len(mods)} modules with a sparse part ({row['nonzeros']:,} nonzeros), "
              f"mean rel. error {row['mean_relative_error']:.4f}, compress {seconds:.0f} s", flush=True)
        del model
    out["wall_seconds"] = time.perf_counter() - t_start
    out["environment"] = environment()
    write_json_atomic(args.out, out)
    print(f"wrote {args.out} ({out['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
