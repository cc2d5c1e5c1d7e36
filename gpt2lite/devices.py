"""
The device a script runs on, whether torch.compile works there, and what 100% MFU (model FLOPs utilisation) means
there: the data-sheet peak of a known GPU, found by its exact name, or the best matmul rate measured on the spot.
"""

import contextlib
import os
import time
from typing import Callable

import torch
import torch.nn as nn

from gpt2lite.cli import InputError, Problems, first_line
from gpt2lite.gpt2_files import from_the_hub

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype's choices


def pick_device(requested: str) -> str:
    """'auto' -> the best device here; anything else is checked, so a missing GPU is one clear line."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        torch.empty(0, device=requested)
    except (RuntimeError, AssertionError) as e:  # AssertionError: a torch built without CUDA
        raise InputError(f"device {requested!r} is not usable here ({first_line(e)}); try --device cpu") from None
    return requested


def training_device(requested: str, local_rank: int, world_size: int) -> str:
    """The device of this training process: under DDP, its own GPU (or a share of the CPU's cores)."""
    if world_size == 1:
        return pick_device(requested)
    if torch.cuda.is_available():
        return f"cuda:{local_rank}"
    # CPU processes share the cores instead of every process using all of them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return "cpu"


def device_and_model(
    requested: str, init_from: str, load_model: Callable, problems: Problems
) -> tuple[str | None, nn.Module | None]:
    """For the scripts that use a trained model (sample.py, evaluate.py): the device and the model on it, each
    problem added to `problems` so that all are told at once. The model comes last, and a download only when
    nothing else is wrong: a typo should not cost gigabytes first. load_model is the chapter's."""
    device = model = None
    with problems:
        device = pick_device(requested)
    if not problems or not from_the_hub(init_from):
        with problems:
            model = load_model(init_from, device or "cpu")  # checked on the CPU where the device is the problem
    return device, model


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an error, or one it was raised from, is a GPU running out of memory: the caching allocator's
    torch.cuda.OutOfMemoryError, or memory that runs out outside it ("CUDA error: out of memory" from a kernel
    launch, cuBLAS's or cuDNN's *_ALLOC_FAILED), also where the compiler wraps it in an error of its own."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text:
            return True
        # the error it was raised from, as Python's traceback follows the chain
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return False


def compile_error(
    compiled: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast, eval_rows: int
) -> str | None:
    """Call the compiled model on a batch x, y (B, T) as training will, and on its first eval_rows rows as evaluation
    will (the validation batch): None if both compile, else the error."""
    # no all-reduce: a process whose compile fails must not leave the others waiting for its gradients
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    try:
        with no_sync():
            with autocast():
                _, loss = compiled(x, y)
            loss.backward()
        model.eval()
        with torch.no_grad(), autocast():  # gradients off: a graph of its own, as in estimate_loss
            # fresh tensors, as a loader's batches are: at another batch size than training's, Dynamo compiles a
            # graph with a dynamic batch, which guards on where a view of a larger tensor starts
            compiled(x[:eval_rows].clone(), y[:eval_rows].clone())
    except Exception as e:  # torch._dynamo / inductor raise many kinds
        return first_line(e)
    finally:
        model.train()
        model.zero_grad(set_to_none=True)
    return None


# Dense (not "with sparsity") tensor-core peaks in TFLOPS, (bf16 or fp16, tf32 or fp32), keyed by the exact name
# torch.cuda.get_device_name() reports, so that an L40S is not taken for an L4 nor an H100 PCIe for an H100 SXM.
# fp32 counts TF32 where the card has it (the run switches TF32 matmuls on). GeForce cards are listed at their
# rate with fp32 accumulation, the one autocast uses: half their headline fp16 rate. Any other card's peak is
# measured (an RTX 4080 SUPER or Laptop GPU, say: no NVIDIA data sheet or whitepaper gives their tensor rates).
GPU_PEAK_TFLOPS = {
    "Tesla T4": (65.0, 8.1),  # T4 data sheet (no TF32: fp32 on CUDA cores)
    "Tesla V100-SXM2-16GB": (125.0, 15.7),  # V100 data sheet
    "Tesla V100-SXM2-32GB": (125.0, 15.7),
    "Tesla V100-PCIE-16GB": (112.0, 14.0),
    "Tesla V100-PCIE-32GB": (112.0, 14.0),
    "NVIDIA A100-SXM4-40GB": (312.0, 156.0),  # A100 data sheet
    "NVIDIA A100-SXM4-80GB": (312.0, 156.0),
    "NVIDIA A100-PCIE-40GB": (312.0, 156.0),
    "NVIDIA A100 80GB PCIe": (312.0, 156.0),
    "NVIDIA A10": (125.0, 62.5),  # A10 data sheet
    "NVIDIA A10G": (70.0, 35.0),  # AWS's A10G data sheet (NVIDIA publishes none)
    "NVIDIA L4": (121.0, 60.0),  # L4, L40 and L40S data sheets
    "NVIDIA L40": (181.0, 90.5),
    "NVIDIA L40S": (362.0, 183.0),
    "NVIDIA H100 80GB HBM3": (989.0, 494.0),  # H100 data sheet: the SXM card, the PCIe card, the NVL card
    "NVIDIA H100 PCIe": (756.0, 378.0),
    "NVIDIA H100 NVL": (835.0, 417.5),
    "NVIDIA H200": (989.0, 494.0),  # H200 data sheet
    "NVIDIA H200 NVL": (835.0, 417.5),
    "NVIDIA GeForce RTX 3090": (71.0, 35.6),  # NVIDIA's Ampere GA102 whitepaper
    "NVIDIA RTX A6000": (154.8, 77.4),
    "NVIDIA GeForce RTX 4090": (165.2, 82.6),  # NVIDIA's Ada whitepaper
    "NVIDIA GeForce RTX 4080": (97.5, 48.7),
    "NVIDIA RTX 6000 Ada Generation": (364.2, 91.1),
}


def datasheet_peak_flops(device_name: str, precision: str) -> float | None:
    """FLOP/s of the data-sheet peak for a GPU named exactly so, in this precision; None for a card not listed."""
    if device_name not in GPU_PEAK_TFLOPS:
        return None
    half, single = GPU_PEAK_TFLOPS[device_name]
    return (single if precision == "fp32" else half) * 1e12


def measure_matmul_flops(device: str, dtype: torch.dtype) -> float:
    """The best rate of square matmuls on this device in this dtype. Sizes grow until one product takes a tenth of
    a second (from 4096 on a GPU, which smaller products leave partly idle), each is warmed up and then timed a few
    times, and the fastest counts: a slow moment of the machine must not pass for the peak, or MFU tops 100%."""
    cuda = torch.device(device).type == "cuda"
    best = 0.0
    for n in (4096, 8192) if cuda else (512, 1024, 2048):
        # constant operands: the values do not change the speed, and the global RNG must stay untouched
        a = torch.full((n, n), 0.5, device=device, dtype=dtype)
        b = torch.full((n, n), 0.25, device=device, dtype=dtype)
        seconds = min(matmul_seconds(a, b, cuda) for _ in range(4))  # the first of four timings also warms up
        best = max(best, 2 * n**3 / seconds)
        if seconds > 0.1:
            break
    if cuda:
        torch.cuda.empty_cache()  # hand the operands' memory back to the run
    return best


def matmul_seconds(a: torch.Tensor, b: torch.Tensor, cuda: bool, calls: int = 5) -> float:
    """Seconds per product a @ b. On a GPU timed with CUDA events around `calls` products queued back to back:
    the GPU's own clock, no pause for the host between them."""
    if not cuda:
        start = time.perf_counter()
        a @ b
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(calls):
        a @ b
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000 / calls  # elapsed_time is in milliseconds


def peak_flops(device: str, precision: str) -> tuple[float, str]:
    """FLOP/s that 100% MFU means here, and where the figure comes from: a GPU's data-sheet peak, found by its
    exact name, else the best matmul rate in this precision measured now."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak_flops(name, precision)
        if peak is not None:
            return peak, f"{name} data-sheet peak"
    return measure_matmul_flops(device, PRECISIONS[precision]), f"measured {precision} matmul peak"
