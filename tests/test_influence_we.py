"""InfluenceWE (K-FAC, EK-FAC, ASTRA) against dense matrices built here, on a tiny float64 model."""

import pytest
import torch
from conftest import assert_close
from torch import nn
from torch.utils.data import TensorDataset

from captum_tracin_we import InfluenceWE, load_checkpoint, save_checkpoint, TracInWE
from captum_tracin_we._core.index import IndexMismatchError

V, D, N_CLASSES = 20, 3, 3
EXCLUDED = 5
RATES = (0.5, 2.0)
CE = nn.CrossEntropyLoss()


class Tiny(nn.Module):
    """Embeddings (padding 0), a per-position layer and a pooled nonlinearity, so tokens interact."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(V, D, padding_idx=0)
        self.hidden = nn.Linear(D, 4)
        self.out = nn.Linear(4, N_CLASSES)

    def forward(self, ids):
        mask = (ids != 0).unsqueeze(-1).to(self.hidden.weight.dtype)
        pooled = (torch.tanh(self.hidden(self.embedding(ids))) * mask).sum(1)
        return self.out(torch.tanh(pooled))


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, 6), generator=g)
    ids[:, 2] = ids[:, 4]  # a repeated token in every example
    ids[::3, 1] = EXCLUDED
    lengths = torch.randint(3, 7, (n,), generator=g)
    ids = ids.masked_fill(torch.arange(6) >= lengths.unsqueeze(1), 0)  # padding
    return TensorDataset(ids, torch.randint(0, N_CLASSES, (n,), generator=g))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = Tiny().double().eval()
    folder = tmp_path_factory.mktemp("tiny")
    paths = []
    for c, rate in enumerate(RATES):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 * torch.randn_like(p))
        paths.append(str(folder / f"c{c}.pt"))
        save_checkpoint(model, paths[-1], learning_rate=rate)
    return model, data(14, 1), data(4, 2), paths


def influence_we(tiny, **kwargs):
    model, train, _, paths = tiny
    kwargs.setdefault("exclude_token_ids", [EXCLUDED])
    return InfluenceWE(model, train, paths, loss_fn=CE, batch_size=5, **kwargs)


# -- the dense oracle -----------------------------------------------------------


def kept(ids):
    """Positions whose gradient counts: not padding, not the excluded token."""
    return (ids != 0) & (ids != EXCLUDED)


def dense_gradients(model, ids, labels, loss_fn=nn.functional.cross_entropy):
    """Per example, the dense V x d gradient of its loss with respect to E (excluded rows zeroed),
    and the gradients at the kept positions."""
    rows, positions = [], []
    for i in range(len(ids)):
        out = {}
        handle = model.embedding.register_forward_hook(lambda m, a, o: out.setdefault("e", o))
        loss = loss_fn(model(ids[i:i + 1]), labels[i:i + 1])
        handle.remove()
        grad_e, grad_out = torch.autograd.grad(loss, [model.embedding.weight, out["e"]])
        grad_e = grad_e.clone()
        grad_e[EXCLUDED] = 0
        rows.append(grad_e)
        positions.append(grad_out[0][kept(ids[i])])
    return torch.stack(rows), torch.cat(positions)


def dense_fisher(model, ids, labels, approximation):
    """The block-diagonal K-FAC or EK-FAC matrix over vec(E) (V*d square) and its default damping."""
    grads, deltas = dense_gradients(model, ids, labels)
    n = len(ids)
    covariance = deltas.T @ deltas / len(deltas)
    eigenvalues, basis = torch.linalg.eigh(covariance)
    counts = torch.bincount(ids[kept(ids)], minlength=V).double() / n
    seen = counts > 0
    if approximation == "kfac":
        table = counts.unsqueeze(1) * eigenvalues.clamp(min=0).unsqueeze(0)
    else:
        table = ((grads @ basis) ** 2).mean(0)  # (V, d): ((Q^T g_w)_k)^2 averaged over examples
    blocks = [basis @ torch.diag(table[w]) @ basis.T for w in range(V)]
    damping = 0.1 * float(table[seen].mean())
    return torch.block_diag(*blocks), damping


def dense_scores(tiny, approximation, damping=None, fisher_labels=None, curvature=None,
                 loss_fn=nn.functional.cross_entropy):
    """sum_c lr_c vec(G(z'))^T (M_c + lambda I)^-1 vec(G(z)), M_c the dense Fisher (or `curvature`)."""
    model, train, test, paths = tiny
    (train_ids, train_labels), (test_ids, test_labels) = train.tensors, test.tensors
    total = 0
    for c, path in enumerate(paths):
        rate = load_checkpoint(model, path)
        labels = train_labels if fisher_labels is None else fisher_labels[c]
        matrix, default = dense_fisher(model, train_ids, labels, approximation)
        if curvature is not None:
            matrix = curvature(model, train_ids, train_labels)
        lam = default if damping is None else damping
        g_train = dense_gradients(model, train_ids, train_labels, loss_fn)[0].reshape(len(train_ids), -1)
        g_test = dense_gradients(model, test_ids, test_labels, loss_fn)[0].reshape(len(test_ids), -1)
        solved = torch.linalg.solve(matrix + lam * torch.eye(V * D, dtype=torch.float64), g_test.T)
        total = total + rate * solved.T @ g_train.T
    return total.detach()


def dense_gauss_newton(model, ids, labels, squared_error=False):
    """(1/n) sum_z J_z^T H_out J_z over vec(E), J_z = d outputs / d E (padding and excluded rows fixed);
    H_out is softmax's diag(p) - p p^T, or 2 I for the squared error."""
    weight = model.embedding.weight
    frozen = torch.zeros(V, dtype=torch.bool)
    frozen[[0, EXCLUDED]] = True
    total = torch.zeros(V * D, V * D, dtype=torch.float64)
    for i in range(len(ids)):
        def outputs(w, i=i):
            w = torch.where(frozen.unsqueeze(1), weight.detach(), w)
            e = nn.functional.embedding(ids[i:i + 1], w)
            mask = (ids[i:i + 1] != 0).unsqueeze(-1).double()
            pooled = (torch.tanh(model.hidden(e)) * mask).sum(1)
            return model.out(torch.tanh(pooled))[0]

        jacobian = torch.autograd.functional.jacobian(outputs, weight.detach()).reshape(N_CLASSES, -1)
        p = outputs(weight.detach()).softmax(0)
        hessian = 2 * torch.eye(N_CLASSES, dtype=torch.float64) if squared_error else torch.diag(p) - torch.outer(p, p)
        total += jacobian.T @ hessian @ jacobian
    return (total / len(ids)).detach()


def test_dense_gradients_are_tracin_we_gradients(tiny):
    """The oracle's own check: its dense gradients give TracInWE's scores."""
    model, train, test, paths = tiny
    expected = 0
    for path in paths:
        rate = load_checkpoint(model, path)
        g_train = dense_gradients(model, *train.tensors)[0].reshape(len(train), -1)
        g_test = dense_gradients(model, *test.tensors)[0].reshape(len(test), -1)
        expected = expected + rate * g_test @ g_train.T
    tracin = TracInWE(model, train, paths, loss_fn=CE, batch_size=5, exclude_token_ids=[EXCLUDED])
    assert_close(tracin.influence(test.tensors), expected, rtol=1e-12)


@pytest.mark.parametrize("approximation", ["kfac", "ekfac"])
def test_kfac_and_ekfac_equal_the_dense_block_diagonal_inverse(tiny, approximation):
    _, _, test, _ = tiny
    scores = influence_we(tiny, approximation=approximation).influence(test.tensors)
    assert_close(scores, dense_scores(tiny, approximation), rtol=1e-10)
    # a damping of one's own
    scores = influence_we(tiny, approximation=approximation, damping=0.01).influence(test.tensors)
    assert_close(scores, dense_scores(tiny, approximation, damping=0.01), rtol=1e-10)


def test_sampled_fisher_draws_the_documented_labels(tiny):
    model, train, test, paths = tiny
    seed, drawn = 3, []
    for c, path in enumerate(paths):
        load_checkpoint(model, path)
        generator = torch.Generator().manual_seed(seed * 1000003 + c)
        labels = []
        for start in range(0, len(train), 5):  # batch by batch, in reading order
            with torch.no_grad():
                p = model(train.tensors[0][start:start + 5]).double().softmax(1)
            labels.append(torch.multinomial(p, 1, generator=generator).squeeze(1))
        drawn.append(torch.cat(labels))
    assert not torch.equal(drawn[0], train.tensors[1])  # another Fisher than the empirical one
    scores = influence_we(tiny, fisher="sampled", seed=seed).influence(test.tensors)
    assert_close(scores, dense_scores(tiny, "ekfac", fisher_labels=drawn), rtol=1e-10)
    empirical = influence_we(tiny).influence(test.tensors)
    assert (scores - empirical).abs().max() > 1e-6 * empirical.abs().max()


def test_a_huge_damping_ranks_as_tracin_we(tiny):
    model, train, test, paths = tiny
    damping = 1e9
    for path in paths:  # each checkpoint on its own
        one = [path]
        influence = InfluenceWE(model, train, one, loss_fn=CE, batch_size=5, damping=damping)
        tracin = TracInWE(model, train, one, loss_fn=CE, batch_size=5)
        scores, raw = influence.influence(test.tensors), tracin.influence(test.tensors)
        assert_close(scores * damping, raw, rtol=1e-6)
        assert torch.equal(scores.argsort(dim=1), raw.argsort(dim=1))


def test_astra_converges_to_the_dense_gauss_newton_inverse(tiny):
    _, _, test, _ = tiny
    damping = 0.05
    exact = dense_scores(tiny, "ekfac", damping=damping, curvature=dense_gauss_newton)
    astra = influence_we(tiny, damping=damping, refinement_steps=100).influence(test.tensors)
    assert_close(astra, exact, rtol=1e-6)


def test_astra_shows_its_progress_and_stays_quiet_without(tiny, capsys):
    _, _, test, _ = tiny
    method = influence_we(tiny, damping=0.05, refinement_steps=3)
    quiet = method.influence(test.tensors)
    assert "ASTRA refinement" not in capsys.readouterr().err
    shown = method.influence(test.tensors, show_progress=True)
    err = capsys.readouterr().err
    n = len(test.tensors[0])
    for c in (0, 1):  # a bar per checkpoint, over test examples x steps
        assert f"ASTRA refinement at checkpoint {c} (test examples x steps):" in err and f"0/{3 * n} [" in err
    assert torch.equal(quiet, shown)


def test_astra_with_a_squared_error_loss(tiny):
    """MSELoss (summed per example over the outputs): H_out = 2 I."""
    model, train, test, paths = tiny
    targets = lambda d: TensorDataset(d.tensors[0], nn.functional.one_hot(d.tensors[1], N_CLASSES).double())  # noqa: E731
    squared = (targets(train), targets(test))
    mse = nn.MSELoss(reduction="sum")
    damping = 1.0  # its EK-FAC (empirical Fisher) preconditions H = 2 J^T J less well: a larger damping converges faster
    exact = dense_scores((model, *squared, paths), "ekfac", damping=damping, loss_fn=mse,
                         curvature=lambda m, ids, labels: dense_gauss_newton(m, ids, labels, squared_error=True))
    astra = InfluenceWE(model, squared[0], paths, loss_fn=mse, batch_size=5, exclude_token_ids=[EXCLUDED],
                        damping=damping, refinement_steps=100).influence(squared[1].tensors)
    assert_close(astra, exact, rtol=1e-6)


def test_astra_beats_plain_neumann_steps(tiny):
    """After a few steps, the preconditioned iterate is closer to the Gauss-Newton score than as many
    plain Neumann steps v <- v + a (g - (H + lambda I) v), with the same rule for the step
    (1 / (1.1 x the largest eigenvalue of the iterated matrix))."""
    model, train, test, paths = tiny
    damping, steps = 0.05, 3
    exact = dense_scores(tiny, "ekfac", damping=damping, curvature=dense_gauss_newton)
    astra = influence_we(tiny, damping=damping, refinement_steps=steps).influence(test.tensors)
    plain = 0
    for path in paths:
        rate = load_checkpoint(model, path)
        matrix = dense_gauss_newton(model, *train.tensors) + damping * torch.eye(V * D, dtype=torch.float64)
        step = 1 / (1.1 * float(torch.linalg.eigvalsh(matrix).max()))
        g_train = dense_gradients(model, *train.tensors)[0].reshape(len(train), -1)
        g = dense_gradients(model, *test.tensors)[0].reshape(len(test), -1).T
        v = step * g
        for _ in range(steps):
            v = v + step * (g - matrix @ v)
        plain = plain + rate * v.T @ g_train.T

    def error(scores):
        return float((scores - exact).abs().max() / exact.abs().max())

    assert error(astra) < error(plain) / 2, (error(astra), error(plain))


def test_stochastic_astra_reading_every_batch_is_the_exact_iteration(tiny):
    _, _, test, _ = tiny
    exact = influence_we(tiny, damping=0.05, refinement_steps=3).influence(test.tensors)
    for batches in (3, 10):  # 14 examples in batches of 5: 3 batches
        stochastic = influence_we(tiny, damping=0.05, refinement_steps=3, refinement_batches=batches)
        assert torch.equal(stochastic.influence(test.tensors), exact)


def per_checkpoint_and_batch(tiny, damping, refined):
    """Per checkpoint c and training batch S: rate_c x the dense scores `refined(P, H_S + lambda I, g)^T g_train`,
    P the dense EK-FAC inverse, H_S the Gauss-Newton matrix of S, g the test gradients (columns)."""
    model, train, test, paths = tiny
    (train_ids, train_labels), (test_ids, test_labels) = train.tensors, test.tensors
    batches = [slice(0, 5), slice(5, 10), slice(10, 14)]  # 14 examples in batches of 5
    eye = torch.eye(V * D, dtype=torch.float64)
    per_checkpoint = []
    for path in paths:
        rate = load_checkpoint(model, path)
        fisher, _ = dense_fisher(model, train_ids, train_labels, "ekfac")
        precondition = torch.linalg.inv(fisher + damping * eye)
        g_train = dense_gradients(model, train_ids, train_labels)[0].reshape(len(train_ids), -1)
        g = dense_gradients(model, test_ids, test_labels)[0].reshape(len(test_ids), -1).T
        per_checkpoint.append([
            (rate * refined(precondition, dense_gauss_newton(model, train_ids[s], train_labels[s]) + damping * eye,
                            g).T @ g_train.T).detach()
            for s in batches
        ])
    return per_checkpoint


def drawn_pairs(scores, per_checkpoint, rtol):
    """The (batch at checkpoint 0, batch at checkpoint 1) pairs whose dense scores equal `scores`."""
    candidates = {(a, b): per_checkpoint[0][a] + per_checkpoint[1][b] for a in range(3) for b in range(3)}
    assert min(float((x - y).abs().max()) for x in candidates.values() for y in candidates.values()
               if x is not y) > 1e-6  # the nine are told apart
    return [pair for pair, expected in candidates.items()
            if float((scores - expected).abs().max()) <= rtol * float(expected.abs().max())]


def test_astra_on_drawn_batches_converges_to_their_gauss_newton_inverse(tiny):
    """With `refinement_batches` the power iterations and every step use the same drawn batch per checkpoint,
    so the estimated step is right for its matrix and the iterations converge to (H_S + lambda I)^-1 g."""
    _, _, test, _ = tiny
    damping = 0.05
    per_checkpoint = per_checkpoint_and_batch(tiny, damping, lambda p, matrix, g: torch.linalg.solve(matrix, g))
    method = influence_we(tiny, damping=damping, refinement_steps=300, refinement_batches=1)  # H_S converges slower
    assert len(drawn_pairs(method.influence(test.tensors), per_checkpoint, 1e-6)) == 1


def test_a_stochastic_astra_step_uses_the_gauss_newton_matrix_of_one_drawn_batch(tiny):
    """One step, alpha given, one batch: at each checkpoint the refined score is the dense
    v = P g + alpha P (g - (H_S + lambda I) P g) with H_S the Gauss-Newton matrix of one training batch S,
    the same S for every test example; which batch each checkpoint drew is found among the 3 x 3."""
    _, _, test, _ = tiny
    damping, step = 0.05, 0.3

    def one_step(precondition, matrix, g):
        v = precondition @ g
        return v + step * precondition @ (g - matrix @ v)

    per_checkpoint = per_checkpoint_and_batch(tiny, damping, one_step)
    method = influence_we(tiny, damping=damping, refinement_steps=1, refinement_step_size=step,
                          refinement_batches=1)
    scores = method.influence(test.tensors)
    assert len(drawn_pairs(scores, per_checkpoint, 1e-10)) == 1
    assert method.method_name == "InfluenceWE (EK-FAC, ASTRA 1 step, Gauss-Newton of 1 batch)"
    # the same draws for a test example alone, and for the same query again
    assert_close(method.influence(tuple(t[:1] for t in test.tensors)), scores[:1], rtol=1e-12)
    assert torch.equal(method.influence(test.tensors), scores)
    # another seed draws other batches somewhere (a 1 in 9 chance per seed of the same pair)
    others = {float(influence_we(tiny, damping=damping, refinement_steps=1, refinement_step_size=step,
                                 refinement_batches=1, seed=seed).influence(test.tensors).sum())
              for seed in range(1, 6)}
    assert len(others | {float(scores.sum())}) > 1


def test_refinement_batches_is_checked(tiny):
    model, train, _, paths = tiny
    with pytest.raises(ValueError, match=r"^`refinement_batches` must be an int >= 1 \(or None for every batch\), "
                                         r"got 0\.$"):
        influence_we(tiny, refinement_steps=1, refinement_batches=0)
    with pytest.raises(ValueError, match=r"^`refinement_batches` sets how many training batches ASTRA's "
                                         r"Gauss-Newton matrix is made of, and ASTRA runs only with "
                                         r"`refinement_steps` > 0"):
        influence_we(tiny, refinement_batches=2)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(*train.tensors))

    with pytest.raises(ValueError, match=r"^`refinement_batches` draws training batches by their position, which "
                                         r"needs the number of batches"):
        InfluenceWE(model, Stream(), paths, loss_fn=CE, batch_size=5, refinement_steps=1, refinement_batches=1)


def test_word_terms_add_up_to_the_scores(tiny):
    _, _, test, _ = tiny
    for kwargs in ({}, {"normalize": "cosine"}, {"approximation": "kfac", "normalize": "train"}):
        influence = influence_we(tiny, **kwargs)
        scores = influence.influence(test.tensors)
        words = influence.word_influence(test.tensors, [0, 3, 7])
        for i, row in enumerate(words):
            for entry in row:
                assert abs(float(entry.scores.sum() - scores[i, entry.train_index])) < 1e-12


def test_factors_fitted_once_saved_and_checked_on_load(tiny, tmp_path):
    _, _, test, _ = tiny
    fitted = influence_we(tiny)
    factors = fitted.fit_factors(str(tmp_path / "factors"))
    assert len(factors) == len(RATES) and factors[0].corrected.shape[1] == D
    # only tokens seen in training (neither padding nor the excluded token) have rows
    assert 0 not in factors[0].tokens.tolist() and EXCLUDED not in factors[0].tokens.tolist()
    loaded = influence_we(tiny)
    loaded.load_factors(str(tmp_path / "factors"))
    assert_close(loaded.influence(test.tensors), fitted.influence(test.tensors), rtol=1e-14)
    with pytest.raises(IndexMismatchError, match=r"different approximation"):
        influence_we(tiny, approximation="kfac").load_factors(str(tmp_path / "factors"))
    with pytest.raises(IndexMismatchError, match=r"different damping_option"):
        influence_we(tiny, damping=0.3).load_factors(str(tmp_path / "factors"))
    with pytest.raises(IndexMismatchError, match=r"different exclude_token_ids"):
        influence_we(tiny, exclude_token_ids=None).load_factors(str(tmp_path / "factors"))


def test_the_index_of_training_rows_serves_influence_we_unchanged(tiny, tmp_path):
    model, train, test, paths = tiny
    TracInWE(model, train, paths, loss_fn=CE, batch_size=5, exclude_token_ids=[EXCLUDED]).build_index(
        str(tmp_path / "index")
    )
    for kwargs in ({}, {"normalize": "cosine"}):
        direct = influence_we(tiny, **kwargs).influence(test.tensors)
        indexed = influence_we(tiny, **kwargs)
        indexed.load_index(str(tmp_path / "index"))
        assert_close(indexed.influence(test.tensors), direct, rtol=1e-12)
        assert_close(indexed.self_influence(), influence_we(tiny, **kwargs).self_influence(), rtol=1e-12)


def test_a_query_from_an_index_loads_each_checkpoint_once_and_rounds_like_its_rows(tiny, tmp_path):
    """Normalising with an index in several chunks needs the factors, not the model: no reload per chunk.
    A float16 index's cosines are within float32 rounding of 1 (the rows were rounded), not float64's."""
    model, train, test, paths = tiny
    loads = []

    def counted(model, path):
        loads.append(path)
        return load_checkpoint(model, path)

    for dtype in (None, torch.float16):
        folder = str(tmp_path / f"index-{dtype}")
        TracInWE(model, train, paths, loss_fn=CE, batch_size=5, exclude_token_ids=[EXCLUDED]).build_index(
            folder, chunk_size=5, dtype=dtype)
        indexed = influence_we(tiny, normalize="cosine", checkpoints_load_func=counted)
        indexed.fit_factors()
        indexed.load_index(folder, check_gradients=False)
        assert indexed.index.num_chunks(0) == 3
        loads.clear()
        scores = indexed.influence(test.tensors)
        assert len(loads) == len(paths)
        assert bool((scores.abs() <= 1).all())
        direct = influence_we(tiny, normalize="cosine").influence(test.tensors)
        assert_close(scores, direct, rtol=1e-12 if dtype is None else 1e-2)


def test_self_influence_is_the_diagonal(tiny):
    _, train, _, _ = tiny
    influence = influence_we(tiny)
    scores = influence.influence(train.tensors)
    assert_close(influence.self_influence(), torch.diagonal(scores), rtol=1e-12)
    assert bool((influence.self_influence() > 0).all())


@pytest.mark.parametrize("kwargs, message", [
    ({"approximation": "diagonal"}, "`approximation` must be one of 'ekfac', 'kfac'; got 'diagonal'."),
    ({"fisher": "true"}, "`fisher` must be one of 'empirical', 'sampled'; got 'true'."),
    ({"normalize": "l2"}, "`normalize` must be one of None, 'cosine', 'train'; got 'l2'."),
    ({"damping": -0.1}, "`damping` must be a finite number > 0 (or None for the default), got -0.1."),
    ({"damping": 0}, "`damping` must be a finite number > 0 (or None for the default), got 0."),
    ({"refinement_steps": -1}, "`refinement_steps` must be an int >= 0, got -1."),
    ({"refinement_steps": 2, "normalize": "cosine"}, "`normalize` with `refinement_steps` would need"),
])
def test_bad_options_are_refused_with_the_valid_values(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        influence_we(tiny, **kwargs)


def test_refinement_and_sampled_fisher_refuse_other_losses(tiny):
    model, train, _, paths = tiny
    with pytest.raises(ValueError, match=r"`refinement_steps` needs the Gauss-Newton matrix of the loss, which "
                                         r"InfluenceWE knows for torch.nn.CrossEntropyLoss and torch.nn.MSELoss; "
                                         r"`loss_fn` is NLLLoss"):
        InfluenceWE(model, train, paths, loss_fn=nn.NLLLoss(), refinement_steps=1)
    with pytest.raises(ValueError, match=r"`fisher='sampled'` draws labels .* needs `loss_fn` to be a "
                                         r"torch.nn.CrossEntropyLoss; got None"):
        InfluenceWE(model, train, paths, fisher="sampled")


def test_factor_and_index_folders_are_never_mistaken_for_each_other(tiny, tmp_path):
    model, train, _, paths = tiny
    tracin = TracInWE(model, train, paths, loss_fn=CE, batch_size=5, exclude_token_ids=[EXCLUDED])
    tracin.build_index(str(tmp_path / "index"))
    influence = influence_we(tiny)
    with pytest.raises(FileExistsError, match=r"is not a folder of saved factors \(it holds a training-gradient index\)"):
        influence.fit_factors(str(tmp_path / "index"))
    assert (tmp_path / "index" / "manifest.json").exists()  # untouched
    with pytest.raises(IndexMismatchError, match=r"holds a training-gradient index, not saved factors"):
        influence.load_factors(str(tmp_path / "index"))
    influence.fit_factors(str(tmp_path / "factors"))
    with pytest.raises(FileExistsError, match=r"holds InfluenceWE factors, not a TracInWE index"):
        tracin.build_index(str(tmp_path / "factors"))
    with pytest.raises(IndexMismatchError, match=r"holds InfluenceWE factors, not a training-gradient index"):
        tracin.load_index(str(tmp_path / "factors"))
    influence.fit_factors(str(tmp_path / "factors"))  # saved factors are replaced


def test_altered_factor_files_are_refused(tiny, tmp_path):
    from captum_tracin_we._core.index import CorruptIndexError

    influence_we(tiny).fit_factors(str(tmp_path / "factors"))
    array = tmp_path / "factors" / "c1-corrected.npy"
    data = bytearray(array.read_bytes())
    data[-2] ^= 0xFF
    array.write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError, match=r"Factor file .*c1-corrected.npy' has changed since it was written"):
        influence_we(tiny).load_factors(str(tmp_path / "factors"))
    manifest = tmp_path / "factors" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"empirical"', '"sampled"'))
    with pytest.raises(CorruptIndexError, match=r"manifest of the factors at .* was edited"):
        influence_we(tiny).load_factors(str(tmp_path / "factors"))


def test_top_k_tokens_and_aggregate(tiny):
    _, train, test, _ = tiny
    influence = influence_we(tiny, top_k_tokens=2)
    scores = influence.influence(test.tensors)
    assert not torch.allclose(scores, influence_we(tiny).influence(test.tensors))
    for i, row in enumerate(influence.word_influence(test.tensors, [0, 5])):
        for entry in row:
            assert entry.token_ids.numel() <= 2
            assert abs(float(entry.scores.sum() - scores[i, entry.train_index])) < 1e-12
    assert_close(influence.self_influence(), torch.diagonal(influence.influence(train.tensors)), rtol=1e-12)
    # the aggregate row scores the sum of the test losses: the sum of the rows, preconditioning being linear
    exact = influence_we(tiny)
    assert_close(exact.influence(test.tensors, aggregate=True), exact.influence(test.tensors).sum(0, keepdim=True),
                 rtol=1e-12)


def test_a_projected_index_serves_raw_scores_but_not_training_self_products(tiny, tmp_path):
    model, train, test, paths = tiny
    TracInWE(model, train, paths, loss_fn=CE, batch_size=5, exclude_token_ids=[EXCLUDED]).build_index(
        str(tmp_path / "index"), projection_dim=2
    )
    influence = influence_we(tiny)
    influence.load_index(str(tmp_path / "index"))
    assert influence.influence(test.tensors).shape == (len(test), len(train))
    with pytest.raises(ValueError, match=r"`normalize` and the training `self_influence` precondition the training "
                                         r"rows, which this index stores projected"):
        influence.self_influence()


def test_a_diverging_refinement_is_refused(tiny):
    _, _, test, _ = tiny
    with pytest.raises(RuntimeError, match=r"ASTRA diverges at checkpoint 0: .* Pass a smaller `refinement_step_size`"):
        influence_we(tiny, damping=0.05, refinement_steps=8, refinement_step_size=50.0).influence(test.tensors)


def test_a_negative_checkpoint_weight_still_normalises(tiny):
    """A sibling that subtracts a checkpoint (debiasing) keeps cosines in [-1, 1]: s uses |weight|."""
    model, train, test, paths = tiny

    class Debiased(TracInWE):
        def _checkpoint_weight(self, c, learning_rate):
            return -learning_rate if c == 0 else learning_rate

    raw = Debiased(model, train, paths, loss_fn=CE, batch_size=5).influence(test.tensors)
    cosine = Debiased(model, train, paths, loss_fn=CE, batch_size=5, normalize="cosine").influence(test.tensors)
    s_test = TracInWE(model, train, paths, loss_fn=CE, batch_size=5).self_influence(test.tensors)
    s_train = TracInWE(model, train, paths, loss_fn=CE, batch_size=5).self_influence()
    assert_close(cosine, raw / torch.sqrt(s_test.unsqueeze(1) * s_train.unsqueeze(0)), rtol=1e-12)
    assert bool((cosine.abs() <= 1).all()) and bool((cosine != 0).any())


def test_astra_masks_token_labels_set_to_ignore_index(tmp_path):
    """A tagger (outputs (B, C, L), labels (B, L) with -100 at padding): ignored positions have no loss,
    so no Gauss-Newton term either."""
    v, d, c, length = 12, 3, 3, 5

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(v, d, padding_idx=0)
            self.mix, self.out = nn.Linear(d, d), nn.Linear(d, c)

        def forward(self, ids):
            e = self.embedding(ids)
            return self.out(torch.tanh(e + torch.tanh(self.mix(e)).mean(1, keepdim=True))).transpose(1, 2)

    def tagged(n, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, v, (n, length), generator=g)
        pad = torch.arange(length) >= torch.randint(2, length + 1, (n, 1), generator=g)
        labels = torch.randint(0, c, (n, length), generator=g).masked_fill(pad, -100)
        return TensorDataset(ids.masked_fill(pad, 0), labels)

    torch.manual_seed(0)
    model = Tagger().double().eval()
    save_checkpoint(model, str(tmp_path / "c.pt"))
    train, test, damping = tagged(10, 1), tagged(3, 2), 0.05
    weight = model.embedding.weight

    def outputs(w, ids):
        return torch.func.functional_call(model, {"embedding.weight": w}, (ids,))[0]  # (C, L)

    def gradient(ids, labels):
        loss = nn.functional.cross_entropy(outputs(weight, ids).T, labels, reduction="sum")
        return torch.autograd.grad(loss, weight)[0].reshape(-1)

    gauss_newton = torch.zeros(v * d, v * d, dtype=torch.float64)
    for ids, labels in zip(*train.tensors):
        jacobian = torch.autograd.functional.jacobian(lambda w: outputs(w, ids[None]), weight.detach())
        jacobian = jacobian.reshape(c, length, v * d)
        p = outputs(weight, ids[None]).detach().softmax(0)
        for position in (labels != -100).nonzero().flatten().tolist():
            q = p[:, position]
            gauss_newton += jacobian[:, position].T @ (torch.diag(q) - torch.outer(q, q)) @ jacobian[:, position]
    gauss_newton /= len(train)
    g_train = torch.stack([gradient(ids[None], labels) for ids, labels in zip(*train.tensors)])
    g_test = torch.stack([gradient(ids[None], labels) for ids, labels in zip(*test.tensors)])
    exact = torch.linalg.solve(gauss_newton + damping * torch.eye(v * d, dtype=torch.float64), g_test.T).T @ g_train.T
    astra = InfluenceWE(model, train, [str(tmp_path / "c.pt")], loss_fn=nn.CrossEntropyLoss(), batch_size=5,
                        damping=damping, refinement_steps=150).influence(test.tensors)
    assert_close(astra, exact.detach(), rtol=1e-6)


def test_factors_of_another_loss_or_an_altered_checkpoint_are_refused(tiny, tmp_path):
    model, train, test, paths = tiny

    def make(loss_fn):
        return InfluenceWE(model, train, paths, batch_size=5, exclude_token_ids=[EXCLUDED], loss_fn=loss_fn)

    make(lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")).fit_factors(str(tmp_path / "f"))
    # a lambda of the same name: only its gradients tell it apart
    other = make(lambda out, y: 5 * nn.functional.cross_entropy(out, y, reduction="none"))
    with pytest.raises(IndexMismatchError, match=r"At checkpoint 0, the training gradients recomputed with this "
                                                 r"model and `loss_fn` differ .* from those stored in the factors"):
        other.load_factors(str(tmp_path / "f"))
    loaded = make(lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))
    loaded.load_factors(str(tmp_path / "f"))
    loaded.influence(test.tensors)
    torch.save(torch.load(paths[0], weights_only=True), paths[0])  # rewritten: a new file state
    with pytest.raises(IndexMismatchError, match=r"Checkpoint 0 changed since the curvature factors were fitted"):
        loaded.influence(test.tensors)
