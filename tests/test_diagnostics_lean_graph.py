"""The lean graph of the Hessian products (eval-mode BatchNorm folded, adaptive pooling as plain pooling): the same
Hessian as the model (exact, float64, by ``torch.autograd.functional.hessian`` on the model outside the context),
less graph, and nothing left behind."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_sam.diagnostics import HessianOperator
from lightning_sam.diagnostics._lean_graph import lean_graph


def _stats(norm: nn.modules.batchnorm._BatchNorm, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(norm.num_features, generator=g))
        norm.running_var.copy_(torch.rand(norm.num_features, generator=g) + 0.5)
        if norm.affine:
            norm.weight.copy_(torch.rand(norm.num_features, generator=g) + 0.5)
            norm.bias.copy_(torch.randn(norm.num_features, generator=g))


class Net(nn.Module):
    """``head(act(norm(layer(x))))`` with an optional residual read of the layer's output and in-place edit."""

    def __init__(self, layer: nn.Module, norm: nn.Module, head_in: int, residual=False, edit=False) -> None:
        super().__init__()
        self.layer, self.norm, self.residual, self.edit = layer, norm, residual, edit
        self.head = nn.Linear(head_in, 3)
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            _stats(norm, 1)

    def forward(self, x):
        h = self.layer(x)
        if self.edit:
            h.mul_(2.0)  # the norm's input is no longer the layer's output as computed
        y = torch.tanh(self.norm(h))
        if self.residual:
            y = y + h  # the layer's own output is read again
        return self.head(y.flatten(1))


IMAGES = (5, 2, 6, 6)  # batch, channels, height, width


def _cases():
    yield "conv2d", lambda: Net(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), 3 * 4 * 4), IMAGES
    yield (
        "conv2d-nobias-groups-reflect-stride",
        lambda: Net(
            nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False, padding_mode="reflect"),
            nn.BatchNorm2d(6),
            6 * 3 * 3,
        ),
        (5, 4, 6, 6),
    )
    yield "conv1d", lambda: Net(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3), 3 * 5), (5, 2, 7)
    yield "conv3d", lambda: Net(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2), 2 * 2 * 2 * 2), (4, 1, 3, 3, 3)
    yield "linear", lambda: Net(nn.Linear(4, 5), nn.BatchNorm1d(5), 5), (6, 4)
    yield "no-affine", lambda: Net(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, affine=False), 3 * 4 * 4), IMAGES
    yield "residual", lambda: Net(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), 3 * 6 * 6, residual=True), IMAGES
    yield "edited-in-place", lambda: Net(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), 3 * 4 * 4, edit=True), IMAGES
    two = lambda: nn.Sequential(nn.Conv2d(2, 3, 3, dilation=2, bias=False), nn.Tanh(), nn.Conv2d(3, 3, 1))  # noqa: E731
    yield "two-convs", lambda: Net(two(), nn.BatchNorm2d(3), 3 * 2 * 2), IMAGES
    yield "padding-same", lambda: Net(nn.Conv2d(2, 3, 3, padding="same"), nn.BatchNorm2d(3), 3 * 6 * 6), IMAGES
    # Linear on (N, L, C): BatchNorm1d then normalizes dim 1 (L), not the layer's output channels.
    yield "linear-3d", lambda: Net(nn.Linear(4, 5), nn.BatchNorm1d(3), 3 * 5), (6, 3, 4)
    # BatchNorm after a non-foldable op: the affine path.
    yield "after-tanh", lambda: Net(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh()), nn.BatchNorm2d(3), 48), IMAGES
    # Adaptive average pooling: divisible sizes (also with None), and a size that does not divide (unchanged).
    for label, size, hw in (("pool-2x3", (2, 3), (8, 9)), ("pool-none", (None, 2), (4, 6)), ("pool-odd", 3, (7, 7))):
        channels = 2 * (hw[0] if size[0] is None else size[0]) * size[1] if isinstance(size, tuple) else 2 * 9

        def make(size=size, channels=channels):
            return Net(nn.Conv2d(1, 2, 1), nn.AdaptiveAvgPool2d(size), channels)

        yield label, make, (4, 1, *hw)


CASES = list(_cases())


def _batch(shape):
    g = torch.Generator().manual_seed(3)
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (shape[0],), generator=g)


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _exact_hvp(model: nn.Module, batch, v: torch.Tensor) -> torch.Tensor:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(flat):
        parts = flat.split([math.prod(s) for s in shapes])
        params = {n: t.view(s) for (n, _), t, s in zip(named, parts, shapes)}
        return F.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    return torch.autograd.functional.hessian(f, flat0) @ v


