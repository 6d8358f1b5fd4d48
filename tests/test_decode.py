# Over 400 lines for a reason: decoding's tests share their toy models and reference search.
"""Tests of cached decoding, greedy and beam search, and BLEU."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.config import default_config
from trainer.model.bleu import bleu_signature, corpus_bleu
from trainer.model.decode import (
    beam_search,
    decode_length,
    gnmt_length_penalty,
    greedy_decode,
    translate_batch,
)
from trainer.model.transformer import (
    EOS_ID,
    PAD_ID,
    Transformer,
    build_transformer,
    sequence_loss,
)

VOCAB_SIZE = 50
MAX_LENGTH = 32
# The copy task's alphabet: ids 2..21.
COPY_TOKENS = (2, 22)


def tiny_config(**overrides):
    config = default_config().model
    config.num_layers = 2
    config.d_model = 32
    config.num_heads = 4
    config.d_ff = 64
    config.max_length = MAX_LENGTH
    config.update(overrides)
    return config


def copy_batch(rng: np.random.Generator, size: int, max_tokens: int = 8) -> np.ndarray:
    """Rows of 3..max_tokens random alphabet tokens, then EOS, padded with 0."""
    batch = np.zeros((size, max_tokens + 1), np.int32)
    for row in range(size):
        length = rng.integers(3, max_tokens + 1)
        batch[row, :length] = rng.integers(*COPY_TOKENS, length)
        batch[row, length] = EOS_ID
    return batch


@pytest.fixture(scope="module")
def random_model() -> Transformer:
    keras.utils.set_random_seed(0)
    return build_transformer(tiny_config(), VOCAB_SIZE)


@pytest.fixture(scope="module")
def copy_model() -> Transformer:
    """A tiny model trained with Adam to copy its input (a few seconds on CPU)."""
    keras.utils.set_random_seed(0)
    model = build_transformer(tiny_config(dropout=0.0, attention_dropout=0.0), VOCAB_SIZE)
    steps = 250
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(0.01, steps))
    optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(batch):
        with tf.GradientTape() as tape:
            logits = model({"inputs": batch, "targets": batch}, training=True)
            loss_sum, weight_sum = sequence_loss(logits, batch, 0.0)
            loss = loss_sum / weight_sum
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    rng = np.random.default_rng(0)
    for _ in range(steps):
        loss = train_step(tf.constant(copy_batch(rng, 64)))
    assert float(loss) < 0.1
    return model


def test_cached_decoding_equals_teacher_forcing(random_model):
    rng = np.random.default_rng(1)
    inputs = np.array([[5, 9, 13, 7, EOS_ID, 0], [8, 3, EOS_ID, 0, 0, 0]], np.int32)
    targets = rng.integers(2, VOCAB_SIZE, (2, 7)).astype(np.int32)
    expected = random_model({"inputs": inputs, "targets": targets}).numpy()
    memory = random_model.decoder_memory(random_model.encode(inputs), inputs)
    cache = random_model.init_cache(2, 10)
    assert cache["layer_0/key"].shape == (2, 10, 4, 8)
    tokens = np.zeros(2, np.int32)
    for position in range(7):
        logits, cache = random_model.decode_step(tokens, position, cache, memory)
        assert logits.dtype == tf.float32
        np.testing.assert_allclose(logits, expected[:, position], atol=1e-5)
        tokens = targets[:, position]


def test_greedy_is_the_argmax_of_teacher_forcing(random_model):
    inputs = np.random.default_rng(2).integers(2, VOCAB_SIZE, (4, 6)).astype(np.int32)
    output = tf.function(greedy_decode, autograph=False)(random_model, inputs, 12).numpy()
    logits = random_model({"inputs": inputs, "targets": output}).numpy()
    logits[..., PAD_ID] = -np.inf
    for row in range(4):
        eos = np.flatnonzero(output[row] == EOS_ID)
        length = eos[0] + 1 if eos.size else 12
        np.testing.assert_array_equal(output[row, :length], logits[row, :length].argmax(-1))
        assert np.all(output[row, length:] == PAD_ID) and np.all(output[row, :length] != PAD_ID)


def test_copy_model_decodes_the_copy(copy_model):
    inputs = copy_batch(np.random.default_rng(3), 16)
    decode_config = default_config().decode
    decode_config.max_extra_length = 4
    for beam_size in (1, 4):
        decode_config.beam_size = beam_size
        output = translate_batch(copy_model, inputs, decode_config).numpy()
        assert output.shape == (16, inputs.shape[1] + 4)
        # Output is the input, EOS included, then padding.
        np.testing.assert_array_equal(output[:, : inputs.shape[1]], inputs)
        assert np.all(output[:, inputs.shape[1] :] == PAD_ID)


def test_beam_size_one_equals_greedy(random_model, copy_model):
    rng = np.random.default_rng(4)
    # Sources outside the copy alphabet make the copy model stop at varied lengths.
    inputs = rng.integers(2, VOCAB_SIZE, (6, 7)).astype(np.int32)
    stops = 0
    for model in (random_model, copy_model):
        greedy = greedy_decode(model, inputs, 12).numpy()
        beam = beam_search(model, inputs, beam_size=1, length_penalty=0.6, max_decode_length=12)
        np.testing.assert_array_equal(beam.numpy(), greedy)
        stops += np.sum(greedy == EOS_ID)
    assert stops >= 2  # the comparison covered rows that ended with EOS


def test_beam_search_rows_do_not_depend_on_the_batch(copy_model):
    rng = np.random.default_rng(5)
    inputs = rng.integers(2, VOCAB_SIZE, (3, 6)).astype(np.int32)
    inputs[1, 4:] = PAD_ID
    batched = beam_search(copy_model, inputs, beam_size=3, length_penalty=0.6, max_decode_length=9)
    for row in range(3):
        alone = beam_search(
            copy_model, inputs[row : row + 1], beam_size=3, length_penalty=0.6, max_decode_length=9
        )
        np.testing.assert_array_equal(alone.numpy()[0], batched.numpy()[row])


class _TokenCacheModel:
    """A decoding-protocol model whose logits are a function of the source and of the prefix.

    The prefix is read back from the cache (the fed tokens [B, L]), so a beam search that
    reorders its cache wrongly gets wrong logits. Subclasses define `_logits`.
    """

    max_length = MAX_LENGTH

    def __init__(self, table: np.ndarray) -> None:
        self.table = tf.constant(table, tf.float32)
        self.vocab_size = table.shape[-1]

    def encode(self, inputs):
        return inputs

    def decoder_memory(self, encoded, inputs):
        return {"source": inputs[:, 0]}

    def init_cache(self, batch_size, max_decode_length):
        return {"tokens": tf.zeros([batch_size, max_decode_length], tf.int32)}

    def decode_step(self, token_ids, position, cache, memory):
        batch_size = tf.shape(token_ids)[0]
        indices = tf.stack([tf.range(batch_size), tf.fill([batch_size], position)], axis=1)
        tokens = tf.tensor_scatter_nd_update(cache["tokens"], indices, token_ids)
        return self._logits(memory["source"], tokens, position), {"tokens": tokens}


class PrefixHashModel(_TokenCacheModel):
    """Logits table[source, hash(fed tokens)]: a different distribution for every prefix.

    EOS gets EOS_RAMP * (position - EOS_FROM) added, so hypotheses rarely end before
    position EOS_FROM and usually soon after it.
    """

    EOS_FROM, EOS_RAMP = 3, 1.0

    def _eos_bonus(self, position):
        is_eos = tf.cast(tf.equal(tf.range(self.vocab_size), EOS_ID), tf.float32)
        return is_eos * self.EOS_RAMP * tf.cast(position - self.EOS_FROM, tf.float32)

    def _logits(self, source, tokens, position):
        weights = tf.range(1, tf.shape(tokens)[1] + 1) * 7
        visible = tf.range(tf.shape(tokens)[1]) <= position
        state = tf.reduce_sum(tf.where(visible, tokens * weights, 0), axis=1) + 3 * position
        logits = tf.gather_nd(self.table, tf.stack([source, state % self.table.shape[1]], 1))
        return logits + self._eos_bonus(position)

    def logits_of_prefix(self, source: int, prefix: tuple[int, ...]) -> np.ndarray:
        """The same function in NumPy: `prefix` are the tokens generated so far."""
        fed = (PAD_ID, *prefix)
        state = sum(token * (j + 1) * 7 for j, token in enumerate(fed)) + 3 * len(prefix)
        logits = self.table.numpy()[source, state % self.table.shape[1]].astype(np.float64)
        logits[EOS_ID] += self.EOS_RAMP * (len(prefix) - self.EOS_FROM)
        return logits


def reference_beam_search(model, source, beam_size, alpha, length):
    """Plain-Python beam search with `beam_search`'s rules, written for clarity."""

    def log_softmax(logits):
        logits = np.asarray(logits, np.float64)
        logits[PAD_ID] = -np.inf
        return logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()

    alive = [(0.0, ())]
    finished = []
    for position in range(length):
        if len(finished) == beam_size:
            break
        candidates = []
        for log_prob, prefix in alive:
            log_probs = log_softmax(model.logits_of_prefix(source, prefix))
            for token in range(model.vocab_size):
                if token != PAD_ID:
                    candidates.append((log_prob + log_probs[token], (*prefix, token)))
        top = sorted(candidates, key=lambda c: -c[0])[: 2 * beam_size]
        penalty = ((5 + position + 1) / 6) ** alpha
        ended = [
            (log_prob / penalty, seq)
            for rank, (log_prob, seq) in enumerate(top)
            if seq[-1] == EOS_ID and rank < beam_size
        ]
        finished = sorted(finished + ended, key=lambda c: -c[0])[:beam_size]
        alive = [(log_prob, seq) for log_prob, seq in top if seq[-1] != EOS_ID][:beam_size]
    best = finished[0][1] if finished else alive[0][1]
    return list(best) + [PAD_ID] * (length - len(best))


