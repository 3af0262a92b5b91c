"""Command line: parsing only; the work is done by llmrom.api. User errors print one line, exit 2."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import CompressConfig, config_fields
from .errors import LlmromError

log = logging.getLogger("llmrom")


def _add_config_options(p):
    for name, default, help_text in config_fields():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = {"budget": float, "module_budget": float, "last_blocks": int, "nsamples": int,
                    "seqlen": int, "seed": int, "batch_size": int}.get(name, str)
            p.add_argument(flag, type=kind, default=default,
                           help=f"{help_text} (default: {default})" if default is not None else help_text)


def build_parser():
    from .packaged import PACKAGED_MODELS
    parser = argparse.ArgumentParser(prog="llmrom", description=__doc__.splitlines()[0].split(":")[0] + ": "
                                     "compress Hugging Face causal LMs by reduced-order modelling (LLM-ROM).")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging verbosity (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save a loadable Hugging Face folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("model", help="a Hugging Face folder, a .gguf file, a hub id, or a packaged model: "
                                 + ", ".join(sorted(PACKAGED_MODELS)))
    c.add_argument("--out", required=True, help="output folder (written atomically; must not exist)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.add_argument("--gguf-file", help="GGUF file name inside the MODEL folder")
    c.add_argument("--export", choices=["factorized", "dense"], default="factorized",
                   help="factorized: the compact two-linear form; dense: merged weights in the original "
                        "architecture, for engines that need standard layers (no size saving on disk)")
    c.add_argument("--eval", metavar="SOURCE", help="also report perplexity before and after on this held-out "
                                                    "text (e.g. python-docs:tutorial)")
    c.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window")
    c.add_argument("--eval-windows", type=int, default=40, help="number of evaluation windows (first N)")
    _add_config_options(c)

    i = sub.add_parser("info", help="show the ranks and savings of a compressed folder")
    i.add_argument("folder", help="a folder written by `llmrom compress`")
    i.add_argument("--json", action="store_true", help="print the whole report as JSON")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"compress": cmd_compress, "info": cmd_info}[args.command](args)
    except LlmromError as e:
        print(f"llmrom: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `llmrom info DIR | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("llmrom: interrupted; no output folder was written", file=sys.stderr)
        return 130


def cmd_compress(args):
    import torch

    from . import api
    from .io import check_output, load_model
    from .perplexity import perplexity
    from .textdata import eval_windows, load_text

    cfg = CompressConfig(**{name: getattr(args, name) for name, _, _ in config_fields()})
    out = Path(args.out)
    check_output(out, args.overwrite)
    eval_text = load_text(args.eval) if args.eval else None
    if eval_text is not None and args.eval == cfg.calib:
        raise LlmromError("--eval must be held-out text, different from --calib")
    torch.set_grad_enabled(False)
    log.info("loading %s", args.model)
    model, tokenizer = load_model(args.model, args.gguf_file, cfg.dtype)
    ppl = {}
    if eval_text is not None:
        windows = eval_windows(tokenizer, eval_text, args.eval_seqlen, args.eval_windows)
        ppl["before"] = perplexity(model, windows, progress=True)
        log.info("perplexity before: %.3f", ppl["before"])
    if args.export == "dense" and cfg.centered:
        api.check_dense_exportable(model)
    model, report = api.compress(model, tokenizer, cfg)
    if eval_text is not None:
        ppl["after"] = perplexity(model, windows, progress=True)
        report["evaluation"] = {"source": args.eval, "seqlen": args.eval_seqlen, "windows": len(windows),
                                "protocol": "non-overlapping windows, exp(mean next-token cross-entropy)",
                                "perplexity_before": ppl["before"], "perplexity_after": ppl["after"]}
    api.save(model, tokenizer, out, report, overwrite=args.overwrite, export_dense=args.export == "dense")
    t = report["totals"]
    print(f"parameters: {t['parameters_before']:,} -> {t['parameters_after']:,} "
          f"(kept {t['kept_fraction']:.4f}, budget {cfg.budget})")
    print(f"plan: {_plan_line(report['plan'])}")
    if ppl:
        print(f"perplexity on {args.eval} ({len(windows)} x {args.eval_seqlen} tokens): "
              f"{ppl['before']:.3f} -> {ppl['after']:.3f}")
    print(f"wall time {t['wall_seconds']:.0f} s, peak RSS {t['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"saved to {out} ({'dense export' if args.export == 'dense' else 'factorized'})")
    return 0


def _plan_line(plan):
    if "last_blocks" in plan:
        return f"{plan['policy']}: last {plan['last_blocks']} blocks at module budget {plan['module_budget']:.4f}"
    return plan["policy"]


def cmd_info(args):
    from .io import REPORT_NAME, is_llmrom_folder
    folder = Path(args.folder)
    if not (folder / REPORT_NAME).is_file():
        kind = "an llmrom folder without its report" if is_llmrom_folder(folder) else "not an llmrom folder"
        raise LlmromError(f"{folder} is {kind} ({REPORT_NAME} missing); give a folder written by `llmrom compress`")
    report = json.loads((folder / REPORT_NAME).read_text())
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    t = report["totals"]
    print(f"{folder}: {t['parameters_before']:,} -> {t['parameters_after']:,} parameters "
          f"(kept {t['kept_fraction']:.4f}); MACs/token {t['macs_per_token_before']:,} -> {t['macs_per_token_after']:,}")
    print(f"plan: {_plan_line(report['plan'])}; method {report['config']['method']}, "
          f"centered={report['config']['centered']}, sequential={report['config']['sequential']}")
    if "evaluation" in report:
        e = report["evaluation"]
        print(f"perplexity on {e['source']}: {e['perplexity_before']:.3f} -> {e['perplexity_after']:.3f}")
    print(f"{'module':<45} {'d_out x d_in':>13} {'rank':>6} {'params':>17} {'expl.var':>8} {'rel.err':>7}")
    for m in report["modules"]:
        rank = "dense" if m["rank"] is None else m["rank"]
        ev = "-" if m["explained_variance"] is None else f"{m['explained_variance']:.4f}"
        er = "-" if m["relative_error"] is None else f"{m['relative_error']:.4f}"
        print(f"{m['name']:<45} {m['d_out']:>6}x{m['d_in']:<6} {rank:>6} "
              f"{m['params_before']:>8}->{m['params_after']:<8} {ev:>8} {er:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
