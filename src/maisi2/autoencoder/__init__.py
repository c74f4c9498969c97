"""VAE inference: loading a VAE, encoding to the posterior mean, decoding under a memory budget.

One owner for everything that runs the VAE outside training:

| module | job |
| --- | --- |
| `loading` | a VAE from one of our checkpoints or the released ``autoencoder_v1.pt`` |
| `encoding` | posterior mean, whole or tiled (`tiled_encode_mean`); the encoder's receptive field |
| `decoding` | the decode plan for a memory budget (`plan_tiles`) and running it (`decode_tiled`) |
| `streamed` | the exact whole-volume decode, slab by slab (`decode_streamed`) |
| `tiles` | the one tiler: tile windows, the part each owns, blending weights |
| `group_norm` | whole-volume group-norm statistics (one implementation, MONAI's cast order) |
| `memory` | the one memory estimate of a decode (tiled or streamed) |

The VAE's training terms (L1, KL, the patch discriminator) live with its training recipe,
`maisi2.train_vae`.
"""

from maisi2.autoencoder.decoding import TILED_DECODE_TOLERANCE, TilePlan, decode, decode_tiled, decoder_context, plan_tiles
from maisi2.autoencoder.encoding import (NORM_STATS, TILED_ENCODE_TOLERANCE, downsample_factor, encode_mean,
                                       encoder_context, tiled_encode_mean)
from maisi2.autoencoder.loading import LoadedVAE, file_fingerprint, load_vae
from maisi2.autoencoder.memory import (DECODER_FIXED_BYTES, DECODER_TENSORS_PER_VOXEL, STREAM_SLAB_BYTES,
                                       decoder_bytes_per_voxel, estimate_decode_bytes, estimate_streamed_bytes,
                                       streamed_channels_per_voxel, streamed_slab_bytes)
from maisi2.autoencoder.streamed import STREAM_FLOAT16_TOLERANCE, decode_streamed, streamable, streamable_decoder

__all__ = [
    "LoadedVAE", "load_vae", "file_fingerprint",
    "encode_mean", "tiled_encode_mean", "downsample_factor", "encoder_context", "NORM_STATS", "TILED_ENCODE_TOLERANCE",
    "TilePlan", "plan_tiles", "decode_tiled", "decode", "decoder_context", "TILED_DECODE_TOLERANCE",
    "decode_streamed", "streamable", "streamable_decoder", "STREAM_FLOAT16_TOLERANCE",
    "DECODER_TENSORS_PER_VOXEL", "DECODER_FIXED_BYTES", "STREAM_SLAB_BYTES", "decoder_bytes_per_voxel",
    "estimate_decode_bytes", "streamed_channels_per_voxel", "streamed_slab_bytes", "estimate_streamed_bytes",
]
