"""The configuration that lives in files, and its reload on SIGHUP (SPEC §10).

A `Snapshot` holds everything built from those files: who the tenants are
(TENANT_KEYS_FILE), the Cedar policies (POLICY_FILE, POLICY_ENTITIES_FILE) and the routes
(ROUTES_FILE: a new router, keeping the breakers; the one it replaces is closed once the
requests that run under it have ended). It is
immutable; a reload builds a whole new one, every file read and validated first, and only
then swaps it in with one assignment: all or nothing. A request takes the snapshot in force
when it starts (the tenancy step stashes it on the request) and runs under it to its end,
however many reloads happen meanwhile.

One more file-backed item is one more field of `Snapshot` and one loader in `load`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from environs import EnvError

from . import policies
from .config import ConfigError, Settings, environment, read_tenant_keys_file
from .router import Router
from .routing import load_routes
from .tenancy import Tenancy

log = logging.getLogger("gateway")


@dataclass(frozen=True, slots=True)
class Snapshot:
    tenancy: Tenancy
    policies: policies.Policies | None  # None: no POLICY_FILE, every request allowed
    router: Router | None = None  # None: no ROUTES_FILE, the single upstreams serve


def load(settings: Settings, router: Router | None = None) -> Snapshot:
    """Every file-backed item read and validated; raises ConfigError (one line: the variable,
    the file, the problem) at the first that is not valid. `router`: the one in force, whose
    breakers a router for the routes read again keeps (None: the routes are not read)."""
    return Snapshot(tenancy=_tenancy(settings), policies=_policies(settings), router=_router(settings, router))


REFUSED = "reload refused, the configuration in force stays: %s"


def refusal(settings: Settings) -> ConfigError | None:
    """What a reload now would refuse, if anything: for the parent of WORKERS, which logs it
    once for them all (SPEC §10: one line), each worker then reading the files for itself."""
    try:
        load(settings)
        with_current_routes(settings)
    except ConfigError as error:
        return error
    return None


def with_current_routes(settings: Settings) -> Settings:
    """`settings` with ROUTES_FILE's table read again (raises ConfigError). For a worker: one
    forked after a reload (a replacement) got the parent's start-up table, and served the old
    routes beside workers serving the reloaded ones; the keys and policies it reads itself."""
    if not settings.routes_file:
        return settings
    return dataclasses.replace(settings, routes=load_routes(settings.routes_file, environment()))


def _router(settings: Settings, router: Router | None) -> Router | None:
    if router is None or not settings.routes_file:
        return router
    return router.reloaded(load_routes(settings.routes_file, environment()))


def _tenancy(settings: Settings) -> Tenancy:
    digests = settings.tenant_key_digests
    if settings.tenant_keys_file:
        inline = settings.inline_key_digests
        try:  # an empty file is refused here too: a reload never turns keyed mode into open mode
            digests = MappingProxyType({**inline, **read_tenant_keys_file(settings.tenant_keys_file, inline)})
        except EnvError as exc:
            raise ConfigError([f"TENANT_KEYS_FILE: {exc}"]) from None
    return Tenancy(digests, settings.hash_secret)


def _policies(settings: Settings) -> policies.Policies | None:
    if not settings.policy_file:
        return None
    return policies.load(settings.policy_file, settings.policy_entities_file)


def file_backed(settings: Settings) -> list[str]:
    """The variables naming files a reload reads, as set."""
    named = {
        "TENANT_KEYS_FILE": settings.tenant_keys_file,
        "POLICY_FILE": settings.policy_file,
        "POLICY_ENTITIES_FILE": settings.policy_entities_file,
        "ROUTES_FILE": settings.routes_file,
    }
    return [variable for variable, path in named.items() if path]


class LiveConfig:
    """The snapshot in force (`current`), replaced whole by `reload`."""

    __slots__ = ("_counted", "_refusal_level", "_retired", "_settings", "current")

    def __init__(self, settings: Settings, counted: Callable[[bool], None], router: Router | None = None) -> None:
        self._settings = settings
        self._counted = counted  # config_reloads_total, by result
        # A worker of WORKERS leaves the refusal's line to its parent (see `refusal`): one line,
        # not one a worker.
        self._refusal_level = logging.DEBUG if settings.workers > 1 else logging.ERROR
        self.current = Snapshot(tenancy=_tenancy(settings), policies=_policies(settings), router=router)
        self._retired: list[Router] = []  # replaced routers, closed with the app if still open

    def reload(self) -> bool:
        """SIGHUP: the files read again. Invalid ones are refused, with one log line, and the
        snapshot in force stays; otherwise the new one replaces it for every later request."""
        try:
            snapshot = load(self._settings, self.current.router)
        except ConfigError as error:
            self._counted(False)
            log.log(self._refusal_level, REFUSED, error.lines[0])
            return False
        replaced, self.current = self.current.router, snapshot
        if replaced is not None and replaced is not snapshot.router:
            assert snapshot.router is not None  # routes are read again only when there were some
            snapshot.router.take_over()
            replaced.retire()
            self._retired = [*(r for r in self._retired if not r.closed), replaced]
        self._counted(True)
        log.info("configuration reloaded (%s)", ", ".join(file_backed(self._settings)) or "no file to read")
        return True

    async def close_routers(self) -> None:
        """The app stops: the router in force, and any replaced one still open, closed."""
        for router in (*self._retired, self.current.router):
            if router is not None and not router.closed:
                await router.close()
