"""`lemur`: the command line. Sub-commands import their module lazily so `lemur --help` stays fast."""

from __future__ import annotations

import argparse
import sys

from trainer.config import ConfigError, config_to_toml, load_config, preset_names


def _add_config_args(parser: argparse.ArgumentParser, default: str = "tiny") -> None:
    parser.add_argument(
        "--config", default=default, help=f"preset ({', '.join(preset_names())}) or TOML file"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="A.B=C",
        help="override a config field (repeatable)",
    )


def _add_checkpoint_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", default="auto", help="'auto' (latest in logging.out_dir) or a directory"
    )


def _synth(args: argparse.Namespace) -> int:
    from trainer.dataset_tools.synth.generate import synthesize

    overrides = list(args.overrides)
    if args.samples is not None:
        overrides.append(f"data.synth.num_samples={args.samples}")
    if args.seed is not None:
        overrides.append(f"data.synth.seed={args.seed}")
    if args.workers is not None:
        overrides.append(f"data.synth.workers={args.workers}")
    cfg = load_config(args.preset, overrides)
    synthesize(cfg.data.synth, args.out, vocab_size=cfg.data.vocab_size, force=args.force)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from trainer.dataset_tools.convert import convert_dataset

    done = convert_dataset(args.path)
    kept = ", ".join(f"{k}={v}" for k, v in sorted(done.kept_as_json.items())) or "none"
    print(
        f"{args.path}: {done.shards} shards ({done.samples} samples) rewritten with binary records, "
        f"{done.already} already binary; bad samples kept as JSON: {kept}"
    )
    return 0


def _import(args: argparse.Namespace) -> int:
    from trainer.dataset_tools.parquet_import import import_parquet

    import_parquet(
        interactions=args.interactions,
        items=args.items,
        out=args.out,
        samples_per_shard=args.samples_per_shard,
        eval_share=args.eval_share,
        eval_from=args.eval_from,
        vocab_size=args.vocab_size,
        force=args.force,
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from trainer.dataset_tools.inspect import inspect_dataset

    inspect_dataset(args.path, samples=args.samples, sheet=args.sheet)
    return 0


def _train(args: argparse.Namespace) -> int:
    from trainer.train import train

    train(load_config(args.config, args.overrides), resume=args.resume)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate_checkpoint

    evaluate_checkpoint(
        load_config(args.config, args.overrides),
        args.checkpoint,
        as_json=args.json,
        from_bank=args.from_bank,
        refresh_bank=args.refresh_bank,
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainer.evaluate import export_checkpoint

    export_checkpoint(load_config(args.config, args.overrides), args.checkpoint, args.out)
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from trainer.experiment.main import list_tables, run_experiment

    if args.list or args.name is None:
        print(list_tables())
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    return run_experiment(
        args.name, args.size, args.seeds, args.out, args.nproc, args.jobs, variants, args.overrides
    )


def _config(args: argparse.Namespace) -> int:
    print(config_to_toml(load_config(args.config, args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lemur", description="End-to-end multimodal recommendation trainer."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="print the resolved config as TOML")
    _add_config_args(config)
    config.set_defaults(func=_config)

    train = sub.add_parser("train", help="train (under torchrun for several processes)")
    _add_config_args(train)
    train.add_argument(
        "--resume", help="'auto' (latest checkpoint in logging.out_dir, if any) or a checkpoint directory"
    )
    train.set_defaults(func=_train)

    evaluate = sub.add_parser(
        "eval", help="score a checkpoint on the eval shards: AUC, GAUC, QAUC, cold-start AUC"
    )
    _add_config_args(evaluate)
    _add_checkpoint_arg(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.add_argument(
        "--from-bank",
        action="store_true",
        help="the serving path: read target and history content vectors from the memory bank only",
    )
    evaluate.add_argument(
        "--refresh-bank",
        action="store_true",
        help="first re-encode every item of items.parquet into the bank (the serving lookup-table build)",
    )
    evaluate.set_defaults(func=_eval)

    export = sub.add_parser(
        "export", help="write the item lookup table (item_id -> content vector) as parquet"
    )
    _add_config_args(export)
    _add_checkpoint_arg(export)
    export.add_argument("--out", required=True, help="parquet file to write")
    export.set_defaults(func=_export)

    exp = sub.add_parser(
        "experiment",
        help="run a paper table end to end: synthesise, train variants x seeds, report (markdown, PNG, JSON)",
    )
    exp.add_argument("name", nargs="?", help="table name (--list shows them)")
    exp.add_argument("--list", action="store_true", help="list the tables and sizes")
    exp.add_argument(
        "--size", choices=("small", "large"), default="small", help="small: 2-core CPU; large: 1 GPU"
    )
    exp.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (default 3)")
    exp.add_argument("--out", help="output directory (default outputs/experiments/NAME-SIZE)")
    exp.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    exp.add_argument("--jobs", type=int, help="runs at a time (default: the size's)")
    exp.add_argument("--variants", help="comma-separated subset of the variants (the baseline always runs)")
    exp.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="A.B=C", help="for every run"
    )
    exp.set_defaults(func=_experiment)

    data = sub.add_parser("data", help="generate, import and inspect datasets").add_subparsers(
        dest="data_command", required=True
    )
    synth = data.add_parser("synth", help="generate a synthetic multimodal dataset")
    synth.add_argument(
        "--preset",
        default="tiny",
        help=f"config preset or TOML whose data.synth is used ({', '.join(preset_names())})",
    )
    synth.add_argument("--out", required=True, help="dataset directory to write")
    synth.add_argument("--samples", type=int, help="override data.synth.num_samples")
    synth.add_argument("--seed", type=int, help="override data.synth.seed")
    synth.add_argument("--workers", type=int, help="writer processes (default: all cores)")
    synth.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C")
    synth.add_argument("--force", action="store_true", help="replace an existing dataset in --out")
    synth.set_defaults(func=_synth)

    imp = data.add_parser("import", help="convert parquet logs (interactions + items) into shards")
    imp.add_argument("--interactions", required=True, help="interactions parquet file or directory")
    imp.add_argument("--items", required=True, help="items parquet file or directory")
    imp.add_argument("--out", required=True, help="dataset directory to write")
    imp.add_argument("--samples-per-shard", type=int, default=10_000)
    imp.add_argument(
        "--eval-share", type=float, default=0.1, help="the last share of the timeline becomes eval"
    )
    imp.add_argument(
        "--eval-from", type=int, help="eval = samples with timestamp >= this (overrides --eval-share)"
    )
    imp.add_argument(
        "--vocab-size", type=int, default=8_000, help="tokenizer vocabulary trained from the items' text"
    )
    imp.add_argument("--force", action="store_true", help="replace an existing dataset in --out")
    imp.set_defaults(func=_import)

    ins = data.add_parser(
        "inspect", help="summarise a dataset directory and draw a contact sheet of its images"
    )
    ins.add_argument("path", help="dataset directory")
    ins.add_argument("--samples", type=int, default=3, help="decoded samples to print")
    ins.add_argument("--sheet", help="contact-sheet PNG path (default DIR/contact_sheet.png)")
    ins.set_defaults(func=_inspect)

    conv = data.add_parser(
        "convert",
        help="rewrite a dataset's JSON sample records as binary ones (shard by shard, each replaced atomically)",
    )
    conv.add_argument("path", help="dataset directory")
    conv.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"lemur: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lemur ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
