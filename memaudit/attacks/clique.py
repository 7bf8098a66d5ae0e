"""The exact maximum clique of a graph, and the medoid of a set of its nodes (the extraction attack's clique).

:func:`max_clique` is exact: exact graph reductions (connected components, components of the complement, core
pruning against a greedy clique, :func:`greedy_clique`), then a bitset branch and bound with a colouring bound
(Tomita and Seki's MCQ). It is NP-hard in the worst case (dense graphs without a dominant clique, e.g. a
miscalibrated threshold that joins about half of the pairs of 300 equally noisy generations), so ``max_nodes`` and
``max_steps`` bound the work and raise :class:`~memaudit.core.errors.ConfigError` beyond it rather than running for
hours.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from memaudit.core.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["greedy_clique", "max_clique", "medoid"]


@contextmanager
def _recursion_limit(limit: int):
    old = sys.getrecursionlimit()
    if limit > old:
        sys.setrecursionlimit(limit)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def _components(adj: np.ndarray) -> tuple[int, np.ndarray]:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    return connected_components(csr_matrix(adj), directed=False)


def greedy_clique(adj: np.ndarray, deg: np.ndarray, starts: int = 8) -> np.ndarray:
    """A (not necessarily maximum) clique, as local positions: greedy by degree from a few high-degree nodes."""
    n = len(adj)
    best = np.array([0])
    for v in np.argsort(-deg, kind="stable")[:starts]:
        clique = [int(v)]
        cand = adj[v].copy()
        while cand.any():
            idx = np.flatnonzero(cand)
            u = int(idx[np.argmax(deg[idx])])
            clique.append(u)
            cand &= adj[u]
        if len(clique) > len(best):
            best = np.array(clique)
        if len(best) == n:
            break
    return best


def _solve(adj: np.ndarray, ids: np.ndarray, budget: _Budget) -> list[int]:
    """Exact maximum clique of the graph ``adj`` (boolean, symmetric, false diagonal) whose nodes are ``ids``.

    Exact reductions first, then a branch and bound on what is left:
    - a graph that is not connected: the best of its components (largest first; smaller ones are skipped);
    - a graph whose complement is not connected: every node of one co-component is adjacent to every node of the
      others, so the maximum clique is the union of the co-components' maximum cliques (a node adjacent to all
      others is a co-component of its own); this makes near-complete graphs (memorized prompts) cheap;
    - with a greedy clique of size ``lb`` known, a node of degree < ``lb`` cannot be in a larger clique: such nodes
      are removed repeatedly (core pruning).
    """
    n = len(ids)
    if n <= 1:
        return [int(i) for i in ids]
    deg = adj.sum(1)
    if int(deg.min()) == n - 1:
        return [int(i) for i in ids]
    if not deg.any():
        return [int(ids[0])]
    ncomp, labels = _components(adj)
    if ncomp > 1:
        sizes = np.bincount(labels, minlength=ncomp)
        best: list[int] = []
        for c in np.argsort(-sizes, kind="stable"):
            if sizes[c] <= len(best):
                break
            keep = labels == c
            found = _solve(adj[np.ix_(keep, keep)], ids[keep], budget)
            if len(found) > len(best):
                best = found
        return best
    comp = ~adj
    np.fill_diagonal(comp, False)
    nco, labels = _components(comp)
    if nco > 1:
        out: list[int] = []
        for c in range(nco):
            keep = labels == c
            out += _solve(adj[np.ix_(keep, keep)], ids[keep], budget)
        return out
    greedy = greedy_clique(adj, deg)
    lb = len(greedy)
    keep = np.ones(n, dtype=bool)
    while True:
        sub_deg = adj[np.ix_(keep, keep)].sum(1)
        low = sub_deg < lb
        if not low.any():
            break
        keep[np.flatnonzero(keep)[low]] = False
        if not keep.any():
            break
    if not keep.all():
        found = _solve(adj[np.ix_(keep, keep)], ids[keep], budget) if keep.any() else []
        return found if len(found) > lb else [int(ids[i]) for i in greedy]
    # connected, co-connected and not prunable: exact branch and bound
    found = _branch_and_bound(adj, greedy, budget)
    return [int(ids[i]) for i in found]


class _BudgetExceeded(Exception):
    pass


class _Budget:
    """Counts search nodes across the branch-and-bound calls of one :func:`max_clique`."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.limit is not None and self.steps > self.limit:
            raise _BudgetExceeded


