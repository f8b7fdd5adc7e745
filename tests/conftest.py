"""Test setup: 8 fake CPU devices so sharding is exercised without accelerators."""
import os

# Must happen before JAX is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shakespeare_path():
  path = SHARED_DATA / "tinyshakespeare.txt"
  if not path.exists():
    pytest.skip(f"{path} is absent")
  return path


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One TFDS data dir per session: the default corpus is built once, not per test."""
  return tmp_path_factory.mktemp('tfds')
