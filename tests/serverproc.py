"""Start a real ``twistd -n stui`` on ephemeral loopback ports, and talk to it.

Used by the end-to-end tests the way a user's tools would: plain sockets,
``ssl``, and pyzmq.  Every wait is bounded; a server that does not come up
in time fails the test with its log attached.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


def twistd_command() -> list[str]:
    """How to run twistd with this interpreter."""
    return [
        sys.executable,
        "-c",
        "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
    ]


def make_self_signed(directory: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for C{hostname} and 127.0.0.1: (key.pem, cert.pem)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path = directory / "key.pem"
    cert_path = directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def pg_node_flags(dsn: str, secret_file, node_id: str, *flags: str) -> list[str]:
    """The flags of a node C{node_id} on the PostgreSQL database C{dsn}, then C{flags}.

    Nodes of one database share C{secret_file} (the MAC key).
    """
    store = [f"--store=postgresql:{dsn}", f"--secret-file={secret_file}"]
    return [*store, f"--node-id={node_id}", *flags]


class LineClient:
    """A blocking line-JSON client over a socket (TCP or TLS)."""

    def __init__(self, sock: socket.socket, timeout: float = 15.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self._buffer = b""
        self._ids = 0

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def read_reply(self) -> dict:
        return json.loads(self.read_line())

    def call(self, command: str, token: str | None = None, **parameters) -> dict:
        """Send one request and return its reply (matched by id)."""
        self._ids += 1
        request_id = f"t-{self._ids}"
        message = {"id": request_id, "command": command, "parameters": parameters}
        if token is not None:
            message["token"] = token
        self.send_raw(json.dumps(message).encode() + b"\n")
        reply = self.read_reply()
        assert reply["id"] == request_id, reply
        return reply

    def result(self, command: str, **parameters) -> dict:
        """Like L{call}, but insists on success and returns C{result}."""
        reply = self.call(command, **parameters)
        assert reply["status"] == "success", reply
        return reply["result"]

    def close(self) -> None:
        self.sock.close()


class ServerProcess:
    """One real C{twistd -n stui} child with its ports, data dir and log."""

    def __init__(
        self,
        workdir: Path,
        *extra_args: str,
        tls: bool = False,
        zmq: bool = True,
        image: bool = True,
        env: dict | None = None,
        preexec_fn=None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "stui-data"
        self.log_path = self.workdir / "twistd.log"
        self.extra_args = list(extra_args)
        self.tls = tls
        self.use_zmq = zmq
        self.image = image
        self.env = env or {}
        self.preexec_fn = preexec_fn  # e.g. to lower RLIMIT_NOFILE for the server
        self.process: subprocess.Popen | None = None
        self.tcp_port: int | None = None
        self.tls_port: int | None = None
        self.zmq_url: str | None = None
        self.cert_path: Path | None = None
        self.key_path: Path | None = None
        if tls:
            self.key_path, self.cert_path = make_self_signed(self.workdir)

    def args(self) -> list[str]:
        args = [
            "--tcp=tcp:0:interface=127.0.0.1",
            f"--zmq={'tcp://127.0.0.1:*' if self.use_zmq else 'none'}",
            f"--data-dir={self.data_dir}",
        ]
        if self.tls:
            args.append(
                f"--tls=ssl:0:interface=127.0.0.1:privateKey={self.key_path}:certKey={self.cert_path}"
            )
        if not self.image:
            args.append("--image=no")
        return args + self.extra_args

    def start(self, timeout: float = START_TIMEOUT) -> ServerProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env.update(self.env)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = subprocess.Popen(
            [
                *twistd_command(),
                "-n",
                f"--logfile={self.log_path}",
                "--pidfile=",
                "stui",
                *self.args(),
            ],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            preexec_fn=self.preexec_fn,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_text()
            if self.process.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.process.returncode}:\n{log}")
            if "session service ready" in log and self._find_ports(log):
                if not self.image or re.search(r"image .*(ready|started)", log, re.I):
                    return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"twistd did not come up within {timeout} s:\n{self.log_text()}")

    def _find_ports(self, log: str) -> bool:
        tcp = re.search(r"tcp listening on [\d.]+:(\d+)", log)
        tls = re.search(r"tls listening on [\d.]+:(\d+)", log)
        zmq_url = re.search(r"zmq listening on (tcp://[\d.]+:\d+)", log)
        if tcp:
            self.tcp_port = int(tcp.group(1))
        if tls:
            self.tls_port = int(tls.group(1))
        if zmq_url:
            self.zmq_url = zmq_url.group(1)
        return bool(tcp) and (tls or not self.tls) and (zmq_url or not self.use_zmq)

    def log_text(self) -> str:
        try:
            return self.log_path.read_bytes()[self._log_offset :].decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    # -- clients ------------------------------------------------------------

    def tcp_client(self, timeout: float = 15.0) -> LineClient:
        return LineClient(socket.create_connection(("127.0.0.1", self.tcp_port), timeout), timeout)

    def tls_client(self, timeout: float = 15.0, hostname: str = "localhost") -> LineClient:
        context = ssl.create_default_context(cafile=str(self.cert_path))
        raw = socket.create_connection(("127.0.0.1", self.tls_port), timeout)
        return LineClient(context.wrap_socket(raw, server_hostname=hostname), timeout)

    def zmq_request(self, message: dict, socket_type: str = "REQ", timeout: float = 15.0) -> dict:
        import zmq

        context = zmq.Context.instance()
        sock = context.socket(zmq.REQ if socket_type == "REQ" else zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
        try:
            sock.connect(self.zmq_url)
            if socket_type == "REQ":
                sock.send(json.dumps(message).encode())
                return json.loads(sock.recv())
            sock.send_multipart([b"", json.dumps(message).encode()])
            frames = sock.recv_multipart()
            return json.loads(frames[-1])
        finally:
            sock.close()

    # -- ending -------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"twistd ignored SIGTERM for {timeout} s:\n{self.log_text()}"
            ) from None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()
