"""The ``rglcd`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from .sampling import lcm_sample, load_lcm, to_pil

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("rglcd sample: give at least one --prompt or a --prompts-file")
    pipeline = load_lcm(args.model, _device(args.device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for prompt_index, prompt in enumerate(prompts):
        # One generator per prompt: an image depends on (seed, prompt index), not on the other prompts.
        generator = torch.Generator(pipeline.device).manual_seed(args.seed + prompt_index)
        images = lcm_sample(
            pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, pipeline.scheduler,
            [prompt] * args.num_images, num_steps=args.steps, guidance_scale=args.guidance,
            generator=generator, resolution=args.resolution,
        )  # fmt: skip
        for image_index, image in enumerate(to_pil(images)):
            name = f"{prompt_index:03d}-{image_index:02d}.png"
            image.save(out / name)
            records.append({"file": name, "prompt": prompt, "seed": args.seed + prompt_index, "image": image_index})
    meta = {"model": str(args.model), "steps": args.steps, "guidance": args.guidance, "images": records}
    (out / "samples.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {len(records)} images to {out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoConfig, run_demo

    config = DemoConfig(
        out=Path(args.out), steps=args.steps, batch_size=args.batch_size, reward_beta=args.reward_beta,
        prediction_type=args.prediction_type, seed=args.seed,
    )  # fmt: skip
    summary = run_demo(config)
    first, last = summary["history"][0], summary["history"][-1]
    print(f"distillation loss {first['distill_loss']:.4f} -> {last['distill_loss']:.4f}")
    print(f"student pipeline: {summary['student']}  samples: {config.out / 'samples'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rglcd",
        description="Reward Guided Latent Consistency Distillation: distil a latent diffusion teacher into a "
        "1-4 step consistency model aligned to a reward.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    sample = commands.add_parser(
        "sample", help="few-step samples from an exported RG-LCM/LCM pipeline",
        description="Write PNGs sampled with multistep latent consistency sampling (LCMScheduler). "
        "Images are deterministic for a seed: prompt i uses seed + i.",
    )  # fmt: skip
    sample.add_argument("--model", required=True, help="exported pipeline folder or hub id")
    sample.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    sample.add_argument("--prompts-file", help="a text file with one prompt per line")
    sample.add_argument("--steps", type=int, default=4, choices=range(1, 9), metavar="{1..8}", help="default: 4")
    sample.add_argument(
        "--guidance", type=float, default=8.5,
        help="CFG scale as in diffusers pipelines; the model sees w = guidance - 1 (default: 8.5)",
    )  # fmt: skip
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--num-images", type=int, default=1, help="images per prompt")
    sample.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    sample.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    sample.add_argument("--out", required=True, help="output folder")
    sample.set_defaults(run=cmd_sample)

    demo = commands.add_parser(
        "demo", help="RG-LCD end to end on a tiny random teacher (CPU, ~1 min)",
        description="Build a tiny Stable-Diffusion-layout teacher, distil it with a reward for a few steps, "
        "export the student as a diffusers pipeline and sample it at 1, 2 and 4 steps.",
    )  # fmt: skip
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=30, help="training steps (default: 30)")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--reward-beta", type=float, default=0.1, help="β of the colourfulness reward")
    demo.add_argument("--prediction-type", default="epsilon", choices=("epsilon", "v_prediction", "sample"))
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .models import TeacherLoadError

    try:
        args.run(args)
    except TeacherLoadError as error:
        print(f"rglcd {args.command}: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
