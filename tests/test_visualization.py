"""Explanations and their renderings (HTML, PNG, terminal text) on tiny models."""

import re
from types import SimpleNamespace

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import TensorDataset
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from captum_tracin_we import HuggingFaceClassifier, InfluenceWE, save_checkpoint, toy, TracInWE
from captum_tracin_we.visualization import explain, format_score, InfluenceExplanation, save_html

SCRIPT = "<script>alert(1)</script>"
SCORE = r"[+-]\d\.(?:\d{3}|\de[+-]\d\d)"  # +0.123, or +4.2e-04 when tiny
MARK = re.compile(r'background-color: hsl\((\d+), 75%, (\d+)%\);[^"]*" title="([+-][0-9.]+)"')


@pytest.fixture(scope="module")
def bow(tmp_path_factory):
    """The toy example's bag-of-words model on 9 sentences, one holding a <script> word."""
    torch.manual_seed(0)
    texts = toy.POSITIVE[:4] + toy.NEGATIVE[:4]
    vocab = toy.Vocabulary(texts)
    vocab.words.append(SCRIPT)
    script = vocab.ids[SCRIPT] = len(vocab.words) - 1
    ids = torch.zeros(len(texts) + 1, 10, dtype=torch.long)
    ids[: len(texts), :9] = vocab.encode(texts)[:, :9]
    ids[-1, :3] = torch.tensor([vocab.ids["a"], script, vocab.ids["film"]])
    data = TensorDataset(ids, torch.tensor([1] * 4 + [0] * 4 + [1]))
    model = toy.BagOfWords(len(vocab.words))
    checkpoints = toy.train(model, data, str(tmp_path_factory.mktemp("bow")), 9, 2.0)
    model.eval()
    tracin = TracInWE(model, data, checkpoints, loss_fn=nn.CrossEntropyLoss(), batch_size=4)
    test = (vocab.encode(["a wonderful and moving film", "a dull film"]), torch.tensor([1, 0]))
    return SimpleNamespace(tracin=tracin, tokenizer=vocab, inputs=test, k=5, vocab=vocab)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A 1-layer BERT with a WordPiece vocabulary where words split into pieces."""
    directory = tmp_path_factory.mktemp("bert")
    pieces = "[PAD] [UNK] [CLS] [SEP] [MASK] the a film is act ##or play ##ing ##ed bor"
    (directory / "vocab.txt").write_text("\n".join(pieces.split()) + "\n")
    tokenizer = BertTokenizer(str(directory / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(pieces.split()), hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16, max_position_embeddings=16,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = HuggingFaceClassifier(BertForSequenceClassification(config)).eval()
    checkpoints = []
    for i, lr in enumerate((0.5, 1.0)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 * torch.randn_like(p))
        checkpoints.append(str(directory / f"checkpoint-{i}.pt"))
        save_checkpoint(model, checkpoints[-1], lr)

    def batch(texts, labels):
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"], torch.tensor(labels)

    train = ["the actor is playing", "a boring film", "the film played", "a film is acting"]
    data = TensorDataset(*batch(train, [1, 0, 1, 0]))
    tracin = TracInWE(model, data, checkpoints, loss_fn=nn.CrossEntropyLoss(), batch_size=2)
    test = batch(["boring acting", "the actor playing"], [0, 1])
    return SimpleNamespace(tracin=tracin, tokenizer=tokenizer, inputs=test, k=2)


@pytest.fixture(scope="module")
def bow_explanations(bow):
    return explain(
        bow.tracin, bow.inputs, bow.tokenizer, k=bow.k, label_names=toy.LABELS,
        predictions=["positive (0.91)", "negative (0.75)"],
    )


@pytest.fixture(scope="module")
def bert_explanations(bert):
    return explain(bert.tracin, bert.inputs, bert.tokenizer, k=bert.k)


def rows(explanation: InfluenceExplanation):
    return explanation.proponents + explanation.opponents


def shared_ids(tracin, test_ids, train_index):
    train_ids = tracin.train_dataloader.dataset[train_index][0]
    excluded = set(tracin.excluded_token_ids.tolist())
    return (set(test_ids.tolist()) & set(train_ids.tolist())) - excluded


@pytest.mark.parametrize("name", ["bow", "bert"])
def test_highlighted_words_are_the_shared_tokens(request, name):
    setup = request.getfixturevalue(name)
    explanations = request.getfixturevalue(f"{name}_explanations")
    for i, explanation in enumerate(explanations):
        assert all(word.score is None for word in explanation.test.words)
        for view in rows(explanation):
            shared = shared_ids(setup.tracin, setup.inputs[0][i], view.index)
            for word in view.words:
                assert (word.score is not None) == bool(shared & set(word.token_ids))
            shown = {t for w in view.words if w.score is not None for t in w.token_ids}
            special = {t for w in view.special_tokens for t in w.token_ids}
            assert (shown & shared) | special == shared
            if name == "bow":  # one token per word
                texts = {w.text for w in view.words if w.score is not None}
                assert texts == {setup.vocab.words[t] for t in shared}


def test_rows_match_tracin_influence_and_scores_add_up(bow, bow_explanations):
    for proponents in (True, False):
        top = bow.tracin.influence(bow.inputs, k=bow.k, proponents=proponents)
        for i, explanation in enumerate(bow_explanations):
            views = explanation.proponents if proponents else explanation.opponents
            assert [v.index for v in views] == top.indices[i].tolist()
            for view, score in zip(views, top.influence_scores[i].tolist()):
                assert view.influence == pytest.approx(score, rel=1e-5)
                total = sum(w.score for w in view.shared_words())  # one token per word
                assert total == pytest.approx(view.influence, rel=1e-4, abs=1e-7)


def test_colour_hue_follows_sign_and_lightness_magnitude(bow_explanations):
    for explanation in bow_explanations:
        marks = MARK.findall(explanation.to_html())
        highlighted = [w for v in rows(explanation) for w in v.words if w.score is not None]
        assert len(marks) == len(highlighted) > 0
        for (hue, lightness, title), word in zip(marks, highlighted):
            assert float(title) == pytest.approx(word.score, abs=1e-4)
            assert int(hue) == (120 if word.score > 0 else 0)
        largest = max(highlighted, key=lambda w: abs(w.score))
        darkest = 50 if largest.score > 0 else 60
        assert any(int(lightness) == darkest and float(t) == pytest.approx(largest.score, abs=1e-4)
                   for _, lightness, t in marks)


def test_wordpieces_merge_into_words_with_summed_scores(bert, bert_explanations):
    explanation = bert_explanations[0]  # "boring acting"
    assert [w.text for w in explanation.test.words] == ["boring", "acting"]
    by_index = {view.index: view for view in rows(explanation)}
    assert set(by_index) == {0, 1, 2, 3}
    pairs = bert.tracin.word_influence(bert.inputs, [[3, 0], [3, 0]])[0]
    ids = bert.tokenizer.convert_tokens_to_ids
    for pair, expected_words in zip(pairs, (["a", "film", "is", "acting"],
                                            ["the", "actor", "is", "playing"])):
        contributions = dict(zip(pair.token_ids.tolist(), pair.scores.tolist()))
        view = by_index[pair.train_index]
        assert [w.text for w in view.words] == expected_words
        words = {w.text: w for w in view.words}
        if pair.train_index == 3:  # acting = act + ##ing, both shared
            expected = contributions[ids("act")] + contributions[ids("##ing")]
            assert words["acting"].score == pytest.approx(expected)
            assert words["acting"].token_ids == (ids("act"), ids("##ing"))
        else:  # actor shares act, playing shares ##ing
            assert words["actor"].score == pytest.approx(contributions[ids("act")])
            assert words["playing"].score == pytest.approx(contributions[ids("##ing")])
        assert words["is"].score is None
        special = {w.text: w.score for w in view.special_tokens}
        assert set(special) == {"[CLS]", "[SEP]"}
        assert special["[CLS]"] == pytest.approx(contributions[ids("[CLS]")])
    html = explanation.to_html()
    assert "special tokens:" in html and "[PAD]" not in html
    assert "[CLS]" not in html.split("Test example")[1].split("</p>")[1]


def test_html_escapes_training_text(bow_explanations, tmp_path):
    views = [v for e in bow_explanations for v in rows(e) if SCRIPT in v.text]
    assert views, "the <script> training example should be among the rows"
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for explanation in bow_explanations:
        html = explanation._repr_html_()
        assert "<script" not in html and "</script" not in html
        assert escaped in html
    path = tmp_path / "page.html"
    save_html(bow_explanations, str(path), title="<script>x</script>")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert escaped in page and "negative (0.75)" in page


def test_save_figure_writes_a_png(bow_explanations, bert_explanations, tmp_path):
    for i, explanation in enumerate(bow_explanations + bert_explanations):
        path = tmp_path / f"figure-{i}.png"
        figure = explanation.save_figure(str(path))
        assert isinstance(figure, Figure)
        data = path.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
        texts = {t.get_text() for t in figure.texts}
        assert SCRIPT in texts or i >= len(bow_explanations)
        assert format_score(explanation.proponents[0].influence) in texts


def test_text_rendering(bow_explanations):
    explanation = bow_explanations[0]
    plain = explanation.to_text(color=False)
    assert "\x1b[" not in plain and "predicted positive (0.91)" in plain
    markers = re.findall(rf"(\S+)\[({SCORE})\]", plain)
    highlighted = [w for v in rows(explanation) for w in v.words if w.score is not None]
    assert len(markers) == len(highlighted) > 0
    assert re.search(r"\w\[[+-]\d\.\d{3}\]", plain)  # e.g. wonderful[+0.030]
    for (text, score), word in zip(markers, highlighted):
        assert text.endswith(word.text) and score == format_score(word.score)
    colored = explanation.to_text(color=True)
    assert "\x1b[1;30;42m" in colored or "\x1b[1;30;41m" in colored
    assert not re.search(rf"\[{SCORE}\]", colored)


def test_format_score():
    assert format_score(0.1234) == "+0.123" and format_score(-2.0) == "-2.000"
    assert format_score(-4.2e-5) == "-4.2e-05" and format_score(0.0) == "+0.000"


def test_bad_arguments(bow):
    with pytest.raises(ValueError, match="predictions"):
        explain(bow.tracin, bow.inputs, bow.tokenizer, predictions=["one"])
    with pytest.raises(ValueError, match="`k`"):
        explain(bow.tracin, bow.inputs, bow.tokenizer, k=0)
    with pytest.raises(TypeError, match="one batch"):
        explain(bow.tracin, bow.inputs[0], bow.tokenizer)
    with pytest.raises(ValueError, match=r"`scores` has shape \(2, 3\), but `inputs` and the training data need \(2, "):
        explain(bow.tracin, bow.inputs, bow.tokenizer, scores=torch.zeros(2, 3))


def test_precomputed_scores_give_the_same_explanations(bow, bow_explanations):
    scores = bow.tracin.influence(bow.inputs)
    again = explain(
        bow.tracin, bow.inputs, bow.tokenizer, k=bow.k, label_names=toy.LABELS,
        predictions=["positive (0.91)", "negative (0.75)"], scores=scores,
    )
    assert [e.to_text(color=False) for e in again] == [
        e.to_text(color=False) for e in bow_explanations
    ]


def test_repr_is_short(bow_explanations):
    explanation = bow_explanations[0]
    assert repr(explanation) == (
        f"InfluenceExplanation(test={explanation.test.text!r}, "
        f"proponents={[v.index for v in explanation.proponents]}, "
        f"opponents={[v.index for v in explanation.opponents]})"
    )


def test_explanations_name_the_method_whose_scores_they_show(bert):
    raw = explain(bert.tracin, bert.inputs, bert.tokenizer, k=1)[0]
    assert raw.method == "TracInWE" and "Proponents by TracInWE:" in raw.to_text(color=False)
    tracin = bert.tracin
    cosine = TracInWE(tracin.model, tracin.train_dataloader.dataset, tracin.checkpoints,
                      loss_fn=nn.CrossEntropyLoss(), batch_size=2, normalize="cosine")
    explanation = explain(cosine, bert.inputs, bert.tokenizer, k=1)[0]
    assert "Opponents by TracInWE (cosine):" in explanation.to_text(color=False)
    assert "<b>Proponents by TracInWE (cosine)</b>" in explanation.to_html()
    assert abs(explanation.proponents[0].influence) <= 1
    ekfac = InfluenceWE(tracin.model, tracin.train_dataloader.dataset, tracin.checkpoints,
                        loss_fn=nn.CrossEntropyLoss(), batch_size=2, refinement_steps=1)
    assert ekfac.method_name == "InfluenceWE (EK-FAC, ASTRA 1 step)"
    one = tuple(tensor[:1] for tensor in bert.inputs)
    assert explain(ekfac, one, bert.tokenizer, k=1)[0].method == ekfac.method_name
