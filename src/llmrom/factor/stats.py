"""Streaming statistics of a linear layer's inputs (or outputs): sum of x x^T, sum of x, token count.

Each chunk's Gram matrix is one fp32 GEMM (fast on CPU) added into a float64 accumulator, so the
sum over hundreds of thousands of tokens keeps float64 accuracy without fp64 GEMM cost.
"""

from dataclasses import dataclass, field

import torch

from ..errors import NonFiniteError


@dataclass
class Moments:
    """Second moment and mean of the vectors seen so far (float64)."""

    xx: torch.Tensor
    x: torch.Tensor
    n: int = 0
    _eigh: dict = field(default_factory=dict, repr=False, compare=False)  # centred -> eigh, until the next update

    @classmethod
    def zeros(cls, dim, device="cpu"):
        return cls(torch.zeros(dim, dim, dtype=torch.float64, device=device),
                   torch.zeros(dim, dtype=torch.float64, device=device))

    def update(self, x):
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.xx.add_(x.T @ x)  # promoted to float64 in place: no float64 temporary of d x d
        self.x += x.sum(0, dtype=torch.float64)
        self.n += x.shape[0]
        self._eigh.clear()

    def eigh(self, centered):
        """torch.linalg.eigh of the covariance (centred) or the second moment, computed once and
        shared by every linear that reads these inputs (until the next update)."""
        if centered not in self._eigh:
            self._eigh[centered] = torch.linalg.eigh(self.covariance() if centered else self.second_moment())
        return self._eigh[centered]

    def second_moment(self):
        return self.xx / self.n

    def mean(self):
        return self.x / self.n

    def covariance(self):
        m = self.mean()
        return self.second_moment().addr_(m, m, alpha=-1)  # in place: one d x d matrix, not three

    def check_finite(self, where):
        if self.n == 0:
            raise RuntimeError(f"no calibration tokens reached {where}")
        if not (torch.isfinite(self.xx).all() and torch.isfinite(self.x).all()):
            raise NonFiniteError(
                f"non-finite activations at {where}: the model overflows on the calibration "
                "text in this dtype; load it in float32 (--dtype float32) or check the weights"
            )


@dataclass
class CrossMoments:
    """Joint moments of one linear's input in the dense model (x) and in the compressed one (x_hat).

    Token by token, x_hat = the input the layer sees in the partly compressed model and x = the
    input the same token reaches it with in the dense model. Kept as the moments of x_hat, of the
    upstream error e = x_hat - x, and the cross sum e x_hat^T: e is small, so every quantity
    (the error terms especially) is accumulated without cancelling large sums against each other,
    and x_hat == x gives e == 0 exactly (no correction at all). Three float64 d x d matrices.
    """

    hat: Moments  # x_hat
    err: Moments  # e = x_hat - x
    eh: torch.Tensor  # sum e x_hat^T

    @classmethod
    def zeros(cls, dim, device="cpu"):
        return cls(Moments.zeros(dim, device), Moments.zeros(dim, device),
                   torch.zeros(dim, dim, dtype=torch.float64, device=device))

    @property
    def n(self):
        return self.hat.n

    def update(self, x, x_hat):
        """Add the tokens of the dense input `x` and the compressed input `x_hat` (same shape)."""
        if x.shape != x_hat.shape:
            raise ValueError(f"dense and compressed inputs differ in shape: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
        x_hat = x_hat.reshape(-1, x_hat.shape[-1]).to(torch.float32)
        e = x_hat - x.reshape(-1, x.shape[-1]).to(device=x_hat.device, dtype=torch.float32)
        self.hat.update(x_hat)
        self.err.update(e)
        self.eh.add_(e.T @ x_hat)

    def error_hat_moment(self):
        """E[e x_hat^T]."""
        return self.eh / self.n

    def error_hat_covariance(self):
        """Cov(e, x_hat) = E[e x_hat^T] - E[e] E[x_hat]^T."""
        return self.error_hat_moment().addr_(self.err.mean(), self.hat.mean(), alpha=-1)

    def dense_mean(self):
        """E[x] = E[x_hat] - E[e]."""
        return self.hat.mean() - self.err.mean()

    def dense_second_moment(self):
        """E[x x^T] = E[x_hat x_hat^T] - E[e x_hat^T] - E[x_hat e^T] + E[e e^T]."""
        eh = self.error_hat_moment()
        return self.hat.second_moment() - eh - eh.T + self.err.second_moment()

    def check_finite(self, where):
        self.hat.check_finite(where)
        self.err.check_finite(where + " (dense model)")
        if not torch.isfinite(self.eh).all():
            raise NonFiniteError(f"non-finite activations entering {where} (dense model): the model overflows on "
                                 "the calibration text in this dtype; load it in float32 (--dtype float32)")
