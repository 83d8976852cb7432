"""gateway.app with the local backend, in process: shapes, paging, errors, limits, pause/cancel
bookkeeping and state across a restart. No job trains here (max_workers=0 keeps them queued);
test_openai_client.py trains."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from kubetune.gateway.app import UploadLimits, create_app
from kubetune.gateway.auth import AccessConfig, ApiKey, Authenticator
from kubetune.gateway.backend import Tenant
from kubetune.gateway.local import LocalBackend

QUICKSTART = Path("examples/data/support-chat.jsonl")
TENANT = Tenant(namespace="default", organization_id="org-test", key_id="test")


@contextmanager
def serving(app) -> Iterator[str]:
    """The ASGI app on a free local port in a uvicorn thread; yields the /v1 base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@contextmanager
def local_api(
    root: Path, *, keys: dict | None = None, limits: UploadLimits = UploadLimits(), max_workers: int = 0
) -> Iterator[str]:
    backend = LocalBackend(root, max_workers=max_workers, poll_seconds=0.1)
    auth = (
        Authenticator(anonymous=TENANT)
        if not keys
        else Authenticator(
            AccessConfig(
                keys=[
                    ApiKey(name=t.key_id, key=k, namespace=t.namespace, organization=t.organization_id)
                    for k, t in keys.items()
                ]
            )
        )
    )
    with serving(create_app(backend, auth, limits=limits)) as url:
        yield url


def upload(url: str, content: bytes, name: str = "train.jsonl", purpose: str = "fine-tune", **kw) -> requests.Response:
    return requests.post(f"{url}/files", files={"file": (name, content)}, data={"purpose": purpose}, timeout=30, **kw)


def subset(n: int = 20) -> bytes:
    return ("\n".join(QUICKSTART.read_text().splitlines()[:n]) + "\n").encode()


