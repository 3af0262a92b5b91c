"""The public verbs: compress(), save(), load() (re-exported by llmrom)."""

import dataclasses
import logging
import time

from .config import CompressConfig
from .data.textdata import calib_windows
from .errors import LlmromError
from .eval.cost import count_params, gemm_flops_per_second, macs_per_token, peak_rss_bytes
from .loop import distributed
from .loop.pipeline import compress_blocks
from .loop.report import build_report, loop_floor, time_split
from .modeling.arch import layout_for
from .modeling.factorized import FactorizedLinear, JointFactorizedLinear
from .export.quantize import quantize
from .modeling.io import (DTYPES, factorization_meta, load, save as _save_folder,  # noqa: F401  (load is public)
                          save_dtype_for)
from .plan.choose import (check_dense_exportable, choose_plan, linear_shapes,  # noqa: F401  (used by the CLI)
                          planned_shapes)
from .plan.embedding import embedding_shape, factorize_embedding, is_factorized

log = logging.getLogger(__name__)


def compress(model, tokenizer, config: CompressConfig, progress=True, tokens=None):
    """Compress `model` in place with LLM-ROM; returns (model, report dict).

    `tokens` (nsamples x seqlen) overrides the calibration text of the config (used by tests).

    Under torch.distributed (torchrun; llmrom.loop.distributed) every rank calls this with the same model,
    config and windows: rank 0 plans and broadcasts the plan, the embedding and the blocks are calibrated on
    each rank's share of the windows with every moment summed across ranks, and every rank returns the same
    compressed model.
    """
    t0 = time.perf_counter()
    if any(isinstance(m, (FactorizedLinear, JointFactorizedLinear)) for m in model.modules()) or is_factorized(model):
        raise LlmromError("this model is already compressed by llmrom; compress the original (dense) model "
                          "with the lower budget instead")
    layout = layout_for(model)
    # rank 0 alone measures the speed limits (--prefer speed), as it alone plans
    shapes = distributed.on_rank0(lambda: planned_shapes(model, layout, config, progress))
    seconds = {"speed_limits": round(time.perf_counter() - t0, 3)}
    before = {"parameters": count_params(model), "macs_per_token": macs_per_token(model)}
    if tokens is None:
        tokens = calib_windows(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed)
    opts = config.loop_options(progress)
    t = time.perf_counter()
    parallel = distributed.active()  # one plan, made as a single process makes it; the others wait
    plan, emb_rank, plan_info = distributed.on_rank0(
        lambda: choose_plan(model, layout, shapes, before["parameters"], tokens, config, opts))
    seconds["plan"] = round(time.perf_counter() - t, 3)
    opts = dataclasses.replace(opts.for_plan(plan_info), distributed=parallel)
    share = distributed.shard(tokens)
    t = time.perf_counter()
    if emb_rank is not None:  # first, so that every block is calibrated on the factorized embedding's outputs
        plan_info["embedding"].update(factorize_embedding(model, embedding_shape(model), share, emb_rank,
                                                             progress=progress, reduce=parallel))
    seconds["embedding"] = round(time.perf_counter() - t, 3)
    timings, t = {}, time.perf_counter()
    records = compress_blocks(model, layout, share, plan, opts, timings)
    seconds["loop"] = {"total": round(time.perf_counter() - t, 3), **time_split(timings)}
    distributed.check_same_weights(model)
    if "auto" in plan_info:
        seconds["plan_split"] = plan_info["auto"]["seconds_split"]
    after = {"parameters": count_params(model), "macs_per_token": macs_per_token(model)}
    rate = gemm_flops_per_second(opts.device)
    floor = loop_floor(shapes, records, layout.groups, share.numel(), rate, opts.outputs_streamable)  # per process
    report = build_report(config, plan_info, tokens, before, after, records, time.perf_counter() - t0,
                          peak_rss_bytes(), seconds, floor)
    if parallel:
        report["processes"] = {"count": distributed.size(), "backend": distributed.backend(),
                               "windows_per_process": [len(s) for s in tokens.tensor_split(distributed.size())],
                               "note": "rank 0 planned; moments summed across processes; wall and peak RSS are "
                                       "rank 0's, the floor is one process's share"}
    if getattr(model, "llmrom_source", None):  # set by load_model: where the model came from, its stored dtype
        report["source"] = dict(model.llmrom_source)
    for r in records:
        if r.rank is None:
            log.warning("%s", f"{r.name}: {r.note}")
    return model, report


def save(model, tokenizer, out_dir, report, overwrite=False, export_dense=False, dtype=None):
    """Write a compressed model as a standard Hugging Face folder (see llmrom.modeling.io).

    `dtype` of the stored weights: None takes the config's --save-dtype, whose default (auto) is the source
    checkpoint's stored dtype (bfloat16 for a GGUF file; recorded by load_model), else the model's own.
    When the config asks for --quantize, the model is cast to that dtype and quantized in place first.
    """
    cfg = report.get("config", {})
    meta = factorization_meta(model, cfg.get("method", "rom"), cfg.get("centered", False))
    dtype = dtype or save_dtype_for(cfg, report.get("source"), model)
    report["saved_dtype"] = dtype
    if cfg.get("quantize", "none") != "none" and not export_dense:
        names = quantize(model, cfg["quantize"], cfg.get("quant_group_size"), DTYPES[dtype])
        report["quantization"] = {"library": "torchao", "scheme": cfg["quantize"],
                                  "group_size": cfg.get("quant_group_size"), "linears": len(names)}
    return _save_folder(model, tokenizer, out_dir, meta, report, overwrite=overwrite, export_dense=export_dense,
                        dtype=dtype)
