"""``imagereward``: ImageReward-v1.0 (Xu et al., NeurIPS 2023), the reward model of THUDM/ImageReward, in torch.

A BLIP ViT-L/16 encodes the 224² image; BLIP's BERT-base text encoder reads the prompt while cross-attending
to the image tokens; a linear MLP maps the [CLS] output to one number. The score is

    score = (MLP(h_[CLS]) − 0.16717362830052426) / 1.0333394966054072,

the mean and std ImageReward publishes (``ImageReward/ImageReward.py``). ImageReward leaves ``input_ids[:, 0]``
as [CLS] (BLIP's pretraining writes [ENC] there for image-text matching; ImageReward does not).

Weights: ``ImageReward.pt`` from the hub repo ``THUDM/ImageReward`` (or a local copy), a plain state dict of
ImageReward's module tree:

* ``blip.visual_encoder.*``: BLIP's ViT (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), timm's key names;
* ``blip.text_encoder.*``: BLIP's ``med.py`` BERT without pooler or token-type embeddings
  (``embeddings.{word_embeddings,position_embeddings,LayerNorm}``, ``encoder.layer.{i}.{attention,
  crossattention,intermediate,output}.*``) and its persistent ``embeddings.position_ids`` buffer;
* ``blip.vision_proj.*``, ``blip.text_proj.*``: BLIP's contrastive projections, unused by the score;
* ``mlp.layers.{0,2,4,6,7}.*``: the head (odd indices are dropouts).

Only ``blip.text_encoder.embeddings.position_ids`` is dropped on loading (transformers rebuilds it as a
non-persistent buffer); every other key must match, so a wrong or truncated file fails loudly. The tokenizer is
bert-base-uncased's ``vocab.txt`` plus BLIP's added [DEC] (bos) and [ENC] tokens: 30,524 ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from transformers import BatchEncoding, BertTokenizer, BlipTextConfig, BlipTextModel

from ..devices import host_to_device
from .base import RewardModel, check_batch, register_reward
from .clip import ClipPreprocess, linear_mlp_head
from .weights import load_state_dict, load_strict, resolve_file

SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
CHECKPOINT_FILE = "ImageReward.pt"
POSITION_IDS = "blip.text_encoder.embeddings.position_ids"  # a saved buffer, not a parameter


@dataclass(frozen=True)
class ImageRewardConfig:
    """ImageReward-v1.0's sizes (BLIP ``vit='large'`` and ``med_config.json``); smaller ones build test models."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    vocab_size: int = 30524  # bert-base-uncased's 30,522 + [DEC] + [ENC]
    max_position_embeddings: int = 512
    projection_dim: int = 256  # BLIP's contrastive embedding width (vision_proj/text_proj)
    max_length: int = 35  # ImageReward tokenises with padding="max_length", truncation, max_length=35


def _tokenizer(reference: str | Path, config: ImageRewardConfig):
    """BLIP's tokenizer: BERT uncased WordPiece + [DEC] as bos and [ENC] as an extra special token."""
    vocab = resolve_file(reference, "vocab.txt")
    return _add_blip_tokens(BertTokenizer.from_pretrained(vocab.parent), config, vocab)  # lower-cases, as uncased


def _add_blip_tokens(tokenizer, config: ImageRewardConfig, source):
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != config.vocab_size:
        raise ValueError(
            f"{source} gives {len(tokenizer)} token ids with BLIP's [DEC] and [ENC], but the text encoder has "
            f"{config.vocab_size}; ImageReward needs bert-base-uncased's vocab.txt"
        )
    return tokenizer


