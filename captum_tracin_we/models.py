r"""
Models called as Captum's influence classes call them, ``model(*batch[:-1])``:
an adapter for Hugging Face classifiers, and a small CNN text classifier.
"""

import warnings
from typing import Optional

import torch
from torch import nn, Tensor
from torch.nn import Module


class HuggingFaceClassifier(Module):
    r"""
    Makes a Hugging Face sequence classifier (any model whose output has
    ``.logits``) callable as ``model(input_ids, attention_mask)`` returning the
    logits tensor, as Captum's influence classes expect.

    Batches are then ``(input_ids, attention_mask, labels)`` or
    ``(input_ids, attention_mask, token_type_ids, labels)``.

    Checkpoints saved from the wrapped model (``save_checkpoint(hf_model, ...)``)
    load into the wrapper with the default ``load_checkpoint``.

    Encoder-decoder models such as T5 start every decoder input with the pad
    token id, and their embedding has no ``padding_idx``: the pad id then gets
    a real gradient in every example and shows in word-level scores. The
    wrapper warns about it; pass ``exclude_token_ids=[wrapper.pad_token_id]``
    to ``TracInWE`` to leave it out.

    Args:
        model (torch.nn.Module): e.g. an ``AutoModelForSequenceClassification``.
    """

    def __init__(self, model: Module) -> None:
        super().__init__()
        self.model = model
        if self.decoder_starts_with_pad:
            warnings.warn(
                f"{type(model).__name__} starts every decoder input with the pad token id "
                f"{self.pad_token_id}, whose embedding row then gets a real gradient and shows "
                "in word-level scores of every pair: pass "
                f"`exclude_token_ids=[{self.pad_token_id}]` to TracInWE to leave it out.",
                stacklevel=2,
            )

    @property
    def pad_token_id(self) -> Optional[int]:
        r"""The wrapped model's ``config.pad_token_id``, if it has one."""
        return getattr(getattr(self.model, "config", None), "pad_token_id", None)

    @property
    def decoder_starts_with_pad(self) -> bool:
        r"""
        Whether the model's decoder starts from the pad token id while its
        word embedding has no ``padding_idx`` for it (T5), so that the pad id
        gets gradients.
        """
        config = getattr(self.model, "config", None)
        pad = self.pad_token_id
        if pad is None or not getattr(config, "is_encoder_decoder", False):
            return False
        if getattr(config, "decoder_start_token_id", None) != pad:
            return False
        embedding = self.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        return getattr(embedding, "padding_idx", None) != pad

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


class TextCNN(Module):
    r"""
    A small convolutional text classifier, as in the TracIn-WE authors' code:
    word embeddings, two 1D convolutions with ReLU, a max-pool over positions
    (padding excluded) and a linear layer. Called as
    ``model(input_ids, attention_mask=None)``, returning logits, so it takes the
    batches of `captum_tracin_we.data.encode` (a WordPiece vocabulary).

    Args:
        vocab_size (int): Number of token ids (30522 for MiniLM's WordPiece).
        num_labels (int): Number of classes.
        embedding_dim (int, optional): Default: 64
        channels (int, optional): Output channels of both convolutions. Default: 64
        kernel_size (int, optional): Width of both convolutions (odd; positions
                are padded to keep the length). Default: 3
        padding_idx (int, optional): The padding token id, whose embedding row
                stays zero. Default: 0
        seed (int, optional): Seed of the initial weights. Default: 0
    """

    def __init__(
        self,
        vocab_size: int,
        num_labels: int,
        embedding_dim: int = 64,
        channels: int = 64,
        kernel_size: int = 3,
        padding_idx: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be an odd int >= 1, got {kernel_size}.")
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=padding_idx)
            self.conv1 = nn.Conv1d(embedding_dim, channels, kernel_size, padding=kernel_size // 2)
            self.conv2 = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
            self.classifier = nn.Linear(channels, num_labels)
        finally:
            torch.random.set_rng_state(generator_state)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        hidden = self.embedding(input_ids).transpose(1, 2)  # (batch, dim, positions)
        if attention_mask is None:
            hidden = torch.relu(self.conv2(torch.relu(self.conv1(hidden))))
            return self.classifier(hidden.max(dim=2).values)
        # zero the padding between layers, so a text's logits do not depend on
        # how much padding its batch added (the convolutions pad with zeros too)
        keep = attention_mask.unsqueeze(1).to(hidden.dtype)
        hidden = torch.relu(self.conv1(hidden * keep)) * keep
        hidden = torch.relu(self.conv2(hidden))
        hidden = hidden.masked_fill(keep == 0, float("-inf"))
        return self.classifier(hidden.max(dim=2).values)

    def get_input_embeddings(self) -> Module:
        r"""The word-embedding module."""
        return self.embedding
