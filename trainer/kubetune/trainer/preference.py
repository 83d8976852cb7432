"""Preference and reinforcement fine-tuning (spec.method.type dpo, orpo, kto, grpo) with TRL.

The losses are TRL's (DPOTrainer, ORPOTrainer from trl.experimental, KTOTrainer, GRPOTrainer);
this module configures them from the spec and keeps what the supervised path has: our optimizer
and parameter groups, our callbacks (metrics, checkpoint upload, SIGTERM, resume), the data
checked before the model loads (prefdata.py), the chat template (ChatML when the tokenizer has
none), and a held-out base-vs-tuned comparison:

- dpo, orpo, kto: preference accuracy, the share of held-out pairs whose preferred answer the
  model gives the higher length-normalised log-probability (mean over the completion tokens, as
  ORPO's P(y)): a number the base model has too, unlike DPO's implicit reward, which is 0 for both
  answers before training; sums would mostly compare lengths. KTO's unpaired records are paired
  per prompt (a desirable and an undesirable answer to the same prompt).
- grpo: the mean grader reward of greedy completions of the held-out prompts.

Logits. No preference type holds the [batch, seq, vocab] logits of a batch: TRL 1.16's DPOTrainer and
KTOTrainer compute the completion log-probs (and the mean logits of their metrics, KTO's KL
pairs, the reference's) with their fused LM head (`add_fused_lm_head`: tiles of 4 096 tokens ×
32 768 vocabulary entries; Triton on GPU, plain torch elsewhere) and are used as they are;
ORPOTrainer would take the model's full logits, so `_chunked_orpo` replaces its forward with
kubetune.trainer.chunked. The held-out comparison scores one sequence at a time, chunked too.

Reference model. With a PEFT adaptation (lora, qlora, dora) the reference is the base with the
adapter disabled: TRL 1.16 copies a trainable adapter handed to it into a second `ref` adapter,
which for a freshly initialised adapter computes the same as the base; `_drop_ref_adapter` removes
it again, so TRL disables the adapter instead and no second copy exists. With full fine-tuning
TRL loads a frozen copy of the base from the same files (estimate.py counts it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune.api.enums import TrainingType

log = logging.getLogger("kubetune.trainer")

LOGGED = (
    "reward",
    "reward_std",
    "kl",
    "completions/mean_length",
    "completions/clipped_ratio",
    "log_odds_ratio",
    "nll_loss",
)
"""TRL log keys reported as training numbers (with every `rewards/…` key)."""


def metric_name(key: str) -> str:
    """A TRL log key as a status/metrics name: rewards/chosen → rewardsChosen, completions/mean_length
    → completionsMeanLength, reward_std → rewardStd; a grader's rewards/<name>/mean → reward/<name>/mean."""
    parts = key.split("/")
    if parts[0] == "rewards" and len(parts) == 3:
        return f"reward/{parts[1]}/{parts[2]}"
    words = [w for p in parts for w in p.split("_") if w]
    return words[0] + "".join(w[:1].upper() + w[1:] for w in words[1:])


def ensure_chat_template(tokenizer: Any) -> None:
    """TRL renders conversational rows with the tokenizer's chat template: ChatML when it has none,
    as kubetune.trainer.data does for supervised chat examples."""
    from kubetune.trainer import data

    data.ensure_chat_template(tokenizer)


def rows(records: list[Any], kind: TrainingType) -> list[dict[str, Any]]:
    """TRL rows of valid records; raises data.DataError (FILE:LINE) when conversational (message
    list) and plain (string) prompts are mixed: TRL formats a dataset one way or the other."""
    from kubetune.trainer import data, prefdata

    out = [prefdata.row(r.data, kind) for r in records]
    first = None
    problems = []
    for record, row in zip(records, out):
        chat = isinstance(row["prompt"], list)
        if first is None:
            first = (record, chat)
        elif chat != first[1]:
            what = ("messages", "a plain string") if chat else ("a plain string", "messages")
            problems.append(
                data.DataProblem(
                    record.file,
                    record.line,
                    (
                        f"the prompt is {what[0]} but {first[0].file}:{first[0].line} has {what[1]}; use one form for the whole "
                        "dataset (conversational: message lists; plain: strings)"
                    ),
                )
            )
    if problems:
        raise data.DataError(problems)
    return out


