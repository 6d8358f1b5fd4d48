"""The training benchmarks' data split and curve arithmetic (scripts/bench_training.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from scripts import bench_training as bt


def _write_corpus(data_dir: Path, english: int, translations: int) -> list[tuple[str, str]]:
    """A generated fra.txt: `english` sentences, each with `translations` French lines."""
    pairs = [
        (f"sentence number {i}.", f"phrase {i} version {j}.")
        for i in range(english)
        for j in range(translations)
    ]
    folder = data_dir / "tatoeba_en_fr"
    folder.mkdir(parents=True)
    lines = [f"{en}\t{fr}\tattribution" for en, fr in pairs] + ["no tab here", "\tempty side"]
    (folder / "fra.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pairs


def _read(path: str) -> list[tuple[str, str]]:
    return [tuple(line.split("\t")) for line in Path(path).read_text().splitlines()]


def test_tatoeba_split_keeps_each_english_sentence_in_one_split(tmp_path):
    pairs = _write_corpus(tmp_path / "data", english=50, translations=3)
    paths = bt.prepare_tatoeba(
        str(tmp_path / "data"), str(tmp_path / "work"), seed=3, dev_sentences=5, test_sentences=7
    )
    splits = {split: _read(path) for split, path in paths.items()}

    english = {split: {en for en, _ in rows} for split, rows in splits.items()}
    assert len(english["dev"]) == 5 and len(english["test"]) == 7 and len(english["train"]) == 38
    assert not english["dev"] & english["test"]
    assert not english["train"] & (english["dev"] | english["test"])
    # Every well-formed pair lands in exactly one split, all translations with their sentence.
    assert sorted(sum(splits.values(), [])) == sorted(pairs)
    assert len(splits["dev"]) == 15


def test_tatoeba_split_depends_on_the_seed_only_and_is_reused(tmp_path):
    _write_corpus(tmp_path / "data", english=40, translations=1)

    def split(work: str, seed: int) -> dict[str, str]:
        return bt.prepare_tatoeba(
            str(tmp_path / "data"), str(tmp_path / work), seed, dev_sentences=10, test_sentences=10
        )

    first, again, other = split("a", 0), split("b", 0), split("c", 1)
    assert _read(first["dev"]) == _read(again["dev"])
    assert _read(first["dev"]) != _read(other["dev"])
    # A split already written is reused as it is.
    Path(first["train"]).write_text("kept\tgardé\n")
    assert split("a", 0) == first
    assert _read(first["train"]) == [("kept", "gardé")]


def test_a_corpus_too_small_for_the_held_out_splits_is_refused(tmp_path):
    _write_corpus(tmp_path / "data", english=20, translations=1)
    with pytest.raises(ValueError, match="20 distinct source sentences.*10 dev.*10 test"):
        bt.prepare_tatoeba(
            str(tmp_path / "data"), str(tmp_path / "w"), dev_sentences=10, test_sentences=10
        )


def test_missing_corpus_names_the_path_and_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="tatoeba_en_fr/fra.txt.*--data_dir"):
        bt.prepare_tatoeba(str(tmp_path), str(tmp_path / "work"))


def _result(losses: list[float], diverged: str | None = None) -> dict:
    points = [
        {"step": 50 * (i + 1), "wall_s": 10.0 * (i + 1), "dev_loss": loss}
        for i, loss in enumerate(losses)
    ]
    return {"points": points, "diverged": diverged}


def test_curve_arithmetic():
    result = _result([5.0, 4.0, 3.5, 3.6])
    assert bt.final_dev_loss(result) == 3.6
    assert bt.best_dev_loss(result) == 3.5
    assert bt.first_reaching(result, 4.0)["step"] == 100
    assert bt.first_reaching(result, 3.55)["wall_s"] == 30.0
    assert bt.first_reaching(result, 3.0) is None
    diverged = _result([5.0], diverged="loss is nan at step 60")
    assert bt.final_dev_loss(diverged) == math.inf == bt.best_dev_loss(diverged)


def test_a_cached_run_is_reused_only_on_the_same_code(tmp_path, monkeypatch):
    spec = bt.first_order("adam", 4e-3, num_steps=4)
    args = argparse.Namespace(data_dir=str(tmp_path), work_dir=str(tmp_path))
    run_dir = tmp_path / "runs" / spec.name
    run_dir.mkdir(parents=True)
    stored = {
        "spec": dataclasses.asdict(spec),
        "optimizer_config": bt.resolved_optimizer(spec),
        "code_hash": bt.training_code_hash(),
        "points": [],
        "diverged": None,
    }
    (run_dir / "result.json").write_text(json.dumps(stored))
    children = []

    def child(spec, args, task, run_dir):
        children.append(task)
        fresh = {**stored, "code_hash": bt.training_code_hash(), "rerun": True}
        (run_dir / "result.json").write_text(json.dumps(fresh))

    monkeypatch.setattr(bt, "_child", child)
    assert bt.cached_run(spec, args) == json.loads(json.dumps(stored)) and children == []

    (run_dir / "result.json").write_text(json.dumps({**stored, "code_hash": "older code"}))
    assert bt.cached_run(spec, args)["rerun"] and children == ["train"]


def test_run_names_distinguish_every_field_of_a_spec():
    base = bt.shampoo("async", 2e-3)
    variants = [
        base,
        bt.shampoo("sync", 2e-3),
        bt.shampoo("async", 1e-3),
        bt.shampoo("async", 2e-3, update_steps=100),
        bt.shampoo("async", 2e-3, num_steps=10),
        bt.shampoo("async", 2e-3, eval_every=5),
        bt.shampoo("async", 2e-3, seed=1),
        bt.first_order("adam", 2e-3),
    ]
    assert len({spec.name for spec in variants}) == len(variants)
    assert base.label == "shampoo-async" and bt.first_order("adagrad", 0.1).label == "adagrad"


def test_bench_config_is_a_valid_trainer_config(tmp_path):
    from trainer import config as config_lib

    files = {split: str(tmp_path / f"{split}.tsv") for split in ("train", "dev", "test")}
    for spec in (bt.shampoo("async", 2e-3, update_steps=7), bt.first_order("adagrad", 0.1)):
        config = bt.bench_config(spec, files, str(tmp_path / "spm.model"))
        config_lib.validate(config)
        assert config.optimizer.name == spec.optimizer
        assert config.precond.mode == spec.mode
        assert config.optimizer.learning_rate == spec.learning_rate
        assert config.precond.update_steps == spec.update_steps
        assert config.data.dev_files == files["dev"] and config.data.source == "text"
        assert config.train.eval_every_steps == 0  # dev loss comes from weight copies


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED_DATA / "tatoeba_en_fr" / "fra.txt").is_file(), reason="needs ../shared/data"
)
def test_a_run_records_its_curve_and_test_scores_and_is_reused(tmp_path):
    spec = bt.shampoo("async", 4e-3, num_steps=4, eval_every=2, update_steps=2)
    args = argparse.Namespace(data_dir=str(SHARED_DATA), work_dir=str(tmp_path))

    result = bt.cached_run(spec, args, test=True)

    assert [point["step"] for point in result["points"]] == [2, 4]
    assert result["diverged"] is None and result["mean_step_seconds"] > 0
    assert all(point["dev_loss"] > 0 and point["wall_s"] > 0 for point in result["points"])
    assert result["points"][1]["wall_s"] > result["points"][0]["wall_s"]
    files, _ = bt.shared_paths(args)
    with open(files["test"], encoding="utf-8") as test_split:
        assert result["test_sentences"] == sum(1 for _ in test_split)
    assert np.isfinite(result["test_bleu"]) and np.isfinite(result["test_loss"])
    staleness_keys = {"min", "mean", "max", "fraction_preconditioned"}
    assert all(set(point["staleness"]) == staleness_keys for point in result["points"])
    run_dir = tmp_path / "runs" / spec.name
    (run_dir / "train.log").unlink()
    assert bt.cached_run(spec, args, test=True) == result  # no child ran again
    assert not (run_dir / "train.log").exists()
