"""Cedar policies (SPEC §15): POLICY_FILE and POLICY_ENTITIES_FILE, parsed once per load, and
the decisions they make, cached.

The only module that touches cedarpy. A load parses the policies into a `cedarpy.PolicySet` and
the entities into a `cedarpy.Entities` once: cedarpy re-parses text on every call otherwise.
A request is handed to Cedar as structured data (entity uids as `{"type", "id"}`, the context
as a dict), never spliced into policy text, so no tenant or model name can change what a
policy says. A decision is a pure function of (principal, action, model, context) under one
load, so it is kept in a bounded LRU table that lives and dies with its `Policies` object: a
reload builds a new one, and with it an empty table.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import cedarpy
import orjson

from .budgets import MAX_TOKENS_FIELDS
from .config import ConfigError, read_config_file
from .models import Tenant

# SPEC §15's actions: one per route, named as the route is.
ACTIONS = ("chat", "messages", "responses", "embeddings", "models")
ANY_MODEL = "*"  # the resource of a request that names no model (GET /v1/models)
DEFAULT_UPSTREAM = "default"  # context.upstream without ROUTES_FILE
LONG_MAX = 2**63 - 1  # Cedar's Long is 64-bit
NO_PERMIT = "no policy permits this request"
CACHE_ENTRIES = 4096
MAX_CACHED_ID = 256  # a longer model name is decided every time: it would crowd the table
_EVALUATION_ERROR = re.compile(r"policy `([^`]+)`")
log = logging.getLogger("gateway")


class Context(NamedTuple):
    """A request's Cedar context (a tuple: part of the cache key, hashed per request)."""

    stream: bool
    max_tokens: int
    has_tools: bool
    upstream: str


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    denied_by: tuple[str, ...] = ()  # the @id (else the Cedar id) of each forbid that applied

    @property
    def message(self) -> str:
        if not self.denied_by:
            return NO_PERMIT
        return ("denied by policy " if len(self.denied_by) == 1 else "denied by policies ") + ", ".join(self.denied_by)


ALLOW = Verdict(True)


def request_context(payload: Mapping[str, Any] | None, upstream: str) -> Context:
    """SPEC §15's context from the parsed body (None: a request without one)."""
    if payload is None:
        return Context(False, 0, False, upstream)
    stream = payload.get("stream")
    return Context(
        # A value that is no boolean (1, "true") is taken as the most it could mean, as for
        # max_tokens: a lax upstream (pydantic, vLLM) streams for it, and the gateway relays
        # the events it gets, so `forbid … when { context.stream }` cannot be slipped past.
        # Only what every reading takes as false is false: 0 and "" (pydantic and JavaScript
        # alike; "false" and "0" are true to JavaScript).
        stream is not None and stream is not False and stream != 0 and stream != "",
        max_tokens(payload),
        bool(payload.get("tools")) or bool(payload.get("functions")),
        upstream,
    )


def max_tokens(payload: Mapping[str, Any]) -> int:
    """The first present of max_tokens, max_completion_tokens, max_output_tokens; 0 with none.
    A value that is no count (a string, -1, 1.5) is taken as the most it could mean, so a
    policy's `context.max_tokens <= 1000` cannot be slipped past by a lenient upstream."""
    for name in MAX_TOKENS_FIELDS:
        value = payload.get(name)
        if value is None:  # absent, or null as some clients send "not set"
            continue
        return min(value, LONG_MAX) if type(value) is int and value >= 0 else LONG_MAX
    return 0


def principal_of(tenant: Tenant, keyed: bool) -> str:
    """The tenant's name in keyed mode; in open mode its public id (the key, or with
    HASH_IDENTIFIERS its hash: policy files then name no key)."""
    return tenant.name if keyed else tenant.public_id


