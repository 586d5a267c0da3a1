"""Writes the lock files, requirements/*.txt and services/legacy-sim/requirements.lock: every
third-party package an image or `make install` needs, pinned with its hashes, for CPython 3.11 on
Linux x86_64 (glibc 2.36: Debian bookworm, as in the images and on the development machines).

    python scripts/lock.py              resolve again, keeping the pinned versions that still fit
    python scripts/lock.py --upgrade    take the newest versions the declared ranges allow
    python scripts/lock.py --check      exit 1 if a lock no longer matches what is declared

A lock's inputs are what the repository declares: the `[project].dependencies` and the
`[build-system].requires` of the local packages it covers, and the lines of the requirements
files it names. The local packages themselves are not in the lock: they are installed from the
tree with `--no-deps --no-build-isolation` after it, so that the lock alone decides every
third-party version, the build backend included. Each lock lists its inputs in its header;
tests/deploy/test_build.py compares that list with the declarations, so that a dependency added to
a pyproject without a new lock fails a test.

The dev lock is resolved first and the images' locks are constrained by it: the tests run on the
versions the images ship.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-manylinux_2_36"
INPUTS_HEADING = "# Inputs:"


@dataclass(frozen=True)
class Lock:
    name: str
    purpose: str
    packages: tuple[str, ...]  # local package folders, relative to the repository root
    requirement_files: tuple[str, ...] = ()
    # Where the lock is written, relative to the repository root: requirements/<name>.txt unless
    # the image's build context lies elsewhere.
    location: str = ""

    @property
    def path(self) -> Path:
        return ROOT / (self.location or f"requirements/{self.name}.txt")


COMMON = "libs/common"
SUBMITTER = "services/submitter"
POLLER = "services/poller"
LEGACY_SIM = "services/legacy-sim"
CLI = "tools/registrations"

# The dev lock comes first: the others are resolved within its versions.
LOCKS = (
    Lock("dev", "`make install`: every local package and requirements-dev.txt",
         (COMMON, SUBMITTER, POLLER, LEGACY_SIM, CLI), ("requirements-dev.txt",)),
    Lock("submitter", "the submitter's image (services/pipeline.Dockerfile, with the operator command)",
         (COMMON, SUBMITTER, CLI)),
    Lock("poller", "the poller's image (services/pipeline.Dockerfile)", (COMMON, POLLER)),
    # legacy-sim's image is built from its own folder, which has to hold its lock.
    Lock("legacy-sim", "legacy-sim's image (services/legacy-sim/Dockerfile)", (LEGACY_SIM,),
         location="services/legacy-sim/requirements.lock"),
)


def pyproject(folder: str) -> dict[str, object]:
    with (ROOT / folder / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def local_names() -> set[str]:
    """The distribution names of every local package: never looked up on an index."""
    folders = {folder for lock in LOCKS for folder in lock.packages}
    return {canonicalize_name(pyproject(folder)["project"]["name"]) for folder in folders}  # type: ignore[index]


def requirement_lines(path: Path) -> list[str]:
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            if line.startswith("-"):
                raise SystemExit(f"{path}: options such as {line!r} are not supported in a lock's input")
            out.append(line)
    return out


def inputs(lock: Lock) -> list[str]:
    """The third-party requirements `lock` is resolved from, normalised and sorted."""
    locals_ = local_names()
    found: set[str] = set()
    for folder in lock.packages:
        data = pyproject(folder)
        declared = [*data["build-system"]["requires"], *data["project"].get("dependencies", [])]  # type: ignore[index, attr-defined]
        found.update(line for line in declared if canonicalize_name(Requirement(line).name) not in locals_)
    for name in lock.requirement_files:
        found.update(requirement_lines(ROOT / name))
    normalised = {str(Requirement(line)) for line in found}
    return sorted(normalised, key=lambda r: (canonicalize_name(Requirement(r).name), r))


def header(lock: Lock) -> str:
    lines = [
        f"# The locked third-party packages of {lock.purpose}:",
        f"# pinned with their hashes, for CPython {PYTHON_VERSION} on Linux x86_64 ({PYTHON_PLATFORM}).",
        "# Written by `make lock` (scripts/lock.py, with uv); docs/builds.md says when. Do not edit.",
        "# Install with `pip install --require-hashes -r` this file, then the local packages with --no-deps.",
        "#",
        INPUTS_HEADING,
        *(f"#   {line}" for line in inputs(lock)),
        "#",
    ]
    return "\n".join(lines) + "\n"


def recorded_inputs(path: Path) -> list[str] | None:
    """The inputs a lock file's header lists, or None when it has no such header."""
    lines = path.read_text().splitlines()
    if INPUTS_HEADING not in lines:
        return None
    out = []
    for line in lines[lines.index(INPUTS_HEADING) + 1:]:
        if not line.startswith("#   "):
            break
        out.append(line[4:])
    return out


def compile_lock(lock: Lock, *, upgrade: bool) -> None:
    command = [
        sys.executable, "-m", "uv", "pip", "compile", "-",
        "--output-file", str(lock.path),
        "--generate-hashes", "--no-header", "--no-config", "--quiet",
        "--python-version", PYTHON_VERSION, "--python-platform", PYTHON_PLATFORM,
        "--default-index", "https://pypi.org/simple",
    ]
    if lock.name != "dev":
        command += ["--constraint", str(LOCKS[0].path)]
    if upgrade:
        command.append("--upgrade")
    done = subprocess.run(command, input="\n".join(inputs(lock)) + "\n", text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"uv could not resolve {lock.path.relative_to(ROOT)}")
    lock.path.write_text(header(lock) + lock.path.read_text())


def stale() -> list[str]:
    problems = []
    for lock in LOCKS:
        rel = lock.path.relative_to(ROOT)
        if not lock.path.is_file():
            problems.append(f"{rel} is missing")
        elif recorded_inputs(lock.path) != inputs(lock):
            problems.append(f"{rel} was resolved from other inputs than the repository declares now")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upgrade", action="store_true", help="newest versions the ranges allow")
    parser.add_argument("--check", action="store_true", help="only say whether a lock is stale")
    args = parser.parse_args()
    if args.check:
        problems = stale()
        for problem in problems:
            print(f"lock.py: {problem}: run `make lock`", file=sys.stderr)
        return 1 if problems else 0
    for lock in LOCKS:
        compile_lock(lock, upgrade=args.upgrade)
        print(f"lock.py: wrote {lock.path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
