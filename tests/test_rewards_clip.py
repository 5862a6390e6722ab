"""The CLIP-family rewards against their original libraries, on tiny models saved in the original file layouts.

References run the original APIs on PIL images: open_clip's ``image_transform`` with ``encode_image`` and
``encode_text`` (HPSv2 scores with open_clip and its own weights), transformers' ``CLIPProcessor`` with
``CLIPModel`` (PickScore). The rewards resize the same pixels in torch, in floats; PIL (and the processor's uint8
resize) rounds the result to uint8 and clamps the bicubic overshoot at sharp edges. That is the only difference.
Measured on these models: below 1e-5 of a cosine on the smooth picture, up to 6e-4 on the one with a sharp-edged
disc (1.3e-4 once our resize is rounded and clamped too). Hence ``TOLERANCE`` = 2e-3 of a cosine; a wrong geometry,
HPSv2's padding replaced by a crop, moves the score by 1.5e-2 (:func:`test_the_tolerance_tells_geometries_apart`).
"""

import math
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from rglcd.architectures import clip_tokenizer
from rglcd.rewards.base import available_rewards, build_reward
from rglcd.rewards.clip import ClipPreprocess

NAMES = ("hpsv2", "hpsv2.1", "clipscore", "pickscore", "aesthetic")
TOLERANCE = 2e-3  # of a cosine; see the module docstring
SIZE = 64  # the tiny towers' input; the pictures are 96×128 (H×W), so every pipeline resizes and crops or pads
# An open_clip architecture in the format of its model_configs/*.json: a 64-px ViT of 16-px patches, one block each.
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# The aesthetic heads read ViT-L/14's 768-d embedding; OpenAI's CLIP was trained with QuickGELU.
TINY_L = {**TINY, "embed_dim": 768, "quick_gelu": True}
# Neither CLIP's initial 1/0.07 nor HPS's 100: a logit that used either would not match.
LOGIT_SCALE = 30.0
PROMPTS = ["a red circle under a blue sky", "two green squares"]


