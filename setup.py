"""Installs the asynchronous-Shampoo trainer: `trainer`, `precond_service` and `protos`."""

from setuptools import find_packages, setup

# Three kinds of host: `pip install .` (or ".[service]") installs the
# preconditioner service alone, which needs only these four and no TensorFlow;
# `pip install ".[trainer]"` adds the trainer (and the shipped configs);
# `pip install -e ".[test]"` adds the test tools on top, for development, and
# ".[bench]" the plotting of the benchmark scripts.
SERVICE_REQUIRES = [
    "numpy>=1.26,<3",
    "grpcio>=1.62,<2",
    "grpcio-health-checking>=1.62,<2",
    "protobuf>=4.25,<8",
]

TRAINER_REQUIRES = [
    "tensorflow>=2.21,<2.22",
    "keras>=3.10,<4",
    "absl-py>=2.0,<3",
    # Limits NumPy's BLAS threads inside the trainer (sync-mode roots).
    "threadpoolctl>=3.1,<4",
    # Configs as Python files with type-checked command-line overrides.
    "ml_collections>=1.0,<2",
    # Data: WMT'14 through TFDS, a joint SentencePiece vocabulary, BLEU.
    "tensorflow-datasets>=4.9.4,<5",
    # Used by TFDS's WMT download code but not declared by it.
    "importlib_resources>=6",
    "sentencepiece>=0.2,<0.3",
    "sacrebleu>=2.4,<3",
    # tf.summary writes through it (TensorFlow no longer depends on it).
    "tensorboard>=2.20,<3",
]

# Plots of the benchmark scripts (scripts/bench_*.py).
BENCH_REQUIRES = [
    "matplotlib>=3.8,<4",
]

TEST_REQUIRES = [
    "pytest>=8,<10",
    "hypothesis>=6.100,<7",
    "ruff>=0.5",
    "grpcio-tools>=1.62,<2",
    # Makes the certificates of the TLS tests.
    "cryptography>=42",
]

setup(
    name="async-shampoo",
    version="0.1.0",
    description=(
        "A TensorFlow trainer whose Shampoo preconditioners are computed "
        "asynchronously by a separate CPU service."
    ),
    python_requires=">=3.11",
    # `configs` ships the experiment configs, run by name: --config=quickstart.
    packages=find_packages(include=["trainer*", "precond_service*", "protos*", "configs"]),
    install_requires=SERVICE_REQUIRES,
    extras_require={
        "service": [],
        "trainer": TRAINER_REQUIRES,
        "bench": TRAINER_REQUIRES + BENCH_REQUIRES,
        "test": TRAINER_REQUIRES + TEST_REQUIRES,
    },
)
