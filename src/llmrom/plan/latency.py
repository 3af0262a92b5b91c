"""Measured decoding latency of each linear's forms, so a plan only factorizes where it removes time.

At batch 1 (decoding one token) a product streams its weight once: its time is a fixed cost per
kernel call plus the weight's bytes over the memory bandwidth. A factorized linear moves fewer bytes
but makes two or three calls instead of one, so below some kept fraction it is faster than the dense
layer and above it slower. That fraction depends on the shape, the dtype, the form and the device, so
it is measured, not guessed: for every distinct (d_in, d_out) of the model, the dense layer and the
factorized form at three ranks are timed on one token, each on enough copies of its weights that they
come from memory as in a real decode (not from the cache), in interleaved rounds (the fastest round:
other work on the machine only ever adds time). A line
through the factorized timings, time = a + c * stored parameters, gives the largest kept fraction
that is still faster than dense: `max_kept`.

Results are cached on disk per device, dtype, thread count, CPU model, torch version and
forward-pass version (``$LLMROM_CACHE/latency.json``), so a model is measured once per machine.
"""

import json
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import LlmromError
from ..eval.evaluate import cpu_model
from ..factor.interp import side_for
from ..modeling.factorized import FactorizedLinear
from ..modeling.io import write_json_atomic
from ..modeling.packaged import cache_dir

FORWARD_VERSION = 3  # bump when FactorizedLinear.forward or the timing changes: cached timings no longer hold
CACHE_NAME = "latency.json"
FRACTIONS = (0.3, 0.55, 0.8)  # kept fractions the factorized forms are timed at
STREAM_BYTES = 64 << 20  # copies of a weight cycle through at least this many bytes (beyond the cache)
PREFERENCES = ("speed", "quality")
LIMIT_STEP = 0.05  # limits are rounded down to this step: two runs on one machine (timings jitter by a few
# percent) then plan alike, and a limit errs on the side of speed
MIN_KEPT = 0.2  # a form faster only below this kept fraction counts as never faster: cutting a linear that deep
# to save a few microseconds costs more quality than leaving it dense and cutting the others a little more


@dataclass(frozen=True)
class FormLatency:
    """One shape's measured decode step (microseconds): the dense layer, and per form a line a + c * params."""
    dense_us: float
    lines: dict  # {"pair" | "interpolative": (a, c)}

    def max_kept(self, form, dense_params):
        """Largest fraction of the dense parameters the form may store and still be faster than dense."""
        a, c = self.lines[form]
        if c <= 0:  # timing noise made the line flat or falling: no evidence that cutting deeper helps
            return 0.0
        kept = min(1.0, (self.dense_us - a) / (c * dense_params))
        kept = math.floor(kept / LIMIT_STEP + 1e-9) * LIMIT_STEP if kept < 1 else 1.0
        return kept if kept >= MIN_KEPT else 0.0


def _device_key(device, dtype):
    dev = torch.device(device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
    return "|".join(map(str, (dev.type, where, torch.get_num_threads(), dtype, torch.__version__, FORWARD_VERSION)))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _time_calls(layers, x, rounds=7, calls=64):
    """Microseconds per call of each list of same-shaped layers: rounds interleaved, the fastest kept."""
    times = [[] for _ in layers]
    for copies in layers:  # warm-up: first calls allocate and pick kernels
        for m in copies[:4]:
            m(x)
    for _ in range(rounds):
        for i, copies in enumerate(layers):
            _sync(x.device)
            t0 = time.perf_counter()
            for k in range(calls):
                copies[k % len(copies)](x)
            _sync(x.device)
            times[i].append((time.perf_counter() - t0) / calls * 1e6)
    return [min(t) for t in times]


def _copies(make, params, element_size):
    n = max(2, min(64, math.ceil(STREAM_BYTES / max(1, params * element_size))))
    return [make() for _ in range(n)]


@torch.no_grad()
def measure_shape(d_in, d_out, dtype, device):
    """FormLatency of a (d_in -> d_out) linear on `device` in `dtype`, at batch 1."""
    device, dtype_t = torch.device(device), getattr(torch, dtype)
    size = torch.tensor([], dtype=dtype_t).element_size()
    kw = {"dtype": dtype_t, "device": device}
    layers, spec = [_copies(lambda: torch.nn.Linear(d_in, d_out, bias=False, **kw), d_in * d_out, size)], []
    side = min(d_in, d_out)
    for form, interp in (("pair", None), ("interpolative", side_for(d_in, d_out))):
        for f in FRACTIONS:
            rank = max(2, int(f * d_in * d_out / (d_in + d_out)))
            if interp:  # largest rank whose interpolative storage fits f of the dense parameters
                s = d_in + d_out
                rank = max(2, min(side - 1, int((s - math.sqrt(max(s * s - 4 * f * d_in * d_out, 0))) / 2)))
            params = rank * (d_in + d_out - (rank if interp else 0))
            spec.append((form, params))
            layers.append(_copies(lambda: FactorizedLinear(d_in, d_out, rank, True, interp=interp, **kw), params,
                                  size))
    x = torch.randn(1, 1, d_in, **kw)
    times = _time_calls(layers, x)
    lines = {}
    for form in ("pair", "interpolative"):
        pts = [(p, t) for (fm, p), t in zip(spec, times[1:]) if fm == form]
        xs, ys = [p for p, _ in pts], [t for _, t in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        c = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / max(sum((a - mx) ** 2 for a in xs), 1e-12)
        lines[form] = (my - c * mx, c)
    return FormLatency(times[0], lines)


def _read_cache(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def measure(shapes, dtype="float32", device="cpu", progress=True, cache=True):
    """{(d_in, d_out): FormLatency} for every distinct shape in `shapes`, from the cache where it has them."""
    key = _device_key(device, dtype)
    path = cache_dir() / CACHE_NAME
    stored = _read_cache(path) if cache else {}
    entries = stored.get(key, {})
    out, fresh = {}, False
    for d_in, d_out in tqdm(sorted({(s.d_in, s.d_out) for s in shapes}), desc="latency of factor forms",
                            disable=not progress, leave=False):
        name = f"{d_in}x{d_out}"
        if name not in entries:
            lat = measure_shape(d_in, d_out, dtype, device)
            entries[name] = {"dense_us": lat.dense_us, "lines": lat.lines}
            fresh = True
        e = entries[name]
        out[d_in, d_out] = FormLatency(e["dense_us"], {k: tuple(v) for k, v in e["lines"].items()})
    if cache and fresh:
        stored[key] = entries
        try:
            write_json_atomic(path, stored)
        except OSError:  # a read-only cache only costs a re-measurement next time
            pass
    return out


def speed_limits(shapes, prefer, dtype="float32", device="cpu", progress=True):
    """{module name: (largest kept fraction at which its factor pair is faster than dense, the same for
    the interpolative form)}; empty for `prefer` "quality" (every factorization that stores fewer
    parameters is allowed)."""
    if prefer not in PREFERENCES:
        raise LlmromError(f"--prefer must be one of {', '.join(PREFERENCES)}, got {prefer!r}")
    if prefer == "quality" or not shapes:
        return {}
    table = measure(shapes, dtype, device, progress)
    return {s.name: (table[s.d_in, s.d_out].max_kept("pair", s.dense_params),
                     table[s.d_in, s.d_out].max_kept("interpolative", s.dense_params)) for s in shapes}
