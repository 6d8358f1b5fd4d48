"""Autoregressive decoding with the key/value cache: greedy search and beam search.

Both run inside `tf.function` (a `tf.while_loop` over positions, static beam size) and
return int32 [B, max_decode_length] ids: the tokens up to and including EOS (1), then 0.
Padding (0) is never chosen as a token, so 0 in an output always means "after EOS" (or
nothing, for a row that never produced EOS).

The model is anything with the decoding protocol of `Transformer`:
`encode(inputs)`, `decoder_memory(encoded, inputs)`, `init_cache(batch_size, length)`,
`decode_step(token_ids, position, cache, memory) -> (float32 logits [B, vocab], cache)`,
`vocab_size` and `max_length`. Beam search reorders every tensor of the cache along its
first axis ([B * beam_size, ...]) and repeats every tensor of the memory beam_size times.
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections
import tensorflow as tf

from trainer.model.transformer import EOS_ID, PAD_ID

# Log-probability of the impossible: the padding token, and beams that do not exist yet
# (at step 0, K - 1 copies of the empty hypothesis).
_DEAD = float("-inf")


def decode_length(
    inputs: tf.Tensor, max_extra_length: int, model_max_length: int
) -> int | tf.Tensor:
    """Output length for a batch: its source length plus `max_extra_length`, at most the model's.

    Args:
        inputs: Source ids [B, S]; S, the padded width, is the batch's source length.
        max_extra_length: `config.decode.max_extra_length`.
        model_max_length: The model's `max_length` (positions it can embed).

    Returns:
        A Python int when S is known statically, else a scalar int32 tensor.
    """
    if max_extra_length < 0:
        raise ValueError(f"max_extra_length must be >= 0, got {max_extra_length}")
    source_length = inputs.shape[1]
    if source_length is not None:
        return min(source_length + max_extra_length, model_max_length)
    return tf.minimum(tf.shape(inputs)[1] + max_extra_length, model_max_length)


def _write_column(sequences: tf.Tensor, position: tf.Tensor, tokens: tf.Tensor) -> tf.Tensor:
    """`sequences` [..., L] with column `position` set to `tokens` [...]."""
    at_position = tf.equal(tf.range(tf.shape(sequences)[-1]), position)
    return tf.where(at_position, tokens[..., None], sequences)


def _batch_size(inputs: tf.Tensor) -> int | tf.Tensor:
    """The static batch size when known (keeps loop shapes static), else a tensor."""
    return inputs.shape[0] if inputs.shape[0] is not None else tf.shape(inputs)[0]


def _forbid_padding(logits: tf.Tensor) -> tf.Tensor:
    """`logits` [..., vocab] with the padding id made impossible."""
    return tf.where(tf.equal(tf.range(tf.shape(logits)[-1]), PAD_ID), _DEAD, logits)


def _check_length(max_decode_length: Any, model: Any) -> None:
    if isinstance(max_decode_length, int) and not 1 <= max_decode_length <= model.max_length:
        raise ValueError(
            f"max_decode_length must be in [1, {model.max_length}] (the model's max_length), "
            f"got {max_decode_length}"
        )


def greedy_decode(model: Any, inputs: tf.Tensor, max_decode_length: int | tf.Tensor) -> tf.Tensor:
    """The argmax token at every step, until every row has produced EOS.

    Args:
        model: A model with the decoding protocol (see the module docstring).
        inputs: int32 source ids [B, S], padded with 0.
        max_decode_length: Output length L (Python int or scalar tensor).

    Returns:
        int32 [B, L]: each row's tokens up to its first EOS, then 0.
    """
    _check_length(max_decode_length, model)
    inputs = tf.convert_to_tensor(inputs, tf.int32)
    batch_size = _batch_size(inputs)
    memory = model.decoder_memory(model.encode(inputs), inputs)
    cache = model.init_cache(batch_size, max_decode_length)
    output = tf.zeros([batch_size, max_decode_length], tf.int32)
    tokens = tf.fill([batch_size], PAD_ID)
    finished = tf.zeros([batch_size], tf.bool)

    def not_done(position, tokens, cache, output, finished):
        return tf.logical_and(position < max_decode_length, ~tf.reduce_all(finished))

    def step(position, tokens, cache, output, finished):
        logits, cache = model.decode_step(tokens, position, cache, memory)
        tokens = tf.argmax(_forbid_padding(logits), axis=-1, output_type=tf.int32)
        tokens = tf.where(finished, PAD_ID, tokens)
        output = _write_column(output, position, tokens)
        finished = finished | tf.equal(tokens, EOS_ID)
        return position + 1, tokens, cache, output, finished

    _, _, _, output, _ = tf.while_loop(
        not_done, step, (tf.constant(0), tokens, cache, output, finished)
    )
    return output


def gnmt_length_penalty(length: tf.Tensor, alpha: float) -> tf.Tensor:
    """GNMT length penalty ((5 + length) / 6)^alpha (Wu et al. 2016, equation 14)."""
    return tf.pow((5.0 + tf.cast(length, tf.float32)) / 6.0, alpha)


def _gather_beams(x: tf.Tensor, beam_indices: tf.Tensor) -> tf.Tensor:
    """x[b, beam_indices[b, k], ...] for x [B, K_old, ...] and beam_indices [B, K_new]."""
    return tf.gather(x, beam_indices, batch_dims=1)


def _gather_flat_beams(x: tf.Tensor, beam_indices: tf.Tensor, beam_size: int) -> tf.Tensor:
    """`_gather_beams` for x [B * K, ...] laid out row by row (beam k of row b at b * K + k)."""
    shape = tf.shape(x)
    unflat = tf.reshape(x, tf.concat([[-1, beam_size], shape[1:]], axis=0))
    return tf.ensure_shape(tf.reshape(_gather_beams(unflat, beam_indices), shape), x.shape)


def beam_search(
    model: Any,
    inputs: tf.Tensor,
    *,
    beam_size: int,
    length_penalty: float,
    max_decode_length: int | tf.Tensor,
) -> tf.Tensor:
    """The best hypothesis of a beam search per row.

    Bookkeeping as in Tensor2Tensor and Flax: per row, K alive hypotheses (log-probability,
    tokens, cache) and K finished ones (length-penalised score, tokens). Each step takes the
    2K best one-token extensions of the alive hypotheses (at most K of them end in EOS, so K
    that do not remain); the K best that do not end in EOS become the new alive set.
    Unlike there, an extension ending in EOS joins the finished set only if it ranks within
    the K best extensions (as in fairseq), i.e. if it would have been kept in the beam, and
    a row stops (its finished set no longer changes) once it holds K finished hypotheses.
    So beam_size=1 is exactly greedy decoding. A row that finishes nothing within
    `max_decode_length` returns its best alive hypothesis.

    Args:
        model: A model with the decoding protocol (see the module docstring).
        inputs: int32 source ids [B, S], padded with 0.
        beam_size: K, a Python int >= 1.
        length_penalty: alpha of the GNMT penalty; finished scores are
            log P / ((5 + length) / 6)^alpha, length counting the EOS.
        max_decode_length: Output length L (Python int or scalar tensor).

    Returns:
        int32 [B, L]: each row's best hypothesis, its tokens up to EOS, then 0.

    Raises:
        ValueError: If `beam_size` is not a positive int or `length_penalty` is negative.
    """
    _check_beam_arguments(model, beam_size, length_penalty, max_decode_length)
    inputs = tf.convert_to_tensor(inputs, tf.int32)
    batch_size = _batch_size(inputs)
    k = beam_size

    memory = model.decoder_memory(model.encode(inputs), inputs)
    memory = tf.nest.map_structure(lambda t: tf.repeat(t, k, axis=0), memory)

    initial_state = _initial_beam_state(model, batch_size, k, max_decode_length)

    def not_done(state):
        searching = ~tf.reduce_all(state["finished_flags"])
        return tf.logical_and(state["position"] < max_decode_length, searching)

    step = functools.partial(
        _beam_step,
        model=model,
        memory=memory,
        shape=(batch_size, k, model.vocab_size),
        length_penalty=length_penalty,
    )

    # The loop variables are a one-element list, as while_loop passes them positionally.
    (final,) = tf.while_loop(not_done, lambda state: [step(state)], [initial_state])
    # Slot 0 holds a row's best finished hypothesis, if it has one.
    has_finished = final["finished_flags"][:, 0]
    return tf.where(has_finished[:, None], final["finished_seqs"][:, 0], final["alive_seqs"][:, 0])


def _check_beam_arguments(
    model: Any, beam_size: int, length_penalty: float, max_decode_length: int | tf.Tensor
) -> None:
    """Raises ValueError naming the first argument of `beam_search` that is out of range."""
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive integer, got {beam_size!r}")
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
    _check_length(max_decode_length, model)


def _initial_beam_state(
    model: Any, batch_size: tf.Tensor, k: int, max_decode_length: int | tf.Tensor
) -> dict[str, Any]:
    """The beam search's loop state before the first token: one live hypothesis per row."""
    return {
        "position": tf.constant(0),
        "alive_seqs": tf.zeros([batch_size, k, max_decode_length], tf.int32),
        "alive_log_probs": tf.tile(tf.constant([[0.0] + [_DEAD] * (k - 1)]), [batch_size, 1]),
        "alive_tokens": tf.fill([batch_size, k], PAD_ID),
        "cache": model.init_cache(batch_size * k, max_decode_length),
        "finished_seqs": tf.zeros([batch_size, k, max_decode_length], tf.int32),
        "finished_scores": tf.fill([batch_size, k], _DEAD),
        "finished_flags": tf.zeros([batch_size, k], tf.bool),
    }


