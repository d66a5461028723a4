"""Every manifest in k8s/ is valid: core kinds against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields are errors), `ray.io/v1` kinds against the
KubeRay CRD's OpenAPI schema pinned in tests/data/kuberay/ (plus a check for fields the
schema does not know, which the API server would silently prune), and the pod templates
inside them against the core PodTemplateSpec. Nothing is fetched."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
CRD_SCHEMAS = {("ray.io/v1", "RayCluster"): REPO / "tests/data/kuberay/raycluster-v1.schema.yaml"}
# gRPC probes are GA since 1.27; check against an older supported release and the newest bundled.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


MANIFESTS = manifests()


def pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    if doc["kind"] == "RayCluster":
        yield "headGroupSpec", doc["spec"]["headGroupSpec"]["template"]
        for group in doc["spec"].get("workerGroupSpecs", []):
            yield f"workerGroupSpecs[{group['groupName']}]", group["template"]
    elif doc["kind"] in ("Deployment", "StatefulSet"):
        yield "template", doc["spec"]["template"]


def unknown_fields(value, schema: dict, path: str = "") -> Iterator[str]:
    """Fields of `value` that `schema` does not declare (structural schemas allow them, and the
    API server drops them without a word: a misspelt field would simply be lost)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        properties = schema.get("properties")
        if properties is None:
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                for key, item in value.items():
                    yield from unknown_fields(item, extra, f"{path}.{key}")
            return
        for key, item in value.items():
            if key in properties:
                yield from unknown_fields(item, properties[key], f"{path}.{key}")
            else:
                yield f"{path}.{key}"
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from unknown_fields(item, schema["items"], f"{path}[{index}]")


def crd_problems(doc: dict) -> list[str]:
    schema = yaml.safe_load(CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])].read_text())
    # OpenAPI v3 schemas are JSON Schema draft 4 plus annotations (x-kubernetes-*, nullable).
    problems = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft4Validator(schema).iter_errors(doc)
    ]
    problems += [f"{field}: not in the {doc['kind']} schema" for field in unknown_fields(doc, schema)]
    return problems


def validate(doc: dict, version: str) -> None:
    if (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS:
        assert crd_problems(doc) == []
    else:
        kubernetes_validate.validate(doc, version, strict=True)
    for where, template in pod_templates(doc):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        try:
            kubernetes_validate.validate(wrapped, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{doc['kind']} {where}: {error}") from None


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name,doc", MANIFESTS, ids=[name for name, _ in MANIFESTS])
def test_manifest_is_valid(name, doc, version):
    validate(doc, version)


def test_validation_catches_mistakes():
    docs = {doc["kind"]: doc for _, doc in MANIFESTS}
    ray = copy.deepcopy(docs["RayCluster"])
    ray["spec"]["workerGroupSpec"] = ray["spec"].pop("workerGroupSpecs")  # misspelt
    ray["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    problems = crd_problems(ray)
    assert any(".spec.workerGroupSpec" in p for p in problems) and any("num-cpus" in p for p in problems), problems
    no_template = copy.deepcopy(docs["RayCluster"])
    del no_template["spec"]["headGroupSpec"]["template"]
    assert any("'template' is a required property" in p for p in crd_problems(no_template))
    bad_pod = copy.deepcopy(docs["RayCluster"])
    bad_pod["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}  # misspelt
    with pytest.raises(AssertionError, match="workerGroupSpecs"):
        validate(bad_pod, KUBERNETES_VERSIONS[0])
    statefulset = copy.deepcopy(docs["StatefulSet"])
    statefulset["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBERNETES_VERSIONS[0], strict=True)


def containers(doc: dict) -> list[dict]:
    return [c for _, template in pod_templates(doc) for c in template["spec"]["containers"]]


def test_the_deployment_has_what_it_needs():
    docs = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in MANIFESTS}
    ray = docs[("RayCluster", "memlm")]
    workers = ray["spec"]["workerGroupSpecs"]
    gpu = [c for g in workers for c in g["template"]["spec"]["containers"]]
    assert gpu and all(c["resources"][k]["nvidia.com/gpu"] == "1" for c in gpu for k in ("requests", "limits"))
    services = [doc for (kind, _), doc in docs.items() if kind == "Service"]
    ports = {port["port"] for service in services for port in service["spec"]["ports"]}
    assert {50051, 50052} <= ports
    store = docs[("StatefulSet", "memlm-store")]
    assert store["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    serve = docs[("Deployment", "memlm-serve")]
    for doc, port in ((store, 50052), (serve, 50051)):
        (container,) = containers(doc)
        assert container["readinessProbe"]["grpc"]["port"] == port
    command = " ".join(containers(serve)[0]["command"])
    assert "--ray" in command and "--store=grpc://memlm-store:50052" in command
    assert "ray://memlm-head-svc:10001" in command  # KubeRay names the head service <cluster>-head-svc
    # The token comes from the Secret everywhere: clients of the model service, store, Ray workers.
    for doc in (store, serve, ray):
        for container in containers(doc):
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["MEMLM_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "memlm-token", "key": "token"}
