"""The latent proxy RM (Alg. 4): preference loss, the online fit, `rglcd lrm pretrain`, latent-mode training (its
proxy fit over a run and exact resume: tests/test_resume.py)."""

import json
import math
from dataclasses import replace

import pytest
import torch

from rglcd.config import ConfigError, load_config
from rglcd.data import CachedStream, DataError
from rglcd.experiments.demo import tiny_setup
from rglcd.lrm import read_latents
from rglcd.models import load_teacher
from rglcd.rewards import build_reward
from rglcd.rewards.latent import WORLD_LATENT_CLIP, LatentClip, LatentClipConfig, preference_loss, proxy_fit
from rglcd.train import train

from .test_cli import run_main

TINY_LRM = replace(WORLD_LATENT_CLIP, vision_layers=[1], text_layers=1, vision_width=32, text_width=32, embed_dim=32)


def softmax2(a, b):
    return math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))


def kl2(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


# Rows: student prediction, target, ground truth; columns: 2 samples.
PROXY = [[1.0, 0.0], [0.0, 2.0], [2.0, 1.0]]
EXPERT = [[0.0, 1.5], [1.0, 0.0], [3.0, 0.5]]
PAIRS = ((0, 1), (0, 2), (1, 2))


def test_kl_preference_loss_and_accuracy_by_hand():
    loss, accuracy = preference_loss(torch.tensor(PROXY), torch.tensor(EXPERT))
    expected = sum(
        kl2(softmax2(EXPERT[i][b], EXPERT[j][b]), softmax2(PROXY[i][b], PROXY[j][b])) / 2
        for i, j in PAIRS
        for b in range(2)
    )
    agreements = [
        (PROXY[i][b] > PROXY[j][b]) == (EXPERT[i][b] > EXPERT[j][b]) for i, j in PAIRS for b in range(2)
    ]  # no ties in these numbers
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert accuracy.item() == pytest.approx(sum(agreements) / 6, rel=1e-6)


def test_smoothed_ground_truth_label_only_where_the_expert_prefers_the_generated_latent():
    loss, _ = preference_loss(torch.tensor(PROXY), torch.tensor(EXPERT), smooth_ground_truth=True)
    expected = 0.0
    for i, j in PAIRS:
        for b in range(2):
            label = softmax2(EXPERT[i][b], EXPERT[j][b])
            if j == 2 and EXPERT[i][b] > EXPERT[j][b]:  # sample 1 of both ground-truth pairs
                label = (0.5, 0.5)
            expected += kl2(label, softmax2(PROXY[i][b], PROXY[j][b])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_variant_lets_the_ground_truth_always_win():
    loss, accuracy = preference_loss(torch.tensor(PROXY), torch.tensor(EXPERT), kind="cross_entropy")
    expected, agreements = 0.0, 0
    for i, j in PAIRS:
        for b in range(2):
            winner = 1 if j == 2 else int(EXPERT[j][b] > EXPERT[i][b])
            expected -= math.log(softmax2(PROXY[i][b], PROXY[j][b])[winner]) / 2
            agreements += int(PROXY[j][b] > PROXY[i][b]) == winner
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert accuracy.item() == pytest.approx(agreements / 6, rel=1e-6)
    with pytest.raises(ValueError, match="need \\[3, B\\] logits"):
        preference_loss(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="'kl' or 'cross_entropy'"):
        preference_loss(torch.zeros(3, 4), torch.zeros(3, 4), kind="hinge")


def test_proxy_round_trips_and_rejects_other_folders(tmp_path):
    torch.manual_seed(0)
    model = LatentClip(TINY_LRM)
    model.save_pretrained(tmp_path / "lrm", {"note": "test"})
    loaded = LatentClip.from_pretrained(tmp_path / "lrm")
    latents = torch.randn(2, 4, 8, 8)
    assert torch.equal(model(latents, ["a", "b"]), loaded(latents, ["a", "b"]))
    with pytest.raises(FileNotFoundError, match="rglcd lrm pretrain"):
        LatentClip.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="resnet tower needs"):
        LatentClipConfig(latent_size=8)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        model(latents, ["a"])


@pytest.mark.parametrize("architecture", ["vit", "resnet"])
def test_the_fit_changes_only_unlocked_parameters(epsilon_teacher_dir, architecture):
    teacher = load_teacher(epsilon_teacher_dir)
    config = TINY_LRM
    if architecture == "resnet":  # the official latent_RN50 layout at a test size (32² latents)
        config = replace(LatentClipConfig(), vision_layers=[1, 1, 1, 1], vision_width=8, latent_size=32,
                         embed_dim=32, context_length=32, text_width=32, text_heads=4, text_layers=1)  # fmt: skip
    torch.manual_seed(0)
    proxy = LatentClip(config).unlock(image_groups=1, text_groups=1)
    before = {name: value.clone() for name, value in proxy.state_dict().items()}
    trainable = {name for name, param in proxy.named_parameters() if param.requires_grad}
    head = "clip.visual.attnpool." if architecture == "resnet" else "clip.visual.proj"
    assert any(name.startswith(head) for name in trainable)
    assert "clip.text_projection" in trainable and "clip.logit_scale" in trainable
    assert not any(name.startswith(("clip.visual.conv1", "clip.token_embedding")) for name in trainable)

    generator = torch.Generator().manual_seed(1)
    latents, model_pred, target = (torch.randn(4, 4, config.latent_size, config.latent_size, generator=generator)
                                   for _ in range(3))  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in proxy.parameters() if p.requires_grad], lr=1e-2)
    fit = proxy_fit(
        proxy, build_reward("colorfulness"), teacher.vae, model_pred=model_pred, target=target, latents=latents,
        prompts=["a", "b", "c", "d"], indices=torch.tensor([2, 0]), expert_scale=20.0,
    )  # fmt: skip
    assert fit.loss.item() > 0 and 0 <= fit.accuracy.item() <= 1
    fit.loss.backward()
    optimizer.step()
    after = proxy.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    batch_norm_statistics = {name for name in before if "running_" in name or "num_batches" in name}
    assert changed <= trainable | batch_norm_statistics
    assert any(name.startswith(head) for name in changed) and "clip.text_projection" in changed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"), samples=96)