def prefix_hash_model() -> PrefixHashModel:
    return PrefixHashModel(np.random.default_rng(6).normal(size=(8, 97, 9)))


@pytest.mark.parametrize("beam_size, alpha", [(2, 0.0), (3, 0.6), (4, 1.0)])
def test_beam_search_matches_a_reference_implementation(beam_size, alpha):
    model = prefix_hash_model()
    inputs = np.arange(8, dtype=np.int32)[:, None]
    search = tf.function(beam_search, autograph=False)
    output = search(
        model, inputs, beam_size=beam_size, length_penalty=alpha, max_decode_length=8
    ).numpy()
    for row, source in enumerate(inputs[:, 0]):
        expected = reference_beam_search(model, source, beam_size, alpha, 8)
        np.testing.assert_array_equal(output[row], expected)


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_beam_size_one_equals_greedy_in_a_batch_of_varied_lengths(alpha):
    # Rows end between positions 4 and 8; a finished row must not change while others
    # go on, even when a strong length penalty would favour its later hypotheses.
    model = prefix_hash_model()
    inputs = np.arange(8, dtype=np.int32)[:, None]
    greedy = tf.function(greedy_decode, autograph=False)(model, inputs, 10).numpy()
    search = tf.function(beam_search, autograph=False)
    beam = search(model, inputs, beam_size=1, length_penalty=alpha, max_decode_length=10)
    np.testing.assert_array_equal(beam.numpy(), greedy)
    assert len(set(np.sum(greedy != PAD_ID, axis=1))) >= 3


