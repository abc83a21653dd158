"""lightning_sam.diagnostics against independent references: the exact Hessian (``torch.autograd.functional.hessian``
on a flattened-parameter functional, then ``eigvalsh``), hand-written sharpness and landscape loops, bit-for-bit state
checks, and the argument errors. Everything in float64 on tiny models (< 200 parameters)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_sam.diagnostics import (
    filter_normalized_direction,
    hessian_eigenvalues,
    hessian_spectrum,
    hessian_trace,
    linear_path,
    loss_landscape,
    preserved_state,
    sharpness,
)
from lightning_sam.diagnostics.sharpness import epsilon_hat
from lightning_sam.perturbation import PerturbGroup, perturb_


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def mlp_batches(sizes=(20, 20)):
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)) for n in sizes
    ]


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)
        with torch.no_grad():  # non-trivial running statistics and affine parameters
            self.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
            self.bn.running_var.copy_(torch.tensor([0.5, 1.5, 2.0]))
            self.bn.weight.copy_(torch.tensor([1.2, 0.8, 1.1]))

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def cnn_batches():
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(12, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))]


def exact_hessian(model: nn.Module, batches) -> torch.Tensor:
    """H of the mean over batches of the batch losses, by autograd.functional.hessian on the flat parameters."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])

    def f(flat):
        parts = flat.split([math.prod(s) for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        return sum(F.cross_entropy(functional_call(model, params, (x,)), y) for x, y in batches) / len(batches)

    return torch.autograd.functional.hessian(f, flat0)


# ------------------------------------------------------------------------------------------ eigenvalues and trace
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_top_k_eigenvalues_match_the_exact_hessian(kind):
    model, batches = (mlp(), mlp_batches()) if kind == "mlp" else (TinyCNN().double(), cnn_batches())
    model.train()  # the default eval_mode=True must switch BatchNorm to its running statistics
    reference = copy.deepcopy(model).eval()
    exact = torch.linalg.eigvalsh(exact_hessian(reference, batches)).flip(0)
    ours = hessian_eigenvalues(model, ce, batches, k=3, max_iter=100, tol=1e-8)
    assert ours.shape == (3,) and ours.dtype == torch.float64
    assert torch.allclose(ours, exact[:3], rtol=1e-3)
    assert abs(ours[0] - exact[0]) <= 1e-3 * abs(exact[0])
    assert model.training  # mode restored


def test_power_iteration_with_deflation_matches_the_exact_top_eigenvalues():
    model, batches = mlp(), mlp_batches()
    exact = torch.linalg.eigvalsh(exact_hessian(model.eval(), batches))
    assert exact[-1] > abs(exact[0])  # power iteration finds the largest magnitude: here the largest value
    ours = hessian_eigenvalues(model, ce, batches, k=2, method="power", max_iter=2000, tol=1e-10)
    assert abs(ours[0] - exact[-1]) <= 1e-3 * exact[-1]
    assert abs(ours[1] - exact[-2]) <= 1e-2 * exact[-2]


def test_train_mode_batchnorm_uses_batch_statistics_when_asked():
    model, batches = TinyCNN().double(), cnn_batches()
    exact_train = torch.linalg.eigvalsh(exact_hessian(copy.deepcopy(model).train(), batches))[-1]
    exact_eval = torch.linalg.eigvalsh(exact_hessian(copy.deepcopy(model).eval(), batches))[-1]
    assert abs(exact_train - exact_eval) > 1e-2 * exact_eval  # the two modes really differ here
    ours = hessian_eigenvalues(model.eval(), ce, batches, eval_mode=False, tol=1e-8)[0]
    assert abs(ours - exact_train) <= 1e-3 * exact_train
    assert not model.training


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_trace_is_within_the_standard_error_of_the_exact_trace(kind):
    model, batches = (mlp(), mlp_batches()) if kind == "mlp" else (TinyCNN().double(), cnn_batches())
    exact = float(torch.trace(exact_hessian(copy.deepcopy(model).eval(), batches)))
    estimate = hessian_trace(model, ce, batches, num_probes=600, tol=None, block_size=50, seed=1)
    assert estimate.num_probes == 600 and estimate.samples.shape == (600,)
    # The estimator's own standard error, checked against the exact variance of Hutchinson's estimator.
    h = exact_hessian(copy.deepcopy(model).eval(), batches)
    exact_se = math.sqrt(2 * float((h**2).sum() - (torch.diagonal(h) ** 2).sum()) / 600)
    assert 0.7 * exact_se < estimate.std_error < 1.3 * exact_se
    assert abs(estimate.trace - exact) <= 4 * estimate.std_error


def test_trace_stops_at_tolerance_and_blocks_give_the_same_probes():
    model, batches = mlp(), mlp_batches()
    one = hessian_trace(model, ce, batches, num_probes=40, tol=None, block_size=1, seed=3)
    block = hessian_trace(model, ce, batches, num_probes=40, tol=None, block_size=8, seed=3)
    assert torch.allclose(one.samples, block.samples, rtol=1e-10)
    early = hessian_trace(model, ce, batches, num_probes=1000, tol=0.2, min_probes=5, seed=3)
    assert 5 <= early.num_probes < 1000 and early.std_error <= 0.2 * abs(early.trace)


def test_spectrum_by_lanczos_quadrature():
    model, batches = mlp(), mlp_batches()
    h = exact_hessian(copy.deepcopy(model).eval(), batches)
    exact = torch.linalg.eigvalsh(h)
    n = h.shape[0]
    spectrum = hessian_spectrum(model, ce, batches, num_steps=n, num_probes=2, seed=4)
    assert spectrum.nodes.shape == (2, n)
    assert torch.allclose(spectrum.weights.sum(dim=1), torch.ones(2, dtype=torch.float64), atol=1e-10)
    assert abs(spectrum.top_eigenvalue - exact[-1]) <= 1e-3 * exact[-1]
    # Quadrature is exact for polynomials of degree < 2·steps: Σ w θ = qᵀHq and Σ w θ² = qᵀH²q for the start vector q.
    g = torch.Generator().manual_seed(4)
    for probe in range(2):
        q = (torch.randint(0, 2, (n,), generator=g).double() * 2 - 1) / math.sqrt(n)
        w, t = spectrum.weights[probe], spectrum.nodes[probe]
        assert abs(float((w * t).sum()) - float(q @ h @ q)) < 1e-8
        assert abs(float((w * t**2).sum()) - float(q @ h @ h @ q)) < 1e-8
    grid, density = spectrum.density(num_points=4000)
    assert abs(float(torch.trapezoid(density, grid)) - 1.0) < 1e-2


def test_same_seed_same_numbers_and_the_global_rng_is_not_consumed():
    model, batches = mlp(), mlp_batches()
    torch.manual_seed(123)
    a = hessian_trace(model, ce, batches, num_probes=5, tol=None, seed=9)
    after = torch.rand(1)
    torch.manual_seed(123)
    b = hessian_trace(model, ce, batches, num_probes=5, tol=None, seed=9)
    assert torch.equal(a.samples, b.samples) and torch.equal(after, torch.rand(1))
    c = hessian_trace(model, ce, batches, num_probes=5, tol=None, seed=10)
    assert not torch.equal(a.samples, c.samples)


# ----------------------------------------------------------------------------------------------------- sharpness
def hand_sharpness(model, batches, rho, m, adaptive=False, eta=0.01):
    """Σ_c n_c [L_c(w + ε_c) − L_c(w)] / Σ_c n_c with explicit loops over batches, chunks and parameters."""
    model = copy.deepcopy(model).eval()
    total, count = 0.0, 0
    for x, y in batches:
        size = x.shape[0]
        step = m or size
        for start in range(0, size, step):
            xc, yc = x[start : start + step], y[start : start + step]
            params = list(model.parameters())
            loss = F.cross_entropy(model(xc), yc)
            grads = torch.autograd.grad(loss, params)
            if adaptive:
                ts = [p.detach().abs() + eta for p in params]
                norm = math.sqrt(sum(float(((t * g) ** 2).sum()) for t, g in zip(ts, grads)))
                eps = [rho * t * t * g / (norm + 1e-12) for t, g in zip(ts, grads)]
            else:
                norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
                eps = [rho * g / (norm + 1e-12) for g in grads]
            moved = copy.deepcopy(model)
            with torch.no_grad():
                for p, e in zip(moved.parameters(), eps):
                    p.add_(e)
                perturbed = F.cross_entropy(moved(xc), yc)
            total += xc.shape[0] * float(perturbed - loss.detach())
            count += xc.shape[0]
    return total / count


@pytest.mark.parametrize("m", [None, 3, 8])
@pytest.mark.parametrize("adaptive", [False, True])
def test_sharpness_matches_the_hand_computation(m, adaptive):
    model, batches = TinyCNN().double(), [cnn_batches()[0], (cnn_batches()[0][0][:7], cnn_batches()[0][1][:7])]
    ours = sharpness(model, ce, batches, rho=0.3, m=m, adaptive=adaptive)
    assert ours == pytest.approx(hand_sharpness(model, batches, 0.3, m, adaptive), rel=1e-9, abs=1e-12)
    assert ours > 0


def test_smaller_m_is_a_different_number_and_chunks_are_weighted_by_size():
    model, batches = mlp(), mlp_batches((10,))
    whole = sharpness(model, ce, batches, rho=0.5)
    by4 = sharpness(model, ce, batches, rho=0.5, m=4)  # chunks of 4, 4 and 2
    assert by4 != pytest.approx(whole)
    assert by4 == pytest.approx(hand_sharpness(model, batches, 0.5, 4), rel=1e-9)


def test_epsilon_is_the_sam_steps_epsilon():
    torch.manual_seed(0)
    params = [torch.randn(4, 3), torch.randn(3)]
    grads = [torch.randn(4, 3), torch.randn(3)]
    for adaptive in (False, True):
        ours = epsilon_hat(params, grads, rho=0.1, adaptive=adaptive, eta=0.02)
        copies = [p.clone() for p in params]
        for p, g in zip(copies, grads):
            p.grad = g.clone()
        perturb_([PerturbGroup(copies, rho=0.1, adaptive=adaptive, eta=0.02)])
        for e, p in zip(ours, copies):
            assert torch.allclose(e, p.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------- landscape
def test_filter_normalization_by_hand():
    model = TinyCNN().double()
    direction = filter_normalized_direction(model, seed=2)
    named = dict(model.named_parameters())
    for p, d in zip(named.values(), direction):
        assert d.shape == p.shape and d.dtype == p.dtype
        if p.dim() <= 1:
            assert torch.count_nonzero(d) == 0  # biases and BatchNorm's affine parameters: ignored (Li et al.)
        else:
            for i in range(p.shape[0]):  # each filter (output unit / channel) has its weight's norm
                assert float(d[i].norm()) == pytest.approx(float(p[i].norm()), rel=1e-10)
    # Unnormalized draws are N(0, 1): the direction is that draw rescaled filter by filter.
    g = torch.Generator().manual_seed(2)
    raw = torch.randn(named["conv.weight"].shape, generator=g, dtype=torch.float64)
    ratio = direction[0] / raw
    for i in range(3):
        assert torch.allclose(ratio[i], ratio[i].flatten()[0].expand_as(ratio[i]))
    kept = filter_normalized_direction(model, seed=2, ignore_1d=False)
    assert float(kept[1].norm()) == pytest.approx(float(named["conv.bias"].norm()), rel=1e-10)


def test_landscape_at_the_origin_is_the_loss_and_off_origin_matches_a_hand_moved_model():
    model, batches = TinyCNN().double(), cnn_batches() + cnn_batches()
    reference = copy.deepcopy(model).eval()
    loss = sum(float(ce(reference, b)) for b in batches) / len(batches)
    one = loss_landscape(model, ce, batches, dims=1, steps=5, span=(-1.0, 1.0), seed=1)
    assert one.alphas[2] == 0 and one.losses[2] == pytest.approx(loss, rel=1e-12)
    moved = copy.deepcopy(reference)
    with torch.no_grad():
        for p, d in zip(moved.parameters(), one.directions[0]):
            p.add_(0.5 * d)
    assert one.losses[3] == pytest.approx(float(ce(moved, batches[0])), rel=1e-12)
    two = loss_landscape(model, ce, batches, dims=2, steps=3, span=(-0.5, 0.5), seed=1)
    assert two.losses.shape == (3, 3) and two.losses[1, 1] == pytest.approx(loss, rel=1e-12)
    moved = copy.deepcopy(reference)
    with torch.no_grad():
        for p, d1, d2 in zip(moved.parameters(), *two.directions):
            p.add_(-0.5 * d1 + 0.5 * d2)
    assert two.losses[0, 2] == pytest.approx(float(ce(moved, batches[0])), rel=1e-12)


def test_linear_path_ends_are_the_two_models():
    a, batches = TinyCNN().double(), cnn_batches()
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.3 * torch.randn_like(p))
        b.bn.running_mean.add_(0.5)
        b.bn.running_var.mul_(0.2)  # extrapolating past b would make it negative
    path = linear_path(a, b, ce, batches, steps=5)
    assert path.losses[0] == pytest.approx(float(ce(copy.deepcopy(a).eval(), batches[0])), rel=1e-12)
    assert path.losses[-1] == pytest.approx(float(ce(copy.deepcopy(b).eval(), batches[0])), rel=1e-9)
    # Past the ends: parameters extrapolated, statistics those of the nearer model (no NaN from a negative variance).
    beyond = linear_path(a, b, ce, batches, steps=3, span=(-0.5, 1.5))
    assert torch.isfinite(beyond.losses).all() and beyond.ts.tolist() == [-0.5, 0.5, 1.5]
    by_hand = copy.deepcopy(b).eval()
    with torch.no_grad():
        for p, pa, pb in zip(by_hand.parameters(), a.parameters(), b.parameters()):
            p.copy_(pa + 1.5 * (pb - pa))
    assert beyond.losses[2] == pytest.approx(float(ce(by_hand, batches[0])), rel=1e-9)


# ------------------------------------------------------------------------------------------------ state untouched
def snapshot(model):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        {n: b.detach().clone() for n, b in model.named_buffers()},
        {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
        torch.get_rng_state(),
    )


def assert_same(model, before):
    params, buffers, grads, modes, rng = before
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
        grad, value = grads[n]
        assert p.grad is grad, n  # the same tensor object (or None)
        if grad is not None:
            assert torch.equal(p.grad, value), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)


CALLS = {
    "eigenvalues": lambda m, b: hessian_eigenvalues(m, ce, b, k=2, max_iter=10),
    "power": lambda m, b: hessian_eigenvalues(m, ce, b, method="power", max_iter=5),
    "trace": lambda m, b: hessian_trace(m, ce, b, num_probes=3),
    "spectrum": lambda m, b: hessian_spectrum(m, ce, b, num_steps=5),
    "sharpness": lambda m, b: sharpness(m, ce, b, rho=0.1, m=5),
    "landscape": lambda m, b: loss_landscape(m, ce, b, dims=2, steps=3),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("eval_mode", [True, False])
def test_model_is_left_exactly_as_it_was(name, eval_mode):
    model = nn.Sequential(TinyCNN(), nn.Dropout(0.3)).double().train()
    model[0].fc.eval()  # a mixed mode must come back as it was
    model[0].conv.weight.grad = torch.randn_like(model[0].conv.weight)
    model[0].fc.bias.grad = torch.randn_like(model[0].fc.bias)  # others: None
    model[0].bn.weight.requires_grad_(False)  # frozen: not measured, not moved
    batches = cnn_batches()
    torch.manual_seed(77)
    before = snapshot(model)
    call = CALLS[name]
    if eval_mode:
        call(model, batches)
    else:
        kwargs = dict(eval_mode=False)
        {
            "eigenvalues": lambda: hessian_eigenvalues(model, ce, batches, k=2, max_iter=10, **kwargs),
            "power": lambda: hessian_eigenvalues(model, ce, batches, method="power", max_iter=5, **kwargs),
            "trace": lambda: hessian_trace(model, ce, batches, num_probes=3, **kwargs),
            "spectrum": lambda: hessian_spectrum(model, ce, batches, num_steps=5, **kwargs),
            "sharpness": lambda: sharpness(model, ce, batches, rho=0.1, m=5, **kwargs),
            "landscape": lambda: loss_landscape(model, ce, batches, dims=1, steps=3, **kwargs),
        }[name]()
    assert_same(model, before)


def test_state_is_restored_after_an_exception():
    model = TinyCNN().double().eval()
    model.conv.weight.grad = torch.randn_like(model.conv.weight)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with preserved_state(model, eval_mode=False):
            assert model.training
            with torch.no_grad():
                model.conv.weight.add_(1.0)
                model.bn.running_mean.add_(1.0)
            model.conv.weight.grad.add_(1.0)
            model.conv.weight.grad = None  # a .grad dropped ...
            model.fc.weight.grad = torch.ones_like(model.fc.weight)  # ... and one created
            torch.rand(3)
            raise RuntimeError("boom")
    assert_same(model, before)


# ---------------------------------------------------------------------------------------------------- bad input
class Counting:
    def __init__(self, fn=ce):
        self.fn, self.calls = fn, 0

    def __call__(self, model, batch):
        self.calls += 1
        return self.fn(model, batch)


ALL = {
    "eigenvalues": lambda m, f, b: hessian_eigenvalues(m, f, b),
    "trace": lambda m, f, b: hessian_trace(m, f, b),
    "spectrum": lambda m, f, b: hessian_spectrum(m, f, b),
    "sharpness": lambda m, f, b: sharpness(m, f, b),
    "landscape": lambda m, f, b: loss_landscape(m, f, b),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_no_trainable_parameter_is_refused_before_any_work(name):
    model = mlp().requires_grad_(False)
    loss_fn = Counting()
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        ALL[name](model, loss_fn, mlp_batches())
    assert loss_fn.calls == 0


@pytest.mark.parametrize("name", sorted(ALL))
def test_empty_batches_are_refused_before_any_work(name):
    loss_fn = Counting()
    with pytest.raises(ValueError, match="`batches` is empty"):
        ALL[name](mlp(), loss_fn, iter([]))
    assert loss_fn.calls == 0


@pytest.mark.parametrize("name", sorted(ALL))
def test_a_non_scalar_loss_is_refused_at_the_first_loss(name):
    loss_fn = Counting(lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    with pytest.raises(ValueError, match=r"scalar loss, got a tensor of shape \(20,\)"):
        ALL[name](mlp(), loss_fn, mlp_batches())
    assert loss_fn.calls == 1  # the first forward, before any Hessian product or perturbation


def test_k_larger_than_the_parameter_count_is_refused_before_any_work():
    model = nn.Linear(2, 1).double()  # 3 parameters
    loss_fn = Counting(lambda m, b: (m(b) ** 2).mean())
    with pytest.raises(ValueError, match=r"`k`=4 is larger than the number of parameters with requires_grad \(3\)"):
        hessian_eigenvalues(model, loss_fn, [torch.randn(4, 2, dtype=torch.float64)], k=4)
    assert loss_fn.calls == 0
    # k = n works and is exact for a quadratic: H = 2/N · [x 1]ᵀ[x 1]
    x = torch.randn(6, 2, dtype=torch.float64)
    ones = torch.cat([x, torch.ones(6, 1, dtype=torch.float64)], 1)
    exact = torch.linalg.eigvalsh(2 / 6 * ones.T @ ones).flip(0)
    assert torch.allclose(hessian_eigenvalues(model, loss_fn, [x], k=3, tol=1e-10), exact, rtol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: hessian_eigenvalues(mlp(), ce, mlp_batches(), k=0), "`k` must be an int >= 1"),
        (lambda: hessian_eigenvalues(mlp(), ce, mlp_batches(), method="arnoldi"), '`method` must be "lanczos"'),
        (lambda: hessian_eigenvalues(mlp(), "ce", mlp_batches()), "`loss_fn` must be a callable"),
        (lambda: hessian_eigenvalues(mlp(), ce, mlp_batches()[0][0]), "`batches` must be an iterable of batches"),
        (lambda: sharpness(mlp(), ce, mlp_batches(), rho=0), "`rho` must be > 0"),
        (lambda: sharpness(mlp(), ce, mlp_batches(), m=0), "`m` must be an int >= 1"),
        (lambda: loss_landscape(mlp(), ce, mlp_batches(), dims=3), "`dims` must be 1 or 2"),
        (lambda: loss_landscape(mlp(), ce, mlp_batches(), span=(1, -1)), "low < high"),
        (lambda: hessian_trace(mlp(), ce, mlp_batches(), num_probes=0), "`num_probes` must be an int >= 1"),
        (lambda: hessian_eigenvalues(nn.Module(), ce, mlp_batches()), "no parameter with requires_grad"),
        (lambda: linear_path(mlp(), nn.Linear(5, 3).double(), ce, mlp_batches()), "same parameters"),
    ],
)
def test_argument_errors_say_what_is_wrong(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


# ------------------------------------------------------------------------------------------------------ plotting
def test_plotting_helpers_draw_what_they_are_given(tmp_path):
    pytest.importorskip("matplotlib")
    from lightning_sam.diagnostics import plotting

    plt = plotting.pyplot()
    model, batches = mlp(), mlp_batches()
    spectrum = hessian_spectrum(model, ce, batches, num_steps=8)
    one = loss_landscape(model, ce, batches, dims=1, steps=5)
    two = loss_landscape(model, ce, batches, dims=2, steps=4)
    path = linear_path(model, mlp(), ce, batches, steps=3)
    fig, axes = plt.subplots(1, 5, figsize=(15, 3))
    plotting.plot_spectrum({"a": spectrum, "b": spectrum}, ax=axes[0])
    plotting.plot_landscape_1d({"w": one, "raw": (one.alphas, one.losses)}, ax=axes[1])
    plotting.plot_landscape_2d(two, ax=axes[2])
    plotting.plot_linear_path(path, labels=("SGD", "SAM"), ax=axes[3])
    plotting.plot_eigenvalue_history({"SGD": [(0, 1.0), (1, 2.0)]}, ax=axes[4])
    assert len(axes[0].lines) == 2 and len(axes[1].lines) == 2 and len(axes[4].lines) == 1
    assert list(axes[1].lines[0].get_ydata()) == one.losses.tolist()
    assert list(axes[3].lines[0].get_ydata()) == path.losses.tolist()
    fig.savefig(tmp_path / "all.png")
    plt.close(fig)
    with pytest.raises(ValueError, match="needs a 2-D landscape"):
        plotting.plot_landscape_2d(one)
