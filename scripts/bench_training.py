# Over 400 lines for a reason: the one module all training benchmarks share.
"""Training runs on Tatoeba English-French that the training benchmarks share.

One run = one optimizer (Adam, AdaGrad, or Shampoo with its preconditioner
mode) at one learning rate and preconditioner period N, for a fixed step budget,
on the same CPU-sized Transformer and the same batches (same seed). A run
records, every `eval_every` steps, the wall-clock seconds spent training so far,
the training loss and (Shampoo) the staleness of the preconditioners in use;
the dev loss of each of those points is computed after training from copies of
the weights, so that evaluation never pauses training (an asynchronous service
would otherwise get free time to catch up while the trainer evaluates). At the
end the test split is translated (greedy) for sacreBLEU.

Every run is its own process (`python -m scripts.bench_training --task=train
--spec=JSON --run_dir=DIR`): the optimizers share no TensorFlow state, and a sweep
can be interrupted and resumed, since finished runs are kept under `--work_dir` and
reused by every benchmark that asks for the same spec, with the same resolved
optimizer config, on the same code (`TRAINING_SOURCES`' hash).

Data: `<data_dir>/tatoeba_en_fr/fra.txt` (read in place), split by distinct
English sentence with a fixed seed into train/dev/test TSV files under the work
directory (outside the repository).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from scripts import harness

REPO_ROOT = harness.REPO_ROOT
# What a training run exercises: a cached run is reused only while these are unchanged.
TRAINING_SOURCES = (*harness.PRODUCT, "scripts/bench_training.py")

log = logging.getLogger("bench_training")

DEFAULT_WORK_DIR = "/tmp/shampoo_bench"
DEFAULT_DATA_DIR = str(REPO_ROOT.parent / "shared" / "data")

# Peak learning rates the sweeps are centred on (multiplied by the sweep's
# factors). Shampoo grafts Adam's per-layer step size, so it shares Adam's scale.
# Adam's first sweep around 2e-3 was best at its top (4e-3), so the centre moved up.
# Adam in Shampoo's eigenbasis ("soap") starts from the same scale.
BASE_LEARNING_RATES = {"adam": 4e-3, "shampoo": 4e-3, "soap": 4e-3, "adagrad": 0.1}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What distinguishes one benchmark run from another.

    Attributes:
        optimizer: "adam", "adagrad", "shampoo" or "soap" (configs/wmt14_en_fr.py's
            variants: "soap" is Shampoo with `preconditioner="eigenbasis"`).
        mode: Shampoo's `precond.mode` ("async", "sync"); "off" for the others.
        learning_rate: Peak learning rate after warmup.
        update_steps: Preconditioner period N (statistics push or root computation).
        num_steps: Step budget.
        eval_every: Steps between the recorded points of the curve.
        seed: Seed of initialisation, data order and dropout.
        delay_steps: Async Shampoo's `precond.delay_steps` (0: roots installed on
            arrival; D: exactly D steps after their statistics).
        device_cpus: `train.device_cpus`, the cores every optimizer trains on.
        host_cpus: `precond.host_cpus`, the cores of async Shampoo's service.
        cadence: Async Shampoo's `precond.cadence`.
        shampoo: Further `optimizer.shampoo.*` fields, as sorted (name, value) pairs.
        betas: (beta1, beta2) instead of the variant's, or () to keep them.
        steps_per_loop: `train.steps_per_loop`: how often the host looks at the
            service (the adaptive cadence pushes at these boundaries).
    """

    optimizer: str
    mode: str
    learning_rate: float
    update_steps: int = 10
    num_steps: int = 600
    eval_every: int = 50
    seed: int = 0
    delay_steps: int = 0
    device_cpus: str = ""
    host_cpus: str = ""
    cadence: str = "fixed"
    shampoo: tuple[tuple[str, Any], ...] = ()
    betas: tuple[float, ...] = ()
    steps_per_loop: int = 50

    @property
    def label(self) -> str:
        """Short name for plots and logs, e.g. "shampoo-async" or "adam-b0.95,0.95"."""
        label = self.optimizer if self.mode == "off" else f"{self.optimizer}-{self.mode}"
        return label + (f"-b{','.join(f'{b:g}' for b in self.betas)}" if self.betas else "")

    @property
    def name(self) -> str:
        """Directory name of the run under the work directory."""
        return (
            f"{self.label}_lr{self.learning_rate:.3g}_N{self.update_steps}"
            f"_steps{self.num_steps}_every{self.eval_every}_seed{self.seed}"
            + (f"_D{self.delay_steps}" if self.delay_steps else "")
            + (f"_cpu{self.device_cpus}-{self.host_cpus}" if self.device_cpus else "")
            + (f"_{self.cadence}" if self.cadence != "fixed" else "")
            + "".join(f"_{name}{value}" for name, value in self.shampoo)
            + (f"_loop{self.steps_per_loop}" if self.steps_per_loop != 50 else "")
        )


