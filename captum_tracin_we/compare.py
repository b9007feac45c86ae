r"""
Side-by-side comparison of TracIn-WE, its cosine form and influence functions
through the word embeddings (InfluenceWE) with Captum's TracIn variants on the same
model, training data, checkpoints and test batch: full score matrices, top-k
proponents and opponents, run times, top-k overlaps, the cancellation ratio of
each method's scores, a markdown table and a matplotlib figure.

This is a leaf module: it imports from the core, and the core never imports it.
"""

import copy
import textwrap
import time
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
from captum.influence import TracInCP, TracInCPBase, TracInCPFast, TracInCPFastRandProj
from torch import Tensor
from torch.nn import Module
from torch.utils.data import Dataset

from captum_tracin_we._core.influence_we import InfluenceWE
from captum_tracin_we._core.top_k import top_k
from captum_tracin_we._core.tracin_we import TracInWE
from captum_tracin_we._utils.captum_compat import (
    integer_input_warnings_ignored,
    KMostInfluentialResults,
)
from captum_tracin_we._utils.checkpoints import load_checkpoint
from captum_tracin_we._utils.loaders import batch_loader, own_collate
from captum_tracin_we._utils.values import check_int
from captum_tracin_we.evaluation import cancellation_ratio

TRACIN_WE = "TracInWE"
TRACIN_WE_COSINE = "TracInWE (cosine)"
TRACIN_WE_TOPK = "TracInWE-TopK"
INFLUENCE_WE_EKFAC = "InfluenceWE (EK-FAC)"
TRACINCP_LAST_LAYER = "TracInCP (last layer)"
TRACINCP_FAST = "TracInCPFast"
TRACINCP_FAST_RAND_PROJ = "TracInCPFastRandProj"
TRACINCP_EMBEDDINGS = "TracInCP (embeddings)"

DEFAULT_METHODS: Tuple[str, ...] = (
    TRACIN_WE,
    TRACIN_WE_COSINE,
    TRACIN_WE_TOPK,
    INFLUENCE_WE_EKFAC,
    TRACINCP_LAST_LAYER,
    TRACINCP_FAST,
)
ALL_METHODS: Tuple[str, ...] = DEFAULT_METHODS + (
    TRACINCP_FAST_RAND_PROJ,
    TRACINCP_EMBEDDINGS,
)

_TEXT_WIDTH = 80


@dataclass
class MethodResult:
    r"""
    What one influence method gave on the test batch.

    Attributes:

        name (str): The method's name, one of `ALL_METHODS`.
        scores (Tensor): The `(n_test, n_train)` influence scores.
        proponents (KMostInfluentialResults): Per test example, the `k` highest
                scores and their training indices (ties to the smaller index,
                as `TracInWE.influence(k=...)`).
        opponents (KMostInfluentialResults): The `k` lowest scores (most negative
                first) and their training indices.
        seconds (float): Wall-clock seconds to construct the method and compute
                `scores`.
    """

    name: str
    scores: Tensor
    proponents: KMostInfluentialResults
    opponents: KMostInfluentialResults
    seconds: float