def _graph_nodes(tensor: torch.Tensor) -> list[str]:
    names, stack, seen = [], [tensor.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_folded_products_are_the_exact_hessian(name, make, shape):
    model = make().double().eval()
    batch = _batch(shape)
    params = [p for p in model.parameters() if p.requires_grad]
    reference = copy.deepcopy(model)
    op = HessianOperator(model, ce, [batch], params)
    plain = HessianOperator(model, ce, [batch], params, lean_graph=False)
    v = torch.randn(op.numel, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _exact_hvp(reference, batch, v)
    recomputed = HessianOperator(model, ce, [batch], params, cache_graph=False)  # the lean forward at each product
    assert torch.allclose(op(v), exact, rtol=1e-10, atol=1e-12)
    assert torch.allclose(plain(v), exact, rtol=1e-10, atol=1e-12)
    assert torch.allclose(recomputed(v), exact, rtol=1e-10, atol=1e-12)
    assert op.losses[0] == pytest.approx(plain.losses[0], rel=1e-12)
    assert all("forward" not in vars(m) for m in model.modules())  # nothing left behind


@pytest.mark.parametrize("name", ["conv2d", "linear", "conv3d"])
def test_a_norm_after_its_layer_leaves_the_graph(name):
    make, shape = next((m, s) for n, m, s in CASES if n == name)
    model = make().double().eval()
    batch = _batch(shape)
    with lean_graph(model):
        folded = _graph_nodes(ce(model, batch))
    unfolded = _graph_nodes(ce(model, batch))
    assert "NativeBatchNormBackward0" in unfolded
    assert "NativeBatchNormBackward0" not in folded
    # One layer in the loss's graph, the refolded one: the first output is not differentiated.
    if name == "linear":
        assert folded.count("AddmmBackward0") == unfolded.count("AddmmBackward0") == 2
    else:  # on the data: the constant-input convolution
        assert unfolded.count("ConvolutionBackward0") == 1 and "_ConstantInputConvBackward" not in unfolded
        assert folded.count("_ConstantInputConvBackward") == 1 and "ConvolutionBackward0" not in folded


@pytest.mark.parametrize(
    "dims,stride,padding,dilation,groups,bias",
    [(1, 2, 1, 1, 1, True), (2, 1, 0, 2, 2, False), (2, (2, 1), (1, 2), 1, 1, True), (3, 1, 1, 1, 1, True)],
)
def test_constant_input_convolution_against_finite_differences(dims, stride, padding, dilation, groups, bias):
    """First and second derivatives of the constant-input convolution, by gradcheck/gradgradcheck (numerical)."""
    from lightning_sam.diagnostics._lean_graph import _ConstantInputConv, _ConvSpec

    layer = getattr(nn, f"Conv{dims}d")(2, 2, 3, stride, padding, dilation, groups, bias).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, *((7,) if dims < 3 else (4,)) * dims, generator=g, dtype=torch.float64)
    spec = _ConvSpec(layer.stride, layer.padding, layer.dilation, layer.groups)
    weight = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_() if bias else None

    def f(weight, *b):
        return _ConstantInputConv.apply(x, weight, b[0] if b else None, spec)

    inputs = (weight, b) if bias else (weight,)
    assert torch.allclose(f(*inputs), layer(x))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("name,divides", [("pool-2x3", True), ("pool-none", True), ("pool-odd", False)])
def test_adaptive_pooling_becomes_plain_pooling_where_sizes_divide(name, divides):
    make, shape = next((m, s) for n, m, s in CASES if n == name)
    model = make().double().eval()
    x = _batch(shape)[0]
    with lean_graph(model):
        out = model(x)
        lean = _graph_nodes(out)
    assert ("AvgPool2DBackward0" in lean) is divides
    assert ("AdaptiveAvgPool2DBackward0" in lean) is not divides
    assert torch.allclose(out, model(x), rtol=1e-13, atol=1e-13)


def test_affine_path_and_untouched_cases_keep_their_values():
    model = dict((n, m) for n, m, _ in CASES)["after-tanh"]().double().eval()
    batch = _batch(IMAGES)
    with torch.no_grad():
        expected = model(batch[0])
        with lean_graph(model):
            folded = model(batch[0])
            assert "forward" in vars(model.norm)
    assert torch.allclose(folded, expected, rtol=1e-12, atol=1e-12)
    assert "forward" not in vars(model.norm)


def test_train_mode_other_dtypes_and_own_forwards_run_unchanged():
    model = Net(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), 3 * 4 * 4).eval()
    x = _batch(IMAGES)[0].float()
    # bf16 activations against float32 statistics (autocast): the module's own forward, bit for bit.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        with lean_graph(model):
            assert torch.equal(model(x), expected)
    # Train mode: batch statistics through native_batch_norm, running statistics updated as usual.
    model.train()
    twin = copy.deepcopy(model)
    with lean_graph(model):
        out = model(x)
        assert "NativeBatchNormBackward0" in _graph_nodes(out)
    assert torch.equal(out, twin(x))
    assert torch.equal(model.norm.running_mean, twin.norm.running_mean)

    class OwnNorm(nn.BatchNorm2d):
        def forward(self, input):
            return super().forward(input) * 1.0

    custom = Net(nn.Conv2d(2, 3, 3), OwnNorm(3), 3 * 4 * 4).eval()
    with lean_graph(custom):
        assert "forward" not in vars(custom.norm)
        assert "NativeBatchNormBackward0" in _graph_nodes(custom(x))


def test_restored_after_an_exception():
    model = Net(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), 3 * 4 * 4).eval()
    with pytest.raises(RuntimeError, match="boom"), lean_graph(model):
        raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in model.modules())


