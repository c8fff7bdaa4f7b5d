"""pytest fixtures for the cluster harness: import them into a test module.

    from tests.cluster.fixtures import cluster  # noqa: F401  (a fixture, used by name)

    @pytest.mark.cluster
    def test_x(cluster):            # a 2-host Cluster, shared by the module's tests
        ...

``cluster`` is module scoped: starting one takes ~3 s, so a module's tests share it; a test
that breaks it (kill_host, link_down, jobs left) calls ``cluster.reset()`` at its end, or in a
``finally``. For another size or slurm.conf, ``with cluster_or_skip(n_hosts=3, ...) as c:``.

Where the cluster cannot run (not root, a missing binary, no network namespaces) the test is
skipped with the reason and the command that fixes it -- never a silent pass. Under CI=true
the same is a failure: CI installs the packages (.ci/run), so a skip there would hide that
the cluster tests stopped running.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from tests.cluster.harness import Cluster, ClusterUnavailable


def _unavailable(reason: str):
    msg = f"cluster harness cannot run here: {reason}"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(msg + " (CI=true: the cluster tests must run in CI)", pytrace=False)
    pytest.skip(msg)


@contextlib.contextmanager
def cluster_or_skip(**kw):
    """``Cluster(**kw)``, started and closed; skipped (failed under CI) when unavailable."""
    c = Cluster(**kw)
    try:
        c.start()
    except ClusterUnavailable as e:
        _unavailable(str(e))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def cluster():
    with cluster_or_skip(n_hosts=2) as c:
        yield c
