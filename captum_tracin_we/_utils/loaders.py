r"""
Data read more than once must give the same examples in the same order every
time: TracIn reads the training data once per checkpoint and sums the passes
column by column, so a loader that shuffles would add up the gradients of
different examples in one column.

`fixed_order` makes a loader's order fixed, or refuses it; `OrderCheck`
fingerprints every batch of each pass and refuses a pass that differs from the
first (random augmentation or masking, an `IterableDataset` that shuffles).
"""

from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    ConcatDataset,
    DataLoader,
    Dataset,
    default_collate,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from captum_tracin_we._utils.fingerprints import batch_digest
from captum_tracin_we._utils.values import plain


def reads_in_order(loader: DataLoader) -> bool:
    r"""Whether `loader` yields the examples of its map-style dataset as 0, 1, 2, ..."""
    return (
        not isinstance(loader.dataset, IterableDataset)
        and (loader.batch_sampler is None or type(loader.batch_sampler) is BatchSampler)
        and _sequential(_sampler(loader), loader.dataset)
        and (loader.num_workers == 0 or getattr(loader, "in_order", True))
    )


def _sequential(sampler: Any, dataset: Any) -> bool:
    r"""Whether `sampler` is PyTorch's own sequential order over all of `dataset`."""
    return type(sampler) is SequentialSampler and sampler.data_source is dataset


def _sampler(loader: DataLoader) -> Any:
    r"""
    The sampler that orders the examples: inside a plain `BatchSampler`, its own
    (`loader.sampler` is then a placeholder when `batch_sampler=` was given).
    """
    batches = loader.batch_sampler
    return batches.sampler if type(batches) is BatchSampler else loader.sampler


def fixed_order(loader: DataLoader, arg_name: str) -> DataLoader:
    r"""
    `loader`, or a loader of the same dataset and options whose order is fixed:

    - a loader that reads its dataset in order is returned as it is (with
      workers that may deliver batches out of order, `in_order=False`, it is
      rebuilt with them in order);
    - one that shuffles (`shuffle=True`, or a `RandomSampler` that permutes the
      whole dataset, also inside a `BatchSampler`) is replaced by one that reads
      the dataset in order, with the same batch size, collate function and
      workers and without `drop_last`, so that example `j` of the scores is
      `loader.dataset[j]`;
    - PyTorch's other random samplers (with replacement, weighted, subsets) and
      a `DistributedSampler` are refused;
    - any other sampler or batch sampler is drawn twice: if both draws agree
      (a fixed custom order, such as batches bucketed by length), that order is
      frozen and example `j` is the `j`-th it yields; if not, the loader is
      refused.

    An `IterableDataset` is returned as it is (its order cannot be seen from
    outside; `OrderCheck` refuses a pass that differs).
    """
    if isinstance(loader.dataset, IterableDataset) or reads_in_order(loader):
        return loader
    batches = loader.batch_sampler
    sampler = _sampler(loader)
    plain_batches = batches is None or type(batches) is BatchSampler
    batching: Dict[str, Any] = {"batch_size": None}
    if type(batches) is BatchSampler:
        batching = {"batch_size": batches.batch_size, "drop_last": batches.drop_last}
    if plain_batches and _sequential(sampler, loader.dataset):
        return _rebuilt(loader, sampler=sampler, **batching)  # workers had `in_order=False`
    if _is_full_shuffle(sampler) and plain_batches:
        in_order = SequentialSampler(loader.dataset)  # type: ignore[arg-type]
        return _rebuilt(loader, sampler=in_order, **{**batching, "drop_last": False})
    if isinstance(sampler, DistributedSampler):
        raise ValueError(
            f"`{arg_name}` uses a DistributedSampler, which gives this process only its part of "
            "the data, in an order that changes with `set_epoch`. Pass the whole Dataset itself "
            "(with `batch_size=`), or a DataLoader that reads it in a fixed order."
        )
    order = batches if batches is not None else sampler
    shown = type(sampler if plain_batches else batches).__name__  # the part that decides the order
    # a random sampler's two draws may agree by chance on tiny data: refused by type
    random_type = plain_batches and isinstance(sampler, _RANDOM_SAMPLERS)
    first = None if random_type else _drawn(order)
    if random_type or first != _drawn(order):
        raise ValueError(
            f"`{arg_name}` draws its examples in a random order ({shown}), but "
            "TracInWE reads them once per checkpoint and needs the same example in the same "
            f"place every time. Pass the Dataset itself (with `batch_size=`), or a DataLoader "
            "that reads it in a fixed order (`shuffle=False`, no random sampler); a DataLoader "
            "with `shuffle=True` is read in the dataset's order."
        )
    if batches is None:
        return _rebuilt(loader, sampler=first, batch_size=None)
    return _rebuilt(loader, batch_sampler=first)


