"""The shapes batches take: bucket lengths fitted to the data, and packing's layout.

Host-side NumPy, used by :class:`peftjax.training.Batcher`.
"""

from __future__ import annotations

import numpy as np


def best_buckets(maxima: np.ndarray, top: int, multiple: int, saving: float, max_buckets: int) -> tuple[int, ...]:
    """Multiples of ``multiple`` up to ``top`` (always in) minimising ``sum(bucket(m))`` over the
    batch maxima ``maxima`` (a batch of maximum m is padded to the smallest bucket >= m), with at
    most ``max_buckets``, a bucket more only while it lowers that sum by ``saving`` of the
    best sum. Dynamic programming over the lengths the maxima round up to."""
    rounded = np.array([round_up(max(int(m), 1), multiple) for m in maxima] + [top])
    lengths, counts = np.unique(rounded, return_counts=True)
    counts[-1] -= 1  # the top itself was added only to make it a candidate
    n = len(lengths)
    served = np.concatenate([[0], np.cumsum(counts)])  # batches whose rounded max is < lengths[j]: served[j]
    # cost[k][j]: least padded length sum over batches of rounded max <= lengths[j], with k buckets, the last lengths[j]
    cost = [np.full(n, np.inf) for _ in range(max_buckets + 1)]
    back = [np.zeros(n, np.int64) for _ in range(max_buckets + 1)]
    cost[1] = lengths * served[1:].astype(float)
    for k in range(2, max_buckets + 1):
        for j in range(1, n):
            options = cost[k - 1][:j] + lengths[j] * (served[j + 1] - served[1 : j + 1])
            back[k][j] = int(np.argmin(options))
            cost[k][j] = options[back[k][j]]
    best = min(cost[k][-1] for k in range(1, max_buckets + 1))
    k = 1
    while k < max_buckets and cost[k][-1] - cost[k + 1][-1] >= saving * best:
        k += 1
    chosen, j = [], n - 1
    for level in range(k, 0, -1):
        chosen.append(int(lengths[j]))
        j = back[level][j]
    return tuple(sorted(chosen))


def round_up(n: int, multiple: int | None) -> int:
    return n if multiple is None else -(-n // multiple) * multiple


def first_fit(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Packs sequences of ``lengths`` into rows of ``capacity`` tokens, longest first, each into the
    first row with room (first-fit decreasing; ties keep their order, so the layout is
    deterministic). Returns ``(place, rows)``: ``place[i]`` is sequence i's ``(row, column)``."""
    place = np.zeros((len(lengths), 2), np.int64)
    room: list[int] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        row = next((r for r, free in enumerate(room) if free >= n), len(room))
        if row == len(room):
            room.append(capacity)
        place[i] = row, capacity - room[row]
        room[row] -= n
    return place, len(room)


def fit_packing(batches: list[np.ndarray], longest: int, multiple: int, saving: float,
                max_buckets: int) -> tuple[int, tuple[int, ...]]:
    """``(pack_length, row_buckets)`` for packing the batches whose sequence lengths are ``batches``.

    The candidate lengths run from ``longest`` (rounded up to ``multiple``) to twice that, in
    steps of ``multiple`` (of a multiple of it, for at most 17 candidates); for each, every batch
    is packed (:func:`first_fit`) and the row counts are bucketed as lengths are
    (:func:`best_buckets`). Each shape past the first costs a
    compilation, so it is charged ``saving`` of the fewest padded tokens any candidate reaches,
    the price a bucket pays within one length; the candidate with the least padded tokens plus
    that charge wins (the shorter on ties: less attention per token)."""
    top = round_up(max(longest, 1), multiple)
    candidates = []
    step = round_up(-(-top // 16), multiple)
    for length in range(top, 2 * top + 1, step):
        rows = np.array([first_fit(lengths, length)[1] for lengths in batches])
        buckets = best_buckets(rows, int(rows.max(initial=1)), 1, saving, max_buckets)
        padded = length * sum(buckets[int(np.searchsorted(buckets, r))] for r in rows)
        candidates.append((padded, length, buckets))
    charge = saving * min(padded for padded, _, _ in candidates)
    _, length, buckets = min(candidates, key=lambda c: (c[0] + charge * (len(c[2]) - 1), c[1]))
    return length, buckets
