"""Which basis for a tied embedding: the lookup's moment, the head's, or a mix (what llmrom uses).

    python bench/embedding_basis.py                                   # SmolLM2 r400 and Gemma-3 r535
    python bench/embedding_basis.py --models smollm2-135m --ranks 300

A tied table E serves the lookup (error: the used rows outside the basis P) and the output layer
(error: the final hidden states h outside P). For each model the table alone is projected, E P P^T,
at one rank, with P the top eigenvectors of (1 - s) M_lookup / tr + s M_head / tr
(llmrom.plan.embedding.embedding_basis), for the head's share s = 0 (the lookup's moment
E^T diag(count) E / n alone: llmrom before the head took part), 0.5 (equal shares), 0.75
(embedding.HEAD_SHARE, the default), 0.9 and 1 (E[h h^T] alone). Both moments come from the first 32 calibration windows, as in
the automatic plan, and each row reports the loss on the plan's 16 held calibration windows (what a
choice of s by calibration would go by) and the perplexity on the benchmark's evaluation windows
(the blocks dense; the dense perplexity is in bench/results/summary.md). Gemma-3-270M's rank 535 is
the embedding alone at budget 0.9. Calibration and evaluation are bench/run.py's (pydoc, seed 0;
the tutorial, 40 windows x 512 tokens). Writes bench/results/embedding_basis.json and .md.
"""

import argparse
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))  # bench/run.py
import run  # noqa: E402

import llmrom  # noqa: E402
from llmrom.plan.embedding import embedding_basis, embedding_shape, head_input_moment  # noqa: E402
from llmrom.eval.evaluate import environment  # noqa: E402
from llmrom.modeling.io import write_json_atomic  # noqa: E402
from llmrom.eval.perplexity import mean_nll  # noqa: E402
from llmrom.data.textdata import calibration_windows, eval_windows, load_text  # noqa: E402

RANKS = {"smollm2-135m": 400, "gemma3-270m": 535}
SHARES = (0.0, 0.5, 0.75, 0.9, 1.0)
PROFILE, HELD = 32, 16  # the automatic plan's windows (autoplan.choose_last_n)


@torch.no_grad()
def measure(name, rank, args):
    model, tok = llmrom.load_model(name)
    shape = embedding_shape(model)
    if shape is None or shape.head is None:
        raise SystemExit(f"{name}: its embedding is not tied to its head; nothing to compare")
    calib = calibration_windows(tok, load_text(args.calib), args.nsamples, args.seqlen, args.seed)
    profile, held = calib[:PROFILE], calib[PROFILE:PROFILE + HELD]  # as the plan splits the benchmark's windows
    windows = eval_windows(tok, load_text(args.eval), args.eval_seqlen, args.eval_windows)
    weight = model.get_submodule(shape.name).weight
    dense = weight.data
    head = head_input_moment(model, shape, profile, progress=True)
    rows = [{"share": None, "held_calib_loss": mean_nll(model, held), "perplexity": None}]
    for share in tqdm(SHARES, desc=f"{name} head shares"):
        p = embedding_basis(dense, profile, head, share)[1][:, :rank].to(dense.dtype)
        weight.data = (dense @ p) @ p.T
        rows.append({"share": share, "held_calib_loss": mean_nll(model, held),
                     "perplexity": math.exp(mean_nll(model, windows, progress=True))})
    weight.data = dense
    return {"model": name, "rank": rank, "width": shape.dim, "vocab": shape.vocab, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(RANKS))
    ap.add_argument("--ranks", help="comma-separated ranks, one per model (default: SmolLM2 400, Gemma 535)")
    ap.add_argument("--calib", default="pydoc")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows drawn (the first 48 are used)")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", default="python-docs:tutorial")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--results", default=str(run.RESULTS))
    args = ap.parse_args(argv)
    models = args.models.split(",")
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else [RANKS.get(m, 0) for m in models]
    if len(ranks) != len(models) or not all(ranks):
        raise SystemExit("--ranks: give one rank per model in --models")
    results = [measure(m, r, args) for m, r in zip(models, ranks)]
    protocol = (f"calibration {args.calib}: of {args.nsamples} windows x {args.seqlen} tokens (seed {args.seed}), "
                f"0-{PROFILE - 1} for the moments, {PROFILE}-{PROFILE + HELD - 1} held; evaluation {args.eval}: first "
                f"{args.eval_windows} windows x {args.eval_seqlen} tokens")
    out = Path(args.results) / "embedding_basis"
    write_json_atomic(out.with_suffix(".json"), {"protocol": protocol, "environment": environment(),
                                                 "models": results})
    lines = ["# Tied embedding projected at one rank: the head's share s of the basis's moment", "", protocol, "",
             "| model | rank / width | s | held calibration loss | perplexity |", "|---|---:|---|---:|---:|"]
    for r in results:
        for row in r["rows"]:
            s = "dense" if row["share"] is None else f"{row['share']:g}"
            ppl = "-" if row["perplexity"] is None else f"{row['perplexity']:.2f}"
            lines.append(f"| {r['model']} | {r['rank']} / {r['width']} | {s} | {row['held_calib_loss']:.4f} | {ppl} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