class FirstTokenModel(_TokenCacheModel):
    """Probabilities table[source, first generated token] (row 0 of the table at step 0)."""

    def _logits(self, source, tokens, position):
        state = tf.where(position > 0, tokens[:, 1], 0)
        return tf.gather_nd(self.table, tf.stack([source, state], 1))


A, B = 2, 3


def first_token_table() -> np.ndarray:
    probs = np.full((2, 4, 4), 1e-6)
    # Source 0, a trap: A is likelier first, but after A nothing is likely, while B ends well.
    probs[0, 0, [EOS_ID, A, B]] = [0.1, 0.5, 0.4]
    probs[0, A, [EOS_ID, A, B]] = [0.25, 0.4, 0.35]
    probs[0, B, [EOS_ID, A, B]] = [0.9, 0.06, 0.04]
    # Source 1: greedy's first choice is also the best sequence.
    probs[1, 0, [EOS_ID, A, B]] = [0.1, 0.6, 0.3]
    probs[1, A, [EOS_ID, A, B]] = [0.8, 0.15, 0.05]
    probs[1, B, [EOS_ID, A, B]] = [0.5, 0.3, 0.2]
    return np.log(probs)


def sequence_log_prob(table: np.ndarray, source: int, tokens: np.ndarray) -> float:
    """log P(tokens up to EOS) under `FirstTokenModel`, in float64."""
    total, state = 0.0, 0
    for token in tokens:
        if token == PAD_ID:
            break
        log_probs = table[source, state] - np.log(np.exp(table[source, state]).sum())
        total += log_probs[token]
        state = tokens[0]
        if token == EOS_ID:
            break
    return total


