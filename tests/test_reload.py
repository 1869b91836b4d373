"""The file-backed configuration and its reload (gateway/reload.py): all or nothing, one log line."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import ConfigError, Settings
from gateway.errors import InvalidApiKey
from gateway.policies import Context
from gateway.reload import LiveConfig, load

ALLOW_ALL = "permit(principal, action, resource);"
FORBID_TOOLS = '@id("no-tools") forbid(principal, action, resource) when { context.has_tools };'
TOOLS = Context(False, 0, True, "default")


class Counted:
    def __init__(self) -> None:
        self.results: list[bool] = []

    def __call__(self, ok: bool) -> None:
        self.results.append(ok)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {"keys": tmp_path / "keys", "policies": tmp_path / "p.cedar", "entities": tmp_path / "e.json"}
    paths["keys"].write_text("acme=sk-acme-1\n")
    paths["policies"].write_text(ALLOW_ALL)
    paths["entities"].write_text("[]")
    return paths


@pytest.fixture
def settings(make_settings: Callable[..., Settings], files: dict[str, Path]) -> Settings:
    return make_settings(
        TENANT_KEYS="inline=sk-inline-1",
        TENANT_KEYS_FILE=str(files["keys"]),
        POLICY_FILE=str(files["policies"]),
        POLICY_ENTITIES_FILE=str(files["entities"]),
    )


def admits(live: LiveConfig, key: str) -> bool:
    try:
        live.current.tenancy.resolve(key, "ip", "/")
    except InvalidApiKey:
        return False
    return True


def test_a_reload_reads_every_file_again_and_swaps_the_snapshot(
    settings: Settings, files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    counted = Counted()
    live = LiveConfig(settings, counted)
    before = live.current
    assert before.policies is not None and before.policies.decide("acme", "chat", "m", TOOLS).allowed
    files["keys"].write_text("beta=sk-beta-1\n")
    files["policies"].write_text(ALLOW_ALL + "\n" + FORBID_TOOLS)
    with caplog.at_level(logging.INFO, logger="gateway"):
        assert live.reload()
    assert counted.results == [True]
    after = live.current
    assert after is not before
    assert after.policies is not None and after.policies.decide("beta", "chat", "m", TOOLS).denied_by == ("no-tools",)
    assert admits(live, "sk-beta-1") and admits(live, "sk-inline-1")  # TENANT_KEYS stay
    assert not admits(live, "sk-acme-1")
    # A request that took the old snapshot still runs under it.
    assert before.policies.decide("acme", "chat", "m", TOOLS).allowed
    assert [r.getMessage() for r in caplog.records] == [
        "configuration reloaded (TENANT_KEYS_FILE, POLICY_FILE, POLICY_ENTITIES_FILE)"
    ]


@pytest.mark.parametrize(
    ("broken", "text", "line"),
    [
        ("keys", "", "TENANT_KEYS_FILE: {path} has no name=key entry"),  # never turns keyed mode open
        ("keys", "# nothing\n", "TENANT_KEYS_FILE: {path} has no name=key entry"),
        ("keys", "acme=sk-1\nbroken\n", "TENANT_KEYS_FILE: {path}: line 2 is not name=key"),
        ("policies", "permit(principal, action, resource", "POLICY_FILE: {path}: unexpected end of input"),
        ("entities", "[{", "POLICY_ENTITIES_FILE: {path}: not JSON: "),
    ],
)
def test_one_invalid_file_and_nothing_changes(
    settings: Settings,
    files: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
    broken: str,
    text: str,
    line: str,
) -> None:
    counted = Counted()
    live = LiveConfig(settings, counted)
    before = live.current
    # Every other file changes validly: none of it may be taken.
    for name, path in files.items():
        if name != broken:
            path.write_text({"keys": "beta=sk-beta-1\n", "policies": FORBID_TOOLS + ALLOW_ALL, "entities": "[]"}[name])
    files[broken].write_text(text)
    with caplog.at_level(logging.INFO, logger="gateway"):
        assert not live.reload()
    assert live.current is before
    assert counted.results == [False]
    assert admits(live, "sk-acme-1") and not admits(live, "sk-beta-1")
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    message = record.getMessage()
    assert message.startswith("reload refused, the configuration in force stays: " + line.format(path=files[broken]))
    assert "\n" not in message and "sk-" not in message


def test_a_missing_file_is_refused_and_a_later_good_one_taken(settings: Settings, files: dict[str, Path]) -> None:
    counted = Counted()
    live = LiveConfig(settings, counted)
    files["policies"].rename(files["policies"].with_suffix(".moved"))
    assert not live.reload()
    files["policies"].with_suffix(".moved").rename(files["policies"])
    assert live.reload()
    assert counted.results == [False, True]


def test_without_files_a_reload_changes_nothing_and_counts_ok(make_settings: Callable[..., Settings]) -> None:
    counted = Counted()
    live = LiveConfig(make_settings(TENANT_KEYS="acme=sk-acme-1"), counted)
    assert live.current.policies is None
    assert live.reload() and counted.results == [True]
    assert admits(live, "sk-acme-1") and not admits(live, "sk-other")


def test_load_raises_one_config_line(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings(POLICY_FILE=str(tmp_path / "nowhere.cedar"))
    with pytest.raises(ConfigError) as caught:
        load(settings)
    assert caught.value.lines == [f"POLICY_FILE: cannot read {tmp_path / 'nowhere.cedar'}: No such file or directory"]


@pytest.mark.parametrize("variable", ["TENANT_KEYS_FILE", "POLICY_FILE", "ROUTES_FILE"])
def test_a_fifo_or_a_device_in_place_of_a_file_is_refused_without_blocking(
    make_settings: Callable[..., Settings], tmp_path: Path, variable: str
) -> None:
    # Read in the event loop's thread: a FIFO (open() waits for a writer) or /dev/zero (read()
    # never ends) would freeze the whole gateway, at start-up or on SIGHUP.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        outcome: list[BaseException] = []
        worker = threading.Thread(target=_load_into, args=(make_settings, variable, path, outcome), daemon=True)
        worker.start()
        worker.join(2)
        if worker.is_alive():  # the old code: let the thread go (a writer for the FIFO) and fail
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail(f"reading {variable}={path} blocked")
        assert len(outcome) == 1 and isinstance(outcome[0], ConfigError), outcome
        assert "not a regular file" in str(outcome[0])


def _load_into(make: Callable[..., Settings], variable: str, path: str, outcome: list[BaseException]) -> None:
    try:
        load(make(**{variable: path}))  # what start-up reads (gateway.py), the routes by load_settings
    except Exception as exc:  # the test checks which one
        outcome.append(exc)


def test_files_saved_with_a_byte_order_mark_and_crlf_are_read(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # `.env` took them; the key, policy, entities and routes files each refused them, with
    # "the tenant name has control characters", "invalid token", "Invalid statement".
    bom = b"\xef\xbb\xbf"
    files = {
        "TENANT_KEYS_FILE": b"acme=sk-acme-1\r\n",
        "POLICY_FILE": b"permit(principal, action, resource);\r\n",
        "POLICY_ENTITIES_FILE": b"[]",
        "ROUTES_FILE": (
            b'[upstreams.a]\r\nkind = "openai"\r\nbase_url = "http://127.0.0.1:9"\r\napi_key_env = "K"\r\n'
            b'[[models]]\r\nmatch = "*"\r\nupstreams = [{ upstream = "a" }]\r\n'
        ),
    }
    for variable, content in files.items():
        (tmp_path / variable).write_bytes(bom + content)
    settings = make_settings(K="sk-upstream", **{variable: str(tmp_path / variable) for variable in files})
    assert settings.routes is not None
    live = LiveConfig(settings, Counted())
    assert admits(live, "sk-acme-1")
    assert live.current.policies is not None
