"""``python -m jaxcf.report``: figures and a Markdown summary of a trained model, drawn headless
(``jaxcf.serving.report``).

    python -m jaxcf.report --model runs/bias [--out runs/bias/report]

Writes ``curves.png``, ``embeddings_pca.png``, ``item_bias.png`` (biased model) and ``report.md`` into
``--out`` (default: ``report/`` next to the model folder), as a whole; never over a folder that is not a
previous report.

What does not live here: the figures (``jaxcf.serving.report``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from jaxcf.cli import common as cli
from jaxcf.core.errors import ModelError
from jaxcf.serving.report import write_report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxcf.report", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a training workdir or an exported model folder")
    parser.add_argument("--out", type=Path, help="output folder (default: report/ next to the model folder)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        model = cli.load_model(args.model)
        out = args.out or model.path.parent / "report"
        try:
            report = write_report(model, out)
        except OSError as err:
            raise ModelError(f"cannot write the report into {out} ({err.strerror or err}); choose another --out") \
                from None
        print(f"wrote {report} and its figures")
        return 0

    return cli.run(body)
