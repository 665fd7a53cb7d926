"""VLMDiff: caption-conditioned latent diffusion reconstructs normal images; the map is a feature difference.

- ``architecture``: model sizes and the :class:`VLMDiffArchitecture` dataclass.
- ``autoencoder``: the latent autoencoder (SD VAE, TAEF2).
- ``network``: :class:`VLMDiffNet` (UNet + guidance network), training loss and DDIM reconstruction.
- ``run_files``: reading a training run folder.
- ``detector``: :class:`VLMDiff`, the detector, and its config.
- ``training``: ``anomalens train vlmdiff``.
- ``captions``: VLM captioning with a content-hash cache.
"""

from anomalens.methods.vlmdiff.architecture import VLMDiffArchitecture
from anomalens.methods.vlmdiff.detector import VLMDiff, VLMDiffConfig

__all__ = ["VLMDiff", "VLMDiffArchitecture", "VLMDiffConfig"]
