"""Files that may be local or in a bucket (``gs://``), written so they are never torn.

Every file a stage reads or writes goes through ``etils.epath`` (gcsfs serves
``gs://`` when TensorFlow is absent; tensorstore serves Orbax's arrays). The
writers here are whole-file: a local file is written to a temporary name and
renamed into place, and a bucket object is uploaded in one request, which
creates it whole or not at all. A reader never sees half a JSON file or CSV.

Emulator: set ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`` (the variable
Google's client libraries read) and nothing else. ``use_emulator`` derives
from it what the other libraries need; it runs when ``covid3d`` is imported,
before any ``gs://`` path is opened:

* ``TENSORSTORE_GCS_HTTP_URL``: tensorstore ignores ``STORAGE_EMULATOR_HOST``
  and would retry the real endpoint (an Orbax save then hangs);
* ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: tensorstore asks for no credentials;
* ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs does not ask the
  storage-control API (which emulators lack) for the bucket's layout.

Values already set by the user are kept.

Bounded time: a bucket that accepts connections but never answers would
make a write wait forever. gcsfs requests (every epath file and folder
operation on ``gs://``) give up after ``REQUEST_TIMEOUT_S`` (set as fsspec's
default for ``gcs``; a user's ``FSSPEC_GCS='{"requests_timeout": 300}'``
wins), and Orbax's tensorstore writes are bounded by `within` (see
``train.save_timeout_s``).
"""
import contextlib
import errno
import io
import json
import os
import secrets
import shutil
import tempfile
import threading

from etils import epath

EMULATOR = "STORAGE_EMULATOR_HOST"
REQUEST_TIMEOUT_S = 120.0


def configure():
  """What ``import covid3d`` sets up: `use_emulator` and the gcsfs request timeout."""
  use_emulator()
  import fsspec  # pylint: disable=import-outside-toplevel  (a dependency of gcsfs)
  fsspec.config.conf.setdefault("gcs", {}).setdefault("requests_timeout", REQUEST_TIMEOUT_S)


