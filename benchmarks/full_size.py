"""The real architectures on this CPU, through the real commands: does rglcd run at full size, what does a step
cost, and does `rglcd plan` predict its memory?

    python benchmarks/full_size.py [--runs sd15-512-lora,sd21-768-lora,sd15-512,sdxl-1024-lora] [--resolution 256]
                                   [--work /tmp/rglcd-full-size] [--keep]

Every model has its published architecture and random weights: the teachers (SD 1.5, SD 2.1-768-v, SDXL base) are
saved as diffusers folders and loaded like hub checkpoints, HPSv2.1 (open_clip ViT-H-14) is saved in HPSv2's file
layout and ImageReward-v1.0 in ``ImageReward.pt``'s (with a stand-in vocabulary of BERT's size), so each loads
through the same code as the published weights. For each run, as a user would type them:

1. ``rglcd train PRESET ...`` for 5 steps (checkpoints at steps 2 and 4, the export): seconds per step and the
   peak resident memory of the steps (``train_summary.json``), and the whole process's peak (loading, export);
2. ``rglcd train ... --resume latest`` from checkpoint 4 to step 6, and its export;
3. ``rglcd sample`` of the export at 2 steps; the export loaded by plain ``DiffusionPipeline.from_pretrained``;
4. ``rglcd eval`` of the export on 3 prompts with ``hpsv2.1`` and ``imagereward`` at their real sizes;
5. the step's unavoidable passes, each timed alone with the run's models (student forward+backward, teacher
   forward on both halves, target forward, VAE decode forward+backward with the reward, optimizer and EMA),
   beside the trainer's own step;
6. ``rglcd plan``'s prediction for the same config on the CPU, plus this machine's process baseline (Python, torch
   and the libraries imported, measured), against the measured peak.

The CPU runs in bf16 where the presets use fp16 (CPU autocast; same bytes), at ``--resolution`` and batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
# glibc's malloc raises its mmap threshold as large blocks are freed, after which freed memory stays resident: fixed,
# it returns what torch frees to the system, so the resident set follows the live tensors as `rglcd plan` counts them.
CHILD_ENVIRONMENT = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "HF_HUB_OFFLINE": "1"}
RUNS = {  # name: (preset, architecture, reward, overrides beyond the common ones)
    "sd15-512-lora": ("sd15-512-lora", "SD15", "hpsv2.1", ["lora.fuse_on_export=true"]),
    "sd21-768-lora": ("sd21-768", "SD21", "hpsv2.1", ["lora.rank=64", "lora.fuse_on_export=true"]),
    # The whole student beside its AdamW states and EMA target: with HPSv2.1 (3.7 GiB in float32) `rglcd plan`
    # puts it above this machine's 24 GiB, so this run takes ImageReward (1.7 GiB), RG-LCD's other expert.
    "sd15-512": ("sd15-512", "SD15", "imagereward", []),
    "sdxl-1024-lora": ("sdxl-1024", "SDXL", "hpsv2.1", ["lora.rank=64", "lora.fuse_on_export=true"]),
}
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red sports car in the rain",
    "a bowl of fruit, oil painting",
]


# ------------------------------------------------------------------------------------------------ assets


def make_assets(work: Path, architectures: set[str], resolution: int) -> dict:
    """Teachers, reward weights and data, written once into ``work``."""
    import torch

    from rglcd import architectures as published
    from rglcd.data import write_shards
    from rglcd.experiments.demo import colour_samples
    from rglcd.rewards.clip import HPSv2
    from rglcd.rewards.imagereward import ImageReward

    assets = {"teachers": {}}
    for name in sorted(architectures):
        folder = work / "teachers" / name
        if not (folder / "model_index.json").is_file():
            started = time.perf_counter()
            published.save_random_pipeline(getattr(published, name), folder)
            print(f"saved a random {name} teacher in {time.perf_counter() - started:.0f} s", flush=True)
        assets["teachers"][name] = folder
    hps = work / "rewards" / "HPS_v2.1_compressed.pt"
    if not hps.is_file():
        hps.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": HPSv2(random_weights=True).clip.state_dict()}, hps)
    image_reward = work / "rewards" / "imagereward"
    if not (image_reward / "ImageReward.pt").is_file():
        image_reward.mkdir(parents=True, exist_ok=True)
        model = ImageReward(random_weights=True)
        torch.save(model.state_dict(), image_reward / "ImageReward.pt")
        vocabulary = sorted(model.tokenizer.vocab, key=model.tokenizer.vocab.get)[: model.config.vocab_size - 2]
        (image_reward / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    data = work / f"data-{resolution}"
    if not any(data.glob("*.tar")):
        write_shards(colour_samples(32, resolution, seed=0), data, samples_per_shard=16)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assets.update(hps=hps, image_reward=image_reward, data=data, prompts=prompts)
    return assets


def overrides(run: str, assets: dict, out: Path, resolution: int, steps: int) -> list[str]:
    _, architecture, reward, extra = RUNS[run]
    weights = {"checkpoint": str(assets["hps"])}
    if reward == "imagereward":
        weights = {"checkpoint": str(assets["image_reward"]), "tokenizer": str(assets["image_reward"])}
    terms = json.dumps([{"name": reward, "beta": 1.0, "kwargs": weights}])
    return [
        f"model.teacher={assets['teachers'][architecture]}", f"data.source={assets['data']}",
        f"data.resolution={resolution}", "data.shuffle_buffer=0", f"reward.terms={terms}", "reward.decode_batch_size=0",
        "optim.batch_size=1", "optim.gradient_accumulation_steps=1", "optim.lr_warmup_steps=0",
        f"optim.max_train_steps={steps}", "precision.mixed_precision=bf16", "precision.teacher_dtype=bf16",
        "logging.validation_steps=0", "logging.tracker=none", "logging.checkpointing_steps=2",
        "logging.checkpoints_total_limit=1",  # a whole SD 1.5 student's checkpoint is 13 GB
        f"logging.output_dir={out}", *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------- measuring


def run_command(arguments: list[str], log: Path) -> tuple[float, float]:
    """Run a command to its end, its output to ``log``: (seconds, peak resident memory in bytes)."""
    started = time.perf_counter()
    with log.open("a") as output:
        output.write(f"$ {' '.join(arguments)}\n")
        output.flush()
        process = subprocess.Popen(arguments, stdout=output, stderr=subprocess.STDOUT, env=CHILD_ENVIRONMENT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(arguments)}; see {log}")
    return time.perf_counter() - started, usage.ru_maxrss * 1024  # Linux reports KiB


def process_baseline() -> int:
    """Resident memory of a Python process that imported what `rglcd train` imports, before any model."""
    code = (
        "import torch, diffusers, transformers, open_clip, accelerate, peft, rglcd.train, rglcd.rewards;"
        "print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmRSS')))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=CHILD_ENVIRONMENT
    )
    return int(run.stdout)


def time_parts(run: str, assets: dict, resolution: int, iterations: int) -> dict:
    """The step's unavoidable passes, each timed alone, beside the trainer's iteration, with the run's models."""
    import torch
    from step_breakdown import timed  # median milliseconds after a warm-up (this script's folder is on the path)

    from rglcd.config import load_config
    from rglcd.data import TrainStream
    from rglcd.models import decode_latents, load_teacher, text_conditioning, update_ema
    from rglcd.schedules import guidance_scale_embedding
    from rglcd.step import StepNoise, consistency_function, teacher_ddim_cfg_step
    from rglcd.train.build import (
        build_distillation,
        build_expert,
        build_networks,
        build_optimizer,
        build_student_reward,
        ema_pairs,
        float_conditions,
        prepare_batch,
    )
    from rglcd.train.forward import StepParts, training_forward

    config = load_config(RUNS[run][0], overrides(run, assets, Path("/tmp/unused"), resolution, 1))
    cpu = torch.device("cpu")
    expert = build_expert(config)
    teacher = load_teacher(config.model.teacher)
    networks = build_networks(config, teacher, cpu)
    student = networks.student
    distillation = build_distillation(config, teacher, student)
    trained = [param for param in student.parameters() if param.requires_grad]
    optimizer = build_optimizer(config, trained)
    ema_target, ema_online = ema_pairs(student, networks.target)
    stream = TrainStream(str(assets["data"]), resolution=resolution, batch_size=1, shuffle_buffer=0)
    batch = next(iter(stream))
    generator = torch.Generator().manual_seed(0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        uncond, uncond_added = text_conditioning(teacher, [""], resolution)
    uncond, uncond_added = uncond.float(), float_conditions(uncond_added)

    latents, cond, added = prepare_batch(batch, teacher, generator, resolution)
    cond, added = cond.float(), float_conditions(added)
    noise = StepNoise.draw(latents, distillation, generator)
    grid = distillation.grid
    start = grid[noise.indices]
    z_start = distillation.schedule.add_noise(latents, noise.noise, start)
    w_embedding = None
    if distillation.time_cond_proj_dim:
        w_embedding = guidance_scale_embedding(noise.guidance, distillation.time_cond_proj_dim)

    def encode_batch():
        prepare_batch(batch, teacher, generator, resolution)

    def student_forward_backward():
        with autocast:
            prediction = consistency_function(student, z_start, start, w_embedding, cond, distillation, added)
        prediction.float().square().mean().backward()
        optimizer.zero_grad(set_to_none=True)

    def teacher_both_halves():
        with autocast:
            teacher_ddim_cfg_step(
                networks.teacher_unet, z_start, noise.indices, noise.guidance, cond, uncond, distillation, added,
                uncond_added,
            )  # fmt: skip

    def target_forward():
        with torch.no_grad(), autocast:
            consistency_function(networks.target, z_start, start, w_embedding, cond, distillation, added)

    def decode_and_reward_forward_backward():
        prediction = latents.clone().requires_grad_(True)
        with autocast:
            reward = expert(decode_latents(teacher.vae, prediction), batch["captions"])
        (-reward.mean()).backward()

    def optimizer_and_ema():
        for param in trained:
            param.grad = torch.zeros_like(param)
        torch.nn.utils.clip_grad_norm_(trained, config.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema_target, ema_online, config.distill.ema_decay)

    reward = build_student_reward(config, expert, None, teacher.vae, distillation)
    step_parts = StepParts(
        teacher, networks, distillation, reward, (uncond, uncond_added), None, resolution, config.distill.lcd_weight
    )

    def whole_step():  # the trainer's iteration: rglcd.train's forward, backward, clipping, AdamW, EMA
        output = training_forward(step_parts, batch, generator, step=0, autocast=autocast).output
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, config.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema_target, ema_online, config.distill.ema_decay)

    passes = {
        "student forward+backward": student_forward_backward,
        "teacher forward (cond + uncond)": teacher_both_halves,
        "target forward": target_forward,
        "VAE decode + reward, forward+backward": decode_and_reward_forward_backward,
        "optimizer, clipping, EMA": optimizer_and_ema,
    }
    seconds = {name: timed(function, iterations) / 1000 for name, function in passes.items()}
    seconds["encode the batch (VAE encoder, text encoders)"] = timed(encode_batch, iterations) / 1000
    seconds["whole step (the trainer's iteration)"] = timed(whole_step, iterations) / 1000
    return seconds


