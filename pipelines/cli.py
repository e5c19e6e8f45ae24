"""The `polymae` command line: pretrain, finetune, shard, probe, reconstruct, export, info.

Errors the user can fix (a misspelled config key, a bad value, a missing file,
unreadable input) are one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from polymae.shared.errors import BadInput, CheckpointError, ConfigError, RunFolderInUse, TrainingError

USER_ERRORS = (ConfigError, BadInput, TrainingError, CheckpointError, RunFolderInUse, FileNotFoundError, KeyError)


def cmd_pretrain(args) -> None:
    from polymae.shared.config import load_config

    from .pretrain import pretrain

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # no config file, only overrides
        config_path, overrides = None, [config_path, *overrides]
    if args.resume:  # a resumed run keeps its own recipe; pretrain refuses changes to what it trains
        from .runs import resumed_config

        config = resumed_config(Path(args.resume), config_path, overrides)
    else:
        config = load_config(config_path, overrides)
    pretrain(config, resume=args.resume)


def cmd_shard(args) -> None:
    from polymae.shared.config import merge, parse_override
    from polymae.shared.registry import MODALITIES

    import polymae.modalities  # noqa: F401  (registers the modalities)
    from .shards import shard_source

    options = {}
    for text in args.option:
        options = merge(options, parse_override(text))
    for flag in getattr(args, "flags", ()):  # `--some-flag`: the modality's boolean option some_flag, true
        options[flag] = True
    modality = MODALITIES.get(args.modality)(options)
    manifests = shard_source(modality, args.source, args.out, val_fraction=args.val_fraction, seed=args.seed,
                             max_count=args.max_count, max_bytes=int(args.max_mb * 2 ** 20),
                             record_seconds=args.record_seconds or None)
    for split, manifest in manifests.items():
        print(f"{split}: {manifest['total']} records in {len(manifest['shards'])} shards, "
              f"{len(manifest['rejected'])} rejected")
        for rejected in manifest["rejected"]:
            print(f"  rejected {rejected.get('source') or rejected['key']}: {rejected['reason']}")


def cmd_probe(args) -> None:
    from .probe import format_probe, probe
    from .runs import load_run, split_shards

    parts, checkpoint = load_run(args.run)
    train, val = split_shards(parts.config, parts.modalities)
    if val is None:
        raise ConfigError("probing needs a labelled held-out split: set data.val_shards or data.val_fraction")
    print(f"probing {checkpoint}")
    print(format_probe(probe(parts, train, val)))


def cmd_finetune(args) -> None:
    from .finetune import finetune, finetune_recipe, resumed_finetune_recipe

    if args.resume:
        config, ft = resumed_finetune_recipe(Path(args.resume))
    else:
        if args.start is None:
            raise ConfigError("polymae finetune needs the run, checkpoint or Hugging Face folder to start from")
        recipe, overrides = args.recipe, list(args.overrides)
        if recipe is not None and "=" in recipe:  # no recipe file, only overrides
            recipe, overrides = None, [recipe, *overrides]
        config, ft = finetune_recipe(args.start, recipe, overrides, from_scratch=args.from_scratch)
    finetune(config, ft, resume=args.resume)


def cmd_reconstruct(args) -> None:
    from .reconstruct import reconstruct

    reconstruct(args.run, args.out, rows=args.rows, seed=args.seed)


def cmd_export(args) -> None:
    from .runs import load_run

    parts, checkpoint = load_run(args.run)
    if len(parts.streams) != 1 or not hasattr(parts.streams[0].modality, "export_weights"):
        raise ConfigError(f"{checkpoint}: export writes a one-stream run whose modality has a Hugging Face "
                          f"counterpart (Modality.export_weights); this run's streams are "
                          f"{[(s.name, s.modality.name) for s in parts.streams]}")
    spec = parts.streams[0]
    folder, kind = spec.modality.export_weights(parts.model, args.out, encoder_only=args.encoder_only,
                                                norm_pix=parts.norm_pix(spec.name), mask_ratio=spec.masker.ratio)
    print(f"{folder}: {checkpoint} as a Hugging Face {kind} (from_pretrained loads it)")


def cmd_info(args) -> None:
    import polymae.modalities as modalities
    import polymae.shared.masking  # noqa: F401  (registers the generic maskers)
    import polymae.shared.objectives  # noqa: F401  (registers the generic objectives)
    from polymae.shared.config import shipped_configs
    from polymae.shared.registry import DECODERS, ENCODERS, MASKERS, MODALITIES, MODEL_SIZES, OBJECTIVES

    print("modalities: " + ", ".join(MODALITIES.names()))
    for name, why in modalities.UNAVAILABLE.items():
        print(f"  {name}: unavailable ({why})")
    for name in MODALITIES.names():
        sources = MODALITIES.get(name)().sources()
        if sources:
            print(f"  {name} built-in sources: " + ", ".join(sources))
    print("maskers:    " + ", ".join(MASKERS.names()))
    print("objectives: " + ", ".join(OBJECTIVES.names()))
    print("encoders:   " + ", ".join(ENCODERS.names()) + "   decoders: " + ", ".join(DECODERS.names()))
    print("model sizes: " + ", ".join(f"{n} ({MODEL_SIZES.get(n)['width']}x{MODEL_SIZES.get(n)['depth']})"
                                     for n in MODEL_SIZES.names()))
    print("configs:    " + ", ".join(shipped_configs()))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="polymae", description="Masked-autoencoder pretraining for any modality.")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain an MAE from a YAML recipe (default: ViT MAE on digits)",
                       description="Pretrain from CONFIG (a path or a shipped recipe name; default "
                                   "image/mae_vit_digits.yaml) with dotted.key=value overrides.")
    p.add_argument("config", nargs="?", help="YAML recipe, or a shipped name such as image/mae_vit_digits.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. trainer.max_steps=100")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its latest checkpoint")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("shard", help="write a source as WebDataset tar shards with a manifest")
    p.add_argument("modality", help="e.g. image")
    p.add_argument("source", help="a folder (flat, or class sub-folders) or a built-in source (see `polymae info`)")
    p.add_argument("out", help="output folder for {train,val}-NNNNNN.tar and their manifests")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share held out as val (by key hash)")
    p.add_argument("--max-count", type=int, default=10_000, help="records per shard at most")
    p.add_argument("--max-mb", type=float, default=64.0, help="MiB per shard at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record-seconds", type=float, default=60.0,
                   help="time one input may take to read and check; slower ones are rejected as too_slow (0: no limit)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a modality option used to check records (e.g. channels=1); a further --NAME flag "
                        "sets the modality's boolean option NAME (dashes as underscores) to true")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("finetune", help="train a pretrained encoder and a task head on labels (MAE's recipe)",
                       description="Fine-tune START (a polymae run or checkpoint, or a local Hugging Face folder "
                                   "with RECIPE) on the labelled shards of its recipe; RECIPE's finetune: section "
                                   "and the overrides set the task and the schedule (pipelines/finetune.py).")
    p.add_argument("start", nargs="?", metavar="RUN_OR_FOLDER")
    p.add_argument("recipe", nargs="?", help="YAML fine-tuning recipe, e.g. image/mae_vit_digits_finetune.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. finetune.steps=300")
    p.add_argument("--from-scratch", action="store_true",
                   help="the same architecture from random init on the same budget (the baseline)")
    p.add_argument("--resume", metavar="RUN", help="continue the fine-tuning run in this folder")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("probe", help="kNN and linear-probe accuracy of a run's frozen encoder")
    p.add_argument("run", metavar="RUN_OR_CKPT")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("reconstruct", help="draw original | masked | reconstruction for held-out samples")
    p.add_argument("run", metavar="RUN_OR_CKPT")
    p.add_argument("--out", required=True, metavar="FILE.png")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the masks drawn")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("export", help="write a one-stream run as a Hugging Face folder of its modality's model type")
    p.add_argument("run", metavar="RUN_OR_CKPT")
    p.add_argument("out", metavar="FOLDER")
    p.add_argument("--encoder-only", action="store_true", help="a ViTMAEModel (the encoder) instead")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="registered modalities, maskers, objectives and shipped configs")
    p.set_defaults(func=cmd_info)
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args, unknown = top.parse_known_args(argv)
    if unknown:  # only `shard` takes flags of its modality's own, each a bare --name
        if args.command != "shard" or any(not u.startswith("--") or "=" in u for u in unknown):
            top.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.flags = [u[2:].replace("-", "_") for u in unknown]
    try:
        args.func(args)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"polymae {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
