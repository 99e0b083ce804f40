"""The CRDs as code: every fixture in cases/ is checked offline against the generated schema
(OpenAPI structure via jsonschema, `x-kubernetes-validations` via cel-python) and against the
pydantic models the compiler uses; both must agree with the fixture's expectation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from signalbox.core import crdgen
from signalbox.core.models import KINDS

ROOT = Path(__file__).resolve().parents[2]
CASES = sorted((Path(__file__).parent / "cases").glob("*.yaml"))
CRDS = {obj["spec"]["names"]["kind"]: obj for obj in crdgen.definitions().values()}
_CEL = celpy.Environment()


def _path(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def with_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting, which the API server applies before CEL rules run."""
    if isinstance(value, dict):
        out = dict(value)
        for key, sub in schema.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = sub["default"]
            if key in out:
                out[key] = with_defaults(sub, out[key])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [with_defaults(schema["items"], v) for v in value]
    return value


def cel_errors(schema: dict[str, Any], value: Any, path: list[Any]) -> list[str]:
    """Evaluate every x-kubernetes-validations rule on the value it applies to, like the API server."""
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        program = _CEL.program(_CEL.compile(rule["rule"]))
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        # Like the API server: only a boolean true passes; an evaluation error is a failure.
        if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            errors.append(f"{_path(path)}: Invalid value: {rule['message']}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += cel_errors(sub, value[key], [*path, key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                errors += cel_errors(extra, item, [*path, key])
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += cel_errors(schema["items"], item, [*path, i])
    return errors


def crd_errors(obj: dict[str, Any]) -> list[str]:
    schema = CRDS[obj["kind"]]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft4Validator(schema)
    errors = [f"{_path(list(e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    return errors or cel_errors(schema, with_defaults(schema, obj), [])


def model_errors(obj: dict[str, Any]) -> list[str]:
    try:
        KINDS[obj["kind"]].model_validate(obj)
    except ValidationError as exc:
        return [f"{_path(list(e['loc']))}: {e['msg']}" for e in exc.errors()]
    return []


def expectation(case: Path) -> str | None:
    first = case.read_text().splitlines()[0]
    if first.startswith("# expect-error:"):
        return first.split(":", 1)[1].strip()
    assert first == "# expect: valid", f"{case.name}: first line must say what to expect"
    return None


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_fixture_matches_expectation_in_crd_and_models(case: Path):
    obj = yaml.safe_load(case.read_text())
    expected = expectation(case)
    for source, errors in (("CRD", crd_errors(obj)), ("models", model_errors(obj))):
        if expected is None:
            assert errors == [], f"{source}: {errors}"
        else:
            assert any(expected in e for e in errors), f"{source}: expected {expected!r} in {errors}"


def test_there_are_valid_and_invalid_cases_for_every_kind():
    kinds = {(yaml.safe_load(c.read_text())["kind"], expectation(c) is None) for c in CASES}
    assert kinds == {(kind, valid) for kind in ("AIProvider", "RoutingPolicy", "Consumer") for valid in (True, False)}


def test_examples_are_valid_against_the_crds():
    for path in [*(ROOT / "examples").rglob("*.yaml")]:
        for obj in yaml.safe_load_all(path.read_text()):
            if obj and obj.get("kind") in CRDS:
                assert crd_errors(obj) == [], path


@pytest.mark.parametrize("name", sorted(crdgen.definitions()))
def test_committed_crds_are_generated_from_the_models(name: str):
    committed = (ROOT / "crds" / name).read_text()
    assert committed == crdgen.render(crdgen.definitions()[name]), "stale: run `make crds` and commit"


def test_every_spec_field_is_described():
    def walk(schema: dict[str, Any], path: str) -> list[str]:
        missing = []
        for key, sub in schema.get("properties", {}).items():
            if "description" not in sub:
                missing.append(f"{path}.{key}")
            missing += walk(sub, f"{path}.{key}")
        if isinstance(schema.get("items"), dict):
            missing += walk(schema["items"], f"{path}[]")
        return missing

    for kind, crd in CRDS.items():
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        assert walk(spec, f"{kind}.spec") == []


def test_crd_shape_for_kubectl():
    provider, policy = CRDS["AIProvider"], CRDS["RoutingPolicy"]
    assert provider["spec"]["names"]["shortNames"] == ["aip"] and policy["spec"]["names"]["shortNames"] == ["rp"]
    for crd in (provider, policy):
        version = crd["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        assert crd["spec"]["names"]["categories"] == ["signalbox"]
    columns = [c["name"] for c in provider["spec"]["versions"][0]["additionalPrinterColumns"]]
    # Resting: the models the gateways keep requests off for now (status.cooldowns).
    assert columns == ["Type", "Healthy", "Latency", "Models", "Resting", "Age"]
    columns = [c["name"] for c in policy["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Strategy", "Accepted", "Backends", "Budget", "Rollout", "Age"]


@pytest.mark.parametrize("name", sorted(crdgen.definitions()))
def test_crds_are_valid_kubernetes_objects(name: str):
    import kubernetes_validate

    kubernetes_validate.validate(crdgen.definitions()[name], "1.32", strict=True)
