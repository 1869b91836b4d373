"""Cedar policies (gateway/policies.py): loading, decisions, the context, the cache, hostile names."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import policies
from gateway.config import ConfigError, Settings
from gateway.models import Tenant
from gateway.policies import LONG_MAX, NO_PERMIT, Context, Policies, Verdict, max_tokens, principal_of, request_context

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_POLICIES = ROOT / "scripts" / "policies.example.cedar"
EXAMPLE_ENTITIES = ROOT / "scripts" / "policy-entities.example.json"
PLAIN = Context(False, 0, False, "default")


def write(tmp_path: Path, name: str, text: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def entities(*uids: tuple[str, str, list[tuple[str, str]]]) -> str:
    return orjson.dumps(
        [
            {"uid": {"type": kind, "id": id_}, "attrs": {}, "parents": [{"type": t, "id": i} for t, i in parents]}
            for kind, id_, parents in uids
        ]
    ).decode()


@pytest.fixture(scope="module")
def example() -> Policies:
    return policies.load(str(EXAMPLE_POLICIES), str(EXAMPLE_ENTITIES))


# --- the example plans ---


@pytest.mark.parametrize(
    ("tenant", "action", "model", "context", "expected"),
    [
        ("free-demo", "chat", "gpt-4o-mini", PLAIN, ()),
        ("free-demo", "messages", "claude-3-5-haiku-latest", Context(True, 1000, False, "default"), ()),
        ("free-demo", "chat", "gpt-4o", PLAIN, (NO_PERMIT,)),
        ("free-demo", "chat", "gpt-4o-mini", Context(False, 0, True, "default"), ("free-no-tools",)),
        ("free-demo", "chat", "gpt-4o-mini", Context(False, 1001, False, "default"), ("free-max-1000-tokens",)),
        (
            "free-demo",
            "messages",
            "gpt-4o-mini",
            Context(True, 4000, True, "default"),
            ("free-max-1000-tokens", "free-no-tools"),
        ),
        ("team-demo", "chat", "gpt-4o", Context(True, 8000, True, "default"), ()),
        ("team-demo", "chat", "gpt-4o-mini", PLAIN, ()),  # basic is inside standard
        ("team-demo", "chat", "o3", PLAIN, (NO_PERMIT,)),
        (
            "team-demo",
            "messages",
            "claude-sonnet-4-5",
            Context(False, 8001, False, "default"),
            ("team-max-8000-tokens",),
        ),
        ("enterprise-demo", "chat", "o3", Context(True, LONG_MAX, True, "default"), ()),
        ("enterprise-demo", "embeddings", "anything-at-all", PLAIN, ()),
        ("team-demo", "models", "*", PLAIN, ()),
        ("stranger", "chat", "gpt-4o-mini", PLAIN, (NO_PERMIT,)),
        ("stranger", "models", "*", PLAIN, (NO_PERMIT,)),
    ],
)
def test_the_example_plans(
    example: Policies, tenant: str, action: str, model: str, context: Context, expected: tuple[str, ...]
) -> None:
    verdict = example.decide(tenant, action, model, context)
    assert verdict.allowed == (not expected)
    if expected == (NO_PERMIT,):
        assert verdict.denied_by == () and verdict.message == NO_PERMIT
    elif expected:
        assert verdict.denied_by == expected
        assert all(policy_id in verdict.message for policy_id in expected)


def test_a_denying_policy_without_an_id_is_named_by_cedars_id(tmp_path: Path) -> None:
    loaded = policies.load(
        write(tmp_path, "p.cedar", "permit(principal, action, resource);\nforbid(principal, action, resource);")
    )
    assert loaded.decide("t", "chat", "m", PLAIN).denied_by == ("policy1",)
    assert loaded.decide("t", "chat", "m", PLAIN).message == "denied by policy policy1"


# --- the context ---


def test_the_context_comes_from_the_body() -> None:
    assert request_context(None, "default") == PLAIN
    body = {"model": "m", "stream": True, "max_completion_tokens": 50, "tools": [{"type": "function"}]}
    assert request_context(body, "up") == Context(True, 50, True, "up")
    assert request_context({"stream": False, "functions": [{"name": "f"}]}, "d") == Context(False, 0, True, "d")
    assert request_context({"tools": [], "functions": []}, "d").has_tools is False


@pytest.mark.parametrize("value", [1, "true", "yes", 1.0, "0", "false", [], {}])
def test_a_stream_flag_that_is_no_boolean_counts_as_streaming(value: object) -> None:
    # pydantic (vLLM) reads 1, "true", "yes" as true and the upstream streams, and a JavaScript
    # server "0" and "false"; the gateway relays those events: a policy forbidding streams must
    # see them (the most it could mean).
    assert request_context({"stream": value}, "d").stream is True


@pytest.mark.parametrize("value", [None, False, 0, 0.0, ""])
def test_a_stream_flag_that_every_reading_takes_as_false_is_no_stream(value: object) -> None:
    # 0 and "" are false to pydantic and to JavaScript alike: a no-stream forbid must not refuse
    # a request no upstream would stream (it did for 0, since 3b49d0b).
    assert request_context({"stream": value}, "d").stream is False
    assert request_context({}, "d").stream is False


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, 0),
        ({"max_tokens": 10, "max_completion_tokens": 20}, 10),
        ({"max_tokens": None, "max_completion_tokens": 20}, 20),  # null is "not set"
        ({"max_output_tokens": 7}, 7),
        ({"max_tokens": 0}, 0),
        ({"max_tokens": 2**80}, LONG_MAX),
        ({"max_tokens": "5000"}, LONG_MAX),  # no count: the most it could mean
        ({"max_tokens": -1}, LONG_MAX),
        ({"max_tokens": 12.5}, LONG_MAX),
        ({"max_tokens": True}, LONG_MAX),
    ],
)
def test_max_tokens(body: dict[str, object], expected: int) -> None:
    assert max_tokens(body) == expected


def test_the_principal_is_the_name_in_keyed_mode_and_the_public_id_in_open_mode() -> None:
    tenant = Tenant("acme", "h:0123abcd", "key:x")
    assert principal_of(tenant, keyed=True) == "acme"
    assert principal_of(tenant, keyed=False) == "h:0123abcd"


# --- hostile names: structured uids, never policy text ---

HOSTILE = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Z", "Cc")) | st.sampled_from('"\\\n;)('),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(name=HOSTILE, model=HOSTILE)
def test_any_tenant_or_model_name_is_itself_and_nothing_more(
    tmp_path_factory: pytest.TempPathFactory, name: str, model: str
) -> None:
    tmp = tmp_path_factory.mktemp("hostile")
    text = (
        'permit(principal in Plan::"paid", action, resource);\n'
        '@id("blocked") forbid(principal, action, resource in Tier::"blocked");'
    )
    loaded = policies.load(
        write(tmp, "p.cedar", text),
        write(tmp, "e.json", entities(("Tenant", name, [("Plan", "paid")]), ("Model", model, [("Tier", "blocked")]))),
    )
    assert loaded.decide(name, "chat", "other-model", PLAIN).allowed
    assert loaded.decide(name, "chat", model, PLAIN).denied_by == ("blocked",)
    assert not loaded.decide(name + "x", "chat", "other-model", PLAIN).allowed
    assert loaded.decide(name, "chat", model + " ", PLAIN).allowed


def test_a_name_written_as_policy_text_stays_a_name(tmp_path: Path) -> None:
    loaded = policies.load(write(tmp_path, "p.cedar", 'permit(principal == Tenant::"admin", action, resource);'))
    for injected in (
        'admin"',
        'x", action, resource); permit(principal, action, resource',
        'admin\\"',
        'Tenant::"admin"',
        "admin\u0000",
    ):
        assert not loaded.decide(injected, "chat", "m", PLAIN).allowed
        assert not loaded.decide("nobody", "chat", injected, PLAIN).allowed
    assert loaded.decide("admin", "chat", '") || true || ("', PLAIN).allowed


# --- the cache ---

NAMES = st.sampled_from(["free-demo", "team-demo", "enterprise-demo", "stranger", 'q"uote'])
MODELS = st.sampled_from(["gpt-4o-mini", "gpt-4o", "o3", "claude-sonnet-4-5", "*", "x" * 300])
CONTEXTS = st.builds(
    Context, st.booleans(), st.sampled_from([0, 1, 1000, 1001, 8000, 8001, LONG_MAX]), st.booleans(), st.just("default")
)


@settings(max_examples=300, deadline=None)
@given(
    requests=st.lists(
        st.tuples(NAMES, st.sampled_from(["chat", "messages", "models"]), MODELS, CONTEXTS), min_size=1, max_size=30
    )
)
def test_a_cached_decision_is_the_uncached_one(requests: list[tuple[str, str, str, Context]]) -> None:
    cached = policies.load(str(EXAMPLE_POLICIES), str(EXAMPLE_ENTITIES), cache_size=8)
    for request in requests + requests[::-1]:
        assert cached.decide(*request) == cached.evaluate(*request)
        assert cached.cached <= 8


def test_the_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    loaded = policies.load(str(EXAMPLE_POLICIES), str(EXAMPLE_ENTITIES), cache_size=2)
    loaded.decide("a", "chat", "m1", PLAIN)
    loaded.decide("a", "chat", "m2", PLAIN)
    loaded.decide("a", "chat", "m1", PLAIN)  # m1 used last: m2 goes first
    loaded.decide("a", "chat", "m3", PLAIN)
    assert loaded.cached == 2
    loaded.decide("a", "chat", "x" * 10_000, PLAIN)  # too long to keep
    assert loaded.cached == 2


# --- loading: one line naming the variable, the file and the problem ---


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("permit(principal, action, resource", "unexpected end of input"),
        ("permit(principal, acton, resource);", "acton"),
        ("// nothing but a comment\n", "no policy in it"),
        ('permit(principal, action == Action::"chats", resource);', 'Action::"chats" is no route\'s action'),
        ('permit(principal, action, resource) when { action in [Action::"embed"] };', 'Action::"embed"'),
        # A namespace's action is never a request's (found by a review: the schema's error named none).
        ('forbid(principal, action == Acme::Action::"chat", resource);', 'Acme::Action::"chat" is no route\'s action'),
    ],
)
def test_a_policy_file_that_does_not_parse_or_validate_is_one_config_line(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = write(tmp_path, "p.cedar", text)
    with pytest.raises(ConfigError) as caught:
        policies.load(path)
    assert len(caught.value.lines) == 1
    line = caught.value.lines[0]
    assert line.startswith(f"POLICY_FILE: {path}: ") and problem in line and "\n" not in line


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # A misspelt context field: the forbid would never apply (Cedar skips a policy it
        # cannot evaluate), so a request it meant to stop would pass (found by a review).
        (
            '@id("cap") forbid(principal, action, resource) when { context.max_token > 1000 };',
            "policy `cap`, attribute `max_token` in context",
        ),
        (
            'forbid(principal, action, resource) when { context.max_tokens > "1000" };',
            "expected Long but saw String",
        ),
        ('permit(principal, action, resource) when { principal.tier == "gold" };', "attribute `tier`"),
        ("permit(principal, action, resource) when { context.stream == 1 };", "does not validate"),
    ],
)
def test_a_policy_that_could_never_evaluate_stops_the_load(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, "p.cedar", "permit(principal, action, resource);\n" + text)
    with pytest.raises(ConfigError) as caught:
        policies.load(path)
    (line,) = caught.value.lines
    assert line.startswith(f"POLICY_FILE: {path}: does not validate: ") and problem in line and "\n" not in line


def test_attributes_and_groups_of_the_entities_file_validate(tmp_path: Path) -> None:
    # Typed by the file's values; read on a tenant, one the file may not list, under `has`.
    listed = [
        {
            "uid": {"type": "Tenant", "id": "a"},
            "attrs": {"tier": "gold", "seats": 3},
            "parents": [{"type": "Plan", "id": "p"}],
        },
        {"uid": {"type": "Plan", "id": "p"}, "attrs": {"cap": 1000}, "parents": []},
    ]
    loaded = policies.load(
        write(
            tmp_path,
            "p.cedar",
            'permit(principal in Plan::"p", action, resource)\n'
            '  when { principal has tier && principal.tier == "gold" };\n'
            "forbid(principal, action, resource)\n"
            "  when { principal has seats && principal.seats < context.max_tokens };\n"
            'permit(principal in Group::"never", action, resource);',  # a group no entity is in: valid
        ),
        write(tmp_path, "e.json", orjson.dumps(listed).decode()),
    )
    assert loaded.decide("a", "chat", "m", PLAIN).allowed
    assert not loaded.decide("a", "chat", "m", Context(False, 5, False, "default")).allowed
    assert not loaded.decide("b", "chat", "m", PLAIN).allowed
    # Without `has`: some tenants have no such attribute, the read could fail.
    with pytest.raises(ConfigError, match="does not validate"):
        policies.load(
            write(tmp_path, "q.cedar", 'permit(principal, action, resource) when { principal.tier == "gold" };'),
            write(tmp_path, "e.json", orjson.dumps(listed).decode()),
        )


def test_namespaced_entity_types_validate(tmp_path: Path) -> None:
    # Cedar types may live in namespaces (`Acme::Plan`, `Org::Billing::Tier`): the schema the
    # policies are validated under listed `Acme::Plan` as a type of the empty namespace, which
    # Cedar's schema parser refuses ("invalid id `Acme::Plan`"), so a valid file stopped start-up
    # (found by a review).
    listed = [
        {"uid": {"type": "Tenant", "id": "a"}, "attrs": {}, "parents": [{"type": "Acme::Plan", "id": "free"}]},
        {"uid": {"type": "Acme::Plan", "id": "free"}, "attrs": {"cap": 1000}, "parents": []},
        {"uid": {"type": "Model", "id": "m"}, "attrs": {}, "parents": [{"type": "Org::Billing::Tier", "id": "basic"}]},
        {"uid": {"type": "Org::Billing::Tier", "id": "basic"}, "attrs": {}, "parents": []},
    ]
    loaded = policies.load(
        write(
            tmp_path,
            "p.cedar",
            '@id("free") permit(principal in Acme::Plan::"free", action, resource in Org::Billing::Tier::"basic");\n'
            '@id("cap") forbid(principal in Acme::Plan::"free", action, resource)\n'
            "  when { context.max_tokens > 1000 };",
        ),
        write(tmp_path, "e.json", orjson.dumps(listed).decode()),
    )
    assert loaded.decide("a", "chat", "m", PLAIN).allowed
    assert loaded.decide("a", "chat", "m", Context(False, 1001, False, "default")) == Verdict(False, ("cap",))
    assert not loaded.decide("a", "chat", "other", PLAIN).allowed
    assert not loaded.decide("b", "chat", "m", PLAIN).allowed
    # Still validated: an attribute a namespaced type does not have.
    with pytest.raises(ConfigError, match="does not validate"):
        policies.load(
            write(tmp_path, "q.cedar", 'permit(principal, action, resource) when { Acme::Plan::"free".seats > 1 };'),
            write(tmp_path, "e.json", orjson.dumps(listed).decode()),
        )


def test_the_example_files_validate() -> None:
    assert policies.load(str(EXAMPLE_POLICIES), str(EXAMPLE_ENTITIES)) is not None
    assert policies.load(str(EXAMPLE_POLICIES)) is not None  # its groups are named, so known, without the file


def test_unreadable_policy_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        policies.load(str(tmp_path / "missing.cedar"))
    assert caught.value.lines == [f"POLICY_FILE: cannot read {tmp_path / 'missing.cedar'}: No such file or directory"]
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        policies.load(write(tmp_path, "p.cedar", b"permit(principal, action, resource); // \xff"))


def test_an_action_group_from_the_entities_file_is_known(tmp_path: Path) -> None:
    loaded = policies.load(
        write(tmp_path, "p.cedar", 'permit(principal, action in Action::"inference", resource);'),
        write(tmp_path, "e.json", entities(("Action", "chat", [("Action", "inference")]), ("Action", "inference", []))),
    )
    assert loaded.decide("t", "chat", "m", PLAIN).allowed
    assert not loaded.decide("t", "models", "*", PLAIN).allowed


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[{", "not JSON: "),
        ('{"uid": 1}', "expected a JSON array of entities"),
        ("[1]", "entity 1: not a JSON object"),
        ('[{"uid": {"type": "Tenant", "id": "a"}, "parents": []}]', 'entity 1: needs "attrs"'),
        ('[{"uid": {"type": "Tenant", "id": "a"}, "attrs": {}}]', 'entity 1: needs "parents"'),
        ('[{"uid": {"type": "Tenant"}, "attrs": {}, "parents": []}]', 'entity 1: needs "uid"'),
        (
            '[{"uid": {"type": "Tenant", "id": "a"}, "attrs": {}, "parents": []},'
            ' {"uid": {"type": "Tenant", "id": "b"}, "attrs": {"n": 1.5}, "parents": []}]',
            "entity 2: ",
        ),
        (
            '[{"uid": {"type": "Tenant", "id": "a"}, "attrs": {}, "parents": []},'
            ' {"uid": {"type": "Tenant", "id": "a"}, "attrs": {"x": 1}, "parents": []}]',
            'duplicate entity entry `Tenant::"a"`',
        ),
        (  # nested past what orjson writes back: was a traceback, not a line
            '[{"uid": {"type": "Tenant", "id": "a"}, "attrs": {"n": '
            + '{"a": ' * 900
            + '"x"'
            + "}" * 900
            + '}, "parents": []}]',
            "entity 1: ",
        ),
    ],
)
def test_an_entities_file_that_does_not_parse_is_one_config_line(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, "e.json", text)
    with pytest.raises(ConfigError) as caught:
        policies.load(str(EXAMPLE_POLICIES), path)
    assert len(caught.value.lines) == 1
    line = caught.value.lines[0]
    assert line.startswith(f"POLICY_ENTITIES_FILE: {path}: ") and problem in line and "\n" not in line


def test_a_policy_that_fails_to_evaluate_is_logged_once_without_the_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loaded = policies.load(
        write(
            tmp_path,
            "p.cedar",
            "permit(principal, action, resource);\n"
            # Valid Cedar that still fails at run time: a Long overflow.
            '@id("needs-plan") forbid(principal, action, resource)'
            " when { context.max_tokens * 4611686018427387904 > 0 };",
        )
    )
    with caplog.at_level(logging.WARNING, logger="gateway"):
        for secret in ("sk-open-mode-key-1", "sk-open-mode-key-2"):
            verdict = loaded.decide(secret, "chat", "m", Context(False, 8, False, "default"))
            assert verdict == Verdict(False, ("needs-plan",))  # a forbid that fails denies
    assert len(caplog.records) == 1
    assert "needs-plan" in caplog.text and "sk-open-mode" not in caplog.text


@pytest.mark.parametrize(
    "sent", [{"max_tokens": 950}, {"max_tokens": "5000"}, {"max_tokens": -1}, {"max_tokens": 2**63 - 1}]
)
def test_a_client_cannot_dodge_a_forbid_by_making_it_overflow(tmp_path: Path, sent: dict[str, object]) -> None:
    """Cedar skips a policy whose evaluation fails. A forbid with arithmetic overflows for the
    largest Long (what a max_tokens that is no count is taken as) or any huge count the client
    sends: skipped, the request it meant to stop passed. It denies instead; a permit that
    fails is still only skipped."""
    loaded = policies.load(
        write(
            tmp_path,
            "p.cedar",
            '@id("all") permit(principal, action, resource);\n'
            '@id("cap") forbid(principal, action, resource) when { context.max_tokens + 100 > 1000 };\n'
            '@id("odd") permit(principal, action, resource) when { context.max_tokens * 2 > 0 };\n',
        )
    )
    verdict = loaded.decide("t", "chat", "m", request_context({"model": "m", **sent}, "default"))
    assert verdict == Verdict(False, ("cap",))
    assert loaded.decide("t", "chat", "m", request_context({"model": "m", "max_tokens": 10}, "default")).allowed


# --- the step in the chain ---


def test_the_policy_step_is_in_the_chain_only_with_a_policy_file(make_settings: Callable[..., Settings]) -> None:
    from gateway.app import create_app

    def steps(**env: str) -> list[str]:
        return [step.__name__ for step in create_app(make_settings(**env)).middlewares]

    assert "check_policy" not in steps(RPS="5")
    chain = steps(RPS="5", POLICY_FILE=str(EXAMPLE_POLICIES))
    # After tenancy and the body (it reads the model and the context from it), before rate limiting.
    assert chain.index("identify") < chain.index("read_body") < chain.index("check_policy") < chain.index("take_token")


def test_an_entities_file_with_a_chain_of_parents_too_deep_is_refused(tmp_path: Path) -> None:
    # Cedar computes every entity's ancestors up front: a chain of 10,000 took 97 s and 11 GB
    # (on SIGHUP the event loop blocked throughout), 30,000 overflowed the stack (SIGSEGV).
    policy, entities = tmp_path / "p.cedar", tmp_path / "e.json"
    policy.write_text("permit(principal, action, resource);")

    def chain(length: int) -> bytes:
        return orjson.dumps(
            [
                {"uid": {"type": "Plan", "id": str(i)}, "attrs": {}, "parents": [{"type": "Plan", "id": str(i + 1)}]}
                for i in range(length)
            ]
        )

    entities.write_bytes(chain(31))  # with its unlisted last parent: 32 deep, the most taken
    policies.load(str(policy), str(entities))
    entities.write_bytes(chain(1000))
    with pytest.raises(ConfigError, match="a chain of parents more than 32 deep"):
        policies.load(str(policy), str(entities))


def test_a_long_allow_list_loads_and_what_would_crash_cedar_is_refused(tmp_path: Path) -> None:
    # Cedar's parser recursed past the stack on a policy 1,000 parentheses deep (SIGSEGV: the
    # gateway died), and on 20,000 `&&`s. A bound on brackets and operators together (256)
    # also refused real allow-lists: 300 tenants, `principal == Tenant::"tN" || …`.
    policy = tmp_path / "p.cedar"
    allowed = " || ".join(f'principal == Tenant::"t{i}"' for i in range(300))
    policy.write_text(f"permit(principal, action, resource) when {{ {allowed} }};")
    loaded = policies.load(str(policy))
    assert loaded.decide("t299", "chat", "m", PLAIN).allowed
    assert not loaded.decide("t300", "chat", "m", PLAIN).allowed
    for text, problem in [
        ("(" * 5000 + "true" + ")" * 5000, "nests brackets more than 256 deep"),
        ("[" * 300 + "1" + "]" * 300 + " == 1", "nests brackets more than 256 deep"),
        (" && ".join(["true"] * 20_000), "more than 2048 operators"),
    ]:
        policy.write_text(f"permit(principal, action, resource) when {{ {text} }};")
        with pytest.raises(ConfigError, match=problem):
            policies.load(str(policy))
