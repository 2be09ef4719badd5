"""``python -m jaxcf.train``: train a config into a workdir (a thin CLI over ``jaxcf.training.loop.fit``).

    python -m jaxcf.train --config configs/bias.yaml [--set key=value ...] [--workdir DIR]
                          [--resume] [--quiet]

Exit status: 0 done; 2 bad input (one line on stderr, nothing written); 1 the run diverged (the last
good checkpoint is kept); 3 the watchdog stopped a stalled run; 130 / 143 interrupted by SIGINT /
SIGTERM after checkpointing the last finished epoch.

What does not live here: the loop (``jaxcf.training.loop``), the families, the formats.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxcf.cli import common as cli
from jaxcf.core.errors import WorkdirError
from jaxcf.families import load
from jaxcf.training import api
from jaxcf.training import loop as trainer
from jaxcf.training.workdir import default_workdir, test_key


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxcf.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file, or the name of a shipped config (bias.yaml, dot.yaml, ...)")
    parser.add_argument(
        "--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys"
    )
    parser.add_argument("--workdir", type=Path, help="output folder (default: a new folder under runs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --workdir")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def final_line(record: dict, workdir: Path) -> str:
    """``final valid_rmse 0.8739 (valid_mae 0.6723, ndcg@10 0.0775); outputs in WORKDIR``, or for an
    implicit-feedback model ``final ndcg@20 0.2605 (recall@20 0.2882, ...); outputs in WORKDIR``; the test
    part's figures (``test_rmse``) when nothing is validated, the training loss when neither is."""
    implicit = any(v == "implicit-holdout" for k, v in record.items() if k.endswith("protocol"))
    main, extra = ("ndcg@20", ("recall@20", "map@20", "mrr")) if implicit else ("valid_rmse", ("valid_mae", "ndcg@10"))
    line = f"final train_loss {record.get('train_loss', float('nan')):.6f} (nothing validated or tested)"
    for name in (lambda key: key, test_key):
        if isinstance(record.get(name(main)), float):
            shown = [f"{name(k)} {record[name(k)]:.4f}" for k in extra if isinstance(record.get(name(k)), float)]
            line = f"final {name(main)} {record[name(main)]:.4f}" + (f" ({', '.join(shown)})" if shown else "")
            break
    return f"{line}; outputs in {workdir}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        if args.resume and args.workdir is None:
            raise WorkdirError("--resume needs --workdir: the folder of the run to continue")
        config_name = args.config
        if config_name is None and args.resume and (args.workdir / "config.yaml").is_file():
            config_name = str(args.workdir / "config.yaml")
        config = load(config_name, args.set)
        workdir = args.workdir if args.workdir is not None else default_workdir(config_name)
        try:
            trained = api.run(config, workdir=workdir, resume=args.resume, quiet=args.quiet, on_stall="exit")
        except trainer.Interrupted as err:
            print(str(err), file=sys.stderr)
            return err.exit_status
        import jax

        if jax.process_index() == 0 and trained.history:  # of several processes, the one that wrote says so
            print(final_line(trained.history[-1], workdir))
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
