"""``rglcd serve``: try exported students (and their teacher) side by side in the browser.

Models load once (full or LoRA students, SD or SDXL, teachers); each request samples every model from the same
seed, times it and, with a reward, scores it. Requests are checked before any model runs (:func:`check_request`),
so bad input, from the page or its API, is a message naming the field and one log line, not a crash. The page is a
gradio app (``pip install 'rglcd[serve]'``); everything but :func:`request_handler` and :func:`build_app` works
without gradio.
"""

from __future__ import annotations

import math
import reprlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from .config import MAX_SEED, load_config
from .errors import RglcdError
from .eval_command import parse_model
from .evaluate import pipeline_kind
from .export import fused_lora_pipeline, load_lcm
from .grid import steps_text, upscale_factor
from .models import load_teacher, place
from .models.speed import sampling_dtype, synchronize
from .rewards import build_reward
from .sampling import (
    LCM_GUIDANCE,
    SAMPLERS,
    TCD_ETA,
    TEACHER_GUIDANCE,
    consistency_scheduler,
    ddim_cfg_sample,
    ddim_scheduler,
    lcm_sample,
    to_pil,
)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
SHOWN_SIZE = 256  # small images are shown nearest-neighbour upscaled to at least this many pixels
MAX_GUIDANCE = 30.0  # beyond this CFG only saturates; a typo (85 for 8.5) gets a message instead
PAGE_TEACHER_STEPS = 25  # the page's initial teacher steps (DDIM)


class RequestError(RglcdError, ValueError):
    """A request (or, at start-up, a model) that cannot be served; the message says what to change."""


@dataclass
class ServedModel:
    label: str
    kind: Literal["lcm", "teacher"]
    parts: Any  # a diffusers pipeline (LCM) or rglcd's Teacher: unet, vae, text encoder(s), scheduler
    max_steps: int  # LCM: its grid's length (diffusers' original_inference_steps); teacher: its training steps
    device: torch.device


def _lora_student(folder: Path):
    """An rglcd LoRA export (``RUN/lora``) fused onto the teacher its run names in ``RUN/config.yaml`` (on the CPU)."""
    config_path = folder.parent / "config.yaml"
    if not config_path.is_file():
        raise RequestError(
            f"{folder} holds LoRA weights but no rglcd run around it ({config_path} is missing): serve the run's "
            "fused student/ folder (lora.fuse_on_export=true), or the teacher with the adapters fused in"
        )
    config = load_config(config_path)
    pipeline = fused_lora_pipeline(
        config.model.teacher, folder, config.distill.num_ddim_timesteps, config.distill.timestep_scaling,
        revision=config.model.revision, variant=config.model.variant,
    )  # fmt: skip
    return pipeline


def load_served_model(text: str, device: torch.device, dtype: torch.dtype | None = None) -> ServedModel:
    """``[LABEL=]PATH``: an exported student folder (full, fused LoRA, SD or SDXL), an rglcd LoRA export
    (``RUN/lora``) or a teacher pipeline (folder or hub id), on ``device`` in ``dtype`` (None: bfloat16 on a GPU,
    else float32; an SDXL ``force_upcast`` VAE in float32: :func:`models.place`)."""
    label, path = parse_model(text)
    folder = Path(path)
    if (folder / LORA_WEIGHTS).is_file() and not (folder / "model_index.json").is_file():
        parts = _lora_student(folder)
        kind = "lcm"
    else:
        kind = pipeline_kind(path)
        parts = load_lcm(path) if kind == "lcm" else load_teacher(path)
    place(parts, device, dtype or sampling_dtype(None, device))
    if kind == "lcm":
        max_steps = parts.scheduler.config.get("original_inference_steps", 50)
    else:
        max_steps = parts.scheduler_config.get("num_train_timesteps", 1000)
    return ServedModel(label, kind, parts, max_steps, device)


@dataclass(frozen=True)
class Request:
    prompt: str
    seed: int
    steps: int  # the consistency models'
    guidance: float  # diffusers' LCM guidance (w + 1)
    scheduler: str  # lcm or tcd
    eta: float  # TCD's γ
    teacher_steps: int
    teacher_guidance: float  # CFG scale


def _is_number(value: Any) -> bool:
    """An int or a float: what the page's number fields send (an API client may send anything)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A request's value in a message: a float as it reads, anything else as a repr cut short (one short log line)."""
    return f"{value:g}" if isinstance(value, float) else reprlib.repr(value)


def _whole(value: Any, name: str, low: int, high: int) -> int:
    wanted = f"give a whole number from {low} to {high}"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        raise RequestError(f"{name}: {wanted}")
    if not _is_number(value) or value != int(value) or not low <= value <= high:
        raise RequestError(f"{name} {_shown(value)}: {wanted}")
    return int(value)


def _scale(value: Any, name: str, high: float) -> float:
    if not _is_number(value) or not 0 <= value <= high:  # (NaN is neither)
        raise RequestError(f"{name} {'empty' if value is None else _shown(value)}: give a number from 0 to {high:g}")
    return float(value)