@pytest.fixture(scope="module")
def pretrained_lrm(tiny):
    """`rglcd cache` of the tiny data, then `rglcd lrm pretrain` on it."""
    latents, out = tiny / "latents", tiny / "lrm"
    for args in (
        ["cache", "--teacher", str(tiny / "teacher"), "--data", str(tiny / "data"), "--out", str(latents),
         "--resolution", "32"],
        ["lrm", "pretrain", "--cache", str(latents), "--out", str(out), "--architecture", "world", "--samples", "96",
         "--heldout", "32", "--steps", "30", "--batch-size", "32"],
    ):  # fmt: skip
        result = run_main(*args)
    assert "held-out retrieval among 32" in result.stdout
    return out


def test_lrm_pretrain_cli_reads_the_cache_and_writes_a_loadable_proxy(tiny, pretrained_lrm):
    record = json.loads((pretrained_lrm / "config.json").read_text())
    assert record["kind"] == "latent-clip" and record["config"]["latent_size"] == 8
    assert record["training"]["steps"] == 30 and 0 <= record["training"]["heldout_retrieval_accuracy"] <= 1
    assert record["training"]["cache"] == str(tiny / "latents")
    assert record["training"]["teacher"] == str(tiny / "teacher")
    LatentClip.from_pretrained(pretrained_lrm)


def test_lrm_pretrain_reads_the_caches_posteriors_in_order(tiny, pretrained_lrm):
    mean, std, captions = read_latents(tiny / "latents", 40)
    (batch,) = [next(iter(CachedStream(tiny / "latents", batch_size=40)))]
    log_variance = batch["latent_parameters"][:, 4:]
    assert torch.equal(mean, batch["latent_parameters"][:, :4]) and captions == batch["captions"]
    torch.testing.assert_close(std, torch.exp(0.5 * log_variance))
    with pytest.raises(DataError, match="holds 96 samples, not 97: lower --samples or cache more"):
        read_latents(tiny / "latents", 97)


def latent_overrides(tiny, lrm, out, **extra):
    fields = {
        "model.teacher": tiny / "teacher", "data.source": tiny / "data", "logging.output_dir": out,
        "optim.batch_size": 4, "optim.max_train_steps": 4, "logging.checkpointing_steps": 2,
        "logging.validation_steps": 0, "reward.mode": "latent", "reward.latent.model": lrm,
        "reward.latent.batch_size": 2, "reward.latent.learning_rate": 1e-3, "reward.latent.unlocked_text_groups": 1,
    }  # fmt: skip
    fields.update(extra)
    return [f"{key}={value}" for key, value in fields.items()]


def test_with_the_sampler_reward_the_proxy_scores_and_fits_the_samples(tiny, pretrained_lrm, tmp_path, monkeypatch):
    """reward.target=sample in latent mode: the proxy reads the student's 2-step sample, and is fitted on it."""
    import rglcd.train.forward as forward
    import rglcd.train.proxy as proxy

    outputs, fitted = [], []

    def recorded_step(**kwargs):
        outputs.append(loop_step(**kwargs))
        return outputs[-1]

    def recorded_fit(*args, **kwargs):
        fitted.append(kwargs["model_pred"])
        return loop_fit(*args, **kwargs)

    loop_step, loop_fit = forward.rglcd_step, proxy.proxy_fit
    monkeypatch.setattr(forward, "rglcd_step", recorded_step)
    monkeypatch.setattr(proxy, "proxy_fit", recorded_fit)
    overrides = latent_overrides(tiny, pretrained_lrm, tmp_path / "run", **{"optim.max_train_steps": 2})
    train(load_config("tiny", [*overrides, "reward.target=sample"]))
    assert len(outputs) == len(fitted) == 2
    for output, model_pred in zip(outputs, fitted, strict=True):
        assert output.sample is not None and model_pred is output.sample and output.reward is not None


def test_latent_mode_config_errors_name_the_fix(tiny, tmp_path):
    base = latent_overrides(tiny, tmp_path / "missing", tmp_path / "run")
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [*base, "reward.terms=[]", "reward.latent.batch_size=9"])
    text = str(error.value)
    assert "latent mode needs the expert reward" in text and "rglcd lrm pretrain" in text
    assert "reward.latent.batch_size: must be in [1, optim.batch_size = 4]" in text


def test_a_proxy_of_another_latent_size_is_a_config_error(tiny, pretrained_lrm, tmp_path):
    with pytest.raises(ConfigError, match=r"its latents are 8² but data.resolution 64 gives 16²"):
        load_config("tiny", [*latent_overrides(tiny, pretrained_lrm, tmp_path / "run"), "data.resolution=64"])
