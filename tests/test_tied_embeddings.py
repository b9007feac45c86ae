"""With tied input/output embeddings, TracInWE measures the input side only."""

import torch
from captum.influence import TracInCP
from conftest import assert_close, TiedLM, token_data, VOCAB, write_checkpoints
from torch import nn

from captum_tracin_we import load_checkpoint, TracInWE


def test_tied_model_scores_are_the_input_side_of_the_embedding(tmp_path):
    torch.manual_seed(0)
    tied = TiedLM(tied=True).double().eval()
    assert tied.decoder.weight is tied.embedding.weight
    checkpoints = write_checkpoints(tied, tmp_path)
    train = token_data(10, seed=4, with_mask=False, n_labels=VOCAB)
    test = token_data(3, seed=5, with_mask=False, n_labels=VOCAB)
    loss = nn.CrossEntropyLoss(reduction="none")

    ours = TracInWE(tied, train, checkpoints, loss_fn=loss, batch_size=4).influence(test.tensors)

    # the same weights with an untied output layer: E's gradient is input-side only
    untied = TiedLM(tied=False).double().eval()
    input_side = TracInCP(
        untied, train, checkpoints, load_checkpoint, layers=["embedding"], loss_fn=loss, batch_size=4
    ).influence(test.tensors)
    assert_close(ours, input_side)

    # Captum on the tied matrix also counts the output projection, and differs
    both_sides = TracInCP(
        tied, train, checkpoints, load_checkpoint, layers=["embedding"], loss_fn=loss, batch_size=4
    ).influence(test.tensors)
    assert ((both_sides - ours).abs().max() / both_sides.abs().max()) > 1e-3
