"""Compress a checkpoint block by block, never holding the whole model in memory.

The source is a safetensors folder (sharded or not) or a GGUF file (a path, a folder holding one, or
a packaged model name). A GGUF file is read tensor by tensor: each tensor is dequantized when its
module needs it, with transformers' own name mapping and per-tensor processing
(ggufcheckpoint.py), so the values equal those of `from_pretrained(..., gguf_file=...)` without
ever dequantizing the whole model. Both sources answer the same interface (`Checkpoint`).

The model is a skeleton on the meta device (rotary and other buffers are built for real, on the
CPU); its config is the folder's config.json or the GGUF metadata, read as transformers reads it.
Parameters outside the blocks are read only when a module runs during the capture of block 0's
inputs (the embeddings), then released; then each block is read from the checkpoint, compressed
by the same step as in-memory runs (`pipeline.compress_block`), written as its own shard, and
released. The tensors outside the blocks (embeddings, final norm, head) are copied
into the last shard one at a time. The folder is the one `llmrom.save` writes (same loader,
identical logits); its shards are one per block.

With `--budget` alone the automatic last-N plan is chosen first by one more streamed pass over the blocks
(streamplan.py), and kept in the journal. With `--export dense` each block's compressed linears are written
merged, in the original architecture.

Everything happens in a hidden partial folder beside the output, with a journal: after each block,
the block's shard, the hidden states after it (activations.py) and the records are on disk before
the journal says the block is done. `--resume` continues from the last finished block and gives
the same folder as an uninterrupted run. Only the final rename makes the output folder appear.
"""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from .activations import FILES, DiskStore, MemoryStore, parse_dtype, read_record
from ..plan.choose import check_dense_exportable, choose_plan, planned_shapes
from .report import build_report, loop_floor, time_split
from ..modeling.arch import layout_for
from ..eval.cost import count_params, gemm_flops_per_second, macs_per_token, peak_rss_bytes, return_free_memory
from ..errors import LlmromError
from ..modeling.factorized import FORMAT_VERSION, apply_factorization
from .ggufcheckpoint import GgufCheckpoint
from ..modeling.io import (DTYPES, base_architecture, check_output, factorization_meta, finish_folder,
                          factorized_linears, is_llmrom_folder, joint_meta, merge_into, original_skeleton,
                          stored_dtype)
from .checkpoint import Checkpoint, build_skeleton, capture, materialize, release, resident_parameters, tied_names
from .pipeline import ModuleRecord, compress_block
from .streamplan import StreamedProxy
from ..modeling.shards import cast_entries, shard_name, tensor_entries, write_index, write_shard
from ..data.textdata import tokens_sha256

log = logging.getLogger(__name__)
JOURNAL_NAME = "journal.json"