class Policies:
    """One load of the policy files, and the decisions made under it."""

    __slots__ = ("_cache", "_cache_size", "_entities", "_failing", "_forbids", "_labels", "_policies")

    def __init__(
        self,
        policies: cedarpy.PolicySet,
        entities: cedarpy.Entities,
        labels: Mapping[str, str],
        cache_size: int = CACHE_ENTRIES,
        forbids: frozenset[str] = frozenset(),
    ) -> None:
        self._policies = policies
        self._entities = entities
        self._labels = labels  # Cedar's policy id -> what a denial names it by
        self._forbids = forbids  # Cedar's ids of the forbid policies
        self._cache: OrderedDict[tuple[str, str, str, Context], Verdict] = OrderedDict()
        self._cache_size = cache_size
        self._failing: set[str] = set()  # policies whose evaluation errors were logged

    def decide(self, principal: str, action: str, model: str, context: Context) -> Verdict:
        key = (principal, action, model, context)
        cache = self._cache
        verdict = cache.get(key)
        if verdict is not None:
            cache.move_to_end(key)
            return verdict
        verdict = self.evaluate(principal, action, model, context)
        if self._cache_size and len(model) <= MAX_CACHED_ID and len(principal) <= MAX_CACHED_ID:
            cache[key] = verdict
            if len(cache) > self._cache_size:
                cache.popitem(last=False)
        return verdict

    def evaluate(self, principal: str, action: str, model: str, context: Context) -> Verdict:
        """Cedar's decision, uncached."""
        request = {
            "principal": {"type": "Tenant", "id": principal},
            "action": {"type": "Action", "id": action},
            "resource": {"type": "Model", "id": model},
            "context": context._asdict(),
        }
        result = cedarpy.is_authorized(request, self._policies, self._entities)
        diagnostics = result.diagnostics
        failed: list[str] = []
        if diagnostics.errors:
            failed = self._note_errors(diagnostics.errors)
        if result.allowed and not failed:
            return ALLOW
        labels = self._labels
        # Allowed but for a failed forbid: the reasons are the permits that applied, not named.
        denying = failed if result.allowed else (*diagnostics.reasons, *failed)
        return Verdict(False, tuple(sorted({labels.get(reason, reason) for reason in denying})))

    def _note_errors(self, errors: list[str]) -> list[str]:
        """Cedar skips a policy whose evaluation fails (a Long overflow, say): said once per
        policy and load, without the request's names (a key, in open mode). The forbids among
        them are returned: they deny (fail closed). Skipped, a forbid could be dodged by the
        client: `context.max_tokens + 100 > 1000` overflows for a max_tokens of "5000" or -1
        (taken as the largest Long) or any huge count, and the request passed."""
        failed = []
        for error in errors:
            match = _EVALUATION_ERROR.search(error)
            policy = match.group(1) if match else "?"
            forbid = policy in self._forbids
            if forbid:
                failed.append(policy)
            if policy not in self._failing:
                self._failing.add(policy)
                log.warning(
                    "policy %s could not be evaluated for a request (a Long overflow?): %s",
                    self._labels.get(policy, policy),
                    "a forbid denies it" if forbid else "a permit is skipped",
                )
        return failed

    @property
    def cached(self) -> int:
        """How many decisions are kept."""
        return len(self._cache)


# --- loading: every problem is one ConfigError line naming the variable and the file ---


def load(policy_file: str, entities_file: str | None = None, cache_size: int = CACHE_ENTRIES) -> Policies:
    """Parse POLICY_FILE (Cedar) and POLICY_ENTITIES_FILE (Cedar entities JSON). Raises ConfigError."""
    text = _read("POLICY_FILE", policy_file)
    too_deep = _too_deep(text)
    if too_deep is not None:
        raise _bad("POLICY_FILE", policy_file, too_deep)
    try:
        policy_set = cedarpy.PolicySet.from_str(text)
        est = orjson.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        raise _bad("POLICY_FILE", policy_file, str(exc)) from None
    if not len(policy_set):
        raise _bad("POLICY_FILE", policy_file, "no policy in it (Cedar would deny every request)")
    entities, listed = _entities(entities_file)
    entity_actions = {uid["id"] for uid in (_uid(entry) for entry in listed) if uid.get("type") == "Action"}
    known = set(ACTIONS) | entity_actions
    # An action of a namespace (`Acme::Action::"chat"`) is none of them either: requests name
    # `Action::"chat"`, so it would never match.
    unknown = sorted((kind, id_) for kind, id_ in set(_actions_named(est)) if kind != "Action" or id_ not in known)
    if unknown:
        kind, id_ = unknown[0]
        raise _bad(
            "POLICY_FILE",
            policy_file,
            f'{kind}::"{id_}" is no route\'s action (they are: {", ".join(ACTIONS)}, as Action::"…")',
        )
    labels = {
        policy_id: (body.get("annotations") or {}).get("id") or policy_id
        for policy_id, body in est.get("staticPolicies", {}).items()
    }
    forbids = frozenset(
        policy_id for policy_id, body in est.get("staticPolicies", {}).items() if body.get("effect") == "forbid"
    )
    schema = _schema(listed, _types_named(est))
    if schema is not None:
        checked = cedarpy.validate_policies(text, orjson.dumps(schema).decode())
        if not checked.validation_passed:
            error = checked.errors[0]
            name = labels.get(error.policy_id, error.policy_id)
            # Cedar's message names the policy by its Cedar id: the @id says more.
            message = error.error.replace(f"policy `{error.policy_id}`", f"policy `{name}`")
            raise _bad("POLICY_FILE", policy_file, f"does not validate: {message}")
    return Policies(policy_set, entities, labels, cache_size, forbids)