def check_request(models: list[ServedModel], prompt: Any, seed: Any, steps: Any, guidance: Any, scheduler: Any,
                  eta: Any, teacher_steps: Any, teacher_guidance: Any) -> Request:  # fmt: skip
    """The page's values as a :class:`Request`, or a RequestError naming the first bad one and its range."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("Type a prompt first.")
    lcm_limit = min((model.max_steps for model in models if model.kind == "lcm"), default=8)
    teacher_limit = min((model.max_steps for model in models if model.kind == "teacher"), default=1000)
    if scheduler not in SAMPLERS:
        raise RequestError(f"scheduler {reprlib.repr(scheduler)}: choose {' or '.join(SAMPLERS)}")
    eta_value = _scale(eta, "eta", 1.0)
    return Request(
        prompt.strip(), _whole(seed, "seed", 0, MAX_SEED), _whole(steps, "steps", 1, lcm_limit),
        _scale(guidance, "guidance", MAX_GUIDANCE), scheduler, eta_value,
        _whole(teacher_steps, "teacher steps", 1, teacher_limit),
        _scale(teacher_guidance, "teacher guidance", MAX_GUIDANCE),
    )  # fmt: skip


@dataclass
class Sample:
    label: str
    steps: int
    image: Image.Image  # as generated
    seconds: float
    score: float | None  # the reward on its benchmark scale, if one is served


@torch.no_grad()
def generate(models: list[ServedModel], request: Request, reward=None) -> list[Sample]:
    """Every model's image for the request, each from ``torch.Generator(device).manual_seed(seed)`` (what
    ``rglcd sample --seed`` gives its first image), timed from prompt to pixels."""
    samples = []
    for model in models:
        parts = model.parts
        generator = torch.Generator(model.device).manual_seed(request.seed)
        synchronize(model.device)
        started = time.perf_counter()
        if model.kind == "lcm":
            scheduler = consistency_scheduler(parts.scheduler.config, request.scheduler)
            images = lcm_sample(
                parts.unet, parts.vae, parts, scheduler, [request.prompt], num_steps=request.steps,
                guidance_scale=request.guidance, generator=generator, eta=request.eta,
            )  # fmt: skip
            steps = request.steps
        else:
            images = ddim_cfg_sample(
                parts.unet, parts.vae, parts, ddim_scheduler(parts.scheduler_config), [request.prompt],
                num_steps=request.teacher_steps, guidance_scale=request.teacher_guidance, generator=generator,
            )  # fmt: skip
            steps = request.teacher_steps
        synchronize(model.device)
        seconds = time.perf_counter() - started
        score = None
        if reward is not None:
            score = float(reward(images.float(), [request.prompt])[0]) * reward.benchmark_scale
        samples.append(Sample(model.label, steps, to_pil(images.float().cpu())[0], seconds, score))
    return samples


def shown(image: Image.Image) -> Image.Image:
    """Small images (the miniature's 32 pixels) enlarged nearest-neighbour, so the page shows pixels, not blur."""
    factor = upscale_factor(min(image.size), SHOWN_SIZE)
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def caption(sample: Sample, reward_name: str | None) -> str:
    text = f"{sample.label} · {steps_text(sample.steps)} · {1000 * sample.seconds:.0f} ms"
    return text if sample.score is None else f"{text} · {reward_name} {sample.score:.3f}"


def results_table(samples: list[Sample], reward_name: str | None) -> str:
    head = "| model | steps | time (ms) |" + (f" {reward_name} |" if reward_name else "")
    rule = "| --- | ---: | ---: |" + (" ---: |" if reward_name else "")
    lines = [head, rule]
    for sample in samples:
        score = f" {sample.score:.3f} |" if sample.score is not None else ""
        lines.append(f"| {sample.label} | {sample.steps} | {1000 * sample.seconds:.0f} |{score}")
    return "\n".join(lines)


@dataclass(frozen=True)
class ServeSettings:
    models: list[str]  # [LABEL=]PATH of each model, in page order
    host: str = "127.0.0.1"
    port: int = 7860
    reward: str | None = None  # a registered reward scoring every image
    guidance: float = LCM_GUIDANCE  # the page's initial LCM guidance
    steps: int = 2
    device: str = "cpu"
    dtype: str | None = None  # the models' fp16, bf16 or fp32 (rglcd.models.speed); None: bf16 on a GPU, else fp32
    queue_size: int = 16  # requests waiting beyond this are refused with gradio's "queue full" message


WARM_UP = Request("a warm-up", seed=0, steps=1, guidance=LCM_GUIDANCE, scheduler="lcm", eta=TCD_ETA, teacher_steps=1,
                  teacher_guidance=TEACHER_GUIDANCE)  # fmt: skip


def load_models(settings: ServeSettings) -> tuple[list[ServedModel], Any]:
    """Every model and the reward (in float32, whatever the models' dtype), loaded before the server starts (a bad
    path stops it with a one-line error), and each model run once, so the first request's time is not the GPU's
    start-up (CUDA context, cuBLAS handles, the allocator's first requests)."""
    labels = [parse_model(text)[0] for text in settings.models]
    if len(set(labels)) != len(labels):  # checked before any weights load
        raise RequestError(f"two models share a label ({', '.join(labels)}): name them with --model LABEL=PATH")
    device = torch.device(settings.device)
    try:
        dtype = sampling_dtype(settings.dtype, device)
    except ValueError as error:
        raise RequestError(f"--dtype {error}") from None
    models = [load_served_model(text, device, dtype) for text in settings.models]
    reward = build_reward(settings.reward).to(device) if settings.reward else None
    generate(models, WARM_UP)
    return models, reward


def request_handler(models: list[ServedModel], reward, settings: ServeSettings) -> Callable:
    """The page's generate function, also what its API calls: (prompt, seed, steps, guidance, scheduler, eta, teacher
    steps, teacher guidance) -> (gallery, timings table). The values come as sent (:func:`build_app` turns gradio's
    preprocessing off, which raised its own tracebacks for NaN or out-of-range values), so a malformed request is
    :func:`check_request`'s: a ``gr.Error`` naming the field (the page's message, the API's error event) and one log
    line."""
    import gradio as gr

    def run(prompt, seed, steps, guidance, scheduler, eta, teacher_steps, teacher_guidance):
        try:
            request = check_request(models, prompt, seed, steps, guidance, scheduler, eta, teacher_steps,
                                    teacher_guidance)  # fmt: skip
        except RequestError as error:
            print(f"rglcd serve: refused a request: {error}", file=sys.stderr, flush=True)
            raise gr.Error(str(error), print_exception=False) from error
        samples = generate(models, request, reward)
        gallery = [(shown(sample.image), caption(sample, settings.reward)) for sample in samples]
        return gallery, results_table(samples, settings.reward)

    return run


def build_app(models: list[ServedModel], reward, settings: ServeSettings):
    """The gradio page: prompt and settings on top, the images side by side with their time and score below."""
    import gradio as gr

    lcm = [model for model in models if model.kind == "lcm"]
    teachers = [model for model in models if model.kind == "teacher"]
    run = request_handler(models, reward, settings)
    with gr.Blocks(title="rglcd serve", analytics_enabled=False) as app:
        names = ", ".join(f"{model.label} ({'teacher' if model.kind == 'teacher' else 'consistency model'})"
                          for model in models)  # fmt: skip
        gr.Markdown(f"## rglcd serve\n{names}" + (f"; scored by **{settings.reward}**" if settings.reward else ""))
        prompt = gr.Textbox(label="Prompt (Enter generates)", placeholder="a large red circle on the left",
                            elem_id="prompt")  # fmt: skip
        with gr.Row():
            button = gr.Button("Generate", variant="primary", elem_id="generate")  # left: error toasts show top right
            seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
            steps_label = f"Steps (1–{min(m.max_steps for m in lcm)})" if lcm else "Steps"
            steps = gr.Number(label=steps_label, value=settings.steps, precision=0, elem_id="steps", visible=bool(lcm))
            guidance = gr.Number(
                label="Guidance (w + 1)", value=settings.guidance, elem_id="guidance", visible=bool(lcm)
            )
            scheduler = gr.Radio(list(SAMPLERS), value="lcm", label="Scheduler", visible=bool(lcm))
            eta = gr.Slider(0.0, 1.0, value=TCD_ETA, step=0.05, label="TCD eta (gamma)", visible=bool(lcm))
        with gr.Row(visible=bool(teachers)):
            teacher_steps = gr.Number(label="Teacher steps (DDIM)", value=PAGE_TEACHER_STEPS, precision=0)
            teacher_guidance = gr.Number(label="Teacher guidance (CFG)", value=TEACHER_GUIDANCE)
        gallery = gr.Gallery(label="Samples", columns=len(models), object_fit="contain", elem_id="samples")
        table = gr.Markdown(elem_id="timings")
        inputs = [prompt, seed, steps, guidance, scheduler, eta, teacher_steps, teacher_guidance]
        for trigger in (button.click, prompt.submit):  # one generation at a time; the rest queue
            trigger(run, inputs, [gallery, table], concurrency_limit=1, preprocess=False)
    return app.queue(max_size=settings.queue_size)


def serve(settings: ServeSettings, block: bool = True):
    """Load everything, then serve the page at http://HOST:PORT until interrupted."""
    try:
        import gradio  # noqa: F401  (optional: the serve extra)
    except ImportError as error:
        raise RequestError("rglcd serve needs gradio: pip install 'rglcd[serve]'") from error
    models, reward = load_models(settings)
    app = build_app(models, reward, settings)
    app.launch(server_name=settings.host, server_port=settings.port, show_error=True, prevent_thread_lock=not block,
               footer_links=[])  # fmt: skip
    return app
