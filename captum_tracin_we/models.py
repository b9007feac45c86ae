r"""Adapters that make Hugging Face models fit Captum's ``model(*batch[:-1])`` call."""

from typing import Optional

from torch import Tensor
from torch.nn import Module


class HuggingFaceClassifier(Module):
    r"""
    Makes a Hugging Face sequence classifier (any model whose output has
    ``.logits``) callable as ``model(input_ids, attention_mask)`` returning the
    logits tensor, as Captum's influence classes expect.

    Batches are then ``(input_ids, attention_mask, labels)`` or
    ``(input_ids, attention_mask, token_type_ids, labels)``.

    Args:
        model (torch.nn.Module): e.g. an ``AutoModelForSequenceClassification``.
    """

    def __init__(self, model: Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
    ) -> Tensor:
        kwargs = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.model(input_ids=input_ids, **kwargs).logits

    def get_input_embeddings(self) -> Module:
        r"""The wrapped model's word-embedding module."""
        return self.model.get_input_embeddings()
