"""The images' and the development install's supply chain, checked offline: every base image is
pinned by digest, every pip install in a Dockerfile takes third-party packages only from a lock
with --require-hashes, and every lock was resolved from what the repository declares now.

The locks are written by scripts/lock.py (`make lock`); each lists its inputs in its header. A
pyproject or requirements-dev.txt that gains, drops or changes a requirement without a new lock
fails `test_every_lock_was_resolved_from_the_declared_inputs`.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_compose import instructions

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "services" / "pipeline.Dockerfile"
LEGACY_SIM = ROOT / "services" / "legacy-sim" / "Dockerfile"
DOCKERFILES = (PIPELINE, LEGACY_SIM)
PINNED = re.compile(r"(?P<image>[a-z0-9./-]+):(?P<tag>[A-Za-z0-9._-]+)@sha256:[0-9a-f]{64}")
PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+) \\$")


def load_lock_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("regbridge_lock_script", ROOT / "scripts" / "lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


lock_script = load_lock_module()
LOCKS = {lock.name: lock for lock in lock_script.LOCKS}


def pins(path: Path) -> dict[str, tuple[str, int]]:
    """A lock's pins: canonical name -> (version, number of hashes)."""
    found: dict[str, tuple[str, int]] = {}
    name = ""
    for line in path.read_text().splitlines():
        if match := PIN.match(line):
            name = canonicalize_name(match["name"])
            found[name] = (match["version"], 0)
        elif line.strip().startswith("--hash=sha256:") and name:
            version, hashes = found[name]
            found[name] = (version, hashes + 1)
        elif line and not line.startswith(("#", " ")):
            pytest.fail(f"{path.name}: not a pinned requirement with hashes: {line!r}")
    return found


# ---- base images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_base_image_is_pinned_by_digest(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    stage_names = {args.partition(" AS ")[2].strip() for kw, args in steps if kw == "FROM"} - {""}
    bases = [args.partition(" AS ")[0].strip() for kw, args in steps if kw == "FROM"]
    external = [base for base in bases if base not in stage_names and not base.startswith("${")]
    assert external
    for base in external:
        match = PINNED.fullmatch(base)
        assert match, f"{base} is not pinned by digest (scripts/pin-base-images.sh pins it)"
        # A tag that names one release, so that the tag and the digest say the same thing.
        assert re.fullmatch(r"3\.11\.\d+-slim-bookworm", match["tag"]), base
    # A stage that starts from a build argument only picks one of this file's own stages.
    for base in bases:
        if base.startswith("${"):
            assert dockerfile == PIPELINE and base == "${SERVICE}"
            assert {"submitter", "poller"} <= stage_names


def test_all_images_share_one_base() -> None:
    bases = {args.partition(" AS ")[0].strip() for dockerfile in DOCKERFILES
             for kw, args in instructions(dockerfile) if kw == "FROM" and "@sha256:" in args}
    assert len(bases) == 1, bases


# ---- pip in the Dockerfiles ------------------------------------------------------------------------


def pip_installs(dockerfile: Path, service: str) -> list[list[str]]:
    """The arguments of every `pip install` the Dockerfile runs, SERVICE substituted."""
    out = []
    for kw, args in instructions(dockerfile):
        if kw != "RUN":
            continue
        args = args.replace("${SERVICE}", service).replace('"', "")
        # `if [ a = b ]; then ...; fi`: the command runs only when the two words are equal.
        args = re.sub(r"if \[ (\S+) = (\S+) \]; then (.*?); fi",
                      lambda m: m[3] if m[1] == m[2] else "true", args)
        for part in re.split(r"&&|;", args):
            words = part.split()
            if words[:2] == ["pip", "install"]:
                out.append(words[2:])
    return out


IMAGES = [(PIPELINE, "submitter"), (PIPELINE, "poller"), (LEGACY_SIM, "legacy-sim")]


@pytest.mark.parametrize(("dockerfile", "image"), IMAGES, ids=[image for _, image in IMAGES])
def test_images_install_third_party_packages_only_from_their_lock(dockerfile: Path, image: str) -> None:
    installs = pip_installs(dockerfile, image)
    context = ROOT if dockerfile == PIPELINE else dockerfile.parent
    lock = LOCKS[image]
    (locked,) = [words for words in installs if "--require-hashes" in words]
    assert locked[locked.index("-r") + 1] in (str(lock.path.relative_to(context)),), locked
    assert lock.path.is_file()
    copies = " ".join(args.replace("${SERVICE}", image) for kw, args in instructions(dockerfile) if kw == "COPY")
    assert str(lock.path.relative_to(context)) in copies, "the lock is not copied into the build"
    # Everything else installs local folders of the context, without their dependencies.
    for words in installs:
        if words is locked:
            continue
        assert "--no-deps" in words and "--no-build-isolation" in words, words
        paths = [word for word in words if not word.startswith("-")]
        assert paths and all(word.startswith("./") or word == "." for word in paths), words
    # The lock covers exactly the local packages the image installs.
    installed = {str((context / word).resolve().relative_to(ROOT)) for words in installs if words is not locked
                 for word in words if not word.startswith("-")}
    assert installed == set(lock.packages)


