"""Encoder and decoder layers (pre-LN) and the stacks made of them; see transformer.py."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from trainer.model.layers import (
    Dropout,
    FeedForward,
    MultiHeadAttention,
    layer_norm,
)


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
        self.self_attention_norm = layer_norm("self_attention_norm")
        self.self_attention = MultiHeadAttention(
            d_model, num_heads, attention_dropout, name="self_attention"
        )
        self.self_attention_dropout = Dropout(dropout, name="self_attention_dropout")
        self.feed_forward_norm = layer_norm("feed_forward_norm")
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
        self.cross_attention_norm = layer_norm("cross_attention_norm")
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
        self.final_norm = layer_norm("final_norm")

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