_RANDOM_SAMPLERS = (RandomSampler, WeightedRandomSampler, SubsetRandomSampler)


def _is_full_shuffle(sampler: Any) -> bool:
    return (
        type(sampler) is RandomSampler
        and not sampler.replacement
        and sampler.num_samples == len(sampler.data_source)
    )


def _drawn(order: Iterable[Any]) -> List[Any]:
    r"""The indices (or batches of indices) a sampler yields, as plain ints and lists."""
    return [plain(item) for item in order]


def _rebuilt(loader: DataLoader, **order: Any) -> DataLoader:
    r"""A loader of the same dataset and worker options as `loader`, in another order."""
    options: Dict[str, Any] = {
        "collate_fn": loader.collate_fn,
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, **options, **order)


class OrderCheck:
    r"""
    Refuses a pass over `arg_name`'s batches that differs from the earlier
    ones: each batch is fingerprinted (`batch_digest`) as it is read and
    compared with the same batch of the passes before, so the error comes at
    the first batch that differs, before any score uses it. A pass stopped
    early (only the first batches were needed) is checked as far as it went.
    """

    def __init__(self, arg_name: str) -> None:
        self.arg_name = arg_name
        self.reference: List[str] = []  # the digests of the batches seen so far
        self.complete = False  # whether a pass has gone through to the end

    def checked(self, batches: Iterable[Any], context: str = "") -> Iterator[Any]:
        r"""
        The batches, checked against the earlier passes; `context` says where
        this pass is (" at checkpoint ..."), for the error message.
        """
        count = 0
        for position, batch in enumerate(batches):
            digest = batch_digest(batch)
            if position < len(self.reference):
                if self.reference[position] != digest:
                    self._refuse(context, f"batch {position} differs")
            elif self.complete:
                self._refuse(context, f"it yielded more than {len(self.reference)} batches")
            else:
                self.reference.append(digest)
            count += 1
            yield batch
        if count < len(self.reference):
            self._refuse(context, f"it yielded {count} batches instead of {len(self.reference)}")
        self.complete = True

    def read_through(self, batches: Iterable[Any], context: str = "") -> None:
        r"""A whole pass over `batches`, checked (the first one is the reference), its batches dropped."""
        for _ in self.checked(batches, context):
            pass

    def _refuse(self, context: str, difference: str) -> None:
        raise ValueError(
            f"`{self.arg_name}` yielded other examples{context} than on its first pass "
            f"({difference}). TracInWE reads it more than once, so it must yield the "
            "same examples in the same order every time: remove random augmentation or "
            "masking from its dataset and `collate_fn`, and pass an IterableDataset only "
            "if it yields a fixed order. (If you changed the data on purpose, make a new "
            "TracInWE for it.)"
        )


