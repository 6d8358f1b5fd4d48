"""Translation from your own parallel text files (English->French by default).

Each split is one tab-separated file (source<TAB>target per line) or two
line-aligned files joined by a comma:

    python -m trainer --config=configs/text_en_fr.py:tiny --workdir=runs/mine \
        --config.data.train_files=train.tsv \
        --config.data.dev_files=dev.en,dev.fr \
        --config.data.test_files=test.en,test.fr

The variant picks the model size and optimizer exactly as in
configs/wmt14_en_fr.py (`tiny_adam`, `base_shampoo`, ...); only the data differ.
A SentencePiece vocabulary is trained on the training file into the workdir.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def _wmt14_config(variant: str) -> ml_collections.ConfigDict:
    # Config files are loaded by path, so load the sibling file the same way.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wmt14_en_fr.py")
    spec = importlib.util.spec_from_file_location("wmt14_en_fr_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def get_config(variant: str = "tiny_shampoo") -> ml_collections.ConfigDict:
    """Returns the `variant` of configs/wmt14_en_fr.py reading `data.*_files`."""
    config = _wmt14_config(variant)
    config.data.source = "text"
    config.data.train_subsets = ""
    # Smaller corpora than WMT'14: a smaller vocabulary fits them better.
    config.data.vocab_size = min(config.data.vocab_size, 16_000)
    return config
