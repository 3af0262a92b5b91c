"""A checkpoint read block by block: a safetensors folder read on demand, the model as a meta-device skeleton,
and the helpers that read one module's tensors when it is needed and release them after (stream.py compresses
with them, streamplan.py plans with them). GGUF files answer the same interface (ggufcheckpoint.py)."""

import contextlib
import json
from collections import defaultdict
from pathlib import Path

from safetensors import safe_open
from torch import nn

from ..errors import LlmromError
from .capture import record_calls
from .pipeline import prepare_inputs
from ..modeling.shards import INDEX_NAME


class Checkpoint:
    """The tensors of a Hugging Face safetensors folder (sharded or not), read on demand.

    The interface streaming needs, shared with ggufcheckpoint.GgufCheckpoint: `folder`,
    `config_source`, `name in ckpt` (Hugging Face parameter names) and `read({name: dtype})`.
    """

    config_source = "its config.json"

    def __init__(self, folder):
        self.folder = Path(folder)
        index, single = self.folder / INDEX_NAME, self.folder / "model.safetensors"
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.files = {k: single.name for k in f.keys()}
        else:
            raise LlmromError(f"{folder} has no safetensors weights (model.safetensors or {INDEX_NAME}); "
                              "--stream reads safetensors folders and GGUF files: save the model with save_pretrained "
                              "or drop --stream")

    def __contains__(self, name):
        return name in self.files

    def read(self, dtypes):
        """{name: tensor} for {name: dtype}; floating tensors are cast, each file is opened once and closed."""
        by_file, out = defaultdict(list), {}
        for name in dtypes:
            by_file[self.files[name]].append(name)
        for fname, names in by_file.items():
            with safe_open(self.folder / fname, framework="pt") as f:  # closing unmaps: pages leave the RSS
                for n in names:
                    t = f.get_tensor(n)
                    out[n] = t.to(dtypes[n], copy=True) if t.is_floating_point() else t.clone()
        return out


def build_skeleton(folder, dtype):
    """The model on the meta device (parameters only: buffers such as rotary tables are real).

    `folder` is a Hugging Face folder or a .gguf file, whose metadata is the config (as for `gguf_file=`).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = Path(folder)
    if folder.is_file():
        try:
            config = AutoConfig.from_pretrained(folder.parent, gguf_file=folder.name)
        except (ValueError, OSError) as e:
            raise LlmromError(f"cannot read the config of {folder}: {str(e).splitlines()[0]}") from None
    else:
        config = AutoConfig.from_pretrained(folder)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        raise LlmromError(f"cannot build {folder} as a causal LM: {str(e).splitlines()[0]}") from None
    model.tie_weights()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def tied_names(model):
    """{parameter name: every name of that same parameter} (tied embeddings have two)."""
    groups = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        groups[id(p)].append(name)
    return {n: names for names in groups.values() for n in names}


def materialize(module, prefix, ckpt, ties):
    """Read the meta parameters of `module` (dotted `prefix`) and its saved buffers from `ckpt`."""
    want = {}
    for name, p in module.named_parameters():
        if p.device.type == "meta":
            src = next((a for a in ties.get(prefix + name, [prefix + name]) if a in ckpt), None)
            if src is None:
                raise LlmromError(f"{ckpt.folder} lacks the tensor {prefix + name}: the checkpoint does not match "
                                  f"{ckpt.config_source}")
            want[name] = (src, p.dtype)
    for name, b in module.named_buffers():
        if prefix + name in ckpt:
            want[name] = (prefix + name, b.dtype)
    got = ckpt.read({src: dtype for src, dtype in want.values()})
    module.load_state_dict({name: got[src] for name, (src, _) in want.items()}, strict=False, assign=True)


def release(module):
    """Put every parameter of `module` back on the meta device (frees its memory)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)


def resident_parameters(model):
    """Parameters of `model` that are not on the meta device (what streaming holds in memory)."""
    return sum(p.numel() for p in model.parameters() if p.device.type != "meta")


@contextlib.contextmanager
def reading_outside_blocks(model, blocks, ckpt, ties):
    """Within the block, a module outside `blocks` is read from `ckpt` when it first runs (the embeddings,
    and the final norm and head if the model's tail runs); all of them are released on exit."""
    inside = {id(m) for m in blocks.modules()}
    handles, loaded = [], []

    def pre(prefix):
        def hook(mod, args, kwargs=None):
            if any(p.device.type == "meta" for p in mod.parameters(recurse=False)):
                materialize(mod, prefix, ckpt, ties)
                loaded.append(mod)
        return hook

    try:
        for name, m in model.named_modules():
            if id(m) not in inside and any(True for _ in m.parameters(recurse=False)):
                handles.append(m.register_forward_pre_hook(pre(name + ".")))
        yield
    finally:
        for h in handles:
            h.remove()
        for m in loaded:
            release(m)


def capture(model, blocks, tokens, opts, ckpt, ties, with_hidden=True):
    """(calls, block-0 hidden states or None, resident parameters meanwhile). Modules outside the blocks are
    read when they first run (the embeddings; never the head) and released afterwards."""
    with reading_outside_blocks(model, blocks, ckpt, ties):
        if with_hidden:
            calls, hidden = prepare_inputs(model, blocks, tokens, opts)
        else:  # resuming: the hidden states come from the journal
            calls, hidden = {}, None
            for b in tokens.split(opts.batch_size):
                if b.shape[0] not in calls:
                    calls[b.shape[0]] = record_calls(model, blocks, b)
        resident = resident_parameters(model)
    if hidden is not None and any(h.device.type == "meta" for h in hidden):
        raise LlmromError(f"{type(model).__name__} reads weights outside its modules' forward before block 0; "
                          "streaming cannot serve them: drop --stream")
    return calls, hidden, resident
