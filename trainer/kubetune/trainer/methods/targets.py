"""Which modules an adapter (lora, dora, qlora, ia3) wraps, resolved per model before any weight loads.

Module names differ between families (`q_proj` in Llama, `c_attn` in GPT-2, `query_key_value` in
GPT-NeoX and Falcon, `qkv_proj` in Phi-3), so a fixed default list cannot fit them all:

- `targetModules` unset (lora, dora, ia3; qlora's default is [all-linear], the QLoRA paper's
  choice, which fits every family): the family's default from peft's own tables
  (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, `..._IA3_TARGET_MODULES_MAPPING` and
  `..._IA3_FEEDFORWARD_MODULES_MAPPING`), kept to the names the model really has; a family peft
  has no entry for (Phi-3), or whose entry names nothing the model has, gets `all-linear`.
- `[all-linear]`: every `nn.Linear`/`Conv1D` but the output head, written out as leaf names so
  `status.effective.targetModules` says what trained.
- a list: every name must match a module the method can wrap (peft's rule: the module's full name
  or its dotted suffix). A name that matches nothing is refused with the model's candidates.

Mixture-of-experts models in transformers 5 (Mixtral) keep their experts as fused 3-D parameters
(`experts.gate_up_proj`, `experts.down_proj`) and the router as a non-Linear module: `all-linear`
adapts them with peft's `target_parameters` (LoRA on each expert's matrices; what peft's own v5
conversion of `all-linear` does), which peft supports without dropout only, and not for DoRA
or IA3. The family default stays peft's (attention). See `resolve`.

The check runs on the model skeleton built from config.json on the meta device (`skeleton`), so a
wrong list is refused before a byte of weights is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.methods import ADAPTATIONS
from kubetune.trainer.methods.families import family

log = logging.getLogger("kubetune.trainer")

ALL_LINEAR = "all-linear"
LORA_BLOCKS = tuple(facts.block for facts in ADAPTATIONS.values() if facts.lora)
"""The blocks of the LoRA variants (lora, qlora, dora): embeddings and fused experts adaptable, dropout."""


class TargetError(ValueError):
    """A target list the model cannot honour; `param` is the spec field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Targets:
    """What the adapter wraps: module names, fused parameters (MoE experts), IA3's feed-forward subset."""

    modules: tuple[str, ...]
    parameters: tuple[str, ...] = ()
    feedforward: tuple[str, ...] = ()
    dropout: float | None = None  # LoRA dropout actually used (0 when fused experts are adapted)
    source: str = "spec"  # spec | peft:<model_type> | all-linear
    matched: tuple[str, ...] = field(default=(), compare=False)  # full module/parameter names

    def effective(self) -> dict[str, Any]:
        """The `status.effective` / manifest keys (ResolvedHyperparameters field aliases)."""
        out: dict[str, Any] = {"targetModules": list(self.modules)}
        if self.parameters:
            out["targetParameters"] = list(self.parameters)
        if self.feedforward:
            out["feedforwardModules"] = list(self.feedforward)
        if self.dropout is not None:
            out["loraDropout"] = self.dropout
        return out


# ------------------------------------------------------------------------------ the model's names


def skeleton(config: Any, trust_remote_code: bool = False) -> Any | None:
    """The model built from its config on the meta device (no memory, no weights read), or None
    when the architecture cannot be built that way (the check then runs right after loading)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as err:
        log.debug("no meta-device skeleton for %s: %s", getattr(config, "model_type", "?"), err)
        return None


def _linear_types() -> tuple[type, ...]:
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def _is_linear(module: Any) -> bool:
    """A Linear/Conv1D layer (4-bit or 8-bit ones included): what `all-linear` means."""
    return isinstance(module, _linear_types()) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _adaptable(module: Any, block: str) -> bool:
    """peft can wrap it: linear layers for every block, embeddings too for the LoRA kinds."""
    import torch

    return _is_linear(module) or (block in LORA_BLOCKS and isinstance(module, torch.nn.Embedding))


def _head_name(model: Any) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def _matches(key: str, name: str) -> bool:
    """peft's list rule (`check_target_module_exists`): the full name, or a dotted suffix."""
    return key == name or key.endswith("." + name)