class ImprovedAestheticMLP(nn.Module):
    """The module of improved-aesthetic-predictor's simple_inference.py, whose state dict is the v2 head's format."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(768, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def frozen(make, seed: int) -> nn.Module:
    """A model initialised from ``seed``, frozen like a loaded reward (open_clip's attention takes another path when
    gradients are on, equal to about 1e-8)."""
    torch.manual_seed(seed)
    return make().requires_grad_(False).eval()


def open_clip_model(config: dict, seed: int) -> nn.Module:
    model = frozen(lambda: open_clip.model.CLIP(**config), seed)
    model.logit_scale.fill_(math.log(LOGIT_SCALE))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny models and their files in the original layouts (the models stay in memory as references)."""
    root = tmp_path_factory.mktemp("clip-rewards")
    hps, clip, vit_l = (open_clip_model(config, seed) for config, seed in ((TINY, 0), (TINY, 1), (TINY_L, 2)))
    torch.save({"state_dict": hps.state_dict()}, root / "HPS_v2.1_compressed.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in hps.state_dict().items()}}, root / "HPS_ddp.pt")
    save_file(clip.state_dict(), root / "open_clip_model.safetensors")  # the file of open_clip's hub repos
    torch.save(vit_l.state_dict(), root / "open_clip_pytorch_model.bin")
    linear, mlp = frozen(lambda: nn.Linear(768, 1), 3), frozen(ImprovedAestheticMLP, 4)
    torch.save(linear.state_dict(), root / "sa_0_4_vit_l_14_linear.pth")
    torch.save(mlp.state_dict(), root / "sac+logos+ava1-l14-linearMSE.pth")
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(
            image_size=SIZE,
            patch_size=16,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=32,
        logit_scale_init_value=math.log(LOGIT_SCALE),
    )
    pick = frozen(lambda: CLIPModel(config), 5)
    pick.save_pretrained(root / "PickScore_v1")
    sizes = {"size": {"shortest_edge": SIZE}, "crop_size": {"height": SIZE, "width": SIZE}}
    CLIPProcessor(image_processor=CLIPImageProcessor(**sizes), tokenizer=clip_tokenizer()).save_pretrained(
        root / "processor"
    )
    return SimpleNamespace(root=root, hps=hps, clip=clip, vit_l=vit_l, linear=linear, mlp=mlp, pick=pick)


def build(name: str, saved, head: str = "sa_0_4_vit_l_14_linear.pth"):
    """The reward ``name`` loaded from the tiny files, as a user passes real checkpoints."""
    root = saved.root
    kwargs = {
        "hpsv2": dict(model=TINY, checkpoint=root / "HPS_v2.1_compressed.pt"),
        "hpsv2.1": dict(model=TINY, checkpoint=str(root / "HPS_v2.1_compressed.pt")),
        "clipscore": dict(model=TINY, checkpoint=root / "open_clip_model.safetensors"),
        "pickscore": dict(model=root / "PickScore_v1", processor=root / "processor"),
        "aesthetic": dict(checkpoint=root / head, model=TINY_L, clip_checkpoint=root / "open_clip_pytorch_model.bin"),
    }[name]
    return build_reward(name, **kwargs)


@pytest.fixture(scope="module")
def pictures():
    """A smooth picture and one with a sharp-edged disc, 96×128 (H×W): PIL images, and [2, 3, 96, 128] in [0, 1]."""
    y, x = np.mgrid[0:96, 0:128] / 16.0
    channels = [
        [np.sin(x + y), np.cos(0.7 * x - y), np.sin(0.1 * x * y)],
        [np.cos(0.5 * x), np.sin(0.8 * y) * np.cos(0.3 * x), ((x - 4) ** 2 + (y - 3) ** 2 < 4) * 2.0 - 1],
    ]
    arrays = [np.round(127.5 + 127.5 * np.stack(picture, axis=-1)).astype(np.uint8) for picture in channels]
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return [Image.fromarray(array) for array in arrays], tensor


def open_clip_reference(model: nn.Module, pil_images, resize_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image and prompt embeddings through open_clip's own PIL transform and tokenizer.

    ``resize_mode="longest"`` (ResizeKeepRatio to the longest side, then CenterCropOrPad with black) has the geometry
    of ``ResizeMaxSize`` in HPSv2's ``preprocess_val``.
    """
    transform = open_clip.image_transform(SIZE, is_train=False, resize_mode=resize_mode)  # OpenAI mean/std, bicubic
    tokens = open_clip.get_tokenizer("ViT-H-14")(PROMPTS)  # the tokenizer of hpsv2 and of RG-LCD's rewards
    with torch.no_grad():
        images = model.encode_image(torch.stack([transform(image) for image in pil_images]), normalize=True)
        return images, model.encode_text(tokens, normalize=True)


def reference_score(name: str, saved, pil_images, resize_mode: str | None = None) -> torch.Tensor:
    """The reward's score computed through the original library API."""
    if name == "aesthetic":
        images, _ = open_clip_reference(saved.vit_l, pil_images, "shortest")
        with torch.no_grad():
            return saved.linear(images).squeeze(1)
    if name != "pickscore":
        hps = name.startswith("hps")
        images, texts = open_clip_reference(
            saved.hps if hps else saved.clip, pil_images, resize_mode or ("longest" if hps else "shortest")
        )
        return (images * texts).sum(-1)
    processor = CLIPProcessor.from_pretrained(saved.root / "processor")
    pixels = processor(images=pil_images, return_tensors="pt").pixel_values
    tokens = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        images, texts = saved.pick.get_image_features(pixel_values=pixels), saved.pick.get_text_features(**tokens)
        images, texts = (getattr(out, "pooler_output", out) for out in (images, texts))  # transformers 5, or 4
        return saved.pick.logit_scale.exp() * (F.normalize(images, dim=-1) * F.normalize(texts, dim=-1)).sum(-1)


def unit(name: str) -> float:
    """What one cosine is in the score's units."""
    return LOGIT_SCALE if name == "pickscore" else 1.0


def test_names_are_registered():
    assert set(NAMES) <= set(available_rewards())


@pytest.mark.parametrize("name", NAMES)
def test_scores_match_the_original_pipelines(saved, pictures, name):
    pil_images, images = pictures
    with torch.no_grad():
        score = build(name, saved)(images, PROMPTS)
    expected = reference_score(name, saved, pil_images)
    assert score.shape == (2,)
    assert torch.allclose(score, expected, atol=TOLERANCE * unit(name), rtol=0), (score, expected)


def test_the_tolerance_tells_geometries_apart(saved, pictures):
    """Cropping where HPSv2 pads moves the tiny HPS score far beyond TOLERANCE: matching within it means something."""
    pil_images, _ = pictures
    padded = reference_score("hpsv2", saved, pil_images, "longest")
    cropped = reference_score("hpsv2", saved, pil_images, "shortest")
    assert (padded - cropped).abs().max() > 5 * TOLERANCE


def test_aesthetic_reads_both_head_formats(saved, pictures):
    pil_images, images = pictures
    linear = build("aesthetic", saved, "sa_0_4_vit_l_14_linear.pth")
    mlp = build("aesthetic", saved, "sac+logos+ava1-l14-linearMSE.pth")
    assert isinstance(linear.head, nn.Linear) and isinstance(mlp.head, nn.Sequential)
    embeddings, _ = open_clip_reference(saved.vit_l, pil_images, "shortest")
    with torch.no_grad():
        score = mlp(images, PROMPTS)
        assert torch.allclose(score, saved.mlp(embeddings).squeeze(1), atol=TOLERANCE, rtol=0)
        assert torch.equal(mlp.logits(images, PROMPTS), score)


def test_every_tensor_of_the_checkpoints_is_loaded(saved):
    """The loaders are strict (see test_a_checkpoint_that_does_not_fit_is_refused) and load what the files hold."""
    loaded = {
        "hpsv2.1": (build("hpsv2.1", saved).clip, saved.hps),
        "clipscore": (build("clipscore", saved).clip, saved.clip),
        "pickscore": (build("pickscore", saved).model, saved.pick),
        "aesthetic": (build("aesthetic", saved).visual, saved.vit_l.visual),
    }
    for name, (model, source) in loaded.items():
        state = model.state_dict()
        assert all(torch.equal(state[key], value) for key, value in source.state_dict().items()), name


def test_a_ddp_module_prefix_is_stripped(saved, pictures):
    _, images = pictures
    prefixed = build_reward("hpsv2", model=TINY, checkpoint=saved.root / "HPS_ddp.pt")
    with torch.no_grad():
        assert torch.equal(prefixed(images, PROMPTS), build("hpsv2", saved)(images, PROMPTS))


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_pixels_and_weights_are_frozen(saved, pictures, name):
    _, images = pictures
    reward = build(name, saved)
    images = images.clone().requires_grad_(True)
    reward(images, PROMPTS).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert not any(parameter.requires_grad for parameter in reward.parameters())


@pytest.mark.parametrize("name", ["hpsv2", "clipscore", "aesthetic"])
def test_gradient_checkpointing_keeps_the_gradient(saved, pictures, name):
    _, images = pictures
    reward = build(name, saved)

    def gradient() -> torch.Tensor:
        pixels = images.clone().requires_grad_(True)
        reward(pixels, PROMPTS).sum().backward()
        return pixels.grad

    kept = gradient()
    reward.enable_gradient_checkpointing()
    towers = [module for module in reward.modules() if hasattr(module, "grad_checkpointing")]
    assert towers and all(tower.grad_checkpointing for tower in towers)
    torch.testing.assert_close(gradient(), kept, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["hpsv2", "clipscore", "pickscore"])
def test_logits_are_the_logit_scale_times_the_cosine(saved, pictures, name):
    pil_images, images = pictures
    reward = build(name, saved)
    with torch.no_grad():
        logits = reward.logits(images, PROMPTS)
        cosine = reward(images, PROMPTS) / unit(name)  # PickScore's score already is exp(logit_scale) · cosine
    assert torch.allclose(logits, LOGIT_SCALE * cosine, rtol=1e-5)
    expected = LOGIT_SCALE * reference_score(name, saved, pil_images) / unit(name)
    assert torch.allclose(logits, expected, atol=LOGIT_SCALE * TOLERANCE, rtol=0)


def test_hpsv2_reports_its_benchmark_at_100_times_the_cosine(saved, pictures):
    pil_images, images = pictures
    hps = build("hpsv2.1", saved)
    assert hps.version == "v2.1" and build("hpsv2", saved).version == "v2.0"
    with torch.no_grad():
        benchmark = hps.benchmark_scale * hps(images, PROMPTS)
    assert torch.allclose(benchmark, 100 * reference_score("hpsv2", saved, pil_images), atol=100 * TOLERANCE, rtol=0)
    assert build("clipscore", saved).benchmark_scale == 100.0  # CLIP score as papers report it
    assert all(build(name, saved).benchmark_scale == 1.0 for name in ("pickscore", "aesthetic"))


def test_a_square_picture_is_resized_to_the_tower_input_in_both_modes():
    images = torch.rand(1, 3, 100, 100)
    resized = F.interpolate(images, size=(SIZE, SIZE), mode="bicubic", antialias=True, align_corners=False)
    for mode in ("shortest", "longest"):
        assert torch.allclose(ClipPreprocess(SIZE, (0, 0, 0), (1, 1, 1), mode)(images), resized)


# ----------------------------------------------------------------------------------------------------- bad input


def test_a_missing_checkpoint_file_is_named(saved):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt"):
        build_reward("hpsv2.1", model=TINY, checkpoint=saved.root / "nowhere.pt")


def test_weights_missing_offline_say_what_to_download(monkeypatch, tmp_path, saved):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # empty, whatever is cached here
    with pytest.raises(FileNotFoundError, match=r"HPS_v2_compressed\.pt from https://huggingface\.co/xswu/HPSv2"):
        build_reward("hpsv2", model=TINY)
    with pytest.raises(FileNotFoundError, match="yuvalkirstain/PickScore_v1"):
        build_reward("pickscore", model=tmp_path / "no-folder", processor=saved.root / "processor")
    with pytest.raises(ValueError, match=r"sa_0_4_vit_l_14_linear\.pth"):
        build_reward("aesthetic", model=TINY_L, clip_checkpoint=saved.root / "open_clip_pytorch_model.bin")


def test_a_checkpoint_that_does_not_fit_is_refused(saved, tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        build_reward("clipscore", model=TINY_L, checkpoint=saved.root / "open_clip_model.safetensors")
    state = saved.hps.state_dict()
    torch.save({"state_dict": {k: v for k, v in state.items() if k != "logit_scale"}}, tmp_path / "missing.pt")
    torch.save({"state_dict": {**state, "score_predictor.weight": state["logit_scale"]}}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"Missing key\(s\).*logit_scale"):
        build_reward("hpsv2", model=TINY, checkpoint=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"Unexpected key\(s\).*score_predictor"):
        build_reward("hpsv2", model=TINY, checkpoint=tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="neither aesthetic head format"):
        build_reward(
            "aesthetic",
            checkpoint=saved.root / "open_clip_pytorch_model.bin",
            model=TINY_L,
            clip_checkpoint=saved.root / "open_clip_pytorch_model.bin",
        )
    folder = tmp_path / "PickScore_v1"
    saved.pick.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "logit_scale"}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing_keys.*logit_scale"):
        build_reward("pickscore", model=folder, processor=saved.root / "processor")


@pytest.mark.parametrize("name", ["hpsv2", "pickscore"])
def test_images_and_prompts_must_pair_up(saved, pictures, name):
    _, images = pictures
    reward = build(name, saved)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(images, PROMPTS[:1])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward(images[:, :1], PROMPTS)
