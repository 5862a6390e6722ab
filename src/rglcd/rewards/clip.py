"""Pretrained CLIP-family rewards: HPSv2 / HPSv2.1, CLIPScore, PickScore and the LAION aesthetic predictor.

Each is frozen and differentiable: the images are resized, cropped or padded and normalised in torch, with the
geometry of the original PIL pipeline (:class:`ClipPreprocess`), so gradients reach the pixels. Scores follow the
originals; :meth:`logits` gives the score on the scale that RG-LCD's pairwise softmax uses (``return_logits=True``
in the official ``reward_fn.py`` of Ji4chenLi/rg-lcd: ``exp(logit_scale) · cosine``).

Weights are a local path or a Hugging Face hub reference (``"owner/repo/filename"`` for single files, a repo id for
transformers folders); open_clip pretrained tags go through open_clip. Offline, missing weights raise an error that
names what to download. For tests, each reward also takes a small architecture, whose weights are saved in the
original file layout and loaded by the same code as the real checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path

# open_clip takes seconds to import and comes with this module, hence with rglcd.rewards: what must stay quick
# (`rglcd --help`, which reads the presets) imports rglcd.rewards only inside the functions that need it.
import open_clip
import torch
import torch.nn.functional as F
from open_clip import tokenize
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transform import PreprocessCfg
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from ..architectures import clip_tokenizer
from ..devices import host_to_device
from .base import RewardModel, check_batch, register_reward
from .weights import load_state_dict, load_strict, resolve_file

# OpenAI CLIP's normalisation, which HPSv2, PickScore, CLIPScore, the LAION aesthetic predictor and ImageReward apply.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# hpsv2.utils.hps_version_map: the files that hpsv2's img_score.py downloads from the hub repo xswu/HPSv2.
HPS_CHECKPOINTS = {"v2.0": "xswu/HPSv2/HPS_v2_compressed.pt", "v2.1": "xswu/HPSv2/HPS_v2.1_compressed.pt"}
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
# PickScore_v1's CLIPModel config: laion/CLIP-ViT-H-14-laion2B-s32B-b79K's, which it was fine-tuned from.
PICKSCORE_ARCHITECTURE = {
    "projection_dim": 1024,
    "text_config": {
        "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
        "num_hidden_layers": 24,
    },
    "vision_config": {
        "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16,
        "num_hidden_layers": 32, "patch_size": 14, "image_size": 224,
    },
}  # fmt: skip
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_HEADS = (
    "sa_0_4_vit_l_14_linear.pth from https://github.com/LAION-AI/aesthetic-predictor (v1, linear), or "
    "sac+logos+ava1-l14-linearMSE.pth from https://github.com/christophschuhmann/improved-aesthetic-predictor (v2, MLP)"
)


def small_open_clip(config, *, vision_layers: int | tuple[int, ...], image_size: int, vocab_size: int) -> nn.Module:
    """open_clip's CLIP at a small config's sizes (``embed_dim``, ``vision_width``, ``vision_head_width``,
    ``patch_size``, ``context_length``, ``text_width``, ``text_heads``, ``text_layers``): the world's CLIP and the
    latent proxy RM. ``vision_layers`` is a ViT's depth or a ResNet's blocks per stage."""
    return CLIP(
        embed_dim=config.embed_dim,
        vision_cfg=CLIPVisionCfg(
            layers=vision_layers,
            width=config.vision_width,
            head_width=config.vision_head_width,
            patch_size=config.patch_size,
            image_size=image_size,
        ),
        text_cfg=CLIPTextCfg(
            context_length=config.context_length,
            vocab_size=vocab_size,
            width=config.text_width,
            heads=config.text_heads,
            layers=config.text_layers,
        ),
    )


def linear_mlp_head(width: int) -> nn.Sequential:
    """The improved aesthetic predictor's head, which ImageReward reuses: five linear layers without activations
    (their ReLUs are commented out in both), dropouts between the first four; its indices fix the key names."""
    return nn.Sequential(
        nn.Linear(width, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


# --------------------------------------------------------------------------------------------------- preprocessing


class ClipPreprocess(nn.Module):
    """[B,3,H,W] in [0, 1] -> the vision tower's input [B,3,S,S]: an original PIL pipeline's geometry, in torch.

    * ``"shortest"`` (open_clip's inference transform and transformers' ``CLIPImageProcessor``): the shortest side
      to S, the other to ``int(S · long / short)``, then a centred S×S crop. Its offset is ``round(d / 2)`` in
      torchvision (open_clip) and ``d // 2`` in transformers (``floor_crop``): they differ by a pixel for some sizes.
    * ``"longest"`` (HPSv2's ``preprocess_val``, ``ResizeMaxSize``): the longest side to S, the other to
      ``round(S · short / long)``, then centred zero padding (black, before normalising) to S×S.

    Resizing is bicubic with antialiasing, as PIL does it (without PIL's rounding to uint8); a square image is simply
    resized to S×S in both modes. Then ``(x - mean) / std``.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        resize_mode: str = "shortest",
        floor_crop: bool = False,
    ):
        super().__init__()
        if resize_mode not in ("shortest", "longest"):
            raise ValueError(f"resize_mode must be 'shortest' or 'longest', not {resize_mode!r}")
        self.size, self.resize_mode, self.floor_crop = size, resize_mode, floor_crop
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1], not of shape {list(images.shape)}")
        images = images.float()
        height, width = images.shape[-2:]
        size = self.size
        if self.resize_mode == "shortest":
            long = int(size * max(height, width) / min(height, width))
            new = (size, long) if height <= width else (long, size)
        else:
            scale = size / max(height, width)
            new = (round(height * scale), round(width * scale))
        if new != (height, width):
            images = F.interpolate(images, size=new, mode="bicubic", antialias=True, align_corners=False)
        if self.resize_mode == "shortest":
            top, left = (d // 2 if self.floor_crop else round(d / 2) for d in (new[0] - size, new[1] - size))
            images = images[..., top : top + size, left : left + size]
        else:
            pad_h, pad_w = size - new[0], size - new[1]
            images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return (images - self.mean) / self.std


# -------------------------------------------------------------------------------------------------------- open_clip


def _build_open_clip(model: str | dict, pretrained: str | None, checkpoint: str | Path | None):
    """(open_clip CLIP, its tokenizer, its preprocessing config), weights from ``checkpoint`` or else ``pretrained``.

    ``model`` is an open_clip model name (``"ViT-H-14"``) or an architecture given as a config dict in the format
    of open_clip's ``model_configs/*.json`` (tiny ones in tests); a dict needs ``checkpoint``.
    """
    if isinstance(model, dict):
        if checkpoint is None:
            raise ValueError("an architecture given as a config dict needs checkpoint=<its weights file>")
        clip = open_clip.model.CLIP(**model)
        tokenizer = open_clip.SimpleTokenizer(context_length=clip.context_length)
        # What open_clip.create_model gives a model without a pretrained tag: the defaults at the tower's size.
        preprocess_cfg = asdict(PreprocessCfg(size=clip.visual.image_size))
    else:
        tag = pretrained if checkpoint is None else None
        try:  # on the current default device: the meta device builds a real-size tower in no memory
            with _without_random_init_warning(checkpoint is not None):
                clip = open_clip.create_model(model, pretrained=tag, device=torch.get_default_device())
        except RuntimeError as error:  # mostly: the tag's weights are neither cached nor downloadable
            raise FileNotFoundError(
                f"cannot build open_clip {model} with pretrained={tag!r} ({error}); if its weights are not cached, "
                "run once online to cache them, or pass checkpoint=<a local weights file>"
            ) from error
        tokenizer = open_clip.get_tokenizer(model)
        preprocess_cfg = clip.visual.preprocess_cfg
    if checkpoint is not None:
        path = resolve_file(checkpoint)
        load_strict(clip, load_state_dict(path), path)
    return clip, tokenizer, preprocess_cfg


@contextmanager
def _without_random_init_warning(loading_a_checkpoint: bool) -> Iterator[None]:
    """open_clip warns "initialized randomly" when built without a pretrained tag: not so when a checkpoint follows."""

    def keep(record: logging.LogRecord) -> bool:
        return not (loading_a_checkpoint and "initialized randomly" in record.getMessage())

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _preprocess_from_open_clip(cfg: dict, resize_mode: str | None = None) -> ClipPreprocess:
    """The torch twin of ``open_clip.image_transform`` for a model's preprocessing config (bicubic only)."""
    if cfg["interpolation"] != "bicubic":
        raise ValueError(f"only bicubic resizing is implemented, not {cfg['interpolation']!r}")
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]  # ViTs keep (S, S)
    return ClipPreprocess(size, cfg["mean"], cfg["std"], resize_mode or cfg["resize_mode"])


