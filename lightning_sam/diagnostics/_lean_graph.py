"""Layers swapped, while a Hessian graph is built, for exact equivalents that are cheaper to differentiate twice.

A Hessian-vector product is a backward through the backward graph, so every operation of the forward is paid for
about three times per product. Inside ``lean_graph`` three layers compute the same function of the same parameters
in a form whose double backward does less:

- **Eval-mode BatchNorm** is the per-channel affine map ``y = x·s + t``, ``s = γ/√(σ² + eps)``, ``t = β − μ·s``, yet
  autograd differentiates it through ``native_batch_norm``, whose double backward is the general (training-mode)
  formula: a dozen passes over the full activation per product, about a third of one on a small CNN. When its input
  is the untouched output of a ``Conv1d/2d/3d`` or ``Linear`` (batched), it becomes that layer again with the weight
  ``W·s`` and the bias ``(b − μ)·s + β``, so no full-size BatchNorm operation is left in the graph (the layer's first
  output stays for whoever else reads it; nothing differentiates it when nobody does). Otherwise it is ``x·s + t``,
  with ``s`` and ``t`` computed on the channel vectors.
- **A convolution of an input that needs no gradient** (the first layer, on the data) runs as ``_ConstantInputConv``.
  PyTorch's convolution double backward computes the gradient of the input whenever the weight's is asked for,
  needed or not: a wasted transposed convolution per product, 8% of one on a small CNN.
- **AdaptiveAvgPool2d** whose output size divides the input's is ``avg_pool2d`` with kernel = stride = the ratio,
  whose kernels (and their backward) are the fast path.

Gradients and Hessian-vector products are therefore those of the model, to rounding; only the graph autograd walks
is smaller. Everything else (train-mode BatchNorm, another dtype than the statistics', sizes that do not divide, a
module with its own ``forward`` or an instance-level one) runs unchanged, and every module is restored on exit. A
layer's output is refolded only if it was computed with gradients on and has not been changed in place since
(version counters); an edit through ``.data``, which no version counter sees, is the one way to defeat that.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_sam.patching import Patcher

_NORM_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
_POOL_FORWARDS = (nn.AdaptiveAvgPool2d.forward,)
_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


class _Output(NamedTuple):
    """A layer's output as it left the layer, with what it was computed from (tensors and their versions)."""

    layer: nn.Module
    output: weakref.ref
    tensors: tuple[Optional[Tensor], ...]  # input, weight, bias: those of the call (functional_call may swap weights)
    versions: tuple[int, ...]  # versions of output and tensors at the call: an in-place edit since then voids it

    def current(self, input: Tensor) -> bool:
        tensors = (input, *self.tensors)
        return self.output() is input and self.versions == tuple(-1 if t is None else t._version for t in tensors)


@contextmanager
def lean_graph(model: nn.Module) -> Iterator[None]:
    """Run forwards of ``model`` with the equivalents described above; every module is restored on exit."""
    outputs: dict[int, _Output] = {}
    patcher = Patcher()
    try:
        norms = [m for m in model.modules() if _own_forward(m, _NORM_FORWARDS)]
        for module in model.modules():
            if _own_forward(module, _CONV_FORWARDS) or (norms and _own_forward(module, (nn.Linear.forward,))):
                patcher.set(module, "forward", _recording_forward(module, outputs if norms else None))
            elif _own_forward(module, _POOL_FORWARDS):
                patcher.set(module, "forward", _pooling_forward(module))
        for norm in norms:
            patcher.set(norm, "forward", _folded_forward(norm, outputs))
        yield
    finally:
        patcher.restore()
        outputs.clear()


def _own_forward(module: nn.Module, forwards: tuple[Callable, ...]) -> bool:
    # A subclass with its own forward, an instance-level forward or a scripted module is left alone.
    return (
        type(module).forward in forwards
        and "forward" not in vars(module)
        and not isinstance(module, torch.jit.ScriptModule)
    )


def _recording_forward(layer: nn.Module, outputs: Optional[dict[int, _Output]]) -> Callable[[Tensor], Tensor]:
    # ``outputs=None``: no BatchNorm to fold into, nothing to record (the convolution alone may still be lean).
    forward = type(layer).forward
    linear = isinstance(layer, nn.Linear)

    def recording_forward(input: Tensor) -> Tensor:
        weight, bias = layer.weight, layer.bias  # read at the call: a functional_call may have swapped them
        output = forward(layer, input) if linear else _conv(layer, input, weight, bias)
        # Only an output that carries a graph and has channels on dim 1 (batched), where BatchNorm normalizes: under
        # no_grad the layer's parameters must get no gradient, which a refolded layer would give them.
        if (
            outputs is not None
            and torch.is_grad_enabled()
            and not input.is_inference()
            and not output.is_inference()
            and output.dim() == (2 if linear else weight.dim())
        ):
            tensors = (input, weight, bias)
            versions = tuple(-1 if t is None else t._version for t in (output, *tensors))
            outputs[id(output)] = _Output(layer, weakref.ref(output), tensors, versions)
        return output

    return recording_forward


