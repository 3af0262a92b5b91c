"""Where a sparse residual helps, layer by layer: calibration output error of plain low-rank factors
against low-rank plus sparse (entries or whole channels), at the same stored parameters.

    python bench/sparse_layers.py                          # SmolLM2, the module budget of its 0.8 rom run
    python bench/sparse_layers.py --model gemma3-270m --module-budget 0.6

Every block linear of two blocks of the dense model (the first and the last of the benchmark rom
run's last N blocks) is fitted from the inputs of the benchmark's calibration windows (pydoc, seed 0;
--nsamples 32 x 128 tokens by default) with centred ROM, at the rank r that the module budget
gives, and the relative output error tr(D C D^T) / E||y - E y||^2 on those windows is reported for:

* plain: rank r (what llmrom does without --sparse);
* entries/1, entries/3: rank floor(0.75 r) plus the most salient single entries that the rest of
  the budget pays for (CSR: a nonzero costs 2), one fit or three alternating rounds (--sparse 0.25,
  --sparse-rounds 1 or 3, without the fallback to plain);
* channels/3: whole input columns (LOST), same CSR cost;
* columns/3: whole input columns stored as dense columns plus one index each, i.e. about twice the
  nonzeros for the same parameters (a storage llmrom does not ship: it tests whether it would pay).

A layer-level measurement (dense inputs, no sequential calibration, no perplexity): it says which
module kinds gain from --sparse, not by how much the model does. Writes
bench/results/sparse_layers_<model>.json and .md.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/run.py
import run  # noqa: E402

import llmrom  # noqa: E402
from llmrom.modeling.arch import find_blocks, layout_for, weight_matrix  # noqa: E402
from llmrom.eval.evaluate import environment  # noqa: E402
from llmrom.modeling.io import write_json_atomic  # noqa: E402
from llmrom.factor.methods import rom  # noqa: E402
from llmrom.plan.ranks import LinearShape  # noqa: E402
from llmrom.factor.sparse import low_rank_plus_sparse  # noqa: E402
from llmrom.factor.stats import Moments  # noqa: E402
from llmrom.data.textdata import calibration_windows, load_text  # noqa: E402

SPARSE = 0.25
FITS = {  # name: (select, rounds, nonzeros multiplier)
    "entries/1": ("entries", 1, 1),
    "entries/3": ("entries", 3, 1),
    "channels/3": ("channels", 3, 1),
    "columns/3": ("channels", 3, 2),
}


def block_inputs(model, layers, blocks, names, windows, batch_size):
    """Moments of the inputs of `names` (relative to a block) in each of `blocks` (indices into `layers`,
    the model's blocks), on the dense model."""
    moments, hooks = {}, []
    for b in blocks:
        for n in names:
            m = layers[b].get_submodule(n)
            moments[b, n] = Moments.zeros(weight_matrix(m).shape[1])
            hooks.append(m.register_forward_pre_hook(lambda _m, a, k=(b, n): moments[k].update(a[0])))
    try:
        for i in range(0, len(windows), batch_size):
            model(windows[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return moments


def fit_errors(w, mo, module_budget):
    """{fit: relative calibration output error} for one weight and its input moments (centred)."""
    shape = LinearShape.of("m", -1, w, False, True, SPARSE)
    rank = shape.paper_rank(module_budget)
    low, nnz = shape.split(rank)
    plain = rom(w, None, mo, rank, True)
    energy = plain.output_energy
    out = {"rank": rank, "low_rank": low, "nnz": nnz, "plain": plain.residual / energy}
    for name, (select, rounds, mult) in FITS.items():
        k = min(mult * nnz + (mult - 1) * (shape.d_out + 1), shape.d_out * shape.d_in)
        f = low_rank_plus_sparse(rom, w, None, mo, low, k, True, select=select, rounds=rounds)
        out[name] = f.residual / energy
    return out


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=0.8, help="the benchmark rom run whose N and module budget to use")
    ap.add_argument("--module-budget", type=float, help="default: that run's")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--results", default=str(run.RESULTS))
    args = ap.parse_args(argv)
    name = run.stem(args.model)
    model, tok = llmrom.load_model(args.model)
    layers = find_blocks(model)[1]
    n_blocks = len(layers)
    ref = Path(args.results) / "runs" / f"{name}_{args.budget:g}_{run.REFERENCE}.json"
    if args.module_budget is None and not ref.exists():
        raise SystemExit(f"{ref} not found: run bench/run.py for this model and budget first, or give --module-budget")
    plan = json.loads(ref.read_text())["plan"] if ref.exists() else {"last_blocks": n_blocks // 2}
    module_budget = args.module_budget or plan["module_budget"]
    blocks = sorted({n_blocks - plan["last_blocks"], n_blocks - 1})
    names = [n for g in layout_for(model).groups for n in g]
    windows = calibration_windows(tok, load_text("pydoc"), args.nsamples, args.seqlen, 0)
    moments = block_inputs(model, layers, blocks, names, windows, args.batch_size)
    rows = []
    for (b, n), mo in moments.items():
        w = weight_matrix(layers[b].get_submodule(n)).detach().double()
        rows.append({"block": b, "module": n, "d_out": w.shape[0], "d_in": w.shape[1],
                     **fit_errors(w, mo, module_budget)})
        print(rows[-1], flush=True)
    result = {"model": args.model, "module_budget": module_budget, "sparse_fraction": SPARSE, "blocks": blocks,
              "calibration": f"pydoc: {args.nsamples} windows x {args.seqlen} tokens, seed 0, dense inputs",
              "error": "tr(D C D^T) / output variance on the calibration windows (centred)",
              "environment": environment(), "rows": rows}
    out = Path(args.results) / f"sparse_layers_{name}"
    write_json_atomic(out.with_suffix(".json"), result)
    out.with_suffix(".md").write_text(table(result))
    print(table(result))


def table(result):
    head = ["block", "module", "d_out x d_in", "rank", "plain", *FITS]
    lines = [f"# Sparse residual by layer: {result['model']}, module budget {result['module_budget']:.3f}",
             "", f"Relative calibration output error ({result['calibration']}); bold: below plain.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in result["rows"]:
        cells = [f"**{r[k]:.4f}**" if r[k] < r["plain"] else f"{r[k]:.4f}" for k in FITS]
        lines.append(f"| {r['block']} | {r['module']} | {r['d_out']} x {r['d_in']} | {r['rank']} "
                     f"| {r['plain']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
