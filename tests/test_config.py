"""server/config.py: command line over environment over defaults, the env names, validation, and --help.

Every call passes `environ` explicitly, so the tests never depend on the developer's own environment.
"""

from __future__ import annotations

import doctest
import math
import re
from typing import Any

import pytest

import server.config
from server.config import (
    DEMO_MODEL,
    Config,
    build_parser,
    describe_source,
    load_config,
    public_url,
    shown_default,
)


def exits(argv: list[str], environ: dict[str, str] | None = None) -> SystemExit:
    with pytest.raises(SystemExit) as info:
        load_config(argv, {} if environ is None else environ)
    return info.value


# --- defaults -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        # The README's configuration table.
        ("host", "127.0.0.1"),
        ("port", 8080),
        ("backlog", 4096),
        ("provider", "auto"),
        ("api_key", None),
        ("base_url", None),
        ("model", None),
        ("allowed_models", ()),
        ("demo_delay", 0.03),
        ("first_token_timeout", 60),
        ("idle_timeout", 60),
        ("total_timeout", 600),
        ("write_timeout", 10),
        ("heartbeat", 15),
        ("ndjson_keepalive", False),
        ("flush_window", 0),
        ("flush_bytes", 0),
        ("cors_origins", ()),
        ("public_origins", ()),
        ("max_body_bytes", 1024 * 1024),
        ("max_messages", 200),
        ("max_message_chars", 32_000),
        ("upstream_max_retries", 2),
        ("upstream_connect_timeout", 10),
        ("include_usage", True),
        ("shutdown_grace", 5),
        ("use_uvloop", True),
        ("gc_tuning", True),
        ("request_head_timeout", 10),
        ("request_body_timeout", 30),
        ("auth_failures", 10),
        ("auth_failure_rate", "6/m"),
    ],
)
def test_defaults(field: str, value: Any) -> None:
    assert getattr(load_config([], {}), field) == value


def test_no_arguments_and_no_environment_is_the_default_config() -> None:
    assert load_config([], {}) == Config()
    assert load_config(None, {}) == Config()  # argv=None means no arguments, never sys.argv


def test_environ_none_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_RELAY_PORT", "9123")
    assert load_config([]).port == 9123


