"""The models of a run: the teacher and its conditioning, the student and its EMA target, VAE helpers."""

from ..devices import host_to_device
from .speed import SpeedSwitches, speed_up, use_tf32
from .student import build_student, build_target, update_ema
from .teacher import (
    REQUIRED_COMPONENTS,
    Teacher,
    TeacherLoadError,
    encode_prompts,
    encode_sdxl_prompts,
    has_component,
    load_raw_config,
    load_teacher,
    place,
    read_pipeline_index,
    read_sd_layout_index,
    sdxl_added_cond,
    sdxl_time_ids,
    text_conditioning,
)
from .vae import decode_latents, reward_input, vae_dtype, vae_scale_factor

__all__ = [
    "REQUIRED_COMPONENTS",
    "SpeedSwitches",
    "Teacher",
    "TeacherLoadError",
    "build_student",
    "build_target",
    "decode_latents",
    "encode_prompts",
    "encode_sdxl_prompts",
    "has_component",
    "host_to_device",
    "load_raw_config",
    "load_teacher",
    "place",
    "read_pipeline_index",
    "read_sd_layout_index",
    "reward_input",
    "sdxl_added_cond",
    "sdxl_time_ids",
    "speed_up",
    "text_conditioning",
    "update_ema",
    "use_tf32",
    "vae_dtype",
    "vae_scale_factor",
]