def _bases(dataset: Any) -> List[Any]:
    r"""The datasets `dataset` is made of, looking through ``Subset``s and ``ConcatDataset``s."""
    if isinstance(dataset, Subset):
        return _bases(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        return [base for part in dataset.datasets for base in _bases(part)]
    return [dataset]


def own_collate(dataset: Any, arg_name: str = "dataset") -> Optional[Callable[[Sequence[Any]], Any]]:
    r"""
    The ``collate_fn`` a dataset brings for its batches (e.g.
    `captum_tracin_we.data.PaddedPerBatch`'s, which pads per batch), looking
    through ``Subset``s and ``ConcatDataset``s; None for a dataset that
    PyTorch's default collation batches. A ``ConcatDataset`` whose parts batch
    differently (other collate functions, or some none) is refused.
    """
    if isinstance(dataset, DataLoader):
        return None  # it batches itself
    bases = _bases(dataset)
    collates: List[Any] = []
    for base in bases:
        collate = getattr(base, "collate_fn", None)
        collate = collate if callable(collate) else None
        if collate not in collates:
            collates.append(collate)
    if len(collates) > 1:
        kinds = sorted({type(base).__name__ for base in bases})
        raise ValueError(
            f"`{arg_name}` joins datasets that batch differently ({', '.join(kinds)}: "
            f"{len(collates)} different collate functions, or some with one and some without). "
            "Pass a DataLoader of it with the `collate_fn` that batches all of its examples."
        )
    return collates[0]


def _text_lengths(dataset: Any) -> Optional[Tensor]:
    r"""Each example's number of tokens where the dataset tells (a `lengths` tensor, as `PaddedPerBatch`'s)."""
    if isinstance(dataset, Subset):
        lengths = _text_lengths(dataset.dataset)
        return None if lengths is None else lengths[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        parts = [_text_lengths(part) for part in dataset.datasets]
        return None if any(part is None for part in parts) else torch.cat(parts)  # type: ignore[arg-type]
    lengths = getattr(dataset, "lengths", None)
    return lengths if isinstance(lengths, Tensor) and lengths.shape == (len(dataset),) else None


def check_collate(loader: Any, arg_name: str) -> None:
    r"""
    Refuses a user's DataLoader (read in the order it is used) that batches
    texts of different lengths from a dataset bringing its own `collate_fn`
    (which pads per batch) with PyTorch's default collation: it cannot stack
    them, and fails inside the loader with "stack expects each tensor to be
    equal size". Batches of one example, or of texts of one length, stack, and
    a dataset that does not tell its texts' lengths is left to the loader.
    """
    if not isinstance(loader, DataLoader) or loader.collate_fn is not default_collate \
            or loader.batch_sampler is None or isinstance(loader.dataset, IterableDataset):
        return
    try:
        if own_collate(loader.dataset, arg_name) is None:
            return
    except ValueError:  # parts that batch differently: the DataLoader the user built decides
        pass
    lengths = _text_lengths(loader.dataset)
    if lengths is None:
        return
    for position, batch in enumerate(loader.batch_sampler):
        found = lengths[torch.as_tensor(list(batch), dtype=torch.long)].unique()
        if found.numel() > 1:
            break
    else:
        return
    bases = _bases(loader.dataset)
    base = type(bases[0]).__name__
    described = base if loader.dataset is bases[0] else f"{type(loader.dataset).__name__} of {_a(base)}"
    if arg_name == "inputs":
        other = "the test examples as one batch, e.g. `dataset.batch()`"
        if not callable(getattr(loader.dataset, "batch", None)):  # a Subset: its dataset batches
            other = f"the test examples as one padded batch (a {base}'s `batch(indices)`)"
    else:
        other = "the dataset itself with `batch_size=`"
    raise ValueError(
        f"`{arg_name}` is a DataLoader of {_a(described)}, which brings its own `collate_fn` to pad "
        f"texts of different lengths, but the DataLoader batches them with PyTorch's default collation, "
        f"which cannot stack them (batch {position} holds texts of {', '.join(map(str, found.tolist()))} "
        f"tokens). Pass `collate_fn=` the {base}'s `collate_fn` to the DataLoader, or {other}."
    )


def _a(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def batch_loader(dataset: Dataset, batch_size: Optional[int], arg_name: str = "dataset", **kwargs: Any) -> DataLoader:
    r"""``DataLoader(dataset, batch_size, ...)`` with the dataset's own `collate_fn`, if it has one."""
    return DataLoader(dataset, batch_size=batch_size, collate_fn=own_collate(dataset, arg_name), **kwargs)