def _entities(path: str | None) -> tuple[cedarpy.Entities, list[dict[str, Any]]]:
    """The parsed entities, and the file's list of them."""
    if path is None:
        return cedarpy.Entities.from_json_str("[]"), []
    text = _read("POLICY_ENTITIES_FILE", path)
    try:
        listed = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _bad("POLICY_ENTITIES_FILE", path, f"not JSON: {exc.msg} (line {exc.lineno})") from None
    if type(listed) is not list:
        raise _bad("POLICY_ENTITIES_FILE", path, "expected a JSON array of entities")
    for number, entry in enumerate(listed, start=1):
        problem = _entity_problem(entry)
        if problem:
            raise _bad("POLICY_ENTITIES_FILE", path, f"entity {number}: {problem}")
    if _deepest_hierarchy(listed) > MAX_HIERARCHY_DEPTH:
        raise _bad("POLICY_ENTITIES_FILE", path, f"a chain of parents more than {MAX_HIERARCHY_DEPTH} deep")
    try:
        entities = cedarpy.Entities.from_json_str(text)
    except ValueError as exc:
        raise _bad("POLICY_ENTITIES_FILE", path, f"{_which_entity(listed)}{exc}") from None
    return entities, listed


# SPEC §15's request shape, fixed: what every policy is checked against.
_CONTEXT = {
    "type": "Record",
    "attributes": {
        "stream": {"type": "Boolean"},
        "max_tokens": {"type": "Long"},
        "has_tools": {"type": "Boolean"},
        "upstream": {"type": "String"},
    },
}


def _schema(listed: list[dict[str, Any]], named: set[str]) -> dict[str, Any] | None:
    """The Cedar schema requests are made under (SPEC §15): principal Tenant, resource Model,
    the route actions (and the action groups of POLICY_ENTITIES_FILE) and the fixed context;
    the entity types the entities file and the policies name, any of them a possible group of
    any other; the attributes the entities file gives each type, typed by their values. An
    attribute is required only on a type every entity of which comes from the file and has it
    (not Tenant or Model: a request may name one the file does not list). Cedar's validator
    then refuses what could never evaluate: a context field or attribute that does not exist,
    a comparison of a Long with a String, an attribute read without `has` where some entities
    lack it. None (no check beyond parsing) when the file's values give an attribute no one
    Cedar type."""
    kinds: dict[str, dict[str, Any]] = {}  # type -> {"count": n, "attrs": {name: type}, "seen": {name: n}}
    groups: dict[str, list[str]] = {action: [] for action in ACTIONS}  # action -> its groups
    for entry in listed:
        uid = _uid(entry)
        parents = [_ref(parent) for parent in entry["parents"]]
        if uid["type"] == "Action":
            groups.setdefault(uid["id"], []).extend(p["id"] for p in parents if p.get("type") == "Action")
            continue
        kind = kinds.setdefault(uid["type"], {"count": 0, "attrs": {}, "seen": {}})
        kind["count"] += 1
        for name, value in entry["attrs"].items():
            typed = _cedar_type(value)
            if typed is None or kind["attrs"].setdefault(name, typed) != typed:
                return None
            kind["seen"][name] = kind["seen"].get(name, 0) + 1
        named.update(p["type"] for p in parents if type(p.get("type")) is str and p["type"] != "Action")
    every = sorted({"Tenant", "Model"} | named | set(kinds) - {"Action"})
    # A type is declared in its namespace (`Acme::Plan`: type `Plan` of namespace `Acme`); the
    # empty one holds the rest. References (memberOfTypes, attributes) keep the full names.
    namespaces: dict[str, dict[str, Any]] = {}
    for name in every:
        kind = kinds.get(name, {"count": 0, "attrs": {}, "seen": {}})
        open_ended = name in ("Tenant", "Model")
        attributes = {
            attr: {**typed, "required": not open_ended and kind["seen"][attr] == kind["count"]}
            for attr, typed in kind["attrs"].items()
        }
        namespace, _, basename = name.rpartition("::")
        declared = namespaces.setdefault(namespace, {"entityTypes": {}, "actions": {}})["entityTypes"]
        declared[basename] = {"memberOfTypes": every, "shape": {"type": "Record", "attributes": attributes}}
    applies = {"principalTypes": ["Tenant"], "resourceTypes": ["Model"], "context": _CONTEXT}
    actions: dict[str, dict[str, Any]] = {
        action: {"memberOf": [{"id": group} for group in member_of]} for action, member_of in groups.items()
    }
    for action in ACTIONS:
        actions[action]["appliesTo"] = applies
    for member_of in groups.values():
        for group in member_of:
            actions.setdefault(group, {"memberOf": []})
    namespaces.setdefault("", {"entityTypes": {}, "actions": {}})["actions"] = actions
    return namespaces


