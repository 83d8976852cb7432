"""GRPO graders, as OpenAI's reinforcement fine-tuning API defines them, as TRL reward functions.

A grader maps a sampled completion (`sample`: its `output_text`) and the dataset record it was
sampled for (`item`) to a reward. The spec (kubetune.api.spec.Grader) says which:

- stringCheck: `input` against `reference` (both templates) with eq, ne, like (contains) or
  ilike (contains, case-insensitive); 1 or 0.
- textSimilarity: exact_match, bleu, rouge_l, chrf or fuzzy_match from textmetrics (in [0, 1]).
- regex: 1 when the pattern matches the input (re.search); jsonSchema: 1 when the input parses as
  JSON and validates against the schema (jsonschema).
- python: `grade(sample, item) -> float` from inline source or a file in the pod (a mounted
  ConfigMap). It runs in a separate worker process started with `spawn` (its own interpreter: a
  crash, a hang or global state cannot touch the training process), with a time limit per call;
  a call that times out scores 0 and the worker is restarted, one that raises or returns a
  non-finite number scores 0; both are counted and logged.
- multi: the weighted mean of its graders' rewards.

Templates are `{{sample.output_text}}` and `{{item.<field>[.<field>…]}}`; the fields a job's
graders read are checked in every record before any model loads (prefdata.check_grpo).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune.api.spec import TEMPLATE, Grader, SubGrader
from kubetune.trainer import textmetrics

log = logging.getLogger("kubetune.trainer")


class GraderError(Exception):
    """A grader that cannot be built (bad schema, unreadable or broken python file): a spec error."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def lookup(item: Any, path: list[str]) -> Any:
    """The value at a dotted path in a record; KeyError when absent."""
    value = item
    for part in path:
        if not isinstance(value, dict) or part not in value:
            raise KeyError(".".join(path))
        value = value[part]
    return value


def render(template: str, sample: dict[str, Any], item: dict[str, Any]) -> str:
    """A grader template with its `{{…}}` references replaced (non-string values as JSON)."""
    import json

    def one(m: re.Match[str]) -> str:
        ref = m.group(1)
        if ref == "sample.output_text":
            return str(sample.get("output_text", ""))
        value = lookup(item, ref.split(".")[1:])
        return value if isinstance(value, str) else json.dumps(value)

    return TEMPLATE.sub(one, template)


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a string, or a list of (assistant) messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in completion)
    return str(completion)


class Scorer:
    """One grader spec as a function (sample, item) -> float."""

    def __init__(self, spec: SubGrader, param: str) -> None:
        self.spec = spec
        self.name = spec.name
        self.param = param
        self.children: list[tuple[float, Scorer]] = []
        self.worker: PythonWorker | None = None
        kind = str(spec.type)
        if kind == "jsonSchema":
            import jsonschema

            try:
                cls = jsonschema.validators.validator_for(spec.json_schema)
                cls.check_schema(spec.json_schema)
            except jsonschema.SchemaError as err:
                raise GraderError(
                    f"{param}.jsonSchema: not a valid JSON Schema: {err.message}", f"{param}.jsonSchema"
                ) from None
            self.validator = cls(spec.json_schema)
        elif kind == "python":
            self.worker = PythonWorker(_python_source(spec, param), spec.timeout_seconds, f"{param} ({spec.name})")
        elif kind == "multi":
            if not isinstance(spec, Grader):  # the spec's rules refuse it; a SubGrader has no graders
                raise GraderError(f"{param}.type: a multi grader cannot contain another multi grader", f"{param}.type")
            self.children = [(g.weight, Scorer(g, f"{param}.graders[{i}]")) for i, g in enumerate(spec.graders or [])]

    def __call__(self, sample: dict[str, Any], item: dict[str, Any]) -> float:
        spec, kind = self.spec, str(self.spec.type)
        if kind == "multi":
            total = sum(w for w, _ in self.children)
            return sum(w * c(sample, item) for w, c in self.children) / total if total else 0.0
        if kind == "python":
            assert self.worker is not None
            return self.worker.grade(sample, item)
        text = render(spec.input, sample, item)
        if kind == "stringCheck":
            ref = render(spec.reference or "", sample, item)
            op = str(spec.operation)
            if op == "eq":
                return float(text == ref)
            if op == "ne":
                return float(text != ref)
            if op == "like":
                return float(ref in text)
            return float(ref.lower() in text.lower())  # ilike
        if kind == "textSimilarity":
            return float(
                textmetrics.SIMILARITY[str(spec.evaluation_metric)](text, render(spec.reference or "", sample, item))
            )
        if kind == "regex":
            return textmetrics.regex_match(text, spec.pattern or "")
        if kind == "jsonSchema":
            import json

            try:
                value = json.loads(text)
            except (ValueError, RecursionError):
                return 0.0
            return float(self.validator.is_valid(value))
        raise AssertionError(f"unknown grader type {kind}")  # the API enum and this module list the same types

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
        for _, c in self.children:
            c.close()


