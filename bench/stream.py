"""Benchmark streaming compression of a LLaMA-2-7B-shaped checkpoint: wall time, time split, RSS, GFLOP/s.

Make the checkpoint first (13.5 GB of random bf16 weights; the compression does not care):

    python scripts/make_llama7b_shaped.py /tmp/llama7b-random
    python bench/stream.py --model /tmp/llama7b-random --max-blocks 2     # short: ~2 blocks, extrapolated
    python bench/stream.py --model /tmp/llama7b-random --work /tmp/w     # full run; the same command resumes it
    python bench/stream.py --model /tmp/llama7b-random --device cuda     # blocks on a GPU: ..._full_cuda.json

The plan is the paper's policy at --budget (default 0.8) over the last --last-blocks blocks (module
budget solved to meet the budget). With --max-blocks K the run stops after K blocks, and the plan is
changed so that the last of those K blocks is compressed at that module budget (the others stay
dense): it measures one dense and one compressed block, and the full run's time is extrapolated as
capture + (blocks - last_blocks) x dense block + last_blocks x compressed block + writing the
tensors outside the blocks. Calibration: --nsamples x --seqlen random token ids (512 x 128).
FLOPs are the matrix products counted by torch.utils.flop_counter (eigh not included), compared with
a measured fp32 matmul peak (on the --device; on a GPU the peak GPU memory is recorded too).
Writes bench/results/stream_<name>_<blocks>[_cuda].json.

With --work DIR the run lives in DIR and survives the process: a full run (2.5 hours for the 7B shape
on 2 cores) killed at any point is continued by the same command, through llmrom's own --resume; wall
time and peak RSS add up over the sessions (the journal keeps them) and the per-block measurements
are kept in DIR/bench_blocks.json. DIR is deleted when the run is complete.
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers

from llmrom.plan.choose import linear_shapes
from llmrom.modeling.arch import layout_for
from llmrom.config import CompressConfig
from llmrom.eval.cost import count_params, gemm_flops_per_second, peak_rss_bytes
from llmrom.modeling.io import write_json_atomic
from llmrom.plan.ranks import module_budget_for
from llmrom.loop.report import time_split
from llmrom.loop.stream import Partial, build_skeleton, compress_streaming, discard


def current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a safetensors folder (scripts/make_llama7b_shaped.py)")
    ap.add_argument("--budget", type=float, default=0.8)
    ap.add_argument("--last-blocks", type=int, default=16)
    ap.add_argument("--max-blocks", type=int, help="stop after K blocks and extrapolate (K >= 1)")
    ap.add_argument("--nsamples", type=int, default=512)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--activations", default="cpu", choices=["cpu", "disk"])
    ap.add_argument("--activations-dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                    help="count matrix-product FLOPs with torch.utils.flop_counter")
    ap.add_argument("--work", help="a folder for the run that outlives the process (resumable); default: a temporary "
                                   "folder beside --model, deleted at the end")
    ap.add_argument("--device", default="cpu", help="where blocks are computed: cpu or cuda[:N] (weights are "
                                                     "still streamed from disk one block at a time)")
    ap.add_argument("--name", default="llama7b-shaped")
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    peak = gemm_flops_per_second(args.device, m=4096, k=4096, n=4096) / 1e9  # GFLOP/s
    gpu = torch.device(args.device).type == "cuda"
    skeleton = build_skeleton(Path(args.model), torch.float32)
    layout = layout_for(skeleton)
    n_blocks = len(skeleton.get_submodule(layout.blocks_path))
    shapes = linear_shapes(skeleton, layout, True)
    total = count_params(skeleton)
    b = module_budget_for(args.budget, total, shapes, n_blocks, args.last_blocks)
    if b is None:
        raise SystemExit(f"--budget {args.budget} cannot be met with --last-blocks {args.last_blocks}")
    vocab = skeleton.config.vocab_size
    del skeleton
    tokens = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    common = dict(nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size,
                  activations=args.activations, activations_dtype=args.activations_dtype, device=args.device)
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="llmrom-bench-", dir=Path(args.model).resolve().parent))
    ranks = None
    if args.max_blocks:
        k = args.max_blocks
        ranks = work / "ranks.json"
        ranks.write_text(json.dumps({s.name: s.paper_rank(b) for s in shapes if s.block == k - 1}))
        config = CompressConfig(ranks_file=str(ranks), **common)
    else:
        config = CompressConfig(budget=args.budget, last_blocks=args.last_blocks, **common)
    out = work / "out"
    resume = Partial(out).path.exists()
    state_file = work / "bench_blocks.json"  # per-block measurements of earlier sessions of this run
    state = json.loads(state_file.read_text()) if resume and state_file.exists() else {"blocks": [], "gflop": 0.0}

    events = []
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False) if args.flops else None

    def monitor(event, model, resident):
        events.append({"event": event, "t": time.perf_counter(), "rss": current_rss(), "resident_params": resident,
                       "flops": counter.get_total_flops() if counter is not None else 0})
        if event == "block released":
            start = next(e for e in reversed(events) if e["event"] == "block loaded")
            state["blocks"].append({"seconds": round(events[-1]["t"] - start["t"], 2),
                                    "gflop": round((events[-1]["flops"] - start["flops"]) / 1e9, 4)})
            write_json_atomic(state_file, {**state, "gflop": state["gflop"] + events[-1]["flops"] / 1e9})
    t0 = time.perf_counter()
    with counter if counter is not None else contextlib.nullcontext():
        report = compress_streaming(args.model, out, config, tokens=tokens, monitor=monitor, resume=resume,
                                    max_blocks=args.max_blocks)
    wall = report["totals"]["wall_seconds"] if report else time.perf_counter() - t0  # the journal sums sessions
    journal = json.loads((Partial(out).path / "journal.json").read_text()) if report is None else None
    split = report["seconds"]["loop"] if report else time_split(journal["timings"])
    flops = state["gflop"] * 1e9 + counter.get_total_flops() if counter is not None else None
    compute = split.get("forward", 0) + split.get("covariance", 0) + split.get("factorize", 0)
    block_seconds = [b["seconds"] for b in state["blocks"]]
    block_gflop = [b["gflop"] for b in state["blocks"]]
    result = {
        "what": "streaming compression of a LLaMA-2-7B-shaped checkpoint with random bf16 weights",
        "model": {"path": args.model, "blocks": n_blocks, "parameters": total},
        "plan": {"budget": args.budget, "last_blocks": args.last_blocks, "module_budget": b},
        "calibration": f"{args.nsamples} x {args.seqlen} random token ids, micro-batches of {args.batch_size}",
        "activations": {"where": args.activations, "dtype": args.activations_dtype or "float32"},
        "blocks_run": len(block_seconds),
        "wall_seconds": round(wall, 1),
        "seconds_by_step": {k: round(v, 1) for k, v in split.items()},
        "block_seconds": block_seconds,
        "block_matrix_product_gflop": block_gflop if flops else None,
        "sessions": report["streaming"]["sessions"] if report else 1,
        "peak_rss_gib": round(max(peak_rss_bytes(), report["totals"]["peak_rss_bytes"] if report else 0) / 2**30, 3),
        "rss_gib_at_events": [{"event": e["event"], "rss_gib": round(e["rss"] / 2**30, 3)} for e in events],
        "matmul_fp32_peak_gflops": round(peak, 1),
        "matrix_product_gflop": round(flops / 1e9, 1) if flops else None,
        "achieved_gflops_in_compute_steps": round(flops / 1e9 / compute, 1) if flops and compute else None,
        "load_average_at_end": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "transformers": transformers.__version__,
                    "device": torch.cuda.get_device_name(args.device) if gpu else "cpu"},
    }
    if gpu:  # this session's peak only: a resumed run's earlier sessions are not included
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(args.device) / 2**30, 3)
    if args.max_blocks:
        dense, comp = block_seconds[0], block_seconds[-1]
        outside_bytes = 2 * sum(p.numel() for n, p in build_skeleton(Path(args.model), torch.float32)
                                .named_parameters() if not n.startswith(layout.blocks_path + "."))
        write_rate = 1e9  # bytes/s, a conservative guess for the final shard (fp32 embeddings and head)
        full = (split.get("capture", 0) + (n_blocks - args.last_blocks) * dense + args.last_blocks * comp
                + outside_bytes / write_rate)
        result["extrapolated"] = {
            "note": f"EXTRAPOLATED from {len(block_seconds)} measured blocks, not a full run",
            "dense_block_seconds": dense, "compressed_block_seconds": comp,
            "full_run_minutes": round(full / 60, 1),
            "formula": "capture + (blocks - last_blocks) x dense block + last_blocks x compressed block "
                       "+ final shard bytes / 1 GB/s",
        }
        if flops:  # the floor: the same matrix products at the measured matmul peak (eigh not counted)
            d_gf, c_gf = block_gflop[0], block_gflop[-1]
            run_gf = (n_blocks - args.last_blocks) * d_gf + args.last_blocks * c_gf
            result["extrapolated"].update({
                "full_run_matrix_product_gflop": round(run_gf, 4),
                "floor_minutes_at_matmul_peak": round(run_gf / peak / 60, 1),
                "one_dense_pass_minutes_at_matmul_peak": round(n_blocks * d_gf / peak / 60, 1),
                "floor_note": "the run's matrix products at the measured fp32 peak; one dense pass is the "
                              "forward of the calibration tokens through every block, which any method that "
                              "calibrates block by block must run at least once",
            })
    discard(out)
    shutil.rmtree(work)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    size = f"max{args.max_blocks}" if args.max_blocks else "full"
    path = results / f"stream_{args.name}_{size}{'_cuda' if gpu else ''}.json"
    write_json_atomic(path, result)
    print(json.dumps(result, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
