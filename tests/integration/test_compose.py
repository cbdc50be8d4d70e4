"""compose.yaml and the Dockerfile, checked without Docker (which does not run here):
valid against the Compose Specification's schema (vendored in compose_spec/), every
service's command exists in the `fanout` CLI, every variable it sets is a setting of
some command, and the deployment has what the brief asks (volumes, AOF, JetStream,
health checks behind depends_on, restart policies, 2 archivers, the upstream profile)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from fanout.cli import COMMANDS
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).resolve().parent / "compose_spec" / "compose-spec.json"
OUR_IMAGE = "feed-fanout"

_VAR = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)
# What compose.yaml needs set to start (it refuses to start open); FANOUT_TOKENS may be empty.
REQUIRED = {"POSTGRES_PASSWORD": "pg-s3cret", "FANOUT_TOKENS": "tok=*"}


class MissingVariable(Exception):
    """Compose's refusal: `${VAR:?message}` with VAR unset or empty, `${VAR?message}` unset."""


def _interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}, $VAR, $$."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            if m[0] == "$$":
                return "$"
            name, op, arg = m["braced"] or m["bare"], m["op"], m["arg"] or ""
            if (op == ":?" and not env.get(name)) or (op == "?" and name not in env):
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            if op == "-":
                return env[name] if name in env else arg
            return env.get(name) or (arg if op == ":-" else "")
        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    return value


