"""Tables, plots and README's Results section from the benchmark's results files.

    python bench/report.py [--runs bench/results/runs] [--readme README.md] [--docs docs]

Writes bench/results/summary.md, bench/results/ppl_vs_params.png, the full results into docs/results.md,
the healing table into docs/healing.md, the ablations into docs/ablations.md, the short headline table into
README.md (between their markers), and per model
ranks_<model>.png (rank of every linear, default variant, each budget) and
explained_<model>.png (explained output variance against rank, averaged per kind of linear).
Every number in the README's Results section comes from these files.
"""

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # bench/ablate.py, also when this file is loaded by path (tests)
import run  # noqa: E402
from llmrom.eval.speed import speed_ratios  # noqa: E402
BEGIN, END = "<!-- results:begin (bench/report.py writes this) -->", "<!-- results:end -->"
HEADLINE_BEGIN, HEADLINE_END = "<!-- headline:begin (bench/report.py writes this) -->", "<!-- headline:end -->"
PEER = "svd-llm"  # the peers' best recipe: SVD-LLM's whitened SVD


def headline_table(by_model, budgets=(0.9, 0.8, 0.7), speed_dir=None):
    """README's short table: per model and budget, the default against dense and the peers' best recipe,
    quality (perplexity), bytes (state dict) and speed: bench/speed.py's side-by-side ratios of the same
    plan's saved folder (`speed_dir`, eager mode), else the row's own where it measured them."""
    speed_rows = speed_by_row(Path(speed_dir)) if speed_dir else {}
    lines = ["| model | kept | dense ppl | SVD-LLM ppl | llmrom ppl | gap to dense closed | bytes (vs dense) "
             "| prefill x dense | decode x dense |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    old_marks = set()
    for model, runs in sorted(by_model.items()):
        for b in budgets:
            ours = next((r for r in runs if r["variant"] == "rom" and r["budget"] == b), None)
            peer = next((r for r in runs if r["variant"] == PEER and r["budget"] == b), None)
            if ours is None:
                continue
            e = ours["eval"]
            dense_ppl = e["perplexity"]["reference"]
            ppl, peer_ppl = e["perplexity"]["model"], peer["eval"]["perplexity"]["model"] if peer else None
            closed = f"{(peer_ppl - ppl) / (peer_ppl - dense_ppl):.0%}" if peer_ppl and peer_ppl > dense_ppl else "-"
            size = e["model"].get("bytes"), e["reference"].get("bytes")
            size_text = f"{size[0] / 1e6:,.1f} MB ({size[0] / size[1]:.2f}x)" if all(size) else "-"
            ratios = speed_rows.get((model, b, "rom"))
            if ratios is None and e.get("speed"):
                ratios = speed_ratios(e["speed"])
            px, dx = (f"{ratios[k]:.2f}" if ratios else "not measured" for k in ("prefill", "decode batch 1"))
            config = ours.get("config", {})
            mark = " †" if "prefer" not in config else " ‡" if config.get("factors") != "joint" else ""
            old_marks.add(mark.strip())
            lines.append(f"| {model}{mark} | {ours['totals']['kept_fraction']:.2f} | {dense_ppl:.2f} | "
                         f"{f'{peer_ppl:.2f}' if peer_ppl else '-'} | {ppl:.2f} | {closed} | {size_text} "
                         f"| {px} | {dx} |")
    if old_marks - {""}:
        lines.append("")
    if "†" in old_marks:
        lines.append("† planned before `--prefer speed` became the default (the plan `--prefer quality` makes "
                     "now), each linear factorized alone; not yet re-run.")
    if "‡" in old_marks:
        lines.append("‡ the default's plan, but each linear factorized alone (`--factors interpolative`, the default "
                     "before joint groups); not yet re-run.")
    return "\n".join(lines) if len(lines) > 2 else ""


def speed_by_row(folder):
    """{(model, budget, variant): speed ratios} from bench/speed.py's eager results files."""
    out = {}
    for path in sorted(folder.glob("*_eager.json")) if folder.is_dir() else []:
        d = json.loads(path.read_text())
        model = Path(d["model"]).name.removesuffix(".gguf")
        for r in d["rows"].values():
            out[model, r["budget"], r["variant"]] = r["speed_vs_dense"]
    return out


def load_runs(folder):
    runs = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    by_model = defaultdict(list)
    for r in runs:
        by_model[Path(r["model"]).name.removesuffix(".gguf")].append(r)
    return by_model


def _order(r):
    return (-r["budget"], r["variant"] not in ("rom", REFERENCE), r["variant"] != "rom", r["variant"])


def gpu_mark(run):
    """' (GPU)' after the timing of a row compressed with --device cuda (its perplexity compares; its time not)."""
    return "" if run.get("config", {}).get("device", "cpu") == "cpu" else " (GPU)"


def mixed_calibration(by_model):
    """Warnings for models whose rows were calibrated on different token ids (text, tokenizer or windows)."""
    out = []
    for model, runs in sorted(by_model.items()):
        seen = {r["calibration_tokens_sha256"][:12] for r in runs if "calibration_tokens_sha256" in r}
        if len(seen) > 1:
            out.append(f"WARNING: the rows of {model} were calibrated on different token ids "
                       f"({', '.join(sorted(seen))}); their perplexities do not compare.")
    return out


def table(model, runs):
    dense = next((r for r in runs if r["variant"] == "dense"), None)
    lines = [f"#### {model}", "",
             "| budget | variant | last N blocks x module budget, or policy | kept | perplexity | KL | top-1 | prefill x | decode x "
             "| compress s | peak RSS GiB |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if dense is not None:
        e = dense["eval"]
        lines.append(f"| 1 | dense | - | {e['model']['parameters']:,} | {e['perplexity']['model']:.3f} | 0 | 1 | - | - "
                     "| - | - |")
    for r in sorted((r for r in runs if r["variant"] != "dense"), key=_order):
        e, t, plan = r["eval"], r["totals"], r["plan"]
        speed = e.get("speed")
        px = f"{speed['model']['prefill_tokens_per_s'] / speed['reference']['prefill_tokens_per_s']:.2f}" if speed else "-"
        dx = f"{speed['model']['decode_tokens_per_s'] / speed['reference']['decode_tokens_per_s']:.2f}" if speed else "-"
        lines.append(f"| {r['budget']:g} | {r['variant']} | {plan_text(plan)} "
                     f"| {t['kept_fraction']:.4f} | {e['perplexity']['model']:.3f} | {e['fidelity']['kl_mean']:.3f} "
                     f"| {e['fidelity']['top1_agreement']:.3f} | {px} | {dx} | {r['compress_seconds']:.0f}{gpu_mark(r)} "
                     f"| {r['peak_rss_bytes_during_compression'] / 2**30:.2f} |")
    return "\n".join(lines)


def plan_text(plan):
    """'12 x 0.198' (last N blocks x module budget), 'embedding r384 + 12 x 0.198', or the policy."""
    emb = f"embedding r{plan['embedding']['rank']}" if plan.get("embedding") else ""
    if plan.get("last_blocks"):
        blocks = f"{plan['last_blocks']} x {plan['module_budget']:.3f}"
        return f"{emb} + {blocks}" if emb else blocks
    return emb or f"{plan['policy']}: {plan.get('modules_factorized')} factorized"


BASELINES = ("svd", "svd-llm", "rom-uncentred")  # issue 4's item 1: weight SVD, SVD-LLM (W), the paper's ROM


# llmrom's configurations: the default and its options
OURS = ("rom", "rom-quality", "rom-pair",
        "rom-blocks", "rom-interp", "rom-interp-sparse", "rom-correct", "rom-sparse", "rom-sparse50",
        "rom-sparse-lean", "rom-welore", "rom-welore-sparse", "rom-global", "rom-loss", "rom-loss-nonseq")


def target_table(by_model):
    """Per model and budget: the default (rom) against the best baseline and the target
    (ppl_rom - ppl_dense) <= 0.5 (ppl_best_baseline - ppl_dense), i.e. closing half the gap; and the
    best of llmrom's configurations (OURS) that ran there, against the same target; "not run" for the
    default where only older configurations' rows exist."""
    lines = ["| model | budget | dense | best baseline | target <= | rom (default) | gap closed | met "
             "| best llmrom option | gap closed | met |", "|---|---:|---:|---|---:|---:|---:|---|---|---:|---|"]
    for model, runs in sorted(by_model.items()):
        dense = next((r for r in runs if r["variant"] == "dense"), None)
        if dense is None:
            continue
        d = dense["eval"]["perplexity"]["model"]
        for budget in sorted({r["budget"] for r in runs if r["variant"] != "dense"}, reverse=True):
            at = {r["variant"]: r["eval"]["perplexity"]["model"] for r in runs if r["budget"] == budget}
            base = [(at[v], v) for v in BASELINES if v in at]
            if not base or not any(v in at for v in OURS):
                continue
            best, which = min(base)
            ours, mine = min((at[v], v) for v in OURS if v in at)

            def closed(ppl):
                return (best - ppl) / (best - d) if best > d else float("nan")

            missing = [v for v in BASELINES if v not in at]
            default = (f"{at['rom']:.2f} | {closed(at['rom']):.0%} | {'yes' if closed(at['rom']) >= 0.5 else 'no'}"
                       if "rom" in at else "not run | - | -")
            lines.append(f"| {model} | {budget:g} | {d:.2f} | {which} {best:.2f}"
                         + (f" (not run: {', '.join(missing)})" if missing else "")
                         + f" | {d + 0.5 * (best - d):.2f} | {default} | {mine} {ours:.2f} | {closed(ours):.0%} "
                         f"| {'yes' if closed(ours) >= 0.5 else 'no'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


# rom-blocks (the last N blocks, embedding dense, factor pairs) with one option changed; rom-pair adds the
# embedding to the plan, rom both that and the interpolative factors
OPTIONS = ("rom", "rom-pair", "rom-interp", "rom-uncentred", "rom-nonseq", "rom-correct", "rom-sparse", "rom-sparse-lean")
REFERENCE = run.REFERENCE  # the last N blocks alone; the same-blocks variants use its N


def options_table(by_model):
    """How rom-blocks compares with each variant of OPTIONS over every (model, budget) where both ran:
    geometric mean of perplexity / rom-blocks', and in how many of them rom-blocks is lower (issue 4, item 6)."""
    lines = ["| variant | runs (model, budget) | mean perplexity / rom-blocks' (geometric) | rom-blocks lower in "
             "| where the variant wins |", "|---|---:|---:|---:|---|"]
    for v in OPTIONS:
        pairs = []
        for model, runs in sorted(by_model.items()):
            for budget in sorted({r["budget"] for r in runs}, reverse=True):
                at = {r["variant"]: r["eval"]["perplexity"]["model"] for r in runs if r["budget"] == budget}
                if v in at and REFERENCE in at:
                    pairs.append((model, budget, at[v] / at[REFERENCE]))
        if not pairs:
            continue
        gmean = math.exp(sum(math.log(x) for *_, x in pairs) / len(pairs))
        wins = ", ".join(f"{m} {b:g}" for m, b, x in pairs if x < 1) or "-"
        lower = sum(x > 1 for *_, x in pairs)
        lines.append(f"| {v} | {len(pairs)} | {gmean:.3f} | {lower} of {len(pairs)} | {wins} |")
    return "\n".join(lines) if len(lines) > 2 else ""


HEAL_BEGIN, HEAL_END = "<!-- heal:begin (bench/report.py writes this) -->", "<!-- heal:end -->"


def heal_table(results):
    """One table of every bench/heal.py run committed in `results` (heal_<model>_<budget>.json)."""
    lines = ["| model | budget | healed | mode | perplexity before | after | change | steps | train s | peak RSS GiB |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for f in sorted(Path(results).glob("heal_*.json")):
        r = json.loads(f.read_text())
        for x in r["runs"]:
            lines.append(f"| {r['model']} | {r['budget']:g} | {x['model']} | {x['mode']} | {x['perplexity_before']:.2f} "
                         f"| {x['perplexity_after']:.2f} | {x['perplexity_after'] / x['perplexity_before'] - 1:+.0%} "
                         f"| {x['steps']} | {x['train_seconds']:.0f} | {x['peak_rss_bytes'] / 2**30:.2f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


ABLATION_BEGIN, ABLATION_END = "<!-- ablation:begin (bench/report.py writes this) -->", "<!-- ablation:end -->"


def ablation_section(results):
    """Every bench/ablate.py table under `results`/ablation/<model>_<budget>/, titled, one after another."""
    import ablate
    parts = []
    for root in sorted(p for p in (Path(results) / "ablation").glob("*_*") if p.is_dir()):
        name, budget = root.name.rsplit("_", 1)
        found = ablate.ablation_table(root, name, float(budget))
        if found:
            parts += [f"**{found[0]}** (`bench/results/ablation/{root.name}/`)", "", found[1], ""]
    return "\n".join(parts).rstrip()


def replace_between(text, begin, end, body, where):
    if begin not in text:
        raise SystemExit(f"{where} has no '{begin}' marker; add the markers where the generated part goes")
    return re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{body}\n{end}", text, flags=re.S)


def plot_ppl(by_model, path):
    fig, axes = plt.subplots(1, len(by_model), figsize=(5 * len(by_model), 4), squeeze=False)
    for ax, (model, runs) in zip(axes[0], sorted(by_model.items())):
        dense = [r for r in runs if r["variant"] == "dense"]
        for variant in sorted({r["variant"] for r in runs} - {"dense"}):
            pts = sorted((r["totals"]["kept_fraction"], r["eval"]["perplexity"]["model"])
                         for r in runs if r["variant"] == variant)
            ax.plot(*zip(*pts), marker="o", label=variant)
        if dense:
            ax.axhline(dense[0]["eval"]["perplexity"]["model"], color="k", ls="--", lw=1, label="dense")
        ax.set(title=model, xlabel="fraction of parameters kept", ylabel="perplexity (tutorial, 512)", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ranks(model, runs, path):
    fig, ax = plt.subplots(figsize=(10, 3.5))
    for r in sorted((r for r in runs if r["variant"] == REFERENCE), key=_order):
        xs, per_block = [], defaultdict(list)
        for m in r["modules"]:
            per_block[_block_of(m["name"])].append(m)
        for b, mods in per_block.items():
            xs += [b + j / len(mods) for j in range(len(mods))]
        ax.plot(xs, [m["rank"] or 0 for ms in per_block.values() for m in ms], marker=".", lw=0.8,
                label=f"budget {r['budget']:g}")
    ax.set(title=f"{model}: rank per compressed linear ({REFERENCE}; 0 = kept dense)",
           xlabel="block (linears of a block in execution order within it)", ylabel="rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _block_of(name):
    """The block index in a module name like model.layers.12.mlp.down_proj."""
    return int(re.search(r"\.(\d+)\.", name).group(1))


def plot_explained(model, runs, path):
    from llmrom.loop.pipeline import CURVE_FRACTIONS
    r = max((r for r in runs if r["variant"] == REFERENCE), key=lambda r: len(r["modules"]), default=None)
    if r is None:
        return False
    kinds = defaultdict(list)
    for m in r["modules"]:
        if m["explained_curve"]:
            kinds[m["name"].rsplit(".", 1)[-1]].append(m["explained_curve"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, curves in sorted(kinds.items()):
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(len(CURVE_FRACTIONS))]
        ax.plot(CURVE_FRACTIONS, mean, marker=".", label=f"{kind} ({len(curves)})")
    ax.set(title=f"{model}: output variance explained vs rank (budget {r['budget']:g} run)",
           xlabel="rank / min(d_in, d_out)", ylabel="explained variance", ylim=(0, 1.01))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def protocol_text(by_model):
    runs = [r for rs in by_model.values() for r in rs]
    any_run = next((r for r in runs if not gpu_mark(r)), runs[0])  # a CPU row: the machine of the table
    p, env = any_run["protocol"], any_run["environment"]
    return (f"Protocol: calibration {p['calibration']}; evaluation {p['evaluation']}, perplexity = exp(mean "
            f"next-token cross-entropy); KL(dense || compressed) and top-1 agreement on the first "
            f"{p['fidelity_windows']} evaluation windows; "
            + (f"prefill/decode columns are speed ratios to the dense model measured interleaved in the same process "
               f"({p['speed_rounds']} rounds). " if p["speed_rounds"] else "speed not measured in this run. ")
            + f"Machine: {env['machine']}, "
            f"{env['threads']} threads, torch {env['torch']}, transformers {env['transformers']}, "
            f"llmrom {env['llmrom']}, Python {env.get('python', '?')}; the pydoc calibration text is CPython "
            "3.11.7's topics, shipped with llmrom, and rows record the SHA-256 of their calibration token ids. "
            "Times marked (GPU) were compressed with --device cuda on another machine "
            "(recorded in the row) and evaluated on its CPU.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(HERE / "results" / "runs"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--speed", default=str(HERE / "results" / "speed"), help="bench/speed.py's results (README speed)")
    ap.add_argument("--readme", default=str(HERE.parent / "README.md"), help="README for the headline ('' for none)")
    ap.add_argument("--docs", default=str(HERE.parent / "docs"),
                    help="folder of results.md, healing.md and ablations.md ('' for none)")
    args = ap.parse_args(argv)
    by_model = load_runs(args.runs)
    if not by_model:
        raise SystemExit(f"no results files in {args.runs}; run bench/run.py first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_ppl(by_model, out / "ppl_vs_params.png")
    for model, runs in sorted(by_model.items()):
        if any(r["variant"] == REFERENCE for r in runs):
            plot_ranks(model, runs, out / f"ranks_{model}.png")
            plot_explained(model, runs, out / f"explained_{model}.png")
    summary = results_section(by_model, out, out)
    (out / "summary.md").write_text(summary + "\n")
    if args.docs:
        docs = Path(args.docs)
        write_between(docs / "results.md", BEGIN, END, results_section(by_model, out, docs))
        write_between(docs / "healing.md", HEAL_BEGIN, HEAL_END, heal_table(out))
        write_between(docs / "ablations.md", ABLATION_BEGIN, ABLATION_END, ablation_section(out))
    if args.readme:
        write_between(Path(args.readme), HEADLINE_BEGIN, HEADLINE_END, headline_table(by_model, speed_dir=args.speed))
    print(summary)


def write_between(path, begin, end, body):
    """Replace what lies between the markers of `path` by `body` (nothing to write: left as it is)."""
    if body:
        path.write_text(replace_between(path.read_text(), begin, end, body, path))


def results_section(by_model, out, where):
    """The full results (protocol, targets, option comparison, per-model tables and plots) as Markdown,
    with links to the plots in `out` relative to the folder `where` the text is written to."""
    img = Path(os.path.relpath(out, where)).as_posix()
    mixed = mixed_calibration(by_model)
    parts = [protocol_text(by_model), "", *(mixed + [""] if mixed else []),
             f"![perplexity vs kept parameters]({img}/ppl_vs_params.png)", ""]
    targets = target_table(by_model)
    if targets:
        parts += ["Target of issue 4: the default closes at least half of the perplexity gap between the best "
                  "baseline (plain weight SVD, SVD-LLM's whitened SVD, the paper's uncentred ROM on the same last N "
                  "blocks) and the dense model, at equal or fewer parameters; for the default and for the best of "
                  f"llmrom's option variants that ran ({', '.join(OURS[1:])}).", "", targets, ""]
    options = options_table(by_model)
    if options:
        parts += ["The last N blocks alone in factor pairs (rom-blocks, the default before the embedding and the "
                  "interpolative form took part) against itself with one option changed (same blocks, same "
                  "whole-model budget; rom-interp stores the factors in the interpolative form), against rom-pair, "
                  "which plans the token embedding's share of the cut with N, and against the default rom, which "
                  "does both: above 1 rom-blocks is better.", "",
                  options, ""]
    for model, runs in sorted(by_model.items()):
        parts += [table(model, runs), ""]
        if any(r["variant"] == REFERENCE for r in runs):
            parts += [f"![ranks]({img}/ranks_{model}.png) ![explained variance]({img}/explained_{model}.png)", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
