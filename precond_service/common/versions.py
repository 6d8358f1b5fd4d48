"""The one rule for "is this root or statistic newer than what is held?".

A statistic and the root computed from it are versioned by the optimizer step
at which the statistic was read (its update count, see `Shampoo.iterations`).
Every place that keeps one version per key (the client's caches, the service's
scheduler and store, the optimizer's installed roots) asks `is_newer`, so that
they agree on ties: an equal step is *not* newer, and is never installed twice.
"""

from __future__ import annotations

# The version of a key that holds nothing yet; every real step (>= 0) is newer.
NO_VERSION = -1


def is_newer(candidate: int, held: int | None) -> bool:
    """Whether version `candidate` replaces `held` (None or NO_VERSION: nothing held).

    Args:
        candidate: Step of the statistic (or of the root's statistic) offered.
        held: Step of what is held now; None when nothing is held.
    """
    return held is None or candidate > held


def newest(*steps: int | None) -> int | None:
    """The newest of `steps` under `is_newer`, ignoring None; None if all are None."""
    best: int | None = None
    for step in steps:
        if step is not None and is_newer(step, best):
            best = step
    return best
