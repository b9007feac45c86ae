r"""
An adapter with Quanda's `Explainer` contract over any influence method of this
package, so that Quanda's benchmarks and metrics can run `TracInWE`,
`InfluenceWE` and their options. It does not import Quanda (which pins another
Captum): it only follows its interface,

- constructor ``(model, train_dataset, task, checkpoints, checkpoints_load_func, **kwargs)``;
- ``explain(test_data, targets) -> Tensor`` of shape ``(n_test, n_train)``;
- ``self_influence(batch_size=...) -> Tensor`` of shape ``(n_train,)``.
"""

from typing import Any, Callable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor
from torch.nn import Module
from torch.utils.data import Dataset

from captum_tracin_we._core.token_influence import TokenInfluenceBase
from captum_tracin_we._core.tracin_we import TracInWE
from captum_tracin_we._utils.checkpoints import load_checkpoint
from captum_tracin_we._utils.loaders import batch_loader
from captum_tracin_we._utils.values import check_int

TASKS = ("text_classification",)


class QuandaExplainer:
    r"""
    Quanda's `Explainer` contract over an influence method of this package.

    Args:

        model (torch.nn.Module): The model, called as `model(*inputs)`.
        train_dataset (torch.utils.data.Dataset): Items `(*model_inputs, label)`.
        task (str, optional): Quanda's task name; only "text_classification".
                Default: "text_classification"
        checkpoints (str or list[str]): As for `TracInWE`.
        checkpoints_load_func (Callable, optional): As for `TracInWE`; None
                (Quanda's default) is this package's `load_checkpoint`.
                Default: None
        method (type, optional): The influence class, `TracInWE` or
                `InfluenceWE` (or another `TokenInfluenceBase`).
                Default: TracInWE
        **kwargs: The method's other arguments (`loss_fn`, `batch_size`,
                `normalize`, `approximation`, ...).
    """

    def __init__(
        self,
        model: Module,
        train_dataset: Dataset,
        task: str = "text_classification",
        checkpoints: Optional[Union[str, List[str]]] = None,
        checkpoints_load_func: Optional[Callable[[Module, Any], float]] = None,
        method: Type[TokenInfluenceBase] = TracInWE,
        **kwargs: Any,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"`task` must be one of {list(TASKS)} (influence through word embeddings), got {task!r}.")
        if checkpoints is None:
            raise ValueError("`checkpoints` is required: the checkpoints the model was trained through.")
        if not (isinstance(method, type) and issubclass(method, TokenInfluenceBase)):
            raise TypeError(f"`method` must be TracInWE, InfluenceWE or another TokenInfluenceBase, got {method!r}.")
        self.model, self.train_dataset, self.task = model, train_dataset, task
        load = load_checkpoint if checkpoints_load_func is None else checkpoints_load_func
        self.method = method(model, train_dataset, checkpoints, load, **kwargs)

    def explain(
        self, test_data: Union[Tensor, Sequence[Tensor]], targets: Optional[Union[List[int], Tensor]] = None
    ) -> Tensor:
        r"""
        The `(n_test, n_train)` influence scores of the training examples on
        `test_data` (the token ids, or a tuple of model inputs) with labels
        `targets` (a list or tensor; required, since influence is taken on each
        test label's loss).
        """
        inputs: Tuple[Any, ...] = (test_data,) if isinstance(test_data, Tensor) else tuple(test_data)
        if targets is None:
            raise ValueError("`targets` is required: influence is computed on the loss of each test label.")
        labels = torch.as_tensor(targets)
        return self.method.influence(inputs + (labels,))

    def self_influence(self, batch_size: int = 32) -> Tensor:
        r"""
        The self influence of every training example, in batches of
        `batch_size` (read from the method's index instead, if it has one).
        """
        batch_size = check_int(batch_size, "batch_size")
        if self.method.index is not None:
            return self.method.self_influence()
        return self.method.self_influence(batch_loader(self.train_dataset, batch_size, "train_dataset"))