class ClipScorer(RewardModel):
    """``cos(input embedding, prompt embedding)`` of an open_clip CLIP, in [-1, 1]; logits ``exp(logit_scale)·cos``.

    Subclasses set ``self.clip`` and define ``preprocess(inputs)`` (to the image tower's input), and may override
    ``tokenize(prompts)``: the pixel rewards here, the world's CLIP and the latent proxy RM, whose inputs are latents.
    """

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids [B, context_length] on the CPU: OpenAI CLIP's BPE, as ``open_clip.tokenize``."""
        return tokenize(list(prompts), context_length=self.clip.context_length)

    def encode_images(self, images: Tensor) -> Tensor:
        """Unit-norm embeddings [B, D] of the inputs (images in [0, 1], or latents for the latent proxy RM)."""
        return self.clip.encode_image(self.preprocess(images), normalize=True)

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings [B, D]."""
        return self.clip.encode_text(
            host_to_device(self.tokenize(prompts), self.clip.logit_scale.device), normalize=True
        )

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_batch(images, prompts)
        return (self.encode_images(images) * self.encode_prompts(prompts)).sum(dim=-1)

    def logits(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``exp(logit_scale) · cosine`` [B]: the scale of the model's contrastive training (RG-LCD's logits)."""
        return self.clip.logit_scale.exp() * self(images, prompts)

    def enable_gradient_checkpointing(self) -> None:
        self.clip.set_grad_checkpointing(True)


