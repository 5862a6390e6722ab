"""The ``rglcd`` command line.

Each command imports what it runs inside its ``cmd_*`` function, so that ``rglcd --help`` and a command's ``--help``
stay quick (torch's model libraries take seconds to import).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from pathlib import Path

from .errors import RglcdError


class UsageError(RglcdError, ValueError):
    """A command-line value that cannot work; the message says which and what to pass."""


def _device(name: str):
    from .models.speed import pick_device

    try:
        return pick_device(name)
    except ValueError as error:
        raise UsageError(f"--device {error}") from None


def _read_prompts_file(path: str) -> list[str]:
    from .files import read_text

    try:
        text = read_text(path)
    except ValueError as error:
        raise UsageError(f"--prompts-file {error}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def cmd_sample(args: argparse.Namespace) -> None:
    import torch
    from tqdm.auto import tqdm

    from .config import resolution_problem
    from .export import load_lcm
    from .files import atomic_file
    from .models import place
    from .models.speed import sampling_dtype
    from .sampling import LCM_GUIDANCE, TCD_ETA, consistency_scheduler, lcm_sample, to_pil

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += _read_prompts_file(args.prompts_file)
    if not prompts:
        raise UsageError("give at least one --prompt or a --prompts-file with a prompt")
    speed = _speed_switches(args)  # checked before the model loads
    if args.eta is not None and args.scheduler != "tcd":
        raise UsageError("--eta is TCD's gamma: use it with --scheduler tcd")
    eta = TCD_ETA if args.eta is None else args.eta
    guidance = LCM_GUIDANCE if args.guidance is None else args.guidance
    device = _device(args.device)
    dtype = sampling_dtype(args.dtype, device)
    pipeline = load_lcm(args.model)
    place(pipeline, device, dtype)
    pipeline.scheduler = consistency_scheduler(pipeline.scheduler.config, args.scheduler)
    problem = args.resolution and resolution_problem(args.resolution, pipeline.vae_scale_factor)
    if problem:
        raise UsageError(f"--resolution {problem}")
    speed.apply(pipeline.unet, pipeline.vae)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Image k (prompts in order, each --num-images times) has its own generator, seeded seed + k: an image does not
    # depend on the other prompts or on --batch-size.
    wanted = [(prompt, image) for prompt in range(len(prompts)) for image in range(args.num_images)]
    records = []
    starts = range(0, len(wanted), args.batch_size)
    for start in tqdm(starts, desc="sampling", disable=len(starts) == 1):
        batch = wanted[start : start + args.batch_size]
        seeds = range(args.seed + start, args.seed + start + len(batch))
        images = lcm_sample(
            pipeline.unet, pipeline.vae, pipeline, pipeline.scheduler, [prompts[index] for index, _ in batch],
            num_steps=args.steps, guidance_scale=guidance, resolution=args.resolution, eta=eta,
            generator=[torch.Generator(device).manual_seed(seed) for seed in seeds],
        )  # fmt: skip
        for (prompt_index, image_index), seed, image in zip(batch, seeds, to_pil(images), strict=True):
            name = f"{prompt_index:03d}-{image_index:02d}.png"
            with atomic_file(out / name) as partial:  # a full disk leaves no truncated PNG
                image.save(partial)
            records.append({"file": name, "prompt": prompts[prompt_index], "seed": seed, "image": image_index})
    meta = {"model": str(args.model), "steps": args.steps, "guidance": guidance, "scheduler": args.scheduler}
    meta.update(eta=eta if args.scheduler == "tcd" else None, dtype=str(dtype).removeprefix("torch."), images=records)
    with atomic_file(out / "samples.json") as partial:
        partial.write_text(json.dumps(meta, indent=2))
    print(f"wrote {len(records)} images to {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config

    config = load_config(args.config, args.overrides)
    if args.dry_run:
        print(config.to_yaml(), end="")
        return
    from accelerate import PartialState

    from .train import train

    exported = train(config, resume=args.resume, overwrite=args.overwrite)
    if PartialState().is_main_process:  # once, not from every process of a launch
        print(f"exported: {exported}")


def cmd_plan(args: argparse.Namespace) -> None:
    from .config import ConfigError, load_config
    from .gpus import GPU, GPUS
    from .plan import fit_switches, format_plan, make_plan, parse_memory

    config = load_config(args.config, args.overrides)
    if not 0 < args.utilization <= 1:
        raise ConfigError("--utilization: a share of the GPU's peak in (0, 1], e.g. 0.4")
    if args.fsdp and (args.processes < 2 or config.lora.rank):
        raise ConfigError("--fsdp: needs --processes >= 2 and a full student (LoRA runs use DDP)")
    gpu = GPUS[args.gpu]
    if args.gpu_memory:
        try:
            gpu = GPU(parse_memory(args.gpu_memory), gpu.tflops)
        except ValueError as error:
            raise ConfigError(str(error)) from error
    plan = make_plan(config, args.processes, args.fsdp, args.device)
    switches = fit_switches(plan, gpu.memory_gib * 2**30)
    print(format_plan(plan, args.config, args.gpu, gpu, args.utilization, switches, memory_given=bool(args.gpu_memory)))


def cmd_cache(args: argparse.Namespace) -> None:
    from .data import write_cache
    from .data.cache import read_cache_info

    out = write_cache(
        args.teacher, args.data, args.out, resolution=args.resolution, samples=args.samples,
        batch_size=args.batch_size, samples_per_shard=args.samples_per_shard, dtype=args.dtype,
        device=_device(args.device),
    )  # fmt: skip
    info = read_cache_info(out)
    print(f"cached {info['samples']} samples in {len(info['shards'])} shards: {out}  (train with data.source={out})")


def cmd_demo(args: argparse.Namespace) -> None:
    from .experiments.demo import run_demo

    student_dir = run_demo(args.out, steps=args.steps, prediction_type=args.prediction_type, seed=args.seed)
    print(f"student pipeline: {student_dir}  samples: {student_dir.parent}/samples-*-steps.png")


def cmd_world_data(args: argparse.Namespace) -> None:
    from .world.data import eval_scenes, write_prompt_list, write_world_shards

    shards = write_world_shards(args.out, args.samples, seed=args.seed)
    prompts = write_prompt_list(Path(args.out) / "eval_prompts.jsonl", eval_scenes(args.eval_prompts))
    print(f"wrote {len(shards)} shards and {prompts}")


def cmd_world_teacher(args: argparse.Namespace) -> None:
    from .world.teacher import TeacherRecipe, train_world_teacher

    recipe = TeacherRecipe(
        prediction_type=args.prediction_type, samples=args.samples, vae_steps=args.vae_steps, unet_steps=args.unet_steps
    )
    print(f"world teacher: {train_world_teacher(args.out, recipe)}")


def _sizes(args: argparse.Namespace) -> dict:
    """--samples/--steps when given; otherwise the training function's own recipe."""
    return {key: value for key, value in (("samples", args.samples), ("steps", args.steps)) if value is not None}


