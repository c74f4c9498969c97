"""maisi2: MAISI-v2 (rectified-flow latent diffusion + ControlNet) for 3D CT synthesis."""

__version__ = "0.1.0"
