"""The package rule of docs/architecture.md, checked by reading every import of lockgate/.

Each module belongs to one *part*; a part may import only the parts listed for it in ``ALLOWED``
(and itself). Imports inside functions count too: a lazy import is still a dependency. The test
also refuses package cycles among the parts and modules over ``MAX_LINES`` whose docstring does not
say why they are long (a line starting ``Over ~500 lines`` or ``Long:``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "lockgate"
MAX_LINES = 500

#: module prefix → part (longest prefix wins)
PARTS = {
    "lockgate.proto": "kernel", "lockgate.routing": "kernel", "lockgate.config": "kernel",
    "lockgate.yamlconf": "kernel", "lockgate.auth": "kernel", "lockgate.grpc_auth": "kernel",
    "lockgate.aio": "kernel", "lockgate.sqlite_util": "kernel", "lockgate.control_client": "kernel",
    "lockgate.refusal": "kernel", "lockgate.series": "kernel",
    "lockgate.database": "kernel",
    "lockgate.xds": "xds",
    "lockgate.extproc": "extproc",
    "lockgate.controller.stats": "stats",
    "lockgate.controller.ports": "ports",
    "lockgate.controller.evaluate": "evaluate",
    "lockgate.controller.ingest": "ingest",
    "lockgate.controller.decide": "decide",
    "lockgate.controller.tell": "tell",
    "lockgate.controller.api": "api",
    "lockgate.controller.app": "app",
    "lockgate.controller": "controller-root",
    "lockgate.examples": "examples",
    "lockgate.cli": "shell", "lockgate.supervisor": "shell", "lockgate.envoy_proc": "shell",
    "lockgate.demo": "shell", "lockgate.__main__": "shell", "lockgate": "shell",
}

_KERNEL = {"kernel"}
#: part → the parts it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "kernel": set(),
    "xds": _KERNEL,
    "extproc": _KERNEL,
    "stats": set(),
    "ports": _KERNEL,
    "evaluate": _KERNEL,
    "ingest": _KERNEL | {"evaluate"},
    "decide": _KERNEL | {"stats", "ingest", "evaluate", "ports"},
    "tell": _KERNEL | {"stats", "ingest", "decide", "ports"},
    "api": _KERNEL | {"ingest", "decide", "tell", "ports"},
    "app": _KERNEL | {"stats", "ports", "evaluate", "ingest", "decide", "tell", "api"},
    "controller-root": set(),
    "examples": set(),
    "shell": {"kernel", "xds", "extproc", "stats", "ports", "evaluate", "ingest", "decide", "tell", "api", "app",
              "controller-root", "examples"},
}


def part_of(module: str) -> str | None:
    best = None
    for prefix in PARTS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return PARTS[best] if best else None


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, imported module) for every lockgate import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lockgate"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "lockgate":
                continue
            # `from lockgate.controller import spec` imports the module lockgate.controller.spec
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((node.lineno, sub if (root / (sub.replace(".", "/") + ".py")).exists()
                            or (root / sub.replace(".", "/")).is_dir() else mod))
    return sorted(set(out))


def sources() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "proto" not in p.relative_to(PKG).parts[:1])


def test_every_module_has_a_part():
    missing = [module_name(p) for p in sources() if part_of(module_name(p)) is None]
    assert not missing, f"modules outside the package rule (add them to PARTS and docs/architecture.md): {missing}"


def test_imports_follow_the_package_rule():
    bad = []
    for path in sources():
        me = module_name(path)
        mine = part_of(me)
        for line, target in imports_of(path):
            theirs = part_of(target)
            if theirs is None or theirs == mine:
                continue
            if theirs not in ALLOWED[mine]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {target} ({theirs})")
    assert not bad, "imports against docs/architecture.md's rule:\n" + "\n".join(bad)


def test_no_import_between_extproc_and_xds():
    bad = []
    for path in sources():
        mine = part_of(module_name(path))
        for line, target in imports_of(path):
            if {mine, part_of(target)} == {"xds", "extproc"}:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not bad, bad


def test_no_cycle_between_parts():
    graph: dict[str, set[str]] = {}
    for path in sources():
        mine = part_of(module_name(path))
        for _, target in imports_of(path):
            theirs = part_of(target)
            if theirs and theirs != mine:
                graph.setdefault(mine, set()).add(theirs)
    seen: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        seen[n] = 1
        stack.append(n)
        for m in graph.get(n, ()):
            if seen.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in seen and (cycle := visit(m)):
                return cycle
        seen[n] = 2
        stack.pop()
        return None

    for n in list(graph):
        if n not in seen and (cycle := visit(n)):
            pytest.fail("package cycle: " + " -> ".join(cycle))


def test_long_modules_say_why():
    long = []
    for path in sources():
        n = sum(1 for _ in path.open())
        if n <= MAX_LINES:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if not re.search(r"(?im)^(long:|over ~?500 lines)", doc):
            long.append(f"{path.relative_to(ROOT)} ({n} lines)")
    assert not long, f"modules over {MAX_LINES} lines without a reason in their docstring (a line starting 'Over ~500 lines ...'): {long}"


def violations(path: Path, root: Path) -> list[str]:
    mine = part_of(module_name(path, root))
    return [target for _, target in imports_of(path, root)
            if part_of(target) not in (None, mine) and part_of(target) not in ALLOWED[mine]]


def test_the_checker_catches_a_forbidden_import(tmp_path):
    """The checker itself, on a throw-away tree: a decide module importing xds (directly, lazily and
    relatively through the controller) is caught; kernel and stats imports are not."""
    mod = tmp_path / "lockgate" / "controller" / "decide"
    mod.mkdir(parents=True)
    (tmp_path / "lockgate" / "xds").mkdir()
    (tmp_path / "lockgate" / "xds" / "resources.py").write_text("")
    (tmp_path / "lockgate" / "controller" / "tell").mkdir()
    (tmp_path / "lockgate" / "controller" / "tell" / "notify.py").write_text("")
    f = mod / "bad.py"
    f.write_text("from lockgate.routing import TOTAL_WEIGHT_BP\n"
                 "from lockgate.controller.stats import judge\n"
                 "def later():\n    from lockgate.xds import resources\n"
                 "from ..tell import notify\n")
    assert sorted(violations(f, tmp_path)) == ["lockgate.controller.tell.notify", "lockgate.xds.resources"]
    assert part_of("lockgate.controller.decide.promoter") == "decide"
    assert part_of("lockgate.controller.stats.means") == "stats"
