"""The shape of the house: folders that are layers and only look down, no import cycle, a training loop that
imports no family, family names written only in the families' folder, modules that say what they hold, and
inference that never loads the training stack."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "jaxcf"

# Each folder's layer; a module may import only from its own layer or below. The top-level modules are the
# public API: jaxcf, jaxcf.config and the one-line entry points (python -m jaxcf.train, ...).
LAYERS = {"core": 0, "data": 0, "families": 1, "serving": 2, "training": 3, "cli": 4}
TOP = 5
SOFT_LINES, MAX_LINES = 300, 520  # past SOFT_LINES a module says in its docstring why it is one concept


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts)
        out["__init__" if name == "__init__" else name.removesuffix(".__init__")] = path
    return out


def layer(name: str) -> int:
    return LAYERS.get(name.split(".")[0], TOP) if "." in name or name in LAYERS else TOP


def _imports(path: Path, name: str) -> set[str]:
    """jaxcf modules that ``path`` imports anywhere (top level, inside functions: lazy imports too)."""
    known = set(_modules())
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0] if "." in name else ""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                targets = [".".join(["jaxcf", *base, node.module] if node.module else ["jaxcf", *base])]
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
            # A module's own packages are imported before it anyway (as ``import-cycles`` counts too).
            if inner in known and inner != name and not name.startswith(inner + "."):
                found.add(inner)
    return found


GRAPH = {name: _imports(path, name) for name, path in _modules().items()}


def test_folders_are_layers_that_only_look_down():
    upward = [(a, b) for a, deps in GRAPH.items() for b in deps if layer(b) > layer(a) and b != "__init__"]
    assert not upward, f"imports from a higher layer: {upward}"


def test_the_loop_imports_no_family_and_serving_no_training():
    loop = GRAPH["training.loop"]
    assert not [m for m in loop if m.startswith("families")], loop
    serving = {m: deps for m, deps in GRAPH.items() if m.startswith("serving")}
    assert not [(m, d) for m, deps in serving.items() for d in deps if d.startswith("training")]


def test_family_names_are_written_only_in_the_families_folder():
    families = {p.name if p.is_dir() else p.stem for p in (PACKAGE / "families").iterdir()
                if not p.name.startswith(("_", ".")) and (p.is_dir() or p.suffix == ".py")}
    from jaxcf import families as registry

    names = (families | set(registry.SPECS)) - {"sgd"}
    hits = []
    for path in PACKAGE.rglob("*.py"):
        if "families" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not hits, hits


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


def test_modules_are_sized_to_a_concept_and_say_what_they_hold():
    for name, path in _modules().items():
        text = path.read_text()
        lines = text.count("\n")
        doc = ast.get_docstring(ast.parse(text))
        assert doc and doc.strip(), f"{name}: no module docstring"
        assert lines <= MAX_LINES, f"jaxcf/{path.relative_to(PACKAGE)}: {lines} lines"
        if lines > SOFT_LINES:
            assert "one concept" in doc.lower(), f"jaxcf/{path.relative_to(PACKAGE)}: {lines} lines and no reason given"


def test_inference_imports_no_training_code(tmp_path):
    """Loading a model, predicting, recommending and finding similar items: no optax, no orbax, no trainer."""
    from jaxcf import config
    from jaxcf.data import load as load_dataset
    from jaxcf.training import api

    cfg = config.load("bias.yaml", ["train.epochs=1", "model.n_factors=4"])
    api.run(cfg, load_dataset(cfg.data, cfg.seed), workdir=tmp_path / "run", quiet=True, out=open("/dev/null", "w"))
    script = f"""
import sys
import jaxcf
from jaxcf.cli import predict, recommend, similar
model = jaxcf.load_model({str(tmp_path / "run")!r})
model.predict([1, 2], [31, 1029]); model.recommend(1, k=5); model.similar_items(260, k=5)
assert predict.main(["--model", {str(tmp_path / "run")!r}, "--user", "1", "--item", "31"]) == 0
assert recommend.main(["--model", {str(tmp_path / "run")!r}, "--user", "1"]) == 0
assert similar.main(["--model", {str(tmp_path / "run")!r}, "--item", "260"]) == 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("optax", "orbax") or m.startswith("jaxcf.training")
                or m.endswith(".fit") or m in ("jaxcf.core.steps", "jaxcf.core.optim"))
print("LOADED", loaded)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout, done.stdout[-500:]
