"""The configuration that lives in files, and its reload on SIGHUP (SPEC §10).

A `Snapshot` holds everything built from those files: who the tenants are
(TENANT_KEYS_FILE) and the Cedar policies (POLICY_FILE, POLICY_ENTITIES_FILE). It is
immutable; a reload builds a whole new one, every file read and validated first, and only
then swaps it in with one assignment: all or nothing. A request takes the snapshot in force
when it starts (the tenancy step stashes it on the request) and runs under it to its end,
however many reloads happen meanwhile.

One more file-backed item is one more field of `Snapshot` and one loader in `load`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from environs import EnvError

from . import policies
from .config import ConfigError, Settings, read_tenant_keys_file
from .tenancy import Tenancy

log = logging.getLogger("gateway")


@dataclass(frozen=True, slots=True)
class Snapshot:
    tenancy: Tenancy
    policies: policies.Policies | None  # None: no POLICY_FILE, every request allowed


def load(settings: Settings) -> Snapshot:
    """Every file-backed item read and validated; raises ConfigError (one line: the variable,
    the file, the problem) at the first that is not valid."""
    return Snapshot(tenancy=_tenancy(settings), policies=_policies(settings))


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
    }
    return [variable for variable, path in named.items() if path]


class LiveConfig:
    """The snapshot in force (`current`), replaced whole by `reload`."""

    __slots__ = ("_counted", "_settings", "current")

    def __init__(self, settings: Settings, counted: Callable[[bool], None]) -> None:
        self._settings = settings
        self._counted = counted  # config_reloads_total, by result
        self.current = load(settings)

    def reload(self) -> bool:
        """SIGHUP: the files read again. Invalid ones are refused, with one log line, and the
        snapshot in force stays; otherwise the new one replaces it for every later request."""
        try:
            snapshot = load(self._settings)
        except ConfigError as error:
            self._counted(False)
            log.error("reload refused, the configuration in force stays: %s", error.lines[0])
            return False
        self.current = snapshot
        self._counted(True)
        log.info("configuration reloaded (%s)", ", ".join(file_backed(self._settings)) or "no file to read")
        return True
