"""The encoder-decoder Transformer (Vaswani et al. 2017, "Attention Is All You Need").

Token ids: 0 is padding (and the decoder's start token), 1 is end of sentence. The model
takes a batch {"inputs": [B, S], "targets": [B, T]} and returns logits [B, T, vocab]; the
decoder input is the target shifted right by one with 0 in front, done inside the model.

Layout, chosen for Shampoo (see `trainer/optimizers/shampoo.py`): every attention projection
is its own 2-D [d_model, d_model] Dense kernel (no 3-D EinsumDense kernels), and every layer
has an explicit name, so that variable paths are deterministic, for example
"transformer/encoder/layer_0/self_attention/query/kernel"; Shampoo's keys drop the leading
model name. One embedding matrix [vocab, d_model] serves the source, the target and the
output projection.

Layer normalisation comes first in each sub-layer ("pre-LN": x + Dropout(F(LayerNorm(x))))
with a final LayerNorm after each stack, as in Tensor2Tensor's and Flax's WMT models, rather
than the paper's post-LN LayerNorm(x + F(x)): pre-LN keeps the residual path an identity, so
gradients at initialisation are well scaled and training is stable without a carefully tuned
warmup (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture").

Under a mixed-precision policy the layers compute in the policy's dtype (float16/bfloat16)
with float32 variables; attention softmax, layer normalisation and the returned logits are
float32.

Fast autoregressive decoding (`trainer/model/decode.py`) uses `encode`, `decoder_memory`,
`init_cache` and `decode_step`: the keys and values of decoder self-attention are kept in a
cache of fixed shape [B, max_decode_length, heads, head_dim] per layer and written one
position per step, so the step runs inside `tf.while_loop`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import keras
import ml_collections
import numpy as np
import tensorflow as tf

# The vocabulary's ids, defined with the tokenizer that produces them.
from trainer.data.tokenizer import EOS_ID, PAD_ID

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


def _layer_norm(name: str) -> keras.layers.LayerNormalization:
    return keras.layers.LayerNormalization(epsilon=_LAYER_NORM_EPSILON, name=name)


class EncoderLayer(keras.layers.Layer):
    """Pre-LN self-attention and feed-forward sub-layers, each with a residual connection."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        dropout: float,
        attention_dropout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.d_model = d_model
        self.self_attention_norm = _layer_norm("self_attention_norm")
        self.self_attention = MultiHeadAttention(
            d_model, num_heads, attention_dropout, name="self_attention"
        )
        self.self_attention_dropout = Dropout(dropout, name="self_attention_dropout")
        self.feed_forward_norm = _layer_norm("feed_forward_norm")
        self.feed_forward = FeedForward(d_model, d_ff, dropout, name="feed_forward")
        self.feed_forward_dropout = Dropout(dropout, name="feed_forward_dropout")

    def _residual_dropouts(self) -> tuple[Dropout, ...]:
        return (self.self_attention_dropout, self.feed_forward_dropout)

    def _sublayers(self) -> tuple[keras.layers.Layer, ...]:
        return (
            self.self_attention_norm,
            self.self_attention,
            self.feed_forward_norm,
            self.feed_forward,
        )

    def build(self, input_shape: Any) -> None:
        for layer in self._sublayers():
            layer.build((None, None, self.d_model))
        for dropout in self._residual_dropouts():
            dropout.build()
        self.built = True

    def call(self, x: tf.Tensor, mask: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Maps [B, S, d_model] to [B, S, d_model]; `mask` hides source padding."""
        normed = self.self_attention_norm(x)
        attended = self.self_attention(normed, normed, mask, training=training)
        x = x + self.self_attention_dropout(attended, training=training)
        transformed = self.feed_forward(self.feed_forward_norm(x), training=training)
        return x + self.feed_forward_dropout(transformed, training=training)


class DecoderLayer(EncoderLayer):
    """Pre-LN causal self-attention, encoder-decoder attention and feed-forward sub-layers."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        dropout: float,
        attention_dropout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(d_model, num_heads, d_ff, dropout, attention_dropout, **kwargs)
        self.cross_attention_norm = _layer_norm("cross_attention_norm")
        self.cross_attention = MultiHeadAttention(
            d_model, num_heads, attention_dropout, name="cross_attention"
        )
        self.cross_attention_dropout = Dropout(dropout, name="cross_attention_dropout")

    def _residual_dropouts(self) -> tuple[Dropout, ...]:
        return (*super()._residual_dropouts(), self.cross_attention_dropout)

    def _sublayers(self) -> tuple[keras.layers.Layer, ...]:
        return (*super()._sublayers(), self.cross_attention_norm, self.cross_attention)

    def _cross_attention_and_feed_forward(
        self,
        x: tf.Tensor,
        cross_keys: tf.Tensor,
        cross_values: tf.Tensor,
        cross_mask: tf.Tensor,
        training: bool,
    ) -> tf.Tensor:
        attended = self.cross_attention.attend(
            self.cross_attention_norm(x), cross_keys, cross_values, cross_mask, training=training
        )
        x = x + self.cross_attention_dropout(attended, training=training)
        transformed = self.feed_forward(self.feed_forward_norm(x), training=training)
        return x + self.feed_forward_dropout(transformed, training=training)

    def call(
        self,
        x: tf.Tensor,
        encoded: tf.Tensor,
        self_mask: tf.Tensor,
        cross_mask: tf.Tensor,
        training: bool = False,
    ) -> tf.Tensor:
        """Maps [B, T, d_model] to [B, T, d_model] attending over `encoded` [B, S, d_model].

        Args:
            x: Decoder states.
            encoded: Encoder output.
            self_mask: Self-attention mask (causal and padding).
            cross_mask: Encoder-decoder attention mask (source padding).
            training: Whether to apply dropout.
        """
        normed = self.self_attention_norm(x)
        attended = self.self_attention(normed, normed, self_mask, training=training)
        x = x + self.self_attention_dropout(attended, training=training)
        cross_keys, cross_values = self.cross_attention.project_key_value(encoded)
        return self._cross_attention_and_feed_forward(
            x, cross_keys, cross_values, cross_mask, training
        )

    def step(
        self,
        x: tf.Tensor,
        position: tf.Tensor,
        cache_keys: tf.Tensor,
        cache_values: tf.Tensor,
        cross_keys: tf.Tensor,
        cross_values: tf.Tensor,
        cross_mask: tf.Tensor,
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """One decoding position: `x` [B, 1, d_model] at `position`, in inference mode.

        Writes this position's self-attention key and value into the caches
        [B, max_decode_length, heads, head_dim] and attends over positions <= `position`.

        Returns:
            The layer's output [B, 1, d_model] and the updated key and value caches.
        """
        normed = self.self_attention_norm(x)
        keys, values = self.self_attention.project_key_value(normed)
        batch_size = tf.shape(x)[0]
        indices = tf.stack([tf.range(batch_size), tf.fill([batch_size], position)], axis=1)
        cache_keys = tf.tensor_scatter_nd_update(cache_keys, indices, keys[:, 0])
        cache_values = tf.tensor_scatter_nd_update(cache_values, indices, values[:, 0])
        self_mask = (tf.range(tf.shape(cache_keys)[1]) <= position)[None, None, None, :]
        attended = self.self_attention.attend(normed, cache_keys, cache_values, self_mask)
        x = x + attended
        x = self._cross_attention_and_feed_forward(
            x, cross_keys, cross_values, cross_mask, training=False
        )
        return x, cache_keys, cache_values


class _Stack(keras.layers.Layer):
    """Embedding dropout, a stack of `layer_class` layers and a final LayerNorm (pre-LN)."""

    layer_class: type[keras.layers.Layer]

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        num_heads: int,
        d_ff: int,
        dropout: float,
        attention_dropout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.d_model = d_model
        self.embedding_dropout = Dropout(dropout, name="embedding_dropout")
        # One attribute per layer: tf.train.Checkpoint does not follow the lists
        # Keras tracks, so layers held in a list would be left out of checkpoints.
        self.num_layers = num_layers
        for i in range(num_layers):
            layer = self.layer_class(
                d_model, num_heads, d_ff, dropout, attention_dropout, name=f"layer_{i}"
            )
            setattr(self, f"layer_{i}", layer)
        self.final_norm = _layer_norm("final_norm")

    @property
    def blocks(self) -> list[keras.layers.Layer]:
        """The stacked layers, bottom first."""
        return [getattr(self, f"layer_{i}") for i in range(self.num_layers)]

    def build(self, input_shape: Any) -> None:
        self.embedding_dropout.build()
        for layer in self.blocks:
            layer.build((None, None, self.d_model))
        self.final_norm.build((None, None, self.d_model))
        self.built = True


class Encoder(_Stack):
    """The encoder: a stack of `EncoderLayer`s."""

    layer_class = EncoderLayer

    def call(self, embedded: tf.Tensor, mask: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Maps embedded sources [B, S, d_model] to encoder outputs [B, S, d_model]."""
        x = self.embedding_dropout(embedded, training=training)
        for layer in self.blocks:
            x = layer(x, mask, training=training)
        return self.final_norm(x)


class Decoder(_Stack):
    """The decoder: a stack of `DecoderLayer`s."""

    layer_class = DecoderLayer

    def call(
        self,
        embedded: tf.Tensor,
        encoded: tf.Tensor,
        self_mask: tf.Tensor,
        cross_mask: tf.Tensor,
        training: bool = False,
    ) -> tf.Tensor:
        """Maps embedded decoder inputs [B, T, d_model] to final states [B, T, d_model]."""
        x = self.embedding_dropout(embedded, training=training)
        for layer in self.blocks:
            x = layer(x, encoded, self_mask, cross_mask, training=training)
        return self.final_norm(x)

    def step(
        self,
        embedded: tf.Tensor,
        position: tf.Tensor,
        cache: dict[str, tf.Tensor],
        memory: dict[str, tf.Tensor],
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """`call` for one position [B, 1, d_model] in inference mode, with the cache.

        See `Transformer.decode_step` for `cache` and `memory`.
        """
        x = embedded
        new_cache = {}
        for i, layer in enumerate(self.blocks):
            x, new_cache[f"layer_{i}/key"], new_cache[f"layer_{i}/value"] = layer.step(
                x,
                position,
                cache[f"layer_{i}/key"],
                cache[f"layer_{i}/value"],
                memory[f"layer_{i}/key"],
                memory[f"layer_{i}/value"],
                memory["mask"],
            )
        return self.final_norm(x), new_cache


class Transformer(keras.Model):
    """Encoder-decoder Transformer with shared embeddings, pre-LN and sinusoidal positions.

    `call` computes teacher-forced logits; `encode`, `decoder_memory`, `init_cache` and
    `decode_step` are the pieces of autoregressive decoding.
    """

    def __init__(
        self,
        vocab_size: int,
        num_layers: int,
        d_model: int,
        num_heads: int,
        d_ff: int,
        dropout: float,
        attention_dropout: float,
        max_length: int,
        name: str = "transformer",
        **kwargs: Any,
    ) -> None:
        """Creates the layers; variables are made on the first call (see `build_transformer`).

        Args:
            vocab_size: Size of the joint source/target vocabulary (ids 0 and 1 are pad, EOS).
            num_layers: Layers in the encoder and, as many, in the decoder.
            d_model: Width of embeddings and hidden states; divisible by `num_heads`, even.
            num_heads: Attention heads.
            d_ff: Hidden width of the feed-forward networks.
            dropout: Dropout rate of embeddings, residual branches and feed-forward hidden units.
            attention_dropout: Dropout rate of attention probabilities.
            max_length: Longest source or target sequence the model can embed.
            name: The model's name, the first component of variable paths.
            **kwargs: Passed to `keras.Model` (e.g. `dtype`).

        Raises:
            ValueError: If a size is not positive, `d_model` is odd or not divisible by
                `num_heads`, or a dropout rate is outside [0, 1).
        """
        super().__init__(name=name, **kwargs)
        for field, value in (
            ("vocab_size", vocab_size),
            ("num_layers", num_layers),
            ("d_model", d_model),
            ("num_heads", num_heads),
            ("d_ff", d_ff),
            ("max_length", max_length),
        ):
            if not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if vocab_size <= EOS_ID:
            raise ValueError(f"vocab_size must hold pad and EOS ids 0 and 1, got {vocab_size}")
        if d_model % num_heads:
            raise ValueError(
                f"d_model must be divisible by num_heads, got {d_model} and {num_heads}"
            )
        if d_model % 2:
            raise ValueError(f"d_model must be even (sinusoidal positions), got {d_model}")
        for field, value in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{field} must be in [0, 1), got {value!r}")
        self.vocab_size = vocab_size
        self.num_layers = num_layers
        self.d_model = d_model
        self.num_heads = num_heads
        self.d_ff = d_ff
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.max_length = max_length
        self._positions = sinusoidal_positions(max_length, d_model)

        self.embedding = SharedEmbedding(vocab_size, d_model, name="embedding")
        stack_args = (num_layers, d_model, num_heads, d_ff, dropout, attention_dropout)
        self.encoder = Encoder(*stack_args, name="encoder")
        self.decoder = Decoder(*stack_args, name="decoder")

    def get_config(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "num_layers": self.num_layers,
            "d_model": self.d_model,
            "num_heads": self.num_heads,
            "d_ff": self.d_ff,
            "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
            "max_length": self.max_length,
            "name": self.name,
        }

    def build(self, input_shape: Any = None) -> None:
        self.embedding.build()
        self.encoder.build((None, None, self.d_model))
        self.decoder.build((None, None, self.d_model))
        self.built = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def _embed(self, token_ids: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
        """Scaled token embeddings plus the sinusoidal encodings of `positions` [L]."""
        encodings = tf.gather(tf.constant(self._positions), positions)
        return self.embedding(token_ids) + tf.cast(encodings, self.compute_dtype)

    def _check_length(self, token_ids: tf.Tensor, what: str) -> list[Any]:
        """Raises (or, for an unknown static length, asserts) that `token_ids` fit max_length."""
        length = token_ids.shape[1]
        if length is not None:
            if length > self.max_length:
                raise ValueError(
                    f"{what} have length {length}, more than the model's max_length "
                    f"{self.max_length}"
                )
            return []
        return [
            tf.debugging.assert_less_equal(
                tf.shape(token_ids)[1],
                self.max_length,
                message=f"{what} are longer than the model's max_length {self.max_length}",
            )
        ]

    def encode(self, inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Encoder output [B, S, d_model] (compute dtype) of int `inputs` [B, S]."""
        inputs = tf.convert_to_tensor(inputs, tf.int32)
        with tf.control_dependencies(self._check_length(inputs, "inputs")):
            embedded = self._embed(inputs, tf.range(tf.shape(inputs)[1]))
        return self.encoder(embedded, padding_mask(inputs), training=training)

    def decode(
        self, encoded: tf.Tensor, inputs: tf.Tensor, targets: tf.Tensor, training: bool = False
    ) -> tf.Tensor:
        """Teacher-forced logits [B, T, vocab] (float32) of `targets` [B, T].

        Args:
            encoded: `encode(inputs)`.
            inputs: The source ids [B, S] (for the source padding mask).
            targets: Target ids [B, T]; the decoder sees them shifted right.
            training: Whether to apply dropout.
        """
        targets = tf.convert_to_tensor(targets, tf.int32)
        decoder_inputs = shift_right(targets)
        length = tf.shape(targets)[1]
        with tf.control_dependencies(self._check_length(targets, "targets")):
            embedded = self._embed(decoder_inputs, tf.range(length))
        # Position j of the decoder input holds targets[j - 1]; the start token is never padding.
        is_token = tf.pad(
            tf.not_equal(targets[:, :-1], PAD_ID), [[0, 0], [1, 0]], constant_values=True
        )
        self_mask = causal_mask(length) & is_token[:, None, None, :]
        cross_mask = padding_mask(tf.convert_to_tensor(inputs, tf.int32))
        decoded = self.decoder(embedded, encoded, self_mask, cross_mask, training=training)
        return self.embedding.attend(decoded)

    def call(self, batch: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Teacher-forced logits [B, T, vocab] (float32).

        Args:
            batch: {"inputs": int32 [B, S], "targets": int32 [B, T]}, padded with 0.
            training: Whether to apply dropout.
        """
        encoded = self.encode(batch["inputs"], training=training)
        return self.decode(encoded, batch["inputs"], batch["targets"], training=training)

    def decoder_memory(self, encoded: tf.Tensor, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        """What every decoding step reads from the source, computed once.

        Args:
            encoded: `encode(inputs)` [B, S, d_model].
            inputs: Source ids [B, S].

        Returns:
            {"mask": bool [B, 1, 1, S], False at source padding,
             "layer_{i}/key", "layer_{i}/value": [B, S, heads, head_dim] encoder-decoder
             attention keys and values of decoder layer i}.
        """
        memory = {"mask": padding_mask(tf.convert_to_tensor(inputs, tf.int32))}
        for i, layer in enumerate(self.decoder.blocks):
            keys, values = layer.cross_attention.project_key_value(encoded)
            memory[f"layer_{i}/key"] = keys
            memory[f"layer_{i}/value"] = values
        return memory

    def init_cache(
        self, batch_size: tf.Tensor | int, max_decode_length: tf.Tensor | int
    ) -> dict[str, tf.Tensor]:
        """Zero self-attention caches for `decode_step`.

        Returns:
            {"layer_{i}/key", "layer_{i}/value": zeros [batch_size, max_decode_length, heads,
            head_dim] in the compute dtype} for every decoder layer i.
        """
        shape = [batch_size, max_decode_length, self.num_heads, self.head_dim]
        cache = {}
        for i in range(self.num_layers):
            cache[f"layer_{i}/key"] = tf.zeros(shape, self.compute_dtype)
            cache[f"layer_{i}/value"] = tf.zeros(shape, self.compute_dtype)
        return cache

    def decode_step(
        self,
        token_ids: tf.Tensor,
        position: tf.Tensor | int,
        cache: dict[str, tf.Tensor],
        memory: dict[str, tf.Tensor],
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """Logits of the next token, in inference mode, with the cache of earlier positions.

        Args:
            token_ids: int32 [B], the decoder input at `position`: 0 (start) at position 0,
                else the token chosen at `position - 1`.
            position: Scalar int, the same for every row; below the cache's length and
                the model's max_length.
            cache: As `init_cache` made it, holding positions < `position`.
            memory: `decoder_memory(...)` for the same rows.

        Returns:
            float32 logits [B, vocab] of the token at `position`, and the cache with
            `position` written.
        """
        position = tf.convert_to_tensor(position, tf.int32)
        token_ids = tf.convert_to_tensor(token_ids, tf.int32)
        embedded = self._embed(token_ids[:, None], position[None])
        decoded, cache = self.decoder.step(embedded, position, cache, memory)
        return self.embedding.attend(decoded)[:, 0], cache


def build_transformer(model_config: ml_collections.ConfigDict, vocab_size: int) -> Transformer:
    """A `Transformer` from `config.model` with its variables created.

    Args:
        model_config: `config.model` (num_layers, d_model, num_heads, d_ff, dropout,
            attention_dropout, max_length).
        vocab_size: Size of the SentencePiece vocabulary.

    Returns:
        The model, called once on a dummy batch so that `trainable_variables` exists.
    """
    model = Transformer(
        vocab_size=vocab_size,
        num_layers=model_config.num_layers,
        d_model=model_config.d_model,
        num_heads=model_config.num_heads,
        d_ff=model_config.d_ff,
        dropout=model_config.dropout,
        attention_dropout=model_config.attention_dropout,
        max_length=model_config.max_length,
    )
    dummy = tf.zeros([1, 1], tf.int32)
    model({"inputs": dummy, "targets": dummy})
    return model


def sequence_loss(
    logits: tf.Tensor, targets: tf.Tensor, label_smoothing: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """Label-smoothed cross entropy summed over non-pad target tokens.

    The smoothed target puts 1 - label_smoothing on the true token and spreads
    label_smoothing evenly over the other vocab - 1 tokens (Szegedy et al. 2016,
    section 7). The entropy of that distribution is subtracted, as in Tensor2Tensor and
    Flax, so that predicting it exactly costs 0 (the KL divergence to it).

    Args:
        logits: [B, T, vocab], any float dtype; computed in float32.
        targets: int [B, T], 0 at padding.
        label_smoothing: In [0, 1).

    Returns:
        (loss_sum, weight_sum): float32 scalars, the summed loss of non-pad tokens and
        their number.

    Raises:
        ValueError: If `label_smoothing` is outside [0, 1).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    logits = tf.cast(logits, tf.float32)
    vocab_size = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low_confidence = label_smoothing / (vocab_size - 1)
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    true_log_probs = tf.gather(log_probs, targets, batch_dims=2)
    # -sum_v q(v) log p(v) with q = low everywhere plus (confidence - low) on the target.
    cross_entropy = -(confidence - low_confidence) * true_log_probs - low_confidence * (
        tf.reduce_sum(log_probs, axis=-1)
    )
    entropy = -confidence * math.log(confidence)
    if low_confidence > 0:
        entropy -= (vocab_size - 1) * low_confidence * math.log(low_confidence)
    weights = tf.cast(tf.not_equal(targets, PAD_ID), tf.float32)
    loss_sum = tf.reduce_sum((cross_entropy - entropy) * weights)
    return loss_sum, tf.reduce_sum(weights)


def token_accuracy(logits: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(correct, weight_sum): float32 counts of non-pad tokens and of those argmax gets right."""
    predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
    targets = tf.cast(targets, tf.int32)
    weights = tf.cast(tf.not_equal(targets, PAD_ID), tf.float32)
    correct = tf.cast(tf.equal(predictions, targets), tf.float32) * weights
    return tf.reduce_sum(correct), tf.reduce_sum(weights)
