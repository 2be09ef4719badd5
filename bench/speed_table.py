"""The Speed table of README.md and BENCHMARKS.md, rendered from ``results/vs_peers*.json``.

    python bench/speed_table.py [--json results/vs_peers.json results/vs_peers-bfm.json] [--write]

Each file is one run of ``bench/vs_peers.py``; the table lists their rows in order, and one line per
file says where and when it was measured.

Prints the markdown table; ``--write`` replaces the text between ``<!-- speed-table:start -->`` and
``<!-- speed-table:end -->`` in README.md and BENCHMARKS.md with it. ``tests/test_docs.py`` checks
that both files hold exactly what this prints, so no figure there is typed by hand.

What does not live here: the measurements (``bench/vs_peers.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- speed-table:start -->", "<!-- speed-table:end -->"
TARGETS = ("README.md", "BENCHMARKS.md")


def figure(value, spec: str, std=None) -> str:
    if value is None:
        return "-"
    return format(value, spec) + (f" ± {format(std, spec)}" if std is not None else "")


DEFAULT_FILES = ("results/vs_peers.json", "results/vs_peers-bfm.json")


def render(records: list[dict]) -> str:
    """The table, one line per row of the benchmark runs, then where and when each was measured."""
    lines = ["| workload | jaxcf fit s (cold) | original fit s | ratio | jaxcf s/iter | original s/iter | ratio | "
             "metric: jaxcf | original | peak MB jaxcf / original |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for name, row in ((n, r) for record in records for n, r in record["rows"].items()):
        jax_side, peer = row["jaxcf"], row["peer_result"]
        metric = row["metric_name"]
        cold = row.get("jaxcf_cold", {}).get("fit_s")
        threads = row.get("peer_best_threads")
        peer_name = f"{row['peer']} ({threads} thread{'s' if threads != 1 else ''})"
        rss = (f"{figure(jax_side.get('peak_rss_above_imports_bytes', 0) / 1e6, '.0f')} / "
               f"{figure(peer.get('peak_rss_above_imports_bytes', 0) / 1e6, '.0f')}")
        lines.append(
            f"| `{name}`: {row['title']}; vs {peer_name} | {figure(jax_side.get('fit_s'), '.2f')} "
            f"({figure(cold, '.1f')}) | {figure(peer.get('fit_s'), '.2f')} | "
            f"**{figure(row.get('ratio_fit_s'), '.2f')}** | {figure(jax_side.get('per_iter_s'), '.4f')} | "
            f"{figure(peer.get('per_iter_s'), '.4f')} | **{figure(row.get('ratio_per_iter_s'), '.2f')}** | "
            f"{metric} {figure(jax_side.get(metric), '.4f', jax_side.get(metric + '_std'))} | "
            f"{figure(peer.get(metric), '.4f', peer.get(metric + '_std'))} | {rss} |")
    lines.append("")
    for record in records:
        machine = record.get("machine", {})
        load = record.get("load_average_before") or ["?"]
        lines.append(f"Rows {', '.join(f'`{n}`' for n in record['rows'])}: `{record.get('command')}` on "
                     f"{machine.get('cpu_model')} ({machine.get('cpu_count')} cores, no GPU), "
                     f"{machine.get('date_utc')} UTC, jax {machine.get('versions', {}).get('jax')}; load average "
                     f"{load[0]} at the start (a shared host).")
    lines.append("Ratios are jaxcf / original (below 1: jaxcf faster); jaxcf's fit seconds are warm (the "
                 "compilation cache filled by the cold run before, in a new process), the cold run in brackets.")
    return "\n".join(lines)


def replace_between(text: str, table: str) -> str:
    head, found, rest = text.partition(START)
    if not found or END not in rest:
        raise ValueError(f"no {START} ... {END} markers")
    return head + START + "\n" + table + "\n" + END + rest.partition(END)[2]


def held(text: str) -> str:
    """The table a file holds between the markers."""
    return text.partition(START)[2].partition(END)[0].strip("\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, nargs="+", default=[ROOT / f for f in DEFAULT_FILES])
    parser.add_argument("--write", action="store_true", help="write the table into README.md and BENCHMARKS.md")
    args = parser.parse_args(argv)
    table = render([json.loads(path.read_text()) for path in args.json if path.is_file()])
    print(table)
    if args.write:
        for name in TARGETS:
            path = ROOT / name
            path.write_text(replace_between(path.read_text(), table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
