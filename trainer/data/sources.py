# Over 400 lines: the three sources (TFDS WMT, text files, generated numbers) share readers.
"""Where the sentence pairs come from: WMT'14 through TFDS, the user's text files, or numbers.

`load_pairs(config.data, split)` returns a `tf.data.Dataset` of
`{"source": tf.string, "target": tf.string}` scalars in the direction
config.data.source_language -> config.data.target_language, whatever the source.
Every dataset returned here reads its data with checkpointable `tf.data` ops, so that
a training iterator built on it can be saved and restored.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import ml_collections
import numpy as np
import requests
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.translate import wmt

from trainer.data import numbers

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
SOURCES = ("wmt14", "text", "numbers")
_TFDS_SPLITS = {"train": tfds.Split.TRAIN, "dev": tfds.Split.VALIDATION, "test": tfds.Split.TEST}
_TEXT_FIELDS = {"train": "train_files", "dev": "dev_files", "test": "test_files"}
# Lines parsed per call: string ops on a batch cost little more than on one line.
_PARSE_BATCH = 1024


class DataFileError(ValueError):
    """A text file of `config.data` cannot be read, is empty, or is not parallel text."""


def load_pairs(
    data_config: ml_collections.ConfigDict, split: str, *, seed: int = 0
) -> tf.data.Dataset:
    """The sentence pairs of one split.

    Args:
        data_config: `config.data` (see trainer/config.py).
        split: "train", "dev" (WMT: newstest2013) or "test" (WMT: newstest2014).
        seed: Seed of the WMT training files' shuffling and of the numbers' draw.

    Returns:
        A dataset of `{"source": string, "target": string}` scalars, in file order except
        for WMT's training split, whose files are read in a seeded random order.

    Raises:
        ValueError: For an unknown split or source, or a misconfigured source.
        FileNotFoundError: If a text file does not exist.
        RuntimeError: If WMT'14 cannot be downloaded (the message says how to supply it).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    source = data_config.source
    if source == "wmt14":
        return _wmt_pairs(data_config, split, seed=seed)
    if source == "text":
        return _text_pairs(data_config, split)
    if source == "numbers":
        return _number_pairs(data_config, split, seed=seed)
    raise ValueError(f"config.data.source must be one of {list(SOURCES)}, got {source!r}")


# --- WMT'14 through TensorFlow Datasets --------------------------------------------------


