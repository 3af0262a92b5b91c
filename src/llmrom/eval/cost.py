"""Cost of a model: unique parameters, MACs per token, peak resident memory of this process (and giving freed
heap memory back)."""

import ctypes
import ctypes.util
import resource

from ..modeling.arch import is_linear


def count_params(model):
    """Unique parameters (tied embeddings counted once), plus the integer indices of sparse residuals
    (llmrom.factorized.FactorizedLinear.stored_indices: one parameter per stored int32)."""
    return sum(p.numel() for p in model.parameters()) + sum(getattr(m, "stored_indices", 0) for m in model.modules())


def linear_macs_per_token(model):
    """Multiply-accumulates of every linear layer (factorized ones count both factors and their sparse
    residual's nonzeros; a factorized embedding its (rank -> dim) linear) for one token."""
    return (sum(m.weight.numel() for m in model.modules() if is_linear(m))
            + sum(getattr(m, "nnz", 0) for m in model.modules() if hasattr(m, "stored_indices"))
            + sum(getattr(m, "macs", 0) for m in model.modules() if not is_linear(m)))  # factorized tied head


def attention_macs_per_token(model, seqlen=128):
    """Score and mixing MACs (q.k and attn.v) of one token averaged over a causal window of `seqlen`."""
    cfg = model.config
    get = getattr(cfg, "get_text_config", lambda: cfg)()
    layers = getattr(get, "num_hidden_layers", 0)
    heads = getattr(get, "num_attention_heads", 0)
    head_dim = getattr(get, "head_dim", None) or getattr(get, "hidden_size", 0) // max(heads, 1)
    return int(layers * 2 * heads * head_dim * (seqlen + 1) / 2)


def macs_per_token(model, seqlen=128):
    return linear_macs_per_token(model) + attention_macs_per_token(model, seqlen)


def peak_rss_bytes():
    """Peak resident memory of this process since it started or since reset_peak_rss()."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def return_free_memory():
    """Give the C heap's free pages back to the OS (glibc malloc_trim); False where the C library has none.

    Tensors of a few MB to a few hundred MB are carved from glibc's heap once its dynamic mmap threshold
    has grown, and their pages stay resident after they are freed. Without this, a streaming run's RSS
    grows by about one d x d float64 matrix per compressed block (2 GiB over the 7B shape's 16 blocks).
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True


_malloc_trim = None


def reset_peak_rss():
    """Start a new peak-RSS measurement (Linux: clear_refs 5); False where the OS cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def parameter_bytes(model):
    """Bytes of the unique tensors of the state dict in their current dtypes (what a save would write)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def disk_bytes(path):
    """Bytes of the weight files (safetensors shards) of a saved folder; None if `path` has none."""
    from pathlib import Path
    files = list(Path(path).expanduser().glob("*.safetensors")) if Path(path).expanduser().is_dir() else []
    return sum(p.stat().st_size for p in files) if files else None


_GEMM_RATE = {}  # (device, dtype, shape) -> FLOP/s, measured once per process


def gemm_flops_per_second(device="cpu", dtype=None, m=4096, k=1024, n=1024, rounds=5):
    """This device's measured matrix-product rate (FLOP/s): the median of `rounds` (m x k) @ (k x n) products
    after one warm-up, the shape of the loop's chunked GEMMs. Cached for the process."""
    import statistics
    import time

    import torch

    dtype = dtype or torch.float32
    key = (str(device), str(dtype), m, k, n)
    if key not in _GEMM_RATE:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
        times = []
        for r in range(rounds + 1):
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            if r:
                times.append(time.perf_counter() - t0)
        _GEMM_RATE[key] = 2 * m * k * n / statistics.median(times)
    return _GEMM_RATE[key]
