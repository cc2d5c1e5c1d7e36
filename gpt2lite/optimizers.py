"""
Several optimizers that step as one: `--optimizer muon` trains the blocks' matrices with Muon and everything else
with AdamW, and the loop, GradScaler and checkpoints see a single optimizer.

Why one, not two side by side: GradScaler decides per optimizer whether an fp16 step overflowed. Stepped apart, one
optimizer could skip while the other stepped on gradients that clipping over all parameters had just turned into
zeros or NaNs (an infinite norm scales every gradient by 0, a NaN norm by NaN). Joined, one inf check covers every
parameter, and the step is skipped for all of them or for none.
"""

import torch
import torch.distributed as dist

MUON_TORCH = "2.9"  # the first release with torch.optim.Muon


def muon_available() -> bool:
    return hasattr(torch.optim, "Muon")


# --optimizer muon's defaults come from the speedrun's records with a tied embedding and head (KellerJordan/
# modded-nanogpt, October 2024; README, Recipe): Muon at 0.02 (the optimizer comparison of 2024-10-29) and AdamW at
# 3.6e-3 for the embedding and head, neither with weight decay, at 524,288 tokens a step. Our step is 8x smaller, and
# Adam's rate goes as the square root of the batch (Malladi et al. 2022): both divided by sqrt(8). For Muon, whose
# update is normalised as Adam's is, the same rule is an assumption.
RECORD_STEP_TOKENS = 524_288
MUON_LR = 0.007  # 0.02 / sqrt(8)
MUON_EMBED_LR = 1.3e-3  # 3.6e-3 / sqrt(8): AdamW's rate, under Muon, for the embedding, head and vectors
MUON_EMBED_WEIGHT_DECAY = 0.0
MUON_WEIGHT_DECAY = 0.0

# Muon's momentum warms up from 0.85 to 0.95 over the first 500 steps in the records that brought it in (2024-11-06,
# 500 of 3,200 steps): here over as many tokens, and at most the same sixth of the run
MOMENTUM_START, MOMENTUM_END = 0.85, 0.95
MOMENTUM_WARMUP_TOKENS, MOMENTUM_WARMUP_SHARE = 500 * RECORD_STEP_TOKENS, 500 / 3200


def momentum_warmup_steps(total_batch_size: int, max_steps: int) -> int:
    """--muon-momentum-warmup's default: the records' 500 steps in tokens, at most their share of the run."""
    return min(round(MOMENTUM_WARMUP_TOKENS / total_batch_size), int(MOMENTUM_WARMUP_SHARE * max_steps))


def muon_momentum(step: int, warmup_steps: int) -> float:
    """Muon's momentum at this step: from 0.85 up to 0.95 in a straight line over the first warmup_steps, as the
    speedrun's records do. Early on the loss surface changes fast and a long average of old gradients points the
    wrong way; later a longer average (1 / (1 - 0.95) = 20 steps) smooths the noise of small batches."""
    if step >= warmup_steps:  # also a warmup of 0 steps: the momentum is 0.95 throughout
        return MOMENTUM_END
    return MOMENTUM_START + (MOMENTUM_END - MOMENTUM_START) * step / warmup_steps


def set_muon_momentum(optimizer, step: int, warmup_steps: int):
    """Set the momentum of the optimizer's Muon for this step; an AdamW-only optimizer has none, and is left alone."""
    for member in filter(is_muon, members(optimizer)):
        for group in member.param_groups:
            group["momentum"] = muon_momentum(step, warmup_steps)


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