# --------------------------------------------------------------------------- the trainer


def training_args(spec: Any, eff: dict[str, Any], out: Path, use_cpu: bool, schedulers: dict[str, str]) -> Any:
    """The TRL config of the job's type, with the same training arguments as supervised runs."""
    hp, kind, cfg = spec.hyperparameters, spec.method.training_type, spec.method.training()
    batch = eff["batchSize"]
    common: dict[str, Any] = dict(
        output_dir=str(out),
        num_train_epochs=eff["epochs"],
        max_steps=hp.max_steps or -1,
        learning_rate=eff["learningRate"],
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        gradient_accumulation_steps=eff["gradientAccumulation"],
        warmup_steps=hp.warmup_ratio,
        lr_scheduler_type=schedulers[str(hp.scheduler)],
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        seed=hp.seed,
        data_seed=hp.seed,
        bf16=eff["precision"] in ("bf16", "pureBf16"),
        fp16=eff["precision"] == "fp16",
        activation_checkpointing=hp.gradient_checkpointing,  # transformers 5's name (the old one warns)
        logging_steps=1,
        save_strategy="steps",
        save_steps=spec.checkpointing.every_steps,
        save_total_limit=None,
        save_only_model=False,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=use_cpu,
        eval_strategy="no",
    )
    max_len = spec.dataset.max_seq_length
    if kind == TrainingType.DPO:
        from trl import DPOConfig

        return DPOConfig(
            **common,
            beta=cfg.beta,
            loss_type=[str(cfg.loss_type)],
            label_smoothing=cfg.label_smoothing,
            max_length=max_len,
            precompute_ref_log_probs=False,
        )
    if kind == TrainingType.ORPO:
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig(**common, beta=cfg.beta, max_length=max_len)
    if kind == TrainingType.KTO:
        from trl import KTOConfig

        return KTOConfig(
            **common,
            beta=cfg.beta,
            desirable_weight=cfg.desirable_weight,
            undesirable_weight=cfg.undesirable_weight,
            max_length=max_len,
        )
    from trl import GRPOConfig

    g = cfg.num_generations
    common["per_device_train_batch_size"] = max(1, batch // g) * g  # whole groups per batch
    common["per_device_eval_batch_size"] = common["per_device_train_batch_size"]
    return GRPOConfig(
        **common,
        num_generations=g,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        reward_weights=[gr.weight for gr in cfg.graders],
        shuffle_dataset=True,
        log_completions=False,
    )


def build_trainer(
    spec: Any,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    args: Any,
    callbacks: list[Any],
    optimizer: Any,
    scorers: list[Any],
    ref_model: Any = None,
) -> Any:
    """The TRL trainer of the job's type around `model` (a PeftModel or the full model)."""
    from datasets import Dataset

    kind = spec.method.training_type
    train = Dataset.from_list(train_rows)
    common = dict(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizers=(optimizer, None),
    )
    if kind == TrainingType.DPO:
        from trl import DPOTrainer

        if spec.method.dpo is not None and spec.method.dpo.reference_free:
            trainer = _reference_free_dpo()(**common)
            trainer.ref_model = None  # full fine-tuning: TRL loaded a copy the loss never reads
        else:
            trainer = DPOTrainer(**common, ref_model=ref_model)
    elif kind == TrainingType.ORPO:
        trainer = _chunked_orpo()(**common)
    elif kind == TrainingType.KTO:
        from trl import KTOTrainer

        _refuse_head_adapter(model)
        trainer = KTOTrainer(**common, ref_model=ref_model)
    else:
        from kubetune.trainer import graders
        from trl import GRPOTrainer
        from trl.trainer.grpo_trainer import RewardFunc

        keys = sorted({k for r in train_rows for k in r if k != "prompt"})
        funcs: list[RewardFunc] = [graders.reward_function(s, keys) for s in scorers]
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=funcs,
            args=args,
            train_dataset=train,
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=(optimizer, None),
        )
    _drop_ref_adapter(trainer.model)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _refuse_head_adapter(model: Any) -> None:
    """KTO scores through TRL's fused LM head, which multiplies by `lm_head.weight` directly: an adapter
    on the head would be silently ignored (never applied, never trained). TRL 1.16's DPOTrainer raises
    for this; its KTOTrainer does not, so we do. (ORPO's chunked forward calls the wrapped head.)"""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a trainer dependency
        return
    get = getattr(model, "get_output_embeddings", None)
    if callable(get) and isinstance(get(), BaseTunerLayer):
        raise ValueError(
            "method.type kto cannot adapt the LM head: TRL computes the log-probabilities from the head's "
            "base weight, so the adapter would never be applied or trained; remove lm_head from "
            "targetModules"
        )


