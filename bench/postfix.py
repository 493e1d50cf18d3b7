"""A private Postfix instance (and OpenDKIM milter) for the benchmarks, under one run directory.

Nothing here touches the system instance: ``postfix -c <dir>`` reads our own main.cf/master.cf,
whose queue_directory, data_directory and maillog_file are under the run directory; smtpd
listens on 127.0.0.1 at a high port only, and every message is relayed to
``relayhost = [127.0.0.1]:<sink port>`` (no local delivery, no DNS). Postfix fsyncs each queue
file before it answers 250 to the client, as configured by default. ``stop`` stops the master
and the milter.

OpenDKIM (Debian's ``opendkim``) signs as a milter with an RSA-2048 key generated for the run
(``opendkim-genkey``), on 127.0.0.1 at another high port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
OPENDKIM = "/usr/sbin/opendkim"
OPENDKIM_GENKEY = "/usr/sbin/opendkim-genkey"
DEBIAN_PACKAGES = ("postfix", "opendkim", "opendkim-tools")

# Only the services a relay-only instance uses; chroot off (column 5 = n) so that nothing has
# to be copied into the queue directory.
MASTER_CF = """\
{port}    inet  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def installed() -> bool:
    """Whether Postfix (with smtp-source/smtp-sink) and OpenDKIM are installed."""
    return all(
        Path(p).exists()
        for p in (POSTFIX, "/usr/sbin/smtp-source", "/usr/sbin/smtp-sink", OPENDKIM)
    )


@dataclass
class OpenDkim:
    """OpenDKIM in the foreground, signing mail of `domain` with a fresh RSA-2048 key."""

    workdir: Path
    port: int
    domain: str
    selector: str = "bench"
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Generate the key, write the configuration and start the milter."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(  # noqa: S603
            [OPENDKIM_GENKEY, "-b", "2048", "-d", self.domain, "-s", self.selector,
             "-D", str(self.workdir)],
            check=True,
        )  # fmt: skip
        key = self.workdir / f"{self.selector}.private"
        key.chmod(0o600)
        conf = self.workdir / "opendkim.conf"
        conf.write_text(
            f"Mode s\nDomain {self.domain}\nSelector {self.selector}\nKeyFile {key}\n"
            f"Socket inet:{self.port}@127.0.0.1\nCanonicalization relaxed/relaxed\n"
            "SignatureAlgorithm rsa-sha256\nBackground no\nSyslog no\n"
            f"PidFile {self.workdir / 'opendkim.pid'}\nUMask 007\nRequireSafeKeys no\n"
        )
        self.proc = subprocess.Popen(  # noqa: S603
            [OPENDKIM, "-f", "-x", str(conf)],
            stdout=(self.workdir / "opendkim.out").open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_port(self.port, 10)

    def stop(self) -> None:
        """Stop the milter."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class PrivatePostfix:
    """One Postfix instance configured under `workdir`, relaying everything to the sink."""

    workdir: Path
    port: int
    sink_port: int
    milter_port: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def config_dir(self) -> Path:
        """Where main.cf and master.cf are."""
        return self.workdir / "etc"

    @property
    def maillog(self) -> Path:
        """Postfix's log file (postlogd)."""
        return self.workdir / "maillog"

    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters."""
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.workdir / "spool"),
            "data_directory": str(self.workdir / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": "bench-postfix.localdomain",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 no local delivery",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.workdir),
            "default_process_limit": "100",
            "smtp_destination_concurrency_limit": "20",
            "smtpd_client_connection_rate_limit": "0",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "biff": "no",
            "notify_classes": "",
            "smtputf8_enable": "no",
            "milter_default_action": "tempfail",
        }
        if self.milter_port:
            params["smtpd_milters"] = f"inet:127.0.0.1:{self.milter_port}"
        params.update(self.extra)
        return params

    def start(self) -> None:
        """Write the configuration, create the queue and start the master."""
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.config_dir.mkdir(parents=True)
        (self.workdir / "data").mkdir()
        (self.workdir / "spool").mkdir()
        # postlogd creates the log as the mail owner: the directory must let it.
        os.chmod(self.workdir, 0o755)  # noqa: S103 - read by the mail owner, no secrets
        (self.config_dir / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in self.main_cf().items())
        )
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(port=self.port))
        shutil.chown(self.workdir / "data", user="postfix")
        self._postfix("check")
        self._postfix("start")
        wait_port(self.port, 20)

    def master_pid(self) -> int:
        """The master process id (from its pid file)."""
        return int((self.workdir / "spool" / "pid" / "master.pid").read_text().split()[0])

    def stop(self) -> None:
        """Stop the instance (`postfix stop`), then make sure the master is gone."""
        try:
            pid = self.master_pid()
        except (OSError, ValueError):
            return
        self._postfix("stop", check=False)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)

    def _postfix(self, command: str, *, check: bool = True) -> None:
        # Postfix reports errors to syslog only, unless stderr is a terminal; `postconf`
        # and the maillog are where to look when this fails.
        result = subprocess.run(  # noqa: S603
            [POSTFIX, "-c", str(self.config_dir), command], check=False, capture_output=True
        )
        if check and result.returncode:
            log = self.maillog.read_text(errors="replace")[-2000:] if self.maillog.exists() else ""
            raise RuntimeError(f"postfix {command} failed ({result.returncode}): {log}")

    def delays(self) -> list[float]:
        """Postfix's own `delay=` (seconds from arrival to delivery) of every sent message."""
        found = []
        if self.maillog.exists():
            for line in self.maillog.read_text(errors="replace").splitlines():
                if "status=sent" in line and " delay=" in line:
                    found.append(float(line.split(" delay=", 1)[1].split(",", 1)[0]))
        return found


def wait_port(port: int, timeout: float) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port`."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)
