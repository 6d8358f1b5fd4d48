"""WMT'14 English->French Transformers (Vaswani et al. 2017 sizes) with Shampoo, Adam or AdaGrad.

Variants are `<size>_<optimizer>`: size in tiny, base, big; optimizer in shampoo,
soap, adam, adagrad. `soap` is Adam run in the eigenbasis of Shampoo's factors
(`optimizer.shampoo.preconditioner="eigenbasis"`, Vyas et al. 2024), its bases
computed by the service with the adaptive cadence. For example

    python -m trainer --config=configs/wmt14_en_fr.py:big_shampoo --workdir=runs/big_shampoo

`tiny` fits a CPU (a smoke test of the data path, not a result); `base` and
`big` are the paper sizes and want an accelerator. Training data comes from
TensorFlow Datasets (`wmt14_translate/fr-en`, about 36M pairs; the first run
downloads and prepares it); `--config.data.train_subsets=newscommentary_v9`
trains on one small corpus instead.
"""

from __future__ import annotations

import ml_collections

from trainer.config import default_config, use_eigenbasis

# Layers, d_model, heads, d_ff, dropout: Transformer base and big (Vaswani et al.,
# Table 3; big used dropout 0.1 on En->Fr), and a CPU-sized tiny model.
SIZES = {
    "tiny": dict(num_layers=2, d_model=128, num_heads=4, d_ff=512, dropout=0.1),
    "base": dict(num_layers=6, d_model=512, num_heads=8, d_ff=2048, dropout=0.1),
    "big": dict(num_layers=6, d_model=1024, num_heads=16, d_ff=4096, dropout=0.1),
}

# Peak learning rates after warmup. Adam's is the Transformer schedule's peak,
# d_model^-0.5 * warmup^-0.5 (7.0e-4 for base at 4000 warmup steps); Shampoo
# grafts Adam's per-layer step size, so it starts from the same value; AdaGrad
# needs a larger one. Sweep them for a new setup (scripts/bench_convergence.py
# does so at small scale).
LEARNING_RATES = {
    "tiny": {"shampoo": 1e-3, "soap": 1e-3, "adam": 1e-3, "adagrad": 0.05},
    "base": {"shampoo": 7e-4, "soap": 7e-4, "adam": 7e-4, "adagrad": 0.05},
    "big": {"shampoo": 5e-4, "soap": 5e-4, "adam": 5e-4, "adagrad": 0.05},
}


def get_config(variant: str = "base_shampoo") -> ml_collections.ConfigDict:
    """Returns the config of `variant` ("<tiny|base|big>_<shampoo|soap|adam|adagrad>")."""
    size, _, optimizer = variant.partition("_")
    optimizer = optimizer or "shampoo"
    if size not in SIZES or optimizer not in LEARNING_RATES["base"]:
        raise ValueError(
            f"unknown variant {variant!r} of configs/wmt14_en_fr.py; use <size>_<optimizer> "
            f"with size in {sorted(SIZES)} and optimizer in {sorted(LEARNING_RATES['base'])}"
        )
    config = default_config()
    config.data.source = "wmt14"
    config.model.update(SIZES[size])
    config.optimizer.name = optimizer
    config.optimizer.learning_rate = LEARNING_RATES[size][optimizer]
    config.precond.mode = "async" if optimizer == "shampoo" else "off"
    if optimizer == "soap":
        use_eigenbasis(config)

    if size == "tiny":
        config.data.train_subsets = "newscommentary_v9"
        config.data.vocab_size = 8000
        config.data.vocab_train_sentences = 200_000
        config.data.max_length = 64
        config.data.tokens_per_batch = 2048
        config.data.eval_bleu_examples = 200
        config.optimizer.warmup_steps = 1000
        config.train.num_steps = 20_000
        config.train.eval_every_steps = 2000
        config.train.checkpoint_every_steps = 1000
        config.precond.update_steps = 50
    elif size == "big":
        # About 25k source and 25k target tokens per step as in Vaswani et al.
        # need several accelerators or gradient accumulation; one large GPU
        # holds about this many.
        config.data.tokens_per_batch = 8192
        config.train.mixed_precision = "mixed_bfloat16"
        config.train.num_steps = 300_000
    else:
        config.data.tokens_per_batch = 8192
        config.train.num_steps = 100_000
    return config
