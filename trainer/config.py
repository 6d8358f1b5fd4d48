# Over 400 lines for a reason: the schema is one commented field per line, with its checks.
"""The one config schema every experiment shares, and its validation.

Config files under `configs/` start from `default_config()` and override fields;
`python -m trainer --config=configs/<file>.py[:<variant>] --config.<field>=<value>`
loads them with ml_collections, which type-checks overrides and rejects a
misspelt field (the config is locked). `validate()` then checks the values that
a type cannot: choices, ranges and fields that only make sense together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections

from precond_service.client import parse_addresses, parse_cpus
from precond_service.common.auth import MIN_RUN_ID_BITS, run_id_bits
from precond_service.common.eigenbasis import PRECONDITIONERS
from precond_service.common.roots import METHODS as ROOT_METHODS
from precond_service.common.roots import RIDGE_MODES
from trainer.optimizers.service_bridge import CADENCES
from trainer.optimizers.shampoo import (
    GRAFT_SCOPES,
    GRAFT_TYPES,
    MOMENTUM_TYPES,
    PRECONDITION_MODES,
)

OPTIMIZERS = ("shampoo", "adam", "adagrad")
DATA_SOURCES = ("wmt14", "text", "numbers")
SCHEDULES = ("rsqrt", "constant")
MIXED_PRECISION = ("", "mixed_float16", "mixed_bfloat16")
DISTRIBUTIONS = ("none", "mirrored", "multi_worker")

# Fields that may differ between a workdir's config.json and the config that
# resumes it: how long and how often, where the service is, how to evaluate and
# decode. Every other field shapes the checkpointed state or what the run means
# (model, vocabulary and data, optimizer, precond.mode and update_steps, seed,
# mixed precision ...), and a resume that changes one is refused (see
# `config_differences`). A name ending in "." covers the whole section.
RESUMABLE_FIELDS = (
    "train.num_steps",
    "train.steps_per_loop",
    "train.log_every_s",
    "train.summary_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_checkpoints",
    "train.eval_every_steps",
    "train.max_loss",
    "train.max_consecutive_skipped_steps",
    "train.jit_compile",
    "train.deterministic",
    "train.restart",
    "train.device_cpus",
    "decode.",
    "data.eval_batch_size",
    "data.eval_bleu_examples",
    "data.max_eval_length",
    "data.numbers_eval_size",
    "data.dev_files",
    "data.test_files",
    "data.tfds_data_dir",
    "data.tfds_manual_dir",
    "data.split_cache_dir",
    "precond.address",
    "precond.workers",
    "precond.shards",
    "precond.service_flags",
    "precond.service.",
    "precond.token_file",
    "precond.tls_ca_file",
    "precond.tls_cert_file",
    "precond.tls_key_file",
    "precond.pull_interval_s",
    "precond.delay_timeout_s",
    "precond.host_cpus",
)


def default_config() -> ml_collections.ConfigDict:
    """All fields with their defaults: a Transformer-base WMT'14 En->Fr run with Shampoo."""
    config = ml_collections.ConfigDict()
    # Seed of parameter initialisation, dropout and data shuffling.
    config.seed = 0
    config.train = _train_fields()
    config.data = _data_fields()
    config.model = _model_fields()
    config.decode = _decode_fields()
    config.optimizer = _optimizer_fields()
    config.precond = _precond_fields()
    return config


