"""Reading models in (HF folder, hub id, GGUF file, packaged real model) and writing folders out.

A saved folder is a standard Hugging Face folder: safetensors shards, config.json (original config
plus `llmrom` metadata and an `auto_map` to the self-contained `llmrom_modeling.py`), tokenizer,
generation config, `llmrom_report.json` and a model card (README.md). It is written into a hidden
temporary sibling and renamed into place at the end, so an interrupted run never leaves a folder that
looks complete.
"""

import inspect
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import factorized
from .card import write_card
from ..errors import LlmromError
from .factorized import (EMBEDDING_FORMAT_VERSION, FORMAT_VERSION, INTERP_FORMAT_VERSION, JOINT_FORMAT_VERSION,
                         SPARSE_FORMAT_VERSION, FactorizedEmbedding, FactorizedHead, FactorizedLinear,
                         JointFactorizedLinear, JointPart, make_factorized_class)

log = logging.getLogger(__name__)
REPORT_NAME = "llmrom_report.json"
MODELING_NAME = "llmrom_modeling.py"
SHARD_BYTES = 2 * 1024**3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(source, gguf_file=None, dtype="float32"):
    """(model, tokenizer) from a local folder, a .gguf path, a packaged model name or a hub id."""
    torch_dtype = DTYPES[dtype]
    path = Path(os.path.expanduser(source))
    if not path.exists():
        from .packaged import PACKAGED_MODELS, resolve_packaged
        if source in PACKAGED_MODELS:
            path = resolve_packaged(source)
        elif source.startswith((".", "/", "~")) or source.endswith(".gguf") or source.count("/") > 1:
            raise LlmromError(f"model path {source} does not exist; give a Hugging Face folder, a .gguf file, "
                              f"a hub id, or one of the packaged models {sorted(PACKAGED_MODELS)}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise LlmromError(f"{source} is a file but not a .gguf; give the model's folder instead")
        path, gguf_file = path.parent, path.name
    if path.is_dir() and gguf_file is None and not (path / "config.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise LlmromError(f"{path} has no config.json and {len(ggufs)} .gguf files {ggufs[:5]}; "
                              "pass --gguf-file NAME or a folder with config.json")
        gguf_file = ggufs[0]
    if path.is_dir() and gguf_file is None and is_llmrom_folder(path):
        return load(path, dtype=torch_dtype)
    where = str(path) if path.exists() else source
    try:
        stored = stored_dtype(where, gguf_file)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf_file, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf_file)
    except ValueError as e:
        raise LlmromError(f"cannot load {source} as a causal LM: {str(e).splitlines()[0]}") from None
    except OSError as e:
        from .packaged import PACKAGED_MODELS
        raise LlmromError(f"cannot load {source}: {str(e).splitlines()[0]} (no network? give a local folder, a "
                          f".gguf file, or a packaged model: {', '.join(sorted(PACKAGED_MODELS))})") from None
    _forget_gguf_quantization(model)
    model.llmrom_source = {"model": str(source), "gguf_file": gguf_file, "dtype": stored}  # read by compress()
    return model.eval(), tokenizer


