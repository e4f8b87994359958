"""The PathCond criterion and the authors' coordinate descent written the plain way, one
parameter entry and one group at a time, straight from the formulas (docs/design.md §3.1, §3.4):
the independent reference the solver's tests compare with.

`g` holds the entries of diag(G), `gin` / `gout` the group each entry is incoming to / outgoing
from (-1: none), `u` the log-rescalings of the H groups."""

from __future__ import annotations

import numpy as np


def exact_root(A, B, C, D, p):
    """Positive root of B(A+p)X² + A·D·X + C(A−p) = 0, straight from the formula."""
    if B > 0:
        return (-A * D + np.sqrt(A * A * D * D - 4 * (A + p) * B * (A - p) * C)) / (2 * (A + p) * B)
    return (p - A) * C / (A * D)  # B = 0: the equation is linear


def plain_coordinate_descent(g, gin, gout, H, sweeps, tol=0.0):
    """The authors' method written the obvious way: one group at a time, full sums each time."""
    p = g.size
    u = np.zeros(H)
    history = []
    for _ in range(sweeps):
        change = 0.0
        for h in range(H):
            ue = np.append(u, 0.0)
            w = g * np.exp(ue[gout] - ue[gin])
            outgoing = (gout == h) & (gin != h)
            incoming = (gin == h) & (gout != h)
            if not (outgoing.any() or incoming.any()):
                continue
            B = w[outgoing].sum() * np.exp(-u[h])
            C = w[incoming].sum() * np.exp(u[h])
            D = w.sum() - w[outgoing].sum() - w[incoming].sum()
            A = incoming.sum() - outgoing.sum()
            new = np.log(exact_root(A, B, C, D, p))
            change += abs(new - u[h])
            u[h] = new
        history.append(u.copy())
        if change < tol:
            break
    return history


def objective(g, gin, gout, u):
    ue = np.append(u, 0.0)
    bu = ue[gout] - ue[gin]
    return g.size * np.log((g * np.exp(bu)).sum()) - bu.sum()


def gradient(g, gin, gout, u):
    H = u.size
    ue = np.append(u, 0.0)
    bu = ue[gout] - ue[gin]
    w = g * np.exp(bu)
    bw = np.bincount(np.where(gout >= 0, gout, H), w, H + 1)[:H] - np.bincount(np.where(gin >= 0, gin, H), w, H + 1)[:H]
    b1 = np.bincount(np.where(gout >= 0, gout, H), None, H + 1)[:H] - np.bincount(np.where(gin >= 0, gin, H), None, H + 1)[:H]
    return g.size * bw / w.sum() - b1
