"""The benchmark: models x budgets x method variants, side by side, one results file per run.

    python bench/run.py                       # the three real models, budgets 0.9 0.8 0.7 0.5, all variants
    python bench/run.py --models smollm2-135m --budgets 0.8 --variants rom,svd
    python bench/report.py                    # tables, plots and README's Results section from the files

Protocol (pinned; printed into every file): calibration on CPython 3.11.7's pydoc topics (shipped
with llmrom, the same text on every Python), 128
windows x 128 tokens at seeded random offsets (seed 0; --nsamples 512 is the paper's setting); evaluation on the Python tutorial (Debian
python3.11-doc, disjoint from the calibration text), first 40 non-overlapping windows of 512
tokens, perplexity = exp(mean next-token cross-entropy); fidelity on the first 8 of those windows
against the dense model; speed (off by default) interleaved with the dense model in the same process.

For each budget the rom-blocks variant (the default before the embedding took part) picks the number
of compressed blocks N automatically; the default rom chooses N together with the token embedding's
share of the cut (llmrom.plan.embedding); every other variant compresses rom-blocks' N blocks, embedding
dense, with its module budget solved to meet the same whole-model budget, so rows of one budget
differ only in the method (except svd-llm, which keeps
SVD-LLM's own policy, one ratio for every matrix of every block, and the rank-policy variants
rom-welore and rom-global, which spread the budget over all blocks their own way). Each run starts from a fresh
copy of the dense weights. Runs whose file exists are skipped, so an interrupted benchmark resumes.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import llmrom
from llmrom.plan.choose import linear_shapes
from llmrom.modeling.arch import find_blocks, layout_for
from llmrom.config import CompressConfig
from llmrom.eval.cost import count_params, peak_rss_bytes, reset_peak_rss
from llmrom.errors import LlmromError
from llmrom.eval.evaluate import environment, evaluate
from llmrom.modeling.io import write_json_atomic
from llmrom.plan.ranks import check_budget
from llmrom.data.textdata import calib_windows, tokens_sha256

RESULTS = Path(__file__).parent / "results"
MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")
BUDGETS = (0.9, 0.8, 0.7, 0.5)
PAIR = {"factors": "pair"}  # the paper's factor form; every variant but rom and rom-interp keeps it, as its rows were
VARIANTS = {  # name: CompressConfig fields that differ from the defaults
    # the default before the embedding and the interpolative form, and the reference N of the same-blocks
    # variants: the last N blocks only
    "rom-blocks": {"embedding_budget": 1.0, **PAIR},
    "rom": {},  # the shipped default: joint groups; embedding's share of the cut chosen with N
    "rom-quality": {"prefer": "quality"},  # every linear cut, however slightly (the default before --prefer speed)
    "rom-separate": {"factors": "interpolative"},  # the default before joint groups: each linear alone
    "rom-quality-separate": {"prefer": "quality", "factors": "interpolative"},  # rom-quality, each linear alone
    "rom-pair": PAIR,  # the default before the interpolative form: embedding planned with N, factor pairs
    "rom-interp": {"factors": "interpolative"},  # rom-blocks' blocks and ranks' budget, interpolative factors
    "rom-uncentred": {"centered": False, **PAIR},  # the paper's own form
    "rom-nonseq": {"sequential": False, **PAIR},  # calibrated on the dense model's activations
    "svd": {"method": "svd", "centered": False, "sequential": False, **PAIR},  # data-free weight SVD baseline
    # SVD-LLM (W): whitened SVD, the same ratio for every matrix of every block, dense activations
    "svd-llm": {"method": "whitened_svd", "centered": False, "sequential": False, "last_blocks": "all", **PAIR},
    "rom-correct": {"correct": True, **PAIR},  # calibrated toward the dense model's outputs (methods.rom_corrected)
    "rom-sparse": {"sparse": 0.25, **PAIR},  # a quarter of each module's budget to a sparse residual (factor.sparse)
    "rom-interp-sparse": {"sparse": 0.25},  # the default rom plus that sparse residual
    "rom-sparse50": {"sparse": 0.5, **PAIR},  # half of it
    "rom-sparse-lean": {"sparse": 0.25, "sparse_modules": "lean", **PAIR},  # not on down_proj: memory stays as rom's
    "rom-welore": {"policy": "welore", **PAIR},  # ROM with WeLore's spectrum-based ranks over all blocks
    "rom-welore-sparse": {"policy": "welore", "sparse": 0.25, **PAIR},  # those ranks plus the sparse residual
    "rom-global": {"policy": "global", **PAIR},  # ROM with data-aware ranks over all blocks
    "rom-loss": {"policy": "loss", **PAIR},  # ROM with a module budget per block from measured loss increases
    "rom-loss-nonseq": {"policy": "loss", "sequential": False, **PAIR},  # the same plan, on dense activations
}


MODULE_KEYS = ("name", "d_in", "d_out", "rank", "nnz", "params_before", "params_after", "explained_variance",
               "relative_error", "explained_curve")  # per module in each results file (nnz: sparse residual)


REFERENCE = "rom-blocks"  # chooses N automatically for the blocks alone; same-blocks variants copy its N


def same_blocks(variant):
    """Whether the variant compresses the blocks the reference variant chose, with the embedding dense
    (else it has its own policy: the default rom, rom-pair and rom-interp-sparse, which plan the embedding with the
    blocks, included)."""
    planned = ("rom", "rom-quality", "rom-separate", "rom-quality-separate", "rom-pair", "rom-interp-sparse")
    return variant not in planned and not {"last_blocks", "policy"} & set(VARIANTS[variant])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated models (packaged names or paths)")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--calib", default="pydoc")
    ap.add_argument("--eval", default="python-docs:tutorial")
    ap.add_argument("--nsamples", type=int, default=128,
                    help="calibration windows (the committed results use 128 to fit a 2-core machine; "
                         "512 is the paper's setting and llmrom compress's default, at 4x the time)")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="where blocks are compressed: cpu or cuda[:N] (evaluation "
                                                     "stays on the CPU, so the numbers compare with CPU rows)")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--fidelity-windows", type=int, default=8)
    ap.add_argument("--speed-rounds", type=int, default=0,
                    help="interleaved speed rounds against the dense model (0 skips them: on a shared 2-core "
                         "machine the ratios are noise; measure speed with `llmrom eval` on a quiet machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--last-blocks", type=int,
                    help="compress this many last blocks in every same-blocks variant instead of choosing N "
                         "automatically (ablations hold N fixed)")
    ap.add_argument("--out", default=str(RESULTS / "runs"))
    ap.add_argument("--force", action="store_true", help="re-run runs whose file exists")
    ap.add_argument("--keep-folders", metavar="DIR",
                    help="also save every compressed model as an llmrom folder DIR/<model>_<budget>_<variant> "
                         "(bench/speed.py measures them; default there: out/bench-speed)")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.eval == args.calib:
        ap.error("--eval must be held-out text, different from --calib")
    return args


def benchmark_last_blocks(results, name, budget):
    """N of the benchmark's rom-blocks run of `name` at `budget` (chosen there automatically); exits if
    it has not run."""
    ref = Path(results) / "runs" / f"{name}_{budget:g}_{REFERENCE}.json"
    if not ref.exists():
        raise SystemExit(f"{ref} not found: run bench/run.py for this model and budget first, or give --last-blocks")
    return json.loads(ref.read_text())["plan"]["last_blocks"]


def stem(model):
    return Path(model).name.removesuffix(".gguf") if ("/" in model or model.endswith(".gguf")) else model


def protocol(args):
    return {"calibration": f"{args.calib}: {args.nsamples} windows x {args.seqlen} tokens, seed {args.seed}",
            "evaluation": f"{args.eval}: first {args.eval_windows} windows x {args.eval_seqlen} tokens",
            "fidelity_windows": args.fidelity_windows, "speed_rounds": args.speed_rounds}


def eval_kwargs(args):
    return dict(ppl=args.eval, seqlen=args.eval_seqlen, max_windows=args.eval_windows,
                fidelity_windows=args.fidelity_windows, speed=args.speed_rounds > 0,
                speed_rounds=max(args.speed_rounds, 1), progress=False)


def check_same_calibration(row, tokens, path):
    """Exit if the rows already in the folder were calibrated on other token ids than `tokens`."""
    recorded, here = row.get("calibration_tokens_sha256"), tokens_sha256(tokens)
    if recorded is not None and recorded != here:
        raise SystemExit(f"{path} was calibrated on other token ids (sha256 {recorded[:12]}, here {here[:12]}): the "
                         "calibration text, tokenizer or windows differ, e.g. rows calibrated on pydoc:running elsewhere. "
                         "New rows would not compare with the ones there: write them elsewhere (--out DIR), or "
                         "calibrate on the same text (--calib FILE).")


def run_model(model_name, args, out):
    t0 = time.perf_counter()
    dense, tok = llmrom.load_model(model_name)
    load_seconds = time.perf_counter() - t0
    n_blocks = len(find_blocks(dense)[1])
    tokens = calib_windows(tok, args.calib, args.nsamples, args.seqlen, args.seed)
    name = stem(model_name)
    dense_file = out / f"{name}_dense.json"
    if dense_file.exists() and not args.force:
        dense_res = json.loads(dense_file.read_text())
        check_same_calibration(dense_res, tokens, dense_file)
    else:
        dense_res = {"model": model_name, "variant": "dense", "budget": 1.0, "protocol": protocol(args),
                     "calibration_tokens_sha256": tokens_sha256(tokens),
                     "load_seconds": load_seconds, "eval": evaluate(dense, tok, **eval_kwargs(args)),
                     "environment": environment()}
        write_json_atomic(dense_file, dense_res)
    dense_ppl = dense_res["eval"]["perplexity"]["model"]
    print(f"{name}: dense perplexity {dense_ppl:.3f}", flush=True)
    total, shapes = count_params(dense), linear_shapes(dense, layout_for(dense), True)
    for budget in [float(b) for b in args.budgets.split(",")]:
        last_n = args.last_blocks
        variants = args.variants.split(",")
        try:
            check_budget(budget, total, shapes)
        except LlmromError as e:  # e.g. Gemma-3-270M at 0.5: its embeddings alone are 63% of the model
            variants = [v for v in variants if v in ("rom", "rom-pair")]  # these can cut the embedding too
            print(f"{name} budget {budget:g}: skipped, {e}" + (" (rom, which can cut the embedding, is tried)"
                                                                if variants else ""), flush=True)
        for variant in variants:
            path = out / f"{name}_{budget:g}_{variant}.json"
            if path.exists() and not args.force:
                if same_blocks(variant):
                    last_n = last_n or json.loads(path.read_text())["plan"]["last_blocks"]
                continue
            fields = {"budget": budget, "calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen,
                      "seed": args.seed, "batch_size": args.batch_size, "device": args.device,
                      **VARIANTS[variant]}
            if fields.get("last_blocks") == "all":
                fields["last_blocks"] = n_blocks
            elif same_blocks(variant):
                fields["embedding_budget"] = 1.0
                reference = out / f"{name}_{budget:g}_{REFERENCE}.json"  # also when it is not among --variants
                if last_n is None and reference.exists():
                    last_n = json.loads(reference.read_text())["plan"]["last_blocks"]
                if last_n is not None:
                    fields["last_blocks"] = last_n
            cfg = CompressConfig(**fields)
            model = copy.deepcopy(dense)
            reset_peak_rss()
            t1 = time.perf_counter()
            try:
                model, report = llmrom.compress(model, tok, cfg, tokens=tokens, progress=sys.stderr.isatty())
            except LlmromError as e:  # a budget not even the embedding's share reaches
                print(f"{name} budget {budget:g} {variant}: skipped, {e}", flush=True)
                continue
            seconds, rss = time.perf_counter() - t1, peak_rss_bytes()
            if same_blocks(variant):
                last_n = last_n or report["plan"]["last_blocks"]
            res = evaluate(model, tok, reference=dense, reference_perplexity=dense_ppl, **eval_kwargs(args))
            row = {"model": model_name, "variant": variant, "budget": budget, "protocol": protocol(args),
                   "config": report["config"], "plan": report["plan"], "totals": report["totals"],
                   "calibration_tokens_sha256": report["calibration_tokens_sha256"],
                   "compress_seconds": seconds, "peak_rss_bytes_during_compression": rss,
                   "peak_rss_note": "whole process: includes the dense model kept resident for evaluation",
                   "modules": [{k: m.get(k) for k in MODULE_KEYS} for m in report["modules"]],
                   "eval": res, "environment": environment()}
            write_json_atomic(path, row)
            if args.keep_folders:
                llmrom.save(model, tok, Path(args.keep_folders) / f"{name}_{budget:g}_{variant}", report,
                            overwrite=True)
            print(f"{name} budget {budget:g} {variant}: kept {report['totals']['kept_fraction']:.4f}, "
                  f"perplexity {res['perplexity']['model']:.3f}, KL {res['fidelity']['kl_mean']:.4f}, "
                  f"{seconds:.0f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)
            del model
    del dense


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model_name in args.models.split(","):
        run_model(model_name, args, out)


if __name__ == "__main__":
    main()
