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
        kkt_violation: (Q,) largest violation of the KKT conditions, each point's relative to ||t|| times
            that point's own norm (its column of the NNLS), so one large point (an outlier) does not hide
            the violations of the others.
        iterations: number of batched iterations run.
        converged: (Q,) True where the iteration stopped on its own test and the independent KKT check
            (``kkt_violation <= KKT_CERTIFIED``) passed.
    """

    lam: torch.Tensor
    proj_norm2: torch.Tensor
    kkt_violation: torch.Tensor
    iterations: int
    converged: torch.Tensor


#: Largest relative KKT violation (see ``NNLSSolution.kkt_violation``) that still counts as certified.
#: Exact solutions reach ~1e-12; float32-rounded, numerically rank-deficient features ~1e-8.
KKT_CERTIFIED = 1e-6

#: A passive set counts as linearly dependent when a relative Cholesky pivot falls below this.
_DEPENDENT_PIVOT = 1e-9

#: Passive blocks of at least this size (on the CPU; on CUDA all) are solved by two triangular solves, not
#: ``cholesky_solve``.
_TRIANGULAR_SOLVES_FROM = 40

#: On the CPU the products K u (each iteration's dual and the final certificate) go through a sparse
#: matrix of the rows' multipliers when a row has at most this fraction of the dense product's inner size
#: (T points, or 2 N through the points) as non-zeros: (one group, several groups). Measured per call at
#: 1 thread on the benchmark cases: with one group (T = 500) the two break even at S = T / 7 and the
#: sparse product is 1.5-3x faster below T / 12; with several groups (45 pairs, T = 100), whose dense
#: product also pays for the groups' padded layout, sparse is 1.7-3.8x faster up to S = T / 4, the
#: largest support seen there. The sparse product runs at ~4 G multiply-adds per second, a GEMM at 15-20
#: per thread. The sparse product is serial, so with one group the fraction is divided by the intra-op
#: threads; with several it is not (the dense route's layout passes are no faster with two threads: at 2
#: threads 1/4 gave 1.08-1.31x on the pairs, 1/8 0.95-1.19x).
_SPARSE_PRODUCT_FRACTION = (1 / 8, 1 / 4)

#: Most elements of the (rows, S, S) passive blocks formed at once (2^24: 128 MiB in float64, half as
#: much again for their int32 gather indices); more rows are solved in row chunks.
_PASSIVE_ELEMENTS = 2**24


def _solve_spd(blocks: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve batched SPD systems ``blocks`` u = rhs by one Cholesky, without a host sync.

    The blocks already carry a relative diagonal jitter (``1e-12 ||x_i||^2``, added once to every
    diagonal entry of the Gram by :func:`_extended_gram`). In exact arithmetic a point enters
    only with a positive gradient, so it is not in the span of the others and the jitter is far below the
    passive set's eigenvalues; in floating point (numerically rank-deficient features) it can be of their
    order, and it only keeps round-off from making a block indefinite. A block that still
    fails to factor yields 0 (the caller never uses it: it keeps the previous iterate). Also returns,
    per row, whether the block is numerically singular (a tiny relative pivot or a failed
    factorization) and whether the factorization failed.
    """
    chol, info = torch.linalg.cholesky_ex(blocks)
    if blocks.shape[-1] >= _TRIANGULAR_SOLVES_FROM or blocks.device.type != "cpu":
        # The same two substitutions as cholesky_solve (bit for bit), without its column-major copy of
        # every factor: 1.1-4.6x faster from S = 40 on at 1 thread (mixed at S = 32-48 with thousands of
        # rows); below that the copy is cheap and one call is fewer than two. On CUDA always: torch sends
        # a batched cholesky_solve to MAGMA where it is built in, whose batched potrs allocates and frees
        # device memory on every call (cudaFree waits for the device), a host synchronisation per
        # iteration; batched triangular solves (cuBLAS) do not.
        lower = torch.linalg.solve_triangular(chol, rhs.unsqueeze(-1), upper=False)
        sol = torch.linalg.solve_triangular(chol.mT, lower, upper=True).squeeze(-1)
    else:
        sol = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    # Relative pivots L_ii^2 / K_ii: each point's squared distance from the span of the slots before
    # it, relative to its norm; tiny means the passive set is (numerically) linearly dependent.
    pivots = chol.diagonal(dim1=-2, dim2=-1).square() / blocks.diagonal(dim1=-2, dim2=-1).clamp_min(
        torch.finfo(blocks.dtype).tiny
    )
    broken = info != 0
    singular = broken | (pivots.amin(-1) <= _DEPENDENT_PIVOT)
    return sol.masked_fill(broken[:, None], 0.0), singular, broken


