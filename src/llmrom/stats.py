"""Streaming statistics of a linear layer's inputs (or outputs): sum of x x^T, sum of x, token count.

Each chunk's Gram matrix is one fp32 GEMM (fast on CPU) added into a float64 accumulator, so the
sum over hundreds of thousands of tokens keeps float64 accuracy without fp64 GEMM cost.
"""

from dataclasses import dataclass

import torch

from .errors import NonFiniteError


@dataclass
class Moments:
    """Second moment and mean of the vectors seen so far (float64)."""

    xx: torch.Tensor
    x: torch.Tensor
    n: int = 0

    @classmethod
    def zeros(cls, dim, device="cpu"):
        return cls(torch.zeros(dim, dim, dtype=torch.float64, device=device),
                   torch.zeros(dim, dtype=torch.float64, device=device))

    def update(self, x):
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.xx.add_(x.T @ x)  # promoted to float64 in place: no float64 temporary of d x d
        self.x += x.sum(0, dtype=torch.float64)
        self.n += x.shape[0]

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