def shampoo(mode: str, learning_rate: float, **kwargs: Any) -> RunSpec:
    """A Shampoo run spec."""
    return RunSpec("shampoo", mode, learning_rate, **kwargs)


def first_order(optimizer: str, learning_rate: float, **kwargs: Any) -> RunSpec:
    """An Adam or AdaGrad run spec."""
    return RunSpec(optimizer, "off", learning_rate, **kwargs)


def spec_from_dict(fields: dict[str, Any]) -> RunSpec:
    """A RunSpec from its JSON form (where the `shampoo` pairs became lists)."""
    fields = {
        **fields,
        "shampoo": tuple(tuple(pair) for pair in fields.get("shampoo", ())),
        "betas": tuple(fields.get("betas", ())),
    }
    return RunSpec(**fields)


def parse_shampoo_fields(text: str) -> tuple[tuple[str, Any], ...]:
    """ "momentum_type=gradient,statistics_beta2=1.0" -> sorted (name, value) pairs.

    Raises:
        ValueError: An entry is not name=value, or names no `optimizer.shampoo` field.
    """
    from trainer.config import default_config

    known = default_config().optimizer.shampoo
    pairs = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = entry.partition("=")
        if not sep or name not in known:
            raise ValueError(
                f"{entry!r} is not name=value of an optimizer.shampoo field ({sorted(known)})"
            )
        try:
            parsed: Any = float(value)
        except ValueError:
            parsed = value
        pairs.append((name, parsed))
    return tuple(sorted(pairs))


# ----------------------------------------------------------------- data


def prepare_tatoeba(
    data_dir: str,
    work_dir: str,
    seed: int = 0,
    dev_sentences: int = 2000,
    test_sentences: int = 2000,
) -> dict[str, str]:
    """Splits Tatoeba En-Fr by distinct English sentence into train/dev/test TSVs.

    The English sentences are shuffled with `seed`; the first `dev_sentences` go
    to dev, the next `test_sentences` to test, the rest to train, each with all
    its French translations. Files are written once per (seed, sizes).

    Returns:
        {"train": path, "dev": path, "test": path}.

    Raises:
        ValueError: The corpus has too few English sentences for the splits.
    """
    source = Path(data_dir) / "tatoeba_en_fr" / "fra.txt"
    if not source.is_file():
        sys.exit(f"{source} does not exist; pass --data_dir=<folder with tatoeba_en_fr/fra.txt>")
    from trainer.data.sources import split_parallel_file

    out_dir = Path(work_dir) / f"tatoeba_seed{seed}_dev{dev_sentences}_test{test_sentences}"
    files = split_parallel_file([source], out_dir, dev_sentences, test_sentences, seed)
    return {split: str(path) for split, path in files.items()}


# ----------------------------------------------------------------- config


