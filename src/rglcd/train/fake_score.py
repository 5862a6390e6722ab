"""The fake score network of the distribution-matching and adversarial terms (DMD / DMD2, Yin et al. 2023/2024) as
one part of a run: built from the teacher's UNet, frozen while the student's loss reads it, fitted to the student's
own samples after each student update (its denoising loss, and the discriminator head's), checkpointed, all here.
``rglcd plan`` traces the same update."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Callable

import torch
from accelerate import Accelerator

from ..config import TrainConfig
from ..devices import host_to_device
from ..matching import DiscriminatorHead, discriminator_loss, fake_score_loss
from ..step import Distillation, MatchingTerms, SampleTarget
from .health import all_finite
from .proxy import reduce_gradients, set_trainable

logger = logging.getLogger("rglcd.train")
FAKE_ADAPTER = "fake"


def gan_levels(config: TrainConfig, num_train_timesteps: int) -> int:
    """How many noise levels the discriminator reads: t ~ U{0, …, levels − 1}, levels = gan.t_max·T (at least 1)."""
    return max(1, round(config.gan.t_max * num_train_timesteps))


@dataclasses.dataclass
class FakeFit:
    """One student step's fake-network updates, for the logs (the last update's values)."""

    loss: torch.Tensor  # the denoising loss on the student's samples
    discriminator_loss: torch.Tensor | None
    discriminator_accuracy: torch.Tensor | None  # the share of noised data / samples the head tells right


@dataclasses.dataclass
class FakeScore:
    """The fake score network (a copy of the teacher UNet: whole and trained in float32, or frozen in the teacher's
    dtype with trained LoRA adapters), DMD2's discriminator head on its mid-block (with ``gan.weight``), and their
    own AdamW. Not wrapped for DDP: :meth:`update` averages the gradients over the processes itself."""

    unet: torch.nn.Module
    head: DiscriminatorHead | None
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer

    @classmethod
    def build(cls, config: TrainConfig, teacher_unet: torch.nn.Module, teacher_dtype: torch.dtype) -> FakeScore | None:
        """From the teacher's UNet before any adapter is added to it (None when dmd.weight and gan.weight are 0)."""
        dmd = config.dmd
        if not (dmd.weight or config.gan.weight):
            return None
        unet = copy.deepcopy(teacher_unet)
        if dmd.fake_lora_rank:  # DMD2's memory saving for SD / SDXL: only adapters train
            from peft import LoraConfig

            from ..lora import LCM_LORA_TARGETS

            if teacher_dtype != unet.dtype:
                unet.to(teacher_dtype)
            unet.requires_grad_(False)
            lora = LoraConfig(
                r=dmd.fake_lora_rank, lora_alpha=dmd.fake_lora_rank, target_modules=list(LCM_LORA_TARGETS)
            )
            unet.add_adapter(lora, adapter_name=FAKE_ADAPTER)
            for param in unet.parameters():
                if param.requires_grad:  # the adapters train in float32 on the low-precision base
                    param.data = param.data.float()
        else:
            unet.float().requires_grad_(True)
        if config.precision.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        head = None
        if config.gan.weight:
            head = DiscriminatorHead(unet.config.block_out_channels[-1])
        params = [param for param in unet.parameters() if param.requires_grad]
        params += list(head.parameters()) if head is not None else []
        optim = config.optim
        optimizer = torch.optim.AdamW(
            params, lr=dmd.fake_lr, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_epsilon
        )
        return cls(unet, head, params, optimizer)

    def to(self, device: torch.device) -> FakeScore:
        self.unet.to(device)
        if self.head is not None:
            self.head.to(device)
        return self

    def terms(self, config: TrainConfig, distillation: Distillation) -> MatchingTerms:
        """The step's view of it: the DMD and GAN terms with the config's weights, timesteps and guidance."""
        dmd, gan, total = config.dmd, config.gan, distillation.schedule.num_train_timesteps
        generator = SampleTarget(distillation.sampling_timesteps(dmd.student_steps), grad_steps=1)
        low, high = round(dmd.t_min * total), min(round(dmd.t_max * total), total - 1)
        return MatchingTerms(
            self.unet, generator, dmd.weight, (low, high), dmd.real_guidance, gan.weight, self.head,
            gan_levels(config, total),
        )  # fmt: skip

    def fit_loss(
        self, config: TrainConfig, distillation: Distillation, samples: torch.Tensor, latents: torch.Tensor,
        cond_embeds: torch.Tensor, added_cond: dict | None, generator: torch.Generator,
    ) -> tuple[torch.Tensor, FakeFit]:  # fmt: skip
        """One update's loss on the student's detached samples [B,C,h,w]: the denoising loss at t ~ U{0, …, T−1}
        plus, with a head, ``gan.discriminator_weight`` × the discriminator's on noised data ``latents`` vs noised
        samples. The randomness is drawn from ``generator`` on the CPU. Run under the step's autocast."""
        schedule, total = distillation.schedule, distillation.schedule.num_train_timesteps
        batch, shape, device = samples.shape[0], samples.shape, samples.device
        timesteps = host_to_device(torch.randint(0, total, (batch,), generator=generator), device)
        noise = host_to_device(torch.randn(shape, generator=generator), device)
        loss = fake_score_loss(self.unet, samples, noise, timesteps, cond_embeds, schedule, added_cond)
        if self.head is None:
            return loss, FakeFit(loss.detach(), None, None)
        gan_timesteps = torch.randint(0, gan_levels(config, total), (2 * batch,), generator=generator)
        gan_timesteps = host_to_device(gan_timesteps, device)
        gan_noise = host_to_device(torch.randn((2 * batch, *shape[1:]), generator=generator), device)
        d_loss, accuracy = discriminator_loss(
            self.unet, self.head, latents, samples, gan_noise, gan_timesteps, cond_embeds, schedule, added_cond
        )
        total_loss = loss + config.gan.discriminator_weight * d_loss
        return total_loss, FakeFit(loss.detach(), d_loss.detach(), accuracy.detach())

    def update(
        self, accelerator: Accelerator, config: TrainConfig, distillation: Distillation, samples: torch.Tensor,
        latents: torch.Tensor, cond_embeds: torch.Tensor, added_cond: dict | None, generator: torch.Generator,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> FakeFit:  # fmt: skip
        """``dmd.fake_updates`` AdamW steps of :meth:`fit_loss` (DMD2's two time-scale rule), each under a fresh
        ``autocast()`` (the run's mixed precision); returns the last's fit."""
        set_trainable(self.params, True)
        for _ in range(config.dmd.fake_updates):
            with autocast():
                loss, fit = self.fit_loss(config, distillation, samples, latents, cond_embeds, added_cond, generator)
            self.step(accelerator, loss)
        return fit  # (the next training forward freezes it again, as it does the proxy)

    def step(self, accelerator: Accelerator, loss: torch.Tensor) -> None:
        """One AdamW step on ``loss``'s gradients averaged over the processes; skipped (and said) when the loss or a
        gradient is not finite, so that it cannot poison the Adam states."""
        if not all_finite(accelerator, loss):
            logger.warning("non-finite fake score loss; the fake network's update is skipped")
            return
        loss.backward()
        grads = [param.grad for param in self.params if param.grad is not None]
        if grads:
            reduce_gradients(accelerator, grads)
            if torch.stack(torch._foreach_norm(grads)).isfinite().all():
                self.optimizer.step()
            else:
                logger.warning("non-finite fake score gradients; the fake network's update is skipped")
        self.optimizer.zero_grad(set_to_none=True)

    def checkpointed(self) -> tuple[dict[str, torch.nn.Module], dict[str, torch.optim.Optimizer]]:
        modules = {"fake_unet": self.unet} | ({"fake_head": self.head} if self.head is not None else {})
        return modules, {"fake_optimizer": self.optimizer}

    def take_new_settings(self, config: TrainConfig) -> None:
        """After a resume: the config's learning rate and AdamW settings replace the checkpoint's."""
        optim = config.optim
        for group in self.optimizer.param_groups:
            group.update(lr=config.dmd.fake_lr, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_epsilon)
