"""How the service should compute eigenbases: full float64 eigh, or one warm-started QR step.

For each size n (one BLAS thread, as each service worker runs), a statistic that has
drifted the way an EMA with β2 = 0.95 drifts over `--drift_steps` steps of fresh
gradients is given to

* `eigh`: `precond_service.common.eigenbasis.eigenbasis` (float64 `numpy.linalg.eigh`,
  descending order, with its orthogonality check), what the service computes;
* `qr_step`: the SOAP reference's cheaper update, one power-iteration step from the
  previous basis, `Q ← QR(A·Q_prev)`, its columns sorted by the eigenvalue estimates
  `diag(Qᵀ A Q)`.

Quality is the off-diagonal energy `‖offdiag(Qᵀ A Q)‖_F / ‖A‖_F` of the basis on the
new statistic (0 for an exact eigenbasis); `stale` is that of the previous basis, not
updated. The per-block eigh time also gives how long one full refresh of the paper's
Big model (21,512 statistics of 128 × 128 at block size 128, docs/REPRODUCING.md) takes on a host
with `--host_cores` workers.

    python -m scripts.bench_eigenbasis   # about a minute: benchmarks/eigenbasis.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import threadpoolctl

from precond_service.common import eigenbasis
from scripts import harness

SOURCES = (*harness.COMMON, "scripts/bench_eigenbasis.py")
BIG_STATISTICS = 21_512  # wmt14_en_fr.py:big, block size 128 (docs/REPRODUCING.md)


def drifted_statistics(n: int, drift_steps: int, rng: np.random.Generator):
    """(A_old, A_new): an EMA of gradient outer products before and after `drift_steps` more."""
    scales = np.logspace(0, -2, n)
    beta = 0.95
    a = np.zeros((n, n))
    for _ in range(60):
        g = rng.normal(size=(n, 8)) * scales[:, None]
        a = beta * a + (1 - beta) * g @ g.T
    old = a.copy()
    for _ in range(drift_steps):
        g = rng.normal(size=(n, 8)) * scales[:, None]
        a = beta * a + (1 - beta) * g @ g.T
    return old, a


def qr_step(a: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """The reference's warm-started update: one power step, QR, sorted by estimates."""
    q, _ = np.linalg.qr(a @ previous)
    estimates = np.einsum("ij,ij->j", q, a @ q)
    return q[:, np.argsort(-estimates)]


def off_diagonal(a: np.ndarray, q: np.ndarray) -> float:
    """‖offdiag(Qᵀ A Q)‖_F / ‖A‖_F."""
    d = q.T @ a @ q
    return float(np.linalg.norm(d - np.diag(np.diag(d))) / np.linalg.norm(a))


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="128,256,512,1024")
    parser.add_argument("--drift_steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--host_cores", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/eigenbasis.json")
    args = parser.parse_args()
    threadpoolctl.threadpool_limits(1, user_api="blas")
    rng = np.random.default_rng(0)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        old, new = drifted_statistics(n, args.drift_steps, rng)
        previous = eigenbasis.eigenbasis(old).root
        eigh_s, exact = timed(lambda a=new: eigenbasis.eigenbasis(a).root, args.repeats)
        qr_s, approx = timed(lambda a=new, p=previous: qr_step(a, p), args.repeats)
        row = {
            "n": n,
            "eigh_seconds": eigh_s,
            "qr_step_seconds": qr_s,
            "eigh_over_qr_step": eigh_s / qr_s,
            "off_diagonal_eigh": off_diagonal(new, exact),
            "off_diagonal_qr_step": off_diagonal(new, approx),
            "off_diagonal_stale": off_diagonal(new, previous),
        }
        rows.append(row)
        print(
            f"n={n:5d} eigh {1e3 * eigh_s:8.1f} ms  qr step {1e3 * qr_s:8.1f} ms "
            f"(eigh {row['eigh_over_qr_step']:.2f}x)  off-diagonal: eigh "
            f"{row['off_diagonal_eigh']:.1e}, qr step {row['off_diagonal_qr_step']:.1e}, "
            f"stale {row['off_diagonal_stale']:.1e}"
        )
    per_block = rows[0]["eigh_seconds"] if rows[0]["n"] == 128 else None
    big = None
    if per_block is not None:
        big = {
            "statistics": BIG_STATISTICS,
            "eigh_seconds_per_128_statistic": per_block,
            "host_cores": args.host_cores,
            "refresh_seconds": BIG_STATISTICS * per_block / args.host_cores,
        }
        print(
            f"Big ({BIG_STATISTICS} statistics) on {args.host_cores} cores: one full "
            f"refresh every {big['refresh_seconds']:.1f} s"
        )
    harness.write(
        args.out,
        benchmark="eigenbasis",
        sources=SOURCES,
        results={
            "blas_threads": 1,
            "drift_steps": args.drift_steps,
            "repeats": args.repeats,
            "rows": rows,
            "big_model_refresh": big,
        },
        targets={},
        split=None,
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
