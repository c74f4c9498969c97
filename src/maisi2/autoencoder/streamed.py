"""The streamed whole-volume decode: exact, one decoder's FLOPs, about a third of MONAI's memory.

MONAI's decoder runs block by block on whole tensors; its peak is ~7 full-resolution activations
(group-norm copies, the upsampled input, split/concat buffers). `decode_streamed` runs the same
layers in the same order, whole volume by whole volume, but every convolution slab by slab
along the first axis: a slab of its input (with the one-voxel halo the kernel needs) is
normalised, activated and upsampled into a small temporary, convolved, and written into the
output tensor. Group norms get their statistics from the whole stored input (exact, one pass)
and nothing is split or recomputed: exactly one decoder's worth of multiply-adds.

Memory: only layer outputs are stored, and a level's tensors share one buffer. The upsampling
conv makes a buffer of C channels; a residual block that halves the channels (C -> C/2, with
its 1x1 shortcut) writes its shortcut into channels [0, C/2) and its conv1 output into
[C/2, C) of that same buffer, each slab committed one slab late, once the next slab has read
the rows it shares; later blocks of the level keep their conv1 output in [C/2, C) too. For
the released VAE the peak is the full-resolution 128-channel buffer plus the half-resolution
input of its upsampling: 144 channels per output voxel (`streamed_channels_per_voxel`), against
MONAI's ~450. Stored tensors may be float16 (`storage`), halving that; arithmetic is float32,
except in the 3x3x3 convolutions of a decoder lowered by a bf16 compute plan (`fastops.Bf16Conv3d`:
bf16 multiply-adds on each slab, float32 in and out, so storage and statistics are unchanged).
Such a decoder stores its tensors channels-last-3d, the layout of the bf16 kernels: converting a
slab is then a cast, where from the default layout it is a transposition too (measured: the
conversions took about half of a bf16 streamed decode's time).
Group-norm statistics come from `group_norm.Moments` over the stored input, slab by slab.

Usage::

    image = decode_streamed(vae, latent / scale_factor)        # (1, 1, X, Y, Z) float32 on CPU
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maisi2.autoencoder.group_norm import Moments, group_statistics, scale_and_shift
from maisi2.autoencoder.memory import STREAM_SLAB_BYTES
from maisi2.config import VAEConfig
from maisi2.errors import InvalidInput
from maisi2.fastops import Bf16Conv3d, conv3d_into, conv3d_of, pointwise_conv3d
from maisi2.progress import Progress, fractions

__all__ = ["decode_streamed", "streamable", "streamable_decoder", "STREAM_FLOAT16_TOLERANCE"]

# Max |difference| between a streamed decode with float16 storage and the float32 one that
# tests/test_decode.py allows, relative to the largest output value (float16 keeps 11
# significant bits per stored activation; measured 0.9-1.2e-3 with random weights).
STREAM_FLOAT16_TOLERANCE = 2e-3



def streamable(cfg: VAEConfig) -> bool:
    """Whether `decode_streamed` knows every block of this decoder (no attention, no transposed convs)."""
    return not (any(cfg.attention_levels) or cfg.with_decoder_nonlocal_attn or cfg.use_convtranspose)


def _inner_conv(module: nn.Module) -> nn.Conv3d:
    """The nn.Conv3d inside MONAI's MaisiConvolution / Convolution wrappers."""
    while not isinstance(module, nn.Conv3d):
        module = module.conv
    return module



