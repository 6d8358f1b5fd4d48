"""Async Shampoo in `model.fit`: the README's Keras example (docs/OPTIMIZER.md), runnable.

    python examples/keras_fit.py                          # starts a local service child
    python examples/keras_fit.py --service_address=HOST:PORT --epochs=5

A small regression model trained for a few epochs; the roots come from a
`python -m precond_service` child the optimizer starts and stops itself. Prints one
JSON line: the loss of each epoch and the roots' staleness at each epoch's end.
`tests/test_examples.py` runs it.
"""

from __future__ import annotations

import argparse
import json

import keras
import numpy as np

from trainer.optimizers import Shampoo


def make_data(n: int = 2048, d_in: int = 32, d_out: int = 4, seed: int = 0):
    """Inputs whose scales span two orders of magnitude, and a tanh teacher's outputs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)) * np.logspace(0, -2, d_in)
    y = np.tanh(x @ rng.normal(size=(d_in, 16))) @ rng.normal(size=(16, d_out))
    return x.astype(np.float32), y.astype(np.float32)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--service_address", default=None, help='"" or unset: a local child')
    args = parser.parse_args(argv)
    x, y = make_data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((x.shape[1],)), keras.layers.Dense(64, "tanh"), keras.layers.Dense(4)]
    )

    # The three lines: the optimizer starts (or joins) the service, the callback drives it.
    optimizer = Shampoo(
        1e-2,
        precondition_mode="async",
        service_address=args.service_address or None,
        start_preconditioning_step=5,
        preconditioning_compute_steps=5,
    )
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    history = model.fit(
        x, y, batch_size=64, epochs=args.epochs, verbose=0, callbacks=[optimizer.service_callback()]
    )

    result = {
        name: [float(v) for v in history.history[name]]
        for name in ("loss", "staleness_mean", "staleness_max", "preconditioned_fraction")
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
