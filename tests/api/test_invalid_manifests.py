"""Invalid manifests are refused by the models *and* by the generated CRD, at the same field.

Each row mutates the canonical support-bot manifest. The models must report a problem at exactly
the expected wire path; the CRD (OpenAPI schema + CEL, offline) must report an error at or below
it. If one side accepts what the other refuses, the API and the CRD have drifted apart.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.api import parse_manifest

from tests.crd_offline import validate as crd_validate

CANONICAL: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-bot"},
    "spec": {
        "model": {"source": "hf://mistralai/Mistral-7B-v0.1"},
        "dataset": {"train": "s3://data/support/train.jsonl", "format": "chat"},
        "method": {
            "adaptation": "lora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["q_proj", "v_proj"]},
        },
        "hyperparameters": {"epochs": 3, "learningRate": 2e-4},
        "output": {"uri": "s3://models/support-bot"},
    },
}

DELETE = object()
G = {"name": "exact", "type": "stringCheck", "reference": "{{item.answer}}", "operation": "eq"}

# (id, {dotted path: new value or DELETE}, expected wire path of the problem)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("lora-rank-zero", {"spec.method.lora.r": 0}, "spec.method.lora.r"),
    ("lora-rank-string", {"spec.method.lora.r": "16"}, "spec.method.lora.r"),
    ("lora-dropout-one", {"spec.method.lora.dropout": 1.0}, "spec.method.lora.dropout"),
    ("lr-zero", {"spec.hyperparameters.learningRate": 0}, "spec.hyperparameters.learningRate"),
    ("lr-word", {"spec.hyperparameters.learningRate": "fast"}, "spec.hyperparameters.learningRate"),
    ("batch-zero", {"spec.hyperparameters.batchSize": 0}, "spec.hyperparameters.batchSize"),
    ("batch-word", {"spec.hyperparameters.batchSize": "many"}, "spec.hyperparameters.batchSize"),
    ("epochs-negative", {"spec.hyperparameters.epochs": -1}, "spec.hyperparameters.epochs"),
    ("split-zero", {"spec.dataset.validationSplit": 0}, "spec.dataset.validationSplit"),
    ("split-too-big", {"spec.dataset.validationSplit": 0.7}, "spec.dataset.validationSplit"),
    ("pii-unknown-policy", {"spec.dataset.pii": "mask"}, "spec.dataset.pii"),
    ("eval-regex-without-pattern", {"spec.evaluation.metrics": ["regex"]}, "spec.evaluation"),
    ("eval-unknown-metric", {"spec.evaluation.metrics": ["meteor"]}, "spec.evaluation.metrics[0]"),
    ("eval-negative-samples", {"spec.evaluation.samples": -1}, "spec.evaluation.samples"),
    (
        "judge-url-with-credentials",
        {"spec.evaluation.judge": {"url": "https://user:pw@api.example.com/v1", "model": "m"}},
        "spec.evaluation.judge.url",
    ),
    (
        "validation-and-split",
        {"spec.dataset.validation": "s3://data/val.jsonl", "spec.dataset.validationSplit": 0.1},
        "spec.dataset",
    ),
    ("prevalidate-word", {"spec.dataset.prevalidate": "yes"}, "spec.dataset.prevalidate"),
    ("workload-priority-without-queue", {"spec.scheduling.workloadPriorityClassName": "batch-low"}, "spec.scheduling"),
    ("format-csv", {"spec.dataset.format": "csv"}, "spec.dataset.format"),
    ("gpus-negative", {"spec.resources.gpus": -1}, "spec.resources.gpus"),
    ("memory-word", {"spec.resources.memory": "lots"}, "spec.resources.memory"),
    ("adaptation-typo", {"spec.method.adaptation": "lorax"}, "spec.method.adaptation"),
    ("block-for-other-adaptation", {"spec.method.qlora": {"r": 8}}, "spec.method"),
    ("optimizer-unknown", {"spec.method.optimizer": "sgd"}, "spec.method.optimizer"),
    ("objective-unknown", {"spec.method.objectives": [{"type": "distill"}]}, "spec.method.objectives[0].type"),
    ("distillation-without-block", {"spec.method.objectives": [{"type": "distillation"}]}, "spec.method.objectives[0]"),
    (
        "distillation-without-teacher",
        {"spec.method.objectives": [{"type": "distillation", "distillation": {"temperature": 2}}]},
        "spec.method.objectives[0].distillation.teacher",
    ),
    (
        "objective-block-mismatch",
        {"spec.method.objectives": [{"type": "adversarial", "reweighting": {}}]},
        "spec.method.objectives[0]",
    ),
    (
        "objective-twice",
        {"spec.method.objectives": [{"type": "adversarial"}, {"type": "adversarial"}]},
        "spec.method",
    ),
    (
        "guide-teacher-without-teacher",
        {"spec.method.objectives": [{"type": "attentionGuidance", "attentionGuidance": {"guide": "teacher"}}]},
        "spec.method.objectives[0].attentionGuidance",
    ),
    (
        "qlora-reweighting-vmap",
        {
            "spec.method": {
                "adaptation": "qlora",
                "objectives": [{"type": "reweighting", "reweighting": {"estimator": "vmap"}}],
            }
        },
        "spec.method",
    ),
    (
        "prompt-text-without-text",
        {"spec.method": {"adaptation": "promptTuning", "promptTuning": {"init": "text"}}},
        "spec.method.promptTuning",
    ),
    (
        "unfreeze-factor-below-one",
        {"spec.method": {"adaptation": "gradualUnfreeze", "gradualUnfreeze": {"discriminativeFactor": 0.5}}},
        "spec.method.gradualUnfreeze.discriminativeFactor",
    ),
    (
        "qlora-int8",
        {"spec.method": {"adaptation": "qlora", "qlora": {"quantType": "int8"}}},
        "spec.method.qlora.quantType",
    ),
    ("model-scheme", {"spec.model.source": "ftp://models/x"}, "spec.model.source"),
    ("model-missing", {"spec.model": DELETE}, "spec.model"),
    ("output-missing", {"spec.output": DELETE}, "spec.output"),
    ("unknown-hyperparameter", {"spec.hyperparameters.learningrate": 1e-4}, "spec.hyperparameters.learningrate"),
    ("unknown-spec-field", {"spec.epochs": 3}, "spec.epochs"),
    ("queue-name-invalid", {"spec.scheduling": {"queueName": "Team_A"}}, "spec.scheduling.queueName"),
    (
        "toleration-operator",
        {"spec.scheduling": {"tolerations": [{"key": "gpu", "operator": "Maybe"}]}},
        "spec.scheduling.tolerations[0].operator",
    ),
    ("checkpoint-every-zero", {"spec.checkpointing": {"everySteps": 0}}, "spec.checkpointing.everySteps"),
    ("retries-too-many", {"spec.maxRetries": 101}, "spec.maxRetries"),
    ("suffix-spaces", {"spec.suffix": "My Bot"}, "spec.suffix"),
    ("packing-word", {"spec.dataset.packing": "yes"}, "spec.dataset.packing"),
    ("deadline-zero", {"spec.activeDeadlineSeconds": 0}, "spec.activeDeadlineSeconds"),
    ("snake-case-field", {"spec.hyperparameters.learning_rate": 1e-4}, "spec.hyperparameters.learning_rate"),
    ("lr-auto", {"spec.hyperparameters.learningRate": "auto"}, "spec.hyperparameters.learningRate"),
    ("node-selector-key", {"spec.scheduling": {"nodeSelector": {"bad key": "v"}}}, "spec.scheduling.nodeSelector"),
    (
        "node-selector-value",
        {"spec.scheduling": {"nodeSelector": {"disk": "ssd!"}}},
        "spec.scheduling.nodeSelector.disk",
    ),
    (
        "toleration-key",
        {"spec.scheduling": {"tolerations": [{"key": "bad key", "operator": "Exists"}]}},
        "spec.scheduling.tolerations[0].key",
    ),
    (
        "toleration-empty-key-equal",
        {"spec.scheduling": {"tolerations": [{"operator": "Equal", "value": "x"}]}},
        "spec.scheduling.tolerations[0]",
    ),
    (
        "toleration-exists-with-value",
        {"spec.scheduling": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}},
        "spec.scheduling.tolerations[0]",
    ),
    (
        "toleration-seconds-without-noexecute",
        {"spec.scheduling": {"tolerations": [{"key": "gpu", "tolerationSeconds": 60}]}},
        "spec.scheduling.tolerations[0]",
    ),
    (
        "priority-class-invalid",
        {"spec.scheduling": {"priorityClassName": "High_Priority"}},
        "spec.scheduling.priorityClassName",
    ),
    ("scheduler-name-invalid", {"spec.scheduling": {"schedulerName": "my scheduler"}}, "spec.scheduling.schedulerName"),
    ("gpu-type-invalid", {"spec.resources": {"gpuType": "NVIDIA H100 80GB"}}, "spec.resources.gpuType"),
    ("gpu-resource-invalid", {"spec.resources": {"gpuResource": "nvidia.com/gpu/x"}}, "spec.resources.gpuResource"),
    (
        "packing-prefix-tuning",
        {"spec.method": {"adaptation": "prefixTuning"}, "spec.dataset.packing": True},
        "spec",
    ),
    (
        "merged-prompt-tuning",
        {"spec.method": {"adaptation": "promptTuning"}, "spec.output.format": "merged"},
        "spec",
    ),
    # spec.podOverrides: Kubernetes syntax, and nothing kubetune sets itself.
    ("pod-label-ours", {"spec.podOverrides": {"labels": {"kubetune.io/role": "x"}}}, "spec.podOverrides.labels"),
    (
        "pod-label-managed-by",
        {"spec.podOverrides": {"labels": {"app.kubernetes.io/managed-by": "me"}}},
        "spec.podOverrides.labels",
    ),
    ("pod-label-job-controller", {"spec.podOverrides": {"labels": {"job-name": "x"}}}, "spec.podOverrides.labels"),
    ("pod-label-key", {"spec.podOverrides": {"labels": {"bad key": "v"}}}, "spec.podOverrides.labels"),
    ("pod-label-value", {"spec.podOverrides": {"labels": {"team": "a b"}}}, "spec.podOverrides.labels.team"),
    (
        "pod-annotation-spec",
        {"spec.podOverrides": {"annotations": {"kubetune.io/spec": "{}"}}},
        "spec.podOverrides.annotations",
    ),
    (
        "pod-annotation-kueue",
        {"spec.podOverrides": {"annotations": {"kueue.x-k8s.io/queue-name": "q"}}},
        "spec.podOverrides.annotations",
    ),
    (
        "pod-annotation-prometheus",
        {"spec.podOverrides": {"annotations": {"prometheus.io/port": "1"}}},
        "spec.podOverrides.annotations",
    ),
    (
        "pod-annotation-value-long",
        {"spec.podOverrides": {"annotations": {"a": "x" * 2049}}},
        "spec.podOverrides.annotations.a",
    ),
    (
        "pod-annotations-too-many",
        {"spec.podOverrides": {"annotations": {f"a{i}": "x" for i in range(33)}}},
        "spec.podOverrides.annotations",
    ),
    (
        "pod-service-account",
        {"spec.podOverrides": {"serviceAccountName": "Trainer_SA"}},
        "spec.podOverrides.serviceAccountName",
    ),
    ("pod-runtime-class", {"spec.podOverrides": {"runtimeClassName": "gVisor"}}, "spec.podOverrides.runtimeClassName"),
    (
        "pod-pull-secret",
        {"spec.podOverrides": {"imagePullSecrets": [{"name": "my registry"}]}},
        "spec.podOverrides.imagePullSecrets[0].name",
    ),
    (
        "pod-pull-secret-string",
        {"spec.podOverrides": {"imagePullSecrets": ["regcred"]}},
        "spec.podOverrides.imagePullSecrets[0]",
    ),
    (
        "pod-env-home",
        {"spec.podOverrides": {"env": [{"name": "HOME", "value": "/root"}]}},
        "spec.podOverrides.env[0].name",
    ),
    (
        "pod-env-kubetune",
        {"spec.podOverrides": {"env": [{"name": "KUBETUNE_ALLOWED_OUTPUT_PREFIX", "value": ""}]}},
        "spec.podOverrides.env[0].name",
    ),
    (
        "pod-env-ld-preload",
        {"spec.podOverrides": {"env": [{"name": "LD_PRELOAD", "value": "/x.so"}]}},
        "spec.podOverrides.env[0].name",
    ),
    (
        "pod-env-pythonpath",
        {"spec.podOverrides": {"env": [{"name": "PYTHONPATH", "value": "/x"}]}},
        "spec.podOverrides.env[0].name",
    ),
    (
        "pod-env-gpus",
        {"spec.podOverrides": {"env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"}]}},
        "spec.podOverrides.env[0].name",
    ),
    ("pod-env-name", {"spec.podOverrides": {"env": [{"name": "1BAD", "value": "x"}]}}, "spec.podOverrides.env[0].name"),
    (
        "pod-env-twice",
        {"spec.podOverrides": {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}},
        "spec.podOverrides.env",
    ),
    (
        "pod-env-value-and-from",
        {
            "spec.podOverrides": {
                "env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
            }
        },
        "spec.podOverrides.env[0]",
    ),
    (
        "pod-env-two-sources",
        {
            "spec.podOverrides": {
                "env": [
                    {
                        "name": "A",
                        "valueFrom": {
                            "fieldRef": {"fieldPath": "metadata.name"},
                            "configMapKeyRef": {"name": "c", "key": "k"},
                        },
                    }
                ]
            }
        },
        "spec.podOverrides.env[0].valueFrom",
    ),
    (
        "pod-env-no-source",
        {"spec.podOverrides": {"env": [{"name": "A", "valueFrom": {}}]}},
        "spec.podOverrides.env[0].valueFrom",
    ),
    (
        "pod-env-field-path",
        {"spec.podOverrides": {"env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "spec.containers"}}}]}},
        "spec.podOverrides.env[0].valueFrom.fieldRef.fieldPath",
    ),
    (
        "pod-env-secret-key",
        {"spec.podOverrides": {"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "a b"}}}]}},
        "spec.podOverrides.env[0].valueFrom.secretKeyRef.key",
    ),
    (
        "pod-env-envfrom",
        {"spec.podOverrides": {"envFrom": [{"secretRef": {"name": "s"}}]}},
        "spec.podOverrides.envFrom",
    ),
    (
        "pod-env-credential-twice",
        {
            "spec.output.credentialsSecret": "s3-writer",
            "spec.podOverrides": {"env": [{"name": "AWS_ACCESS_KEY_ID", "value": "x"}]},
        },
        "spec.podOverrides",
    ),
    (
        "pod-volume-hostpath",
        {"spec.podOverrides": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}},
        "spec.podOverrides.volumes[0].hostPath",
    ),
    ("pod-volume-no-source", {"spec.podOverrides": {"volumes": [{"name": "v"}]}}, "spec.podOverrides.volumes[0]"),
    (
        "pod-volume-two-sources",
        {"spec.podOverrides": {"volumes": [{"name": "v", "emptyDir": {}, "secret": {"secretName": "s"}}]}},
        "spec.podOverrides.volumes[0]",
    ),
    (
        "pod-volume-ours",
        {"spec.podOverrides": {"volumes": [{"name": "scratch", "emptyDir": {}}]}},
        "spec.podOverrides.volumes[0].name",
    ),
    (
        "pod-volume-pvc-n",
        {"spec.podOverrides": {"volumes": [{"name": "pvc-0", "emptyDir": {}}]}},
        "spec.podOverrides.volumes[0].name",
    ),
    (
        "pod-volume-name",
        {"spec.podOverrides": {"volumes": [{"name": "My_Volume", "emptyDir": {}}]}},
        "spec.podOverrides.volumes[0].name",
    ),
    (
        "pod-volume-twice",
        {"spec.podOverrides": {"volumes": [{"name": "v", "emptyDir": {}}, {"name": "v", "emptyDir": {}}]}},
        "spec.podOverrides.volumes",
    ),
    (
        "pod-volume-medium",
        {"spec.podOverrides": {"volumes": [{"name": "v", "emptyDir": {"medium": "HugePages"}}]}},
        "spec.podOverrides.volumes[0].emptyDir.medium",
    ),
    (
        "pod-volume-size",
        {"spec.podOverrides": {"volumes": [{"name": "v", "emptyDir": {"sizeLimit": "lots"}}]}},
        "spec.podOverrides.volumes[0].emptyDir.sizeLimit",
    ),
    (
        "pod-volume-claim",
        {"spec.podOverrides": {"volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "My Claim"}}]}},
        "spec.podOverrides.volumes[0].persistentVolumeClaim.claimName",
    ),
    (
        "pod-volume-item-escapes",
        {
            "spec.podOverrides": {
                "volumes": [{"name": "v", "configMap": {"name": "c", "items": [{"key": "k", "path": "../k"}]}}]
            }
        },
        "spec.podOverrides.volumes[0].configMap.items[0].path",
    ),
    (
        "pod-volume-mode",
        {"spec.podOverrides": {"volumes": [{"name": "v", "secret": {"secretName": "s", "defaultMode": 4096}}]}},
        "spec.podOverrides.volumes[0].secret.defaultMode",
    ),
    (
        "pod-mount-undeclared",
        {"spec.podOverrides": {"volumeMounts": [{"name": "v", "mountPath": "/data"}]}},
        "spec.podOverrides.volumeMounts",
    ),
    *[
        (
            f"pod-mount-{case}",
            {
                "spec.podOverrides": {
                    "volumes": [{"name": "v", "emptyDir": {}}],
                    "volumeMounts": [{"name": "v", "mountPath": path}],
                }
            },
            "spec.podOverrides.volumeMounts[0].mountPath",
        )
        for case, path in [
            ("tmp", "/tmp"),
            ("in-pvc-root", "/mnt/pvc/models"),
            ("above-cache", "/cache"),
            ("root", "/"),
            ("relative", "data"),
            ("dot-dot", "/data/../etc"),
            ("trailing-slash", "/data/"),
            ("termination-log", "/dev/termination-log"),
        ]
    ],
    (
        "pod-mount-twice",
        {
            "spec.podOverrides": {
                "volumes": [{"name": "v", "emptyDir": {}}],
                "volumeMounts": [{"name": "v", "mountPath": "/a"}, {"name": "v", "mountPath": "/a"}],
            }
        },
        "spec.podOverrides.volumeMounts",
    ),
    (
        "pod-mount-sub-path",
        {
            "spec.podOverrides": {
                "volumes": [{"name": "v", "emptyDir": {}}],
                "volumeMounts": [{"name": "v", "mountPath": "/a", "subPath": "/abs"}],
            }
        },
        "spec.podOverrides.volumeMounts[0].subPath",
    ),
    (
        "pod-overrides-node-selector",
        {"spec.podOverrides": {"nodeSelector": {"a": "b"}}},
        "spec.podOverrides.nodeSelector",
    ),
    # spec.serving (issue 20): the block matches the engine; an endpoint needs its url, without credentials.
    ("serving-engine-unknown", {"spec.serving": {"engine": "triton"}}, "spec.serving.engine"),
    ("serving-block-mismatch", {"spec.serving": {"engine": "kserve", "vllm": {"gpus": 1}}}, "spec.serving"),
    ("serving-endpoint-without-block", {"spec.serving": {"engine": "vllmEndpoint"}}, "spec.serving"),
    (
        "serving-endpoint-url-credentials",
        {"spec.serving": {"engine": "vllmEndpoint", "vllmEndpoint": {"url": "http://user:pw@vllm.serving:8000"}}},
        "spec.serving.vllmEndpoint.url",
    ),
    ("serving-model-name", {"spec.serving": {"engine": "vllm", "modelName": "Support_Bot"}}, "spec.serving.modelName"),
    ("serving-replicas", {"spec.serving": {"engine": "vllm", "vllm": {"replicas": -1}}}, "spec.serving.vllm.replicas"),
    (
        "serving-prompt-tuning",
        {"spec.method": {"adaptation": "promptTuning"}, "spec.serving": {"engine": "vllm"}},
        "spec.serving",
    ),
    # Credentials in a URI (RELIABILITY O17): refused, never copied into the trainer Job.
    (
        "model-key-secret-with-slash",
        {"spec.model.source": "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@bucket/model"},
        "spec.model.source",
    ),
    ("output-token-only", {"spec.output.uri": "s3://TOKEN@models/support-bot"}, "spec.output.uri"),
    (
        "train-https-userinfo",
        {"spec.dataset.train": "https://user:pa/ss@data.example.com/train.jsonl"},
        "spec.dataset.train",
    ),
    ("validation-gs-userinfo", {"spec.dataset.validation": "gs://user:pa/ss@b/val.jsonl"}, "spec.dataset.validation"),
    (
        "model-hf-token",
        {"spec.model.source": "hf://hf_abcdefghijklmnopqrstuvwxyz0123@mistralai/Mistral-7B-v0.1"},
        "spec.model.source",
    ),
    (
        "teacher-userinfo",
        {
            "spec.method.objectives": [
                {"type": "distillation", "distillation": {"teacher": {"source": "gs://key:secret@teachers/big"}}}
            ]
        },
        "spec.method.objectives[0].distillation.teacher.source",
    ),
    # spec.method.type: dpo, orpo, kto, grpo (issue 19)
    ("type-unknown", {"spec.method.type": "ppo"}, "spec.method.type"),
    ("dpo-block-without-type", {"spec.method.dpo": {"beta": 0.1}}, "spec.method"),
    ("dpo-beta-zero", {"spec.method.type": "dpo", "spec.method.dpo": {"beta": 0}}, "spec.method.dpo.beta"),
    (
        "dpo-loss-unknown",
        {"spec.method.type": "dpo", "spec.method.dpo": {"lossType": "squared"}},
        "spec.method.dpo.lossType",
    ),
    (
        "dpo-smoothing-half",
        {"spec.method.type": "dpo", "spec.method.dpo": {"labelSmoothing": 0.5}},
        "spec.method.dpo.labelSmoothing",
    ),
    (
        "dpo-smoothing-ipo",
        {"spec.method.type": "dpo", "spec.method.dpo": {"lossType": "ipo", "labelSmoothing": 0.1}},
        "spec.method.dpo",
    ),
    (
        "kto-weight-zero",
        {"spec.method.type": "kto", "spec.method.kto": {"desirableWeight": 0}},
        "spec.method.kto.desirableWeight",
    ),
    ("orpo-block-on-dpo", {"spec.method.type": "dpo", "spec.method.orpo": {"beta": 0.1}}, "spec.method"),
    (
        "dpo-on-ia3",
        {"spec.method.type": "dpo", "spec.method.adaptation": "ia3", "spec.method.lora": DELETE},
        "spec.method",
    ),
    (
        "dpo-with-objective",
        {"spec.method.type": "dpo", "spec.method.objectives": [{"type": "adversarial"}]},
        "spec.method",
    ),
    ("dpo-format-text", {"spec.method.type": "dpo", "spec.dataset.format": "text"}, "spec"),
    ("dpo-packing", {"spec.method.type": "dpo", "spec.dataset.packing": True}, "spec"),
    ("grpo-without-block", {"spec.method.type": "grpo"}, "spec.method"),
    ("grpo-no-graders", {"spec.method.type": "grpo", "spec.method.grpo": {"graders": []}}, "spec.method.grpo.graders"),
    (
        "grpo-one-generation",
        {"spec.method.type": "grpo", "spec.method.grpo": {"numGenerations": 1, "graders": [G]}},
        "spec.method.grpo.numGenerations",
    ),
    (
        "grader-type-unknown",
        {"spec.method.type": "grpo", "spec.method.grpo": {"graders": [{"name": "a", "type": "scoreModel"}]}},
        "spec.method.grpo.graders[0].type",
    ),
    (
        "grader-string-check-no-operation",
        {
            "spec.method.type": "grpo",
            "spec.method.grpo": {"graders": [{"name": "a", "type": "stringCheck", "reference": "x"}]},
        },
        "spec.method.grpo.graders[0]",
    ),
    (
        "grader-operation-unknown",
        {
            "spec.method.type": "grpo",
            "spec.method.grpo": {
                "graders": [{"name": "a", "type": "stringCheck", "reference": "x", "operation": "gt"}]
            },
        },
        "spec.method.grpo.graders[0].operation",
    ),
    (
        "grader-metric-unknown",
        {
            "spec.method.type": "grpo",
            "spec.method.grpo": {
                "graders": [{"name": "a", "type": "textSimilarity", "reference": "x", "evaluationMetric": "meteor"}]
            },
        },
        "spec.method.grpo.graders[0].evaluationMetric",
    ),
    (
        "grader-pattern-on-string-check",
        {"spec.method.type": "grpo", "spec.method.grpo": {"graders": [dict(G, pattern="a")]}},
        "spec.method.grpo.graders[0]",
    ),
    (
        "grader-python-source-and-file",
        {
            "spec.method.type": "grpo",
            "spec.method.grpo": {
                "graders": [
                    {
                        "name": "p",
                        "type": "python",
                        "source": "def grade(s, i):\n    return 1.0\n",
                        "file": "/etc/grader/g.py",
                    }
                ]
            },
        },
        "spec.method.grpo.graders[0]",
    ),
    (
        "grader-python-relative-file",
        {
            "spec.method.type": "grpo",
            "spec.method.grpo": {"graders": [{"name": "p", "type": "python", "file": "g.py"}]},
        },
        "spec.method.grpo.graders[0].file",
    ),
    (
        "grader-names-twice",
        {"spec.method.type": "grpo", "spec.method.grpo": {"graders": [G, G]}},
        "spec.method.grpo.graders",
    ),
    (
        "grader-multi-without-graders",
        {"spec.method.type": "grpo", "spec.method.grpo": {"graders": [{"name": "m", "type": "multi"}]}},
        "spec.method.grpo.graders[0]",
    ),
    (
        "grader-multi-in-multi",
        {
            "spec.method.type": "grpo",
            "spec.method.grpo": {
                "graders": [{"name": "m", "type": "multi", "graders": [{"name": "n", "type": "multi"}]}]
            },
        },
        "spec.method.grpo.graders[0].graders[0]",
    ),
    (
        "grader-weight-negative",
        {"spec.method.type": "grpo", "spec.method.grpo": {"graders": [dict(G, weight=-1)]}},
        "spec.method.grpo.graders[0].weight",
    ),
]


def mutate(manifest: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(manifest)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(leaf)
        else:
            node[leaf] = value
    return out


def crd() -> dict[str, Any]:
    return yaml.safe_load(Path("crds/finetunejobs.kubetune.io.yaml").read_text())


def test_there_are_at_least_25_cases() -> None:
    assert len(CASES) >= 25


def test_canonical_is_valid_in_both() -> None:
    job, problems = parse_manifest(CANONICAL)
    assert problems == [] and job is not None
    assert crd_validate(crd(), CANONICAL) == []


@pytest.mark.parametrize(("changes", "path"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_models_reject_at_path(changes: dict[str, Any], path: str) -> None:
    job, problems = parse_manifest(mutate(CANONICAL, changes))
    assert job is None
    assert path in [p.path for p in problems], problems
    for p in problems:
        assert p.message and "Traceback" not in p.message


@pytest.mark.parametrize(("changes", "path"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_crd_rejects_at_path(changes: dict[str, Any], path: str) -> None:
    errors = crd_validate(crd(), mutate(CANONICAL, changes))
    assert errors, "the CRD accepts what the models refuse"
    assert any(e.path == path or e.path.startswith(path + ".") or e.path.startswith(path + "[") for e in errors), errors


def test_cli_reports_each_case_with_path(tmp_path: Path) -> None:
    """`kubetune validate` exits 1 and prints FILE: path: message for every invalid fixture."""
    files = []
    for case_id, changes, path in CASES:
        f = tmp_path / f"{case_id}.yaml"
        f.write_text(yaml.safe_dump(mutate(CANONICAL, changes)))
        files.append((f, path))
    run = subprocess.run(
        [sys.executable, "-m", "kubetune.cli", "validate", *(str(f) for f, _ in files)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1, run.stdout
    assert "Traceback" not in run.stdout + run.stderr
    for f, path in files:
        assert f"{f}: {path}: " in run.stdout, (f, path, run.stdout)
        assert f"{f}: ok" not in run.stdout
