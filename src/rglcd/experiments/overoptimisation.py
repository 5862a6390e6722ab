"""``rglcd world overoptimisation``: the paper's reward over-optimisation finding, in the miniature.

RG-LCD's authors saw that maximising some reward models directly (through the VAE decoder) makes the student
paint high-frequency patterns that the reward likes and people do not, and that going through a latent proxy
RM fitted online to the expert (Alg. 4) avoids it. Here the hackable reward is ``world-aesthetic`` (a CNN
regressing colourfulness, whose input gradient is mostly high-frequency). Three students are distilled from
the world teacher with ``rglcd train world``: plain LCD, direct world-aesthetic guidance, and the same expert
through a latent proxy RM. Each is compared with the teacher on the expert reward, the true colourfulness it
approximates, the judge's attribute accuracy and Fréchet distance, and the share of high-frequency energy
of its samples relative to the teacher's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..data import write_cache
from ..eval_command import EvalRun, run_eval
from ..lrm import PretrainSettings, pretrain_lrm
from ..rewards.weights import read_training_record
from ..world.paths import world_asset
from .quickstart import distil_world_student, prepare_world, world_evaluation


@dataclass
class OveroptimisationSettings:
    out: Path = Path("runs/overoptimisation")
    train_steps: int = 600
    direct_beta: float = 1.0  # β on world-aesthetic, maximised through the decoder (Alg. 3)
    latent_beta: float = 1.0  # β on the proxy's cosine (Alg. 4)
    proxy_learning_rate: float = 3e-4  # the paper's 3.3e-6 scaled like the student's (1e-4 here vs 1e-6)
    proxy_batch_size: int = 8
    expert_scale: float = 10.0  # world-aesthetic differences of ~0.1 become pairwise logits of ~1
    lrm_samples: int = 8_000
    lrm_steps: int = 1_500
    prompts: int = 64
    steps: tuple[int, ...] = (1, 2, 4)
    data_samples: int = 10_000
    seed: int = 0


def world_lrm(settings: OveroptimisationSettings, world: dict[str, Path]) -> Path:
    """The world's latent proxy RM, pretrained contrastively on the latents of the world data (an `rglcd cache`
    made with the world teacher); both made once, then cached."""
    pretrain = PretrainSettings(
        architecture="world",
        samples=settings.lrm_samples,
        heldout=min(512, settings.lrm_samples // 4),
        steps=settings.lrm_steps,
        seed=settings.seed,
    )
    latents = world_asset(
        "lrm-latents",
        lambda out: write_cache(world["teacher"], world["data"], out, resolution=32, samples=pretrain.samples),
    )
    return world_asset("lrm", lambda out: pretrain_lrm(out, latents, pretrain))


def student_runs(settings: OveroptimisationSettings, lrm: Path) -> dict[str, list[str]]:
    """``rglcd train world`` overrides of the three students."""
    aesthetic = "[{name: world-aesthetic, beta: %s}]"
    return {
        "LCM": ["reward.terms=[]"],
        "direct": ["reward.terms=" + aesthetic % settings.direct_beta],
        "latent proxy": [
            "reward.terms=" + aesthetic % 1.0,  # the expert; the student's β is the proxy's
            "reward.mode=latent",
            f"reward.latent.model={lrm}",
            f"reward.latent.beta={settings.latent_beta}",
            f"reward.latent.learning_rate={settings.proxy_learning_rate}",
            f"reward.latent.batch_size={settings.proxy_batch_size}",
            f"reward.latent.expert_scale={settings.expert_scale}",
            "reward.latent.unlocked_image_groups=2",  # the ViT's last block and projection, as the official runs
        ],
    }


def run_overoptimisation(settings: OveroptimisationSettings) -> dict:
    started = time.perf_counter()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    world = prepare_world(settings.data_samples)
    lrm = world_lrm(settings, world)
    runs = student_runs(settings, lrm)
    students = {
        label: distil_world_student(out / label.replace(" ", "-"), settings.train_steps, settings.seed, overrides)
        for label, overrides in runs.items()
    }
    evaluation = world_evaluation(
        world, students, out, settings.prompts, settings.seed, steps=settings.steps, teacher_steps=(50,),
        metrics=["world-aesthetic", "colorfulness", "judge", "fid", "hf_ratio"],
    )  # fmt: skip
    notes = [
        f"Students distilled for {settings.train_steps} steps from the world teacher: **LCM** (β = 0), **direct** "
        f"(world-aesthetic through the VAE decoder, β = {settings.direct_beta}), **latent proxy** (the same expert "
        f"through a latent proxy RM fitted online, β = {settings.latent_beta} on its cosine).",
        "**world-aesthetic**: the expert, a CNN trained to predict colorfulness / 0.25; **colorfulness**: the true "
        "Hasler–Süsstrunk colourfulness; **judge_accuracy** / **fid**: the independent judge's attribute accuracy "
        "and Fréchet distance on its features to fresh renders; **high_frequency**: share of spectral energy "
        "above half Nyquist; **hf_ratio**: that share relative to the teacher's (50-step DDIM + CFG).",
    ]
    context = {
        "overoptimisation": {key: str(value) for key, value in vars(settings).items()},
        "runs": runs,
        "lrm": read_training_record(lrm),
    }
    title = "Reward over-optimisation in the miniature world"
    return run_eval(evaluation, EvalRun(title=title, notes=notes, context=context, started=started))