def _folded_forward(norm: _BatchNorm, outputs: dict[int, _Output]) -> Callable[[Tensor], Tensor]:
    forward = type(norm).forward

    def folded_forward(input: Tensor) -> Tensor:
        mean, var = norm.running_mean, norm.running_var
        if (
            norm.training
            or mean is None
            or var is None
            or input.dim() < 2
            or input.shape[1] != mean.numel()
            or any(t is not None and t.dtype != input.dtype for t in (mean, var, norm.weight, norm.bias))
        ):
            return forward(norm, input)  # what it would do anyway, errors included
        norm._check_input_dim(input)
        scale = torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -mean * scale
        if norm.bias is not None:
            shift = shift + norm.bias
        record = outputs.get(id(input))
        if record is not None and record.current(input):
            return _refolded(record.layer, *record.tensors, scale, shift)
        shape = (-1,) + (1,) * (input.dim() - 2)
        return torch.addcmul(shift.view(shape), input, scale.view(shape))

    return folded_forward


def _pooling_forward(pool: nn.AdaptiveAvgPool2d) -> Callable[[Tensor], Tensor]:
    forward = type(pool).forward

    def pooling_forward(input: Tensor) -> Tensor:
        size = pool.output_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if input.dim() not in (3, 4) or len(size) != 2:
            return forward(pool, input)
        sizes = [n if s is None else s for n, s in zip(input.shape[-2:], size)]
        if any(not isinstance(s, int) or s <= 0 or n % s for n, s in zip(input.shape[-2:], sizes)):
            return forward(pool, input)
        kernel = [n // s for n, s in zip(input.shape[-2:], sizes)]
        return F.avg_pool2d(input, kernel, kernel)

    return pooling_forward


def _refolded(
    layer: nn.Module, input: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Tensor, shift: Tensor
) -> Tensor:
    weight = weight * scale.view(-1, *(1,) * (weight.dim() - 1))
    bias = shift if bias is None else torch.addcmul(shift, bias, scale)
    if isinstance(layer, nn.Linear):
        return F.linear(input, weight, bias)
    return _conv(layer, input, weight, bias)


def _conv(layer: nn.Module, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``layer``'s convolution of ``input`` with ``weight`` and ``bias``; by ``_ConstantInputConv`` where it applies."""
    if (
        input.requires_grad
        or not torch.is_grad_enabled()
        or input.is_inference()
        or torch.is_autocast_enabled(input.device.type)
        or layer.padding_mode != "zeros"
        or isinstance(layer.padding, str)
        or input.dim() != weight.dim()
    ):
        return layer._conv_forward(input, weight, bias)
    spec = _ConvSpec(tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation), layer.groups)
    return _ConstantInputConv.apply(input, weight, bias, spec)


class _ConvSpec(NamedTuple):
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def conv(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        no_padding = [0] * len(self.stride)
        return torch.convolution(
            input, weight, bias, self.stride, self.padding, self.dilation, False, no_padding, self.groups
        )


class _ConstantInputConv(torch.autograd.Function):
    """``conv(x, W) + b`` for an ``x`` without gradient, whose backward differentiates to nothing more than needed.

    Its backward, ``gW = ∂/∂W⟨gy, conv(x, W)⟩`` (``_ConvWeightGrad``), is linear in ``gy`` with the adjoint
    ``ggW ↦ conv(x, ggW)``: one convolution in the double backward, where ``convolution_backward``'s own double
    backward adds a transposed convolution for the input's gradient. Written in ``setup_context`` form with a
    generated vmap rule, so that a model calling its layers under ``torch.func`` transforms runs as before.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, weight: Tensor, bias: Optional[Tensor], spec: _ConvSpec) -> Tensor:
        return spec.conv(input, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        input, weight, _, spec = inputs
        ctx.save_for_backward(input, weight)
        ctx.spec = spec

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:
        input, weight = ctx.saved_tensors
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = _ConvWeightGrad.apply(grad_output, input, weight, ctx.spec)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(dim=[0, *range(2, grad_output.dim())])
        return None, grad_weight, grad_bias, None


class _ConvWeightGrad(torch.autograd.Function):
    """``gy ↦ ∂/∂W⟨gy, conv(x, W)⟩`` for a fixed ``x``; its backward is the adjoint ``ggW ↦ conv(x, ggW)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_output: Tensor, input: Tensor, weight: Tensor, spec: _ConvSpec) -> Tensor:
        no_padding, weight_only = [0] * len(spec.stride), [False, True, False]
        _, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_output, input, weight, None, *spec[:3], False, no_padding, spec.groups, weight_only
        )
        return grad_weight

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, input, _, spec = inputs
        ctx.save_for_backward(input)
        ctx.spec = spec

    @staticmethod
    def backward(ctx: Any, grad_grad_weight: Tensor) -> tuple[Optional[Tensor], ...]:
        (input,) = ctx.saved_tensors
        return ctx.spec.conv(input, grad_grad_weight, None), None, None, None
