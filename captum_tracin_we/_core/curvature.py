r"""
K-FAC and EK-FAC curvature of the word-embedding matrix E (DESIGN.md section 7).

The input of a lookup is one-hot, so the K-FAC activation factor is diagonal and
the Fisher block of row w of E is ``F_w ~ a_w S``: ``a_w`` the mean count of token w
per training example, ``S`` (d x d) the mean over all scored positions of the
outer products of the loss gradient at the embedding output. EK-FAC keeps the
eigenvectors Q of S and refits the eigenvalues per token,
``Lambda[w, k] = (1/n) sum_z ((Q^T g_w(z))_k)^2``. Both are tables over the token
ids seen in training only; ``(F_w + lambda I)^-1`` is applied to a gradient row
of token w as ``Q diag(1 / (eig_w + lambda)) Q^T`` (an unseen token has eig 0).
"""

from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import torch
from torch import Tensor

from captum_tracin_we._core.token_gradients import TokenGradients

# curvature approximations by name (Kronfluence's names)
APPROXIMATIONS = ("ekfac", "kfac")
# the default damping, relative to the mean eigenvalue over the seen tokens (Kronfluence's heuristic)
RELATIVE_DAMPING = 0.1


@dataclass(frozen=True)
class Curvature:
    r"""
    The curvature factors of E at one checkpoint (see the module docstring),
    in float64.

    Args:
        approximation (str): "kfac" or "ekfac".
        basis (Tensor): Q, the eigenvectors of S, as columns (d x d).
        eigenvalues (Tensor): the eigenvalues of S (d,).
        tokens (Tensor): the token ids seen in training, ascending (m,).
        token_counts (Tensor): a_w, each seen token's mean count per example (m,).
        corrected (Tensor, optional): EK-FAC's Lambda (m x d); None for K-FAC.
        damping (float): lambda.
        examples (int): the number n of training examples fitted on.
    """

    approximation: str
    basis: Tensor
    eigenvalues: Tensor
    tokens: Tensor
    token_counts: Tensor
    corrected: Optional[Tensor]
    damping: float
    examples: int

    def token_eigenvalues(self, token_ids: Tensor) -> Tensor:
        r"""The eigenvalues of `F_w` in the basis Q for each token id (rows of 0 for unseen tokens)."""
        tokens = self.tokens.to(token_ids.device)
        if not tokens.numel():
            return torch.zeros(token_ids.numel(), self.basis.shape[0], dtype=torch.float64, device=token_ids.device)
        position = torch.searchsorted(tokens, token_ids).clamp_(max=tokens.numel() - 1)
        seen = (tokens[position] == token_ids).unsqueeze(1)
        if self.corrected is not None:
            table = self.corrected.to(token_ids.device)[position]
        else:
            table = self.token_counts.to(token_ids.device)[position].unsqueeze(1) * self.eigenvalues.to(
                token_ids.device
            ).unsqueeze(0)
        return table * seen

    def mean_eigenvalue(self) -> float:
        r"""The mean eigenvalue of the blocks of the seen tokens, which the default damping scales."""
        if not self.tokens.numel():
            return 0.0
        return float(self.token_eigenvalues(self.tokens).mean())

    def inverse_times(self, rows: TokenGradients) -> TokenGradients:
        r"""`(F_w + lambda I)^-1 g_w` for every row, in the rows' dtype (computed in float64)."""
        return self._apply(rows, -1.0)

    def damped_times(self, rows: TokenGradients) -> TokenGradients:
        r"""`(F_w + lambda I) g_w` for every row (the inverse of `inverse_times`)."""
        return self._apply(rows, 1.0)

    def _apply(self, rows: TokenGradients, power: float) -> TokenGradients:
        device = rows.grads.device
        basis = self.basis.to(device)
        scale = (self.token_eigenvalues(rows.token_ids) + self.damping) ** power
        rotated = rows.grads.double() @ basis
        grads = ((rotated * scale) @ basis.T).to(rows.grads.dtype)
        return TokenGradients(rows.offsets, rows.token_ids, grads)

    def arrays(self) -> Dict[str, Tensor]:
        r"""The factors as named arrays, for saving."""
        arrays = {
            "basis": self.basis, "eigenvalues": self.eigenvalues,
            "tokens": self.tokens, "token_counts": self.token_counts,
        }
        if self.corrected is not None:
            arrays["corrected"] = self.corrected
        return arrays


class FactorFit:
    r"""
    Accumulates the factors of one checkpoint over one pass of the training
    data: the positions' second moment (for S and a_w) as they come, and the
    token gradient rows, which EK-FAC projects on Q once S is known (they are
    held in memory for the pass: nnz x d floats, like one checkpoint of an index).
    """

    def __init__(self, dim: int, keep_rows: bool = True) -> None:
        self.keep_rows = keep_rows  # K-FAC needs no rows
        self.second_moment = torch.zeros(dim, dim, dtype=torch.float64)
        self.positions = 0
        self.counts: Dict[str, Tensor] = {}
        self.token_ids: List[Tensor] = []
        self.rows: List[Tensor] = []
        self.examples = 0

    def add_positions(self, token_ids: Tensor, grads: Tensor) -> None:
        r"""Takes in the gradients at the scored positions of a batch."""
        grads = grads.detach().double()
        self.second_moment += (grads.T @ grads).cpu()
        self.positions += grads.shape[0]
        self.token_ids.append(token_ids.detach().cpu())

    def add_rows(self, gradients: TokenGradients) -> None:
        r"""Takes in the token gradient rows of a batch."""
        self.examples += gradients.num_examples
        if self.keep_rows:
                self.rows.append(TokenGradients(
                gradients.offsets, gradients.token_ids, gradients.grads.detach()
            ).to(torch.device("cpu")))

    def finish(self, approximation: str, damping: Optional[float]) -> Curvature:
        r"""The factors, with `damping` (None: `RELATIVE_DAMPING` x the mean eigenvalue)."""
        dim = self.second_moment.shape[0]
        covariance = self.second_moment / max(1, self.positions)
        eigenvalues, basis = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clamp(min=0)  # rounding can make a zero eigenvalue slightly negative
        position_ids = torch.cat(self.token_ids) if self.token_ids else torch.zeros(0, dtype=torch.long)
        tokens, counts = torch.unique(position_ids, return_counts=True)
        n = max(1, self.examples)
        corrected = None
        if approximation == "ekfac":
            corrected = torch.zeros(tokens.numel(), dim, dtype=torch.float64)
            for part in self.rows:
                rotated = part.grads.double() @ basis
                where = torch.searchsorted(tokens, part.token_ids)
                corrected.index_add_(0, where, rotated * rotated)
            corrected /= n
        self.rows, self.token_ids = [], []
        curvature = Curvature(approximation, basis, eigenvalues, tokens, counts.double() / n, corrected, 0.0, n)
        if damping is None:
            mean = curvature.mean_eigenvalue()
            damping = RELATIVE_DAMPING * mean if mean > 0 else 1.0
        return replace(curvature, damping=damping)