def stored_dtype(where, gguf_file=None):
    """The float dtype a checkpoint is stored in, read without its weights: bfloat16 for a (quantized)
    GGUF file, else config.json's dtype (float32 when it names none)."""
    if gguf_file is not None:
        return "bfloat16"
    dtype = getattr(AutoConfig.from_pretrained(where), "dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in DTYPES else "float32"


def save_dtype_for(config_dict, source, model):
    """The dtype a folder is saved in: --save-dtype unless auto; else the source's stored dtype; else the
    model's own."""
    asked = (config_dict or {}).get("save_dtype", "auto")
    if asked != "auto":
        return asked
    return (source or {}).get("dtype") or str(next(model.parameters()).dtype).removeprefix("torch.")


def _forget_gguf_quantization(model):
    """A GGUF model is fully dequantized on load; drop the marker that makes it refuse to serialize."""
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if str(getattr(method, "value", method)) != "gguf":
            raise LlmromError("quantized checkpoints other than GGUF are not supported; load a float checkpoint")
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False


def is_llmrom_folder(path):
    cfg = Path(path) / "config.json"
    return cfg.exists() and "llmrom" in json.loads(cfg.read_text())


def load(folder, dtype=None, device=None):
    """Load a folder written by llmrom.save: (model, tokenizer), identical logits to the saved model."""
    folder = Path(folder)
    if not is_llmrom_folder(folder):
        raise LlmromError(f"{folder} is not an llmrom folder (no config.json with llmrom metadata)")
    config = AutoConfig.from_pretrained(folder)
    base_name = config.llmrom["base_architecture"]
    base = getattr(transformers, base_name, None)
    if base is None:
        raise LlmromError(f"{folder} needs transformers.{base_name}, which this transformers "
                          f"{transformers.__version__} lacks; upgrade transformers")
    cls = make_factorized_class(base)
    kwargs = {"dtype": dtype or "auto"}
    if device is not None:
        kwargs["device_map"] = device
    model = cls.from_pretrained(folder, **kwargs)
    has_tokenizer = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    if not has_tokenizer:
        log.warning("%s holds no tokenizer; returning None for it", folder)
    return model.eval(), AutoTokenizer.from_pretrained(folder) if has_tokenizer else None


def module_meta(m):
    """The metadata of one FactorizedLinear: rank, bias, nnz when it has a sparse residual, interp when
    its factors are in the interpolative form."""
    spec = {"rank": m.rank, "bias": m.bias is not None}
    if m.nnz:
        spec["nnz"] = m.nnz
    if m.interp:
        spec["interp"] = m.interp
    return spec


def joint_meta(model, prefix=""):
    """{first member: its group's metadata} of every JointFactorizedLinear in `model`, names prefixed."""
    parts = {}
    for n, m in model.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(m, JointPart):
            parts.setdefault(id(m.joint), {})[m.index] = n
    joint = {}
    for n, m in model.named_modules(prefix=prefix.rstrip(".")):
        if isinstance(m, JointFactorizedLinear):
            others = parts.get(id(m), {})
            joint[n] = {"members": [n] + [others[i] for i in range(1, len(m.sizes))], "sizes": list(m.sizes),
                        **module_meta(m.stacked)}
    return joint


def factorized_linears(model, prefix=""):
    """{name: module_meta} of the FactorizedLinear modules of `model` (names prefixed) that stand for one
    linear; the stacked maps of joint groups are in joint_meta."""
    stacked = {id(m.stacked) for m in model.modules() if isinstance(m, JointFactorizedLinear)}
    return {n: module_meta(m) for n, m in model.named_modules(prefix=prefix.rstrip("."))
            if isinstance(m, FactorizedLinear) and id(m) not in stacked}


def base_architecture(model):
    """The transformers class name of `model`'s architecture (under a loaded folder's Llmrom* subclass)."""
    base = type(model)
    while base.__name__.startswith("Llmrom"):
        base = base.__bases__[0]
    return base.__name__


def factorization_meta(model, method, centered):
    """`config.llmrom`. The lowest format version that holds what the model has: 1 (low-rank factors),
    2 (a sparse residual), 3 (a factorized embedding), 4 (interpolative factors), 5 (joint groups), so that
    folders stay readable by llmrom versions that predate the features they do not use."""
    modules = factorized_linears(model)
    version = SPARSE_FORMAT_VERSION if any("nnz" in v for v in modules.values()) else FORMAT_VERSION
    meta = {"format_version": version, "method": method, "centered": centered,
            "base_architecture": base_architecture(model), "modules": modules}
    emb = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedEmbedding)}
    if emb:
        (name, m), = emb.items()
        heads = [n for n, h in model.named_modules() if isinstance(h, FactorizedHead)]
        meta["embedding"] = {"name": name, "rank": m.rank, "head": heads[0] if heads else None}
        meta["format_version"] = EMBEDDING_FORMAT_VERSION
    if any(v.get("interp") for v in modules.values()):
        meta["format_version"] = INTERP_FORMAT_VERSION
    joint = joint_meta(model)
    if joint:
        meta["joint"] = joint
        meta["format_version"] = JOINT_FORMAT_VERSION
    return meta


def save(model, tokenizer, out_dir, meta, report, overwrite=False, export_dense=False, dtype=None):
    """Write `model` as a standard HF folder atomically; `export_dense` merges the factors; floating
    tensors are stored in `dtype` (a name of DTYPES; None: the model's own)."""
    out = Path(out_dir)
    check_output(out, overwrite)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_safetensors(dense_state_dict(model, meta) if export_dense else model.state_dict(), tmp,
                          DTYPES[dtype] if dtype else None)
        finish_folder(tmp, out, model, tokenizer, meta, report, export_dense, dtype)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def finish_folder(tmp, out, model, tokenizer, meta, report, export_dense=False, dtype=None):
    """Complete the hidden folder `tmp`, whose weights are written, and rename it to `out`.

    Writes config.json (with the llmrom metadata, or without for a dense export), the modeling
    file, tokenizer, generation config and report. `model` may be a meta-device skeleton: only its
    config, generation config and parameter dtype (unless `dtype` names the stored one) are read.
    """
    config = model.config.to_dict()
    quant = config.get("quantization_config")
    if quant is not None and quant.get("quant_method") != "torchao":  # a GGUF source, dequantized on load
        config.pop("quantization_config")
    config["dtype"] = dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
    config["architectures"] = [meta["base_architecture"]]
    if export_dense:
        config.pop("llmrom", None)
        config.pop("auto_map", None)
    else:
        cls_name = f"Llmrom{meta['base_architecture']}"
        config["llmrom"] = meta
        config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_NAME[:-3]}.{cls_name}"}
        (tmp / MODELING_NAME).write_text(modeling_source(meta["base_architecture"], cls_name))
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_card(tmp, report, export_dense)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def check_output(out, overwrite):
    if out.exists() and not overwrite:
        raise LlmromError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise LlmromError(f"output path {out} is a file, not a folder")


