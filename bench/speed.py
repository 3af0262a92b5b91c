"""CPU speed of compressed variants against the dense model, measured interleaved in one process.

    python bench/speed.py                                    # SmolLM2, budget 0.8, rom vs rom-sparse
    python bench/speed.py --model gemma3-270m --budget 0.9 --variants rom,rom-uncentred

Each variant of bench/run.py is compressed from a fresh copy of the dense weights with the
benchmark's calibration (pydoc, 128 x 128, seed 0) on the same last N blocks as the benchmark's rom-blocks
run (bench/results/runs/<model>_<budget>_rom-blocks.json), then llmrom.eval.speed measures prefill (batch 1 x
512) and greedy decoding (32 tokens with KV cache) for the dense model and every variant, round by
round interleaved, median of --rounds. Quote the ratios: they are measured side by side; absolute
tokens/s depend on the machine and on what else runs on it. Run it alone on the machine.
Writes bench/results/speed_<model>_<budget>.json.
"""

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/run.py
import run  # noqa: E402

import llmrom  # noqa: E402
from llmrom.config import CompressConfig  # noqa: E402
from llmrom.eval.cost import count_params, macs_per_token  # noqa: E402
from llmrom.eval.evaluate import environment  # noqa: E402
from llmrom.modeling.io import write_json_atomic  # noqa: E402
from llmrom.eval.speed import measure_speed  # noqa: E402
from llmrom.data.textdata import calibration_windows, load_text  # noqa: E402


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.8)
    ap.add_argument("--variants", default="rom,rom-sparse", help=f"any of {', '.join(run.VARIANTS)}")
    ap.add_argument("--last-blocks", type=int, help="default: N of the benchmark's rom-blocks run at this budget")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--results", default=str(run.RESULTS))
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in run.VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(run.VARIANTS)}")
    name = run.stem(args.model)
    last_n = args.last_blocks or run.benchmark_last_blocks(args.results, name, args.budget)
    dense, tok = llmrom.load_model(args.model)
    tokens = calibration_windows(tok, load_text("pydoc"), args.nsamples, args.seqlen, 0)
    models = {"dense": dense}
    cost = {"dense": {"parameters": count_params(dense), "macs_per_token": macs_per_token(dense)}}
    for v in variants:
        fields = {"budget": args.budget, "nsamples": args.nsamples, "seqlen": args.seqlen, **run.VARIANTS[v]}
        if run.same_blocks(v):
            fields["last_blocks"] = last_n
        model, report = llmrom.compress(copy.deepcopy(dense), tok, CompressConfig(**fields), tokens=tokens,
                                        progress=sys.stderr.isatty())
        models[v] = model
        cost[v] = {"parameters": report["totals"]["parameters_after"],
                   "macs_per_token": report["totals"]["macs_per_token_after"]}
    speed = measure_speed(models, rounds=args.rounds)
    rows = {}
    for v, s in speed.items():
        rows[v] = {**cost[v], **s,
                   "prefill_vs_dense": s["prefill_tokens_per_s"] / speed["dense"]["prefill_tokens_per_s"],
                   "decode_vs_dense": s["decode_tokens_per_s"] / speed["dense"]["decode_tokens_per_s"]}
        print(f"{v}: {cost[v]['parameters']:,} parameters, prefill {s['prefill_tokens_per_s']:.0f} tok/s "
              f"(x{rows[v]['prefill_vs_dense']:.2f}), decode {s['decode_tokens_per_s']:.1f} tok/s "
              f"(x{rows[v]['decode_vs_dense']:.2f})", flush=True)
    path = Path(args.results) / f"speed_{name}_{args.budget:g}.json"
    write_json_atomic(path, {"model": args.model, "budget": args.budget, "last_blocks": last_n,
                             "calibration": f"pydoc: {args.nsamples} x {args.seqlen}, seed 0", "rounds": args.rounds,
                             "load_average_at_end": os.getloadavg(), "runs": rows, "environment": environment()})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
