"""A small 3D segmentation network (MONAI UNet) for tumours: trained here, used by `fidelity`
(is the generated tumour where the mask says?) and by the downstream-segmentation experiment.

The network sees HU clipped to [-1000, 1000] and scaled to [0, 1] (`maisi2.data.hu_to_unit`) and
predicts, per voxel, class 0 (background) or one of `SegmenterConfig.classes` (each a group of
MAISI label ids; the default is one class, "any tumour"). It works on the voxel grid it is given:
resample the volumes to a common spacing first if they differ. Training draws random patches
(with probability `foreground_prob` centred on a foreground voxel, randomly flipped) from a list
of (image, label) pairs held in memory, optimises Dice (foreground classes, over the batch) +
cross-entropy with AdamW, and writes a checkpoint
atomically every `ckpt_every` steps; calling `train_segmenter` again with the same output
resumes from it. Inference is sliding-window (MONAI `SlidingWindowInferer`, Gaussian blending).

Usage::

    result = train_segmenter([(ct, labels), ("ct2.nii.gz", "label2.nii.gz")], "seg.pt",
                             settings=SegmenterTrainSettings(steps=1000))
    model, config = load_segmenter("seg.pt")
    classes = segment(model, ct_hu, config)          # int array, 0 = background
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from maisi2.checkpoint import save_torch_file
from maisi2.data import hu_to_unit
from maisi2.errors import InvalidInput, OutputExists
from maisi2.labels import TUMOR_IDS

__all__ = [
    "SegmenterConfig",
    "SegmenterTrainSettings",
    "SegmenterResult",
    "build_segmenter",
    "labels_to_classes",
    "train_segmenter",
    "load_segmenter",
    "segment",
    "dice_score",
]

FORMAT = "maisi2-segmenter"
VERSION = 1
ArrayOrPath = np.ndarray | str | os.PathLike


@dataclass(frozen=True)
class SegmenterConfig:
    """Network and patch geometry; saved in the checkpoint."""

    classes: tuple[tuple[int, ...], ...] = (tuple(TUMOR_IDS),)
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    patch: tuple[int, int, int] = (32, 32, 32)  # tumours fill ~1% of it when centred (0.1% at 64^3)

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(tuple(int(i) for i in c) for c in self.classes))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        object.__setattr__(self, "patch", tuple(int(p) for p in self.patch))
        if not self.classes or any(not c for c in self.classes):
            raise InvalidInput("classes must be a non-empty list of non-empty label-id groups")
        if len(self.strides) != len(self.channels) - 1:
            raise InvalidInput(f"need one stride per channel transition: {len(self.channels) - 1}, got {len(self.strides)}")
        factor = int(np.prod(self.strides))
        if len(self.patch) != 3 or any(p % factor for p in self.patch):
            raise InvalidInput(f"patch {self.patch} must be 3 sizes divisible by {factor} (the product of the strides)")

    @property
    def num_classes(self) -> int:
        return 1 + len(self.classes)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SegmenterConfig":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class SegmenterTrainSettings:
    steps: int = 1000
    batch_size: int = 4
    lr: float = 3e-3
    foreground_prob: float = 0.67
    ckpt_every: int = 50
    seed: int = 0


@dataclass
class SegmenterResult:
    path: Path
    step: int
    losses: list[float] = field(default_factory=list)  # one per step, over the whole run (resumes included)


def build_segmenter(config: SegmenterConfig) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=config.num_classes, channels=config.channels,
                strides=config.strides, num_res_units=config.num_res_units)


def labels_to_classes(labels: np.ndarray, classes: Sequence[Sequence[int]]) -> np.ndarray:
    """MAISI label map -> class indices (0 = none of the groups, k = member of classes[k-1])."""
    out = np.zeros(np.shape(labels), dtype=np.int64)
    for k, ids in enumerate(classes, start=1):
        out[np.isin(labels, np.asarray(ids))] = k
    return out


def _load_pair(image: ArrayOrPath, label: ArrayOrPath, config: SegmenterConfig, index: int):
    from maisi2 import volume_io

    ct = volume_io.load_ct(image).array if isinstance(image, (str, os.PathLike)) else np.asarray(image, np.float32)
    lab = volume_io.load_label_map(label).array if isinstance(label, (str, os.PathLike)) else np.asarray(label)
    if ct.shape != lab.shape or ct.ndim != 3:
        raise InvalidInput(f"training pair {index}: image shape {ct.shape} and label shape {lab.shape} must be one 3D grid")
    if not np.all(np.isfinite(ct)):
        raise InvalidInput(f"training pair {index}: the image holds NaN/inf voxels")
    x = hu_to_unit(ct).astype(np.float32)
    y = labels_to_classes(lab, config.classes).astype(np.uint8)
    # Pad (air, background) up to the patch so every crop fits.
    pad = [(0, max(0, p - s)) for p, s in zip(config.patch, x.shape)]
    return np.pad(x, pad, constant_values=0.0), np.pad(y, pad, constant_values=0)


def _sample_patch(x, y, foreground, rng, patch, fg_prob):
    shape = np.asarray(x.shape)
    if foreground.size and rng.random() < fg_prob:
        centre = np.asarray(np.unravel_index(foreground[rng.integers(foreground.size)], x.shape))
    else:
        centre = np.asarray([rng.integers(s) for s in shape])
    start = np.clip(centre - np.asarray(patch) // 2, 0, shape - np.asarray(patch))
    sl = tuple(slice(int(a), int(a) + p) for a, p in zip(start, patch))
    # Random flips: cheap augmentation; a tumour is a tumour whichever way the patch faces.
    flips = tuple(axis for axis in range(3) if rng.random() < 0.5)
    return np.flip(x[sl], flips), np.flip(y[sl], flips)


def _save(path: Path, model, optimizer, config, settings, step, losses) -> None:
    from maisi2.atomic import atomic_output

    payload = {"format": FORMAT, "version": VERSION, "config": config.to_json(), "settings": json.dumps(asdict(settings)),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "optimizer": optimizer.state_dict(), "step": int(step), "losses": [float(v) for v in losses]}
    with atomic_output(path, overwrite=True) as tmp:
        save_torch_file(payload, tmp)


def _read(path: Path) -> dict:
    from maisi2.checkpoint import read_torch_file

    data = read_torch_file(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidInput(f"{path} is not a maisi2 segmenter checkpoint (train one with `maisi2 evaluate train-segmenter`)")
    return data


def train_segmenter(pairs: Sequence[tuple[ArrayOrPath, ArrayOrPath]], out: str | os.PathLike,
                    config: SegmenterConfig = SegmenterConfig(), settings: SegmenterTrainSettings = SegmenterTrainSettings(),
                    *, resume: bool = True, progress: bool = True, device: str | torch.device = "cpu") -> SegmenterResult:
    """Train (or resume training) a tumour segmenter on (CT HU, MAISI label map) pairs; returns the losses.

    pairs: arrays or NIfTI paths, each pair on one grid. out: the checkpoint file (written atomically
    every `settings.ckpt_every` steps and at the end). With `resume`, an existing checkpoint at
    `out` with the same config is continued up to `settings.steps`; without it, an existing file is an error.
    """
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    out = Path(out).expanduser()
    if not pairs:
        raise InvalidInput("train_segmenter needs at least one (image, label) pair")
    if out.exists() and not resume:
        raise OutputExists(f"{out} exists; pass resume=True (--resume) to continue it or choose another path")
    device = torch.device(device)
    data = [_load_pair(img, lab, config, i) for i, (img, lab) in enumerate(pairs)]
    foreground = [np.flatnonzero(y) for _, y in data]
    if not any(f.size for f in foreground):
        raise InvalidInput(f"no training label map holds any voxel of the classes {config.classes}; nothing to learn")

    torch.manual_seed(settings.seed)
    model = build_segmenter(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    step, losses = 0, []
    if out.exists():
        ckpt = _read(out)
        if SegmenterConfig.from_json(ckpt["config"]) != config:
            raise InvalidInput(f"{out} was trained with another network config; choose another output to start afresh")
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # the learning rate asked for now, not the stored one
            group["lr"] = settings.lr
        step, losses = int(ckpt["step"]), list(ckpt["losses"])
    # Dice over the foreground classes of the whole batch: tumours fill ~1% of a 32^3 patch, and a
    # background Dice term (or a per-patch Dice on tumour-free patches) lets "all background" win.
    loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    model.train()
    bar = tqdm(total=settings.steps, initial=min(step, settings.steps), desc="segmenter", disable=not progress)
    while step < settings.steps:
        rng = np.random.default_rng((settings.seed, step))  # per-step stream: a resumed run draws the same patches
        xs, ys = [], []
        for _ in range(settings.batch_size):
            i = int(rng.integers(len(data)))
            x, y = _sample_patch(*data[i], foreground[i], rng, config.patch, settings.foreground_prob)
            xs.append(x)
            ys.append(y)
        x = torch.from_numpy(np.stack(xs))[:, None].to(device)
        y = torch.from_numpy(np.stack(ys).astype(np.int64))[:, None].to(device)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % settings.ckpt_every == 0 or step == settings.steps:
            _save(out, model, optimizer, config, settings, step, losses)
    bar.close()
    if not out.exists():  # steps=0: nothing trained, but callers expect the checkpoint
        _save(out, model, optimizer, config, settings, step, losses)
    return SegmenterResult(out, step, losses)


def load_segmenter(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, SegmenterConfig]:
    """A trained segmenter (eval mode) and its config."""
    ckpt = _read(Path(path).expanduser())
    config = SegmenterConfig.from_json(ckpt["config"])
    model = build_segmenter(config)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), config


@torch.no_grad()
def segment(model: nn.Module | str | os.PathLike, ct_hu: np.ndarray, config: SegmenterConfig | None = None, *,
            overlap: float = 0.25, sw_batch_size: int = 1, device: str | torch.device = "cpu") -> np.ndarray:
    """Class map (uint8, 0 = background, k = config.classes[k-1]) of a CT in HU, by sliding windows."""
    from monai.inferers import SlidingWindowInferer

    if isinstance(model, (str, os.PathLike)):
        model, config = load_segmenter(model, device)
    if config is None:
        raise InvalidInput("pass the SegmenterConfig the model was built with (load_segmenter returns it)")
    ct = np.asarray(ct_hu, np.float32)
    if ct.ndim != 3 or not np.all(np.isfinite(ct)):
        raise InvalidInput(f"segment needs a finite 3D HU volume, got shape {ct.shape}")
    model = model.to(device).eval()
    inferer = SlidingWindowInferer(roi_size=config.patch, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian")
    x = torch.from_numpy(hu_to_unit(ct).astype(np.float32))[None, None].to(device)
    logits = inferer(x, model)
    return logits.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)


def dice_score(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two binary masks of one shape; 1.0 when both are empty."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape:
        raise InvalidInput(f"masks differ in shape: {pred.shape} vs {target.shape}")
    total = int(pred.sum()) + int(target.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & target)) / total
