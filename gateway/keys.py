"""Every typed key for shared state (no string keys anywhere)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .config import Settings
from .models import RequestState

if TYPE_CHECKING:
    from .budgets import TokenBudget
    from .lifecycle import Lifecycle
    from .reload import LiveConfig, Snapshot
    from .stores import QuotaStore
    from .telemetry import Telemetry
    from .upstream import Upstream

SETTINGS = web.AppKey("settings", Settings)
UPSTREAMS: web.AppKey[tuple[Upstream, ...]] = web.AppKey("upstreams")
STORE: web.AppKey[QuotaStore] = web.AppKey("store")
BUDGET: web.AppKey[TokenBudget] = web.AppKey("budget")
TELEMETRY: web.AppKey[Telemetry] = web.AppKey("telemetry")
LIFECYCLE: web.AppKey[Lifecycle] = web.AppKey("lifecycle")
LIVE_CONFIG: web.AppKey[LiveConfig] = web.AppKey("live_config")  # reloaded on SIGHUP (server.py)

STATE = web.RequestKey("state", RequestState)
# The name of GET /v1/models/{model}'s route (catalog.py), which the policy step reads as the
# list's action on the model it names (SPEC §15).
MODEL_ROUTE = "model"
# The same state, set only on the routes that go through admission (SPEC §4): one lookup tells
# an admission step both whether to act and what it acts on.
ADMITTED = web.RequestKey("admitted", RequestState)
# The state of a request whose caller is identified (SPEC §4 step 1): every admitted route's,
# and GET /v1/models' (a valid key needed in keyed mode, nothing else spent).
IDENTIFIED = web.RequestKey("identified", RequestState)
# The file-backed configuration in force when the request was identified (reload.py): the
# request runs under it to its end, whatever a SIGHUP swaps in meanwhile.
CONFIG: web.RequestKey[Snapshot] = web.RequestKey("config")
# The response whose headers are going out, set as it is prepared: after that an error can no
# longer become an HTTP response of its own (SPEC §9), only the end of this one.
STARTED = web.RequestKey("started", web.StreamResponse)
