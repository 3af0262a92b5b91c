"""The interpolative form of a rank-r factorization: the same map with r^2 fewer stored numbers.

A rank-r matrix W ~ B A (B: d_out x r, A: r x d_in) has r (d_in + d_out - r) degrees of freedom, not
r (d_in + d_out): for any invertible r x r G, B A = (B G^-1)(G A). Choosing G = B[J], the rows J of
B, makes rows J of B G^-1 the identity, so only the other d_out - r rows C = B[O] G^-1 and
A' = G A need storing, plus the order of the outputs (d_out integers):

    z = A' x;  y = [z, C z] re-ordered, i.e. y[J] = z and y[O] = C z          (side "out").

The same on the input side, with r columns K of A made the identity (d_in integers):

    z = x[K] + D x[O];  y = B' z                                              (side "in").

Each call then gathers one activation of the identity's side, so the smaller side is used
(`side_for`): a copy of T x min(d_in, d_out) numbers beside the two matrix products.

The map is unchanged (up to rounding), so a budget buys a larger rank: at a module budget of 0.85 of
a square matrix, r/d = 1 - sqrt(0.15) = 0.61 instead of 0.425. J is chosen so that G is well
conditioned: rows from LU with partial pivoting, then maxvol swaps while some |C| > 2 (Goreinov,
Oseledets, Savostyanov, Tyrtyshnikov and Zamarashkin, "How to find a good submatrix", 2010), so no
entry of C is large and rounding in low precision stays about as small as for B itself. G itself is
never stored or inverted in low precision: A' and C are computed in float64, then cast.
"""

import torch


def maxvol_rows(b, tol=1.0, max_swaps=None):
    """Indices J of r rows of `b` (d_out x r, rank r) with |b[O] b[J]^-1| <= 1 + tol (or `max_swaps`
    swaps done, default r), and that coefficient matrix (d_out x r, identity in rows J)."""
    n, r = b.shape
    lu, piv, _ = torch.linalg.lu_factor_ex(b)  # a singular b is refused by the solve below
    perm = list(range(n))
    for i, p in enumerate(piv.tolist()):  # LAPACK row swaps, applied in order
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    rows = torch.tensor(perm[:r], device=b.device)
    coef = torch.linalg.solve(b[rows].T, b.T)  # (r x n): coef.T = b b[J]^-1
    for _ in range(r if max_swaps is None else max_swaps):
        size = coef.abs()
        size[:, rows] = 0  # the identity's own columns (rounding may leave them a little above 1)
        i, j = divmod(int(size.argmax()), n)
        if float(coef[i, j].abs()) <= 1 + tol:
            break
        rows[i] = j
        col, row = coef[:, j].clone(), coef[i].clone()
        row[j] -= 1.0
        coef -= torch.outer(col, row / col[i])
    return rows, torch.linalg.solve(b[rows].T, b.T).T  # recomputed: the rank-1 updates' rounding goes


def side_for(d_in, d_out):
    """Which side's identity the interpolative form uses: the smaller one, so its d_out or d_in
    stored indices and the one gather per call are the fewer ("in" on ties)."""
    return "in" if d_in <= d_out else "out"


def interpolative(second, first, side="out"):
    """(first', second', order), computed in float64 and cast back, with second @ first equal to:

    side "out": P [I; second'] first', i.e. z = first' x (r x d_in), y = [z, second' z] re-ordered,
        second' = C ((d_out - r) x r), `order` (d_out, int32): output o is entry order[o] of [z, C z];
    side "in": second' [I, first'] P^T, i.e. z = x[K] + first' x[O] (first' = D, r x (d_in - r)),
        y = second' z (d_out x r), `order` (d_in, int32) = [K, O]: the input gather.
    """
    if side == "in":
        d, coef_t, order = interpolative(first.T, second.T, "out")
        return coef_t.T.contiguous(), d.T.contiguous(), _gather_order(order)
    if side != "out":
        raise ValueError(f"side must be 'in' or 'out', got {side!r}")
    dtype = first.dtype
    b, a = second.double(), first.double()
    n, r = b.shape
    if r >= n:
        raise ValueError(f"the interpolative form needs rank < {n} (the identity's side), got rank {r}")
    rows, coef = maxvol_rows(b)
    keep = torch.ones(n, dtype=torch.bool, device=b.device)
    keep[rows] = False
    others = torch.arange(n, device=b.device)[keep]
    order = torch.empty(n, dtype=torch.int32, device=b.device)
    order[torch.cat([rows, others])] = torch.arange(n, dtype=torch.int32, device=b.device)
    return (b[rows] @ a).to(dtype), coef[others].to(dtype), order


def _gather_order(positions):
    """The gather [K, O] from the positions order[o] of each index o in [K, O] (its inverse)."""
    gather = torch.empty_like(positions)
    gather[positions.long()] = torch.arange(positions.numel(), dtype=positions.dtype, device=positions.device)
    return gather