class OpenClipReward(ClipScorer):
    """An open_clip CLIP by name (or config) and weights, preprocessing as its own transform; HPSv2 and CLIPScore."""

    def __init__(
        self,
        model: str | dict,
        *,
        pretrained: str | None = None,
        checkpoint: str | Path | None = None,
        resize_mode: str | None = None,
    ):
        super().__init__()
        self.clip, self.tokenizer, preprocess_cfg = _build_open_clip(model, pretrained, checkpoint)
        self.preprocess = _preprocess_from_open_clip(preprocess_cfg, resize_mode)
        self.freeze()

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        return self.tokenizer(list(prompts))  # the model's own (open_clip.get_tokenizer)


class HPSv2(OpenClipReward):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023, arXiv:2306.09341; github.com/tgxs002/HPSv2).

    An open_clip ViT-H-14 fine-tuned on human preferences; weights ``HPS_v2_compressed.pt`` (``version="v2.0"``) or
    ``HPS_v2.1_compressed.pt`` (``"v2.1"``) from the hub repo ``xswu/HPSv2``: ``{"state_dict": ...}`` in open_clip's
    key layout. The score is the cosine of the normalised image and prompt embeddings (``hpsv2/img_score.py``: the
    diagonal of ``image_features @ text_features.T``); its benchmark reports 100 × that mean (``hpsv2/evaluation.py``),
    hence ``benchmark_scale``. Images are fitted as in HPSv2's ``preprocess_val`` (``light_augmentation=True``):
    longest side to 224, zero padding, OpenAI CLIP mean/std. HPSv2 resizes the float tensor itself (``ToTensor``
    comes first), with torchvision's bicubic, antialiased by default since torchvision 0.17 as here.
    """

    benchmark_scale = 100.0

    def __init__(
        self,
        version: str = "v2.1",
        *,
        checkpoint: str | Path | None = None,
        model: str | dict = "ViT-H-14",
        random_weights: bool = False,
    ):
        if version not in HPS_CHECKPOINTS:
            raise ValueError(f"HPS version must be one of {sorted(HPS_CHECKPOINTS)}, not {version!r}")
        if random_weights:  # the published architecture without its weights (rglcd plan, real-size tests)
            checkpoint = None
        else:
            checkpoint = checkpoint or HPS_CHECKPOINTS[version]
        super().__init__(model, checkpoint=checkpoint, resize_mode="longest")
        self.version = version


register_reward("hpsv2")(partial(HPSv2, version="v2.0"))
register_reward("hpsv2.1")(partial(HPSv2, version="v2.1"))


@register_reward("clipscore")
class CLIPScore(OpenClipReward):
    """CLIP image-prompt cosine, as RG-LCD's ``clip`` reward: open_clip ViT-H-14 ``laion2b_s32b_b79k`` by default.

    Any open_clip model name with a pretrained tag (fetched by open_clip), or with ``checkpoint``: an open_clip state
    dict file that replaces the tag. Preprocessing follows the tag's config (open_clip's ``image_transform``).
    CLIPScore as Hessel et al. (2021, arXiv:2104.08718) report it is ``2.5 · max(cosine, 0)``, a rescaling of this.
    """

    benchmark_scale = 100.0  # CLIP score as torchmetrics and most papers report it: 100 × cosine

    def __init__(
        self,
        model: str | dict = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        *,
        checkpoint: str | Path | None = None,
        random_weights: bool = False,
    ):
        if random_weights:
            pretrained = checkpoint = None
        super().__init__(model, pretrained=pretrained, checkpoint=checkpoint)


@register_reward("aesthetic")
class Aesthetic(RewardModel):
    """The LAION aesthetic predictor: a head on the L2-normalised OpenAI CLIP ViT-L/14 image embedding; no prompt.

    ``checkpoint`` (the head) is either of the two published formats, told apart by their keys:

    * v1, LAION-AI/aesthetic-predictor ``sa_0_4_vit_l_14_linear.pth``: ``nn.Linear(768, 1)`` (``weight``, ``bias``);
      the reward of RG-LCD's ``aesthetic`` (``reward_fn.get_aesthetic_score_fn``).
    * v2, christophschuhmann/improved-aesthetic-predictor ``sac+logos+ava1-l14-linearMSE.pth``: Linear(768, 1024),
      Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1), no activations
      (``layers.0/2/4/6/7.*``, ``simple_inference.py``).

    The image tower is open_clip ``ViT-L-14-quickgelu`` ``openai`` (OpenAI's ``clip.load("ViT-L/14")``, QuickGELU as
    trained), or any open_clip architecture with ``clip_checkpoint``. Preprocessing: shortest side to 224 bicubic,
    centre crop, OpenAI CLIP mean/std. The score (about 1-10) is also the logit.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        model: str | dict = "ViT-L-14-quickgelu",
        pretrained: str | None = "openai",
        clip_checkpoint: str | Path | None = None,
        random_weights: bool = False,
    ):
        super().__init__()
        if random_weights:  # the tower and RG-LCD's (v1, linear) head, untrained
            pretrained = clip_checkpoint = None
        elif checkpoint is None:
            raise ValueError(f"aesthetic needs checkpoint=<the head>: {AESTHETIC_HEADS}")
        clip, _, preprocess_cfg = _build_open_clip(model, pretrained, clip_checkpoint)
        self.visual = clip.visual  # the text tower is never used
        self.preprocess = _preprocess_from_open_clip(preprocess_cfg)
        if random_weights:
            self.head = nn.Linear(clip.visual.output_dim, 1)
            self.freeze()
            return
        path = resolve_file(checkpoint)
        state = load_state_dict(path)
        dim = clip.visual.output_dim  # the joint embedding's width (768 for ViT-L/14)
        if state.keys() == {"weight", "bias"}:
            self.head = nn.Linear(dim, 1)
        elif "layers.0.weight" in state:
            self.head = linear_mlp_head(dim)
            state = {key.removeprefix("layers."): value for key, value in state.items()}
        else:
            raise ValueError(
                f"{path} is neither aesthetic head format (keys {sorted(state)[:6]}...): {AESTHETIC_HEADS}"
            )
        load_strict(self.head, state, path)
        self.freeze()

    def enable_gradient_checkpointing(self) -> None:
        self.visual.set_grad_checkpointing(True)

    def forward(self, images: Tensor, prompts: Sequence[str] = ()) -> Tensor:
        embeddings = F.normalize(self.visual(self.preprocess(images)), dim=-1)  # [B, D]
        return self.head(embeddings).squeeze(1)