# --- command line and environment ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "field", "value"),
    [
        (["--host", "0.0.0.0"], "host", "0.0.0.0"),
        (["--port", "9000"], "port", 9000),
        (["--port", "0"], "port", 0),
        (["--backlog", "1"], "backlog", 1),
        (["--backlog", "65535"], "backlog", 65535),
        (["--base-url", "https://example.com:8443/v1"], "base_url", "https://example.com:8443/v1"),
        (["--base-url", " http://[::1]:8000/v1 "], "base_url", "http://[::1]:8000/v1"),
        (["--provider", "demo"], "provider", "demo"),
        (["--provider", "openai"], "provider", "openai"),
        (["--base-url", "http://localhost:11434/v1"], "base_url", "http://localhost:11434/v1"),
        (["--api-key", "sk-test"], "api_key", "sk-test"),
        (["--model", "llama3"], "model", "llama3"),
        (["--allow-model", "a"], "allowed_models", ("a",)),
        (["--allow-model", "a", "--allow-model", "b"], "allowed_models", ("a", "b")),
        (["--demo-delay", "0"], "demo_delay", 0.0),
        (["--demo-delay", "0.5"], "demo_delay", 0.5),
        (["--upstream-max-retries", "0"], "upstream_max_retries", 0),
        (["--upstream-connect-timeout", "2.5"], "upstream_connect_timeout", 2.5),
        (["--include-usage", "false"], "include_usage", False),
        (["--first-token-timeout", "0"], "first_token_timeout", 0.0),
        (["--idle-timeout", "1.5"], "idle_timeout", 1.5),
        (["--total-timeout", "3600"], "total_timeout", 3600.0),
        (["--write-timeout", "2"], "write_timeout", 2.0),
        (["--heartbeat", "0"], "heartbeat", 0.0),
        (["--ndjson-keepalive", "true"], "ndjson_keepalive", True),
        (["--flush-window", "0.02"], "flush_window", 0.02),
        (["--flush-bytes", "4096"], "flush_bytes", 4096),
        (["--cors-origin", "https://a.example", "--cors-origin", "https://b.example"], "cors_origins",
         ("https://a.example", "https://b.example")),
        (["--public-origin", "https://chat.example.com", "--public-origin", "http://relay.internal:8080"],
         "public_origins", ("https://chat.example.com", "http://relay.internal:8080")),
        (["--max-body-bytes", "1000"], "max_body_bytes", 1000),
        (["--max-messages", "5"], "max_messages", 5),
        (["--max-message-chars", "100"], "max_message_chars", 100),
        (["--system-prompt", "Be brief."], "system_prompt", "Be brief."),
        (["--content-part-type", "image_url", "--content-part-type", "file"], "content_part_types",
         ("image_url", "file")),
        (["--shutdown-grace", "0"], "shutdown_grace", 0.0),
        (["--uvloop", "no"], "use_uvloop", False),
        (["--gc-tuning", "false"], "gc_tuning", False),
        (["--rate", "30/m"], "rate", "30/m"),
        (["--burst", "3"], "burst", 3),
        (["--max-streams-per-client", "1"], "max_streams_per_client", 1),
        (["--max-streams", "10"], "max_streams", 10),
        (["--redis-url", "redis://127.0.0.1:6379/0"], "redis_url", "redis://127.0.0.1:6379/0"),
        (["--redis-fail-open", "off"], "redis_fail_open", False),
        (["--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "::1"], "trusted_proxies", ("10.0.0.0/8", "::1")),
        (["--api-keys-file", "/etc/keys"], "api_keys_file", "/etc/keys"),
        (["--limits", "0"], "limits_enabled", False),
        (["--request-head-timeout", "2.5"], "request_head_timeout", 2.5),
        (["--request-body-timeout", "0"], "request_body_timeout", 0.0),
        (["--auth-failures", "3"], "auth_failures", 3),
        (["--auth-failure-rate", "1/h"], "auth_failure_rate", "1/h"),
        (["--port=9001"], "port", 9001),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)  # fmt: skip
def test_command_line(argv: list[str], field: str, value: Any) -> None:
    config = load_config(argv, {})
    assert getattr(config, field) == value
    assert type(getattr(config, field)) is type(value)


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"LLM_RELAY_HOST": "::"}, "host", "::"),
        ({"LLM_RELAY_PORT": "9000"}, "port", 9000),
        ({"LLM_RELAY_BACKLOG": "1000"}, "backlog", 1000),
        ({"LLM_RELAY_PROVIDER": "demo"}, "provider", "demo"),
        ({"LLM_RELAY_BASE_URL": "http://x/v1"}, "base_url", "http://x/v1"),
        ({"OPENAI_BASE_URL": "http://y/v1"}, "base_url", "http://y/v1"),
        ({"LLM_RELAY_API_KEY": "sk-a"}, "api_key", "sk-a"),
        ({"OPENAI_API_KEY": "sk-b"}, "api_key", "sk-b"),
        ({"LLM_RELAY_MODEL": "m1"}, "model", "m1"),
        ({"OPENAI_MODEL": "m2"}, "model", "m2"),
        # The relay's own name wins over the upstream's conventional one...
        ({"LLM_RELAY_API_KEY": "sk-a", "OPENAI_API_KEY": "sk-b"}, "api_key", "sk-a"),
        ({"LLM_RELAY_MODEL": "m1", "OPENAI_MODEL": "m2"}, "model", "m1"),
        ({"LLM_RELAY_BASE_URL": "http://x/v1", "OPENAI_BASE_URL": "http://y/v1"}, "base_url", "http://x/v1"),
        # ...unless it is empty, which counts as unset.
        ({"LLM_RELAY_API_KEY": "", "OPENAI_API_KEY": "sk-b"}, "api_key", "sk-b"),
        ({"LLM_RELAY_PORT": ""}, "port", 8080),
        # Repeatable options are comma-separated in the environment.
        ({"LLM_RELAY_ALLOW_MODEL": "a"}, "allowed_models", ("a",)),
        ({"LLM_RELAY_ALLOW_MODEL": "a, b ,,c,"}, "allowed_models", ("a", "b", "c")),
        ({"LLM_RELAY_CORS_ORIGIN": "https://a.example,https://b.example"}, "cors_origins",
         ("https://a.example", "https://b.example")),
        ({"LLM_RELAY_PUBLIC_ORIGIN": "https://chat.example.com, http://[::1]:8080"}, "public_origins",
         ("https://chat.example.com", "http://[::1]:8080")),
        ({"LLM_RELAY_TRUSTED_PROXY": "10.0.0.0/8"}, "trusted_proxies", ("10.0.0.0/8",)),
        ({"LLM_RELAY_DEMO_DELAY": "0.25"}, "demo_delay", 0.25),
        ({"LLM_RELAY_UPSTREAM_MAX_RETRIES": "5"}, "upstream_max_retries", 5),
        ({"LLM_RELAY_UPSTREAM_CONNECT_TIMEOUT": "3"}, "upstream_connect_timeout", 3.0),
        ({"LLM_RELAY_INCLUDE_USAGE": "0"}, "include_usage", False),
        ({"LLM_RELAY_FIRST_TOKEN_TIMEOUT": "7"}, "first_token_timeout", 7.0),
        ({"LLM_RELAY_IDLE_TIMEOUT": "8"}, "idle_timeout", 8.0),
        ({"LLM_RELAY_TOTAL_TIMEOUT": "9"}, "total_timeout", 9.0),
        ({"LLM_RELAY_WRITE_TIMEOUT": "1"}, "write_timeout", 1.0),
        ({"LLM_RELAY_HEARTBEAT": "0"}, "heartbeat", 0.0),
        ({"LLM_RELAY_NDJSON_KEEPALIVE": "yes"}, "ndjson_keepalive", True),
        ({"LLM_RELAY_FLUSH_WINDOW": "0.01"}, "flush_window", 0.01),
        ({"LLM_RELAY_FLUSH_BYTES": "512"}, "flush_bytes", 512),
        ({"LLM_RELAY_MAX_BODY_BYTES": "10"}, "max_body_bytes", 10),
        ({"LLM_RELAY_MAX_MESSAGES": "2"}, "max_messages", 2),
        ({"LLM_RELAY_MAX_MESSAGE_CHARS": "3"}, "max_message_chars", 3),
        ({"LLM_RELAY_SHUTDOWN_GRACE": "1"}, "shutdown_grace", 1.0),
        ({"LLM_RELAY_UVLOOP": "false"}, "use_uvloop", False),
        ({"LLM_RELAY_RATE": "5/h"}, "rate", "5/h"),
        ({"LLM_RELAY_BURST": "4"}, "burst", 4),
        ({"LLM_RELAY_MAX_STREAMS_PER_CLIENT": "2"}, "max_streams_per_client", 2),
        ({"LLM_RELAY_MAX_STREAMS": "3"}, "max_streams", 3),
        ({"LLM_RELAY_REDIS_URL": "redis://r"}, "redis_url", "redis://r"),
        ({"LLM_RELAY_REDIS_FAIL_OPEN": "off"}, "redis_fail_open", False),
        ({"LLM_RELAY_API_KEYS_FILE": "/k"}, "api_keys_file", "/k"),
        ({"LLM_RELAY_LIMITS": "off"}, "limits_enabled", False),
        ({"LLM_RELAY_REQUEST_HEAD_TIMEOUT": "4"}, "request_head_timeout", 4.0),
        ({"LLM_RELAY_REQUEST_BODY_TIMEOUT": "5"}, "request_body_timeout", 5.0),
        ({"LLM_RELAY_AUTH_FAILURES": "0"}, "auth_failures", 0),
        ({"LLM_RELAY_AUTH_FAILURE_RATE": "10/m"}, "auth_failure_rate", "10/m"),
        # Names are case-sensitive, and unrelated variables are ignored.
        ({"llm_relay_port": "1"}, "port", 8080),
        ({"LLM_RELAY_ALLOWED_MODELS": "a"}, "allowed_models", ()),
    ],
    ids=lambda value: ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None,
)  # fmt: skip
def test_environment(env: dict[str, str], field: str, value: Any) -> None:
    config = load_config([], env)
    assert getattr(config, field) == value
    assert type(getattr(config, field)) is type(value)