def planned(run: str, assets: dict, resolution: int) -> int:
    from rglcd.config import load_config
    from rglcd.plan import make_plan

    config = load_config(RUNS[run][0], overrides(run, assets, Path("/tmp/unused"), resolution, 3))
    return int(make_plan(config, device="cpu").total)


# --------------------------------------------------------------------------------------------------- main


def benchmark(run: str, assets: dict, work: Path, resolution: int, iterations: int) -> dict:
    out = work / "runs" / run
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out.parent / f"{run}.log"
    log.unlink(missing_ok=True)
    rglcd = [sys.executable, "-m", "rglcd"]
    preset = RUNS[run][0]
    result = {"run": run, "preset": preset, "reward": RUNS[run][2], "resolution": resolution}

    seconds, peak = run_command([*rglcd, "train", preset, *overrides(run, assets, out, resolution, 5)], log)
    summary = json.loads((out / "train_summary.json").read_text())
    steps_peak = summary["peak_memory_bytes"]["resident_high_water_mark"]
    result.update(train_seconds=seconds, process_peak_bytes=peak, peak_bytes=steps_peak)
    result.update(step_seconds=summary["step_seconds"])
    assert (out / "checkpoints" / "checkpoint-4").is_dir(), "no checkpoint at step 4"
    shutil.rmtree(out / "student")  # the resumed run must write its own export
    seconds, resumed_peak = run_command(
        [*rglcd, "train", preset, *overrides(run, assets, out, resolution, 6), "--resume", "latest"], log
    )
    resumed = json.loads((out / "train_summary.json").read_text())
    assert resumed["global_step"] == 6 and resumed["step_seconds"]["steps"] == 2, resumed
    result.update(resume_seconds=seconds, resume_peak_bytes=resumed_peak)
    export = out / "student"

    seconds, _ = run_command(
        [*rglcd, "sample", "--model", str(export), "--prompt", PROMPTS[0], "--steps", "2",
         "--resolution", str(resolution), "--device", "cpu", "--out", str(out / "samples")], log,
    )  # fmt: skip
    assert (out / "samples" / "000-00.png").is_file()
    result["sample_seconds"] = seconds
    plain = (
        "from diffusers import DiffusionPipeline; import sys;"
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1]);"
        "image = pipe(sys.argv[2], num_inference_steps=2, guidance_scale=6.0, height=int(sys.argv[3]),"
        " width=int(sys.argv[3])).images[0]; image.save(sys.argv[4]); print(type(pipe).__name__, image.size)"
    )
    run_command([sys.executable, "-c", plain, str(export), PROMPTS[1], str(resolution), str(out / "plain.png")], log)
    reward_kwargs = json.dumps({
        "hpsv2.1": {"checkpoint": str(assets["hps"])},
        "imagereward": {"checkpoint": str(assets["image_reward"]), "tokenizer": str(assets["image_reward"])},
    })  # fmt: skip
    seconds, _ = run_command(
        [*rglcd, "eval", "--model", f"{run}={export}", "--prompts", str(assets["prompts"]), "--steps", "2",
         "--metrics", "hpsv2.1,imagereward", "--reward-kwargs", reward_kwargs, "--resolution", str(resolution),
         "--batch-size", "1", "--out", str(out / "eval")], log,
    )  # fmt: skip
    result["eval_seconds"] = seconds
    result["eval"] = json.loads((out / "eval" / "results.json").read_text())["rows"]

    parts = subprocess.run(
        [sys.executable, __file__, "--time-parts", run, "--work", str(work), "--resolution", str(resolution),
         "--iterations", str(iterations)], capture_output=True, text=True, env=CHILD_ENVIRONMENT,
    )  # fmt: skip
    if parts.returncode != 0:
        raise SystemExit(f"timing the parts of {run} failed:\n{parts.stderr[-3000:]}")
    result["parts"] = json.loads(parts.stdout.strip().splitlines()[-1])
    planned = subprocess.run(
        [sys.executable, __file__, "--plan-only", run, "--work", str(work), "--resolution", str(resolution)],
        capture_output=True, text=True, env=CHILD_ENVIRONMENT,
    )  # fmt: skip
    if planned.returncode != 0:
        raise SystemExit(f"rglcd plan of {run} failed:\n{planned.stderr[-3000:]}")
    result["planned_bytes"] = int(planned.stdout.strip().splitlines()[-1])
    for bulky in ("checkpoints", "student", "target_unet", "lora", "target_lora"):  # tens of GB at full size
        shutil.rmtree(out / bulky, ignore_errors=True)
    return result