def _train_fields() -> ml_collections.ConfigDict:
    """`config.train`: How long and how the loop runs: cadences, precision, limits."""
    section = ml_collections.ConfigDict()
    # Training steps in all (the run ends there; a resumed run counts from its checkpoint).
    section.num_steps = 100_000
    # Steps run inside one tf.function call; host work (pushes, summaries,
    # checkpoints) happens between such inner loops.
    section.steps_per_loop = 100
    # Data parallelism (trainer/distribution.py): "none" (one device), "mirrored"
    # (tf.distribute.MirroredStrategy over the local GPUs; on a CPU-only host over
    # train.virtual_cpu_devices logical devices) or "multi_worker"
    # (MultiWorkerMirroredStrategy over the processes TF_CONFIG names: each starts
    # with the same command; the chief evaluates, writes summaries and talks to the
    # preconditioner service). data.tokens_per_batch is the global budget, split
    # evenly over the replicas.
    section.distribution = "none"
    # Split the CPU into this many logical devices (0: do not), for "mirrored"
    # on a host without GPUs: tests and correctness runs, not speed.
    section.virtual_cpu_devices = 0
    # Micro-batches of data.tokens_per_batch whose gradients make one update
    # (gradient accumulation): the update is that of one batch k times as large.
    section.accumulate_steps = 1
    # Seconds between progress lines on the console.
    section.log_every_s = 5.0
    # Steps between TensorBoard training summaries (rounded up to inner loops).
    section.summary_every_steps = 100
    # Steps between checkpoints (rounded up to inner loops); the last step is always saved.
    section.checkpoint_every_steps = 2000
    # Checkpoints kept in the workdir.
    section.keep_checkpoints = 3
    # Steps between evaluations on the dev set; 0 evaluates only at the end.
    section.eval_every_steps = 5000
    # "" (float32), "mixed_float16" (GPU) or "mixed_bfloat16".
    section.mixed_precision = ""
    # Compile the training step with XLA. Not possible with precond.mode="sync",
    # whose roots run on the host inside the step.
    section.jit_compile = False
    # Loss above this (or non-finite) stops the run with a message.
    section.max_loss = 1e4
    # A step whose gradients hold NaN or infinity is skipped (weights, optimizer
    # state and statistics untouched) and counted; this many skipped in a row
    # stops the run with a message. With float16 loss scaling the scale is
    # lowered instead, which may take several skipped steps.
    section.max_consecutive_skipped_steps = 25
    # Deterministic TensorFlow ops (tf.config.experimental.enable_op_determinism):
    # the same command gives the same weights, also across a kill and resume in
    # precond.mode="sync" or with precond.delay_steps. Slower on a GPU.
    section.deterministic = False
    # Start afresh in a workdir that holds a run: its checkpoints, config.json,
    # summaries and results.json are moved to WORKDIR/previous/<UTC time>/
    # (never deleted). Without it, a config that changes a field outside
    # RESUMABLE_FIELDS is refused.
    section.restart = False
    # CPUs the trainer's TensorFlow thread pools run on ("0", "0-3", "0,2"), the
    # "device" of a CPU-only machine; "" does not pin. With precond.host_cpus it
    # emulates the paper's split of an accelerator that trains and host CPUs that
    # compute roots (on a GPU machine the step runs on the GPU instead).
    section.device_cpus = ""
    return section


