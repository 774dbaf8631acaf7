"""The import direction: `cost_models <- planner <- runtime`; planning never imports torch."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOWER = {"cost_models": set(), "planner": {"cost_models"}, "runtime": {"cost_models", "planner"}}
PROJECT = {"cost_models", "planner", "runtime", "experiments", "flexmoe"}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & PROJECT


def test_packages_import_only_downwards():
    for package, allowed in LOWER.items():
        for path in (ROOT / package).glob("*.py"):
            bad = _imported_packages(path) - allowed - {package}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_planner_and_cost_models_import_without_torch():
    modules = [f"{pkg}.{m.name}" for pkg in ("cost_models", "planner")
               for m in pkgutil.iter_modules([str(ROOT / pkg)])]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "bad = [m for m in ('torch',) if m in sys.modules]\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