def bench_config(spec: RunSpec, files: dict[str, str], vocab_path: str):
    """The trainer config of a run: configs/text_en_fr.py's tiny model on Tatoeba."""
    import importlib.util

    path = REPO_ROOT / "configs" / "text_en_fr.py"
    module_spec = importlib.util.spec_from_file_location("text_en_fr_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(f"tiny_{spec.optimizer}")
    config.seed = spec.seed
    data = config.data
    data.train_files, data.dev_files, data.test_files = files["train"], files["dev"], files["test"]
    data.vocab_path = vocab_path
    data.vocab_size = 4000
    data.vocab_train_sentences = 200_000
    data.max_length = 32
    data.max_eval_length = 64
    data.tokens_per_batch = 2048
    data.shuffle_buffer = 50_000
    data.eval_batch_size = 256
    config.decode.beam_size = 1

    config.optimizer.learning_rate = spec.learning_rate
    if spec.betas:
        config.optimizer.beta1, config.optimizer.beta2 = spec.betas
    config.optimizer.warmup_steps = 100
    config.optimizer.shampoo.start_preconditioning_step = 50
    config.precond.mode = spec.mode
    config.precond.update_steps = spec.update_steps
    config.precond.delay_steps = spec.delay_steps
    config.train.deterministic = bool(spec.delay_steps)
    config.train.device_cpus = spec.device_cpus
    config.precond.host_cpus = spec.host_cpus
    config.precond.cadence = spec.cadence
    for name, value in spec.shampoo:
        config.optimizer.shampoo[name] = value

    train = config.train
    train.num_steps = spec.num_steps
    train.steps_per_loop = spec.steps_per_loop
    train.log_every_s = 30.0
    train.summary_every_steps = spec.eval_every
    train.checkpoint_every_steps = spec.num_steps
    train.keep_checkpoints = 1
    train.eval_every_steps = 0
    return config


def resolved_optimizer(spec: RunSpec) -> dict[str, Any]:
    """`config.optimizer` of a run as JSON, defaults resolved; what a cached run must match.

    A run cached before a default changed no longer matches, though its spec does.
    """
    optimizer = bench_config(spec, {"train": "", "dev": "", "test": ""}, "").optimizer.to_dict()
    if spec.optimizer not in ("shampoo", "soap"):
        del optimizer["shampoo"]
    return json.loads(json.dumps(optimizer))


# ----------------------------------------------------------------- one run


def run(spec: RunSpec, files: dict[str, str], vocab_path: str, workdir: str) -> dict:
    """Trains `spec` from scratch in `workdir`; returns its curve and final results."""
    import shutil

    import numpy as np

    from trainer.optimizers import Shampoo
    from trainer.optimizers.service_bridge import staleness
    from trainer.process_setup import setup_process
    from trainer.train import Trainer

    shutil.rmtree(workdir, ignore_errors=True)
    config = bench_config(spec, files, vocab_path)
    setup_process(config)
    trainer = Trainer(config, workdir)
    variables = trainer.model.trainable_variables
    points: list[dict] = []
    snapshots: list[list[np.ndarray]] = []
    diverged = None
    with trainer.preconditioning() as bridge:
        began = time.perf_counter()
        trainer.train(bridge, until_step=1)  # traces the loop: timed apart
        compile_seconds = time.perf_counter() - began
        wall = 0.0
        for target in range(spec.eval_every, spec.num_steps + 1, spec.eval_every):
            began = time.perf_counter()
            try:
                trainer.train(bridge, until_step=target)
            except FloatingPointError as e:
                diverged = str(e)
                log.warning("%s diverged: %s", spec.name, e)
                break
            wall += time.perf_counter() - began
            point = {"step": target, "wall_s": wall, "train_loss": trainer.last_train_loss}
            if isinstance(trainer.optimizer, Shampoo) and spec.mode != "off":
                held = staleness(trainer.optimizer)
                point["staleness"] = dataclasses.asdict(held)
            points.append(point)
            snapshots.append([v.numpy() for v in variables])
    for point, weights in zip(points, snapshots):
        for variable, value in zip(variables, weights):
            variable.assign(value)
        point["dev_loss"], point["dev_accuracy"] = trainer.evaluator.loss("dev")
        log.info("%s step %d: dev loss %.4f", spec.name, point["step"], point["dev_loss"])
    result: dict[str, Any] = {
        "spec": dataclasses.asdict(spec),
        "optimizer_config": resolved_optimizer(spec),
        "compile_seconds": compile_seconds,
        "points": points,
        "diverged": diverged,
    }
    if bridge is not None:
        result["delay_wait_seconds"] = bridge.wait_seconds
    if points and diverged is None:
        result["mean_step_seconds"] = points[-1]["wall_s"] / (points[-1]["step"] - 1)
    return result


def test_scores(spec: RunSpec, files: dict[str, str], vocab_path: str, workdir: str) -> dict:
    """Test loss and greedy-decoding sacreBLEU of a finished run's final checkpoint."""
    from trainer.process_setup import setup_process
    from trainer.train import Trainer

    config = bench_config(spec, files, vocab_path)
    setup_process(config)
    trainer = Trainer(config, workdir)
    if trainer.restored_step != spec.num_steps:
        raise RuntimeError(f"{workdir} holds step {trainer.restored_step}, not {spec.num_steps}")
    test = trainer.evaluator.evaluate("test", max_bleu_examples=0)
    log.info("%s: test loss %.4f, BLEU %.2f", spec.name, test.loss, test.bleu)
    return {"test_loss": test.loss, "test_bleu": test.bleu, "test_sentences": test.bleu_sentences}


def cached_run(spec: RunSpec, args: argparse.Namespace, test: bool = False) -> dict:
    """The result of `spec`, run now in a child process unless the work directory has it.

    Args:
        spec: The run.
        args: The benchmark's flags (`--work_dir`, `--data_dir`).
        test: Also translate the test split with the final weights (greedy, sacreBLEU).
    """
    run_dir = Path(args.work_dir) / "runs" / spec.name
    out = run_dir / "result.json"
    result = json.loads(out.read_text()) if out.is_file() else {}
    # Runs cached before a field existed hold its default.
    defaults = dataclasses.asdict(RunSpec("", "", 0.0))
    stored = {**defaults, **result["spec"]} if "spec" in result else None
    if stored is not None:  # JSON keeps tuples as lists
        stored = dataclasses.asdict(spec_from_dict(stored))
    same_optimizer = result.get("optimizer_config") == resolved_optimizer(spec)
    same_code = result.get("code_hash") == training_code_hash()
    if stored != dataclasses.asdict(spec) or not same_optimizer or not same_code:
        _child(spec, args, "train", run_dir)
        result = json.loads(out.read_text())
    else:
        log.info("reusing %s", out)
    if test and "test_bleu" not in result and result["diverged"] is None:
        _child(spec, args, "test", run_dir)
        result = json.loads(out.read_text())
    return result


@functools.cache
def training_code_hash() -> str:
    """The hash of the code a training run exercises (`TRAINING_SOURCES`), now."""
    return harness.code_hash(TRAINING_SOURCES)


def _child(spec: RunSpec, args: argparse.Namespace, task: str, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "scripts.bench_training",
        f"--task={task}",
        f"--spec={json.dumps(dataclasses.asdict(spec))}",
        f"--run_dir={run_dir}",
        f"--work_dir={args.work_dir}",
        f"--data_dir={args.data_dir}",
    ]
    log.info("%s: %s", task, spec.name)
    began = time.monotonic()
    log_path = run_dir / f"{task}.log"
    with open(log_path, "w") as log_file:
        status = subprocess.run(
            command, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT
        ).returncode
    if status != 0:
        tail = log_path.read_text().splitlines()[-20:]
        raise RuntimeError(f"{task} of {spec.name} failed (exit {status}):\n" + "\n".join(tail))
    log.info("%s: %s done in %.0f s", task, spec.name, time.monotonic() - began)


def default_device_cpus() -> str:
    """The lowest usable core: the emulated accelerator."""
    return str(min(os.sched_getaffinity(0)))


def default_host_cpus() -> str:
    """The usable cores but the device's: the host CPUs the paper's roots run on."""
    rest = sorted(os.sched_getaffinity(0) - {int(default_device_cpus())})
    return ",".join(str(cpu) for cpu in rest) or default_device_cpus()


def regime(args: argparse.Namespace) -> dict[str, str]:
    """RunSpec fields that put a run on the benchmark's device and host cores."""
    return {"device_cpus": args.device_cpus, "host_cpus": args.host_cpus}


def shared_paths(args: argparse.Namespace) -> tuple[dict[str, str], str]:
    """The Tatoeba split files and the vocabulary path every run shares."""
    files = prepare_tatoeba(args.data_dir, args.work_dir)
    digest = hashlib.sha1(Path(files["train"]).read_bytes()).hexdigest()[:10]
    return files, str(Path(args.work_dir) / f"spm4000_{digest}.model")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every training benchmark takes."""
    parser.add_argument(
        "--device_cpus",
        default=default_device_cpus(),
        help="cores every optimizer's training step runs on (the 'device'); '' for all",
    )
    parser.add_argument(
        "--host_cpus",
        default=default_host_cpus(),
        help="cores of async Shampoo's service and workers (the 'host'); '' for all",
    )
    parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR, help="holds tatoeba_en_fr/fra.txt")
    parser.add_argument(
        "--work_dir",
        default=DEFAULT_WORK_DIR,
        help="split data, vocabulary and finished runs (reused by later invocations)",
    )


# ----------------------------------------------------------------- reports


def convergence_results() -> dict:
    """The results of benchmarks/convergence.json (best rates, Adam's best run), or {}."""
    path = REPO_ROOT / "benchmarks" / "convergence.json"
    return json.loads(path.read_text()).get("results", {}) if path.is_file() else {}


def final_dev_loss(result: dict) -> float:
    """Dev loss at the last step; inf for a run that diverged."""
    if result["diverged"] is not None or not result["points"]:
        return float("inf")
    return result["points"][-1]["dev_loss"]


def best_dev_loss(result: dict) -> float:
    """Lowest dev loss on the curve; inf for a run that diverged."""
    if result["diverged"] is not None or not result["points"]:
        return float("inf")
    return min(point["dev_loss"] for point in result["points"])


def first_reaching(result: dict, target: float) -> dict | None:
    """The first recorded point whose dev loss is at or below `target`, or None."""
    for point in result["points"]:
        if point["dev_loss"] <= target:
            return point
    return None


def write_report(
    path: str,
    args: argparse.Namespace,
    specs: list[RunSpec],
    body: dict,
    script: str,
    targets: dict[str, dict] | None = None,
) -> dict:
    """Writes a training benchmark's JSON through the harness: config, runs, results.

    Args:
        path: Output JSON (its stem names the benchmark).
        args: The benchmark's flags (data, work dir, split).
        specs: Every run it made.
        body: Its own figures.
        script: The benchmark's module file, relative to the repository root.
        targets: Description -> `harness.target(...)` row.
    """
    files, vocab_path = shared_paths(args)
    example = bench_config(specs[0], files, vocab_path)
    config = {
        "data": {
            "source": str((Path(args.data_dir) / "tatoeba_en_fr" / "fra.txt").resolve()),
            "split": "by distinct English sentence, seed 0: 2000 dev, 2000 test, rest train",
            "pairs": {split: _count_lines(name) for split, name in files.items()},
        },
        "model": example.model.to_dict(),
        "data_config": {
            key: example.data[key]
            for key in ("vocab_size", "max_length", "tokens_per_batch", "shuffle_buffer")
        },
        "optimizer": {
            key: example.optimizer[key] for key in ("schedule", "warmup_steps", "beta1", "beta2")
        },
        "shampoo": example.optimizer.shampoo.to_dict(),
        "runs": [dataclasses.asdict(spec) for spec in specs],
    }
    return harness.write(
        path,
        benchmark=Path(path).stem,
        sources=(*TRAINING_SOURCES, script),
        results={"config": config, **body},
        targets=targets,
        split={"device_cpus": args.device_cpus, "host_cpus": args.host_cpus},
    )


def _count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def main() -> None:
    """One run's training or test scoring (the child process of `cached_run`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("train", "test"), required=True)
    parser.add_argument("--spec", required=True, help="RunSpec as JSON")
    parser.add_argument("--run_dir", required=True, help="result.json and the workdir go here")
    add_common_flags(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = spec_from_dict(json.loads(args.spec))
    files, vocab_path = shared_paths(args)
    out = Path(args.run_dir) / "result.json"
    workdir = str(Path(args.run_dir) / "workdir")
    if args.task == "train":
        result = run(spec, files, vocab_path, workdir)
        result["code_hash"] = training_code_hash()
    else:
        result = json.loads(out.read_text())
        result.update(test_scores(spec, files, vocab_path, workdir))
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
