"""Split one data set among federated clients: IID, or non-IID by a Dirichlet over labels.

`--split iid` shuffles and deals the examples out evenly. `--split dirichlet:ALPHA` draws, for
every label (or every value of another field), the clients' shares from Dirichlet(ALPHA): a
small ALPHA gives each client a few dominant labels, a large one approaches IID. Everything is
a pure function of the seed, so every process (the simulation, each Flower SuperNode) computes
the same partition.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from lorafleet.errors import LorafleetError
from lorafleet.fed.config import SplitSpec

MIN_PER_CLIENT = 1
MAX_DRAWS = 100  # Dirichlet redraws before giving up on giving every client an example


def iid_split(n: int, clients: int, seed: int) -> list[list[int]]:
    """A seeded shuffle dealt into `clients` contiguous parts whose sizes differ by at most 1."""
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(part.tolist()) for part in np.array_split(order, clients)]


def dirichlet_split(
    keys: Sequence[Hashable], clients: int, alpha: float, seed: int
) -> list[list[int]]:
    """Per distinct key, shares ~ Dirichlet(alpha * 1) over the clients; redrawn (seeded) until
    every client holds at least one example."""
    rng = np.random.default_rng(seed)
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    ordered = [groups[k] for k in sorted(groups, key=repr)]  # independent of first appearance
    for _ in range(MAX_DRAWS):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for members in ordered:
            idx = rng.permutation(members)
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= MIN_PER_CLIENT:
            return [sorted(p) for p in parts]
    raise LorafleetError(
        f"dirichlet:{alpha:g} left a client without data in {MAX_DRAWS} draws: use fewer "
        "clients, a larger ALPHA or more data"
    )


def partition(
    n: int, clients: int, spec: SplitSpec, seed: int, keys: Sequence[Hashable] | None = None
) -> list[list[int]]:
    """Indices of each client's examples (disjoint, together all of range(n))."""
    if clients < 1:
        raise LorafleetError(f"--clients must be positive, got {clients}")
    if n < clients:
        raise LorafleetError(f"{n} training examples cannot be split among {clients} clients")
    if spec.kind == "iid":
        return iid_split(n, clients, seed)
    if keys is None or len(keys) != n:
        raise LorafleetError("a dirichlet split needs one label (or field value) per example")
    return dirichlet_split(keys, clients, float(spec.alpha), seed)


def label_histogram(parts: list[list[int]], keys: Sequence[Hashable]) -> list[dict[str, int]]:
    """Per client, how many examples of each key it holds (for the run's report)."""
    out = []
    for part in parts:
        counts: dict[str, int] = {}
        for i in part:
            counts[str(keys[i])] = counts.get(str(keys[i]), 0) + 1
        out.append(dict(sorted(counts.items())))
    return out