def expert_parameters(model: Any) -> list[str]:
    """Full names of fused MoE parameters: 3-D expert stacks and the family's router weights."""
    routers = family(model.config).routers
    return [n for n, p in model.named_parameters() if p.dim() == 3 or any(_matches(n, r) for r in routers)]


def _short(name: str) -> str:
    """`model.layers.0.mlp.experts.gate_up_proj` → `experts.gate_up_proj` (owner leaf + parameter)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if len(parts) > 1 else name


def candidates(model: Any, block: str) -> list[str]:
    """The names a user can list for this model: leaf names of the wrappable modules (and, for
    the LoRA kinds, the fused expert parameters)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _adaptable(m, block)}
    if block in ("lora", "qlora"):
        names |= {_short(n) for n in expert_parameters(model)}
    return sorted(names)


def _all_linear(model: Any) -> list[str]:
    """Leaf names of every Linear/Conv1D but the output head (peft's `all-linear`, written out)."""
    head = _head_name(model)
    linear = [n for n, m in model.named_modules() if n and n != head and _is_linear(m)]
    leaves = {n.rsplit(".", 1)[-1] for n in linear}
    if head is not None and head.rsplit(".", 1)[-1] in leaves:  # a leaf name shared with the head: spell out
        return sorted(linear)
    return sorted(leaves)


def _feedforward_default(model: Any) -> set[str]:
    """IA3's input-scaled modules for the family: peft's table, else the linear layers of the MLP."""
    from kubetune.trainer.methods import _groups
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF

    mapped = FF.get(model.config.model_type)
    if mapped:
        return set(mapped)
    return {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if n and _is_linear(m) and _groups.kind(n + ".weight", model) == "mlp"
    }


def peft_default(model_type: str, block: str) -> list[str] | None:
    """peft's default target list for the family and method (None where peft has none, and for
    qlora, whose default is all-linear as in the QLoRA paper)."""
    from peft.utils import constants as c

    if block == "qlora":
        return None

    table = (
        c.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
        if block == "ia3"
        else c.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    )
    found = table.get(model_type)
    return list(found) if found else None


# ---------------------------------------------------------------------------------- resolution


def resolve(block: str, config: Any, model: Any, quiet: bool = False) -> Targets:
    """The targets of `config` (the spec's lora/dora/qlora/ia3 block) on `model` (a meta-device
    skeleton or the loaded model). Raises TargetError naming the field and listing candidates.
    `quiet`: no log lines (the skeleton's check; the loaded model's says the same)."""
    say = (lambda *a: None) if quiet else log.info
    model_type = str(getattr(model.config, "model_type", "") or "")
    field_name = f"spec.method.{block}.targetModules"
    modules = [(n, m) for n, m in model.named_modules() if n]
    wrappable = [n for n, m in modules if _adaptable(m, block)]
    experts = expert_parameters(model) if block in LORA_BLOCKS else []
    asked = list(config.target_modules) if config.target_modules is not None else None
    source = ALL_LINEAR if asked == [ALL_LINEAR] else "spec"
    if asked is None:
        default = peft_default(model_type, block) or []
        present = [t for t in default if any(_matches(k, t) for k in wrappable)]
        if default and present != default:
            say(
                "peft's default %s targets for %s name %s, which this model does not have; using %s",
                block,
                model_type,
                ", ".join(t for t in default if t not in present),
                ", ".join(present) or ALL_LINEAR,
            )
        asked, source = (present, f"peft:{model_type}") if present else ([ALL_LINEAR], ALL_LINEAR)
        if block == "ia3" and config.feedforward_modules:  # "also scale these on their input"
            asked = _all_linear(model) if asked == [ALL_LINEAR] else asked
            asked += [f for f in config.feedforward_modules if f not in asked]
    if ALL_LINEAR in asked and asked != [ALL_LINEAR]:
        raise TargetError(
            f"{field_name}: all-linear stands alone (it already names every linear layer); "
            f"write [all-linear] or list module names",
            field_name,
        )

    names: list[str] = []
    parameters: list[str] = []
    if asked == [ALL_LINEAR]:
        names = _all_linear(model)
        parameters = sorted({_short(n) for n in experts})
    else:
        unmatched = []
        for t in asked:
            if any(_matches(k, t) for k in wrappable):
                names.append(t)
            elif any(_matches(k, t) for k in experts):
                parameters.append(t)
            else:
                unmatched.append(t)
        if unmatched:
            raise TargetError(_no_match(block, field_name, model, model_type, asked, unmatched), field_name)

    dropout = getattr(config, "dropout", None) if block in LORA_BLOCKS else None
    if parameters:
        dropout = _expert_dropout(block, config, model_type, parameters, say)
    feedforward = _ia3_feedforward(config, model, names) if block == "ia3" else []
    matched = tuple(k for k in wrappable if any(_matches(k, t) for t in names))
    matched += tuple(k for k in experts if any(_matches(k, t) for t in parameters))
    return Targets(tuple(names), tuple(parameters), tuple(feedforward), dropout, source, matched)


