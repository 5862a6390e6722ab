"""The prepared GPU check: what rglcd does on one GPU, measured by one command in about 7 minutes, with no downloads.

    python benchmarks/gpu_check.py --out DIR [--device cuda] [--budget 420] [--runs ...] [--variants ...]
    python benchmarks/gpu_check.py --out DIR --device cpu --tiny        # the CPU rehearsal (tests/test_gpu_check.py)

The teachers have the published architectures of SD 1.5, SD 2.1-768-v and SDXL base with random weights
(``rglcd.architectures.save_random_pipeline``), written as diffusers folders in float16 and loaded like hub
checkpoints; HPSv2.1 is its ViT-H-14 with random weights (the reward's ``random_weights``). In order, each section
guarded, so that a failure is one line of the report and the rest still runs:

1. environment: versions, the GPU, whether ``rglcd sample``/``eval`` take ``--dtype``;
2. data (colour pictures as webdataset shards) and the three teachers;
3. for ``sd15-512-lora``, ``sd15-512`` (whole student), ``sd21-768-lora`` and ``sdxl-1024-lora``, all with HPSv2.1:
   ``rglcd plan``'s prediction for ``H100-80GB`` (its Python API; the preset's batch, or the switches that make it
   fit), then ``rglcd train`` for a few steps at that batch, in a process of its own: median s/step, the first
   step's extra seconds, peak allocated and reserved memory (``train_summary.json``), each against the plan's
   prediction, and the utilisation (the plan's FLOPs / s per step / the chip's dense bf16 peak, ``rglcd.gpus``);
4. sampling images/s of the whole SD 1.5 student at 1, 2 and 4 steps and of its teacher's 50-step DDIM + CFG
   (``lcm_sample`` / ``ddim_cfg_sample``, synchronised clocks, a warm-up batch first), ``rglcd sample`` once, and
   ``rglcd eval`` with HPSv2.1 (its throughput);
5. the runs again with ``precision.compile``, ``channels_last`` and ``allow_tf32`` (the first step then holds the
   compilation).

A section starts only while the time budget (``--budget``, seconds) lasts; the rest are listed as skipped, and a
second command can run them (``--runs``/``--variants``). ``DIR/results.json`` and ``DIR/report.md`` are rewritten
after every section, so a killed run keeps what it measured; ``DIR/log.txt`` holds the commands' output.

``--tiny`` swaps the teachers for ``rglcd.tiny``'s pipelines and HPSv2.1's ViT-H-14 for a one-block 64-px ViT (an
open_clip model folder, built with random weights the same way), at 32 px, batch 2 and 2 steps: the same sections and
files, in about a minute on a CPU (tests/test_gpu_check.py). On the CPU the compiled variant runs with
``TORCH_COMPILE_DISABLE=1`` (inductor would take minutes there): channels-last, TF32 and the compile switch run, the
compilation does not. See docs/gpu.md for the wheels the GPU machine needs and the one-line command there.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, redirect_stderr
from functools import partial
from pathlib import Path

from full_size import CHILD_ENVIRONMENT, PROMPTS, RUNS  # the runs, prompts and child environment of the CPU benchmark

REPOSITORY = Path(__file__).resolve().parents[1]
GIB = 2**30
PLAN_GPU = "H100-80GB"  # rglcd.gpus' row: the memory the plan is fitted to, the dense bf16 peak of the utilisation
VARIANTS = {
    "plain": [],
    "compiled": ["precision.compile=true", "precision.channels_last=true", "precision.allow_tf32=true"],
}
SAMPLED_RUN = "sd15-512"  # its export, a whole student, is an LCM pipeline folder: sampled and evaluated as it is
SAMPLED_STEPS = (1, 2, 4)
TINY_TEACHERS = {"SD15": {}, "SD21": {"prediction_type": "v_prediction"}, "SDXL": {"sdxl": True}}  # save_tiny_pipeline
LEAST_SECONDS = 30  # a section starts only with this much of the budget left
VERSIONS_SHOWN = ("python", "torch", "cuda", "diffusers", "transformers")  # in the report's second line


@dataclasses.dataclass(frozen=True)
class Scale:
    """What the CPU rehearsal changes: sizes and counts, never the code path."""

    train_steps: int  # the first holds the warm-up (and the compilation); the median is of the others
    batch_size: int | None  # None: the preset's, or what the plan fits
    resolution: int | None  # None: the preset's
    sample_batch: int
    sample_repeats: int  # timed batches after the warm-up
    eval_prompts: int


FULL = Scale(train_steps=5, batch_size=None, resolution=None, sample_batch=8, sample_repeats=2, eval_prompts=16)
TINY = Scale(train_steps=2, batch_size=2, resolution=32, sample_batch=2, sample_repeats=1, eval_prompts=4)
# The rehearsal's HPSv2.1 architecture: a 64-px ViT of one block per tower, as an open_clip model folder (a name that
# open_clip builds with random weights, as it builds ViT-H-14, so `random_weights` works for it everywhere).
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


class SectionError(RuntimeError):
    """A section that cannot run or whose command failed; the message is the report's line."""


