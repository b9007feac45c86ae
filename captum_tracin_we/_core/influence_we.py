r"""
``InfluenceWE``: influence functions through the word-embedding matrix, with
K-FAC or EK-FAC curvature and an optional ASTRA refinement (DESIGN.md section 7),
as a sibling of ``TracInWE`` on the token-influence core: it only preconditions
the test rows at each checkpoint (`_transform_test`), so the training side, the
index, the word-level terms and the queries are the core's.
"""

import hashlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Union

import torch
from torch import Tensor
from torch.nn import Module
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from captum_tracin_we._core.curvature import APPROXIMATIONS, Curvature, FactorFit
from captum_tracin_we._core.embedding_gradients import LossFn
from captum_tracin_we._core.factor_files import check_factor_path, load_factors, save_factors
from captum_tracin_we._core.gauss_newton import add_rows, check_gauss_newton_loss, gauss_newton_times
from captum_tracin_we._core.index import IndexMismatchError
from captum_tracin_we._core.products import diagonal_products
from captum_tracin_we._core.token_gradients import TokenGradients
from captum_tracin_we._core.token_influence import (
    check_path,
    MODEL_AND_DATA_ARGS,
    TOKEN_ARGS,
    TokenInfluenceBase,
)
from captum_tracin_we._utils.checkpoints import load_checkpoint
from captum_tracin_we._utils.fingerprints import file_state
from captum_tracin_we._utils.values import check_choice, check_int, check_number

__all__ = ["InfluenceWE"]

# where the Fisher's labels come from: the training labels, or draws from the model's prediction
FISHERS = ("empirical", "sampled")
# power iterations that estimate the largest eigenvalue of the preconditioned matrix (ASTRA's step)
POWER_STEPS = 10
# the step is 1 / (margin x that estimate): power iterations approach the eigenvalue from below
STEP_MARGIN = 1.1


