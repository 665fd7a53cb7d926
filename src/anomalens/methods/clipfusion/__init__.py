"""CLIPFusion: CLIP patch maps fused with Stable Diffusion cross-attention and feature maps.

- ``model``: the detector and its config.
- ``training``: training the PatchCLIP projections on an auxiliary dataset (``anomalens train patchclip``).
"""

from anomalens.methods.clipfusion.model import CLIPFusion, CLIPFusionConfig

__all__ = ["CLIPFusion", "CLIPFusionConfig"]
