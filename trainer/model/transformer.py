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
import tensorflow as tf

# The vocabulary's ids, defined with the tokenizer that produces them.
from trainer.data.tokenizer import EOS_ID, PAD_ID  # noqa: F401 (re-exported)
from trainer.model.layers import (
    SharedEmbedding,
    causal_mask,
    padding_mask,
    shift_right,
    sinusoidal_positions,
)
from trainer.model.stacks import Decoder, Encoder


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
        _check_sizes(
            vocab_size=vocab_size,
            num_layers=num_layers,
            d_model=d_model,
            num_heads=num_heads,
            d_ff=d_ff,
            max_length=max_length,
            dropout=dropout,
            attention_dropout=attention_dropout,
        )
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


def _check_sizes(
    *,
    vocab_size: int,
    num_layers: int,
    d_model: int,
    num_heads: int,
    d_ff: int,
    max_length: int,
    dropout: float,
    attention_dropout: float,
) -> None:
    """Raises ValueError naming the first `Transformer` argument out of range."""
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
        raise ValueError(f"d_model must be divisible by num_heads, got {d_model} and {num_heads}")
    if d_model % 2:
        raise ValueError(f"d_model must be even (sinusoidal positions), got {d_model}")
    for field, value in (("dropout", dropout), ("attention_dropout", attention_dropout)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{field} must be in [0, 1), got {value!r}")