class InfluenceWE(TokenInfluenceBase):
    r"""
    Influence functions restricted to the word-embedding matrix E (V x d):

        I(z, z') = sum_c lr_c * sum_{w in T(z) & T(z')} g_c(z)_w^T (F_c,w + lambda I)^-1 g_c(z')_w

    where F_c,w is the curvature block of row w of E at checkpoint c, from
    K-FAC (``a_w S``) or EK-FAC (``Q diag(Lambda[w]) Q^T``; see
    `captum_tracin_we._core.curvature`), fitted over the training data. With
    one checkpoint and learning rate 1 this is the classic influence function
    at that model, with the curvature of the word embeddings only. Positive
    scores are proponents, as in TracIn. The lookup's input is one-hot, so the
    curvature is per token: scores stay sums over the tokens two examples share,
    with word-level terms (`word_influence`) that add up to them, and an index
    of training rows (`build_index`) is the same as TracInWE's: only the test
    rows are preconditioned.

    With ``refinement_steps=k > 0`` (ASTRA, Wang et al. 2025), the EK-FAC
    inverse preconditions k iterations towards ``(H + lambda I)^-1 g(z')``, H the
    exact Gauss-Newton matrix of the training loss restricted to E, which also
    couples tokens that occur together (EK-FAC drops those blocks):
    ``v <- v + alpha P (g - (H + lambda I) v)`` from ``v = P g``. The refined test
    vector touches the rows of the training tokens too, so word-level terms can
    then name tokens the test example lacks. Each iteration is one
    Gauss-Newton-vector product over the whole training set: per test example
    and checkpoint, k passes of a forward in forward mode and a forward and
    backward pass per training batch (about 3 TracInWE passes each), plus, once
    per checkpoint, `POWER_STEPS` = 10 such products that set the step alpha
    unless `refinement_step_size` is given. It is slow by nature: use it on a
    few test examples, or with `refinement_batches`, which iterates with the
    Gauss-Newton matrix of a random sample of the training batches.

    The factors are fitted in one pass over the training data per checkpoint
    (`fit_factors`; the first query fits them if needed) and can be saved and
    loaded (`load_factors`). They hold only the tokens seen in training: a
    d x d basis and, for EK-FAC, a (tokens seen) x d table per checkpoint.
    EK-FAC fitting holds one checkpoint's training token gradients in memory
    (as many floats as one checkpoint of an exact index); K-FAC none.
    `self_influence` with `refinement_steps` refines every example it scores:
    for the training set, n x k Gauss-Newton products per checkpoint.

    Everything else (the model, data, checkpoints and embedding module
    conventions, and what is refused) is as in `TracInWE`.
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
        approximation: str = "ekfac",
        damping: Optional[float] = None,
        fisher: str = "empirical",
        refinement_steps: int = 0,
        normalize: Optional[str] = None,
        exclude_token_ids: Optional[Iterable[int]] = None,
        top_k_tokens: Optional[int] = None,
        seed: int = 0,
        refinement_step_size: Optional[float] = None,
        refinement_batches: Optional[int] = None,
    ) -> None:
        self.approximation = check_choice(approximation, "approximation", APPROXIMATIONS)
        self.fisher = check_choice(fisher, "fisher", FISHERS)
        self.damping = None if damping is None else check_number(
            damping, "damping", 0.0, " (or None for the default)", strict=True
        )
        self.refinement_steps = check_int(refinement_steps, "refinement_steps", minimum=0)
        self._show_refinement = False
        self.seed = check_int(seed, "seed", minimum=0)
        self.refinement_step_size = None if refinement_step_size is None else check_number(
            refinement_step_size, "refinement_step_size", 0.0, " (or None to estimate it)", strict=True
        )
        self.refinement_batches = None if refinement_batches is None else check_int(
            refinement_batches, "refinement_batches", minimum=1, alternative=" (or None for every batch)"
        )
        if self.refinement_batches is not None and not self.refinement_steps:
            raise ValueError(
                "`refinement_batches` sets how many training batches ASTRA's Gauss-Newton "
                "matrix is made of, and ASTRA runs only with `refinement_steps` > 0: pass "
                "`refinement_steps`, or leave `refinement_batches=None`."
            )
        if self.fisher == "sampled" and not isinstance(loss_fn, torch.nn.CrossEntropyLoss):
            raise ValueError(
                "`fisher='sampled'` draws labels from the model's predicted class probabilities, "
                "which needs `loss_fn` to be a torch.nn.CrossEntropyLoss; got "
                f"{type(loss_fn).__name__ if loss_fn is not None else 'None'}. Use `fisher='empirical'`."
            )
        if self.refinement_steps:
            check_gauss_newton_loss(loss_fn, "loss_fn")
            if normalize is not None:
                raise ValueError(
                    "`normalize` with `refinement_steps` would need the refined self influence of "
                    "every training example (refinement_steps passes over the data each); use "
                    "`normalize` with `refinement_steps=0`, or raw refined scores."
                )
        super().__init__(
            model, train_dataset, checkpoints, checkpoints_load_func, embedding_layer, loss_fn,
            batch_size, test_loss_fn, top_k_tokens, exclude_token_ids, normalize,
        )
        if self.refinement_batches is not None and self.train_dataloader_len is None:
            raise ValueError(
                "`refinement_batches` draws training batches by their position, which needs the number "
                "of batches: give a `train_dataset` (or DataLoader) with a `len`, or "
                "`refinement_batches=None` to read every batch."
            )
        self.factors: Optional[List[Curvature]] = None
        self._factor_checkpoints: List[Any] = []  # the checkpoint files' states when the factors were made
        self._step_sizes: Dict[int, float] = {}

    __init__.__doc__ = "\n        Args:\n" + MODEL_AND_DATA_ARGS + r"""
            approximation (str, optional): The curvature of each token's block:
                    "ekfac" (eigenvalues refitted per token) or "kfac".
                    Default: "ekfac"
            damping (float, optional): lambda, added to every eigenvalue; > 0.
                    None uses 0.1 x the mean eigenvalue over the tokens seen in
                    training, per checkpoint (Kronfluence's heuristic), or 1.0
                    where that mean is 0 (no gradient at all).
                    Default: None
            fisher (str, optional): "empirical" fits the curvature with the
                    training labels; "sampled" with labels drawn from the
                    model's prediction (a cross-entropy `loss_fn` only), at
                    checkpoint c from a CPU `torch.Generator` seeded with
                    `seed * 1000003 + c`, batch by batch in reading order
                    (`torch.multinomial` of the softmax of the outputs).
                    Default: "empirical"
            refinement_steps (int, optional): ASTRA iterations (see the class
                    docstring) with the exact Gauss-Newton matrix, for a
                    `torch.nn.CrossEntropyLoss` or `torch.nn.MSELoss` `loss_fn`;
                    0 gives plain K-FAC / EK-FAC scores.
                    Default: 0
""" + TOKEN_ARGS["normalize"].format(
        metric=",\n                    here g^T (F + lambda I)^-1 g",
        cost="\n                    Normalising preconditions every training row once per\n"
        "                    query (an index is then read whole).",
    ) + TOKEN_ARGS["exclude_token_ids"] + TOKEN_ARGS["top_k_tokens"] + """\
            seed (int, optional): Seed of the sampled Fisher's labels and of the
                    start of the power iterations that set ASTRA's step.
                    Default: 0
            refinement_step_size (float, optional): ASTRA's step alpha; None
                    estimates 1 / (1.1 x the largest eigenvalue of
                    P (H + lambda I)) by power iteration, which makes every
                    step contract.
                    Default: None
            refinement_batches (int, optional): Training batches whose
                    Gauss-Newton matrix H_S ASTRA inverts. None reads every
                    batch: H itself. k draws k of the training batches at
                    random per checkpoint c (seeded by `seed` and c), the
                    same for every step, power iteration and test example,
                    so the iterations converge to ``(H_S + lambda I)^-1 g``
                    as surely as the exact ones do to H's, about
                    (batches / k) times cheaper; H_S, the mean over the drawn
                    batches' examples, has expectation H when every batch
                    is as large (a smaller last batch biases it slightly),
                    and is noisier for rare tokens with fewer batches. (A new
                    draw per product, as in stochastic iterations, makes
                    every residual a sample: its growth cannot tell a
                    divergence from noise, and on MiniLM it tripped the
                    guard at once.) k >= the number of batches is exact.
                    Default: None
"""

    def _name_options(self) -> List[str]:
        options = ["EK-FAC" if self.approximation == "ekfac" else "K-FAC"]
        if self.refinement_steps:
            steps = self.refinement_steps
            options.append(f"ASTRA {steps} step{'s' if steps > 1 else ''}")
            if self.refinement_batches is not None:
                options.append(f"Gauss-Newton of {self.refinement_batches} "
                               f"batch{'es' * (self.refinement_batches > 1)}")
        return options + super()._name_options()

    # -- the curvature factors -------------------------------------------------

    def fit_factors(self, path: Optional[str] = None, show_progress: bool = False) -> List[Curvature]:
        r"""
        Fits the curvature factors at every checkpoint in one pass over the
        training data each, and keeps them for the queries.

        Args:

            path (str, optional): If given, a folder to save the factors in
                    (numpy arrays and a checksummed JSON manifest, no pickle),
                    which `load_factors` reads back.
                    Default: None
            show_progress (bool, optional): Show a progress bar over
                    checkpoints and training batches.
                    Default: False

        Returns:
            factors (list[Curvature]): one per checkpoint, also kept as `self.factors`.
        """
        dim = self._embedding_dim()
        if path is not None:  # before any work
            check_path(path)
            check_factor_path(path)
            description = self._factor_description()
            probe_indices = self._probe_indices(description["training_data"]["examples"])
        factors, probes = [], []
        states = [file_state(checkpoint) for checkpoint in self.checkpoints]
        with self._progress("curvature factors", show_progress) as bar:
            for c, _ in enumerate(self._load_checkpoints()):
                fit = FactorFit(dim, keep_rows=self.approximation == "ekfac")
                loss = self._fisher_loss(c)
                for indices, batch in self._train_batches(bar):
                    rows = self._token_gradients(
                        batch, "train_dataset", indices=indices, exact=True, loss=loss,
                        on_positions=fit.add_positions,
                    )
                    fit.add_rows(rows)
                factors.append(fit.finish(self.approximation, self.damping))
                if path is not None:
                    probes.append(self._probe_gradients(probe_indices))
        self.factors, self._factor_checkpoints, self._step_sizes = factors, states, {}
        if path is not None:
            save_factors(path, description, factors, probe_indices, probes)
        return factors

    def load_factors(self, path: str, check_gradients: bool = True) -> List[Curvature]:
        r"""
        Reads factors saved by `fit_factors(path)` and keeps them for the
        queries, after checking that they were fitted from this model
        architecture, these checkpoints (by content), this training data and
        loss, and these options (`approximation`, `fisher`, `seed`, `damping`,
        `exclude_token_ids`): else `IndexMismatchError` names what differs. A
        file or manifest altered since is refused (`CorruptIndexError`). A
        checkpoint file that changes after loading is refused at the next query.

        Args:

            path (str): The folder of saved factors.
            check_gradients (bool, optional): Recompute, at every checkpoint,
                    the gradients of the 16 training examples the factors keep,
                    as `load_index` does: names and shapes cannot tell two
                    forward passes or two loss functions apart.
                    Default: True

        Returns:
            factors (list[Curvature]): one per checkpoint, also kept as `self.factors`.
        """
        check_path(path)
        states = [file_state(checkpoint) for checkpoint in self.checkpoints]
        factors, probe_indices, probe = load_factors(path, self._factor_description(), type(self).__name__)
        if check_gradients:
            self._check_stored_gradients(
                probe_indices, probe, f"the factors at {path!r}", "Fit them again with `fit_factors(path)`"
            )
        self.factors, self._factor_checkpoints, self._step_sizes = factors, states, {}
        return self.factors

    def _factor_description(self) -> Dict[str, Any]:
        description = self._index_description()
        del description["top_k_tokens"]  # factors are fitted on every token
        description.update({
            "approximation": self.approximation,
            "fisher": self.fisher,
            "seed": self.seed if self.fisher == "sampled" else None,
            "damping_option": self.damping,
        })
        return description

    def _fisher_loss(self, c: int) -> LossFn:
        r"""The loss whose gradients the factors are fitted on at checkpoint `c` (None: `loss_fn`)."""
        if self.fisher == "empirical":
            return None
        generator = torch.Generator().manual_seed(self.seed * 1000003 + c)
        return _SampledLabels(self._losses["loss_fn"], generator)

    # -- hooks ---------------------------------------------------------------

    def _prepare(self, show_progress: bool) -> None:
        self._show_refinement = show_progress  # the query's bar shows no progress while ASTRA refines
        if self.factors is None:
            self.fit_factors(show_progress=show_progress)
            return
        for c, checkpoint in enumerate(self.checkpoints):
            if file_state(checkpoint) != self._factor_checkpoints[c]:
                raise IndexMismatchError(
                    f"Checkpoint {c} changed since the curvature factors were fitted or loaded, "
                    "so they are those of its old weights: fit them again with `fit_factors`, or "
                    "restore the checkpoint."
                )

    def _transform_test(self, c: int, test: TokenGradients) -> TokenGradients:
        assert self.factors is not None
        curvature = self.factors[c]
        if test.grads.shape[1] != curvature.basis.shape[0]:
            raise ValueError(
                f"InfluenceWE cannot precondition rows of {test.grads.shape[1]} dims with factors of "
                f"{curvature.basis.shape[0]}: `normalize` and the training `self_influence` "
                "precondition the training rows, which this index stores projected. Use an index "
                "built without `projection_dim` for them."
            )
        if not self.refinement_steps:
            return curvature.inverse_times(test)
        with tqdm(desc=f"ASTRA refinement at checkpoint {c} (test examples x steps)", leave=False,
                  total=test.num_examples * self.refinement_steps, disable=not self._show_refinement) as bar:
            return TokenGradients.concat([self._refined(c, test.select([i]), bar) for i in range(test.num_examples)])

    # -- ASTRA -----------------------------------------------------------------

    def _refined(self, c: int, gradient: TokenGradients, bar: tqdm) -> TokenGradients:
        r"""
        `refinement_steps` preconditioned iterations towards `(H + lambda I)^-1 g`
        for one example (H that of the drawn batches with `refinement_batches`).
        With a step below 2 / the largest eigenvalue of P (H + lambda I), the
        residual's P-norm `sqrt(r^T P r)` shrinks at every step (P (H + lambda I)
        is similar to a symmetric matrix); if it grows instead, the step is too
        large and the result would be wrong.
        """
        curvature = self.factors[c]  # type: ignore[index]
        step = self._step_size(c)
        vector = curvature.inverse_times(gradient)
        first = None
        for _ in range(self.refinement_steps):
            residual = add_rows([(1.0, gradient), (-1.0, self._damped_gauss_newton(c, vector))])
            preconditioned = curvature.inverse_times(residual)  # the same rows as `residual`
            size = float((preconditioned.grads * residual.grads).sum().clamp(min=0).sqrt())
            first = size if first is None else first
            if size > 1.5 * first:
                raise RuntimeError(
                    f"ASTRA diverges at checkpoint {c}: the residual's P-norm grew from {first:.3g} to "
                    f"{size:.3g} with step {step:.3g}. Pass a smaller `refinement_step_size` (or None "
                    "to estimate it), or a larger `damping`."
                )
            vector = add_rows([(1.0, vector), (step, preconditioned)])
            bar.update()
        return vector

    def _damped_gauss_newton(self, c: int, vector: TokenGradients) -> TokenGradients:
        r"""`(H + lambda I) v` at the loaded checkpoint `c`, H over the batches `_drawn` there."""
        curvature = self.factors[c]  # type: ignore[index]
        with self._progress("Gauss-Newton products", False) as bar:
            batches = self._train_batches(bar)
            chosen = self._drawn(c)
            if chosen is not None:  # every batch is read, for the order check; only the drawn ones run
                batches = (batch for position, batch in enumerate(batches) if position in chosen)
            product = gauss_newton_times(
                self.model, self._tap, batches, self._losses["loss_fn"], vector,
                self.excluded_token_ids, self._checkpoint_context,
            )
        return add_rows([(1.0, product), (curvature.damping, vector)])

    def _drawn(self, c: int) -> Optional[Set[int]]:
        r"""
        The positions of the training batches that every Gauss-Newton product at
        checkpoint `c` reads with `refinement_batches`; None reads them all.
        """
        batches = self.train_dataloader_len
        if self.refinement_batches is None or batches is None or self.refinement_batches >= batches:
            return None
        key = hashlib.sha256(f"{self.seed}/{c}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
        return set(torch.randperm(batches, generator=generator)[:self.refinement_batches].tolist())

    def _step_size(self, c: int) -> float:
        r"""ASTRA's step at checkpoint `c`: given, or from the largest eigenvalue of P (H + lambda I)."""
        if self.refinement_step_size is not None:
            return self.refinement_step_size
        if c not in self._step_sizes:
            curvature = self.factors[c]  # type: ignore[index]
            weight = self.embedding_layer.weight
            generator = torch.Generator().manual_seed(self.seed)
            tokens = curvature.tokens.to(weight.device)
            grads = torch.randn(tokens.numel(), weight.shape[1], generator=generator, dtype=torch.float64)
            offsets = torch.tensor([0, tokens.numel()], device=weight.device)
            vector = TokenGradients(offsets, tokens, grads.to(weight.device, weight.dtype))
            # rows of tokens unseen in training have H = 0 there, so P (H + lambda I) = I: eigenvalue 1
            largest = 1.0
            for _ in range(POWER_STEPS):
                product = self._damped_gauss_newton(c, vector)
                # the Rayleigh quotient of the pencil (H + lambda I, P^-1): at most the largest eigenvalue
                # of P (H + lambda I), and closer to it than the power iteration's norm ratio
                quotient = float(diagonal_products(product, vector)) / float(
                    diagonal_products(curvature.damped_times(vector), vector)
                )
                largest = max(largest, quotient)
                image = curvature.inverse_times(product)
                norm = float(image.grads.norm())
                if norm == 0:
                    break
                vector = TokenGradients(image.offsets, image.token_ids, image.grads / norm)
            self._step_sizes[c] = 1.0 / (STEP_MARGIN * largest)
        return self._step_sizes[c]


class _SampledLabels:
    r"""
    The per-example cross-entropy of labels drawn from the model's predicted
    class probabilities (the outputs' softmax over dimension 1), for a sampled Fisher.
    """

    def __init__(self, loss: LossFn, generator: torch.Generator) -> None:
        self.loss, self.generator = loss, generator

    def __call__(self, outputs: Tensor, labels: Any) -> Tensor:
        if outputs.dim() != 2:
            raise ValueError(
                f"`fisher='sampled'` needs outputs of shape (batch, classes), got {tuple(outputs.shape)}; "
                "use `fisher='empirical'`."
            )
        probabilities = outputs.detach().double().softmax(dim=1).cpu()
        drawn = torch.multinomial(probabilities, 1, generator=self.generator).squeeze(1)
        return self.loss(outputs, drawn.to(outputs.device))  # type: ignore[misc]

