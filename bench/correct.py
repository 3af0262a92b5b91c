"""Error correction (--correct) on a real model: held-out perplexity with correction off and on.

Both runs compress the same copy of the dense weights with the same plan: CompressConfig(budget,
last_blocks=N, nsamples, seqlen=128) on the built-in pydoc calibration text, N taken from the
committed benchmark run of the same model and budget (bench/results/runs/<model>_<budget>_rom.json,
chosen there automatically). Perplexity: the first --eval-windows non-overlapping windows of 512
tokens of python-docs:tutorial (held out), as llmrom.evaluate computes it. Writes
bench/results/correct_<short model>.json.

    OMP_NUM_THREADS=1 python bench/correct.py                  # SmolLM2-135M, budget 0.9, 32 windows
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import llmrom
from llmrom.config import CompressConfig
from llmrom.evaluate import environment, evaluate
from llmrom.io import write_json_atomic

RESULTS = Path(__file__).parent / "results"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.9)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=10)
    ap.add_argument("--out", default=None, help="default: bench/results/correct_<model without size>.json")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    run = json.loads((RESULTS / "runs" / f"{args.model}_{args.budget:g}_rom.json").read_text())
    last_blocks = run["plan"]["last_blocks"]
    dense, tok = llmrom.load_model(args.model)
    ev = dict(ppl="python-docs:tutorial", seqlen=512, max_windows=args.eval_windows, fidelity_windows=0,
              speed=False, progress=False)
    result = {"model": args.model, "budget": args.budget, "last_blocks": last_blocks,
              "last_blocks_from": f"bench/results/runs/{args.model}_{args.budget:g}_rom.json (plan.last_blocks)",
              "protocol": None, "dense_perplexity": None, "runs": [], "environment": environment()}
    d = evaluate(dense, tok, **ev)
    result["protocol"], result["dense_perplexity"] = d["perplexity"]["protocol"], d["perplexity"]["model"]
    print(f"dense: perplexity {result['dense_perplexity']:.3f}", flush=True)
    for correct in (False, True):
        cfg = CompressConfig(budget=args.budget, last_blocks=last_blocks, nsamples=args.nsamples, seqlen=128,
                             correct=correct)
        t0 = time.perf_counter()
        model, report = llmrom.compress(copy.deepcopy(dense), tok, cfg, progress=False)
        seconds = time.perf_counter() - t0
        e = evaluate(model, tok, **ev)
        result["runs"].append({"correct": correct, "config": cfg.to_dict(), "plan": report["plan"],
                               "kept_fraction": report["totals"]["kept_fraction"],
                               "compress_seconds": round(seconds, 1), "perplexity": e["perplexity"]["model"]})
        print(f"correct={correct}: perplexity {e['perplexity']['model']:.3f}, kept "
              f"{report['totals']['kept_fraction']:.4f}, compressed in {seconds:.0f} s", flush=True)
        del model
    short = args.model.split("-")[0]
    out = Path(args.out) if args.out else RESULTS / f"correct_{short}.json"
    write_json_atomic(out, result)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