def _no_match(block: str, field_name: str, model: Any, model_type: str, asked: list[str], unmatched: list[str]) -> str:
    others = [t for t in asked if t not in unmatched]
    kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n and any(_matches(n, t) for t in unmatched)})
    why = f" (it names {', '.join(kinds)} modules, which {block} cannot wrap)" if kinds else ""
    part = f"; only {', '.join(others)} match{'es' if len(others) == 1 else ''}" if others else ""
    default = ", ".join(peft_default(model_type, block) or [ALL_LINEAR])
    return (
        f"{field_name}: {', '.join(unmatched)} match{'es' if len(unmatched) == 1 else ''} no layer of this "
        f"{model_type or 'unknown'} model{why}{part}. Its candidates: {', '.join(candidates(model, block))}; "
        f"or [all-linear], or leave targetModules out for the family default ({default})"
    )


def _expert_dropout(block: str, config: Any, model_type: str, parameters: list[str], say: Any) -> float:
    """LoRA on fused expert parameters (peft's ParamWrapper) has no dropout and no DoRA."""
    what = (
        f"{model_type}'s mixture-of-experts weights ({', '.join(parameters)}) are fused parameters, which peft adapts"
    )
    if block == "dora":
        raise TargetError(
            f"spec.method.dora.targetModules: {what} with LoRA only, not DoRA; list the attention layers instead "
            f"(e.g. [q_proj, k_proj, v_proj, o_proj]) or use adaptation lora",
            "spec.method.dora.targetModules",
        )
    if config.dropout and "dropout" in config.model_fields_set:
        raise TargetError(
            f"spec.method.{block}.dropout: {what} without dropout; set dropout: 0 (or leave it out), or list only "
            f"non-expert layers in targetModules (e.g. [q_proj, k_proj, v_proj, o_proj])",
            f"spec.method.{block}.dropout",
        )
    if config.dropout:
        say("%s: adapting %s's fused experts without dropout (peft supports no dropout there)", block, model_type)
    return 0.0


def _ia3_feedforward(config: Any, model: Any, names: list[str]) -> list[str]:
    """IA3's input-scaled subset of the targets: as given, else the family's feed-forward modules
    among the targets; every one must be a target (peft's rule)."""
    asked = list(config.feedforward_modules) if config.feedforward_modules is not None else None
    if asked is None:
        defaults = _feedforward_default(model)
        return [n for n in names if n in defaults or n.rsplit(".", 1)[-1] in defaults]
    outside = [f for f in asked if f not in names]
    if outside:
        raise TargetError(
            f"spec.method.ia3.feedforwardModules: {', '.join(outside)} {'is' if len(outside) == 1 else 'are'} not in "
            f"targetModules ({', '.join(names)}); feed-forward modules are the targets scaled on their input, so list "
            f"them in targetModules too",
            "spec.method.ia3.feedforwardModules",
        )
    return asked


def peft_kwargs(targets: Targets) -> dict[str, Any]:
    """The LoraConfig/IA3Config keyword arguments for the resolved targets."""
    # peft reads the string "all-linear", not a one-item list of it
    out: dict[str, Any] = {
        "target_modules": "all-linear" if targets.modules == ("all-linear",) else list(targets.modules)
    }
    if targets.parameters:
        out["target_parameters"] = list(targets.parameters)
    return out
