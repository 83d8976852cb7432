"""Reading manifest files: YAML 1.2 numbers, multi-document files, errors with file:line.

PyYAML implements YAML 1.1, where `2e-4` is a string; kubectl reads it as a number. The loader
here resolves floats the way YAML 1.2 (and so kubectl) does, so a manifest means the same thing
to `kubetune validate` as to the API server.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubetune.api.resource import GROUP, KIND, FineTuneJob, Problem, parse_manifest

MAX_MANIFEST_BYTES = 3 * 1024 * 1024
"""A manifest file larger than this is refused unread: the API server refuses request bodies
over 3 MiB, so no valid FineTuneJob is bigger."""
MAX_NODES = 100_000
"""Most YAML nodes a file may hold once aliases are expanded (a "billion laughs" file is a few
hundred bytes that expand to 10⁹ nodes; a real FineTuneJob has a few hundred)."""
MAX_DEPTH = 100
"""Deepest nesting allowed; the CRD's own schema is about 10 levels deep."""
_CORE = "tag:yaml.org,2002:"
_ALLOWED_TAGS = frozenset(_CORE + t for t in ("str", "int", "float", "bool", "null", "map", "seq", "merge"))


class Loader(yaml.SafeLoader):
    """SafeLoader reading YAML the way kubectl hands it to the API server (as JSON): YAML 1.2 floats
    (`1e-4`, `2E5` are numbers), dates stay strings, scalar keys become strings, duplicate keys and
    tags other than the JSON types are errors."""

    # Nesting is bounded while scanning: PyYAML's scanner slows down quadratically with depth
    # (20,000 nested `[` took minutes) before the composer would hit the recursion limit.
    def fetch_flow_collection_start(self, token_class: Any) -> None:
        if self.flow_level >= MAX_DEPTH:
            raise yaml.scanner.ScannerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def add_indent(self, column: int) -> bool:
        if len(self.indents) >= MAX_DEPTH:
            raise yaml.scanner.ScannerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.get_mark())
        return super().add_indent(column)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(None, None, f"expected a mapping, found {node.id}", node.start_mark)
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _CORE + "merge":
                continue  # `<<: *defaults`: merged keys may be overridden, as in kubectl
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    "a key must be a plain string, not a list or mapping",
                    key_node.start_mark,
                )
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key {key_node.value!r} (first on line {seen[key_node.value]}): keep one",
                    key_node.start_mark,
                )
            seen[key_node.value] = key_node.start_mark.line + 1
        self.flatten_mapping(node)
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            # kubectl converts YAML to JSON, whose keys are strings: `1: x` arrives as `"1": x`.
            mapping[key if isinstance(key, str) else key_node.value] = self.construct_object(value_node, deep=deep)
        return mapping


# YAML 1.1 resolvers kubectl's reader does not share are dropped (it sends those scalars as
# strings): timestamps (`2024-01-01`), the value key (`=`) and base-60 numbers (`12:30:00`).
Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in (_CORE + t for t in ("timestamp", "value", "int", "float"))
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
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


def _check_nodes(root: yaml.Node, name: str) -> None:
    """Refuse what would make reading the document unbounded or ambiguous, before anything is
    built: more than MAX_NODES nodes with aliases expanded, nesting deeper than MAX_DEPTH, an
    alias inside its own anchor, and tags JSON has no type for."""
    sizes: dict[int, int] = {}
    heights: dict[int, int] = {}
    active: set[int] = set()

    def where(node: yaml.Node) -> str:
        return f"{name}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"

    def visit(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in active:
            raise ManifestError(f"{where(node)}: an alias refers to the anchor it is inside of (a recursive alias)")
        if key in sizes:
            if depth + heights[key] > MAX_DEPTH:
                raise ManifestError(f"{where(node)}: nested deeper than {MAX_DEPTH} levels")
            return sizes[key]
        if depth > MAX_DEPTH:
            raise ManifestError(f"{where(node)}: nested deeper than {MAX_DEPTH} levels")
        if node.tag not in _ALLOWED_TAGS:
            raise ManifestError(
                f"{where(node)}: the YAML tag {node.tag.replace(_CORE, '!!')} is not allowed in a manifest "
                "(only strings, numbers, booleans, null, lists and mappings reach the API server)"
            )
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        active.add(key)
        total, height = 1, 0
        for child in children:
            total += visit(child, depth + 1)
            height = max(height, heights[id(child)] + 1)
            if total > MAX_NODES:
                raise ManifestError(
                    f"{where(node)}: more than {MAX_NODES:,} values once aliases are expanded "
                    "(an alias bomb?); write the document out"
                )
        active.discard(key)
        sizes[key], heights[key] = total, height
        return total

    visit(root, 0)


def load_yaml(text: str) -> Any:
    """One YAML document read as kubectl reads it (YAML 1.2 numbers): `learningRate: 2e-4` is a
    number here, a string to plain PyYAML, and the API server refuses the string. Bounded like
    :func:`load_documents`; raises ManifestError."""
    docs = load_documents("<manifest>", text)
    if len(docs) != 1:
        raise ManifestError(f"<manifest>: expected one YAML document, found {len(docs)}")
    return docs[0].data


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
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{name}: {len(text):,} characters; a manifest is at most {MAX_MANIFEST_BYTES:,} bytes "
            "(the API server's request limit)"
        )
    try:
        nodes = list(yaml.compose_all(text, Loader=Loader))
        for node in nodes:
            if node is not None:
                _check_nodes(node, name)
        docs = [Loader(text).construct_document(n) if n is not None else None for n in nodes]
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        what = " ".join(x for x in (err.context, err.problem) if x)
        raise ManifestError(f"{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"{name}: invalid YAML: {err}") from None
    except RecursionError:
        raise ManifestError(f"{name}: nested too deeply to read (more than {MAX_DEPTH} levels)") from None
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
