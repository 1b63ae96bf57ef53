"""dvc.yaml against the code: every stage runs through the `artmaster` command and lists, as
dependencies, each artmaster module its stage imports (so editing one re-runs what it shapes)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from artmaster.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "artmaster"
# Plumbing that shapes no output: the config loader and the MLflow logger.
PLUMBING = {"config.py", "tracking.py"}


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def module_file(name: str) -> Path:
    relative = Path(*name.split(".")[1:])
    package = PACKAGE / relative / "__init__.py"
    return package if package.is_file() else (PACKAGE / relative).with_suffix(".py")


def artmaster_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("artmaster"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names
                         if module_file(f"{node.module}.{alias.name}").is_file())
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("artmaster."))
    return {name for name in names if name != "artmaster"}


def transitive_files(module: str) -> set[Path]:
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop())
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        todo.extend(artmaster_imports(path))
    return seen


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_stage_runs_the_artmaster_command_and_depends_on_its_code(name):
    stage = dvc_stages()[name]
    stage = stage.get("do", stage)  # a `foreach` stage (one per ArtAug round): its template
    command = stage["cmd"].split()
    assert command[0] == "artmaster" and command[1] in STAGES, stage["cmd"]
    deps = [str(dep) for dep in stage.get("deps", [])]
    missing = sorted(
        str(path.relative_to(ROOT))
        for path in transitive_files(STAGES[command[1]])
        if path.name not in PLUMBING and not covered(path, deps)
    )
    assert not missing, f"dvc.yaml stage {name!r} imports code it does not list as deps: {missing}"


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_stage_lists_no_code_it_does_not_import(name):
    """The other half: a module listed but never imported would re-run the stage for nothing."""
    stage = dvc_stages()[name]
    stage = stage.get("do", stage)
    files = [path.relative_to(ROOT) for path in transitive_files(STAGES[stage["cmd"].split()[1]])]
    unused = [dep for dep in map(str, stage.get("deps", [])) if dep.startswith("src/")
              and not any(path == Path(dep) or Path(dep) in path.parents for path in files)]
    assert not unused, f"dvc.yaml stage {name!r} lists code it does not import: {unused}"


@pytest.mark.parametrize("module", sorted(STAGES.values()))
def test_no_stage_imports_another_stage(module):
    stages = set(STAGES.values())
    imported = {name for name in artmaster_imports(module_file(module)) if name in stages and name != module}
    assert not imported, (
        f"{module} imports the stage module(s) {sorted(imported)}: move what they share into a library module "
        "(dataset.py, generate.py, training/, ...; docs/architecture.md)")


def test_artmaster_imports_resolve_to_files():
    files = transitive_files("artmaster.train")
    assert PACKAGE / "flux_math.py" in files and PACKAGE / "files.py" in files


def test_plots_page_works_offline_and_declares_its_charset():
    """`dvc plots show` fills the template .dvc/config names: Vega inline (DVC's own page loads it
    from a CDN and stays blank offline), UTF-8 declared (Vega's minus signs), no `{scripts}` slot
    (DVC would put its CDN tags there)."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    page = (ROOT / ".dvc" / config["plots"]["html_template"]).read_text(encoding="utf-8")
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page
    assert '<meta charset="utf-8">' in page and "cdn.jsdelivr" not in page
    assert "window.vegaEmbed=" in page.replace(" ", "")
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["plots"]
    for plot in plots:
        (definition,) = plot.values()
        template = definition.get("template")
        assert template is None or (ROOT / ".dvc" / "plots" / f"{template}.json").is_file(), template


def test_metrics_are_the_stages_headline_files():
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["metrics"]
    assert declared and all(path.endswith("/headline.json") for path in declared)


# docs/architecture.md's layers, top to bottom: a module imports its own layer or a lower one.
LAYERS = {
    "stages": ["compose", "demo_scans", "ingest", "crop", "caption", "base", "train", "augment", "retrain", "evaluate"],
    "tools": ["cli", "score", "results", "sweep"],
    "roles": ["critic", "refine", "report", "judge", "adherence"],
    "training": ["training"],
    "models": ["models", "generate", "adalora", "lora_branch", "float8", "flux_math", "vlm", "metrics", "processes", "replicates"],
    "data": ["dataset", "augment_settings", "caption_words", "imagestats", "painter"],
    "plumbing": ["config", "runtime", "files", "tracking"],
}


def _layer_of(module: str) -> int:
    top = module.split(".")[1]
    return next(index for index, names in enumerate(LAYERS.values()) if top in names)


def test_every_module_is_in_one_layer_and_imports_only_its_own_layer_or_lower():
    modules = {".".join(("artmaster", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
               for path in PACKAGE.rglob("*.py")} - {"artmaster"}
    tops = {module.split(".")[1] for module in modules}
    assert tops == {name for names in LAYERS.values() for name in names}, "LAYERS and src/artmaster/ differ"
    upward = sorted(f"{module} -> {name}" for module in modules for name in artmaster_imports(module_file(module))
                    if _layer_of(name) < _layer_of(module))
    assert not upward, f"imports from a higher layer (docs/architecture.md): {upward}"
