"""Shared pytest fixtures."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from google.cloud import storage as gcs_storage

if TYPE_CHECKING:
    from gcp_storage_emulator.server import Server

# ---------------------------------------------------------------------------
# GCS emulator
#
# A real gcp-storage-emulator server runs in-process, so gs:// code paths are
# exercised end to end over HTTP with the real google-cloud-storage client,
# without credentials or network access. Started once per session, only when a
# test asks for the ``gcs`` fixture.
# ---------------------------------------------------------------------------

GCS_TEST_BUCKET = "genco-test"


@dataclass(frozen=True)
class GcsEmulator:
    """Handle on the running emulator handed to tests."""

    client: gcs_storage.Client
    bucket: str
    host: str

    def url(self, name: str) -> str:
        """``gs://genco-test/<unique>/<name>``: a fresh prefix per call keeps tests
        independent in the shared session bucket. Call once per test and ``join``
        onto the result when several objects must share a directory."""
        return f"gs://{self.bucket}/{uuid.uuid4().hex[:12]}/{name.lstrip('/')}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_emulator() -> tuple[Server, int]:
    from gcp_storage_emulator.server import create_server

    # The emulator cannot bind port 0 and report it back, so pick a free port and
    # retry if another process grabbed it first. A failed bind kills the server
    # thread while ``start()`` waits forever for it, hence the watchdog thread.
    for _ in range(5):
        port = _free_port()
        server = create_server("127.0.0.1", port, in_memory=True)
        starter = threading.Thread(target=server.start, daemon=True)
        starter.start()
        starter.join(timeout=10)
        if not starter.is_alive():
            return server, port
    raise RuntimeError("gcp-storage-emulator did not start on any free port")


@pytest.fixture(scope="session")
def gcs() -> Iterator[GcsEmulator]:
    """Running GCS emulator with an empty ``genco-test`` bucket and env pointing at it."""
    server, port = _start_emulator()
    host = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", host)
            # gcsfs (used elsewhere) probes hierarchical-namespace bucket APIs the
            # emulator does not implement.
            mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            from genco.data.storage import gcs_client

            client = gcs_client()
            client.create_bucket(GCS_TEST_BUCKET)
            yield GcsEmulator(client=client, bucket=GCS_TEST_BUCKET, host=host)
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# Simulated worlds: seeded, session-scoped ground truth from genco's own simulator.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def default_world(tmp_path_factory: pytest.TempPathFactory):
    """The default world (seed 0, 20k impressions) written to a session temp dir."""
    from genco.worlds.simulate import simulate

    out = tmp_path_factory.mktemp("default_world")
    return simulate("default", seed=0, out_dir=str(out), n_impressions=20_000)
