"""Float32 master weights for a model held in bfloat16 or float16.

An optimizer stepping a bfloat16 weight directly loses every update smaller than half the weight's last
significant bit (8 bits of mantissa: about 0.4% of the weight), which at fine-tuning learning rates is most of
them. The usual remedy, as in mixed-precision training (Micikevicius et al., arXiv 1710.03740): the model
computes in low precision, while the optimizer updates float32 copies of the weights and writes them back
rounded after every step, so that small updates accumulate in the copies until they show.

In float16 the gradients themselves underflow: its smallest number is about 6e-8, and a token's share of a loss
averaged over tens of thousands of tokens, times a small probability, lies below it. :class:`LossScale` multiplies
the loss before the backward pass and divides the gradients after it (dynamic loss scaling, same paper).
"""

from __future__ import annotations

import torch

__all__ = ["LossScale", "MasterWeights", "float16_range_note", "needs_master_weights"]


def needs_master_weights(model: torch.nn.Module) -> bool:
    """Whether some trainable parameter of ``model`` is stored in a floating type narrower than float32."""
    return any(p.requires_grad and p.is_floating_point() and torch.finfo(p.dtype).bits < 32 for p in model.parameters())


def float16_range_note(model: torch.nn.Module, setting: str) -> str:
    """For a message about inf / NaN values out of ``model``: when it computes in float16, a clause saying that
    float16's range ends at 65504, which activations of a model trained in bfloat16 or float32 may pass, and that
    ``setting`` loads it in another type; '' for a model in any other type."""
    if not any(parameter.dtype == torch.float16 for parameter in model.parameters()):
        return ""
    return (f"; the model computes in float16, whose largest number is 65504: activations past it overflow where "
            f"bfloat16 and float32 do not ({setting} bfloat16 or float32)")


class MasterWeights:
    """Float32 copies of ``model``'s trainable parameters, for an optimizer to step on.

    After each backward pass (each micro-batch), :meth:`take_gradients` adds each parameter's gradient to its copy's in
    float32, so that gradients accumulated over micro-batches are summed in float32, not rounded to the parameter's
    precision at every addition; after the optimizer step, :meth:`write_back` rounds the copies into the model.
    """

    def __init__(self, model: torch.nn.Module):
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.copies = [p.detach().float().clone() for p in self.parameters]

    @torch.no_grad()
    def take_gradients(self) -> None:
        """Move the parameters' gradients onto the copies in float32, adding them to what the copies hold."""
        for parameter, copy in zip(self.parameters, self.copies):
            if parameter.grad is None:
                continue
            gradient = parameter.grad.float()
            copy.grad = gradient if copy.grad is None else copy.grad.add_(gradient)
            parameter.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        for parameter, copy in zip(self.parameters, self.copies):
            parameter.copy_(copy)

    def state_dict(self) -> list[torch.Tensor]:
        return [copy.detach().cpu() for copy in self.copies]

    @torch.no_grad()
    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        if len(state) != len(self.copies) or any(s.shape != c.shape for s, c in zip(state, self.copies)):
            raise ValueError("the saved master weights do not match this model's parameters")
        for copy, saved in zip(self.copies, state):
            copy.copy_(saved)


class LossScale:
    """Dynamic loss scaling for float16 (Micikevicius et al., arXiv 1710.03740, Sec. 3.2): the loss of an update is
    multiplied by :attr:`scale` before its backward pass, so that gradients too small for float16 do not round to 0,
    and the gradients are divided by it before clipping and the optimizer step. An update whose gradients overflowed
    (inf or NaN after the division) is skipped and the scale halved, down to 1; after ``growth_interval`` updates in a
    row without overflow the scale doubles. torch's ``GradScaler`` does the same for autocast; here the weights
    themselves are float16 and the optimizer steps float32 copies (:class:`MasterWeights`)."""

    def __init__(self, initial: float = 2.0**16, growth_interval: int = 2000):
        self.scale = float(initial)
        self.growth_interval = growth_interval
        self.good_updates = 0  # in a row since the last overflow or growth

    @torch.no_grad()
    def unscale(self, parameters: list[torch.Tensor]) -> None:
        """Divide the gradients of ``parameters`` by the scale, in place."""
        gradients = [p.grad for p in parameters if p.grad is not None]
        if gradients and self.scale != 1.0:
            torch._foreach_mul_(gradients, 1.0 / self.scale)

    def can_shrink(self) -> bool:
        """Whether an overflow may be the scale's doing: while it is above 1, halving it may avoid the next one."""
        return self.scale > 1.0

    def update(self, *, overflowed: bool) -> None:
        """After an update: halve the scale when its gradients overflowed, double it after ``growth_interval`` clean
        updates in a row."""
        if overflowed:
            self.scale = max(1.0, self.scale / 2)
            self.good_updates = 0
            return
        self.good_updates += 1
        if self.good_updates >= self.growth_interval:
            self.scale *= 2
            self.good_updates = 0

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "good_updates": self.good_updates}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale, self.good_updates = float(state["scale"]), int(state["good_updates"])
