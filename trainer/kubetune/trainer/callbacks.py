"""Hooks into the transformers Trainer loop: metrics, progress, checkpoints, preemption.

The Trainer owns the loop; these callbacks observe it. Checkpoints are written locally by the
Trainer and uploaded by a background thread, so the loop stalls only for the local save. A
SIGTERM (preemption, `kubectl delete pod`, Kueue eviction) asks the loop to save and stop at the
end of the current step; the caller then waits for the upload and exits with a retriable code.
"""

from __future__ import annotations

import logging
import math
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from kubetune.trainer.metrics import TrainerMetrics
from transformers import TrainerCallback

log = logging.getLogger("kubetune.trainer")
steps_log = logging.getLogger("kubetune.trainer.steps")
"""One INFO line per logged step (step, loss, learning rate, tokens/s): the pod's log shows the run
moving. `kubetune run` shows a progress bar instead and enables these lines only without a terminal."""


class TokenCounter:
    """Counts non-padding tokens the collator hands to the loop (for tokens/s)."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.collate = collate
        self.tokens = 0
        self.samples = 0

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        batch = self.collate(features)
        self.samples += len(features)
        self.tokens += sum(_tokens(f) for f in features)
        return batch


def _tokens(feature: Any) -> int:
    """Tokens of one feature: its input_ids, or TRL's tokenised parts (prompt_ids, chosen_ids, …);
    0 for GRPO's untokenised prompts (their completions are generated inside the step)."""
    if not isinstance(feature, dict):
        return len(feature.input_ids)
    if "input_ids" in feature:
        return len(feature["input_ids"])
    return sum(len(v) for k, v in feature.items() if k.endswith("_ids") and isinstance(v, list))


