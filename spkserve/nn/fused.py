"""Fused, memory-lean autograd functions for inference (forces and stress without double backward).

Plain autograd keeps every [P, F] intermediate of every interaction block alive
until the backward pass; on large systems that memory traffic dominates. The
functions here save only per-atom tensors (and, for SchNet, the raw filter of
each block) and recompute the cheap pair tensors in their backward. Their
backward is not itself differentiable (``once_differentiable``), so models use
them only when no graph of the derivatives is wanted (evaluation mode,
``create_graph=False``); training and second derivatives take the plain path.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


def _zeros(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((n,) + tuple(like.shape[1:]), dtype=like.dtype, device=like.device)


class SchNetFilterConv(torch.autograd.Function):
    """out_i = sum_j y_j * (softplus(rbf_ij W1 + b1) W2 + b2) * fcut_ij   (one SchNet block).

    Saves y [N, F], rbf [P, R], fcut [P] and the raw filter [P, F]; recomputes the
    first filter layer in the backward.
    """

    @staticmethod
    def forward(ctx, y, rbf, fcut, w1, b1, w2, b2, idx_i, idx_j):
        a = torch.addmm(b1, rbf, w1)
        w_raw = torch.addmm(b2, F.softplus(a), w2)  # [P, F]
        m = y.index_select(0, idx_j) * w_raw * fcut[:, None]
        out = _zeros(y.shape[0], y).index_add_(0, idx_i, m)
        ctx.save_for_backward(y, rbf, fcut, w1, b1, w2, w_raw, idx_i, idx_j)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        y, rbf, fcut, w1, b1, w2, w_raw, idx_i, idx_j = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_i = g.index_select(0, idx_i)  # [P, F]
        y_j = y.index_select(0, idx_j)
        gw = g_i * w_raw  # d out / d (y_j fcut)
        grad_y = grad_rbf = grad_fcut = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if need[0]:
            grad_y = _zeros(y.shape[0], y).index_add_(0, idx_j, gw * fcut[:, None])
        if need[2]:
            grad_fcut = (gw * y_j).sum(1)
        if need[1] or need[3] or need[4] or need[5] or need[6]:
            u = g_i.mul_(y_j).mul_(fcut[:, None])  # d / d w_raw  (reuses g_i)
            a = torch.addmm(b1, rbf, w1)
            if need[5]:
                grad_w2 = F.softplus(a).T @ u
            if need[6]:
                grad_b2 = u.sum(0)
            grad_a = (u @ w2.T).mul_(torch.sigmoid(a))
            if need[1]:
                grad_rbf = grad_a @ w1.T
            if need[3]:
                grad_w1 = rbf.T @ grad_a
            if need[4]:
                grad_b1 = grad_a.sum(0)
        return grad_y, grad_rbf, grad_fcut, grad_w1, grad_b1, grad_w2, grad_b2, None, None


class PaiNNMessage(torch.autograd.Function):
    """PaiNN message block: returns (dq [N, F], dmu [N, 3, F]).

    x = context(q) [N, 3F]; w = w_raw * fcut [P, 3F]; dir_ij [P, 3].
    dq_i = sum_j (x_j w_ij)[:F];  dmu_i = sum_j (x_j w_ij)[F:2F] dir_ij + (x_j w_ij)[2F:] mu_j.
    Saves only per-atom tensors, the (shared) raw filter and the unit vectors.
    """

    @staticmethod
    def forward(ctx, x, mu, w_raw, fcut, dir_ij, idx_i, idx_j):
        n, nf = x.shape[0], mu.shape[2]
        xw = x.index_select(0, idx_j) * w_raw * fcut[:, None]  # [P, 3F]
        dq_p, dmu_r, dmu_mu = xw.split(nf, dim=-1)
        dmu_p = torch.addcmul(dmu_r.unsqueeze(1) * dir_ij.unsqueeze(-1), dmu_mu.unsqueeze(1), mu.index_select(0, idx_j))
        dq = _zeros(n, dq_p).index_add_(0, idx_i, dq_p)
        dmu = _zeros(n, dmu_p).index_add_(0, idx_i, dmu_p)
        ctx.save_for_backward(x, mu, w_raw, fcut, dir_ij, idx_i, idx_j)
        return dq, dmu

    @staticmethod
    @once_differentiable
    def backward(ctx, g_dq, g_dmu):
        x, mu, w_raw, fcut, dir_ij, idx_i, idx_j = ctx.saved_tensors
        need = ctx.needs_input_grad
        n, nf = x.shape[0], mu.shape[2]
        w = w_raw * fcut[:, None]
        x_j = x.index_select(0, idx_j)
        xw = x_j * w
        _, dmu_r, dmu_mu = xw.split(nf, dim=-1)
        gmu_i = g_dmu.index_select(0, idx_i)  # [P, 3, F]
        grad_x = grad_mu = grad_w_raw = grad_fcut = grad_dir = None
        if need[1]:
            grad_mu = _zeros(n, mu).index_add_(0, idx_j, gmu_i * dmu_mu.unsqueeze(1))
        if need[4]:
            grad_dir = (gmu_i * dmu_r.unsqueeze(1)).sum(2)
        # gradient with respect to xw [P, 3F]
        g_xw = torch.cat(
            [
                g_dq.index_select(0, idx_i),
                (gmu_i * dir_ij.unsqueeze(-1)).sum(1),
                (gmu_i * mu.index_select(0, idx_j)).sum(1),
            ],
            dim=-1,
        )
        if need[0]:
            grad_x = _zeros(n, x).index_add_(0, idx_j, g_xw * w)
        if need[2] or need[3]:
            g_w = g_xw.mul_(x_j)
            if need[3]:
                grad_fcut = (g_w * w_raw).sum(1)
            if need[2]:
                grad_w_raw = g_w.mul_(fcut[:, None])
        return grad_x, grad_mu, grad_w_raw, grad_fcut, grad_dir, None, None


def hermite_coefficients(values: torch.Tensor, slopes: torch.Tensor, spacing: float) -> torch.Tensor:
    """Cubic Hermite polynomial coefficients on a uniform grid.

    ``values``/``slopes`` [G+1, ...] at knots k*spacing -> coefficients [G, 4, ...] so that on
    interval k, f(k*spacing + s*spacing) = c0 + s c1 + s^2 c2 + s^3 c3 for s in [0, 1].
    """
    p0, p1 = values[:-1], values[1:]
    m0, m1 = slopes[:-1] * spacing, slopes[1:] * spacing
    c2 = -3.0 * p0 - 2.0 * m0 + 3.0 * p1 - m1
    c3 = 2.0 * p0 + m0 - 2.0 * p1 + m1
    return torch.stack([p0, m0, c2, c3], dim=1)


def _hermite(c: torch.Tensor, k: torch.Tensor, s: torch.Tensor, slope: bool = False):
    """Value (and d value / d s) of the cubic on intervals ``k`` at ``s`` [P, 1].

    ``c`` [4, G, F] (coefficient-major, so every gather is contiguous).
    """
    c3 = c[3].index_select(0, k)
    c2 = c[2].index_select(0, k)
    c1 = c[1].index_select(0, k)
    ds = None
    if slope:
        ds = (c3 * (3.0 * s)).add_(c2, alpha=2.0).mul_(s).add_(c1)
    w = c3.mul_(s).add_(c2).mul_(s).add_(c1).mul_(s).add_(c[0].index_select(0, k))
    return w, ds


class TabulatedFilterConv(torch.autograd.Function):
    """out_i = sum_j y_j * W(d_ij) with the filter W read from a cubic Hermite table.

    ``coeffs`` [4, G, F] (:func:`hermite_coefficients` moved to coefficient-major) on
    the grid k / inv_spacing; distances must lie in [0, G / inv_spacing]. The
    derivative with respect to d_ij is the exact derivative of the interpolant, so
    forces stay conservative.
    """

    @staticmethod
    def forward(ctx, y, d, coeffs, inv_spacing: float, idx_i, idx_j):
        t = d * inv_spacing
        k = t.long().clamp_(0, coeffs.shape[1] - 1)
        s = (t - k.to(t.dtype)).unsqueeze(1)  # [P, 1]
        w, _ = _hermite(coeffs, k, s)
        m = w.mul_(y.index_select(0, idx_j))
        out = _zeros(y.shape[0], y).index_add_(0, idx_i, m)
        ctx.save_for_backward(y, coeffs, k, s, idx_i, idx_j)
        ctx.inv_spacing = inv_spacing
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        y, coeffs, k, s, idx_i, idx_j = ctx.saved_tensors
        need = ctx.needs_input_grad
        w, dw = _hermite(coeffs, k, s, slope=need[1])
        g_i = g.index_select(0, idx_i)
        grad_y = grad_d = None
        if need[1]:
            grad_d = (dw.mul_(g_i).mul_(y.index_select(0, idx_j))).sum(1) * ctx.inv_spacing
        if need[0]:
            grad_y = _zeros(y.shape[0], y).index_add_(0, idx_j, w.mul_(g_i))
        return grad_y, grad_d, None, None, None, None
