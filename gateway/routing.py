"""ROUTES_FILE (SPEC §13): named upstreams and model routes, read from TOML and checked whole.

`load_routes(path, environ)` reads the file with the standard library's `tomllib` and returns
an immutable `RouteTable`, or raises `ConfigError` with one line naming ROUTES_FILE and the
problem (start-up prints it and exits 2; a SIGHUP reload refuses the file with it). Keys are
never in the file: each upstream names the variable that holds its key (`api_key_env`), and a
value is never echoed. `RouteTable.lookup(model)` is the first route whose exact name or glob
matches; `model_ids()` is what GET /v1/models lists. Pure: no I/O past reading the file.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from environs import EnvError

from .config import ConfigError, endpoint, parse_api_key, parse_http_url, read_config_file

Kind = Literal["openai", "anthropic"]
KINDS: tuple[Kind, ...] = ("openai", "anthropic")
CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
# An upstream's name is a metrics label value and a response header: plain characters only.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_GLOB_CHARS = frozenset("*?[")
MAX_MATCH = 256
_UPSTREAM_KEYS = frozenset({"kind", "base_url", "api_key_env"})
_ROUTE_KEYS = frozenset({"match", "upstreams"})
_TARGET_KEYS = frozenset({"upstream", "model"})


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """One named upstream: an OpenAI-compatible server or Anthropic's Messages API."""

    name: str
    kind: Kind
    base_url: str = field(repr=False)  # may hold user info
    api_key_env: str
    api_key: str = field(repr=False)

    @property
    def url(self) -> str:
        """Where requests go: the kind's one endpoint under the base URL (no /v1 doubled)."""
        return endpoint(self.base_url, MESSAGES_PATH if self.kind == "anthropic" else CHAT_PATH)


@dataclass(frozen=True, slots=True)
class Target:
    upstream: UpstreamConfig
    model: str | None = None  # sent instead of the client's model


@dataclass(frozen=True, slots=True)
class Route:
    match: str
    targets: tuple[Target, ...]

    @property
    def is_glob(self) -> bool:
        return not _GLOB_CHARS.isdisjoint(self.match)


class RouteTable:
    """The routes in file order; the first whose name or glob matches a model wins."""

    __slots__ = ("_exact", "_globs", "routes", "upstreams")

    def __init__(self, upstreams: Mapping[str, UpstreamConfig], routes: tuple[Route, ...]) -> None:
        self.upstreams = MappingProxyType(dict(upstreams))
        self.routes = routes
        # Exact names: a dict lookup. Globs: one alternation, tried in file order by the regex
        # engine in one call, whose matching group names the route (a glob has no groups of its
        # own: fnmatch writes non-capturing ones).
        exact: dict[str, int] = {}
        globs: list[str] = []
        for index, route in enumerate(routes):
            if route.is_glob:
                globs.append(f"(?P<r{index}>{_glob_body(route.match)})")
            else:
                exact.setdefault(route.match, index)
        self._exact = exact
        self._globs = re.compile("|".join(globs)) if globs else None

    def lookup(self, model: str) -> Route | None:
        """The first route matching `model` (case-sensitive, as model names are), or None."""
        index = self._exact.get(model)
        if self._globs is not None:
            found = self._globs.fullmatch(model)
            if found is not None:
                name = found.lastgroup
                assert name is not None
                glob_index = int(name[1:])
                if index is None or glob_index < index:
                    index = glob_index
        return self.routes[index] if index is not None else None

    def model_ids(self) -> list[str]:
        """GET /v1/models (SPEC §13): exact names, and for a glob each target's rename, or the
        glob itself for a target without one; in file order, each once."""
        seen: dict[str, None] = {}
        for route in self.routes:
            if route.is_glob:
                for target in route.targets:
                    seen.setdefault(target.model or route.match)
            else:
                seen.setdefault(route.match)
        return list(seen)


def _glob_body(pattern: str) -> str:
    translated = fnmatch.translate(pattern)  # "(?s:...)\Z": matched whole with fullmatch instead
    return translated.removesuffix(r"\Z")