@dataclass
class Comparison:
    r"""
    The results of `compare_influence_methods`, one `MethodResult` per method, in
    the order the methods were requested.
    """

    results: Dict[str, MethodResult]

    @property
    def methods(self) -> List[str]:
        r"""The names of the compared methods, in order."""
        return list(self.results)

    def overlap(self, proponents: bool = True) -> Dict[Tuple[str, str], float]:
        r"""
        Agreement of the top-k lists of each pair of methods.

        Args:

            proponents (bool, optional): Compare the proponents if True, the
                    opponents otherwise.
                    Default: True

        Returns:
            A dict mapping every ordered pair `(a, b)` of method names (a method
            with itself included) to the mean over test examples of
            `|top_k(a) & top_k(b)| / k`, a number in [0, 1]. It is symmetric.
        """
        tops = {
            name: (r.proponents if proponents else r.opponents).indices
            for name, r in self.results.items()
        }
        return {(a, b): _topk_overlap(tops[a], tops[b]) for a in tops for b in tops}

    def table(self, train_texts: Optional[Sequence[str]] = None, test_index: int = 0) -> str:
        r"""
        A markdown report for one test example: per method, its proponents and
        opponents (rank, train index, score and, if given, the training text
        truncated to about 80 characters); then the run time and the cancellation
        ratio of every method; then the proponent and opponent overlap tables.

        Args:

            train_texts (Sequence[str], optional): The text of each training
                    example, indexed like `train_dataset`.
                    Default: None
            test_index (int, optional): Which test example of the batch to show.
                    Default: 0

        Returns:
            The report as a markdown string.
        """
        self._check_test_index(test_index)
        parts = [
            _method_table(result, test_index, train_texts)
            for result in self.results.values()
        ]
        parts.append(self._summary_table(test_index))
        for proponents in (True, False):
            title = "Proponent" if proponents else "Opponent"
            parts.append(
                f"### {title} overlap (mean over test examples of |top-k ∩ top-k| / k)\n\n"
                + _overlap_table(self.methods, self.overlap(proponents))
            )
        return "\n\n".join(parts) + "\n"

    def figure(
        self,
        train_texts: Sequence[str],
        test_index: int = 0,
        test_text: Optional[str] = None,
        path: Optional[str] = None,
    ) -> Any:
        r"""
        A matplotlib figure with one column per method listing, for one test
        example, its top-k proponents (green) and opponents (red) with their
        scores and training texts (wrapped and truncated).

        The figure is drawn with the Agg canvas, without `pyplot`, so it neither
        opens a window nor changes the global matplotlib backend.

        Args:

            train_texts (Sequence[str]): The text of each training example,
                    indexed like `train_dataset`.
            test_index (int, optional): Which test example of the batch to show.
                    Default: 0
            test_text (str, optional): The test example's text, shown in the
                    title.
                    Default: None
            path (str, optional): If given, the figure is saved there as a PNG.
                    Default: None

        Returns:
            figure (matplotlib.figure.Figure): the figure.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self._check_test_index(test_index)
        k = self._k()
        n_methods = len(self.results)
        figure = Figure(figsize=(4.2 * n_methods, 1.4 + 1.1 * k), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, n_methods, squeeze=False)[0]
        for ax, result in zip(axes, self.results.values()):
            _draw_method(ax, result, test_index, train_texts)
        title = f"Test example {test_index}"
        if test_text is not None:
            title += ": " + _truncate(test_text, 120)
        figure.suptitle(title, fontsize=11)
        if path is not None:
            figure.savefig(path, format="png", dpi=100)
        return figure

    def _k(self) -> int:
        return next(iter(self.results.values())).proponents.indices.shape[1]

    def _check_test_index(self, test_index: int) -> None:
        n_test = next(iter(self.results.values())).scores.shape[0]
        if not 0 <= test_index < n_test:
            raise IndexError(
                f"`test_index` is {test_index}, but the test batch has {n_test} examples."
            )

    def _summary_table(self, test_index: int) -> str:
        lines = [
            "### Run time and cancellation",
            "",
            "Cancellation ratio: sum_j |I_j| / |sum_j I_j| over the training examples "
            "(1 = all scores share one sign; large = positive and negative scores cancel).",
            "",
            f"| method | seconds | cancellation ratio (test {test_index}) "
            "| mean cancellation ratio |",
            "|---|---:|---:|---:|",
        ]
        for name, result in self.results.items():
            ratios = cancellation_ratio(result.scores)
            lines.append(
                f"| {name} | {result.seconds:.3f} | {ratios[test_index].item():.3g} "
                f"| {ratios.mean().item():.3g} |"
            )
        return "\n".join(lines)


def compare_influence_methods(
    model: Module,
    train_dataset: Dataset,
    checkpoints: Union[str, List[str]],
    inputs: Tuple[Any, ...],
    loss_fn: Module,
    final_fc_layer: str,
    *,
    embedding_layer: Optional[Union[Module, str]] = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    k: int = 5,
    top_k_tokens: Optional[int] = 10,
    batch_size: int = 16,
    checkpoints_load_func: Callable[[Module, Any], float] = load_checkpoint,
    projection_dim: Optional[int] = None,
    cache_checkpoints: bool = True,
    show_progress: bool = False,
) -> Comparison:
    r"""
    Runs several TracIn influence methods on the same model, training data,
    checkpoints and test batch, and collects their scores, top-k proponents and
    opponents, and run times.

    Methods (see `ALL_METHODS`):

    - "TracInWE": exact TracIn-WE (`TracInWE`), gradients of the word embeddings.
    - "TracInWE (cosine)": the same, normalised (`normalize="cosine"`): the cosine
      of the two examples' gradients, in [-1, 1], which does not rank first the
      training examples with the largest gradients whatever the test example.
    - "TracInWE-TopK": TracIn-WE keeping the `top_k_tokens` tokens per example.
    - "InfluenceWE (EK-FAC)": influence functions through the word embeddings
      with EK-FAC curvature (`InfluenceWE`), factors fitted in the same run
      (their time included).
    - "TracInCP (last layer)": Captum's `TracInCP(layers=[final_fc_layer])` with
      sample-wise gradients: weight *and bias* gradients of the last layer.
    - "TracInCPFast": Captum's `TracInCPFast` on `final_fc_layer`: weight
      gradients only, so it equals the previous one without the bias term.
    - "TracInCPFastRandProj": Captum's `TracInCPFastRandProj` (random projection
      to `projection_dim` if given; exact dot products otherwise). Its neighbor
      search is exact (the `annoy` package is not needed).
    - "TracInCP (embeddings)": Captum's dense `TracInCP` on the embedding layer,
      with one loss per example; slow, and equal to exact "TracInWE".

    Each method's proponents and opponents are the top k of its own full score
    matrix (ties to the smaller training index), so all methods are ranked the
    same way.

    Args:

            model (torch.nn.Module): The model, called as `model(*batch[:-1])`. It
                    should be in eval mode.
            train_dataset (torch.utils.data.Dataset): The training examples; each
                    item is a tuple `(*model_inputs, label)`.
            checkpoints (str or list[str]): The checkpoint directory or paths, as
                    for `TracInWE`. (Not an iterator: every method reads them.)
            inputs (tuple): The test batch `(*model_inputs, labels)`.
            loss_fn (torch.nn.Module): The training loss, a module with a
                    `reduction` attribute such as `nn.CrossEntropyLoss()`. Each
                    method gets a copy with the reduction it needs ("none" for the
                    dense TracInCP, "sum" for the last-layer methods).
            final_fc_layer (str): The dotted name of the last linear layer in
                    `model`, e.g. "model.classifier" for a `HuggingFaceClassifier`
                    around a BERT classifier.
            embedding_layer (torch.nn.Module or str, optional): The word-embedding
                    module or its name, as for `TracInWE`; None finds it.
                    Default: None
            methods (Sequence[str], optional): The methods to run, in order.
                    Default: DEFAULT_METHODS
            k (int, optional): The number of proponents and opponents to keep
                    (capped at the number of training examples).
                    Default: 5
            top_k_tokens (int, optional): The token budget of "TracInWE-TopK".
                    Default: 10
            batch_size (int, optional): The training batch size of every method.
                    Default: 16
            checkpoints_load_func (Callable, optional): Loads a checkpoint into
                    `model` and returns its learning rate.
                    Default: load_checkpoint
            projection_dim (int, optional): The projection dimension of
                    "TracInCPFastRandProj"; None projects nothing.
                    Default: None
            cache_checkpoints (bool, optional): Keep each checkpoint's parameters
                    in memory after its first load, for every method. Captum's
                    `TracInCP` loads every checkpoint again for every training
                    batch; with the cache, the run times compare computation
                    rather than disk reads. Costs one copy of the model's
                    state per checkpoint in memory.
                    Default: True
            show_progress (bool, optional): Show the methods' progress bars (not
                    available for TracInCPFastRandProj).
                    Default: False

    Returns:
        comparison (Comparison): one `MethodResult` per method.
    """
    names = _check_methods(methods)
    k = check_int(k, "k")
    if TRACIN_WE_TOPK in names and top_k_tokens is None:
        raise ValueError(f'"{TRACIN_WE_TOPK}" needs `top_k_tokens` (an int >= 1).')
    if not hasattr(loss_fn, "reduction"):
        raise ValueError(
            "`loss_fn` must be a loss module with a `reduction` attribute, such as "
            "`nn.CrossEntropyLoss()`: each method gets a copy with its own reduction."
        )
    if own_collate(train_dataset, "train_dataset") is not None:  # Captum's would batch it by the default collation
        train_dataset = batch_loader(train_dataset, batch_size, "train_dataset")
    run = MethodRun(
        model=model,
        train_dataset=train_dataset,
        checkpoints=checkpoints,
        checkpoints_load_func=(
            _CachedCheckpoints(checkpoints_load_func) if cache_checkpoints
            else checkpoints_load_func
        ),
        loss_fn=loss_fn,
        final_fc_layer=final_fc_layer,
        embedding_layer=embedding_layer,
        top_k_tokens=top_k_tokens,
        batch_size=batch_size,
        projection_dim=projection_dim,
    )
    results = {}
    for name in names:
        scores, seconds = _timed_scores(METHOD_BUILDERS[name], run, inputs, show_progress)
        results[name] = _method_result(name, scores, seconds, k)
    return Comparison(results)


# -- running the methods ---------------------------------------------------


class _CachedCheckpoints:
    r"""
    A `checkpoints_load_func` that calls `load` once per checkpoint, then
    restores the model's state (and returns the learning rate) from memory.
    """

    def __init__(self, load: Callable[[Module, Any], float]) -> None:
        self.load = load
        self.states: Dict[Any, Tuple[Dict[str, Tensor], Any]] = {}

    def __call__(self, model: Module, checkpoint: Any) -> Any:
        if checkpoint not in self.states:
            learning_rate = self.load(model, checkpoint)
            state = {name: value.detach().clone() for name, value in model.state_dict().items()}
            self.states[checkpoint] = (state, learning_rate)
        state, learning_rate = self.states[checkpoint]
        model.load_state_dict(state)
        return learning_rate


@dataclass
class MethodRun:
    r"""
    What every method of one `compare_influence_methods` call is built from:
    the arguments of that call (the loader of checkpoints possibly caching).
    A builder registered with `register_method` receives it.
    """

    model: Module
    train_dataset: Dataset
    checkpoints: Union[str, List[str]]
    checkpoints_load_func: Callable[[Module, Any], float]
    loss_fn: Module
    final_fc_layer: str
    embedding_layer: Optional[Union[Module, str]]
    top_k_tokens: Optional[int]
    batch_size: int
    projection_dim: Optional[int]

    def loss(self, reduction: str) -> Module:
        r"""A copy of the loss with the given reduction."""
        loss = copy.deepcopy(self.loss_fn)
        loss.reduction = reduction
        return loss


class _ExactDotProductNeighbors:
    r"""
    Exact maximum-dot-product search for `TracInCPFastRandProj`, in place of its
    default `AnnoyNearestNeighbors` (which needs the optional `annoy` package).
    Implements Captum's `NearestNeighbors` interface (`setup`,
    `get_nearest_neighbors`).
    """

    def setup(self, data: Tensor) -> None:
        self.data = data.flatten(start_dim=1)

    def get_nearest_neighbors(self, query: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        products = query.flatten(start_dim=1) @ self.data.T
        values, indices = torch.topk(products, min(k, products.shape[1]), dim=1)
        return indices, values


def token_method(run: MethodRun, method: Callable[..., TracInCPBase] = TracInWE, **options: Any) -> TracInCPBase:
    r"""A method of this package (`TracInWE`, `InfluenceWE`, ...) with `options`, built for `run`."""
    return method(
        run.model,
        run.train_dataset,
        run.checkpoints,
        checkpoints_load_func=run.checkpoints_load_func,
        embedding_layer=run.embedding_layer,
        loss_fn=run.loss_fn,
        batch_size=run.batch_size,
        **options,
    )


def _tracincp_last_layer(run: MethodRun) -> TracInCP:
    return TracInCP(
        run.model,
        run.train_dataset,
        run.checkpoints,
        checkpoints_load_func=run.checkpoints_load_func,
        layers=[run.final_fc_layer],
        loss_fn=run.loss("sum"),
        batch_size=run.batch_size,
        sample_wise_grads_per_batch=True,
    )


def _tracincp_fast(run: MethodRun) -> TracInCPFast:
    return TracInCPFast(
        run.model,
        run.final_fc_layer,
        run.train_dataset,
        run.checkpoints,
        checkpoints_load_func=run.checkpoints_load_func,
        loss_fn=run.loss("sum"),
        batch_size=run.batch_size,
    )


def _tracincp_fast_rand_proj(run: MethodRun) -> TracInCPFastRandProj:
    return TracInCPFastRandProj(
        run.model,
        run.final_fc_layer,  # type: ignore[arg-type]  # Captum resolves names
        run.train_dataset,
        run.checkpoints,
        checkpoints_load_func=run.checkpoints_load_func,
        loss_fn=run.loss("sum"),
        batch_size=run.batch_size,
        nearest_neighbors=_ExactDotProductNeighbors(),  # type: ignore[arg-type]
        projection_dim=run.projection_dim,
    )


def _tracincp_embeddings(run: MethodRun) -> TracInCP:
    layer_name = token_method(run).embedding_layer_name
    return TracInCP(
        run.model,
        run.train_dataset,
        run.checkpoints,
        checkpoints_load_func=run.checkpoints_load_func,
        layers=[layer_name],
        loss_fn=run.loss("none"),
        batch_size=run.batch_size,
    )


METHOD_BUILDERS: Dict[str, Callable[[MethodRun], TracInCPBase]] = {
    TRACIN_WE: token_method,
    TRACIN_WE_COSINE: lambda run: token_method(run, normalize="cosine"),
    TRACIN_WE_TOPK: lambda run: token_method(run, top_k_tokens=run.top_k_tokens),
    INFLUENCE_WE_EKFAC: lambda run: token_method(run, InfluenceWE, approximation="ekfac"),
    TRACINCP_LAST_LAYER: _tracincp_last_layer,
    TRACINCP_FAST: _tracincp_fast,
    TRACINCP_FAST_RAND_PROJ: _tracincp_fast_rand_proj,
    TRACINCP_EMBEDDINGS: _tracincp_embeddings,
}


def register_method(name: str, builder: Callable[[MethodRun], TracInCPBase]) -> None:
    r"""
    Makes `name` a method of `compare_influence_methods` (and of the benchmarks
    that use it): `builder(run)` returns a Captum influence instance for the
    call's `MethodRun`, e.g.
    `register_method("InfluenceWE (K-FAC)", lambda run: token_method(run, InfluenceWE, approximation="kfac"))`.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`name` must be a non-empty string, got {name!r}.")
    if not callable(builder):
        raise TypeError(f"`builder` must be callable (run -> influence method), got {type(builder).__name__}.")
    METHOD_BUILDERS[name] = builder


