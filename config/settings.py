"""Every paystream setting, read from the environment (prefix ``PAYSTREAM_``).

The defaults describe the embedded development stack that ``paystream dev`` and
``make run`` start: a Tansu broker, embedded PostgreSQL and Redis, and PSP sandboxes.
A value of ``embedded`` for the broker, PostgreSQL or Redis means "start one for me";
any other value points at a real service and the dev stack leaves that part alone.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED = "embedded"


class PspEndpoint(BaseModel):
    """Where one PSP is and how to authenticate to it."""

    name: str
    url: str
    api_key: str
    webhook_secret: str


class Settings(BaseSettings):
    """Settings for workers, the CLI and the dev stack."""

    model_config = SettingsConfigDict(env_prefix="PAYSTREAM_", extra="ignore")

    # --- infrastructure -----------------------------------------------------------
    kafka_bootstrap_servers: str = Field(
        EMBEDDED, description="Kafka bootstrap servers (host:port,...) or 'embedded'."
    )
    kafka_security_protocol: str = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    kafka_sasl_mechanism: str | None = Field(None, description="PLAIN, SCRAM-SHA-256, ...")
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password.")
    kafka_ssl_cafile: str | None = Field(None, description="CA bundle for Kafka TLS.")
    pg_dsn: str = Field(EMBEDDED, description="PostgreSQL DSN (sslmode=... for TLS) or 'embedded'.")
    redis_url: str = Field(EMBEDDED, description="Redis URL (rediss:// for TLS) or 'embedded'.")
    web_port: int = Field(8000, description="Worker HTTP port: status view, metrics, health.")
    web_host: str = Field("127.0.0.1", description="Interface the worker's HTTP port binds.")

    # --- embedded stack -----------------------------------------------------------
    data_dir: Path = Field(Path(".paystream"), description="Embedded stack data and logs.")
    embedded_kafka_port: int = Field(19092, description="Port of the embedded Tansu broker.")
    embedded_redis_port: int = Field(16379, description="Port of the embedded Redis.")

    # --- Faust ----------------------------------------------------------------------
    app_id: str = Field("paystream", description="Faust app id (consumer group prefix).")
    partitions: int = Field(4, description="Partitions of every payment topic.")
    replication_factor: int = Field(1, description="Replication of created topics.")
    broker_session_timeout: float = Field(4.0, description="Seconds; short for dev brokers.")
    broker_rebalance_timeout: float = Field(4.0, description="Seconds; Tansu joins after ~half.")
    broker_heartbeat_interval: float = Field(1.0, description="Seconds between heartbeats.")
    batch_max: int = Field(500, description="Max events per agent batch (stream.take).")
    batch_within: float = Field(0.05, description="Seconds to wait filling a batch.")

    # --- PSPs ---------------------------------------------------------------------------
    psp_alpha_url: str = Field("http://127.0.0.1:18081", description="Base URL of PSP alpha.")
    psp_alpha_api_key: SecretStr = Field(
        SecretStr("sk_test_alpha"), description="API key for PSP alpha (sandbox default)."
    )
    psp_alpha_webhook_secret: SecretStr = Field(
        SecretStr("whsec_alpha"), description="Signing secret of PSP alpha's webhooks."
    )
    psp_beta_url: str = Field("http://127.0.0.1:18082", description="Base URL of PSP beta.")
    psp_beta_api_key: SecretStr = Field(
        SecretStr("sk_test_beta"), description="API key for PSP beta (sandbox default)."
    )
    psp_beta_webhook_secret: SecretStr = Field(
        SecretStr("whsec_beta"), description="Signing secret of PSP beta's webhooks."
    )
    psp_timeout_seconds: float = Field(5.0, description="PSP HTTP timeout; after it, UNKNOWN.")
    verify_delays_seconds: list[float] = Field(
        [1.0, 10.0, 60.0],
        description="Delay tiers (topics payments.verify.tierN) for looking up unknown PSP "
        "outcomes; JSON list.",
        min_length=1,
    )
    verify_max_lookups: int = Field(
        5,
        description="PSP lookups of an unknown outcome before the resolver stops asking "
        "(a DLQ record for an operator; the payment stays pending_verification).",
    )
    stuck_after_seconds: float = Field(
        300.0,
        description="A payment pending verification longer than this is stuck: counted in "
        "paystream_payments_stuck, listed by 'paystream status --stuck', re-verified.",
        gt=0,
    )
    stuck_sweep_interval_seconds: float = Field(
        60.0, description="How often each worker re-verifies its stuck payments.", gt=0
    )
    psp_breaker_failures: int = Field(
        5, description="Consecutive failures that open a PSP's circuit breaker."
    )
    psp_breaker_open_seconds: float = Field(
        5.0, description="Seconds a breaker stays open before a half-open trial."
    )
    psp_max_in_flight: int = Field(256, description="Open connections to each PSP per worker.")
    psp_slot_wait_seconds: float = Field(
        1.0,
        description="How long a PSP call waits for a free concurrency slot before the next "
        "PSP is tried (a burst waits briefly instead of being parked in a retry tier).",
        ge=0,
    )
    psp_webhook_tolerance_seconds: int = Field(
        300, description="Accepted age (either direction) of a PSP webhook's signed timestamp."
    )
    psp_webhook_dedupe_seconds: int = Field(
        7 * 24 * 3600, description="How long ingress remembers a PSP webhook event id."
    )
    notification_max_attempts: int = Field(
        5, description="Retries of a PSP notification for an unknown payment before its DLQ."
    )

    # --- delivery guarantees --------------------------------------------------------------
    idempotency_retention_seconds: int = Field(
        24 * 3600,
        description="How long a merchant's idempotency key stays bound to its payment "
        "(Stripe: at least 24 h).",
        ge=1,
    )
    retry_delays_seconds: list[float] = Field(
        [1.0, 10.0, 60.0, 600.0],
        description="Retry tiers (topics payments.retry.tierN) for transient failures; the "
        "wait is full jitter up to the tier's delay; JSON list.",
        min_length=1,
    )
    retry_max_attempts: int = Field(
        4, description="Transient-failure retries of a command before payment.failed + DLQ."
    )
    authorization_validity_seconds: int = Field(
        7 * 24 * 3600,
        description="Authorizations not captured within this are voided and the hold released.",
        ge=1,
    )
    expiry_sweep_interval_seconds: float = Field(
        60.0, description="How often each worker looks for expired authorizations."
    )

    # --- merchant webhooks ----------------------------------------------------------------
    webhook_retry_schedule_seconds: list[float] = Field(
        [60.0, 300.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0, 86400.0, 86400.0],
        description="Waits between merchant webhook attempts (about 3 days in all), then "
        "the DLQ; JSON list.",
    )
    webhook_timeout_seconds: float = Field(10.0, description="Merchant webhook HTTP timeout.")
    webhook_max_in_flight_per_endpoint: int = Field(
        4, description="Concurrent deliveries to one merchant endpoint."
    )
    webhook_dispatch_interval_seconds: float = Field(
        0.5, description="How often the dispatcher looks for due webhook deliveries."
    )

    # --- observability --------------------------------------------------------------------
    lag_poll_interval_seconds: float = Field(
        5.0, description="How often a worker measures consumer lag for /metrics."
    )
    psp_sandbox_embedded: bool = Field(True, description="dev stack starts the PSP sandbox.")
    psp_sandbox_latency_ms: float = Field(5.0, description="Sandbox's added latency (mean).")

    # --- money --------------------------------------------------------------------------
    fee_bps: int = Field(290, description="Default merchant fee, basis points of the amount.")
    fee_fixed_minor: int = Field(
        30,
        description="Default fixed fee per capture, in US cents; other currencies use their "
        "own default (agents/fees.py: ¥30, 0.100 KWD, ...) unless the merchant has terms "
        "in merchant_fees.",
    )
    fee_refresh_seconds: float = Field(
        30.0, description="How often workers reload the merchants' fee terms.", gt=0
    )

    def psp_endpoints(self) -> list[PspEndpoint]:
        """The configured PSPs, in the fallback order."""
        return [
            PspEndpoint(
                name="alpha",
                url=self.psp_alpha_url,
                api_key=self.psp_alpha_api_key.get_secret_value(),
                webhook_secret=self.psp_alpha_webhook_secret.get_secret_value(),
            ),
            PspEndpoint(
                name="beta",
                url=self.psp_beta_url,
                api_key=self.psp_beta_api_key.get_secret_value(),
                webhook_secret=self.psp_beta_webhook_secret.get_secret_value(),
            ),
        ]

    def with_local_broker(self) -> Settings:
        """These settings, with an ``embedded`` broker replaced by its local address (for
        CLI tools talking to a running ``paystream dev`` stack)."""
        if self.kafka_bootstrap_servers != EMBEDDED:
            return self
        return self.model_copy(
            update={"kafka_bootstrap_servers": f"127.0.0.1:{self.embedded_kafka_port}"}
        )

    def require_real(self) -> None:
        """Fail clearly when a worker is started without concrete service addresses."""
        missing = [
            name
            for name, value in (
                ("PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS", self.kafka_bootstrap_servers),
                ("PAYSTREAM_PG_DSN", self.pg_dsn),
                ("PAYSTREAM_REDIS_URL", self.redis_url),
            )
            if value == EMBEDDED
        ]
        if missing:
            raise RuntimeError(
                f"{', '.join(missing)} still 'embedded': start the worker through "
                "'paystream dev' or point the setting at a running service"
            )


def settings_table() -> str:
    """The settings as a markdown table (variable, default, meaning) for the README."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "(sandbox secret)" if isinstance(default, SecretStr) else str(default)
        rows.append(f"| `PAYSTREAM_{name.upper()}` | `{shown}` | {field.description or ''} |")
    return "\n".join(rows)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()
