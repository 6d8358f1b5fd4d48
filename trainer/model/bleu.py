"""Corpus BLEU with sacreBLEU on detokenized text, the number WMT results are reported in.

Hypotheses and references are plain detokenized sentences (SentencePiece output decoded
back to text); sacreBLEU tokenizes both with its default "13a" tokenizer, one reference
per sentence, mixed case, exponential smoothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU


def _metric() -> BLEU:
    return BLEU(tokenize="13a")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU corpus score (0 to 100) of `hypotheses` against one reference each.

    Args:
        hypotheses: Detokenized system outputs, one per sentence.
        references: Detokenized references, line-aligned with `hypotheses`.

    Returns:
        The BLEU score, 0 to 100.

    Raises:
        ValueError: If the two have different lengths or are empty.
    """
    if len(hypotheses) != len(references):
        raise ValueError(
            f"hypotheses and references must be line-aligned, got {len(hypotheses)} "
            f"hypotheses and {len(references)} references"
        )
    if not hypotheses:
        raise ValueError("no sentences to score: hypotheses and references are empty")
    return float(_metric().corpus_score(list(hypotheses), [list(references)]).score)


def bleu_signature() -> str:
    """sacreBLEU's signature of `corpus_bleu`'s settings, e.g. "nrefs:1|case:mixed|...".

    Logged next to scores so that they can be compared with published ones.
    """
    metric = _metric()
    # sacreBLEU knows the number of references only after scoring something.
    metric.corpus_score(["."], [["."]])
    return metric.get_signature().format()