def cmd_world_rewards(args: argparse.Namespace) -> None:
    from .world.rewards import train_world_aesthetic, train_world_clip

    out = Path(args.out)
    train_world_clip(out / "clip", **_sizes(args))
    train_world_aesthetic(out / "aesthetic", **_sizes(args))
    print(f"world rewards: {out / 'clip'}, {out / 'aesthetic'}")


def cmd_world_judge(args: argparse.Namespace) -> None:
    from .world.judge import train_judge

    train_judge(args.out, **_sizes(args))
    print(f"world judge: {args.out}")


def cmd_quickstart(args: argparse.Namespace) -> None:
    from .experiments.quickstart import QuickstartSettings, run_quickstart

    settings = QuickstartSettings(
        out=Path(args.out), train_steps=args.train_steps, prompts=args.prompts, seeds=args.seeds
    )
    results = run_quickstart(settings)
    print(f"report: {settings.out / 'report.md'}  ({results['seconds']:.0f} s)")


def cmd_serve(args: argparse.Namespace) -> None:
    from .rewards import REWARDS
    from .sampling import LCM_GUIDANCE
    from .serve import ServeSettings, serve

    models, reward, guidance = list(args.model or []), args.reward, args.guidance
    if not models:  # the miniature: the quickstart's students beside the world teacher, scored by world-clip
        from .experiments.quickstart import quickstart_models
        from .world.plugin import WORLD_LCM_GUIDANCE

        models = quickstart_models(Path(args.quickstart))
        reward, guidance = reward or "world-clip", guidance or WORLD_LCM_GUIDANCE
    if reward is not None and reward not in REWARDS:
        raise UsageError(f"--reward {reward}: choose from {', '.join(REWARDS.names())}")
    settings = ServeSettings(
        models, args.host, args.port, reward, guidance or LCM_GUIDANCE, args.steps, str(_device(args.device)),
        dtype=args.dtype,
    )  # fmt: skip
    if args.host not in ("127.0.0.1", "localhost"):
        print(f"rglcd serve: listening on {args.host}: anyone who can reach this machine can use the page")
    print(f"rglcd serve: loading {len(models)} model(s), then http://{args.host}:{args.port} (Ctrl+C stops)")
    serve(settings)


def cmd_lrm_pretrain(args: argparse.Namespace) -> None:
    from .lrm import RETRIEVAL_GROUP, PretrainSettings, pretrain_lrm
    from .rewards.weights import read_training_record

    if not args.cache.strip():
        raise UsageError("--cache: empty; give the folder `rglcd cache` wrote")
    settings = PretrainSettings(
        architecture=args.architecture, samples=args.samples, heldout=args.heldout,
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
        device=str(_device(args.device)),
    )  # fmt: skip
    pretrain_lrm(args.out, args.cache, settings)
    record = read_training_record(args.out)
    accuracy = record["heldout_retrieval_accuracy"]
    print(
        f"latent proxy RM: {args.out}  (held-out retrieval among {RETRIEVAL_GROUP}: {accuracy:.3f}, "
        f"{record['seconds']:.0f} s)"
    )


