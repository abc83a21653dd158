"""``SAMOptimizer``: SAM as a ``torch.optim.Optimizer`` wrapper, for training loops written by hand."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_sam.config import SAMConfig, validate_param_groups
from lightning_sam.perturbation import Perturbation, groups_from_optimizer, perturb_, restore_

# `Callable[[Iterable], Optimizer]` is what LightningCLI / jsonargparse read as "an optimizer given by class_path and
# init_args, still waiting for its parameters"; a plain optimizer class fits it too.
BaseOptimizer = Callable[[Iterable], Optimizer]


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
        **kwargs: Any,
    ) -> None:
        self.config = SAMConfig(rho=rho, adaptive=adaptive, eta=eta, epsilon=epsilon)
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
        self._perturbation: Optional[Perturbation] = None
        self._delegate = False
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
        self._perturbation = perturb_(
            groups_from_optimizer(self.param_groups, self.config),
            self.config.epsilon,
            guard_nonfinite=grad_scaler is not None,
        )
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
        loss_at_w = None
        if not any(p.grad is not None for group in self.param_groups for p in group["params"]):
            loss_at_w = closure()
        self.first_step(zero_grad=True)
        try:
            loss_perturbed = closure()
        finally:
            self.restore()
        self.base_optimizer.step()
        # Gradients at w must never be mistaken for the next step's: the next call starts from none.
        self.zero_grad()
        return loss_perturbed if loss_at_w is None else loss_at_w

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
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def __repr__(self) -> str:
        return f"SAMOptimizer(rho={self.config.rho}, adaptive={self.config.adaptive}, base={self.base_optimizer!r})"
