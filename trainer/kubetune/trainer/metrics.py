"""Every Prometheus metric the trainer exports, in one place.

The operator scrapes these from the pod to fill `.status.progress` and `.status.metrics`, and
Prometheus scrapes the same endpoint. Names follow Prometheus conventions: `_total` for
counters, `_seconds` / `_bytes` / `_watts` / `_joules` for units, `_ratio` for 0..1 values.
The registry is private (not the global default) so several trainers can run in one test process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

P = "kubetune_trainer_"


class TrainerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.step = Gauge(P + "step", "Optimizer steps completed", registry=r)
        self.total_steps = Gauge(P + "total_steps", "Optimizer steps planned", registry=r)
        self.epoch = Gauge(P + "epoch", "Fractional epoch reached", registry=r)
        self.train_loss = Gauge(P + "train_loss", "Latest training loss", registry=r)
        self.eval_loss = Gauge(P + "eval_loss", "Held-out loss of the model being trained", registry=r)
        self.base_eval_loss = Gauge(P + "base_eval_loss", "Held-out loss of the base model before training", registry=r)
        self.token_accuracy = Gauge(P + "eval_token_accuracy_ratio", "Share of held-out label tokens predicted exactly", registry=r)
        self.learning_rate = Gauge(P + "learning_rate", "Current learning rate", registry=r)
        self.tokens_per_second = Gauge(P + "tokens_per_second", "Non-padding training tokens per second (recent window)", registry=r)
        self.samples_per_second = Gauge(P + "samples_per_second", "Training examples per second (recent window)", registry=r)
        self.progress = Gauge(P + "progress_ratio", "Share of planned steps done, 0..1", registry=r)
        self.eta = Gauge(P + "eta_seconds", "Estimated seconds until training ends", registry=r)
        self.tokens = Counter(P + "tokens", "Non-padding tokens trained on", registry=r)
        self.last_checkpoint_step = Gauge(P + "last_checkpoint_step", "Step of the newest committed checkpoint", registry=r)
        self.last_checkpoint_time = Gauge(
            P + "last_checkpoint_timestamp_seconds", "Unix time the newest checkpoint was committed", registry=r
        )
        self.checkpoint_stall = Gauge(
            P + "checkpoint_stall_seconds", "Seconds the training loop waited for the latest checkpoint save", registry=r
        )
        self.checkpoint_upload = Gauge(
            P + "checkpoint_upload_seconds", "Seconds the latest checkpoint upload took (off the training thread)", registry=r
        )
        self.gpu_memory = Gauge(P + "gpu_memory_bytes", "Peak GPU memory allocated by this process", registry=r)
        self.gpu_power = Gauge(P + "gpu_power_watts", "GPU power draw (NVML), summed over this pod's GPUs", registry=r)
        self.gpu_energy = Counter(P + "gpu_energy_joules", "GPU energy used (NVML), summed over this pod's GPUs", registry=r)
        self.objective = Gauge(P + "objective_value", "Per-objective numbers (KD loss, adversarial KL, …)", ["name"], registry=r)
        self.start_time = Gauge(P + "start_timestamp_seconds", "Unix time training started", registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> object:
        """Serve /metrics on `port` (0 picks a free one; the bound port is returned)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
