"""Tenancy: a key never reads, lists, cancels or downloads another namespace's files and jobs.

Keys map to tenants through gateway.auth's Authenticator (an access file's keys, here in memory);
the backend filters every query by the tenant's namespace, and answers 404 for another tenant's
ids — never 403, which would confirm they exist."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from kubetune.gateway.backend import Tenant

from tests.gateway.test_app import local_api, subset, wait_for

KEY_A, KEY_B = "a-key-" + "a" * 20, "b-key-" + "b" * 20
KEYS = {KEY_A: Tenant("team-a", "org-a", "key-a"), KEY_B: Tenant("team-b", "org-b", "key-b")}


def test_a_key_sees_only_its_own_namespace(tmp_path: Path) -> None:
    with local_api(tmp_path, keys=KEYS) as url:
        a = openai.OpenAI(base_url=url, api_key=KEY_A, max_retries=0)
        b = openai.OpenAI(base_url=url, api_key=KEY_B, max_retries=0)
        b_file = b.files.create(file=("b.jsonl", subset(20)), purpose="fine-tune")
        b_job = b.fine_tuning.jobs.create(model="builtin://tiny-llama", training_file=b_file.id, metadata={"team": "b"})
        a_file = a.files.create(file=("a.jsonl", subset(15)), purpose="fine-tune")
        wait_for(lambda: b.fine_tuning.jobs.retrieve(b_job.id).status == "queued")

        # list: only one's own
        assert [f.id for f in a.files.list()] == [a_file.id]
        assert [j.id for j in a.fine_tuning.jobs.list()] == []
        assert [j.id for j in a.fine_tuning.jobs.list(metadata={"team": "b"})] == []
        # read, download, delete, train on, cancel, pause, events, checkpoints: not found
        for call in (
            lambda: a.files.retrieve(b_file.id),
            lambda: a.files.content(b_file.id),
            lambda: a.files.delete(b_file.id),
            lambda: a.fine_tuning.jobs.retrieve(b_job.id),
            lambda: a.fine_tuning.jobs.cancel(b_job.id),
            lambda: a.fine_tuning.jobs.pause(b_job.id),
            lambda: a.fine_tuning.jobs.resume(b_job.id),
            lambda: a.fine_tuning.jobs.list_events(b_job.id),
            lambda: a.fine_tuning.jobs.checkpoints.list(b_job.id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        with pytest.raises(openai.BadRequestError) as err:
            a.fine_tuning.jobs.create(model="builtin://tiny-llama", training_file=b_file.id)
        assert err.value.body["param"] == "training_file"
        with pytest.raises(openai.NotFoundError) as err:  # B's tuned-model name is no way in either
            a.chat.completions.create(
                model=f"ft:tiny-llama:org-b::{b_job.id.removeprefix('ftjob-')}",
                messages=[{"role": "user", "content": "hi"}],
            )
        assert err.value.body["code"] == "model_not_found"
        # a paging cursor from the other tenant is no way in either
        with pytest.raises(openai.BadRequestError):
            a.files.list(after=b_file.id)

        # B's objects are untouched, and B sees none of A's
        assert b.fine_tuning.jobs.retrieve(b_job.id).status == "queued"
        assert b.files.content(b_file.id).content == subset(20)
        assert [f.id for f in b.files.list()] == [b_file.id]
        with pytest.raises(openai.NotFoundError):
            b.files.retrieve(a_file.id)
        assert b.fine_tuning.jobs.retrieve(b_job.id).organization_id == "org-b"
        assert (tmp_path / "files" / "team-b" / f"{b_file.id}.jsonl").is_file()
        assert (tmp_path / "files" / "team-a" / f"{a_file.id}.jsonl").is_file()

        unknown = openai.OpenAI(base_url=url, api_key="not-a-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            unknown.files.list()
