"""A second engine: a model (compressed or dense) exported to ONNX and run in ONNX Runtime, with KV cache.

The export goes through transformers' own exporter (`transformers.exporters.OnnxExporter`, which drives
`torch.onnx.export(dynamo=True)` and patches what ONNX cannot lower), on the generation step that
transformers itself captures with `multi_token_decode`: one graph takes new tokens, their positions
and the cache so far, and returns logits and the grown cache. The same graph prefills (on an empty
cache) and decodes one token at a time, so the weights are stored once, at the compressed size: each
factorized linear stays two matrix products (an interpolative form's identity part two gathers).

Nothing llmrom-specific is needed to run the result: `transformers.exporters.ExportedModel` or a plain
`onnxruntime.InferenceSession` reads it. `OnnxLM` wraps the former with what llmrom measures: logits,
greedy generation, and the thread count.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import LlmromError

MANIFEST = "llmrom_onnx.json"
CHECK_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
LOGIT_TOLERANCE = 1e-3  # largest |logit difference| accepted against the PyTorch model, float32
CHECK_TOKENS = 16


def require_onnx():
    """The exporter's and the runtime's packages, or one line naming the install."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if _absent(name)]
    if missing:
        raise LlmromError(f"exporting to ONNX needs {', '.join(missing)}; pip install 'llmrom[onnx]'")
    if _absent("transformers.exporters"):
        import transformers
        raise LlmromError(f"exporting to ONNX needs transformers' own exporter (transformers.exporters), which "
                          f"transformers {transformers.__version__} lacks; pip install 'transformers>=5.25'")


def _absent(name):
    import importlib.util
    return importlib.util.find_spec(name) is None


def sample_ids(tokenizer, vocab, batch=2):
    """The prompt the export is traced and checked on: the check prompt tokenized (or, without a
    tokenizer, fixed ids), repeated `batch` times so the batch axis stays symbolic."""
    if tokenizer is not None:
        ids = torch.tensor([tokenizer.encode(CHECK_PROMPT, add_special_tokens=False)])
    else:
        ids = torch.arange(3, 3 + 12)[None] % vocab
    return ids.repeat(batch, 1)


