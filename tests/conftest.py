"""Shared by every test: the cache root (covid3d.cachedir) is a fresh folder of this session.

So no test reads or writes ``~/.cache/covid3d``: preprocessed records, the
depthwise-backend choices and the XLA compilation cache of the stages stay
inside the session, and subprocesses inherit the variable.
"""
import os

import pytest

from covid3d import cachedir


@pytest.fixture(scope="session", autouse=True)
def cache_root(tmp_path_factory):
  old = os.environ.get(cachedir.ENV)
  os.environ[cachedir.ENV] = str(tmp_path_factory.mktemp("covid3d_cache"))
  yield os.environ[cachedir.ENV]
  if old is None:
    del os.environ[cachedir.ENV]
  else:
    os.environ[cachedir.ENV] = old
