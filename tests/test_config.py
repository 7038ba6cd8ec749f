"""The configuration format: what a TOML file and ``CLAUDEPOOL_*`` variables may say, the defaults, the
validation messages, and what `Settings` hands each component.

Pinned so that moving a section's model into the package it configures changes none of it: the JSON
schema (every key, type, default and bound) is compared with tests/data/settings_schema.json, and the
messages are compared word for word.
"""

from __future__ import annotations

import ast
import doctest
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from claudepool.config import ProfileSettings, Settings, load_settings
from claudepool.errors import ConfigError, Forbidden, Unauthorized
from claudepool.pool.profile import Profile
from claudepool.sessions import settings as sessions_settings
from claudepool.sessions.settings import SessionLimits
from claudepool.tenancy import budgets, limits, tenants

SCHEMA = Path(__file__).parent / "data" / "settings_schema.json"


@pytest.fixture(autouse=True)
def _no_claudepool_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CLAUDEPOOL_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "claudepool.toml"
    path.write_text(text)
    return path


def problems(path: Path | None = None, **overrides: Any) -> str:
    with pytest.raises(ConfigError) as failed:
        load_settings(path, **overrides)
    return str(failed.value)


def test_the_schema_is_unchanged() -> None:
    # To change the format on purpose: update the README's configuration table, then regenerate with
    #   python -c 'import json; from claudepool.config import Settings; \
    #     print(json.dumps(Settings.model_json_schema(), indent=1, sort_keys=True))' > tests/data/settings_schema.json
    assert Settings.model_json_schema() == json.loads(SCHEMA.read_text())


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(None)
    assert list(settings.profiles) == ["default"]
    assert settings.tenants == {}
    assert list(settings.pricing) == ["default"]
    assert settings.pool.claude_bin == "claude"
    assert settings.store.key_prefix == "cp"
    assert settings.sessions.max_sessions == 100
    assert settings.metering.max_buffered_records == 100_000
    empty = load_settings(write(tmp_path, ""))
    assert empty.model_dump() == settings.model_dump()


def test_toml_and_env_compose_with_env_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, """
        [pool]
        min_idle = 3
        env = { FAKE_CLAUDE_LOG = "/tmp/log" }
        [profiles.default]
        [profiles.lean]
        tools = ["Read"]
        max_budget_usd = 0.5
        [tenants.acme]
        key = "k-acme"
        profiles = ["default", "lean"]
        [store]
        reservation_ttl_s = 60
    """)
    monkeypatch.setenv("CLAUDEPOOL_POOL__MIN_IDLE", "4")
    monkeypatch.setenv("CLAUDEPOOL_TENANTS__ACME__DAILY_BUDGET_USD", "2.5")
    monkeypatch.setenv("CLAUDEPOOL_SESSIONS__TTL_S", "30")
    monkeypatch.setenv("CLAUDEPOOL_PROFILES__LEAN__ARGS", '["--effort", "low"]')
    settings = load_settings(path)
    assert settings.pool.min_idle == 4  # the environment wins over the file
    assert settings.pool.env == {"FAKE_CLAUDE_LOG": "/tmp/log"}
    assert settings.tenants["acme"].daily_budget_usd == 2.5
    assert settings.tenants["acme"].key.get_secret_value() == "k-acme"  # the rest of the table stays
    assert settings.store.reservation_ttl_s == 60
    assert settings.sessions.ttl_s == 30
    assert list(settings.profiles["lean"].args) == ["--effort", "low"]
    monkeypatch.setenv("CLAUDEPOOL_CONFIG", str(path))
    assert load_settings().pool.min_idle == 4  # $CLAUDEPOOL_CONFIG names the file


