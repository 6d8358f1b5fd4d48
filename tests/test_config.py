"""Configs: every shipped variant loads and validates; overrides and errors from the CLI."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from trainer import config as config_lib
from trainer import config_names
from trainer.optimizer_config import WarmupSchedule, make_optimizer
from trainer.optimizers import Shampoo

ROOT = Path(__file__).resolve().parents[1]


def load_config_file(name: str, variant: str | None = None):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if variant is None else module.get_config(variant)


@pytest.mark.parametrize("size", ["tiny", "base", "big"])
@pytest.mark.parametrize("optimizer", ["shampoo", "adam", "adagrad"])
def test_wmt14_variants_validate_and_set_size_and_optimizer(size, optimizer):
    config = load_config_file("wmt14_en_fr", f"{size}_{optimizer}")
    config_lib.validate(config)
    assert config.optimizer.name == optimizer
    assert config.precond.mode == ("async" if optimizer == "shampoo" else "off")
    assert config.model.d_model == {"tiny": 128, "base": 512, "big": 1024}[size]
    assert config.data.source == "wmt14"


def test_wmt14_default_variant_is_base_shampoo():
    assert load_config_file("wmt14_en_fr").to_dict() == (
        load_config_file("wmt14_en_fr", "base_shampoo").to_dict()
    )


def test_unknown_variant_names_the_choices():
    with pytest.raises(ValueError, match="huge_shampoo.*size in.*base.*big.*tiny"):
        load_config_file("wmt14_en_fr", "huge_shampoo")


@pytest.mark.parametrize("variant", ["shampoo", "sync", "adam", "adagrad"])
def test_quickstart_variants_validate_offline(variant):
    config = load_config_file("quickstart", variant)
    config_lib.validate(config)
    assert config.data.source == "numbers"


def test_text_config_needs_the_files_and_names_the_field():
    config = load_config_file("text_en_fr", "tiny_adam")
    with pytest.raises(ValueError, match=r"config\.data\.train_files is required"):
        config_lib.validate(config)
    config.data.train_files = "a.tsv"
    with pytest.raises(ValueError, match=r"config\.data\.dev_files is required"):
        config_lib.validate(config)
    config.data.dev_files = "dev.en,dev.fr"
    config_lib.validate(config)
    assert config.optimizer.name == "adam"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "precond.mode",
            "fast",
            r"config\.precond\.mode must be one of \['sync', 'async', 'off'\]",
        ),
        ("optimizer.name", "sgd", r"config\.optimizer\.name must be one of"),
        ("data.source", "web", r"config\.data\.source must be one of"),
        ("train.num_steps", 0, r"config\.train\.num_steps must be >= 1, got 0"),
        ("train.accumulate_steps", 0, r"config\.train\.accumulate_steps must be >= 1, got 0"),
        (
            "optimizer.shampoo.root_method",
            "svd",
            r"config\.optimizer\.shampoo\.root_method must be one of \['schur_newton', 'eigh'\]",
        ),
        ("model.num_heads", 3, r"d_model must be divisible by config\.model\.num_heads"),
        (
            "optimizer.shampoo.momentum_type",
            "nesterov",
            r"momentum_type must be one of \['update', 'gradient'\], got 'nesterov'",
        ),
        ("optimizer.shampoo.graft_scope", "net", r"graft_scope must be one of \['layer'"),
        (
            "optimizer.shampoo.ridge_mode",
            "absolute",
            r"ridge_mode must be one of \['relative', 'absolute_if_needed'\]",
        ),
        ("optimizer.shampoo.statistics_beta2", 0.0, r"statistics_beta2 must be in \(0, 1\]"),
        ("precond.cadence", "often", r"cadence must be one of \['fixed', 'adaptive'\]"),
        ("train.device_cpus", "0-", r"config\.train\.device_cpus: cpus='0-' is not a CPU list"),
        ("precond.host_cpus", "4096", r"config\.precond\.host_cpus: .*may not use"),
    ],
)
def test_validate_names_field_value_and_allowed_values(field, value, message):
    config = config_lib.default_config()
    *sections, name = field.split(".")
    parent = config
    for section in sections:
        parent = parent[section]
    parent[name] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_sync_mode_with_xla_is_refused_with_the_reason():
    config = config_lib.default_config()
    config.precond.mode = "sync"
    config.train.jit_compile = True
    with pytest.raises(ValueError, match="jit_compile=True is not possible"):
        config_lib.validate(config)


def test_first_order_optimizers_need_precond_off():
    config = config_lib.default_config()
    config.optimizer.name = "adam"
    with pytest.raises(ValueError, match=r'precond\.mode must be "off"'):
        config_lib.validate(config)


def _run_trainer_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def test_cli_rejects_misspelt_field_wrong_type_and_bad_choice(tmp_path):
    workdir = str(tmp_path / "w")
    misspelt = _run_trainer_cli(
        "--config=configs/quickstart.py", f"--workdir={workdir}", "--config.train.num_stpes=5"
    )
    # One line (no traceback, no TensorFlow start-up noise), with the nearest field.
    assert misspelt.returncode == 1
    assert misspelt.stderr.strip().splitlines() == [
        "python -m trainer: config has no field config.train.num_stpes; "
        "did you mean config.train.num_steps?"
    ]

    wrong_type = _run_trainer_cli(
        "--config=configs/quickstart.py", f"--workdir={workdir}", "--config.train.num_steps=many"
    )
    assert wrong_type.returncode != 0
    assert "num_steps" in wrong_type.stderr

    # A shipped config by name, as an installed trainer runs it from any folder.
    bad_choice = _run_trainer_cli(
        "--config=quickstart:adam", f"--workdir={workdir}", "--config.precond.mode=fast"
    )
    assert bad_choice.returncode == 1
    assert bad_choice.stderr.strip().splitlines() == [
        "python -m trainer: config.precond.mode must be one of ['sync', 'async', 'off'], got 'fast'"
    ]
    unknown = _run_trainer_cli("--config=quickstrat", f"--workdir={workdir}")
    assert unknown.returncode == 1
    assert "'quickstrat' is neither a config file" in unknown.stderr
    assert "quickstart" in unknown.stderr.split("shipped:")[-1]
    # Nothing was trained: refused before any work.
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_warmup_then_inverse_square_root():
    schedule = WarmupSchedule(peak=1e-3, warmup_steps=100, decay="rsqrt")
    rates = [float(schedule(step)) for step in (0, 49, 99, 399, 9999)]
    np.testing.assert_allclose(rates, [1e-5, 5e-4, 1e-3, 5e-4, 1e-4], rtol=1e-5)
    flat = WarmupSchedule(peak=1e-3, warmup_steps=100, decay="constant")
    assert float(flat(9999)) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("name", "mode", "cls"),
    [
        ("adam", "off", keras.optimizers.Adam),
        ("adagrad", "off", keras.optimizers.Adagrad),
        ("shampoo", "async", Shampoo),
        ("shampoo", "sync", Shampoo),
        ("shampoo", "off", Shampoo),
    ],
)
def test_make_optimizer_follows_name_and_precond_mode(name, mode, cls):
    config = config_lib.default_config()
    config.optimizer.name = name
    config.precond.mode = mode
    config.precond.update_steps = 7
    optimizer = make_optimizer(config)
    assert isinstance(optimizer, cls)
    if name == "adagrad":
        assert optimizer.initial_accumulator_value == 0.0
    if cls is Shampoo:
        assert optimizer.precondition_mode == mode
        assert optimizer.preconditioning_compute_steps == 7
        assert optimizer.root_method == "schur_newton"


def test_root_method_and_update_choices_reach_shampoo():
    config = config_lib.default_config()
    config.optimizer.shampoo.root_method = "eigh"
    config.optimizer.shampoo.momentum_type = "update"  # Each not the default.
    config.optimizer.shampoo.graft_scope = "layer"
    config.optimizer.shampoo.ridge_mode = "absolute_if_needed"
    config_lib.validate(config)
    optimizer = make_optimizer(config)
    chosen = (optimizer.root_method, optimizer.momentum_type, optimizer.graft_scope)
    assert chosen == ("eigh", "update", "layer")
    assert optimizer.ridge_mode == "absolute_if_needed"
    assert optimizer.statistics_beta2 == config.optimizer.beta2  # unset: tied
    config.optimizer.shampoo.statistics_beta2 = 1.0
    assert make_optimizer(config).statistics_beta2 == 1.0


def test_repeatable_mode_needs_the_fixed_cadence():
    config = config_lib.default_config()
    config.precond.delay_steps = 10
    config.precond.cadence = "adaptive"
    with pytest.raises(ValueError, match='delay_steps needs config.precond.cadence="fixed"'):
        config_lib.validate(config)


@pytest.mark.parametrize("run_id", ["my-experiment-1", "12345", "a" * 24, "0123456789abcdef"])
def test_guessable_run_ids_are_refused_with_the_reason(run_id):
    config = config_lib.default_config()
    config.precond.run_id = run_id
    with pytest.raises(ValueError, match=r"config.precond.run_id .* fewer than 128") as error:
        config_lib.validate(config)
    assert run_id not in str(error.value)  # The id is a secret: never echoed.
    assert "token_hex(16)" in str(error.value)


@pytest.mark.parametrize("run_id", ["", "0123456789abcdef" * 2, "host-" + "ab" * 16])
def test_run_ids_of_128_bits_or_more_are_accepted(run_id):
    config = config_lib.default_config()
    config.precond.run_id = run_id
    config_lib.validate(config)


def test_device_cpus_pin_every_thread_and_size_tensorflows_pools():
    lowest = min(os.sched_getaffinity(0))
    program = f"""