def _extended_gram(gram: torch.Tensor, jitter: float) -> torch.Tensor:
    """(B, T + 1, T + 1): K + jitter diag(K) bordered by a zero sentinel point T (the jitter relative to
    each point's own squared norm, as the other tolerances).

    Free slots point at the sentinel, so a passive block gathered by slot indices is already jittered
    and zero off the passive slots: one gather and a diagonal update per iteration, no full-block masks
    or padding passes.
    """
    n_groups, n_points = gram.shape[0], gram.shape[-1]
    ext = gram.new_zeros((n_groups, n_points + 1, n_points + 1))
    ext[:, :n_points, :n_points] = gram
    ext.diagonal(dim1=-2, dim2=-1)[:, :n_points] *= 1.0 + jitter
    return ext


def _mark(mask: torch.Tensor, index: torch.Tensor, where: torch.Tensor, value: bool) -> torch.Tensor:
    """mask with mask[r, index[r, c]] = value wherever where[r, c]; no host synchronisation.

    Entries not selected are sent to a spare column that is cut off again, so duplicates are harmless.
    """
    n_points = mask.shape[1]
    ext = torch.zeros((mask.shape[0], n_points + 1), dtype=torch.bool, device=mask.device)
    ext.scatter_(1, torch.where(where, index, n_points), True)
    hit = ext[:, :n_points]
    return mask | hit if value else mask & ~hit


