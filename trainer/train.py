"""Entry point: `python -m trainer.train --config tiny --set a.b=c` (or under torchrun). Build, train, close."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from trainer.config import Config, config_to_toml, load_config
from trainer.distributed import ending_job, init_distributed
from trainer.loop import Trainer


def setup_logging(rank: int) -> None:
    """Our logger at INFO on rank 0; the libraries (torchrec, fbgemm, deepspeed are chatty at INFO) at WARNING."""
    logging.basicConfig(
        level=logging.WARNING, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True
    )
    logging.getLogger("lemur").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("trainer").setLevel(logging.INFO if rank == 0 else logging.WARNING)


def train(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Train `cfg` on this process's share of the job (a group of one when not under torchrun)."""
    info = init_distributed(cfg.distributed.backend)
    setup_logging(info.rank)
    with ending_job():
        if info.is_main:
            logging.getLogger("lemur").info("resolved config:\n%s", config_to_toml(cfg))
        trainer = Trainer(cfg, info)
        if resume:
            trainer.resume(resume)
        results = trainer.fit()
        trainer.close()
    return results


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny", help="preset name or TOML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C")
    parser.add_argument(
        "--resume", help="'auto' (latest checkpoint in logging.out_dir, if any) or a checkpoint directory"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__)
    add_train_args(parser)
    args = parser.parse_args(argv)
    train(load_config(args.config, args.overrides), resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