def wait_for(fn, timeout: float = 20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := fn():
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def error_of(resp: requests.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_files_upload_list_page_content_delete(tmp_path: Path) -> None:
    with local_api(tmp_path) as url:
        ids = []
        for i in range(3):
            r = upload(url, subset(10 + i), name=f"t{i}.jsonl")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "file" and body["purpose"] == "fine-tune" and body["filename"] == f"t{i}.jsonl"
            assert body["bytes"] == len(subset(10 + i)) and body["id"].startswith("file-")
            ids.append(body["id"])
        page = requests.get(f"{url}/files", params={"limit": 2}, timeout=10).json()
        assert page["object"] == "list" and [f["id"] for f in page["data"]] == ids[::-1][:2] and page["has_more"]
        assert (page["first_id"], page["last_id"]) == (ids[2], ids[1])
        rest = requests.get(f"{url}/files", params={"limit": 2, "after": page["last_id"]}, timeout=10).json()
        assert [f["id"] for f in rest["data"]] == [ids[0]] and rest["has_more"] is False
        asc = requests.get(f"{url}/files", params={"order": "asc"}, timeout=10).json()
        assert [f["id"] for f in asc["data"]] == ids
        bad = requests.get(f"{url}/files", params={"after": "file-nope"}, timeout=10)
        assert bad.status_code == 400 and error_of(bad)["param"] == "after"
        content = requests.get(f"{url}/files/{ids[1]}/content", timeout=10)
        assert content.status_code == 200 and content.content == subset(11)
        gone = requests.delete(f"{url}/files/{ids[1]}", timeout=10)
        assert gone.json() == {"id": ids[1], "object": "file", "deleted": True}
        missing = requests.get(f"{url}/files/{ids[1]}", timeout=10)
        assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
        assert requests.get(f"{url}/files/{ids[1]}/content", timeout=10).status_code == 404
        stored = sorted(p.name for p in (tmp_path / "files" / "default").iterdir())
        assert stored == sorted(f"{i}.jsonl" for i in (ids[0], ids[2]))


def test_upload_limits(tmp_path: Path) -> None:
    with local_api(tmp_path, limits=UploadLimits(max_bytes=4000, max_lines=5, chunk_bytes=512)) as url:
        r = upload(url, subset(2), name="train.csv")
        assert r.status_code == 400 and error_of(r)["param"] == "file" and ".jsonl" in error_of(r)["message"]
        r = upload(url, subset(2), purpose="assistants")
        assert r.status_code == 400 and error_of(r)["param"] == "purpose"
        r = upload(url, b"{}\n" * 6)
        assert r.status_code == 400 and "more than 5 lines" in error_of(r)["message"]
        r = upload(url, b"{}" + b" " * 5000)
        assert r.status_code == 413 and error_of(r)["code"] == "file_too_large"
        r = upload(url, b"")
        assert r.status_code == 400 and "empty" in error_of(r)["message"]
        assert requests.get(f"{url}/files", timeout=10).json()["data"] == []
        assert not [p for p in (tmp_path / "files").rglob("*") if p.is_file()]  # nothing of a refused upload is kept


def test_job_request_errors_name_the_field(tmp_path: Path) -> None:
    with local_api(tmp_path) as url:
        file_id = upload(url, subset(20)).json()["id"]
        cases = [
            (
                {"model": "builtin://tiny-llama", "training_file": file_id, "foo": 1},
                "foo",
                "Unrecognized request argument",
            ),
            (
                {"model": "builtin://tiny-llama", "training_file": file_id, "hyperparameters": {"n_epochs": 0}},
                "hyperparameters.n_epochs",
                "between 1 and 50",
            ),
            (
                {"model": "builtin://tiny-llama", "training_file": file_id, "method": {"type": "reinforcement"}},
                "method.type",
                "graders",
            ),
            ({"model": "builtin://tiny-llama", "training_file": "file-missing"}, "training_file", "no such file"),
            ({"model": "gpt-4o-mini", "training_file": file_id}, "model", "not available"),
            ({"model": "builtin://tiny-llama", "training_file": file_id, "suffix": "x" * 65}, "suffix", "64"),
            ({"training_file": file_id}, "model", "required"),
        ]
        for body, param, words in cases:
            r = requests.post(f"{url}/fine_tuning/jobs", json=body, timeout=10)
            assert r.status_code == 400, (body, r.text)
            err = error_of(r)
            assert err["param"] == param and words in err["message"], (body, err)
        r = requests.post(
            f"{url}/fine_tuning/jobs", data=b"{not json", headers={"content-type": "application/json"}, timeout=10
        )
        assert r.status_code == 400
        assert requests.get(f"{url}/fine_tuning/jobs", timeout=10).json()["data"] == []
        r = requests.get(f"{url}/no/such/route", timeout=10)
        assert r.status_code == 404 and error_of(r)["code"] == "not_found"


def test_malformed_file_fails_the_job_naming_the_line(tmp_path: Path) -> None:
    lines = subset(20).decode().splitlines()
    lines[3] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]})
    with local_api(tmp_path) as url:
        file_id = upload(url, ("\n".join(lines) + "\n").encode(), name="bad.jsonl").json()["id"]
        job = requests.post(
            f"{url}/fine_tuning/jobs", json={"model": "builtin://tiny-llama", "training_file": file_id}, timeout=10
        ).json()
        assert job["status"] == "validating_files" and job["error"] is None
        failed = wait_for(
            lambda: (
                (j := requests.get(f"{url}/fine_tuning/jobs/{job['id']}", timeout=10).json())["status"] == "failed"
                and j
            )
        )
        assert failed["error"]["param"] == "training_file:4" and failed["error"]["code"] == "InvalidData"
        assert f"{file_id} (bad.jsonl):4" in failed["error"]["message"] and "robot" in failed["error"]["message"]
        assert str(tmp_path) not in failed["error"]["message"]
        assert failed["finished_at"] is not None and failed["fine_tuned_model"] is None
        events = requests.get(f"{url}/fine_tuning/jobs/{job['id']}/events", timeout=10).json()["data"]
        assert events[0]["level"] == "error" and "training_file" not in events[0]["message"]
        assert events[-1]["message"].startswith("Created fine-tuning job")