def _cedar_type(value: object) -> dict[str, Any] | None:
    """The Cedar type of an attribute's value in Cedar's entities JSON; None: none to tell
    (an empty or mixed set, an extension value, a number that is no Long)."""
    if type(value) is bool:
        return {"type": "Boolean"}
    if type(value) is int:
        return {"type": "Long"}
    if type(value) is str:
        return {"type": "String"}
    if type(value) is list:
        elements = [_cedar_type(item) for item in value]
        if not elements or elements[0] is None or any(e != elements[0] for e in elements):
            return None
        return {"type": "Set", "element": elements[0]}
    if type(value) is dict:
        if "__extn" in value:
            return None
        if "__entity" in value:
            uid = _ref(value)
            return {"type": "Entity", "name": uid["type"]} if type(uid.get("type")) is str else None
        attributes = {}
        for name, item in value.items():
            typed = _cedar_type(item)
            if typed is None:
                return None
            attributes[name] = typed
        return {"type": "Record", "attributes": attributes}
    return None


def _types_named(node: object) -> set[str]:
    """Every entity type a policy set's JSON form names (but Action)."""
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            kind = item.get("type")
            if type(kind) is str and type(item.get("id")) is str and kind != "Action" and not kind.endswith("::Action"):
                found.add(kind)
            entity_type = item.get("entity_type")
            if type(entity_type) is str:
                found.add(entity_type)
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return found


def _entity_problem(entry: object) -> str:
    if type(entry) is not dict:
        return "not a JSON object"
    uid = _uid(entry)
    if type(uid.get("type")) is not str or type(uid.get("id")) is not str:
        return 'needs "uid": {"type": "...", "id": "..."}'
    if type(entry.get("attrs")) is not dict:
        return 'needs "attrs": an object ({} for none)'
    if type(entry.get("parents")) is not list:
        return 'needs "parents": an array ([] for none)'
    return ""


def _ref(value: object) -> dict[str, Any]:
    """An entity reference (a parent, an attribute's value): {"type", "id"}, or Cedar's
    escaped form of it."""
    if type(value) is dict and type(value.get("__entity")) is dict:
        value = value["__entity"]
    return value if type(value) is dict else {}


# Cedar computes every entity's ancestors up front, recursively: a chain of 10,000 parents took
# 97 s and 11 GB (the event loop blocked throughout, on SIGHUP), one of 30,000 overflowed the
# stack (SIGSEGV, the gateway gone). Plans and tiers are a few levels deep.
MAX_HIERARCHY_DEPTH = 32


