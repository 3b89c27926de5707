"""The layout's rules (README "Layout", docs/architecture.md), checked on the source.

Imports point one way::

    ops, tests ──▶ shell ──▶ api, worker, mock_upstream, migrations ──▶ pcq (the core)

Every ``.py`` file of every top-level package is parsed with ``ast``; every import counts,
wherever it is (module level, inside a function, under ``TYPE_CHECKING``). A failure names the
file, the line and the import that breaks the rule, or the modules of a cycle.

SQL only in ``pcq/repositories``: elsewhere no shipped module builds a statement (SQLAlchemy's
``select``, ``insert``, ``update``, ``delete``, ``text``) nor writes one in a string.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each top-level package, and the other first-party packages it may import (itself always).
ALLOWED: dict[str, frozenset[str]] = {
    "pcq": frozenset(),  # the core imports no other package of ours
    "api": frozenset({"pcq"}),
    "worker": frozenset({"pcq"}),
    "mock_upstream": frozenset({"pcq"}),
    "migrations": frozenset({"pcq"}),
    "shell": frozenset({"api", "worker", "mock_upstream", "migrations", "pcq"}),
    # Not shipped: the tests, and the benchmarks (which audit a run with the tests' helper).
    "tests": frozenset({"shell", "api", "worker", "mock_upstream", "migrations", "pcq"}),
    "ops": frozenset({"tests", "shell", "api", "worker", "mock_upstream", "migrations", "pcq"}),
}
SHIPPED = {"pcq", "api", "worker", "mock_upstream", "migrations", "shell"}  # the wheel's packages
NOT_CODE = {"docs", "bench-results", "build", "dist"}


@dataclass(frozen=True)
class Import:
    path: str  # file, relative to the repository
    line: int
    source: str  # the module that imports
    target: str  # the first-party module it imports (the longest one that exists)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.source} imports {self.target}"


def package_of(module: str) -> str:
    return module.split(".", 1)[0]


def module_name(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules (``pcq.db.make_engine`` is
    ``pcq.db``); None for anything not ours (stdlib, third party)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def imports_of(sources: Mapping[str, str]) -> list[Import]:
    """Every first-party import in ``sources`` (repository-relative path -> Python source)."""
    modules = {module_name(p) for p in sources}
    found: list[Import] = []
    for path, text in sorted(sources.items()):
        me = module_name(path)
        is_package = path.endswith("/__init__.py")
        for node in ast.walk(ast.parse(text, filename=path)):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package this module is in
                    base = me.split(".")
                    drop = node.level - (1 if is_package else 0)
                    base = base[: len(base) - drop] if drop else base
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # `from a import b` imports the module a.b when there is one, else a name of a.
                names = [f"{prefix}.{alias.name}" for alias in node.names] or [prefix]
            for name in names:
                target = _resolve(name, modules)
                if target is not None and target != me:
                    found.append(Import(path, node.lineno, me, target))
    return found


def violations(imports: Iterable[Import], allowed: Mapping[str, frozenset[str]] = ALLOWED) -> list[str]:
    out = []
    for imp in imports:
        src, dst = package_of(imp.source), package_of(imp.target)
        if src == dst:
            continue
        if src not in allowed:
            out.append(f"{imp.where}: {src}/ is not in the layout rule (tests/test_layout.py ALLOWED)")
        elif dst not in allowed[src]:
            may = ", ".join(sorted(allowed[src])) or "no other package"
            out.append(f"{imp.where}: {src} may import only {may}")
    return out


def _cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def package_cycles(imports: Iterable[Import]) -> list[str]:
    edges: dict[str, set[str]] = {}
    for imp in imports:
        src, dst = package_of(imp.source), package_of(imp.target)
        if src != dst:
            edges.setdefault(src, set()).add(dst)
    return [" <-> ".join(c) for c in _cycles(edges)]


def module_cycles_between_packages(imports: Iterable[Import]) -> list[str]:
    """Cycles of modules that span more than one package (a cycle inside one package is that
    package's own business)."""
    imports = list(imports)
    edges: dict[str, set[str]] = {}
    for imp in imports:
        edges.setdefault(imp.source, set()).add(imp.target)
    out = []
    for component in _cycles(edges):
        if len({package_of(m) for m in component}) > 1:
            members = set(component)
            links = [i.where for i in imports if i.source in members and i.target in members]
            out.append(" <-> ".join(component) + "\n    " + "\n    ".join(links))
    return out


def first_party_sources() -> dict[str, str]:
    sources: dict[str, str] = {}
    for top in sorted(ROOT.iterdir()):
        if not top.is_dir() or top.name.startswith(".") or top.name in NOT_CODE:
            continue
        if top.name.endswith(".egg-info"):
            continue
        for path in sorted(top.rglob("*.py")):
            sources[path.relative_to(ROOT).as_posix()] = path.read_text(encoding="utf-8")
    return sources


SOURCES = first_party_sources()
IMPORTS = imports_of(SOURCES)

# SQL: where statements may be written, and the few exceptions (path -> what, and why).
SQL_CONSTRUCTORS = frozenset({"select", "insert", "update", "delete", "text"})
SQL_STRING = re.compile(r"\s*(SELECT|INSERT|UPDATE|DELETE|COPY)\s")
SQL_HOMES = ("pcq/repositories/", "pcq/models/", "migrations/")
SQL_EXCEPTIONS: dict[str, frozenset[str]] = {
    # The readiness probe: SELECT 1 on a bare connection checks the database, not any table.
    "api/routes/health.py": frozenset({"text", "SELECT"}),
}


def sql_outside_repositories(sources: Mapping[str, str]) -> list[str]:
    """``path:line: what`` for each statement built (or written as a string) outside the SQL homes."""
    out = []
    for path, source in sorted(sources.items()):
        if path.split("/", 1)[0] not in SHIPPED or path.startswith(SQL_HOMES):
            continue
        allowed = SQL_EXCEPTIONS.get(path, frozenset())
        from_sqlalchemy: set[str] = set()  # names bound to sqlalchemy modules or their members
        found: list[tuple[int, str]] = []
        tree = ast.parse(source, filename=path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if package_of(alias.name) == "sqlalchemy":
                        from_sqlalchemy.add(alias.asname or package_of(alias.name))
            elif isinstance(node, ast.ImportFrom) and package_of(node.module or "") == "sqlalchemy":
                for alias in node.names:
                    if alias.name in SQL_CONSTRUCTORS:
                        found.append((node.lineno, alias.name))
                    from_sqlalchemy.add(alias.asname or alias.name)
        prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}  # docstrings
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in SQL_CONSTRUCTORS
                and isinstance(node.value, ast.Name)
                and node.value.id in from_sqlalchemy
            ):
                found.append((node.lineno, f"{node.value.id}.{node.attr}"))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
                match = SQL_STRING.match(node.value)
                if match:
                    found.append((node.lineno, match.group(1)))
        out += [f"{path}:{line}: {what}" for line, what in sorted(found) if what not in allowed]
    return out


