"""The README's and docs/usage.md's code blocks run as written.

Each document's blocks run in order, in one sandbox folder (its own ``runs/``; ``configs`` and
``jaxcf`` linked to the repository's, so paths such as ``configs/bias.yaml`` and
``jaxcf/data/bundled/...`` mean what they mean in a checkout), so a block may use what an earlier
one made, as a reader's would. What is checked:

- ``python`` blocks: run by ``python -c`` in the sandbox; exit status 0.
- ``bash`` blocks: each line a command; exit status 0.
- ``console`` blocks: each ``$ `` line a command. Its shown output says what it must do: output that
  starts with ``error:`` means exit status 2 and one line on stderr starting with ``error:``;
  otherwise exit status 0. A ``final valid_rmse X`` the block shows must be printed again to the
  digit (the runs are deterministic on CPU). ``echo $?`` lines are the exit status, checked already.
- ``text``, ``yaml`` and untyped blocks are output or reference, not commands.

Blocks that cannot run here in seconds are in :data:`SKIP` with the reason; a block that no longer
exists there fails the test, so the list cannot go stale.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/usage.md")
RUNNABLE = ("python", "bash", "console")
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
FINAL = re.compile(r"final valid_rmse (\d+\.\d+)")
TIMEOUT_S = 600

# (document, how the block's first line starts) -> why it does not run here.
SKIP = {
    ("README.md", "python3 -m venv .venv"):
        "installs the package (CI runs this install itself)",
    ("README.md", "pip install torch==2.13.0"):
        "installs the test extra and runs this suite",
    ("README.md", "python -m jaxcf.serve"):
        "starts a server that runs until stopped; tests/test_serve.py covers it",
    ("README.md", "python -m jaxcf.train --config configs/ials.yaml"):
        "long training (four implicit configs, about a minute); tests/test_implicit.py trains each family",
    ("docs/usage.md", "$ python -m jaxcf.recommend --model runs/usage-tmp/tampered"):
        "needs a tampered export, which the text describes; tests/test_untrusted.py makes and checks them",
    ("docs/usage.md", "$ python -m jaxcf.serve"):
        "starts a server in the background; tests/test_serve.py covers it",
    ("docs/usage.md", "$ curl -s http://127.0.0.1:8765/health"): "talks to the server started above",
    ("docs/usage.md", "$ curl -s -w"):
        "talks to the server started above",
    ("docs/usage.md", "$ kill -TERM %1; wait %1; echo $?"): "stops the server started above",
    ("docs/usage.md", "$ python -m jaxcf.train --config configs/bpr.yaml"):
        "long training (BPR, EASE and the blend, about a minute); tests/test_implicit.py trains each family",
    ("docs/usage.md", "$ python bench/fallback.py --json results/fallback.json"): "a benchmark (minutes)",
    ("docs/usage.md", "$ JAXCF_DATA=runs/usage-tmp/cache"):
        "shows the message of a failed download: it needs the network to be absent",
}


def blocks(document: str) -> list[tuple[str, str]]:
    """The document's fenced blocks as (language, text), in order."""
    return [(lang, text) for lang, text in BLOCK.findall((ROOT / document).read_text())]


def first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def skipped(document: str, text: str) -> str | None:
    """Why a block does not run here (its document and the start of its first line are in SKIP), or None."""
    return next((why for (doc, start), why in SKIP.items() if doc == document and first_line(text).startswith(start)),
                None)


def commands(lang: str, text: str) -> list[tuple[str, list[str]]]:
    """(command, the output the document shows after it) for a bash or console block."""
    if lang == "bash":
        return [(line, []) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
    return out


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    def make(document: str) -> Path:
        folder = tmp_path_factory.mktemp(Path(document).stem)
        for name in ("configs", "jaxcf", "bench"):
            (folder / name).symlink_to(ROOT / name)
        (folder / "runs").mkdir()
        return folder

    return make


def run(command: list[str] | str, cwd: Path, shell: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=cwd, shell=shell, executable="/bin/bash" if shell else None, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def check_block(document: str, lang: str, text: str, cwd: Path) -> None:
    where = f"{document}, the block starting {first_line(text)[:60]!r}"
    if lang == "python":
        done = run([sys.executable, "-c", text], cwd)
        assert done.returncode == 0, f"{where} failed:\n{done.stderr[-3000:]}"
        return
    for command, shown in commands(lang, text):
        if command.strip().startswith("echo $?"):
            continue
        done = run(command, cwd, shell=True)
        if shown and shown[0].startswith("error:"):
            assert done.returncode == 2, f"{where}: {command!r} should fail with status 2: {done.stderr[-2000:]}"
            err = done.stderr.strip()
            assert err.startswith("error:") and "\n" not in err, f"{where}: {command!r} printed {err!r}"
            continue
        assert done.returncode == 0, f"{where}: {command!r} exit {done.returncode}:\n{done.stderr[-3000:]}"
        for figure in FINAL.findall("\n".join(shown)):
            assert f"final valid_rmse {figure}" in done.stdout, f"{where}: {command!r} printed {done.stdout[-800:]}"


@pytest.mark.slow
@pytest.mark.parametrize("document", DOCS)
def test_code_blocks_run_as_written(document, sandbox):
    cwd = sandbox(document)
    ran = 0
    for lang, text in blocks(document):
        if lang not in RUNNABLE or skipped(document, text):
            continue
        check_block(document, lang, text, cwd)
        ran += 1
    assert ran > 0


def test_every_skipped_block_exists_and_says_why():
    present = [(document, first_line(text)) for document in DOCS for lang, text in blocks(document)
               if lang in RUNNABLE]
    for (document, start), reason in SKIP.items():
        assert any(doc == document and line.startswith(start) for doc, line in present), \
            f"SKIP lists a block that is gone: {document}: {start!r}"
        assert len(reason) > 10


def test_the_speed_tables_are_what_the_benchmark_measured():
    """README.md's and BENCHMARKS.md's Speed tables are ``bench/speed_table.py``'s rendering of
    ``results/vs_peers*.json``, to the character: no figure there is typed by hand."""
    import json

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import speed_table
    finally:
        sys.path.remove(str(ROOT / "bench"))
    files = [ROOT / name for name in speed_table.DEFAULT_FILES if (ROOT / name).is_file()]
    table = speed_table.render([json.loads(path.read_text()) for path in files])
    for name in speed_table.TARGETS:
        assert speed_table.held((ROOT / name).read_text()) == table, f"{name}: run python bench/speed_table.py --write"