class Preemption:
    """SIGTERM (preemption) or Ctrl-C (SIGINT) → save a checkpoint at the end of this step and stop.

    A second Ctrl-C interrupts at once (KeyboardInterrupt), as a terminal user expects when the
    step is long. `uninstall` puts the previous handlers back once the loop is over, so a Ctrl-C
    during the final evaluation or the upload is an ordinary interrupt, not a request nobody reads.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    NAMES: ClassVar[dict[int, str]] = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        """What stopped the run, for messages ("SIGTERM", "Ctrl-C (SIGINT)")."""
        return self.NAMES.get(self.signal, "SIGTERM") if self.signal is not None else "SIGTERM"

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self.requested.is_set():
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
            log.warning(
                "Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again stops at once)"
            )
        if self.signal is None:
            self.signal = signum
        self.requested.set()


class GpuMonitor:
    """GPU memory from torch, power and energy from NVML (nvidia-ml-py) when a GPU is present.

    Energy is the driver's total-energy counter (mJ) where the GPU has one, else power × time.
    Without a GPU or NVML this does nothing: metrics must never break training.
    """

    def __init__(self, metrics: TrainerMetrics) -> None:
        self.metrics = metrics
        self.nvml: Any = None
        self.handles: list[Any] = []
        self.last: tuple[float, float | None] | None = None  # (time, total energy mJ)
        self.joules = 0.0
        try:
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml
                self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as err:  # no driver, no library: report nothing rather than fail
            log.debug("NVML unavailable: %s", err)

    def sample(self) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                self.metrics.gpu_memory.set(torch.cuda.max_memory_allocated())
            if self.nvml is None:
                return
            now = time.time()
            watts = sum(self.nvml.nvmlDeviceGetPowerUsage(h) for h in self.handles) / 1000.0
            self.metrics.gpu_power.set(watts)
            try:
                total_mj: float | None = float(
                    sum(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles)
                )
            except Exception:
                total_mj = None
            if self.last is not None:
                t0, mj0 = self.last
                delta = (total_mj - mj0) / 1000.0 if total_mj is not None and mj0 is not None else watts * (now - t0)
                if delta > 0:
                    self.joules += delta
                    self.metrics.gpu_energy.inc(delta)
            self.last = (now, total_mj)
        except Exception as err:
            log.debug("GPU sampling failed: %s", err)


class LoopCallback(TrainerCallback):
    """Metrics, progress display and the preemption check, once per optimizer step; a log line
    (`steps_log`) per logging step."""

    def __init__(
        self,
        metrics: TrainerMetrics,
        tokens: TokenCounter,
        preemption: Preemption,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        evaluate: Callable[[], dict[str, float]] | None = None,
        eval_every: int | None = None,
    ) -> None:
        self.metrics = metrics
        self.tokens = tokens
        self.preemption = preemption
        self.on_progress = on_progress
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.window: list[tuple[float, int, int]] = []
        self.started = time.time()
        self.last_loss: float | None = None
        self.losses: list[tuple[int, float]] = []
        self.learning_rates: list[tuple[int, float]] = []  # for report.html's schedule plot
        self.throughput: list[tuple[int, float]] = []  # (step, tokens/s over the recent window)
        self.eval_losses: list[tuple[int, float]] = []
        self.step_end_time: dict[int, float] = {}
        self.step_seconds: list[float] = []
        self.tokens_per_second: float | None = None  # over the recent window, at the last step end
        self.pending_progress: dict[str, Any] | None = None  # this step's, until its loss is logged
        self.gpu = GpuMonitor(metrics)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.started = time.time()
        self.metrics.start_time.set(self.started)
        self.metrics.total_steps.set(state.max_steps)
        self.window = [(time.time(), self.tokens.tokens, self.tokens.samples)]
        if state.global_step > 0:  # resumed: transformers restored the checkpoint's state
            self.restore_history(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        now = time.time()
        previous = self.step_end_time.get(state.global_step - 1)
        if previous is not None:
            self.step_seconds.append(now - previous)
        self.step_end_time[state.global_step] = now
        self.window.append((now, self.tokens.tokens, self.tokens.samples))
        self.window = self.window[-20:]
        t0, tok0, s0 = self.window[0]
        elapsed = max(now - t0, 1e-9)
        tps, sps = (self.tokens.tokens - tok0) / elapsed, (self.tokens.samples - s0) / elapsed
        self.tokens_per_second = tps
        m = self.metrics
        m.step.set(state.global_step)
        m.epoch.set(state.epoch or 0)
        m.tokens_per_second.set(tps)
        if len(self.window) > 1:
            self.throughput.append((state.global_step, tps))
        m.samples_per_second.set(sps)
        m.tokens.inc(max(0, self.tokens.tokens - int(m.tokens._value.get())))
        done = state.global_step / max(state.max_steps, 1)
        m.progress.set(done)
        per_step = (now - self.started) / max(state.global_step - getattr(self, "first_step", 0), 1)
        eta = per_step * (state.max_steps - state.global_step)
        m.eta.set(eta)
        self.gpu.sample()
        if self.eval_every and self.evaluate and state.global_step % self.eval_every == 0:
            self.evaluate()
        progress = {
            "step": state.global_step,
            "total": state.max_steps,
            "loss": self.last_loss,
            "tokens_per_s": tps,
            "eta": eta,
        }
        if control.should_log:  # the Trainer logs this step's loss next (on_log): report progress with it
            self.pending_progress = progress
        elif self.on_progress:
            self.on_progress(progress)
        if self.preemption.requested.is_set():
            log.warning(
                "%s received: saving a checkpoint at step %d and stopping", self.preemption.name, state.global_step
            )
            control.should_save = True
            control.should_training_stop = True

    def on_train_begin_resume(self, step: int) -> None:
        self.first_step = step

    def restore_history(self, state: Any) -> None:
        """The loss, learning-rate and eval-loss history up to a resumed checkpoint, from its
        trainer state's log (training_log.json and report.html keep the whole run)."""
        step = state.global_step
        history = [e for e in state.log_history if isinstance(e, dict) and int(e.get("step", step + 1)) <= step]
        self.losses = [(int(e["step"]), float(e["loss"])) for e in history if "loss" in e and math.isfinite(e["loss"])]
        self.learning_rates = [(int(e["step"]), float(e["learning_rate"])) for e in history if "learning_rate" in e]
        self.eval_losses = [(int(e["step"]), float(e["eval_loss"])) for e in history if "eval_loss" in e]
        if self.losses:
            self.last_loss = self.losses[-1][1]
            self.metrics.train_loss.set(self.last_loss)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        logs = logs or {}
        if "loss" in logs and math.isfinite(logs["loss"]):
            self.last_loss = float(logs["loss"])
            self.losses.append((state.global_step, self.last_loss))
            self.metrics.train_loss.set(self.last_loss)
        if "learning_rate" in logs:
            self.metrics.learning_rate.set(float(logs["learning_rate"]))
            self.learning_rates.append((state.global_step, float(logs["learning_rate"])))
        if "loss" in logs and getattr(state, "is_local_process_zero", True):  # a step's log, once per pod
            steps_log.info(
                "%s",
                step_line(
                    state.global_step,
                    state.max_steps,
                    logs.get("loss"),
                    logs.get("learning_rate"),
                    self.tokens_per_second,
                ),
            )
        if self.pending_progress is not None:
            progress, self.pending_progress = {**self.pending_progress, "loss": self.last_loss}, None
            if self.on_progress:
                self.on_progress(progress)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.pending_progress is not None and self.on_progress:  # a step whose log never came
            self.on_progress(self.pending_progress)
        self.pending_progress = None

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.eval_every and self.evaluate and state.global_step < state.max_steps:
            self.evaluate()


