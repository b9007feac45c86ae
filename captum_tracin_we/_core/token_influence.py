r"""
The one core of the token-influence methods (TracIn-WE and its siblings): a
Captum ``TracInCPBase`` that owns the checkpoint loop, the training side (a data
loader, or an index built from it), ``influence`` and its top-k,
``self_influence``, ``word_influence``, the index and the progress bars. A method
is a small subclass that overrides hooks:

- ``_transform_test(c, test)``: the test rows at checkpoint ``c`` before they are
  joined with the training rows (a preconditioner; identity for TracIn);
- ``_checkpoint_weight(c, learning_rate)``: the weight of checkpoint ``c``
  (its learning rate, as TracIn's);
- ``_prepare(show_progress)``: work before a query (fitting curvature factors).

Scores between a test example z' and a training example z are then
``sum_c weight_c <T_c(g_c(z')), g_c(z)>``, a sum over shared token ids, so
word-level terms add up to the score. ``normalize`` divides them by the
self-products ``s(z) = sum_c weight_c <T_c(g_c(z)), g_c(z)>`` (DESIGN.md section 7):
``"cosine"`` by ``sqrt(s(z) s(z'))``, ``"train"`` by ``sqrt(s(z))``.
"""

import glob
import itertools
import operator
import os
import warnings
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
from captum.influence import TracInCPBase
from torch import Tensor
from torch.nn import Module
from torch.utils.data import DataLoader, Dataset, default_collate, Subset
from tqdm.auto import tqdm

from captum_tracin_we._core.embedding_gradients import (
    batch_token_gradients,
    check_batch,
    EmbeddingTap,
    LossFn,
    per_example_loss,
)
from captum_tracin_we._core.products import diagonal_products, influence_scores, shared_token_terms, Side
from captum_tracin_we._core.token_major import example_major, TokenMajorGradients
from captum_tracin_we._core.top_k import RunningTopK
from captum_tracin_we._core.index import (
    BuildProgress,
    CheckpointChunks,
    CorruptIndexError,
    GradientIndex,
    IndexMismatchError,
    open_index,
    ShardedIndex,
    write_index,
)
from captum_tracin_we._core.index.sharded import shard_description, write_sharded_index
from captum_tracin_we._core.token_gradients import TokenGradients
from captum_tracin_we._utils.captum_compat import (
    _format_inputs_dataset,
    _influence_route_to_helpers,
    KMostInfluentialResults,
)
from captum_tracin_we._utils import distributed
from captum_tracin_we._utils.distributed import contiguous_part
from captum_tracin_we._utils.checkpoints import (
    check_learning_rate,
    is_trainer_folder,
    load_checkpoint,
    trainer_checkpoints,
)
from captum_tracin_we._utils.fingerprints import (
    checkpoint_identity,
    data_fingerprint,
    file_state,
    loss_identity,
    model_fingerprint,
)
from captum_tracin_we._utils.loaders import (
    batch_loader, check_collate, fixed_order, OrderCheck, own_collate, reads_in_order,
)
from captum_tracin_we._utils.modules import resolve_embedding_layer
from captum_tracin_we._utils.text import shorten
from captum_tracin_we._utils.values import check_choice, check_int, is_int, plain

Batches = Union[Tuple[Any, ...], DataLoader]
# the documentation of the arguments every method shares, for their constructors' docstrings
MODEL_AND_DATA_ARGS = """
            model (torch.nn.Module): An instance of pytorch model, called as
                    `model(*batch[:-1])` and returning a tensor whose first
                    dimension is the batch. Hugging Face models can be wrapped in
                    `captum_tracin_we.HuggingFaceClassifier`.
            train_dataset (torch.utils.data.Dataset or torch.utils.data.DataLoader):
                    The training examples whose influence is computed. A `Dataset`
                    is wrapped in a `DataLoader` with batch size `batch_size` (and
                    the dataset's own `collate_fn` if it has one, e.g.
                    `captum_tracin_we.data.PaddedPerBatch`, padded per batch). Each
                    batch is a tuple `(*model_inputs, labels)`: `model(*batch[:-1])`
                    gives the output and `batch[-1]` holds the labels. The data is
                    read more than once, so every read must give the same
                    examples in the same order: a `DataLoader` with `shuffle=True`
                    (such as the one the model was trained with) is read in its
                    dataset's order instead (column `j` of the scores is
                    `dataset[j]`; `drop_last` is ignored, so every example is
                    scored), a fixed custom sampler or batch sampler is kept in the
                    order it yields, a random one is refused, and a read that
                    differs from the first (random augmentation or masking, an
                    `IterableDataset` that shuffles) raises an error.
            checkpoints (str, list[str], or Iterator): Either the directory of the
                    checkpoints (all its files, sorted; a Hugging Face `Trainer`'s
                    `output_dir` gives its `checkpoint-N` folders, by step), a list
                    of checkpoint paths, or an iterator over objects that
                    `checkpoints_load_func` can load.
            checkpoints_load_func (Callable, optional): Loads a checkpoint into
                    `model` and returns its learning rate, by which the
                    checkpoint's contribution is weighted. The default reads state
                    dicts and `Trainer` checkpoint folders safely (see
                    `captum_tracin_we.load_checkpoint`).
                    Default: load_checkpoint
            embedding_layer (torch.nn.Module or str, optional): The word-embedding
                    module, which owns the embedding matrix as its `weight` and
                    looks up integer token ids of shape `(batch, ...)` (e.g. an
                    `nn.Embedding`), or its dotted name in `model`. Every module
                    sharing its `weight` is hooked too. If None, uses
                    `model.get_input_embeddings()` when the model has it, else the
                    model's only `nn.Embedding`.
                    Default: None
            loss_fn (Callable, optional): The training loss, called as
                    `loss_fn(outputs, labels)`. The influence of an example is
                    that of its own loss: a loss with a `reduction` attribute
                    ("none", "sum" or "mean", as PyTorch's losses) is evaluated on
                    a copy with `reduction="none"` and summed over all dimensions
                    but the batch, so the scores do not depend on the reduction
                    (nor on how "mean" normalises: class weights, `ignore_index`,
                    several outputs per example). A callable without that
                    attribute must return one loss per example. If None, the model
                    output itself (summed per example) is differentiated, as in
                    Captum's `TracInCP`.
                    Default: None
            batch_size (int or None, optional): Batch size of the DataLoader made
                    from `train_dataset` if it is a `Dataset`. Each batch costs one
                    forward and one backward pass, so larger is faster.
                    Default: 1
            test_loss_fn (Callable, optional): The loss for test examples, with the
                    same rules as `loss_fn`. If None, `loss_fn` is used.
                    Default: None
"""
# one entry per argument, so that each method lists them in its own signature's order
TOKEN_ARGS = {
    "top_k_tokens": """            top_k_tokens (int, optional): TracIn-WE-TopK: keep, per example and
                    checkpoint, only the `top_k_tokens` token ids with the largest
                    gradient norm. None computes exact scores.
                    Default: None
""",
    "exclude_token_ids": """            exclude_token_ids (Iterable[int], optional): Token ids left out of
                    every product (e.g. special tokens): a list, set, tensor or
                    numpy array of integers. The `padding_idx` of an
                    `nn.Embedding`, whose gradient PyTorch sets to zero, is always
                    left out.
                    Default: None
""",
    "normalize": """            normalize (str, optional): None for raw scores; "cosine" divides
                    each score I(z, z') by sqrt(s(z) s(z')), with s the
                    self influence (`self_influence`){metric}, giving the cosine
                    of the two examples' gradients over all checkpoints: in
                    [-1, 1], and 1 for an exact duplicate, so that training
                    examples with large gradients (outliers, high loss) do not
                    rank first for every test example; "train" divides by
                    sqrt(s(z)) of the training example only (the same ranking
                    per test example, in the test example's scale). Word-level
                    terms are divided alike and still add up to the score.
                    With `aggregate=True`, the score is the cosine with the
                    summed test gradient. A negative checkpoint weight counts
                    by its magnitude in s.{cost}
                    Default: None
""",
}
# an index in one folder, or the shards of one built under torch.distributed
AnyIndex = Union[GradientIndex, ShardedIndex]
# how far rounding may push a cosine past 1, by dtype
_COSINE_ROUNDING = {torch.float64: 1e-8}
# training examples per block of scores without an index (an index's blocks are its chunks): a
# query holds n_test x (block + k) scores for a top-k, and reloads each checkpoint once per block
_BLOCK_EXAMPLES = 2048
# how scores may be normalised (DESIGN.md section 7); None keeps the raw scores
NORMALIZATIONS = (None, "cosine", "train")