@pytest.mark.parametrize(
    ("argv", "env", "field", "value"),
    [
        (["--port", "1"], {"LLM_RELAY_PORT": "2"}, "port", 1),
        (["--api-key", "cli"], {"LLM_RELAY_API_KEY": "a", "OPENAI_API_KEY": "b"}, "api_key", "cli"),
        (["--model", "cli"], {"OPENAI_MODEL": "env"}, "model", "cli"),
        (["--include-usage", "true"], {"LLM_RELAY_INCLUDE_USAGE": "false"}, "include_usage", True),
        (["--heartbeat", "0"], {"LLM_RELAY_HEARTBEAT": "5"}, "heartbeat", 0.0),
        # A repeatable option given on the command line replaces the environment's list; it does not add to it.
        (["--allow-model", "c"], {"LLM_RELAY_ALLOW_MODEL": "a,b"}, "allowed_models", ("c",)),
        # The command line wins even over an environment value that would be refused.
        (["--port", "1"], {"LLM_RELAY_PORT": "not a number"}, "port", 1),
        # Other options still come from the environment.
        (["--port", "1"], {"LLM_RELAY_HOST": "::1"}, "host", "::1"),
    ],
    ids=["port", "api-key", "model", "bool", "zero", "repeatable", "bad-env-unread", "others-from-env"],
)
def test_command_line_beats_environment(argv: list[str], env: dict[str, str], field: str, value: Any) -> None:
    assert getattr(load_config(argv, env), field) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("true", True), ("TRUE", True), ("Yes", True), ("on", True), (" true ", True),
     ("0", False), ("false", False), ("False", False), ("no", False), ("OFF", False)],
)  # fmt: skip
def test_booleans(text: str, value: bool) -> None:
    assert load_config(["--include-usage", text], {}).include_usage is value
    assert load_config([], {"LLM_RELAY_INCLUDE_USAGE": text}).include_usage is value


