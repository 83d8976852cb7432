"""kubetune.gateway: `kubetune api`, the OpenAI fine-tuning API served by kubetune.

Teams with OpenAI-format datasets and code written against the `openai` client point `base_url`
here: files → fine-tuning jobs → events → checkpoints → models, on a cluster (FineTuneJobs, part
of `gateway.kube`) or on one machine (`gateway.local`, the embedded default). The HTTP layer
(`gateway.app`) speaks only to the `gateway.backend.Backend` protocol; both backends translate
between OpenAI's objects (`gateway.objects`) and FineTuneJobs with `gateway.translate`.

Base-install side: nothing here imports torch, transformers, peft, kopf or the trainer (an
import-linter contract keeps it so); the trainer runs in a worker process.
"""
