"""The shape of the house: three layers that only look down, no import cycle, small modules, and
inference that never loads the training stack."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "jaxcf"

# Each module's layer; a module may import only from its own layer or below.
CORE = {
    "errors", "fileio", "configfile", "config", "rng", "data", "data.ids", "data.ratings", "data.splits",
    "data.registry", "data.download", "models", "linalg", "sparse", "optim", "steps", "evaluate", "ranking",
    "processes", "distributed", "family", "sgd", "members", "gibbs", "export", "catalogue", "fallback",
    "foldin", "foldin_export", "answers", "foldin_implicit", "ials", "bpr", "ease", "implicit_family",
    "data.implicit", "blend",
}
TRAINERS = {"checkpoint", "workdir", "trainer"}
APP = {"__init__", "inference", "api", "cli", "train", "predict", "recommend", "similar", "report", "sweep",
       "crossval", "strong", "serve"}
LAYER = {**{m: 0 for m in CORE}, **{m: 1 for m in TRAINERS}, **{m: 2 for m in APP}}
MAX_LINES = 420  # "about 400": a module past this holds two concepts


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts)
        out["__init__" if name == "__init__" else name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, name: str) -> set[str]:
    """jaxcf modules that ``path`` imports anywhere (top level, inside functions: lazy imports too)."""
    known = set(_modules())
    found = set()
    package = name.rsplit(".", 1)[0] if "." in name and not path.name == "__init__.py" else name
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
                targets = [module]
            else:
                targets = [node.module or ""]
            submodules = [f"{targets[0]}.{alias.name}" for alias in node.names]
            # ``from package import module`` imports the module (the package is already being imported).
            if any(t.removeprefix("jaxcf.") in known for t in submodules):
                targets = [t for t in submodules if t.removeprefix("jaxcf.") in known]
        else:
            continue
        for target in targets:
            inner = target.removeprefix("jaxcf.") if target.startswith("jaxcf.") else None
            if target == "jaxcf":
                inner = "__init__"
            if inner in known and inner != name:
                found.add(inner)
    return found


GRAPH = {name: _imports(path, name) for name, path in _modules().items()}


def test_every_module_has_a_layer():
    assert set(GRAPH) == set(LAYER), sorted(set(GRAPH) ^ set(LAYER))


def test_layers_only_look_down():
    upward = [(a, b) for a, deps in GRAPH.items() for b in deps if LAYER[b] > LAYER[a] and b != "__init__"]
    assert not upward, f"imports from a higher layer: {upward}"


def test_no_import_cycle():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH[node]):
            if dep == "__init__":
                continue
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


def test_modules_are_small_and_say_what_they_hold():
    for name, path in _modules().items():
        text = path.read_text()
        lines = text.count("\n")
        assert lines <= MAX_LINES, f"jaxcf/{path.relative_to(PACKAGE)}: {lines} lines"
        doc = ast.get_docstring(ast.parse(text))
        assert doc and doc.strip(), f"{name}: no module docstring"


def test_inference_imports_no_training_code(tmp_path):
    """Loading a model, predicting, recommending and finding similar items: no optax, no orbax, no trainer."""
    from jaxcf import config, trainer
    from jaxcf.data import load as load_dataset

    cfg = config.load("bias.yaml", ["train.epochs=1", "model.n_factors=4"])
    trainer.fit(cfg, load_dataset(cfg.data, cfg.seed), workdir=tmp_path / "run", quiet=True, out=open("/dev/null", "w"))
    script = f"""
import sys
import jaxcf
from jaxcf import predict, recommend, similar
model = jaxcf.load_model({str(tmp_path / "run")!r})
model.predict([1, 2], [31, 1029]); model.recommend(1, k=5); model.similar_items(260, k=5)
assert predict.main(["--model", {str(tmp_path / "run")!r}, "--user", "1", "--item", "31"]) == 0
assert recommend.main(["--model", {str(tmp_path / "run")!r}, "--user", "1"]) == 0
assert similar.main(["--model", {str(tmp_path / "run")!r}, "--item", "260"]) == 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("optax", "orbax") or m in (
    "jaxcf.trainer", "jaxcf.steps", "jaxcf.optim", "jaxcf.checkpoint", "jaxcf.sgd", "jaxcf.gibbs"))
print("LOADED", loaded)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout, done.stdout[-500:]
