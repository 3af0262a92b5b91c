"""Safetensors shards written tensor by tensor, for folders produced block by block.

`write_shard` lays out the header from the tensors' names, dtypes and shapes (known before any
data is read), then asks for each tensor in turn, so a shard never sits in memory whole: a block's
tensors, or the non-block tensors streamed one at a time from the source checkpoint. The file is
written under a temporary name, fsynced and renamed, so a shard either exists complete or not at
all. The result is an ordinary safetensors file (the format: 8-byte little-endian header length,
JSON header with dtype, shape and data offsets per tensor, then the raw bytes).
"""

import json
import os
import struct
from pathlib import Path

import torch

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
INDEX_NAME = "model.safetensors.index.json"


def shard_name(k, n):
    """The conventional name of shard k (1-based) of n."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def write_shard(path, entries, metadata=None):
    """Write `entries`, a list of (name, dtype, shape, get) with get() -> tensor, as one safetensors file.

    Returns the number of data bytes. Tensors are fetched one at a time, in order.
    """
    path = Path(path)
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for name, dtype, shape, _ in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.parent / f".{path.name}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, dtype, shape, get in entries:
                t = get()
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: got {t.dtype} {tuple(t.shape)}, announced {dtype} {tuple(shape)}")
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                del t
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return offset


def tensor_entries(state):
    """write_shard entries of tensors already in memory ({name: tensor})."""
    return [(k, v.dtype, tuple(v.shape), (lambda v=v: v)) for k, v in state.items()]


def cast_entries(entries, dtype):
    """The same entries with floating tensors stored as `dtype` (integer buffers keep theirs)."""
    return [(name, dtype, shape, (lambda get=get: get().to(dtype))) if d.is_floating_point else
            (name, d, shape, get) for name, d, shape, get in entries]


def write_index(folder, weight_map, total_size):
    """The index that maps every tensor name to its shard file."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (Path(folder) / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