def _python_source(spec: SubGrader, param: str) -> str:
    if spec.source is not None:
        return spec.source
    path = Path(spec.file or "")
    try:
        source = path.read_text()
    except OSError as err:
        raise GraderError(
            f"{param}.file: cannot read {path}: {err.strerror}; mount the file (e.g. a ConfigMap "
            "through spec.podOverrides.volumes) or give the code in source",
            f"{param}.file",
        ) from None
    try:
        compile(source, str(path), "exec")
    except SyntaxError as err:
        raise GraderError(f"{param}.file: {path} line {err.lineno}: {err.msg}", f"{param}.file") from None
    if "def grade" not in source:
        raise GraderError(f"{param}.file: {path} must define grade(sample, item) -> float", f"{param}.file")
    return source


def _worker_main(conn: Any, source: str) -> None:
    """The python grader's process: define grade() once, then answer (sample, item) calls."""
    namespace: dict[str, Any] = {"__name__": "kubetune_grader"}
    try:
        exec(compile(source, "<grader>", "exec"), namespace)
        grade = namespace["grade"]
    except BaseException as err:
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        try:
            conn.send(("ok", float(grade(*msg))))
        except BaseException as err:
            conn.send(("error", f"{type(err).__name__}: {err}"))


class PythonWorker:
    """A spawned process running a python grader, restarted after a call that timed out."""

    def __init__(self, source: str, timeout: float, label: str) -> None:
        self.source, self.timeout, self.label = source, timeout, label
        self.timeouts = self.errors = 0
        self.proc: Any = None
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, self.source), daemon=True, name="kubetune-grader")
        self.proc.start()
        child.close()
        if not self.conn.poll(60):
            self._kill()
            raise GraderError(f"{self.label}: the python grader did not start within 60 s", self.label.split(" ")[0])
        status, detail = self.conn.recv()
        if status != "ready":
            self._kill()
            raise GraderError(f"{self.label}: the python grader fails to load: {detail}", self.label.split(" ")[0])

    def _kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.join(5)

    def grade(self, sample: dict[str, Any], item: dict[str, Any]) -> float:
        try:
            self.conn.send((sample, item))
            if not self.conn.poll(self.timeout):
                self.timeouts += 1
                log.warning(
                    "%s: a call ran over %.1f s and scores 0 (%d so far)", self.label, self.timeout, self.timeouts
                )
                self._kill()
                self._start()
                return 0.0
            status, value = self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.errors += 1
            log.warning("%s: the grader process died and is restarted; the call scores 0", self.label)
            self._kill()
            self._start()
            return 0.0
        if status != "ok" or not math.isfinite(value):
            self.errors += 1
            log.warning(
                "%s: %s; the call scores 0 (%d errors so far)",
                self.label,
                value if status != "ok" else f"returned {value}",
                self.errors,
            )
            return 0.0
        return value

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self._kill()


def build(graders: list[Grader], param: str = "spec.method.grpo.graders") -> list[Scorer]:
    """One scorer per top-level grader; raises GraderError naming the field."""
    return [Scorer(g, f"{param}[{i}]") for i, g in enumerate(graders)]


def reward_function(scorer: Scorer, item_keys: list[str]) -> Callable[..., list[float | None]]:
    """A TRL reward function (`prompts`, `completions`, dataset columns as lists) named like the
    grader, so TRL logs its reward as rewards/<name>/mean and /std. Typed as TRL declares reward
    functions (None would mean no reward for a completion); a grader always gives one."""

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        out: list[float | None] = []
        for i, completion in enumerate(completions):
            item = {k: columns[k][i] for k in item_keys if k in columns}
            item["prompt"] = prompts[i]
            out.append(scorer({"output_text": completion_text(completion)}, item))
        return out

    reward.__name__ = scorer.name
    return reward


def mean_score(
    scorers: list[Scorer], weights: list[float], samples: list[tuple[str, dict[str, Any]]]
) -> dict[str, float]:
    """Mean reward per grader and of the weighted sum over (completion text, record) pairs: the
    GRPO base-vs-tuned comparison."""
    out: dict[str, float] = {}
    totals = [0.0] * len(samples)
    for scorer, weight in zip(scorers, weights):
        values = [scorer({"output_text": text}, item) for text, item in samples]
        out[scorer.name] = sum(values) / max(len(values), 1)
        totals = [t + weight * v for t, v in zip(totals, values)]
    out["reward"] = sum(totals) / max(len(totals), 1)
    return out