@pytest.mark.parametrize("text", ["", "2", "maybe", "y", "n", "truee", "t"])
def test_invalid_boolean_on_command_line(text: str) -> None:
    assert exits(["--include-usage", text]).code == 2


@pytest.mark.parametrize("text", ["2", "maybe", "enabled"])
def test_invalid_boolean_in_environment_names_the_variable(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert exits([], {"LLM_RELAY_NDJSON_KEEPALIVE": text}).code == 2
    assert "LLM_RELAY_NDJSON_KEEPALIVE" in capsys.readouterr().err


# --- refused values -------------------------------------------------------------------------------------------------

_NON_NEGATIVE_INTS = ["port", "upstream-max-retries", "flush-bytes", "max-body-bytes", "max-messages",
                      "max-message-chars", "burst", "max-streams-per-client", "max-streams",
                      "auth-failures"]  # fmt: skip
_NON_NEGATIVE_FLOATS = ["demo-delay", "upstream-connect-timeout", "first-token-timeout", "idle-timeout",
                        "total-timeout", "write-timeout", "heartbeat", "flush-window", "shutdown-grace",
                        "request-head-timeout", "request-body-timeout"]  # fmt: skip


def env_name(option: str) -> str:
    return "LLM_RELAY_" + option.upper().replace("-", "_")


@pytest.mark.parametrize("option", _NON_NEGATIVE_INTS + _NON_NEGATIVE_FLOATS)
def test_negative_number_on_command_line_is_refused(option: str) -> None:
    assert exits([f"--{option}", "-1"]).code == 2


@pytest.mark.parametrize("option", _NON_NEGATIVE_INTS + _NON_NEGATIVE_FLOATS)
def test_negative_number_in_environment_is_refused(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert exits([], {env_name(option): "-1"}).code == 2
    assert env_name(option) in capsys.readouterr().err


@pytest.mark.parametrize("option", _NON_NEGATIVE_FLOATS)
def test_nan_seconds_are_refused(option: str) -> None:
    # float() parses "nan", which passes `value < 0`; as a timeout it compares false with everything.
    assert exits([f"--{option}", "nan"]).code == 2
    assert exits([], {env_name(option): "NaN"}).code == 2


@pytest.mark.parametrize("option", _NON_NEGATIVE_INTS)
@pytest.mark.parametrize("text", ["1.5", "abc", "", "0x10"])
def test_integer_options_refuse_non_integers(option: str, text: str) -> None:
    assert exits([f"--{option}", text]).code == 2


@pytest.mark.parametrize("port", ["65536", "70000"])
def test_port_out_of_range_is_refused(port: str) -> None:
    assert exits(["--port", port]).code == 2
    assert exits([], {"LLM_RELAY_PORT": port}).code == 2


def test_port_upper_bound_is_accepted() -> None:
    assert load_config(["--port", "65535"], {}).port == 65535


@pytest.mark.parametrize("value", ["0", "-1", "65536", "1.5", "many"])
def test_backlog_out_of_range_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert exits(["--backlog", value]).code == 2
    assert exits([], {"LLM_RELAY_BACKLOG": value}).code == 2
    assert "LLM_RELAY_BACKLOG" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url",
    [
        "upstream.example:8000/v2",
        "ftp://example.com/v2",
        "http:///v2",
        "http://example.com:port/v2",
        "/v2",
        "sk-secret-key",
        "https://user:sk-secret@example.com/v2",
        "https://sk-secret@example.com/v2",
    ],
    ids=["no-scheme", "ftp", "no-host", "bad-port", "path", "a-key-by-mistake", "user-and-password", "user"],
)
def test_base_url_that_is_not_an_http_url_is_refused_without_echoing_it(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A base URL may carry credentials, and a key pasted into the wrong option is a credential too.
    assert exits(["--base-url", url]).code == 2
    assert exits([], {"OPENAI_BASE_URL": url}).code == 2
    err = capsys.readouterr().err
    assert "OPENAI_BASE_URL" in err
    assert url not in err


@pytest.mark.parametrize(
    ("argv", "env"),
    [(["--port", "x"], {}), ([], {"LLM_RELAY_PORT": "x"}), (["--provider", "bogus"], {}), (["--rate", "fast"], {}),
     (["--no-such-option"], {}), (["--trusted-proxy", "not-a-network"], {})],
    ids=["bad-int", "bad-env", "not-a-choice", "bad-rate", "unknown-option", "bad-network"],
)  # fmt: skip
def test_a_bad_option_is_one_line_on_stderr(
    argv: list[str], env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert exits(argv, env).code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("llm-relay: error: ")
    assert line.endswith("(see --help)")


@pytest.mark.parametrize("value", ["bogus", "Demo", "OPENAI", "", "auto "])
def test_provider_not_a_choice_on_command_line(value: str) -> None:
    assert exits(["--provider", value]).code == 2


@pytest.mark.parametrize("value", ["bogus", "Demo", "anthropic"])
def test_provider_not_a_choice_in_environment(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The command line checks `choices`; the environment must be held to the same list, or resolved_provider
    # returns the typo and the app fails later, far from the cause.
    assert exits([], {"LLM_RELAY_PROVIDER": value}).code == 2
    assert "LLM_RELAY_PROVIDER" in capsys.readouterr().err


@pytest.mark.parametrize("rate", ["fast", "2/d", "2", "/s", "-1/s", "2/S", "nan/s"])
@pytest.mark.parametrize("option", ["rate", "auth-failure-rate"])
def test_invalid_rate_is_refused(option: str, rate: str) -> None:
    assert exits([f"--{option}", rate]).code == 2
    assert exits([], {env_name(option): rate}).code == 2


@pytest.mark.parametrize("text", ["0", "inf", "-0"])
def test_the_request_head_timeout_must_be_positive_and_finite(text: str) -> None:
    # aiohttp's keepalive_timeout of 0 would close every idle connection at once: there is no "no limit" here.
    assert exits(["--request-head-timeout", text]).code == 2
    assert exits([], {"LLM_RELAY_REQUEST_HEAD_TIMEOUT": text}).code == 2


@pytest.mark.parametrize(
    "origin", ["chat.example.com", "https://chat.example.com/app", "ftp://chat.example.com", "http://a:0", "*"]
)
def test_invalid_public_origin_is_refused(origin: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert exits(["--public-origin", origin]).code == 2
    assert "--public-origin" in capsys.readouterr().err
    assert exits([], {"LLM_RELAY_PUBLIC_ORIGIN": f"https://ok.example,{origin}"}).code == 2
    assert "--public-origin" in capsys.readouterr().err


def test_unknown_option_is_refused() -> None:
    assert exits(["--no-such-option", "1"]).code == 2


# --- derived values -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "provider", "model"),
    [
        ([], {}, "demo", DEMO_MODEL),
        ([], {"OPENAI_API_KEY": "sk-x"}, "openai", "gpt-4o-mini"),
        (["--api-key", "sk-x"], {}, "openai", "gpt-4o-mini"),
        ([], {"OPENAI_API_KEY": ""}, "demo", DEMO_MODEL),
        (["--api-key", ""], {}, "demo", DEMO_MODEL),
        (["--provider", "demo", "--api-key", "sk-x"], {}, "demo", DEMO_MODEL),
        (["--provider", "openai"], {}, "openai", "gpt-4o-mini"),
        ([], {"OPENAI_API_KEY": "sk-x", "OPENAI_MODEL": "gpt-4.1"}, "openai", "gpt-4.1"),
        (["--model", "mine"], {}, "demo", "mine"),
        (["--provider", "auto"], {"LLM_RELAY_API_KEY": "k"}, "openai", "gpt-4o-mini"),
        # Ollama and vLLM need no key: a base URL alone is an upstream to relay, never the demo under its name.
        (["--base-url", "http://localhost:11434/v1", "--model", "llama3"], {}, "openai", "llama3"),
        ([], {"OPENAI_BASE_URL": "http://localhost:8000/v1"}, "openai", "gpt-4o-mini"),
        ([], {"LLM_RELAY_BASE_URL": "http://localhost:8000/v1", "OPENAI_MODEL": "qwen"}, "openai", "qwen"),
        (["--provider", "demo", "--base-url", "http://localhost:11434/v1"], {}, "demo", DEMO_MODEL),
    ],
    ids=["nothing", "env-key", "cli-key", "empty-env-key", "empty-cli-key", "demo-despite-key", "openai-no-key",
         "model-from-env", "model-for-demo", "auto-explicit", "base-url-only", "env-base-url-only",
         "relay-base-url-only", "demo-despite-base-url"],
)  # fmt: skip
def test_resolved_provider_and_model(argv: list[str], env: dict[str, str], provider: str, model: str) -> None:
    config = load_config(argv, env)
    assert config.resolved_provider == provider
    assert config.resolved_model == model


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://localhost:11434/v1", "http://localhost:11434/v1"),
        ("https://user:s3cret@example.com/v1", "https://example.com/v1"),
        ("https://:s3cret@example.com:8443/v1?api-key=s3cret#s3cret", "https://example.com:8443/v1"),
        ("http://[::1]:8000/v1", "http://[::1]:8000/v1"),
        ("http://example.com:port/v1", "(not a valid URL)"),
    ],
    ids=["plain", "userinfo", "everything", "ipv6", "unparsable"],
)
def test_public_url_drops_what_can_carry_a_credential(url: str, shown: str) -> None:
    assert public_url(url) == shown


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([],
         f"provider demo (the built-in simulated model: no --base-url or --api-key configured), model {DEMO_MODEL}"),
        (["--provider", "demo", "--api-key", "sk-s3cret"],
         "provider demo (the built-in simulated model: --provider demo), model " + DEMO_MODEL),
        (["--base-url", "http://localhost:11434/v1", "--model", "llama3"],
         "provider openai, upstream http://localhost:11434/v1 without an API key, model llama3"),
        (["--api-key", "sk-s3cret"],
         "provider openai, upstream https://api.openai.com/v1 (the openai default) with an API key, model gpt-4o-mini"),
    ],
    ids=["demo", "demo-chosen", "base-url", "key"],
)  # fmt: skip
def test_describe_source_names_provider_upstream_and_model(argv: list[str], expected: str) -> None:
    text = describe_source(load_config(argv, {}))
    assert text == expected
    assert "s3cret" not in text


