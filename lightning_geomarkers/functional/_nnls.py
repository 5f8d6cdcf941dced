"""Batched exact non-negative least squares for the GLUE dual.

For every probe q the GLUE dual is

    lambda_q = argmin_{lambda >= 0} || G_q^T lambda - t_q ||^2,     G_q = diag(sigma_q) X_b,

where X_b (T, N) stacks the points of problem group b, and sigma_q in {+1, -1}^T repeats the probe's
dichotomy over the points of each manifold (0 marks padding). The Gram matrix of G_q is
D_sigma (X X^T) D_sigma, so ONE Gram K_b = X_b X_b^T serves every probe and dichotomy of a group, and
the reduced system on a passive set F,

    (G_F G_F^T) lambda_F = G_F t   <=>   K_FF (sigma_F * lambda_F) = (X t)_F,

does not depend on the signs at all: the dichotomy enters only through the feasibility tests.

Why an active-set method: the supports are tiny (a handful of touching points per manifold) while the
number of points T is hundreds, so iterating on small F x F systems is far cheaper than first-order
sweeps over T x T, and the answer is exact (Lawson-Hanson terminates at a KKT point) instead of
approximate. All probes advance together; each iteration gathers the padded F x F blocks of the
probes still running and solves them with one batched Cholesky in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["NNLSSolution", "batched_nnls", "separable_dichotomies"]


@dataclass
class NNLSSolution:
    """Solution of a batch of NNLS problems.

    Attributes:
        lam: (Q, T) non-negative multipliers, exactly zero off the passive set.
        proj_norm2: (Q,) squared norm of the cone projection ||G^T lambda||^2.
        kkt_violation: (Q,) largest violation of the KKT conditions, relative to ||t|| * max ||x||.
        iterations: number of batched iterations run.
        converged: (Q,) True where the KKT conditions were certified.
    """

    lam: torch.Tensor
    proj_norm2: torch.Tensor
    kkt_violation: torch.Tensor
    iterations: int
    converged: torch.Tensor


def _gram_rows(gram: torch.Tensor, group: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(Q, s, T) rows gram[group[q]][idx[q]], by a 1-D ``index_select`` on linear row indices (much
    faster than multi-dimensional advanced indexing)."""
    n_points = gram.shape[-1]
    flat_rows = gram.reshape(-1, n_points)
    return flat_rows.index_select(0, (group[:, None] * n_points + idx).reshape(-1)).view(*idx.shape, n_points)


