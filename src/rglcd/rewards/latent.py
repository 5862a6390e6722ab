"""The latent proxy reward model (LRM) of RG-LCD (Li et al. 2024, Alg. 4) and its preference loss.

The LRM is a CLIP whose image tower reads 4-channel VAE latents instead of pixels, so the student can
maximise it without decoding. After each student update the LRM is fitted online to the expert reward's
pairwise preferences among three latents per sample: the student's one-step prediction, the target network's
prediction and the ground-truth latent. Latents are the VAE's own (``model_pred / scaling_factor``), as in the
official code.

Two image towers, both built through open_clip with a latent stem:

* ``resnet``: open_clip's ModifiedResNet with attention pooling (the official ``latent_RN50``: layers
  [3, 4, 6, 3], width 64, 64² latents of a 512 px VAE); its input must be a multiple of 32 in size.
* ``vit``: open_clip's VisionTransformer over latent patches (the official ``latent_ViT``; the world's LRM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import lock_text_tower
from torch import Tensor, nn

from ..devices import host_to_device
from ..models import decode_latents
from .clip import ClipScorer, small_open_clip
from .weights import load_model_weights, read_model_config, save_model_folder

KIND = "latent-clip"
PRETRAIN_COMMAND = "rglcd lrm pretrain"
# (i, j) index pairs of (student prediction, target, ground truth) the preference loss compares.
PAIRS = ((0, 1), (0, 2), (1, 2))


@dataclass(frozen=True)
class LatentClipConfig:
    latent_channels: int = 4
    latent_size: int = 64  # SD 1.5 at 512 px
    image_tower: Literal["resnet", "vit"] = "resnet"
    vision_layers: list[int] = field(default_factory=lambda: [3, 4, 6, 3])  # resnet: blocks per stage; vit: [depth]
    vision_width: int = 64
    vision_head_width: int = 64
    patch_size: int = 2  # vit only
    embed_dim: int = 1024
    context_length: int = 77
    vocab_size: int = 49408  # OpenAI CLIP's BPE, as open_clip.tokenize
    text_width: int = 1024
    text_heads: int = 16
    text_layers: int = 24

    def __post_init__(self) -> None:
        if self.image_tower not in ("resnet", "vit"):
            raise ValueError(f"image_tower must be 'resnet' or 'vit', got {self.image_tower!r}")
        if self.image_tower == "resnet" and (len(self.vision_layers) != 4 or self.latent_size % 32):
            raise ValueError("the resnet tower needs 4 stages and a latent size that is a multiple of 32")
        if self.image_tower == "vit" and (len(self.vision_layers) != 1 or self.latent_size % self.patch_size):
            raise ValueError("the vit tower needs vision_layers=[depth] and a latent size divisible by patch_size")


# The official latent_RN50 layout (Ji4chenLi/rg-lcd open_clip_customized/model_configs/latent_RN50.json).
LATENT_RN50 = LatentClipConfig()
# The miniature world's: 8×8 latents of 32 px images, captions of at most 15 tokens.
WORLD_LATENT_CLIP = LatentClipConfig(
    latent_size=8,
    image_tower="vit",
    vision_layers=[3],
    vision_width=64,
    vision_head_width=16,
    patch_size=2,
    embed_dim=64,
    context_length=32,
    text_width=64,
    text_heads=4,
    text_layers=2,
)


class LatentClip(ClipScorer):
    """score(z, c) = cos(image_tower(z), text_tower(c)) in [-1, 1]; logits = exp(logit_scale) · score.

    Its "images" are VAE latents ``model_pred / scaling_factor`` [B, C, h, w]; ``encode_images`` embeds them.
    """

    def __init__(self, config: LatentClipConfig):
        super().__init__()
        self.config = config
        layers = tuple(config.vision_layers) if config.image_tower == "resnet" else config.vision_layers[0]
        self.clip = small_open_clip(
            config, vision_layers=layers, image_size=config.latent_size, vocab_size=config.vocab_size
        )
        # The latent stem: open_clip's first convolution reads RGB; swap it for one reading the VAE's channels.
        stem = self.clip.visual.conv1
        self.clip.visual.conv1 = nn.Conv2d(
            config.latent_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> LatentClip:
        make_it = f"make one with `{PRETRAIN_COMMAND}`"
        model = cls(LatentClipConfig(**read_model_config(Path(folder), KIND, make_it)))
        load_model_weights(model, Path(folder), make_it)
        return model

    def save_pretrained(self, folder: str | Path, training: dict | None = None) -> Path:
        return save_model_folder(self, folder, KIND, asdict(self.config), training)

    def preprocess(self, latents: Tensor) -> Tensor:
        """VAE latents [B, C, h, w] (unscaled) go to the image tower as they are."""
        return latents.to(self.clip.logit_scale.dtype)

    def unlock(self, image_groups: int, text_groups: int) -> LatentClip:
        """Freeze all but the last ``image_groups`` groups of the image tower and ``text_groups`` of the text
        tower (open_clip's grouping: text groups from the end are the projection, the last block with the final
        norm, then earlier blocks). The logit scale stays trainable. The official runs unlock the resnet's
        attention pool (1 group) or the ViT's last 2 groups, and no text group.
        """
        self.requires_grad_(False)
        visual = self.clip.visual
        if self.config.image_tower == "vit":
            visual.lock(unlocked_groups=image_groups)
        elif image_groups:
            groups = [
                [visual.conv1, visual.bn1, visual.conv2, visual.bn2, visual.conv3, visual.bn3],
                visual.layer1,
                visual.layer2,
                visual.layer3,
                visual.layer4,
                visual.attnpool,
            ]
            for group in groups[-image_groups:]:
                for module in group if isinstance(group, list) else [group]:
                    module.requires_grad_(True)
        lock_text_tower(self.clip, text_groups)
        self.clip.logit_scale.requires_grad_(True)
        return self


def preference_loss(
    proxy_logits: Tensor,
    expert_logits: Tensor,
    kind: Literal["kl", "cross_entropy"] = "kl",
    smooth_ground_truth: bool = False,
) -> tuple[Tensor, Tensor]:
    """Alg. 4's LRM loss over the three pairs of (student, target, ground truth); returns (loss, accuracy).

    ``proxy_logits``, ``expert_logits``: [3, B], rows in that order. For each pair (i, j) the expert's
    softmax over (logit_i, logit_j) is the label distribution:

    * ``kl``: Σ_pairs KL(softmax(expert pair) ‖ softmax(proxy pair)), batch-mean. ``smooth_ground_truth``
      replaces the label of a pair with the ground truth by (½, ½) where the expert prefers the generated latent.
    * ``cross_entropy``: Σ_pairs CE(proxy pair, expert's choice), where the ground truth always wins its pairs.

    Accuracy: the fraction of pairs where the proxy's choice matches the label's, averaged over the 3 pairs.
    """
    if proxy_logits.shape != expert_logits.shape or proxy_logits.shape[0] != 3:
        raise ValueError(f"need [3, B] logits, got {tuple(proxy_logits.shape)} and {tuple(expert_logits.shape)}")
    loss = proxy_logits.new_zeros(())
    accuracy = proxy_logits.new_zeros(())
    for i, j in PAIRS:
        proxy = torch.stack([proxy_logits[i], proxy_logits[j]], dim=1)  # [B, 2]
        expert = torch.stack([expert_logits[i], expert_logits[j]], dim=1).float()  # [B, 2]
        labels = expert.argmax(dim=1)
        if kind == "kl":
            target = expert.softmax(dim=1)
            if smooth_ground_truth and j == 2:
                target = torch.where((labels == 0)[:, None], torch.full_like(target, 0.5), target)
            loss = loss + F.kl_div(proxy.log_softmax(dim=1), target, reduction="batchmean")
        elif kind == "cross_entropy":
            if j == 2:
                labels = torch.ones_like(labels)  # the ground truth is always preferred
            loss = loss + F.cross_entropy(proxy, labels)
        else:
            raise ValueError(f"preference loss kind must be 'kl' or 'cross_entropy', got {kind!r}")
        accuracy = accuracy + (proxy.argmax(dim=1) == labels).float().mean().detach()
    return loss, accuracy / len(PAIRS)


@dataclass
class ProxyFit:
    """One online fit of the LRM to the expert (Alg. 4, after the student update)."""

    loss: Tensor  # scalar, differentiable w.r.t. the LRM's unlocked parameters
    accuracy: Tensor  # scalar: agreement of the LRM's pairwise choices with the expert's
    expert_logit: Tensor  # scalar: the expert's mean (scaled) logit on the student's predictions


def proxy_fit(
    proxy: LatentClip,
    expert: nn.Module,
    vae: nn.Module,
    *,
    model_pred: Tensor,
    target: Tensor,
    latents: Tensor,
    prompts: Sequence[str],
    indices: Tensor,
    kind: Literal["kl", "cross_entropy"] = "kl",
    smooth_ground_truth: bool = False,
    expert_scale: float = 1.0,
    expert_scale_from_proxy: bool = False,
    decode_batch_size: int = 0,
) -> ProxyFit:
    """The LRM's preference loss on the samples ``indices`` [R] of a batch.

    ``indices``: a CPU tensor. ``model_pred``, ``target``, ``latents``: the step's student prediction, target
    prediction and clean latents [B, C, h, w], all × the VAE scaling factor. The expert scores the three decoded
    latents per sample; its logits are multiplied by ``expert_scale``, or by the LRM's own exp(logit_scale) when
    ``expert_scale_from_proxy`` (the official code's choice for ImageReward, which has no logit scale).
    """
    texts = [prompts[i] for i in indices.tolist()] * 3  # indices on the CPU: no read back from the GPU
    chosen = host_to_device(indices, model_pred.device)
    scaled = torch.cat([x[chosen].detach().float() for x in (model_pred, target, latents)])  # [3R, C, h, w]
    with torch.no_grad():
        images = decode_latents(vae, scaled, decode_batch_size)  # [3R, 3, H, W]
        expert_logits = expert.logits(images, texts).float()
        scale = proxy.clip.logit_scale.exp().detach() if expert_scale_from_proxy else expert_scale
        expert_logits = (expert_logits * scale).view(3, -1)  # [3, R]
    proxy_logits = proxy.logits(scaled / vae.config.scaling_factor, texts).view(3, -1)  # [3, R]
    loss, accuracy = preference_loss(proxy_logits, expert_logits, kind, smooth_ground_truth)
    return ProxyFit(loss, accuracy, expert_logits[0].mean())