def test_beam_search_escapes_a_greedy_trap():
    table = first_token_table()
    model = FirstTokenModel(table)
    inputs = np.array([[0], [1]], np.int32)
    greedy = tf.function(greedy_decode, autograph=False)(model, inputs, 6).numpy()
    search = tf.function(beam_search, autograph=False)
    beam = search(model, inputs, beam_size=2, length_penalty=0.6, max_decode_length=6).numpy()
    np.testing.assert_array_equal(greedy[0], [A] * 6)  # never ends
    np.testing.assert_array_equal(beam[0], [B, EOS_ID, 0, 0, 0, 0])
    assert sequence_log_prob(table, 0, beam[0]) > sequence_log_prob(table, 0, greedy[0]) + 3.0
    np.testing.assert_array_equal(greedy[1], [A, EOS_ID, 0, 0, 0, 0])
    np.testing.assert_array_equal(beam[1], greedy[1])


def test_decoding_in_tf_function_with_unknown_shapes(copy_model):
    decode_config = default_config().decode
    decode_config.max_extra_length = 3
    inputs = copy_batch(np.random.default_rng(7), 5)
    spec = tf.TensorSpec([None, None], tf.int32)
    for beam_size in (1, 3):
        decode_config.beam_size = beam_size

        @tf.function(input_signature=[spec], autograph=False)
        def translate(batch):
            return translate_batch(copy_model, batch, decode_config)

        output = translate(tf.constant(inputs)).numpy()
        assert output.shape == (5, inputs.shape[1] + 3)
        # The same tokens as eager decoding. (Whether the trained copy model copies
        # every token is a training outcome that a CPU's rounding can flip.)
        eager = translate_batch(copy_model, tf.constant(inputs), decode_config).numpy()
        np.testing.assert_array_equal(output, eager)


def test_decode_length_adds_the_extra_length_up_to_the_model_limit():
    inputs = np.zeros((2, 5), np.int32)
    assert decode_length(inputs, 3, MAX_LENGTH) == 8
    assert decode_length(inputs, 50, MAX_LENGTH) == MAX_LENGTH
    dynamic = tf.function(
        lambda x: decode_length(x, 50, MAX_LENGTH),
        input_signature=[tf.TensorSpec([None, None], tf.int32)],
        autograph=False,
    )
    assert int(dynamic(inputs)) == MAX_LENGTH
    with pytest.raises(ValueError, match="max_extra_length must be >= 0, got -1"):
        decode_length(inputs, -1, MAX_LENGTH)


def test_invalid_decoding_arguments_are_rejected(random_model):
    inputs = np.full((1, 3), 5, np.int32)
    with pytest.raises(ValueError, match="beam_size must be a positive integer, got 0"):
        beam_search(random_model, inputs, beam_size=0, length_penalty=0.6, max_decode_length=5)
    with pytest.raises(ValueError, match=r"max_decode_length must be in \[1, 32\].*got 33"):
        greedy_decode(random_model, inputs, 33)


def test_length_penalty_is_gnmt():
    np.testing.assert_allclose(gnmt_length_penalty(7, 0.6), (12 / 6) ** 0.6, rtol=1e-6)
    assert float(gnmt_length_penalty(7, 0.0)) == 1.0


def test_decoding_under_mixed_precision():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = build_transformer(tiny_config(), VOCAB_SIZE)
        inputs = np.random.default_rng(8).integers(2, VOCAB_SIZE, (2, 5)).astype(np.int32)
        cache = model.init_cache(2, 6)
        assert cache["layer_0/value"].dtype == tf.float16
        memory = model.decoder_memory(model.encode(inputs), inputs)
        logits, _ = model.decode_step(np.zeros(2, np.int32), 0, cache, memory)
        assert logits.dtype == tf.float32
        greedy = greedy_decode(model, inputs, 6)
        beam = beam_search(model, inputs, beam_size=1, length_penalty=0.6, max_decode_length=6)
        assert greedy.dtype == tf.int32 and greedy.shape == (2, 6)
        np.testing.assert_array_equal(beam, greedy)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def test_corpus_bleu():
    sentences = ["The cat sat on the mat.", "It is raining in Paris today."]
    assert corpus_bleu(sentences, sentences) == pytest.approx(100.0)
    disjoint = ["Dogs bark loudly", "Snow falls quietly"]
    assert corpus_bleu(disjoint, sentences) < 1.0
    partial = corpus_bleu(["The cat sat on a mat.", "It is raining in Paris today."], sentences)
    assert 1.0 < partial < 100.0
    with pytest.raises(ValueError, match="2 hypotheses and 1 references"):
        corpus_bleu(sentences, sentences[:1])
    assert "tok:13a" in bleu_signature() and "nrefs:1" in bleu_signature()


def test_corpus_bleu_scores_detokenized_text():
    # sacreBLEU tokenizes itself: punctuation attached or not gives the same score.
    assert math.isclose(corpus_bleu(["Hello, world!"], ["Hello , world !"]), 100.0)