def _drop_ref_adapter(model: Any) -> None:
    """Remove the `ref` adapter TRL copies from a fresh adapter: the reference is then the base with
    the adapter disabled (TRL's `use_adapter(model, None)`), with no second adapter in memory."""
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict) and "ref" in config:
        model.delete_adapter("ref")
        model.set_adapter("default")


def _reference_free_dpo() -> type:
    """DPOTrainer with log π_ref = 0 (TRL 1.16's DPOConfig has no reference-free switch): each batch
    carries zero reference log-probabilities through TRL's precomputed-reference path, so no
    reference forward pass runs."""
    import torch
    from trl import DPOTrainer

    class ReferenceFreeDPOTrainer(DPOTrainer):
        def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
            zeros = torch.zeros(inputs["input_ids"].shape[0] // 2, device=inputs["input_ids"].device)
            inputs = {**inputs, "ref_chosen_logps": zeros, "ref_rejected_logps": zeros}
            self.precompute_ref_logps = True
            try:
                return super()._compute_loss(model, inputs, return_outputs)
            finally:
                self.precompute_ref_logps = False

    return ReferenceFreeDPOTrainer


def _chunked_orpo() -> type:
    """ORPOTrainer whose forward never holds the [batch, seq, vocab] logits (kubetune.trainer.chunked).

    TRL 1.16's experimental ORPOTrainer.concatenated_forward takes `outputs.logits` whole and
    derives everything from them: the mean completion log-prob of each answer (`get_batch_logps`,
    average_log_prob=True), the NLL of the chosen rows over prompt and answer (ORPO's SFT term), and
    the mean logits of the chosen and rejected halves (`logits/chosen|rejected`). Only that method
    is replaced; TRL's odds-ratio loss, metrics and the rest are kept. Here the model runs with
    `logits_to_keep` = no position and, from the last hidden state:

    - one chunked, checkpointed pass projects every row either term needs (a chosen row's answer
      tokens serve both) and gives its token log-prob; the mean completion log-probs and the NLL
      (mean over the chosen rows' attended tokens, as nn.CrossEntropyLoss) are sums of those;
    - the mean logits are one mat-vec with the head's mean row (a plain nn.Linear head without
      soft-capping; any other head: a chunked no-grad pass). They are fp32, TRL's are in the
      model's dtype; the values are otherwise the same (metric only).

    TRL's own path is taken for encoder-decoder models and whenever `chunked.supports_hidden(model)`
    is false (no `logits_to_keep`, no decoder/output-embedding accessors). Why not TRL's equivalent:
    DPOTrainer and KTOTrainer in 1.16 already score through `add_fused_lm_head` (tiles, plain torch on
    CPU, Triton on GPU) and are used as they are, but ORPOTrainer does not use it, and its
    `use_liger_kernel` path needs Liger's Triton kernels (GPU only).
    """
    import torch
    from kubetune.trainer import chunked
    from kubetune.trainer.data import IGNORE_INDEX
    from trl.experimental.orpo import ORPOTrainer

    class ChunkedORPOTrainer(ORPOTrainer):
        logits_chunk_rows: int | None = None
        """Label rows per chunk of logits; None: chunked.chunk_rows(vocab) (CHUNK_BYTES of fp32)."""

        def concatenated_forward(self, model: Any, batch: dict[str, Any]) -> tuple[Any, ...]:
            if self.is_encoder_decoder or not chunked.supports_hidden(model):
                return super().concatenated_forward(model, batch)
            cat = self.concatenated_inputs(
                batch, is_encoder_decoder=False, padding_value=self.padding_value, device=self.accelerator.device
            )
            n_chosen = batch["chosen_labels"].shape[0]
            ids, mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
            labels = cat["concatenated_labels"]
            extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
            hidden = chunked.forward_hidden(
                model, {"input_ids": ids, "attention_mask": mask, "use_cache": False}, ids.shape[1], **extra
            )
            nll_labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
            nll_labels[n_chosen:] = IGNORE_INDEX  # the SFT term is over the chosen rows only
            completion, nll = labels[:, 1:] != IGNORE_INDEX, nll_labels[:, 1:] != IGNORE_INDEX
            union = torch.where(labels != IGNORE_INDEX, labels, nll_labels)
            chunk = self.logits_chunk_rows
            if torch.equal(union[:, 1:][nll], nll_labels[:, 1:][nll]):  # answer labels are the answer tokens
                bi, ti, target = chunked.label_rows(union)
                logps = chunked.rows_logprobs(hidden, bi, ti, target, chunk)
                comp_logps, comp_bi = logps[completion[bi, ti]], bi[completion[bi, ti]]
                nll_logps = logps[nll[bi, ti]]
            else:  # labels that differ from the input ids: two passes
                bi, ti, target = chunked.label_rows(labels)
                comp_logps, comp_bi = chunked.rows_logprobs(hidden, bi, ti, target, chunk), bi
                bi, ti, target = chunked.label_rows(nll_labels)
                nll_logps = chunked.rows_logprobs(hidden, bi, ti, target, chunk)
            zero = hidden.states.sum() * 0.0  # keeps the graph whole when a term has no token
            sums = torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device).index_add(0, comp_bi, comp_logps)
            all_logps = (sums + zero) / completion.sum(-1)
            chosen_nll_loss = -(nll_logps.sum() + zero) / nll.sum()
            means = chunked.mean_logits(hidden, chunk)
            out = (
                all_logps[:n_chosen],
                all_logps[n_chosen:],
                means[:n_chosen].mean(),
                means[n_chosen:].mean(),
                chosen_nll_loss,
            )
            return (*out, hidden.outputs.aux_loss) if self.aux_loss_enabled else out

    return ChunkedORPOTrainer