class _NoGradConv(nn.Module):  # a frozen-by-no_grad layer: its parameters get no gradient
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Linear(48, 3)

    def forward(self, x):
        with torch.no_grad():
            h = self.conv(x)
        return self.head(torch.tanh(self.bn(h)).flatten(1))


class _OtherWeights(_NoGradConv):  # the layer run with other weights (functional_call), the norm outside the call
    def forward(self, x):
        h = functional_call(self.conv, {k: 0.5 * p for k, p in self.conv.named_parameters()}, (x,))
        return self.head(torch.tanh(self.bn(h)).flatten(1))


class _InferenceMode(_NoGradConv):
    def forward(self, x):
        with torch.inference_mode():
            h = torch.tanh(self.conv(x))
        return self.head(self.bn(h.clone()).flatten(1))


class _Checkpointed(_NoGradConv):  # the products recompute the block's forward
    def forward(self, x):
        block = lambda x: torch.tanh(self.bn(self.conv(x)))  # noqa: E731
        return self.head(torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False).flatten(1))


class _Vmapped(_NoGradConv):  # a torch.func transform over the data's convolution
    def forward(self, x):
        return torch.func.vmap(lambda xi: self.head(torch.tanh(self.bn(self.conv(xi[None]))).flatten(1))[0])(x)


def _pool_list() -> nn.Module:  # an output size given as a list (as from a YAML config)
    return nn.Sequential(nn.Conv2d(2, 3, 1), nn.AdaptiveAvgPool2d([2, 3]), nn.Flatten(), nn.Linear(18, 3))


TRICKY = {
    "no_grad": _NoGradConv,
    "functional_call": _OtherWeights,
    "inference_mode": _InferenceMode,
    "checkpoint": _Checkpointed,
    "vmap": _Vmapped,
    "pool-list": _pool_list,
    "lazy": lambda: nn.Sequential(nn.LazyConv2d(3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 3)),
}


@pytest.mark.parametrize("name", list(TRICKY))
def test_tricky_models_get_the_hessian_autograd_gives(name):
    """Each as with ``lean_graph=False`` (the graph autograd builds); no_grad also against the exact Hessian."""
    torch.manual_seed(0)
    model = TRICKY[name]().double().eval()
    model(_batch((4, 2, 6, 6))[0])  # materializes the lazy layer
    for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        _stats(norm, 2)
    batch = _batch((4, 2, 6, 6))
    params = [p for p in model.parameters() if p.requires_grad]
    lean = HessianOperator(model, ce, [batch], params)
    plain = HessianOperator(model, ce, [batch], params, lean_graph=False)
    v = torch.randn(lean.numel, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert lean.losses[0] == pytest.approx(plain.losses[0], rel=1e-12)
    assert torch.allclose(lean(v), plain(v), rtol=1e-10, atol=1e-12)
    if name == "no_grad":
        assert torch.allclose(lean(v), _exact_hvp(copy.deepcopy(model), batch, v), rtol=1e-10, atol=1e-12)
        assert lean(v)[: model.conv.weight.numel() + 3].abs().max() == 0  # the conv's rows
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize(
    "model",
    [
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(48, 3)),
        lambda: nn.Sequential(nn.Conv2d(2, 3, 1), nn.AdaptiveAvgPool2d((2,)), nn.Flatten(), nn.Linear(12, 3)),
    ],
    ids=["norm-size", "pool-size"],
)
def test_invalid_models_fail_as_they_would_without_it(model):
    model = model().double().eval()
    x = _batch((4, 2, 6, 6))[0]
    with pytest.raises(Exception) as plain:
        model(x)
    with pytest.raises(type(plain.value), match=str(plain.value)[:30]), lean_graph(model):
        model(x)


def test_an_uninitialized_lazy_layer_is_materialized_as_usual():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyConv2d(3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 3)).double().eval()
    twin = copy.deepcopy(model)
    x = _batch((4, 2, 6, 6))[0]
    torch.manual_seed(1)  # the same initialization for both
    with lean_graph(model):
        out = model(x)
    assert isinstance(model[0], nn.Conv2d) and model[0].weight.shape == (3, 2, 3, 3)
    torch.manual_seed(1)
    assert torch.allclose(out, twin(x), rtol=1e-12, atol=1e-12)


def test_float32_products_stay_close_to_float64():
    """The lean graph in float32 against autograd's product in float64: rounding only, nothing lost on the way."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Tanh()
    ).append(nn.Sequential(nn.Flatten(), nn.Linear(8 * 2 * 2, 3)))
    for index, norm in enumerate(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        _stats(norm, index)
    model.eval()
    batch = _batch((16, 2, 6, 6))
    model64 = copy.deepcopy(model).double()
    reference = HessianOperator(model64, ce, [batch], list(model64.parameters()), lean_graph=False)
    v = torch.randn(reference.numel, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = reference(v)
    lean = HessianOperator(model, ce, [(batch[0].float(), batch[1])], list(model.parameters()))(v.float()).double()
    assert float((lean - exact).norm() / exact.norm()) < 1e-5
