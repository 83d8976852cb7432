"""Every Prometheus metric the trainer exports, in one place.

The operator scrapes these from the pod to fill `.status.progress` and `.status.metrics`, and
Prometheus scrapes the same endpoint. Names follow Prometheus conventions: `_total` for
counters, `_seconds` / `_bytes` / `_watts` / `_joules` for units, `_ratio` for 0..1 values.
The registry is private (not the global default) so several trainers can run in one test process.
The names live in `kubetune.api.contract.TrainerMetric`, which the operator reads them by.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune.api.contract import GENERATION_LABELS, OBJECTIVE_LABEL
from kubetune.api.contract import TrainerMetric as M
from kubetune.api.status import ResolvedHyperparameters
from prometheus_client import CollectorRegistry, Counter, Gauge, Info, start_http_server


class TrainerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.step = Gauge(M.STEP.family, "Optimizer steps completed", registry=r)
        self.total_steps = Gauge(M.TOTAL_STEPS.family, "Optimizer steps planned", registry=r)
        self.epoch = Gauge(M.EPOCH.family, "Fractional epoch reached", registry=r)
        self.train_loss = Gauge(M.TRAIN_LOSS.family, "Latest training loss", registry=r)
        self.eval_loss = Gauge(M.EVAL_LOSS.family, "Held-out loss of the model being trained", registry=r)
        self.base_eval_loss = Gauge(
            M.BASE_EVAL_LOSS.family, "Held-out loss of the base model before training", registry=r
        )
        self.token_accuracy = Gauge(
            M.TOKEN_ACCURACY.family, "Share of held-out label tokens predicted exactly", registry=r
        )
        self.learning_rate = Gauge(M.LEARNING_RATE.family, "Current learning rate", registry=r)
        self.tokens_per_second = Gauge(
            M.TOKENS_PER_SECOND.family, "Non-padding training tokens per second (recent window)", registry=r
        )
        self.samples_per_second = Gauge(
            M.SAMPLES_PER_SECOND.family, "Training examples per second (recent window)", registry=r
        )
        self.progress = Gauge(M.PROGRESS.family, "Share of planned steps done, 0..1", registry=r)
        self.eta = Gauge(M.ETA.family, "Estimated seconds until training ends", registry=r)
        self.tokens = Counter(M.TOKENS.family, "Non-padding tokens trained on", registry=r)
        self.last_checkpoint_step = Gauge(
            M.LAST_CHECKPOINT_STEP.family, "Step of the newest committed checkpoint", registry=r
        )
        self.last_checkpoint_time = Gauge(
            M.LAST_CHECKPOINT_TIME.family, "Unix time the newest checkpoint was committed", registry=r
        )
        self.checkpoint_stall = Gauge(
            M.CHECKPOINT_STALL.family, "Seconds the training loop waited for the latest checkpoint save", registry=r
        )
        self.checkpoint_upload = Gauge(
            M.CHECKPOINT_UPLOAD.family,
            "Seconds the latest checkpoint upload took (off the training thread)",
            registry=r,
        )
        self.gpu_memory = Gauge(M.GPU_MEMORY.family, "Peak GPU memory allocated by this process", registry=r)
        self.gpu_power = Gauge(M.GPU_POWER.family, "GPU power draw (NVML), summed over this pod's GPUs", registry=r)
        self.gpu_energy = Counter(
            M.GPU_ENERGY.family, "GPU energy used (NVML), summed over this pod's GPUs", registry=r
        )
        self.objective = Gauge(
            M.OBJECTIVE.family, "Per-objective numbers (KD loss, adversarial KL, …)", [OBJECTIVE_LABEL], registry=r
        )
        self.generation_score = Gauge(
            M.GENERATION_SCORE.family,
            "Mean 0..1 score of sample answers by model (base, tuned) and metric",
            list(GENERATION_LABELS),
            registry=r,
        )
        self.start_time = Gauge(M.START_TIME.family, "Unix time training started", registry=r)
        self.effective = Info(
            M.EFFECTIVE.family, "The hyperparameters the trainer resolved from auto and the defaults", registry=r
        )

    def set_effective(self, resolved: Mapping[str, Any]) -> None:
        """Export the resolved hyperparameters (`hparams.resolve`) as labels named after the
        ResolvedHyperparameters fields, so `status.effective` shows them while the run is young."""
        values = ResolvedHyperparameters.model_validate(resolved).model_dump(exclude_none=True)
        labels = {}
        for name, value in values.items():
            if isinstance(value, list):  # target lists: comma-separated, or left to the summary when the
                value = ",".join(value)  # operator's 64-character label cut would shorten a name
                if len(value) > 64:
                    continue
            labels[name] = str(value)
        self.effective.info(labels)

    def serve(self, port: int, addr: str = "0.0.0.0") -> object:
        """Serve /metrics on `port` (0 picks a free one; the bound port is returned)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
