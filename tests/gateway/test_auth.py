"""kubetune.gateway.auth: API keys from the access file, each acting in one namespace; 401/403
in OpenAI's envelope; the file reloaded when it changes; errors naming FILE:LINE."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from kubetune.gateway.auth import AccessFile, AccessFileError, Authenticator, TokenReviewer, bearer, parse_access
from kubetune.gateway.backend import Forbidden, Tenant, Unauthorized

KEY_A = "sk-kt-team-a-0123456789abcdef"
KEY_B = "sk-kt-team-b-fedcba9876543210"
ACCESS = f"""\
keys:
  - name: team-a-ci
    key: {KEY_A}
    namespace: team-a
    organization: org-alpha
  - name: team-b
    sha256: {hashlib.sha256(KEY_B.encode()).hexdigest()}
    namespace: team-b
"""


def headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key is not None else {}


async def test_each_key_maps_to_its_namespace_and_organization() -> None:
    auth = Authenticator(parse_access(ACCESS))
    assert await auth(headers(KEY_A)) == Tenant(namespace="team-a", organization_id="org-alpha", key_id="team-a-ci")
    # a sha256 entry works the same, and the organization defaults to org-<namespace>
    assert await auth({"authorization": f"bearer {KEY_B}"}) == Tenant("team-b", "org-team-b", "team-b")


@pytest.mark.parametrize("sent", [None, "", "sk-kt-team-a-0123456789abcdeX", KEY_A[:-1], KEY_A + "0", "Basic " + KEY_A])
async def test_unknown_or_missing_keys_are_401_without_echoing_the_key(sent: str | None) -> None:
    auth = Authenticator(parse_access(ACCESS))
    hdrs = {"Authorization": sent} if sent and sent.startswith("Basic") else headers(sent)
    with pytest.raises(Unauthorized) as err:
        await auth(hdrs)
    envelope = err.value.envelope()["error"]
    assert err.value.status == 401 and envelope["type"] == "invalid_request_error"
    assert "Authorization" in envelope["message"] or "Incorrect API key" in envelope["message"]
    if sent and len(sent) > 12 and not sent.startswith("Basic"):
        assert sent not in envelope["message"] and sent[6:-4] not in envelope["message"]


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured digest is compared with hmac.compare_digest, also after a match."""
    import hmac

    from kubetune.gateway import auth as module

    calls: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(module.hmac, "compare_digest", spy)
    authn = Authenticator(parse_access(ACCESS))
    assert authn.match_key(KEY_A) is not None
    assert len(calls) == 2  # the first key matched, the second was compared all the same
    calls.clear()
    assert authn.match_key("nope-nope-nope-nope") is None
    assert len(calls) == 2


@pytest.mark.parametrize(
    "text, where",
    [
        ("keys:\n  - name: a\n    namespace: team-a\n", "<f>:2: keys[0]: set exactly one of `key`"),
        ("keys:\n  - name: a\n    key: short\n    namespace: team-a\n", "<f>:3: keys[0].key"),
        ("keys:\n  - name: a\n    key: 0123456789abcdefXYZ\n    namespace: Team_A\n", "<f>:4: keys[0].namespace"),
        (
            "keys:\n  - name: a\n    key: 0123456789abcdefXYZ\n    namespace: a\n  - name: a\n    key: 0123456789abcdefXYZ2\n    namespace: b\n",
            "keys[1].name: 'a' is used twice",
        ),
        (
            "keys:\n  - name: a\n    key: 0123456789abcdefXYZ\n    namespace: a\n  - name: b\n    key: 0123456789abcdefXYZ\n    namespace: b\n",
            "keys[1]: the same key as keys[0]",
        ),
        (
            "keys:\n  - name: a\n    key: 0123456789abcdefXYZ\n    namespace: a\n    namespaces: [b]\n",
            "<f>:5: keys[0].namespaces: Extra inputs",
        ),
        ("keys: [\n", "<f>:2: invalid YAML"),
        ("keys:\n  - name: a\n    name: b\n", "duplicate key 'name'"),
        ("webhooks:\n  - namespace: a\n    url: ftp://x\n    secret: whsec_abc\n", "<f>:3: webhooks[0].url"),
        (
            "webhooks:\n  - namespace: a\n    url: https://x.example\n    secret: nope\n",
            "<f>:4: webhooks[0].secret: must be `whsec_`",
        ),
    ],
)
def test_a_bad_access_file_names_the_line_and_the_field(text: str, where: str) -> None:
    with pytest.raises(AccessFileError) as err:
        parse_access(text, "<f>")
    assert where in str(err.value)
    assert "0123456789abcdefXYZ" not in str(err.value)  # a key is never repeated in an error