def _check_methods(methods: Sequence[str]) -> List[str]:
    if isinstance(methods, str):
        methods = [methods]
    names = list(dict.fromkeys(methods))
    unknown = [name for name in names if name not in METHOD_BUILDERS]
    if unknown:
        raise ValueError(
            f"Unknown influence method(s) {unknown}; valid methods are "
            f"{list(METHOD_BUILDERS)} (add one with `register_method`)."
        )
    if not names:
        raise ValueError(f"`methods` is empty; choose from {list(METHOD_BUILDERS)}.")
    return names


def _timed_scores(
    build: Callable[[MethodRun], TracInCPBase],
    run: MethodRun,
    inputs: Tuple[Any, ...],
    show_progress: bool,
) -> Tuple[Tensor, float]:
    r"""Constructs a method and computes its full scores; returns them and the time."""
    start = time.perf_counter()
    method = build(run)
    with integer_input_warnings_ignored():
        if isinstance(method, TracInCPFastRandProj):
            scores = method.influence(inputs, k=None)  # type: ignore[arg-type]
        else:
            scores = method.influence(inputs, k=None, show_progress=show_progress)
    seconds = time.perf_counter() - start
    assert isinstance(scores, Tensor)
    return scores.detach(), seconds


def _method_result(name: str, scores: Tensor, seconds: float, k: int) -> MethodResult:
    if not torch.isfinite(scores).all():
        raise ValueError(
            f"{name} gave {int((~torch.isfinite(scores)).sum())} NaN or infinite scores, which cannot be "
            "ranked or compared: check its inputs, loss and checkpoints."
        )
    return MethodResult(
        name,
        scores,
        KMostInfluentialResults(*top_k(scores, k, proponents=True)),
        KMostInfluentialResults(*top_k(scores, k, proponents=False)),
        seconds,
    )