def modeling_source(base_name, cls_name):
    """factorized.py verbatim plus the concrete class `auto_map` points at."""
    return (inspect.getsource(factorized)
            + f"\n\nfrom transformers import {base_name}  # noqa: E402\n\n"
            + f"{cls_name} = make_factorized_class({base_name})\n")


def original_skeleton(model, base_architecture):
    """The original architecture of `model`'s config on the meta device: which class each module had."""
    with torch.device("meta"):
        return getattr(transformers, base_architecture)(model.config)


def merge_into(state, model, name, original):
    """Replace the entries of factorized module `name` in `state` (full names) by its merged weight and
    bias, stored as the `original` module stores them (a Linear's (out, in), GPT-2's Conv1D (in, out))."""
    mod = model.get_submodule(name)
    if mod.bias is not None and getattr(original, "bias", None) is None:
        raise LlmromError(f"--export dense cannot store the bias that centring added to {name} (the original "
                          "layer has none); compress with --no-centered to export dense")
    for k in [k for k in state if k.startswith(name + ".")]:
        del state[k]
    w = mod.weight  # factors merged, plus the sparse residual
    state[f"{name}.weight"] = w if isinstance(original, torch.nn.Linear) else w.T.contiguous()
    if mod.bias is not None:
        state[f"{name}.bias"] = mod.bias


def dense_state_dict(model, meta):
    """State dict of the original architecture: each factorized module merged back to one weight."""
    skeleton = original_skeleton(model, meta["base_architecture"])
    state = model.state_dict()
    for name in [*meta["modules"], *(n for spec in meta.get("joint", {}).values() for n in spec["members"])]:
        merge_into(state, model, name, skeleton.get_submodule(name))
    if meta.get("embedding"):  # the merged table; a tied head is the same tensor again, as in the original
        spec = meta["embedding"]
        emb = model.get_submodule(spec["name"])
        for k in [k for k in state if k.startswith((spec["name"] + ".", f"{spec['head']}."))]:
            del state[k]
        state[f"{spec['name']}.weight"] = emb.merged()
    return state


def write_safetensors(state, folder, dtype=None):
    """Shards of at most SHARD_BYTES; tensors that share storage (tied weights) are written once;
    floating tensors are cast to `dtype` when given (integer buffers keep theirs). Quantized (torchao)
    tensors are written flattened in torchao's own format, their layout in each shard's metadata, which
    transformers' TorchAoConfig loader reads back."""
    seen, tensors = set(), {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.device.type != "meta" and _plain(v) else k
        if key in seen:
            continue
        seen.add(key)
        v = v.detach()
        if _plain(v):
            v = v.to(dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
        tensors[k] = v.cpu()
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        nbytes = _nbytes(v)
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + nbytes
    shards.append(cur)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for fname, shard in zip(names, shards):
        flat, meta = _flatten(shard)
        save_file(flat, folder / fname, metadata={"format": "pt", **meta})
        weight_map.update({k: fname for k in flat})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(v) for v in tensors.values())}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _plain(v):
    return type(v) in (torch.Tensor, torch.nn.Parameter)


def _nbytes(v):
    if _plain(v):
        return v.numel() * v.element_size()
    parts = [getattr(v, n, None) for n in (*v.tensor_data_names, *getattr(v, "optional_tensor_data_names", ()))]
    return sum(_nbytes(t) for t in parts if isinstance(t, torch.Tensor))


def _flatten(shard):
    """(plain tensors, metadata): a shard with quantized (torchao) tensors in torchao's safetensors format."""
    if all(_plain(v) for v in shard.values()):
        return {k: v for k, v in shard.items()}, {}
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    flat, meta = flatten_tensor_state_dict(shard)
    return {k: v.contiguous() for k, v in flat.items()}, meta


def write_json_atomic(path, obj):
    """Write JSON to `path` through a temporary sibling and a rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