def _data_fields() -> ml_collections.ConfigDict:
    """`config.data`: Where the sentence pairs come from, the vocabulary and the batches."""
    section = ml_collections.ConfigDict()
    # Where the sentence pairs come from: "wmt14" (TensorFlow Datasets),
    # "text" (the user's parallel files) or "numbers" (generated, offline).
    section.source = "wmt14"
    # TFDS dataset of the "wmt14" source.
    section.tfds_name = "wmt14_translate/fr-en"
    # TFDS data directory; "" uses TFDS's default (~/tensorflow_datasets).
    section.tfds_data_dir = ""
    # Directory holding manually downloaded WMT'14 archives; "" for none.
    section.tfds_manual_dir = ""
    # Comma-separated WMT'14 training corpora to use, "" for all of them
    # (e.g. "newscommentary_v9" for a small run).
    section.train_subsets = ""
    # Source and target language codes.
    section.source_language = "en"
    section.target_language = "fr"
    # "text" source: each split is one tab-separated file (source<TAB>target) or
    # two line-aligned files joined by a comma ("train.en,train.fr").
    section.train_files = ""
    section.dev_files = ""
    section.test_files = ""
    # "text" source from ONE parallel file (a TSV, or "a.en,a.fr"), split here into
    # train/dev/test by distinct source sentence (no source sentence in two splits),
    # shuffled with split_seed; then train/dev/test_files stay empty. The split files
    # are made once under split_cache_dir ("" = ~/.cache/async_shampoo) and reused.
    section.split_file = ""
    section.split_dev_size = 2000
    section.split_test_size = 2000
    section.split_seed = 0
    section.split_cache_dir = ""
    # "numbers" source: sizes of the generated splits and the largest number.
    section.numbers_train_size = 20_000
    section.numbers_eval_size = 500
    section.numbers_max = 999_999
    # SentencePiece model path; "" puts it in the workdir. Trained on the
    # training data when missing, reused when present.
    section.vocab_path = ""
    # Joint source+target SentencePiece vocabulary size.
    section.vocab_size = 32_000
    # Sentences (source and target each count) sampled to train SentencePiece.
    section.vocab_train_sentences = 1_000_000
    # Training pairs with more tokens than this on either side are dropped.
    section.max_length = 256
    # Dev/test sources are cut to this many tokens.
    section.max_eval_length = 512
    # Token budget of a training batch (padding included).
    section.tokens_per_batch = 4096
    # Examples held in the shuffle buffer.
    section.shuffle_buffer = 100_000
    # Evaluation batch size, in sentences.
    section.eval_batch_size = 64
    # Dev sentences translated for BLEU during training; 0 for all.
    section.eval_bleu_examples = 1000
    return section


def _model_fields() -> ml_collections.ConfigDict:
    """`config.model`: The Transformer."""
    section = ml_collections.ConfigDict()
    section.num_layers = 6
    section.d_model = 512
    section.num_heads = 8
    section.d_ff = 2048
    section.dropout = 0.1
    section.attention_dropout = 0.1
    # Positions the model can embed (source and target).
    section.max_length = 1024
    section.label_smoothing = 0.1
    return section


def _decode_fields() -> ml_collections.ConfigDict:
    """`config.decode`: Beam search for translation and BLEU."""
    section = ml_collections.ConfigDict()
    # 1 is greedy decoding.
    section.beam_size = 4
    # GNMT length penalty alpha: scores are divided by ((5 + length) / 6) ** alpha.
    section.length_penalty = 0.6
    # Output may be this many tokens longer than the source.
    section.max_extra_length = 50
    return section