# ------------------------------------------------------------------------------------------------------- report


class Report:
    """The sections' results, written as JSON and Markdown after every section."""

    def __init__(self, out: Path, context: dict, budget: float) -> None:
        self.out, self.context, self.budget = out, context, budget
        self.started = time.perf_counter()
        self.sections: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)

    def seconds_left(self) -> float:
        return self.budget - (time.perf_counter() - self.started)

    def section(self, name: str, measure: Callable[[], dict], skip: str = "") -> dict | None:
        """Run ``measure`` unless ``skip`` says why not or the budget is spent; its figures, or None when it failed
        or was skipped."""
        entry: dict = {"name": name}
        if self.seconds_left() < LEAST_SECONDS:
            skip = f"the {self.budget:.0f} s budget (--budget) was spent"
        if skip:
            entry.update(status="skipped", reason=skip)
        else:
            print(f"[gpu_check] {name} ...", flush=True)
            started = time.perf_counter()
            try:
                entry.update(status="ok", figures=measure())
            except (Exception, SystemExit) as error:  # SystemExit: the rglcd CLI's exit on a one-line error
                entry.update(status="error", error=f"{type(error).__name__}: {one_line(error)}")
            entry["seconds"] = round(time.perf_counter() - started, 2)
            print(f"[gpu_check] {name}: {entry.get('error', 'ok')} ({entry['seconds']:.0f} s)", flush=True)
        self.sections.append(entry)
        self.write()
        return entry.get("figures")

    def write(self) -> None:
        results = {**self.context, "seconds": round(time.perf_counter() - self.started, 1), "sections": self.sections}
        (self.out / "results.json").write_text(json.dumps(results, indent=2))
        (self.out / "report.md").write_text(markdown(results))


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:400] or "(no message)"


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# ------------------------------------------------------------------------------------------------- the check


