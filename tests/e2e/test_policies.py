"""Cedar policies (SPEC §15) and SIGHUP reload (SPEC §10) on the real process, through the
official SDKs: allow and deny per plan on chat and messages, start-up and reload refusals,
reload under load, every worker reloading, hostile names."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from ..conftest import GatewayFactory
from ..harness import ROOT, Gateway, Mock, RedisServer, base_env, free_port, gateway_argv, wait_until

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
EXAMPLE_POLICIES = ROOT / "scripts" / "policies.example.cedar"
EXAMPLE_ENTITIES = ROOT / "scripts" / "policy-entities.example.json"
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
ANTHROPIC_TOOL = {"name": "f", "input_schema": {"type": "object", "properties": {}}}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def policy_files(tmp_path: Path) -> tuple[Path, Path]:
    policies, entities = tmp_path / "policies.cedar", tmp_path / "entities.json"
    shutil.copy(EXAMPLE_POLICIES, policies)
    shutil.copy(EXAMPLE_ENTITIES, entities)
    return policies, entities


def with_policies(start_gateway: GatewayFactory, files: tuple[Path, Path], **env: str) -> Gateway:
    return start_gateway(POLICY_FILE=str(files[0]), POLICY_ENTITIES_FILE=str(files[1]), **env)


def chat_client(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=20)


def messages_client(gateway: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=20)


def reloads(gateway: Gateway, result: str) -> int:
    match = re.search(rf'^config_reloads_total{{result="{result}"}} (\d+)', gateway.metrics(), re.MULTILINE)
    return int(match.group(1)) if match else -1


def add_entities(path: Path, *entries: dict[str, Any]) -> None:
    path.write_text(json.dumps([*json.loads(path.read_text()), *entries]))


def tenant_in(tenant: str, plan: str) -> dict[str, Any]:
    return {"uid": {"type": "Tenant", "id": tenant}, "attrs": {}, "parents": [{"type": "Plan", "id": plan}]}


async def post_chat(
    session: aiohttp.ClientSession, gateway: Gateway, key: str, **body: Any
) -> tuple[int, dict[str, Any]]:
    payload = {"model": "gpt-4o-mini", "messages": HI} | body
    async with session.post(gateway.url + CHAT, json=payload, headers={"X-Api-Key": key}) as response:
        return response.status, await response.json(content_type=None)


# --- allow and deny per plan ---


def test_plans_on_the_chat_route(start_gateway: GatewayFactory, mock: Mock, policy_files: tuple[Path, Path]) -> None:
    gateway = with_policies(start_gateway, policy_files)
    free, team, enterprise = (chat_client(gateway, f"{plan}-demo") for plan in ("free", "team", "enterprise"))
    assert free.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1000).choices
    assert team.chat.completions.create(model="gpt-4o", messages=HI, tools=[TOOL], max_tokens=8000).choices
    assert enterprise.chat.completions.create(model="o3", messages=HI, tools=[TOOL], max_tokens=100_000).choices
    allowed = len(mock.requests())
    refusals = [
        (free, {"model": "gpt-4o"}, "no policy permits this request"),
        (free, {"model": "gpt-4o-mini", "tools": [TOOL]}, "denied by policy free-no-tools"),
        (free, {"model": "gpt-4o-mini", "max_completion_tokens": 1001}, "denied by policy free-max-1000-tokens"),
        (
            free,
            {"model": "gpt-4o-mini", "max_tokens": 5000, "tools": [TOOL]},
            "denied by policies free-max-1000-tokens, free-no-tools",
        ),
        (team, {"model": "o3"}, "no policy permits this request"),
        (team, {"model": "gpt-4o", "max_tokens": 8001}, "denied by policy team-max-8000-tokens"),
        (chat_client(gateway, "stranger"), {"model": "gpt-4o-mini"}, "no policy permits this request"),
    ]
    for client, fields, message in refusals:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client.chat.completions.create(messages=HI, **fields)
        assert caught.value.status_code == 403
        assert caught.value.body == {"message": message, "type": "permission_error", "code": "permission_denied"}
    assert len(mock.requests()) == allowed  # a refused request never reaches the upstream
    assert 'http_requests_total{model="gpt-4o",route="/v1/chat/completions",status="403"} 2' in gateway.metrics()


def test_retrieving_a_model_is_checked_as_the_list_on_the_model_it_names(
    start_gateway: GatewayFactory, mock: Mock, policy_files: tuple[Path, Path]
) -> None:
    # GET /v1/models/{model}: action "models" (the list's), resource Model::"<id>": a plan sees
    # the models its tier holds, as it may use them.
    gateway = with_policies(start_gateway, policy_files)
    free, team = chat_client(gateway, "free-demo"), chat_client(gateway, "team-demo")
    assert free.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    assert team.models.retrieve("gpt-4o").id == "gpt-4o"
    for client, model in ((free, "gpt-4o"), (team, "o3"), (chat_client(gateway, "stranger"), "gpt-4o-mini")):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client.models.retrieve(model)
        assert caught.value.body == {
            "message": "no policy permits this request",
            "type": "permission_error",
            "code": "permission_denied",
        }
    assert [r["path"] for r in mock.requests()] == ["/v1/models/gpt-4o-mini", "/v1/models/gpt-4o"]


def test_plans_on_the_messages_route_are_anthropic_shaped(
    start_gateway: GatewayFactory, mock: Mock, policy_files: tuple[Path, Path]
) -> None:
    gateway = with_policies(start_gateway, policy_files)
    free, team = messages_client(gateway, "free-demo"), messages_client(gateway, "team-demo")
    assert free.messages.create(model="claude-3-5-haiku-latest", max_tokens=1000, messages=HI).content
    assert team.messages.create(model="claude-sonnet-4-5", max_tokens=8000, messages=HI, tools=[ANTHROPIC_TOOL]).content
    with free.messages.stream(model="claude-3-5-haiku-latest", max_tokens=100, messages=HI) as stream:
        assert stream.get_final_text()
    allowed = len(mock.requests())
    refusals = [
        (free, {"model": "claude-sonnet-4-5", "max_tokens": 100}, "no policy permits this request"),
        (free, {"model": "claude-3-5-haiku-latest", "max_tokens": 2000}, "denied by policy free-max-1000-tokens"),
        (
            free,
            {"model": "claude-3-5-haiku-latest", "max_tokens": 10, "tools": [ANTHROPIC_TOOL], "stream": True},
            "denied by policy free-no-tools",
        ),
        (team, {"model": "claude-sonnet-4-5", "max_tokens": 9000}, "denied by policy team-max-8000-tokens"),
    ]
    for client, fields, message in refusals:
        with pytest.raises(anthropic.PermissionDeniedError) as caught:
            client.messages.create(messages=HI, **fields)
        assert caught.value.status_code == 403
        assert caught.value.response.json() == {
            "type": "error",
            "error": {"type": "permission_error", "message": message},
        }
    assert len(mock.requests()) == allowed


async def test_a_denial_spends_no_rate_limit_token_and_no_quota(
    start_gateway: GatewayFactory, mock: Mock, policy_files: tuple[Path, Path]
) -> None:
    gateway = with_policies(start_gateway, policy_files, RPS="0.01", BURST="1", DEFAULT_QUOTA="1")
    async with aiohttp.ClientSession() as session:
        for _ in range(5):  # checked before rate limiting and quota: always 403, never 429
            assert (await post_chat(session, gateway, "free-demo", model="o3"))[0] == 403
        assert (await post_chat(session, gateway, "free-demo"))[0] == 200
        status, body = await post_chat(session, gateway, "free-demo")
        assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert len(mock.requests()) == 1


async def test_a_stream_flag_that_is_no_boolean_cannot_slip_past_a_forbid_on_streams(
    start_gateway: GatewayFactory, mock: Mock, policy_files: tuple[Path, Path]
) -> None:
    # A lax upstream (pydantic, as vLLM's) streams for "stream": 1 or "true", and the gateway
    # relays the events it gets: the policy saw stream=false and allowed it.
    with policy_files[0].open("a") as file:
        file.write(
            '\n@id("team-no-stream")\nforbid (principal in Plan::"team", action, resource) when { context.stream };\n'
        )
    gateway = with_policies(start_gateway, policy_files)
    async with aiohttp.ClientSession() as session:
        assert (await post_chat(session, gateway, "team-demo"))[0] == 200
        assert (await post_chat(session, gateway, "team-demo", stream=False))[0] == 200
        for value in (True, 1, "true"):
            status, body = await post_chat(session, gateway, "team-demo", stream=value)
            assert status == 403 and body["error"]["message"] == "denied by policy team-no-stream", value
    assert len(mock.requests()) == 2


async def test_the_principal_under_hashed_identifiers(
    start_gateway: GatewayFactory, mock: Mock, policy_files: tuple[Path, Path]
) -> None:
    """Open mode: the key's hash, so the files name no key; keyed mode: the tenant's name."""
    secret, key = "pepper-1", "sk-open-mode-key"
    hashed = "h:" + hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()[:32]
    add_entities(policy_files[1], tenant_in(hashed, "enterprise"), tenant_in(key, "free"))
    open_mode = with_policies(start_gateway, policy_files, HASH_IDENTIFIERS="true", HASH_SECRET=secret)
    keyed = with_policies(
        start_gateway, policy_files, HASH_IDENTIFIERS="true", HASH_SECRET=secret, TENANT_KEYS="team-demo=sk-team"
    )
    async with aiohttp.ClientSession() as session:
        assert (await post_chat(session, open_mode, key, model="o3"))[0] == 200  # enterprise, by its hash
        assert (await post_chat(session, open_mode, "free-demo"))[0] == 403  # the name is no principal here
        assert (await post_chat(session, keyed, "sk-team", model="gpt-4o"))[0] == 200  # team-demo, by name
        assert (await post_chat(session, keyed, "sk-team", model="o3"))[0] == 403


async def test_hostile_tenant_and_model_names_are_names(
    start_gateway: GatewayFactory, mock: Mock, policy_files: tuple[Path, Path]
) -> None:
    key = 'q"uo\\te);permit(principal,action,resource);//'
    model = 'gpt-\\4o"é😀\n'
    add_entities(
        policy_files[1],
        tenant_in(key, "free"),
        {"uid": {"type": "Model", "id": model}, "attrs": {}, "parents": [{"type": "Tier", "id": "basic"}]},
    )
    gateway = with_policies(start_gateway, policy_files)
    async with aiohttp.ClientSession() as session:
        assert (await post_chat(session, gateway, key, model=model))[0] == 200  # exactly these names
        assert (await post_chat(session, gateway, key, model="gpt-4o-mini"))[0] == 200
        for injected in ('gpt-4o-mini"', 'gpt-4o-mini", action, resource); permit(principal, action, resource'):
            status, body = await post_chat(session, gateway, key, model=injected)
            assert status == 403 and body["error"]["message"] == "no policy permits this request"
        assert (await post_chat(session, gateway, key[:-2], model="gpt-4o-mini"))[0] == 403


# --- invalid files ---


def start_up(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    cwd = tmp_path / f"cwd-{free_port()}"
    cwd.mkdir()
    return subprocess.run(
        gateway_argv(), env=base_env() | {"RPS": "0"} | env, cwd=cwd, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_invalid_files_stop_start_up_with_one_line_status_2(
    tmp_path: Path, policy_files: tuple[Path, Path], workers: str
) -> None:
    policies, entities = policy_files
    common = {"WORKERS": workers, "REDIS_URL": "redis://127.0.0.1:1/0", "POLICY_ENTITIES_FILE": str(entities)}
    policies.write_text('permit(principal, action == Action::"chat", resource')
    result = start_up(tmp_path, POLICY_FILE=str(policies), **common)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"config error: POLICY_FILE: {policies}: unexpected end of input"]
    shutil.copy(EXAMPLE_POLICIES, policies)
    entities.write_text('[{"uid": {"type": "Tenant", "id": "a"}, "parents": []}]')
    result = start_up(tmp_path, POLICY_FILE=str(policies), **common)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f'config error: POLICY_ENTITIES_FILE: {entities}: entity 1: needs "attrs": an object ({{}} for none)'
    ]
    common.pop("POLICY_ENTITIES_FILE")
    check = start_up(tmp_path, POLICY_FILE=str(tmp_path / "missing.cedar"), **common)
    assert check.returncode == 2
    assert check.stderr.splitlines() == [
        f"config error: POLICY_FILE: cannot read {tmp_path / 'missing.cedar'}: No such file or directory"
    ]


async def test_an_invalid_file_on_reload_is_refused_and_the_old_policies_stay(
    start_gateway: GatewayFactory, mock: Mock, policy_files: tuple[Path, Path]
) -> None:
    policies, entities = policy_files
    gateway = with_policies(start_gateway, policy_files)
    assert (reloads(gateway, "ok"), reloads(gateway, "refused")) == (0, 0)
    policies.write_text(policies.read_text() + "\nforbid(principal, action, resource) when { context.nope ")
    gateway.process.signal(signal.SIGHUP)
    wait_until(lambda: reloads(gateway, "refused") == 1, what="the refused reload")
    refusals = [line for line in gateway.process.errors().splitlines() if "reload refused" in line]
    assert len(refusals) == 1 and f"POLICY_FILE: {policies}: " in refusals[0]
    async with aiohttp.ClientSession() as session:
        assert (await post_chat(session, gateway, "free-demo"))[0] == 200
        assert (await post_chat(session, gateway, "free-demo", model="gpt-4o"))[0] == 403
    # A valid policy file with a broken entities file: all or nothing, nothing changes.
    shutil.copy(EXAMPLE_POLICIES, policies)
    policies.write_text(policies.read_text() + '\n@id("all-off") forbid(principal, action, resource);')
    entities.write_text("[")
    gateway.process.signal(signal.SIGHUP)
    wait_until(lambda: reloads(gateway, "refused") == 2, what="the second refused reload")
    async with aiohttp.ClientSession() as session:
        assert (await post_chat(session, gateway, "free-demo"))[0] == 200
    shutil.copy(EXAMPLE_ENTITIES, entities)
    gateway.process.signal(signal.SIGHUP)
    wait_until(lambda: reloads(gateway, "ok") == 1, what="the good reload")
    async with aiohttp.ClientSession() as session:
        status, body = await post_chat(session, gateway, "free-demo")
        assert status == 403 and body["error"]["message"] == "denied by policy all-off"


async def test_tenant_keys_file_reload(start_gateway: GatewayFactory, mock: Mock, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("acme=sk-acme-1\n")
    gateway = start_gateway(TENANT_KEYS_FILE=str(keys), TENANT_KEYS="inline=sk-inline-1")
    keys.write_text("# acme rotated\nbeta=sk-beta-1\n")
    gateway.process.signal(signal.SIGHUP)
    wait_until(lambda: reloads(gateway, "ok") == 1, what="the reload")
    async with aiohttp.ClientSession() as session:
        assert (await post_chat(session, gateway, "sk-acme-1"))[0] == 401
        assert (await post_chat(session, gateway, "sk-beta-1"))[0] == 200
        assert (await post_chat(session, gateway, "sk-inline-1"))[0] == 200
        keys.write_text("")  # never open mode: refused, the keys in force stay
        gateway.process.signal(signal.SIGHUP)
        await asyncio.to_thread(wait_until, lambda: reloads(gateway, "refused") == 1, what="the refusal")
        assert (await post_chat(session, gateway, "sk-beta-1"))[0] == 200
        assert (await post_chat(session, gateway, "anyone"))[0] == 401
    assert f"TENANT_KEYS_FILE: {keys} has no name=key entry" in gateway.process.errors()
    assert "sk-" not in gateway.process.errors()


# --- reload under load, and with workers ---


async def test_reload_under_load_drops_nothing_and_the_stream_in_flight_finishes(
    start_gateway: GatewayFactory, mock: Mock, policy_files: tuple[Path, Path]
) -> None:
    policies, _ = policy_files
    gateway = with_policies(start_gateway, policy_files)
    pacing = {"x-stainless-mock-chunk-delay-ms": "100", "x-stainless-mock-reply": "one two three four five six seven"}
    outcomes: list[int | str] = []
    reloaded = asyncio.Event()

    async def hammer() -> None:
        """Fresh connections, one after another, until a while after the reload."""
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            extra = 30
            while extra:
                try:
                    outcomes.append((await post_chat(session, gateway, "team-demo", model="gpt-4o"))[0])
                except aiohttp.ClientError as exc:
                    outcomes.append(repr(exc))
                if reloaded.is_set():
                    extra -= 1

    async with aiohttp.ClientSession() as session:
        body = {"model": "gpt-4o-mini", "messages": HI, "stream": True}
        headers = {"X-Api-Key": "free-demo", **pacing}
        async with session.post(gateway.url + CHAT, json=body, headers=headers) as stream:
            assert stream.status == 200
            await stream.content.readline()
            load = asyncio.create_task(hammer())
            await asyncio.sleep(0.2)
            policies.write_text(
                policies.read_text() + '\n@id("free-suspended") forbid(principal in Plan::"free", action, resource);'
            )
            gateway.process.signal(signal.SIGHUP)
            await asyncio.to_thread(wait_until, lambda: reloads(gateway, "ok") == 1, what="the reload")
            reloaded.set()
            status, refused = await post_chat(session, gateway, "free-demo")
            assert status == 403 and refused["error"]["message"] == "denied by policy free-suspended"
            rest = (await stream.read()).decode()
        await load
    assert rest.rstrip().endswith("data: [DONE]")  # admitted under the old policies, it runs to its end
    content = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in rest.splitlines()
        if line.startswith("data: {")
    )
    assert content.endswith("six seven")
    assert outcomes and set(outcomes) == {200}, [o for o in outcomes if o != 200][:3]


async def test_every_worker_reloads_on_the_parents_sighup(
    start_gateway: GatewayFactory, mock: Mock, policy_files: tuple[Path, Path], redis_server: RedisServer
) -> None:
    policies, _ = policy_files
    gateway = with_policies(start_gateway, policy_files, WORKERS="2", REDIS_URL=redis_server.url)

    async def statuses() -> set[int]:
        connector = aiohttp.TCPConnector(force_close=True)  # new connections: spread over the workers
        async with aiohttp.ClientSession(connector=connector) as session:
            return {(await post_chat(session, gateway, "free-demo", model="gpt-4o"))[0] for _ in range(40)}

    assert await statuses() == {403}
    policies.write_text(
        policies.read_text() + '\npermit(principal == Tenant::"free-demo", action, resource == Model::"gpt-4o");'
    )
    gateway.process.signal(signal.SIGHUP)  # the parent's pid, as systemd's ExecReload sends it
    await asyncio.to_thread(
        wait_until,
        lambda: gateway.process.errors().count("configuration reloaded (POLICY_FILE, POLICY_ENTITIES_FILE)") == 2,
        what="both workers' reload lines",
    )
    assert await statuses() == {200}
    assert gateway.process.proc.poll() is None


def test_a_refused_reload_is_one_log_line_with_every_worker(
    start_gateway: GatewayFactory, mock: Mock, policy_files: tuple[Path, Path], redis_server: RedisServer
) -> None:
    """SPEC §10: invalid files are refused with one log line, and with WORKERS > 1 every worker
    reloads. Each worker logged its own refusal: as many identical lines as workers, with
    nothing to tell them apart. The parent now logs it once; each worker still counts it."""
    policies, _ = policy_files
    gateway = with_policies(start_gateway, policy_files, WORKERS="3", REDIS_URL=redis_server.url)
    policies.write_text("permit(principal, action, resource) when { broken")
    gateway.process.signal(signal.SIGHUP)
    # Every worker has refused it: each scrape goes to a worker the kernel picks (a new connection each).
    wait_until(lambda: all(reloads(gateway, "refused") == 1 for _ in range(15)), what="every worker's refused reload")
    lines = [line for line in gateway.process.errors().splitlines() if "reload refused" in line]
    assert len(lines) == 1 and "POLICY_FILE" in lines[0], lines
    assert reloads(gateway, "ok") == 0