def _optimizer_fields() -> ml_collections.ConfigDict:
    """`config.optimizer`: The optimizer, its schedule and the Shampoo-only settings."""
    section = ml_collections.ConfigDict()
    # "shampoo", "adam" or "adagrad".
    section.name = "shampoo"
    # Peak learning rate, reached at the end of warmup.
    section.learning_rate = 1e-3
    # "rsqrt": linear warmup, then decay as 1/sqrt(step). "constant": warmup, then flat.
    section.schedule = "rsqrt"
    section.warmup_steps = 4000
    # First moment (Adam and Shampoo momentum); 0 turns it off.
    section.beta1 = 0.9
    # Second-moment decay (Adam, Shampoo statistics and Adam grafting).
    section.beta2 = 0.98
    # Epsilon of Adam's and AdaGrad's denominators.
    section.epsilon = 1e-9
    # Decoupled weight decay; 0 for none.
    section.weight_decay = 0.0
    # Global gradient-norm clipping; 0 for none.
    section.clip_norm = 0.0
    # Shampoo-only settings.
    section.shampoo = ml_collections.ConfigDict()
    # What each block's factors give: "root" (Shampoo, L^(-1/4) G R^(-1/4) with
    # grafting) or "eigenbasis" (Adam run in the factors' eigenbasis, SOAP; it takes
    # optimizer.beta1, beta2 and epsilon as its Adam's, and no graft).
    section.shampoo.preconditioner = "root"
    section.shampoo.block_size = 128
    # Layer-wise grafting: "adam", "adagrad", "sgd" or "none".
    section.shampoo.graft_type = "adam"
    section.shampoo.nesterov = False
    # Graft-only steps before preconditioning starts.
    section.shampoo.start_preconditioning_step = 100
    # Steps between statistics updates.
    section.shampoo.statistics_compute_steps = 1
    # Dimensions larger than this are not preconditioned (vocabulary side of the embedding).
    section.shampoo.skip_preconditioning_dim_size_gt = 4096
    # Ridge ε of every statistic: "relative" adds ε·λmax·I always (the paper's);
    # "absolute_if_needed" adds ε·I only where λmin < ε (the reference PyTorch
    # implementation's, with ε = 1e-12).
    section.shampoo.matrix_epsilon = 1e-6
    section.shampoo.ridge_mode = "relative"
    # 0 uses the exponent -1/(2 * rank); p > 0 uses -1/p.
    section.shampoo.exponent_override = 0
    # Roots with a larger relative error are not installed.
    section.shampoo.inverse_failure_threshold = 0.1
    # Inverse-root solver: "schur_newton" (coupled Newton iteration) or "eigh"
    # (eigendecomposition); used by the sync mode and sent with each push.
    section.shampoo.root_method = "schur_newton"
    # The first moment: "gradient" (bias-corrected EMA of the gradient, before
    # preconditioning and grafting, as in the reference implementations) or
    # "update" (EMA of the grafted update, after preconditioning). Defaults picked
    # on the Tatoeba dev split (benchmarks/ablation.json).
    section.shampoo.momentum_type = "gradient"
    # The graft's norm is taken per "block" or per "layer" (all preconditioned
    # blocks of a variable).
    section.shampoo.graft_scope = "block"
    # Decay of the Kronecker statistics (1.0 sums them, also with an Adam graft);
    # unset: optimizer.beta2.
    section.shampoo.statistics_beta2 = ml_collections.config_dict.placeholder(float)
    return section


def _precond_fields() -> ml_collections.ConfigDict:
    """`config.precond`: Where the preconditioners come from: the service, or the trainer itself."""
    section = ml_collections.ConfigDict()
    # "async" (roots from the service), "sync" (roots inside the trainer every
    # update_steps) or "off" (grafting optimizer only).
    section.mode = "async"
    # Service address HOST:PORT; "" starts a service child process on loopback.
    # Several, comma-separated ("cpu1:50051,cpu2:50051"), shard the blocks over
    # those services by a stable hash of their keys (precond_service/sharding.py).
    section.address = ""
    # Steps between statistics pushes (async) or root computations (sync).
    section.update_steps = 100
    # Worker processes of a service the trainer starts itself (of each shard).
    section.workers = 1
    # Services (shards) the trainer starts itself when address is "".
    section.shards = 1
    # CPUs that service and its workers are pinned to ("1", "2-5"), the "host"
    # of train.device_cpus; "" does not pin.
    section.host_cpus = ""
    # "fixed": push statistics every update_steps updates. "adaptive": push again
    # as soon as every root of the previous push has arrived (at the latest after
    # update_steps), so staleness follows the service's throughput.
    section.cadence = "fixed"
    # Limits of a service the trainer starts itself (precond.service.*).
    section.service = _service_fields()
    # Escape hatch: further `python -m precond_service` flags for a service the
    # trainer starts, space-separated; a limit goes in precond.service.* instead.
    section.service_flags = ""
    # Reproducible async mode: 0 installs roots as soon as they arrive; D > 0
    # installs the root computed from the statistics of step t exactly at step
    # t + D, waiting for it if it has not arrived (1 <= D <= update_steps).
    section.delay_steps = 0
    # With delay_steps, how long the trainer waits for a root before it stops
    # with an error (the service is down, or could not compute the root).
    section.delay_timeout_s = 600.0
    # Run id at the service, also the key to the run's preconditioners; "" makes a
    # random one, kept in the workdir so that a resumed run uses it again. One of
    # your own must be long enough to hold 128 random bits (e.g. 32 hex digits):
    # whoever guesses it can read, poison or drop the run's preconditioners.
    section.run_id = ""
    # Seconds between the client's pulls of new preconditioners.
    section.pull_interval_s = 1.0
    # File holding the service's shared token; "" reads the PRECOND_SERVICE_TOKEN
    # environment variable, if set. The token itself never goes into the config.
    section.token_file = ""
    # PEM CA of the certificate of a TLS service at precond.address; "" connects
    # in plaintext. A service the trainer starts itself is plaintext on loopback.
    section.tls_ca_file = ""
    # PEM certificate and private key of the trainer, for a service that requires
    # client certificates (--tls_client_ca); both or neither, with tls_ca_file.
    section.tls_cert_file = ""
    section.tls_key_file = ""
    return section


