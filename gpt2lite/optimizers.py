"""
Several optimizers that step as one: `--optimizer muon` trains the blocks' matrices with Muon and everything else
with AdamW, and the loop, GradScaler and checkpoints see a single optimizer.

Why one, not two side by side: GradScaler decides per optimizer whether an fp16 step overflowed. Stepped apart, one
optimizer could skip while the other stepped on gradients that clipping over all parameters had just turned into
zeros or NaNs (an infinite norm scales every gradient by 0, a NaN norm by NaN). Joined, one inf check covers every
parameter, and the step is skipped for all of them or for none.
"""

import torch

MUON_TORCH = "2.9"  # the first release with torch.optim.Muon


def muon_available() -> bool:
    return hasattr(torch.optim, "Muon")


class JointOptimizer:
    """The optimizers given, as one: param_groups lists every group of each, step() and zero_grad() call each, and
    the state dict holds each one's state. Enough of torch.optim.Optimizer for GradScaler's unscale_ and step (which
    read param_groups and call step), for clip_grad_norm_ and for the training loop."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for optimizer in self.optimizers for p, s in optimizer.state.items()}

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict):
        states = state.get("optimizers", [])
        if len(states) != len(self.optimizers):
            raise ValueError(f"a state of {len(states)} optimizers cannot load into {len(self.optimizers)}")
        for optimizer, own in zip(self.optimizers, states):
            optimizer.load_state_dict(own)


def load_keeping_settings(optimizer, state: dict):
    """Load a saved optimizer state (moments, momentum, step counts) into an optimizer built from this run's flags,
    keeping this run's settings: a --weight-decay or --muon-lr given to a resume applies. The settings go into the
    saved groups before loading, because load_state_dict decides from them where AdamW's step counts go: onto the
    parameters' device for a fused (or capturable) AdamW, on the CPU otherwise, and a fused kernel refuses a count on
    another device than its parameters."""
    saved_groups = [group for own in state.get("optimizers", [state]) for group in own["param_groups"]]
    for saved, group in zip(saved_groups, optimizer.param_groups):
        saved.update({key: value for key, value in group.items() if key != "params"})
    optimizer.load_state_dict(state)


def members(optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers inside a JointOptimizer, or the one given."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


def is_muon(optimizer: torch.optim.Optimizer) -> bool:
    return muon_available() and isinstance(optimizer, torch.optim.Muon)


def unallocated_state_bytes(optimizer) -> int:
    """The memory the optimizer's state will take at its first step, and 0 once it has taken it (optimizers
    allocate their state lazily): Muon keeps one momentum buffer a parameter, AdamW two moments."""
    if optimizer.state:
        return 0
    return sum(
        (1 if is_muon(member) else 2) * p.numel() * p.element_size()
        for member in members(optimizer)
        for group in member.param_groups
        for p in group["params"]
    )
