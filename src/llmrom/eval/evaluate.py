"""One evaluation with a written protocol: perplexity, fidelity to the dense model, cost, speed,
and zero-shot tasks through lm-eval-harness. Used by `llmrom eval` and by the benchmark.

Perplexity protocol (GPTQ / SVD-LLM style): the text source is joined with blank lines, tokenized
once (one leading BOS if the tokenizer adds one), cut into consecutive non-overlapping windows of
`seqlen` tokens (the tail is dropped; the first `max_windows` are kept); perplexity is
exp(mean next-token cross-entropy over every predicted token, seqlen - 1 per window). A non-finite
loss stops with the window's index. Every number is returned with its protocol.
"""

import math
import platform
import time

import torch
import transformers

from .. import __version__
from .cost import count_params, macs_per_token, parameter_bytes
from .fidelity import fidelity
from .perplexity import mean_nll
from .speed import decode_by_batch, measure_speed
from ..data.textdata import adds_bos, eval_windows, load_text, tokens_sha256

MACS_SEQLEN = 128  # the paper reports MACs per token at sequence length 128


def cost(model, disk=None):
    return {"parameters": count_params(model), "macs_per_token": macs_per_token(model, MACS_SEQLEN),
            "bytes": disk if disk is not None else parameter_bytes(model),
            "bytes_of": "safetensors files on disk" if disk is not None else "state dict in memory"}


def perplexity_protocol(source, seqlen, windows, bos):
    return (f"{source}: {len(windows)} non-overlapping windows x {seqlen} tokens "
            f"({len(windows) * (seqlen - 1):,} predicted tokens{', leading BOS' if bos else ''}), "
            "exp(mean next-token cross-entropy)")


def evaluate(model, tokenizer, *, reference=None, ppl="python-docs:tutorial", seqlen=512, max_windows=40,
             fidelity_windows=16, tasks=(), task_options=None, speed=True, speed_rounds=3, speed_compiled=False,
             disk=None, reference_disk=None, reference_perplexity=None, progress=True, generate=None, new_tokens=40):
    """Evaluate `model` (and, side by side, its dense `reference` if given); returns a JSON-able dict.

    `reference_perplexity` reuses a perplexity of the reference measured earlier with the same protocol;
    `generate`: a prompt both models continue greedily for `new_tokens` tokens, so a person sees the text;
    `speed_compiled`: measure speed under torch.compile instead of eager (llmrom.eval.speed).
    """
    t0 = time.perf_counter()
    models = {"model": model, **({"reference": reference} if reference is not None else {})}
    out = {"llmrom_version": __version__, "model": cost(model, disk)}
    if reference is not None:
        out["reference"] = cost(reference, reference_disk)
    if ppl:
        windows = eval_windows(tokenizer, load_text(ppl), seqlen, max_windows)
        p = {"source": ppl, "seqlen": seqlen, "windows": len(windows),
             "predicted_tokens": len(windows) * (seqlen - 1), "windows_sha256": tokens_sha256(windows),
             "protocol": perplexity_protocol(ppl, seqlen, windows, adds_bos(tokenizer)),
             "model": _ppl(model, windows, progress, "perplexity")}
        if reference is not None:
            p["reference"] = reference_perplexity or _ppl(reference, windows, progress, "perplexity (reference)")
            f = windows[:fidelity_windows]
            out["fidelity"] = {**fidelity(model, reference, f, progress=progress), "windows": len(f),
                               "protocol": f"first {len(f)} perplexity windows; KL(reference || model) of the "
                                           "next-token distributions and top-1 agreement, per predicted position"}
        out["perplexity"] = p
    if speed:
        out["speed"] = measure_speed(models, rounds=speed_rounds, compiled=speed_compiled)
    if generate:
        out["generation"] = {"prompt": generate, "new_tokens": new_tokens, "protocol": "greedy, KV cache",
                             **{k: greedy_text(m, tokenizer, generate, new_tokens) for k, m in models.items()}}
    if tasks:  # with a reference, its scores too and the share of its above-chance accuracy kept
        from .zeroshot import retained, run_tasks
        z = run_tasks(model, tokenizer, list(tasks), progress=progress, **(task_options or {}))
        if reference is not None:
            z["reference_tasks"] = run_tasks(reference, tokenizer, list(tasks), progress=progress,
                                             **(task_options or {}))["tasks"]
            z["retained_above_chance"] = retained(z["tasks"], z["reference_tasks"])
        out["zero_shot"] = z
    out["environment"] = environment()
    out["seconds"] = time.perf_counter() - t0
    return out


