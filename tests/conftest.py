"""Shared fixtures for the hf-graft test suite.

Hub: the tests reach the Hub through the real ``huggingface_hub`` client, pointed at one
:class:`~hub_server.HubServer` on 127.0.0.1 that lives for the whole session. ``huggingface_hub``
and ``transformers`` read their endpoint, token, caches and offline flags when they are imported,
so :func:`pytest_configure` sets them before any test module is collected (and so before either is
imported). Every cache goes to a session temp dir: tests never read or write the user's caches.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid

import pytest

from hub_server import HubServer

TEST_ORG = "hf-graft-test"
"""The namespace of the repos the ``repo_id`` fixture names."""

_HUB = pytest.StashKey[HubServer]()
_SANDBOX = pytest.StashKey[tempfile.TemporaryDirectory]()
_SAVED_ENV = pytest.StashKey[dict]()

# Variables that would send the client elsewhere: offline switches and legacy cache locations,
# which take precedence over the defaults derived from HF_HOME.
_UNSET = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "PYTORCH_TRANSFORMERS_CACHE",
    "PYTORCH_PRETRAINED_BERT_CACHE",
)


def _hub_environment(endpoint: str, home: str) -> dict[str, str]:
    """The variables that send ``huggingface_hub`` and ``transformers`` to the test Hub."""
    inherited = os.environ.get("NO_PROXY") or os.environ.get("no_proxy")
    no_proxy = ",".join(filter(None, [inherited, "127.0.0.1", "localhost"]))
    return {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": "hf_test_token",
        "HF_HOME": home,
        "HF_HUB_CACHE": os.path.join(home, "hub"),
        "HF_MODULES_CACHE": os.path.join(home, "modules"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


def pytest_configure(config: pytest.Config) -> None:
    """Start the session's Hub and point the client at it, before anything imports the client."""
    if "huggingface_hub" in sys.modules:
        raise pytest.UsageError(
            "huggingface_hub was imported before tests/conftest.py could set HF_ENDPOINT; "
            "the tests would reach the real Hub. Do not import it from a plugin or a root conftest."
        )
    sandbox = tempfile.TemporaryDirectory(prefix="hf-graft-tests-", ignore_cleanup_errors=True)
    hub = HubServer().start()
    environment = _hub_environment(hub.endpoint, os.path.join(sandbox.name, "hf_home"))
    config.stash[_SAVED_ENV] = {name: os.environ.get(name) for name in (*environment, *_UNSET)}
    for name in _UNSET:
        os.environ.pop(name, None)
    os.environ.update(environment)
    config.stash[_HUB] = hub
    config.stash[_SANDBOX] = sandbox


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the Hub, restore the environment and remove the session's caches."""
    if _HUB in config.stash:
        config.stash[_HUB].stop()
    for name, value in config.stash.get(_SAVED_ENV, {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if _SANDBOX in config.stash:
        config.stash[_SANDBOX].cleanup()


@pytest.fixture(scope="session")
def hub(pytestconfig: pytest.Config) -> HubServer:
    """The session's Hub server; ``HF_ENDPOINT`` already points at ``hub.endpoint``."""
    return pytestconfig.stash[_HUB]


@pytest.fixture
def repo_id() -> str:
    """A repo id no other test uses, e.g. ``hf-graft-test/test-1a2b3c4d``; the repo is not created."""
    return f"{TEST_ORG}/test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny models gain nothing from intra-op threads, and on a
    shared CPU the threads oversubscribe it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