import os, threading
import tensorflow as tf
from trainer.process_setup import pin_to_cpus
started = threading.Event()
early = threading.Thread(target=started.wait, daemon=True)  # a thread from before the pin
early.start()
assert pin_to_cpus("{lowest}") == {{{lowest}}}
tasks = os.listdir("/proc/self/task")
assert all(os.sched_getaffinity(int(t)) == {{{lowest}}} for t in tasks), tasks
late = threading.Thread(target=lambda: None)
late.start(); late.join()
print(tf.config.threading.get_intra_op_parallelism_threads(),
      tf.config.threading.get_inter_op_parallelism_threads(),
      sorted(os.sched_getaffinity(early.native_id)))
started.set()
"""
    result = _run_python(program)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == f"1 1 [{lowest}]"


def test_constant_tuples_are_the_optimizer_and_service_ones():
    from precond_service.common import roots
    from trainer.optimizers import shampoo

    assert config_lib.GRAFT_TYPES is shampoo.GRAFT_TYPES
    assert config_lib.PRECONDITION_MODES is shampoo.PRECONDITION_MODES
    assert config_lib.ROOT_METHODS is roots.METHODS


def test_trainer_command_without_the_trainer_packages_says_what_to_install():
    # As on a host where only the service was installed (`pip install .`).
    program = (
        "import runpy, sys; sys.modules['absl'] = None; "
        "runpy.run_module('trainer', run_name='__main__')"
    )
    result = _run_python(program)
    assert result.returncode == 1
    assert "pip install 'async-shampoo[trainer]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_tensorflow_start_up_noise_is_filtered_and_other_lines_kept():
    program = (
        "import os\n"
        "from trainer.quiet import quiet_tensorflow_start\n"
        "with quiet_tensorflow_start():\n"
        "    import tensorflow as tf\n"
        "    os.write(2, b'a line of the run\\n')\n"
        "print(int(tf.constant(1) + 1))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = _run_python(program, env)
    assert result.returncode == 0 and result.stdout == "2\n"
    assert result.stderr.strip().splitlines() == ["a line of the run"]


def _run_python(program: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -c program` in the repository, its output captured."""
    return subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ if env is None else env, PYTHONPATH=str(ROOT)),
        timeout=120,
    )


