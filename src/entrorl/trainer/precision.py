"""Float32 master weights for a model held in bfloat16 or float16.

An optimizer stepping a bfloat16 weight directly loses every update smaller than half the weight's last
significant bit (8 bits of mantissa: about 0.4% of the weight), which at fine-tuning learning rates is most of
them. The usual remedy, as in mixed-precision training (Micikevicius et al., arXiv 1710.03740): the model
computes in low precision, while the optimizer updates float32 copies of the weights and writes them back
rounded after every step, so that small updates accumulate in the copies until they show.
"""

from __future__ import annotations

import torch

__all__ = ["MasterWeights", "needs_master_weights"]


def needs_master_weights(model: torch.nn.Module) -> bool:
    """Whether some trainable parameter of ``model`` is stored in a floating type narrower than float32."""
    return any(p.requires_grad and p.is_floating_point() and torch.finfo(p.dtype).bits < 32 for p in model.parameters())


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