def cmd_world_overoptimisation(args: argparse.Namespace) -> None:
    from .experiments.overoptimisation import OveroptimisationSettings, run_overoptimisation

    settings = OveroptimisationSettings(
        out=Path(args.out), train_steps=args.train_steps, direct_beta=args.direct_beta,
        latent_beta=args.latent_beta, prompts=args.prompts, lrm_samples=args.lrm_samples, lrm_steps=args.lrm_steps,
    )  # fmt: skip
    results = run_overoptimisation(settings)
    print(f"report: {settings.out / 'report.md'}  ({results['seconds']:.0f} s)")


def cmd_world_sampler_reward(args: argparse.Namespace) -> None:
    from .experiments.sampler_reward import SamplerRewardSettings, run_sampler_reward

    settings = SamplerRewardSettings(
        out=Path(args.out), train_steps=args.train_steps, sample_steps=args.sample_steps,
        grad_steps=args.grad_steps, prompts=args.prompts, etas=args.etas,
    )  # fmt: skip
    results = run_sampler_reward(settings)
    print(f"reports: {settings.out / 'report.md'}, {settings.out / 'tcd' / 'report.md'}  ({results['seconds']:.0f} s)")


def cmd_world_one_step(args: argparse.Namespace) -> None:
    from .experiments.one_step import OneStepSettings, run_one_step

    terms = {name: tuple(value) for name in ("dmd", "gan") if (value := getattr(args, name)) is not None}
    settings = OneStepSettings(
        out=Path(args.out), train_steps=args.train_steps, prompts=args.prompts, seeds=args.seeds, **terms
    )
    results = run_one_step(settings)
    reports = [settings.out / "report.md"] + ([settings.out / "seeds" / "report.md"] if settings.seeds > 1 else [])
    print(f"reports: {', '.join(map(str, reports))}  ({results['seconds']:.0f} s)")


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is at most 65535, got {value}")
    return value


def _seed(text: str) -> int:
    from .config import MAX_SEED

    value = _whole_number(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_SEED} (2**32 - 1), got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4,8, got {text!r}") from error
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive step counts like 1,2,4,8, got {text!r}")
    return values


def _unit_float(text: str) -> float:
    value = _finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def _unit_float_list(text: str) -> tuple[float, ...]:
    values = tuple(_unit_float(part) for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1] like 0,0.3,1, got {text!r}")
    return values


def _section_override(section: str):
    """An argparse type: ``section.field=value`` (the value is checked with the rest of the config when it trains)."""

    def parse(text: str) -> str:
        field, equals, _ = text.partition("=")
        if not (equals and field.startswith(f"{section}.") and field != f"{section}."):
            raise argparse.ArgumentTypeError(f"expected {section}.FIELD=VALUE like {section}.weight=1, got {text!r}")
        return text

    return parse