def test_what_each_component_is_handed(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [pool]
        claude_bin = "/opt/claude"
        min_idle = 3
        max_turns = 50
        env = { SHARED = "1", OVERRIDDEN = "pool" }
        [profiles.default]
        [profiles.lean]
        claude_bin = "/opt/lean-claude"
        model = "claude-haiku-4-5"
        system_prompt = "Be brief."
        tools = ["Read", "Grep"]
        args = ["--effort", "low"]
        env = { OVERRIDDEN = "lean" }
        bare = false
        include_partial_messages = false
        read_claude_md = true
        upstream_max_retries = 0
        upstream_timeout_ms = 5000
        min_idle = 0
        max_workers = 2
        max_budget_usd = 0.25
    """)
    settings = load_settings(path)
    default, lean = settings.profile("default"), settings.profile("lean")
    assert (default.name, default.claude_bin, default.max_budget_usd) == ("default", "/opt/claude", None)
    assert dict(default.env) == {"SHARED": "1", "OVERRIDDEN": "pool"}
    assert lean.model_dump() == {
        "name": "lean", "claude_bin": "/opt/lean-claude", "model": "claude-haiku-4-5", "system_prompt": "Be brief.",
        "tools": ("Read", "Grep"), "args": ("--effort", "low"), "env": {"SHARED": "1", "OVERRIDDEN": "lean"},
        "include_partial_messages": False, "read_claude_md": True, "bare": False, "upstream_max_retries": 0,
        "upstream_timeout_ms": 5000, "max_budget_usd": 0.25, "session_persistence": False,
        "sandbox": None, "permission_mode": None, "allowed_tools": (), "disallowed_tools": (), "allowed_hosts": (),
        "max_processes": 256, "max_memory_bytes": 2 * 1024**3, "max_workspace_bytes": 1024**3,
        "mcp_servers": {}, "sandbox_read_only": (), "json_schema": None, "effort": None, "fallback_models": (),
    }
    assert lean.sandboxed  # it has tools: sandboxed unless it says otherwise
    pool_default, pool_lean = settings.pool_config("default"), settings.pool_config("lean")
    assert (pool_default.min_idle, pool_default.max_workers, pool_default.max_turns) == (3, 0, 50)
    assert (pool_lean.min_idle, pool_lean.max_workers, pool_lean.max_turns) == (0, 2, 50)
    assert "claude_bin" not in pool_default.model_dump()


def test_each_profile_is_handed_its_upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "batch.key"
    key_file.write_text("sk-ant-batch\n")
    path = write(tmp_path, f"""
        [upstream]
        extra_headers = {{ anthropic-beta = "b1", X-Org = "acme" }}
        [upstream.profiles.batch]
        base_url = "http://127.0.0.1:9/anthropic/"
        api_key_file = "{key_file}"
        extra_headers = {{ x-org = "batch" }}
        [upstream.profiles.proxy]
        auth_token = "tok"
        [profiles.default]
        [profiles.batch]
        [profiles.proxy]
    """)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-env")
    settings = load_settings(path)
    default, batch, proxy = (settings.upstream_for(n) for n in ("default", "batch", "proxy"))
    # $ANTHROPIC_API_KEY is the key when none is configured; a profile's own credential replaces it.
    assert (default.base_url, dict(default.headers)) == (
        "https://api.anthropic.com", {"anthropic-beta": "b1", "x-org": "acme", "x-api-key": "sk-ant-from-env"})
    assert (batch.name, batch.base_url, dict(batch.headers)) == (
        "upstream.profiles.batch", "http://127.0.0.1:9/anthropic",
        {"anthropic-beta": "b1", "x-org": "batch", "x-api-key": "sk-ant-batch"})
    assert batch.url("/v1/messages?beta=true") == "http://127.0.0.1:9/anthropic/v1/messages?beta=true"
    assert dict(proxy.headers) == {"anthropic-beta": "b1", "x-org": "acme", "authorization": "Bearer tok"}
    assert "sk-ant" not in repr(default) and "tok" not in repr(proxy)
    # Workers get none of it.
    assert not any("ANTHROPIC" in name for name in settings.profile("batch").env)
    key_file.unlink()
    with pytest.raises(ConfigError, match=f"upstream.profiles.batch.api_key_file: cannot read {key_file}"):
        settings.upstream_for("batch")
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    assert not settings.upstream_for("default").has_credential


def test_the_admin_key_is_read_for_reconcile_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    admin_file = tmp_path / "admin.key"
    admin_file.write_text("sk-ant-admin01-from-a-file\n")
    path = write(tmp_path, f"""
        [upstream]
        api_key = "sk-ant-api03-calls"
        admin_key_file = "{admin_file}"
        [upstream.profiles.batch]
        api_key = "sk-ant-api03-batch"
        [profiles.default]
        [profiles.batch]
    """)
    settings = load_settings(path)
    assert settings.upstream.admin_credential() == "sk-ant-admin01-from-a-file"
    # No call carries it, whatever the profile; no worker holds it.
    for name in ("default", "batch"):
        upstream = settings.upstream_for(name)
        assert not any("admin" in value for value in upstream.headers.values())
        assert "sk-ant-admin01" not in repr(upstream)
        assert not any("admin" in value for value in settings.profile(name).env.values())
    monkeypatch.setenv("CLAUDEPOOL_UPSTREAM__ADMIN_KEY_FILE", "")
    monkeypatch.setenv("CLAUDEPOOL_UPSTREAM__ADMIN_KEY", "sk-ant-admin01-from-env")
    assert load_settings(path).upstream.admin_credential() == "sk-ant-admin01-from-env"
    monkeypatch.delenv("CLAUDEPOOL_UPSTREAM__ADMIN_KEY")
    monkeypatch.delenv("CLAUDEPOOL_UPSTREAM__ADMIN_KEY_FILE")
    admin_file.write_text("\n")
    with pytest.raises(ConfigError, match=f"upstream.admin_key_file: {admin_file} is empty"):
        settings.upstream.admin_credential()
    admin_file.unlink()
    with pytest.raises(ConfigError, match=f"upstream.admin_key_file: cannot read {admin_file}"):
        settings.upstream.admin_credential()
    assert load_settings(write(tmp_path, "[upstream]\n")).upstream.admin_credential() is None


def test_every_spawn_setting_of_a_profile_can_be_configured() -> None:
    # Only what the pool decides itself is not in [profiles.NAME]: a new Profile knob needs a key there.
    assert set(Profile.model_fields) - set(ProfileSettings.model_fields) == {"name", "session_persistence"}


def test_the_tenant_registry_holds_the_configured_keys(tmp_path: Path) -> None:
    path = write(tmp_path, """
        [server]
        admin_key = "k-admin"
        [metrics]
        key = "k-scrape"
        [profiles.default]
        [profiles.lean]
        [tenants.acme]
        key = "k-acme"
        weight = 2
        daily_budget_usd = 3
        max_session_turns = 7
        [tenants.beta]
        key = "sha256:%s"
        profile = "lean"
    """ % ("ab" * 32))
    registry = load_settings(path).tenant_registry()
    acme = registry.authenticate("k-acme")
    assert (acme.name, acme.profile, acme.profiles, acme.weight, acme.has_budget, acme.max_session_turns) == (
        "acme", "default", frozenset({"default"}), 2.0, True, 7)
    assert registry.get("beta") is not None
    assert registry.get("beta").profiles == frozenset({"lean"})  # type: ignore[union-attr]
    assert registry.names() == ["acme", "beta"]
    with pytest.raises(Unauthorized):
        registry.authenticate("sha256:" + "ab" * 32)  # a digest is not a key
    assert registry.is_admin("k-admin")
    registry.require_scraper("k-scrape")
    with pytest.raises(Forbidden):
        registry.require_admin("k-acme")
    with pytest.raises(Forbidden):
        registry.require_scraper("k-acme")


def test_the_session_manager_is_handed_its_directory_and_each_profiles_limits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, """
        [sessions]
        max_turns = 10
        max_age_s = 60
        [profiles.default]
        [profiles.lean]
        max_session_turns = 3
        max_session_context_tokens = 1000
    """)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    options = load_settings(path).session_options()
    assert options.dir == tmp_path / "tmp" / "claudepool-sessions"
    assert options.settings.max_turns == 10
    base = options.settings.limits()
    assert options.profile_limits["default"].over(base) == SessionLimits(10, 60.0, 0)
    assert options.profile_limits["lean"].over(base) == SessionLimits(3, 60.0, 1000)
    monkeypatch.setenv("CLAUDEPOOL_POOL__WORKDIR", str(tmp_path / "w"))
    assert load_settings(path).session_options().dir == tmp_path / "w" / "claudepool-sessions"
    monkeypatch.setenv("CLAUDEPOOL_SESSIONS__DIR", str(tmp_path / "s"))
    assert load_settings(path).session_options().dir == tmp_path / "s"


def imported_by(module: str) -> set[str]:
    """The claudepool modules (and a few heavy libraries) that importing ``module`` loads, in a fresh
    interpreter."""
    done = subprocess.run([sys.executable, "-c", f"import sys, {module}; print(*sorted(sys.modules))"],
                          capture_output=True, text=True, timeout=60, check=True)
    return set(done.stdout.split())


def test_importing_the_config_loads_no_component_it_only_configures() -> None:
    loaded = imported_by("claudepool.config")
    assert "claudepool.config" in loaded
    for module in ("claudepool.daemon.app", "claudepool.sessions.manager", "claudepool.store.redis",
                   "claudepool.store.memory", "claudepool.tenancy.metering", "claudepool.tenancy.limits",
                   "redis", "prometheus_client"):
        assert module not in loaded, module


# PoolSettings extends the pool's PoolConfig, which has a module of its own (pool/config.py): importing
# the config must not load the worker, the reaper (libc through ctypes) or the HTTP stack.
def test_importing_the_config_starts_no_worker_machinery() -> None:
    loaded = imported_by("claudepool.config")
    assert not {"claudepool.pool.worker", "claudepool.pool.reaper", "ctypes", "aiohttp"} & loaded


@pytest.mark.parametrize(("toml", "message"), [
    ("[pool]\nmin_idle = -1\n", "  pool.min_idle: Input should be greater than or equal to 0"),
    ("[pool]\nbogus = 1\n", "  pool.bogus: Extra inputs are not permitted"),
    ("[profiles.default]\nargs = \"-p\"\n", "  profiles.default.args: Input should be a valid list"),
    ("[profiles.default]\nmax_budget_usd = -1\n",
     "  profiles.default.max_budget_usd: Input should be greater than or equal to 0"),
    ("[tenants.acme]\nprofile = \"default\"\n", "  tenants.acme.key: Field required"),
    ("[tenants.acme]\nkey = \"\"\n", "  tenants.acme.key: Value error, a tenant key may not be empty"),
    ("[tenants.acme]\nkey = \"k\"\nwebhook_url = \"https://hooks.example.com/cp\"\n",
     "  tenants.acme: Value error, set both webhook_url and webhook_secret, or neither (deliveries are signed)"),
    ("[tenants.acme]\nkey = \"k\"\nwebhook_secret = \"whsec-1\"\n",
     "  tenants.acme: Value error, set both webhook_url and webhook_secret, or neither (deliveries are signed)"),
    ("[tenants.acme]\nkey = \"k\"\nwebhook_url = \"https://hooks.example.com/cp\"\nwebhook_secret = \"\"\n",
     "  tenants.acme: Value error, webhook_secret may not be empty"),
    ("[tenants.acme]\nkey = \"k\"\nwebhook_url = \"file:///etc/passwd\"\nwebhook_secret = \"whsec-1\"\n",
     "  tenants.acme.webhook_url: Value error, expected an http(s) URL with a host, got 'file:///etc/passwd'"),
    ("[tenants.acme]\nkey = \"k\"\nwebhook_url = \"https://u:p@hooks.example.com/\"\nwebhook_secret = \"w\"\n",
     "  tenants.acme.webhook_url: Value error, a webhook URL may not carry a user or password"),
    ("[tenants.acme]\nkey = \"k\"\nprofile = \"other\"\nprofiles = [\"default\"]\n",
     "  (top level): Value error, tenants.acme: profile 'other' is not in its profiles list"),
    ("[tenants.acme]\nkey = \"k\"\nprofiles = [\"default\", \"nope\"]\n",
     "  (top level): Value error, tenants.acme: unknown profiles ['nope']"),
    ("[tenants.acme]\nkey = \"k\"\n[tenants.beta]\nkey = \"k\"\n",
     "  (top level): Value error, tenants.beta and tenants.acme have the same key"),
    ("[server]\nadmin_key = \"k\"\n[tenants.acme]\nkey = \"k\"\n",
     "  (top level): Value error, server.admin_key equals the key of tenants.acme"),
    ("[server]\nhttp = \"8787\"\n", "  server.http: Value error, expected HOST:PORT or an empty string, got '8787'"),
    ("[store]\nkey_prefix = \"a b\"\n", "  store.key_prefix: String should match pattern '^[A-Za-z0-9_.-]{1,32}$'"),
    ("[sessions]\nmax_workers = 0\n", "  sessions.max_workers: Input should be greater than or equal to 1"),
    ("[metering]\nmax_buffered_records = 0\n", "  metering.max_buffered_records: Input should be greater than 0"),
    ("[pricing.default]\ninput_per_mtok = 1\n", "  pricing.default.output_per_mtok: Field required"),
    ("[metrics]\nmax_tenant_labels = 0\n", "  metrics.max_tenant_labels: Input should be greater than or equal to 1"),
    ("[profiles.\"a b\"]\n", "  (top level): Value error, name 'a b' must match"),
    ("[tenants.\"..\"]\nkey = \"k\"\n", "  (top level): Value error, name '..' must match"),
    ("profiles = {}\n", "  (top level): Value error, at least one profile must be defined"),
    ("[upstream]\nbase_url = \"api.anthropic.com\"\n",
     "  upstream.base_url: Value error, expected an http(s) URL without query or fragment, got 'api.anthropic.com'"),
    ("[upstream]\nbase_url = \"https://u:p@proxy\"\n",
     "  upstream.base_url: Value error, the URL may not carry credentials: use api_key, api_key_file or auth_token"),
    ("[upstream]\napi_key = \"k\"\nauth_token = \"t\"\n",
     "  upstream: Value error, set at most one of api_key, api_key_file and auth_token (got api_key, auth_token)"),
    ("[upstream]\nextra_headers = { X-Api-Key = \"k\", Host = \"h\" }\n",
     "  upstream.extra_headers: Value error, extra_headers may not set host, x-api-key: the gateway sets them"),
    ("[upstream.profiles.default]\napi_key = \"k\"\napi_key_file = \"/k\"\n",
     "  upstream.profiles.default: Value error, set at most one of api_key, api_key_file and auth_token "
     "(got api_key, api_key_file)"),
    ("[upstream.profiles.nope]\nbase_url = \"http://127.0.0.1:9\"\n",
     "  (top level): Value error, upstream.profiles: unknown profiles ['nope']"),
    ("[upstream]\nconnect_timeout_s = 0\n", "  upstream.connect_timeout_s: Input should be greater than 0"),
    ("[upstream]\nadmin_key = \"sk-ant-admin01-k\"\nadmin_key_file = \"/k\"\n",
     "  upstream: Value error, set at most one of admin_key and admin_key_file"),
    ("[pool]\nenv = { ANTHROPIC_API_KEY = \"sk-ant-x\" }\n",
     "  (top level): Value error, pool.env: ANTHROPIC_API_KEY may not be set for workers: the provider's address and "
     "credentials go in [upstream] (base_url, api_key, api_key_file, auth_token), which only the daemon's gateway "
     "reads"),
    ("[profiles.default.env]\nANTHROPIC_BASE_URL = \"http://x\"\nCLAUDE_CODE_USE_BEDROCK = \"1\"\n",
     "  (top level): Value error, profiles.default.env: ANTHROPIC_BASE_URL, CLAUDE_CODE_USE_BEDROCK may not be set "
     "for workers: the provider's address and credentials go in [upstream] (base_url, api_key, api_key_file, "
     "auth_token), which only the daemon's gateway reads"),
])
def test_validation_messages(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, toml)
    text = problems(path)
    assert text.startswith(f"invalid configuration in {path} (or CLAUDEPOOL_* variables):\n"), text
    assert message in text.splitlines()[1:] or text.splitlines()[1].startswith(message), text


def test_every_problem_is_listed_once(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool]\nmin_idle = -1\nmax_turns = 0\n[sessions]\nttl_s = 0\n")
    assert problems(path).splitlines()[1:] == [
        "  pool.min_idle: Input should be greater than or equal to 0",
        "  pool.max_turns: Input should be greater than or equal to 1",
        "  sessions.ttl_s: Input should be greater than 0",
    ]


def test_env_values_are_validated_like_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAUDEPOOL_POOL__MAX_WORKERS", "lots")
    monkeypatch.setenv("CLAUDEPOOL_STORE__RESERVATION_TTL_S", "-5")
    assert problems().splitlines() == [
        "invalid configuration (or CLAUDEPOOL_* variables):",
        "  pool.max_workers: Input should be a valid integer, unable to parse string as an integer",
        "  store.reservation_ttl_s: Input should be greater than 0",
    ]


def test_a_missing_or_malformed_file_is_named(tmp_path: Path) -> None:
    assert problems(tmp_path / "absent.toml") == f"config file {tmp_path / 'absent.toml'} does not exist"
    bad = write(tmp_path, "[pool\n")
    assert problems(bad).startswith(f"{bad} is not valid TOML: ")


def claudepool_imports(path: Path) -> set[str]:
    """Every ``claudepool`` module a source file imports, ``TYPE_CHECKING`` blocks and functions included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {name for name in found if name.split(".")[0] == "claudepool"}


# What each package may import besides itself: configuration flows down from config.py, never up.
_BASE = {"claudepool.errors", "claudepool.logs", "claudepool.protocol"}
_MAY_IMPORT = {
    "store": _BASE,
    # The pool knows the gateway only through the WorkerCredentials protocol.
    "pool": _BASE,
    "tenancy": {*_BASE, "claudepool.store", "claudepool.pool"},
    "sessions": {*_BASE, "claudepool.store", "claudepool.tenancy", "claudepool.pool"},
    "gateway": {*_BASE, "claudepool.store", "claudepool.pool", "claudepool.tenancy"},
}


@pytest.mark.parametrize("package", sorted(_MAY_IMPORT))
def test_a_configured_package_imports_nothing_above_it(package: str) -> None:
    root = Path(__file__).parent.parent / "claudepool" / package
    allowed = (*_MAY_IMPORT[package], f"claudepool.{package}")
    upward = {f"{path.name}: {name}" for path in sorted(root.glob("*.py")) for name in claudepool_imports(path)
              if name != "claudepool" and not name.startswith(tuple(f"{a}." for a in allowed)) and name not in allowed}
    assert not upward


@pytest.mark.parametrize("module", [sessions_settings, tenants, budgets, limits], ids=lambda m: m.__name__)
def test_the_usage_examples_in_docstrings_run(module: ModuleType) -> None:
    result = doctest.testmod(module)
    assert (result.attempted > 0, result.failed) == (True, 0)


def test_bypass_permissions_is_refused_outside_a_sandbox(tmp_path: Path) -> None:
    for profile, refused in (('tools = ["Bash"]\nsandbox = false', True), ("", True), ('tools = ["Bash"]', False)):
        config = tmp_path / "c.toml"
        config.write_text(f'[profiles.default]\n{profile}\npermission_mode = "bypassPermissions"\n')
        if refused:
            with pytest.raises(ConfigError, match="bypassPermissions needs the sandbox"):
                load_settings(config)
        else:
            assert load_settings(config).profile("default").argv()[-2:] == ["--permission-mode", "bypassPermissions"]


def test_allowed_and_disallowed_tools_reach_the_cli(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[profiles.default]\ntools = ["Bash", "Read"]\nallowed_tools = ["Bash(ls:*)", "Read"]\n'
                      'disallowed_tools = ["Bash(rm:*)"]\n')
    argv = load_settings(config).profile("default").argv()
    assert argv[argv.index("--allowedTools") + 1] == "Bash(ls:*),Read"
    assert argv[argv.index("--disallowedTools") + 1] == "Bash(rm:*)"