# The `python -m precond_service` flags that precond.service.* sets, with their types.
SERVICE_LIMITS = {
    "max_matrix_size": int,
    "memory_budget_mb": int,
    "max_blocks": int,
    "max_blocks_per_run": int,
    "max_runs": int,
    "max_blocks_per_request": int,
    "max_streams": int,
    "max_streams_per_peer": int,
    "stream_idle_timeout_s": float,
    "stream_timeout_s": float,
    "run_ttl_s": float,
    "job_timeout_s": float,
}


def _service_fields() -> ml_collections.ConfigDict:
    """`config.precond.service`: Limits of a service the trainer starts; unset: its default.

    Each is the `python -m precond_service` flag of the same name (see its --help).
    """
    placeholder = ml_collections.config_dict.placeholder
    section = ml_collections.ConfigDict()
    # Largest matrix side accepted (the client refuses larger ones before sending);
    # sets the gRPC message size limit. Service default 4096.
    section.max_matrix_size = placeholder(int)
    # Most MiB held for clients (statistics being received, pending and computed,
    # published roots); a push beyond it is retried later. Service default 4096.
    section.memory_budget_mb = placeholder(int)
    # Most (run, key) blocks held over all runs, and most keys of one run.
    section.max_blocks = placeholder(int)
    section.max_blocks_per_run = placeholder(int)
    # Most runs held at once.
    section.max_runs = placeholder(int)
    # Most blocks in one push (>= max_blocks_per_run).
    section.max_blocks_per_request = placeholder(int)
    # Most pushes and pulls open at once, in all and on one connection.
    section.max_streams = placeholder(int)
    section.max_streams_per_peer = placeholder(int)
    # Seconds a stream may wait for its next message, and stay open in all.
    section.stream_idle_timeout_s = placeholder(float)
    section.stream_timeout_s = placeholder(float)
    # Seconds without a push or pull after which a run is dropped.
    section.run_ttl_s = placeholder(float)
    # Seconds one root may take before its worker is replaced; 0: no limit.
    section.job_timeout_s = placeholder(float)
    return section


def service_limit_flags(precond: ml_collections.ConfigDict) -> list[str]:
    """The `python -m precond_service` flags of the precond.service.* fields that are set."""
    return [
        f"--{name}={precond.service[name]}"
        for name in SERVICE_LIMITS
        if precond.service[name] is not None
    ]


def _check_choice(config: ml_collections.ConfigDict, field: str, allowed: Sequence[Any]) -> None:
    value = _get(config, field)
    if value not in allowed:
        raise ValueError(f"config.{field} must be one of {list(allowed)}, got {value!r}")


def _check_min(config: ml_collections.ConfigDict, field: str, minimum: float) -> None:
    value = _get(config, field)
    if value < minimum:
        raise ValueError(f"config.{field} must be >= {minimum}, got {value!r}")