class _Streamer:
    """Runs a MAISI decoder layer by layer on whole stored tensors, convolving slab by slab.

    The current activation is always ``buffer[:, :channels]``; the rest of the buffer is room.
    """

    def __init__(self, storage: torch.dtype, slab_bytes: int, spill_dir: str | None = None,
                 advance=lambda work: None, layout: torch.memory_format = torch.contiguous_format):
        self.storage = storage
        self.layout = layout  # of every stored tensor and slab (channels-last-3d for a bf16 decoder)
        self.slab_bytes = slab_bytes
        self.spill_dir = spill_dir
        self.advance = advance  # told the multiply-adds of every slab convolved (`progress.fractions`)
        self.mapped: dict[int, weakref.ref] = {}  # storage address -> its memory map (spilled tensors)

    # -- stored tensors --

    def empty(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """A stored layer tensor; with `spill_dir`, backed by a deleted file (the OS pages it in and out)."""
        if self.spill_dir is None or torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device, memory_format=self.layout)
        import tempfile

        last = self.layout == torch.channels_last_3d  # the file holds (1, D, H, W, C); the tensor is a view
        file_shape = (shape[0], *shape[2:], shape[1]) if last else tuple(shape)
        with tempfile.TemporaryFile(dir=self.spill_dir) as handle:
            array = np.memmap(handle, dtype=torch.empty(0, dtype=dtype).numpy().dtype, mode="w+", shape=file_shape)
        tensor = torch.from_numpy(array)
        if last:
            tensor = tensor.permute(0, 4, 1, 2, 3)
        # Weak references only: the file must go when its tensor does.
        self.mapped = {k: ref for k, ref in self.mapped.items() if ref() is not None}
        self.mapped[tensor.untyped_storage().data_ptr()] = weakref.ref(array)
        return tensor

    def release(self, *tensors: torch.Tensor) -> None:
        """Drop the resident pages of spilled tensors (a shared file mapping keeps the data in the file)."""
        import mmap

        for tensor in tensors:
            ref = self.mapped.get(tensor.untyped_storage().data_ptr())
            array = None if ref is None else ref()
            if array is not None:
                array._mmap.madvise(mmap.MADV_DONTNEED)

    def rows_for(self, row_bytes: int) -> int:
        return max(1, self.slab_bytes // max(1, row_bytes))

    # -- slabs --

    def _input_rows(self, x, o0: int, o1: int, reach: int, scale, shift, silu: bool, upsample: bool):
        """float32 conv input for output rows [o0, o1): rows [o0 - reach, o1 + reach) of
        upsample(silu(norm(x))), with zero rows beyond the volume (the conv's own zero padding,
        added after the norm as in the plain decoder). A trilinear upsample reads one more coarse
        row on each side, so every row it keeps is interpolated exactly as in the whole volume."""
        factor = 2 if upsample else 1
        depth = x.shape[2] * factor
        f0, f1 = max(0, o0 - reach), min(depth, o1 + reach)
        low, high = reach - (o0 - f0), reach - (f1 - o1)
        part = torch.empty((1, x.shape[1], o1 - o0 + 2 * reach, *(n * factor for n in x.shape[3:])),
                           dtype=torch.float32, device=x.device, memory_format=self.layout)
        if low:
            part[:, :, :low].zero_()
        if high:
            part[:, :, part.shape[2] - high:].zero_()
        body = part[:, :, low:low + f1 - f0]
        if upsample:
            c0, c1 = max(0, f0 // 2 - 1), min(x.shape[2], (f1 - 1) // 2 + 2)
            coarse = self._activate(x[:, :, c0:c1], scale, shift, silu)
            body.copy_(F.interpolate(coarse, scale_factor=2.0, mode="trilinear")[:, :, f0 - 2 * c0:f1 - 2 * c0])
        else:
            self._activate(x[:, :, f0:f1], scale, shift, silu, out=body)
        return part

    @staticmethod
    def _activate(x: torch.Tensor, scale, shift, silu: bool, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 silu(x * scale + shift) (or a float32 copy of x without a norm), into `out` if given."""
        # Converted once into a float32 buffer and then changed in place: no further temporaries.
        y = out.copy_(x) if out is not None else x.to(torch.float32, copy=True)
        if scale is not None:
            torch.addcmul(shift, y, scale, out=y)
        return F.silu(y, inplace=True) if silu else y

    def _norm(self, x, norm):
        """Per-channel (scale, shift) that apply `norm` with the statistics of the whole stored x."""
        if norm is None:
            return None, None
        moments = Moments()
        rows = self.rows_for(x[0, :, 0].numel() * 8)
        for start in range(0, x.shape[2], rows):
            moments.add(x[:, :, start:start + rows])  # in its own layout: no transposed copy
            self.release(x)
        return scale_and_shift(norm, *group_statistics(moments, norm.num_groups))

    def conv(self, x: torch.Tensor, conv: nn.Conv3d, norm: nn.GroupNorm | None = None, silu: bool = False,
             upsample: bool = False, out: torch.Tensor | None = None, add: bool = False,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """conv(upsample(silu(norm(x)))) over a stored x (1, C, D, H, W), written to (or added into)
        `out` (which must not overlap the channels of x)."""
        reach = conv.kernel_size[0] // 2
        scale, shift = self._norm(x, norm)
        depth = x.shape[2] * (2 if upsample else 1)
        plane = x[0, 0, 0].numel() * (4 if upsample else 1)
        if out is None:
            out = self.empty((1, conv.out_channels, depth, *(n * (2 if upsample else 1) for n in x.shape[3:])),
                             dtype or self.storage, x.device)
        # Per output row: its input rows (twice, with the activation) and the output row, float32.
        rows = self.rows_for((3 * conv.in_channels + conv.out_channels) * plane * 4)
        for o0 in range(0, depth, rows):
            o1 = min(depth, o0 + rows)
            y = conv3d_into(conv, self._input_rows(x, o0, o1, reach, scale, shift, silu, upsample), (0, reach, reach),
                            out[:, :, o0:o1], add)
            self.advance(_work(conv, y[0, 0].numel()))
            self.release(x, out)
        return out

    # -- blocks --

    def res_block(self, buffer: torch.Tensor, channels: int, block: nn.Module) -> tuple[torch.Tensor, int]:
        """MaisiResBlock: x' = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))), x = buffer[:, :channels]."""
        x = buffer[:, :channels]
        conv1, conv2 = _inner_conv(block.conv1), _inner_conv(block.conv2)
        width = conv1.out_channels
        shortcut = None if isinstance(block.nin_shortcut, nn.Identity) else _inner_conv(block.nin_shortcut)
        if shortcut is not None and width > channels:
            raise NotImplementedError("decode_streamed: a residual block that widens the channels")
        if shortcut is not None and buffer.shape[1] >= 2 * width:
            self._conv1_and_shortcut_in_place(buffer, channels, conv1, block.norm1, shortcut)
            h, out = buffer[:, width:2 * width], buffer[:, :width]
        else:
            room = buffer[:, channels:2 * channels] if shortcut is None and buffer.shape[1] >= 2 * channels else None
            h = self.conv(x, conv1, block.norm1, silu=True, out=room)
            out = x if shortcut is None else self._shortcut_in_place(x, shortcut)
        self.conv(h, conv2, block.norm2, silu=True, out=out, add=True)
        return buffer, width

    def _shortcut_in_place(self, x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
        """A 1x1 convolution (no more output channels than input ones) written over x's first channels.

        Pointwise, so a slab reads only its own rows.
        """
        rows = self.rows_for((x.shape[1] + conv.out_channels) * x[0, 0, 0].numel() * 4)
        for start in range(0, x.shape[2], rows):
            y = self._pointwise(x[:, :, start:start + rows], conv)
            self.advance(_work(conv, y[0, 0].numel()))
            x[:, :conv.out_channels, start:start + rows] = y
            self.release(x)
        return x[:, :conv.out_channels]

    def _conv1_and_shortcut_in_place(self, buffer, channels, conv1, norm1, shortcut) -> None:
        """A channel-halving block's conv1 and 1x1 shortcut, both written into its own input buffer:
        shortcut -> channels [0, W), conv1 output -> [W, 2W). Slab k's results are committed after
        slab k+1 has been computed, since slab k+1 reads the last input row of slab k."""
        x, width, reach = buffer[:, :channels], conv1.out_channels, conv1.kernel_size[0] // 2
        scale, shift = self._norm(x, norm1)
        rows = self.rows_for((3 * channels + 4 * width) * x[0, 0, 0].numel() * 4)
        pending = None
        for o0 in range(0, x.shape[2], rows):
            o1 = min(x.shape[2], o0 + rows)
            h = conv3d_of(conv1, self._input_rows(x, o0, o1, reach, scale, shift, True, False), (0, reach, reach))
            s = self._pointwise(x[:, :, o0:o1], shortcut)
            self.advance(_work(conv1, h[0, 0].numel()) + _work(shortcut, s[0, 0].numel()))
            if pending is not None:
                self._commit(buffer, width, *pending)
            pending = (o0, o1, s, h)
        self._commit(buffer, width, *pending)

    def _pointwise(self, x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
        """A 1x1 convolution of a float32 copy of the slab `x`, in float32, in the stored layout."""
        x = x.float()
        if self.layout == torch.channels_last_3d:
            return pointwise_conv3d(x.contiguous(memory_format=self.layout), conv.weight, conv.bias)
        return F.conv3d(x, conv.weight, conv.bias)

    def _commit(self, buffer, width, o0, o1, s, h) -> None:
        buffer[:, :width, o0:o1] = s
        buffer[:, width:2 * width, o0:o1] = h
        self.release(buffer)

    def upsample(self, buffer: torch.Tensor, channels: int, block: nn.Module) -> tuple[torch.Tensor, int]:
        if buffer.shape[1] > channels:  # keep only the activation before the larger buffer is made
            buffer = self.compact(buffer, channels)
        return self.conv(buffer, _inner_conv(block.conv), upsample=True), channels

    def compact(self, buffer: torch.Tensor, channels: int) -> torch.Tensor:
        """A stored copy of buffer[:, :channels], made like every stored tensor (`empty`: in a file
        when spilling) and copied slab by slab. A plain clone would be anonymous memory: at 512^3
        the released VAE's 128-channel half-resolution activation, 4 GiB in float16, held while
        the last upsampling convolution runs."""
        copy = self.empty((1, channels, *buffer.shape[2:]), buffer.dtype, buffer.device)
        rows = self.rows_for(channels * buffer[0, 0, 0].numel() * buffer.element_size())
        for start in range(0, buffer.shape[2], rows):
            copy[:, :, start:start + rows] = buffer[:, :channels, start:start + rows]
            self.release(buffer, copy)
        return copy


def _work(conv: nn.Conv3d, voxels: int) -> int:
    """Multiply-adds of `conv` producing `voxels` output voxels."""
    return voxels * conv.out_channels * conv.in_channels // conv.groups * int(np.prod(conv.kernel_size))


def _decoder_work(vae: nn.Module, latent_voxels: int) -> int:
    """Multiply-adds of the decoder's convolutions (post_quant_conv aside) on a latent of `latent_voxels`:
    what `_Streamer.advance` is told in all, the total of a streamed decode's progress."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiResBlock, MaisiUpsample

    voxels, total = latent_voxels, 0
    for block in vae.decoder.blocks:
        if isinstance(block, MaisiResBlock):
            total += _work(_inner_conv(block.conv1), voxels) + _work(_inner_conv(block.conv2), voxels)
            if not isinstance(block.nin_shortcut, nn.Identity):
                total += _work(_inner_conv(block.nin_shortcut), voxels)
        elif isinstance(block, MaisiUpsample):
            voxels *= 8  # the streamer's upsampling doubles every axis
            total += _work(_inner_conv(block.conv), voxels)
        elif not isinstance(block, nn.GroupNorm):
            total += _work(_inner_conv(block), voxels)
    return total


@torch.no_grad()
def decode_streamed(vae: nn.Module, z: torch.Tensor, storage: torch.dtype = torch.float32,
                    slab_bytes: int = STREAM_SLAB_BYTES[0], spill_dir: str | None = None,
                    progress: Progress | None = None) -> torch.Tensor:
    """Whole-volume decode of an unscaled latent (1, C, x, y, z) with bounded temporaries.

    Equals ``vae.decode(z)`` up to float rounding (float32 storage; tests allow
    `TILED_DECODE_TOLERANCE`) at a fraction of its memory (`estimate_streamed_bytes`); float16
    storage halves the stored tensors (`STREAM_FLOAT16_TOLERANCE`); `spill_dir` keeps them in
    (deleted) files there instead of RAM, for volumes too large for either. Runs on the VAE's
    device; returns (1, 1, X, Y, Z) float32 on the CPU. Decoders with attention or transposed
    convolutions are not supported (`streamable`). `progress` (`maisi2.progress`) hears the
    thousandths of the decoder's multiply-adds done, slab by slab: (k, 1000).
    """
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiResBlock, MaisiUpsample

    if z.dim() != 5 or z.shape[0] != 1:
        raise InvalidInput(f"latent must be (1, C, x, y, z), got {tuple(z.shape)}")
    if not streamable_decoder(vae):
        raise NotImplementedError("decode_streamed supports MAISI decoders without attention or transposed convs")
    device = next(vae.parameters()).device
    lowered = any(type(m) is Bf16Conv3d for m in vae.decoder.modules())
    layout = torch.channels_last_3d if lowered else torch.contiguous_format
    run = _Streamer(storage, slab_bytes, spill_dir, fractions(progress, _decoder_work(vae, z[0, 0].numel())), layout)
    post = _inner_conv(vae.post_quant_conv)
    buffer = F.conv3d(z.to(device).float(), post.weight, post.bias).to(storage).contiguous(memory_format=layout)
    channels = buffer.shape[1]
    blocks = list(vae.decoder.blocks)
    for index, block in enumerate(blocks):
        if isinstance(block, MaisiResBlock):
            buffer, channels = run.res_block(buffer, channels, block)
        elif isinstance(block, MaisiUpsample):
            buffer, channels = run.upsample(buffer, channels, block)
        elif isinstance(block, nn.GroupNorm):
            continue  # applied by the next block, conv_out
        else:
            # conv_in, or conv_out after the last norm (no activation in between); the image is float32
            norm = blocks[index - 1] if index and isinstance(blocks[index - 1], nn.GroupNorm) else None
            buffer = run.conv(buffer[:, :channels], _inner_conv(block), norm,
                              dtype=torch.float32 if index == len(blocks) - 1 else None)
            channels = buffer.shape[1]
    return buffer[:, :channels].float().cpu().contiguous()


def _safe_inner_conv(module: nn.Module):
    try:
        return _inner_conv(module)
    except AttributeError:
        return None


def streamable_decoder(vae: nn.Module) -> bool:
    """Whether every block of this VAE's decoder is one `decode_streamed` runs, with group norms that
    stay in float32 (a ``norm_float16`` norm rounds before its affine, which the fold cannot)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiResBlock, MaisiUpsample

    blocks = list(getattr(getattr(vae, "decoder", None), "blocks", []))
    if not blocks or not hasattr(vae, "post_quant_conv"):
        return False
    if any(getattr(m, "norm_float16", False) for m in vae.decoder.modules()):
        return False
    for i, block in enumerate(blocks):
        if isinstance(block, MaisiResBlock):
            if not isinstance(block.nin_shortcut, nn.Identity) and block.out_channels > block.in_channels:
                return False
        elif isinstance(block, MaisiUpsample):
            if block.use_convtranspose:
                return False
        elif isinstance(block, nn.GroupNorm):
            if i != len(blocks) - 2:
                return False
        elif not isinstance(_safe_inner_conv(block), nn.Conv3d):
            return False
    return True