def export_onnx(model, tokenizer, out, overwrite=False, source=None, quantize="none", algorithm="rtn",
                block_size=32, progress=print):
    """Export `model` (moved to float32 on the CPU, in place) to the folder `out`, written atomically. The
    float graph is checked in ONNX Runtime against the model itself (logits within LOGIT_TOLERANCE, the
    same greedy tokens) or nothing is written; `quantize` (int4, int8) then quantizes its weights with
    ONNX Runtime's quantizer (llmrom.export.onnxquant), and the quantized graph's agreement with the
    model is measured and recorded, not required. Returns the manifest, also written as MANIFEST."""
    from .onnxquant import check_quantize, quantize_export
    check_quantize(quantize, algorithm, block_size)
    require_onnx()
    from ..modeling.io import check_output
    out = Path(out)
    check_output(out, overwrite)
    quant = getattr(model.config, "quantization_config", None)
    if quant is not None and _get(quant, "quant_method") == "torchao":
        raise LlmromError("this folder's linears are torchao-quantized, which ONNX export does not lower; export "
                          "the folder compressed without --quantize and quantize the export (--quantize here)")
    from transformers.exporters import OnnxConfig, OnnxExporter
    from transformers.exporters.utils import decompose_prefill_decode

    model = model.float().cpu().eval()
    ids = sample_ids(tokenizer, model.config.vocab_size)
    progress("tracing the generation step (prefill and decode in one graph)...")
    step, inputs = decompose_prefill_decode(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                            multi_token_decode=True)["decode"]
    with _module_calls(model):
        exported = OnnxExporter().export(step, inputs, OnnxConfig(dynamic=True))
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        exported.save_pretrained(tmp)
        del exported
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        progress("checking the export in ONNX Runtime against the PyTorch model...")
        manifest = {"source": source, "check": check_export(model, OnnxLM(tmp), ids[:1])}
        if quantize != "none":
            progress(f"quantizing the weights to {quantize} ({algorithm}, blocks of {block_size})...")
            manifest["quantization"] = quantize_export(tmp, quantize, algorithm, block_size)
            manifest["quantized_check"] = check_export(model, OnnxLM(tmp), ids[:1], strict=False)
        manifest["bytes"] = export_bytes(tmp)
        manifest["versions"] = _versions()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def export_bytes(folder):
    """Bytes of the graph and its weights file."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.name.startswith("model.onnx"))


@contextlib.contextmanager
def _module_calls(model):
    """Trace each factorized linear through its factor modules: a plain `x @ W.T (+ b)` per factor, which
    ONNX writes as MatMul (the fused 2-D `addmm` of the PyTorch kernel becomes Gemm, which ONNX Runtime's
    weight-only quantizer does not read)."""
    from ..modeling.factorized import FactorizedLinear
    layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    for m in layers:
        m.forward = m._forward_modules
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def _get(config, key):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


@torch.no_grad()
def check_export(model, engine, ids, tokens=CHECK_TOKENS, strict=True):
    """The export against the PyTorch model on the prompt `ids`: largest logit difference, KL divergence
    per token, and the greedy continuation; `strict` refuses a difference beyond LOGIT_TOLERANCE or any
    other greedy token (a float export must compute the same function)."""
    import torch.nn.functional as F
    ours, theirs = engine(ids).logits, model(ids).logits
    kl = F.kl_div(ours.log_softmax(-1), theirs.log_softmax(-1), log_target=True, reduction="sum").item()
    torch_tokens = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                                  min_new_tokens=tokens, pad_token_id=0)[0, ids.shape[1]:]
    onnx_tokens = engine.generate(ids, max_new_tokens=tokens)[0, ids.shape[1]:]
    check = {"prompt_tokens": ids.shape[1], "max_abs_logit_diff": (ours - theirs).abs().max().item(),
             "kl_per_token": kl / ids.shape[1], "greedy_tokens": tokens,
             "greedy_same": int((torch_tokens == onnx_tokens).sum())}
    if strict:
        check["tolerance"] = LOGIT_TOLERANCE
        if not (check["max_abs_logit_diff"] <= LOGIT_TOLERANCE and check["greedy_same"] == tokens):
            raise LlmromError(f"the ONNX export disagrees with the PyTorch model (largest logit difference "
                              f"{check['max_abs_logit_diff']:.2e}, {check['greedy_same']} of {tokens} greedy tokens "
                              "the same); nothing was written")
    return check


def _versions():
    import onnx
    import onnxruntime
    import onnxscript
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


class OnnxLM:
    """An export folder in ONNX Runtime on the CPU, shaped like the PyTorch model where llmrom's measurements
    read it (so perplexity, fidelity and the speed protocol run on it unchanged): called on `input_ids` it
    returns `.logits`; `generate` is greedy with KV cache. `threads` sizes ONNX Runtime's pool (default:
    torch's thread count, so both engines get the same cores; ONNX Runtime alone takes every core)."""

    def __init__(self, folder, threads=None):
        require_onnx()
        import onnxruntime
        from transformers import AutoConfig
        from transformers.exporters import ExportedModel

        folder = Path(folder)
        if not (folder / "export.json").is_file():
            raise LlmromError(f"{folder} is not an ONNX export (no export.json); make one with "
                              "`llmrom export onnx MODEL --out FOLDER`")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.engine = ExportedModel.from_pretrained(folder, session_options=options)
        self.config = AutoConfig.from_pretrained(folder).get_text_config()
        self.threads = options.intra_op_num_threads

    def empty_cache(self, batch):
        """A cache of zero-length keys and values: the graph's prefill is a decode step on it."""
        from transformers import DynamicCache
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        empty = torch.zeros(batch, c.num_key_value_heads, 0, head_dim)
        cache = DynamicCache(config=c)
        for layer in range(c.num_hidden_layers):
            cache.update(empty, empty, layer)
        return cache

    def step(self, ids, cache, start):
        """(logits, grown cache) for `ids` at positions start, start+1, ... after `cache`."""
        positions = torch.arange(start, start + ids.shape[1]).expand(ids.shape[0], -1)
        out = self.engine(input_ids=ids, position_ids=positions, cache=cache)
        return out.logits, out.cache

    def __call__(self, input_ids, **ignored):
        return SimpleNamespace(logits=self.step(input_ids, self.empty_cache(input_ids.shape[0]), 0)[0])

    def generate(self, input_ids, max_new_tokens, do_sample=False, **ignored):
        """Greedy continuation: `input_ids` followed by `max_new_tokens` new tokens (no stop at end of text)."""
        if do_sample:
            raise LlmromError("the ONNX Runtime runner decodes greedily only")
        cache, start, new, out = self.empty_cache(input_ids.shape[0]), 0, input_ids, [input_ids]
        for _ in range(max_new_tokens):
            logits, cache = self.step(new, cache, start)
            start += new.shape[1]
            new = logits[:, -1:].argmax(-1)
            out.append(new)
        return torch.cat(out, dim=1)

    def parameters(self):  # where inputs go: the CPU
        yield torch.empty(0)

    def get_output_embeddings(self):
        return SimpleNamespace(out_features=self.config.vocab_size)

    def eval(self):
        return self