def _check_split(data: ml_collections.ConfigDict) -> None:
    """config.data.split_file goes alone, with a dev split and sizes >= 0."""
    given = [f"config.data.{f}" for f in ("train_files", "dev_files", "test_files") if data[f]]
    if given:
        raise ValueError(
            f"config.data.split_file splits one file into train/dev/test; leave {given} "
            "empty, or give the three splits' files and no split_file"
        )
    if data.split_dev_size < 1 or data.split_test_size < 0:
        raise ValueError(
            "config.data.split_dev_size must be >= 1 and config.data.split_test_size >= 0, "
            f"got {data.split_dev_size} and {data.split_test_size}"
        )


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    value: Any = config
    for part in field.split("."):
        value = value[part]
    return value


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks values a field's type does not; raises ValueError naming the field."""
    _validate_values(config)
    _validate_model_and_data(config)
    _validate_precond(config)


def use_eigenbasis(config: ml_collections.ConfigDict) -> None:
    """Turns a Shampoo config into Adam in Shampoo's eigenbasis (SOAP), served async.

    β = (0.9, 0.98) for Adam's moments and 0.98 for the statistics, ε = 1e-8. SOAP's own
    defaults (arXiv 2409.11321), β = 0.95 for all three, were chosen for large-batch
    language models. On the Tatoeba dev split with 2048-token batches they ended at dev
    loss 1.777, against 1.691 for these (benchmarks/convergence.json,
    benchmarks/soap_betas.json). The bases come from the service as fast as it publishes
    them (the adaptive cadence, looked at every 2 steps): the eigenbasis gains only while
    it is fresh.
    """
    config.optimizer.name = "shampoo"
    config.optimizer.beta1 = 0.9
    config.optimizer.beta2 = 0.98
    config.optimizer.epsilon = 1e-8
    config.optimizer.shampoo.preconditioner = "eigenbasis"
    config.optimizer.shampoo.statistics_beta2 = 0.98
    config.precond.mode = "async"
    config.precond.cadence = "adaptive"
    config.train.steps_per_loop = min(config.train.steps_per_loop, 2)


def _validate_values(config: ml_collections.ConfigDict) -> None:
    """Choices and ranges of single fields."""
    _check_choice(config, "optimizer.name", OPTIMIZERS)
    _check_choice(config, "precond.mode", PRECONDITION_MODES)
    _check_choice(config, "data.source", DATA_SOURCES)
    _check_choice(config, "optimizer.schedule", SCHEDULES)
    _check_choice(config, "train.mixed_precision", MIXED_PRECISION)
    _check_choice(config, "optimizer.shampoo.graft_type", GRAFT_TYPES)
    _check_choice(config, "optimizer.shampoo.root_method", ROOT_METHODS)
    _check_choice(config, "optimizer.shampoo.ridge_mode", RIDGE_MODES)
    _check_choice(config, "optimizer.shampoo.preconditioner", PRECONDITIONERS)
    _check_choice(config, "optimizer.shampoo.momentum_type", MOMENTUM_TYPES)
    _check_choice(config, "optimizer.shampoo.graft_scope", GRAFT_SCOPES)
    _check_choice(config, "precond.cadence", CADENCES)
    _check_choice(config, "train.distribution", DISTRIBUTIONS)
    for field in ("train.device_cpus", "precond.host_cpus"):
        try:
            parse_cpus(_get(config, field))
        except ValueError as e:
            raise ValueError(f"config.{field}: {e}") from None
    statistics_beta2 = config.optimizer.shampoo.statistics_beta2
    if statistics_beta2 is not None and not 0.0 < statistics_beta2 <= 1.0:
        raise ValueError(
            "config.optimizer.shampoo.statistics_beta2 must be in (0, 1] or unset, got "
            f"{statistics_beta2!r}"
        )
    for field in (
        "train.num_steps",
        "train.steps_per_loop",
        "train.accumulate_steps",
        "train.summary_every_steps",
        "train.checkpoint_every_steps",
        "train.keep_checkpoints",
        "data.vocab_size",
        "data.max_length",
        "data.tokens_per_batch",
        "data.eval_batch_size",
        "model.num_layers",
        "model.d_model",
        "model.num_heads",
        "model.d_ff",
        "decode.beam_size",
        "optimizer.shampoo.block_size",
        "precond.update_steps",
        "precond.workers",
        "precond.shards",
    ):
        _check_min(config, field, 1)
    for field in (
        "train.eval_every_steps",
        "optimizer.warmup_steps",
        "data.eval_bleu_examples",
        "train.max_consecutive_skipped_steps",
        "precond.delay_steps",
        "train.virtual_cpu_devices",
    ):
        _check_min(config, field, 0)
    if config.precond.delay_timeout_s <= 0:
        raise ValueError(
            f"config.precond.delay_timeout_s must be > 0, got {config.precond.delay_timeout_s!r}"
        )


