"""ImageReward on a tiny model saved in ImageReward.pt's key layout and loaded back by path, as a user loads it."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

import rglcd.rewards.imagereward  # noqa: F401  (registers "imagereward")
from rglcd.rewards.base import available_rewards, build_reward
from rglcd.rewards.imagereward import ImageReward, ImageRewardConfig

# Special tokens first, as in bert-base-uncased's vocab.txt ([PAD] = 0 is the text encoder's padding id).
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "blue", "cat", "dog", "on", "the"]
# Vision and text widths differ so the cross-attention's key/value input width is checked.
TINY = ImageRewardConfig(
    image_size=32,
    patch_size=8,
    vision_width=48,
    vision_layers=2,
    vision_heads=2,
    text_width=32,
    text_layers=2,
    text_heads=2,
    text_intermediate=64,
    vocab_size=len(VOCAB) + 2,  # + BLIP's [DEC] and [ENC]
    max_position_embeddings=40,
    projection_dim=16,
    max_length=12,
)
PROMPTS = ["a photo of a red cat", "the blue dog on a cat"]
ORIGINAL_MEAN, ORIGINAL_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward/ImageReward.py


def original_keys(config: ImageRewardConfig) -> set[str]:
    """ImageReward.pt's keys, written from ImageReward.py, BLIP's blip_pretrain.py, vit.py and med.py."""
    vision = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]
    vision += [
        f"blocks.{i}.{module}.{kind}"
        for i in range(config.vision_layers)
        for module in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for kind in ("weight", "bias")
    ]
    layer = [
        f"{attention}.{name}"
        for attention in ("attention", "crossattention")
        for name in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
    ] + ["intermediate.dense", "output.dense", "output.LayerNorm"]
    text = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight", "embeddings.position_ids"]
    text += ["embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    text += [
        f"encoder.layer.{i}.{module}.{kind}"
        for i in range(config.text_layers)
        for module in layer
        for kind in ("weight", "bias")
    ]
    heads = [f"{name}.{kind}" for name in ("vision_proj", "text_proj") for kind in ("weight", "bias")]
    mlp = [f"mlp.layers.{i}.{kind}" for i in (0, 2, 4, 6, 7) for kind in ("weight", "bias")]
    return (
        {f"blip.visual_encoder.{key}" for key in vision}
        | {f"blip.text_encoder.{key}" for key in text}
        | {f"blip.{key}" for key in heads}
        | set(mlp)
    )


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert-tiny")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    """A tiny ImageReward.pt as the original saves it: its state dict plus med.py's persistent position_ids."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ImageReward(None, tokenizer=tokenizer_dir, config=TINY)
        state = {key: value + 0.05 * torch.randn_like(value) for key, value in model.state_dict().items()}
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(TINY.max_position_embeddings)[None]
    path = tmp_path_factory.mktemp("imagereward") / "ImageReward.pt"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint, tokenizer_dir):
    return build_reward("imagereward", checkpoint=checkpoint, tokenizer=tokenizer_dir, config=TINY)


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 [H,W,3] of low-frequency waves within [0.15, 0.85]: bicubic never overshoots past 0 or 255 on it."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    channels = [
        0.5 + 0.35 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y) + rng.uniform(0, 6))
        for _ in range(3)
    ]
    return np.round(255 * np.stack(channels, axis=-1)).astype(np.uint8)


