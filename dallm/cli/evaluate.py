"""Evaluation commands: `dallm kid` (and later `dallm report`).

Each command is a (`_add_<name>`, `_cmd_<name>`) pair registered in `register`; heavy imports
(torch, transformers) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import sys

from dallm.cli import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    for add in COMMANDS:
        add(subparsers)


# ----------------------------------------------------------------------------------------------
# dallm kid


def _add_kid(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "kid",
        help="KID between two folders of images",
        description="Kernel Inception Distance (unbiased MMD^2, kernel (x.y/d + 1)^3) between two image "
        "folders: mean and std over random subsets.",
    )
    p.add_argument("dir_a", metavar="DIR_A")
    p.add_argument("dir_b", metavar="DIR_B")
    p.add_argument("--features", default="micro", help="micro | inception | clip:FOLDER (default: micro)")
    p.add_argument(
        "--subset-size",
        type=int,
        default=None,
        help="images per subset (default: half the smaller folder; lowered to that, with a warning, "
        "when not smaller than it: a subset of every image has no spread)",
    )
    p.add_argument("--num-subsets", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--inception-weights", default=None, help="path of weights-inception-2015-12-05-6726825d.pth"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_kid)


def _cmd_kid(args: argparse.Namespace) -> int:
    from dallm.eval.features import FeatureError, features_of_folder, list_images, load_extractor
    from dallm.eval.kid import kid, subset_for

    if args.subset_size is not None and args.subset_size < 2:
        raise CommandError(f"--subset-size: must be >= 2, got {args.subset_size}")
    if args.num_subsets < 1:
        raise CommandError(f"--num-subsets: must be >= 1, got {args.num_subsets}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size: must be >= 1, got {args.batch_size}")
    try:
        files_a, files_b = list_images(args.dir_a), list_images(args.dir_b)  # fail before loading a model
        for folder, files in ((args.dir_a, files_a), (args.dir_b, files_b)):
            if len(files) < 2:
                raise CommandError(f"{folder}: {len(files)} image; KID needs at least 2 per folder")
        extractor = load_extractor(
            args.features,
            device=args.device,
            inception_weights=args.inception_weights,
            batch_size=args.batch_size,
        )
        feats_a = features_of_folder(extractor, args.dir_a)
        feats_b = features_of_folder(extractor, args.dir_b)
        subset, warning = subset_for(args.subset_size, len(feats_a), len(feats_b))
        if warning is not None:
            print(f"warning: --subset-size: {warning}", file=sys.stderr)
        mean, std = kid(feats_a, feats_b, subset_size=subset, num_subsets=args.num_subsets, seed=args.seed)
    except (FeatureError, ValueError) as e:
        raise CommandError(str(e)) from None
    if args.json:
        out = {
            "kid": mean,
            "kid_std": std,
            "features": args.features,
            "n_a": len(feats_a),
            "n_b": len(feats_b),
            "subset_size": subset,
            "num_subsets": args.num_subsets,
            "seed": args.seed,
        }
        print(json.dumps(out))
    else:
        print(
            f"KID {mean:.6g} ± {std:.3g}  ({args.features}; {len(feats_a)} vs {len(feats_b)} images, "
            f"{args.num_subsets} subsets of {subset})"
        )
    sys.stdout.flush()
    return 0


COMMANDS = [_add_kid]
