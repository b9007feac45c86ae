r"""
``TracInWE``: TracIn influence restricted to the word-embedding matrix
(Yeh et al., "First is Better Than Last for Language Data Influence", NeurIPS 2022),
as a Captum ``TracInCPBase`` next to ``TracInCP`` and ``TracInCPFast``. The loop,
the training side and the queries are the token-influence core's
(`token_influence`); TracIn keeps every hook at its default.
"""

from typing import Any, Callable, Iterable, Iterator, List, Optional, Union

from torch.nn import Module
from torch.utils.data import DataLoader, Dataset

from captum_tracin_we._core.embedding_gradients import LossFn
from captum_tracin_we._core.token_influence import (
    MODEL_AND_DATA_ARGS,
    TOKEN_ARGS,
    TokenInfluenceBase,
    WordInfluence,
)
from captum_tracin_we._utils.checkpoints import load_checkpoint

__all__ = ["TracInWE", "WordInfluence"]


class TracInWE(TokenInfluenceBase):
    r"""
    TracIn-WE computes TracIn influence scores with the gradients of the
    word-embedding matrix E (V x d) only:

        I(z, z') = sum_c lr_c * sum_{w in T(z) & T(z')} <g_c(z)_w, g_c(z')_w>

    where T(z) is the set of token ids of example z and g_c(z)_w, the row w of
    the gradient of E at checkpoint c, is the sum over the positions holding w
    of the loss gradient at the embedding module's output. Only tokens that two
    examples share contribute, which gives word-level explanations
    (`word_influence`) whose terms add up to the score exactly.

    The gradients at every position come from a forward hook on the embedding
    module and one backward pass per batch, are summed per token id into a
    ragged ``TokenGradients`` structure, and are multiplied as sparse products
    joined on token id; the V x d gradient is never built. With
    ``top_k_tokens=None`` the scores equal Captum's
    ``TracInCP(layers=[<embedding module name>])`` with a per-example loss.

    What is measured: the *input* side of E. For a model that ties E to its
    output projection (as masked-LM heads do), the dense gradient of E also has
    an output-side part, which TracInWE leaves out. The rows of ``padding_idx``
    of an ``nn.Embedding`` get no gradient in PyTorch, so they are excluded too.

    When several modules share E as their ``weight`` (the same Parameter, e.g.
    BART's ``shared``, ``encoder.embed_tokens`` and ``decoder.embed_tokens``),
    each of their lookups is hooked and the gradient of E is the sum over all of
    them, as in the dense oracle: Captum's ``TracInCP`` differentiates the
    ``layers``' parameters themselves, so ``TracInCP(layers=[<any of them>])``
    also sums over every use. ``embedding_layer`` may be any of these modules,
    even one the forward pass never calls (BART's ``shared``). Uses of E that
    are not lookups of token ids (a tied output projection) are left out, as
    above. A lookup must return ``weight[ids]`` or a constant times it (BART's
    ``embed_scale``, which is multiplied into the gradients); a module that adds
    positions or normalises its output is refused, since its output gradient is
    not E's.

    The model must treat examples independently within a batch: call
    ``model.eval()`` (dropout makes scores random, and BatchNorm in train mode
    mixes the examples of a batch). The first dimension of the token ids given
    to the embedding module must be the batch dimension, as for the model's
    output: sequence-first models, with ids of shape (T, B), are not supported;
    transpose their inputs in a wrapper.
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
        super().__init__(
            model, train_dataset, checkpoints, checkpoints_load_func, embedding_layer, loss_fn,
            batch_size, test_loss_fn, top_k_tokens, exclude_token_ids, normalize,
        )

    __init__.__doc__ = "\n        Args:\n" + MODEL_AND_DATA_ARGS + TOKEN_ARGS["top_k_tokens"] + TOKEN_ARGS[
        "exclude_token_ids"
    ] + TOKEN_ARGS["normalize"].format(
        metric="", cost="\n                    An index records s(z), so normalising reads no rows."
    )
