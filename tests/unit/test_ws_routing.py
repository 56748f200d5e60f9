"""Which paths the WebSocket endpoints take, below the app's mount point."""

from __future__ import annotations

import pytest

from service.api.ws import _route_path


@pytest.mark.parametrize(
    ("root_path", "path", "route"),
    [
        ("", "/ws", "/ws"),
        ("", "/ws/news", "/ws/news"),
        ("/chat", "/chat/ws", "/ws"),
        ("/chat", "/chat", ""),
        # Only a whole segment is the mount point: `/w` is not a prefix of `/ws`'s route.
        ("/w", "/ws", "/ws"),
        ("/chat", "/other/ws", "/other/ws"),
    ],
)
def test_route_path_strips_only_the_mount_point(root_path: str, path: str, route: str) -> None:
    assert _route_path({"path": path, "root_path": root_path}) == route
