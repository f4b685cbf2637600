"""Settings: one source, the environment. Nothing set -> everything embedded on one machine.

Variables (all optional):
  DATABASE_URL       postgres://user:pass@host:5432/db   (default: SQLite in var/)
  REDIS_URL          redis://host:6379/0                 (default: in-process counters)
  CELERY_BROKER_URL  amqp://… or redis://…               (default: REDIS_URL, else filesystem://)
  SECRET_KEY         (default: generated once into var/secret_key)
  API_KEY_HMAC_SECRET  keyed hash for API keys (default: derived from SECRET_KEY)
  DEBUG, ALLOWED_HOSTS, CSRF_TRUSTED_ORIGINS, VAR_DIR, EMAIL_URL-less SMTP: EMAIL_HOST…,
  GATEWAY_* (see the GATEWAY dict below).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from config.env import (
    check_url,
    env_bool,
    env_choice,
    env_cidrs,
    env_float,
    env_int,
    env_list,
    env_str,
    parse_database_url,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("VAR_DIR", str(BASE_DIR / "var"))).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)


def _secret_key() -> str:
    """SECRET_KEY from the environment, else from an untracked file made on first run."""
    if key := env_str("SECRET_KEY"):
        return key
    path = VAR_DIR / "secret_key"
    if not path.exists():
        # O_EXCL: two processes starting together must not write two different keys.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(50))
    for _ in range(50):
        key = path.read_text().strip()
        if key:
            return key
        import time

        time.sleep(0.01)
    raise RuntimeError(f"{path} is empty")


SECRET_KEY = _secret_key()
# API keys are stored as HMAC-SHA256(API_KEY_HMAC_SECRET, key). Changing it invalidates keys.
API_KEY_HMAC_SECRET = (
    env_str("API_KEY_HMAC_SECRET")
    or hmac.new(SECRET_KEY.encode(), b"api-key-hmac", hashlib.sha256).hexdigest()
)

DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
PORTAL_URL = env_str("PORTAL_URL", "http://127.0.0.1:8000")
GATEWAY_PUBLIC_URL = env_str("GATEWAY_PUBLIC_URL", "http://127.0.0.1:8080")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "allauth",
    "allauth.account",
    "allauth.mfa",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "portal",
    "gateway",
    "analytics",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "django_ratelimit.middleware.RatelimitMiddleware",  # turns Ratelimited into RATELIMIT_VIEW
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    _db = parse_database_url("DATABASE_URL", DATABASE_URL)
    DATABASES = {
        "default": {
            "ENGINE": _db.engine,
            "NAME": _db.name,
            "USER": _db.user,
            "PASSWORD": _db.password,
            "HOST": _db.host,
            "PORT": _db.port,
            "OPTIONS": _db.options or {},
            "CONN_MAX_AGE": env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0),
            "CONN_HEALTH_CHECKS": True,
        }
    }
else:
    _db = None
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "db.sqlite3",
            # Kept open as on PostgreSQL: a new SQLite connection (open, WAL pragma, Django's
            # functions) holds the GIL for milliseconds, and the gateway's database thread
            # polls the config twice a second (each one showed as a stall of the event loop).
            "CONN_MAX_AGE": env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0),
        }
    }
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Several processes (portal, gateway, Celery) share one file: WAL lets readers run beside
    # the writer, IMMEDIATE takes the write lock up front so that a transaction never fails
    # half-way with "database is locked", and the timeout waits for the lock instead.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
    # A file, not :memory:, so that the gateway and Celery processes started by the
    # end-to-end tests see the test database.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test_db.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis and Celery -----------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    check_url("REDIS_URL", REDIS_URL, {"redis", "rediss", "unix"})

CELERY_BROKER_URL = env_str("CELERY_BROKER_URL") or REDIS_URL or "filesystem://"
check_url(
    "CELERY_BROKER_URL",
    CELERY_BROKER_URL,
    {"filesystem", "redis", "rediss", "amqp", "amqps", "pyamqp"},
)
if CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT = "config.fsbroker:Transport"  # atomic message files
    _broker_dir = VAR_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "store_processed": False,
        "control_folder": str(_broker_dir / "control"),
        # kombu's default is 1 s; a directory listing four times a second costs nothing and
        # a beat tick no longer waits most of a second to be picked up.
        "polling_interval": 0.25,
    }
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# --- The gateway data plane's own settings, read once at start (gateway/dataplane/settings.py).
GATEWAY = {
    # How often each worker checks the config version (seconds). Bounds how long a revoked
    # key keeps working.
    # The operations listener (/metrics, /healthz, /readyz); keep it off public interfaces.
    "OPS_BIND": env_str("GATEWAY_OPS_BIND", "127.0.0.1:9080"),
    "CONFIG_POLL_INTERVAL": env_float("GATEWAY_CONFIG_POLL_INTERVAL", 0.5, minimum=0.05),
    "LOG_BUFFER_SIZE": env_int("GATEWAY_LOG_BUFFER_SIZE", 50_000, minimum=100),
    "LOG_BATCH_SIZE": env_int("GATEWAY_LOG_BATCH_SIZE", 1_000, minimum=1),
    "LOG_FLUSH_INTERVAL": env_float("GATEWAY_LOG_FLUSH_INTERVAL", 1.0, minimum=0.05),
    "LOG_SPOOL_DIR": str(VAR_DIR / "spool"),
    "LOG_STREAM": "gateway:events",
    # Entries (batches of up to LOG_BATCH_SIZE events) kept in the stream if ingest stops:
    # past it the oldest are trimmed, so a long Celery outage cannot exhaust Redis memory.
    # Unconsumed batches the stream may hold; beyond it gateways keep (then drop and count)
    # events instead of adding: nothing is trimmed unread (gateway/dataplane/logship.py).
    "LOG_STREAM_MAXLEN": env_int("GATEWAY_LOG_STREAM_MAXLEN", 100_000, minimum=100),
    "COUNTER_FLUSH_INTERVAL": 1.0,
    "UPSTREAM_CONNECT_TIMEOUT": env_float("GATEWAY_UPSTREAM_CONNECT_TIMEOUT", 5.0, minimum=0.01),
    "UPSTREAM_READ_TIMEOUT": env_float("GATEWAY_UPSTREAM_READ_TIMEOUT", 60.0, minimum=0.01),
    "UPSTREAM_POOL_SIZE": env_int("GATEWAY_UPSTREAM_POOL_SIZE", 1000, minimum=1),
    "REDIS_TIMEOUT": env_float("GATEWAY_REDIS_TIMEOUT", 0.25, minimum=0.01),
    # Request head limits (431 / 414 beyond them, before anything is buffered further).
    "MAX_HEADER_BYTES": env_int("GATEWAY_MAX_HEADER_BYTES", 32 * 1024, minimum=1024),
    "MAX_URL_BYTES": env_int("GATEWAY_MAX_URL_BYTES", 8 * 1024, minimum=256),
    # Seconds a client has to send a whole request head (408 after it; slowloris).
    "HEADER_TIMEOUT": env_float("GATEWAY_HEADER_TIMEOUT", 10.0, minimum=0.1),
    # Seconds a client may send nothing of a request body it is uploading (between two reads,
    # like nginx's client_body_timeout): 408 after it, never held against the upstream.
    "CLIENT_BODY_TIMEOUT": env_float("GATEWAY_CLIENT_BODY_TIMEOUT", 60.0, minimum=0.1),
    # Largest request body a route accepts unless it sets its own (413 beyond; 0: no limit).
    "MAX_BODY_BYTES": env_int("GATEWAY_MAX_BODY_BYTES", 64 * 1024 * 1024, minimum=0),
    # Peers whose X-Forwarded-For/-Proto/-Host and Forwarded headers are believed (CIDRs,
    # comma-separated), e.g. the load balancer in front of the gateway. Empty: nobody's.
    "TRUSTED_PROXIES": env_cidrs("GATEWAY_TRUSTED_PROXIES"),
    # Which header those proxies name the client in (nginx's and Kong's real_ip_header):
    # x-forwarded-for, or forwarded (RFC 7239 for=). Only that one is read: a client could
    # send the other, and the proxy would pass it on untouched.
    "REAL_IP_HEADER": env_choice(
        "GATEWAY_REAL_IP_HEADER", "x-forwarded-for", ("x-forwarded-for", "forwarded")
    ),
    # Response cache of the embedded default, per worker (an LRU by bytes); with REDIS_URL
    # the cache is in Redis and this is unused.
    "CACHE_MEMORY_BYTES": env_int("GATEWAY_CACHE_MEMORY_BYTES", 64 * 1024 * 1024, minimum=0),
    # The on-disk cache of the last good configuration, served by a worker that starts while
    # the database cannot be read (README: configuration snapshots); empty: no cache.
    "CONFIG_CACHE_DIR": env_str("GATEWAY_CONFIG_CACHE_DIR", str(VAR_DIR / "gateway")),
    # Testing aid, off by default: seconds a rebuild sleeps after its reads (a slow database
    # made deterministic, to show key deltas are applied while a rebuild runs).
    "SNAPSHOT_BUILD_DELAY": env_float("GATEWAY_SNAPSHOT_BUILD_DELAY", 0.0, minimum=0.0),
}

# --- Analytics ----------------------------------------------------------------------------
ANALYTICS = {
    # How often beat asks a worker to ingest what the gateways shipped: the delay before a
    # request shows on the portal's charts.
    "INGEST_INTERVAL_SECONDS": env_float("ANALYTICS_INGEST_INTERVAL_SECONDS", 2.0, minimum=0.1),
    # Stream entries delivered to an ingest worker that died unacknowledged are taken over by
    # another after this long.
    "CLAIM_IDLE_SECONDS": env_int("ANALYTICS_CLAIM_IDLE_SECONDS", 60, minimum=1),
    # Raw events are pruned after this many days; rollups stay.
    "RAW_RETENTION_DAYS": env_int("ANALYTICS_RAW_RETENTION_DAYS", 30, minimum=1),
    # Minute rollups are the largest; hour and day rollups are kept.
    "MINUTE_ROLLUP_RETENTION_DAYS": env_int(
        "ANALYTICS_MINUTE_ROLLUP_RETENTION_DAYS", 14, minimum=1
    ),
    "PRUNE_BATCH": env_int("ANALYTICS_PRUNE_BATCH", 5_000, minimum=100),
}

# --- Accounts (django-allauth) ----------------------------------------------------------
AUTH_USER_MODEL = "portal.User"
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "password1*", "password2*"]
ACCOUNT_EMAIL_VERIFICATION = "mandatory"
ACCOUNT_UNIQUE_EMAIL = True
ACCOUNT_LOGIN_ON_EMAIL_CONFIRMATION = True
ACCOUNT_CONFIRM_EMAIL_ON_GET = False
ACCOUNT_LOGOUT_ON_PASSWORD_CHANGE = False
ACCOUNT_PREVENT_ENUMERATION = True
# Optional second factor: an authenticator app (TOTP, RFC 6238) and recovery codes; each user
# turns it on under Account → Two-factor authentication (/accounts/2fa/).
MFA_SUPPORTED_TYPES = ["totp", "recovery_codes"]
MFA_TOTP_ISSUER = "API Portal"
LOGIN_REDIRECT_URL = "portal:dashboard"
LOGIN_URL = "account_login"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": 12},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

EMAIL_HOST = env_str("EMAIL_HOST")
if EMAIL_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_PORT = env_int("EMAIL_PORT", 587)
    EMAIL_HOST_USER = env_str("EMAIL_HOST_USER")
    EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD")
    EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
else:
    # Verification and reset links are printed by the portal process (visible in `make run`).
    EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "portal@localhost")

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]

# The management REST API (/api/v1/; README, "Management REST API").
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "portal.rest_auth.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAdminUser"],
    "DEFAULT_PAGINATION_CLASS": "gateway.rest_defaults.Pagination",
    "DEFAULT_FILTER_BACKENDS": [
        "gateway.rest_defaults.FilterBackend",
        "gateway.rest_defaults.StrictOrderingFilter",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "gateway.restkit.problem_exception_handler",
    "DEFAULT_THROTTLE_RATES": {"keys": env_str("API_KEY_CREATE_RATE", "60/hour")},
}
SPECTACULAR_SETTINGS = {
    "TITLE": "API gateway management API",
    "DESCRIPTION": "APIs, routes, upstreams, plans, consumers, keys, subscriptions, cache "
    "purges and analytics. Authenticate with `Authorization: Bearer gwt_…` (an API token "
    "made in admin). Errors are application/problem+json.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "/" + STATIC_URL + "vendor/swagger-ui",
    "SWAGGER_UI_FAVICON_HREF": "/" + STATIC_URL + "vendor/swagger-ui/favicon-32x32.png",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {},
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "gateway.rest_schema.add_problems_and_etags",
    ],
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}

# --- Cache (django-ratelimit counters for the portal's own throttles) -----------------------
if REDIS_URL:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    }
else:
    # The embedded portal runs as one gunicorn process with threads, so a process-local
    # cache is the shared cache; django-ratelimit cannot know that.
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    SILENCED_SYSTEM_CHECKS = ["django_ratelimit.E003"]
SILENCED_SYSTEM_CHECKS = [*globals().get("SILENCED_SYSTEM_CHECKS", []), "django_ratelimit.W001"]
RATELIMIT_VIEW = "portal.views.ratelimited"