def test_every_package_with_python_code_is_in_the_rule() -> None:
    unknown = sorted({p.split("/", 1)[0] for p in SOURCES} - set(ALLOWED))
    assert not unknown, f"top-level packages missing from the layout rule (ALLOWED): {unknown}"


def test_imports_point_one_way() -> None:
    bad = violations(IMPORTS)
    assert not bad, "imports that break the layout rule (README, Layout):\n" + "\n".join(bad)


def test_no_cycle_between_packages() -> None:
    assert not package_cycles(IMPORTS)
    cycles = module_cycles_between_packages(IMPORTS)
    assert not cycles, "modules of different packages that import each other:\n" + "\n".join(cycles)


def test_the_rule_itself_has_no_cycle() -> None:
    edges = {pkg: set(may) for pkg, may in ALLOWED.items()}
    assert not _cycles(edges)
    for pkg in SHIPPED:
        assert not ALLOWED[pkg] & {"tests", "ops"}, f"{pkg} is shipped: it may not import tests or ops"


def test_sql_is_written_only_in_the_repositories() -> None:
    bad = sql_outside_repositories(SOURCES)
    assert not bad, "SQL outside pcq/repositories (move it into a repository there):\n" + "\n".join(bad)


def test_the_sql_checker_finds_what_it_must() -> None:
    found = sql_outside_repositories(
        {
            "api/a.py": "from sqlalchemy import select, func\nq = select(func.count())\n",
            "api/b.py": "import sqlalchemy as sa\nq = sa.update(t)\n",
            "pcq/c.py": "from sqlalchemy.dialects import postgresql\nq = postgresql.insert(t)\n",
            "pcq/d.py": "def f(table):\n    return f'COPY {table} FROM STDIN'\n",
            "worker/e.py": "from sqlalchemy import text as sql\n",
            "pcq/repositories/jobs.py": "from sqlalchemy import select, update\n",
            "migrations/env.py": "from sqlalchemy import text\nq = text('SELECT 1')\n",
            "api/routes/health.py": "from sqlalchemy import text\nq = text('SELECT 1')\n",
            "tests/f.py": "from sqlalchemy import select\n",
            "pcq/g.py": "from sqlalchemy import and_, or_\nx = 'SELECTED'\n",
            "pcq/h.py": 'def f():\n    """COPY is cheaper than INSERT."""\n',
        }
    )
    assert found == [
        "api/a.py:1: select",
        "api/b.py:2: sa.update",
        "pcq/c.py:2: postgresql.insert",
        "pcq/d.py:2: COPY",
        "worker/e.py:1: text",
    ]