def test_only_the_submitter_image_gets_the_operator_command() -> None:
    (guarded,) = [args for kw, args in instructions(PIPELINE) if kw == "RUN" and "tools/registrations" in args]
    assert re.search(r'if \[ "\$\{SERVICE\}" = submitter \]; then pip install [^;]*\./tools/registrations', guarded)
    assert "tools/registrations" in LOCKS["submitter"].packages
    assert "tools/registrations" not in LOCKS["poller"].packages


def test_pipeline_build_context_lets_the_locks_and_the_command_in() -> None:
    text = PIPELINE.with_name(PIPELINE.name + ".dockerignore").read_text()
    allowed = {line.strip()[1:] for line in text.splitlines() if line.strip().startswith("!")}
    assert {"requirements/submitter.txt", "requirements/poller.txt", "tools/registrations/pyproject.toml",
            "tools/registrations/src"} <= allowed
    assert "requirements/dev.txt" not in allowed


def test_legacy_sim_context_keeps_its_lock() -> None:
    ignore = (LEGACY_SIM.parent / ".dockerignore").read_text().splitlines()
    assert not any(line.strip() in ("*", "requirements.lock", "*.lock") for line in ignore)


# ---- the locks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOCKS)
def test_every_lock_was_resolved_from_the_declared_inputs(name: str) -> None:
    lock = LOCKS[name]
    assert lock.path.is_file(), f"{lock.path} is missing: run `make lock`"
    assert lock_script.recorded_inputs(lock.path) == lock_script.inputs(lock), \
        f"{lock.path.relative_to(ROOT)} is stale: a declared dependency changed; run `make lock`"


@pytest.mark.parametrize("name", LOCKS)
def test_every_pin_has_hashes_and_meets_its_input(name: str) -> None:
    lock = LOCKS[name]
    found = pins(lock.path)
    assert all(hashes for _, hashes in found.values()), "a pin without --hash fails --require-hashes"
    local = lock_script.local_names()
    assert not local & set(found), "local packages are installed from the tree, not from the lock"
    for line in lock_script.inputs(lock):
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"python_version": "3.11"}):
            continue
        key = canonicalize_name(requirement.name)
        assert key in found, f"{line} is declared but not locked"
        assert requirement.specifier.contains(found[key][0], prereleases=True), (line, found[key][0])


def test_pytest_stays_below_9_2_in_the_dev_lock() -> None:
    version = pins(LOCKS["dev"].path)["pytest"][0]
    assert tuple(int(part) for part in version.split(".")[:2]) < (9, 2), version


@pytest.mark.parametrize("name", [name for name in LOCKS if name != "dev"])
def test_images_run_the_versions_the_tests_run(name: str) -> None:
    dev = pins(LOCKS["dev"].path)
    for package, (version, _) in pins(LOCKS[name].path).items():
        assert dev.get(package, (None,))[0] == version, f"{name}: {package}=={version}, dev has {dev.get(package)}"


def test_the_staleness_check_catches_a_new_dependency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies the declarations and the locks, adds a dependency to the poller, and expects the
    poller's and the dev lock to be reported stale, and only those."""
    for lock in lock_script.LOCKS:
        for folder in lock.packages:
            (tmp_path / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / folder / "pyproject.toml", tmp_path / folder / "pyproject.toml")
        for name in lock.requirement_files:
            shutil.copy(ROOT / name, tmp_path / name)
        target = tmp_path / lock.path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lock.path, target)
    monkeypatch.setattr(lock_script, "ROOT", tmp_path)
    before = {problem.split()[0] for problem in lock_script.stale()}

    pyproject = tmp_path / "services" / "poller" / "pyproject.toml"
    text = pyproject.read_text()
    assert "\ndependencies = [" in text
    pyproject.write_text(text.replace("\ndependencies = [", '\ndependencies = ["a-dependency-nobody-locked>=1", ', 1))
    after = {problem.split()[0] for problem in lock_script.stale()}
    assert after - before == {"requirements/dev.txt", "requirements/poller.txt"} - before
    assert {"requirements/dev.txt", "requirements/poller.txt"} <= after
    assert "requirements/submitter.txt" not in after - before