class TrlMetrics:
    """A TrainerCallback-compatible hook: TRL's logged numbers (rewards, margins, accuracies, KL,
    completion length, per-grader reward mean/std) to the objective gauge and the summary."""

    def __init__(self, on_metrics: Callable[[dict[str, float]], None]) -> None:
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_log(
                self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
            ) -> None:
                values = {
                    metric_name(k): float(v)
                    for k, v in (logs or {}).items()
                    if (k in LOGGED or k.startswith("rewards/")) and isinstance(v, (int, float)) and math.isfinite(v)
                }
                if values:
                    outer.on_metrics(values)

        self.on_metrics = on_metrics
        self.callback = _CB()


# --------------------------------------------------------------------------- held-out comparison


def _mean_completion_logp(model: Any, tokenizer: Any, prompt_text: str, completion_text: str) -> float:
    import torch

    device = next(model.parameters()).device
    p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    if not c:
        return 0.0
    ids = torch.tensor([p + c], device=device)
    from kubetune.trainer import chunked
    from kubetune.trainer.data import IGNORE_INDEX

    if chunked.supports_hidden(model) and p:  # a chunk of logits at a time, not [seq, vocab] and its log-softmax
        labels = ids.clone()
        labels[:, : len(p)] = IGNORE_INDEX
        with torch.no_grad():
            return float(chunked.sequence_logprobs(model, {"input_ids": ids}, labels)[0]) / len(c)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logps = torch.log_softmax(logits, -1)
    targets = ids[0, 1:]
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(token_logps[len(p) - 1 :].mean())