@torch.no_grad()
def greedy_text(model, tokenizer, prompt, new_tokens):
    """The model's greedy continuation of `prompt` (the new text only)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _ppl(model, windows, progress, desc):
    return math.exp(mean_nll(model, windows, progress=progress, desc=desc))


def environment():
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "llmrom": __version__, "machine": platform.machine(),
            "processor": platform.processor(), "cpu": cpu_model(), "threads": torch.get_num_threads()}


def cpu_model():
    """The CPU's model name (Linux /proc/cpuinfo; platform.processor() is often empty there)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def _acc(r):
    return f"{r['acc']:.3f} / " + ("-" if r.get("acc_norm") is None else f"{r['acc_norm']:.3f}")


def format_results(res, names=("model", "reference")):
    """A plain-text table: one row per metric, one column per model, ratio when both are present."""
    both = "reference" in res
    rows = [("parameters", "parameters", "{:,}"), ("MACs/token @128", "macs_per_token", "{:,}"),
            ("size (bytes)", "bytes", "{:,}")]
    lines = []
    head = f"{'':<26}{names[0]:>18}" + (f"{names[1]:>18}{'ratio':>9}" if both else "")
    lines.append(head)

    def row(label, a, b, fmt):
        line = f"{label:<26}{fmt.format(a):>18}"
        if both and b is not None:
            line += f"{fmt.format(b):>18}{a / b:>9.3f}"
        lines.append(line)

    for label, key, fmt in rows:
        row(label, res["model"][key], res.get("reference", {}).get(key), fmt)
    if "perplexity" in res:
        p = res["perplexity"]
        row("perplexity", p["model"], p.get("reference"), "{:.3f}")
    if "speed" in res:
        s = res["speed"]
        row("prefill tokens/s", s["model"]["prefill_tokens_per_s"],
            s.get("reference", {}).get("prefill_tokens_per_s"), "{:.1f}")
        ref_batches = decode_by_batch(s["reference"]) if "reference" in s else {}
        for b, v in decode_by_batch(s["model"]).items():
            row(f"decode tokens/s, batch {b}", v, ref_batches.get(b), "{:.2f}")
    if "fidelity" in res:
        f = res["fidelity"]
        lines.append(f"{'KL(reference || model)':<26}{f['kl_mean']:>18.4f}  nats/token over {f['tokens']:,} tokens")
        lines.append(f"{'top-1 agreement':<26}{f['top1_agreement']:>18.4f}")
    z = res.get("zero_shot", {})
    for task, r in z.get("tasks", {}).items():
        line = f"{task + ' acc / acc_norm':<26}{_acc(r):>18}"
        if task in z.get("reference_tasks", {}):
            line += f"{_acc(z['reference_tasks'][task]):>18}"
        lines.append(f"{line}  (n={r.get('samples')})")
    if "retained_above_chance" in z:
        kept = z["retained_above_chance"]
        lines.append(f"{'zero-shot kept':<26}{'-' if kept is None else f'{kept:.3f}':>18}  of the reference's "
                     "accuracy above chance (paper tasks where it beats chance by 2 stderr)")
    if "generation" in res:
        g = res["generation"]
        lines.append(f"greedy continuation of {g['prompt']!r} ({g['new_tokens']} tokens):")
        for key, name in zip(("model", "reference"), names):
            if key in g:
                lines.append(f"  {name + ':':<11}" + " ".join(g[key].split()))
    if "perplexity" in res:
        lines.append(f"perplexity protocol: {res['perplexity']['protocol']}")
    if "speed" in res:
        lines.append(f"speed protocol: {res['speed']['model']['protocol']}")
    if "fidelity" in res:
        lines.append(f"fidelity protocol: {res['fidelity']['protocol']}")
    if "zero_shot" in res:
        z = res["zero_shot"]
        lines.append(f"zero-shot: lm-eval {z.get('harness_version')}, {z.get('num_fewshot', 0)}-shot")
    return "\n".join(lines)
