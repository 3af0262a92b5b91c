"""Measured speed: prefill (tokens/s at batch 1 x 512) and greedy decoding with KV cache (new tokens/s,
at batch 1 and at batch 8), on the models' own device (CPU, or a CUDA GPU, whose queued kernels are
waited for before each clock read).

Models measured together are interleaved round by round (A, B, A, B, ...) and each figure is the
median of its rounds, so a slow spell of a noisy machine hits every model alike. Ratios between
models measured in one call are the numbers to quote; absolute figures vary by machine.

`compiled=True` measures every model under `torch.compile` (a static KV cache, so decoding does not
recompile as the cache grows); compilation happens in the warm-up and is not timed.
"""

import statistics
import time

import torch

DECODE_BATCHES = (1, 8)


def _first_device(model):
    return next(model.parameters()).device


def _clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _where(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"{torch.get_num_threads()} threads"


@torch.no_grad()
def _prefill_seconds(model, ids):
    t0 = _clock(ids.device)
    model(input_ids=ids, use_cache=False)
    return _clock(ids.device) - t0


@torch.no_grad()
def _decode_seconds(model, prompt, new_tokens, compiled=False):
    extra = {"cache_implementation": "static"} if compiled else {}
    t0 = _clock(prompt.device)
    model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **extra)
    return _clock(prompt.device) - t0


def measure_speed(models, *args, compiled=False, **kwargs):
    """{name: {"prefill_tokens_per_s", "decode_tokens_per_s" (batch 1), "decode_tokens_per_s_by_batch",
    "mode", "protocol"}} for a dict of models (see _measure for the arguments); with `compiled`, under
    torch.compile, the models' own forward restored afterwards."""
    if not compiled:
        return _measure(models, *args, **kwargs)
    eager = {name: model.forward for name, model in models.items()}
    # every model's forward is one code object to dynamo, and each (batch, length) of the protocol compiles
    # once per model: past the default limit of 8 it would silently run the rest in eager mode
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 16 * len(models))
    try:
        for model in models.values():
            model.forward = torch.compile(model.forward, dynamic=False)
        return _measure(models, *args, compiled=True, **kwargs)
    finally:
        torch._dynamo.config.recompile_limit = limit
        for name, model in models.items():
            model.forward = eager[name]


def _measure(models, prefill_tokens=512, prompt_tokens=32, new_tokens=32, rounds=3, vocab=None,
             batches=DECODE_BATCHES, compiled=False):
    """Decode at batch b counts b new tokens per step; "decode_tokens_per_s" is the smallest batch's."""
    vocab = vocab or min(m.get_output_embeddings().out_features for m in models.values())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (max(batches), prefill_tokens), generator=gen)
    prompts = {b: ids[:b, :prompt_tokens] for b in batches}
    timings = {name: {"prefill": [], **{b: [] for b in batches}} for name in models}
    for name, model in models.items():  # warm-up: first calls allocate, pick kernels (and compile)
        dev = _first_device(model)
        _prefill_seconds(model, ids[:1, :prefill_tokens if compiled else 64].to(dev))
        for b in batches:
            _decode_seconds(model, prompts[b].to(dev), new_tokens if compiled else 2, compiled)
    for _ in range(rounds):
        for name, model in models.items():
            dev = _first_device(model)
            timings[name]["prefill"].append(_prefill_seconds(model, ids[:1].to(dev)))
            for b in batches:
                timings[name][b].append(_decode_seconds(model, prompts[b].to(dev), new_tokens, compiled))
    mode = "torch.compile, static KV cache" if compiled else "eager"
    out = {}
    for name, t in timings.items():
        by_batch = {str(b): b * new_tokens / statistics.median(t[b]) for b in batches}
        out[name] = {"prefill_tokens_per_s": prefill_tokens / statistics.median(t["prefill"]),
                     "decode_tokens_per_s": by_batch[str(min(batches))], "decode_tokens_per_s_by_batch": by_batch,
                     "mode": mode,
                     "protocol": f"{mode}; prefill batch 1 x {prefill_tokens}; greedy decode of {new_tokens} tokens "
                                 f"after a {prompt_tokens}-token prompt with KV cache at batch "
                                 f"{' and '.join(map(str, batches))}; median of {rounds} interleaved rounds; "
                                 f"{_where(_first_device(models[name]))}"}
    return out


def decode_by_batch(figures):
    """{batch: decode tokens/s} of one model's figures; results written before decoding was measured at
    several batches hold batch 1 only."""
    return figures.get("decode_tokens_per_s_by_batch", {"1": figures["decode_tokens_per_s"]})


def speed_ratios(speed, model="model", reference="reference"):
    """{figure: model / reference} for every speed figure both have (prefill, decode at each batch)."""
    a, b = speed[model], speed[reference]
    out = {"prefill": a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"]}
    for k, v in decode_by_batch(a).items():
        ref = decode_by_batch(b).get(k)
        if ref:
            out[f"decode batch {k}"] = v / ref
    return out
