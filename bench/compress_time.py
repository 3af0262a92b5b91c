"""Where a default compression's time and memory go: wall, peak RSS, plan split, loop split, the loop's
arithmetic floor (issue "Compression at the speed of the arithmetic").

    python bench/compress_time.py --model smollm2-135m --budget 0.8

Runs `llmrom.compress` with the default options (512 x 128 pydoc calibration) in this process, alone on the
machine (other work skews both the time and the measured GEMM rate the floor is computed at), and writes
bench/results/compress_time/<model>_<budget>.json: the report's `seconds` and `floor`, wall, peak RSS, the
plan, and the environment.

    torchrun --standalone --nproc-per-node 2 bench/compress_time.py --model smollm2-135m --budget 0.8

runs the same compression in 2 gloo processes (llmrom.loop.distributed; torchrun gives each one thread) and
writes <model>_<budget>_np2.json from rank 0: its wall and peak RSS (one process's), and whether its plan
is the one-process file's.
"""

import argparse
import json
import sys
from pathlib import Path

import llmrom
from llmrom.config import CompressConfig
from llmrom.loop import distributed
from llmrom.eval.cost import peak_rss_bytes, reset_peak_rss
from llmrom.eval.evaluate import environment
from llmrom.modeling.io import load_model, write_json_atomic

HERE = Path(__file__).parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.8)
    ap.add_argument("--results", default=str(HERE / "results" / "compress_time"))
    args = ap.parse_args(argv)
    distributed.setup("cpu")  # under torchrun; one process otherwise
    processes = distributed.size()
    reset_peak_rss()
    model, tok = load_model(args.model)
    load_peak = peak_rss_bytes()
    _, report = llmrom.compress(model, tok, CompressConfig(budget=args.budget), progress=distributed.rank() == 0)
    if distributed.rank() != 0:
        return 0
    name = Path(args.model).name.removesuffix(".gguf")
    out = Path(args.results) / f"{name}_{args.budget:g}{'' if processes == 1 else f'_np{processes}'}.json"
    t = report["totals"]
    # the run's peak is at least the load's: VmHWM is read from per-thread RSS counters the kernel folds in
    # batches, so a later reading can come out a few pages under an earlier one when compression adds little
    peak = max(t["peak_rss_bytes"], load_peak)
    plan = {k: v for k, v in report["plan"].items() if k != "auto"}
    row = {"model": name, "budget": args.budget, "config": "defaults (CompressConfig(budget=...))",
           "processes": report.get("processes", {"count": 1}),
           "wall_seconds": t["wall_seconds"], "peak_rss_bytes": peak, "load_peak_rss_bytes": load_peak,
           "kept_fraction": t["kept_fraction"], "seconds": report["seconds"], "floor": report["floor"],
           "plan": plan, "environment": environment()}
    single = Path(args.results) / f"{name}_{args.budget:g}.json"
    if processes > 1 and single.exists():
        one = json.loads(single.read_text())
        row["one_process"] = {"wall_seconds": one["wall_seconds"], "plan_identical": one["plan"] == plan,
                              "kept_fraction": one["kept_fraction"]}
    write_json_atomic(out, row)
    print(f"{out}: wall {t['wall_seconds']:.0f} s, peak RSS {peak / 2**30:.2f} GiB, "
          f"{report['floor']['wall_over_floor']:.2f}x the loop's floor")


if __name__ == "__main__":
    sys.exit(main())
