"""Credentials never reach status, Events or logs, in any form a URI or a message can carry them (O10, O17).

One canary per form: the secret text must be gone and the part a person needs to read (bucket,
path, host) must stay. Then the logging side: kopf posts a record of its `kopf.objects` logger as
an Event through `K8sPoster`, a handler of that logger, so the filter `redaction.install` puts on
that logger must clean the posted Event as well as the log line, tracebacks included.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import kopf
import pytest
from kopf._core.actions import loggers as kopf_loggers
from kopf._core.engines import posting
from kubetune.operator import reconcile, redaction
from kubetune.operator.redaction import RedactingFilter, redact

KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SECRET_PARTS = ("wJalrXUtnFEMI", "K7MDENG", "bPxRfiCYEXAMPLEKEY")
PEM_BODY = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKjCANARYPEM"
SA_JSON = json.dumps(
    {
        "type": "service_account",
        "project_id": "demo-project",
        "private_key_id": "0123456789abcdef0123456789abcdef01234567",
        "private_key": f"-----BEGIN PRIVATE KEY-----\n{PEM_BODY}\nAAAA\n-----END PRIVATE KEY-----\n",
        "client_email": "trainer@demo-project.iam.gserviceaccount.com",
    }
)

# (id, text, secrets that must vanish, readable parts that must stay)
FORMS: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    (
        "userinfo-secret-with-slash",
        f"s3://{KEY_ID}:{SECRET}@bucket/path/model",
        (KEY_ID, *SECRET_PARTS),
        ("s3://", "@bucket/path/model"),
    ),
    (
        "userinfo-secret-with-plus",
        f"s3://{KEY_ID}:abc+CANARY/def=@bucket/path",
        (KEY_ID, "abc+CANARY", "CANARY"),
        ("@bucket/path",),
    ),
    (
        "gs-userinfo-with-slash",
        "upload to gs://user:pa/ssCANARY@b/out failed",
        ("pa/ssCANARY", "ssCANARY", "user:"),
        ("gs://", "@b/out failed"),
    ),
    (
        "https-userinfo",
        "GET https://alice:CANARYpw@data.example.com/train.jsonl: 403",
        ("CANARYpw", "alice"),
        ("@data.example.com/train.jsonl: 403",),
    ),
    ("user-only-token", "s3://TOKENCANARY12345@bucket/path", ("TOKENCANARY12345",), ("@bucket/path",)),
    (
        "hf-token-userinfo",
        "hf://hf_CANARYabcdefghijklmnopqrstuv@org/name",
        ("hf_CANARYabcdefghijklmnopqrstuv",),
        ("@org/name",),
    ),
    (
        "aws-presigned-query",
        (
            f"https://bucket.s3.amazonaws.com/out/a.bin?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={KEY_ID}%2F20250301"
            "&X-Amz-Signature=CANARYdeadbeef0123&X-Amz-Security-Token=FQoGCANARYsession"
        ),
        (KEY_ID, "CANARYdeadbeef0123", "FQoGCANARYsession"),
        ("bucket.s3.amazonaws.com/out/a.bin",),
    ),
    (
        "gcs-signed-query",
        "https://storage.googleapis.com/b/o?X-Goog-Signature=CANARYgoog00&X-Goog-Date=1",
        ("CANARYgoog00",),
        ("storage.googleapis.com/b/o",),
    ),
    (
        "azure-sas",
        "https://acct.blob.core.windows.net/c/o?sv=2021&sig=CANARYsas%2Bx",
        ("CANARYsas",),
        ("acct.blob.core.windows.net/c/o",),
    ),
    (
        "legacy-signed-query",
        "https://b.s3.amazonaws.com/k?AWSAccessKeyId=ID&Signature=CANARYsig&Expires=1",
        ("CANARYsig",),
        ("b.s3.amazonaws.com/k",),
    ),
    ("aws-key-id", f"The AWS Access Key Id you provided ({KEY_ID}) does not exist", (KEY_ID,), ("does not exist",)),
    ("aws-temporary-key-id", "key ASIACANARY0EXAMPLE12 expired", ("ASIACANARY0EXAMPLE12",), ("expired",)),
    ("secret-key-assignment", f"aws_secret_access_key = {SECRET} in profile", SECRET_PARTS, ("in profile",)),
    ("secret-key-env", f"AWS_SECRET_ACCESS_KEY={SECRET}", SECRET_PARTS, ("AWS_SECRET_ACCESS_KEY",)),
    ("secret-key-json", json.dumps({"aws_secret_access_key": SECRET, "bucket": "b"}), SECRET_PARTS, ('"bucket": "b"',)),
    ("session-token", "aws_session_token: FQoGZXIvCANARYtoken", ("FQoGZXIvCANARYtoken",), ()),
    ("password-assignment", "password=CANARYhunter2 user=bob", ("CANARYhunter2",), ("user=bob",)),
    ("bearer", "Authorization: Bearer CANARYtoken.abc.def", ("CANARYtoken",), ("Authorization",)),
    ("basic-auth", "Authorization: Basic dXNlcjpDQU5BUllwdw==", ("dXNlcjpDQU5BUllwdw",), ("Authorization",)),
    (
        "hf-token",
        "401 for hf_CANARYabcdefghijklmnopqrstuvwx on org/name",
        ("hf_CANARYabcdefghijklmnopqrstuvwx",),
        ("on org/name",),
    ),
    (
        "github-token",
        "token ghp_CANARY0123456789abcdefghijklmnopqrstuv",
        ("ghp_CANARY0123456789abcdefghijklmnopqrstuv",),
        (),
    ),
    ("google-api-key", "key AIzaSyCANARY0123456789abcdefghijklmnopq", ("AIzaSyCANARY0123456789abcdefghijklmnopq",), ()),
    ("google-oauth-token", "ya29.CANARYa0AfH6SMBx0123456789", ("CANARYa0AfH6SMBx0123456789",), ()),
    (
        "jwt",
        "token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJDQU5BUlkifQ.CANARYsignature",
        ("eyJzdWIiOiJDQU5BUlkifQ", "CANARYsignature"),
        (),
    ),
    (
        "service-account-json",
        SA_JSON,
        (PEM_BODY, "0123456789abcdef0123456789abcdef01234567"),
        ("demo-project", "client_email"),
    ),
    ("service-account-json-in-message", f"could not load credentials {SA_JSON!r}: bad", (PEM_BODY,), ("demo-project",)),
    ("pem-truncated", f'"private_key": "-----BEGIN PRIVATE KEY-----\\n{PEM_BODY}', (PEM_BODY,), ("private_key",)),
    (
        "pem-rsa-multiline",
        f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----\ntail",
        (PEM_BODY,),
        ("tail",),
    ),
]


@pytest.mark.parametrize(("text", "secrets", "kept"), [f[1:] for f in FORMS], ids=[f[0] for f in FORMS])
def test_every_credential_form_is_redacted(text: str, secrets: tuple[str, ...], kept: tuple[str, ...]) -> None:
    clean = redact(text)
    for secret in secrets:
        assert secret not in clean, clean
    for part in kept:
        assert part in clean, clean
    assert redact(clean) == clean  # stable: status written twice does not churn


@pytest.mark.parametrize(
    "text",
    [
        "hf://mistralai/Mistral-7B-v0.1@main",
        "s3://bucket/models/llama@v2/adapter",
        "plain text file..txt",
        "example 3 has 5000 tokens: more than maxSeqLength 4096",
        "credentialsSecret: s3-creds",
        "Job demo-train failed (BackoffLimitExceeded)",
        "file:///data/train.jsonl line 3: unknown role 'robot'",
        "https://data.example.com:8443/train.jsonl",
    ],
)
def test_ordinary_text_is_kept(text: str) -> None:
    assert redact(text) == text


def test_given_secrets_are_removed_first() -> None:
    assert redact("value hunter2xx here", ["hunter2xx"]) == "value *** here"


def test_reconcile_uses_the_same_redaction() -> None:
    assert reconcile.redact is redact
    assert SECRET not in reconcile._message(f"upload to s3://{KEY_ID}:{SECRET}@bucket/x failed", ())


# ------------------------------------------------------------------------------ logging


@pytest.fixture
def clean_filters() -> Iterator[None]:
    yield
    for name in (redaction.OBJECT_LOGGER, "kopf", "kubetune", ""):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            for f in [f for f in target.filters if isinstance(f, RedactingFilter)]:
                target.removeFilter(f)


def _body() -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ns", "uid": "uid-1"},
    }


def test_filter_rewrites_message_args_and_traceback() -> None:
    record = logging.LogRecord(
        "kubetune.x", logging.ERROR, __file__, 1, "upload to %s failed", (f"s3://{KEY_ID}:{SECRET}@b/p",), None
    )
    try:
        raise RuntimeError(f"HTTP 403 for s3://{KEY_ID}:{SECRET}@b/p")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    assert RedactingFilter().filter(record) is True
    text = logging.Formatter().format(record)
    assert "@b/p failed" in text and "RuntimeError: HTTP 403" in text
    assert KEY_ID not in text and not any(p in text for p in SECRET_PARTS)


async def test_kopf_posted_events_and_log_lines_are_redacted(clean_filters: None) -> None:
    """What kopf logs on an object's logger (a handler's failure) is also posted as an Event by
    its `K8sPoster` handler when `settings.posting.loggers` is on (kopf 1.45's default is off):
    the filter on `kopf.objects` runs before both."""
    queue: asyncio.Queue = asyncio.Queue()
    settings = kopf.OperatorSettings()
    settings.posting.loggers = True
    posting.settings_var.set(settings)
    posting.event_queue_var.set(queue)
    posting.event_queue_loop_var.set(asyncio.get_running_loop())
    stream = io.StringIO()
    line_handler = logging.StreamHandler(stream)
    line_handler.setFormatter(kopf_loggers.make_formatter(kopf.LogFormat.JSON))
    root = logging.getLogger()
    root.addHandler(line_handler)
    try:
        redaction.install()
        logger = kopf_loggers.ObjectLogger(body=_body(), settings=settings)  # type: ignore[arg-type]
        logger.error(f"Handler 'children' failed permanently: s3://{KEY_ID}:{SECRET}@bucket/out")
        try:
            raise kopf.TemporaryError("hf_CANARYabcdefghijklmnopqrstuvwx rejected for s3://TOKENCANARY12345@bucket/out")
        except kopf.TemporaryError:
            logger.exception("Handler 'children' failed with an exception. Will retry.")
        installed_twice = redaction.install()
        assert sum(isinstance(f, RedactingFilter) for f in logging.getLogger(redaction.OBJECT_LOGGER).filters) == 1
        assert isinstance(installed_twice, RedactingFilter)
    finally:
        root.removeHandler(line_handler)
    events = [queue.get_nowait() for _ in range(queue.qsize())]
    assert len(events) == 2 and events[0].reason == "Logging" and events[0].ref["name"] == "demo"
    posted = "\n".join(e.message for e in events)
    logged = stream.getvalue()
    assert "@bucket/out" in posted and "@bucket/out" in logged
    assert "TemporaryError" in posted and "TemporaryError" in logged  # the traceback is kept, redacted
    for text in (posted, logged):
        assert KEY_ID not in text and not any(p in text for p in SECRET_PARTS)
        assert "TOKENCANARY12345" not in text and "hf_CANARY" not in text


def test_install_covers_records_of_other_loggers_through_root_handlers(clean_filters: None) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        redaction.install()
        logging.getLogger("kubetune.operator.handlers").warning("status patch refused: %s", f"password={SECRET}")
        logging.getLogger("aiohttp.client").warning(f"GET https://u:{SECRET}@h/x")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert stream.getvalue().count("***") == 2 and not any(p in stream.getvalue() for p in SECRET_PARTS)