def _wmt_pairs(data_config: ml_collections.ConfigDict, split: str, *, seed: int) -> tf.data.Dataset:
    builder = _wmt_builder(data_config)
    languages = tuple(builder.builder_config.language_pair)
    source, target = data_config.source_language, data_config.target_language
    if sorted((source, target)) != sorted(languages):
        raise ValueError(
            f"config.data.source_language and target_language must be the languages of "
            f"config.data.tfds_name={data_config.tfds_name!r}, {list(languages)}, "
            f"got {source!r} and {target!r}"
        )
    _prepare(builder, data_config)
    examples = builder.as_dataset(
        split=_TFDS_SPLITS[split],
        shuffle_files=split == "train",
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )
    return examples.map(
        lambda example: {"source": example[source], "target": example[target]},
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def _wmt_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The TFDS builder; with train_subsets, a `wmt_translate` one with a custom config."""
    data_dir = data_config.tfds_data_dir or None
    try:
        builder = tfds.builder(data_config.tfds_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"config.data.tfds_name={data_config.tfds_name!r} is not a TFDS dataset; use a "
            'WMT one such as "wmt14_translate/fr-en"'
        ) from error
    if not isinstance(builder, wmt.WmtTranslate):
        raise ValueError(
            f"config.data.tfds_name must name a TFDS WMT translation dataset such as "
            f'"wmt14_translate/fr-en", got {data_config.tfds_name!r}'
        )
    if not data_config.train_subsets:
        return builder
    available = builder.subsets  # The named dataset's corpora for its language pair.
    subsets = sorted({name.strip() for name in data_config.train_subsets.split(",")} - {""})
    unknown = [name for name in subsets if name not in available[tfds.Split.TRAIN]]
    if unknown or not subsets:
        raise ValueError(
            f"config.data.train_subsets must be comma-separated names from "
            f"{available[tfds.Split.TRAIN]} (training corpora of {data_config.tfds_name}), "
            f"got {data_config.train_subsets!r}"
        )
    config = wmt.WmtConfig(
        # The data is prepared under wmt_translate/<pair>.<subsets>/<version>.
        name="+".join(subsets),
        version=builder.version,
        description=f"{data_config.tfds_name} with training corpora {', '.join(subsets)}",
        language_pair=builder.builder_config.language_pair,
        subsets={
            tfds.Split.TRAIN: subsets,
            tfds.Split.VALIDATION: available[tfds.Split.VALIDATION],
            tfds.Split.TEST: available[tfds.Split.TEST],
        },
    )
    return tfds.builder("wmt_translate", config=config, data_dir=data_dir)


# TFDS downloads most WMT'14 archives from here; if it cannot be reached, TFDS retries
# for minutes before failing, so check it first.
_WMT_DOWNLOAD_PROBE = "https://www.statmt.org/"


def _supply_data_message(builder: tfds.core.DatasetBuilder, reason: str) -> str:
    return (
        f"{builder.name}/{builder.builder_config.name} could not be downloaded and prepared "
        f"in {builder.data_dir} ({reason}). Supply it in one of three ways: put the WMT'14 "
        "archives in a folder and set config.data.tfds_manual_dir to it; or prepare the TFDS "
        "dataset on a machine with internet access and point config.data.tfds_data_dir at a "
        'copy of that data directory; or use config.data.source="text" with your own parallel '
        "files (config.data.train_files, dev_files, test_files)."
    )


def _prepare(builder: tfds.core.DatasetBuilder, data_config: ml_collections.ConfigDict) -> None:
    """Downloads and prepares the dataset unless prepared already."""
    prepared = tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))
    if not prepared and not data_config.tfds_manual_dir:
        try:
            requests.head(_WMT_DOWNLOAD_PROBE, timeout=10)
        except requests.RequestException as error:
            raise RuntimeError(
                _supply_data_message(
                    builder, f"{_WMT_DOWNLOAD_PROBE} is unreachable: {type(error).__name__}"
                )
            ) from error
    download_config = tfds.download.DownloadConfig(manual_dir=data_config.tfds_manual_dir or None)
    try:
        builder.download_and_prepare(download_config=download_config)
    except ImportError:
        raise  # A broken installation, not a download problem.
    except Exception as error:
        raise RuntimeError(
            _supply_data_message(builder, f"{type(error).__name__}: {error}")
        ) from error


# --- The user's parallel text files --------------------------------------------------------


def _text_pairs(data_config: ml_collections.ConfigDict, split: str) -> tf.data.Dataset:
    if data_config.split_file:
        field = "split_file"
        paths = [split_file_paths(data_config)[split]]
    else:
        field = _TEXT_FIELDS[split]
        paths = _parallel_paths(data_config[field], field, split)
    if len(paths) == 1:
        _check_tsv(paths[0], field)
        lines = tf.data.TextLineDataset(str(paths[0])).batch(_PARSE_BATCH)
        return lines.map(_split_tsv_lines, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    counts = [_count_lines(path, field) for path in paths]
    if counts[0] != counts[1]:
        raise DataFileError(
            f"config.data.{field}: {paths[0]} has {counts[0]} lines but {paths[1]} has "
            f"{counts[1]}; the two files must be line-aligned (line i translates line i)"
        )
    logger.info("%s: %d pairs in %s and %s", field, counts[0], *paths)
    pairs = tf.data.Dataset.zip(
        tuple(tf.data.TextLineDataset(str(path)).batch(_PARSE_BATCH) for path in paths)
    )
    return pairs.map(
        lambda source, target: {
            "source": tf.strings.strip(source),
            "target": tf.strings.strip(target),
        },
        num_parallel_calls=tf.data.AUTOTUNE,
    ).unbatch()


def _parallel_paths(spec: str, field: str, split: str = "train") -> list[Path]:
    """The one TSV file or two line-aligned files of `config.data.<field>`; they must exist."""
    spec = spec.strip()
    if not spec:
        raise DataFileError(
            f'config.data.{field} is empty; with config.data.source="text" give one '
            f'tab-separated file or two line-aligned files as "{split}.en,{split}.fr"'
        )
    paths = [Path(part.strip()) for part in spec.split(",")]
    if len(paths) not in (1, 2) or not all(str(path) for path in paths):
        raise DataFileError(
            f"config.data.{field} must be one tab-separated file or two comma-separated "
            f"line-aligned files, got {spec!r}"
        )
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"config.data.{field}: file {path} does not exist")
        if not path.is_file():
            raise DataFileError(f"config.data.{field}: {path} is not a file")
    return paths


def split_file_paths(data_config: ml_collections.ConfigDict) -> dict[str, Path]:
    """`config.data.split_file` split into train/dev/test TSV files (made once, then reused).

    See `split_parallel_file`; the files go to a folder under `data.split_cache_dir`
    named after the source files' contents, the sizes and `data.split_seed`.
    """
    paths = _parallel_paths(data_config.split_file, "split_file")
    sizes = (data_config.split_dev_size, data_config.split_test_size, data_config.split_seed)
    digest = hashlib.sha256(repr(([_file_key(p) for p in paths], sizes)).encode()).hexdigest()
    cache = Path(data_config.split_cache_dir or Path.home() / ".cache" / "async_shampoo")
    out_dir = cache / "splits" / f"{paths[0].stem}-{digest[:12]}"
    return split_parallel_file(paths, out_dir, *sizes)


def split_parallel_file(
    paths: list[Path], out_dir: Path, dev_size: int, test_size: int, seed: int
) -> dict[str, Path]:
    """Splits parallel text by distinct source sentence into train/dev/test TSV files.

    The distinct source sentences are shuffled with `seed`: the first `dev_size` go
    to dev, the next `test_size` to test, the rest to train, each with all its
    translations, so that no source sentence is in two splits. Files that exist in
    `out_dir` are reused.

    Args:
        paths: One TSV file (source<TAB>target) or two line-aligned files.
        out_dir: Where train.tsv, dev.tsv and test.tsv go.
        dev_size: Source sentences in dev.
        test_size: Source sentences in test (0: no test file is written).
        seed: Seed of the shuffle.

    Returns:
        {"train": path, "dev": path, "test": path}.

    Raises:
        ValueError: Too few distinct source sentences for the sizes.
    """
    files = {split: out_dir / f"{split}.tsv" for split in SPLITS}
    wanted = [split for split in SPLITS if split != "test" or test_size]
    if all(files[split].is_file() for split in wanted):
        return files
    translations: dict[str, list[str]] = {}
    for source, target in _read_parallel(paths):
        if source and target:
            translations.setdefault(source, []).append(target)
    sentences = sorted(translations)
    if len(sentences) <= dev_size + test_size:
        raise ValueError(
            f"{paths[0]} has {len(sentences)} distinct source sentences: too few for "
            f"{dev_size} dev and {test_size} test sentences and a training split"
        )
    order = np.random.default_rng(seed).permutation(len(sentences))
    bounds = {"dev": (0, dev_size), "test": (dev_size, dev_size + test_size)}
    bounds["train"] = (dev_size + test_size, len(sentences))
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in wanted:
        lo, hi = bounds[split]
        chosen = (sentences[i] for i in sorted(order[lo:hi]))
        lines = [f"{src}\t{tgt}" for src in chosen for tgt in translations[src]]
        tmp = files[split].with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, files[split])
        logger.info("%s: %d source sentences, %d pairs", files[split], hi - lo, len(lines))
    return files


def _read_parallel(paths: list[Path]) -> Iterator[tuple[str, str]]:
    """(source, target) of every line of a TSV file or of two line-aligned files."""
    if len(paths) == 1:
        with open(paths[0], encoding="utf-8") as lines:
            for line in lines:
                columns = line.rstrip("\n").split("\t")
                if len(columns) >= 2:
                    yield columns[0].strip(), columns[1].strip()
        return
    with open(paths[0], encoding="utf-8") as sources, open(paths[1], encoding="utf-8") as targets:
        for source, target in zip(sources, targets):
            yield source.strip(), target.strip()


def _split_tsv_lines(lines: tf.Tensor) -> dict[str, tf.Tensor]:
    """source<TAB>target[<TAB>ignored columns] lines -> pairs (lines are checked beforehand)."""
    columns = tf.strings.split(lines, "\t", maxsplit=2).to_tensor(shape=[None, 3])
    return {
        "source": tf.strings.strip(columns[:, 0]),
        "target": tf.strings.strip(columns[:, 1]),
    }


def _check_tsv(path: Path, field: str) -> None:
    """Raises DataFileError for an unreadable or empty file, or naming a line without a tab."""
    count, first_bad = _read_file(_scan_tsv, path, field)
    if first_bad:
        raise DataFileError(
            f"config.data.{field}: line {first_bad} of {path} has no tab; each line of a "
            "tab-separated file must be source<TAB>target (or give two line-aligned "
            'files as "a.en,a.fr")'
        )
    logger.info("%s: %d pairs in %s", field, count, path)


def _file_key(path: Path) -> tuple[str, int, int]:
    """A file's path, size and modification time: the scans below run once per version."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _scan_tsv(key: tuple[str, int, int]) -> tuple[int, int]:
    """(lines, number of the first line without a tab or 0) of the file `key` names."""
    count = 0
    with open(key[0], "rb") as lines:
        for count, line in enumerate(lines, start=1):
            if b"\t" not in line:
                return count, count
    return count, 0


def _count_lines(path: Path, field: str) -> int:
    """Lines as TextLineDataset counts them: a last line without a newline counts too.

    Raises:
        DataFileError: The file cannot be read or is empty.
    """
    return _read_file(_count_file_lines, path, field)


def _read_file(scan, path: Path, field: str):
    """`scan(_file_key(path))`, refusing a file that cannot be read or is empty."""
    try:
        result = scan(_file_key(path))
    except OSError as e:
        raise DataFileError(
            f"config.data.{field}: {path} cannot be read ({e.strerror}): check its permissions"
        ) from e
    if path.stat().st_size == 0:
        raise DataFileError(f"config.data.{field}: {path} is empty; it needs sentence pairs")
    return result


@functools.lru_cache(maxsize=64)
def _count_file_lines(key: tuple[str, int, int]) -> int:
    count, last = 0, b"\n"
    with open(key[0], "rb") as data:
        while chunk := data.read(1 << 24):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


# --- Generated numbers ------------------------------------------------------------------------


def _number_pairs(
    data_config: ml_collections.ConfigDict, split: str, *, seed: int
) -> tf.data.Dataset:
    languages = (data_config.source_language, data_config.target_language)
    if sorted(languages) != ["en", "fr"]:
        raise ValueError(
            'config.data.source="numbers" is English/French: source_language and '
            f'target_language must be "en" and "fr" (either way), got {languages}'
        )
    pairs = numbers.number_pairs(
        split,
        train_size=data_config.numbers_train_size,
        eval_size=data_config.numbers_eval_size,
        max_number=data_config.numbers_max,
        seed=seed,
    )
    english = [en for en, _ in pairs]
    french = [fr for _, fr in pairs]
    source, target = (english, french) if languages[0] == "en" else (french, english)
    return tf.data.Dataset.from_tensor_slices(
        {"source": tf.constant(source, tf.string), "target": tf.constant(target, tf.string)}
    )