def test_pause_resume_cancel_and_metadata_filter_on_queued_jobs(tmp_path: Path) -> None:
    with local_api(tmp_path) as url:
        file_id = upload(url, subset(20)).json()["id"]
        create = lambda meta: requests.post(
            f"{url}/fine_tuning/jobs",
            timeout=10,
            json={
                "model": "builtin://tiny-llama",
                "training_file": file_id,
                "metadata": meta,
            },
        ).json()
        a, b = create({"team": "a"}), create({"team": "b"})
        get = lambda j: requests.get(f"{url}/fine_tuning/jobs/{j['id']}", timeout=10).json()
        wait_for(lambda: get(a)["status"] == "queued" and get(b)["status"] == "queued")
        listed = requests.get(f"{url}/fine_tuning/jobs", params={"metadata[team]": "b"}, timeout=10).json()
        assert [j["id"] for j in listed["data"]] == [b["id"]]
        assert [j["id"] for j in requests.get(f"{url}/fine_tuning/jobs", timeout=10).json()["data"]] == [
            b["id"],
            a["id"],
        ]
        paused = requests.post(f"{url}/fine_tuning/jobs/{a['id']}/pause", timeout=10).json()
        assert paused["status"] == "queued"
        again = requests.post(f"{url}/fine_tuning/jobs/{a['id']}/pause", timeout=10)
        assert again.status_code == 400 and "already paused" in error_of(again)["message"]
        not_paused = requests.post(f"{url}/fine_tuning/jobs/{b['id']}/resume", timeout=10)
        assert not_paused.status_code == 400 and error_of(not_paused)["code"] == "job_not_paused"
        resumed = requests.post(f"{url}/fine_tuning/jobs/{a['id']}/resume", timeout=10).json()
        assert resumed["status"] == "queued"
        messages = [
            e["message"] for e in requests.get(f"{url}/fine_tuning/jobs/{a['id']}/events", timeout=10).json()["data"]
        ]
        assert "resumed" in messages[0] and "paused" in messages[1]
        cancelled = requests.post(f"{url}/fine_tuning/jobs/{b['id']}/cancel", timeout=10).json()
        assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
        twice = requests.post(f"{url}/fine_tuning/jobs/{b['id']}/cancel", timeout=10)
        assert twice.status_code == 400 and error_of(twice)["code"] == "job_not_cancellable"
        assert requests.get(f"{url}/fine_tuning/jobs/{b['id']}/checkpoints", timeout=10).json() == {
            "object": "list",
            "data": [],
            "has_more": False,
            "first_id": None,
            "last_id": None,
        }
        models = [m["id"] for m in requests.get(f"{url}/models", timeout=10).json()["data"]]
        assert "builtin://tiny-llama" in models and not [m for m in models if m.startswith("ft:")]
        assert requests.get(f"{url}/models/builtin://tiny-llama", timeout=10).json()["owned_by"] == "kubetune"
        assert requests.get(f"{url}/models/ft:nope", timeout=10).status_code == 404
    # a restarted server has the same files, jobs and states
    with local_api(tmp_path) as url:
        jobs = {j["id"]: j["status"] for j in requests.get(f"{url}/fine_tuning/jobs", timeout=10).json()["data"]}
        assert jobs == {a["id"]: "queued", b["id"]: "cancelled"}
        assert [f["id"] for f in requests.get(f"{url}/files", timeout=10).json()["data"]] == [file_id]


def test_keys_are_required_when_configured(tmp_path: Path) -> None:
    keys = {"k" * 20: TENANT}
    with local_api(tmp_path, keys=keys) as url:
        r = requests.get(f"{url}/files", timeout=10)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        r = requests.get(f"{url}/files", headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert r.status_code == 401
        assert (
            requests.get(f"{url}/files", headers={"Authorization": "Bearer " + "k" * 20}, timeout=10).status_code == 200
        )


def test_openapi_document_lists_every_endpoint(tmp_path: Path) -> None:
    with local_api(tmp_path) as url:
        doc = requests.get(url.removesuffix("/v1") + "/openapi.json", timeout=10).json()
    assert {p: sorted(m) for p, m in doc["paths"].items()} == {
        "/v1/files": ["get", "post"],
        "/v1/files/{file_id}": ["delete", "get"],
        "/v1/files/{file_id}/content": ["get"],
        "/v1/fine_tuning/jobs": ["get", "post"],
        "/v1/fine_tuning/jobs/{job_id}": ["get"],
        "/v1/fine_tuning/jobs/{job_id}/cancel": ["post"],
        "/v1/fine_tuning/jobs/{job_id}/pause": ["post"],
        "/v1/fine_tuning/jobs/{job_id}/resume": ["post"],
        "/v1/fine_tuning/jobs/{job_id}/events": ["get"],
        "/v1/fine_tuning/jobs/{job_id}/checkpoints": ["get"],
        "/v1/models": ["get"],
        "/v1/models/{model_id}": ["get"],
        "/v1/chat/completions": ["post"],
    }


def test_import_stays_torch_free() -> None:
    """The gateway is base-install: importing it and serving must not pull in the ML stack."""
    import subprocess
    import sys

    code = (
        "import sys, kubetune.gateway.app, kubetune.gateway.local, kubetune.gateway.translate;"
        "bad=[m for m in ('torch','transformers','peft','kopf') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
