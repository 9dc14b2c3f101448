"""Credentials never leave the process: every URL or text that cxr logs, prints, records or writes passes `redact`.

Credentials belong in the environment (AWS_*, MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, RAY_AUTH_TOKEN), but users
paste URLs that carry them: `http://user:secret@mlflow:5000`, presigned object URLs
(`?X-Amz-Credential=…&X-Amz-Signature=…`), SAS tokens (`?sig=…`), `?token=…`. Such a URL may be used as given,
in memory; any copy that leaves the process (MLflow params and artifacts, resolved configs, checkpoints, logs,
stdout, error messages) shows `***` in place of each secret. One function does it for all of them.
"""

from __future__ import annotations

import logging
import re

MASK = "***"

# scheme://userinfo@ — the userinfo (user or user:password) goes, the host stays.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#@\s'\"]+)@")
# ?name=value or &name=value where the name says it is a secret (case-insensitive; AWS, GCS, Azure SAS, generic).
_SECRET_PARAMS = (
    "x-amz-credential", "x-amz-signature", "x-amz-security-token", "x-goog-credential", "x-goog-signature",
    "sig", "signature", "token", "access_token", "id_token", "refresh_token", "auth", "apikey",
    "api_key", "key", "password", "passwd", "pwd", "secret", "client_secret", "credential", "awsaccesskeyid",
)
_QUERY = re.compile(r"(?P<lead>[?&;](?:" + "|".join(re.escape(p) for p in _SECRET_PARAMS) + r")=)"
                    r"(?P<value>[^&#\s'\"]*)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the userinfo of every URL and the values of secret-named query parameters masked."""
    if not text or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['lead']}{MASK}" if m["value"] else m[0], text)


class RedactingFilter(logging.Filter):
    """Masks credentials in every record a handler emits, arguments and exception text included."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None:
            shown = logging.Formatter().formatException(record.exc_info)
            if redact(shown) != shown:
                record.exc_text = redact(shown)
                record.exc_info = None
        return True


def install_log_filter(logger: logging.Logger | None = None) -> None:
    """Add the filter to every handler of `logger` (default: the root logger), once each."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
