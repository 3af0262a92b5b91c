"""Measured speed: prefill (tokens/s at batch 1 x 512) and greedy decoding (new tokens/s), on the
models' own device (CPU, or a CUDA GPU, whose queued kernels are waited for before each clock read).

Models measured together are interleaved round by round (A, B, A, B, ...) and each figure is the
median of its rounds, so a slow spell of a noisy machine hits every model alike. Ratios between
models measured in one call are the numbers to quote; absolute figures vary by machine.
"""

import statistics
import time

import torch


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
def _decode_seconds(model, prompt, new_tokens):
    t0 = _clock(prompt.device)
    model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return _clock(prompt.device) - t0


def measure_speed(models, prefill_tokens=512, prompt_tokens=32, new_tokens=32, rounds=3, vocab=None):
    """{name: {"prefill_tokens_per_s", "decode_tokens_per_s", protocol fields}} for a dict of models."""
    vocab = vocab or min(m.get_output_embeddings().out_features for m in models.values())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prefill_tokens), generator=gen)
    prompt = ids[:, :prompt_tokens]
    timings = {name: {"prefill": [], "decode": []} for name in models}
    for name, model in models.items():  # warm-up: first calls allocate and pick kernels
        _prefill_seconds(model, ids[:, :64].to(_first_device(model)))
        _decode_seconds(model, prompt.to(_first_device(model)), 2)
    for _ in range(rounds):
        for name, model in models.items():
            dev = _first_device(model)
            timings[name]["prefill"].append(_prefill_seconds(model, ids.to(dev)))
            timings[name]["decode"].append(_decode_seconds(model, prompt.to(dev), new_tokens))
    return {name: {"prefill_tokens_per_s": prefill_tokens / statistics.median(t["prefill"]),
                   "decode_tokens_per_s": new_tokens / statistics.median(t["decode"]),
                   "protocol": f"prefill batch 1 x {prefill_tokens}; greedy decode of {new_tokens} tokens after "
                               f"a {prompt_tokens}-token prompt with KV cache; median of {rounds} interleaved "
                               f"rounds; {_where(_first_device(models[name]))}"}
            for name, t in timings.items()}
