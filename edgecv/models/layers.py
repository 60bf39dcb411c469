"""Layers that stand in for torch layers where the original cannot be exported or pruned as it is."""

from __future__ import annotations

import torch
from torch import nn


def _pool_windows(size_in: int, size_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index and weight of every element of each adaptive-pooling window along one axis, as
    (window width, size_out) tensors: window i covers [floor(i * in / out), ceil((i + 1) * in / out))."""
    starts = [(i * size_in) // size_out for i in range(size_out)]
    ends = [-(-(i + 1) * size_in // size_out) for i in range(size_out)]
    width = max(e - s for s, e in zip(starts, ends, strict=True))
    index = [[min(s + j, e - 1) for s, e in zip(starts, ends, strict=True)] for j in range(width)]
    weight = [[1.0 / (e - s) if s + j < e else 0.0 for s, e in zip(starts, ends, strict=True)] for j in range(width)]
    return torch.tensor(index), torch.tensor(weight)


class FixedAdaptiveAvgPool2d(nn.Module):
    """`AdaptiveAvgPool2d` for one known input size, written as gathers and weighted sums.

    The same function (to float rounding), but ONNX export works for any sizes: torch exports adaptive
    pooling only when the output size divides the input size (VGG's 7x7 pool of a 2x2 map at 64 px does
    not), and torch-pruning follows index_select as an element-wise op on channels. Its buffers are not
    saved in state_dict, so pretrained weights and checkpoints load unchanged.
    """

    def __init__(self, input_size: tuple[int, int], output_size: tuple[int, int]) -> None:
        super().__init__()
        self.input_size = tuple(input_size)
        self.output_size = tuple(output_size)
        row_index, row_weight = _pool_windows(input_size[0], output_size[0])
        col_index, col_weight = _pool_windows(input_size[1], output_size[1])
        self.register_buffer("row_index", row_index, persistent=False)
        self.register_buffer("row_weight", row_weight[:, :, None], persistent=False)  # broadcast over width
        self.register_buffer("col_index", col_index, persistent=False)
        self.register_buffer("col_weight", col_weight, persistent=False)
        self.row_taps, self.col_taps = len(row_index), len(col_index)  # ints: torch.fx traces the loops

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, output_size={self.output_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.index_select(2, self.row_index[0]) * self.row_weight[0]
        for j in range(1, self.row_taps):
            rows = rows + x.index_select(2, self.row_index[j]) * self.row_weight[j]
        out = rows.index_select(3, self.col_index[0]) * self.col_weight[0]
        for j in range(1, self.col_taps):
            out = out + rows.index_select(3, self.col_index[j]) * self.col_weight[j]
        return out
