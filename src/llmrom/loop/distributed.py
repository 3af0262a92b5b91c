"""One compression over several processes, on torch.distributed (launched by torchrun).

    torchrun --nproc-per-node 2 -m llmrom compress smollm2-135m --budget 0.8 --out out/s08

Every rank loads the model and makes the same calibration windows; rank 0 chooses the plan (on the planning
windows, as a single process would) and broadcasts it. The token embedding and the block loop then run on
each rank's contiguous share of the windows, and every moment (a linear's input statistics, the joint
moments of error correction, the token counts and the output layer's input moment) is summed across ranks
before it is used: moments are sums over tokens, so each rank holds exactly the statistics a single process
would have accumulated over all windows (to float summation order), and computes the same factors from them.
A checksum of the compressed weights is compared across ranks at the end; rank 0 evaluates and writes the
folder. Backend: gloo on CPU, NCCL on CUDA (each rank on the GPU its LOCAL_RANK names).
"""

import datetime
import os

import torch
import torch.distributed as dist

from ..errors import LlmromError

TIMEOUT = datetime.timedelta(hours=12)  # ranks 1.. wait in a collective while rank 0 plans or writes


def launched():
    """Whether this process was started by torchrun (or another launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device):
    """Join the process group torchrun describes in the environment (once per process); returns active()."""
    if not launched() or dist.is_initialized():
        return active()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if torch.device(device).index is not None:
            raise LlmromError(f"under torchrun each rank takes the GPU its LOCAL_RANK names; use --device cuda, "
                              f"not {device}")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return active()


def active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def backend():
    return dist.get_backend() if active() else None


def rank():
    return dist.get_rank() if active() else 0


def size():
    return dist.get_world_size() if active() else 1


def shard(tokens):
    """This rank's contiguous share of the calibration windows (all of them in a single process)."""
    if not active():
        return tokens
    if len(tokens) < size():
        raise LlmromError(f"{len(tokens)} calibration windows cannot be shared by {size()} processes; raise "
                          "--nsamples or start fewer processes")
    return tokens.tensor_split(size())[rank()]


def _sum(t):
    """All-reduce `t` in place (sum); NCCL reduces only GPU tensors, so a CPU one goes through a GPU copy."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        on_gpu = t.cuda()
        dist.all_reduce(on_gpu)
        t.copy_(on_gpu)
    else:
        dist.all_reduce(t)
    return t


def sum_tensors(*tensors):
    """Sum each tensor across ranks, in place (nothing in a single process)."""
    if active():
        for t in tensors:
            _sum(t)
    return tensors


def sum_count(n):
    """An integer summed across ranks (a token count)."""
    if not active():
        return n
    return int(_sum(torch.tensor([n], dtype=torch.float64)).item())


def sum_moments(m):
    """Sum a stats.Moments or stats.CrossMoments across ranks, in place; returns it."""
    if not active():
        return m
    if hasattr(m, "eh"):  # CrossMoments: the compressed input's moments, the error's, and their cross sum
        sum_moments(m.hat)
        sum_moments(m.err)
        _sum(m.eh)
        return m
    _sum(m.xx)
    _sum(m.x)
    m.n = sum_count(m.n)
    m._eigh.clear()
    return m


def broadcast(value):
    """Rank 0's `value` (any picklable object) on every rank."""
    if not active():
        return value
    box = [value if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(compute):
    """compute() run on rank 0 alone, its result broadcast to every rank; an LlmromError it raises is raised on
    every rank (each stops with rank 0's one line, instead of waiting on a peer that has gone).

    Meanwhile rank 0 computes with as many threads as a lone process would (torchrun starts each process with
    one): the others wait idle, and what it measures (the speed limits of --prefer speed) and decides (the
    plan) is then what one process would, the inference threads included. PyTorch's default inter-op pool
    size, which OMP_NUM_THREADS does not change, is that count."""
    if not active():
        return compute()
    result = None
    if rank() == 0:
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, torch.get_num_interop_threads()))
        try:
            result = ("ok", compute())
        except LlmromError as e:
            result = ("error", e)
        finally:
            torch.set_num_threads(threads)
    kind, value = broadcast(result)
    if kind == "error":
        raise value
    return value


def check_same_weights(model):
    """Refuse to go on if the ranks' compressed models differ (their factors must be computed from identical
    summed moments); a float64 checksum per tensor is compared."""
    if not active():
        return
    sums = [float(p.detach().double().sum()) for p in model.state_dict().values() if p.is_floating_point()]
    everyone = [None] * size()
    dist.all_gather_object(everyone, sums)
    if any(s != everyone[0] for s in everyone):
        raise LlmromError("the processes computed different compressed weights from the same summed moments; run "
                          "in one process, or report it with your torch version and devices")


def barrier():
    if active():
        dist.barrier()