def use_emulator(environ=os.environ) -> dict:
  """Derives the variables above from ``$STORAGE_EMULATOR_HOST``; returns those set."""
  host = environ.get(EMULATOR, "")
  if not host:
    return {}
  url = host if "://" in host else f"http://{host}"
  derived = {"TENSORSTORE_GCS_HTTP_URL": url.rstrip("/"),
             "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
             "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  for name, value in derived.items():
    environ.setdefault(name, value)
  return {name: environ[name] for name in derived}


class StorageTimeout(TimeoutError):
  """Storage (a bucket) did not answer within the time allowed."""


def within(seconds: float, fn, what: str):
  """``fn()``, or `StorageTimeout` naming ``what`` if it has not returned after ``seconds``.

  ``fn`` runs in a daemon thread. A request stuck on an endpoint that accepts
  connections but never answers cannot be cancelled: after a timeout it is
  left behind, and the caller should stop rather than wait for it.
  """
  done, result = threading.Event(), {}
  def call():
    try:
      result["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except  (re-raised by the caller)
      result["error"] = e
    finally:
      done.set()
  threading.Thread(target=call, name=f"covid3d-storage: {what}", daemon=True).start()
  if not done.wait(seconds):
    raise StorageTimeout(f"{what}: storage did not answer within {seconds:g} s")
  if "error" in result:
    raise result["error"]
  return result.get("value")


def is_remote(path) -> bool:
  """Whether ``path`` is a URL (``gs://...``) rather than a local path."""
  return "://" in str(path)


def as_path(path) -> epath.Path:
  """``path`` as an epath: a local path made absolute, a URL unchanged."""
  path = str(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(path))


@contextlib.contextmanager
def whole_file(path):
  """A binary file to write ``path`` through, put in place whole when the block ends.

  A local file is streamed to a fresh temporary name beside ``path`` and
  renamed into place (`output_path`: never through a link, nothing left
  behind if the block raises); a bucket object is buffered in memory and
  uploaded in one request. Creates parent folders.

  Yields:
    The open binary file.
  """
  path = as_path(path)
  if is_remote(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    yield buffer
    path.write_bytes(buffer.getvalue())
    return
  with output_path(path) as tmp, open(tmp, "wb") as f:
    yield f


def write_bytes(path, data: bytes) -> epath.Path:
  """Writes ``data`` to ``path`` whole (see the module docstring); creates parent folders."""
  with whole_file(path) as f:
    f.write(data)
  return as_path(path)


def write_text(path, text: str) -> epath.Path:
  """``write_bytes`` of UTF-8 ``text``."""
  return write_bytes(path, text.encode("utf-8"))


def write_json(path, value, **dump_args) -> epath.Path:
  """``value`` as JSON (``json.dumps(value, **dump_args)``), written whole."""
  return write_text(path, json.dumps(value, **dump_args))


def text_lines(path, encoding: str = "utf-8") -> io.StringIO:
  """The text of ``path`` as a file for ``csv`` (line endings kept as written)."""
  return io.StringIO(as_path(path).read_bytes().decode(encoding), newline="")


def read_json(path):
  return json.loads(as_path(path).read_text())


def save_figure(fig, path, dpi: int = 100) -> epath.Path:
  """A matplotlib figure as PNG at ``path``, written whole."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  return write_bytes(path, buffer.getvalue())


# Local files are written whole under a fresh hidden name beside them, and never
# through a link (every writer above; covid3d.infer and covid3d.export use these too).


class LinkRefused(ValueError):
  """An output path that is a symbolic link: covid3d writes nothing through it."""


def refuse_link(path) -> None:
  """Raises `LinkRefused` (one line naming ``path``) if local ``path`` is a symbolic link."""
  if not is_remote(path) and os.path.islink(path):
    raise LinkRefused(f"{path} is a symbolic link: covid3d writes no output through a link "
                      "(remove it, or choose another output)")


@contextlib.contextmanager
def output_path(path):
  """A fresh temporary file name beside local ``path``, moved onto ``path`` when the block ends.

  For writers that take a file name (nibabel, SimpleITK, matplotlib): the
  temporary name ends with ``path``'s name, so its suffix picks the same
  format. It is created empty and exclusively (a link or file already there
  under that name is never opened), with the permissions the umask gives; it
  is removed if the block raises. ``path`` itself is refused when it is a link,
  before and again just before the rename (which replaces a file, never
  follows a link).

  Yields:
    The temporary path (str).
  """
  path = os.path.abspath(path)
  refuse_link(path)
  folder, name = os.path.split(path)
  os.makedirs(folder, exist_ok=True)
  flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)
  while True:
    tmp = os.path.join(folder, f".tmp-{secrets.token_hex(4)}-{name}")
    try:
      os.close(os.open(tmp, flags, 0o666))
      break
    except FileExistsError:
      continue
  try:
    yield tmp
    refuse_link(path)
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.unlink(tmp)


def move_output(src, dst) -> None:
  """Renames local ``src`` onto ``dst`` in one step; refuses a ``dst`` that is a link."""
  refuse_link(dst)
  os.replace(src, dst)


# --- Dataset files in a bucket: listing a folder, fetching many objects, a local copy. ---


def list_folder(folder) -> list[tuple[epath.Path, str]]:
  """[(path, 'dir' | 'file')] of a folder (local or ``gs://``), sorted by name.

  One listing request on a bucket (epath's ``walk``, first level only): a
  folder is a common prefix of object names, a file an object.

  Raises:
    OSError: the folder cannot be listed (FileNotFoundError when it has nothing).
  """
  folder = as_path(folder)
  def fail(error):
    raise error
  try:
    _, dirs, files = next(iter(folder.walk(on_error=fail)))
  except StopIteration:
    raise FileNotFoundError(errno.ENOENT, "no such folder", str(folder)) from None
  except OSError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a client's HTTP error, e.g. 5xx)
    raise OSError(errno.EIO, f"{type(e).__name__}: {e}", str(folder)) from e
  # A zero-byte 'folder/' marker object some upload tools create lists as the name "".
  named = [(name, "dir") for name in dirs] + [(name, "file") for name in files if name]
  return [(folder / name, kind) for name, kind in sorted(named)]


def read_many(paths) -> list:
  """The bytes of each file in ``paths``, in order; objects in a bucket are fetched at once.

  A bucket's objects go out as concurrent requests (fsspec's ``cat_ranges``
  on epath's filesystem), which a request's latency would otherwise bound.

  Returns:
    One entry per path: its bytes, or the exception that reading it raised
    (``FileNotFoundError`` for a missing object); nothing is raised.
  """
  from etils.epath import backend  # pylint: disable=import-outside-toplevel
  paths = [str(p) for p in paths]
  out = [None] * len(paths)
  by_fs = {}  # one batch of requests per filesystem (gs://, s3://, ...)
  for i, p in enumerate(paths):
    if is_remote(p):
      by_fs.setdefault(backend.fsspec_backend.fs(p), []).append(i)
      continue
    try:
      out[i] = as_path(p).read_bytes()
    except OSError as e:
      out[i] = e
  for fs, where in by_fs.items():
    fetched = fs.cat_ranges([paths[i] for i in where], None, None, on_error="return")
    for i, data in zip(where, fetched, strict=True):
      out[i] = data
  return out


@contextlib.contextmanager
def local_copy(path):
  """A local copy of ``path`` (a file, or a folder's files) for libraries that need one.

  The copy keeps the base name (readers choose a format by extension) and
  lives in a temporary folder, deleted when the block ends.

  Yields:
    The local path (str).
  """
  path = as_path(path)
  with tempfile.TemporaryDirectory(prefix="covid3d-copy-") as tmp:
    local = os.path.join(tmp, path.name)
    if path.is_dir():
      os.mkdir(local)
      files = [p for p, kind in list_folder(path) if kind == "file"]
      for p, data in zip(files, read_many(files), strict=True):
        if isinstance(data, BaseException):
          raise data
        with open(os.path.join(local, p.name), "wb") as f:
          f.write(data)
    else:
      with path.open("rb") as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    yield local


# Listing a folder another process writes into (the metrics logger's parts).


def list_names(folder) -> list[str]:
  """The names of the entries in ``folder`` as the storage holds them now, sorted
  ([] if there is no such folder).

  gcsfs keeps the listings it has made and would not see the objects that
  another process added since: on ``gs://`` this asks the bucket again.
  """
  folder = as_path(folder)
  if not is_remote(folder):
    return sorted(os.listdir(folder)) if folder.is_dir() else []
  import fsspec  # pylint: disable=import-outside-toplevel  (a dependency of gcsfs)
  fs, root = fsspec.core.url_to_fs(str(folder))
  try:
    entries = fs.ls(root, detail=False, refresh=True)
  except FileNotFoundError:
    return []
  return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)
