"""Perplexity: exp(mean cross-entropy over every predicted token) of non-overlapping windows."""

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import NonFiniteError


LOGITS_BUDGET = 2**26  # float32 logits per forward (256 MiB): large vocabularies get smaller batches


@torch.no_grad()
def mean_nll(model, windows, batch_size=None, progress=False, desc="perplexity", inputs_embeds=None):
    """Mean next-token negative log-likelihood over all windows (each predicts seqlen-1 tokens).

    `inputs_embeds` (one row per window) is fed to the model instead of the windows' token ids, which
    then serve as labels only."""
    device = next(model.parameters()).device
    if batch_size is None:
        batch_size = max(1, LOGITS_BUDGET // (windows.shape[1] * model.get_output_embeddings().out_features))
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress, leave=False):
        ids = windows[start:start + batch_size].to(device)
        feed = {"input_ids": ids} if inputs_embeds is None else \
            {"inputs_embeds": inputs_embeds[start:start + batch_size].to(device)}
        logits = model(**feed, use_cache=False).logits.float()
        # window by window: logits[b, :-1] is a view, so no copy of the batch's logits is made (on SmolLM2's
        # planning this was 0.5 GiB of the peak: the flattened slice and its log-softmax, each as large)
        nll = torch.stack([F.cross_entropy(logits[b, :-1], ids[b, 1:], reduction="sum") for b in range(len(ids))])
        del logits
        bad = (~torch.isfinite(nll)).nonzero()
        if len(bad):
            raise NonFiniteError(f"non-finite loss in evaluation window {start + int(bad[0])}")
        total += float(nll.sum())
        count += ids.shape[0] * (ids.shape[1] - 1)
    return total / count


def perplexity(model, windows, batch_size=None, progress=False):
    return math.exp(mean_nll(model, windows, batch_size, progress))
