"""The mask generator: label maps made from anatomy sizes when no library mask fits.

A mask autoencoder and a latent UNet conditioned on a 10-slot anatomy-size vector, as in the
MAISI release. Two kinds:

* the release's (``maisi-v2`` preset; 256^3 voxels of 1.5 mm, DDPM with 1000 steps), read
  strictly from the user's model folder (`files.load_mask_generator`);
* ours, trained here with rectified flow at the ``tiny``/``small`` presets and sampled in ~30
  Euler steps (`train.train_mask_generator`, ``maisi2 train-maskgen``).

Modules: `config` (presets), `networks` (builders and the network calls), `sizes` (the size
vector, its scale and the table that completes a request), `postprocess` (logits -> clean MAISI
label map), `files` (released and our folders), `sampling` (`generate_mask`), `train`.

Usage::

    from maisi2.maskgen import load_mask_generator, generate_mask
    gen = load_mask_generator("models/released")
    sample = generate_mask(gen, {"liver": 0.6, "hepatic tumor": 0.2}, seed=0, spacing=(1.5, 1.5, 2.0))
    sample.volume  # io.Volume of MAISI ids
"""

from maisi2.maskgen.config import MaskGenConfig, get_mask_config
from maisi2.maskgen.files import MaskGenerator, load_mask_generator, save_mask_generator, write_released_mask_generator
from maisi2.maskgen.sampling import MaskSample, generate_mask
from maisi2.maskgen.sizes import SLOTS, SizeScale, SizeTable, parse_anatomy_sizes

__all__ = [
    "MaskGenConfig", "get_mask_config", "MaskGenerator", "load_mask_generator", "save_mask_generator",
    "write_released_mask_generator", "MaskSample", "generate_mask", "SLOTS", "SizeScale", "SizeTable",
    "parse_anatomy_sizes",
]
