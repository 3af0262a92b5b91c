"""Run by torchrun in tests/test_distributed.py: compress a tiny model with llmrom.compress on every rank
(each with its share of the calibration windows), then rank 0 saves the logits and the plan.

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py FAMILY OUT.pt '{"budget": 0.8}'
"""

import json
import sys

import torch

from conftest import calib_tokens, tiny_model

import llmrom
from llmrom.config import CompressConfig
from llmrom.loop import distributed


def compressed_logits(family, options, tokens=None):
    """(logits of the compressed tiny model on fixed probes, its report): the same in one process or many."""
    tokens = calib_tokens(12, 16) if tokens is None else tokens
    model, report = llmrom.compress(tiny_model(family), None, CompressConfig(**options), progress=False,
                                    tokens=tokens)
    with torch.no_grad():
        return model(input_ids=calib_tokens(4, 16, seed=1)).logits, report


if __name__ == "__main__":
    family, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.manual_seed(0)
    if not distributed.setup("cpu"):
        sys.exit("expected a torchrun launch with more than one process")
    import llmrom.api
    plan, seen = llmrom.api.choose_plan, {}

    def choose_plan(*args, **kwargs):  # the threads rank 0 plans with
        seen["planning_threads"] = torch.get_num_threads()
        return plan(*args, **kwargs)
    llmrom.api.choose_plan = choose_plan
    logits, report = compressed_logits(family, options)
    if distributed.rank() == 0:
        torch.save({"logits": logits, "plan": report["plan"], "processes": report["processes"],
                    "modules": report["modules"], "loop_threads": torch.get_num_threads(),
                    "lone_threads": torch.get_num_interop_threads(), **seen}, out)
    distributed.barrier()
