"""The data plane's settings: settings.GATEWAY, read once at start into a frozen object."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    ops_port: int
    config_poll_interval: float
    log_buffer_size: int
    log_batch_size: int
    log_flush_interval: float
    log_spool_dir: str
    log_stream: str
    log_stream_maxlen: int
    counter_flush_interval: float
    upstream_connect_timeout: float
    upstream_read_timeout: float
    upstream_pool_size: int
    redis_timeout: float
    redis_url: str
    key_hmac_secret: bytes
    max_body_bytes: int = 0
    trusted_proxies: tuple[str, ...] = ()
    real_ip_header: str = "x-forwarded-for"
    cache_memory_bytes: int = 64 << 20
    config_cache_dir: str = ""  # "": no on-disk config cache
    snapshot_build_delay: float = 0.0  # testing aid (settings.GATEWAY["SNAPSHOT_BUILD_DELAY"])


def load_settings() -> GatewaySettings:
    from django.conf import settings

    g = settings.GATEWAY
    try:
        ops_port = int(g["OPS_BIND"].rsplit(":", 1)[1])
    except (IndexError, ValueError):
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(
            f"GATEWAY_OPS_BIND must be host:port, got {g['OPS_BIND']!r}"
        ) from None
    return GatewaySettings(
        ops_port=ops_port,
        config_poll_interval=g["CONFIG_POLL_INTERVAL"],
        log_buffer_size=g["LOG_BUFFER_SIZE"],
        log_batch_size=g["LOG_BATCH_SIZE"],
        log_flush_interval=g["LOG_FLUSH_INTERVAL"],
        log_spool_dir=g["LOG_SPOOL_DIR"],
        log_stream=g["LOG_STREAM"],
        log_stream_maxlen=g["LOG_STREAM_MAXLEN"],
        counter_flush_interval=g["COUNTER_FLUSH_INTERVAL"],
        upstream_connect_timeout=g["UPSTREAM_CONNECT_TIMEOUT"],
        upstream_read_timeout=g["UPSTREAM_READ_TIMEOUT"],
        upstream_pool_size=g["UPSTREAM_POOL_SIZE"],
        redis_timeout=g["REDIS_TIMEOUT"],
        redis_url=settings.REDIS_URL,
        key_hmac_secret=settings.API_KEY_HMAC_SECRET.encode(),
        max_body_bytes=g["MAX_BODY_BYTES"],
        trusted_proxies=g["TRUSTED_PROXIES"],
        real_ip_header=g["REAL_IP_HEADER"],
        cache_memory_bytes=g["CACHE_MEMORY_BYTES"],
        config_cache_dir=g["CONFIG_CACHE_DIR"],
        snapshot_build_delay=g["SNAPSHOT_BUILD_DELAY"],
    )