def step_line(step: int, total: int, loss: float | None, lr: float | None, tokens_per_second: float | None) -> str:
    """`step 3/40 loss 2.1234 lr 2.9e-03 tokens/s 1,234`; a dash for what is not known."""

    def number(value: float | None, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "–"

    return (
        f"step {step}/{total} loss {number(loss, '.4f')} lr {number(lr, '.2e')} "
        f"tokens/s {number(tokens_per_second, ',.0f')}"
    )


class CheckpointUploader(TrainerCallback):
    """Uploads each local checkpoint in the background, then commits its manifest and prunes."""

    def __init__(
        self,
        commit: Callable[[Path, int], str],
        prune: Callable[[], object],
        metrics: TrainerMetrics,
        loop: LoopCallback,
    ) -> None:
        self.commit = commit
        self.prune = prune
        self.metrics = metrics
        self.loop = loop
        self.queue: queue.Queue[tuple[Path, int] | None] = queue.Queue()
        self.committed: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self.stalls: list[float] = []
        self.thread = threading.Thread(target=self._work, name="checkpoint-upload", daemon=True)
        self.thread.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            # The last step is always checkpointed: if committing the result fails, a rerun
            # resumes from it and only evaluates and commits (nothing trained is lost).
            control.should_save = True

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not state.is_world_process_zero:
            return  # under torchrun only global rank 0 writes checkpoints (and so uploads them)
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        stall = time.time() - self.loop.step_end_time.get(step, time.time())
        self.stalls.append(stall)
        self.metrics.checkpoint_stall.set(stall)
        if self.errors:  # surface a failed upload on the training thread
            raise self.errors[0]
        self.queue.put((local, step))

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            local, step = item
            started = time.time()
            try:
                uri = self.commit(local, step)
                self.metrics.checkpoint_upload.set(time.time() - started)
                self.metrics.last_checkpoint_step.set(step)
                self.metrics.last_checkpoint_time.set(time.time())
                loss = next((value for s, value in reversed(self.loop.losses) if s <= step), None)
                self.committed.append({"step": step, "uri": uri, "loss": loss, "time": _now()})
                self.prune()
                shutil.rmtree(local, ignore_errors=True)
            except BaseException as err:  # kept and re-raised on the training thread
                log.error("checkpoint %d upload failed: %s", step, err)
                self.errors.append(err)

    def finish(self, timeout: float | None = None) -> None:
        """Wait until every queued checkpoint is committed; re-raise an upload error."""
        self.queue.put(None)
        self.thread.join(timeout)
        if self.errors:
            raise self.errors[0]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
