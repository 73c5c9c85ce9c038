"""Who shares secrets and masks with whom: the SecAgg+ neighbour graph (Bell et al. 2020).

Full SecAgg (Bonawitz et al. 2017) pairs every site with all n − 1 others: O(n) keys, shares
and masks per site, O(n²) for the server. SecAgg+ (Bell et al., CCS 2020, §3–4) replaces the
complete graph by a random k-regular graph with k = O(log n): each site agrees masks and shares
secrets only with its k neighbours.

Construction (as in Bell et al.'s implementation): a Harary graph H(k, n) — sites on a ring,
each linked to the ⌊k/2⌋ nearest on either side (plus the opposite site when k is odd and n
even) — on a random relabelling of the sites drawn from a public seed. H(k, n) is k-connected,
so removing fewer than k sites never disconnects it. When k is odd and n is odd, k + 1 is used
(a k-regular graph on an odd number of vertices with odd k does not exist). k ≥ n − 1 gives the
complete graph, i.e. full SecAgg.

Privacy needs the graph of SURVIVING sites to stay connected: each connected component's sum
would otherwise be revealed. The server checks this before unmasking (server.py).

The server computes the graph and sends each site its neighbour list; sites never recompute it,
so the relabelling generator (Python's ``random.Random(seed)``) need not be stable across
Python versions.
"""

from __future__ import annotations

import math
import random


def suggested_degree(num_participants: int) -> int:
    """A heuristic k ≈ 3·log₂ n, rounded up to even, capped at n − 1 (full SecAgg below ~16).

    Bell et al. (2020, Thm 3.6 and Table 2) derive k from the tolerated fractions of dropped and
    corrupted sites and a failure probability; this is a starting point, not that computation.
    """
    if num_participants < 2:
        raise ValueError(f"need at least 2 participants, got {num_participants}")
    degree = 2 * math.ceil(1.5 * math.log2(num_participants))
    return min(num_participants - 1, max(2, degree))


def neighbour_graph(num_participants: int, degree: int | None = None,
                    seed: int = 0) -> list[list[int]]:
    """Sorted neighbour lists of participants 0..n−1: symmetric, no self-loops.

    ``degree=None`` (or ≥ n − 1) gives the complete graph (full SecAgg); otherwise a randomly
    relabelled Harary graph H(degree, n) (module docstring), determined by ``seed``.
    """
    n = num_participants
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"num_participants must be an integer >= 2, got {n!r}")
    if degree is None or degree >= n - 1:
        return [[j for j in range(n) if j != i] for i in range(n)]
    if not isinstance(degree, int) or degree < 2:
        raise ValueError("neighbour degree must be an integer >= 2 (degree 1 pairs sites off and "
                         f"reveals each pair's sum), got {degree!r}")
    if degree % 2 == 1 and n % 2 == 1:
        degree += 1
        if degree >= n - 1:
            return neighbour_graph(n, None)
    ring = list(range(n))
    random.Random(seed).shuffle(ring)  # ring position → participant
    neighbours: list[set[int]] = [set() for _ in range(n)]
    for position, participant in enumerate(ring):
        offsets = list(range(1, degree // 2 + 1))
        if degree % 2 == 1:
            offsets.append(n // 2)
        for offset in offsets:
            other = ring[(position + offset) % n]
            neighbours[participant].add(other)
            neighbours[other].add(participant)
    return [sorted(linked) for linked in neighbours]


def is_connected(members: set[int] | frozenset[int], neighbours: list[list[int]]) -> bool:
    """Whether the graph induced on ``members`` is connected (empty or one member: True)."""
    members = set(members)
    if len(members) <= 1:
        return True
    start = next(iter(members))
    seen, frontier = {start}, [start]
    while frontier:
        node = frontier.pop()
        for other in neighbours[node]:
            if other in members and other not in seen:
                seen.add(other)
                frontier.append(other)
    return seen == members
