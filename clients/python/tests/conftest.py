"""A live convo server for the tests.

With CONVO_ADDR set, the tests use that server. Otherwise they start one:
the binary at CONVO_BIN (default: the repository's target/debug/convo,
built by `cargo build`) on a free port, with its own private PostgreSQL in a
temporary directory, exactly as a newcomer's `convo serve` runs.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process, seconds: float = 60.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"convo exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"convo did not listen on {port} within {seconds} s")


def convo_binary() -> Path:
    binary = Path(
        os.environ.get("CONVO_BIN", REPO / os.environ.get("CARGO_TARGET_DIR", "target") / "debug" / "convo")
    )
    if not binary.is_absolute():
        binary = REPO / binary
    if not binary.exists():
        pytest.exit(f"no convo binary at {binary}: run `cargo build` or set CONVO_BIN/CONVO_ADDR")
    return binary


@contextlib.contextmanager
def serve(data: Path, *args: str):
    """`convo serve` on a free port with a private PostgreSQL in `data`; yields
    its address, then stops it and removes `data` (a whole cluster: every run
    would otherwise leave one in the temporary directory)."""
    os.chmod(data, 0o755)  # as root, the private PostgreSQL runs as `postgres`
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    try:
        with open(data / "serve.log", "w") as log:
            process = subprocess.Popen(
                [str(convo_binary()), "serve", "--listen", f"127.0.0.1:{port}",
                 "--data-dir", f"{data}/convo-data", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            try:
                try:
                    wait_for_port(port, process)
                except RuntimeError as failure:
                    log.flush()
                    tail = (data / "serve.log").read_text(errors="replace")[-4000:]
                    raise RuntimeError(f"{failure}; its log ends:\n{tail}") from None
                yield f"127.0.0.1:{port}"
            finally:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    finally:
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def convo_addr():
    if os.environ.get("CONVO_ADDR"):
        yield os.environ["CONVO_ADDR"]
        return
    with serve(Path(tempfile.mkdtemp(prefix="convo-pytest-"))) as addr:
        yield addr


@pytest.fixture
def user():
    """A user of the test's own: tests share the server, never their data."""
    return f"pytest-{uuid.uuid4().hex}"


class Proxy:
    """A TCP proxy to the server that the test can cut: every connection
    through it is closed at once by `cut()`; new ones are accepted after."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.sockets = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self):
        self.listener.close()
        self.cut()


@pytest.fixture
def proxy(convo_addr):
    proxy = Proxy(int(convo_addr.rsplit(":", 1)[1]))
    yield proxy
    proxy.close()


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path) -> dict:
    """A CA, a server certificate for 127.0.0.1, and a client certificate
    (X.509 v3, as rustls requires), made with the openssl command."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=directory)
    for name, extensions in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (directory / f"{name}.ext").write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n" + extensions
        )
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                 "-out", f"{name}.pem", cwd=directory)
    return {name: (directory / name).read_bytes()
            for name in ("ca.pem", "client.key", "client.pem")}


@pytest.fixture(scope="session")
def mtls_server():
    """A second convo server that requires TLS with client certificates."""
    data = Path(tempfile.mkdtemp(prefix="convo-pytest-tls-"))
    pki = make_pki(data)
    with serve(
        data,
        "--tls-cert", str(data / "server.pem"),
        "--tls-key", str(data / "server.key"),
        "--tls-client-ca", str(data / "ca.pem"),
    ) as addr:
        yield addr, pki
