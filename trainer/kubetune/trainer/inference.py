"""Local use of a finished output: load it (verified), render chats, generate, stream.

`kubetune chat` and `kubetune serve` answer with what a job produced without a cluster or a
serving engine: right for the tiny demo model and small models on a laptop. Production serving
belongs to vLLM or KServe (spec.serving); this is transformers' `generate`, one request at a time.

An output is what the trainer committed: `<output>/manifest.json` (sha256 + size of every file,
the base model, the job name) and `<output>/adapter/` (a peft adapter, or a full model for
`spec.output.format: merged` and the full-weight methods); `<output>/merged/`, the full model that
spec.serving adds for DoRA and IA3, is an output of its own (`ft:<base>:<name>-merged`). Nothing is
loaded before the files verify against the manifest, and weights load from safetensors only.

Several adapters trained on one base share one copy of the base weights (peft `load_adapter` +
`set_adapter` per request); the base itself answers with the adapter disabled. Generation holds
one pool-wide lock: switching adapters, seeding torch's global generator and `generate` are not
safe to run concurrently.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubetune.trainer import builtin, sources, storage
from kubetune.trainer.methods import prefix_tuning

DEFAULT_MAX_TOKENS = 512
"""New tokens when a request names no limit (OpenAI's default is 'up to the context')."""


class OutputError(Exception):
    """An output cannot be used (missing, uncommitted, corrupt, unloadable): the message says what to do."""


class RequestError(Exception):
    """A request the model cannot answer as asked; maps onto an OpenAI 400 error."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


# ---------------------------------------------------------------------------------- the output


@dataclass
class Output:
    """A verified output on local disk."""

    uri: str
    name: str
    base: str  # the manifest's baseModel, a model source URI
    kind: str  # "adapter" (peft) or "model" (merged or full weights)
    path: Path  # the local directory holding the adapter or model and its tokenizer
    manifest: dict[str, Any]
    peft_type: str | None = None


def _as_uri(output: str) -> str:
    return output if "://" in output else Path(output).expanduser().resolve().as_uri()


def open_output(output: str, cache_dir: Path | None = None, storage_options: dict | None = None) -> Output:
    """Find, verify and (for remote stores) download an output; OutputError says why not."""
    uri = _as_uri(output)
    shown = storage.display_uri(uri)
    local = storage.local_path(uri)
    if local is not None:
        if not local.is_dir():
            raise OutputError(
                f"{shown}: no such directory; give the job's output (the directory holding manifest.json and adapter/)"
            )
        if not (local / storage.MANIFEST).exists() and (local.parent / storage.MANIFEST).exists():
            local, uri = local.parent, local.parent.as_uri()  # the user named <output>/adapter
            shown = storage.display_uri(uri)
    store = storage.Store(uri, storage_options)
    try:
        ok, reason = storage.verify(store, "", hashes=local is not None)
        manifest = storage.read_manifest(store, "") if ok else None
    except storage.PermanentStorageError as err:
        raise OutputError(f"{shown}: {err}") from None
    if not ok or manifest is None:
        if reason.startswith("no manifest.json"):
            raise OutputError(
                f"{shown} has no manifest.json: it is not a finished kubetune output (the trainer "
                "writes manifest.json last). Point at the job's output directory, or wait for the job to succeed"
            )
        raise OutputError(
            f"{shown} does not verify against its manifest.json ({reason}): the output is damaged or was "
            f"changed after training; restore it or re-run the job (check with: kubetune verify {shown})"
        )
    prefix = storage.ADAPTER + "/"
    if not any(k.startswith(prefix) for k in manifest["files"]):
        prefix = ""  # a directory committed with its files at the top: <output>/merged/ (spec.serving)
    files = {k: v for k, v in manifest["files"].items() if k.startswith(prefix)}
    if local is not None:
        root = local
    else:  # download once, verified (sha256), into a cache keyed by the manifest's bytes
        digest = hashlib.sha256(store.read_bytes(storage.MANIFEST)).hexdigest()[:32]
        root = (cache_dir or sources.default_cache_dir().parent / "outputs") / digest
        if (why := storage.download_verified(store, "", files, root)) is not None:
            raise OutputError(
                f"{shown}: the download does not match manifest.json ({why}); try again, or re-run the job"
            )
    path = root / prefix.rstrip("/") if prefix else root
    base = manifest.get("baseModel")
    if not isinstance(base, str) or not base:
        raise OutputError(f"{shown}/manifest.json names no baseModel: was it written by kubetune's trainer?")
    names = {k[len(prefix) :] for k in files}
    if "adapter_config.json" in names:
        kind = "adapter"
        peft_type = json.loads((path / "adapter_config.json").read_text()).get("peft_type")
    elif "config.json" in names:
        kind, peft_type = "model", None
    else:
        raise OutputError(f"{shown}/{prefix} holds neither adapter_config.json nor config.json: nothing to load")
    name = str(manifest.get("name") or root.name) + ("-merged" if manifest.get("mergedFrom") else "")
    return Output(uri=shown, name=name, base=base, kind=kind, path=path, manifest=manifest, peft_type=peft_type)


def base_id(source: str) -> str:
    """The short name of a base model source, as model ids show it (tiny-llama, org/name, my-model)."""
    if source.startswith("builtin://"):
        return source[len("builtin://") :].strip("/")
    if source.startswith("hf://"):
        return source[len("hf://") :].strip("/").partition("@")[0]
    path = urlsplit(source).path if "://" in source else source
    return path.rstrip("/").rsplit("/", 1)[-1] or source


def model_id(output: Output) -> str:
    """`ft:<base>:<name>`: OpenAI's `ft:<base>:<org>:<suffix>:<id>`, with the job (+ suffix) as the name."""
    return f"ft:{base_id(output.base)}:{output.name}"


# ------------------------------------------------------------------------------ loading models


def _device(device: str | None) -> str:
    import torch

    if device and device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_model(directory: Path, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device == "cpu" else "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=dtype, **sources.load_pretrained_kwargs(False)
        )
    except Exception as err:
        raise OutputError(
            f"the model in {directory} could not be loaded: {type(err).__name__}: {str(err)[:300]}"
        ) from None
    # transformers decorates PreTrainedModel.to with functools.wraps, whose typeshed stub drops the bound self
    return model.to(device).eval()  # type: ignore[arg-type]


def _load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as err:
        raise OutputError(
            f"the tokenizer in {directory} could not be loaded: {type(err).__name__}: {str(err)[:300]}"
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass
class _Group:
    """One copy of a base model's weights and the adapters loaded onto it."""

    source: str
    model: Any = None  # a PeftModel once an adapter is loaded, else the plain base model
    adapters: list[str] = field(default_factory=list)


@dataclass
class Served:
    """One model id the pool answers for: a tuned output or a base model."""

    id: str
    parent: str | None
    root: str
    tokenizer: Any
    group: _Group
    adapter: str | None = None  # the peft adapter to activate; None: the group's model as it is
    disable_adapter: bool = False  # the base of an adapter group: answer with adapters off
    output: Output | None = None

    @property
    def context_length(self) -> int:
        config = getattr(self.group.model, "config", None)
        return int(getattr(config, "max_position_embeddings", 0) or 1 << 30)


class ModelPool:
    """Every model id `serve` lists (and `chat` uses): tuned outputs plus their bases.

    Adapters of one peft type on one base share one base model object; merged outputs are full
    models of their own. A base is loaded when something needs it (`get(base_id)`)."""

    def __init__(self, outputs: list[Output], device: str | None = None) -> None:
        self.device = _device(device)
        self.lock = threading.Lock()
        self.models: dict[str, Served] = {}
        self.groups: dict[tuple[str, str | None], _Group] = {}
        self._bases: dict[str, str] = {}  # base id -> base source
        for out in outputs:
            bid = base_id(out.base)
            if self._bases.setdefault(bid, out.base) != out.base:
                raise OutputError(
                    f"{out.uri} and another output have different base models with the same name {bid!r} "
                    f"({out.base} and {self._bases[bid]}): serve them separately"
                )
            mid = model_id(out)
            if mid in self.models:
                raise OutputError(
                    f"{out.uri} and {self.models[mid].root} are both {mid!r}: give the jobs different "
                    "names or spec.suffix values, or serve them separately"
                )
            tokenizer = _load_tokenizer(out.path)
            if out.kind == "model":
                group = _Group(out.base, _load_model(out.path, self.device))
                self.groups[(mid, None)] = group
                self.models[mid] = Served(mid, bid, out.uri, tokenizer, group, output=out)
            else:
                group = self._adapter_group(out)
                self.models[mid] = Served(mid, bid, out.uri, tokenizer, group, adapter=mid, output=out)
        for bid, source in self._bases.items():
            if bid not in self.models:
                adapter_group = next((g for (s, t), g in self.groups.items() if s == source and t is not None), None)
                self.models[bid] = Served(
                    bid, None, source, None, adapter_group or _Group(source), disable_adapter=adapter_group is not None
                )

    def _adapter_group(self, out: Output) -> _Group:
        from peft import PeftModel

        key = (out.base, out.peft_type or "")
        group = self.groups.get(key)
        try:
            if group is None:
                group = self.groups[key] = _Group(out.base)
                base = _load_model(sources.resolve_model(out.base), self.device)
                group.model = PeftModel.from_pretrained(base, str(out.path), adapter_name=model_id(out)).eval()
            else:
                group.model.load_adapter(str(out.path), adapter_name=model_id(out))
        except sources.ModelSourceError as err:
            raise OutputError(
                f"{out.uri}: its base model (manifest.json baseModel) is not available here: {err}"
            ) from None
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            raise OutputError(
                f"{out.uri}: the adapter does not load onto {out.base}: {type(err).__name__}: {str(err)[:300]}"
            ) from None
        group.adapters.append(model_id(out))
        return group

    def get(self, model: str) -> Served:
        """The served model `model` (an id, or a tuned output's bare name); KeyError when unknown."""
        served = self.models.get(model) or next(
            (m for m in self.models.values() if m.output and m.output.name == model), None
        )
        if served is None:
            raise KeyError(model)
        if served.group.model is None:  # a base no adapter shares: load it on first use
            with self.lock:
                if served.group.model is None:
                    served.group.model = _load_model(sources.resolve_model(served.group.source), self.device)
        if served.tokenizer is None:
            served.tokenizer = _load_tokenizer(sources.resolve_model(served.group.source))
        return served

    def base_of(self, served: Served) -> Served:
        return self.get(served.parent or served.id)

    def base_models(self) -> list[Any]:
        """Every distinct base weight object loaded (tests check adapters share one)."""
        found: dict[int, Any] = {}
        for group in self.groups.values():
            model = group.model
            if model is not None and hasattr(model, "get_base_model"):
                model = model.get_base_model()
            if model is not None:
                found[id(model)] = model
        return list(found.values())

    # ------------------------------------------------------------------------------ prompts

    def chat_ids(self, served: Served, messages: list[dict[str, str]]) -> list[int]:
        """The chat rendered with the template saved with the output's tokenizer (or ChatML, as the
        trainer does for tokenizers without one), ready for the assistant's turn."""
        import jinja2

        tok = served.tokenizer
        try:
            text = chat_prompt_text(tok, messages)
        except jinja2.TemplateError as err:
            raise RequestError(f"the chat template of {served.id} rejected these messages: {err}", "messages") from None
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def text_ids(self, served: Served, prompt: str) -> list[int]:
        tok = served.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return bos + list(tok(prompt, add_special_tokens=False)["input_ids"])

    # --------------------------------------------------------------------------- generation

    def stream(
        self,
        served: Served,
        ids: list[int],
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> Stream:
        """Start generating; iterate the result for text pieces. Greedy when temperature is 0."""
        room = served.context_length - len(ids)
        if room <= 0:
            raise RequestError(
                f"this model's maximum context length is {served.context_length} tokens; the prompt has "
                f"{len(ids)}: shorten it",
                "messages",
                "context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > room:
            raise RequestError(
                f"this model's maximum context length is {served.context_length} tokens; you asked for "
                f"{len(ids)} in the prompt and {max_tokens} in the completion: lower max_tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        stream = Stream(
            self, served, ids, max_tokens or min(DEFAULT_MAX_TOKENS, room), temperature, top_p, seed, stop or []
        )
        stream.start()
        return stream

    def complete(self, served: Served, ids: list[int], **params: Any) -> Stream:
        """Generate to the end; the returned Stream holds `text`, token counts and `finish_reason`."""
        stream = self.stream(served, ids, **params)
        for _ in stream:
            pass
        return stream

    def logits(self, served: Served, ids: list[int]) -> Any:
        """The next-token logits at every position (for checks such as adapter vs merged)."""
        import torch

        with self.lock, torch.no_grad(), self._active(served):
            return served.group.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float().cpu()

    def _active(self, served: Served) -> Any:
        import contextlib

        model = served.group.model
        if served.disable_adapter:
            return model.disable_adapter()
        if served.adapter is not None and model.active_adapter != served.adapter:
            model.set_adapter(served.adapter)
        return contextlib.nullcontext()


class Stream:
    """One generation in a worker thread (under the pool's lock), read as text pieces.

    After iteration: `text`, `prompt_tokens`, `completion_tokens`, `finish_reason` ("stop" for an
    end-of-turn token or a stop sequence, "length" for max_tokens). Stop sequences are cut from
    the text, as OpenAI does; `close()` ends the generation early (a client that went away)."""

    def __init__(
        self,
        pool: ModelPool,
        served: Served,
        ids: list[int],
        max_new: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: list[str],
    ) -> None:
        from transformers import TextIteratorStreamer

        self.pool, self.served, self.ids, self.max_new = pool, served, ids, max_new
        self.temperature, self.top_p, self.seed, self.stops = temperature, top_p, seed, [s for s in stop if s]
        self.streamer = TextIteratorStreamer(served.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.halt = threading.Event()
        self.text = ""
        self.prompt_tokens, self.completion_tokens = len(ids), 0
        self.finish_reason = "length"
        self._error: BaseException | None = None
        self._stopped_by_string = False
        self._thread = threading.Thread(target=self._generate, name="kubetune-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.halt.set()

    def _generate(self) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        halt = self.halt

        class Halt(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), halt.is_set(), dtype=torch.bool, device=input_ids.device)

        tok, model = self.served.tokenizer, self.served.group.model
        eos = end_of_turn_ids(model, tok)
        kwargs = generation_kwargs(model, tok, self.max_new, self.temperature, self.top_p)
        kwargs.update(streamer=self.streamer, stopping_criteria=StoppingCriteriaList([Halt()]))
        try:
            with self.pool.lock, torch.no_grad(), self.pool._active(self.served):
                if self.seed is not None:
                    torch.manual_seed(self.seed)
                ids = torch.tensor([self.ids], device=self.pool.device)
                out = prefix_tuning.fix_generation(model).generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs
                )
            new = out[0, len(self.ids) :].tolist()
            self.completion_tokens = len(new)
            if new and new[-1] in eos:
                self.finish_reason = "stop"
        except BaseException as err:
            self._error = err
            self.streamer.on_finalized_text("", stream_end=True)

    def __iter__(self) -> Iterator[str]:
        held = ""
        longest = max((len(s) for s in self.stops), default=0)
        for piece in self.streamer:
            if self._stopped_by_string:
                continue  # drain what the worker made before it saw the halt
            held += piece
            cut = min((i for i in (held.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self._stopped_by_string = True
                self.halt.set()
                held = held[:cut]
            emit = held if (self._stopped_by_string or not longest) else held[: max(0, len(held) - longest + 1)]
            held = held[len(emit) :]
            if emit:
                self.text += emit
                yield emit
        self._thread.join()
        if self._error is not None:
            raise self._error
        if held and not self._stopped_by_string:
            self.text += held
            yield held
        if self._stopped_by_string:
            self.finish_reason = "stop"


def end_of_turn_ids(model: Any, tok: Any) -> set[int]:
    """The token ids that end an answer: the model's generation config's and the tokenizer's eos."""
    eos = set(_as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None)))
    return eos | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def generation_kwargs(
    model: Any, tok: Any, max_new: int, temperature: float = 0.0, top_p: float = 1.0
) -> dict[str, Any]:
    """`generate` arguments shared by chat, serve and the trainer's A/B samples: greedy when the
    temperature is 0, else plain nucleus sampling (no top-k); stops at the end-of-turn tokens."""
    sample = temperature > 0
    kwargs: dict[str, Any] = {
        "do_sample": sample,
        "max_new_tokens": max_new,
        "eos_token_id": sorted(end_of_turn_ids(model, tok)) or None,
        "pad_token_id": tok.pad_token_id,
    }
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def chat_prompt_text(tok: Any, messages: list[dict[str, str]]) -> str:
    """The chat rendered for the assistant's turn with the tokenizer's template, or ChatML (what
    the trainer trains with) when it ships none. Raises jinja2.TemplateError."""
    fallback = {} if getattr(tok, "chat_template", None) else {"chat_template": builtin.fallback_chat_template(tok)}
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **fallback)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
