"""Alg. 4's latent proxy RM as one part of a run (Li et al. 2024): built with its own AdamW, frozen while it is the
student's reward, fitted to the expert after each student update, checkpointed and exported, all here. ``rglcd
plan`` traces the same fit. A network a new loss term owns (DMD's fake score) takes the same shape."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from accelerate import Accelerator

from ..config import TrainConfig
from ..rewards.latent import LatentClip, ProxyFit, proxy_fit
from ..step import StepOutput
from .health import all_finite

logger = logging.getLogger("rglcd.train")


@dataclasses.dataclass
class Proxy:
    """The latent proxy RM with its trained parameters and their own AdamW. Not wrapped for DDP (the fit calls its
    methods, not its forward): :meth:`update` averages its gradients over the processes itself."""

    model: LatentClip
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer

    @classmethod
    def build(cls, config: TrainConfig, model: LatentClip) -> Proxy:
        """Unlock ``model``'s trained groups (``reward.latent.unlocked_*_groups``) and give them an AdamW."""
        latent, optim = config.reward.latent, config.optim
        model.unlock(latent.unlocked_image_groups, latent.unlocked_text_groups)
        params = [param for param in model.parameters() if param.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=latent.learning_rate, betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_epsilon
        )
        return cls(model, params, optimizer)

    @classmethod
    def load(cls, config: TrainConfig, device: torch.device) -> Proxy | None:
        """The run's proxy from ``reward.latent.model`` on ``device`` (None unless ``reward.mode`` is latent)."""
        if config.reward.mode != "latent":
            return None
        proxy = cls.build(config, LatentClip.from_pretrained(config.reward.latent.model))
        proxy.model.to(device)
        return proxy

    def freeze(self) -> None:
        """The student's reward for its backward pass: no gradient into the proxy."""
        set_trainable(self.params, False)
        self.model.eval()

    def fit_loss(
        self, config: TrainConfig, expert, vae, output: StepOutput, latents: torch.Tensor, captions: list[str],
        generator: torch.Generator,
    ) -> ProxyFit:  # fmt: skip
        """Alg. 4's preference loss of the proxy on ``reward.latent.batch_size`` samples of the step, drawn from
        ``generator`` (after the step's draws): the expert's choice between the student's scored latents, the
        target's and the data. Run under the step's autocast."""
        latent = config.reward.latent
        set_trainable(self.params, True)
        self.model.train()
        indices = torch.randperm(len(latents), generator=generator)[: latent.batch_size]  # [R], on the CPU
        return proxy_fit(
            self.model, expert, vae, model_pred=output.scored, target=output.target, latents=latents,
            prompts=captions, indices=indices, kind=latent.loss, smooth_ground_truth=latent.smooth_ground_truth,
            expert_scale=latent.expert_scale, expert_scale_from_proxy=latent.expert_scale_from_proxy,
            decode_batch_size=config.reward.decode_batch_size,
        )  # fmt: skip

    def update(self, accelerator: Accelerator, fit: ProxyFit, config: TrainConfig) -> None:
        """Backpropagate the fit's loss and, at the end of an accumulation, step the proxy's AdamW on the gradients
        averaged over the processes; a non-finite loss or gradient skips (and says so) instead of poisoning it."""
        if all_finite(accelerator, fit.loss):
            (fit.loss * config.reward.latent.loss_scale / config.optim.gradient_accumulation_steps).backward()
        else:  # a non-finite preference loss would poison the proxy, and with it every later student step
            logger.warning("non-finite latent proxy loss; the proxy's update from this batch is skipped")
        if not accelerator.sync_gradients:
            return
        grads = [param.grad for param in self.params if param.grad is not None]
        if grads:
            reduce_gradients(accelerator, grads)
            # Unscaled fp16 gradients can overflow: an inf would poison the proxy's Adam states for good.
            if torch.stack(torch._foreach_norm(grads)).isfinite().all():  # the same on every rank (reduced)
                self.optimizer.step()
            else:
                logger.warning("non-finite latent proxy gradients; the proxy's update is skipped")
        self.optimizer.zero_grad(set_to_none=True)

    def checkpointed(self) -> tuple[dict[str, torch.nn.Module], dict[str, torch.optim.Optimizer]]:
        """What a checkpoint holds of it: the proxy and its optimizer, under their checkpoint names."""
        return {"latent_rm": self.model}, {"latent_rm_optimizer": self.optimizer}

    def take_new_settings(self, config: TrainConfig) -> None:
        """After a resume: the config's learning rate and AdamW settings replace the checkpoint's."""
        optim = config.optim
        for group in self.optimizer.param_groups:
            group.update(lr=config.reward.latent.learning_rate, betas=(optim.adam_beta1, optim.adam_beta2))
            group.update(eps=optim.adam_epsilon)

    def export(self, out: Path, fitted_steps: int) -> None:
        self.model.save_pretrained(out / "latent_rm", {"fitted_steps": fitted_steps})


def reduce_gradients(accelerator: Accelerator, grads: list[torch.Tensor]) -> None:
    """In place: the mean of the gradients over the processes, as DDP does for the student, in one collective over
    all of them flattened (not one per parameter)."""
    if accelerator.num_processes == 1:
        return
    flat = accelerator.reduce(torch.cat([grad.flatten() for grad in grads]), reduction="mean")
    for grad, mean in zip(grads, flat.split([grad.numel() for grad in grads]), strict=True):
        grad.copy_(mean.view_as(grad))


def set_trainable(params: list[torch.nn.Parameter], trainable: bool) -> None:
    for param in params:
        param.requires_grad_(trainable)