def test_doctests() -> None:
    failures, tried = doctest.testmod(server.config)
    assert tried > 0
    assert failures == 0


def test_with_changes_returns_a_new_config() -> None:
    config = Config()
    changed = config.with_changes(port=1)
    assert (config.port, changed.port) == (8080, 1)


def test_secrets_are_not_in_the_repr() -> None:
    config = load_config(["--api-key", "sk-SECRET-1"], {"LLM_RELAY_REDIS_URL": "redis://:SECRET-2@host:6379/0"})
    assert config.api_key == "sk-SECRET-1"
    assert "SECRET" not in repr(config)


# --- --help ---------------------------------------------------------------------------------------------------------


def help_text(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str],
              env: dict[str, str]) -> str:  # fmt: skip
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal; fix it so nothing depends on it
    assert exits(argv, env).code == 0
    return " ".join(capsys.readouterr().out.split())


def long_options() -> list[str]:
    return [
        option[2:]
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    ]


def test_help_mentions_every_options_env_var(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = help_text(capsys, monkeypatch, ["--help"], {})
    options = long_options()
    assert len(options) >= 30
    for option in options:
        assert f"--{option}" in text
        # README: "Each has an environment variable: LLM_RELAY_ and the option's name".
        assert env_name(option) in text, option
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL"):
        assert name in text


def test_help_never_prints_a_secret(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "OPENAI_API_KEY": "sk-live-SECRET-1",
        "LLM_RELAY_API_KEY": "sk-live-SECRET-2",
        "LLM_RELAY_REDIS_URL": "redis://:SECRET-3@redis:6379/0",
    }
    text = help_text(capsys, monkeypatch, ["--api-key", "sk-live-SECRET-4", "--help"], env)
    assert "SECRET" not in text
    assert text.count("a secret: its value is never shown") == 2  # --api-key and --redis-url


def test_help_shows_defaults(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    text = help_text(capsys, monkeypatch, ["--help"], {})
    assert "default 8080" in text
    assert "default 127.0.0.1" in text


def test_help_says_the_commands_name_and_each_default_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert exits(["--help"], {}).code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llm-relay ")
    text = " ".join(out.split())
    # Each option's entry runs from its name to the next option's: one default at most, never an empty "()" or
    # "None", booleans as the words the options take.
    entries = re.split(r" (?=--[a-z])", text.partition("options:")[2])
    assert len(entries) > 30
    for entry in entries:
        assert entry.count("default") <= 1, entry
        assert "()" not in entry
        assert "None" not in entry
        assert "True" not in entry
        assert "False" not in entry
    assert "--include-usage true|false" in text
    assert "default true]" in text
    assert "default false]" in text
    # An option whose text names its default says it once, not a second time in brackets.
    (model,) = [entry for entry in entries if entry.startswith("--model ")]
    assert model.count("default") == 1


@pytest.mark.parametrize(
    ("value", "shown"),
    [(True, "true"), (False, "false"), (0.03, "0.03"), (10.0, "10"), (0, "0"), ("2/s", "2/s"), ((), None),
     (None, None), ("", None)],
)  # fmt: skip
def test_shown_default(value: object, shown: str | None) -> None:
    assert shown_default(value) == shown


def test_float_options_are_finite_by_default() -> None:
    config = load_config([], {})
    for name in ("demo_delay", "first_token_timeout", "idle_timeout", "total_timeout", "write_timeout", "heartbeat",
                 "request_head_timeout", "request_body_timeout"):  # fmt: skip
        assert math.isfinite(getattr(config, name))


@pytest.mark.parametrize("option", ["log-max-events", "log-max-bytes"])
def test_a_log_bound_of_zero_is_refused(option: str) -> None:
    # A log that keeps nothing would answer every new stream with resume_unavailable.
    assert exits([f"--{option}", "0"]).code == 2
    assert load_config([f"--{option}", "1"]).log_max_events >= 1
