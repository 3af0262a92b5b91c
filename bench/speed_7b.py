"""Decode speed of a LLaMA-2-7B-shaped model in bfloat16, dense against the default plan's factor forms.

    python bench/speed_7b.py                     # 8 of the 32 blocks (fits 24 GB with both models), budget 0.8
    python bench/speed_7b.py --layers 32         # the whole shape, where memory allows (13.5 GB + ~11 GB)

At 7B sizes a decode step is bound by memory bandwidth: every weight is read once per token, so bytes
removed should show as time. This measures exactly that, without a 2.5-hour compression: the model
is LLaMA-2-7B's shape (hidden 4096, MLP 11008, 32 heads, vocab 32000) with random weights, and its
compressed twin has every block linear factorized at the ranks `llmrom compress --budget B` plans for
this shape on this machine, q/k/v and gate/up as joint groups (--factors interpolative: each linear
alone; the plan's speed limits measured here in bfloat16; token embedding dense;
every block cut at one module budget solved to meet B), with random factors: speed depends on the
shapes and ranks, not on the values. Both are timed by llmrom.eval.speed (decode with KV cache at
batch 1 and 8, prefill 1 x 512, interleaved rounds, median) in bfloat16.
Writes bench/results/speed/llama7b-shaped_<layers>of32_<budget>.json.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
import run  # noqa: E402

from llmrom.config import CompressConfig  # noqa: E402
from llmrom.eval.cost import count_params, parameter_bytes  # noqa: E402
from llmrom.eval.evaluate import environment  # noqa: E402
from llmrom.eval.speed import measure_speed, speed_ratios  # noqa: E402
from llmrom.factor.interp import side_for  # noqa: E402
from llmrom.modeling.arch import layout_for  # noqa: E402
from llmrom.modeling.factorized import FactorizedLinear, joint_modules, replace_module  # noqa: E402
from llmrom.modeling.io import write_json_atomic  # noqa: E402
from llmrom.plan.choose import joins_groups, limit_key, planned_shapes  # noqa: E402
from llmrom.plan.ranks import joint_groups, joint_plan, last_blocks_plan, module_budget_for, stacked_shape  # noqa: E402


def llama7b_shaped(layers, hidden=4096, intermediate=11008, heads=32, vocab=32000):
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()


def factorized_twin(model, budget, prefer, factors="joint"):
    """The model with every planned block linear replaced by random factors of its planned rank (in place);
    with --factors joint, q/k/v and gate/up each by one joint group of the rank the plan gives it."""
    layout = layout_for(model)
    cfg = CompressConfig(budget=budget, prefer=prefer, dtype="bfloat16", factors=factors)
    shapes = planned_shapes(model, layout, cfg, progress=True)
    n = len(model.get_submodule(layout.blocks_path))
    total = count_params(model)
    b = module_budget_for(budget, total, shapes, n, n)
    if b is None:
        raise SystemExit(f"budget {budget} cannot be met by this shape's block linears")
    plan, joint = joint_plan(shapes, layout, last_blocks_plan(shapes, n, n, b)) if joins_groups(cfg) else \
        (last_blocks_plan(shapes, n, n, b), frozenset())
    by_name = {s.name: s for s in shapes}
    g = torch.Generator().manual_seed(1)
    counts = {"joint_groups": 0, "interpolative_linears": 0}
    for i in range(n):
        for group in layout.groups:
            names = [f"{layout.blocks_path}.{i}.{m}" for m in group]
            if names[0] in joint:
                stacked = stacked_shape([by_name[m] for m in names])
                rank = plan[names[0]]
                interp = side_for(stacked.d_in, stacked.d_out) if stacked.uses_interp(rank) else None
                _random(joint_modules(model, names, [by_name[m].d_out for m in names], rank, True,
                                      dtype=torch.bfloat16, interp=interp).stacked, g)
                counts["joint_groups"] += 1
                counts["interpolative_linears"] += interp is not None
                continue
            for name in (m for m in names if m in plan):
                s, rank = by_name[name], plan[name]
                interp = side_for(s.d_in, s.d_out) if s.uses_interp(rank) else None
                replace_module(model, name, _random(FactorizedLinear(s.d_in, s.d_out, rank, True,
                                                                     dtype=torch.bfloat16, interp=interp), g))
                counts["interpolative_linears"] += interp is not None
    grouped = joint_groups(shapes, layout) if joins_groups(cfg) else {}
    limits = {limit_key(s, grouped): {"pair": round(s.max_kept, 4), "interpolative": round(s.interp_max_kept, 4)}
              for s in shapes}
    return model, {"module_budget": b, "factorized_linears": len(plan), "block_linears": len(shapes),
                   "factors": factors, **counts, "max_kept_by_shape": limits}


def _random(m, g):
    """Fill a FactorizedLinear with small random factors (and a random interpolative order)."""
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
        if m.interp:
            m.order.copy_(torch.randperm(m.order.numel(), generator=g).to(torch.int32))
    return m


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shape", default="4096,11008,32,32000", help="hidden,intermediate,heads,vocab (tests: smaller)")
    ap.add_argument("--budget", type=float, default=0.8)
    ap.add_argument("--prefer", default="speed", choices=["speed", "quality"])
    ap.add_argument("--factors", default="joint", choices=["joint", "interpolative", "pair"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--results", default=str(run.RESULTS / "speed"))
    args = ap.parse_args(argv)
    shape = [int(x) for x in args.shape.split(",")]
    dense = llama7b_shaped(args.layers, *shape)
    small, plan = factorized_twin(llama7b_shaped(args.layers, *shape), args.budget, args.prefer, args.factors)
    speed = measure_speed({"model": small, "reference": dense}, rounds=args.rounds, new_tokens=args.new_tokens)
    out = {"shape": "hidden {}, MLP {}, {} heads, vocab {} (LLaMA-2-7B's: 4096,11008,32,32000), random "
                    "weights".format(*shape),
           "layers": args.layers, "budget": args.budget, "prefer": args.prefer, "dtype": "bfloat16", "plan": plan,
           "parameters": {"dense": count_params(dense), "compressed": count_params(small)},
           "bytes": {"dense": parameter_bytes(dense), "compressed": parameter_bytes(small)},
           "speed_vs_dense": speed_ratios(speed), "speed": speed,
           "environment": {**environment(), "load_average": os.getloadavg()}}
    form = "" if args.factors == "joint" else f"_{args.factors}"  # the default's file has no suffix
    path = Path(args.results) / f"llama7b-shaped_{args.layers}of32_{args.budget:g}_{args.prefer}{form}.json"
    write_json_atomic(path, out)
    print(f"bytes {out['bytes']['compressed'] / out['bytes']['dense']:.3f} of dense; "
          + ", ".join(f"{k} x{v:.3f}" for k, v in out["speed_vs_dense"].items()))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
