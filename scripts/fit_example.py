"""Trains a small Keras model with Shampoo and compares it with Adam and AdaGrad.

    python -m scripts.fit_example                      # async: roots from a service child
    python -m scripts.fit_example --precond=sync       # roots computed inside the step
    python -m scripts.fit_example --optimizers=shampoo --epochs=40

The task is synthetic and ill-conditioned on purpose (input features whose scales
span two orders of magnitude, correlated by a random rotation), the regime where a
second-order method pays off. Each optimizer gets the same small learning-rate
sweep; the table at the end shows each one's best final loss.

In async mode the script starts `python -m precond_service` as a child process
shared by the sweep's runs, and each Shampoo joins it with
`Shampoo(..., service_address=...)` and `optimizer.service_callback()`, which pushes
its statistics every `--update_steps` steps and installs the roots as they arrive;
the staleness printed is how many steps old the roots in use are.
"""

from __future__ import annotations

import argparse
import logging
import time

import keras
import numpy as np

from precond_service.client import local_service
from trainer.optimizers import Shampoo
from trainer.optimizers.staleness import staleness

OPTIMIZERS = ("shampoo", "adam", "adagrad")


def make_data(seed: int, n: int = 4096, d_in: int = 64, d_out: int = 8):
    """Inputs with scales from 1 to 0.01 under a random rotation; an MLP teacher's outputs."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(d_in, d_in)))
    x = (rng.normal(size=(n, d_in)) * np.logspace(0, -2, d_in)) @ rotation.T
    hidden = np.tanh(x @ rng.normal(size=(d_in, 32)) * 2.0)
    y = hidden @ rng.normal(size=(32, d_out))
    return x.astype(np.float32), y.astype(np.float32)


def make_model(seed: int, d_in: int, d_out: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((d_in,)),
            keras.layers.Dense(128, activation="tanh", name="hidden"),
            keras.layers.Dense(d_out, name="out"),
        ]
    )


class EpochReport(keras.callbacks.Callback):
    """Prints one line per epoch: loss, time, and for Shampoo the roots' staleness."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        line = f"{self.label:<24} epoch {epoch + 1:3d}  loss {logs['loss']:.4e}"
        line += f"  {time.perf_counter() - self.started:6.1f} s"
        if isinstance(self.model.optimizer, Shampoo):
            s = staleness(self.model.optimizer)
            line += f"  preconditioned {100 * s.fraction_preconditioned:3.0f}%"
            if s.fraction_preconditioned:
                line += f"  staleness mean {s.mean:.0f} max {s.max:.0f} steps"
        print(line, flush=True)


def train(args: argparse.Namespace, name: str, lr: float, address: str | None) -> float:
    """Fits one model with optimizer `name` at learning rate `lr`; returns the final loss."""
    x, y = make_data(args.seed)
    model = make_model(args.seed, x.shape[1], y.shape[1])
    callbacks: list[keras.callbacks.Callback] = []
    if name == "shampoo":
        optimizer = Shampoo(
            lr,
            block_size=args.block_size,
            graft_type="adam",
            beta2=0.999,
            start_preconditioning_step=args.update_steps,
            preconditioning_compute_steps=args.update_steps,
            precondition_mode=args.precond,
            service_address=address,
        )
        if args.precond == "async":
            callbacks.append(optimizer.service_callback())
    elif name == "adam":
        optimizer = keras.optimizers.Adam(lr)
    else:
        # Sums start at zero, as in Duchi et al. and the trainer (Keras defaults to 0.1).
        optimizer = keras.optimizers.Adagrad(lr, initial_accumulator_value=0.0)
    label = f"{name}{'/' + args.precond if name == 'shampoo' else ''} lr={lr:g}"
    callbacks.append(EpochReport(label))
    model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    history = model.fit(
        x, y, batch_size=args.batch_size, epochs=args.epochs, verbose=0, callbacks=callbacks
    )
    return float(history.history["loss"][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated")
    parser.add_argument("--precond", choices=("async", "sync"), default="async")
    parser.add_argument(
        "--learning_rates", default="0.01,0.03,0.1,0.3", help="comma-separated sweep"
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--update_steps", type=int, default=10, help="steps between pushes")
    parser.add_argument("--workers", type=int, default=1, help="service worker processes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    for name in names:
        if name not in OPTIMIZERS:
            parser.error(f"--optimizers: {name!r} is not one of {', '.join(OPTIMIZERS)}")
    learning_rates = [float(v) for v in args.learning_rates.split(",")]
    logging.basicConfig(level=logging.WARNING)

    def sweep(address: str | None) -> dict[str, tuple[float, float]]:
        best = {}
        for name in names:
            losses = {lr: train(args, name, lr, address) for lr in learning_rates}
            lr = min(losses, key=losses.get)
            best[name] = (losses[lr], lr)
        return best

    if "shampoo" in names and args.precond == "async":
        with local_service(workers=args.workers) as address:
            print(f"precond_service child serving at {address}", flush=True)
            best = sweep(address)
    else:
        best = sweep(None)

    print(f"\n{'optimizer':<12}{'best loss':>12}{'at lr':>8}")
    for name, (loss, lr) in best.items():
        print(f"{name:<12}{loss:>12.4e}{lr:>8g}")


if __name__ == "__main__":
    main()
