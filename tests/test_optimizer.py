"""SAMOptimizer against a hand computation of SAM on linear regression with plain SGD."""

import copy

import pytest
import torch

from lightning_sam import SAMOptimizer
from reference import linreg_grads, linreg_sam_sgd


def _problem(n_batches=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 3, generator=gen))
        model.bias.copy_(torch.randn(1, generator=gen))
    batches = [(torch.randn(8, 3, generator=gen), torch.randn(8, generator=gen)) for _ in range(n_batches)]
    return model, batches


def _loss(model, x, y):
    return ((model(x).squeeze(-1) - y) ** 2).mean()


def _initial(model):
    return model.weight.detach().clone(), model.bias.detach().clone()


@pytest.mark.parametrize("adaptive", [False, True])
def test_first_and_second_step_match_hand_computation(adaptive):
    model, batches = _problem()
    w_ref, b_ref = linreg_sam_sgd(*_initial(model), batches, lr=0.1, rho_w=0.2, rho_b=0.5, adaptive=adaptive, eta=0.05)
    opt = SAMOptimizer(
        [{"params": [model.weight]}, {"params": [model.bias], "rho": 0.5}],
        torch.optim.SGD,
        rho=0.2,
        adaptive=adaptive,
        eta=0.05,
        lr=0.1,
    )
    for x, y in batches:
        _loss(model, x, y).backward()
        opt.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        opt.second_step(zero_grad=True)
    torch.testing.assert_close(model.weight.detach(), w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bias.detach(), b_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precomputed", [False, True])
def test_step_with_closure_matches_hand_computation(precomputed):
    model, batches = _problem()
    w_ref, b_ref = linreg_sam_sgd(*_initial(model), batches, lr=0.1, rho_w=0.1)
    opt = SAMOptimizer(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    calls = 0
    for x, y in batches:

        def closure():
            nonlocal calls
            calls += 1
            opt.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            return loss

        if precomputed:  # the familiar pattern: first backward done, step() only needs the second pass
            _loss(model, x, y).backward()
        loss = opt.step(closure)
        assert torch.is_tensor(loss)
        opt.zero_grad()
    assert calls == (1 if precomputed else 2) * len(batches)
    torch.testing.assert_close(model.weight.detach(), w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bias.detach(), b_ref, rtol=1e-5, atol=1e-6)


def test_base_step_starts_from_w_bit_for_bit():
    model, batches = _problem(1)
    x, y = batches[0]
    w0 = model.weight.detach().clone()
    opt = SAMOptimizer(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.0)  # lr=0: the step must not move w
    _loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(model.weight.detach(), w0)
    _loss(model, x, y).backward()
    opt.second_step()
    assert torch.equal(model.weight.detach(), w0)


def test_state_dict_holds_base_state_and_resumes_exactly():
    model, batches = _problem(6)
    twin = copy.deepcopy(model)

    def make(m):
        return SAMOptimizer(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9)

    def train(m, opt, data):
        for x, y in data:
            _loss(m, x, y).backward()
            opt.first_step(zero_grad=True)
            _loss(m, x, y).backward()
            opt.second_step(zero_grad=True)

    opt = make(model)
    train(model, opt, batches)

    opt_a = make(twin)
    train(twin, opt_a, batches[:3])
    state = copy.deepcopy(opt_a.state_dict())
    assert all("momentum_buffer" in s for s in state["state"].values()) and len(state["state"]) == 2
    assert state["param_groups"][0]["rho"] == 0.05
    opt_b = make(twin)
    opt_b.load_state_dict(state)
    assert opt_b.state is opt_b.base_optimizer.state and opt_b.param_groups is opt_b.base_optimizer.param_groups
    train(twin, opt_b, batches[3:])
    assert torch.equal(twin.weight, model.weight) and torch.equal(twin.bias, model.bias)


def test_lr_scheduler_reaches_the_base_optimizer():
    model, _ = _problem(1)
    opt = SAMOptimizer(model.parameters(), torch.optim.SGD, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(2, 3)).sum().backward()
    opt.first_step(zero_grad=True)
    model(torch.randn(2, 3)).sum().backward()
    opt.second_step()
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


def test_grad_scaler_overflow_skips_perturbation_and_step():
    model, batches = _problem(1)
    x, y = batches[0]
    w0, b0 = _initial(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    opt = SAMOptimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaler.scale(_loss(model, x, y) * float("inf")).backward()  # the first pass overflows
    norm = opt.first_step(zero_grad=True, grad_scaler=scaler)
    assert not torch.isfinite(norm)
    assert torch.equal(model.weight.detach(), w0) and torch.equal(model.bias.detach(), b0)  # ε = 0, no NaN
    scaler.scale(_loss(model, x, y)).backward()  # a finite second pass must not sneak a step through
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    assert torch.equal(model.weight.detach(), w0) and torch.equal(model.bias.detach(), b0)
    assert scaler.get_scale() < 2.0**20

    # and the next, finite step is an ordinary SAM step on the unscaled gradient
    w_ref, b_ref = linreg_sam_sgd(w0, b0, [(x, y)], lr=0.1, rho_w=0.05)
    scaler.scale(_loss(model, x, y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(_loss(model, x, y)).backward()
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    torch.testing.assert_close(model.weight.detach(), w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bias.detach(), b_ref, rtol=1e-5, atol=1e-6)


def test_misuse_is_reported():
    model, _ = _problem(1)
    opt = SAMOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    model(torch.randn(2, 3)).sum().backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()
    opt.restore()
    with pytest.raises(TypeError, match="base_optimizer"):
        SAMOptimizer(model.parameters(), "sgd", lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAMOptimizer([{"params": model.parameters(), "rho": -1.0}], torch.optim.SGD, lr=0.1)


def test_grads_after_first_step_are_the_reference_ones():
    """The gradient handed to the base optimizer is ∇L(w+ε), the hand-computed one."""
    model, batches = _problem(1)
    x, y = batches[0]
    w0, b0 = _initial(model)
    opt = SAMOptimizer(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    _loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    _loss(model, x, y).backward()
    gw, gb = linreg_grads(w0, b0, x, y)
    norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
    hw, hb = linreg_grads(w0 + 0.1 * gw / norm, b0 + 0.1 * gb / norm, x, y)
    torch.testing.assert_close(model.weight.grad, hw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bias.grad, hb, rtol=1e-5, atol=1e-6)


def test_step_with_closure_never_reuses_old_gradients():
    """A loop of step(closure) without zero_grad: each step must take its own gradient at w."""
    model, batches = _problem()
    w_ref, b_ref = linreg_sam_sgd(*_initial(model), batches, lr=0.1, rho_w=0.1)
    opt = SAMOptimizer(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    for x, y in batches:

        def closure():
            loss = _loss(model, x, y)
            loss.backward()
            return loss

        opt.step(closure)
    torch.testing.assert_close(model.weight.detach(), w_ref, rtol=1e-5, atol=1e-6)


def test_guard_loss_skips_the_step_even_when_unscaling_first_to_clip():
    model, batches = _problem(1)
    x, y = batches[0]
    w0, b0 = _initial(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = SAMOptimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaler.scale(_loss(model, x, y) * float("inf")).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(opt.guard_loss(_loss(model, x, y))).backward()
    scaler.unscale_(opt)  # to clip: the overflow must already be visible here
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    assert torch.equal(model.weight.detach(), w0) and torch.equal(model.bias.detach(), b0)
    assert scaler.get_scale() < 2.0**10


def test_both_passes_in_one_autocast_block_see_the_perturbation():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    opt = SAMOptimizer(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=True):
        first = torch.nn.functional.cross_entropy(net(x), y)
        first.backward()
        opt.first_step(zero_grad=True)
        second = torch.nn.functional.cross_entropy(net(x), y)
    assert (second.float() - first.float()).abs() > 1e-2  # not the stale casts of w
    opt.restore()
