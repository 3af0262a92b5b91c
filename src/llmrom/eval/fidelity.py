"""Fidelity of a compressed model to its dense original on held-out windows.

Per predicted token: KL(p_dense || p_compressed) of the next-token distributions, and whether both
models' most likely next token agree. Reported as means over every position of every window.
"""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LlmromError, NonFiniteError
from .perplexity import LOGITS_BUDGET


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def fidelity(model, reference, windows, batch_size=None, progress=False):
    """{"kl_mean": nats per token, "top1_agreement": fraction, "tokens": positions compared}."""
    vocab = model.get_output_embeddings().out_features
    if reference.get_output_embeddings().out_features != vocab:
        raise LlmromError(f"the reference model's vocabulary ({reference.get_output_embeddings().out_features}) "
                          f"differs from the evaluated model's ({vocab}); give the dense model it was compressed from")
    if batch_size is None:
        batch_size = max(1, LOGITS_BUDGET // (2 * windows.shape[1] * vocab))
    kl_sum, agree, count = 0.0, 0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="fidelity", disable=not progress, leave=False):
        ids = windows[start:start + batch_size]
        logp = F.log_softmax(model(input_ids=ids.to(_device(model)), use_cache=False).logits.float().cpu(), -1)
        logq = F.log_softmax(reference(input_ids=ids.to(_device(reference)), use_cache=False).logits.float().cpu(), -1)
        kl = F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1)  # KL(reference || model)
        if not torch.isfinite(kl).all():
            bad = start + int((~torch.isfinite(kl)).any(-1).nonzero()[0])
            raise NonFiniteError(f"non-finite KL divergence in evaluation window {bad}")
        kl_sum += float(kl.sum())
        agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
        count += kl.numel()
    return {"kl_mean": kl_sum / count, "top1_agreement": agree / count, "tokens": count}
