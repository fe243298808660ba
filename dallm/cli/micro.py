"""`dallm micro build` (rebuild the micro world's artefacts) and `dallm synth` (make a target set)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    micro = subparsers.add_parser("micro", help="the micro world: rebuild the shipped miniature model")
    msub = micro.add_subparsers(dest="micro_command", metavar="SUBCOMMAND")
    b = msub.add_parser(
        "build",
        help="rebuild the micro model, feature net and MANIFEST.json from fixed seeds",
        description="Rebuild the micro model (diffusers folder), the feature net and MANIFEST.json.",
    )
    b.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the installed dallm/micro)"
    )
    b.add_argument(
        "--steps-scale", type=float, default=1.0, help="multiply every training step count (default 1)"
    )
    b.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (default 0: every core; use 1 on a CPU busy with other work)",
    )
    b.add_argument("--eval-samples", type=int, default=64, help="base-model samples for the quality figures")
    b.add_argument("--grid", type=Path, default=None, help="also write a PNG of base samples")
    b.add_argument("--json", action="store_true", help="print the manifest as JSON")
    b.set_defaults(func=_build)
    _register_llm(msub)
    micro.set_defaults(func=lambda args: (micro.print_help(), 2)[1])

    s = subparsers.add_parser(
        "synth",
        help="make a target image set from a larger model (or the micro teacher)",
        description="Generate N images for a prompt into DIR, with same-name .txt captions.",
    )
    s.add_argument("--model", required=True, help="teacher | HUB_ID | FOLDER (a diffusers pipeline)")
    s.add_argument("--prompt", required=True)
    s.add_argument("-n", type=int, default=20, help="number of images (default 20)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--steps", type=int, default=25, help="sampling steps (pipelines)")
    s.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance (pipelines)")
    s.add_argument("--device", default="auto")
    s.add_argument("--caption", default=None, help="caption written next to each image (default: the prompt)")
    s.set_defaults(func=_synth)


def _register_llm(msub: argparse._SubParsersAction) -> None:
    b = msub.add_parser(
        "build-llm",
        help="rebuild the micro LLM (tokenizer, model, MANIFEST.json) from fixed seeds",
        description="Pretrain the micro LLM on the base dialect and write it in Hugging Face format.",
    )
    b.add_argument("--out", type=Path, default=None, help="output folder (default: the installed micro LLM)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    b.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the recipe's)")
    b.add_argument("--json", action="store_true", help="print the manifest as JSON")
    b.set_defaults(func=_build_llm)
    d = msub.add_parser(
        "llm-data",
        help="write the micro LLM's teacher train/validation text and base text",
        description="Write train, validation (teacher dialect, disjoint scenes) and base text files.",
    )
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--train", type=int, default=64, help="training texts (default 64)")
    d.add_argument("--val", type=int, default=64, help="validation texts (default 64)")
    d.add_argument("--base", type=int, default=128, help="base-dialect texts (default 128)")
    d.add_argument("--format", choices=("jsonl", "txt"), default="jsonl")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_llm_data)


def _build_llm(args: argparse.Namespace) -> int:
    import json

    from dallm.cli import CommandError

    if args.threads < 1:
        raise CommandError(f"--threads {args.threads}: must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise CommandError(f"--steps {args.steps}: must be at least 1")
    from dallm.micro_llm import MODEL_DIR
    from dallm.micro_llm.build import Recipe, build

    out = args.out if args.out is not None else MODEL_DIR
    recipe = Recipe() if args.steps is None else Recipe(steps=args.steps)
    command = "dallm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    try:
        manifest = build(out, seed=args.seed, recipe=recipe, threads=args.threads, command=command, log=log)
    except ValueError as e:
        raise CommandError(str(e)) from None
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        q = manifest["quality"]
        print(
            f"wrote {out} ({manifest['total_bytes'] / 1e6:.1f} MB) in {manifest['seconds']['total']} s: "
            f"ppl base {q['ppl_base_text']['value']:.3f}, teacher {q['ppl_teacher_text']['value']:.1f}, "
            f"grammatical {q['grammatical_rate_base']:.2f}"
        )
    return 0


def _llm_data(args: argparse.Namespace) -> int:
    from dallm.cli import CommandError
    from dallm.micro_llm.data import text_sets, write_text_sets

    for flag, n in (("--train", args.train), ("--val", args.val), ("--base", args.base)):
        if n < 1:
            raise CommandError(f"{flag} {n}: must be at least 1")
    try:
        paths = write_text_sets(args.out, text_sets(args.train, args.val, args.base, args.seed), args.format)
    except ValueError as e:
        raise CommandError(str(e)) from None
    print(" ".join(str(p) for p in paths.values()))
    return 0


def _build(args: argparse.Namespace) -> int:
    import json

    from dallm.cli import CommandError

    if args.threads < 0:
        raise CommandError(f"--threads {args.threads}: give 0 (every core) or a positive count")
    if args.steps_scale <= 0:
        raise CommandError(f"--steps-scale {args.steps_scale:g}: must be positive")
    from dallm.micro import HERE
    from dallm.micro.build import EvalSizes, build

    out = args.out if args.out is not None else HERE
    command = "dallm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    manifest = build(
        out,
        steps_scale=args.steps_scale,
        device=args.device,
        seed=args.seed,
        eval_sizes=EvalSizes(prompt_samples=args.eval_samples),
        command=command,
        log=log,
        grid=args.grid,
        threads=args.threads or None,
    )
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(f"wrote {out} ({manifest['total_bytes'] / 1e6:.1f} MB) in {manifest['seconds']['total']} s")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from dallm.cli import CommandError

    if args.n < 1:
        raise CommandError("-n must be at least 1")
    if args.model == "teacher":
        from PIL import Image

        from dallm.micro.teacher import synth

        try:
            images = synth(args.prompt, args.n, args.seed)
        except ValueError as e:  # a prompt outside the micro world: nothing written
            raise CommandError(f"--prompt {args.prompt!r}: {e}") from None
        args.out.mkdir(parents=True, exist_ok=True)
        for i, (img, caption) in enumerate(images):
            Image.fromarray(img).save(args.out / f"{i:04d}.png")
            (args.out / f"{i:04d}.txt").write_text((args.caption or caption) + "\n")
        print(f"wrote {args.n} teacher images to {args.out}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    return _synth_pipeline(args)


def _synth_pipeline(args: argparse.Namespace) -> int:
    import torch
    from diffusers import StableDiffusionPipeline

    from dallm.cli import CommandError

    source = args.model
    if source == "micro":
        from dallm.micro import MODEL_DIR

        source = str(MODEL_DIR)
    is_dir = Path(source).expanduser().is_dir()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(Path(source).expanduser()) if is_dir else source,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=is_dir or None,
        )
    except Exception as e:  # noqa: BLE001 - one line for the user
        hint = "" if is_dir else " (no hub reachable? give a local diffusers folder)"
        raise CommandError(
            f"cannot load {args.model!r}: {type(e).__name__}: {str(e).splitlines()[0]}{hint}"
        ) from None
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(args.seed)
    done = 0
    while done < args.n:
        k = min(16, args.n - done)
        shape = (k, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
        latents = torch.randn(shape, generator=gen).to(device)
        images = pipe(
            [args.prompt] * k, num_inference_steps=args.steps, guidance_scale=args.guidance, latents=latents
        ).images
        for img in images:
            img.save(args.out / f"{done:04d}.png")
            (args.out / f"{done:04d}.txt").write_text((args.caption or args.prompt) + "\n")
            done += 1
    print(f"wrote {args.n} images from {args.model} to {args.out}")
    return 0
