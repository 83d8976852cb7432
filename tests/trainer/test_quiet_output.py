"""Issue 15, item 9: quiet and informative output.

One short run of the pod's entrypoint (`python -m kubetune.trainer`, 3 steps on the tiny model)
is shared by the checks of its log and its files: no library warning lines, one line per step
(step, loss, lr, tokens/s), the CPU fallback said once, no scratch copy left behind, outputs
readable by others as a normal tool writes them. Ctrl-C, the scratch of a failed run and the
local progress bar are checked in-process. `make demo` itself is checked in
tests/trainer/test_run.py::test_quickstart_demo with `library_noise` below.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.trainer import storage
from kubetune.trainer.callbacks import Preemption

ROOT = Path(__file__).resolve().parents[2]
slow = pytest.mark.slow  # trains the tiny model (the pod run is shared by five tests)
DATA = ROOT / "examples" / "data" / "support-chat.jsonl"

_OURS = re.compile(r"\b(?:DEBUG|INFO|WARNING|ERROR) kubetune[\w.]*: ")
_NOISE = re.compile(
    r"\w*Warning\b|warnings\.warn|\bWARNING\b|[Dd]eprecat|gemm_4bit_forward|Loading weights|Writing model shards"
)


def library_noise(text: str) -> list[str]:
    """Lines a library printed about itself: Python warnings (FutureWarning, UserWarning, … with
    their source lines), deprecation notices, logging WARNING records of loggers not ours, the
    bitsandbytes kernels line, transformers' weight-loading bars. Our own log records and the
    summary (one JSON line, with its `warnings` field) are not noise."""
    return [
        line
        for line in text.splitlines()
        if _NOISE.search(line) and not _OURS.search(line) and not line.startswith('{"status":')
    ]


def test_library_noise_recognises_what_it_must() -> None:
    seen = """/x/transformers/training_args.py:1541: FutureWarning: `gradient_checkpointing` is deprecated
  warnings.warn(f"`{old}` is deprecated")
Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.
2026-12-03 06:39:03,631 WARNING bitsandbytes.backends.cpu.ops: Failed to load CPU gemm_4bit_forward
/x/peft/peft_model.py:1673: UserWarning: Position ids are not supported
Loading weights: 100%|██████████| 21/21
WARNING kubetune.trainer: only 300 training examples; 500 or more usually train better
│ data: duplicates / overlap / PII   │ 0 / 0 / 0 (warn)                        │
2026-12-03 06:39:03,631 INFO kubetune.trainer.steps: step 1/3 loss 5.5 lr 0.00e+00 tokens/s 1,549"""
    assert len(library_noise(seen)) == 6


def _manifest(tmp: Path, name: str, **spec: Any) -> Path:
    train = tmp / "train.jsonl"
    train.write_text("".join(DATA.read_text().splitlines(keepends=True)[:48]))
    body: dict[str, Any] = {
        "model": {"source": "builtin://tiny-llama"},
        "dataset": {"train": str(train), "maxSeqLength": 256, "minExamples": 1},
        "method": {"adaptation": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": ["all-linear"]}},
        "hyperparameters": {"epochs": 1, "learningRate": 3e-3, "batchSize": 8, "maxSteps": 3, "seed": 7},
        "output": {"uri": (tmp / "out").as_uri()},
        "checkpointing": {"everySteps": 2, "keep": 2},
        "evaluation": {"samples": 1, "maxNewTokens": 4, "compareBase": False},
    }
    for key, value in spec.items():
        body[key] = {**body.get(key, {}), **value}
    path = tmp / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump(
            {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": body}
        )
    )
    return path


@pytest.fixture(scope="module")
def pod_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The pod's command on a 3-step job (resources.gpus defaults to 1: on this CPU-only machine a
    fallback), with its own TMPDIR and umask 022."""
    tmp = tmp_path_factory.mktemp("pod")
    scratch_root = tmp / "tmpdir"
    scratch_root.mkdir()
    spec = _manifest(tmp, "quiet")
    env = {
        **os.environ,
        "TMPDIR": str(scratch_root),
        "PYTHONUNBUFFERED": "1",
        "KUBETUNE_CACHE": str(tmp_path_factory.getbasetemp() / "shared-cache"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune.trainer",
            "--spec",
            str(spec),
            "--metrics-port",
            "-1",
            "--termination-path",
            str(tmp / "termination"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        preexec_fn=lambda: os.umask(0o022),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "out": tmp / "out", "scratch_root": scratch_root, "log": proc.stdout + proc.stderr}


@slow
def test_pod_log_has_no_library_warnings(pod_run: dict[str, Any]) -> None:
    assert library_noise(pod_run["log"]) == []


@slow
def test_pod_log_has_one_line_per_step(pod_run: dict[str, Any]) -> None:
    lines = re.findall(
        r"INFO kubetune\.trainer\.steps: step (\d+)/(\d+) loss (\d+\.\d{4}) lr (\S+) tokens/s ([\d,]+)\n",
        pod_run["log"],
    )
    assert [(int(s), int(t)) for s, t, *_ in lines] == [(1, 3), (2, 3), (3, 3)]
    losses = json.loads((pod_run["out"] / "adapter" / "training_log.json").read_text())["losses"]
    assert [float(loss) for _, _, loss, _, _ in lines] == [round(loss, 4) for _, loss in losses]
    assert all(float(lr) <= 3e-3 for *_, lr, _ in lines) and float(lines[1][3]) > 0
    assert all(int(tps.replace(",", "")) > 0 for *_, tps in lines)


@slow
def test_the_trained_share_is_of_the_adapted_model(pod_run: dict[str, Any]) -> None:
    """The status line counts the adapter in the total (LoRA on every linear layer of the 107k-parameter
    tiny model adds more than that: "131,072 of 107,328" before)."""
    ((trainable, total),) = re.findall(r"training: ([\d,]+) of ([\d,]+) parameters", pod_run["log"])
    assert 0 < int(trainable.replace(",", "")) < int(total.replace(",", ""))


@slow
def test_cpu_fallback_is_said_once(pod_run: dict[str, Any]) -> None:
    said = [line for line in pod_run["log"].splitlines() if "no GPU: training on CPU" in line]
    assert len(said) == 1 and " WARNING kubetune.trainer: " in said[0]  # gpus: 1 was asked for


@slow
def test_no_scratch_copy_is_left_behind(pod_run: dict[str, Any]) -> None:
    assert (pod_run["out"] / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in pod_run["scratch_root"].glob("kubetune-*")) == []


@slow
def test_outputs_are_world_readable_like_a_normal_tool_writes_them(pod_run: dict[str, Any]) -> None:
    out = pod_run["out"]
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes["manifest.json"] == 0o644 and modes["checkpoints/step-2/manifest.json"] == 0o644
    wrong = {path: oct(mode) for path, mode in modes.items() if mode != (0o755 if (out / path).is_dir() else 0o644)}
    assert wrong == {}


def test_downloaded_directories_get_the_mode_mkdir_gives(tmp_path: Path) -> None:
    """mkdtemp's 0700 staging directory is renamed into place as a fetched output or model: it gets
    0777 less the umask, so a serving container running as another user can read it."""
    from kubetune.trainer import filemodes

    mask = os.umask(0o022)
    os.umask(mask)
    assert filemodes.umask() == mask
    local = tmp_path / "local"
    local.mkdir()
    (local / "weights.bin").write_bytes(b"\0" * 64)
    store = storage.Store((tmp_path / "store").as_uri())
    files = storage.upload_dir(local, store, "adapter", {})["files"]
    target = tmp_path / "fetched"
    assert storage.download_verified(store, "adapter", files, target) is None
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((target / "weights.bin").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "store" / "adapter" / "manifest.json").stat().st_mode) == 0o666 & ~mask


def _job(tmp: Path, name: str, **spec: Any) -> Any:
    from kubetune.api.manifest import load_job

    return load_job(str(_manifest(tmp, name, **spec)))


@slow
def test_ctrl_c_saves_a_checkpoint_then_stops(tmp_path: Path) -> None:
    from kubetune.trainer.run import Options, Preempted, run

    def interrupt(progress: dict[str, Any]) -> None:
        if progress["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what a terminal's Ctrl-C sends

    job = _job(
        tmp_path,
        "ctrlc",
        hyperparameters={"maxSteps": 6},
        checkpointing={"everySteps": 100},
        evaluation={"samples": 0, "compareBase": False},
    )
    unhandled: list[int] = []  # a SIGINT the run did not take would land here, not abort the test session

    def outside(signum: int, frame: Any) -> None:
        unhandled.append(signum)

    previous = signal.signal(signal.SIGINT, outside)
    try:
        with pytest.raises(Preempted) as stopped:
            run(job, Options(on_progress=interrupt))
        assert signal.getsignal(signal.SIGINT) is outside  # after the loop, a Ctrl-C is the caller's again
    finally:
        signal.signal(signal.SIGINT, previous)
    assert unhandled == []
    # step 1's progress is reported after step 1's check, so the loop stops at the end of step 2
    assert str(stopped.value) == "stopped on Ctrl-C (SIGINT) at step 2; checkpoint committed"
    store = storage.Store((tmp_path / "out").as_uri())
    assert storage.list_checkpoints(store) == [2] and storage.verify(store, storage.checkpoint_prefix(2))[0]
    assert not store.exists("manifest.json")  # stopped, not finished


def test_a_second_ctrl_c_interrupts_at_once() -> None:
    preemption = Preemption()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    preemption.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert preemption.requested.is_set() and preemption.name == "Ctrl-C (SIGINT)"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        preemption.uninstall()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@slow
def test_a_failed_run_removes_its_scratch_and_a_given_scratch_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune.trainer.run import Options, run

    root = tmp_path / "tmpdir"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    seen: list[Path] = []

    def fail_once_training(message: str) -> None:
        if message.startswith("training:"):
            seen.extend(root.glob("kubetune-*"))
            raise RuntimeError("the node went away")

    job = _job(tmp_path, "fails", evaluation={"samples": 0, "compareBase": False})
    with pytest.raises(RuntimeError, match="the node went away"):
        run(job, Options(on_status=fail_once_training))
    assert len(seen) == 1 and list(root.glob("kubetune-*")) == []  # it existed, and is gone
    mine = tmp_path / "my-scratch"
    with pytest.raises(RuntimeError, match="the node went away"):
        run(job, Options(on_status=fail_once_training, scratch=mine))
    assert (mine / "run").is_dir()  # the caller's directory: left for the caller


def test_local_run_shows_no_step_bar_before_the_first_step(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kubetune run` in a terminal: status lines while validating and loading, the bar from step 1
    (it used to show `step 0/None` from the start)."""
    from kubetune.api.manifest import load_job
    from kubetune.localrun import run_locally
    from kubetune.trainer import run as run_module

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: render the live display as on a terminal
    monkeypatch.setenv("TTY_INTERACTIVE", "1")

    def fake_run(job: Any, opts: Any) -> dict[str, Any]:
        opts.on_status("loading the base model")
        time.sleep(1.2)  # a few refreshes of the live display (2 per second)
        opts.on_progress({"step": 1, "total": 3, "loss": 2.5, "tokens_per_s": 10.0, "eta": 1.0})
        time.sleep(0.6)
        return {
            "metrics": {},
            "steps": 1,
            "trainableParameters": 1,
            "durationSeconds": 1.0,
            "adapter": {"uri": "file:///x/adapter", "manifestUri": "file:///x/manifest.json"},
        }

    monkeypatch.setattr(run_module, "run", fake_run)
    assert run_locally(load_job(str(ROOT / "examples" / "quickstart.yaml")), "file:///x", -1) == 0
    err = capsys.readouterr().err
    assert "loading the base model" in err and "step 1/3" in err and "loss 2.5000" in err
    assert "None" not in err and "step 0/" not in err