def test_precond_address_lists_and_shards_are_checked():
    config = config_lib.default_config()
    config.precond.address = "cpu1:50051,cpu2:50051"
    config_lib.validate(config)  # Two running shards.
    config.precond.address = "cpu1:50051,cpu1:50051"
    with pytest.raises(ValueError, match=r"config\.precond\.address: an address appears twice"):
        config_lib.validate(config)
    config.precond.address = "cpu1:50051"
    config.precond.shards = 2
    with pytest.raises(ValueError, match=r"config\.precond\.shards starts that many services"):
        config_lib.validate(config)
    config.precond.address = ""
    config_lib.validate(config)  # Two shards the trainer starts itself.


def test_multi_worker_refuses_split_cpus_and_float16_loss_scaling():
    config = config_lib.default_config()
    config.train.distribution = "multi_worker"
    config_lib.validate(config)
    config.train.virtual_cpu_devices = 2
    with pytest.raises(ValueError, match="virtual_cpu_devices splits the CPU for.*'mirrored' only"):
        config_lib.validate(config)
    config.train.virtual_cpu_devices = 0
    config.train.mixed_precision = "mixed_float16"
    with pytest.raises(ValueError, match="distribution='multi_worker': use 'mixed_bfloat16'"):
        config_lib.validate(config)
    config.train.mixed_precision = ""
    config.train.distribution = "multi"
    with pytest.raises(ValueError, match="train.distribution.*multi_worker"):
        config_lib.validate(config)


def test_shipped_config_names_resolve_to_the_configs_package():
    path = config_names.config_path("quickstart:sync")
    assert path == f"{ROOT / 'configs' / 'quickstart.py'}:sync"
    assert config_names.config_path("my/own.py:v") == "my/own.py:v"
    assert {"quickstart", "wmt14_en_fr", "text_en_fr"} <= set(config_names.shipped_configs())


def test_service_limits_are_typed_fields_that_become_service_flags():
    config = config_lib.default_config()
    assert config_lib.service_limit_flags(config.precond) == []
    config.precond.service.memory_budget_mb = 512
    config.precond.service.stream_timeout_s = 30.0
    assert config_lib.service_limit_flags(config.precond) == [
        "--memory_budget_mb=512",
        "--stream_timeout_s=30.0",
    ]
    config_lib.validate(config)
    config.precond.service_flags = "--memory_budget_mb=64"
    with pytest.raises(ValueError, match="set it in one place only"):
        config_lib.validate(config)
    config.precond.service_flags = ""
    config.precond.service.max_runs = 0
    with pytest.raises(ValueError, match=r"precond\.service\.max_runs must be > 0"):
        config_lib.validate(config)
    assert config_lib.is_resumable_field("precond.service.max_runs")
