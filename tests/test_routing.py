"""gateway/routing.py: ROUTES_FILE's layout, its checks (one line each), first-match lookup."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import ConfigError, Settings
from gateway.routing import Route, RouteTable, Target, UpstreamConfig, load_routes

SPEC_EXAMPLE = """
[upstreams.openai]
kind = "openai"
base_url = "https://api.openai.com"
api_key_env = "OPENAI_API_KEY"

[upstreams.claude]
kind = "anthropic"
base_url = "https://api.anthropic.com/v1"
api_key_env = "ANTHROPIC_API_KEY"

[[models]]
match = "gpt-4o*"
upstreams = [{ upstream = "openai" }]

[[models]]
match = "claude-*"
upstreams = [{ upstream = "claude" }, { upstream = "openai", model = "gpt-4o" }]
"""
ENV = {"OPENAI_API_KEY": "sk-openai-secret", "ANTHROPIC_API_KEY": "sk-ant-secret", "K": "sk-k"}
UPSTREAM = '[upstreams.a]\nkind = "openai"\nbase_url = "http://127.0.0.1:1"\napi_key_env = "K"\n'
ROUTE = '[[models]]\nmatch = "m"\nupstreams = [{ upstream = "a" }]\n'


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "routes.toml"
    path.write_text(text)
    return str(path)


def test_the_spec_example_loads(tmp_path: Path) -> None:
    table = load_routes(write(tmp_path, SPEC_EXAMPLE), ENV)
    openai, claude = table.upstreams["openai"], table.upstreams["claude"]
    assert (openai.kind, openai.url, openai.api_key) == (
        "openai",
        "https://api.openai.com/v1/chat/completions",
        "sk-openai-secret",
    )
    assert (claude.kind, claude.url, claude.api_key) == (
        "anthropic",
        "https://api.anthropic.com/v1/messages",
        "sk-ant-secret",
    )
    route = table.lookup("claude-sonnet-4-5")
    assert route is not None
    assert [(t.upstream.name, t.model) for t in route.targets] == [("claude", None), ("openai", "gpt-4o")]
    assert table.lookup("gpt-4o-mini") is table.routes[0]
    assert table.lookup("llama-3") is None
    assert "sk-" not in repr(table.upstreams) + repr(table.routes)  # keys never in a repr


def _file(upstreams: str = UPSTREAM, models: str = ROUTE) -> str:
    return upstreams + models


BAD = [
    (_file(models=ROUTE.replace('"a"', '"zz"')), "models[1] (m): unknown upstream 'zz'"),
    (_file(UPSTREAM.replace('"K"', '"NOPE"')), "upstreams.a.api_key_env: NOPE is not set"),
    (_file(UPSTREAM.replace('"K"', '"EMPTY"')), "upstreams.a.api_key_env: EMPTY is empty"),
    (_file(UPSTREAM.replace('"K"', '"SPACED"')), "upstreams.a.api_key_env: SPACED: the key has a space"),
    (_file(UPSTREAM.replace('"K"', '"not a name"')), "upstreams.a.api_key_env: required"),
    (_file(UPSTREAM.replace('api_key_env = "K"\n', "")), "upstreams.a.api_key_env: required"),
    (_file(UPSTREAM.replace("http://127.0.0.1:1", "ftp://x")), "upstreams.a.base_url: expected an http://"),
    (_file(UPSTREAM.replace("http://127.0.0.1:1", "http://")), "upstreams.a.base_url: the URL has no host"),
    (_file(UPSTREAM.replace('base_url = "http://127.0.0.1:1"\n', "")), "upstreams.a.base_url: required"),
    (_file(UPSTREAM.replace('"openai"', '"gemini"')), 'upstreams.a.kind: expected "openai" or "anthropic"'),
    (_file(UPSTREAM + 'api_key = "sk-in-the-file"\n'), "upstreams.a: unknown key(s) 'api_key'"),
    (
        _file(UPSTREAM.replace("http://127.0.0.1:1", "http://user:PASSW0RD@127.0.0.1:1")),
        "upstreams.a.base_url: holds a password",
    ),
    (_file(models=ROUTE.replace('"m"', '"gpt-[4"')), "models[1].match: bad glob 'gpt-[4': a '[' set is never closed"),
    (_file(models=ROUTE.replace('"m"', '""')), "models[1].match: empty"),
    (_file(models=ROUTE.replace('"m"', '"a b"')), "models[1].match: white space"),
    (_file(models=ROUTE.replace('[{ upstream = "a" }]', "[]")), "models[1] (m).upstreams: an empty list"),
    (_file(models=ROUTE.replace('{ upstream = "a" }', '{ upstream = "a", model = "" }')), "model must be"),
    (_file(models=ROUTE.replace('{ upstream = "a" }', '"a"')), "each entry is a table"),
    (_file(models=""), "no models"),
    (ROUTE, "no upstreams"),
    (_file(UPSTREAM.replace("upstreams.a", 'upstreams."a b"')), "upstream name 'a b'"),
    (_file() + "[extra]\n", "unknown top-level key(s) 'extra'"),
    ("[upstreams\n", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "problem"), BAD)
def test_each_problem_is_one_line_naming_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    env = {**ENV, "EMPTY": " ", "SPACED": "sk two"}
    with pytest.raises(ConfigError) as caught:
        load_routes(path, env)
    [line] = caught.value.lines
    assert line.startswith(f"ROUTES_FILE: {path}: ")
    assert problem in line
    assert "\n" not in line and "sk-" not in line and "sk two" not in line and "PASSW0RD" not in line


def test_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it: No such file"):
        load_routes(str(tmp_path / "missing.toml"), ENV)
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not valid TOML|not UTF-8"):
        load_routes(str(tmp_path / "latin1.toml"), ENV)


def table_of(*matches: str, targets: dict[str, tuple[str | None, ...]] | None = None) -> RouteTable:
    upstream = UpstreamConfig("a", "openai", "http://x", "K", "k")
    routes = tuple(
        Route(m, tuple(Target(upstream, model) for model in (targets or {}).get(m, (None,)))) for m in matches
    )
    return RouteTable({"a": upstream}, routes)


@pytest.mark.parametrize(
    ("matches", "model", "expected"),
    [
        (("gpt-4o", "gpt-*"), "gpt-4o", 0),
        (("gpt-*", "gpt-4o"), "gpt-4o", 0),  # first match wins, glob or not
        (("claude-*", "gpt-*", "gpt-4o"), "gpt-4o", 1),
        (("claude-?", "claude-*"), "claude-3", 0),
        (("claude-?", "claude-*"), "claude-35", 1),
        (("[gc]*-mini", "*"), "gpt-4o-mini", 0),
        (("[!g]*", "*"), "gpt-4o", 1),
        (("*",), "", 0),
        (("GPT-*",), "gpt-4o", None),  # model names are case-sensitive
        (("a.b",), "axb", None),  # a dot is a dot
        (("m",), "m\n", None),
    ],
)
def test_lookup_is_the_first_match(matches: tuple[str, ...], model: str, expected: int | None) -> None:
    table = table_of(*matches)
    route = table.lookup(model)
    assert (table.routes.index(route) if route is not None else None) == expected


GLOB_PIECES = st.sampled_from(["a", "b", "-", ".", "*", "?", "[ab]", "[!a]", "4o"])


@given(
    st.lists(st.lists(GLOB_PIECES, min_size=1, max_size=5).map("".join), min_size=1, max_size=8),
    st.text(alphabet="ab-.4oc", max_size=8),
)
def test_lookup_agrees_with_fnmatch_in_order(matches: list[str], model: str) -> None:
    table = table_of(*matches)
    expected = next((i for i, m in enumerate(matches) if fnmatch.fnmatchcase(model, m)), None)
    route = table.lookup(model)
    assert (table.routes.index(route) if route is not None else None) == expected


def test_model_ids_are_exact_names_and_each_globs_renames_or_the_glob() -> None:
    table = table_of(
        "gpt-4o",
        "claude-*",
        "llama-*",
        "gpt-4o",
        targets={"claude-*": (None, "gpt-4o", "claude-sonnet-4-5"), "llama-*": ("llama-3.1-70b", "llama-3.1-70b")},
    )
    assert table.model_ids() == ["gpt-4o", "claude-*", "claude-sonnet-4-5", "llama-3.1-70b"]


def test_settings_read_the_file_with_keys_from_dotenv(tmp_path: Path, make_settings: Callable[..., Settings]) -> None:
    path = write(tmp_path, SPEC_EXAMPLE.replace("ANTHROPIC_API_KEY", "CLAUDE_KEY"))
    (tmp_path / ".env").write_text("CLAUDE_KEY=sk-from-dotenv\n")  # make_settings runs in tmp_path
    settings = make_settings(ROUTES_FILE=path, OPENAI_API_KEY="sk-o", CB_FAILURES="3", CB_OPEN_SECS="2.5")
    assert settings.routes is not None
    assert settings.routes.upstreams["claude"].api_key == "sk-from-dotenv"
    assert settings.routes.upstreams["openai"].api_key == "sk-o"
    described = dict(settings.describe())
    assert described["ROUTES_FILE"] == path
    assert (described["CB_FAILURES"], described["CB_OPEN_SECS"]) == ("3", "2.5")
    assert "sk-from-dotenv" not in repr(settings) + str(settings.describe())


def test_without_the_file_there_are_no_routes(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    assert settings.routes is None and settings.routes_file is None
    assert (settings.cb_failures, settings.cb_open_secs) == (5, 30.0)


def test_a_bad_file_is_reported_with_every_other_bad_variable(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    path = write(tmp_path, _file(UPSTREAM.replace('"K"', '"NOPE"')))
    with pytest.raises(ConfigError) as caught:
        make_settings(ROUTES_FILE=path, CB_FAILURES="0", CB_OPEN_SECS="-1")
    lines = caught.value.lines
    assert f"ROUTES_FILE: {path}: upstreams.a.api_key_env: NOPE is not set" in lines
    assert any(line.startswith("CB_FAILURES:") for line in lines)
    assert any(line.startswith("CB_OPEN_SECS:") for line in lines)
