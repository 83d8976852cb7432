"""Credentials out of everything the operator writes: status, Events and log lines (RELIABILITY O10, O17).

The operator repeats text it does not control: a trainer's summary quoting an exception that
echoes a signed URL, an API server error quoting a spec, a user's URI. `redact` removes what
looks like a credential from such text, and `RedactingFilter` applies it to every log record. A
log record is also what kopf posts as an Event when a handler fails (its `kopf.objects` logger
feeds `K8sPoster`, a logging handler), so one filter covers both; `kopf.event/info/warn` calls
bypass logging and must be given redacted text (`reconcile._message` does that).

The patterns prefer removing too much to too little: `https://host:8080/a@b` loses its host,
but a secret that contains `/` (AWS's own example key does) never survives as half a path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

MASK = "***"

# Order matters: whole blocks first (a PEM key spans words), then URL userinfo (its secret may
# contain `/`, `+`, `=` or a key id), then key=value forms and free-standing tokens.
_PRIVATE_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----(?:.*?-----END \1PRIVATE KEY-----|[^\"']*)", re.DOTALL
)
# scheme://USER[:PASSWORD]@ — the user has no `/`, `:`, `@`; the password may hold anything but
# blanks and `@` (`s3://AKIA…:wJalr/K7MDENG/bPx…@bucket`). `hf://org/name@rev` has a `/` before
# its `@` and no `:`, so it stays.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{0,31}://)[^\s/?#@:]{1,1024}(?::[^\s@]{0,4096})?@")
_SIGNED_QUERY = re.compile(
    r"(?i)([?&;](?:x-amz-[a-z-]+|x-goog-[a-z-]+|signature|awsaccesskeyid|sig|token|access_token|"
    r"api_key|apikey|key|client_secret|password|credential)=)[^&\s'\"#]*"
)
_KEY_VALUE = re.compile(
    r"(?i)\b(aws_secret_access_key|aws_session_token|secret_access_key|secret_key|session_token|"
    r"client_secret|private_key_id|private_key|password|passwd|api_key|apikey|access_token|"
    r"refresh_token|auth_token|id_token)([\"']?\s*[=:]\s*[\"']?)[^\s\"',;&}]+"
)
_AUTHORIZATION = re.compile(r"(?i)\b(authorization[\"']?\s*[=:]\s*[\"']?(?:bearer|basic|token)\s+)[^\s\"',;]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_TOKENS = re.compile(
    r"\b(?:(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|hf_[A-Za-z0-9]{20,}"  # Hugging Face tokens
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub tokens
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
    r"|ya29\.[0-9A-Za-z_-]{20,}"  # Google OAuth access tokens
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"  # JWTs (service account tokens)
    r")"
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without the given secret values nor anything that looks like a credential."""
    if not isinstance(text, str):
        text = str(text)
    for secret in sorted({s for s in secrets if isinstance(s, str) and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _PRIVATE_KEY.sub(MASK, text)
    text = _URL_USERINFO.sub(rf"\1{MASK}@", text)
    text = _SIGNED_QUERY.sub(rf"\1{MASK}", text)
    text = _KEY_VALUE.sub(rf"\1\2{MASK}", text)
    text = _AUTHORIZATION.sub(rf"\1{MASK}", text)
    text = _BEARER.sub(rf"\1{MASK}", text)
    return _TOKENS.sub(MASK, text)


class RedactingFilter(logging.Filter):
    """Rewrites a record in place: its message (args merged in), traceback and stack redacted.

    In place, because every handler after this filter (the console, kopf's Event poster) then
    sees the same clean record. The traceback is formatted here and `exc_info` dropped, since a
    formatter (python-json-logger's) would otherwise format the raw exception again."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError, KeyError):  # a bad format string: keep what there is
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), ()
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


OBJECT_LOGGER = "kopf.objects"
"""kopf's per-object logger: what handlers log and what kopf posts as Events goes through it."""


def install(loggers: Iterable[str] = (OBJECT_LOGGER, "kopf", "kubetune")) -> RedactingFilter:
    """Put one `RedactingFilter` on `loggers` and on every handler of them and of the root
    logger (idempotent). A logger's filter sees only records logged on that very logger, a
    handler's sees every record that reaches it: both are needed. Call it after logging is
    configured (handlers added later are not covered)."""
    found = next((f for f in logging.getLogger(OBJECT_LOGGER).filters if isinstance(f, RedactingFilter)), None)
    filt = found or RedactingFilter()
    targets: list[logging.Filterer] = []
    for name in (*loggers, ""):
        logger = logging.getLogger(name)
        targets.append(logger)
        targets.extend(logger.handlers)
    for target in targets:
        if not any(isinstance(f, RedactingFilter) for f in target.filters):
            target.addFilter(filt)
    return filt
