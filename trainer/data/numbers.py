"""A generated English->French task that needs no download: integers spelt out in words.

`english_words(342_105)` is "three hundred forty-two thousand one hundred five" (American
style, no "and"); `french_words(342_105)` is "trois cent quarante-deux mille cent cinq".

French follows the traditional spelling (the rules before the 1990 reform, still the most
common in print): hyphens only inside numbers below one hundred ("quatre-vingt-dix-sept")
and never around "cent", "mille", "million" or "milliard"; "et" joins the unit one to
twenty, thirty, forty, fifty and sixty ("vingt et un", "soixante et onze") but not to
eighty ("quatre-vingt-un"); "vingt" and "cent" take a plural "s" when multiplied and not
followed by another number ("quatre-vingts", "deux cents", "deux cents millions") but not
before "mille" ("quatre-vingt mille", "deux cent mille"); "mille" is invariable and takes
no "un"; "million" and "milliard" are nouns and take an "s" ("deux millions").

`number_pairs` draws disjoint train, dev and test sets of such pairs.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "dev", "test")
# Largest number spelt out (the scales stop at billion / milliard).
MAX_SUPPORTED = 10**12 - 1

_ENGLISH_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_ENGLISH_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ENGLISH_SCALES = ((10**9, "billion"), (10**6, "million"), (10**3, "thousand"))

_FRENCH_UNITS = (
    "zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze "
    "quinze seize dix-sept dix-huit dix-neuf"
).split()
_FRENCH_TENS = "_ _ vingt trente quarante cinquante soixante".split()


def english_words(number: int) -> str:
    """Spells a non-negative integer in English words, e.g. 21 -> "twenty-one".

    Args:
        number: The integer, from 0 to `MAX_SUPPORTED`.

    Returns:
        The words, lower case, without "and" ("one hundred five").

    Raises:
        ValueError: If `number` is out of range.
    """
    _check_range(number)
    if number == 0:
        return "zero"
    words = []
    for scale, name in _ENGLISH_SCALES:
        count, number = divmod(number, scale)
        if count:
            words += [_english_below_1000(count), name]
    if number:
        words.append(_english_below_1000(number))
    return " ".join(words)


def _english_below_1000(number: int) -> str:
    hundreds, rest = divmod(number, 100)
    words = [_ENGLISH_UNITS[hundreds], "hundred"] if hundreds else []
    if rest >= 20:
        tens, units = divmod(rest, 10)
        words.append(_ENGLISH_TENS[tens] + (f"-{_ENGLISH_UNITS[units]}" if units else ""))
    elif rest:
        words.append(_ENGLISH_UNITS[rest])
    return " ".join(words)


def french_words(number: int) -> str:
    """Spells a non-negative integer in French words (traditional spelling, see module doc).

    Args:
        number: The integer, from 0 to `MAX_SUPPORTED`.

    Returns:
        The words, lower case, e.g. 80 -> "quatre-vingts", 201 -> "deux cent un".

    Raises:
        ValueError: If `number` is out of range.
    """
    _check_range(number)
    if number == 0:
        return _FRENCH_UNITS[0]
    words = []
    for scale, name in ((10**9, "milliard"), (10**6, "million")):
        count, number = divmod(number, scale)
        if count:
            # Nouns: "deux cents millions" keeps the plural of "cents", and takes its own.
            words += [_french_below_1000(count, final=True), name + ("s" if count > 1 else "")]
    thousands, number = divmod(number, 1000)
    if thousands == 1:
        words.append("mille")
    elif thousands:
        # "mille" is an adjective: "quatre-vingt mille", "deux cent mille", no plural "s".
        words += [_french_below_1000(thousands, final=False), "mille"]
    if number:
        words.append(_french_below_1000(number, final=True))
    return " ".join(words)


def _french_below_1000(number: int, *, final: bool) -> str:
    """1..999; `final` means no number follows, so "vingt" and "cent" may take an "s"."""
    hundreds, rest = divmod(number, 100)
    words = []
    if hundreds:
        plural = hundreds > 1 and rest == 0 and final
        words.append(
            ("" if hundreds == 1 else _FRENCH_UNITS[hundreds] + " ")
            + ("cents" if plural else "cent")
        )
    if rest:
        words.append(_french_below_100(rest, final=final))
    return " ".join(words)


def _french_below_100(number: int, *, final: bool) -> str:
    if number < 20:
        return _FRENCH_UNITS[number]
    tens, units = divmod(number, 10)
    if tens >= 8:  # 80-99: quatre-vingt(s), quatre-vingt-un, quatre-vingt-dix-neuf.
        rest = number - 80
        if rest == 0:
            return "quatre-vingts" if final else "quatre-vingt"
        return "quatre-vingt-" + _FRENCH_UNITS[rest]
    if tens == 7:  # 70-79: soixante-dix, soixante et onze, soixante-douze.
        rest = number - 60
        return "soixante et onze" if rest == 11 else "soixante-" + _FRENCH_UNITS[rest]
    if units == 0:
        return _FRENCH_TENS[tens]
    if units == 1:
        return f"{_FRENCH_TENS[tens]} et un"
    return f"{_FRENCH_TENS[tens]}-{_FRENCH_UNITS[units]}"


def _check_range(number: int) -> None:
    if not 0 <= number <= MAX_SUPPORTED:
        raise ValueError(f"number must be in [0, {MAX_SUPPORTED}], got {number}")


def sample_numbers(count: int, *, max_number: int, seed: int) -> np.ndarray:
    """Draws `count` distinct integers in [0, max_number], spread over their digit counts.

    A uniform draw from [0, 999999] is 90% six-digit numbers; here the number of digits is
    drawn uniformly first, so that short numbers ("vingt et un") are learnt too. Draws that
    repeat a number are rejected. Where `count` is more than half of the numbers, a plain
    permutation is used instead (rejection would be slow there).

    Args:
        count: How many numbers.
        max_number: The largest number that may be drawn.
        seed: Seed of the draw; the same arguments give the same numbers in the same order.

    Returns:
        An int64 array of `count` distinct numbers, in draw order.

    Raises:
        ValueError: If `max_number` is out of range or `count` exceeds the numbers available.
    """
    _check_range(max_number)
    if count > max_number + 1:
        raise ValueError(
            f"cannot draw {count} distinct numbers from [0, {max_number}]; raise "
            "config.data.numbers_max or lower numbers_train_size / numbers_eval_size"
        )
    rng = np.random.default_rng(seed)
    if 2 * count > max_number + 1:
        return rng.permutation(max_number + 1)[:count]
    digits = len(str(max_number))
    low = np.array([0] + [10 ** (d - 1) for d in range(2, digits + 1)])
    high = np.minimum(np.array([10**d for d in range(1, digits + 1)]), max_number + 1)
    chosen: dict[int, None] = {}  # Insertion-ordered set.
    while len(chosen) < count:
        bucket = rng.integers(0, digits, size=2 * (count - len(chosen)) + 16)
        for number in rng.integers(low[bucket], high[bucket]).tolist():
            chosen.setdefault(number)
            if len(chosen) == count:
                break
    return np.fromiter(chosen, dtype=np.int64, count=count)


def number_pairs(
    split: str, *, train_size: int, eval_size: int, max_number: int, seed: int
) -> list[tuple[str, str]]:
    """English/French pairs of spelt-out numbers for one split.

    The three splits are cut from one draw of `train_size + 2 * eval_size` distinct
    numbers, so no number is in two splits; the same arguments give the same pairs.

    Args:
        split: "train", "dev" or "test".
        train_size: Pairs in the training split (config.data.numbers_train_size).
        eval_size: Pairs in each of dev and test (config.data.numbers_eval_size).
        max_number: The largest number (config.data.numbers_max).
        seed: Seed of the draw.

    Returns:
        A list of (English, French) strings.

    Raises:
        ValueError: For an unknown split, a negative size or too few numbers to draw from.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    for name, size in (("numbers_train_size", train_size), ("numbers_eval_size", eval_size)):
        if size < 0:
            raise ValueError(f"config.data.{name} must be >= 0, got {size}")
    numbers = sample_numbers(train_size + 2 * eval_size, max_number=max_number, seed=seed)
    start = {"dev": 0, "test": eval_size, "train": 2 * eval_size}[split]
    stop = start + (train_size if split == "train" else eval_size)
    return [(english_words(n), french_words(n)) for n in numbers[start:stop].tolist()]
