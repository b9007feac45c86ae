r"""
Visual explanations of TracIn-WE influence: for each test example, its most
influential training examples (proponents and opponents) with the words they
share highlighted by their contribution to the influence score.

``explain`` computes the explanations; each ``InfluenceExplanation`` renders as
HTML (in the look of Captum's ``captum.attr.visualization.visualize_text``, and
shown inline in notebooks), as a PNG figure (matplotlib, Agg backend), or as
terminal text. ``save_html`` writes a self-contained page for several of them.

A contribution is per token *id*, not per position: TracIn-WE sums the embedding
gradients of all positions holding a token, so every occurrence of a shared
token is highlighted with the same contribution.
"""

import colorsys
import html
from dataclasses import dataclass, field
from typing import (
    Any,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    TYPE_CHECKING,
    Union,
)

import torch
from torch import nn, Tensor

from captum_tracin_we._core.token_influence import TokenInfluenceBase, WordInfluence
from captum_tracin_we._utils.values import check_int

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# always hidden from the text, whatever the tokenizer says
SPECIAL_TOKENS = frozenset({"[CLS]", "[SEP]", "[PAD]"})
LabelNames = Union[Sequence[str], Mapping[Any, str]]


@dataclass
class WordView:
    r"""
    A word as shown: its text (WordPiece pieces merged) and its contribution
    to the influence score, or None if it holds no token shared with the test
    example. `token_ids` are the ids of its pieces.
    """

    text: str
    score: Optional[float]
    token_ids: Tuple[int, ...] = ()


@dataclass
class ExampleView:
    r"""
    A test or training example as shown.

    `index` is the position in the test batch (test example) or in the
    training dataset (proponents and opponents); `influence` is the pair's
    influence score (None for the test example). `special_tokens` lists the
    shared special tokens ([CLS], [SEP], ...) with non-zero contributions,
    which are not shown in the text; `prediction` is the test example's
    prediction text, if given.
    """

    index: int
    words: List[WordView]
    label: Optional[str]
    influence: Optional[float]
    special_tokens: List[WordView] = field(default_factory=list)
    prediction: Optional[str] = None

    @property
    def text(self) -> str:
        r"""The words joined by spaces."""
        return " ".join(word.text for word in self.words)

    def shared_words(self, top: Optional[int] = None) -> List[WordView]:
        r"""
        The distinct shared words by decreasing |score|, the `top` first ones
        if `top` is given.
        """
        seen: Dict[str, WordView] = {}
        for word in self.words:
            if word.score is not None and word.text not in seen:
                seen[word.text] = word
        ordered = sorted(seen.values(), key=lambda w: -abs(w.score or 0.0))
        return ordered if top is None else ordered[:top]


