"""`python -m trainer.translate --workdir=DIR [--input=FILE] [--output=FILE]`.

Translates one sentence per line with the newest checkpoint of a training run,
using the run's own config and vocabulary. Reads stdin and writes stdout by
default.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import sys  # noqa: E402

from absl import app, flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "The --workdir of a training run.")
_INPUT = flags.DEFINE_string("input", "-", "File of source sentences, one per line; - is stdin.")
_OUTPUT = flags.DEFINE_string("output", "-", "File for the translations; - is stdout.")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", None, "Overrides config.decode.beam_size.")
_LENGTH_PENALTY = flags.DEFINE_float(
    "length_penalty", None, "Overrides config.decode.length_penalty."
)
flags.mark_flags_as_required(["workdir"])


def load_translator(
    workdir: str, beam_size: int | None = None, length_penalty: float | None = None
):
    """An `Evaluator` holding the newest checkpoint's model of the run in `workdir`.

    Raises:
        FileNotFoundError: The workdir has no config, vocabulary or checkpoint.
    """
    import tensorflow as tf

    from trainer import checkpoints, evaluation, train
    from trainer.data.tokenizer import Tokenizer
    from trainer.model import transformer

    config = checkpoints.load_workdir_config(workdir)
    if beam_size is not None:
        config.decode.beam_size = beam_size
    if length_penalty is not None:
        config.decode.length_penalty = length_penalty
    vocab = train.vocab_path_for(config, workdir)
    if not os.path.exists(vocab):
        raise FileNotFoundError(f"no SentencePiece model at {vocab}")
    tokenizer = Tokenizer.load(vocab)
    model = transformer.build_transformer(config.model, tokenizer.vocab_size)
    directory = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
    latest = tf.train.latest_checkpoint(directory)
    if not latest:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    return evaluation.Evaluator(model, tokenizer, config), latest


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        translator, checkpoint = load_translator(
            _WORKDIR.value, _BEAM_SIZE.value, _LENGTH_PENALTY.value
        )
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from None
    print(f"translating with {checkpoint}", file=sys.stderr)
    source = sys.stdin if _INPUT.value == "-" else open(_INPUT.value, encoding="utf-8")
    with source:
        lines = [line.rstrip("\n") for line in source]
    translations = translator.translate(lines)
    text = "".join(t + "\n" for t in translations)
    if _OUTPUT.value == "-":
        sys.stdout.write(text)
    else:
        with open(_OUTPUT.value, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    app.run(main)
