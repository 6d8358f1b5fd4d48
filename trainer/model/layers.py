"""The Transformer's building blocks: masks, positions, embedding, attention, feed-forward.

Each attention projection is its own 2-D [d_model, d_model] Dense kernel and every layer
has an explicit name, so that Shampoo's block keys are deterministic (see transformer.py).
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainer.data.tokenizer import PAD_ID

# Attention logit (float32) of hidden positions: its exp() is exactly 0 after softmax's
# max subtraction, yet a row with nothing visible stays finite (uniform).
_HIDDEN_LOGIT = -1e9
# LayerNorm epsilon of the reference implementations (Tensor2Tensor, Flax).
_LAYER_NORM_EPSILON = 1e-6


def sinusoidal_positions(length: int, d_model: int) -> np.ndarray:
    """Sinusoidal position encodings, Vaswani et al. 2017, section 3.5.

    PE(pos, 2i) = sin(pos / 10000^(2i / d_model)), PE(pos, 2i + 1) = cos(same angle).

    Args:
        length: Number of positions.
        d_model: Encoding width; must be even.

    Returns:
        float32 array [length, d_model].
    """
    if d_model % 2:
        raise ValueError(f"d_model must be even for sinusoidal positions, got {d_model}")
    positions = np.arange(length, dtype=np.float64)[:, None]
    rates = 1.0 / np.power(10000.0, np.arange(0, d_model, 2, dtype=np.float64) / d_model)
    angles = positions * rates[None, :]
    encoding = np.zeros((length, d_model), dtype=np.float64)
    encoding[:, 0::2] = np.sin(angles)
    encoding[:, 1::2] = np.cos(angles)
    return encoding.astype(np.float32)


# Attention masks are booleans, True where a key is visible, broadcastable to
# [B, heads, queries, keys]: a float bias passed through a Keras layer call would be cast
# to float16 under mixed precision.


def padding_mask(token_ids: tf.Tensor) -> tf.Tensor:
    """Attention mask [B, 1, 1, S]: True at tokens, False at padding."""
    return tf.not_equal(token_ids, PAD_ID)[:, None, None, :]


def causal_mask(length: tf.Tensor | int) -> tf.Tensor:
    """Attention mask [1, 1, T, T]: query position i sees key positions j <= i."""
    allowed = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)
    return allowed[None, None, :, :]


def shift_right(targets: tf.Tensor) -> tf.Tensor:
    """The decoder input: `targets` shifted right by one, with the start token 0 in front."""
    return tf.pad(targets[:, :-1], [[0, 0], [1, 0]], constant_values=PAD_ID)


class Dropout(keras.layers.Layer):
    """Inverted dropout whose seed state has a deterministic variable path.

    Unlike `keras.layers.Dropout`, whose seed generator is named by a process-wide counter
    ("seed_generator_7"), the state lives at ".../<layer name>/seed/seed_generator_state".
    The seed comes from Keras's global seed (`keras.utils.set_random_seed`).
    """

    def __init__(self, rate: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rate = rate

    def build(self, input_shape: Any = None) -> None:
        if self.rate > 0:
            self.seed_generator = keras.random.SeedGenerator(name="seed")
        self.built = True

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        if not training or self.rate == 0:
            return x
        return keras.random.dropout(x, self.rate, seed=self.seed_generator)


class SharedEmbedding(keras.layers.Layer):
    """One [vocab, d_model] matrix E for input embeddings and the output projection.

    Embeddings are E[ids] * sqrt(d_model) (Vaswani et al. 2017, section 3.4); logits are
    h @ E^T. E starts as N(0, d_model^-1/2), so scaled embeddings and logits both start with
    unit variance (the Tensor2Tensor initialisation).
    """

    def __init__(self, vocab_size: int, d_model: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.d_model = d_model

    def build(self, input_shape: Any = None) -> None:
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.vocab_size, self.d_model),
            initializer=keras.initializers.RandomNormal(stddev=self.d_model**-0.5),
        )
        self.built = True

    def call(self, token_ids: tf.Tensor) -> tf.Tensor:
        """Scaled embeddings [..., d_model] of int `token_ids`, in the compute dtype."""
        embedded = tf.gather(self.embeddings, token_ids)
        return tf.cast(embedded, self.compute_dtype) * math.sqrt(self.d_model)

    def attend(self, hidden: tf.Tensor) -> tf.Tensor:
        """Output logits hidden @ E^T [..., vocab], float32, computed in the compute dtype."""
        kernel = tf.cast(self.embeddings, self.compute_dtype)
        hidden = tf.cast(hidden, self.compute_dtype)
        # One 2-D product: a broadcast batched matmul against the shared [vocab, d]
        # kernel was several times slower on CPU (and its gradient too).
        flat = tf.matmul(tf.reshape(hidden, [-1, self.d_model]), kernel, transpose_b=True)
        logits = tf.reshape(flat, tf.concat([tf.shape(hidden)[:-1], [self.vocab_size]], 0))
        return tf.cast(logits, tf.float32)


class MultiHeadAttention(keras.layers.Layer):
    """Multi-head scaled dot-product attention, Vaswani et al. 2017, section 3.2.

    Four 2-D [d_model, d_model] kernels without bias, named query, key, value and output.
    Heads are a reshape of the projections' outputs: [B, L, d_model] -> [B, L, heads, head_dim].
    """

    def __init__(
        self, d_model: int, num_heads: int, attention_dropout: float, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if d_model % num_heads:
            raise ValueError(
                f"d_model must be divisible by num_heads, got {d_model} and {num_heads}"
            )
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.query = keras.layers.Dense(d_model, use_bias=False, name="query")
        self.key = keras.layers.Dense(d_model, use_bias=False, name="key")
        self.value = keras.layers.Dense(d_model, use_bias=False, name="value")
        self.output_projection = keras.layers.Dense(d_model, use_bias=False, name="output")
        self.probs_dropout = Dropout(attention_dropout, name="probs_dropout")

    def build(self, input_shape: Any) -> None:
        d_model = self.num_heads * self.head_dim
        for dense in (self.query, self.key, self.value, self.output_projection):
            dense.build((None, None, d_model))
        self.probs_dropout.build()
        self.built = True

    def _split_heads(self, x: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(x)
        return tf.reshape(x, [shape[0], shape[1], self.num_heads, self.head_dim])

    def project_key_value(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Keys and values [B, L, heads, head_dim] of `x` [B, L, d_model]."""
        return self._split_heads(self.key(x)), self._split_heads(self.value(x))

    def attend(
        self,
        query_input: tf.Tensor,
        keys: tf.Tensor,
        values: tf.Tensor,
        mask: tf.Tensor,
        training: bool = False,
    ) -> tf.Tensor:
        """Attention of `query_input` [B, Q, d_model] over projected keys/values [B, K, h, d].

        Args:
            query_input: Queries before projection.
            keys: Projected keys, as `project_key_value` returns them.
            values: Projected values.
            mask: bool, broadcastable to [B, heads, Q, K], True where a key is visible.
            training: Whether to apply dropout to the attention probabilities.

        Returns:
            [B, Q, d_model] in the compute dtype.
        """
        queries = self._split_heads(self.query(query_input))
        # Scaled before the product (rather than after) to keep float16 logits in range.
        queries = queries * tf.cast(self.head_dim**-0.5, queries.dtype)
        logits = tf.einsum("bqhd,bkhd->bhqk", queries, tf.cast(keys, queries.dtype))
        logits = tf.where(mask, tf.cast(logits, tf.float32), _HIDDEN_LOGIT)
        probs = tf.nn.softmax(logits, axis=-1)
        probs = self.probs_dropout(probs, training=training)
        context = tf.einsum("bhqk,bkhd->bqhd", tf.cast(probs, values.dtype), values)
        shape = tf.shape(context)
        context = tf.reshape(context, [shape[0], shape[1], self.num_heads * self.head_dim])
        return self.output_projection(context)

    def call(
        self,
        query_input: tf.Tensor,
        memory: tf.Tensor,
        mask: tf.Tensor,
        training: bool = False,
    ) -> tf.Tensor:
        """Attention of `query_input` [B, Q, d_model] over `memory` [B, K, d_model]."""
        keys, values = self.project_key_value(memory)
        return self.attend(query_input, keys, values, mask, training=training)


class FeedForward(keras.layers.Layer):
    """Position-wise ReLU feed-forward network, Vaswani et al. 2017, equation 2."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.d_model = d_model
        self.intermediate = keras.layers.Dense(d_ff, activation="relu", name="intermediate")
        self.hidden_dropout = Dropout(dropout, name="hidden_dropout")
        self.output_projection = keras.layers.Dense(d_model, name="output")

    def build(self, input_shape: Any) -> None:
        self.intermediate.build((None, None, self.d_model))
        self.hidden_dropout.build()
        self.output_projection.build((None, None, self.intermediate.units))
        self.built = True

    def call(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        hidden = self.hidden_dropout(self.intermediate(x), training=training)
        return self.output_projection(hidden)


def layer_norm(name: str) -> keras.layers.LayerNormalization:
    return keras.layers.LayerNormalization(epsilon=_LAYER_NORM_EPSILON, name=name)