def _degeneracy_order(adj: np.ndarray) -> np.ndarray:
    """Nodes in reverse order of removal of a minimum-degree node (the densest core first)."""
    n = len(adj)
    deg = adj.sum(1).astype(np.int64)
    alive = np.ones(n, dtype=bool)
    removed = []
    big = np.iinfo(np.int64).max
    for _ in range(n):
        v = int(np.argmin(np.where(alive, deg, big)))
        removed.append(v)
        alive[v] = False
        deg -= adj[v]
    return np.array(removed[::-1])


def _branch_and_bound(adj: np.ndarray, incumbent: np.ndarray, budget: _Budget) -> list[int]:
    """Exact maximum clique (local positions) by branch and bound with a greedy-colouring bound (Tomita and
    Seki's MCQ, with bitsets held in Python integers), starting from the clique ``incumbent``."""
    n = len(adj)
    order = _degeneracy_order(adj)
    sub = adj[np.ix_(order, order)]
    nbrs = [int.from_bytes(np.packbits(sub[i], bitorder="little").tobytes(), "little") for i in range(n)]
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(n)
    best = [int(pos[i]) for i in incumbent]

    def expand(clique: list[int], cand: int) -> None:
        nonlocal best
        budget.step()
        kmin = len(best) - len(clique)
        # greedy colouring of the candidates: the colour of a node bounds the clique size among the nodes
        # coloured up to it; nodes whose colour cannot beat the incumbent are never branched on
        uncoloured, colour, seq = cand, 0, []
        while uncoloured:
            colour += 1
            q = uncoloured
            while q:
                low = q & -q
                v = low.bit_length() - 1
                q &= ~nbrs[v]
                q ^= low
                uncoloured ^= low
                if colour > kmin:
                    seq.append((v, colour))
        for v, col in reversed(seq):
            if len(clique) + col <= len(best):
                return
            new = cand & nbrs[v]
            if new:
                expand(clique + [v], new)
            elif len(clique) + 1 > len(best):
                best = clique + [v]
            cand &= ~(1 << v)

    expand([], (1 << n) - 1)
    return [int(order[i]) for i in best]


def max_clique(adjacency: np.ndarray | Tensor, max_nodes: int | None = None,
               max_steps: int | None = None) -> list[int]:
    """Exact maximum clique of an undirected graph given as a boolean symmetric ``[n, n]`` matrix (the diagonal
    is ignored). Returns the sorted node indices; ``[0]`` for a graph with nodes but no edges (one node is a
    clique of size 1), ``[]`` for the empty graph. Ties between maximum cliques are broken deterministically.

    The search is exact: exact reductions (connected components, components of the complement, core pruning
    against a greedy clique) and then a bitset branch and bound with a colouring bound (Tomita and Seki's MCQ).
    It is exponential in the worst case (dense graphs without a dominant clique), so ``max_nodes`` refuses larger
    graphs and ``max_steps`` bounds the number of search nodes; both raise :class:`ConfigError`.
    """
    if isinstance(adjacency, Tensor):
        adjacency = adjacency.detach().cpu().numpy()
    adj = np.asarray(adjacency)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1]:
        raise ConfigError(f"the adjacency matrix must be square [n, n], got shape {adj.shape}.")
    n = adj.shape[0]
    if max_nodes is not None and n > max_nodes:
        raise ConfigError(f"the graph has {n} nodes, more than max_clique_nodes={max_nodes}; "
                          f"use fewer generations per prompt or raise max_clique_nodes.")
    if n == 0:
        return []
    adj = adj.astype(bool, copy=True)
    np.fill_diagonal(adj, False)
    if not np.array_equal(adj, adj.T):
        raise ConfigError("the adjacency matrix must be symmetric (an undirected graph).")
    budget = _Budget(max_steps)
    try:
        with _recursion_limit(4 * n + 1000):
            clique = _solve(adj, np.arange(n), budget)
    except _BudgetExceeded:
        raise ConfigError(f"the exact clique search on {n} nodes ({int(adj.sum()) // 2} edges) exceeded "
                          f"max_clique_steps={max_steps}; lower or calibrate edge_threshold (it joins many pairs "
                          f"without a dominant clique), use fewer generations, or raise max_clique_steps.") from None
    logger.debug("max clique %d of %d nodes after %d search nodes", len(clique), n, budget.steps)
    return sorted(clique)


def medoid(indices: Sequence[int], distances: Tensor | np.ndarray) -> int:
    """The member of ``indices`` minimizing the sum of its distances to the other members (ties: the first in
    ``indices``). ``distances`` is the full pairwise matrix the indices refer to."""
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("medoid of an empty set of indices.")
    d = torch.as_tensor(distances)
    sub = d[idx][:, idx].to(torch.float64)
    return idx[int(torch.argmin(sub.sum(1)))]
