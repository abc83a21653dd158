"""The SAM passes of one training step, shared by the ``SAM`` callback and ``SAMModule``.

A face installs a ``training_step`` on the Trainer's strategy (the user's module is left as it is) that calls
``SAMPasses.run`` with the strategy's own ``training_step``. For each m-chunk of the batch:

    forward 1 at w                        -> the loss that is logged; BatchNorm statistics updated
    g = autograd.grad(loss)               -> local: no ``.grad`` written, no DDP hook fired
    ε from g, w -> w + ε                  (perturbation.perturb_)
    forward 2 at w + ε                    (BatchNorm statistics frozen, self.log and metrics silenced)
    g_s = autograd.grad(loss at w + ε)    -> local
    w + ε -> w, bit for bit               (also on an exception)

``run`` returns the first pass's output with, as its loss, a tensor whose *value* is the batch loss at w and whose
*backward* puts Σ share·g_s into the parameters' gradients. Whoever back-propagates it (Lightning's automatic loop
for the callback, the manual step of ``SAMModule``) runs loss scaling, DDP's one all-reduce (through the reducer's
usual hooks), accumulation, clipping, the optimizer hooks and schedulers exactly as for a plain step, and every hook
after ``training_step`` sees the weights at w.

Under the fp16 ``GradScaler`` the first-pass gradients are taken from the scaled loss (ε is scale-invariant); a
non-finite norm gives ε = 0 and a NaN final gradient, so that the scaler skips the step on every rank. Nothing here
reads a device value on the host.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torchmetrics import Metric

from lightning_sam import _lightning
from lightning_sam.batchnorm import frozen_running_stats, layer_state_buffers
from lightning_sam.chunks import batch_size, split_batch
from lightning_sam.config import SAMConfig
from lightning_sam.patching import Patcher
from lightning_sam.rng import get_rng_state, set_rng_state
from lightning_sam.perturbation import PerturbGroup, restore_
from lightning_sam.variants import Variant
from lightning_sam.variants.base import sq_norm


@dataclass
class SAMCounters:
    """What a checkpoint keeps of the SAM step besides its settings."""

    sam_steps: int = 0
    plain_steps: int = 0
    nonfinite_skips: Any = 0
    """Perturbations skipped for a non-finite gradient norm; a device tensor between checkpoints (no host sync)."""

    def count(self, sam: bool) -> None:
        if sam:
            self.sam_steps += 1
        else:
            self.plain_steps += 1

    def state_dict(self) -> dict[str, int]:
        return {
            "sam_steps": self.sam_steps,
            "plain_steps": self.plain_steps,
            "nonfinite_skips": int(self.nonfinite_skips),
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.sam_steps = int(state.get("sam_steps", 0))
        self.plain_steps = int(state.get("plain_steps", 0))
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))


TrainingStep = Callable[..., Any]


class SAMPasses:
    """The passes of one training step, as one loss for Lightning (or the manual step) to back-propagate.

    The ``variant`` says when the second pass runs, where to climb, which examples the second pass uses and how the
    final gradient is formed (``lightning_sam.variants``); plain SAM is the default.

    Args:
        config: The SAM settings (``rho``/``adaptive``/``eta``/``epsilon`` of the math, ``m``, ``bn_policy``, ``log``,
            ``interval``).
        counters: Where SAM / plain steps and non-finite skips are counted.
        optimizer: The optimizer whose param groups say which parameters are perturbed (and each group's ``rho``).
        variant: The SAM variant.
    """

    def __init__(
        self, config: SAMConfig, counters: SAMCounters, optimizer: torch.optim.Optimizer, variant: Variant
    ) -> None:
        self.config = config
        self.counters = counters
        self.optimizer = optimizer
        self.variant = variant
        self._sam: Optional[bool] = True  # this optimizer step's decision; None until the first gradient decides
        self._written: Optional[set[int]] = None  # ids of the buffers a forward has written so far

    def _state_buffers(self, buffers: list[Tensor]) -> list[Tensor]:
        """The layer-state buffers to copy for the second pass: all of them until a first pass has shown which ones a
        forward writes (spectral norm's vectors, running statistics; not constant masks), then those. A buffer first
        written at a later step joins from then on (that step's second pass is the one not replayed for it)."""
        if self._written is None:
            return buffers
        return [b for b in buffers if id(b) in self._written]

    def run(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        step: TrainingStep,
        args: tuple,
        kwargs: dict,
        window: tuple[bool, bool] = (True, True),
    ) -> Any:
        """Run ``step`` (the strategy's ``training_step``) as the variant needs; return its output.

        ``window``: whether this call is the first and the last micro-batch of its optimizer step (accumulation).
        """
        first_of_window, last_of_window = window
        if first_of_window:
            index = trainer.global_step
            self._sam = self.variant.plan(index) if index % self.config.interval == 0 else False
        if self.variant.climbs_before_forward and self._sam is not False:
            output, sam = self._climb_first(trainer, module, step, args, kwargs), True
        elif self._sam is False and not self.variant.modifies_plain_gradient:
            output, sam = step(*args, **kwargs), False  # the loss's own backward gives the gradient: one pass
        else:
            output, sam = self._passes(trainer, module, step, args, kwargs)
        if last_of_window and loss_of(output) is not None:
            self.counters.count(sam)
        return output

    # ------------------------------------------------------------------ MSAM: ε before the only forward
    def _climb_first(self, trainer, module, step, args, kwargs) -> Any:
        scaler = _lightning.loss_scaler(trainer)
        trainable = trainable_params(module, self.optimizer)
        scale = _lightning.scale_tensor(scaler, _device(trainable)) if scaler is not None else None
        groups = self.variant.groups(self.optimizer.param_groups, self.config, trainer.global_step)
        perturbation = self.variant.climb(groups, self.optimizer, self.config.epsilon)
        torch.clear_autocast_cache()
        try:
            output = step(*args, **kwargs)
            loss = loss_of(output)
            if loss is None:
                return output
            grads = _local_grads(loss if scale is None else loss * scale, trainable, trainable)
        finally:
            if perturbation is not None:
                restore_(perturbation)
            torch.clear_autocast_cache()
        _unscale(grads, scale)
        return with_loss(output, sam_loss(loss.detach(), trainable, grads))

    # ------------------------------------------------------------------ first pass, then (maybe) the second
    def _passes(self, trainer, module, step, args, kwargs) -> tuple[Any, bool]:
        variant = self.variant
        batch, rest = args[0], args[1:]
        chunks = split_batch(batch, self.config.m) if self.config.m is not None else [(batch, None)]
        total = batch_size(batch) if len(chunks) > 1 else None
        trainable = trainable_params(module, self.optimizer)
        groups = variant.groups(self.optimizer.param_groups, self.config, trainer.global_step)
        scaler = _lightning.loss_scaler(trainer)
        scale = _lightning.scale_tensor(scaler, _device(trainable)) if scaler is not None else None
        metrics = [m for m in module.modules() if isinstance(m, Metric)]
        watched = layer_state_buffers(module) if self.config.bn_policy == "first" else []
        state = _FirstPassState(self._state_buffers(watched), watched, rng=self.config.same_randomness)

        final: Optional[list[Optional[Tensor]]] = None
        outputs, losses, perturbed_losses, norms = [], [], [], []
        recorder = _LogRecorder(module) if total is not None else None
        for index, (chunk, size) in enumerate(chunks):
            share = 1.0 if total is None else size / total
            state.save_start()
            versions = _versions(chunk)
            with recorder.recording(share) if recorder is not None else _nothing():
                output = step(chunk, *rest, **kwargs)
            _check_unchanged(chunk, versions)
            if watched:
                self._written = (self._written or set()) | {id(b) for b in state.changed()}
            loss = loss_of(output)
            if loss is None:
                if index > 0:
                    raise MisconfigurationException(
                        "`training_step` returned a loss for one m-chunk of the batch and None for another. With"
                        " `m`, it must make the same decision for every chunk."
                    )
                return output, bool(self._sam)
            weight = share if scale is None else share * scale
            sam = self._sam is not False
            wrt = variant.first_pass_params(trainable) if sam else trainable
            grads = _local_grads(loss * weight, trainable, wrt)
            if self._sam is None:  # decided from the first gradient of the optimizer step (AE-SAM)
                self._sam = sam = variant.decide(trainer.global_step, _sq_norm_unscaled(grads, weight))
            outputs.append((output, size))
            losses.append(loss.detach() * share)
            _unscale(grads, scale)  # the variants see true gradients (ε itself does not depend on the scale)
            if not sam:
                final = _add(final, variant.plain(grads) or grads)
                continue
            kept = [None if g is None else g.clone() for g in grads] if variant.keeps_first_gradient else None
            examples = _example_losses(output, variant)
            grad_of = {id(p): g for p, g in zip(trainable, grads)}
            del grads
            perturbation = variant.perturb(
                [_with_grads(group, grad_of) for group in groups],
                self.config.epsilon,
                guard_nonfinite=scaler is not None,
            )
            del grad_of  # now ε: spent
            torch.clear_autocast_cache()  # autocast caches casts by tensor identity, blind to in-place changes
            try:
                with _second_pass(module, metrics, self.config.bn_policy == "first"), state.replayed():
                    perturbed_output, perturbed_loss = self._second_forward(step, chunk, rest, kwargs, examples, state)
                factor: Any = weight
                if scaler is not None and perturbation is not None:
                    # An fp16 overflow in the first pass: ε was 0; a NaN gradient makes the scaler skip this step.
                    factor = torch.where(perturbation.finite, factor, torch.nan)
                perturbed_grads = _local_grads(perturbed_loss * factor, trainable, trainable)
            finally:
                if perturbation is not None:
                    restore_(perturbation)
                torch.clear_autocast_cache()
            _unscale(perturbed_grads, scale)
            final = _add(final, variant.combine(kept, perturbed_grads))
            perturbed_losses.append(perturbed_loss.detach() * share)
            if perturbation is not None:
                norms.append(perturbation.grad_norm * share)
                self.counters.nonfinite_skips = self.counters.nonfinite_skips + (~perturbation.finite).int()
        if recorder is not None:
            recorder.replay()
        value = losses[0] if total is None else torch.stack(losses).sum()
        loss = sam_loss(value, trainable, final)
        if self.config.log and perturbed_losses:
            self._log(module, value, torch.stack(perturbed_losses).sum(), norms)
        return _with_loss(outputs, loss, total), bool(self._sam)

    def _second_forward(self, step, chunk, rest, kwargs, examples: Optional[Tensor], state) -> tuple[Any, Tensor]:
        """The second forward at w + ε: on the whole chunk, or on the examples the variant selects (ESAM's SDS)."""
        if examples is not None:
            with torch.no_grad():
                perturbed = _example_losses(step(chunk, *rest, **kwargs), self.variant)
            state.rewind()
            selected = self.variant.select_examples(examples, perturbed)
            if selected is not None:
                chunk = take_examples(chunk, selected, len(examples))
        output = step(chunk, *rest, **kwargs)
        loss = loss_of(output)
        if loss is None:
            raise MisconfigurationException(
                "`training_step` returned a loss at w but None at w + ε (the second SAM pass). It must make the"
                " same decision in both passes."
            )
        return output, loss

    @staticmethod
    def _log(module: pl.LightningModule, loss: Tensor, perturbed: Tensor, norms: list) -> None:
        kwargs = dict(on_step=True, on_epoch=False, prog_bar=False, batch_size=1)
        module.log("sam/perturbed_loss", perturbed, **kwargs)
        module.log("sam/sharpness", perturbed - loss, **kwargs)
        if norms:  # of unscaled gradients
            module.log("sam/grad_norm", torch.stack(norms).sum(), **kwargs)


def _device(params: list[Tensor]) -> torch.device:
    return params[0].device if params else torch.device("cpu")


def _versions(batch: Any) -> list[tuple[Tensor, int]]:
    found: list[tuple[Tensor, int]] = []
    apply_to_collection(batch, Tensor, lambda t: found.append((t, t._version)))
    return found


def _check_unchanged(batch: Any, versions: list[tuple[Tensor, int]]) -> None:
    if any(t._version != v for t, v in versions):
        raise MisconfigurationException(
            "`training_step` changed its batch in place (e.g. `x.sub_(mean)` or `x /= 255`). SAM calls `training_step`"
            " twice on the same batch, at w and at w + ε, and the second call would see the changed batch. Compute"
            " out of place (`x = (x - mean) / std`), or move the transform to the DataLoader."
        )


def trainable_params(module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every tensor a plain backward would give a gradient to: the module's trainable parameters, and the
    optimizer's that are not registered on the module."""
    params = [p for p in module.parameters() if p.requires_grad]
    known = {id(p) for p in params}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in known:
                params.append(p)
                known.add(id(p))
    return params


def _local_grads(loss: Tensor, trainable: list[Tensor], wrt: list[Tensor]) -> list[Optional[Tensor]]:
    """∇loss for each of ``trainable`` (computed only for those in ``wrt``; None for the others), without writing
    ``.grad`` or firing DDP's hooks; each a tensor of its own that the SAM math may change in place."""
    if not wrt:
        return [None] * len(trainable)
    before = [(p.grad, None if p.grad is None else p.grad._version) for p in wrt]
    if not loss.requires_grad:
        raise MisconfigurationException(
            "The loss `training_step` returned has no graph back to the parameters, so SAM cannot take its gradient."
            " A reentrant `torch.utils.checkpoint(..., use_reentrant=True)` does this when its inputs do not require"
            " grad: use `use_reentrant=False`."
        )
    try:
        computed = torch.autograd.grad(loss, wrt, allow_unused=True)
    except RuntimeError as error:
        raise MisconfigurationException(
            f"SAM takes each pass's gradient with `torch.autograd.grad`, which failed: {error} A reentrant"
            " `torch.utils.checkpoint(..., use_reentrant=True)` in the model does not support it: use"
            " `use_reentrant=False`."
        ) from error
    lost = len(wrt) == len(trainable) and all(g is None for g in computed)
    if lost or any(p.grad is not g or (g is not None and g._version != v) for p, (g, v) in zip(wrt, before)):
        raise MisconfigurationException(
            "SAM took the gradient with `torch.autograd.grad` and got"
            + (" none for any trainable parameter" if lost else " a backward inside the model writing `.grad`")
            + ": a reentrant `torch.utils.checkpoint(..., use_reentrant=True)` in the model does this, and the"
            " gradient would be lost. Use `torch.utils.checkpoint(..., use_reentrant=False)`."
        )
    seen: set[int] = set()
    owned = []
    for g in computed:
        if g is not None and (id(g) in seen or g._base is not None or not g.is_contiguous()):
            g = g.clone(memory_format=torch.contiguous_format)  # shared, a view, or expanded: SAM writes in place
        if g is not None:
            seen.add(id(g))
        owned.append(g)
    if len(wrt) == len(trainable):
        return owned
    by_id = dict(zip(map(id, wrt), owned))
    return [by_id.get(id(p)) for p in trainable]


def _unscale(grads: list[Optional[Tensor]], scale: Optional[Tensor]) -> None:
    if scale is not None:
        present = [g for g in grads if g is not None]
        if present:
            torch._foreach_div_(present, scale)


def _sq_norm_unscaled(grads: list[Optional[Tensor]], weight: Any) -> Tensor:
    total = sq_norm(grads)
    return total / (weight * weight) if isinstance(weight, Tensor) else total / weight**2


def _example_losses(output: Any, variant: Variant) -> Optional[Tensor]:
    if not variant.needs_example_losses:
        return None
    losses = output.get("losses") if isinstance(output, Mapping) else None
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        raise MisconfigurationException(
            f"{variant!r} selects the examples of the second pass by their loss: `training_step` must return a dict"
            " with 'loss' (the mean) and 'losses' (the per-example losses, a 1-D tensor, e.g."
            " `F.cross_entropy(logits, y, reduction='none')`)."
        )
    return losses.detach()


def take_examples(batch: Any, indices: Tensor, size: int) -> Any:
    """The rows ``indices`` of every tensor in ``batch`` whose first dimension is the batch size ``size``."""
    return apply_to_collection(
        batch, Tensor, lambda t: t[indices.to(t.device)] if t.dim() > 0 and t.shape[0] == size else t
    )


class _Objective(torch.autograd.Function):
    """Value: the batch loss at w. Backward: ``grad_output · grads[i]`` into ``params[i]``, nothing else.

    The gradients were taken at w + ε; this puts them where Lightning's backward (and DDP's reducer hooks, and the
    loss scaler) expect them, as if the loss's own graph had produced them.
    """

    @staticmethod
    def forward(ctx: Any, value: Tensor, grads: Sequence[Tensor], *params: Tensor) -> Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple:
        # Out of place: the loss may be back-propagated more than once (retain_graph), like any loss.
        scaled = torch._foreach_mul(list(ctx.grads), grad_output.to(ctx.grads[0].dtype)) if ctx.grads else []
        return (None, None, *scaled)


def sam_loss(value: Tensor, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]]) -> Tensor:
    """A loss whose value is ``value`` and whose backward puts ``grads`` into ``params``' gradients.

    Only the parameters that have a gradient are inputs of the graph: an unused parameter stays unused, for autograd
    and for DDP's unused-parameter detection, as with the loss's own graph.
    """
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    return _Objective.apply(value, [g for _, g in pairs], *[p for p, _ in pairs])


def _add(total: Optional[list], grads: Sequence[Optional[Tensor]]) -> list:
    if total is None:
        return list(grads)
    pairs = [(t, g) for t, g in zip(total, grads) if t is not None and g is not None]
    if pairs:
        torch._foreach_add_([t for t, _ in pairs], [g for _, g in pairs])
    return [g if t is None else t for t, g in zip(total, grads)]


def _with_grads(group: PerturbGroup, grad_of: dict[int, Optional[Tensor]]) -> PerturbGroup:
    return replace(group, grads=[grad_of.get(id(p)) for p in group.params])


def loss_of(output: Any) -> Optional[Tensor]:
    """The loss in a ``training_step`` output, or None to skip the batch; anything else is a clear error."""
    if output is None:
        return None
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"]
    raise MisconfigurationException(
        "With SAM, `training_step` must return the loss as a tensor, a dict with a 'loss' key, or None to skip the"
        f" batch; got {type(output).__name__}."
    )


def with_loss(output: Any, loss: Tensor) -> Any:
    """``output`` with its loss replaced by ``loss``."""
    if isinstance(output, Mapping):
        return {**output, "loss": loss}
    return loss


def _with_loss(outputs: list[tuple[Any, Optional[int]]], loss: Tensor, total: Optional[int]) -> Any:
    """The step's output: the first pass's, with ``loss``; with m-chunks, the chunks' other values put together.

    Tensors that have one row per example are concatenated, scalars are averaged by chunk size, anything else is
    the last chunk's.
    """
    if total is None or not isinstance(outputs[-1][0], Mapping):
        return with_loss(outputs[-1][0], loss)
    merged: dict[str, Any] = {}
    for key, last in outputs[-1][0].items():
        values = [(out.get(key), size) for out, size in outputs]
        if isinstance(last, Tensor) and all(isinstance(v, Tensor) for v, _ in values):
            if last.dim() > 0 and all(v.dim() > 0 and v.shape[0] == size for v, size in values):
                merged[key] = torch.cat([v for v, _ in values])
                continue
            if last.dim() == 0 and last.is_floating_point():
                merged[key] = torch.stack([v.detach() * (size / total) for v, size in values]).sum()
                continue
        merged[key] = last
    merged["loss"] = loss
    return merged


@contextmanager
def _nothing() -> Iterator[None]:
    yield


class _FirstPassState:
    """The state the second pass starts from, and the state it leaves behind.

    The second pass starts from the state the first pass started from (the buffers of layers other than BatchNorm,
    such as spectral norm's power-iteration vectors, under ``bn_policy="first"``; the RNG, on the CPU and every CUDA
    device, with ``same_randomness``), so that it computes what a single pass at w + ε would; afterwards the state is
    where the first pass left it, as if one pass had run.
    """

    def __init__(self, buffers: list[Tensor], watched: list[Tensor], rng: bool) -> None:
        self.buffers, self.watched = buffers, watched
        self.rng = rng

    def save_start(self) -> None:
        self.start = self._get()
        self.versions = [b._version for b in self.watched]

    def changed(self) -> list[Tensor]:
        """The buffers the first pass wrote: the layers' state (constant buffers, such as masks, are never written)."""
        return [b for b, v in zip(self.watched, self.versions) if b._version != v]

    def _get(self) -> tuple[list[Tensor], Any]:
        return [b.clone() for b in self.buffers], get_rng_state() if self.rng else None

    def _set(self, state: tuple[list[Tensor], Any]) -> None:
        buffers, rng = state
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, buffers)
        if rng is not None:
            set_rng_state(rng)

    @contextmanager
    def replayed(self) -> Iterator[None]:
        after_first = self._get()
        self._set(self.start)
        try:
            yield
        finally:
            self._set(after_first)

    def rewind(self) -> None:
        """Back to the start: one more pass from the same state (ESAM's selection pass before the second pass)."""
        self._set(self.start)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def _second_pass(module: pl.LightningModule, metrics: list[Metric], freeze_batchnorm: bool) -> Iterator[None]:
    """The second pass leaves no trace: BatchNorm statistics (by policy), ``self.log`` and torchmetrics states.

    The user's ``training_step`` runs twice per SAM step, but its logs and metric updates must describe the model at
    w, not at w + ε.
    """
    saved = [(metric, _metric_state(metric)) for metric in metrics]
    patcher = Patcher()
    patcher.set(module, "log", _ignore)
    patcher.set(module, "log_dict", _ignore)
    try:
        if freeze_batchnorm:
            with frozen_running_stats(module):
                yield
        else:
            yield
    finally:
        patcher.restore()
        for metric, state in saved:
            _load_metric_state(metric, state)


class _LogRecorder:
    """With m-chunks, what ``self.log`` receives in each chunk's first pass, logged once for the whole batch.

    A value logged per chunk is logged as the chunk-size-weighted mean: for a mean loss, the batch loss at w.
    Metric objects and non-numeric values are passed on as the last chunk gave them.
    """

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module
        self.calls: dict[str, list[tuple[Any, float, dict]]] = {}

    @contextmanager
    def recording(self, share: float) -> Iterator[None]:
        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if args:
                raise TypeError("With `m`, pass the options of `self.log` by keyword.")
            self.calls.setdefault(name, []).append((value, share, kwargs))

        patcher = Patcher()
        patcher.set(self.module, "log", log)
        try:
            yield
        finally:
            patcher.restore()

    def replay(self) -> None:
        for name, calls in self.calls.items():
            value, _, kwargs = calls[-1]
            numeric = [
                isinstance(v, Tensor) or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v, _, _ in calls
            ]
            if all(numeric) and not isinstance(value, Metric):
                dtype = value.dtype if isinstance(value, Tensor) else torch.float32
                values = torch.stack([torch.as_tensor(v).detach().double().reshape(()) for v, _, _ in calls])
                shares = torch.tensor([share for _, share, _ in calls], dtype=torch.float64, device=values.device)
                value = _reduce(name, values, shares, kwargs.get("reduce_fx", "mean")).to(dtype)
                if "batch_size" in kwargs:
                    kwargs = {**kwargs, "batch_size": sum(int(c[2].get("batch_size", 0)) for c in calls)}
            self.module.log(name, value, **kwargs)
        self.calls = {}


def _reduce(name: str, values: Tensor, shares: Tensor, reduce_fx: Any) -> Tensor:
    """The batch's value from the chunks' values, by the reduction ``self.log`` was given."""
    if reduce_fx in ("mean", torch.mean):
        return (values * shares).sum()  # chunk means weighted by chunk size: the batch mean
    if reduce_fx in ("sum", torch.sum):
        return values.sum()
    if reduce_fx in ("max", torch.max):
        return values.max()
    if reduce_fx in ("min", torch.min):
        return values.min()
    raise MisconfigurationException(
        f"`self.log({name!r}, ..., reduce_fx={reduce_fx!r})` with `m`: the value of each m-chunk is logged once per"
        " batch, combined by the reduction, and only 'mean', 'sum', 'max' and 'min' say how. Use one of those."
    )


def _metric_state(metric: Metric) -> dict[str, Any]:
    state = {
        name: value.clone() if isinstance(value, Tensor) else list(value)
        for name, value in ((name, getattr(metric, name)) for name in metric._defaults)
    }
    state["_update_count"] = metric._update_count
    state["_computed"] = metric._computed
    state["_forward_cache"] = metric._forward_cache
    return state


def _load_metric_state(metric: Metric, state: dict[str, Any]) -> None:
    for name, value in state.items():
        setattr(metric, name, value)
