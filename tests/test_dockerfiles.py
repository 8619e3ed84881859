"""The Dockerfiles, checked without a Docker engine: what they copy exists, what they pin
matches pyproject.toml, they run as non-root, and their entrypoints are installed."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "Dockerfiles").glob("*.Dockerfile"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    out = []
    for line in logical:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def copy_sources(args: str) -> list[str]:
    parts = [p for p in shlex.split(args) if not p.startswith("--")]
    return parts[:-1]


def exec_form(args: str) -> list[str]:
    return [t.strip().strip('"') for t in args.strip("[] ").split(",")]


def torch_pin() -> str:
    pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    return pin.split("==")[1]


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["component.Dockerfile", "serving.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_and_is_in_the_build_context(dockerfile: Path):
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    assert "*" in ignore  # everything else stays out of the context
    copies = [a for i, a in instructions(dockerfile) if i == "COPY"]
    assert copies
    for args in copies:
        assert "--from" not in args
        for src in copy_sources(args):
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
            clean = src.rstrip("/")
            assert any(clean == a or clean.startswith(a + "/") for a in allowed), (
                f"{dockerfile.name}: COPY {src} is excluded by its .dockerignore"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_python_and_cpu_torch_match_pyproject(dockerfile: Path):
    ins = instructions(dockerfile)
    base = next(a for i, a in ins if i == "FROM")
    python = re.match(r"python:(\d+\.\d+)-slim", base)
    assert python, base
    assert PYPROJECT["project"]["requires-python"].startswith(f">={python.group(1)}")
    torch_runs = [a for i, a in ins if i == "RUN" and "torch==" in a]
    assert len(torch_runs) == 1
    assert f"torch=={torch_pin()}" in torch_runs[0]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_runs[0]
    # torch is installed before the project, so the project's pin finds it satisfied.
    runs = [a for i, a in ins if i == "RUN"]
    project = next(k for k, a in enumerate(runs) if re.search(r'pip install "\.\[', a))
    assert runs.index(torch_runs[0]) < project


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_installs_the_project_with_existing_extras(dockerfile: Path):
    runs = " ".join(a for i, a in instructions(dockerfile) if i == "RUN")
    extras = re.findall(r'pip install "\.\[([a-z,]+)\]"', runs)
    assert extras, "the project itself must be installed"
    for extra in extras[0].split(","):
        assert extra in PYPROJECT["project"]["optional-dependencies"], extra


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root_with_a_workdir(dockerfile: Path):
    ins = instructions(dockerfile)
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(i == "WORKDIR" for i, _ in ins)
    last_user = max(k for k, (i, _) in enumerate(ins) if i == "USER")
    assert not any(i == "RUN" and "pip install" in a for i, a in ins[last_user:])


def test_component_image_entrypoint_is_the_genco_console_script():
    ins = instructions(ROOT / "Dockerfiles" / "component.Dockerfile")
    cmd = exec_form(next(a for i, a in ins if i == "CMD"))
    assert cmd[0] == "genco"
    module, func = PYPROJECT["project"]["scripts"]["genco"].split(":")
    assert callable(getattr(__import__(module, fromlist=[func]), func))
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert "pipeline" in re.findall(r'"\.\[([a-z,]+)\]"', runs)[0].split(",")
    assert any(
        d.startswith("kfp==") for d in PYPROJECT["project"]["optional-dependencies"]["pipeline"]
    )


def test_serving_image_starts_torchserve_on_files_it_has():
    ins = instructions(ROOT / "Dockerfiles" / "serving.Dockerfile")
    entry = exec_form(next(a for i, a in ins if i == "ENTRYPOINT"))
    assert entry[:3] == ["torchserve", "--start", "--foreground"]
    serve_deps = PYPROJECT["project"]["optional-dependencies"]["serve"]
    assert any(d.startswith("torchserve==") for d in serve_deps)
    config = entry[entry.index("--ts-config") + 1]
    store = entry[entry.index("--model-store") + 1]
    copied = {shlex.split(a)[-1]: copy_sources(a) for i, a in ins if i == "COPY"}
    assert config in copied, "the TorchServe config is copied into the image"
    props = dict(
        line.split("=", 1)
        for line in (ROOT / copied[config][0]).read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert props["model_store"] == store
    log4j = props["vmargs"].split("file://")[1]
    assert log4j in copied
    assert any(i == "RUN" and f"mkdir -p {store}" in a for i, a in ins)
    assert any(i == "RUN" and "openjdk-17-jre-headless" in a for i, a in ins)
    assert (ROOT / "serving").is_dir()
