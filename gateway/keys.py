"""Every typed key for shared state (no string keys anywhere)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .config import Settings
from .models import RequestState

if TYPE_CHECKING:
    from .lifecycle import Lifecycle
    from .stores import QuotaStore
    from .telemetry import Telemetry
    from .upstream import Upstream

SETTINGS = web.AppKey("settings", Settings)
UPSTREAM: web.AppKey[Upstream] = web.AppKey("upstream")
STORE: web.AppKey[QuotaStore] = web.AppKey("store")
TELEMETRY: web.AppKey[Telemetry] = web.AppKey("telemetry")
LIFECYCLE: web.AppKey[Lifecycle] = web.AppKey("lifecycle")

STATE = web.RequestKey("state", RequestState)