def load(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """compose.yaml as Compose reads it: YAML (with merge keys), interpolated, cast;
    `env` defaults to the variables it requires (REQUIRED)."""
    raw = yaml.safe_load((ROOT / "compose.yaml").read_text())
    doc: dict[str, Any] = _interpolate(raw, REQUIRED if env is None else env)
    for service in doc["services"].values():  # Compose casts these after interpolation
        deploy = service.get("deploy", {})
        if isinstance(deploy.get("replicas"), str):
            deploy["replicas"] = int(deploy["replicas"])
    return doc


def _ours(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, service in doc["services"].items():
        if str(service.get("image", "")).startswith(OUR_IMAGE):
            yield name, service


def _validator(schema: dict[str, Any]) -> Any:
    # Its $schema names draft 2019-09 by an address jsonschema does not know; the keywords
    # it uses mean the same in draft 7.
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize(
    "env",
    [
        REQUIRED,
        {"FANOUT_SIMULATORS": "0", "POSTGRES_PASSWORD": "pw", "FANOUT_TOKENS": "", "FANOUT_JWT_SECRET": "x"},
    ],
)
def test_compose_file_is_valid_against_the_compose_specification(env: dict[str, str]) -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(_validator(schema).iter_errors(load(env)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_rejects_a_broken_file() -> None:
    # The check above can fail: a misspelt key is an error under this schema.
    schema = json.loads(SCHEMA.read_text())
    doc = load()
    doc["services"]["redis"]["restrat"] = "always"
    assert not _validator(schema).is_valid(doc)


def test_every_service_command_exists_in_the_cli() -> None:
    ours = dict(_ours(load()))
    assert set(ours) == {"ingestor", "archiver", "gateway", "feeds"}
    for name, service in ours.items():
        command = service["command"]
        assert command[0] in COMMANDS, f"{name}: `fanout {command[0]}` is not a command"
        module = importlib.import_module(COMMANDS[command[0]][0])
        assert callable(module.run)


def _all_setting_envs() -> set[str]:
    for module, _ in COMMANDS.values():
        importlib.import_module(module)  # its settings class registers its variables
    envs: set[str] = set()
    todo: list[type[Settings]] = [Settings]
    while todo:
        cls = todo.pop()
        envs |= {f.metadata["env"] for f in dataclasses.fields(cls)}
        todo += cls.__subclasses__()
    return envs


def test_every_variable_set_for_our_services_is_a_setting() -> None:
    known = _all_setting_envs()
    for name, service in _ours(load()):
        unknown = set(service["environment"]) - known
        assert not unknown, f"{name} sets variables no command reads: {sorted(unknown)}"


def test_servers_persist_on_volumes() -> None:
    doc = load()
    services = doc["services"]
    assert "-js" in services["nats"]["command"] and "/data" in services["nats"]["command"]
    redis = services["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    for name, path in (("nats", "/data"), ("redis", "/data"), ("postgres", "/var/lib/postgresql/data")):
        volumes = [v.split(":") for v in services[name]["volumes"]]
        assert any(target == path and source in doc["volumes"] for source, target in volumes), name


def test_health_checks_gate_the_start_order_and_everything_restarts() -> None:
    doc = load()
    services = doc["services"]
    for name, service in services.items():
        assert service.get("restart") in {"unless-stopped", "always"}, f"{name}: no restart policy"
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no health check"
    for name in ("nats", "redis", "postgres", "ingestor", "archiver", "gateway", "feeds"):
        assert "healthcheck" in services[name], name
    assert services["ingestor"]["depends_on"].keys() == {"nats", "redis"}
    assert services["archiver"]["depends_on"].keys() == {"redis", "postgres"}


def test_two_archivers_one_gateway_port() -> None:
    services = load()["services"]
    assert services["archiver"]["deploy"]["replicas"] == 2
    assert "FANOUT_ARCHIVE_CONSUMER" not in services["archiver"]["environment"]  # unique per replica
    assert services["gateway"]["ports"] == ["8000:8000"]


def test_upstream_profile_swaps_the_simulators_for_the_original_images() -> None:
    services = load({**REQUIRED, "FANOUT_SIMULATORS": "0"})["services"]
    upstream = {s["image"] for s in services.values() if "upstream" in s.get("profiles", [])}
    assert upstream == {"wsumfest/sport-feed:v1", "wsumfest/execution-feed:v1"}
    assert services["feeds"]["deploy"]["replicas"] == 0
    assert load()["services"]["feeds"]["deploy"]["replicas"] == 1
    for name in ("sport-feed", "execution-feed"):
        assert services[name]["environment"]["NATS_URL"] == "nats://nats:4222"


def test_dockerfile_builds_the_cli_from_the_sources() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["fanout"]' in text
    copied = re.findall(r"^COPY (?!--from)(.+?) \S+$", text, re.MULTILINE)
    sources = [s for line in copied for s in line.split()]
    assert sources, "the Dockerfile copies nothing"
    for source in sources:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not ignored & set(sources), "a source the Dockerfile copies is in .dockerignore"
    assert re.search(r"^USER (?!root)\S+", text, re.MULTILINE), "the services run as root"


@pytest.mark.parametrize(
    ("unset", "named"),
    [("POSTGRES_PASSWORD", "POSTGRES_PASSWORD"), ("FANOUT_TOKENS", "FANOUT_TOKENS")],
)
def test_compose_refuses_to_start_without_a_password_or_credentials(unset: str, named: str) -> None:
    env = {k: v for k, v in REQUIRED.items() if k != unset}
    with pytest.raises(MissingVariable, match=f"required variable {named} is missing a value"):
        load(env)
    if unset == "POSTGRES_PASSWORD":  # an empty password is no password either
        with pytest.raises(MissingVariable):
            load({**env, "POSTGRES_PASSWORD": ""})


def test_compose_passes_the_password_and_the_credentials_through() -> None:
    services = load({"POSTGRES_PASSWORD": "pg-s3cret", "FANOUT_TOKENS": "", "FANOUT_JWT_SECRET": "k" * 32})[
        "services"
    ]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg-s3cret"
    assert "fanout:pg-s3cret@postgres" in services["gateway"]["environment"]["DATABASE_URL"]
    gateway = services["gateway"]["environment"]
    assert gateway["FANOUT_TOKENS"] == "" and gateway["FANOUT_JWT_SECRET"] == "k" * 32


def test_gateway_ops_port_is_separate_and_not_published() -> None:
    gateway = load()["services"]["gateway"]
    assert gateway["environment"]["FANOUT_GATEWAY_LISTEN"] == "0.0.0.0:8000"  # the port published
    assert gateway["environment"]["FANOUT_GATEWAY_OPS"] == "0.0.0.0:9103"
    assert gateway["environment"]["FANOUT_GATEWAY_WORKERS"] == "0"  # one worker per core
    assert gateway["ports"] == ["8000:8000"]  # /metrics is not on it, and 9103 is not published
    assert "9103/readyz" in " ".join(gateway["healthcheck"]["test"])
