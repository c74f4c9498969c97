"""Per-slice feature networks for the 2.5D FID.

A feature extractor maps a batch of 2D slices (HU, already clipped to [-1000, 1000]) to one
feature vector per slice. Two are provided:

``ResNet50Features`` -- the paper's setting: a ResNet-50 trunk (no classifier) whose layer-4 maps
    are averaged over space (2048 features). Weights come from a file the user gives: RadImageNet
    (the Keras-converted layout that MAISI loads through ``torch.hub`` "Warvito/radimagenet-models":
    biased convolutions, the stride on the first 1x1 convolution of a bottleneck, BatchNorm eps
    1.001e-5) or any torchvision-layout ResNet-50 state dict (bias-free convolutions, the stride on
    the 3x3 convolution). The layout is detected from the keys. Input preparation follows MAISI's
    FID script: min-max scaling to [0, 1] over the whole stack of slices of one plane of one volume,
    three copies of the channel, then the ImageNet means subtracted in BGR order (0.406, 0.456, 0.485).

``HUTextureFeatures`` -- the offline default (no download, no weights, deterministic): a
    radiomics-style description of each slice: a 16-bin HU histogram over [-1000, 1000] (in % of
    the slice) plus the mean, SD and 50/90/99th percentiles of the gradient magnitude (per voxel
    step) and of the 3x3 local SD, both in units of 10 HU, at 1x, 2x and 4x average-pool
    downsampling (46 features). Its FID measures differences in the intensity distribution and in
    edge/texture statistics. Its numbers are NOT comparable with the paper's.

Both are plain callables ``extractor(slices, value_range) -> (B, D) tensor`` with attributes
``name``, ``dim`` and ``comparable_to_paper``; any object with that shape plugs into `fid`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maisi2.data import HU_MAX, HU_MIN
from maisi2.errors import InvalidInput, MissingInput

__all__ = [
    "SliceFeatures",
    "ResNetLayout",
    "TORCHVISION",
    "RADIMAGENET",
    "ResNet50Trunk",
    "load_resnet50",
    "ResNet50Features",
    "HUTextureFeatures",
    "BGR_MEAN",
]

# ImageNet channel means in BGR order, subtracted after min-max scaling (as MAISI's FID script does).
BGR_MEAN = (0.406, 0.456, 0.485)


class SliceFeatures(Protocol):
    name: str
    dim: int
    comparable_to_paper: bool

    def __call__(self, slices: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
        """slices (B, H, W) float HU in [-1000, 1000]; value_range: (min, max) of the whole stack."""


# ---------------------------------------------------------------- ResNet-50


@dataclass(frozen=True)
class ResNetLayout:
    """What differs between ResNet-50 weight layouts with the same key names."""

    name: str
    conv_bias: bool  # convolutions carry a bias
    stride_on_1x1: bool  # a bottleneck's stride sits on its first 1x1 conv (else on the 3x3)
    bn_eps: float


TORCHVISION = ResNetLayout("torchvision", conv_bias=False, stride_on_1x1=False, bn_eps=1e-5)
RADIMAGENET = ResNetLayout("radimagenet", conv_bias=True, stride_on_1x1=True, bn_eps=1.001e-5)
_BLOCKS = (3, 4, 6, 3)
_WIDTHS = (64, 128, 256, 512)


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, layout: ResNetLayout):
        super().__init__()
        s1, s3 = (stride, 1) if layout.stride_on_1x1 else (1, stride)
        cout = 4 * width
        self.conv1 = nn.Conv2d(cin, width, 1, stride=s1, bias=layout.conv_bias)
        self.bn1 = nn.BatchNorm2d(width, eps=layout.bn_eps)
        self.conv2 = nn.Conv2d(width, width, 3, stride=s3, padding=1, bias=layout.conv_bias)
        self.bn2 = nn.BatchNorm2d(width, eps=layout.bn_eps)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=layout.conv_bias)
        self.bn3 = nn.BatchNorm2d(cout, eps=layout.bn_eps)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=layout.conv_bias), nn.BatchNorm2d(cout, eps=layout.bn_eps)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNet50Trunk(nn.Module):
    """ResNet-50 up to layer 4 (no pooling, no classifier); key names as torchvision's.

    forward: (B, 3, H, W) -> (B, 2048, H/32, W/32).
    """

    def __init__(self, layout: ResNetLayout = TORCHVISION):
        super().__init__()
        self.layout = layout
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=layout.conv_bias)
        self.bn1 = nn.BatchNorm2d(64, eps=layout.bn_eps)
        cin = 64
        for i, (blocks, width) in enumerate(zip(_BLOCKS, _WIDTHS)):
            stride = 1 if i == 0 else 2
            layer = []
            for b in range(blocks):
                layer.append(_Bottleneck(cin, width, stride if b == 0 else 1, layout))
                cin = 4 * width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MissingInput(
            f"ResNet-50 weights file {path} does not exist; give a RadImageNet or torchvision ResNet-50 state "
            "dict (.pt/.pth/.safetensors), or leave out --weights to use the offline hu-texture features"
        )
    from maisi2.checkpoint import read_safetensors, read_torch_file

    data = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise InvalidInput(f"{path} does not hold a state dict (a mapping of names to tensors)")
    prefix = "module."  # saved from DataParallel / DDP
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in data.items()}


def _shown(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_resnet50(path: str | Path, layout: ResNetLayout | None = None) -> ResNet50Trunk:
    """A ResNet-50 trunk (eval mode) with weights from a local file; the layout is detected.

    The classifier (``fc.*``) is ignored if present. Missing ``num_batches_tracked`` buffers are
    tolerated (they do not change eval-mode outputs). Any other missing, unexpected or wrongly
    shaped key is a ValueError that names them.
    """
    path = Path(path).expanduser()
    state = _read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if layout is None:
        layout = RADIMAGENET if "conv1.bias" in state else TORCHVISION
    model = ResNet50Trunk(layout)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"{path} is not a ResNet-50 state dict in the {layout.name} layout"]
        if missing:
            parts.append(f"missing keys: {_shown(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_shown(unexpected)}")
        parts.append("expected torchvision-style names (conv1.weight, bn1.*, layer1.0.conv1.weight, ...)")
        raise InvalidInput("; ".join(parts))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise InvalidInput(f"{path}: tensors of the wrong shape: {_shown(wrong, 5)}; is it a ResNet-50?")
    merged = {**expected, **{k: v.to(expected[k].dtype) for k, v in state.items()}}
    model.load_state_dict(merged, strict=True)
    return model.eval()


class ResNet50Features:
    """2048 spatially averaged layer-4 features of a ResNet-50 (the paper's FID network)."""

    dim = 2048

    def __init__(self, weights: str | Path | nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.net = (weights if isinstance(weights, nn.Module) else load_resnet50(weights)).to(self.device).eval()
        layout = getattr(self.net, "layout", None)
        # Only the RadImageNet weights reproduce the paper's numbers; ImageNet ones give another scale.
        self.comparable_to_paper = layout is RADIMAGENET
        self.name = f"resnet50-{layout.name if layout else 'custom'}"

    @torch.no_grad()
    def __call__(self, slices: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
        low, high = value_range
        x = (slices.to(self.device, torch.float32) - low) / (high - low + 1e-10)
        mean = torch.tensor(BGR_MEAN, device=self.device).view(1, 3, 1, 1)
        x = x[:, None].expand(-1, 3, -1, -1) - mean
        return self.net(x).mean(dim=(2, 3)).cpu()


# ---------------------------------------------------------------- offline default


class HUTextureFeatures:
    """Radiomics-style per-slice features: HU histogram + gradient / local-SD statistics at 3 scales."""

    name = "hu-texture"
    comparable_to_paper = False
    HIST_BINS = 16
    SCALES = (1, 2, 4)
    QUANTILES = (0.5, 0.9, 0.99)
    TEXTURE_UNIT_HU = 10.0

    def __init__(self):
        self.dim = self.HIST_BINS + len(self.SCALES) * 2 * (2 + len(self.QUANTILES))

    @torch.no_grad()
    def __call__(self, slices: torch.Tensor, value_range: tuple[float, float] | None = None) -> torch.Tensor:
        # Fixed HU scaling (not the stack's min-max): HU are absolute, so a global shift must show.
        # Units: histogram in % of the slice, gradient and local SD in tens of HU: on CT both groups
        # then spread over similar ranges (SDs ~1-10 across slices), so both weigh in the FID.
        x = slices.to(torch.float32).clamp(HU_MIN, HU_MAX)[:, None]
        feats = [self._histogram(x)]
        for scale in self.SCALES:
            xs = F.avg_pool2d(x, scale) if scale > 1 else x
            if min(xs.shape[-2:]) < 3:
                raise InvalidInput(f"slices of {tuple(x.shape[-2:])} voxels are too small for hu-texture features "
                                 f"at {scale}x downsampling; use volumes of at least {3 * max(self.SCALES)} voxels per axis")
            feats.append(self._stats(self._gradient(xs)) / self.TEXTURE_UNIT_HU)
            feats.append(self._stats(self._local_sd(xs)) / self.TEXTURE_UNIT_HU)
        return torch.cat(feats, dim=1)

    def _histogram(self, x: torch.Tensor) -> torch.Tensor:
        unit = (x.flatten(1) - HU_MIN) / (HU_MAX - HU_MIN)
        bins = (unit * self.HIST_BINS).long().clamp(0, self.HIST_BINS - 1)
        counts = torch.zeros(x.shape[0], self.HIST_BINS).scatter_add_(1, bins, torch.ones_like(bins, dtype=torch.float32))
        return 100.0 * counts / bins.shape[1]

    @staticmethod
    def _gradient(x: torch.Tensor) -> torch.Tensor:
        gx = x[..., 1:, :-1] - x[..., :-1, :-1]
        gy = x[..., :-1, 1:] - x[..., :-1, :-1]
        return torch.sqrt(gx**2 + gy**2)

    @staticmethod
    def _local_sd(x: torch.Tensor) -> torch.Tensor:
        mean = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        mean_sq = F.avg_pool2d(x * x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.sqrt((mean_sq - mean * mean).clamp_min(0))

    def _stats(self, m: torch.Tensor) -> torch.Tensor:
        flat = m.flatten(1)
        # Nearest-rank percentiles by partial sort (5x faster than a full sort; torch.quantile also
        # refuses inputs over 16M elements).
        idx = [round(q * (flat.shape[1] - 1)) for q in self.QUANTILES]
        ranks = torch.from_numpy(np.partition(flat.cpu().numpy(), idx, axis=1)[:, idx])
        return torch.cat([flat.mean(1, keepdim=True), flat.std(1, keepdim=True), ranks], dim=1)