def _validate_model_and_data(config: ml_collections.ConfigDict) -> None:
    """Model, data and training fields that only make sense together."""
    if config.train.distribution == "multi_worker" and config.train.virtual_cpu_devices > 1:
        raise ValueError(
            "config.train.virtual_cpu_devices splits the CPU for "
            "config.train.distribution='mirrored' only; with 'multi_worker' each process "
            "is one CPU replica: set it to 0"
        )
    if config.train.distribution != "none" and config.train.mixed_precision == "mixed_float16":
        raise ValueError(
            "config.train.mixed_precision='mixed_float16' (loss scaling) is not supported with "
            f"config.train.distribution={config.train.distribution!r}: use 'mixed_bfloat16'"
        )
    if config.model.d_model % config.model.num_heads:
        raise ValueError(
            "config.model.d_model must be divisible by config.model.num_heads, got "
            f"{config.model.d_model} and {config.model.num_heads}"
        )
    if config.data.tokens_per_batch < config.data.max_length:
        raise ValueError(
            "config.data.tokens_per_batch must hold one example of config.data.max_length "
            f"tokens, got {config.data.tokens_per_batch} < {config.data.max_length}"
        )
    if config.model.max_length < max(config.data.max_length, config.data.max_eval_length):
        raise ValueError(
            "config.model.max_length must cover config.data.max_length and "
            f"config.data.max_eval_length, got {config.model.max_length}"
        )
    if config.data.source == "text" and config.data.split_file:
        _check_split(config.data)
    elif config.data.source == "text":
        for split in ("train", "dev"):
            if not config.data[f"{split}_files"]:
                raise ValueError(
                    f'config.data.{split}_files is required with config.data.source="text": '
                    f'one tab-separated file, or two line-aligned files as "{split}.en,{split}.fr"'
                )
    if config.precond.mode == "sync" and config.train.jit_compile:
        raise ValueError(
            'config.train.jit_compile=True is not possible with config.precond.mode="sync" '
            "(its roots run on the host inside the step); use async or set jit_compile=False"
        )


def _validate_precond(config: ml_collections.ConfigDict) -> None:
    """The preconditioning fields that only make sense together."""
    precond = config.precond
    _validate_tls(precond)
    _validate_address(precond)
    _validate_service_limits(precond)
    if precond.run_id and run_id_bits(precond.run_id) < MIN_RUN_ID_BITS:
        raise ValueError(
            f"config.precond.run_id ({len(precond.run_id)} characters) can hold at most "
            f"{run_id_bits(precond.run_id):.0f} bits of entropy, fewer than {MIN_RUN_ID_BITS}: "
            "whoever guesses it can read, poison or drop the run's preconditioners. Leave it "
            '"" for a random one kept in the workdir, or use e.g. 32 random hex digits '
            '(python -c "import secrets; print(secrets.token_hex(16))")'
        )
    if precond.delay_steps:
        _validate_delay(config)
    if config.optimizer.name != "shampoo" and config.precond.mode != "off":
        raise ValueError(
            f'config.precond.mode must be "off" for config.optimizer.name='
            f"{config.optimizer.name!r}, got {config.precond.mode!r}"
        )


