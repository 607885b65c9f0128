"""Linear layers with their weights reordered once for oneDNN's matmul, for float32 inference on CPU.

PyTorch's CPU `linear` (MKL's sgemm) reads the weight in its plain [out, in] layout on every call; oneDNN's
matmul can take it reordered beforehand into the blocked layout its kernels read from. Decoding calls each
weight thousands of times with a few dozen rows, where that is what matters. Measured on this project's 2-core
CPU (fp32, 2 threads), GFLOPS of one matmul, PyTorch's -> prepacked:
    64 rows:  576x576 91 -> 186, 576->1536 156 -> 213, 1536->576 167 -> 205, lm head 576->49152 93 -> 199
    32 rows:  576x576 130 -> 165, lm head 72 -> 175
and the hf teacher's decode loop on 64 prompts x 64 new tokens (SmolLM2-135M) went from 160-166 to 222-238
tok/s with the same answers. Results differ from PyTorch's only by float rounding (a different summation
order), as any two matmul kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The row count oneDNN is told to expect when reordering (a hint for its blocking: any count works). A decode step
# has up to batch_size rows and a prefill group a few hundred; 64 measured as fast as the exact count at 8-240 rows
# (a hint of 1 was 5-35% slower).
ROWS_HINT = 64


def _ops_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def can_pack(model) -> bool:
    """Whether `model`'s linear layers may be prepacked: on CPU, in float32, with PyTorch's oneDNN ops."""
    param = next(model.parameters(), None)
    return param is not None and param.device.type == "cpu" and param.dtype == torch.float32 and _ops_available()


class PackedLinear(nn.Module):
    """An inference-only stand-in for an `nn.Linear`: the same function, its weight in oneDNN's layout. It has no
    parameters (nothing to train, nothing in the state dict); `in_features` / `out_features` say what it
    replaced."""

    def __init__(self, linear: nn.Linear, rows_hint: int = ROWS_HINT):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _agrees(packed: PackedLinear, linear: nn.Linear) -> bool:
    """The packed layer computes what the plain one does, up to float rounding (a guard against an op whose
    behaviour changed in some PyTorch build: then the model is left as it was)."""
    x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = F.linear(x, linear.weight, linear.bias), packed(x)
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def linear_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute name, layer) of every `nn.Linear` in `model`: exactly Linear, since subclasses
    (quantised, LoRA) compute something else."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear]


def pack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` of `model` (on CPU, float32) by a `PackedLinear`, for inference only: the model
    can no longer be trained or saved as it was. Returns how many were replaced (0: not possible here, the model
    untouched). Tied weights (an lm head sharing the embedding's) get a packed copy; the embedding keeps its own."""
    if not can_pack(model):
        return 0
    targets = linear_slots(model)
    if not targets or not _agrees(PackedLinear(targets[0][2]), targets[0][2]):
        return 0
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
