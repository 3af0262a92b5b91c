"""LoRA adapters on the factors of compressed modules, their exact merge, and LoRA-GGPO perturbation.

An adapter wraps one nn.Linear (a factor `first` (r x d_in) or `second` (d_out x r) of a
FactorizedLinear, or a whole dense linear): y = x (W + s B A)^T + b with A (k x in), B (out x k),
s = alpha / k, A Kaiming-initialised and B zero, so training starts from the unadapted model.
Merging adds s B A into W: the factor keeps its shape, so the rank and the parameter count of the
compressed model are unchanged and the merged model computes what the adapted one did.

Why not one adapter beside the whole factorized map W = S F? A free-form update S F + B A has rank
up to r + k and cannot be folded into two factors of rank r. Adapting both factors,
(S + dS)(F + dF), adapts the whole map and merges exactly; that is `targets=("first", "second")`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LlmromError
from ..modeling.factorized import FactorizedLinear, replace_module

PARTS = ("first", "second")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update; `noise` (set by GGPO) perturbs W."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if not 1 <= rank <= min(base.in_features, base.out_features):
            raise LlmromError(f"--lora-rank {rank} does not fit a {base.out_features}x{base.in_features} weight; "
                              f"use 1..{min(base.in_features, base.out_features)} or adapt fewer/larger modules")
        self.base, self.rank, self.scale = base, rank, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.noise = None

    def forward(self, x):
        w = self.base.weight if self.noise is None else self.base.weight + self.noise
        return F.linear(x, w, self.base.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def effective_weight(self):
        return self.base.weight + self.scale * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight.copy_(self.effective_weight())
        return self.base


def target_linears(model, names, targets):
    """{dotted name: nn.Linear} to adapt: the chosen factors of FactorizedLinear modules, or dense linears."""
    bad = [t for t in targets if t not in PARTS]
    if bad or not targets:
        raise LlmromError(f"--lora-targets {','.join(targets)}: choose from first, second (comma-separated); "
                          "both together adapt the whole factorized map and still merge exactly")
    out = {}
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, FactorizedLinear):
            out.update({f"{name}.{t}": getattr(mod, t) for t in targets})
        elif isinstance(mod, nn.Linear):
            out[name] = mod
        else:
            raise LlmromError(f"{name} is a {type(mod).__name__}, not a linear layer; LoRA adapts linear layers")
    return out


def add_adapters(model, names, targets, rank, alpha):
    """Freeze the model and wrap the target linears; returns {name: LoRALinear}."""
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = {}
    for name, lin in target_linears(model, names, targets).items():
        adapters[name] = LoRALinear(lin, rank, alpha)
        replace_module(model, name, adapters[name])
    return adapters


def merge_adapters(model, adapters):
    """Fold every adapter into its weight and put the plain nn.Linear back (in place)."""
    for name, ad in adapters.items():
        replace_module(model, name, ad.merged())
    adapters.clear()


class GGPO:
    """LoRA-GGPO's gradient-guided perturbation (Chang et al., 2025, arXiv:2502.14538).

    LoRA-GGPO smooths the loss landscape like sharpness-aware minimisation, but with one forward and
    one backward per step: before each step the effective weight W' = W + s B A of every adapted
    layer is perturbed by Gaussian noise whose scale per output row i mixes that row's gradient norm
    and weight norm,

        eps[i, :] = (alpha * g[i] / mean(g) + beta) * ||W'[i, :]|| / sqrt(n_in) * z[i, :],   z ~ N(0, I)

    where g[i] = ||G[i, :]|| is the row norm of G = dL/dW', the gradient of the previous step (taken at
    the perturbed point; absent at the first step, so the first perturbation is weight-scaled only),
    and n_in the row length: ||W'[i, :]|| / sqrt(n_in) is the row's RMS, so alpha and beta are
    fractions of the weights' own scale. The loss and gradient of the step are computed at W' + eps
    and the adapter is updated with them; eps is then dropped (it never enters the weights, so the
    merge is unaffected). Rows with large gradients (sharp directions) and large weights get more
    noise, which steers training toward flat minima and damps the late rise of held-out loss
    ("double descent") that plain LoRA shows.

    The gradient enters relative to its mean over the layer's rows. The form alpha * ||G[i, :]||
    (gradient in absolute units) made the noise depend on the loss scale and the batch: with
    alpha = 1 it was larger than the weights and SmolLM2's held-out perplexity went 43 -> 242 in 4
    steps (bench/results/heal_smollm2-135m_0.8.md). Relative, it cannot outgrow the weights by
    more than alpha times the sharpest row's share.

    alpha (`--ggpo-alpha`): weight of the gradient-norm term; beta (`--ggpo-beta`): weight of the
    weight-norm term (the Flat-LoRA-like random perturbation); beta=alpha=0 is plain LoRA. Noise is
    drawn from its own seeded generator, saved in checkpoints, so resumed runs are reproducible.
    The gradient G is obtained by letting autograd reach the frozen base weight (it is never
    updated: it is not in the optimizer and its gradient is cleared after each step).
    """

    def __init__(self, adapters, alpha, beta, seed):
        if alpha < 0 or beta < 0:
            raise LlmromError(f"--ggpo-alpha and --ggpo-beta must be >= 0, got {alpha} and {beta}")
        self.adapters, self.alpha, self.beta = adapters, alpha, beta
        self.generator = torch.Generator().manual_seed(int(seed))
        self.grad_rows = {}
        for ad in adapters.values():
            ad.base.weight.requires_grad_(True)

    @torch.no_grad()
    def perturb(self):
        """Set the noise of every adapter for the coming step (call before its forward passes)."""
        for name, ad in self.adapters.items():
            w = ad.effective_weight()
            factor = torch.full((w.shape[0],), self.beta, dtype=torch.float32, device=w.device)
            if name in self.grad_rows:
                g = self.grad_rows[name].float()
                factor = factor + self.alpha * g / g.mean().clamp_min(1e-30)
            rms = w.float().norm(dim=1) / math.sqrt(w.shape[1])
            z = torch.randn(w.shape, generator=self.generator, dtype=torch.float32).to(w.device)
            ad.noise = ((factor * rms)[:, None] * z).to(w.dtype)

    @torch.no_grad()
    def collect(self):
        """After the step's backward passes: keep the row norms of G = dL/dW', drop the noise and G."""
        for name, ad in self.adapters.items():
            if ad.base.weight.grad is not None:
                self.grad_rows[name] = ad.base.weight.grad.norm(dim=1)
            ad.base.weight.grad, ad.noise = None, None

    def release(self):
        for ad in self.adapters.values():
            ad.noise = None
            ad.base.weight.requires_grad_(False)

    def state_dict(self):
        return {"generator": self.generator.get_state(), "grad_rows": dict(self.grad_rows)}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.grad_rows = dict(state["grad_rows"])
