"""The blockmirror pytest plugin (entry point ``pytest11``: loaded by pytest wherever
blockmirror is installed).

Fixtures:

``blockmirror_factory``
    ``blockmirror_factory(*blockdevs, clock="monotonic")`` starts an in-process daemon with
    those blockdev-add argument dicts and returns its ``DaemonHandle``; every daemon started
    is shut down after the test.
``blockmirror``
    One daemon per test. Configure it with the marker
    ``@pytest.mark.blockmirror(blockdevs=[...], clock="virtual")``; without it: no nodes,
    the real clock.
``blockmirror_qmp``
    The connected ``qemu.qmp`` client (``QEMUMonitorProtocol``) of the ``blockmirror`` daemon.

The handle has ``execute(name, **args)``, ``wait_event(name, match=...)``, ``clock``
(``advance``, ``run_to_next_timer``, ``run_until``, ``info``) and ``faults`` (``add``,
``remove``, ``list``): see ``blockmirror.testing.daemon``. The daemon code is imported by the
first fixture that starts one (through ``blockmirror.testing``'s lazy names), not when pytest
loads this plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import pytest

import blockmirror.testing as bmt

if TYPE_CHECKING:
    from blockmirror.testing.daemon import DaemonHandle

Factory = Callable[..., "DaemonHandle"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "blockmirror(blockdevs=[...], clock='monotonic'|'virtual'): configure the "
        "blockmirror fixture's daemon",
    )


@pytest.fixture
def blockmirror_factory() -> Iterator[Factory]:
    handles: list[DaemonHandle] = []

    def make(*blockdevs: Mapping[str, Any], clock: str = "monotonic") -> DaemonHandle:
        handle: DaemonHandle = bmt.start_daemon(blockdevs, clock=clock)
        handles.append(handle)
        return handle

    try:
        yield make
    finally:
        for handle in reversed(handles):
            handle.close()


@pytest.fixture
def blockmirror(request: pytest.FixtureRequest, blockmirror_factory: Factory) -> DaemonHandle:
    marker = request.node.get_closest_marker("blockmirror")
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    blockdevs = kwargs.pop("blockdevs", ())
    return blockmirror_factory(*blockdevs, **kwargs)


@pytest.fixture
def blockmirror_qmp(blockmirror: DaemonHandle) -> Any:
    return blockmirror.qmp
