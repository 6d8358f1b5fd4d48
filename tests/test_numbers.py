"""Tests of trainer.data.numbers: numbers spelt out in English and French, and their splits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainer.data import numbers

# --- Numbers ------------------------------------------------------------------------------

FRENCH = {
    0: "zéro",
    1: "un",
    16: "seize",
    17: "dix-sept",
    21: "vingt et un",
    22: "vingt-deux",
    31: "trente et un",
    61: "soixante et un",
    70: "soixante-dix",
    71: "soixante et onze",
    72: "soixante-douze",
    77: "soixante-dix-sept",
    80: "quatre-vingts",
    81: "quatre-vingt-un",
    90: "quatre-vingt-dix",
    91: "quatre-vingt-onze",
    99: "quatre-vingt-dix-neuf",
    100: "cent",
    101: "cent un",
    180: "cent quatre-vingts",
    200: "deux cents",
    201: "deux cent un",
    280: "deux cent quatre-vingts",
    999: "neuf cent quatre-vingt-dix-neuf",
    1000: "mille",
    1001: "mille un",
    2000: "deux mille",
    21_000: "vingt et un mille",
    80_000: "quatre-vingt mille",
    81_000: "quatre-vingt-un mille",
    200_000: "deux cent mille",
    342_105: "trois cent quarante-deux mille cent cinq",
    1_000_000: "un million",
    2_000_000: "deux millions",
    1_200_000: "un million deux cent mille",
    80_000_000: "quatre-vingts millions",
    200_000_000: "deux cents millions",
    1_000_000_001: "un milliard un",
    3_000_000_000: "trois milliards",
}

ENGLISH = {
    0: "zero",
    13: "thirteen",
    21: "twenty-one",
    80: "eighty",
    101: "one hundred one",
    1000: "one thousand",
    342_105: "three hundred forty-two thousand one hundred five",
    2_000_000: "two million",
    1_000_000_001: "one billion one",
}


@pytest.mark.parametrize(("number", "words"), FRENCH.items())
def test_french_words(number, words):
    assert numbers.french_words(number) == words


@pytest.mark.parametrize(("number", "words"), ENGLISH.items())
def test_english_words(number, words):
    assert numbers.english_words(number) == words


@pytest.mark.parametrize("number", [-1, numbers.MAX_SUPPORTED + 1])
def test_words_reject_out_of_range(number):
    with pytest.raises(ValueError, match=str(number)):
        numbers.french_words(number)


# Three-digit groups (units, thousands, millions, billions), the tricky ones drawn often.
GROUP = st.one_of(
    st.sampled_from([0, 1, 21, 71, 80, 81, 100, 101, 180, 200, 201, 280]), st.integers(0, 999)
)


@given(st.lists(GROUP, min_size=4, max_size=4))
def test_french_agreement_rules(groups):
    words = numbers.french_words(sum(g * 1000**i for i, g in enumerate(groups))).split(" ")
    for word, following in zip(words, words[1:] + [None]):
        if word in ("cents", "quatre-vingts"):  # Plural only where no number follows.
            assert following in (None, "millions", "milliards"), words
        if word in ("deux", "trois", "dix", "cent", "mille") and following in (
            "million",
            "milliard",
        ):
            raise AssertionError(f"singular after a plural count: {words}")
        assert word != "quatre-vingt" or following == "mille", words
    assert "milles" not in words, words
    for i in range(len(words) - 1):
        if words[i : i + 2] == ["un", "mille"]:  # 1000 is "mille"; 61000 "soixante et un mille".
            assert i > 0 and words[i - 1] in ("et", "cent"), words


def test_french_spellings_are_distinct():
    spelt = {numbers.french_words(n) for n in range(100_000)}
    assert len(spelt) == 100_000


def test_number_pairs_splits_are_disjoint_sized_and_deterministic():
    sizes = dict(train_size=3000, eval_size=200, max_number=99_999)
    splits = {
        split: numbers.number_pairs(split, seed=3, **sizes) for split in ("train", "dev", "test")
    }
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [3000, 200, 200]
    french = {split: {fr for _, fr in pairs} for split, pairs in splits.items()}
    assert sum(map(len, french.values())) == 3400  # No number twice, within or across splits.
    assert numbers.number_pairs("dev", seed=3, **sizes) == splits["dev"]
    assert numbers.number_pairs("dev", seed=4, **sizes) != splits["dev"]
    # English and French spell the same number.
    en, fr = splits["train"][0]
    number = next(n for n in range(100_000) if numbers.english_words(n) == en)
    assert numbers.french_words(number) == fr


def test_sample_numbers_covers_short_numbers():
    drawn = numbers.sample_numbers(2000, max_number=999_999, seed=0)
    digit_counts = {len(str(n)) for n in drawn.tolist()}
    assert digit_counts == {1, 2, 3, 4, 5, 6}
    assert len(set(drawn.tolist())) == 2000 and drawn.max() <= 999_999


def test_sample_numbers_all_of_a_small_range():
    assert sorted(numbers.sample_numbers(50, max_number=49, seed=1).tolist()) == list(range(50))


def test_number_pairs_rejects_too_many():
    with pytest.raises(ValueError, match="numbers_max"):
        numbers.number_pairs("train", train_size=90, eval_size=10, max_number=99, seed=0)