def _samplers(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    if not values or set(values) - {"lcm", "tcd"}:
        raise argparse.ArgumentTypeError(f"expected lcm, tcd or lcm,tcd, got {text!r}")
    return values


def _reward_kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from error
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError('expected {"reward name": {"argument": value, ...}, ...}')
    return value


def cmd_eval(args: argparse.Namespace) -> None:
    from .eval_command import EvalSettings, run_eval
    from .sampling import TCD_ETA, TEACHER_GUIDANCE

    if args.eta is not None and "tcd" not in args.scheduler:
        raise UsageError("--eta is TCD's gamma: use it with --scheduler tcd (or lcm,tcd)")
    settings = EvalSettings(
        models=args.model, out=Path(args.out), prompts=args.prompts, limit=args.limit, steps=args.steps,
        teacher_steps=args.teacher_steps, guidance=args.guidance,
        teacher_guidance=TEACHER_GUIDANCE if args.teacher_guidance is None else args.teacher_guidance,
        metrics=[name.strip() for name in args.metrics.split(",") if name.strip()] if args.metrics else None,
        reward_kwargs=args.reward_kwargs, fid_features=args.fid_features, inception_weights=args.inception_weights,
        fid_size=args.fid_size, resolution=args.resolution, batch_size=args.batch_size, seed=args.seed,
        samplers=args.scheduler, etas=args.eta or (TCD_ETA,), speed=_speed_switches(args),
        device=str(_device(args.device)), dtype=args.dtype,
    )  # fmt: skip
    results = run_eval(settings)
    print(f"report: {settings.out / 'report.md'}  ({results['seconds']:.0f} s)")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG and its overrides, as ``rglcd train`` and ``rglcd plan`` read them."""
    from .config import presets  # (no model libraries: --help stays quick)

    parser.add_argument("config", help=f"a preset ({', '.join(presets())}) or a YAML file")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. optim.learning_rate=1e-5")


def _add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """The speed switches of sampling, as ``precision.*`` are for training."""
    speed = parser.add_argument_group("speed switches")
    speed.add_argument(
        "--compile", action="store_true",
        help="torch.compile the UNet and the VAE decoder (the first batch compiles; on the CPU needs a C++ compiler)",
    )  # fmt: skip
    speed.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels-last memory format")
    speed.add_argument("--allow-tf32", action="store_true", help="TF32 matmuls (Ampere and newer GPUs)")


def _speed_switches(args: argparse.Namespace):
    from .config import compile_unavailable
    from .models import SpeedSwitches

    if args.compile and compile_unavailable():
        raise UsageError("--compile on the CPU needs a C++ compiler (g++ or clang++, or $CXX); install one or drop it")
    return SpeedSwitches(channels_last=args.channels_last, compile=args.compile, allow_tf32=args.allow_tf32)


def _add_device_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument("--device", default="auto", help=f"auto, cpu, cuda, cuda:1, ...{note}")


DTYPES = ("fp16", "bf16", "fp32")  # rglcd.models.speed.SAMPLING_DTYPES (named here: --help imports no torch)


def _add_dtype_argument(parser: argparse.ArgumentParser, scored: str) -> None:
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None,
        help="the models' precision (default: bf16 on a GPU, fp32 on the CPU); under fp16 an SDXL VAE whose config "
        f"sets force_upcast decodes in fp32, as in diffusers{scored}",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rglcd",
        description="Reward Guided Latent Consistency Distillation: distil a latent diffusion teacher into a "
        "1-4 step consistency model aligned to a reward.",
        epilog="Errors you can fix are one line; set RGLCD_DEBUG=1 to see the traceback (for a bug report).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_sample_command(commands)
    _add_train_command(commands)
    _add_plan_command(commands)
    _add_cache_command(commands)
    _add_eval_command(commands)
    _add_quickstart_command(commands)
    _add_serve_command(commands)
    _add_world_command(commands)
    _add_lrm_command(commands)
    _add_demo_command(commands)
    return parser


def _add_sample_command(commands) -> None:
    sample = commands.add_parser(
        "sample", help="few-step samples from an exported RG-LCM/LCM pipeline",
        description="Write PNGs sampled with multistep latent consistency sampling (LCMScheduler), or TCD's "
        "stochastic sampling (--scheduler tcd), --batch-size images per UNet call. Images are deterministic: image k "
        "(prompts in order, each --num-images times) uses seed + k, whatever the batch size.",
    )  # fmt: skip
    sample.add_argument("--model", required=True, help="exported pipeline folder or hub id")
    sample.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    sample.add_argument("--prompts-file", help="a text file with one prompt per line")
    sample.add_argument("--steps", type=int, default=4, choices=range(1, 9), metavar="{1..8}", help="default: 4")
    # Help texts give rglcd.sampling's defaults as figures (--help imports no diffusers; tests/test_cli.py checks them).
    sample.add_argument(
        "--guidance", type=_finite_float,
        help="CFG scale as in diffusers pipelines; the model sees w = guidance - 1 (default: 8.5)",
    )  # fmt: skip
    sample.add_argument("--seed", type=_seed, default=0)
    sample.add_argument("--num-images", type=_positive_int, default=1, help="images per prompt")
    sample.add_argument("--resolution", type=_positive_int, default=None, help="default: the model's native size")
    sample.add_argument("--batch-size", type=_positive_int, default=8, help="images per UNet call (default: 8)")
    sample.add_argument(
        "--scheduler", default="lcm", choices=("lcm", "tcd"),
        help="lcm: the export's LCMScheduler (default); tcd: diffusers' TCDScheduler on the same grid",
    )  # fmt: skip
    sample.add_argument(
        "--eta", type=_unit_float, default=None,
        help="TCD's gamma in [0, 1]: the share of each step that is re-noised (0: deterministic; default: 0.3)",
    )  # fmt: skip
    _add_device_argument(sample)
    _add_dtype_argument(sample, "")
    _add_speed_arguments(sample)
    sample.add_argument("--out", required=True, help="output folder")
    sample.set_defaults(run=cmd_sample)


def _add_train_command(commands) -> None:
    train = commands.add_parser(
        "train", help="distil a teacher into an RG-LCM (accelerate: `accelerate launch -m rglcd train ...`)",
        description="Run RG-LCD from a preset or a YAML config, with section.field=value overrides. The config "
        "is validated before any model loads and written to OUTPUT_DIR/config.yaml. A data.source of pipe:CMD runs "
        "CMD in a shell: read a config from elsewhere before you train with it.",
        epilog="example: rglcd train tiny optim.max_train_steps=20 logging.output_dir=runs/try",
    )  # fmt: skip
    _add_config_arguments(train)
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    train.add_argument(
        "--resume", help="'latest' or a checkpoint folder; changed settings are listed, fixed ones (model, LoRA, data "
        "order, batch size, processes) refused",
    )  # fmt: skip
    train.add_argument(
        "--overwrite", action="store_true", help="delete another run's checkpoints in logging.output_dir first"
    )
    train.set_defaults(run=cmd_train)


def _add_plan_command(commands) -> None:
    from .gpus import GPUS  # (a table: no torch)

    plan = commands.add_parser(
        "plan", help="will a training config fit on a GPU, and how long will it take? (no weights needed)",
        description="Build every model of the run at its published size on the meta device and trace one training "
        "step on fake tensors at the config's batch size and resolution: memory per process by part (weights, "
        "gradients, optimizer states, EMA target, teacher, VAE, text encoders, rewards, latent proxy, traced "
        "activations), whether it fits the GPU, which of the config's switches make it fit, the step's FLOPs and "
        "the time of a step and of the paper's 10,000-iteration run. Nothing is downloaded: the presets' teachers "
        "are known by their hub ids, a local teacher folder's configs are read (not its weights).",
        epilog="examples:\n  rglcd plan sd21-768\n  rglcd plan sdxl-1024 --gpu A100-40GB --processes 8 --fsdp\n"
        "  rglcd plan sd15-512 optim.batch_size=4 --gpu RTX-4090",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _add_config_arguments(plan)
    plan.add_argument(
        "--gpu", default="A100-80GB", choices=sorted(GPUS), help="memory and peak TFLOPS (default: A100-80GB)"
    )
    plan.add_argument("--gpu-memory", help="memory per GPU, e.g. 24GiB; 80GB is decimal (default: the --gpu's)")
    plan.add_argument("--processes", type=_positive_int, default=1, help="GPUs (processes) the run uses (default: 1)")
    plan.add_argument("--fsdp", action="store_true", help="shard the student over the processes (FSDP2)")
    plan.add_argument(
        "--utilization", type=_finite_float, default=0.4,
        help="share of the GPU's peak FLOPS the step reaches, for the time estimate (default: 0.4)",
    )  # fmt: skip
    plan.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                      help="cuda (default): a GPU run; cpu: as benchmarks/full_size.py runs it")  # fmt: skip
    plan.set_defaults(run=cmd_plan)


def _add_cache_command(commands) -> None:
    cache = commands.add_parser(
        "cache", help="encode a dataset once (VAE latents, text embeddings) so training skips both encoders",
        description="Read DATA once in order (centre crop, no flip), encode every usable sample with the teacher's "
        "VAE (posterior mean and log-variance) and text encoder (caption embedding), and write webdataset shards, "
        "cache_info.json and the empty prompt's embedding to OUT. Train from it with data.source=OUT; it is checked "
        "against the run's teacher and resolution.",
    )  # fmt: skip
    cache.add_argument("--teacher", required=True, help="the teacher pipeline (folder or hub id)")
    cache.add_argument("--data", required=True, help="webdataset shards or a captioned folder, as data.source")
    cache.add_argument("--out", required=True, help="the cache folder (must not exist)")
    cache.add_argument(
        "--resolution", type=_positive_int, required=True, help="image size before encoding, as data.resolution"
    )
    cache.add_argument("--samples", type=_positive_int, help="encode at most this many (default: one pass over DATA)")
    cache.add_argument(
        "--batch-size", type=_positive_int,
        help="images per encoder call (default: 32 up to 512 px, fewer above: 8 at 1024 px, so that the VAE "
        "encoder's float32 activations stay as large as at 512 px)",
    )  # fmt: skip
    cache.add_argument("--samples-per-shard", type=_positive_int, default=1000)
    cache.add_argument(
        "--dtype", default="float32", choices=("float32", "float16"), help="on disk (float16 halves the size)"
    )
    _add_device_argument(cache)
    cache.set_defaults(run=cmd_cache)


def _add_eval_command(commands) -> None:
    from .prompts import SPEC_HELP

    evaluation = commands.add_parser(
        "eval", help="the paper's evaluation: models × step counts × metrics on a prompt set, one report",
        description="Generate the prompts' images with every model (exported LCM/RG-LCM folders at --steps with "
        "their LCMScheduler; teacher pipelines with DDIM + CFG at --teacher-steps), the same noise per prompt for "
        "all, and score them. Writes OUT/results.json, report.md, grid.png and plots; finished images are reused, "
        "so an interrupted run resumes. Models, prompts and metrics are checked before anything is generated.",
        epilog="examples:\n  rglcd eval --model runs/quickstart/rg-lcm/student "
        "--model teacher=$RGLCD_CACHE/world/teacher --prompts world --steps 1,2,4\n"
        "  rglcd eval --model rg=runs/sd21-rglcd/student --model stabilityai/stable-diffusion-2-1 "
        "--prompts hpsv2 --metrics hpsv2.1,imagereward --steps 2,4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    evaluation.add_argument(
        "--model", action="append", required=True, metavar="[LABEL=]PATH",
        help="a pipeline folder or hub id (repeat); LCM or teacher is read from its scheduler",
    )  # fmt: skip
    evaluation.add_argument("--prompts", default="world", help=SPEC_HELP)
    evaluation.add_argument("--limit", type=_positive_int, help="at most this many prompts per group (e.g. style)")
    evaluation.add_argument("--steps", type=_int_list, default=(1, 2, 4, 8), help="LCM steps (default: 1,2,4,8)")
    evaluation.add_argument("--teacher-steps", type=_int_list, default=(25, 50), help="DDIM steps (default: 25,50)")
    evaluation.add_argument("--guidance", type=_finite_float, help="LCM guidance scale (default: 6.0 world, else 8.5)")
    evaluation.add_argument(
        "--scheduler", type=_samplers, default=("lcm",), metavar="lcm|tcd|lcm,tcd",
        help="the LCM models' sampler(s): their LCMScheduler, diffusers' TCDScheduler, or both side by side",
    )  # fmt: skip
    evaluation.add_argument(
        "--eta", type=_unit_float_list, metavar="GAMMA[,GAMMA...]",
        help="TCD's gamma, or several to sweep (e.g. 0,0.3,0.6,1): one row set per value (default: 0.3)",
    )  # fmt: skip
    evaluation.add_argument("--teacher-guidance", type=_finite_float, help="teacher CFG scale (default: 7.5)")
    evaluation.add_argument(
        "--metrics", help="comma-separated: any reward (rglcd.rewards.available_rewards()), judge, fid, hf_ratio "
        "(default: world-clip,judge,fid,hf_ratio for world; fid,clipscore for coco; else hpsv2.1,hf_ratio)",
    )  # fmt: skip
    evaluation.add_argument(
        "--reward-kwargs", type=_reward_kwargs, default={},
        help='JSON, e.g. \'{"aesthetic": {"checkpoint": "sa_0_4_vit_l_14_linear.pth"}}\'',
    )  # fmt: skip
    evaluation.add_argument(
        "--fid-features", help="FID feature space: inception, or a plugin's (world-judge); default: the prompt set's"
    )
    evaluation.add_argument(
        "--inception-weights", help="local weights-inception-2015-12-05-6726825d.pth (torch-fidelity)"
    )
    evaluation.add_argument(
        "--fid-size",
        type=_positive_int,
        help="centre-crop and resize both sets to this before FID (default: 256 for coco)",
    )
    evaluation.add_argument("--resolution", type=_positive_int, help="generation size (default: each model's own)")
    evaluation.add_argument("--batch-size", type=_positive_int, default=16, help="images per UNet call (default: 16)")
    evaluation.add_argument("--seed", type=_seed, default=0)
    _add_device_argument(evaluation, " (the models and every metric)")
    _add_dtype_argument(evaluation, "; rewards and metrics score in fp32, so scores compare across --dtype")
    _add_speed_arguments(evaluation)
    evaluation.add_argument("--out", default="runs/eval", help="report folder (default: runs/eval)")
    evaluation.set_defaults(run=cmd_eval)


def _add_quickstart_command(commands) -> None:
    quickstart = commands.add_parser(
        "quickstart", help="the whole method in the miniature world: distil LCM and RG-LCM, evaluate, report",
        description="Make or load (cache, else shipped weights) the world data, teacher, rewards and judge; distil "
        "an LCM and an RG-LCM (world-clip guidance) with `rglcd train`; compare them with the teacher's DDIM+CFG "
        "on held-out prompts; write OUT/report.md, results.json and grid.png. A second run reuses everything. "
        "--seeds N distils each student with N training seeds and adds their mean and spread to the report.",
    )  # fmt: skip
    quickstart.add_argument("--out", default="runs/quickstart", help="report folder (default: runs/quickstart)")
    quickstart.add_argument("--train-steps", type=_positive_int, default=600, help="distillation steps per student")
    quickstart.add_argument(
        "--prompts", type=_positive_int, default=256, help="held-out evaluation prompts (default: 256)"
    )
    quickstart.add_argument(
        "--seeds", type=_positive_int, default=1,
        help="training seeds per student (default: 1): 0, 1, ...; the report adds the mean and spread across them",
    )  # fmt: skip
    quickstart.set_defaults(run=cmd_quickstart)


def _add_serve_command(commands) -> None:
    serve = commands.add_parser(
        "serve", help="try students (and the teacher) side by side in the browser (gradio: pip install 'rglcd[serve]')",
        description="Load exported students (full or LoRA, SD or SDXL) and teacher pipelines, and serve a page that "
        "samples each of them for a prompt from the same seed and shows the images side by side with their "
        "generation time and, with --reward, their score. Requests queue and run one at a time. Without --model it "
        "serves the miniature: the quickstart's LCM and RG-LCM and the world teacher, scored by world-clip.",
        epilog="example: rglcd serve --model RG-LCM=runs/sd15/student --model teacher=runs/sd15/teacher "
        "--reward hpsv2.1",
    )  # fmt: skip
    serve.add_argument(
        "--model", action="append", metavar="[LABEL=]PATH",
        help="an exported student folder, an rglcd LoRA export (RUN/lora), or a teacher pipeline (folder or hub id); "
        "repeat for several, shown in this order",
    )  # fmt: skip
    serve.add_argument("--quickstart", default="runs/quickstart", help="without --model: the quickstart's folder")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    serve.add_argument("--port", type=_port, default=7860, help="default: 7860")
    serve.add_argument("--reward", help="score every image with this reward (e.g. hpsv2.1, world-clip)")
    serve.add_argument(
        "--guidance", type=_finite_float, default=None,
        help="the page's initial LCM guidance (diffusers' scale, w + 1; default: 8.5, the miniature's 6.0)",
    )  # fmt: skip
    serve.add_argument("--steps", type=int, default=2, choices=range(1, 9), metavar="{1..8}", help="initial steps")
    _add_device_argument(serve)
    _add_dtype_argument(serve, "; the --reward scores in fp32")
    serve.set_defaults(run=cmd_serve)


def _add_world_command(commands) -> None:
    world = commands.add_parser("world", help="make the miniature world's data, teacher, rewards and judge")
    world_commands = world.add_subparsers(dest="world_command", required=True)
    data = world_commands.add_parser("data", help="rendered, captioned scenes as webdataset shards")
    data.add_argument("--out", required=True)
    data.add_argument("--samples", type=_positive_int, default=10_000)
    data.add_argument(
        "--eval-prompts", type=_positive_int, default=128, help="held-out prompts written to eval_prompts.jsonl"
    )
    data.add_argument("--seed", type=_seed, default=0)
    data.set_defaults(run=cmd_world_data)
    teacher = world_commands.add_parser("teacher", help="train the tiny SD-layout teacher (VAE, then text+UNet)")
    teacher.add_argument("--out", required=True)
    teacher.add_argument("--prediction-type", default="epsilon", choices=("epsilon", "v_prediction"))
    teacher.add_argument("--samples", type=_positive_int, default=20_000, help="rendered training scenes")
    teacher.add_argument("--vae-steps", type=_positive_int, default=1_500)
    teacher.add_argument("--unet-steps", type=_positive_int, default=6_000)
    teacher.set_defaults(run=cmd_world_teacher)
    rewards = world_commands.add_parser(
        "rewards", help="train world-clip and world-aesthetic into OUT/clip, OUT/aesthetic"
    )
    rewards.add_argument("--out", required=True)
    rewards.add_argument("--samples", type=_positive_int, help="training scenes (default: the recipe's)")
    rewards.add_argument("--steps", type=_positive_int, help="training steps of each model (default: the recipe's)")
    rewards.set_defaults(run=cmd_world_rewards)
    judge = world_commands.add_parser("judge", help="train the independent judge")
    judge.add_argument("--out", required=True)
    judge.add_argument("--samples", type=_positive_int, help="training scenes (default: the recipe's)")
    judge.add_argument("--steps", type=_positive_int, help="training steps (default: the recipe's)")
    judge.set_defaults(run=cmd_world_judge)
    overoptimisation = world_commands.add_parser(
        "overoptimisation", help="direct vs latent-proxy guidance with the hackable world-aesthetic reward",
        description="Distil three students from the world teacher (LCM; world-aesthetic guidance through the "
        "decoder; the same expert through a latent proxy RM fitted online, pretrained once into the cache) and "
        "report expert reward, true colourfulness, judge accuracy, judge-FD and high-frequency energy against the "
        "teacher: OUT/report.md, results.json, grid.png. Finished students and images are reused (use another --out "
        "after changing a β), and the cached proxy is pretrained once (delete $RGLCD_CACHE/world/lrm and "
        "world/lrm-latents to redo it).",
    )  # fmt: skip
    overoptimisation.add_argument("--out", default="runs/overoptimisation")
    overoptimisation.add_argument(
        "--train-steps", type=_positive_int, default=600, help="distillation steps per student"
    )
    overoptimisation.add_argument("--direct-beta", type=_finite_float, default=1.0, help="β of direct world-aesthetic")
    overoptimisation.add_argument(
        "--latent-beta", type=_finite_float, default=1.0, help="β of the latent proxy's score"
    )
    overoptimisation.add_argument("--prompts", type=_positive_int, default=64, help="held-out evaluation prompts")
    overoptimisation.add_argument(
        "--lrm-samples", type=_positive_int, default=8_000, help="latents the proxy is pretrained on"
    )
    overoptimisation.add_argument("--lrm-steps", type=_positive_int, default=1_500, help="proxy pretraining steps")
    overoptimisation.set_defaults(run=cmd_world_overoptimisation)
    sampler_reward = world_commands.add_parser(
        "sampler-reward", help="the reward on the student's own few-step sample vs on its one-step prediction",
        description="Distil the quickstart's students with reward.target prediction (the paper) and sample (K steps "
        "of the student's own sampler from fresh noise), with world-clip and with the hackable world-aesthetic, "
        "plus a plain LCM; evaluate all at 1, 2 and 4 steps against the teacher (OUT/report.md: rewards, "
        "colourfulness, judge accuracy, judge-FD, high-frequency ratio, training ms per step), then the world-clip "
        "students with TCD sampling at several gamma (OUT/tcd/report.md). Finished students and images are reused.",
    )  # fmt: skip
    sampler_reward.add_argument("--out", default="runs/sampler-reward")
    sampler_reward.add_argument("--train-steps", type=_positive_int, default=600, help="distillation steps per student")
    sampler_reward.add_argument(
        "--sample-steps", type=_int_list, default=(2, 4), help="K of the world-clip sample-target students (2,4)"
    )
    sampler_reward.add_argument(
        "--grad-steps", type=_positive_int, default=1, help="sampling steps the gradient flows through (default: 1)"
    )
    sampler_reward.add_argument("--prompts", type=_positive_int, default=256, help="held-out evaluation prompts")
    sampler_reward.add_argument(
        "--etas", type=_unit_float_list, default=(0.0, 0.3, 0.6, 1.0), help="TCD gammas to sweep (default: 0,0.3,0.6,1)"
    )
    sampler_reward.set_defaults(run=cmd_world_sampler_reward)
    one_step = world_commands.add_parser(
        "one-step", help="distribution matching (DMD) and a GAN beside LCD and the reward, at one step",
        description="Distil LCM, RG-LCM, RG-LCM-K1 (the reward on the 1-step sample), DMD alone, LCD+DMD, "
        "LCD+DMD+GAN, LCD+DMD+GAN+reward and LCD+DMD0.3+reward-K1 with the quickstart's recipe; evaluate all at 1, "
        "2 and 4 steps against the teacher's 50-step DDIM + CFG (OUT/report.md: world-clip, judge accuracy and "
        "exact, judge-FD, training ms per step, paired 95 % intervals against RG-LCM), then repeat RG-LCM and the "
        "best two at one step over --seeds training seeds (OUT/seeds/report.md). Finished students and images are "
        "reused; an interrupted run continues.",
    )  # fmt: skip
    one_step.add_argument("--out", default="runs/one-step")
    one_step.add_argument("--train-steps", type=_positive_int, default=600, help="distillation steps per student")
    one_step.add_argument(
        "--dmd", nargs="*", type=_section_override("dmd"), metavar="dmd.FIELD=VALUE",
        help="the DMD students' overrides (default: dmd.weight=1 dmd.fake_lr=1e-4, docs/one-step.md's)",
    )  # fmt: skip
    one_step.add_argument(
        "--gan", nargs="*", type=_section_override("gan"), metavar="gan.FIELD=VALUE",
        help="the GAN students' overrides, added to --dmd's (default: gan.weight=0.01)",
    )  # fmt: skip
    one_step.add_argument("--prompts", type=_positive_int, default=256, help="held-out evaluation prompts")
    one_step.add_argument(
        "--seeds", type=_positive_int, default=3, help="training seeds of RG-LCM and the best two (default: 3)"
    )
    one_step.set_defaults(run=cmd_world_one_step)


def _add_lrm_command(commands) -> None:
    lrm = commands.add_parser("lrm", help="the latent proxy reward model (RG-LCD Alg. 4)")
    lrm_commands = lrm.add_subparsers(dest="lrm_command", required=True)
    pretrain = lrm_commands.add_parser(
        "pretrain", help="train a latent CLIP contrastively on a dataset's VAE latents and captions",
        description="Train a latent CLIP on the (latent, caption) pairs of CACHE, an `rglcd cache` folder made with "
        "the teacher you will distil (its VAE posteriors), with CLIP's contrastive loss, and save it to OUT for "
        "`rglcd train ... reward.mode=latent reward.latent.model=OUT`.",
        epilog="example:\n  rglcd cache --teacher T --data D --out latents --resolution 512 --samples 10000\n"
        "  rglcd lrm pretrain --cache latents --out lrm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    pretrain.add_argument("--cache", required=True, help="an `rglcd cache` folder: the latents and captions")
    pretrain.add_argument("--out", required=True, help="output folder")
    pretrain.add_argument(
        "--architecture", default="latent-rn50", choices=("latent-rn50", "world"),
        help="latent-rn50: the official latent ResNet-50 CLIP; world: the miniature's latent ViT",
    )  # fmt: skip
    pretrain.add_argument(
        "--samples", type=_positive_int, default=10_000, help="latents read from CACHE (default: 10000)"
    )
    pretrain.add_argument(
        "--heldout", type=_positive_int, default=512, help="of those, kept out for the retrieval check"
    )
    pretrain.add_argument("--steps", type=_positive_int, default=2_000)
    pretrain.add_argument("--batch-size", type=_positive_int, default=128)
    pretrain.add_argument("--learning-rate", type=_positive_float, default=5e-4)
    pretrain.add_argument("--seed", type=_seed, default=0)
    _add_device_argument(pretrain, " (the latents stay in RAM)")
    pretrain.set_defaults(run=cmd_lrm_pretrain)


def _add_demo_command(commands) -> None:
    demo = commands.add_parser(
        "demo", help="RG-LCD end to end on a tiny random teacher (CPU, about 30 s)",
        description="Write a tiny Stable-Diffusion-layout teacher and webdataset shards to OUT (once), run "
        "`rglcd train tiny` on them into OUT/rglcd, and sample the exported student at 1, 2 and 4 steps.",
    )  # fmt: skip
    demo.add_argument("--out", default="runs/tiny", help="folder (default: runs/tiny, the tiny preset's paths)")
    demo.add_argument("--steps", type=_positive_int, default=100, help="training steps (default: 100)")
    demo.add_argument("--prediction-type", default="epsilon", choices=("epsilon", "v_prediction", "sample"))
    demo.add_argument("--seed", type=_seed, default=0)
    demo.set_defaults(run=cmd_demo)


def main(argv: list[str] | None = None) -> None:
    """Run a command; an error the user can fix is one line on stderr and exit code 2 (``RGLCD_DEBUG=1`` shows its
    traceback, for a bug report)."""
    argv = sys.argv[1:] if argv is None else argv
    for arg in argv:
        if not arg.isascii() and not _is_utf8(arg):  # a byte that is not UTF-8 (Python keeps it as a surrogate)
            print(f"rglcd: {arg!a} is not UTF-8 text: name files and give values in UTF-8", file=sys.stderr)
            raise SystemExit(2)
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (RglcdError, OSError) as error:
        if os.environ.get("RGLCD_DEBUG"):
            raise
        print(f"rglcd {args.command}: {_one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _one_line(error: Exception) -> str:
    """The message on one line; an OSError (unwritable folder, full disk) says what it could not do to which file."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}" + (" (is the disk full?)" if error.errno == errno.ENOSPC else "")
    return " ".join(str(error).split())


if __name__ == "__main__":
    main()
