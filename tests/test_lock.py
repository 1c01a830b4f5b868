"""requirements/lock.txt agrees with pyproject.toml.

scripts/setup.sh installs the lock as pip constraints. A dependency added to pyproject.toml and
not to the lock would be resolved unpinned (and could bring the resolver's backtracking back);
one removed from pyproject.toml but left in the lock is a stale pin. Either way the fix is
`bash scripts/lock.sh`, which these tests name.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements" / "lock.txt"
PROJECT = "whisper-german-trainer"
# Left out of the lock on purpose (scripts/setup.sh keeps the machine's own build).
UNLOCKED = {"torch"}
# The Pythons the lock promises to cover (requires-python >= 3.11, resolved --universal).
PYTHONS = ("3.11", "3.12", "3.13")
FIX = "run `bash scripts/lock.sh` and commit requirements/lock.txt"


def declared_requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines.extend(extra)
    requirements: dict[str, list[Requirement]] = {}
    for line in lines:
        requirement = Requirement(line)
        requirements.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    return requirements


def locked_pins() -> dict[str, list[tuple[Version, Marker | None]]]:
    """Each pinned distribution with its versions; --universal may pin one per Python range."""
    pins: dict[str, list[tuple[Version, Marker | None]]] = {}
    for line in LOCK.read_text().splitlines():
        if not line or line[0] in "# -":
            continue
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"lock line not pinned with ==: {line!r}"
        name = canonicalize_name(requirement.name)
        pins.setdefault(name, []).append((Version(specifier.version), requirement.marker))
    return pins


def direct_in_lock() -> set[str]:
    """The distributions the lock says it holds because pyproject.toml asks for them."""
    direct, current = set(), None
    for line in LOCK.read_text().splitlines():
        pinned = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
        if pinned:
            current = canonicalize_name(pinned.group(1))
        elif current and f"{PROJECT} (pyproject.toml)" in line:
            direct.add(current)
    return direct


def pins_for(pins, python: str) -> list[Version]:
    environment = {"python_version": python, "python_full_version": f"{python}.0"}
    return [v for v, marker in pins if marker is None or marker.evaluate(environment)]


def test_every_declared_dependency_is_pinned_within_its_range():
    pins = locked_pins()
    problems = []
    for name, requirements in declared_requirements().items():
        if name in UNLOCKED:
            assert name not in pins, f"{name} must stay out of the lock (scripts/setup.sh)"
            continue
        if name not in pins:
            problems.append(f"{name}: declared in pyproject.toml, missing from the lock")
            continue
        for python in PYTHONS:
            versions = pins_for(pins[name], python)
            if len(versions) != 1:
                problems.append(f"{name}: {len(versions)} pins apply on Python {python}")
                continue
            for requirement in requirements:
                if not requirement.specifier.contains(versions[0], prereleases=True):
                    problems.append(
                        f"{name}: lock pins {versions[0]}, pyproject.toml asks {requirement}"
                    )
    assert not problems, "\n".join(problems + [FIX])


def test_the_lock_was_resolved_from_todays_pyproject():
    # A new dependency the lock pins only by chance (as some other package's dependency) is not
    # in the resolution that scripts/lock.sh would write now: its version was never checked
    # against pyproject.toml's range, and its annotation still says who asked for it.
    declared = set(declared_requirements()) - UNLOCKED
    direct = direct_in_lock()
    assert direct, "the lock's annotations are gone: was it written by scripts/lock.sh?"
    added, dropped = sorted(declared - direct), sorted(direct - declared)
    assert not added, f"in pyproject.toml, not resolved into the lock as such: {added}; {FIX}"
    assert not dropped, f"pinned as direct but no longer in pyproject.toml: {dropped}; {FIX}"


def test_the_lock_names_the_command_that_regenerates_it():
    header = LOCK.read_text().splitlines()[:3]
    assert any("bash scripts/lock.sh" in line for line in header), header


@pytest.mark.parametrize("name", sorted(UNLOCKED))
def test_unlocked_packages_pull_nothing_of_their_own(name):
    # torch's CUDA wheels are what makes a bare torch requirement cost gigabytes.
    # (nvidia-ml-py, NVML's pure-Python bindings for the system metrics, is not one of them.)
    cuda_wheels = ("nvidia-cu", "nvidia-nccl", "nvidia-nv", "triton")
    cuda = [n for n in locked_pins() if n.startswith(cuda_wheels)]
    assert not cuda, f"CUDA packages in the lock (left by {name}?): {cuda}"