def test_the_wheel_and_mypy_cover_exactly_the_shipped_packages() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {pattern.removesuffix("*") for pattern in include} == SHIPPED
    assert set(pyproject["tool"]["mypy"]["packages"]) == SHIPPED
    assert pyproject["project"]["scripts"]["pcq"] == "shell.cli:main"


def test_the_checker_finds_what_it_must() -> None:
    """The old layout's faults, in miniature: the core imported the migrations and the shell
    (its CLI lived in pcq/), the migrations imported the core back."""
    old = {
        "pcq/__init__.py": "",
        "pcq/db.py": "import sqlalchemy\n",
        "pcq/migrate.py": "import migrations\n",
        "pcq/cli.py": "def f():\n    from api.app import create_app\n",
        "api/__init__.py": "",
        "api/app.py": "from pcq import db\nfrom . import routes\n",
        "api/routes.py": "from ..worker import engine\n",
        "worker/__init__.py": "",
        "worker/engine.py": "import typing\nif typing.TYPE_CHECKING:\n    from api.app import x\n",
        "migrations/__init__.py": "",
        "migrations/env.py": "from pcq.db import make_engine\n",
    }
    found = imports_of(old)
    assert {(i.source, i.target) for i in found} == {
        ("pcq.migrate", "migrations"),
        ("pcq.cli", "api.app"),
        ("api.app", "pcq.db"),
        ("api.app", "api.routes"),
        ("api.routes", "worker.engine"),
        ("worker.engine", "api.app"),
        ("migrations.env", "pcq.db"),
    }
    bad = violations(found)
    assert any(b.startswith("pcq/migrate.py:1: pcq.migrate imports migrations") for b in bad)
    assert any(b.startswith("pcq/cli.py:2: pcq.cli imports api.app") for b in bad)
    assert any(b.startswith("api/routes.py:1: api.routes imports worker.engine") for b in bad)
    assert any(b.startswith("worker/engine.py:3: worker.engine imports api.app") for b in bad)
    assert len(bad) == 4
    assert set(package_cycles(found)) == {"api <-> migrations <-> pcq <-> worker"}
    cycles = module_cycles_between_packages(found)
    assert len(cycles) == 1
    assert cycles[0].startswith("api.app <-> api.routes <-> worker.engine")