def _solve_spd(blocks: torch.Tensor, rhs: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Solve batched SPD systems; fall back to an absolute-cut-off pseudo-inverse where Cholesky fails."""
    chol, info = torch.linalg.cholesky_ex(blocks)
    sol = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    bad = info != 0
    if bool(bad.any()):
        evals, evecs = torch.linalg.eigh(blocks[bad])
        inv = torch.where(evals > cutoff, 1.0 / evals.clamp_min(cutoff), torch.zeros_like(evals))
        coef = (evecs.transpose(-1, -2) @ rhs[bad].unsqueeze(-1)).squeeze(-1) * inv
        sol[bad] = (evecs @ coef.unsqueeze(-1)).squeeze(-1)
    return sol


def _padded_support(passive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the passive set of each row, padded to the largest size, and the validity mask."""
    counts = passive.sum(1)
    s_max = max(int(counts.max()), 1)
    # A stable sort puts the True positions first, in index order.
    order = torch.sort((~passive).to(torch.int8), dim=1, stable=True).indices[:, :s_max]
    valid = torch.arange(s_max, device=passive.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def _dual(
    rows: torch.Tensor,
    valid: torch.Tensor,
    u: torch.Tensor,
    h: torch.Tensor,
    sigma: torch.Tensor,
    rank_one: torch.Tensor | None,
    rank_one_f: torch.Tensor | None,
) -> torch.Tensor:
    """w = sigma * (X t - K (sigma * lambda)): the negative gradient.

    rows: (Q, s, T) Gram rows of the passive set; u = sigma_F * lambda_F padded (zero where not valid);
    rank_one / rank_one_f: the optional rank-one term v (Q, T) and its passive entries v_F (Q, s).
    """
    u = u * valid
    ku = torch.einsum("qs,qst->qt", u, rows)
    if rank_one is not None and rank_one_f is not None:
        ku = ku + rank_one * (rank_one_f * u).sum(1, keepdim=True)
    return sigma * (h - ku)


@dataclass
class _WorkingSet:
    """Per-row state of the batched Lawson-Hanson iteration (rows still running).

    The passive set of each row is kept as padded slots (indices into the points, their multipliers
    and a validity mask) that are updated in place: adding fills a free slot, dropping clears one, so no
    per-iteration sort or re-gather of dense (Q, T) arrays is needed.
    """

    rows: torch.Tensor
    group: torch.Tensor
    h: torch.Tensor
    sigma: torch.Tensor
    rank_one: torch.Tensor | None
    w_tol: torch.Tensor
    passive: torch.Tensor
    blocked: torch.Tensor
    slots: torch.Tensor
    valid: torch.Tensor
    x: torch.Tensor
    w: torch.Tensor
    pending: torch.Tensor
    done: torch.Tensor
    krows: torch.Tensor  # (rows, slots, T): cached Gram row of each slot's point

    def compress(self, keep: torch.Tensor) -> None:
        """Keep only the selected rows of every per-row field."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, value[keep])

    def insert(self, adding: torch.Tensor, j: torch.Tensor, gram: torch.Tensor) -> None:
        """Put point j[r] into a free slot of every adding row r (growing the slots when full), and cache
        its Gram row, so later iterations never re-gather the passive set's rows."""
        if not bool((~self.valid[adding]).any(1).all()):
            # Grow geometrically: each growth copies the cached rows, so do it rarely.
            n, grow = self.slots.shape[0], max(4, self.slots.shape[1] // 2)
            self.slots = torch.cat([self.slots, self.slots.new_zeros((n, grow))], 1)
            self.valid = torch.cat([self.valid, self.valid.new_zeros((n, grow))], 1)
            self.x = torch.cat([self.x, self.x.new_zeros((n, grow))], 1)
            self.krows = torch.cat([self.krows, self.krows.new_zeros((n, grow, self.krows.shape[2]))], 1)
        r = adding.nonzero().squeeze(1)
        n_slots, n_points = self.slots.shape[1], self.passive.shape[1]
        # Linear indices into flat views: much faster than 2-D advanced-index assignment.
        cell = r * n_slots + (~self.valid[r]).to(torch.int8).argmax(1)
        self.slots.view(-1)[cell] = j[r]
        self.valid.view(-1)[cell] = True
        self.x.view(-1)[cell] = 0.0
        self.passive.view(-1)[r * n_points + j[r]] = True
        self.krows.view(-1, n_points).index_copy_(
            0, cell, _gram_rows(gram, self.group[r], j[r, None]).squeeze(1)
        )

    def solve_passive(self, cutoff: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unconstrained least squares on each row's passive slots: K_FF u = h_F, lambda_F = sigma_F u.

        Returns the candidate multipliers per slot (0 on free slots) and the rank-one term's entries.
        """
        n_slots = self.slots.shape[1]
        blocks = torch.gather(self.krows, 2, self.slots[:, None, :].expand(-1, n_slots, -1))
        r1_f = None if self.rank_one is None else torch.gather(self.rank_one, 1, self.slots)
        if r1_f is not None:
            blocks = blocks + r1_f[:, :, None] * r1_f[:, None, :]
        pad2 = ~(self.valid[:, :, None] & self.valid[:, None, :])
        eye = torch.eye(n_slots, dtype=blocks.dtype, device=blocks.device)
        blocks = torch.where(pad2, eye.expand_as(blocks), blocks)
        sig_f = torch.gather(self.sigma, 1, self.slots) * self.valid
        u = _solve_spd(blocks, torch.gather(self.h, 1, self.slots) * self.valid, cutoff)
        return sig_f * u, r1_f

    def write_back(
        self,
        sel: torch.Tensor,
        lam_out: torch.Tensor,
        done_out: torch.Tensor,
        n_points: int,
        certified: bool = True,
    ) -> None:
        """Scatter the multipliers of the selected rows into the dense (Q, T) output."""
        if not bool(sel.any()):
            return
        slots = torch.where(self.valid[sel], self.slots[sel], n_points)  # padding -> a spare column
        dense = lam_out.new_zeros((slots.shape[0], n_points + 1))
        dense.scatter_(1, slots, self.x[sel] * self.valid[sel])
        lam_out[self.rows[sel]] = dense[:, :n_points]
        done_out[self.rows[sel]] = certified


def batched_nnls(
    gram: torch.Tensor,
    group: torch.Tensor,
    h: torch.Tensor,
    sigma: torch.Tensor,
    t_norm: torch.Tensor,
    *,
    point_scale: float = 1.0,
    max_iter: int | None = None,
    tol: float = 1e-10,
    cutoff: float = 1e-12,
    rank_one: torch.Tensor | None = None,
) -> NNLSSolution:
    """Solve Q NNLS problems that share B Gram matrices, exactly (batched Lawson-Hanson).

    Args:
        gram: (B, T, T) Gram matrices X_b X_b^T (float64; padding rows/cols are zero).
        group: (Q,) int64 index of each problem's Gram matrix.
        h: (Q, T) the products X_b t_q.
        sigma: (Q, T) point signs in {+1, -1}, 0 on padding (padding never enters the passive set).
        t_norm: (Q,) ||t_q||, used to make the tolerances scale free.
        point_scale: largest point norm, for the same reason.
        max_iter: cap on batched iterations (default 3 T + 30, far above what LH needs in practice).
        tol: relative dual-feasibility tolerance: a point enters while its w_i > tol ||t|| max||x||.
        cutoff: eigenvalue cut-off of the fallback pseudo-inverse for singular passive blocks.
        rank_one: optional (Q, T) v_q making problem q's (unsigned) Gram K_b + v_q v_q^T (used by the
            separability test, whose constraint rows carry an extra constant coordinate).

    Returns:
        An :class:`NNLSSolution`.
    """
    n_probs, n_points = h.shape
    device, dtype = h.device, h.dtype
    if max_iter is None:
        max_iter = 3 * n_points + 30
    lam_out = torch.zeros((n_probs, n_points), dtype=dtype, device=device)
    done_out = torch.zeros(n_probs, dtype=torch.bool, device=device)

    # Working state of the rows still running; `rows` maps them to problem indices. Finished rows ride
    # along unchanged and are compacted away once they are a quarter of the batch (fewer copies).
    st = _WorkingSet(
        rows=torch.arange(n_probs, device=device),
        group=group,
        h=h,
        sigma=sigma,
        rank_one=rank_one,
        w_tol=tol * t_norm * point_scale,
        passive=torch.zeros((n_probs, n_points), dtype=torch.bool, device=device),
        blocked=torch.zeros((n_probs, n_points), dtype=torch.bool, device=device),
        slots=torch.zeros((n_probs, 0), dtype=torch.long, device=device),
        valid=torch.zeros((n_probs, 0), dtype=torch.bool, device=device),
        x=torch.zeros((n_probs, 0), dtype=dtype, device=device),
        w=sigma * h,  # negative gradient at lambda = 0
        pending=torch.zeros(n_probs, dtype=torch.bool, device=device),
        done=torch.zeros(n_probs, dtype=torch.bool, device=device),
        krows=torch.zeros((n_probs, 0, n_points), dtype=dtype, device=device),
    )
    iterations = 0
    while st.rows.numel() and iterations < max_iter:
        iterations += 1
        # Outer step of LH for the rows not inside an inner loop: add the most violating point.
        eligible = (st.sigma != 0) & ~st.passive & ~st.blocked
        best, j = torch.where(eligible, st.w, torch.full_like(st.w, -torch.inf)).max(1)
        adding = ~st.pending & ~st.done & (best > st.w_tol)
        st.done |= ~st.pending & ~adding
        if bool(st.done.all()):
            break
        if 4 * int(st.done.sum()) >= st.rows.numel():
            st.write_back(st.done, lam_out, done_out, n_points)
            keep = ~st.done
            adding, j = adding[keep], j[keep]
            st.compress(keep)
        if bool(adding.any()):
            st.insert(adding, j, gram)
        # Unconstrained least squares on the passive slots: K_FF u = h_F, lambda_F = sigma_F u.
        z, r1_f = st.solve_passive(cutoff)  # candidate multipliers on the passive set
        infeasible = st.valid & (z <= 0)
        all_pos = ~infeasible.any(1)
        # Rows whose newest point got a non-positive multiplier from round-off: block that point.
        newest = st.valid & (st.slots == j[:, None]) & adding[:, None]
        newest_bad = (infeasible & newest).any(1)
        if bool(newest_bad.any()):
            r = newest_bad.nonzero().squeeze(1)
            st.blocked[r, j[r]] = True
            st.passive[r, j[r]] = False
            st.valid &= ~(newest & newest_bad[:, None])
        moved = ~newest_bad & ~st.done
        # Feasible: accept. Infeasible: step back towards the old point until a multiplier hits zero.
        ratio = torch.where(infeasible, st.x / (st.x - z).clamp_min(torch.finfo(dtype).tiny), torch.inf)
        alpha = torch.where(all_pos, torch.ones_like(ratio[:, 0]), ratio.min(1).values.clamp(0, 1))
        new_x = torch.where(all_pos[:, None], z, st.x + alpha[:, None] * (z - st.x))
        hit = (~all_pos)[:, None] & infeasible & (ratio <= alpha[:, None])
        x_tol = 1e-14 * new_x.abs().amax(1, keepdim=True).clamp_min(1.0)
        drop = st.valid & (hit | (new_x <= x_tol)) & moved[:, None]
        st.x = torch.where(moved[:, None], torch.where(drop | ~st.valid, 0.0, new_x), st.x)
        if bool(drop.any()):
            r, c = drop.nonzero(as_tuple=True)
            st.passive[r, st.slots[r, c]] = False
            st.valid &= ~drop
        st.pending = moved & ~all_pos
        st.blocked &= ~moved[:, None]
        # Fresh dual (negative gradient) for the next outer step.
        u_now = st.x * torch.gather(st.sigma, 1, st.slots) * st.valid
        st.w = _dual(st.krows, st.valid, u_now, st.h, st.sigma, st.rank_one, r1_f)
    st.write_back(st.done, lam_out, done_out, n_points)
    unfinished = ~st.done
    if bool(unfinished.any()):  # iteration cap: keep the (feasible) iterate, uncertified
        st.write_back(unfinished, lam_out, done_out, n_points, certified=False)
    lam, converged = lam_out, done_out
    passive = lam > 0
    eligible = sigma != 0
    scale = t_norm * point_scale
    # Certificate: dual feasibility off the support, stationarity on it, primal feasibility.
    idx, valid = _padded_support(passive)
    u = torch.gather(lam, 1, idx) * torch.gather(sigma, 1, idx)
    r1_f = None if rank_one is None else torch.gather(rank_one, 1, idx)
    w = _dual(_gram_rows(gram, group, idx), valid, u, h, sigma, rank_one, r1_f)
    off = torch.where(eligible & ~passive, w.clamp_min(0), torch.zeros_like(w)).amax(1)
    on = torch.where(passive, w.abs(), torch.zeros_like(w)).amax(1)
    kkt = torch.maximum(off, on) / scale.clamp_min(torch.finfo(dtype).tiny)
    proj_norm2 = (u * torch.gather(h, 1, idx) * valid).sum(1)
    return NNLSSolution(
        lam=lam, proj_norm2=proj_norm2, kkt_violation=kkt, iterations=iterations, converged=converged
    )


def separable_dichotomies(
    gram: torch.Tensor, group: torch.Tensor, sigma: torch.Tensor, *, rtol: float = 1e-9
) -> torch.Tensor:
    """Exact test of strict homogeneous separability: is there a v with sigma_i <v, x_i> > 0 for all i?

    Least-distance programming (Lawson & Hanson, ch. 23): G v >= 1 is feasible iff the NNLS problem
    min_{u >= 0} || E u - e_{N+1} ||,  E = [G^T; 1^T],  has a non-zero residual. E's Gram is
    D (K + sigma sigma^T) D and E^T e_{N+1} = 1, so the batched solver handles it with a rank-one term.
    A zero residual means the origin is in the convex hull of the signed points: not separable.

    Args:
        gram: (B, T, T) point Grams (points scaled to mean squared norm 1).
        group: (U,) group of each dichotomy; sigma: (U, T) point signs (0 on padding).
    Returns:
        (U,) bool, True where the dichotomy is separable.
    """
    ones = torch.ones(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    point_scale = float(gram.diagonal(dim1=-2, dim2=-1).clamp_min(0).max().sqrt()) + 1.0
    sol = batched_nnls(gram, group, sigma.clone(), sigma, ones, point_scale=point_scale, rank_one=sigma)
    return (1.0 - sol.proj_norm2) > rtol
