"""Where the calibration hidden states live between blocks: in memory or in files on disk.

A store holds one copy of the hidden states as a list of micro-batches. The block loop reads
micro-batch j (`store[j]`) and writes the block's output for it (`store[j] = out`); `end_block()`
makes the outputs the next block's inputs. Values are kept in the store's dtype (bf16/fp16 halve
the memory; the block computes in its own dtype).

`disk` keeps two files, one with the block's inputs and one receiving its outputs, so a store is
never half-overwritten: after `end_block()` the current file holds a consistent snapshot, which the
streaming resume journal points at. `cpu` writes that snapshot with `snapshot()` on request.
Files are read and written with plain reads and writes (no memory mapping), so only one
micro-batch is resident. `copied_store` makes an independent second store of the same kind and
dtype (error correction carries the dense model's hidden states in it); `scratch_store` an empty
one (the block loop keeps the residual stream after attention in it).
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import LlmromError

KINDS = ("cpu", "disk")
FILES = ("hidden-0.bin", "hidden-1.bin")


def _nbytes(shape, dtype):
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def _offsets(shapes, dtype):
    out, off = [], 0
    for s in shapes:
        out.append(off)
        off += _nbytes(s, dtype)
    return out


def write_records(path, tensors):
    """Write the micro-batches back to back (raw bytes) to `path` and fsync it."""
    with open(path, "wb") as f:
        for t in tensors:
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())


def read_record(f, offset, shape, dtype):
    out = torch.empty(shape, dtype=dtype)
    f.seek(offset)
    view = out.reshape(-1).view(torch.uint8).numpy()
    if f.readinto(view) != view.nbytes:
        raise LlmromError(f"{f.name} is truncated: the saved hidden states are incomplete; delete the partial "
                          "folder and start the run again without --resume")
    return out


class MemoryStore:
    """The hidden states as CPU tensors in `dtype`."""

    def __init__(self, tensors, dtype=None):
        self.dtype = dtype or tensors[0].dtype
        self.shapes = [tuple(t.shape) for t in tensors]
        self._t = [t.to(device="cpu", dtype=self.dtype) for t in tensors]

    def __len__(self):
        return len(self._t)

    def __getitem__(self, j):
        return self._t[j]

    def __setitem__(self, j, t):
        self._t[j] = t.to(device="cpu", dtype=self.dtype)

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def end_block(self):
        pass

    def snapshot(self, folder, avoid=None):
        """Write the current hidden states to a file in `folder` other than `avoid`; its name."""
        name = FILES[1] if avoid == FILES[0] else FILES[0]
        write_records(Path(folder) / name, self._t)
        return name

    def copy(self, folder=None):
        """An independent store holding the same hidden states (`folder` is unused)."""
        return MemoryStore([t.clone() for t in self._t], self.dtype)


class DiskStore:
    """The hidden states in two files of `folder`: `current` (the inputs) and the other (the outputs)."""

    def __init__(self, folder, shapes, dtype, current):
        self.folder, self.shapes, self.dtype, self.current = Path(folder), [tuple(s) for s in shapes], dtype, current
        self._offsets = _offsets(self.shapes, dtype)
        self._reader = self._writer = None

    @classmethod
    def create(cls, folder, tensors, dtype=None):
        dtype = dtype or tensors[0].dtype
        write_records(Path(folder) / FILES[0], [t.to(device="cpu", dtype=dtype) for t in tensors])
        return cls(folder, [t.shape for t in tensors], dtype, FILES[0])

    def _other(self):
        return FILES[1] if self.current == FILES[0] else FILES[0]

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, j):
        if self._reader is None:
            self._reader = open(self.folder / self.current, "rb")
        return read_record(self._reader, self._offsets[j], self.shapes[j], self.dtype)

    def __setitem__(self, j, t):
        if tuple(t.shape) != self.shapes[j]:
            raise ValueError(f"micro-batch {j} has shape {tuple(t.shape)}, expected {self.shapes[j]}")
        if self._writer is None:
            self._writer = open(self.folder / self._other(), "w+b")
            self._writer.truncate(_nbytes((sum(torch.Size(s).numel() for s in self.shapes),), self.dtype))
        self._writer.seek(self._offsets[j])
        self._writer.write(t.to(device="cpu", dtype=self.dtype).contiguous().reshape(-1).view(torch.uint8).numpy())

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def end_block(self):
        """The outputs written so far become the inputs (if the block wrote any)."""
        if self._writer is None:
            return
        self._writer.flush()
        os.fsync(self._writer.fileno())
        self.close()
        self.current = self._other()

    def snapshot(self, folder, avoid=None):
        if Path(folder) != self.folder:
            raise ValueError("a disk store snapshots only into its own folder")
        return self.current

    def copy(self, folder):
        """An independent store in `folder` holding the current hidden states (a copy of the input file).
        Only between blocks: outputs being written are not copied."""
        if self._writer is not None:
            raise ValueError("a disk store is copied between blocks, not while a block writes its outputs")
        shutil.copyfile(self.folder / self.current, Path(folder) / FILES[0])
        return DiskStore(folder, self.shapes, self.dtype, FILES[0])

    def close(self):
        for f in (self._reader, self._writer):
            if f is not None:
                f.close()
        self._reader = self._writer = None


def parse_dtype(name):
    from ..modeling.io import DTYPES
    return None if name is None else DTYPES[name]


@contextlib.contextmanager
def activation_store(tensors, kind="cpu", dtype=None, folder=None):
    """A store of `tensors` (a list of micro-batches); `disk` without a folder uses a temporary one."""
    if kind not in KINDS:
        raise LlmromError(f"--activations must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "cpu":
        yield MemoryStore(tensors, dtype)
        return
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="llmrom-activations-"))
        store = DiskStore.create(folder, tensors, dtype)
        tensors.clear()  # the files are the only copy now
        stack.callback(store.close)
        yield store


@contextlib.contextmanager
def scratch_store(like, dtype):
    """An empty store of the same kind and micro-batch shapes as `like`, in `dtype`: fill every
    micro-batch (`store[j] = t`), then `end_block()` makes them readable. A disk one lives in its own
    temporary folder, deleted on exit; a memory one allocates as it is filled."""
    if isinstance(like, MemoryStore):
        yield MemoryStore([torch.empty(s, dtype=dtype) for s in like.shapes], dtype)
        return
    with tempfile.TemporaryDirectory(prefix="llmrom-activations-") as folder:
        store = DiskStore(folder, like.shapes, dtype, FILES[0])
        try:
            yield store
        finally:
            store.close()


@contextlib.contextmanager
def copied_store(store):
    """A second store holding a copy of `store`'s hidden states, of the same kind and dtype; a disk
    copy lives in its own temporary folder, deleted on exit."""
    if isinstance(store, MemoryStore):
        yield store.copy()
        return
    with tempfile.TemporaryDirectory(prefix="llmrom-activations-") as folder:
        copy = store.copy(folder)
        try:
            yield copy
        finally:
            copy.close()
