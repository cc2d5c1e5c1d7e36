"""
Generation on a CPU: a faster route for the matrix products of a KV-cached decode step.

With the KV cache each step feeds one token per sequence, so every layer multiplies a handful of rows by its
weight and the step costs one read of the weights. For so few rows MKL (PyTorch's CPU BLAS) streams the weight
2-6x faster when the product is written W @ x^T, and only from two columns up: its matrix-vector kernel is the
slow one, so a single row is given a duplicate. train_gpt2.stream swaps this route in on a CPU, around each
forward; bench.py generate measures it.
"""

import contextlib
import threading

import torch
import torch.nn as nn

FEW_ROWS = 6  # up to here W @ x^T is faster on a CPU; from 8 rows on both routes run at the same speed


class Linear(nn.Linear):
    """nn.Linear, with the W @ x^T route for up to FEW_ROWS rows on a CPU: same parameters, same math."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        if x.device.type != "cpu" or rows > FEW_ROWS:
            return super().forward(x)
        x2d = x.reshape(rows, -1)  # (rows, in)
        if rows == 1:
            x2d = x2d.repeat(2, 1)  # (2, in)
        y = torch.mm(self.weight, x2d.t())[:, :rows].t()  # (out, in) @ (in, rows) -> (out, rows) -> (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.contiguous().view(*x.shape[:-1], -1)  # (..., out)


FEW_ROW_LOCK = threading.Lock()  # threads generating with one model share its layers


@contextlib.contextmanager
def few_row_matmuls(model: nn.Module):
    """Route the model's nn.Linear layers through Linear for the calls inside, and back afterwards. Linear is a
    subclass with no state of its own, so only forward changes; with several users at once, the last one out
    swaps the layers back."""
    with FEW_ROW_LOCK:
        users = getattr(model, "few_row_users", 0)
        if users == 0:
            for layer in model.modules():
                if type(layer) is nn.Linear:
                    layer.__class__ = Linear
        model.few_row_users = users + 1
    try:
        yield
    finally:
        with FEW_ROW_LOCK:
            model.few_row_users -= 1
            if model.few_row_users == 0:
                for layer in model.modules():
                    if type(layer) is Linear:
                        layer.__class__ = nn.Linear
