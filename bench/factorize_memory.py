"""Peak memory and seconds of factorizing one LLaMA-7B-shaped mlp.down_proj (4096 x 11008) with rom.

Two paths, each in a fresh subprocess that reads its own peak RSS (VmHWM of /proc/self/status):

    inputs   the moments of the layer's inputs x (11008 x 11008, float64), then `rom`
    outputs  the moments of its outputs z = W x (4096 x 4096), then `rom_from_outputs`

Statistics: --tokens synthetic inputs (correlated, heavy-tailed like SwiGLU activations) in
micro-batches of --chunk, generated from fixed seeds, so both paths see identical data; the
outputs path also runs the layer itself (the pipeline's block forward does that anyway). Rank:
the paper's rank at --module-budget (0.2 -> 597). Centred, as the CLI default. The parent then
compares the two factorizations (|W_a - W_b|_F / |W_a|_F, bias, residual).

    OMP_NUM_THREADS=1 python bench/factorize_memory.py [--tokens 4096] [--dtype float32]

Writes bench/results/factorize_memory.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

D_OUT, D_IN = 4096, 11008


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def weight(dtype):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(D_OUT, D_IN, generator=g) / D_IN ** 0.5).to(dtype)


def chunks(tokens, chunk, dtype):
    """Synthetic down_proj inputs: a 64-dimensional correlated part plus per-feature noise decaying
    over two decades, cubed elementwise for heavy tails; one generator seed per chunk."""
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(64, D_IN, generator=g)
    scale = torch.logspace(0, -2, D_IN)
    for i, start in enumerate(range(0, tokens, chunk)):
        g = torch.Generator().manual_seed(100 + i)
        n = min(chunk, tokens - start)
        x = torch.randn(n, 64, generator=g) @ mix / 8 + torch.randn(n, D_IN, generator=g) * scale
        yield (x ** 3).to(dtype)


@torch.no_grad()
def child(args):
    """One path in this (fresh) process; prints a JSON line and saves the factors to args.save."""
    from llmrom.factor.methods import rom, rom_from_outputs
    from llmrom.factor.stats import Moments

    dtype = getattr(torch, args.dtype)
    w = weight(dtype)
    baseline_kib = status_kib("VmRSS")
    stats_s = 0.0
    moments = Moments.zeros(D_IN if args.path == "inputs" else D_OUT)
    for x in chunks(args.tokens, args.chunk, dtype):
        t0 = time.perf_counter()
        moments.update(x if args.path == "inputs" else torch.nn.functional.linear(x, w))
        stats_s += time.perf_counter() - t0
    stats_kib = status_kib("VmRSS")
    t0 = time.perf_counter()
    method = rom if args.path == "inputs" else rom_from_outputs
    f = method(w, None, moments, args.rank, True)
    factorize_s = time.perf_counter() - t0
    peak_kib = status_kib("VmHWM")
    torch.save({"first": f.first, "second": f.second, "bias": f.bias}, args.save)
    print(json.dumps({
        "path": args.path, "statistics_shape": list(moments.xx.shape),
        "peak_rss_gib": round(peak_kib / 2**20, 3), "rss_before_statistics_gib": round(baseline_kib / 2**20, 3),
        "rss_after_statistics_gib": round(stats_kib / 2**20, 3),
        "statistics_seconds": round(stats_s, 1), "factorize_seconds": round(factorize_s, 1),
        "total_seconds": round(stats_s + factorize_s, 1),
        "residual": f.residual, "output_energy": f.output_energy, "relative_error": f.relative_error,
        "explained": f.explained,
    }))


def compare(a, b):
    """|W_a - W_b|_F / |W_a|_F for W = second @ first (orthonormal `second`), without forming W."""
    cross = ((a["second"].T @ b["second"]) * (a["first"] @ b["first"].T)).sum()
    na, nb = a["first"].pow(2).sum(), b["first"].pow(2).sum()
    return {"weight_rel_diff": float((na + nb - 2 * cross).clamp_min(0).sqrt() / na.sqrt()),
            "bias_rel_diff": float((a["bias"] - b["bias"]).norm() / a["bias"].norm())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--module-budget", type=float, default=0.2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--path", choices=["inputs", "outputs"], help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.path:
        return child(args)

    rank = int(args.module_budget * D_OUT * D_IN / (D_OUT + D_IN))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    runs, factors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("inputs", "outputs"):
            save = Path(tmp) / f"{path}.pt"
            cmd = [sys.executable, __file__, "--path", path, "--rank", str(rank), "--save", str(save),
                   "--tokens", str(args.tokens), "--chunk", str(args.chunk), "--dtype", args.dtype]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            runs[path] = json.loads(out.strip().splitlines()[-1])
            factors[path] = torch.load(save)
            print(json.dumps(runs[path]), flush=True)
    i, o = runs["inputs"], runs["outputs"]
    result = {
        "what": "rom on one random LLaMA-7B-shaped mlp.down_proj: input-side vs output-side statistics",
        "shape": {"d_out": D_OUT, "d_in": D_IN}, "rank": rank, "module_budget": args.module_budget,
        "tokens": args.tokens, "chunk": args.chunk, "dtype": args.dtype, "centered": True,
        "runs": runs,
        "peak_rss_ratio": round(i["peak_rss_gib"] / o["peak_rss_gib"], 2),
        "peak_above_start_gib": {p: round(r["peak_rss_gib"] - r["rss_before_statistics_gib"], 3)
                                 for p, r in runs.items()},
        "speedup": round(i["total_seconds"] / o["total_seconds"], 2),
        "agreement": {**compare(factors["inputs"], factors["outputs"]),
                      "residual_rel_diff": abs(i["residual"] - o["residual"]) / i["residual"]},
        "threads": int(env["OMP_NUM_THREADS"]),
        "load_average_at_end": os.getloadavg(),
        "cpus": os.cpu_count(), "torch": torch.__version__,
    }
    out = Path(args.results) / "factorize_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("peak_rss_ratio", "peak_above_start_gib", "speedup", "agreement")}))


if __name__ == "__main__":
    main()
