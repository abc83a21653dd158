"""``SAMOptimizer``: SAM as a ``torch.optim.Optimizer`` wrapper, for training loops written by hand."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam.config import SAMConfig, validate_param_groups
from lightning_sam.perturbation import Perturbation, restore_
from lightning_sam.rng import get_rng_state, set_rng_state
from lightning_sam.variants import Variant
from lightning_sam.variants.base import sq_norm as _sq_norm
from lightning_sam.variants.binding import bind_variant, check_variant, load_variant_state, variant_state

# `Callable[[Iterable], Optimizer]` is what LightningCLI / jsonargparse read as "an optimizer given by class_path and
# init_args, still waiting for its parameters"; a plain optimizer class fits it too.
BaseOptimizer = Callable[[Iterable], Optimizer]


_SAME_RANDOMNESS_AND_SELECTION = (
    "`same_randomness=True` cannot hold with a variant that selects the examples of the second pass (ESAM with"
    " gamma < 1): that pass runs on a subset, whose random draws cannot be those of the first pass. Use gamma=1 or"
    " same_randomness=False."
)


class SAMOptimizer(Optimizer):
    """Sharpness-Aware Minimization around any base optimizer.

    Compatible with the widely used PyTorch SAM interface: ``first_step`` climbs to w + ε, ``second_step`` comes
    back to w (bit for bit, from a saved copy) and lets the base optimizer step with the gradient taken at w + ε.
    The base optimizer's state (momentum, Adam moments) is this optimizer's state: ``state_dict`` carries it and
    ``load_state_dict`` restores it into a fresh instance. Param groups are shared with the base optimizer, so LR
    schedulers reach it, and a group may carry its own ``"rho"`` / ``"adaptive"`` / ``"eta"``.

    Args:
        params: Parameters or param groups, as for any optimizer.
        base_optimizer: The optimizer class (``torch.optim.SGD``) or a callable that builds it from param groups.
        rho: Neighbourhood radius.
        adaptive: ASAM instead of SAM.
        eta: ASAM's offset, T = |w| + eta.
        epsilon: Added to the gradient norm.
        variant: A SAM variant from ``lightning_sam.variants``; ``None`` is plain SAM. ``step(closure)`` runs the
            closure once or twice as the variant needs (``LookSAM`` between its SAM steps: once; ``MSAM``: once, at
            w + ε). With ``ESAM(gamma < 1)`` the closure takes ``indices`` (``None`` for the whole batch) and returns
            the per-example losses of those examples without calling backward.
        same_randomness: In ``step(closure)``, run the closure at w + ε with the RNG state it started from at w (same
            dropout masks); afterwards the RNG is where the first call left it.
        model: The model, for a variant that selects parameters by module type or name (``SAMON``).
        **kwargs: Passed to ``base_optimizer`` (``lr``, ``momentum``, ...).

    Example:

        opt = SAMOptimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        for x, y in loader:
            loss_fn(model(x), y).backward()
            opt.first_step(zero_grad=True)
            loss_fn(model(x), y).backward()
            opt.second_step(zero_grad=True)

        # or with a closure that does a full forward-backward; `step` calls it as needed
        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)

    In a plain-PyTorch DDP loop, run the first forward and backward inside ``model.no_sync()`` so that ε comes from
    the local gradients (m-sharpness) and only the second backward is all-reduced. With a ``torch.amp.GradScaler``,
    call ``first_step(grad_scaler=scaler)`` on the scaled gradients (ε is scale-invariant; an overflow gives ε = 0),
    back-propagate ``scaler.scale(opt.guard_loss(loss))`` in the second pass (so that an overflow skips the step on
    every rank), then ``second_step(grad_scaler=scaler)`` and ``scaler.update()``.
    """

    def __init__(
        self,
        params: Iterable[Union[Tensor, dict[str, Any]]],
        base_optimizer: BaseOptimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        epsilon: float = 1e-12,
        variant: Optional[Variant] = None,
        same_randomness: bool = False,
        model: Optional[torch.nn.Module] = None,
        **kwargs: Any,
    ) -> None:
        self.config = SAMConfig(rho=rho, adaptive=adaptive, eta=eta, epsilon=epsilon, same_randomness=same_randomness)
        self.variant = check_variant(variant, self.config)
        if not callable(base_optimizer):
            raise TypeError(
                f"`base_optimizer` must be an optimizer class such as torch.optim.SGD (or a callable that builds one"
                f" from param groups), got {base_optimizer!r}."
            )
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta))
        validate_param_groups(self.param_groups, self.config)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        if not isinstance(self.base_optimizer, Optimizer):
            raise TypeError(f"`base_optimizer` built {type(self.base_optimizer).__name__}, not a torch Optimizer.")
        if isinstance(self.base_optimizer, SAMOptimizer):
            raise TypeError("`base_optimizer` must not itself be a SAMOptimizer.")
        # One set of groups and one state for both: schedulers and state_dict see the base optimizer's.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        bind_variant(self.variant, self.base_optimizer, self.config, world)
        if model is not None:
            self.variant.bind_model(model)
        self._perturbation: Optional[Perturbation] = None
        self._kept: Optional[list[Optional[Tensor]]] = None
        self._delegate = False
        self.sam_steps_taken = 0
        """Steps taken (by ``step(closure)`` or ``second_step``): the index a variant's schedule sees (checkpointed)."""
        self.base_steps_only = False
        """When True, ``step`` is a plain step of the base optimizer. The ``SAM`` callback and ``SAMModule`` set it
        for the fit: they run the two passes themselves and let Lightning call ``step`` as for any optimizer."""

    @property
    def epsilon(self) -> float:
        return self.config.epsilon

    @property
    def perturbed(self) -> bool:
        """True between ``first_step`` and ``second_step`` / ``restore``."""
        return self._perturbation is not None

    @torch.no_grad()
    def first_step(
        self, zero_grad: bool = False, grad_scaler: Optional[torch.amp.GradScaler] = None
    ) -> Optional[Tensor]:
        """Climb to w + ε using the current gradients; returns their norm (a tensor: no host sync).

        Pass the ``grad_scaler`` whose scaled loss made these gradients: an overflow then gives ε = 0 (the weights
        stay at w) and ``second_step(grad_scaler=...)`` makes the scaler skip the step.
        """
        if self._perturbation is not None:
            raise RuntimeError("first_step() was called twice without second_step() or restore() in between.")
        variant = self.variant
        groups = variant.groups(self.param_groups, self.config, self.sam_steps_taken)
        if variant.climbs_before_forward:
            self._perturbation = variant.climb(groups, self.base_optimizer, self.config.epsilon)
        else:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            selected = {id(p) for p in variant.first_pass_params(params)}
            self._kept = [p.grad.clone() for p in params] if variant.keeps_first_gradient else None
            groups = [replace(g, grads=[p.grad if id(p) in selected else None for p in g.params]) for g in groups]
            self._perturbation = variant.perturb(groups, self.config.epsilon, guard_nonfinite=grad_scaler is not None)
        torch.clear_autocast_cache()  # autocast caches casts by tensor identity, blind to in-place changes
        if zero_grad:
            self.zero_grad()
        return None if self._perturbation is None else self._perturbation.grad_norm

    @torch.no_grad()
    def restore(self) -> None:
        """Return the weights to w exactly; a no-op when not perturbed."""
        if self._perturbation is not None:
            restore_(self._perturbation)
            self._perturbation = None
            torch.clear_autocast_cache()

    def guard_loss(self, loss: Tensor) -> Tensor:
        """The second-pass loss, made NaN if the first pass overflowed (under ``first_step(grad_scaler=...)``).

        Multiply before ``backward``: the NaN gradient then makes every ``GradScaler`` skip the step, also on all
        ranks of a DDP loop (the NaN is all-reduced) and also when you ``unscale_`` before ``second_step`` to clip.
        Without a perturbation in force, the loss is returned as it is.
        """
        if self._perturbation is None:
            return loss
        return loss * torch.where(self._perturbation.finite, 1.0, float("nan")).to(loss.dtype)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, grad_scaler: Optional[torch.amp.GradScaler] = None) -> None:
        """Restore w and step the base optimizer with the gradient taken at w + ε.

        With ``grad_scaler``, the base step goes through ``grad_scaler.step`` (which unscales and skips the update
        on inf/NaN, here also when the first pass overflowed); call ``grad_scaler.update()`` afterwards, as usual.
        The weights are restored either way.
        """
        perturbation = self._perturbation
        self.restore()
        if self._kept is not None:
            self._combine_into_grads(self._kept)
            self._kept = None
        if grad_scaler is not None:
            if perturbation is not None:
                # A first-pass overflow must skip the step as well: a NaN gradient tells the scaler, without a sync.
                grads = [p.grad for p in perturbation.params if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, torch.where(perturbation.finite, 1.0, float("nan")))
        # Through self.step, so that an LR scheduler attached to this optimizer sees the step being taken.
        with self._delegating():
            if grad_scaler is not None:
                grad_scaler.step(self)
            else:
                self.step()
        self.sam_steps_taken += 1
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """A whole SAM step. ``closure`` does a full forward-backward and returns the loss.

        If the gradients at w are already there (the usual ``loss.backward(); opt.step(closure)`` pattern), the
        closure runs once, at w + ε; otherwise it runs twice, at w and at w + ε. The gradients are cleared after the
        base step. Returns the loss at w when this call computed it, else the closure's loss at w + ε.
        """
        if self._delegate or self.base_steps_only:
            # From second_step, or driven by the Lightning SAM step that runs both passes: a plain base step.
            return self.base_optimizer.step(closure)
        if closure is None:
            raise RuntimeError(
                "SAMOptimizer.step() needs a closure that runs a full forward-backward and returns the loss, or call"
                " first_step() and second_step() yourself. In Lightning, add the `lightning_sam.SAM` callback (or use"
                " `SAMModule`), which drives this optimizer under every precision."
            )
        closure = torch.enable_grad()(closure)
        variant, index = self.variant, self.sam_steps_taken
        if variant.climbs_before_forward:  # MSAM: one pass, at w + ε from the momentum
            self.zero_grad()
            self.first_step()
            try:
                loss = closure()
            finally:
                self.restore()
            return self._base_step(loss)
        if variant.needs_example_losses:
            return self._step_selecting_examples(closure)
        sam = variant.plan(index)
        loss_at_w = None
        start = get_rng_state() if self.config.same_randomness else None
        if not any(p.grad is not None for group in self.param_groups for p in group["params"]):
            loss_at_w = closure()
        elif start is not None:
            raise RuntimeError(
                "`same_randomness=True` replays the RNG state of the pass at w, so `step(closure)` must run that pass"
                " itself: do not back-propagate before `step(closure)` (the gradients are already there)."
            )
        if sam is None:
            sam = variant.decide(index, _sq_norm([p.grad for group in self.param_groups for p in group["params"]]))
        if not sam:
            if variant.modifies_plain_gradient:
                grads = [p.grad for group in self.param_groups for p in group["params"]]
                self._write_grads(variant.plain(grads))
            return self._base_step(loss_at_w)
        self.first_step(zero_grad=True)
        after_first = get_rng_state() if start is not None else None
        if start is not None:
            set_rng_state(start)
        try:
            loss_perturbed = closure()
        finally:
            self.restore()
            if after_first is not None:
                set_rng_state(after_first)
        if self._kept is not None:
            self._combine_into_grads(self._kept)
            self._kept = None
        self._base_step(None)
        return loss_perturbed if loss_at_w is None else loss_at_w

    def _step_selecting_examples(self, closure: Callable[..., Any]) -> Any:
        """ESAM's data selection: ``closure(indices)`` returns per-example losses (it does not call backward)."""
        if self.config.same_randomness:
            raise RuntimeError(_SAME_RANDOMNESS_AND_SELECTION)
        losses = closure(None)
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            raise RuntimeError(
                f"With {self.variant!r}, `step(closure)` calls `closure(indices)`: it must return the per-example"
                " losses of the examples at `indices` (all of them for None) as a 1-D tensor, without calling"
                " backward."
            )
        self.zero_grad()
        losses.mean().backward()
        self.first_step(zero_grad=True)
        try:
            with torch.no_grad():
                perturbed = closure(None)
            selected = self.variant.select_examples(losses.detach(), perturbed)
            closure(selected).mean().backward()
        finally:
            self.restore()
        return self._base_step(losses.detach().mean())

    def _base_step(self, loss: Any) -> Any:
        self.base_optimizer.step()
        self.sam_steps_taken += 1
        # Gradients at w must never be mistaken for the next step's: the next call starts from none.
        self.zero_grad()
        return loss

    def _combine_into_grads(self, kept: list[Optional[Tensor]]) -> None:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        self._write_grads(self.variant.combine(kept, [p.grad for p in params]), params)

    def _write_grads(self, grads: Optional[list[Optional[Tensor]]], params: Optional[list[Tensor]] = None) -> None:
        params = params if params is not None else [p for group in self.param_groups for p in group["params"]]
        for p, g in zip(params, grads or []):
            if g is not None and g is not p.grad:
                p.grad = g

    @contextmanager
    def _delegating(self):
        """Make ``step`` a plain base step, for ``second_step``, which has restored w itself."""
        self._delegate = True
        try:
            yield
        finally:
            self._delegate = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        if self._perturbation is not None:
            raise RuntimeError("state_dict() between first_step() and second_step(): the weights are perturbed.")
        state = self.base_optimizer.state_dict()
        state["sam"] = {
            "steps": self.sam_steps_taken,
            "variant": variant_state(self.variant),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sam = state_dict.get("sam", {})
        self.sam_steps_taken = int(sam.get("steps", 0))
        load_variant_state(self.variant, sam.get("variant"))
        self.base_optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "sam"})
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def __repr__(self) -> str:
        return f"SAMOptimizer(rho={self.config.rho}, adaptive={self.config.adaptive}, base={self.base_optimizer!r})"
