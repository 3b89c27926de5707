"""Settings: plain URLs accepted, drivers picked, unknown PCQ_ variables refused."""

from __future__ import annotations

import pytest

from pcq.settings import SettingsError, load_settings


def test_defaults_are_embedded_sqlite_and_the_public_upstream() -> None:
    s = load_settings({})
    assert s.database_url == "sqlite:///pcq.sqlite3"
    assert s.parallel_base_url == "https://api.parallel.ai"
    assert s.rate_limit_per_minute == 300
    assert s.embedded
    assert s.effective_broker_url.startswith("sqla+sqlite:///")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://user@host/db", "postgresql+psycopg://user@host/db"),
        ("postgres://user:pw@host:5433/db", "postgresql+psycopg://user:pw@host:5433/db"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
        ("sqlite:///data/pcq.db", "sqlite:///data/pcq.db"),
    ],
)
def test_database_url_accepts_plain_forms(given: str, expected: str) -> None:
    assert load_settings({"DATABASE_URL": given}).database_url == expected


def test_unsupported_database_url_is_an_error() -> None:
    with pytest.raises(ValueError, match="DATABASE_URL"):
        load_settings({"DATABASE_URL": "mysql://u@h/d"})


def test_unknown_pcq_variable_is_an_error_not_ignored() -> None:
    with pytest.raises(SettingsError, match="PCQ_RATE_LIMT_PER_MINUTE"):
        load_settings({"PCQ_RATE_LIMT_PER_MINUTE": "10"})


def test_other_environment_variables_are_ignored() -> None:
    assert load_settings({"HOME": "/root", "PATH": "/bin"}).max_attempts == 5


def test_redis_url_switches_broker_to_redis() -> None:
    s = load_settings({"REDIS_URL": "redis://127.0.0.1:6379/3"})
    assert s.effective_broker_url == "redis://127.0.0.1:6379/3"
    assert not s.embedded


def test_secrets_are_not_shown_in_repr() -> None:
    s = load_settings({"PARALLEL_API_KEY": "sk-very-secret"})
    assert "sk-very-secret" not in repr(s)
    assert s.parallel_api_key is not None
    assert s.parallel_api_key.get_secret_value() == "sk-very-secret"


def test_visibility_timeout_must_exceed_the_call_deadline() -> None:
    with pytest.raises(ValueError, match="VISIBILITY_TIMEOUT"):
        load_settings({"PCQ_TOTAL_TIMEOUT_SECONDS": "4000", "PCQ_VISIBILITY_TIMEOUT_SECONDS": "3600"})


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="rate_limit_per_minute|PCQ_RATE_LIMIT_PER_MINUTE"):
        load_settings({"PCQ_RATE_LIMIT_PER_MINUTE": "0"})


def test_upstream_keys_pool_with_per_key_overrides() -> None:
    s = load_settings(
        {
            "PARALLEL_API_KEY": "sk-main",
            "PCQ_RATE_LIMIT_PER_MINUTE": "300",
            "PCQ_MAX_IN_FLIGHT_PER_KEY": "100",
            "PCQ_UPSTREAM_KEYS": '[{"key":"sk-big","rate_limit_per_minute":1200,"max_in_flight":0},'
            '{"key":"sk-small","rate_limit_burst":1}]',
        }
    )
    pool = s.key_pool()
    assert [(k.key, k.rate_limit_per_minute, k.rate_limit_burst, k.max_in_flight) for k in pool] == [
        ("sk-main", 300, 5, 100),
        ("sk-big", 1200, 5, 0),
        ("sk-small", 300, 1, 100),
    ]
    assert len({k.id for k in pool}) == 3
    assert all("sk-" not in repr(k) for k in pool)
    assert "sk-big" not in repr(s)


def test_upstream_keys_as_a_plain_list() -> None:
    pool = load_settings({"PCQ_UPSTREAM_KEYS": " sk-a , sk-b,"}).key_pool()
    assert [k.key for k in pool] == ["sk-a", "sk-b"]
    assert load_settings({}).key_pool()[0].key == ""  # no key: the local stand-in needs none


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('[{"key":"sk-secret-1","rate_limit_per_minute":0}]', "rate_limit_per_minute"),
        ('[{"key":"sk-secret-1","colour":"red"}]', "colour"),
        ('[{"key":"sk-secret-1"', "not valid JSON"),
        ("sk-secret-1,sk-secret-1", "configured twice"),
    ],
)
def test_bad_upstream_keys_are_refused_without_echoing_them(value: str, problem: str) -> None:
    with pytest.raises(SettingsError, match=problem) as info:
        load_settings({"PCQ_UPSTREAM_KEYS": value})
    assert "sk-secret-1" not in str(info.value)


def test_only_the_documented_names_are_read() -> None:
    # Not the bare field names (a stray LOG_LEVEL or API_KEY), nor a prefixed DATABASE_URL.
    s = load_settings({"LOG_LEVEL": "DEBUG", "API_KEY": "x", "QUEUE_NAME": "q", "PCQ_LOG_LEVEL": "WARNING"})
    assert (s.log_level, s.api_key, s.queue_name) == ("WARNING", None, "pcq")
    with pytest.raises(SettingsError, match="PCQ_DATABASE_URL"):
        load_settings({"PCQ_DATABASE_URL": "sqlite:///x.db"})


def test_errors_name_the_variable_without_echoing_the_value() -> None:
    with pytest.raises(SettingsError, match="PCQ_MAX_ATTEMPTS") as info:
        load_settings({"PCQ_MAX_ATTEMPTS": "sk-secret-value"})
    assert "sk-secret-value" not in str(info.value)


def test_overrides_are_by_field_name() -> None:
    assert load_settings({"PCQ_MAX_ATTEMPTS": "3"}, max_attempts=7).max_attempts == 7


def test_the_webhook_ssrf_guard_is_on_unless_turned_off() -> None:
    assert load_settings({}).webhook_allow_private is False
    assert load_settings({"PCQ_WEBHOOK_ALLOW_PRIVATE": "true"}).webhook_allow_private is True
    with pytest.raises(SettingsError, match="webhook_allow_private|PCQ_WEBHOOK_ALLOW_PRIVATE"):
        load_settings({"PCQ_WEBHOOK_ALLOW_PRIVATE": "perhaps"})


def test_webhook_secret_grace_and_delivery_timeout() -> None:
    defaults = load_settings({})
    assert defaults.webhook_secret_grace_seconds == 86400
    assert defaults.webhook_timeout_seconds == 15.0
    custom = load_settings({"PCQ_WEBHOOK_SECRET_GRACE_SECONDS": "0", "PCQ_WEBHOOK_TIMEOUT_SECONDS": "2.5"})
    assert (custom.webhook_secret_grace_seconds, custom.webhook_timeout_seconds) == (0, 2.5)
    for env in ({"PCQ_WEBHOOK_SECRET_GRACE_SECONDS": "-1"}, {"PCQ_WEBHOOK_TIMEOUT_SECONDS": "0"}):
        with pytest.raises(SettingsError):
            load_settings(env)


def test_the_webhook_retry_schedule_is_read_from_comma_separated_seconds() -> None:
    assert load_settings({}).webhook_retry_schedule == [5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400]
    assert load_settings({"PCQ_WEBHOOK_RETRY_SCHEDULE": " 1, 2.5,60 "}).webhook_retry_schedule == [1, 2.5, 60]
    for bad in ("5,x", "10,5", "-1,5"):
        with pytest.raises(SettingsError, match="PCQ_WEBHOOK_RETRY_SCHEDULE"):
            load_settings({"PCQ_WEBHOOK_RETRY_SCHEDULE": bad})