def translate_batch(
    model: Any, inputs: tf.Tensor, decode_config: ml_collections.ConfigDict
) -> tf.Tensor:
    """Decodes `inputs` with `config.decode`: greedy when beam_size is 1, else beam search.

    Args:
        model: A model with the decoding protocol and `max_length`.
        inputs: int32 source ids [B, S], padded with 0.
        decode_config: `config.decode` (beam_size, length_penalty, max_extra_length).

    Returns:
        int32 [B, L] with L = `decode_length(inputs, max_extra_length, model.max_length)`.
    """
    inputs = tf.convert_to_tensor(inputs, tf.int32)
    length = decode_length(inputs, decode_config.max_extra_length, model.max_length)
    if decode_config.beam_size == 1:
        return greedy_decode(model, inputs, length)
    return beam_search(
        model,
        inputs,
        beam_size=decode_config.beam_size,
        length_penalty=decode_config.length_penalty,
        max_decode_length=length,
    )


def _beam_step(
    state: dict[str, Any],
    *,
    model: Any,
    memory: Any,
    shape: tuple[Any, int, int],
    length_penalty: float,
) -> dict[str, Any]:
    """One position of `beam_search`: extend, collect finished hypotheses, keep K alive.

    Args:
        state: The loop state (see `beam_search`'s initial state).
        model: The model.
        memory: Its decoder memory, repeated K times per row.
        shape: (batch size, K, vocabulary size).
        length_penalty: GNMT alpha.
    """
    batch_size, k, vocab_size = shape
    position = state["position"]
    logits, cache = model.decode_step(
        tf.reshape(state["alive_tokens"], [-1]), position, state["cache"], memory
    )
    log_probs = tf.nn.log_softmax(_forbid_padding(logits))
    log_probs = tf.reshape(log_probs, [batch_size, k, vocab_size])
    candidates = state["alive_log_probs"][:, :, None] + log_probs
    top_log_probs, top_indices = tf.math.top_k(tf.reshape(candidates, [batch_size, -1]), 2 * k)
    top_beams = top_indices // vocab_size
    top_tokens = top_indices % vocab_size
    top_seqs = _gather_beams(state["alive_seqs"], top_beams)
    top_seqs = _write_column(top_seqs, position, top_tokens)
    ends = tf.equal(top_tokens, EOS_ID)

    # Finished: EOS extensions ranked within the K best, in rows still searching.
    row_searching = ~tf.reduce_all(state["finished_flags"], axis=1, keepdims=True)
    within_beam = tf.range(2 * k)[None, :] < k
    finishes = ends & within_beam & row_searching & (top_log_probs > _DEAD)
    scores = top_log_probs / gnmt_length_penalty(position + 1, length_penalty)
    scores = tf.where(finishes, scores, _DEAD)
    # Scores of unfinished slots are -inf, so top_k keeps finished ones first.
    merged_scores = tf.concat([state["finished_scores"], scores], axis=1)
    finished_scores, keep = tf.math.top_k(merged_scores, k)
    merged_flags = tf.concat([state["finished_flags"], finishes], axis=1)
    merged_seqs = tf.concat([state["finished_seqs"], top_seqs], axis=1)

    # Alive: the K best extensions that do not end in EOS.
    alive_log_probs, alive = tf.math.top_k(tf.where(ends, _DEAD, top_log_probs), k)
    source_beams = _gather_beams(top_beams, alive)
    return {
        "position": position + 1,
        "alive_seqs": _gather_beams(top_seqs, alive),
        "alive_log_probs": alive_log_probs,
        "alive_tokens": _gather_beams(top_tokens, alive),
        "cache": tf.nest.map_structure(lambda t: _gather_flat_beams(t, source_beams, k), cache),
        "finished_seqs": _gather_beams(merged_seqs, keep),
        "finished_scores": finished_scores,
        "finished_flags": _gather_beams(merged_flags, keep),
    }