# ------------------------------------------------------------------------------------------------------ PickScore


def _projected(output) -> Tensor:
    """Projected CLIP features: transformers 5 wraps them in an output object, 4.x returns the tensor."""
    return output if isinstance(output, Tensor) else output.pooler_output


@register_reward("pickscore")
class PickScore(RewardModel):
    """PickScore (Kirstain et al. 2023, arXiv:2305.01569): a CLIP-H fine-tuned on Pick-a-Pic preferences.

    ``model``: a transformers ``CLIPModel`` folder or hub id (``yuvalkirstain/PickScore_v1``); ``processor``: the
    ``CLIPProcessor`` whose tokenizer (truncated to 77 tokens) and image processing settings it was trained with
    (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: shortest side 224 bicubic, centre crop 224, OpenAI CLIP mean/std).
    The score is ``exp(logit_scale) · cosine`` (about 20-23 for good matches), as the model card computes it; it is
    also the logit.
    """

    def __init__(
        self,
        model: str | Path = PICKSCORE_MODEL,
        processor: str | Path = PICKSCORE_PROCESSOR,
        *,
        random_weights: bool = False,
    ):
        super().__init__()
        if random_weights:  # the published architecture and preprocessing, untrained
            self.model = CLIPModel(CLIPConfig(**PICKSCORE_ARCHITECTURE))
            self.tokenizer = clip_tokenizer()
            self.preprocess = ClipPreprocess(224, floor_crop=True)
            self.freeze()
            return
        try:
            self.model, report = CLIPModel.from_pretrained(str(model), output_loading_info=True)
            loaded_processor = CLIPProcessor.from_pretrained(str(processor))
        except OSError as error:  # neither a local folder nor in the hub cache (offline), or not a CLIP folder
            raise FileNotFoundError(
                f"cannot load PickScore from model={str(model)!r}, processor={str(processor)!r} ({error}); download "
                f"{PICKSCORE_MODEL} and {PICKSCORE_PROCESSOR} from the hub once (e.g. `hf download <repo>`), "
                "or pass local folders"
            ) from error
        wrong = {kind: keys for kind, keys in report.items() if keys}  # missing, unexpected or mismatched keys
        if wrong:
            raise ValueError(f"{model} does not fit its CLIPModel config: {wrong}")
        self.tokenizer = loaded_processor.tokenizer
        settings = loaded_processor.image_processor
        if settings.size["shortest_edge"] != settings.crop_size["height"]:
            raise ValueError(
                f"the processor resizes to {settings.size} but crops {settings.crop_size}: not implemented"
            )
        self.preprocess = ClipPreprocess(
            settings.crop_size["height"], settings.image_mean, settings.image_std, floor_crop=True
        )
        self.freeze()

    def encode_images(self, images: Tensor) -> Tensor:
        """[B,3,H,W] in [0, 1] -> unit-norm image embeddings [B, D]."""
        return F.normalize(_projected(self.model.get_image_features(pixel_values=self.preprocess(images))), dim=-1)

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings [B, D]."""
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        tokens = {key: host_to_device(ids, self.preprocess.mean.device) for key, ids in tokens.items()}
        return F.normalize(_projected(self.model.get_text_features(**tokens)), dim=-1)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_batch(images, prompts)
        return self.model.logit_scale.exp() * (self.encode_images(images) * self.encode_prompts(prompts)).sum(dim=-1)