def _texts(tokenizer: Any, prompt: Any, completion: Any) -> tuple[str, str]:
    """(prompt text, completion text) as TRL renders a row (chat template for messages)."""
    from trl.data_utils import maybe_apply_chat_template

    out = maybe_apply_chat_template({"prompt": prompt, "completion": completion}, tokenizer)
    return out["prompt"], out["completion"]


def preference_pairs(val_rows: list[dict[str, Any]], kind: TrainingType) -> list[tuple[Any, Any, Any]]:
    """(prompt, preferred, dispreferred) from held-out rows; KTO's are paired per prompt."""
    if kind != TrainingType.KTO:
        return [(r["prompt"], r["chosen"], r["rejected"]) for r in val_rows]
    import json

    good: dict[str, list[Any]] = {}
    bad: dict[str, list[Any]] = {}
    prompts: dict[str, Any] = {}
    for r in val_rows:
        key = json.dumps(r["prompt"], sort_keys=True)
        prompts[key] = r["prompt"]
        (good if r["label"] else bad).setdefault(key, []).append(r["completion"])
    return [(prompts[k], g, b) for k in good if k in bad for g, b in zip(good[k], bad[k])]


def preference_accuracy(model: Any, tokenizer: Any, pairs: list[tuple[Any, Any, Any]]) -> float | None:
    """Share of pairs whose preferred answer has the higher mean token log-probability; None without pairs."""
    if not pairs:
        return None
    was_training = model.training
    model.eval()
    right = 0
    for prompt, chosen, rejected in pairs:
        p, c = _texts(tokenizer, prompt, chosen)
        _, r = _texts(tokenizer, prompt, rejected)
        right += _mean_completion_logp(model, tokenizer, p, c) > _mean_completion_logp(model, tokenizer, p, r)
    if was_training:
        model.train()
    return right / len(pairs)


def greedy_completions(model: Any, tokenizer: Any, prompts: list[Any], max_new_tokens: int) -> list[str]:
    import torch
    from trl.data_utils import maybe_apply_chat_template

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        text = maybe_apply_chat_template({"prompt": prompt}, tokenizer)["prompt"]
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    if was_training:
        model.train()
    return out


def mean_reward(
    model: Any, tokenizer: Any, val_rows: list[dict[str, Any]], scorers: list[Any], spec: Any
) -> dict[str, float]:
    """Mean grader rewards of greedy completions of the held-out prompts (`reward`: the weighted sum)."""
    from kubetune.trainer import graders

    cfg = spec.method.grpo
    texts = greedy_completions(model, tokenizer, [r["prompt"] for r in val_rows], cfg.max_completion_length)
    return graders.mean_score(scorers, [g.weight for g in cfg.graders], list(zip(texts, val_rows)))


def heldout(
    model: Any, tokenizer: Any, val_rows: list[dict[str, Any]], spec: Any, scorers: list[Any]
) -> dict[str, float]:
    """The base-vs-tuned number of the job's type: {"preferenceAccuracy": …} or {"meanReward": …, per grader}."""
    kind = spec.method.training_type
    if kind == TrainingType.GRPO:
        scores = mean_reward(model, tokenizer, val_rows, scorers, spec)
        return {"meanReward": scores.pop("reward"), **{f"reward/{k}": v for k, v in scores.items()}}
    acc = preference_accuracy(model, tokenizer, preference_pairs(val_rows, kind))
    return {} if acc is None else {"preferenceAccuracy": acc}