def _validate_tls(precond: ml_collections.ConfigDict) -> None:
    """precond.tls_*_file: the certificate and key together, and both need the CA."""
    if bool(precond.tls_cert_file) != bool(precond.tls_key_file):
        raise ValueError(
            "config.precond.tls_cert_file and config.precond.tls_key_file go together, got "
            f"{precond.tls_cert_file!r} and {precond.tls_key_file!r}"
        )
    if precond.tls_cert_file and not precond.tls_ca_file:
        raise ValueError(
            "config.precond.tls_cert_file needs config.precond.tls_ca_file (the CA of the "
            "service's certificate); without it the trainer connects in plaintext"
        )


def _validate_address(precond: ml_collections.ConfigDict) -> None:
    """precond.address: well formed, and not together with what only a local service takes."""
    if precond.address:
        try:
            parse_addresses(precond.address)
        except ValueError as e:
            raise ValueError(f"config.precond.address: {e}") from None
        if precond.shards != 1:
            raise ValueError(
                "config.precond.shards starts that many services itself, so it needs "
                f"config.precond.address empty (got {precond.address!r}); to use running "
                "shards, list every one in config.precond.address, comma-separated"
            )
    if precond.tls_ca_file and not precond.address:
        raise ValueError(
            "config.precond.tls_ca_file needs config.precond.address: the service the "
            'trainer starts itself (address "") is plaintext on loopback'
        )


def _validate_service_limits(precond: ml_collections.ConfigDict) -> None:
    """precond.service.*: positive where set, and not also in precond.service_flags."""
    for name in SERVICE_LIMITS:
        value = precond.service[name]
        lowest = 0 if name == "job_timeout_s" else 1e-9
        if value is not None and value < lowest:
            raise ValueError(
                f"config.precond.service.{name} must be {'>= 0' if lowest == 0 else '> 0'} "
                f"or unset, got {value!r}"
            )
        if value is not None and f"--{name}" in precond.service_flags:
            raise ValueError(
                f"config.precond.service.{name} is set and config.precond.service_flags also "
                f"passes --{name} ({precond.service_flags!r}): set it in one place only"
            )


def _validate_delay(config: ml_collections.ConfigDict) -> None:
    """precond.delay_steps > 0, the repeatable async mode, and what it needs."""
    precond = config.precond
    if precond.cadence != "fixed":
        raise ValueError(
            'config.precond.delay_steps needs config.precond.cadence="fixed", got '
            f"{precond.cadence!r}: the repeatable mode pushes at multiples of update_steps"
        )
    if precond.mode != "async":
        raise ValueError(
            'config.precond.delay_steps applies to config.precond.mode="async" only, got '
            f"mode {precond.mode!r}; set delay_steps=0"
        )
    if precond.delay_steps > precond.update_steps:
        raise ValueError(
            "config.precond.delay_steps must be between 1 and config.precond.update_steps "
            f"({precond.update_steps}), got {precond.delay_steps}: a later push would "
            "replace the statistics whose root is awaited"
        )
    if config.train.checkpoint_every_steps % precond.update_steps:
        raise ValueError(
            "config.train.checkpoint_every_steps must be a multiple of "
            f"config.precond.update_steps ({precond.update_steps}) with "
            f"config.precond.delay_steps, got {config.train.checkpoint_every_steps}: a "
            "checkpoint between a push and its install could not resume exactly"
        )


def flatten_fields(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"section.name": value}."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_fields(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def is_resumable_field(field: str) -> bool:
    """Whether `field` ("section.name") may change when a run resumes (RESUMABLE_FIELDS)."""
    return any(
        field.startswith(allowed) if allowed.endswith(".") else field == allowed
        for allowed in RESUMABLE_FIELDS
    )


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields outside RESUMABLE_FIELDS whose value differs: field -> (old, new).

    A field the old config lacks (written before the field existed) is not
    compared: the old run used the field's default then.

    Args:
        old: The config a run wrote (config.json, as plain dicts).
        new: The config that would resume it (`config.to_dict()`).
    """
    old_flat, new_flat = flatten_fields(old), flatten_fields(new)
    return {
        field: (old_flat[field], value)
        for field, value in sorted(new_flat.items())
        if field in old_flat and old_flat[field] != value and not is_resumable_field(field)
    }
