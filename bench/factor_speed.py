"""Speed of one factorized linear, factor pair against interpolative form, beside the dense layer.

    python bench/factor_speed.py                   # CPU, SmolLM2's and LLaMA-7B's shapes
    python bench/factor_speed.py --device cuda

For each (d_in, d_out) and module budget b, three layers of the same input and output: the dense
nn.Linear, the factor pair at the paper's rank for b, and the interpolative form at its (larger)
rank for the same b (llmrom.factor.interp: same parameters, up to rounding; the identity on the smaller side,
as compression puts it). Each is timed on a decode
step (1 token) and a prefill (512 tokens), rounds interleaved (dense, pair, interpolative, dense,
...), median per layer; ratios are to the dense layer of the same round set. Writes
bench/results/factor_speed_<device>.json.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from llmrom.eval.evaluate import environment
from llmrom.modeling.factorized import FactorizedLinear
from llmrom.factor.interp import side_for
from llmrom.modeling.io import write_json_atomic
from llmrom.plan.ranks import LinearShape

SHAPES = {"smollm2 attn": (576, 576), "smollm2 up": (576, 1536), "smollm2 down": (1536, 576),
          "7b attn": (4096, 4096), "7b up": (4096, 11008), "7b down": (11008, 4096)}


def layers(d_in, d_out, budget, device):
    """{name: (module, rank)}: dense, pair and interpolative at the ranks `budget` buys each form."""
    out = {"dense": (torch.nn.Linear(d_in, d_out, bias=False, device=device), min(d_in, d_out))}
    for name, interp in (("pair", False), ("interpolative", True)):
        rank = LinearShape("m", 0, d_in, d_out, interp=interp).paper_rank(budget)
        m = FactorizedLinear(d_in, d_out, rank, False, device=device, interp=side_for(d_in, d_out) if interp else None)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
            if interp:
                m.order.copy_(torch.randperm(m.order.numel(), device=device).to(torch.int32))
        out[name] = (m, rank)
    return out


def timed(module, x, device, reps):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        module(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budgets", default="0.9,0.6")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for shape_name, (d_in, d_out) in SHAPES.items():
        for budget in [float(b) for b in args.budgets.split(",")]:
            mods = layers(d_in, d_out, budget, args.device)
            for tokens in (1, 512):
                x = torch.randn(tokens, d_in, device=args.device)
                reps = max(1, int(2e8 // (tokens * d_in * d_out)) if args.device == "cpu" else 50)
                times = {n: [] for n in mods}
                for n, (m, _) in mods.items():
                    timed(m, x, args.device, 1)  # warm-up
                for _ in range(args.rounds):
                    for n, (m, _) in mods.items():
                        times[n].append(timed(m, x, args.device, reps))
                med = {n: statistics.median(t) for n, t in times.items()}
                rows.append({"shape": shape_name, "d_in": d_in, "d_out": d_out, "budget": budget, "tokens": tokens,
                             "ranks": {n: r for n, (_, r) in mods.items()},
                             "seconds": med, "vs_dense": {n: med["dense"] / med[n] for n in med}})
                print(f"{shape_name:13s} b={budget:g} tokens={tokens:3d} ranks pair {mods['pair'][1]} interp "
                      f"{mods['interpolative'][1]}: speed vs dense pair {rows[-1]['vs_dense']['pair']:.2f}x, "
                      f"interpolative {rows[-1]['vs_dense']['interpolative']:.2f}x", flush=True)
    device = args.device if args.device == "cpu" else torch.cuda.get_device_name(torch.device(args.device))
    path = Path(args.out) / f"factor_speed_{args.device.split(':')[0]}.json"
    write_json_atomic(path, {"device": device, "threads": torch.get_num_threads(), "rounds": args.rounds,
                             "rows": rows, "environment": environment()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