def _stand_in_bert_tokenizer(size: int):
    """A WordPiece tokenizer of ``size`` entries (bert-base-uncased's special tokens, letters, digits, fillers)."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [*"abcdefghijklmnopqrstuvwxyz0123456789"] + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    words += [f"[unused{index}]" for index in range(size - len(words))]
    return BertTokenizer(vocab={word: index for index, word in enumerate(words)})


@register_reward("imagereward")
class ImageReward(RewardModel):
    """ImageReward-v1.0's normalised score of (image, prompt); about N(0, 1) over its human-ranked data.

    ``checkpoint``: path to ``ImageReward.pt``, a folder holding it, or a hub repo id (default
    ``THUDM/ImageReward``); ``None`` builds random weights (for tests). ``tokenizer``: a folder holding
    bert-base-uncased's ``vocab.txt``, or a hub repo id (default ``bert-base-uncased``).

    ``random_weights``: the published architecture untrained, with a stand-in WordPiece vocabulary of BERT's size
    (``rglcd plan``, the real-size tests; the token ids mean nothing, the shapes are the real ones).

    ``cap``: if set, ``forward`` returns ``min(score, cap)``. The official RG-LCD code trains on
    ``-relu(-score + 2)`` = ``min(score, 2) − 2`` (Ji4chenLi/rg-lcd ``reward_fn.py``, ``get_img_reward_fn``), which
    has the gradient of ``cap=2``: images already scoring above 2 get no push, so the student cannot chase
    ImageReward's extremes. ``logits`` is never capped.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = "THUDM/ImageReward",
        *,
        tokenizer: str | Path = "google-bert/bert-base-uncased",
        config: ImageRewardConfig | None = None,
        cap: float | None = None,
        random_weights: bool = False,
    ):
        super().__init__()
        # timm and transformers take seconds to import: only models that are built pay for them.
        config = config or ImageRewardConfig()
        self.config = config
        self.cap = cap
        if random_weights:
            checkpoint = None
            self.tokenizer = _add_blip_tokens(_stand_in_bert_tokenizer(config.vocab_size - 2), config, "stand-in")
        else:
            self.tokenizer = _tokenizer(tokenizer, config)
        text_config = BlipTextConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.text_width,
            encoder_hidden_size=config.vision_width,  # cross-attention keys/values read the image tokens
            intermediate_size=config.text_intermediate,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_position_embeddings,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,  # [DEC]; unused by the encoder
            sep_token_id=self.tokenizer.sep_token_id,
            # transformers builds the cross-attention layers only for decoders; ``forward(is_decoder=False)``
            # still attends bidirectionally, as BLIP's text encoder does.
            is_decoder=True,
        )
        # ImageReward's module tree, so its state dict loads key for key.
        self.blip = nn.ModuleDict(
            {
                "visual_encoder": VisionTransformer(
                    img_size=config.image_size,
                    patch_size=config.patch_size,
                    embed_dim=config.vision_width,
                    depth=config.vision_layers,
                    num_heads=config.vision_heads,
                    mlp_ratio=4.0,
                    qkv_bias=True,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),
                    num_classes=0,  # no head: BLIP's ViT returns all tokens after the final norm
                ),
                "text_encoder": BlipTextModel(text_config, add_pooling_layer=False),
                # Unused by the score; ImageReward's BLIP_Pretrain defines them, so its saved state dict holds them.
                "vision_proj": nn.Linear(config.vision_width, config.projection_dim),
                "text_proj": nn.Linear(config.text_width, config.projection_dim),
            }
        )
        self.mlp = nn.ModuleDict({"layers": linear_mlp_head(config.text_width)})
        # ImageReward's Resize(224, bicubic) of the shorter side, CenterCrop(224), OpenAI CLIP mean/std.
        self.preprocess = ClipPreprocess(config.image_size)
        if checkpoint is not None:
            path = resolve_file(checkpoint, CHECKPOINT_FILE)
            state = load_state_dict(path)
            state.pop(POSITION_IDS, None)
            load_strict(self, state, path)
        self.freeze()

    def tokenize(self, prompts: Sequence[str]) -> BatchEncoding:
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        return BatchEncoding({key: host_to_device(ids, self.preprocess.mean.device) for key, ids in tokens.items()})

    def enable_gradient_checkpointing(self) -> None:
        # The image tower (timm); transformers checkpoints its text encoder only in training mode, never for a reward.
        self.blip.visual_encoder.set_grad_checkpointing(True)

    def logits(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """[B] normalised scores, uncapped: ImageReward has no logit scale, and a cap would flatten preferences."""
        check_batch(images, prompts)
        pixels = self.preprocess(images).to(self.blip.visual_encoder.patch_embed.proj.weight.dtype)
        image_tokens = self.blip.visual_encoder.forward_features(pixels)  # [B, 1 + patches, vision_width]
        text = self.tokenize(prompts)
        hidden = self.blip.text_encoder(
            input_ids=text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_tokens
        ).last_hidden_state  # [B, max_length, text_width]
        raw = self.mlp.layers(hidden[:, 0]).squeeze(-1)  # the [CLS] state
        return (raw - SCORE_MEAN) / SCORE_STD

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        score = self.logits(images, prompts)
        return score if self.cap is None else score.clamp(max=self.cap)
