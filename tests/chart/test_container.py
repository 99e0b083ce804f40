"""The container build file is reviewed, not built, here (no Docker engine): check the
properties the chart depends on."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "containers" / "Dockerfile").read_text()


def test_image_installs_the_pinned_package_as_the_chart_user():
    assert "-c constraints.txt" in DOCKERFILE and "-c /tmp/constraints.txt signalbox" in DOCKERFILE
    assert "USER 65532:65532" in DOCKERFILE
    helpers = (ROOT / "helm" / "signalbox" / "templates" / "_helpers.tpl").read_text()
    assert "runAsUser: 65532" in helpers
    assert 'ENTRYPOINT ["signalbox"]' in DOCKERFILE
    for folder in ("src/", "extproc/", "operator/"):
        assert f"COPY {folder} {folder}" in DOCKERFILE


def test_base_images_are_pinned():
    bases = [line.split()[1] for line in DOCKERFILE.splitlines() if line.startswith("FROM ")]
    assert bases and all(":" in b and not b.endswith(":latest") for b in bases)


def test_constraints_pin_every_runtime_dependency():
    pinned = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("_", "-") for d in deps}
    assert names <= pinned, names - pinned
