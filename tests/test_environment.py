"""pyproject.toml and environment.yml carry the same pins; both conda environments (the one a
user creates from environment.yml, and the rules' workflow/envs/hcformer.yaml) install the
project itself; every package the code imports is declared."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _pins(requirements):
    out = {}
    for req in requirements:
        name, _, version = req.partition("==")
        assert version, f"{req!r} is not pinned with =="
        out[name.strip().lower()] = version.strip()
    return out


def _pip_section(path: Path) -> list[str]:
    env = yaml.safe_load(path.read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_environment_yml_matches_pyproject():
    project = _project()
    wanted = _pins(project["dependencies"] + project["optional-dependencies"]["test"])
    pip_section = [p for p in _pip_section(ROOT / "environment.yml") if not p.startswith("-e ")]
    assert _pins(pip_section) == wanted


def test_environment_yml_installs_the_project():
    """conda runs the pip section from the environment file's folder: `-e PATH` is relative to
    it and must be this project."""
    editable = [p for p in _pip_section(ROOT / "environment.yml") if p.startswith("-e ")]
    assert len(editable) == 1
    target = (ROOT / editable[0].removeprefix("-e ").split("#")[0].strip()).resolve()
    assert target == ROOT
    assert tomllib.loads((target / "pyproject.toml").read_text())["project"]["name"] == "hcformer"


def test_the_rules_conda_environment_installs_the_project(tmp_path):
    """Every rule's `conda:` is workflow/envs/hcformer.yaml; Snakemake runs the post-deploy
    script beside it in the new environment from the project root, and it installs the project
    (editable, pins from pyproject.toml); run elsewhere, it stops with a clear line."""
    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    env_rel = re.search(r'^ENV = "([^"]+)"', common, re.M).group(1)
    env_file = (ROOT / "workflow" / "rules" / env_rel).resolve()
    assert env_file == ROOT / "workflow" / "envs" / "hcformer.yaml"
    rules = [p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk")]
    n_rules = sum(len(re.findall(r"^\s*rule \w+:", text, re.M)) for text in rules)
    n_conda = sum(len(re.findall(r"^\s*conda:\s*\n\s*ENV\s*$", text, re.M)) for text in rules)
    assert n_conda == n_rules > 10
    deps = yaml.safe_load(env_file.read_text())["dependencies"]
    assert "pip" in deps and any(str(d).startswith("python=3.11") for d in deps)
    script = env_file.with_name("hcformer.post-deploy.sh")
    assert os.access(script, os.X_OK)
    # A stand-in `python` records what the script asks pip to install, and from where.
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "calls.txt"
    (fake / "python").write_text(f'#!/bin/sh\necho "$PWD $*" >> {log}\n')
    (fake / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert log.read_text() == f"{ROOT} -m pip install --no-input -e .\n"
    out = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 1 and "run Snakemake from the hcformer project root" in out.stderr
    assert log.read_text().count("\n") == 1  # nothing installed from the wrong folder


def _imported_packages() -> set[str]:
    names = set()
    for path in (ROOT / "hcformer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "hcformer"}


def _with_requirements(names: set[str]) -> set[str]:
    """The distributions ``names`` need, transitively (markers evaluated here, extras left out)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_every_imported_package_is_declared():
    """An import of hcformer/ (e.g. tqdm) comes from a pinned dependency or one it requires."""
    declared = _with_requirements(set(_pins(_project()["dependencies"])))
    provided = md.packages_distributions()
    undeclared = {}
    for module in sorted(_imported_packages()):
        dists = {d.lower().replace("_", "-") for d in provided.get(module, [module])}
        if not dists & declared:
            undeclared[module] = sorted(dists)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    assert "tqdm" in _pins(_project()["dependencies"])


def test_torch_is_pinned_as_required():
    pins = _pins(_project()["dependencies"])
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
