"""Reading manifest files: YAML 1.2 numbers, multi-document files, errors with file:line.

PyYAML implements YAML 1.1, where `2e-4` is a string; kubectl reads it as a number. The loader
here resolves floats the way YAML 1.2 (and so kubectl) does, so a manifest means the same thing
to `kubetune validate` as to the API server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from kubetune.api.resource import GROUP, KIND, FineTuneJob, Problem, parse_manifest


class Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 float resolution (`1e-4`, `2E5` are numbers)."""


Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """One YAML document read as kubectl reads it (YAML 1.2 numbers): `learningRate: 2e-4` is a
    number here, a string to plain PyYAML, and the API server refuses the string."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader


@dataclass
class Document:
    """One YAML document of a file: where it came from and what it holds."""

    file: str
    index: int  # 1-based position in the file
    count: int  # documents in the file, to decide whether to print #index
    data: Any
    line: int  # 1-based line where the document starts

    @property
    def where(self) -> str:
        return f"{self.file}#{self.index}" if self.count > 1 else self.file


class ManifestError(Exception):
    """A file that cannot be read or is not valid YAML; the message carries file:line:col."""


def load_documents(path: str | Path, text: str | None = None) -> list[Document]:
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8") if text is None else text
    except FileNotFoundError:
        raise ManifestError(f"{name}: no such file") from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"{name}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ManifestError(f"{name}: cannot read ({err.strerror})") from None
    try:
        nodes = list(yaml.compose_all(text, Loader=Loader))
        docs = list(yaml.load_all(text, Loader=Loader))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        what = " ".join(x for x in (err.context, err.problem) if x)
        raise ManifestError(f"{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"{name}: invalid YAML: {err}") from None
    pairs = [(d, n) for d, n in zip(docs, nodes) if d is not None]
    return [
        Document(name, i + 1, len(pairs), d, (n.start_mark.line + 1) if n is not None else 1)
        for i, (d, n) in enumerate(pairs)
    ]


def is_finetunejob(data: Any) -> bool:
    """Whether a document claims to be ours (then every mistake in it is reported)."""
    if not isinstance(data, dict):
        return True
    api = str(data.get("apiVersion", ""))
    return api.split("/")[0] == GROUP or data.get("kind") == KIND


def validate_document(doc: Document) -> tuple[FineTuneJob | None, list[Problem]]:
    return parse_manifest(doc.data)


def iter_jobs(paths: list[str]) -> Iterator[tuple[Document, FineTuneJob | None, list[Problem]]]:
    """Every FineTuneJob document of the given files with its problems; other kinds skipped."""
    for path in paths:
        for doc in load_documents(path):
            if is_finetunejob(doc.data):
                job, problems = validate_document(doc)
                yield doc, job, problems


def load_job(path: str) -> FineTuneJob:
    """The single FineTuneJob in a file, or ManifestError listing every problem."""
    jobs = list(iter_jobs([path]))
    if len(jobs) != 1:
        raise ManifestError(f"{path}: expected exactly one FineTuneJob, found {len(jobs)}")
    doc, job, problems = jobs[0]
    if job is None:
        raise ManifestError("\n".join(f"{doc.where}: {p}" for p in problems))
    return job