@dataclass
class InfluenceExplanation:
    r"""
    The explanation of one test example: the test example itself (plain text,
    label and prediction) and its top proponents and opponents, whose words
    shared with the test example carry their contributions.
    """

    test: ExampleView
    proponents: List[ExampleView]
    opponents: List[ExampleView]
    # the method whose scores are shown, e.g. "TracInWE (cosine)" (see `method_name`)
    method: Optional[str] = None

    def roles(self) -> List[Tuple[str, List[ExampleView]]]:
        r"""The proponents and opponents, each with its heading (naming the method)."""
        by = f" by {self.method}" if self.method else ""
        return [(f"Proponents{by}", self.proponents), (f"Opponents{by}", self.opponents)]

    def __repr__(self) -> str:
        # short: notebooks store the repr beside the HTML of every displayed explanation
        return (
            f"InfluenceExplanation(test={self.test.text!r}, "
            f"proponents={[view.index for view in self.proponents]}, "
            f"opponents={[view.index for view in self.opponents]})"
        )

    def max_abs_score(self) -> float:
        r"""The largest |score| of the highlighted words, the colour scale."""
        scores = [
            abs(word.score)
            for view in self.proponents + self.opponents
            for word in view.words
            if word.score is not None
        ]
        return max(scores, default=0.0)

    def to_html(self, top_words: int = 5) -> str:
        r"""
        An HTML fragment in the look of Captum's `visualize_text`: the test
        example on top, then a table of proponents and opponents with their
        influence score, label, highlighted text (green for positive, red for
        negative contributions; lightness by |score| over the largest |score|
        highlighted in this explanation) and top shared words. Every text is
        HTML-escaped.

        Args:

            top_words (int, optional): Shared words listed per row.
                    Default: 5
        """
        scale = self.max_abs_score()
        header = (
            "<tr><th>Role</th><th>Train Index</th><th>Influence Score</th>"
            "<th>Label</th><th>Word Importance</th><th>Top Shared Words</th></tr>"
        )
        rows = [header]
        for (role, views), kind in zip(self.roles(), ("Proponent", "Opponent")):
            rows.append(f'<tr><td colspan="6"><b>{html.escape(role)}</b></td></tr>')
            rows.extend(_html_row(kind, view, scale, top_words) for view in views)
        return "".join(
            [
                '<div class="tracin-we-explanation" style="margin-bottom:2em">',
                _html_test(self.test),
                '<table style="width:100%; border-collapse:collapse">',
                *rows,
                "</table>",
                _html_legend(),
                "</div>",
            ]
        )

    def _repr_html_(self) -> str:
        r"""Shows the explanation inline in Jupyter notebooks."""
        return self.to_html()

    def to_text(self, color: bool = True, top_words: int = 5) -> str:
        r"""
        A plain-terminal rendering. With `color`, shared words are shown bold on
        a green (positive) or red (negative) ANSI background; without it, each
        shared word is followed by its score, as `word[+0.123]`.

        Args:

            color (bool, optional): Use ANSI colours.
                    Default: True
            top_words (int, optional): Shared words listed per row.
                    Default: 5
        """
        lines = [_text_test(self.test)]
        for role, views in self.roles():
            lines.append(f"{role}:")
            for view in views:
                lines.extend(_text_row(view, color, top_words))
        return "\n".join(lines)

    def save_figure(
        self, path: str, width: float = 11.0, dpi: int = 120, top_words: int = 5
    ) -> "Figure":
        r"""
        Draws the explanation with matplotlib (Agg backend, no screen needed):
        the test sentence on top, then the proponents and opponents, their
        shared words in boxes coloured by contribution, with the influence
        scores and the top shared words' scores. Saves it as a PNG.

        Args:

            path (str): The PNG file to write.
            width (float, optional): Figure width in inches; the height follows
                    from the content.
                    Default: 11.0
            dpi (int, optional): Resolution.
                    Default: 120
            top_words (int, optional): Shared words listed per row.
                    Default: 5

        Returns:
            figure (matplotlib.figure.Figure): the figure drawn.
        """
        return _draw_explanation(self, path, width, dpi, top_words)


def explain(
    tracin: TokenInfluenceBase,
    inputs: Tuple[Any, ...],
    tokenizer: Any,
    k: int = 3,
    label_names: Optional[LabelNames] = None,
    predictions: Optional[Sequence[str]] = None,
    show_progress: bool = False,
    scores: Optional[Tensor] = None,
) -> List[InfluenceExplanation]:
    r"""
    Explains each test example in `inputs` by its `k` proponents and `k`
    opponents (`tracin.influence`), with the word-level contributions of the
    words they share with it (`tracin.word_influence`). The training examples
    are read from `tracin.train_dataloader.dataset`.

    Token ids are turned into text with `tokenizer.convert_ids_to_tokens`;
    WordPiece pieces (`##...`) are merged into their word, whose score is the
    sum of the contributions of its distinct shared token ids. A contribution
    is per token id, not per position (TracIn-WE sums the gradients of all
    positions holding a token), so every occurrence of a shared token carries
    the same contribution. Special tokens ([CLS], [SEP], [PAD] and the
    tokenizer's `all_special_tokens`) are not shown in the text; their non-zero
    contributions are listed in the example's `special_tokens`. Padding is not
    shown: positions where the attention mask (the second element of a batch
    or dataset item, when it has the shape of the token ids) is 0, and the
    tokenizer's pad token id or the embedding's `padding_idx`.

    Args:

            tracin (TracInWE or InfluenceWE): The influence method, whose
                    name (`method_name`, e.g. "TracInWE (cosine)") heads the
                    proponents and opponents.
            inputs (tuple): One test batch `(*model_inputs, labels)` whose first
                    element is the token ids tensor `(n, L)`.
            tokenizer: Anything with `convert_ids_to_tokens(list_of_ids)`
                    returning a list of str, e.g. a Hugging Face tokenizer or
                    `captum_tracin_we.toy.Vocabulary`.
            k (int, optional): Proponents and opponents per test example.
                    Default: 3
            label_names (list[str] or dict, optional): Label names, indexed by
                    label value. If None, labels are shown as numbers.
                    Default: None
            predictions (list[str], optional): One prediction text per test
                    example (e.g. "positive (0.93)"), shown with the test example.
                    Default: None
            show_progress (bool, optional): Show progress bars.
                    Default: False
            scores (Tensor, optional): `tracin.influence(inputs)`, the
                    `(n_test, n_train)` scores, when already computed (e.g. the
                    TracInWE result of `compare_influence_methods`); saves one
                    pass over the training data. Default: None

    Returns:
        A list of `InfluenceExplanation`, one per test example.
    """
    ids, mask, labels = _split_test_batch(inputs)
    if predictions is not None and len(predictions) != ids.shape[0]:
        raise ValueError(
            f"`predictions` has {len(predictions)} entries but `inputs` has "
            f"{ids.shape[0]} test examples."
        )
    (top, top_scores), (bottom, bottom_scores) = _proponents_and_opponents(
        tracin, inputs, k, show_progress, scores
    )
    indices, scores = torch.cat([top, bottom], dim=1), torch.cat([top_scores, bottom_scores], 1)
    pairs = tracin.word_influence(inputs, indices, show_progress)
    render = _Renderer(tracin, tokenizer)
    dataset = tracin.train_dataloader.dataset
    explanations = []
    for i, row in enumerate(pairs):
        test = render.view(i, ids[i], _row(mask, i), {}, _label(labels[i], label_names), None)
        test.prediction = None if predictions is None else str(predictions[i])
        views = [
            _train_view(render, dataset, pair, score, label_names)
            for pair, score in zip(row, scores[i].tolist())
        ]
        n = top.shape[1]
        explanations.append(InfluenceExplanation(test, views[:n], views[n:], tracin.method_name))
    return explanations


