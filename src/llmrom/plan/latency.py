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
from ..modeling.factorized import FactorizedLinear, joint_modules
from ..modeling.io import write_json_atomic
from ..modeling.packaged import cache_dir
from .ranks import LinearShape

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
    return FormLatency(times[0], {form: _line([(p, t) for (fm, p), t in zip(spec, times[1:]) if fm == form])
                                  for form in ("pair", "interpolative")})


def _line(points):
    """(a, c) of the least-squares line time = a + c * params through (params, time) points."""
    xs, ys = [p for p, _ in points], [t for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    c = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / max(sum((a - mx) ** 2 for a in xs), 1e-12)
    return my - c * mx, c


class _Group(torch.nn.Module):
    """A group of linears that read the same input, called in turn as attention and the MLP call them."""

    def __init__(self, linears):
        super().__init__()
        self.members = torch.nn.ModuleList(linears)

    def forward(self, x):
        return [m(x) for m in self.members]


@torch.no_grad()
def measure_group(d_in, sizes, dtype, device):
    """FormLatency of linears (d_in -> each of `sizes`) that read the same input, at batch 1: the dense group
    against its joint form (llmrom.modeling.factorized.JointFactorizedLinear, its stacked map interpolative
    where that stores less, as --factors joint stores it), whose line is in "joint"."""
    device, dtype_t = torch.device(device), getattr(torch, dtype)
    size = torch.tensor([], dtype=dtype_t).element_size()
    kw = {"dtype": dtype_t, "device": device}
    stacked = LinearShape("group", 0, d_in, sum(sizes), interp=True)

    def dense_group():
        return _Group([torch.nn.Linear(d_in, n, bias=False, **kw) for n in sizes])

    def joint_group(rank):
        group = dense_group()
        interp = side_for(d_in, stacked.d_out) if stacked.uses_interp(rank) else None
        joint_modules(group, [f"members.{i}" for i in range(len(sizes))], sizes, rank, True, interp=interp, **kw)
        return group

    layers, params = [_copies(dense_group, stacked.dense_params, size)], []
    for f in FRACTIONS:
        rank = stacked.paper_rank(f)
        params.append(stacked.factor_params(rank))
        layers.append(_copies(lambda: joint_group(rank), params[-1], size))
    times = _time_calls(layers, torch.randn(1, 1, d_in, **kw))
    return FormLatency(times[0], {"joint": _line(list(zip(params, times[1:])))})


def _read_cache(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def measure(shapes, dtype="float32", device="cpu", progress=True, cache=True):
    """{(d_in, d_out): FormLatency} for every distinct shape in `shapes`, from the cache where it has them."""
    return _cached({(s.d_in, s.d_out) for s in shapes}, lambda k: f"{k[0]}x{k[1]}", measure_shape, dtype, device,
                   progress, cache)


def measure_groups(groups, dtype="float32", device="cpu", progress=True, cache=True):
    """{(d_in, sizes): FormLatency} (its "joint" line) for every distinct group of linears reading one input."""
    return _cached(set(groups), lambda k: f"{k[0]}x{'+'.join(map(str, k[1]))}", measure_group, dtype, device,
                   progress, cache)


def _cached(items, name_of, measure_one, dtype, device, progress, cache):
    """{item: FormLatency}, measured by measure_one(*item, dtype, device) where the on-disk cache lacks it."""
    key = _device_key(device, dtype)
    path = cache_dir() / CACHE_NAME
    stored = _read_cache(path) if cache else {}
    entries = stored.get(key, {})
    out, fresh = {}, False
    for item in tqdm(sorted(items), desc="latency of factor forms", disable=not progress, leave=False):
        name = name_of(item)
        if name not in entries:
            lat = measure_one(*item, dtype, device)
            entries[name] = {"dense_us": lat.dense_us, "lines": lat.lines}
            fresh = True
        e = entries[name]
        out[item] = FormLatency(e["dense_us"], {k: tuple(v) for k, v in e["lines"].items()})
    if cache and fresh:
        stored[key] = entries
        try:
            write_json_atomic(path, stored)
        except OSError:  # a read-only cache only costs a re-measurement next time
            pass
    return out


def speed_limits(shapes, prefer, dtype="float32", device="cpu", progress=True, groups=None):
    """{module name: (largest kept fraction at which its factor pair is faster than dense, the same for
    the interpolative form)}; empty for `prefer` "quality" (every factorization that stores fewer
    parameters is allowed). `groups` ({name: (d_in, sizes)}, --factors joint): linears fitted with their
    group through one basis get the joint form's limit, a fraction of the whole group's dense parameters."""
    if prefer not in PREFERENCES:
        raise LlmromError(f"--prefer must be one of {', '.join(PREFERENCES)}, got {prefer!r}")
    if prefer == "quality" or not shapes:
        return {}
    groups = groups or {}
    table = measure([s for s in shapes if s.name not in groups], dtype, device, progress)
    joint = measure_groups(set(groups.values()), dtype, device, progress) if groups else {}
    limits = {}
    for s in shapes:
        if s.name in groups:
            d_in, sizes = groups[s.name]
            limits[s.name] = (joint[d_in, sizes].max_kept("joint", d_in * sum(sizes)),) * 2
        else:
            lat = table[s.d_in, s.d_out]
            limits[s.name] = (lat.max_kept("pair", s.dense_params), lat.max_kept("interpolative", s.dense_params))
    return limits