def images_from(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


def blip_reference(state: dict, config: ImageRewardConfig, pixels, input_ids, attention_mask) -> torch.Tensor:
    """[B, text_width]: the text encoder's [CLS] state, from the weights, as BLIP's vit.py and med.py compute it."""

    def attention(query, key, value, heads, mask=None):  # [B, N, C] each -> [B, N, C]
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, heads, N, C/heads]
        q, k, v = split(query), split(key), split(value)
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        if mask is not None:
            scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)

    p = lambda key: state[f"blip.visual_encoder.{key}"]
    linear = lambda x, key, get: F.linear(x, get(f"{key}.weight"), get(f"{key}.bias"))
    norm = lambda x, key, get, eps: F.layer_norm(x, x.shape[-1:], get(f"{key}.weight"), get(f"{key}.bias"), eps)
    x = F.conv2d(pixels, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=config.patch_size)
    x = torch.cat([p("cls_token").expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + p("pos_embed")
    for i in range(config.vision_layers):
        b = lambda key, i=i: p(f"blocks.{i}.{key}")
        h = norm(x, "norm1", b, 1e-6)
        x = x + linear(attention(*linear(h, "attn.qkv", b).chunk(3, dim=-1), config.vision_heads), "attn.proj", b)
        x = x + linear(F.gelu(linear(norm(x, "norm2", b, 1e-6), "mlp.fc1", b)), "mlp.fc2", b)
    image = norm(x, "norm", p, 1e-6)

    t = lambda key: state[f"blip.text_encoder.{key}"]
    positions = t("embeddings.position_embeddings.weight")[: input_ids.shape[1]]
    x = norm(t("embeddings.word_embeddings.weight")[input_ids] + positions, "embeddings.LayerNorm", t, 1e-12)
    for i in range(config.text_layers):
        b = lambda key, i=i: t(f"encoder.layer.{i}.{key}")
        for kind, context, mask in (("attention", x, attention_mask), ("crossattention", image, None)):
            q, k, v = (
                linear(src, f"{kind}.self.{name}", b)
                for src, name in ((x, "query"), (context, "key"), (context, "value"))
            )
            h = linear(attention(q, k, v, config.text_heads, mask), f"{kind}.output.dense", b)
            x = norm(h + x, f"{kind}.output.LayerNorm", b, 1e-12)
        h = linear(F.gelu(linear(x, "intermediate.dense", b)), "output.dense", b)
        x = norm(h + x, "output.LayerNorm", b, 1e-12)
    return x[:, 0]


def test_registered():
    assert "imagereward" in available_rewards()


def test_checkpoint_has_imagereward_layout_and_loads_strictly(checkpoint, model):
    saved = torch.load(checkpoint, weights_only=True)
    assert set(saved) == original_keys(TINY)
    # Every saved tensor but the position_ids buffer lands in the model, unchanged.
    loaded = model.state_dict()
    assert set(loaded) == set(saved) - {"blip.text_encoder.embeddings.position_ids"}
    assert all(torch.equal(loaded[key], saved[key]) for key in loaded)
    cross_key = loaded["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"]
    assert cross_key.shape == (TINY.text_width, TINY.vision_width)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda state: state.pop("mlp.layers.7.bias"), "mlp.layers.7.bias"),
        (lambda state: state.update({"blip.itm_head.weight": torch.zeros(2, 32)}), "blip.itm_head.weight"),
    ],
    ids=["missing", "unexpected"],
)
def test_rejects_checkpoint_with_missing_or_extra_key(checkpoint, tokenizer_dir, tmp_path, change, named):
    state = torch.load(checkpoint, weights_only=True)
    change(state)
    torch.save(state, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match=f"does not fit the ImageReward(.|\n)*{named}"):
        build_reward("imagereward", checkpoint=tmp_path, tokenizer=tokenizer_dir, config=TINY)


def test_missing_weights_or_tokenizer_name_what_to_get(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match=r"download ImageReward\.pt from https://huggingface\.co/rglcd-tests"):
        ImageReward("rglcd-tests/not-cached", tokenizer=tokenizer_dir, config=TINY)  # offline: not in the cache
    with pytest.raises(FileNotFoundError, match=r"absent \(looked for vocab\.txt\)"):
        ImageReward(None, tokenizer=tmp_path / "absent", config=TINY)
    with pytest.raises(FileNotFoundError, match=r"download vocab\.txt from https://huggingface\.co/google-bert"):
        ImageReward(None, config=TINY)  # the default tokenizer: offline, not in the cache
    with pytest.raises(ValueError, match=r"bert-base-uncased's vocab\.txt"):
        ImageReward(None, tokenizer=tokenizer_dir, config=ImageRewardConfig())  # 16 ids vs 30,524