def save_html(
    explanations: Sequence[InfluenceExplanation],
    path: str,
    title: str = "TracIn-WE explanations",
    sections: Sequence[str] = (),
) -> None:
    r"""
    Writes a self-contained HTML page showing `explanations`.

    Args:

            explanations (list[InfluenceExplanation]): As returned by `explain`.
            path (str): The HTML file to write.
            title (str, optional): The page title.
                    Default: "TracIn-WE explanations"
            sections (list[str], optional): HTML fragments appended after the
                    explanations, as given (not escaped).
                    Default: ()
    """
    body = "\n".join([explanation.to_html() for explanation in explanations] + list(sections))
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em} th,td{text-align:left;"
        "vertical-align:top;padding:4px 8px;border-bottom:1px solid #ddd}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)


# -- building the views ---------------------------------------------------------


class _Renderer:
    r"""Turns token ids into `ExampleView`s: merges pieces, hides specials and padding."""

    def __init__(self, tracin: TokenInfluenceBase, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special: Set[str] = set(SPECIAL_TOKENS) | set(
            getattr(tokenizer, "all_special_tokens", None) or ()
        )
        self.pad_ids: Set[int] = set()
        pad = getattr(tokenizer, "pad_token_id", None)
        if isinstance(pad, int):
            self.pad_ids.add(pad)
        layer = tracin.embedding_layer
        if isinstance(layer, nn.Embedding) and layer.padding_idx is not None:
            self.pad_ids.add(layer.padding_idx % layer.num_embeddings)

    def view(
        self,
        index: int,
        ids: Tensor,
        mask: Optional[Tensor],
        contributions: Dict[int, float],
        label: Optional[str],
        influence: Optional[float],
    ) -> ExampleView:
        kept = [
            int(t)
            for p, t in enumerate(ids.reshape(-1).tolist())
            if int(t) not in self.pad_ids and (mask is None or int(mask.reshape(-1)[p]) != 0)
        ]
        tokens = self.tokenizer.convert_ids_to_tokens(kept)
        pieces: List[List[Tuple[str, int]]] = []  # the (token, id) pieces of each word
        special: Dict[int, WordView] = {}
        after_special = True
        for token, token_id in zip(tokens, kept):
            token = str(token)
            if token in self.special:
                if contributions.get(token_id):
                    special[token_id] = WordView(token, contributions[token_id], (token_id,))
                after_special = True
            elif token.startswith("##") and pieces and not after_special:
                pieces[-1].append((token[2:], token_id))
            else:
                pieces.append([(token[2:] if token.startswith("##") else token, token_id)])
                after_special = False
        words = [_word(word, contributions) for word in pieces]
        return ExampleView(index, words, label, influence, list(special.values()))


def _word(pieces: List[Tuple[str, int]], contributions: Dict[int, float]) -> WordView:
    r"""A word's score: the sum over its distinct shared token ids."""
    token_ids = tuple(token_id for _, token_id in pieces)
    shared = {t for t in token_ids if t in contributions}
    score = sum(contributions[t] for t in sorted(shared)) if shared else None
    return WordView("".join(text for text, _ in pieces), score, token_ids)


def _train_view(
    render: _Renderer,
    dataset: Any,
    pair: WordInfluence,
    score: float,
    label_names: Optional[LabelNames],
) -> ExampleView:
    item = dataset[pair.train_index]
    ids = torch.as_tensor(item[0])
    contributions = dict(zip(pair.token_ids.tolist(), pair.scores.tolist()))
    label = _label(item[-1], label_names) if len(item) > 1 else None
    return render.view(pair.train_index, ids, _mask(item, ids), contributions, label, score)


def _split_test_batch(inputs: Any) -> Tuple[Tensor, Optional[Tensor], Sequence[Any]]:
    if not isinstance(inputs, (tuple, list)) or len(inputs) < 2:
        raise TypeError(
            "`inputs` must be one batch `(*model_inputs, labels)`; give a "
            "DataLoader's batches one at a time."
        )
    ids = inputs[0]
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise TypeError("The first element of `inputs` must be the (n, L) token ids tensor.")
    return ids, _mask(inputs, ids), inputs[-1]


def _mask(item: Sequence[Any], ids: Tensor) -> Optional[Tensor]:
    r"""The attention mask: the second element if there are >= 3, shaped like ids."""
    if len(item) >= 3 and isinstance(item[1], Tensor) and item[1].shape == ids.shape:
        return item[1]
    return None


def _row(mask: Optional[Tensor], i: int) -> Optional[Tensor]:
    return None if mask is None else mask[i]


def _label(value: Any, label_names: Optional[LabelNames]) -> str:
    if isinstance(value, Tensor):
        value = value.item()
    if label_names is not None:
        try:
            return str(label_names[value])
        except (IndexError, KeyError, TypeError):
            pass
    return str(value)


def _proponents_and_opponents(
    tracin: TokenInfluenceBase, inputs: Any, k: int, show_progress: bool, scores: Optional[Tensor]
) -> Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]:
    r"""Top-k (indices, scores) both ways from one pass over the training data."""
    k = check_int(k, "k")
    if scores is None:
        scores = tracin.influence(inputs, show_progress=show_progress)
    else:
        n_test = inputs[0].shape[0]  # the token ids, checked by `_split_test_batch`
        dataset = tracin.train_dataloader.dataset
        n_train = len(dataset) if hasattr(dataset, "__len__") else scores.shape[-1]
        if tuple(scores.shape) != (n_test, n_train):
            raise ValueError(
                f"`scores` has shape {tuple(scores.shape)}, but `inputs` and the training "
                f"data need {(n_test, n_train)} (n_test, n_train); pass `tracin.influence(inputs)`."
            )
    k = min(k, scores.shape[1])
    top, top_indices = torch.topk(scores, k, dim=1)
    bottom, bottom_indices = torch.topk(-scores, k, dim=1)
    return (top_indices, top), (bottom_indices, -bottom)


def format_score(score: float) -> str:
    r"""`+0.123`; scores that would round to zero in 3 decimals as `+4.2e-04`."""
    if score != 0 and abs(score) < 5e-4:
        return f"{score:+.1e}"
    return f"{score:+.3f}"


# -- colours ----------------------------------------------------------------------


def _hsl(score: float, scale: float) -> Tuple[int, int, int]:
    r"""Captum's `visualize_text` colour: hue 120 (green) or 0 (red), lightness by |score|."""
    value = max(-1.0, min(1.0, score / scale)) if scale > 0 else 0.0
    if score > 0:
        return 120, 75, 100 - int(50 * value)
    return 0, 75, 100 - int(-40 * value)


def css_color(score: float, scale: float) -> str:
    r"""The CSS `hsl(...)` colour of a contribution, given the largest |score|."""
    return "hsl({}, {}%, {}%)".format(*_hsl(score, scale))


def rgb_color(score: float, scale: float) -> Tuple[float, float, float]:
    r"""The same colour as `css_color`, as an RGB tuple in [0, 1] for matplotlib."""
    hue, saturation, lightness = _hsl(score, scale)
    return colorsys.hls_to_rgb(hue / 360, lightness / 100, saturation / 100)


# -- HTML ------------------------------------------------------------------------


def _cell(content: str) -> str:
    return f'<td><text style="padding-right:2em"><b>{content}</b></text></td>'


def _html_word(word: WordView, scale: float) -> str:
    text = html.escape(word.text)
    if word.score is None:
        return f" {text}"
    return (
        f' <mark style="background-color: {css_color(word.score, scale)}; opacity:1.0; '
        f'line-height:1.75" title="{word.score:+.4f}"><font color="black">{text}</font></mark>'
    )


def _html_scores(words: Sequence[WordView]) -> str:
    return ", ".join(f"{html.escape(w.text)}&nbsp;({format_score(w.score)})" for w in words)


def _html_row(role: str, view: ExampleView, scale: float, top_words: int) -> str:
    text = "".join(_html_word(word, scale) for word in view.words)
    notes = _html_scores(view.shared_words(top_words)) or "(no shared words)"
    if view.special_tokens:
        notes += f"<br><small>special tokens: {_html_scores(view.special_tokens)}</small>"
    return "".join(
        [
            "<tr>",
            _cell(role),
            _cell(str(view.index)),
            _cell(format_score(view.influence)),
            _cell(html.escape(view.label or "")),
            f"<td>{text}</td>",
            f"<td>{notes}</td>",
            "</tr>",
        ]
    )


def _html_test(test: ExampleView) -> str:
    meta = [f"<b>Test example {test.index}</b>"]
    if test.label is not None:
        meta.append(f"label: <b>{html.escape(test.label)}</b>")
    if test.prediction is not None:
        meta.append(f"prediction: <b>{html.escape(test.prediction)}</b>")
    text = html.escape(test.text)
    return f'<p>{" &middot; ".join(meta)}</p><p style="font-size:1.15em">{text}</p>'


def _html_legend() -> str:
    swatches = "".join(
        '<span style="display: inline-block; width: 10px; height: 10px; border: 1px solid; '
        f'background-color: {css_color(value, 1.0)}"></span> {label} '
        for value, label in ((-1.0, "Negative"), (0.0, "Neutral"), (1.0, "Positive"))
    )
    return (
        '<div style="border-top: 1px solid; margin-top: 5px; padding-top: 5px; '
        f'display: inline-block"><b>Legend: </b>{swatches}</div>'
    )


# -- terminal text -------------------------------------------------------------------


def _text_word(word: WordView, color: bool) -> str:
    if word.score is None:
        return word.text
    if not color:
        return f"{word.text}[{format_score(word.score)}]"
    background = 42 if word.score > 0 else 41
    return f"\x1b[1;30;{background}m{word.text}\x1b[0m"


def _text_scores(words: Sequence[WordView]) -> str:
    return ", ".join(f"{w.text} {format_score(w.score)}" for w in words)


def _text_test(test: ExampleView) -> str:
    meta = [] if test.label is None else [f"label {test.label}"]
    if test.prediction is not None:
        meta.append(f"predicted {test.prediction}")
    suffix = f" ({', '.join(meta)})" if meta else ""
    return f'Test example {test.index}{suffix}: "{test.text}"'


def _text_row(view: ExampleView, color: bool, top_words: int) -> List[str]:
    text = " ".join(_text_word(word, color) for word in view.words)
    label = f" [{view.label}]" if view.label is not None else ""
    lines = [
        f'  {format_score(view.influence):>9}  #{view.index}{label} "{text}"',
        f"             shared words: {_text_scores(view.shared_words(top_words)) or '(none)'}",
    ]
    if view.special_tokens:
        lines.append(f"             special tokens: {_text_scores(view.special_tokens)}")
    return lines


# -- matplotlib figure ------------------------------------------------------------

_MARGIN, _LABEL_COLUMN = 0.25, 1.9  # inches: page margin, width of the score column
_FONT, _SMALL = 11.0, 9.0  # points


@dataclass
class _Item:
    r"""A piece of text placed at (x, y) pixels from the top left."""

    x: float
    y: float
    text: str
    size: float
    style: Dict[str, Any]


class _Flow:
    r"""Lays out text pieces left to right, top to bottom, wrapping at `right`."""

    def __init__(self, renderer: Any, dpi: float, right: float) -> None:
        self.renderer, self.dpi, self.right = renderer, dpi, right
        self.items: List[_Item] = []
        self.y = 0.0

    def width(self, text: str, size: float, weight: str = "normal") -> float:
        from matplotlib.font_manager import FontProperties

        prop = FontProperties(size=size, weight=weight)
        return self.renderer.get_text_width_height_descent(text, prop, ismath=False)[0]

    def line_height(self, size: float) -> float:
        return 2.0 * size * self.dpi / 72

    def put(self, x: float, text: str, size: float, **style: Any) -> float:
        r"""Places `text` at `x` on the current line; returns its right end."""
        self.items.append(_Item(x, self.y, text, size, style))
        return x + self.width(text, size, style.get("fontweight", "normal"))

    def words(
        self, left: float, pieces: Sequence[Tuple[str, Dict[str, Any]]], size: float
    ) -> None:
        r"""Places words from `left` on the current line, wrapping; ends on a new line."""
        gap = self.width(" ", size) + (0.5 * size * self.dpi / 72)
        x = left
        for text, style in pieces:
            width = self.width(text, size, style.get("fontweight", "normal"))
            if x > left and x + width > self.right:
                self.newline(size)
                x = left
            x = self.put(x, text, size, **style) + gap
        self.newline(size)

    def newline(self, size: float) -> None:
        self.y += self.line_height(size)


def _word_style(word: WordView, scale: float) -> Dict[str, Any]:
    if word.score is None:
        return {}
    color = rgb_color(word.score, scale)
    edge = "#2e7d32" if word.score > 0 else "#c62828"
    box = {"boxstyle": "round,pad=0.25", "facecolor": color, "edgecolor": edge, "lw": 0.8}
    return {"bbox": box, "fontweight": "bold"}


def _figure_rows(
    explanation: InfluenceExplanation, flow: _Flow, left: float, top_words: int
) -> None:
    r"""Lays out the test example, then the proponents and opponents."""
    dpi, test, scale = flow.dpi, explanation.test, explanation.max_abs_score()
    column = left + _LABEL_COLUMN * dpi
    meta = [f"Test example {test.index}"]
    meta += [] if test.label is None else [f"label: {test.label}"]
    meta += [] if test.prediction is None else [f"prediction: {test.prediction}"]
    flow.put(left, "   ·   ".join(meta), _FONT + 1, fontweight="bold")
    flow.newline(_FONT + 1)
    flow.words(left, [(word.text, {}) for word in test.words], _FONT + 2)
    for (role, views), color in zip(explanation.roles(), ("#2e7d32", "#c62828")):
        flow.y += 0.3 * flow.line_height(_FONT)
        flow.put(left, role, _FONT + 1, fontweight="bold", color=color)
        flow.newline(_FONT + 1)
        for view in views:
            label = "" if view.label is None else f"  [{view.label}]"
            flow.put(left, format_score(view.influence), _FONT, fontweight="bold")
            flow.put(left + 0.75 * dpi, f"#{view.index}{label}", _SMALL, color="#555555")
            flow.words(column, [(w.text, _word_style(w, scale)) for w in view.words], _FONT)
            notes = [f"{w.text} {format_score(w.score)}" for w in view.shared_words(top_words)]
            notes += [f"{w.text} {format_score(w.score)}" for w in view.special_tokens]
            summary = "shared: " + (", ".join(notes) if notes else "(none)")
            flow.words(column, [(summary, {"color": "#555555"})], _SMALL)


def _draw_explanation(
    explanation: InfluenceExplanation, path: str, width: float, dpi: int, top_words: int
) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, 1.0), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    margin = _MARGIN * dpi
    flow = _Flow(canvas.get_renderer(), dpi, width * dpi - margin)
    flow.y = margin
    _figure_rows(explanation, flow, margin, top_words)
    height = flow.y + margin
    figure.set_size_inches(width, height / dpi)
    for item in flow.items:
        figure.text(
            item.x / (width * dpi),
            1 - item.y / height,
            item.text,
            fontsize=item.size,
            va="top",
            parse_math=False,
            **item.style,
        )
    figure.savefig(path, format="png", dpi=dpi, facecolor="white")
    return figure