class Check:
    """The sections, in the order they run, and what they hand on to one another."""

    def __init__(self, args: argparse.Namespace, report: Report) -> None:
        import torch

        self.args, self.report = args, report
        self.scale = TINY if args.tiny else FULL
        self.device = torch.device(args.device)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="rglcd-gpu-check-"))
        self.log = report.out / "log.txt"
        self.teachers: dict[str, Path] = {}
        self.data: dict[int, Path] = {}
        self.prompts = self.work / "prompts.txt"
        self.tiny_clip = self.work / "tiny-clip"  # the rehearsal's reward architecture (TINY_CLIP)
        self.plans: dict[str, Future] = {}
        self.planned: dict[str, dict | None] = {}
        self.sampled: Path | None = None  # the whole SD 1.5 student's export
        self.planner = ThreadPoolExecutor(max_workers=1)  # plans while the GPU trains: CPU work, fake tensors only

    # --------------------------------------------------------------------------------------------- sections

    def run(self) -> None:
        runs, variants = self.args.runs, self.args.variants
        self.report.section("environment", self.environment)
        self.report.section("data", self.write_data)
        for architecture in dict.fromkeys(RUNS[run][1] for run in runs):
            self.report.section(f"teacher {architecture}", lambda a=architecture: self.save_teacher(a))
        for run in runs:  # queued once every teacher is written: the teachers are built in float16 (a global default)
            self.plans[run] = self.planner.submit(self.plan, run)
        for run in runs if "plain" in variants else ():
            self.train_section(run, "plain")
        # The plans' tracing swaps autocast kernels process-wide (rglcd.plan.cuda_autocast_rules): done before the
        # sections that run models in this process.
        wait(self.plans.values())
        unsampled = "" if SAMPLED_RUN in runs and "plain" in variants else f"needs 'train {SAMPLED_RUN} plain'"
        self.report.section("sampling", self.sampling, skip=unsampled)
        self.report.section("rglcd sample", self.sample_command, skip=unsampled)
        self.report.section("rglcd eval", self.eval_command, skip=unsampled)
        self.remove(self.sampled)
        for run in runs if "compiled" in variants else ():
            self.train_section(run, "compiled")
        self.planner.shutdown(cancel_futures=True)

    def environment(self) -> dict:
        import torch

        from rglcd.gpus import GPUS

        figures = {"python": platform.python_version(), "device": str(self.device), "tiny": self.args.tiny}
        for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "open_clip_torch", "huggingface_hub",
                     "safetensors", "timm", "torchmetrics", "webdataset"):  # fmt: skip
            figures[name] = importlib.metadata.version(name)
        if self.device.type == "cuda":
            properties = torch.cuda.get_device_properties(self.device)
            figures.update(gpu=properties.name, gpu_memory_bytes=properties.total_memory, cuda=torch.version.cuda)
        figures["plan_gpu"] = PLAN_GPU
        figures["plan_gpu_dense_bf16_tflops"] = GPUS[PLAN_GPU].tflops
        figures["plan_utilization_default"] = plan_default_utilization()
        figures["dtype_option"] = {command: "dtype" in cli_options(command) for command in ("sample", "eval")}
        return figures

    def write_data(self) -> dict:
        from rglcd.data import write_shards
        from rglcd.experiments.demo import colour_samples

        for run in self.args.runs:
            resolution = self.resolution(run)
            if resolution not in self.data:
                self.data[resolution] = self.work / f"data-{resolution}"
                write_shards(colour_samples(32, resolution, seed=0), self.data[resolution], samples_per_shard=16)
        count = self.scale.eval_prompts
        self.prompts.write_text("\n".join((PROMPTS * count)[:count]) + "\n")
        if self.args.tiny:
            self.tiny_clip.mkdir(parents=True, exist_ok=True)
            (self.tiny_clip / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
        return {"resolutions": sorted(self.data)}

    def save_teacher(self, architecture: str) -> dict:
        """The architecture with random weights, saved in float16 (half the disk; loading casts as it would the
        published float32 checkpoint's)."""
        folder = self.work / "teachers" / architecture
        with half_precision_on(self.device):
            if self.args.tiny:
                from rglcd.tiny import save_tiny_pipeline

                save_tiny_pipeline(folder, **TINY_TEACHERS[architecture])
            else:
                from rglcd import architectures

                architectures.save_random_pipeline(getattr(architectures, architecture), folder)
        self.teachers[architecture] = folder
        release_memory()
        return {"bytes_on_disk": sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())}

    def plan(self, run: str) -> dict:
        """``rglcd plan``'s prediction for the run on ``PLAN_GPU``: at the preset's batch, or after the switches that
        make it fit (the batch the train sections use)."""
        from rglcd.config import load_config
        from rglcd.gpus import GPUS
        from rglcd.plan import fit_switches, make_plan, seconds_per_step

        started = time.perf_counter()
        gpu = GPUS[PLAN_GPU]
        # Planned for the GPU also in the CPU rehearsal: the same code path (CUDA's autocast rules on fake tensors).
        plan = make_plan(load_config(RUNS[run][0], self.overrides(run)), device="cuda")
        switches = fit_switches(plan, gpu.memory_gib * GIB)
        chosen = switches[-1][1] if switches else plan
        utilization = plan_default_utilization()
        return {
            "batch_size": chosen.config.optim.batch_size,
            "gradient_accumulation_steps": chosen.config.optim.gradient_accumulation_steps,
            "planned_bytes": chosen.total,
            "fits": chosen.total <= gpu.memory_gib * GIB,
            "flops_per_step": chosen.flops,
            "planned_seconds_per_step": seconds_per_step(chosen, gpu, utilization),
            "switches": [switch.label for switch, _ in switches],
            "overrides": [f"{name}={json.dumps(value)}" for switch, _ in switches for name, value in switch.overrides],
            "seconds_to_plan": round(time.perf_counter() - started, 1),
        }

    def train_section(self, run: str, variant: str) -> None:
        if run not in self.planned:  # the plan's section comes before the run's first training
            self.planned[run] = self.report.section(f"plan {run}", self.plans[run].result)
        self.report.section(f"train {run} {variant}", lambda: self.train(run, variant))

    def train(self, run: str, variant: str) -> dict:
        """``rglcd train`` in a process of its own (its own peak memory and compilation), read back from its
        ``train_summary.json``."""
        from rglcd.gpus import GPUS

        plan = self.planned[run]
        architecture = RUNS[run][1]
        if architecture not in self.teachers:
            raise SectionError(f"no {architecture} teacher (its section failed)")
        out = self.work / "runs" / f"{run}-{variant}"
        shutil.rmtree(out, ignore_errors=True)
        arguments = [
            sys.executable, "-m", "rglcd", "train", RUNS[run][0], *self.overrides(run), f"logging.output_dir={out}",
            *(plan["overrides"] if plan else []), *VARIANTS[variant],
        ]  # fmt: skip
        environment = {}
        if variant == "compiled" and self.device.type == "cpu":
            environment["TORCH_COMPILE_DISABLE"] = "1"  # inductor takes minutes on a CPU; see the module docstring
        seconds = self.child(arguments, environment)
        summary = json.loads((out / "train_summary.json").read_text())
        steps, peak = summary["step_seconds"], summary["peak_memory_bytes"]
        median, first = steps["median_after_first"], steps["first"]
        peak_bytes = peak.get("max_allocated", peak.get("resident_high_water_mark"))
        reserved = next((value for key, value in peak.items() if "reserved" in key), None)
        figures = {
            "steps": steps["steps"],
            "median_step_seconds": median,
            "first_step_seconds": first,
            "first_minus_median_seconds": first - median,
            "peak_bytes": peak_bytes,
            "peak_measure": "max_allocated" if "max_allocated" in peak else "resident_high_water_mark",
            "process_seconds": seconds,
        }
        if reserved is not None:
            figures["peak_reserved_bytes"] = reserved
        if plan:
            figures.update(
                batch_size=plan["batch_size"],
                gradient_accumulation_steps=plan["gradient_accumulation_steps"],
                planned_bytes=plan["planned_bytes"],
                measured_over_planned_bytes=peak_bytes / plan["planned_bytes"],
                planned_seconds_per_step=plan["planned_seconds_per_step"],
                measured_over_planned_seconds=median / plan["planned_seconds_per_step"],
                utilization=plan["flops_per_step"] / median / (GPUS[PLAN_GPU].tflops * 1e12),
            )
            if reserved is not None:
                figures["reserved_over_planned_bytes"] = reserved / plan["planned_bytes"]
        if (run, variant) == (SAMPLED_RUN, "plain"):
            self.sampled = out / "student"
            self.remove(out / "target_unet")
        else:
            self.remove(out)
        return figures

    def sampling(self) -> dict:
        """Images per second of the student at 1, 2 and 4 steps and of the teacher's DDIM + CFG, in the dtype that
        ``rglcd sample`` and ``eval`` default to."""
        from rglcd.models.speed import sampling_dtype
        from rglcd.sampling import TEACHER_STEPS

        dtype = sampling_dtype(None, self.device)
        prompts = (PROMPTS * self.scale.sample_batch)[: self.scale.sample_batch]
        figures = {"dtype": str(dtype).removeprefix("torch."), "batch": len(prompts)}
        figures.update(self.student_rates(dtype, prompts))
        release_memory()
        teacher_rate = self.teacher_rate(dtype, prompts)
        release_memory()
        figures.update(teacher_steps=TEACHER_STEPS, teacher_ddim_cfg_images_per_second=teacher_rate)
        for steps in SAMPLED_STEPS:
            speedup = figures[f"student_{steps}_steps_images_per_second"] / teacher_rate
            figures[f"student_{steps}_steps_speedup"] = speedup
        return figures

    def student_rates(self, dtype, prompts: list[str]) -> dict:
        from rglcd.export import load_lcm
        from rglcd.models import place
        from rglcd.sampling import lcm_sample

        student = load_lcm(self.exported())
        place(student, self.device, dtype)  # as rglcd sample places it (an SDXL VAE stays float32)
        sample = partial(lcm_sample, student.unet, student.vae, student, student.scheduler, prompts)
        return {
            f"student_{steps}_steps_images_per_second": self.images_per_second(partial(sample, num_steps=steps))
            for steps in SAMPLED_STEPS
        }

    def teacher_rate(self, dtype, prompts: list[str]) -> float:
        from rglcd.models import load_teacher, place
        from rglcd.sampling import TEACHER_GUIDANCE, TEACHER_STEPS, ddim_cfg_sample, ddim_scheduler

        teacher = load_teacher(self.teachers["SD15"])
        place(teacher, self.device, dtype)
        return self.images_per_second(
            partial(
                ddim_cfg_sample, teacher.unet, teacher.vae, teacher, ddim_scheduler(teacher.scheduler_config), prompts,
                num_steps=TEACHER_STEPS, guidance_scale=TEACHER_GUIDANCE,
            )
        )  # fmt: skip

    def images_per_second(self, sample: Callable[[], object]) -> float:
        """Images per second of ``sample()``, a batch of ``sample_batch``, after a warm-up call (cuDNN's autotuning,
        the allocator's first requests), with the device's queue drained before each clock read."""
        from rglcd.models.speed import synchronize

        sample()
        synchronize(self.device)
        started = time.perf_counter()
        for _ in range(self.scale.sample_repeats):
            sample()
        synchronize(self.device)
        return self.scale.sample_repeats * self.scale.sample_batch / (time.perf_counter() - started)

    def sample_command(self) -> dict:
        """``rglcd sample`` of the student, as a user types it (with ``--dtype`` where it exists)."""
        out = self.work / "samples"
        count = self.scale.sample_batch
        arguments = [
            "sample", "--model", str(self.exported()), "--prompt", PROMPTS[0], "--steps", "4", "--num-images",
            str(count), "--batch-size", str(count), "--device", str(self.device), "--out", str(out),
        ]  # fmt: skip
        seconds = self.in_process(arguments + self.dtype_arguments("sample"))
        written = len(list(out.glob("*.png")))
        if written != count:
            raise SectionError(f"rglcd sample wrote {written} images, not {count}")
        return {"seconds": seconds, "images": written, "dtype_option": bool(self.dtype_arguments("sample"))}

    def eval_command(self) -> dict:
        """``rglcd eval`` of the student at 4 steps with HPSv2.1: its throughput (loading, generation, scoring)."""
        out = self.work / "eval"
        arguments = [
            "eval", "--model", f"student={self.exported()}", "--prompts", str(self.prompts), "--steps", "4",
            "--metrics", "hpsv2.1", "--reward-kwargs", json.dumps({"hpsv2.1": self.reward_kwargs()}),
            "--batch-size", str(self.scale.sample_batch), "--out", str(out),
        ]  # fmt: skip
        if "device" in cli_options("eval"):
            arguments += ["--device", str(self.device)]
        seconds = self.in_process(arguments + self.dtype_arguments("eval"))
        [row] = json.loads((out / "results.json").read_text())["rows"]
        images = self.scale.eval_prompts
        return {
            "seconds": seconds,
            "images": images,
            "images_per_second": images / seconds,
            "generation_images_per_second": row["images_per_second"],
            "hpsv2.1": row["hpsv2.1"],
            "dtype_option": bool(self.dtype_arguments("eval")),
        }

    # ---------------------------------------------------------------------------------------------- helpers

    def resolution(self, run: str) -> int:
        from rglcd.config import load_config

        return self.scale.resolution or load_config(RUNS[run][0], []).data.resolution

    def overrides(self, run: str) -> list[str]:
        """The run's overrides of its preset: this check's teacher, data, reward and length; HPSv2.1 for all."""
        _, architecture, _, extra = RUNS[run]
        terms = [{"name": "hpsv2.1", "beta": 1.0, "kwargs": self.reward_kwargs()}]
        overrides = [
            f"model.teacher={self.work / 'teachers' / architecture}", f"data.source={self.data[self.resolution(run)]}",
            f"data.resolution={self.resolution(run)}", "data.shuffle_buffer=0", f"reward.terms={json.dumps(terms)}",
            f"optim.max_train_steps={self.scale.train_steps}", "optim.lr_warmup_steps=0", "logging.tracker=none",
            "logging.validation_steps=0", f"logging.checkpointing_steps={10 * self.scale.train_steps}",
            # Fusing reloads the teacher after the run: seconds this check spends on measuring instead.
            *(term for term in extra if not term.startswith("lora.fuse_on_export")),
        ]  # fmt: skip
        if self.scale.batch_size:
            overrides.append(f"optim.batch_size={self.scale.batch_size}")
        if self.device.type == "cpu":  # CPU autocast has no float16: bfloat16, the same bytes (as full_size.py)
            overrides += ["precision.mixed_precision=bf16", "precision.teacher_dtype=bf16"]
        return overrides

    def reward_kwargs(self) -> dict:
        """HPSv2.1's: its ViT-H-14 with random weights; in the rehearsal, the tiny architecture's folder."""
        if self.args.tiny:
            return {"random_weights": True, "model": f"local-dir:{self.tiny_clip}"}
        return {"random_weights": True}

    def child(self, arguments: list[str], environment: dict) -> float:
        """Run a command to its end within the budget, its output appended to the log: its seconds. A failure
        raises with the command's last error line."""
        environment = {
            **CHILD_ENVIRONMENT, "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **environment,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY / "src"), os.environ.get("PYTHONPATH")])),
        }  # fmt: skip
        if self.device.type == "cpu":
            environment["CUDA_VISIBLE_DEVICES"] = ""
        timeout = max(self.report.seconds_left(), 1.0)
        with self.log.open("a") as log:
            log.write(f"\n$ {shlex.join(arguments)}\n")
            log.flush()
            start = log.tell()
            started = time.perf_counter()
            # A session of its own: on a timeout the whole group goes (torch.compile's worker processes too).
            process = subprocess.Popen(
                arguments, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPOSITORY, start_new_session=True
            )
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise SectionError(f"stopped after {timeout:.0f} s, when the budget (--budget) ran out") from None
        if code != 0:
            with self.log.open() as log:
                log.seek(start)
                raise SectionError(f"exit status {code}: {last_error_line(log.read())}")
        return time.perf_counter() - started

    def in_process(self, arguments: list[str]) -> float:
        """``rglcd.cli.main(arguments)`` in this process: its seconds; its one-line error becomes the section's."""
        from rglcd.cli import main
        from rglcd.models.speed import synchronize

        captured = io.StringIO()
        started = time.perf_counter()
        try:
            with redirect_stderr(captured):
                main(arguments)
        except SystemExit as error:
            raise SectionError(f"exit status {error.code}: {last_error_line(captured.getvalue())}") from None
        finally:
            with self.log.open("a") as log:
                log.write(f"\n$ rglcd {shlex.join(arguments)}\n{captured.getvalue()}")
        synchronize(self.device)
        return time.perf_counter() - started

    def dtype_arguments(self, command: str) -> list[str]:
        """``--dtype`` where the command takes it, at its default for the device, said explicitly: bf16 on a GPU,
        fp32 on the CPU."""
        if "dtype" not in cli_options(command):
            return []
        return ["--dtype", "bf16" if self.device.type == "cuda" else "fp32"]

    def exported(self) -> Path:
        if self.sampled is None or not self.sampled.is_dir():
            raise SectionError(f"no exported student: the section 'train {SAMPLED_RUN} plain' did not write one")
        return self.sampled

    @staticmethod
    def remove(path: Path | None) -> None:
        """Delete what a section no longer needs: a whole SD 1.5 export alone is about 8 GB."""
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