def _topk_overlap(a: Tensor, b: Tensor) -> float:
    r"""Mean over rows of |set(a[i]) & set(b[i])| / k."""
    k = a.shape[1]
    shared = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)]
    return sum(shared) / (k * len(shared)) if shared else float("nan")


# -- reporting ---------------------------------------------------------------


def _truncate(text: str, width: int = _TEXT_WIDTH) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _markdown_cell(text: str) -> str:
    return _truncate(text).replace("|", "\\|")


def _method_table(
    result: MethodResult, test_index: int, train_texts: Optional[Sequence[str]]
) -> str:
    header = "| rank | role | train index | score |"
    rule = "|---:|---|---:|---:|"
    if train_texts is not None:
        header += " text |"
        rule += "---|"
    lines = [f"### {result.name} ({result.seconds:.3f} s)", "", header, rule]
    for role, top in (("proponent", result.proponents), ("opponent", result.opponents)):
        for rank, (index, score) in enumerate(
            zip(top.indices[test_index].tolist(), top.influence_scores[test_index].tolist()),
            start=1,
        ):
            row = f"| {rank} | {role} | {index} | {score:.4g} |"
            if train_texts is not None:
                row += f" {_markdown_cell(train_texts[index])} |"
            lines.append(row)
    return "\n".join(lines)


