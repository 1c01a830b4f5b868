"""pyproject.toml declares what the code imports, and the code imports what pyproject declares.

Every Python file of the packages, scripts, benchmarks and tests is read as an AST (nothing is
imported). A third-party module counts as used when a file imports it, asks for it by name
(`importlib.import_module`, `pytest.importorskip`) or runs it with `-m` (a subprocess command).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("shard_builder", "trainer", "scripts", "bench", "tests")

# Import names that differ from their distribution's name, for when that distribution is not
# installed here (installed ones are looked up with importlib.metadata).
DISTRIBUTION_OF = {
    "dotenv": "python-dotenv",
    "pynvml": "nvidia-ml-py",
    "wids": "webdataset",  # a module of the webdataset 0.2.x distribution, not on PyPI itself
}

# Modules that load a distribution other than their own.
LOADS = {"torch.utils.tensorboard": "tensorboard"}  # SummaryWriter needs the tensorboard package

# Declared, and rightly never imported by this repository's Python files.
NOT_IMPORTED = {
    # fsspec imports its backends itself, chosen by the URL's scheme.
    "s3fs": "fsspec's s3:// backend",
    "gcsfs": "fsspec's gs:// backend",
    "aiohttp": "fsspec's http:// and https:// backend",
    "ruff": "a command-line tool (scripts/test.sh runs `python -m ruff`)",
}

# The modules of trainer/ and shard_builder/ that may import an extra's distributions; every
# other module of the two packages imports core dependencies only, so that `pip install -e .`
# trains (and checks shards) without any extra.
EXTRA_USERS = {
    "builder": ("shard_builder/audio.py", "shard_builder/source.py", "shard_builder/inspect.py"),
    # Publishing ships what the export made: the model card and the upload use huggingface_hub.
    "export": (
        "trainer/export.py",
        "trainer/decoding/ct2_backend.py",
        # RealtimeSTT's decoding modes run the export through faster-whisper.
        "trainer/decoding/realtime_modes.py",
        "trainer/model_card.py",
        "trainer/publish.py",
    ),
    # The shard storage layer (landing in parallel) may name the backends it opens.
    "remote": ("shard_builder/storage.py",),
    "wandb": ("trainer/watch/wandb_sink.py",),
}
PACKAGES = ("shard_builder/", "trainer/")

BY_NAME = {"import_module", "importorskip", "__import__"}  # calls whose first argument is a module
RUN_WITH_M = re.compile(r"(?:^|\s)-m\s+([A-Za-z_][\w.]*)")


@dataclass(frozen=True)
class Use:
    file: str  # relative to the repository
    module: str  # the top-level module (or the LOADS entry) that needs the distribution
    distributions: frozenset[str]  # canonical names; any one of them provides the module


def canonical(name: str) -> str:
    """A distribution's name as PyPI compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(source: str) -> set[str]:
    """Absolute module names a Python source imports, asks for by name or runs with -m."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Call):
            modules.update(_modules_named_by_call(node))
        elif isinstance(node, ast.List | ast.Tuple):
            modules.update(_modules_run_with_m(node.elts))
    return modules


def _modules_named_by_call(node: ast.Call) -> set[str]:
    function = node.func
    name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
    texts = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if name in BY_NAME:
        return set(texts[:1])
    # A whole command line in one string: subprocess.run("python -m moto.server", shell=True)
    return {match for text in texts for match in RUN_WITH_M.findall(text)}


def _modules_run_with_m(elements: list[ast.expr]) -> set[str]:
    """[sys.executable, "-m", "moto.server", ...]: the module after "-m"."""
    values = [e.value if isinstance(e, ast.Constant) else None for e in elements]
    return {
        module
        for flag, module in zip(values, values[1:], strict=False)
        if flag == "-m" and isinstance(module, str)
    }


def is_local(top: str, file: Path) -> bool:
    """The project's own packages, modules beside the importing file (bench_common), and the
    scripts a benchmark puts on its path (bench/make_bench_corpus.py: make_demo_corpus)."""
    return any(
        (folder / top).is_dir() or (folder / f"{top}.py").is_file()
        for folder in (REPO, file.parent, REPO / "scripts")
    )


def distributions_of(module: str, installed: dict[str, list[str]]) -> frozenset[str]:
    top = module.split(".")[0]
    names = installed.get(top) or [DISTRIBUTION_OF.get(top, top)]
    return frozenset(canonical(name) for name in names)


@cache
def scan() -> tuple[Use, ...]:
    installed = importlib.metadata.packages_distributions()
    uses = set()
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            for module in imported_modules(path.read_text(encoding="utf-8")):
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or is_local(top, path):
                    continue
                uses.add(Use(relative, top, distributions_of(module, installed)))
                for prefix, loaded in LOADS.items():
                    if module == prefix or module.startswith(prefix + "."):
                        uses.add(Use(relative, prefix, frozenset({canonical(loaded)})))
    return tuple(sorted(uses, key=lambda use: (use.file, use.module)))


@cache
def declared() -> dict[str, frozenset[str]]:
    """Canonical distribution name -> the groups declaring it ("core" or an extra's name)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project.get("optional-dependencies", {})}
    result: dict[str, set[str]] = defaultdict(set)
    for group, requirements in groups.items():
        for requirement in requirements:
            name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group()
            result[canonical(name)].add(group)
    return {name: frozenset(found) for name, found in result.items()}


# --- the tests --------------------------------------------------------------------------------


def test_the_scanner_finds_every_kind_of_use():
    source = "\n".join(
        [
            "import os, numpy.linalg as la",
            "from . import sibling",
            "from torch.utils.tensorboard import SummaryWriter",
            "def later():",
            "    import yaml",
            "    datasets = pytest.importorskip('datasets')",
            "    importlib.import_module('soxr')",
            "    subprocess.Popen([sys.executable, '-m', 'moto.server', '-p', '0'])",
            "    subprocess.run('python -m jiwer.cli --help', shell=True)",
            "    run(['-m'])",
        ]
    )
    assert imported_modules(source) == {
        "os",
        "numpy.linalg",
        "torch.utils.tensorboard",
        "yaml",
        "datasets",
        "soxr",
        "moto.server",
        "jiwer.cli",
    }


def test_the_scan_of_the_repository_sees_known_imports():
    """Guards the tests below against passing on an empty scan."""
    uses = {(use.file, name) for use in scan() for name in use.distributions}
    assert ("trainer/loop.py", "torch") in uses
    assert ("shard_builder/audio.py", "soundfile") in uses
    assert ("trainer/watch/metrics.py", "tensorboard") in uses  # through torch.utils.tensorboard
    assert ("shard_builder/config.py", "python-dotenv") in uses
    tops = {use.module.split(".")[0] for use in scan()}
    assert not tops & {"trainer", "shard_builder", "tests", "bench_common", "json", "__future__"}


def test_every_imported_distribution_is_declared():
    problems = sorted(
        f"{use.file} imports {use.module}, but pyproject.toml declares none of "
        f"{sorted(use.distributions)} (add it to dependencies or to the extra that file needs)"
        for use in scan()
        if not use.distributions & declared().keys()
    )
    assert not problems, "\n".join(problems)


def test_every_declared_distribution_is_used():
    used = {name for use in scan() for name in use.distributions}
    unused = declared().keys() - used - NOT_IMPORTED.keys()
    problems = [
        f"{name} is declared in pyproject.toml ({', '.join(sorted(declared()[name]))}) but "
        + "nothing imports it"
        + " (drop it, or list it in NOT_IMPORTED with the reason)"
        for name in sorted(unused)
    ]
    assert not problems, "\n".join(problems)


def test_the_explicit_lists_name_declared_distributions_and_real_extras():
    stale = NOT_IMPORTED.keys() - declared().keys()
    assert not stale, f"listed in this test but not declared in pyproject.toml: {sorted(stale)}"
    groups = set().union(*declared().values())
    assert EXTRA_USERS.keys() <= groups, f"no such extra: {EXTRA_USERS.keys() - groups}"


def test_what_only_the_tests_use_is_in_the_dev_extra():
    """Users should not install test tools: webdataset in the core list was such a case."""
    files = defaultdict(set)
    for use in scan():
        for name in use.distributions:
            files[name].add(use.file)
    misplaced = sorted(
        f"{name} ({', '.join(sorted(declared()[name]))}) is used only by {', '.join(sorted(users))}"
        for name, users in files.items()
        if name in declared()
        and all(f.startswith("tests/") for f in users)
        and "dev" not in declared()[name]
    )
    assert not misplaced, "declare these in the dev extra:\n" + "\n".join(misplaced)


def test_packages_use_core_dependencies_except_where_an_extra_is_documented():
    problems = []
    for use in scan():
        if not use.file.startswith(PACKAGES):
            continue
        allowed = {"core"} | {extra for extra, files in EXTRA_USERS.items() if use.file in files}
        groups = set().union(*(declared().get(name, ()) for name in use.distributions))
        if groups and not groups & allowed:
            problems.append(
                f"{use.file} imports {use.module}, which only the {', '.join(sorted(groups))} "
                f"extra provides: that file may use {', '.join(sorted(allowed))} (move the import "
                "into a module the extra is for, or declare the package in dependencies)"
            )
    assert not problems, "\n".join(sorted(problems))
