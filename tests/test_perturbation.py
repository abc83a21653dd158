"""The math core against the paper's formulas (tests/reference.py), and its cost: multi-tensor, no sync, one buffer."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_sam.perturbation import PerturbGroup, perturb_, restore_
from reference import sam_epsilon


def _params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


@pytest.mark.parametrize("adaptive", [False, True])
def test_epsilon_matches_formula_with_per_group_rho(adaptive):
    params = _params([(4, 3), (3,), (2, 2, 2)])
    w0 = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    groups = [
        PerturbGroup(params[:2], rho=0.05, adaptive=adaptive, eta=0.1),
        PerturbGroup(params[2:], rho=0.3, adaptive=adaptive, eta=0.1),
    ]
    pert = perturb_(groups, epsilon=1e-12)
    expected = sam_epsilon(w0, grads, [0.05, 0.05, 0.3], adaptive=adaptive, eta=0.1)
    for p, w, e in zip(params, w0, expected):
        torch.testing.assert_close(p.detach() - w, e, rtol=1e-5, atol=1e-7)
    ts = [(w.abs() + 0.1) if adaptive else torch.ones_like(w) for w in w0]
    expected_norm = math.sqrt(sum(float(((t * g) ** 2).sum()) for t, g in zip(ts, grads)))
    assert float(pert.grad_norm) == pytest.approx(expected_norm, rel=1e-6)


def test_epsilon_has_norm_rho_and_points_up_the_gradient():
    params = _params([(10, 10), (10,)])
    grads = [p.grad.clone() for p in params]
    w0 = [p.detach().clone() for p in params]
    perturb_([PerturbGroup(params, rho=0.07)])
    eps = [p.detach() - w for p, w in zip(params, w0)]
    assert math.sqrt(sum(float((e**2).sum()) for e in eps)) == pytest.approx(0.07, rel=1e-5)
    assert sum(float((e * g).sum()) for e, g in zip(eps, grads)) > 0


def test_restore_is_bitwise_and_grads_hold_epsilon():
    params = _params([(7, 5), (5,)])
    w0 = [p.detach().clone() for p in params]
    pert = perturb_([PerturbGroup(params, rho=0.5)])
    for p, w in zip(params, w0):
        assert not torch.equal(p.detach(), w)
        torch.testing.assert_close(p.grad, p.detach() - w, rtol=1e-6, atol=1e-7)
    restore_(pert)
    for p, w in zip(params, w0):
        assert torch.equal(p.detach(), w)  # bit for bit: copied back, not w + ε - ε


@pytest.mark.parametrize("epsilon", [0.0, 1e-12])
def test_zero_gradient_gives_zero_perturbation(epsilon):
    params = _params([(3, 3)])
    params[0].grad.zero_()
    w0 = params[0].detach().clone()
    pert = perturb_([PerturbGroup(params, rho=0.05)], epsilon=epsilon)
    assert torch.equal(params[0].detach(), w0)
    assert bool(pert.finite)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_norm_leaves_weights_in_place(bad):
    params = _params([(3, 3), (3,)])
    params[1].grad[0] = bad
    w0 = [p.detach().clone() for p in params]
    pert = perturb_([PerturbGroup(params, rho=0.05, adaptive=True)], guard_nonfinite=True)
    assert not bool(pert.finite)
    for p, w in zip(params, w0):
        assert torch.equal(p.detach(), w)
        assert torch.isfinite(p).all()


def test_parameters_without_gradients_are_untouched():
    moving, frozen, unused = _params([(3, 3), (3,), (2,)])
    frozen.requires_grad_(False)
    frozen.grad = None
    unused.grad = None
    before = [frozen.detach().clone(), unused.detach().clone()]
    pert = perturb_([PerturbGroup([moving, frozen, unused], rho=0.1)])
    assert pert.params == [moving]
    assert torch.equal(frozen, before[0]) and torch.equal(unused, before[1])
    assert perturb_([PerturbGroup([frozen, unused], rho=0.1)]) is None


class _OpRecorder(TorchDispatchMode):
    """Records every aten op, and the elements of the new (non-in-place) tensors they allocate."""

    def __init__(self):
        super().__init__()
        self.ops, self.allocated = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view:  # metadata only, no kernel
            return out
        self.ops.append(name)
        if not name.endswith("_"):
            outs = out if isinstance(out, (list, tuple)) else [out]
            self.allocated += sum(t.numel() for t in outs if isinstance(t, torch.Tensor))
        return out


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("guard", [False, True])
def test_kernel_count_does_not_grow_with_the_number_of_parameters(adaptive, guard):
    counts = []
    for n in (4, 64):
        params = _params([(5,)] * n)
        with _OpRecorder() as rec:
            restore_(perturb_([PerturbGroup(params, rho=0.05, adaptive=adaptive)], guard_nonfinite=guard))
        counts.append(len(rec.ops))
        assert not any(op in ("item", "_local_scalar_dense", "is_nonzero") for op in rec.ops)  # no host sync
    assert counts[0] == counts[1], "a Python loop launches kernels per parameter"


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("guard", [False, True])
def test_extra_memory_is_one_parameter_sized_buffer(adaptive, guard):
    params = _params([(64, 64), (64,), (32, 64)])
    size = sum(p.numel() for p in params)
    with _OpRecorder() as rec:
        perturb_([PerturbGroup(params, rho=0.05, adaptive=adaptive)], guard_nonfinite=guard)
    assert size <= rec.allocated <= size + 64  # the backup (ASAM: T, reused as the backup) plus a few scalars