class Partial:
    """The hidden folder a streaming run writes into, its lock and its journal."""

    def __init__(self, out):
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}.llmrom-partial"
        self.journal = None
        self._lock = None

    def open(self, fingerprint, resume):
        if resume:
            if not (self.path / JOURNAL_NAME).is_file():
                raise LlmromError(f"nothing to resume for {self.out}: {self.path} holds no interrupted run; "
                                  "run without --resume")
            self._take_lock()
            self.journal = json.loads((self.path / JOURNAL_NAME).read_text())
            for key, value in fingerprint.items():
                if self.journal["fingerprint"].get(key) != value:
                    self.close()
                    raise LlmromError(f"--resume: the interrupted run in {self.path} had a different {key}; "
                                      "resume with the same model and options, or delete that folder to start over")
            self.commit(sessions=self.journal["sessions"] + 1)
            return self.journal
        try:
            self.path.mkdir(parents=True)
        except FileExistsError:
            raise LlmromError(f"{self.path} holds an interrupted run for {self.out}; pass --resume to continue it, "
                              "or delete that folder to start over") from None
        self._take_lock()
        self.journal = {"fingerprint": fingerprint, "blocks_done": 0, "hidden": None, "hidden_shapes": None,
                        "hidden_dtype": None, "groups": None, "records": [], "modules": {}, "joint": {},
                        "weight_map": {}, "total_size": 0, "timings": {}, "wall_seconds": 0.0, "peak_rss_bytes": 0,
                        "sessions": 1}
        self.commit()
        return self.journal

    def saved_plan(self):
        """(plan, plan record) that the interrupted run in this folder chose, or None: a resume reuses them
        instead of planning again (the fingerprint still checks the model, options and windows)."""
        path = self.path / JOURNAL_NAME
        if not path.is_file():
            return None
        journal = json.loads(path.read_text())
        return (journal["plan"], journal["plan_info"]) if journal.get("plan") is not None else None

    def _take_lock(self):
        self._lock = open(self.path / "lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise LlmromError(f"another llmrom run is writing {self.path}; wait for it to finish or stop it") from None

    def commit(self, **updates):
        """Update the journal on disk atomically (temporary file, fsync, rename)."""
        self.journal.update(updates)
        tmp = self.path / f".{JOURNAL_NAME}.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(self.journal, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / JOURNAL_NAME)

    def close(self):
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _check_source(source):
    """The safetensors folder or the .gguf file to stream (a packaged model name gives its GGUF file)."""
    folder = Path(os.path.expanduser(str(source)))
    if not folder.exists():
        from ..modeling.packaged import PACKAGED_MODELS, resolve_packaged
        if str(source) in PACKAGED_MODELS:
            folder = resolve_packaged(str(source))
    if folder.is_file():
        if folder.suffix != ".gguf":
            raise LlmromError(f"{source} is a file but not a .gguf; --stream reads a safetensors folder or a GGUF "
                              "file")
        return folder
    if folder.is_dir() and not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if ggufs:
            raise LlmromError(f"{folder} holds {len(ggufs)} .gguf files; pass --gguf-file NAME or the file's path")
    if not (folder / "config.json").is_file():
        raise LlmromError(f"{source} is neither a local Hugging Face folder with config.json nor a .gguf file; "
                          "--stream needs one (download the model first, or drop --stream)")
    if is_llmrom_folder(folder):
        raise LlmromError("this model is already compressed by llmrom; compress the original (dense) model "
                          "with the lower budget instead")
    return folder


def _check_stream_plan(config):
    if getattr(config, "policy", "last-blocks") != "last-blocks":
        raise LlmromError(f"--stream supports the last-blocks policy only (--policy {config.policy} profiles the "
                          "whole dense model); drop --policy (the automatic last-N choice streams), or give "
                          "--last-blocks N or --ranks-file")
    if config.embedding_budget is not None and config.embedding_budget < 1:
        raise LlmromError("--stream keeps the token embedding dense (it factorizes blocks only); drop "
                          "--embedding-budget or compress without --stream")


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _fingerprint(folder, config, tokens, plan, export_dense=False):
    cfg = {k: v for k, v in config.to_dict().items() if k != "activations"}  # where they live changes nothing
    return {"source": str(folder.resolve()), "config": cfg, "llmrom_version": __version__,
            "export": "dense" if export_dense else "factorized",
            "tokens_sha256": tokens_sha256(tokens),
            "plan_sha256": _sha256(json.dumps(plan, sort_keys=True).encode())}


def _open_store(config, part, journal, hidden):
    """The activation store: from the block-0 hidden states (fresh run) or from the journal (resume)."""
    dtype = parse_dtype(config.activations_dtype)
    if hidden is not None:
        if config.activations == "disk":
            store = DiskStore.create(part.path, hidden, dtype)
            hidden.clear()
            return store
        return MemoryStore(hidden, dtype)
    shapes, dtype = [tuple(s) for s in journal["hidden_shapes"]], DTYPES[journal["hidden_dtype"]]
    if config.activations == "disk":
        return DiskStore(part.path, shapes, dtype, journal["hidden"])
    offset, tensors = 0, []
    with open(part.path / journal["hidden"], "rb") as f:
        for s in shapes:
            t = read_record(f, offset, s, dtype)
            offset += t.numel() * t.element_size()
            tensors.append(t)
    return MemoryStore(tensors, dtype)


@torch.no_grad()  # not torch.set_grad_enabled(False): the caller's grad mode is left as it was
def compress_streaming(source, out_dir, config, *, resume=False, overwrite=False, tokens=None, tokenizer=None,
                       progress=True, monitor=None, max_blocks=None, export_dense=False):
    """Compress `source` (a safetensors folder, a .gguf file or a packaged model name) into `out_dir`
    block by block; returns the report. `export_dense` writes each block's compressed linears merged back
    into one weight each, in the original architecture (`--export dense`: no size saving, any loader).

    `tokens` (nsamples x seqlen) overrides the calibration text (tests); `monitor(event, model, resident)` is
    called after every load and release (tests count resident parameters with it); `max_blocks`
    stops after that many blocks, leaving a run to `resume` (benchmarks), and returns None.
    """
    t0 = time.perf_counter()
    folder, out = _check_source(source), Path(out_dir)
    check_output(out, overwrite)
    _check_stream_plan(config)
    if config.quantize != "none":
        raise LlmromError("--quantize is not supported with --stream yet; compress with --stream, then quantize "
                          "the folder in memory if it fits, or drop --quantize")
    if getattr(config, "correct", False):
        raise LlmromError("--correct is not supported with --stream yet (the resume journal keeps one copy of the "
                          "hidden states, correction needs the dense ones too); drop --stream or --correct")
    ckpt = GgufCheckpoint(folder) if folder.is_file() else Checkpoint(folder)  # refuses what it cannot read
    save = config.save_dtype if config.save_dtype != "auto" else \
        stored_dtype(*((folder.parent, folder.name) if folder.is_file() else (folder,)))
    skeleton = build_skeleton(folder, DTYPES[config.dtype])
    if folder.is_file():
        ckpt.bind(skeleton)
    ties = tied_names(skeleton)
    layout = layout_for(skeleton)
    blocks = skeleton.get_submodule(layout.blocks_path)
    n = len(blocks)
    original = None  # with export_dense: the original architecture, whose module classes the merged weights take
    if export_dense:
        if config.centered:
            check_dense_exportable(skeleton)
        original = original_skeleton(skeleton, base_architecture(skeleton))
    shapes = planned_shapes(skeleton, layout, config, progress)
    before = {"parameters": count_params(skeleton), "macs_per_token": macs_per_token(skeleton)}
    if tokenizer is None:
        tokenizer = _tokenizer(folder, needed=tokens is None)
    if tokens is None:
        from ..data.textdata import calib_windows
        tokens = calib_windows(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed)
    opts = config.loop_options(progress)
    t = time.perf_counter()
    def make_proxy(max_ranks, profile, held, plans):  # the automatic choice, one block resident at a time
        return StreamedProxy(skeleton, layout, ckpt, ties, max_ranks, profile, held, plans, opts)
    part = Partial(out)
    saved = part.saved_plan() if resume else None  # a resumed run keeps the plan its first session chose
    if saved is None:
        plan, _, plan_info = choose_plan(skeleton, layout, shapes, before["parameters"], tokens, config, opts,
                                         make_proxy)
    else:
        plan, plan_info = saved
    plan_seconds = round(time.perf_counter() - t, 3)
    opts = opts.for_plan(plan_info)
    monitor = monitor or (lambda event, model, resident: None)

    journal = part.open(_fingerprint(folder, config, tokens, plan, export_dense), resume)
    if not resume:
        part.commit(plan=plan, plan_info=plan_info, plan_seconds=plan_seconds)
    plan_seconds = journal.get("plan_seconds", plan_seconds)  # the session that planned
    try:
        start = journal["blocks_done"]
        timings = defaultdict(float, journal["timings"])
        records = [ModuleRecord(**r) for r in journal["records"]]
        groups = tuple(tuple(g) for g in journal["groups"]) if journal["groups"] else layout.groups
        apply_factorization(skeleton, {"format_version": FORMAT_VERSION, "modules": journal["modules"],
                                       "joint": journal.get("joint", {})}, device="meta")
        stop = n if max_blocks is None else min(n, start + max_blocks)
        if start < n:
            t = time.perf_counter()
            calls, hidden, resident = capture(skeleton, blocks, tokens, opts, ckpt, ties, with_hidden=start == 0)
            monitor("capture", skeleton, resident)
            store = _open_store(config, part, journal, hidden)
            timings["capture"] += time.perf_counter() - t
            if start == 0:
                part.commit(hidden_shapes=store.shapes, hidden_dtype=str(store.dtype).removeprefix("torch."))
            try:
                for i in tqdm(range(start, stop), initial=start, total=n, desc="blocks", unit="block",
                              disable=not progress):
                    groups = _one_block(skeleton, blocks, i, n, layout, groups, calls, store, plan, opts, ckpt, ties,
                                        part, records, timings, monitor, t0, DTYPES[save], original)
            finally:
                if isinstance(store, DiskStore):
                    store.close()
        if stop < n:
            _session_end(part, timings, t0)
            return None
        rate = gemm_flops_per_second(opts.device)
        floor = loop_floor(shapes, records, groups, tokens.numel(), rate, opts.outputs_streamable)
        report = _finish(skeleton, tokenizer, folder, out, part, ckpt, ties, layout, n, config, plan_info, tokens,
                         before, records, timings, t0, save, {"plan": plan_seconds, "floor": floor},
                         export_dense)
    finally:
        part.close()
    return report


def _tokenizer(folder, needed):
    from transformers import AutoTokenizer
    if folder.is_file():  # a GGUF file carries its tokenizer
        try:
            return AutoTokenizer.from_pretrained(folder.parent, gguf_file=folder.name)
        except (ValueError, OSError) as e:
            if needed:
                raise LlmromError(f"cannot read the tokenizer of {folder}: {str(e).splitlines()[0]}") from None
            return None
    if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return AutoTokenizer.from_pretrained(folder)
    if needed:
        raise LlmromError(f"{folder} has no tokenizer to make the calibration windows; add one to the folder")
    return None


def _one_block(skeleton, blocks, i, n, layout, groups, calls, store, plan, opts, ckpt, ties, part, records,
               timings, monitor, t0, save_dtype, original=None):
    """Read, compress, write and release block i, then record it in the journal. With `original` (the
    original architecture's skeleton: --export dense) its factorized linears are written merged."""
    block, prefix = blocks[i], f"{layout.blocks_path}.{i}."
    t = time.perf_counter()
    materialize(block, prefix, ckpt, ties)
    timings["read"] += time.perf_counter() - t
    monitor("block loaded", skeleton, resident_parameters(skeleton))
    block.to(opts.device)
    done, groups = compress_block(block, prefix, i, groups, calls, store, plan, opts, timings, mlp_half=layout.mlp_half)
    store.end_block()
    block.to("cpu")
    monitor("block compressed", skeleton, resident_parameters(skeleton))
    t = time.perf_counter()
    name = shard_name(i + 2, n + 1)  # shard 1 holds the tensors outside the blocks, written last
    state = block.state_dict(prefix=prefix)
    if original is not None:
        for r in done:
            if r.rank is not None:
                merge_into(state, skeleton, r.name, original.get_submodule(r.name))
    nbytes = write_shard(part.path / name, cast_entries(tensor_entries(state), save_dtype))
    written = list(state)
    del state
    release(block)
    return_free_memory()
    timings["write"] += time.perf_counter() - t
    monitor("block released", skeleton, resident_parameters(skeleton))
    t = time.perf_counter()
    hidden = store.snapshot(part.path, avoid=part.journal["hidden"]) if i + 1 < n else part.journal["hidden"]
    timings["activations"] += time.perf_counter() - t
    records.extend(done)
    modules = dict(part.journal["modules"])
    modules.update(factorized_linears(block, prefix))
    joint = {**part.journal.get("joint", {}), **joint_meta(block, prefix)}
    weight_map = dict(part.journal["weight_map"])
    weight_map.update({k: name for k in written})
    part.commit(blocks_done=i + 1, hidden=hidden, groups=[list(g) for g in groups],
                records=[r.to_dict() for r in records], modules=modules, joint=joint, weight_map=weight_map,
                total_size=part.journal["total_size"] + nbytes, timings=dict(timings))
    return groups


def _session_end(part, timings, t0):
    part.commit(timings=dict(timings), wall_seconds=part.journal["wall_seconds"] + time.perf_counter() - t0,
                peak_rss_bytes=max(part.journal["peak_rss_bytes"], peak_rss_bytes()))


def _outside_entries(skeleton, layout, ckpt, ties):
    """write_shard entries for the tensors outside the blocks, each read from `ckpt` when written."""
    entries, seen = [], set()
    buffers = dict(skeleton.named_buffers())
    for key, value in skeleton.state_dict().items():
        if key.startswith(layout.blocks_path + ".") or key in seen:
            continue
        seen.update(ties.get(key, [key]))
        src = next((a for a in ties.get(key, [key]) if a in ckpt), None)
        if src is not None:
            entries.append((key, value.dtype, tuple(value.shape), lambda s=src, d=value.dtype: ckpt.read({s: d})[s]))
        elif key in buffers and buffers[key].device.type != "meta":
            entries.append((key, value.dtype, tuple(value.shape), lambda b=buffers[key]: b))
        else:
            raise LlmromError(f"{ckpt.folder} lacks the tensor {key}: the checkpoint does not match {ckpt.config_source}")
    return entries


def _finish(skeleton, tokenizer, folder, out, part, ckpt, ties, layout, n, config, plan_info, tokens, before,
            records, timings, t0, save_dtype, extra, export_dense=False):
    """Write the shard of the tensors outside the blocks, the index and the rest; rename into place."""
    t = time.perf_counter()
    name = shard_name(1, n + 1)
    entries = cast_entries(_outside_entries(skeleton, layout, ckpt, ties), DTYPES[save_dtype])
    nbytes = write_shard(part.path / name, entries)
    weight_map = {k: name for k, *_ in entries}
    weight_map.update(part.journal["weight_map"])
    write_index(part.path, weight_map, part.journal["total_size"] + nbytes)
    timings["write"] += time.perf_counter() - t
    _session_end(part, timings, t0)
    skeleton.tie_weights()  # releasing the embeddings untied them from the head; count tied weights once
    after = {"parameters": count_params(skeleton), "macs_per_token": macs_per_token(skeleton)}
    report = build_report(config, plan_info, tokens, before, after, records, part.journal["wall_seconds"],
                          part.journal["peak_rss_bytes"], {"plan": extra["plan"], "loop": time_split(timings)},
                          extra["floor"])
    for r in records:
        if r.rank is None:
            log.warning("%s", f"{r.name}: {r.note}")
    report["saved_dtype"] = save_dtype
    report["streaming"] = {"source": str(folder), "activations": config.activations,
                           "sessions": part.journal["sessions"]}
    for f in (*FILES, JOURNAL_NAME, "lock"):
        (part.path / f).unlink(missing_ok=True)
    meta = factorization_meta(skeleton, config.method, config.centered)
    finish_folder(part.path, out, skeleton, tokenizer, meta, report, export_dense, dtype=save_dtype)
    return report


def discard(out):
    """Delete the partial folder of an interrupted run for `out` (benchmarks)."""
    shutil.rmtree(Partial(out).path, ignore_errors=True)