class ShardedMuon:
    """torch.optim.Muon under DDP, its work shared out. Newton-Schulz, five matmul iterations a matrix, does not
    shrink as processes are added (every process has the whole, all-reduced gradient), while the model's work per
    process does: for 124M, 1.5 TFLOP a step against 56 TFLOP of model work, 3% of one GPU's work but 22% of each
    one's at 8 GPUs. So each process steps its share of the matrices, with torch's own Muon, and the processes then
    send each other the matrices they updated: every process ends the step with the weights one process stepping
    all of them computes, bit for bit (the same operations on the same numbers). Each keeps only its share's
    momentum; state_dict gathers the whole, in torch's Muon's own format, so a checkpoint resumes with any number of
    processes, or with one."""

    def __init__(self, muon: torch.optim.Optimizer, rank: int, world_size: int):  # a torch.optim.Muon
        self.muon, self.rank = muon, rank
        self.params = [p for group in muon.param_groups for p in group["params"]]
        self.owners = share_out(self.params, world_size)  # the process that steps each matrix
        self.mine = [p for p, owner in zip(self.params, self.owners) if owner == rank]
        self.others = [p for p, owner in zip(self.params, self.owners) if owner != rank]
        self.holds_state = False  # whether the matrices have momentum yet (they do after a step, on every process)

    @property
    def param_groups(self) -> list[dict]:  # every matrix: GradScaler unscales and checks all of them on every process
        return self.muon.param_groups

    @property
    def state(self) -> dict:
        return self.muon.state

    @torch.no_grad()
    def step(self):
        hidden = [(p, p.grad) for p in self.others]
        for p, _ in hidden:  # torch's Muon steps only the parameters that have a gradient
            p.grad = None
        try:
            self.muon.step()
        finally:
            for p, grad in hidden:
                p.grad = grad
        works = [dist.broadcast(p.detach(), src=owner, async_op=True) for p, owner in zip(self.params, self.owners)]
        for work in works:
            work.wait()
        self.holds_state = True

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The state dict one process stepping every matrix would have; a collective (every process calls it), whose
        result is whole on rank 0 (the one that writes checkpoints)."""
        whole = self.muon.state_dict()
        if not self.holds_state:
            return whole
        for index, (p, owner) in enumerate(zip(self.params, self.owners)):
            momentum = self.muon.state[p]["momentum_buffer"] if owner == self.rank else torch.empty_like(p)
            dist.broadcast(momentum, src=owner)
            if self.rank == 0:
                whole["state"][index] = {"momentum_buffer": momentum}
        return whole

    def load_state_dict(self, state: dict):
        self.muon.load_state_dict(state)
        for p in self.others:  # the owners keep these
            self.muon.state.pop(p, None)
        self.holds_state = bool(state["state"])


def share_out(params: list[torch.Tensor], world_size: int) -> list[int]:
    """A process for each matrix, balancing Newton-Schulz's work (about 2 m^2 n + m^3 multiply-adds an iteration for
    an m x n matrix, m <= n): the costliest first, each to the process with the least so far. The same on every
    process, since it depends on the shapes alone."""
    cost = [2 * min(p.shape) ** 2 * max(p.shape) + min(p.shape) ** 3 for p in params]
    load, owners = [0] * world_size, [0] * len(params)
    for index in sorted(range(len(params)), key=lambda i: -cost[i]):  # sorted() is stable: ties in order
        owners[index] = min(range(world_size), key=lambda r: load[r])
        load[owners[index]] += cost[index]
    return owners


def share_across_processes(muon: torch.optim.Optimizer) -> torch.optim.Optimizer | ShardedMuon:
    """Muon as it steps here: shared out among the processes under DDP (ShardedMuon), itself in one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        return ShardedMuon(muon, dist.get_rank(), dist.get_world_size())
    return muon


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


def is_muon(optimizer) -> bool:
    return isinstance(optimizer, ShardedMuon) or (muon_available() and isinstance(optimizer, torch.optim.Muon))


def unallocated_state_bytes(optimizer) -> int:
    """The memory the optimizer's state will take at its first step, and 0 once it has taken it (optimizers
    allocate their state lazily): Muon keeps one momentum buffer a parameter (under DDP, for its share), AdamW two
    moments."""
    if optimizer.state:
        return 0
    total = 0
    for member in members(optimizer):
        kept = member.mine if isinstance(member, ShardedMuon) else [p for g in member.param_groups for p in g["params"]]
        total += (1 if is_muon(member) else 2) * sum(p.numel() * p.element_size() for p in kept)
    return total