def test_the_file_is_reloaded_when_it_changes_and_a_broken_edit_keeps_the_old_keys(tmp_path: Path) -> None:
    path = tmp_path / "access.yaml"
    path.write_text(ACCESS)
    access = AccessFile(path)
    auth = Authenticator(access)
    assert auth.match_key(KEY_A) is not None
    rotated = ACCESS.replace(KEY_A, "sk-kt-rotated-key-000000000")
    path.write_text(rotated)
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert auth.match_key(KEY_A) is None and auth.match_key("sk-kt-rotated-key-000000000").namespace == "team-a"
    path.write_text("keys: [\n")
    os.utime(path, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    assert auth.match_key("sk-kt-rotated-key-000000000") is not None  # the previous keys stay in force
    with pytest.raises(AccessFileError, match="no such file"):
        AccessFile(tmp_path / "missing.yaml")


async def test_anonymous_local_mode_and_its_exclusivity() -> None:
    local = Tenant("default", "org-local", "local")
    assert await Authenticator(anonymous=local)({}) == local
    with pytest.raises(ValueError, match="excludes keys"):
        Authenticator(parse_access(ACCESS), anonymous=local)
    with pytest.raises(ValueError, match="no way to authenticate"):
        Authenticator()


def test_bearer_parsing() -> None:
    assert bearer({"Authorization": "Bearer  abc "}) == "abc"
    assert bearer({"authorization": "bearer abc"}) == "abc"
    assert bearer({"Authorization": "Bearer"}) is None
    assert bearer({"Authorization": "Token abc"}) is None


class FakeReviewer(TokenReviewer):
    """TokenReviewer with the API server's answers scripted (the real one is tested on the real tier)."""

    def __init__(self, users: dict[str, str], allowed: set[tuple[str, str, str]]) -> None:
        super().__init__(api_client=None)
        self.users, self.allowed, self.calls = users, allowed, []

    def _token_review(self, token):  # type: ignore[override]
        from kubetune.gateway.auth import _Review

        self.calls.append(("review", token))
        user = self.users.get(token)
        return _Review(user, ("system:authenticated",), "uid", ()) if user else None

    def _access_review(self, review, namespace, verb):  # type: ignore[override]
        self.calls.append(("access", review.user, namespace, verb))
        return (review.user, namespace, verb) in self.allowed, "" if (
            review.user,
            namespace,
            verb,
        ) in self.allowed else "no RBAC"


async def test_kubernetes_tokens_namespace_from_project_header_or_service_account() -> None:
    sa = "system:serviceaccount:team-c:trainer-bot"
    reviewer = FakeReviewer(
        {"tok-sa": sa, "tok-user": "alice"},
        {(sa, "team-c", "list"), (sa, "team-c", "create"), ("alice", "team-d", "list")},
    )
    auth = Authenticator(parse_access(ACCESS), tokens=reviewer)
    assert await auth(headers(KEY_A)) == Tenant("team-a", "org-alpha", "team-a-ci")  # keys first, no review
    assert reviewer.calls == []
    assert await auth(headers("tok-sa"), "POST") == Tenant("team-c", "org-team-c", sa)
    assert await auth({**headers("tok-user"), "OpenAI-Project": "team-d"}, "GET") == Tenant(
        "team-d", "org-team-d", "alice"
    )
    with pytest.raises(Forbidden, match="may not create finetunejobs.kubetune.io in namespace 'team-d'"):
        await auth({**headers("tok-user"), "OpenAI-Project": "team-d"}, "POST")
    with pytest.raises(Forbidden, match="OpenAI-Project"):
        await auth(headers("tok-user"), "GET")  # a user has no namespace of its own
    with pytest.raises(Forbidden, match="may not list"):
        await auth({**headers("tok-sa"), "OpenAI-Project": "team-a"}, "GET")  # another namespace
    with pytest.raises(Unauthorized):
        await auth(headers("tok-unknown"))
    # answers are cached: the same token and namespace ask the API server once
    before = len(reviewer.calls)
    assert await auth(headers("tok-sa"), "POST") == Tenant("team-c", "org-team-c", sa)
    assert len(reviewer.calls) == before
