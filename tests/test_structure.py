"""The package's shape: imports flow one way through the layers (no cycle, no upward import) and the
code stays in functions a reader can hold in their head."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "blueberry"
# Lower layers never import higher ones (errors.py and __main__ aside).
LAYERS = ["errors", "system", "ops", "configs", "data", "models", "runs", "export", "optimizers", "training",
          "inference", "evaluation", "cli"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every blueberry module `path` imports, at any depth of the file (function-level imports count)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("blueberry")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("blueberry"):
                target = node.module
            else:
                continue
            for alias in node.names:  # `from .pkg import sub` imports the submodule sub
                sub = f"{target}.{alias.name}"
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else target)
    return found - {name}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {t for t in imports_of(p) if t in modules} for m, p in modules.items()}


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_imports_flow_one_way_through_the_layers():
    upward = [f"{m} -> {t}" for m, targets in graph().items() for t in targets
              if layer(m) is not None and layer(t) is not None and layer(t) > layer(m)]
    assert not upward, "upward imports: " + "; ".join(upward)


def test_functions_stay_short():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({lines} lines)")
    assert not long, long


def test_every_module_says_what_it_owns():
    missing = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if p.stat().st_size and ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) is None]
    assert not missing, missing


# What only a run writes: named in blueberry/runs/ alone. Not listed, as a search cannot tell them apart:
# config.json and tokenizer.json (also a transformers directory's and a token store's files), model.safetensors
# (an HF export's), hf_tokenizer/ (where data/tokenizer.py saves an HF tokenizer's own files).
RUN_FILES = ("metrics.jsonl", "summary.json", "samples.txt", "launch.json", "ensemble.json", "quantization.json",
             "state.pt", "checkpoints")
READERS = ("inference", "evaluation", "export")


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_only_the_run_module_names_a_run_directorys_files():
    """A run directory is laid out, written and read in blueberry/runs/ (its names are layout.py's constants)."""
    named = [f"{p.relative_to(PACKAGE)}: {name!r}" for p in PACKAGE.rglob("*.py") if p.parent.name != "runs"
             for name in RUN_FILES if name in _string_constants(p)]
    assert not named, named


def test_inference_evaluation_and_export_load_runs_only_through_the_run_module():
    """They load a run with blueberry.runs; of training/ they use only what measures a model (evaluate_model and
    the precision it runs in), and no module outside blueberry/runs/ unpickles a checkpoint's state."""
    measuring = {"blueberry.training.evaluation", "blueberry.training.precision"}
    wrong = [f"{m} -> {t}" for m, targets in graph().items() if m.split(".")[1:2] and m.split(".")[1] in READERS
             for t in targets if t.startswith("blueberry.training") and t not in measuring]
    wrong += [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
              if p.parent.name != "runs" and "torch.load(" in p.read_text(encoding="utf-8")]
    assert not wrong, wrong


# The product spec's names that exist for code written against it, each in its layer's compatibility module
# (the modules the spec names); the package itself uses one name per thing and never these.
SEED_ALIASES = {"AdaptiveLinear": "models/components.py", "StandardTransformerBlock": "models/components.py",
                "matmul": "ops/matmul.py",
                **{f"get_{name}_config": "configs/presets.py"
                   for name in ("development", "default", "cpu", "rtx4090", "rtx5090", "h100", "production")}}


def test_the_seeds_aliases_live_in_the_compatibility_modules_and_the_package_does_not_use_them():
    defined, used = {}, []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in SEED_ALIASES:
                defined.setdefault(node.name, []).append(rel)
            names = [node.id] if isinstance(node, ast.Name) else [a.name for a in node.names] if isinstance(
                node, ast.ImportFrom) and path.name != "__init__.py" else []  # re-exports are not uses
            used += [f"{rel}:{node.lineno} {n}" for n in names if n in SEED_ALIASES and rel != SEED_ALIASES[n]]
    assert defined == {name: [home] for name, home in SEED_ALIASES.items()}, defined
    assert not used, used


# How a corpus is opened: a fine-tuning set, a small corpus (one shard in the data cache) or prepared stores.
CORPUS_OPENERS = {"load_sft_data", "load_and_cache_data", "prepare_stores", "open_stores", "uses_token_store"}


def test_one_data_path_one_module_chooses_the_corpus_and_one_module_batches_it():
    """data/loaders.py alone chooses how a run's corpus is opened (everyone else calls open_corpus), and
    data/sharded_loader.py alone defines loaders (a class with next_batch): one loader, one loader state."""
    choosers, loaders = [], []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                if name in CORPUS_OPENERS and rel != "data/loaders.py":
                    choosers.append(f"{rel}:{node.lineno} {name}")
            if isinstance(node, ast.ClassDef) and rel != "data/sharded_loader.py" and any(
                    isinstance(f, ast.FunctionDef) and f.name == "next_batch" for f in node.body):
                loaders.append(f"{rel} {node.name}")
    assert not choosers and not loaders, choosers + loaders