@dataclass
class _WorkingSet:
    """Per-row state of the batched Lawson-Hanson iteration (rows still running).

    The passive set of each row is kept as padded slots (indices into the points, their multipliers
    and a validity mask) that are updated in place: adding fills free slots, dropping clears them, so no
    per-iteration sort or re-gather of dense (Q, T) arrays is needed. Every update is a masked tensor
    op: the loop's only host synchronisation is one small read of counters per iteration.
    """

    rows: torch.Tensor
    group: torch.Tensor
    h: torch.Tensor
    sigma: torch.Tensor
    rank_one: torch.Tensor | None
    t_norm: torch.Tensor
    enter_tol: torch.Tensor  # (rows, 1) tol ||t||: a point enters while its w_i exceeds it
    sig_inv: torch.Tensor  # (rows, T) sigma / the norm of each point's column (0 for padding, zero columns)
    ineligible: torch.Tensor  # (rows, T) padding points (sigma = 0), never added
    excluded: torch.Tensor  # ineligible or blocked (a single added point that got no positive multiplier)
    slots: torch.Tensor
    valid: torch.Tensor
    x: torch.Tensor
    pending: torch.Tensor
    done: torch.Tensor
    budget: torch.Tensor  # points the next outer step may add (halved after an overshoot, else doubled)
    pos: torch.Tensor  # row's place in the (groups, per-group capacity) layout of the dense products

    def compress(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (int64 indices) of every per-row field (gathers by index: no
        host synchronisation, unlike boolean indexing)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(self, f.name, value.index_select(0, keep))

    def grow(self, n_slots: int) -> None:
        """Widen the slot arrays to ``n_slots`` (geometric growth: each copies the cached rows)."""
        n, extra = self.slots.shape[0], n_slots - self.slots.shape[1]
        self.slots = torch.cat([self.slots, self.slots.new_zeros((n, extra))], 1)
        self.valid = torch.cat([self.valid, self.valid.new_zeros((n, extra))], 1)
        self.x = torch.cat([self.x, self.x.new_zeros((n, extra))], 1)

    def shrink(self, n_slots: int) -> None:
        """Move the valid slots first (keeping their order) and cut the slot arrays to ``n_slots``."""
        order = torch.sort(~self.valid, dim=1, stable=True).indices[:, :n_slots]
        self.slots = self.slots.gather(1, order)
        self.valid = self.valid.gather(1, order)
        self.x = self.x.gather(1, order)

    def insert(self, take: torch.Tensor, cand: torch.Tensor) -> None:
        """Put the candidate points cand[r, c] with take[r, c] into free slots (the caller guarantees a
        free slot for every taken candidate; take is True on a prefix of each row), masked writes only."""
        k = min(cand.shape[1], self.slots.shape[1])
        take, cand = take[:, :k], cand[:, :k]
        # The first k free slots of every row, in slot order (a stable sort puts free slots first).
        free_pos = torch.sort(self.valid.to(torch.int8), dim=1, stable=True).indices[:, :k]
        self.slots.scatter_(1, free_pos, torch.where(take, cand, self.slots.gather(1, free_pos)))
        self.valid |= torch.zeros_like(self.valid).scatter_(1, free_pos, take)

    def solve_passive(self, gram_ext: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unconstrained least squares on each row's passive slots: K_FF u = h_F, lambda_F = sigma_F u.

        ``gram_ext`` is :func:`_extended_gram`. Returns the candidate multipliers per slot (0 on free
        slots), whether K_FF is numerically singular and whether its factorization failed. The (rows, S, S)
        blocks are formed for at most ``_PASSIVE_ELEMENTS`` elements at a time (in row chunks, which
        agree with one batch to round-off): with supports of hundreds of points (many points in few
        dimensions) one batch of them would take gigabytes.
        """
        n_rows, n_slots = self.slots.shape
        step = max(1, _PASSIVE_ELEMENTS // (n_slots * n_slots))
        if step >= n_rows:
            return self._solve_rows(gram_ext, None)
        parts = [self._solve_rows(gram_ext, slice(start, start + step)) for start in range(0, n_rows, step)]
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    def _solve_rows(
        self, gram_ext: torch.Tensor, rows: slice | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`solve_passive` for the rows ``rows`` (None: all of them, without slicing every array)."""

        def part(value: torch.Tensor) -> torch.Tensor:
            return value if rows is None else value[rows]

        n_slots, n_ext = self.slots.shape[1], gram_ext.shape[-1]
        slots, valid = part(self.slots), part(self.valid)
        # K_FF gathered straight from the group's Gram by flat indices (Q S^2 elements, no row cache);
        # free slots read the zero sentinel point and get a unit diagonal (identity padding).
        # The flat indices are the largest array built per iteration (Q S^2): int32 where they fit, half
        # the memory traffic of int64 (the index computation is then 4x faster).
        index_dtype = torch.int32 if gram_ext.numel() < 2**31 else torch.int64
        sl = torch.where(valid, slots, n_ext - 1).to(index_dtype)
        # Each row's offset in the stacked Grams (none with one group).
        row = sl if gram_ext.shape[0] == 1 else (part(self.group).to(index_dtype) * n_ext)[:, None] + sl
        flat = (row * n_ext)[:, :, None] + sl[:, None, :]
        blocks = gram_ext.view(-1).index_select(0, flat.view(-1)).view(-1, n_slots, n_slots)
        blocks.diagonal(dim1=-2, dim2=-1).add_(~valid)
        if self.rank_one is not None:
            r1_f = torch.gather(part(self.rank_one), 1, slots) * valid
            blocks = torch.baddbmm(blocks, r1_f[:, :, None], r1_f[:, None, :])
        sig_f = torch.gather(part(self.sigma), 1, slots) * valid
        u, singular, broken = _solve_spd(blocks, torch.gather(part(self.h), 1, slots) * valid)
        return sig_f * u, singular, broken

    def dual(
        self,
        gram: torch.Tensor,
        capacity: int,
        h_block: torch.Tensor | None,
        points: torch.Tensor | None = None,
        gram_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """w = sigma * (X t - K (sigma * lambda)) / ||x|| for every running row.

        Given ``gram_rows`` (the Grams stacked as (B T, T)), by one sparse product over the passive
        slots (:func:`_sparse_times`: S T multiply-adds per row instead of T^2). Otherwise by one
        dense GEMM (two through ``points`` where that is cheaper, see :func:`_times_gram`): the rows'
        signed multipliers are scattered straight into a (groups, capacity, T) block (the layout of
        ``pos``), and ``h_block`` (the rows' X t in that layout; required for several groups) is the
        GEMM's accumulator, so X t - K u comes out of one ``baddbmm``: four passes over (rows, T)
        arrays per iteration instead of eight (the cost of the early, full-width iterations).
        """
        n_groups, n_points = gram.shape[0], gram.shape[-1]
        vals = self.x * torch.gather(self.sigma, 1, self.slots) * self.valid  # (rows, S) signed
        if gram_rows is not None:  # free slots carry 0, so their (stale) columns add nothing
            cols = self.slots if n_groups == 1 else self.group[:, None] * n_points + self.slots
            resid = _sparse_times(gram_rows, cols, vals, minus_from=self.h)
        else:
            spots = torch.where(self.valid, self.slots, n_points)  # free slots -> the spare column
            if n_groups == 1:  # rows in their own order
                u = vals.new_zeros((vals.shape[0], n_points + 1)).scatter_(1, spots, vals)
                resid = _times_gram(u[None, :, :n_points], gram, points, minus_from=self.h[None])[0]
            else:
                assert h_block is not None, "several groups need the rows' X t in the GEMM layout"
                block = vals.new_zeros((n_groups * capacity, n_points + 1))
                flat = (self.pos[:, None] * (n_points + 1) + spots).view(-1)
                block.view(-1).scatter_(0, flat, vals.view(-1))
                block3 = block.view(n_groups, capacity, n_points + 1)[:, :, :n_points]
                resid = (
                    _times_gram(block3, gram, points, minus_from=h_block)
                    .view(-1, n_points)
                    .index_select(0, self.pos)
                )
        if self.rank_one is not None:
            r_dot_u = (torch.gather(self.rank_one, 1, self.slots) * vals).sum(1, keepdim=True)
            resid = resid - self.rank_one * r_dot_u
        return resid.mul_(self.sig_inv)  # resid is a fresh array

    def write_back(
        self,
        sel: torch.Tensor,
        lam_out: torch.Tensor,
        done_out: torch.Tensor,
        n_points: int,
        certified: bool = True,
    ) -> None:
        """Scatter the multipliers of the rows ``sel`` (int64 indices into the running rows) into the
        dense (Q, T) output, by index only (no host synchronisation)."""
        valid = self.valid.index_select(0, sel)
        slots = torch.where(valid, self.slots.index_select(0, sel), n_points)  # padding -> a spare column
        dense = lam_out.new_zeros((slots.shape[0], n_points + 1))
        dense.scatter_(1, slots, self.x.index_select(0, sel) * valid)
        rows = self.rows.index_select(0, sel)
        lam_out.index_copy_(0, rows, dense[:, :n_points])
        done_out.index_fill_(0, rows, certified)


def _sparse_products(
    device: torch.device, n_support: int, n_points: int, n_feat: int | None, n_groups: int
) -> bool:
    """Whether products K u with ``n_support`` non-zeros per row of u go through a sparse matrix: on the
    CPU only (on CUDA a sparse COO product first coalesces its indices, which reads their number on the
    host, and dense GEMMs are fast there), and only for supports up to ``_SPARSE_PRODUCT_FRACTION`` of
    the dense product's inner size (``n_points``, or ``2 n_feat`` when it goes through the points),
    with one group divided by the intra-op threads (which its GEMM uses and the sparse product does not)."""
    inner = n_points if n_feat is None else min(n_points, 2 * n_feat)
    threads = 1 if n_groups > 1 else max(1, torch.get_num_threads())
    fraction = _SPARSE_PRODUCT_FRACTION[n_groups > 1] / threads
    return device.type == "cpu" and n_support <= fraction * inner


def _sparse_times(
    gram_rows: torch.Tensor,
    cols: torch.Tensor,
    vals: torch.Tensor,
    rows: torch.Tensor | None = None,
    *,
    n_rows: int | None = None,
    minus_from: torch.Tensor | None = None,
) -> torch.Tensor:
    """(R, T) U K, or ``minus_from`` - U K, with U the sparse (R, B T) matrix holding ``vals`` at
    (``rows``, ``cols``) and K = ``gram_rows`` (B T, T), the B Grams stacked: row r of the product is
    the sum of vals times the Gram rows K_cols of its entries (each in its group's block of
    ``gram_rows``). Without ``rows``, ``cols`` and ``vals`` are (R, S): row r's entries are cols[r],
    vals[r]; with them, R is ``n_rows``.

    U is an uncoalesced COO matrix: repeated entries (free slots, whose value is 0) are summed, as
    documented for that format. The product costs (non-zeros) x T multiply-adds instead of the GEMM's
    R x T^2.
    """
    if rows is None:
        n_rows, n_cols = cols.shape
        rows = torch.arange(n_rows, device=cols.device)[:, None].expand(n_rows, n_cols)
    assert n_rows is not None, "entries given by (rows, cols) need the number of rows"
    u = torch.sparse_coo_tensor(
        torch.stack([rows.reshape(-1), cols.reshape(-1)]),
        vals.reshape(-1),
        size=(n_rows, gram_rows.shape[0]),
        device=vals.device,
        check_invariants=False,  # the indices are in range by construction; the product checks them too
    )
    if minus_from is None:
        return torch.sparse.mm(u, gram_rows)
    return torch.addmm(minus_from, u, gram_rows, alpha=-1.0)


def _group_counts(group: torch.Tensor, n_groups: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(n_groups,) number of rows of each group (only the rows where ``weight`` is True, if given), by a
    scatter-add: unlike ``torch.bincount`` on CUDA it does not read the input's maximum on the host."""
    ones = torch.ones_like(group) if weight is None else weight.to(group.dtype)
    return group.new_zeros(n_groups).index_add_(0, group, ones)


def _layout(group: torch.Tensor, n_groups: int, capacity: int | None = None) -> tuple[torch.Tensor, int]:
    """Each row's place in a (groups, capacity) layout, so K (sigma lambda) is one batched GEMM over
    the groups; capacity is the largest number of rows of one group. Pass it when known (the iteration
    reads it with its one convergence check); otherwise it costs one host read (once, at the start)."""
    n_rows = group.numel()
    order = torch.sort(group, stable=True).indices
    counts = _group_counts(group, n_groups)
    if capacity is None:
        capacity = int(counts.max()) if n_rows else 1
    capacity = max(capacity, 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(group)
    rank[order] = torch.arange(n_rows, device=group.device) - starts[group[order]]
    return group * capacity + rank, capacity


def _times_gram(
    block: torch.Tensor,
    gram: torch.Tensor,
    points: torch.Tensor | None,
    minus_from: torch.Tensor | None = None,
) -> torch.Tensor:
    """block K_b for (B, R, T) ``block`` rows and the (B, T, T) Grams K_b, or ``minus_from`` - block K_b
    (the GEMM's accumulator): one batched GEMM or, given ``points`` X_b (B, T, N) with K_b = X_b X_b^T,
    two through them, (block X_b) X_b^T: 2 R T N multiply-adds instead of R T^2, which
    :func:`batched_nnls` uses when T > 2 N (many points in few dimensions: 100 classes of 50 points in
    512 dimensions take 5x fewer)."""
    right = gram
    if points is not None:
        block, right = torch.bmm(block, points), points.mT
    if minus_from is None:
        return torch.bmm(block, right)
    return torch.baddbmm(minus_from, block, right, alpha=-1.0)


def _gram_times(
    gram: torch.Tensor,
    u: torch.Tensor,
    pos: torch.Tensor,
    capacity: int,
    rank_one: torch.Tensor | None,
    points: torch.Tensor | None = None,
) -> torch.Tensor:
    """(rows, T) products K_{group(r)} u_r (+ v_r (v_r . u_r) with a rank-one term).

    On the CPU, when the mean number of non-zeros per row of u is small (:func:`_sparse_products`), by
    one sparse product over the exact non-zeros (reading their number, which costs nothing there).
    Otherwise, and always on CUDA (no device waits), by scattering the rows into the (groups, capacity)
    layout and one batched GEMM (two through ``points``, see :func:`_times_gram`)."""
    n_groups, n_points = gram.shape[0], gram.shape[-1]
    nonzero = u.nonzero() if u.device.type == "cpu" else None
    if nonzero is not None:
        mean_support = -(-nonzero.shape[0] // max(1, u.shape[0]))
        n_feat = None if points is None else points.shape[-1]
        if _sparse_products(u.device, mean_support, n_points, n_feat, n_groups):
            rows, cols = nonzero.unbind(1)
            vals = u[rows, cols]
            if n_groups > 1:  # each row's group, from its place in the layout
                cols = torch.div(pos.index_select(0, rows), capacity, rounding_mode="floor") * n_points + cols
            ku = _sparse_times(gram.reshape(-1, n_points), cols, vals, rows, n_rows=u.shape[0])
            if rank_one is not None:
                ku = ku + rank_one * (rank_one * u).sum(1, keepdim=True)
            return ku
    if n_groups == 1:
        ku = _times_gram(u[None], gram, points)[0]
    else:
        block = u.new_zeros((n_groups * capacity, n_points)).index_copy_(0, pos, u)
        ku = _times_gram(block.view(n_groups, capacity, n_points), gram, points).view(-1, n_points)
        ku = ku.index_select(0, pos)
    if rank_one is not None:
        ku = ku + rank_one * (rank_one * u).sum(1, keepdim=True)
    return ku


def _h_block(h: torch.Tensor, pos: torch.Tensor, n_groups: int, capacity: int) -> torch.Tensor | None:
    """(groups, capacity, T): the rows' X t placed in the layout of ``pos`` (the accumulator of the dual's
    ``baddbmm``; rebuilt only when the layout changes), or None for a single group."""
    if n_groups == 1:
        return None
    n_points = h.shape[-1]
    return (
        h.new_zeros((n_groups * capacity, n_points)).index_copy_(0, pos, h).view(n_groups, capacity, n_points)
    )


#: Most points added per outer iteration (the most violating ones); each row's budget starts here, is
#: halved after a step that overshot and doubled again (up to this) after one that did not.
ADD_PER_ITERATION = 16


def batched_nnls(
    gram: torch.Tensor,
    group: torch.Tensor,
    h: torch.Tensor,
    sigma: torch.Tensor,
    t_norm: torch.Tensor,
    *,
    max_iter: int | None = None,
    tol: float = 1e-10,
    cutoff: float = 1e-12,
    rank_one: torch.Tensor | None = None,
    add_per_iteration: int = ADD_PER_ITERATION,
    block_size: int = 1,
    points: torch.Tensor | None = None,
) -> NNLSSolution:
    """Solve Q NNLS problems that share B Gram matrices, exactly (batched Lawson-Hanson, several
    points per step).

    Each outer step adds up to ``add_per_iteration`` of the most violating points (largest negative
    gradient) to the passive set at once; the inner loop of Lawson-Hanson then steps from the current
    feasible point towards the least-squares solution on the enlarged set and drops every multiplier
    that hits zero. Added points whose least-squares multiplier is not positive are dropped at once
    (the step length is 0 for them). Each row keeps a budget of points per outer step: halved after a
    step that overshot (an added point dropped), doubled (up to ``add_per_iteration``) after one that
    did not. A budget of one is the classic step, which strictly decreases the objective; larger steps
    never increase it, and a row whose steps make no progress halves its budget down to one, so no
    passive set repeats and the method terminates, at a point certified by the KKT conditions.

    The products K u (each iteration's dual and the final certificate) are dense GEMMs, or on the CPU,
    while the passive sets are small, sparse products over the non-zero multipliers
    (:func:`_sparse_products`); the two routes give the same multipliers up to round-off.

    Args:
        gram: (B, T, T) Gram matrices X_b X_b^T (float64; padding rows/cols are zero).
        group: (Q,) int64 index of each problem's Gram matrix.
        h: (Q, T) the products X_b t_q.
        sigma: (Q, T) point signs in {+1, -1}, 0 on padding (padding never enters the passive set).
        t_norm: (Q,) ||t_q||, used to make the tolerances scale free (with each point's own norm).
        max_iter: cap on batched iterations (default 3 T + 30, far above what the method needs).
        tol: relative dual-feasibility tolerance: a point enters while its w_i > tol ||t|| ||e_i||, with
            ||e_i|| the norm of its column (||x_i||, or sqrt(||x_i||^2 + v_i^2) with ``rank_one``).
        cutoff: relative diagonal jitter (K_ii -> (1 + cutoff) K_ii) for numerically singular passive
            blocks.
        rank_one: optional (Q, T) v_q making problem q's (unsigned) Gram K_b + v_q v_q^T (used by the
            separability test, whose constraint rows carry an extra constant coordinate).
        add_per_iteration: points added per outer step (1 is textbook Lawson-Hanson).
        block_size: points per manifold (the points are laid out manifold by manifold); a multi-point
            step takes the most violating point of each of the ``add_per_iteration`` most violating
            manifolds, so the points added together are not near-duplicates of one another.
        points: optional (B, T, N) points with ``gram`` = points points^T (up to round-off). Where
            T > 2 N the dense products K u go through them, (u X) X^T, which is cheaper; the passive
            blocks and the sparse products always come from ``gram``.

    Returns:
        An :class:`NNLSSolution`.
    """
    n_probs, n_points = h.shape
    device, dtype = h.device, h.dtype
    if max_iter is None:
        max_iter = 3 * n_points + 30
    block_size = block_size if block_size and n_points % block_size == 0 else 1
    n_blocks = n_points // block_size
    k_add = max(1, min(int(add_per_iteration), n_blocks))
    lam_out = torch.zeros((n_probs, n_points), dtype=dtype, device=device)
    done_out = torch.zeros(n_probs, dtype=torch.bool, device=device)
    # Every tolerance is relative to ||t|| and to each point's own norm (the norm of its NNLS column,
    # with the rank-one coordinate): the method runs as on unit-norm columns, so one large point (an
    # outlier) does not loosen the tests, the jitter or the certificate for the others.
    col2 = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0)  # (B, T): per group, then per row
    if rank_one is not None:
        col2 = col2.index_select(0, group) + rank_one.square()
    inv_norm = torch.where(col2 > 0, col2.rsqrt(), torch.zeros_like(col2))  # a zero column never enters
    sig_inv = (inv_norm if rank_one is not None else inv_norm.index_select(0, group)).mul_(sigma)  # fresh

    n_groups = gram.shape[0]
    if points is not None and n_points <= 2 * points.shape[-1]:
        points = None  # K u by the Gram is cheaper
    n_feat = None if points is None else points.shape[-1]  # the dense products' route (see _sparse_products)
    pos, capacity = _layout(group, n_groups)
    gram_ext = _extended_gram(gram, cutoff)
    gram_rows = gram.reshape(-1, n_points)  # the Grams stacked, for the sparse products

    # Working state of the rows still running; `rows` maps them to problem indices. Finished rows ride
    # along unchanged and are compacted away once they are a quarter of the batch (fewer copies).
    n_slots0 = min(2 * k_add, n_points) + k_add
    w = sig_inv * h  # the dual (negative gradient) at lambda = 0, per unit column norm, of the running rows
    st = _WorkingSet(
        rows=torch.arange(n_probs, device=device),
        group=group,
        h=h,
        sigma=sigma,
        rank_one=rank_one,
        t_norm=t_norm,
        enter_tol=(tol * t_norm)[:, None],
        sig_inv=sig_inv,
        ineligible=sigma == 0,
        excluded=sigma == 0,
        slots=torch.zeros((n_probs, n_slots0), dtype=torch.long, device=device),
        valid=torch.zeros((n_probs, n_slots0), dtype=torch.bool, device=device),
        x=torch.zeros((n_probs, n_slots0), dtype=dtype, device=device),
        pending=torch.zeros(n_probs, dtype=torch.bool, device=device),
        done=torch.zeros(n_probs, dtype=torch.bool, device=device),
        budget=torch.full((n_probs,), k_add, dtype=torch.long, device=device),
        pos=pos,
    )
    h_block = None  # X t in the dense GEMM's layout, built when that product is used (several groups)
    layout_all = (pos, capacity)  # every row's layout, reused by the final certificate
    steps = torch.arange(k_add, device=device)
    minus_inf, plus_inf = (torch.tensor(v, dtype=dtype, device=device) for v in (-torch.inf, torch.inf))
    iterations = 0
    while st.rows.numel() and iterations < max_iter:
        iterations += 1
        # Outer step for the rows not inside an inner loop: add the most violating points.
        # The passive set is the valid slots: knocked out of the score by one scatter over the slots
        # (free slots scatter +inf, which a minimum ignores), so no dense passive mask is kept.
        # The score is the dual itself, modified in place: it is recomputed at the end of the iteration.
        score = w.masked_fill_(st.excluded, -torch.inf)
        knock_out = torch.where(st.valid, minus_inf, plus_inf)
        score.scatter_reduce_(1, st.slots, knock_out, "amin")
        if block_size > 1:  # the most violating point of each manifold, then the best manifolds
            b_best, b_arg = score.view(-1, n_blocks, block_size).max(2)
            best, b_pick = b_best.topk(k_add, dim=1)
            cand = b_pick * block_size + torch.gather(b_arg, 1, b_pick)
        else:
            best, cand = score.topk(k_add, dim=1)
        violating = best > st.enter_tol
        outer = ~st.pending & ~st.done
        n_add = torch.minimum(violating.sum(1), st.budget) * outer
        st.done |= outer & (n_add == 0)
        # The one host synchronisation of the iteration: finished rows, the slots needed and the largest
        # number of running rows in one group (the GEMM layout after a compaction; with one group, simply
        # the running rows).
        counts = [st.done.sum(), (st.valid.sum(1) + n_add).max()]
        if n_groups > 1:
            counts.append(_group_counts(st.group, n_groups, ~st.done).max())
        n_done, need, *capacities = torch.stack(counts).tolist()
        left_capacity = capacities[0] if capacities else st.rows.numel() - n_done
        if n_done == st.rows.numel():
            break
        if 4 * n_done >= st.rows.numel():
            # Running rows first, in order (a stable sort of the done flags), then the finished ones:
            # compaction by index, with the sizes read above (no further host synchronisation).
            order = torch.sort(st.done.to(torch.int8), stable=True).indices
            n_keep = st.rows.numel() - n_done
            st.write_back(order[n_keep:], lam_out, done_out, n_points)
            keep = order[:n_keep]
            n_add, cand = n_add.index_select(0, keep), cand.index_select(0, keep)
            st.compress(keep)
            st.pos, capacity = _layout(st.group, n_groups, left_capacity)
            h_block = None
        # Exactly the slots this step needs (the largest passive set after adding): padded slots cost
        # O(S^3) in every factorization, while compacting the (rows, S) slot arrays is cheap.
        need = max(need, 1)
        if need > st.slots.shape[1]:
            st.grow(need)
        elif need < st.slots.shape[1]:
            st.shrink(need)
        take = steps[None, :] < n_add[:, None]
        added_one = n_add == 1
        st.insert(take, cand)
        fresh = st.valid & (st.x == 0)  # points at zero: just added, not yet moved
        # Unconstrained least squares on the passive slots: K_FF u = h_F, lambda_F = sigma_F u.
        z, singular, broken = st.solve_passive(gram_ext)  # candidate multipliers on the passive set
        # Points added together can be jointly dependent (each alone is independent of the passive set,
        # Lawson-Hanson's invariant): then reject them all, which halves the row's budget and keeps
        # the passive sets independent (so the multipliers stay the unique, sparse ones).
        joint_dependent = singular & (n_add > 1)
        # Inside the inner loop the passive set is a subset of one that factored, so its factorization
        # only fails on round-off: keep the previous (feasible) iterate and leave the inner loop, rather
        # than stepping to z = 0 and dropping the whole passive set.
        stuck = broken & (n_add == 0)
        z = torch.where(joint_dependent[:, None], torch.where(fresh, 0.0, st.x), z)
        z = torch.where(stuck[:, None], st.x, z)
        infeasible = st.valid & (z <= 0)
        all_pos = ~infeasible.any(1)
        # A single added point must get a positive multiplier (Lawson-Hanson); a non-positive one is
        # round-off: block that point and leave the row where it was.
        single_bad = added_one & (infeasible & fresh).any(1)
        st.excluded = _mark(st.excluded, st.slots, infeasible & fresh & single_bad[:, None], True)
        st.valid &= ~(fresh & single_bad[:, None])
        moved = ~single_bad & ~st.done
        # Feasible: accept. Infeasible: step towards z until a multiplier hits zero (fresh points with
        # z <= 0 have ratio 0 and are dropped without moving the others).
        gap = st.x - z
        ratio = torch.where(infeasible, st.x / gap.clamp_min(torch.finfo(dtype).tiny), torch.inf)
        alpha = torch.where(all_pos, 1.0, ratio.min(1).values.clamp(0, 1))[:, None]
        new_x = torch.where(all_pos[:, None], z, st.x - alpha * gap)  # x + alpha (z - x), exactly
        hit = infeasible & (ratio <= alpha)  # infeasible rows are exactly the rows not all positive
        # Multipliers per unit column norm (mu = lambda ||x||, in the units of ||t||): round-off zeros.
        mu = new_x / torch.gather(st.sig_inv, 1, st.slots).abs().clamp_min(torch.finfo(dtype).tiny)
        x_tol = 1e-14 * torch.maximum(mu.abs().amax(1), st.t_norm)[:, None]
        keep_fresh = fresh & (z > 0)  # a fresh point still at 0 after a zero step stays in
        drop = st.valid & (hit | ((mu <= x_tol) & ~keep_fresh)) & moved[:, None]
        overshoot = (drop & fresh).any(1) & moved
        grown = torch.where(n_add > 0, (2 * st.budget).clamp_max(k_add), st.budget)
        st.budget = torch.where(overshoot, (st.budget // 2).clamp_min(1), grown)
        st.x = torch.where(moved[:, None], torch.where(drop | ~st.valid, 0.0, new_x), st.x)
        st.valid &= ~drop
        st.pending = moved & ~all_pos
        st.excluded = torch.where(moved[:, None], st.ineligible, st.excluded)  # unblock after a move
        # Fresh dual (negative gradient) for the next outer step.
        if _sparse_products(device, st.slots.shape[1], n_points, n_feat, n_groups):
            w = st.dual(gram, capacity, None, points, gram_rows)
        else:
            if h_block is None:
                h_block = _h_block(st.h, st.pos, n_groups, capacity)
            w = st.dual(gram, capacity, h_block, points)
    # After the loop: the finished rows certified, any others (iteration cap) with their feasible
    # iterate, uncertified.
    st.write_back(st.done.nonzero().squeeze(1), lam_out, done_out, n_points)
    st.write_back((~st.done).nonzero().squeeze(1), lam_out, done_out, n_points, certified=False)
    lam = lam_out
    # The certificate, from the dense multipliers (not the loop's slots), for every row.
    kkt, proj_norm2 = _certificate(gram, lam, h, sigma, sig_inv, t_norm, layout_all, rank_one, points)
    # Certified: the loop stopped on its own test AND the independent KKT check passes. The loop only
    # tests dual feasibility of the points it may still add; the check also covers stationarity on the
    # support and points blocked against round-off.
    converged = done_out & (kkt <= KKT_CERTIFIED)
    return NNLSSolution(
        lam=lam, proj_norm2=proj_norm2, kkt_violation=kkt, iterations=iterations, converged=converged
    )


def _certificate(
    gram: torch.Tensor,
    lam: torch.Tensor,
    h: torch.Tensor,
    sigma: torch.Tensor,
    sig_inv: torch.Tensor,
    t_norm: torch.Tensor,
    layout: tuple[torch.Tensor, int],
    rank_one: torch.Tensor | None,
    points: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q,) KKT violations and (Q,) projections lambda . (G t) of any non-negative (Q, T) multipliers.

    With u = sigma lambda and w = sigma (h - K u) / ||x|| (``sig_inv`` = sigma / ||x||, 0 on padding and
    zero columns, whose w is then exactly 0), the violation is max_i (|w_i| if lambda_i > 0 else
    max(w_i, 0)) / ||t||: stationarity on the support, dual feasibility off it. The gradient is
    recomputed from scratch by one product with the Grams (:func:`_gram_times`, ``layout`` the rows'
    (positions, capacity)). The projection equals ||G^T lambda||^2 at the optimum.

    One (Q, T) buffer, updated in place, holds K u, then w, then u h: two (Q, T) arrays (u and it)
    instead of eight temporaries. With thousands of rows each is megabytes, and new memory can cost
    more than the arithmetic on it (page faults after the allocator has returned freed memory to the OS).
    """
    u = lam * sigma
    w = _gram_times(gram, u, *layout, rank_one, points)
    w = torch.sub(h, w, out=w).mul_(sig_inv)
    w.masked_fill_((lam <= 0) & (w < 0), 0.0)  # a negative w_i off the support is feasible
    kkt = w.abs_().amax(1) / t_norm.clamp_min(torch.finfo(w.dtype).tiny)
    return kkt, torch.mul(u, h, out=w).sum(1)


def separable_dichotomies(
    gram: torch.Tensor, group: torch.Tensor, sigma: torch.Tensor, *, rtol: float = 1e-9
) -> torch.Tensor:
    """Exact test of strict homogeneous separability: is there a v with sigma_i <v, x_i> > 0 for all i?

    Least-distance programming (Lawson & Hanson, ch. 23): G v >= 1 is feasible iff the NNLS problem
    min_{u >= 0} || E u - e_{N+1} ||,  E = [G^T; 1^T],  has a non-zero residual. E's Gram is
    D (K + sigma sigma^T) D and E^T e_{N+1} = 1, so the batched solver handles it with a rank-one term.
    A zero residual means the origin is in the convex hull of the signed points: not separable.

    Args:
        gram: (B, T, T) point Grams. Pass unit-norm points (``glue`` does): the residual threshold
            ``rtol`` is absolute, and next to a large point the others' residuals shrink with them.
        group: (U,) group of each dichotomy; sigma: (U, T) point signs (0 on padding).
    Returns:
        (U,) bool, True where the dichotomy is separable.
    """
    ones = torch.ones(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    sol = batched_nnls(gram, group, sigma.clone(), sigma, ones, rank_one=sigma)
    # An iterate stopped before certification has a projection below the optimum, which would look
    # separable: only a certified solve can say "separable" (the others count as degenerate and warn).
    return ((1.0 - sol.proj_norm2) > rtol) & sol.converged