# In [0, 1] pixel units. PIL resizes in two separable passes and rounds to uint8 after each (≤ 0.5/255 each, the
# first one spread by the second pass's kernel); our float resize rounds nowhere. Measured: max 1.08/255, mean
# 0.3/255 at 224 px; max 1.0/255 at 32 px.
PIL_MAX_ERROR, PIL_MEAN_ERROR = 1.5 / 255, 0.5 / 255


@pytest.mark.parametrize(("height", "width"), [(45, 61), (70, 52), (21, 17)], ids=["wide", "tall", "upsampled"])
def test_preprocessing_matches_imagereward_pil_pipeline(model, height, width):
    array = smooth_image(height, width, seed=height)
    original = Compose(
        [
            Resize(TINY.image_size, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(TINY.image_size),
            ToTensor(),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )(Image.fromarray(array))
    ours = model.preprocess(images_from(array))[0]
    assert ours.shape == original.shape == (3, TINY.image_size, TINY.image_size)
    error = (ours - original).abs() * torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
    assert error.max() < PIL_MAX_ERROR and error.mean() < PIL_MEAN_ERROR


def test_score_is_normalised_mlp_of_blip_cls_state(model, checkpoint):
    # In float64, so a wrong LayerNorm eps (1e-5 for 1e-6 moves the score by ~1e-6) is not lost in rounding.
    double = copy.deepcopy(model).double()
    state = {key: value.double() for key, value in torch.load(checkpoint, weights_only=True).items()}
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    tokens = model.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=TINY.max_length)
    input_ids, attention_mask = torch.tensor(tokens["input_ids"]), torch.tensor(tokens["attention_mask"])
    assert (input_ids[:, 0] == VOCAB.index("[CLS]")).all() and (attention_mask == 0).any()  # [CLS] kept, padded
    with torch.no_grad():
        cls = blip_reference(state, TINY, model.preprocess(images).double(), input_ids, attention_mask)
        expected = (double.mlp.layers(cls).squeeze(-1) - ORIGINAL_MEAN) / ORIGINAL_STD
        assert torch.allclose(double(images, PROMPTS), expected, rtol=0, atol=1e-9)
        assert torch.allclose(double.logits(images, PROMPTS), expected, rtol=0, atol=1e-9)
        assert torch.allclose(model(images, PROMPTS), expected.float(), atol=1e-5)  # and the float32 model
    assert expected.std() > 1e-3  # the two pairs score differently: the comparison is not between constants


def test_cap_clamps_score_and_its_gradient(model, checkpoint, tokenizer_dir):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        scores = model(images, PROMPTS)
    cap = scores.mean().item()  # one score above, one below
    capped_model = build_reward("imagereward", checkpoint=checkpoint, tokenizer=tokenizer_dir, config=TINY, cap=cap)
    images.requires_grad_(True)
    capped = capped_model(images, PROMPTS)
    assert torch.allclose(capped, scores.clamp(max=cap), atol=1e-6)
    assert torch.allclose(capped_model.logits(images, PROMPTS), scores, atol=1e-6)  # logits stay uncapped
    (gradient,) = torch.autograd.grad(capped.sum(), images)
    above = scores > cap
    assert gradient[above].abs().max() == 0 and gradient[~above].abs().max() > 0


def test_gradients_reach_images(model):
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(3), requires_grad=True)
    model(images, PROMPTS).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().amax(dim=(1, 2, 3)).min() > 0


def test_prompt_count_must_match_images(model):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        model(torch.rand(2, 3, 32, 32), PROMPTS[:1])