def _deepest_hierarchy(listed: list[dict[str, Any]]) -> int:
    """The longest chain of parents in the entities file (cycles are left to Cedar)."""
    parents: dict[tuple[object, object], list[tuple[object, object]]] = {}
    for entry in listed:
        uid = _uid(entry)
        parents[(uid.get("type"), uid.get("id"))] = [
            (p.get("type"), p.get("id")) for p in map(_parent_uid, entry["parents"]) if p is not None
        ]
    depth: dict[tuple[object, object], int] = {}
    for start in parents:
        stack, on_stack = [start], {start}
        while stack:  # iterative: the chain may be as long as the file
            node = stack[-1]
            pending = next((p for p in parents.get(node, ()) if p not in depth and p not in on_stack), None)
            if pending is not None:
                stack.append(pending)
                on_stack.add(pending)
                continue
            on_stack.discard(stack.pop())
            depth[node] = 1 + max((depth.get(p, 0) for p in parents.get(node, ())), default=0)
    return max(depth.values(), default=0)


def _parent_uid(parent: object) -> dict[str, Any] | None:
    return _uid({"uid": parent}) or None


def _uid(entry: dict[str, Any]) -> dict[str, Any]:
    uid = entry.get("uid")
    if type(uid) is dict and type(uid.get("__entity")) is dict:  # Cedar's escaped form
        uid = uid["__entity"]
    return uid if type(uid) is dict else {}


def _which_entity(listed: list[Any]) -> str:
    """The first entity Cedar refuses on its own (its messages name none); "" when only the
    whole list fails (an entity listed twice: Cedar's message names it)."""
    for number, entry in enumerate(listed, start=1):
        try:
            cedarpy.Entities.from_json_str(orjson.dumps([entry]).decode())
        except (ValueError, TypeError):  # TypeError: nested past what orjson writes (Cedar refused it too)
            return f"entity {number}: "
    return ""


def _actions_named(node: object) -> Iterator[tuple[str, str]]:
    """Every `Action::"…"` (or `Namespace::Action::"…"`) in a policy set's JSON form: scopes,
    and literals in conditions; as (type, id)."""
    if type(node) is dict:
        kind = node.get("type")
        if type(kind) is str and (kind == "Action" or kind.endswith("::Action")) and type(node.get("id")) is str:
            yield kind, node["id"]
        for value in node.values():
            yield from _actions_named(value)
    elif type(node) is list:
        for value in node:
            yield from _actions_named(value)


# Cedar's parser recurses once per bracket a policy nests, on the thread's stack: a policy
# 1,000 parentheses deep overflowed it, and the segfault took the gateway down, at start-up or
# on SIGHUP; 20,000 `&&`s in a row did too. So, strings and comments apart, a policy's brackets
# may nest MAX_POLICY_DEPTH deep (400 parsed fine, in a thread too) and it may hold
# MAX_POLICY_OPERATORS operators (2,048 of any kind parsed fine; past ~1,500 `||`s Cedar's
# evaluation errs, which denies): room for an allow-list of hundreds of `principal == …`.
MAX_POLICY_DEPTH = 256
MAX_POLICY_OPERATORS = 2048
_OPERATOR = re.compile(r'"(?:[^"\\]|\\.)*"|//[^\n]*|&&|\|\||[(\[{)\]}.+\-*<>=!;]|\b(?:if|has|like|in|is)\b')
_OPENS, _CLOSES = frozenset("([{"), frozenset(")]}")


def _too_deep(text: str) -> str | None:
    """Why Cedar must not be handed `text` (a policy nested too deeply, or too long a chain
    of operators)."""
    depth = count = 0
    number = 1
    for match in _OPERATOR.finditer(text):
        token = match.group()
        if token == ";":
            depth = count = 0
            number += 1
        elif token in _OPENS:
            depth += 1
            if depth > MAX_POLICY_DEPTH:
                return f"policy {number} nests brackets more than {MAX_POLICY_DEPTH} deep"
        elif token in _CLOSES:
            depth -= 1
        elif token[0] != '"' and not token.startswith("//"):
            count += 1
            if count > MAX_POLICY_OPERATORS:
                return f"policy {number} has more than {MAX_POLICY_OPERATORS} operators"
    return None


def _read(variable: str, path: str) -> str:
    try:
        return read_config_file(path).decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{variable}: cannot read {_shown(path)}: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise _bad(variable, path, "not UTF-8 text") from None


def _bad(variable: str, path: str, problem: str) -> ConfigError:
    return ConfigError([f"{variable}: {_shown(path)}: {' '.join(problem.split())}"])


def _shown(path: str) -> str:
    # A control character in a path is shown escaped, never printed as a second line.
    return path if path.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)
