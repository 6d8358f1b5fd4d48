# Over 400 lines for a reason: the data pipeline's tests share their fixtures (sources, tokenizer).
"""Tests of trainer.data: pair sources, the tokenizer, the tf.data pipelines.

(Over 400 lines: the three share the real-text fixtures below; the generated numbers
are tested in test_numbers.py.)

The real-text tests read the shared English-French data (`../shared/data` from the
repository root) into temporary files and skip when that folder is absent. WMT'14 is
tested offline with `tfds.testing.mock_data`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import requests
import sentencepiece as spm
import tensorflow as tf
import tensorflow_datasets as tfds

from trainer.config import default_config, validate
from trainer.data import numbers, pipeline, sources, tokenizer
from trainer.data.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TATOEBA = SHARED_DATA / "tatoeba_en_fr" / "fra.txt"
NEWSTEST = SHARED_DATA / "wmt14_en_fr"


def data_config(**overrides: object) -> ml_collections.ConfigDict:
    """`config.data` of the default config with `overrides` applied."""
    config = default_config().data
    for name, value in overrides.items():
        config[name] = value
    return config


def as_pairs(dataset: tf.data.Dataset) -> list[tuple[str, str]]:
    """All the (source, target) pairs of a `load_pairs` dataset, as Python strings."""
    return [
        (pair["source"].decode(), pair["target"].decode()) for pair in dataset.as_numpy_iterator()
    ]


def needs(path: Path) -> Path:
    """Skips the test when `path`, part of the shared data, is missing."""
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (expected at ../shared/data from the repo)")
    return path


@pytest.fixture(scope="module")
def tatoeba_pairs() -> list[tuple[str, str]]:
    """Every 50th Tatoeba pair (3343 of them): the file is sorted by length, so all lengths."""
    lines = needs(TATOEBA).read_text(encoding="utf-8").splitlines()[::50]
    return [tuple(line.split("\t")[:2]) for line in lines]


@pytest.fixture(scope="module")
def tatoeba_tsv(tatoeba_pairs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tatoeba") / "pairs.tsv"
    path.write_text("".join(f"{en}\t{fr}\n" for en, fr in tatoeba_pairs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_model(tatoeba_pairs, tmp_path_factory) -> Tokenizer:
    """A 400-piece model trained on the Tatoeba sample."""
    path = tmp_path_factory.mktemp("vocab") / "spm.model"
    return Tokenizer.train([s for pair in tatoeba_pairs for s in pair], path, 400)


def pairs_dataset(pairs: list[tuple[str, str]]) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        {"source": [en for en, _ in pairs], "target": [fr for _, fr in pairs]}
    )


# --- Sources: numbers and errors ------------------------------------------------------------


def test_load_pairs_numbers_direction():
    config = data_config(source="numbers", numbers_train_size=30, numbers_eval_size=5)
    en_fr = as_pairs(sources.load_pairs(config, "test", seed=1))
    config.source_language, config.target_language = "fr", "en"
    fr_en = as_pairs(sources.load_pairs(config, "test", seed=1))
    assert len(en_fr) == 5
    assert fr_en == [(fr, en) for en, fr in en_fr]
    assert en_fr == numbers.number_pairs(
        "test", train_size=30, eval_size=5, max_number=config.numbers_max, seed=1
    )


def test_load_pairs_rejects_bad_split_and_source():
    with pytest.raises(ValueError, match="'validation'"):
        sources.load_pairs(data_config(source="numbers"), "validation")
    with pytest.raises(ValueError, match="config.data.source must be one of.*'wmt15'"):
        sources.load_pairs(data_config(source="wmt15"), "train")


# --- Sources: WMT'14 through TFDS (mocked) --------------------------------------------------


@pytest.fixture
def download_host_reachable(monkeypatch):
    """Lets the reachability probe pass: under mock_data nothing is downloaded."""
    monkeypatch.setattr(sources.requests, "head", lambda *args, **kwargs: None)


@pytest.mark.usefixtures("download_host_reachable")
def test_load_pairs_wmt14_mock(tmp_path):
    config = data_config(tfds_data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=7):
        expected = tfds.builder("wmt14_translate/fr-en", data_dir=str(tmp_path)).as_dataset(
            split="validation"
        )
        expected = [(ex["en"], ex["fr"]) for ex in expected.as_numpy_iterator()]
        for split in ("train", "dev", "test"):
            pairs = sources.load_pairs(config, split)
            assert pairs.element_spec == {
                "source": tf.TensorSpec([], tf.string),
                "target": tf.TensorSpec([], tf.string),
            }
            assert len(as_pairs(pairs)) == 7
        dev = sources.load_pairs(config, "dev")
        config.source_language, config.target_language = "fr", "en"
        reverse = sources.load_pairs(config, "dev")
        assert [(s.encode(), t.encode()) for s, t in as_pairs(dev)] == expected
        assert as_pairs(reverse) == [(t, s) for s, t in as_pairs(dev)]


@pytest.mark.usefixtures("download_host_reachable")
def test_load_pairs_wmt14_train_subsets_mock(tmp_path, monkeypatch):
    built = []
    original_builder = tfds.builder

    def recording_builder(name, **kwargs):
        built.append((name, kwargs.get("config")))
        return original_builder(name, **kwargs)

    monkeypatch.setattr(tfds, "builder", recording_builder)
    config = data_config(tfds_data_dir=str(tmp_path), train_subsets="newscommentary_v9")
    with tfds.testing.mock_data(num_examples=4):
        for split in ("train", "dev", "test"):
            assert len(as_pairs(sources.load_pairs(config, split))) == 4
    name, wmt_config = built[-1]
    assert name == "wmt_translate"
    assert wmt_config.language_pair == ("fr", "en")
    assert wmt_config.subsets == {
        tfds.Split.TRAIN: ["newscommentary_v9"],
        tfds.Split.VALIDATION: ["newstest2013"],
        tfds.Split.TEST: ["newstest2014"],
    }


def test_load_pairs_wmt14_unknown_subset(tmp_path):
    config = data_config(tfds_data_dir=str(tmp_path), train_subsets="newscommentary_v9,bogus")
    with pytest.raises(ValueError, match="train_subsets.*europarl_v7.*'newscommentary_v9,bogus'"):
        sources.load_pairs(config, "train")


def test_load_pairs_wmt14_fails_fast_when_the_download_host_is_unreachable(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise requests.exceptions.ConnectTimeout("timed out")

    def must_not_download(*args, **kwargs):
        raise AssertionError("download_and_prepare ran although the host is unreachable")

    monkeypatch.setattr(sources.requests, "head", unreachable)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", must_not_download)
    config = data_config(tfds_data_dir=str(tmp_path / "tfds"))
    with pytest.raises(RuntimeError, match="statmt.org/ is unreachable: ConnectTimeout") as caught:
        sources.load_pairs(config, "dev")
    assert "config.data.tfds_manual_dir" in str(caught.value)


@pytest.mark.usefixtures("download_host_reachable")
def test_load_pairs_wmt14_offline_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'www.statmt.org'")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", offline)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", offline)
    config = data_config(tfds_data_dir=str(tmp_path / "tfds"))
    with pytest.raises(RuntimeError) as caught:
        sources.load_pairs(config, "dev")
    message = str(caught.value)
    for expected in (
        "could not be downloaded",
        "www.statmt.org",
        "config.data.tfds_manual_dir",
        "config.data.tfds_data_dir",
        'config.data.source="text"',
    ):
        assert expected in message


# --- Sources: text files ----------------------------------------------------------------------


def test_load_pairs_tsv(tatoeba_tsv, tatoeba_pairs):
    pairs = as_pairs(
        sources.load_pairs(data_config(source="text", train_files=str(tatoeba_tsv)), "train")
    )
    assert pairs == tatoeba_pairs


@pytest.mark.parametrize(("split", "year", "count"), [("dev", 2013, 3000), ("test", 2014, 3003)])
def test_load_pairs_newstest_files(split, year, count):
    english, french = needs(NEWSTEST / f"newstest{year}.en"), NEWSTEST / f"newstest{year}.fr"
    config = data_config(source="text", **{f"{split}_files": f"{english},{french}"})
    pairs = as_pairs(sources.load_pairs(config, split))
    assert len(pairs) == count
    en_lines = english.read_text(encoding="utf-8").splitlines()
    fr_lines = french.read_text(encoding="utf-8").splitlines()
    for i in (0, count // 2, count - 1):
        assert pairs[i] == (en_lines[i].strip(), fr_lines[i].strip())


def test_load_pairs_text_strips_and_keeps_extra_columns_out(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_bytes(b"  Hello .\t Bonjour .  \r\nYes\tOui\tattribution #1\n")
    pairs = as_pairs(sources.load_pairs(data_config(source="text", train_files=str(tsv)), "train"))
    assert pairs == [("Hello .", "Bonjour ."), ("Yes", "Oui")]


def test_split_file_splits_by_distinct_source_sentence_seeded_and_reused(tmp_path):
    # 60 source sentences, some with several translations.
    lines = [f"source {i}\ttarget {i}.{j}" for i in range(60) for j in range(1 + i % 3)]
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = data_config(
        source="text",
        split_file=str(corpus),
        split_dev_size=10,
        split_test_size=5,
        split_cache_dir=str(tmp_path / "cache"),
    )
    splits = {split: as_pairs(sources.load_pairs(config, split)) for split in sources.SPLITS}

    by_split = {split: {src for src, _ in pairs} for split, pairs in splits.items()}
    assert [len(by_split[s]) for s in ("dev", "test", "train")] == [10, 5, 45]
    assert not (by_split["dev"] & by_split["test"] or by_split["train"] & by_split["dev"])
    assert not by_split["train"] & by_split["test"]
    # Every pair is in exactly one split, all translations of a source together.
    everything = sorted(pair for pairs in splits.values() for pair in pairs)
    assert everything == sorted(tuple(line.split("\t")) for line in lines)
    # The same seed gives the same split, read back from the cache; another seed another.
    paths = sources.split_file_paths(config)
    before = {split: path.stat().st_mtime_ns for split, path in paths.items()}
    assert sources.split_file_paths(config) == paths
    assert {split: path.stat().st_mtime_ns for split, path in paths.items()} == before
    config.split_seed = 1
    other = as_pairs(sources.load_pairs(config, "dev"))
    assert {src for src, _ in other} != by_split["dev"]


def test_split_file_config_errors(tmp_path):
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("a\tb\nc\td\n", encoding="utf-8")
    config = default_config()
    config.data.update(source="text", split_file=str(corpus), train_files=str(corpus))
    with pytest.raises(ValueError, match=r"split_file splits one file.*config\.data\.train_files"):
        validate(config)
    config.data.update(train_files="", split_dev_size=0)
    with pytest.raises(ValueError, match="split_dev_size must be >= 1"):
        validate(config)
    config.data.update(split_dev_size=5, split_test_size=0, split_cache_dir=str(tmp_path))
    validate(config)
    with pytest.raises(ValueError, match="2 distinct source sentences: too few for 5 dev"):
        sources.load_pairs(config.data, "train")


def test_split_file_of_tatoeba_keeps_every_english_sentence_in_one_split(tmp_path):
    config = data_config(
        source="text",
        split_file=str(needs(TATOEBA)),
        split_dev_size=2000,
        split_test_size=2000,
        split_cache_dir=str(tmp_path),
    )
    files = sources.split_file_paths(config)
    english = {}
    for split, path in files.items():
        english[split] = {line.split("\t", 1)[0] for line in path.read_text().splitlines()}
    assert len(english["dev"]) == len(english["test"]) == 2000
    assert not english["dev"] & english["test"] and not english["train"] & english["dev"]
    assert not english["train"] & english["test"]
    distinct = set()
    for line in TATOEBA.read_text(encoding="utf-8").splitlines():
        columns = [column.strip() for column in line.split("\t")]
        if len(columns) >= 2 and columns[0] and columns[1]:
            distinct.add(columns[0])
    assert sum(len(names) for names in english.values()) == len(distinct)


def test_load_pairs_text_errors(tmp_path):
    english, french = tmp_path / "a.en", tmp_path / "a.fr"
    english.write_text("one\ntwo\nthree\n")
    french.write_text("un\ndeux\n")
    config = data_config(source="text", train_files=f"{english},{french}")
    with pytest.raises(ValueError, match=r"a\.en has 3 lines but .*a\.fr has 2"):
        sources.load_pairs(config, "train")
    config.train_files = f"{english},{tmp_path / 'missing.fr'}"
    with pytest.raises(FileNotFoundError, match=r"config.data.train_files: file .*missing\.fr"):
        sources.load_pairs(config, "train")
    tsv = tmp_path / "b.tsv"
    tsv.write_text("one\tun\ntwo deux\n")
    config.train_files = str(tsv)
    with pytest.raises(ValueError, match=r"line 2 of .*b\.tsv has no tab"):
        sources.load_pairs(config, "train")
    for split, field in (("dev", "dev_files"), ("test", "test_files")):
        with pytest.raises(ValueError, match=f"config.data.{field} is empty"):
            sources.load_pairs(config, split)
    config.train_files = f"{english},{french},{tsv}"
    with pytest.raises(ValueError, match="one tab-separated file or two"):
        sources.load_pairs(config, "train")


# --- Tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_train_load_round_trip(tokenizer_model, tatoeba_pairs):
    path = tokenizer_model.path
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # No temporary file left.
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == tokenizer_model.vocab_size == 400
    sentences = [fr for _, fr in tatoeba_pairs[:200]]
    assert loaded.encode(sentences) == tokenizer_model.encode(sentences)
    # NFKC (SentencePiece's normalization) changes some characters, e.g. narrow spaces.
    plain = [s for s in sentences if unicodedata.normalize("NFKC", s) == s and "  " not in s]
    assert len(plain) > 100
    assert loaded.decode_batch(loaded.encode(plain)) == plain


def test_tokenizer_ids(tokenizer_model):
    ids = tokenizer_model.encode(["Bonjour !", ""])
    assert ids[0][-1] == EOS_ID and EOS_ID not in ids[0][:-1] and PAD_ID not in ids[0]
    assert ids[1] == [EOS_ID]
    assert UNK_ID in tokenizer_model.encode(["日本"])[0]  # Characters never seen in training.
    first = ids[0]
    assert tokenizer_model.decode(first + [PAD_ID] * 3) == "Bonjour !"
    assert tokenizer_model.decode(first[:-1] + [PAD_ID] + [EOS_ID] + first) == "Bonjour !"
    padded = np.array([first + [PAD_ID], [EOS_ID] + [PAD_ID] * len(first)])
    assert tokenizer_model.decode_batch(padded) == ["Bonjour !", ""]


def test_tokenizer_rejects_other_special_ids(tmp_path):
    path = tmp_path / "default_ids.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["le chat dort", "the cat sleeps"] * 10),
        model_prefix=str(tmp_path / "default_ids"),
        vocab_size=30,
        hard_vocab_limit=False,
        minloglevel=2,
    )  # SentencePiece's own defaults: unk 0, bos 1, eos 2, no padding.
    with pytest.raises(ValueError, match=r"default_ids\.model has \(pad, eos, unk, bos\) ids"):
        Tokenizer.load(path)


def test_tf_encode_equals_encode(tokenizer_model, tatoeba_pairs):
    texts = [fr for _, fr in tatoeba_pairs[:300]] + ["", "Ça coûte 3 €."]
    ragged = tokenizer_model.tf_encode(tf.constant(texts))
    assert ragged.dtype == tf.int32
    assert ragged.to_list() == tokenizer_model.encode(texts)
    mapped = tf.data.Dataset.from_tensor_slices(texts).batch(64).map(tokenizer_model.tf_encode)
    rows = [row for batch in mapped for row in batch.to_list()]
    assert rows == tokenizer_model.encode(texts)


def test_load_or_train_trains_then_reuses(tmp_path, tatoeba_tsv, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="trainer.data.tokenizer")
    pairs = sources.load_pairs(data_config(source="text", train_files=str(tatoeba_tsv)), "train")
    seen = []
    original_train = Tokenizer.train.__func__

    def recording_train(cls, sentences, path, vocab_size, **kwargs):
        sentences = list(sentences)
        seen.extend(sentences)
        return original_train(cls, sentences, path, vocab_size, **kwargs)

    monkeypatch.setattr(Tokenizer, "train", classmethod(recording_train))
    path = tmp_path / "vocab" / "spm.model"
    trained = tokenizer.load_or_train(path, pairs, vocab_size=300, max_sentences=1001)
    assert path.is_file() and trained.vocab_size == 300
    assert len(seen) == 1001
    english = {en for en, _ in as_pairs(pairs)}
    assert 0 < sum(s in english for s in seen) < 1001  # Both sides are sampled.

    def refuse(*args, **kwargs):
        raise AssertionError("an existing model must be reused, not retrained")

    monkeypatch.setattr(Tokenizer, "train", classmethod(refuse))
    reused = tokenizer.load_or_train(path, pairs, vocab_size=500, max_sentences=10)
    assert reused.vocab_size == 300
    assert any("reusing" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def test_tokenizer_small_corpus(tmp_path, caplog):
    sentences = ["le chat dort", "the cat sleeps", "un chien court", "a dog runs"] * 5
    small = Tokenizer.train(sentences, tmp_path / "small.model", 500)
    assert 3 < small.vocab_size < 500
    assert any("too few" in r.getMessage() for r in caplog.records)
    assert small.decode(small.encode(["le chat court"])[0]) == "le chat court"
    with pytest.raises(ValueError, match="vocab_size=10 cannot hold"):
        Tokenizer.train(sentences, tmp_path / "tiny.model", 10)


# --- Pipeline -----------------------------------------------------------------------------------

MAX_LENGTH = 24
TOKENS_PER_BATCH = 384


def make_train(pairs: tf.data.Dataset, tok: Tokenizer, seed: int = 0, **kwargs) -> tf.data.Dataset:
    options = dict(
        max_length=MAX_LENGTH, tokens_per_batch=TOKENS_PER_BATCH, shuffle_buffer=1000, seed=seed
    )
    return pipeline.train_dataset(pairs, tok, **{**options, **kwargs})


def test_bucket_lengths():
    assert pipeline.bucket_lengths(256) == [8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert pipeline.bucket_lengths(40) == [8, 12, 16, 24, 32, 40]
    assert pipeline.bucket_lengths(6) == [6]


def test_train_batches(tokenizer_model, tatoeba_pairs):
    dataset = make_train(pairs_dataset(tatoeba_pairs), tokenizer_model, repeat=False)
    spec = tf.TensorSpec([None, None], tf.int32)
    assert dataset.element_spec == {"inputs": spec, "targets": spec}
    encoded = {
        (tuple(i), tuple(t))
        for i, t in zip(
            tokenizer_model.encode([en for en, _ in tatoeba_pairs]),
            tokenizer_model.encode([fr for _, fr in tatoeba_pairs]),
        )
    }
    short = {pair for pair in encoded if max(map(len, pair)) <= MAX_LENGTH}
    assert 0 < len(short) < len(encoded)  # The filter has work to do.
    seen = []
    for batch in dataset.as_numpy_iterator():
        inputs, targets = batch["inputs"], batch["targets"]
        assert inputs.shape[1] == targets.shape[1] in pipeline.bucket_lengths(MAX_LENGTH)
        assert inputs.shape[0] == TOKENS_PER_BATCH // inputs.shape[1]
        for row_in, row_tg in zip(inputs, targets):
            pair = tuple(tuple(row[row != PAD_ID].tolist()) for row in (row_in, row_tg))
            for row, ids in zip((row_in, row_tg), pair):
                assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1]
                assert not row[len(ids) :].any()  # Padding only after EOS.
            seen.append(pair)
    assert set(seen) <= short
    # One pass: every kept pair at most once; only the buckets' last partial batches are lost.
    assert len(seen) == len(set(seen)) > 0.8 * len(short)


def test_train_batches_deterministic(tokenizer_model, tatoeba_pairs):
    def first_batches(seed: int) -> list[np.ndarray]:
        batches = make_train(pairs_dataset(tatoeba_pairs), tokenizer_model, seed=seed).take(6)
        return [b["targets"] for b in batches.as_numpy_iterator()]

    reference, again, other = first_batches(0), first_batches(0), first_batches(1)
    assert all(np.array_equal(a, b) for a, b in zip(reference, again))
    assert not all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(reference, other))


def test_train_iterator_checkpoint_restores_position(tokenizer_model, tatoeba_tsv, tmp_path):
    pairs = sources.load_pairs(data_config(source="text", train_files=str(tatoeba_tsv)), "train")
    iterator = iter(make_train(pairs, tokenizer_model))
    for _ in range(5):
        next(iterator)
    saved = tf.train.Checkpoint(iterator=iterator).save(str(tmp_path / "ckpt" / "it"))
    expected = [next(iterator) for _ in range(3)]
    restored = iter(make_train(pairs, tokenizer_model))
    next(restored)  # A fresh iterator, moved on, is moved back by the restore.
    tf.train.Checkpoint(iterator=restored).restore(saved).assert_consumed()
    for want in expected:
        got = next(restored)
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(got[key].numpy(), want[key].numpy())


def test_train_dataset_rejects_small_budget(tokenizer_model):
    with pytest.raises(ValueError, match="tokens_per_batch.*max_length=64.*got 32"):
        pipeline.train_dataset(
            pairs_dataset([("a", "b")]),
            tokenizer_model,
            max_length=64,
            tokens_per_batch=32,
            shuffle_buffer=10,
            seed=0,
        )


def test_eval_batches_keep_order_and_cut(tokenizer_model, tatoeba_pairs):
    pairs = tatoeba_pairs[::13][:250]  # Short and long sentences.
    dataset = pipeline.eval_dataset(
        pairs_dataset(pairs), tokenizer_model, batch_size=64, max_length=MAX_LENGTH
    )
    batches = list(dataset.as_numpy_iterator())
    assert [len(b["source_text"]) for b in batches] == [64, 64, 64, 58]
    texts = [
        (s.decode(), t.decode())
        for b in batches
        for s, t in zip(b["source_text"], b["target_text"])
    ]
    assert texts == pairs
    full = tokenizer_model.encode([en for en, _ in pairs])
    rows = [row for b in batches for row in b["inputs"]]
    assert any(len(ids) > MAX_LENGTH for ids in full)  # Some sources are cut.
    for row, ids in zip(rows, full):
        want = ids if len(ids) <= MAX_LENGTH else ids[: MAX_LENGTH - 1] + [EOS_ID]
        assert row[: len(want)].tolist() == want and not row[len(want) :].any()
    for b in batches:
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        assert b["targets"].shape[1] <= MAX_LENGTH


def test_process_exits_while_pipeline_is_busy(tokenizer_model):
    """A script that ends while `tf_encode` runs in a tf.data thread must exit, not abort."""
    script = textwrap.dedent(
        f"""
        import tensorflow as tf
        from trainer.data import pipeline, tokenizer
        tok = tokenizer.Tokenizer.load({str(tokenizer_model.path)!r})
        # Each batch takes long to encode: the prefetching thread is busy at exit.
        text = "le chat dort sur le canapé " * 20000
        pairs = tf.data.Dataset.from_tensors({{"source": text, "target": text}}).repeat()
        iterator = iter(pipeline.eval_dataset(pairs, tok, batch_size=1, max_length=8))
        next(iterator)  # The iterator stays alive until the interpreter exits.
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