def cli_options(command: str) -> set[str]:
    """The option names (argparse dests) that ``rglcd COMMAND`` takes, read from its parser."""
    from rglcd.cli import build_parser

    required = {"sample": ["--model", "m", "--out", "o"], "eval": ["--model", "m"]}
    return set(vars(build_parser().parse_args([command, *required[command]])))


def plan_default_utilization() -> float:
    """The share of the GPU's peak that ``rglcd plan`` assumes unless told (its ``--utilization`` default)."""
    from rglcd.cli import build_parser

    return build_parser().parse_args(["plan", "sd15-512"]).utilization


@contextmanager
def half_precision_on(device):
    """New tensors in float16 on ``device``: random weights initialised where they are used, saved at half size."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def last_error_line(output: str) -> str:
    """The line of a command's output that says what failed: the rglcd CLI's one-line error, a traceback's last
    line, else the last line."""
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("rglcd ") or re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", line):
            return line[:400]
    return lines[-1][:400] if lines else "(no output)"


# ------------------------------------------------------------------------------------------------- markdown


def markdown(results: dict) -> str:
    sections = {section["name"]: section for section in results["sections"]}
    environment = sections.get("environment", {}).get("figures", {})
    title = environment.get("gpu", results["device"]) + (" (tiny rehearsal)" if results["tiny"] else "")
    versions = [f"{name} {environment[name]}" for name in VERSIONS_SHOWN if name in environment]
    lines = [
        f"# rglcd GPU check: {title}",
        "",
        f"{results['started']}; {results['seconds']:.0f} s of a {results['budget_seconds']:.0f} s budget; "
        + ", ".join(versions),
        "",
        f"Training: `rglcd train`, HPSv2.1 with random weights, teachers with random weights; the plan is "
        f"`rglcd plan --gpu {PLAN_GPU}`'s; utilisation = the plan's FLOPs / median s per step / "
        f"{environment.get('plan_gpu_dense_bf16_tflops', '?')} TFLOPS (dense bf16).",
        "",
        "| run | variant | batch × accumulation | s/step (median) | first step s | first − median s | peak GiB | "
        "reserved GiB | plan GiB | peak / plan | reserved / plan | plan s/step | s/step / plan | utilisation |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, section in sections.items():
        if not name.startswith("train ") or section["status"] != "ok":
            continue
        _, run, variant = name.split(" ")
        f = section["figures"]
        lines.append(
            f"| {run} | {variant} | {f.get('batch_size', '?')} × {f.get('gradient_accumulation_steps', '?')} | "
            f"{number(f.get('median_step_seconds'), '.3f')} | {number(f.get('first_step_seconds'), '.1f')} | "
            f"{number(f.get('first_minus_median_seconds'), '.1f')} | "
            f"{gib(f.get('peak_bytes'))} | {gib(f.get('peak_reserved_bytes'))} | "
            f"{gib(f.get('planned_bytes'))} | {number(f.get('measured_over_planned_bytes'), '.2f')} | "
            f"{number(f.get('reserved_over_planned_bytes'), '.2f')} | "
            f"{number(f.get('planned_seconds_per_step'), '.3f')} | "
            f"{number(f.get('measured_over_planned_seconds'), '.2f')} | {number(f.get('utilization'), '.1%')} |"
        )
    if results["device"] == "cpu":
        lines += [
            "",
            "On the CPU the peak is the process's resident high-water mark (Python, torch and the libraries "
            "included) and the plan and utilisation are the GPU's: the rehearsal shows that every figure is made, "
            "not what it is on a GPU.",
        ]
    sampling = sections.get("sampling", {}).get("figures")
    if sampling:
        lines += [
            "",
            f"Sampling the whole SD 1.5 student and its teacher: {sampling['dtype']}, batch {sampling['batch']}, "
            "images per second after a warm-up batch.",
            "",
            "| sampler | images/s | vs the teacher |",
            "| --- | ---: | ---: |",
        ]
        for steps in SAMPLED_STEPS:
            lines.append(
                f"| student, {steps} step{'s' if steps > 1 else ''} | "
                f"{number(sampling[f'student_{steps}_steps_images_per_second'], '.2f')} | "
                f"{number(sampling[f'student_{steps}_steps_speedup'], '.1f')}× |"
            )
        rate, steps = sampling["teacher_ddim_cfg_images_per_second"], sampling["teacher_steps"]
        lines.append(f"| teacher, DDIM {steps} steps + CFG | {number(rate, '.2f')} | 1.0× |")
    evaluation = sections.get("rglcd eval", {}).get("figures")
    if evaluation:
        lines += [
            "",
            f"`rglcd eval` (4 steps, HPSv2.1): {evaluation['images']} images in {evaluation['seconds']:.1f} s, "
            f"{evaluation['images_per_second']:.2f} images/s in all (loading and scoring included), generation "
            f"{number(evaluation['generation_images_per_second'], '.2f')} images/s.",
        ]
    lines += ["", "| section | status | seconds | note |", "| --- | --- | ---: | --- |"]
    for section in results["sections"]:
        note = section.get("error") or section.get("reason") or ""
        seconds = section.get("seconds")
        lines.append(f"| {section['name']} | {section['status']} | {number(seconds, '.0f')} | {note} |")
    return "\n".join(lines) + "\n"


def number(value: float | None, spec: str) -> str:
    value = finite_or_none(value)
    return "—" if value is None else format(value, spec)


def gib(count: float | None) -> str:
    return "—" if count is None else number(count / GIB, ".2f")


# ----------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json, report.md and log.txt")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny architectures and counts: the CPU rehearsal")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which no section starts")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--work", help="teachers, data and runs (default: a new temporary folder, deleted after)")
    args = parser.parse_args(argv)
    args.runs = [name.strip() for name in args.runs.split(",") if name.strip()]
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(args.runs) - set(RUNS)) + sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown runs or variants: {', '.join(unknown)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    context = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "tiny": args.tiny,
        "budget_seconds": args.budget,
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    report = Report(Path(args.out), context, args.budget)
    check = Check(args, report)
    try:
        check.run()
    finally:
        if not args.work:
            shutil.rmtree(check.work, ignore_errors=True)
    report.write()
    failed = [section["name"] for section in report.sections if section["status"] != "ok"]
    print(f"[gpu_check] {len(report.sections) - len(failed)} of {len(report.sections)} sections ok; "
          f"{args.out}/report.md" + (f"; not ok: {', '.join(failed)}" if failed else ""))  # fmt: skip


if __name__ == "__main__":
    main()