def _overlap_table(methods: List[str], overlap: Dict[Tuple[str, str], float]) -> str:
    lines = [
        "| | " + " | ".join(methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for a in methods:
        lines.append(f"| {a} | " + " | ".join(f"{overlap[a, b]:.2f}" for b in methods) + " |")
    return "\n".join(lines)


def _wrapped(text: str, width: int = 42, max_lines: int = 2) -> str:
    text = " ".join(str(text).split())
    return "\n".join(textwrap.wrap(text, width, max_lines=max_lines, placeholder=" …"))


def _draw_method(
    ax: Any, result: MethodResult, test_index: int, train_texts: Sequence[str]
) -> None:
    ax.set_axis_off()
    ax.set_title(f"{result.name}\n{result.seconds:.2f} s", fontsize=10)
    groups = (
        ("Proponents", "tab:green", result.proponents),
        ("Opponents", "tab:red", result.opponents),
    )
    n_rows = sum(0.5 + top.indices.shape[1] for _, _, top in groups)
    step, y = 1.0 / n_rows, 1.0
    for label, color, top in groups:
        ax.text(0.0, y, label, color=color, fontsize=9, fontweight="bold", va="top",
                transform=ax.transAxes)
        y -= 0.5 * step
        indices = top.indices[test_index].tolist()
        scores = top.influence_scores[test_index].tolist()
        for rank, (index, score) in enumerate(zip(indices, scores), start=1):
            text = f"{rank}. #{index}  {score:+.3g}\n{_wrapped(train_texts[index])}"
            ax.text(0.0, y, text, color=color, fontsize=8, va="top",
                    transform=ax.transAxes)
            y -= step
