"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and update the kept weights to
minimise ‖(W − Ŵ)X‖² with the inverse Hessian.

The columns are walked in blocks of `block_size`. Within a block the mask is chosen
adaptively (unstructured: the smallest w²/[H⁻¹]²_jj per row segment, with an exact count;
N:M: per group of M columns, after the updates from earlier groups), the pruning errors
are propagated to the block's later columns, and the block's accumulated error is applied
lazily to all columns after it in one matrix product.

The paper's column-by-column loop inside a block is solved here in one step: with the mask
of a column group fixed, its errors E satisfy E·A_r = (W ⊙ m)_r per row r, where A_r is the
inverse Hessian's Cholesky factor U restricted to the pruned columns (identity elsewhere),
an upper-triangular system solved for all rows at once. It is the same arithmetic as the
loop (tests compare them), with one batched solve instead of one step per column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peakc.passes.calibration import damped_inverse_factor
from peakc.passes.prune.pattern import Pattern

_SOLVE_ROWS = 1024  # rows per batched triangular solve (bounds memory at rows·bs² floats)


@dataclass
class Segment:
    """Rows [start, stop) of a stacked weight, pruned to `sparsity` (one layer of several
    that share a Hessian, e.g. q/k/v)."""

    start: int
    stop: int
    sparsity: float


def inverse_hessian_factor(
    hessian: torch.Tensor, damp: float, layer: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the dampened inverse Hessian, and the dead-input mask.

    When the factorisation fails (a singular Hessian), damping is raised tenfold with a
    warning naming the layer; a factor that is still not finite is an error, never NaN weights.
    """
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    return damped_inverse_factor(h, damp, layer, "prune"), dead


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    segments: list[Segment],
    pattern: Pattern,
    block_size: int = 128,
    damp: float = 0.01,
    layer: str = "layer",
) -> torch.Tensor:
    """The pruned weight (fp32, same shape, dense with zeros) for `weight` [rows, cols]."""
    factor, dead = inverse_hessian_factor(hessian, damp, layer)
    w = weight.detach().float().clone()
    w[:, dead] = 0.0
    rows, cols = w.shape
    pruned = [0] * len(segments)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        u = factor[i1:i2, i1:i2]
        if pattern.structured:
            q, err = _prune_groups(w[:, i1:i2].clone(), u, pattern)
        else:
            mask = _block_mask(w[:, i1:i2], u, segments, pruned, i2)
            err = _masked_errors(mask, w[:, i1:i2], u)
            q = (w[:, i1:i2] - err @ torch.triu(u, 1)) * ~mask
        w[:, i1:i2] = q
        w[:, i2:] -= err @ factor[i1:i2, i2:]
    return w


def _block_mask(
    w1: torch.Tensor, u: torch.Tensor, segments: list[Segment], pruned: list[int], i2: int
) -> torch.Tensor:
    """Unstructured mask for a column block: in each segment the smallest w²/U_jj² scores,
    counted so the layer's total is exactly round(sparsity · rows · cols) at the end."""
    score = w1.pow(2) / u.diagonal().pow(2).unsqueeze(0)
    mask = torch.zeros_like(w1, dtype=torch.bool)
    for s, seg in enumerate(segments):
        goal = round(seg.sparsity * (seg.stop - seg.start) * i2)
        k = goal - pruned[s]
        if k > 0:
            part = score[seg.start : seg.stop].flatten()
            idx = torch.topk(part, k, largest=False).indices
            mask[seg.start : seg.stop].view(-1)[idx] = True
            pruned[s] = goal
    return mask


def _prune_groups(w1: torch.Tensor, u: torch.Tensor, pattern: Pattern):
    """N:M within a column block: choose each group's mask after earlier groups' updates."""
    rows, width = w1.shape
    m, drop = pattern.m, pattern.m - pattern.n
    q = torch.zeros_like(w1)
    err = torch.zeros_like(w1)
    diag = u.diagonal()
    for g in range(0, width, m):
        cols = slice(g, g + m)
        score = w1[:, cols].pow(2) / diag[cols].pow(2).unsqueeze(0)
        idx = torch.topk(score, drop, dim=1, largest=False).indices
        mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, idx, True)
        ug = u[cols, cols]
        e = _masked_errors(mask, w1[:, cols], ug)
        q[:, cols] = (w1[:, cols] - e @ torch.triu(ug, 1)) * ~mask
        w1[:, g + m :] -= e @ u[cols, g + m :]
        err[:, cols] = e
    return q, err


def _masked_errors(mask: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row r, E_r with E_r·A_r = (w ⊙ m)_r; A_r = U on pruned columns, identity elsewhere.

    On a GPU one batched triangular solve; on CPU, where building rows·bs² matrices is
    memory-bound, the same substitution column by column (rank-1 updates)."""
    if w.device.type == "cpu":
        return _masked_errors_by_column(mask, w, u)
    return _masked_errors_batched(mask, w, u)


def _masked_errors_by_column(mask: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Forward substitution: E_j = m_j·(w_j − Σ_{i<j} E_i·U_ij) / U_jj."""
    rest = w.clone()
    out = torch.zeros_like(w)
    keep = mask.to(w.dtype)
    for j in range(w.shape[1]):
        e = rest[:, j] * keep[:, j] / u[j, j]
        out[:, j] = e
        rest[:, j + 1 :] -= e.unsqueeze(1) * u[j, j + 1 :].unsqueeze(0)
    return out


def _masked_errors_batched(mask: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """All rows at once: a batch of upper-triangular solves, _SOLVE_ROWS rows at a time."""
    out = torch.zeros_like(w)
    eye = torch.eye(u.shape[0], device=u.device, dtype=torch.bool)
    for r0 in range(0, w.shape[0], _SOLVE_ROWS):
        m = mask[r0 : r0 + _SOLVE_ROWS]
        if not bool(m.any()):
            continue
        pair = m.unsqueeze(2) & m.unsqueeze(1)
        a = torch.where(pair, u.unsqueeze(0), 0.0) + (eye & ~m.unsqueeze(1)).float()
        b = (w[r0 : r0 + _SOLVE_ROWS] * m).unsqueeze(1)
        out[r0 : r0 + _SOLVE_ROWS] = torch.linalg.solve_triangular(
            a, b, upper=True, left=False
        ).squeeze(1)
    return out