def report(results: list[dict], baseline: int) -> str:
    lines = [
        f"process baseline (Python + torch + libraries, no model): {baseline / GIB:.2f} GiB",
        "",
        "| run | reward | s/step (trainer) | first step s | steps' peak GiB | plan + baseline GiB | plan error | "
        "process peak GiB | whole step / passes | resume | sample 2 steps s | eval s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in results:
        parts = r["parts"]
        passes = sum(seconds for name, seconds in parts.items() if not name.startswith(("whole", "encode")))
        predicted = r["planned_bytes"] + baseline
        error = (predicted - r["peak_bytes"]) / r["peak_bytes"]
        lines.append(
            f"| {r['run']} | {r['reward']} | {r['step_seconds']['median_after_first']:.1f} | "
            f"{r['step_seconds']['first']:.1f} | "
            f"{r['peak_bytes'] / GIB:.2f} | {predicted / GIB:.2f} | {error:+.0%} | "
            f"{r['process_peak_bytes'] / GIB:.2f} | "
            f"{parts['whole step (the trainer' + chr(39) + 's iteration)'] / passes:.2f} | ok | "
            f"{r['sample_seconds']:.0f} | {r['eval_seconds']:.0f} |"
        )
    for r in results:
        parts = r["parts"]
        whole = parts["whole step (the trainer's iteration)"]
        title = f"{r['run']} ({r['reward']}): the step's parts, each timed alone (median of the iterations)"
        lines += ["", title, ""]
        lines += [f"  {name:<48} {seconds:>7.2f} s  {seconds / whole:>5.0%}" for name, seconds in parts.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=2, help="timed repetitions of each part")
    parser.add_argument("--work", default="/tmp/rglcd-full-size", help="teachers, weights, data and runs")
    parser.add_argument("--keep", action="store_true", help="keep --work (teachers and weights: 27 GB) for another run")
    parser.add_argument("--time-parts", metavar="RUN", help=argparse.SUPPRESS)  # the benchmark's own sub-processes
    parser.add_argument("--plan-only", metavar="RUN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    single = args.time_parts or args.plan_only
    runs = [single] if single else [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    assets = make_assets(work, {RUNS[name][1] for name in runs}, args.resolution)
    if args.time_parts:  # a fresh process per run, so the parts are timed with only that run's models in memory
        print(json.dumps(time_parts(args.time_parts, assets, args.resolution, args.iterations)))
        return
    if args.plan_only:
        print(planned(args.plan_only, assets, args.resolution))
        return
    baseline = process_baseline()
    results = []
    try:
        for name in runs:
            started = time.perf_counter()
            results.append(benchmark(name, assets, work, args.resolution, args.iterations))
            print(f"{name}: done in {time.perf_counter() - started:.0f} s", flush=True)
            (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
        print(report(results, baseline))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