class WordInfluence(NamedTuple):
    r"""
    The word-level influence of one training example on one test example: the
    token ids they share and each token's term of the influence score, summed
    over checkpoints and ordered by decreasing magnitude. ``scores.sum()`` is
    the influence score of the pair.
    """

    train_index: int
    token_ids: Tensor
    scores: Tensor


class TokenInfluenceBase(TracInCPBase):
    r"""
    The base of the token-influence methods (see the module docstring); not
    used directly. Subclasses document their arguments and override hooks.
    """


    def __init__(
        self,
        model: Module,
        train_dataset: Union[Dataset, DataLoader],
        checkpoints: Union[str, List[str], Iterator[Any]],
        checkpoints_load_func: Callable[[Module, Any], float] = load_checkpoint,
        embedding_layer: Optional[Union[Module, str]] = None,
        loss_fn: LossFn = None,
        batch_size: Union[int, None] = 1,
        test_loss_fn: LossFn = None,
        top_k_tokens: Optional[int] = None,
        exclude_token_ids: Optional[Iterable[int]] = None,
        normalize: Optional[str] = None,
    ) -> None:
        self.normalize = check_choice(normalize, "normalize", NORMALIZATIONS)
        if isinstance(checkpoints, str) and os.path.isdir(checkpoints):
            if trainer_checkpoints(checkpoints):
                checkpoints = trainer_checkpoints(checkpoints)  # not the output_dir's other files
            elif is_trainer_folder(checkpoints):
                checkpoints = [checkpoints]  # one checkpoint-N folder, not the files in it
        _check_checkpoints(checkpoints, checkpoints_load_func)
        if isinstance(batch_size, int) and not isinstance(train_dataset, DataLoader) and own_collate(
            train_dataset, "train_dataset"
        ) is not None:
            train_dataset = batch_loader(train_dataset, batch_size, "train_dataset")  # e.g. padded per batch
        TracInCPBase.__init__(
            self,
            model,
            train_dataset,
            checkpoints,
            checkpoints_load_func,
            loss_fn,
            batch_size,
            test_loss_fn,
        )
        # every checkpoint must see the same example in the same column
        self.train_dataloader = fixed_order(self.train_dataloader, "train_dataset")
        check_collate(self.train_dataloader, "train_dataset")
        self.train_dataloader_len = _length(self.train_dataloader)
        self._train_order = OrderCheck("train_dataset")
        if self.train_dataloader_len == 0:
            raise ValueError(
                f"`train_dataset` is empty: {type(self).__name__} needs at least one "
                "training example."
            )
        self.embedding_layer, self.embedding_layer_name = resolve_embedding_layer(
            model, embedding_layer
        )
        if top_k_tokens is not None:
            check_int(top_k_tokens, "top_k_tokens", alternative=" (or None for exact scores)")
        self.top_k_tokens = top_k_tokens
        self._tap = EmbeddingTap(model, self.embedding_layer, self.embedding_layer_name)
        # per-example copies of the losses, by argument name
        self._losses = {"loss_fn": per_example_loss(loss_fn, "loss_fn")}
        self._test_loss_name = "loss_fn" if test_loss_fn is None else "test_loss_fn"
        if test_loss_fn is not None:
            self._losses["test_loss_fn"] = per_example_loss(test_loss_fn, "test_loss_fn")
        self.excluded_token_ids = _excluded_token_ids(self._tap.modules, exclude_token_ids)
        self._loss_identity = loss_identity(loss_fn)
        self.index: Optional[AnyIndex] = None
        self._index_checkpoints: List[Any] = []  # the checkpoint files' states when the index was opened
        self._checkpoint_context = ""  # where gradients are computed, for error messages
        if model.training:
            warnings.warn(
                "`model` is in training mode: dropout makes influence scores random "
                "and BatchNorm mixes the examples of a batch. Call `model.eval()` "
                "before computing influence.",
                stacklevel=2,
            )

    def influence(  # type: ignore[override]
        self,
        inputs: Batches,
        k: Optional[int] = None,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> Union[Tensor, KMostInfluentialResults]:
        r"""
        Influence scores of the training examples on the test examples in
        `inputs`, or their `k` most influential training examples.

        Args:

            inputs (tuple or DataLoader): A single batch `(*model_inputs, labels)`
                    or a `DataLoader` yielding such batches, read once and kept
                    (a shuffling `DataLoader` in its dataset's order, as
                    `train_dataset`). A single batch is one forward and backward
                    pass, as in Captum: pass many test examples as a `DataLoader`
                    of a batch size the model runs well (e.g. the training
                    batch size). On a CPU, 1,024 sentences in one batch took
                    twice as long as in batches of 32, and their activations
                    set the query's peak memory.
            k (int, optional): If None, return all scores. Otherwise return, per
                    test example, the `k` proponents (highest scores) or opponents
                    (lowest scores). A Python, numpy or 0-d tensor integer.
                    Default: None
            proponents (bool, optional): Proponents if True, opponents otherwise,
                    when `k` is given.
                    Default: True
            show_progress (bool, optional): Show a progress bar over checkpoints
                    and training batches.
                    Default: False
            aggregate (bool, optional): Score each training example against the
                    *sum* of the test examples' losses: one row instead of one per
                    test example.
                    Default: False

        Returns:
            If `k` is None, a tensor of shape `(n_test, n_train)` (or
            `(1, n_train)` with `aggregate`) whose entry `[i, j]` is the influence
            of training example `j` on test example `i`. Otherwise a
            `KMostInfluentialResults(indices, influence_scores)` of shape
            `(n_test, k)`, sorted from most to least influential.
        """
        if inputs is None:
            raise ValueError(
                "`inputs` is required; for self influence use `self_influence`."
            )
        if k is not None:  # numpy and 0-d tensor integers too
            k = check_int(k, "k", alternative=" or None")
        return _influence_route_to_helpers(
            self, inputs, k, proponents, show_progress=show_progress, aggregate=aggregate
        )

    @property
    def method_name(self) -> str:
        r"""The method and its options, as figures and tables name it, e.g. "TracInWE (cosine)"."""
        options = self._name_options() + ([self.normalize] if self.normalize else [])
        return type(self).__name__ + (f" ({', '.join(options)})" if options else "")

    def _name_options(self) -> List[str]:
        return [] if self.top_k_tokens is None else [f"top {self.top_k_tokens} tokens"]

    # -- hooks: what a method changes ---------------------------------------

    def _prepare(self, show_progress: bool) -> None:
        r"""Work a query needs first (e.g. fitting curvature factors); none for TracIn."""

    def _checkpoint_weight(self, c: int, learning_rate: float) -> float:
        r"""The weight of checkpoint `c` in every score: its learning rate, as in TracIn."""
        return learning_rate

    def _transform_test(self, c: int, test: TokenGradients) -> TokenGradients:
        r"""
        The test rows at checkpoint `c` as they enter the products with the
        training rows (a preconditioner); the identity for TracIn. Training
        rows are never transformed in the cross products (only for their own
        self-products), so an index of them serves every method.
        """
        return test

    # -- queries -----------------------------------------------------------

    def _weighted_checkpoints(self) -> Iterator[Tuple[int, float]]:
        r"""Loads each checkpoint in turn (checked against an index in use) and yields its weight."""
        for c, learning_rate in enumerate(self._load_checkpoints()):
            self._index_rate(c, learning_rate)
            yield c, self._checkpoint_weight(c, learning_rate)

    def _self_products(self, c: int, rows: TokenGradients) -> Tensor:
        r"""Per example, `<T_c(g), g>` at checkpoint `c` (the squared norm for TracIn)."""
        return diagonal_products(self._transform_test(c, rows), rows)

    def _query(
        self, c: int, test_batches: List[Any], aggregate: bool = False
    ) -> Tuple[TokenGradients, Optional[Tensor]]:
        r"""
        The test rows at the loaded checkpoint `c` as they meet the training
        rows (summed over the test examples with `aggregate`, transformed and in
        the index's space), and, when normalising, the test self-products.
        """
        test = self._dataset_gradients(test_batches)
        if aggregate:
            test = test.summed()
        query = self._as_indexed(self._transform_test(c, test))
        return query, diagonal_products(query, self._as_indexed(test)) if self.normalize else None

    def _influence(
        self, inputs: Batches, show_progress: bool = False, aggregate: bool = False
    ) -> Tensor:
        blocks = list(self._score_blocks(inputs, show_progress, aggregate))
        if self._my_shard() is not None:  # every process scored its shard: gather the columns
            device = self._device()
            parts = distributed.gathered([(start, block.cpu()) for start, block in blocks])
            blocks = sorted(((start, block.to(device)) for part in parts for start, block in part),
                            key=lambda item: item[0])
        return torch.cat([block for _, block in blocks], dim=1)

    def _score_blocks(
        self, inputs: Batches, show_progress: bool = False, aggregate: bool = False
    ) -> Iterator[Tuple[int, Tensor]]:
        r"""
        The scores block of training examples by block, in order: ``(first
        index, (n_test, block) scores)``, each summed over checkpoints and
        normalised, so that a top-k never holds the whole matrix. The test rows
        of every checkpoint are computed first (with the model at that
        checkpoint: a preconditioner may need it) and kept; the training side is
        then read once, each block at every checkpoint (an index's chunks;
        without one, the block's batches, the model reloaded per checkpoint
        only when there are several).
        """
        test_batches = _test_batches(inputs)
        self._prepare(show_progress)
        queries, test_self = [], _Sum()
        for c, weight in self._weighted_checkpoints():
            query, query_self = self._query(c, test_batches, aggregate)
            # the query meets every training block: its rows grouped by token once (the copy replaces them),
            # read in place by each join
            query = TokenMajorGradients.of(query)
            queries.append((c, weight, query))
            if self.normalize:
                # |weight|: a negative weight (subtracting a checkpoint) still gives a norm
                test_self.add(query_self * abs(weight))
        stored = self._stored_train_self_sum(queries) if self.normalize else None
        loaded = [queries[-1][0]]  # the checkpoint in the model now

        def at_checkpoint(c: int) -> None:
            if loaded[0] != c:
                self._load(c, self.checkpoints[c])
                loaded[0] = c

        with self._progress("influence", show_progress, self._index_blocks()) as bar:
            for start, rows_at in self._train_blocks(bar, at_checkpoint):
                scores, train_self = _Sum(), _Sum()
                for c, weight, query in queries:
                    train = rows_at(c)
                    scores.add(influence_scores(query, train) * weight)
                    if self.normalize and stored is None:  # (normalize refuses ASTRA: no model needed)
                        train_self.add(self._self_products(c, example_major(train).scaled()) * abs(weight))
                block = scores.total
                if self.normalize:
                    block_self = train_self.total if stored is None else stored[start : start + block.shape[1]]
                    block = self._normalise(block, test_self.total, block_self)
                yield start, _finite(block, "influence")

    def _train_blocks(
        self, bar: tqdm, at_checkpoint: Callable[[int], None]
    ) -> Iterator[Tuple[int, Callable[[int], Side]]]:
        r"""
        The training side in blocks of consecutive examples: ``(first index,
        rows_at)``, where ``rows_at(c)`` gives the block's token gradients at
        checkpoint `c` (loading it with `at_checkpoint` when computed).
        """
        if self.index is not None:
            counts = self.index.manifest["chunks"][0]
            starts = [0, *itertools.accumulate(counts)]  # each chunk's first example
            shard = self._my_shard()
            for k in range(len(counts)) if shard is None else self.index.shard_chunks(shard):  # type: ignore[union-attr]
                def rows_at(c: int, k: int = k) -> Side:
                    bar.update(1)
                    # as stored, grouped by token id: the join reads each shared token's rows in place
                    return self.index.chunk_by_token(c, k, lazy=True).to(self._device())  # type: ignore[union-attr]
                yield starts[k], rows_at
            return

        def gradients(batches: List[Tuple[range, Any]]) -> Callable[[int], TokenGradients]:
            def rows_at(c: int) -> TokenGradients:
                at_checkpoint(c)
                bar.update(len(batches))
                return TokenGradients.concat([
                    self._token_gradients(batch, "train_dataset", indices=indices) for indices, batch in batches
                ])
            return rows_at

        if not self._train_order.complete:
            # the data alone, read once first: the pass below, which scores each batch at every
            # checkpoint, is then checked against it (random augmentation, an unordered stream)
            self._train_order.read_through(self.train_dataloader)
        block: List[Tuple[range, Any]] = []
        with tqdm(disable=True) as reading:  # the bar counts batches as they are scored
            batches = self._checked_batches(
                self.train_dataloader, self._train_order, "train_dataset", reading, " when read again"
            )
            for indices, batch in batches:
                block.append((indices, batch))
                if block[-1][0].stop - block[0][0].start >= _BLOCK_EXAMPLES:
                    yield block[0][0].start, gradients(block)
                    block = []
        if block:
            yield block[0][0].start, gradients(block)

    def _stored_train_self_sum(self, queries: List[Tuple[int, float, Side]]) -> Optional[Tensor]:
        r"""The training self-products summed over checkpoints, if an index knows them (see `_stored_train_self`)."""
        total = _Sum()
        for c, weight, _ in queries:
            stored = self._stored_train_self(c)
            if stored is None:
                return None
            total.add(stored * abs(weight))
        return total.total

    def _normalise(
        self, scores: Tensor, test_self: Optional[Tensor], train_self: Optional[Tensor]
    ) -> Tensor:
        r"""
        `scores` (n_test, n_train) divided as `normalize` says by the test and
        training self-products summed over checkpoints (DESIGN.md section 7).
        """
        if self.normalize is None:
            return scores
        normalised = scores * self._normaliser_inverses(test_self, train_self, scores.dtype)
        if self.normalize != "cosine":
            return normalised
        # a cosine is at most 1 in magnitude (Cauchy-Schwarz): rounding may push it a little past,
        # anything more means the normalisers are not those of the rows scored
        excess = float(normalised.abs().max()) - 1.0 if normalised.numel() else 0.0
        if excess > _COSINE_ROUNDING.get(self._rounding_dtype(scores.dtype), 1e-3):
            raise RuntimeError(
                f"{type(self).__name__}: a cosine score is {1 + excess:.6g}, beyond rounding: the "
                "self-products do not belong to the rows scored (a bug; please report it)."
            )
        return normalised.clamp(-1.0, 1.0)

    def _rounding_dtype(self, dtype: torch.dtype) -> torch.dtype:
        r"""The precision the scores were computed in: an index that rounds or projects its rows keeps float32's."""
        if self.index is None:
            return dtype
        manifest = self.index.manifest
        exact = manifest.get("storage_dtype") in (None, str(dtype)) and not manifest.get("projection_dim")
        return dtype if exact else torch.float32

    def _normaliser_inverses(
        self, test_self: Optional[Tensor], train_self: Optional[Tensor], dtype: torch.dtype
    ) -> Tensor:
        r"""
        Per (test, train) pair, 1 / its normaliser: `1 / sqrt(s(z) s(z'))` for
        "cosine", `1 / sqrt(s(z))` for "train"; 0 for a pair with a zero
        self-product (whose raw score is 0 too).
        """
        assert test_self is not None and train_self is not None
        denominator = train_self.to(dtype).clamp(min=0).sqrt().unsqueeze(0)
        if self.normalize == "cosine":
            denominator = test_self.to(dtype).clamp(min=0).sqrt().unsqueeze(1) * denominator
        else:
            denominator = denominator.expand(test_self.numel(), -1)
        positive = denominator > 0
        return torch.where(positive, 1.0 / denominator.where(positive, 1.0), 0.0)

    def _get_k_most_influential(
        self,
        inputs: Batches,
        k: int = 5,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> KMostInfluentialResults:
        top = RunningTopK(k, proponents)
        for start, block in self._score_blocks(inputs, show_progress, aggregate):
            top.add(block, start)
        if self._my_shard() is not None:  # merge every process's top-k of its shard
            device, merged = self._device(), RunningTopK(k, proponents)
            for indices, values in distributed.gathered(tuple(t.cpu() for t in top.result())):
                merged.add(values.to(device), indices.to(device))
            top = merged
        return KMostInfluentialResults(*top.result())

    def self_influence(
        self,
        inputs: Optional[Batches] = None,
        show_progress: bool = False,
        outer_loop_by_checkpoints: bool = False,
    ) -> Tensor:
        r"""
        Self influence scores, `s(z) = sum_c weight_c <T_c(g_c(z)), g_c(z)>`
        (for TracIn `sum_c lr_c * ||g_c(z)||^2`), of the examples in `inputs`,
        or of the training examples if `inputs` is None (read from the index,
        without running the model, when one is in use). They are never
        normalised: they are the normalisers of the other scores (the cosine of
        an example with itself is 1).

        Args:

            inputs (tuple or DataLoader, optional): A single batch
                    `(*model_inputs, labels)` or a `DataLoader` yielding such
                    batches (a shuffling `DataLoader` is read in its dataset's order). If
                    None, the training dataset.
                    Default: None
            show_progress (bool, optional): Show a progress bar over checkpoints
                    and batches.
                    Default: False
            outer_loop_by_checkpoints (bool, optional): Accepted for drop-in
                    compatibility with Captum's `TracInCP`, and ignored: the
                    loop is always over checkpoints outside and batches inside,
                    with one forward and backward pass per batch and checkpoint
                    either way, so the choice changes neither scores nor cost.
                    Default: False

        Returns:
            self_influence_scores (Tensor): a 1D tensor, one score per example.
        """
        from_index = inputs is None and self.index is not None
        data_name = "train_dataset" if inputs is None else "inputs"
        if inputs is not None:
            loader = _inputs_loader(inputs)
            order = OrderCheck("inputs")
        self._prepare(show_progress)
        steps = self.index.num_chunks(0) if from_index else _length(  # type: ignore[union-attr]
            self.train_dataloader if inputs is None else loader
        )
        total = _Sum()
        with self._progress("self influence", show_progress, steps) as bar:
            for c, weight in self._weighted_checkpoints():
                if from_index:
                    stored = self._stored_train_self(c)
                    products = stored if stored is not None else torch.cat([
                        self._self_products(c, chunk.to(self._device()))
                        for chunk in _counted(self.index.chunks(c), bar)  # type: ignore[union-attr]
                    ])
                else:
                    batches = self._train_batches(bar) if inputs is None else self._checked_batches(
                        loader, order, "inputs", bar
                    )
                    products = torch.cat([
                        self._self_products(c, self._token_gradients(batch, data_name, indices=indices))
                        for indices, batch in batches
                    ])
                total.add(products * weight)
        return _finite(total.total, "self influence")

    def word_influence(
        self,
        inputs: Batches,
        train_indices: Union[Sequence[int], Sequence[Sequence[int]], Tensor],
        show_progress: bool = False,
    ) -> List[List[WordInfluence]]:
        r"""
        Word-level influence: for each test example and each given training
        example, the token ids they share and each token's term of the influence
        score (summed over checkpoints), ordered by decreasing magnitude. The
        terms of a pair add up to its `influence` score.

        Only the requested training examples are run: as batches of their own
        when `train_dataset` is indexable and read in order, else by running
        the training batches that hold them.

        Args:

            inputs (tuple or DataLoader): A single batch `(*model_inputs, labels)`
                    or a `DataLoader` yielding such batches, read once and kept
                    (a shuffling `DataLoader` in its dataset's order, as
                    `train_dataset`).
            train_indices (list[int], list[list[int]], Tensor or numpy array):
                    Indices in the training dataset (Python, numpy or 0-d tensor
                    integers). A flat list (or 1D tensor) is used for every
                    test example; a list of lists (or 2D tensor, such as
                    `influence(inputs, k=5).indices`) gives one list per test
                    example.
            show_progress (bool, optional): Show a progress bar over checkpoints
                    and training batches.
                    Default: False

        Returns:
            A list with one entry per test example, each a list of `WordInfluence
            (train_index, token_ids, scores)`, one per requested training index.
        """
        shared, per_test = _parse_train_indices(train_indices)
        wanted = sorted(set(shared if per_test is None else sum(per_test, [])))
        if not wanted:
            raise ValueError("`train_indices` is empty: give at least one training index.")
        test_batches = _test_batches(inputs)
        self._prepare(show_progress)
        terms: List[Tuple[Tensor, ...]] = []
        test_self, train_self = _Sum(), _Sum()
        n_test = 0
        selected = None if self.index is not None else self._selected_train_loader(wanted)
        n_batches = -1 if selected is None else len(selected.loader)
        with self._progress("word influence", show_progress, n_batches) as bar:
            for c, weight in self._weighted_checkpoints():
                query, query_self = self._query(c, test_batches)
                n_test = query.num_examples
                if self.index is not None:
                    if wanted[-1] >= self.index.num_examples:
                        _raise_train_index_error(wanted[-1], self.index.num_examples)
                    train = self.index.select(c, wanted).to(self._device())
                else:
                    train = self._selected_train_gradients(wanted, selected, bar)
                t = shared_token_terms(query, train)
                terms.append((t.test_example, t.train_example, t.token_id, t.score * weight))
                if self.normalize:
                    test_self.add(query_self * abs(weight))
                    train_self.add(self._self_products(c, train) * abs(weight))
        if per_test is not None and len(per_test) != n_test:
            raise ValueError(
                f"`train_indices` has {len(per_test)} rows but `inputs` has {n_test} "
                "test examples; give one row per test example, or a flat list."
            )
        rows = [shared] * n_test if per_test is None else per_test
        # each pair's terms are divided by the pair's normaliser, so they still add up to its score
        dtype, device = terms[0][3].dtype, terms[0][3].device
        factors = torch.ones(n_test, len(wanted), dtype=dtype, device=device) if not self.normalize \
            else self._normaliser_inverses(test_self.total, train_self.total, dtype)
        return _group_terms(terms, rows, wanted, factors)

    # -- the training-gradient index -----------------------------------------

    def build_index(
        self,
        path: str,
        show_progress: bool = False,
        dtype: Optional[torch.dtype] = None,
        projection_dim: Optional[int] = None,
        seed: int = 0,
        chunk_size: int = 4096,
        resume: bool = True,
    ) -> AnyIndex:
        r"""
        Computes the training token gradients at every checkpoint once, writes
        them to an index folder at `path` (see `captum_tracin_we._core.
        index.format` for the format: numpy arrays and a JSON manifest, no
        pickle), and uses it from then on: `influence` and its top-k then run
        only the test examples through the model and read the training side
        from the index, with the same scores as without it.

        The folder appears only when complete: a build in progress lives in a
        hidden `.<name>.partial` folder beside it, which never loads as an
        index, and from which an interrupted build resumes (each finished chunk
        is flushed to disk before it is logged, and checked by sha256 before it
        is kept; a partial build made with another model forward or loss is
        started over). The index also keeps, at every checkpoint, the exact
        gradients of 16 training examples, which `load_index` recomputes. An existing index
        at `path` is replaced once the new one is complete. A second build of
        the same `path` while one runs raises `IndexBuildInProgressError`.

        Under ``torchrun --nproc-per-node N`` (the process group is started
        from its environment if the script has not: NCCL for a model on a GPU,
        gloo otherwise), every process runs this with the same arguments: each
        computes and writes the shard of a contiguous part of the training
        batches (``path/shard-0000r``, resumable like any index), and once all
        are complete rank 0 writes the top-level manifest. Queries then score
        each process's shard and gather the results, the same on every process
        and equal to a single process's.

        Args:

            path (str): The index folder to write.
            show_progress (bool, optional): Show a progress bar over
                    checkpoints and training batches. Default: False
            dtype (torch.dtype, optional): Storage dtype of the gradient rows,
                    e.g. `torch.float16` to halve the index: each row is stored
                    divided by its largest entry, with that scale in float32
                    beside it, so entries keep about 3 significant digits
                    relative to their row's largest, however small the
                    gradients (scores are computed in the test's dtype). None
                    keeps the model's dtype, which is exact.
                    Default: None
            projection_dim (int, optional): Store each d-dim gradient row
                    multiplied by a seeded Gaussian `(d, projection_dim)` matrix
                    scaled by `1 / sqrt(projection_dim)`; test rows are projected
                    the same way at query time. Each token's term `<a, b>` is then
                    an unbiased estimate whose standard deviation is at most
                    `|a| |b| sqrt(2 / projection_dim)`. None (exact) stores the
                    rows as they are. Default: None
            seed (int, optional): Seed of the projection matrix. Default: 0
            chunk_size (int, optional): Training examples per chunk file (whole
                    batches; the last chunk may be smaller). A build holds one
                    chunk of gradients in memory at a time. Default: 4096
            resume (bool, optional): If a build of the same index (same model,
                    checkpoints, data and options) was interrupted, keep the
                    chunks it finished and compute only the rest. False starts
                    over. Default: True

        Returns:
            index (GradientIndex or ShardedIndex): The index, also kept as `self.index`.
        """
        check_path(path)
        dim = self._embedding_dim()
        projection = _check_projection(projection_dim, dim)
        storage = self.embedding_layer.weight.dtype if dtype is None else dtype
        if storage not in (torch.float16, torch.float32, torch.float64):
            raise ValueError(
                f"`dtype` must be torch.float16, float32 or float64 (None: the embedding's "
                f"dtype), got {storage!r}; numpy cannot store it."
            )
        check_int(chunk_size, "chunk_size")
        check_int(seed, "seed", minimum=0)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"`path` {path!r} is a file; give a folder for the index.")
        matrix = None if projection is None else projection_matrix(dim, projection, seed)

        def stored(gradients: TokenGradients) -> TokenGradients:
            r"""The rows to store, projected if asked (the index casts them to `dtype`)."""
            return gradients if matrix is None else gradients.project(matrix)

        rank, processes = distributed.world(self._device())
        part = self._shard_batches(rank, processes)

        def chunks(bar: tqdm, skip: int) -> Iterator[TokenGradients]:
            r"""
            Chunks of whole batches (of this process's `part`), >= chunk_size
            examples; the first `skip` are not computed.
            """
            parts: List[TokenGradients] = []
            k, count = 0, 0
            for position, (indices, batch) in enumerate(self._train_batches(bar)):
                if part is not None and position not in part:
                    continue  # another process's batch: read, for the order check, not computed
                if k >= skip:
                    parts.append(stored(self._token_gradients(batch, "train_dataset", indices=indices)))
                count += len(indices)
                if count >= chunk_size:
                    if k >= skip:
                        yield TokenGradients.concat(parts)
                    k, count, parts = k + 1, 0, []
            if count and k >= skip:
                yield TokenGradients.concat(parts)

        description = self._index_description()
        probes = self._probe_indices(description["training_data"]["examples"])

        def per_checkpoint(progress: BuildProgress) -> Iterator[CheckpointChunks]:
            r"""Every checkpoint with its probe (to check kept chunks) and the chunks still to write."""
            with self._progress("the index", show_progress and rank == 0) as bar:
                for c, checkpoint in enumerate(self.checkpoints):
                    rate = self._load(c, checkpoint)
                    if c in progress.complete:
                        bar.update(self.train_dataloader_len or 0)
                        yield c, rate, self._probe_gradients(probes), iter(())
                    else:
                        yield c, rate, self._probe_gradients(probes), chunks(bar, progress.chunks_done(c))

        description.update({
            "projection_dim": projection,
            "projection_seed": seed if projection else None,
            "storage_dtype": None if dtype is None else str(dtype),
            "chunk_size": chunk_size,
            "probe_indices": probes,
        })
        states = [file_state(checkpoint) for checkpoint in self.checkpoints]

        def write(folder: str, what: Dict[str, Any]) -> GradientIndex:
            return write_index(
                folder, what, per_checkpoint, resume,
                same_probe=lambda logged, fresh: self._probe_difference(logged, fresh) is None,
            )

        if part is None:
            self.index = write(path, description)
        else:  # under torchrun: each process writes its shard of the batches
            shard = shard_description(description, rank, processes, part)

            def write_shard(folder: str) -> GradientIndex:
                if resume and os.path.isdir(folder):  # finished before the build was interrupted: kept
                    try:
                        finished = open_index(folder, shard, True, type(self).__name__)
                        self._check_probes(finished)
                        return finished
                    except (IndexMismatchError, CorruptIndexError, FileNotFoundError):
                        pass
                return write(folder, shard)

            self.index = write_sharded_index(path, description, write_shard, resume, rank, processes)
        self._index_checkpoints = states
        return self.index

    def _shard_batches(self, rank: int, processes: int) -> Optional[range]:
        r"""The training batches this process computes under torchrun (None alone): a contiguous part."""
        if processes == 1:
            return None
        if self.train_dataloader_len is None or self.train_dataloader_len < processes:
            raise ValueError(
                f"A sharded index over {processes} processes needs a training loader with a length "
                f"and at least {processes} batches (one per process), got "
                f"{self.train_dataloader_len}: use a map-style `train_dataset`, a smaller "
                "`batch_size`, or fewer processes."
            )
        return contiguous_part(self.train_dataloader_len, rank, processes)

    def _my_shard(self) -> Optional[int]:
        r"""
        Under torchrun with a sharded index of one shard per process, this
        process's shard, which it alone scores (the results are gathered);
        else None: this process scores every training example.
        """
        if not isinstance(self.index, ShardedIndex):
            return None
        rank, processes = distributed.world(self._device())
        return rank if processes > 1 and processes == len(self.index.shards) else None

    def load_index(
        self, path: str, verify: bool = True, check_gradients: bool = True
    ) -> AnyIndex:
        r"""
        Opens an index written by `build_index` and uses it from then on. A
        sharded index (built under torchrun) opens as one index; under torchrun
        with one process per shard, each process scores its shard.

        Its manifest must be intact (checksum, fields, the files of its chunks)
        and every file must lie in the folder with its recorded size, shape and
        dtype, else `CorruptIndexError` says what is wrong. It must have been
        built from the same model architecture, checkpoint files (compared by
        content), training data (content, order and batch size), embedding
        shape, loss settings and options (`top_k_tokens`, `exclude_token_ids`),
        else `IndexMismatchError` says which differs.

        Names and shapes cannot tell two forward passes or two loss functions
        apart (a lambda, a `functools.partial`, a model whose `forward` changed),
        so with `check_gradients` each checkpoint is loaded and the gradients
        of 16 training examples (spread over the data where single examples can
        be read on their own, else the first), which the index keeps exactly, are
        recomputed with this model and `loss_fn`: an `IndexMismatchError` names
        the checkpoint where they differ beyond float tolerance, and by how much.
        That costs one checkpoint load and a batch of 16 examples per checkpoint.

        Args:

            path (str): The index folder.
            verify (bool, optional): Check every array file's sha256 (reads the
                    whole index once). Default: True
            check_gradients (bool, optional): Recompute the stored gradients of
                    16 training examples at every checkpoint and compare.
                    Default: True

        Returns:
            index (GradientIndex or ShardedIndex): The index, also kept as `self.index`.
        """
        check_path(path)
        states = [file_state(checkpoint) for checkpoint in self.checkpoints]
        index = open_index(path, self._index_description(), verify, type(self).__name__)
        if check_gradients:
            self._check_probes(index)
        self.index, self._index_checkpoints = index, states
        return self.index

    def _check_probes(self, index: GradientIndex) -> None:
        r"""Refuses `index` if the gradients it keeps differ from this model's and loss's."""
        self._check_stored_gradients(
            index.manifest["probe_indices"], index.probe, f"the index at {index.path!r}",
            "Rebuild it with `build_index`", index,
        )

    def _check_stored_gradients(
        self,
        probes: List[int],
        stored: Callable[[int], TokenGradients],
        where: str,
        fix: str,
        index: Optional[GradientIndex] = None,
    ) -> None:
        r"""
        Refuses what `where` names (an index, saved factors) if the probe
        gradients it stored, `stored(c)`, differ at some checkpoint c from those
        of this model and loss; names and shapes cannot tell two forwards or two
        loss functions apart. With `index`, also its learning rates.
        """
        for c, learning_rate in enumerate(self._load_checkpoints()):
            self._index_rate(c, learning_rate, index)
            difference = self._probe_difference(stored(c), self._probe_gradients(probes))
            if difference is not None:
                raise IndexMismatchError(
                    f"At checkpoint {c}, the training gradients recomputed with this model and "
                    f"`loss_fn` {difference} those stored in {where}: it was made with another "
                    f"model forward or loss function. {fix}, or pass the model and `loss_fn` it "
                    "was made from."
                )

    def _probe_difference(self, stored: TokenGradients, fresh: TokenGradients) -> Optional[str]:
        r"""None if two computations of the probe gradients agree to float tolerance; else how they differ."""
        stored = stored.to(self._device())
        same_rows = torch.equal(stored.offsets, fresh.offsets) and torch.equal(
            stored.token_ids, fresh.token_ids
        )
        if not same_rows:
            return "hold other token ids than"
        expected, actual = stored.grads.double(), fresh.grads.double()
        if not expected.numel():
            return None
        scale = float(expected.abs().max())
        error = float((actual - expected).abs().max())
        relative = error / scale if scale > 0 else error
        tolerance = _PROBE_TOLERANCE.get(fresh.grads.dtype, 5e-2)
        if relative <= tolerance:
            return None
        return (
            f"differ by {relative:.3g} (relative to their largest entry; the tolerance is "
            f"{tolerance:.0e}) from"
        )

    def _probe_indices(self, num_examples: int) -> List[int]:
        r"""
        The training examples whose exact gradients an index keeps: spread over
        the training set where single examples can be read cheaply, else the first.
        """
        count = min(PROBE_EXAMPLES, num_examples)
        if not self._reads_single_examples():
            return list(range(count))
        return sorted({round(i * (num_examples - 1) / max(1, count - 1)) for i in range(count)})

    def _probe_gradients(self, indices: List[int]) -> TokenGradients:
        r"""
        The token gradients of the training examples `indices` at the loaded
        checkpoint, all tokens kept but the excluded ones (no top-k).
        """
        selected = self._selected_train_loader(indices)
        with self._progress("probe gradients", False) as bar:
            return self._selected_train_gradients(indices, selected, bar, exact=True)

    def _index_description(self) -> Dict[str, Any]:
        _check_checkpoint_files(self.checkpoints, self.checkpoints_load_func)
        return {
            "model_fingerprint": model_fingerprint(self.model),
            "embedding_layer": self.embedding_layer_name,
            "embedding_shape": list(self.embedding_layer.weight.shape)
            if hasattr(self.embedding_layer, "weight") else None,
            "checkpoints": [checkpoint_identity(c) for c in self.checkpoints],
            # the first pass over the data is the one later passes are checked against
            "training_data": data_fingerprint(
                self._train_order.checked(self.train_dataloader, " when read for the index"),
                self.train_dataloader.batch_size,
            ),
            "loss_fn": self._loss_identity,
            "top_k_tokens": self.top_k_tokens,
            "exclude_token_ids": sorted(int(t) for t in self.excluded_token_ids.tolist()),
        }

    def _embedding_dim(self) -> int:
        weight = getattr(self.embedding_layer, "weight", None)
        if weight is None:
            raise ValueError("`build_index` needs an embedding module with a `weight`.")
        return int(weight.shape[1])

    def _as_indexed(self, test: TokenGradients) -> TokenGradients:
        r"""Test gradients in the index's space (projected like its rows)."""
        if self.index is None or not self.index.manifest.get("projection_dim"):
            return test
        manifest = self.index.manifest
        matrix = projection_matrix(
            self._embedding_dim(), manifest["projection_dim"], manifest["projection_seed"]
        )
        return test.project(matrix.to(test.grads.dtype))

    def _device(self) -> torch.device:
        return self.embedding_layer.weight.device

    def _index_rate(
        self, c: int, learning_rate: float, index: Optional[GradientIndex] = None
    ) -> None:
        r"""
        Checks that checkpoint `c` loads with the learning rate the index was
        built with and, at a query, that its file has not changed since.
        """
        if index is None and self.index is not None:
            index = self.index
            if file_state(self.checkpoints[c]) != self._index_checkpoints[c]:
                raise IndexMismatchError(
                    f"Checkpoint {c} ({_short_repr(self.checkpoints[c])}) changed since the index "
                    "was opened, which holds the training gradients of its old weights: rebuild "
                    "the index with `build_index`, or restore the checkpoint."
                )
        if index is not None and index.learning_rates[c] != learning_rate:
            raise IndexMismatchError(
                f"Checkpoint {c} loads with learning rate {learning_rate}, but the index "
                f"was built with {index.learning_rates[c]}: `checkpoints_load_func` "
                "differs from the build's; rebuild the index or pass the same loader."
            )

    def _stored_train_self(self, c: int) -> Optional[Tensor]:
        r"""
        The training self-products at checkpoint `c` if known without reading
        the rows: an index records squared norms, which are TracIn's.
        """
        if self.index is None or type(self)._transform_test is not TokenInfluenceBase._transform_test:
            return None  # the stored norms are of the rows, not of transformed rows
        return self.index.squared_norms(c).to(self._device(), self.embedding_layer.weight.dtype)

    def _index_blocks(self) -> Optional[int]:
        r"""Progress-bar steps per checkpoint: index chunks (this process's), or -1 for batches."""
        if self.index is None:
            return -1
        shard = self._my_shard()
        return self.index.num_chunks(0) if shard is None else len(self.index.shard_chunks(shard))  # type: ignore[union-attr]

    # -- helpers -----------------------------------------------------------

    def _progress(
        self, what: str, show_progress: bool, n_batches: Optional[int] = -1
    ) -> tqdm:
        if n_batches == -1:
            n_batches = self.train_dataloader_len
        total = None if n_batches is None else n_batches * len(self.checkpoints)
        return tqdm(
            desc=f"Using {self.get_name()} to compute {what} (checkpoints x batches)",
            total=total,
            disable=not show_progress,
        )

    def _load(self, c: int, checkpoint: Any) -> float:
        r"""Loads checkpoint `c` into the model; its learning rate, checked."""
        self._checkpoint_context = f" at checkpoint {c} ({_short_repr(checkpoint)})"
        rate = self.checkpoints_load_func(self.model, checkpoint)
        return check_learning_rate(
            rate,
            f"The learning rate that `checkpoints_load_func` returned for checkpoint {c} "
            f"({_short_repr(checkpoint)})",
        )

    def _load_checkpoints(self) -> Iterator[float]:
        r"""Loads each checkpoint in turn and yields its learning rate."""
        for c, checkpoint in enumerate(self.checkpoints):
            yield self._load(c, checkpoint)

    def _train_batches(self, bar: tqdm) -> Iterator[Tuple[range, Any]]:
        r"""
        The training batches, each with the indices of its examples, checked to
        be the same as on the first pass (see `OrderCheck`).
        """
        return self._checked_batches(self.train_dataloader, self._train_order, "train_dataset", bar)

    def _checked_batches(
        self, loader: DataLoader, order: OrderCheck, data_name: str, bar: tqdm, context: Optional[str] = None
    ) -> Iterator[Tuple[range, Any]]:
        r"""
        The batches of `loader`, each with the indices of its examples, checked by
        `order`; `context` says where for an error (default: the checkpoint loaded).
        """
        batches = _nonempty(_counted(loader, bar), data_name)
        return _indexed(order.checked(batches, self._checkpoint_context if context is None else context))

    def _token_gradients(
        self,
        batch: Any,
        data_name: str,
        test: bool = False,
        indices: Optional[Sequence[int]] = None,
        exact: bool = False,
        loss: LossFn = None,
        on_positions: Optional[Callable[[Tensor, Tensor], None]] = None,
    ) -> TokenGradients:
        r"""
        Test examples use the test loss; self influence, as in Captum, uses
        `loss_fn` for any examples; `loss`, if given, replaces both. `data_name`
        names the batch's argument, `indices` the examples' positions in it (for
        error messages). `exact` keeps every token (no `top_k_tokens`).
        `on_positions` sees the gradients at the scored positions (see
        `batch_token_gradients`).
        """
        name = self._test_loss_name if test else "loss_fn"
        gradients = batch_token_gradients(
            self.model,
            self._tap,
            batch,
            self._losses[name] if loss is None else loss,
            name,
            data_name,
            self.excluded_token_ids,
            indices,
            self._checkpoint_context,
            on_positions,
        )
        if self.top_k_tokens is not None and not exact:
            gradients = gradients.top_k_tokens(self.top_k_tokens)
        return gradients

    def _dataset_gradients(self, batches: List[Any]) -> TokenGradients:
        return TokenGradients.concat([
            self._token_gradients(batch, "inputs", test=True, indices=indices)
            for indices, batch in _indexed(batches)
        ])

    def _reads_single_examples(self) -> bool:
        r"""Whether single training examples can be read as batches of their own (see below)."""
        loader = self.train_dataloader
        return reads_in_order(loader) and loader.batch_size is not None and not loader.drop_last \
            and loader.collate_fn is default_collate

    def _selected_train_loader(self, wanted: List[int]) -> Optional["_Selection"]:
        r"""
        A loader of only the training examples `wanted` (sorted), batched as
        the training data, when the training data is a map-style dataset read
        in order (so that index i is `dataset[i]`) with the default collate
        function; else None. Per-example gradients do not depend on the batch
        they are in (the model is in eval mode), so this gives the same
        gradients at a fraction of the cost; a custom `collate_fn` may pad to
        the longest example of a batch, which changes the gradients of models
        that do not mask padding, so it is read in its own batches instead.
        The examples are read once more beforehand, so that a dataset that
        changes between reads is refused.
        """
        if not self._reads_single_examples():
            return None
        loader = self.train_dataloader
        size = len(loader.dataset)  # type: ignore[arg-type]
        if wanted[-1] >= size:
            _raise_train_index_error(wanted[-1], size)
        selection = _Selection(
            DataLoader(Subset(loader.dataset, wanted), batch_size=loader.batch_size),
            OrderCheck("train_dataset"),
        )
        selection.order.read_through(selection.loader)
        return selection

    def _selected_train_gradients(
        self, wanted: List[int], selected: Optional["_Selection"], bar: tqdm, exact: bool = False
    ) -> TokenGradients:
        r"""Token gradients of the training examples `wanted` (sorted), in order."""
        if selected is not None:
            batches = selected.order.checked(_counted(selected.loader, bar), self._checkpoint_context)
            return TokenGradients.concat([
                self._token_gradients(
                    batch, "train_dataset", indices=[wanted[i] for i in positions], exact=exact
                )
                for positions, batch in _indexed(batches)
            ])
        parts, end = [], 0
        wanted_tensor = torch.tensor(wanted, dtype=torch.long)
        for indices, batch in self._train_batches(bar):
            start, end = indices.start, indices.stop
            local = wanted_tensor[(wanted_tensor >= start) & (wanted_tensor < end)]
            if local.numel():
                gradients = self._token_gradients(batch, "train_dataset", indices=indices, exact=exact)
                parts.append(gradients.select(local - start))
            if end > wanted[-1]:
                break  # the rest holds none of them
        if wanted and wanted[-1] >= end:
            _raise_train_index_error(wanted[-1], end)
        return TokenGradients.concat(parts)


class _Selection(NamedTuple):
    r"""A loader of some training examples, and the check that every read gives the same."""

    loader: DataLoader
    order: OrderCheck


# an index keeps the gradients of this many training examples per checkpoint
PROBE_EXAMPLES = 16
# the largest relative difference between stored and recomputed probe gradients that
# float arithmetic explains (another device, TF32 convolutions, another library version)
_PROBE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-2}