def load_routes(path: str, environ: Mapping[str, str]) -> RouteTable:
    """The routes of `path`, each upstream's key read from `environ` by the name it gives.
    Raises ConfigError with one line: `ROUTES_FILE: <path>: <problem>`."""
    try:
        document = tomllib.loads(read_config_file(path).decode("utf-8"))
    except OSError as exc:
        raise _error(path, f"cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise _error(path, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise _error(path, f"not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise _error(path, "not valid TOML: nested too deeply") from None
    try:
        return _table(document, environ)
    except _Problem as problem:
        raise _error(path, str(problem)) from None


class _Problem(Exception):
    """What is wrong with the file's contents (never a key's value)."""


def _error(path: str, problem: str) -> ConfigError:
    shown = path if path.isprintable() else repr(path)
    return ConfigError([f"ROUTES_FILE: {shown}: {' '.join(problem.split())}"])


def _table(document: dict[str, Any], environ: Mapping[str, str]) -> RouteTable:
    unknown = set(document) - {"upstreams", "models"}
    if unknown:
        raise _Problem(f"unknown top-level key(s) {_names(unknown)}: expected [upstreams.NAME] and [[models]]")
    raw_upstreams = document.get("upstreams")
    if not isinstance(raw_upstreams, dict) or not raw_upstreams:
        raise _Problem("no upstreams: add at least one [upstreams.NAME] table")
    upstreams = {name: _upstream(name, value, environ) for name, value in raw_upstreams.items()}
    raw_models = document.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise _Problem("no models: add at least one [[models]] entry with match and upstreams")
    routes = tuple(_route(number, value, upstreams) for number, value in enumerate(raw_models, start=1))
    return RouteTable(upstreams, routes)


def _upstream(name: str, value: object, environ: Mapping[str, str]) -> UpstreamConfig:
    if not _NAME.fullmatch(name):
        raise _Problem(f"upstream name {name[:64]!r}: expected 1-64 of A-Z a-z 0-9 . _ - (it is a metrics label)")
    where = f"upstreams.{name}"
    if not isinstance(value, dict):
        raise _Problem(f"{where} must be a table with kind, base_url and api_key_env")
    unknown = set(value) - _UPSTREAM_KEYS
    if unknown:
        raise _Problem(
            f"{where}: unknown key(s) {_names(unknown)}; expected kind, base_url, api_key_env"
            " (a key belongs in the environment variable api_key_env names, never in this file)"
        )
    kind = value.get("kind")
    if kind not in KINDS:
        raise _Problem(f'{where}.kind: expected "openai" or "anthropic"')
    base_url = value.get("base_url")
    if not isinstance(base_url, str):
        raise _Problem(f"{where}.base_url: required, an http:// or https:// URL")
    try:
        parse_http_url(base_url)
    except EnvError as exc:
        raise _Problem(f"{where}.base_url: {exc}") from None
    if urlsplit(base_url).password is not None:
        # The file holds no secret (SPEC §13): a password in a URL is one, whatever its name.
        raise _Problem(f"{where}.base_url: holds a password; put credentials in api_key_env's variable")
    variable = value.get("api_key_env")
    if not isinstance(variable, str) or not _VARIABLE.fullmatch(variable):
        raise _Problem(f"{where}.api_key_env: required, the name of the environment variable holding its key")
    key = environ.get(variable)
    if key is None:
        raise _Problem(f"{where}.api_key_env: {variable} is not set")
    if not key.strip():
        raise _Problem(f"{where}.api_key_env: {variable} is empty")
    try:
        key = parse_api_key(key)
    except EnvError as exc:
        raise _Problem(f"{where}.api_key_env: {variable}: {exc}") from None
    return UpstreamConfig(name, kind, base_url, variable, key)


def _route(number: int, value: object, upstreams: Mapping[str, UpstreamConfig]) -> Route:
    where = f"models[{number}]"
    if not isinstance(value, dict):
        raise _Problem(f"{where} must be a table with match and upstreams")
    unknown = set(value) - _ROUTE_KEYS
    if unknown:
        raise _Problem(f"{where}: unknown key(s) {_names(unknown)}; expected match and upstreams")
    match = value.get("match")
    if not isinstance(match, str):
        raise _Problem(f"{where}.match: required, a model name or a glob such as claude-*")
    glob_problem = _glob_problem(match)
    if glob_problem:
        raise _Problem(f"{where}.match: {glob_problem}")
    where = f"{where} ({match})"
    targets = value.get("upstreams")
    if not isinstance(targets, list) or not targets:
        raise _Problem(f'{where}.upstreams: an empty list; expected e.g. [{{ upstream = "openai" }}]')
    return Route(match, tuple(_target(where, target, upstreams) for target in targets))


def _target(where: str, value: object, upstreams: Mapping[str, UpstreamConfig]) -> Target:
    if not isinstance(value, dict):
        raise _Problem(f'{where}.upstreams: each entry is a table, e.g. {{ upstream = "openai", model = "gpt-4o" }}')
    unknown = set(value) - _TARGET_KEYS
    if unknown:
        raise _Problem(f"{where}.upstreams: unknown key(s) {_names(unknown)}; expected upstream and model")
    name = value.get("upstream")
    if not isinstance(name, str):
        raise _Problem(f"{where}.upstreams: an entry without an upstream name")
    upstream = upstreams.get(name)
    if upstream is None:
        raise _Problem(f"{where}: unknown upstream {name[:64]!r} (not defined under [upstreams])")
    model = value.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip() or not model.isprintable()):
        raise _Problem(f"{where}.upstreams: model must be a non-empty model name")
    return Target(upstream, model)


def _glob_problem(pattern: str) -> str | None:
    """Why `pattern` is no usable model name or glob (fnmatch's syntax: * ? [seq] [!seq])."""
    if not pattern:
        return "empty"
    if len(pattern) > MAX_MATCH:
        return f"longer than {MAX_MATCH} characters"
    if not pattern.isprintable() or any(c.isspace() for c in pattern):
        return "white space or control characters in a model name or glob"
    at = pattern.find("[")
    while at >= 0:  # as fnmatch reads a set: "[!" and a "]" first are part of it
        end = at + 1
        if end < len(pattern) and pattern[end] == "!":
            end += 1
        if end < len(pattern) and pattern[end] == "]":
            end += 1
        end = pattern.find("]", end)
        if end < 0:
            return f"bad glob {pattern!r}: a '[' set is never closed"
        at = pattern.find("[", end + 1)
    return None


def _names(keys: set[str]) -> str:
    return ", ".join(repr(key[:64]) for key in sorted(keys))
