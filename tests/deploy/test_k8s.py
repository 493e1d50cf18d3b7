# Intent: k8s/ manifests are schema-valid, hardened, probed, wired, and ship gateway/envoy.yaml.
from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from services.core.metrics import Peer
from services.core.settings import METRICS_PORTS
from tests.deploy.conftest import (
    ENVOY_YAML,
    INBOUND,
    K8S_DIR,
    PROCESSES,
    REPO_ROOT,
    SUBMISSION,
    WEBHOOK_DISPATCHER,
    DeployTools,
)

# Oldest supported release (the preStop `sleep` action is on by default from 1.30) and the
# newest release whose schemas kubernetes-validate bundles.
K8S_VERSIONS = ("1.30", "1.37")
SECRET_NAME = "azora-secrets"
SECRET_KEYS = {"JWT_SECRET", "AZORA_SERVICE_TOKEN_SECRET", "AZORA_SECRETS_KEY", "MONGODB_URI"}
APP_IMAGE = "azora-email-hosting"
GENERATOR = REPO_ROOT / "scripts" / "gen_k8s_envoy_config.py"


def manifest_files() -> list[str]:
    """The manifests: every k8s/*.yaml except the kustomization."""
    return sorted(p.name for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def objects(deploy_tools: DeployTools) -> list[dict[str, Any]]:
    """Every object of every manifest, in file order."""
    result = []
    for name in manifest_files():
        for document in deploy_tools.yaml(K8S_DIR / name):
            assert isinstance(document, dict), name
            document["__file__"] = name
            result.append(document)
    return result


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """Objects of one kind by name."""
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(Deployment name, pod spec) of every Deployment."""
    for name, deployment in of_kind(objects, "Deployment").items():
        yield name, deployment["spec"]["template"]["spec"]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a matchLabels-style selector selects a set of labels."""
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_kubernetes_schemas(deploy_tools: DeployTools, version: str) -> None:
    errors = deploy_tools.check("k8s-schema", version, *(K8S_DIR / n for n in manifest_files()))
    assert errors == []


def test_schema_check_is_strict(deploy_tools: DeployTools, tmp_path: Any) -> None:
    # Unknown fields are errors (strict schemas), not silently ignored as `kubectl apply` might.
    broken = tmp_path / "domain.yaml"
    broken.write_text(
        (K8S_DIR / "domain.yaml").read_text().replace("readOnlyRootFilesystem", "readOnlyRoot", 1)
    )
    (error,) = deploy_tools.check("k8s-schema", K8S_VERSIONS[0], broken)
    assert "readOnlyRoot" in error


def test_kustomization_lists_every_manifest(deploy_tools: DeployTools) -> None:
    (kustomization,) = deploy_tools.yaml(K8S_DIR / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == manifest_files()
    assert kustomization["namespace"] == "azora"
    assert [i["name"] for i in kustomization["images"]] == [APP_IMAGE]


def test_namespace_enforces_the_restricted_pod_security_profile(
    objects: list[dict[str, Any]],
) -> None:
    namespace = of_kind(objects, "Namespace")["azora"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        assert obj["metadata"].get("namespace", "azora") == "azora", obj["metadata"]["name"]


def test_every_container_is_hardened_and_bounded(objects: list[dict[str, Any]]) -> None:
    for deployment, spec in pod_specs(objects):
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, deployment
        assert pod_security["runAsUser"] > 0, deployment
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, deployment
        assert spec["automountServiceAccountToken"] is False, deployment
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            where = f"{deployment}/{container['name']}"
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True, where
            assert security["runAsUser"] > 0, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security.get("privileged", False) is False, where
            assert security["capabilities"] == {"drop": ["ALL"]}, where
            assert security["seccompProfile"] == {"type": "RuntimeDefault"}, where
            resources = container["resources"]
            for bound in ("requests", "limits"):
                assert set(resources[bound]) >= {"cpu", "memory"}, (where, bound)
        for container in spec["containers"]:
            # A writable /tmp on the read-only root filesystem.
            tmp_mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]  # noqa: S108
            assert tmp_mounts, f"{deployment}/{container['name']} has no /tmp"
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "emptyDir" in volumes[tmp_mounts[0]["name"]], deployment


def test_every_container_has_probes_and_app_containers_use_grpc(
    objects: list[dict[str, Any]],
) -> None:
    probed = set()
    for deployment, spec in pod_specs(objects):
        for container in spec["containers"]:
            where = f"{deployment}/{container['name']}"
            assert "readinessProbe" in container, where
            assert "livenessProbe" in container, where
            command = container.get("command", [])
            if command[:2] != ["python", "-m"] or not command[2].startswith("services."):
                continue
            health_only = {
                SUBMISSION[0]: ("submission", SUBMISSION[1]),
                INBOUND[0]: ("inbound", INBOUND[1]),
                WEBHOOK_DISPATCHER[0]: ("webhooks", WEBHOOK_DISPATCHER[1]),
            }
            if command[2] in health_only:
                # No gRPC API: every probe asks its grpc.health.v1 server about the whole server.
                name, health_port = health_only[command[2]]
                health = {"port": health_port}
                assert container["ports"][0] == {
                    "name": "grpc",
                    "containerPort": health_port,
                    "protocol": "TCP",
                }, where
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert container[probe]["grpc"] == health, (where, probe)
                probed.add(name)
                continue
            (process,) = [p for p, spec_ in PROCESSES.items() if spec_[0] == command[2]]
            _, _, port, served = PROCESSES[process]
            # gRPC first; the metrics port is checked by the scrape test below.
            assert container["ports"][0]["containerPort"] == port, where
            assert {p["name"] for p in container["ports"]} <= {"grpc", "metrics"}, where
            readiness = container["readinessProbe"]["grpc"]
            assert readiness == {"port": port, "service": served[0]}, where
            # Liveness asks the server (""), so a database outage never restarts pods.
            assert container["livenessProbe"]["grpc"] == {"port": port}, where
            assert container["startupProbe"]["grpc"]["port"] == port, where
            probed.add(process)
    assert probed == {*PROCESSES, "submission", "inbound", "webhooks"}


def test_secrets_are_only_referenced(objects: list[dict[str, Any]]) -> None:
    assert not of_kind(objects, "Secret"), "Secrets are created out of band (k8s/README.md)"
    for deployment, spec in pod_specs(objects):
        for container in spec["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            for name, entry in env.items():
                reference = entry.get("valueFrom", {}).get("secretKeyRef")
                if name in SECRET_KEYS:
                    assert reference == {"name": SECRET_NAME, "key": name}, (deployment, name)
                if reference:
                    assert reference["name"] == SECRET_NAME, (deployment, name)
            command = container.get("command", [])
            if len(command) == 3 and command[2].startswith("services."):
                assert set(env) >= SECRET_KEYS, deployment
    config = of_kind(objects, "ConfigMap")["azora-config"]["data"]
    assert not set(config) & SECRET_KEYS
    assert config["AZORA_ENV"] == "production"


def test_services_select_deployments(
    objects: list[dict[str, Any]], envoy_facts: dict[str, Any]
) -> None:
    deployments = of_kind(objects, "Deployment")
    config = of_kind(objects, "ConfigMap")["azora-config"]["data"]
    endpoints = {(e["address"], e["port"]) for c in envoy_facts["clusters"] for e in c["endpoints"]}
    for name, service in of_kind(objects, "Service").items():
        selector = service["spec"]["selector"]
        selected = [
            d
            for d in deployments.values()
            if matches(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} Deployments"
        ports = {
            p["name"]: p["containerPort"]
            for c in selected[0]["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        if name in ("submission", "inbound"):
            # The public SMTP front doors: 587/465 (25 for inbound) to the container's
            # unprivileged ports, the client's address kept for the per-address limits (and
            # SPF); not Envoy upstreams.
            assert service["spec"]["externalTrafficPolicy"] == "Local"
            mapped = {p["port"]: ports[p["targetPort"]] for p in service["spec"]["ports"]}
            assert mapped == (SUBMISSION if name == "submission" else INBOUND)[2], mapped
            continue
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (name, port)
            assert ports[port["targetPort"]] == port["port"], (name, port)
            if name != "envoy":
                # Envoy's upstreams: headless, so STRICT_DNS sees every pod.
                assert service["spec"]["clusterIP"] == "None", name
                assert (name, port["port"]) in endpoints, (name, port)
    for process, (_, _, port, _) in PROCESSES.items():
        target = config[f"AZORA_{process.upper()}_SERVICE_TARGET"]
        assert target == f"dns:///{process}:{port}", target


def test_deployment_selectors_match_their_pods(objects: list[dict[str, Any]]) -> None:
    for name, deployment in of_kind(objects, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert matches(deployment["spec"]["selector"]["matchLabels"], labels), name


def test_hpa_scales_the_mail_workers(objects: list[dict[str, Any]]) -> None:
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        "mail",
    )
    assert "mail" in of_kind(objects, "Deployment")
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert hpa["spec"]["metrics"]
    # The autoscaler owns the replica count; a fixed one would be reset on every apply.
    assert "replicas" not in of_kind(objects, "Deployment")["mail"]["spec"]


def test_disruption_budgets_select_existing_pods(objects: list[dict[str, Any]]) -> None:
    budgets = of_kind(objects, "PodDisruptionBudget")
    assert budgets
    deployments = of_kind(objects, "Deployment")
    for name, budget in budgets.items():
        assert budget["apiVersion"] == "policy/v1"
        selector = budget["spec"]["selector"]["matchLabels"]
        selected = [
            d
            for d in deployments.values()
            if matches(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(selected) == 1, name
        replicas = selected[0]["spec"].get("replicas")
        if "minAvailable" in budget["spec"] and replicas is not None:
            assert budget["spec"]["minAvailable"] < replicas, f"{name} would block every drain"
    assert {"domain", "smtp", "mail", "envoy", "submission", "inbound"} <= set(budgets)


def test_envoy_configmap_is_generated_from_gateway_envoy_yaml(
    objects: list[dict[str, Any]],
) -> None:
    # Stale? Run: python scripts/gen_k8s_envoy_config.py
    config_map = of_kind(objects, "ConfigMap")["envoy-config"]
    assert config_map["data"]["envoy.yaml"] == ENVOY_YAML.read_text()
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_envoy_deployment_mounts_config_and_the_images_descriptor(
    objects: list[dict[str, Any]], envoy_facts: dict[str, Any], compose: dict[str, Any]
) -> None:
    deployment = of_kind(objects, "Deployment")["envoy"]
    spec = deployment["spec"]["template"]["spec"]
    (envoy,) = spec["containers"]
    assert envoy["image"] == compose["services"]["envoy"]["image"]
    mounts = {m["mountPath"]: m for m in envoy["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    config = mounts["/etc/envoy/envoy.yaml"]
    assert volumes[config["name"]]["configMap"]["name"] == "envoy-config"
    assert config["subPath"] == "envoy.yaml"
    descriptor = mounts["/etc/envoy/azora.binpb"]
    assert "emptyDir" in volumes[descriptor["name"]]
    # The init container copies the descriptor set out of the services' image.
    (init,) = spec["initContainers"]
    assert init["image"].split(":")[0] == APP_IMAGE
    app_images = {
        c["image"]
        for _, pod in pod_specs(objects)
        for c in pod["containers"]
        if c["image"].startswith(APP_IMAGE + ":")
    }
    assert app_images == {init["image"]}
    assert init["command"][-2:] == ["/app/gen/azora.binpb", f"/descriptor/{descriptor['subPath']}"]
    assert any(m["name"] == descriptor["name"] for m in init["volumeMounts"])
    # Pods roll when the config changes.
    annotation = deployment["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotation["azora.dev/envoy-config-sha256"])
    # Probes hit the listeners envoy.yaml defines; the admin port is never exposed.
    ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    listener_ports = {listener["port"] for listener in envoy_facts["listeners"]}
    assert set(ports.values()) <= listener_ports
    assert envoy_facts["admin"]["port"] not in ports.values()
    assert envoy["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_every_service_pod_is_scrapeable_by_prometheus(objects: list[dict[str, Any]]) -> None:
    # Prometheus scrapes every process itself: each pod serves its own registry on its
    # METRICS_PORTS port, on every interface, and says so in the annotations Prometheus's pod
    # discovery reads; /metrics's peers point at those ports.
    config = of_kind(objects, "ConfigMap")["azora-config"]["data"]
    assert config["AZORA_METRICS_HOST"] == "0.0.0.0"  # noqa: S104
    deployments = of_kind(objects, "Deployment")
    scrape_ports = {}
    for process in PROCESSES:
        _, port = METRICS_PORTS[f"{process}-service"]
        template = deployments[process]["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", process
        assert annotations["prometheus.io/port"] == str(port), process
        assert annotations["prometheus.io/path"] == "/metrics", process
        [container] = [c for c in template["spec"]["containers"] if c["name"] == process]
        assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container["ports"]
        scrape_ports[process] = port
    peers = [Peer.parse(p) for p in config["AZORA_METRICS_PEERS"].split(",")]
    assert {p.url for p in peers} == {
        f"http://{process}:{port}/metrics"
        for process, port in scrape_ports.items()
        if process != "domain"  # the domain process answers /metrics and adds its own
    }


def test_submission_reads_its_certificate_from_a_tls_secret(objects: list[dict[str, Any]]) -> None:
    # Production refuses to start without a certificate and key: both come from a mounted TLS
    # Secret (created out of band), and the listeners are the container ports the Service maps.
    spec = of_kind(objects, "Deployment")["submission"]["spec"]["template"]["spec"]
    [container] = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    tls_dir = mounts["tls"]["mountPath"]
    assert mounts["tls"]["readOnly"] is True
    assert volumes["tls"]["secret"]["secretName"] == "azora-submission-tls"
    assert env["AZORA_SUBMISSION_CERT_FILE"] == f"{tls_dir}/tls.crt"
    assert env["AZORA_SUBMISSION_KEY_FILE"] == f"{tls_dir}/tls.key"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    listening = {int(env["AZORA_SUBMISSION_PORT"] or 0), int(env["AZORA_SUBMISSION_TLS_PORT"] or 0)}
    assert listening == set(SUBMISSION[2].values()) == {ports["smtp"], ports["smtps"]}
    assert int(env["AZORA_SUBMISSION_HEALTH_PORT"] or 0) == SUBMISSION[1]


def test_webhook_dispatcher_runs_replicated_with_its_health_port(
    objects: list[dict[str, Any]],
) -> None:
    # Leases make replicas safe: more than one, a disruption budget, and the health port the
    # probes ask is the one the process listens on.
    deployment = of_kind(objects, "Deployment")["webhooks"]
    assert deployment["spec"]["replicas"] >= 2
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", WEBHOOK_DISPATCHER[0]]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["AZORA_WEBHOOK_DISPATCHER_HEALTH_PORT"] or 0) == WEBHOOK_DISPATCHER[1]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budgets = of_kind(objects, "PodDisruptionBudget")
    assert any(matches(b["spec"]["selector"]["matchLabels"], labels) for b in budgets.values())


def test_inbound_reads_its_certificate_from_a_tls_secret(objects: list[dict[str, Any]]) -> None:
    # The inbound server's STARTTLS certificate comes from its own mounted TLS Secret, and its
    # listener is the container port the Service maps from 25.
    spec = of_kind(objects, "Deployment")["inbound"]["spec"]["template"]["spec"]
    [container] = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    tls_dir = mounts["tls"]["mountPath"]
    assert mounts["tls"]["readOnly"] is True
    assert volumes["tls"]["secret"]["secretName"] == "azora-inbound-tls"
    assert env["AZORA_INBOUND_CERT_FILE"] == f"{tls_dir}/tls.crt"
    assert env["AZORA_INBOUND_KEY_FILE"] == f"{tls_dir}/tls.key"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {int(env["AZORA_INBOUND_PORT"] or 0)} == set(INBOUND[2].values()) == {ports["smtp"]}
    assert int(env["AZORA_INBOUND_HEALTH_PORT"] or 0) == INBOUND[1]