def projection_matrix(dim: int, projection_dim: int, seed: int) -> Tensor:
    r"""The seeded `(dim, projection_dim)` Gaussian matrix / sqrt(projection_dim)."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(dim, projection_dim, generator=generator, dtype=torch.float64)
    return matrix / projection_dim**0.5


def _check_projection(projection_dim: Optional[int], dim: int) -> Optional[int]:
    if projection_dim is None:
        return None
    if not is_int(projection_dim, 1) or projection_dim > dim:
        raise ValueError(
            f"`projection_dim` must be an int from 1 to the embedding size {dim} (or None "
            f"for exact rows), got {projection_dim!r}."
        )
    return projection_dim


def _raise_train_index_error(index: int, size: int) -> None:
    raise IndexError(
        f"`train_indices` holds {index}, but `train_dataset` has only "
        f"{size} examples: valid indices are 0 to {size - 1}."
    )


def _check_checkpoints(checkpoints: Any, load_func: Callable[..., Any]) -> None:
    if isinstance(checkpoints, str):
        if not os.path.isdir(checkpoints) or not glob.glob(os.path.join(checkpoints, "*")):
            raise ValueError(
                f"`checkpoints` {checkpoints!r} is not a directory with checkpoint "
                "files; pass a directory, a list of paths or an iterator."
            )
    elif isinstance(checkpoints, (list, tuple)):
        if not checkpoints:
            raise ValueError("`checkpoints` is empty: pass at least one checkpoint.")
        _check_checkpoint_files(checkpoints, load_func)


def _check_checkpoint_files(checkpoints: Sequence[Any], load_func: Callable[..., Any]) -> None:
    r"""The default loader reads files: each path must exist (a custom loader's may be names)."""
    if load_func is not load_checkpoint:
        return
    for c, checkpoint in enumerate(checkpoints):
        if isinstance(checkpoint, (str, os.PathLike)) and not os.path.exists(checkpoint):
            raise FileNotFoundError(
                f"Checkpoint {c} ({str(checkpoint)!r}) does not exist: pass the paths of saved "
                "checkpoint files, or a `checkpoints_load_func` that loads these names."
            )


def check_path(path: Any) -> None:
    r"""Refuses a folder `path` (an index's, saved factors') that is not a non-empty name."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a folder name (str), got {type(path).__name__}.")
    if not str(path).strip():
        raise ValueError("`path` is empty: give the name of the index folder, e.g. 'train_index'.")


def _finite(scores: Tensor, what: str) -> Tensor:
    r"""`scores`, if finite: every gradient is, so an overflow of the products or sums."""
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(
            f"The {what} scores overflowed {scores.dtype} (they are not all finite): the "
            "learning rates or gradients are too large for it. Use a float64 model "
            "(`model.double()`), or smaller learning rates in `checkpoints_load_func`."
        )
    return scores


def _test_batches(inputs: Batches) -> List[Any]:
    r"""
    The test batches, read once (in a fixed order) and kept, so that every
    checkpoint sees the same test example in the same row.
    """
    return list(_nonempty(_inputs_loader(inputs), "inputs"))


def _inputs_loader(inputs: Batches) -> DataLoader:
    r"""`inputs` (a batch or a loader) as a loader in a fixed order (see `fixed_order`)."""
    loader = fixed_order(_format_inputs_dataset(inputs), "inputs")
    check_collate(loader, "inputs")
    return loader


def _indexed(batches: Iterable[Any]) -> Iterator[Tuple[range, Any]]:
    r"""Each batch with the positions of its examples among all batches."""
    start = 0
    for batch in batches:
        size = _batch_len(batch)
        yield range(start, start + size), batch
        start += size


def _excluded_token_ids(
    lookups: Iterable[Module], exclude_token_ids: Optional[Iterable[Any]]
) -> Tensor:
    r"""
    The token ids to leave out: the user's, and the `padding_idx` of the
    embedding if every module sharing its weight has it (its row then gets no
    gradient at all; other padding positions are dropped per module call).
    """
    excluded = set()
    if exclude_token_ids is not None:
        try:
            items = list(exclude_token_ids)
        except TypeError:
            items = [exclude_token_ids]
        excluded = {_integer(item, "exclude_token_ids", "token ids") for item in items}
    rows = next(iter(lookups)).weight.shape[0]
    outside = sorted(i for i in excluded if not 0 <= i < rows)
    if outside:
        raise ValueError(
            f"`exclude_token_ids` holds {outside[0]}, but the embedding has {rows} rows: token "
            f"ids are 0 to {rows - 1}. Take the ids from this model's tokenizer."
        )
    padding = {getattr(module, "padding_idx", None) for module in lookups}
    if len(padding) == 1 and None not in padding:
        excluded |= padding
    return torch.tensor(sorted(excluded), dtype=torch.long)


def _integer(value: Any, arg_name: str, what: str) -> int:
    r"""
    ``value`` as an int, for Python, numpy and 0-d tensor integers, which
    implement ``__index__``; bools and everything else are refused.
    """
    if is_int(value):
        return operator.index(value)
    raise TypeError(f"`{arg_name}` must hold integer {what}, got {value!r}.")


def _short_repr(value: Any) -> str:
    r"""A short `repr` of a checkpoint (a state dict's full one is megabytes)."""
    if isinstance(value, dict):
        return f"<{type(value).__name__} of {len(value)} entries>"
    return shorten(repr(value))


def _length(batches: Any) -> Optional[int]:
    try:
        return len(batches)
    except TypeError:
        return None


def _counted(batches: Iterable[Any], bar: tqdm) -> Iterator[Any]:
    for batch in batches:
        yield batch
        bar.update()


def _nonempty(batches: Iterable[Any], name: str) -> Iterator[Any]:
    empty = True
    for batch in batches:
        empty = False
        yield batch
    if empty:
        raise ValueError(f"`{name}` yielded no batches: it must hold at least one example.")


def _batch_len(batch: Sequence[Any]) -> int:
    check_batch(batch)
    for item in batch:
        if isinstance(item, Tensor) and item.dim() > 0:
            return item.shape[0]
        if isinstance(item, (list, tuple)):
            return len(item)
    raise TypeError(
        "Cannot tell the number of examples in a batch with no tensor: batches must be tuples "
        "`(*model_inputs, labels)` whose tensors have the examples as first dimension."
    )


def _parse_train_indices(
    train_indices: Any,
) -> Tuple[List[int], Optional[List[List[int]]]]:
    r"""A flat list of indices, or one list per test example."""
    items = plain(train_indices)
    if not isinstance(items, list):
        items = [items]
    nested = [isinstance(item, list) for item in items]
    if any(nested) and not all(nested):
        raise ValueError("`train_indices` mixes indices and lists of indices.")
    rows = [[_train_index(i) for i in row] for row in (items if any(nested) else [items])]
    return (rows[0], None) if not any(nested) else ([], rows)


def _train_index(value: Any) -> int:
    index = _integer(value, "train_indices", "indices")
    if index < 0:
        raise IndexError(
            f"`train_indices` holds {index}: valid indices are 0 to the number of "
            "training examples - 1."
        )
    return index


def _group_terms(
    terms: List[Tuple[Tensor, ...]], rows: List[List[int]], wanted: List[int], factors: Tensor
) -> List[List[WordInfluence]]:
    r"""
    Sums the per-checkpoint terms per (test, train, token), multiplies those of
    test example i and training example `wanted[j]` by `factors[i, j]`, and
    groups them.
    """
    test_ex, train_pos, token, score = (torch.cat(column) for column in zip(*terms))
    n_wanted = max(1, len(wanted))
    stride = int(token.max().item()) + 1 if token.numel() else 1
    keys, inverse = torch.unique(
        (test_ex * n_wanted + train_pos) * stride + token, return_inverse=True
    )
    summed = score.new_zeros(keys.numel()).index_add_(0, inverse, score)
    pair_keys, tokens = keys // stride, keys % stride
    position = {index: pos for pos, index in enumerate(wanted)}
    results = []
    for i, row in enumerate(rows):
        per_test = []
        for index in row:
            pair = i * n_wanted + position[index]
            target = torch.tensor([pair], device=pair_keys.device)
            lo = int(torch.searchsorted(pair_keys, target, right=False))
            hi = int(torch.searchsorted(pair_keys, target, right=True))
            scores = summed[lo:hi] * factors[i, position[index]]
            order = torch.argsort(scores.abs(), descending=True, stable=True)
            per_test.append(WordInfluence(index, tokens[lo:hi][order], scores[order]))
        results.append(per_test)
    return results


class _Sum:
    r"""A running sum of tensors over checkpoints (None until the first)."""

    def __init__(self) -> None:
        self.total: Optional[Tensor] = None

    def add(self, value: Tensor) -> None:
        self.total = value if self.total is None else self.total + value
