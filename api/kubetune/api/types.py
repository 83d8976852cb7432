"""Scalar wire types shared by the spec: URIs, `auto`-able numbers, Kubernetes quantities.

Each type carries its own OpenAPI schema (what the CRD says) next to its Python check (what
`kubetune validate` says), so both reject the same input with the same meaning. Messages say
what is allowed, because they are read by someone fixing a manifest.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from kubetune.api._base import CEL_KEY, Rule
from pydantic import AfterValidator, Field, PlainValidator, WithJsonSchema

MODEL_SCHEMES = ("hf", "s3", "gs", "gcs", "file", "pvc", "builtin")
DATA_SCHEMES = ("s3", "gs", "gcs", "file", "pvc", "http", "https")
OUTPUT_SCHEMES = ("s3", "gs", "gcs", "file", "pvc")


def _uri_pattern(schemes: tuple[str, ...], plain_paths: bool) -> str:
    scheme = "(" + "|".join(schemes) + r")://[^\s]+"
    # A plain path (no scheme) is a file on the local disk or a mounted volume.
    return f"^({scheme}|[^:\\s]+)$" if plain_paths else f"^{scheme}$"


def cel_string(text: str) -> str:
    """`text` as a CEL string literal (CEL has no `\\.` escape: a regex's backslashes are doubled)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Credentials in a URI (`s3://KEY:SECRET@bucket`, `s3://TOKEN@bucket`) would be copied into the
# trainer Job and shown by status, Events and logs. A secret may contain '/' (AWS's own example
# key does), which ends the authority early, so a ':' in an object-store, hub or volume authority
# is refused too: it is never a port there. For http(s) a ':' must be followed by a port number.
# `\x5b` is '[' (an IPv6 host); no other escape, so the CEL literal stays valid (see cel_string).
CREDENTIALS_IN_URI = (
    r"(?i)^([a-z][a-z0-9+.-]*://[^/?#]*@"
    r"|(hf|s3|gs|gcs|file|pvc|builtin)://[^/?#]*:"
    r"|https?://[^/?#\x5b][^/?#]*:[^/?#]*[^0-9/?#])"
)
CREDENTIALS_MESSAGE = (
    "must not carry credentials (user:password@ or token@ before the host): remove them and put "
    "credentials in a Secret named by spec.output.credentialsSecret"
)
_credentials = re.compile(CREDENTIALS_IN_URI)


def has_credentials(uri: str) -> bool:
    """Whether `uri` carries userinfo (see CREDENTIALS_IN_URI)."""
    return bool(_credentials.match(uri))


CREDENTIALS_RULE = Rule(
    f"!self.matches({cel_string(CREDENTIALS_IN_URI)})",
    CREDENTIALS_MESSAGE,  # the value is not repeated: it holds a secret
    lambda uri: not has_credentials(uri),
    passes="s3://bucket/models/base",
    fails="s3://AKIAEXAMPLE:secret@bucket/models/base",
)


def _uri(schemes: tuple[str, ...], plain_paths: bool, what: str) -> Any:
    pattern = _uri_pattern(schemes, plain_paths)
    compiled = re.compile(pattern)
    allowed = ", ".join(f"{s}://" for s in schemes) + (" or a plain path" if plain_paths else "")

    def check(value: str) -> str:
        if len(value) > 2048:
            raise ValueError(f"is {len(value)} characters long; at most 2048 are allowed")
        CREDENTIALS_RULE.enforce(value)
        if not compiled.match(value):
            shown = repr(value) if "@" not in value else "this URI"
            raise ValueError(f"{shown} is not a valid {what}: use {allowed}")
        return value

    return Annotated[
        str,
        AfterValidator(check),
        WithJsonSchema(
            {
                "type": "string",
                "minLength": 1,
                "maxLength": 2048,
                "pattern": pattern,
                CEL_KEY: [CREDENTIALS_RULE.wire()],
            }
        ),
    ]


ModelUri = _uri(MODEL_SCHEMES, plain_paths=True, what="model source")
DataUri = _uri(DATA_SCHEMES, plain_paths=True, what="dataset location")
OutputUri = _uri(OUTPUT_SCHEMES, plain_paths=True, what="output location")


def _numeric_string(value: Any) -> Any:
    # YAML 1.1 readers (PyYAML) load `2e-4` as a string while kubectl sends a number;
    # accept both spellings so a manifest means the same thing everywhere.
    if isinstance(value, str) and value != "auto":
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


AUTO_INT_RULE = Rule(
    "type(self) == string ? self == 'auto' : self >= 1",
    'must be an integer >= 1 or "auto"',
    lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    passes=3,
    fails=0,
    explain=lambda v: f'must be an integer ≥ 1 or "auto", got {v!r}',
)


def _positive_int_or_auto(value: Any) -> Any:
    value = _numeric_string(value)
    AUTO_INT_RULE.enforce(value)
    return value


AutoInt = Annotated[
    Union[int, Literal["auto"]],
    PlainValidator(_positive_int_or_auto),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            CEL_KEY: [AUTO_INT_RULE.wire()],
        }
    ),
]
"""An integer ≥ 1, or `auto` to let kubetune choose (the choice is recorded in status.effective)."""


def _positive_number(value: Any) -> float:
    if value == "auto":
        raise ValueError(
            'leave learningRate out to use the method\'s default ("auto" cannot be stored: the '
            "CRD types learningRate as a number, so that the API server can check it)"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number > 0 (unquoted, e.g. 2e-4), got {value!r}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"must be a finite number > 0, got {value!r}")
    return float(value)


PositiveNumber = Annotated[
    float,
    PlainValidator(_positive_number),
    # A typed node: a CEL rule on an untyped (x-kubernetes-preserve-unknown-fields) node makes a
    # current API server refuse the whole CRD ("unable to convert structural schema to CEL
    # declarations"), and a number-or-string union has no structural type. So the number is
    # typed, bounded by the schema, and "auto" is spelled by leaving the field out.
    WithJsonSchema({"type": "number", "minimum": 0, "exclusiveMinimum": True}),
]
"""A number > 0; unset means kubetune chooses (the choice is recorded in status.effective)."""

QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_quantity = re.compile(QUANTITY_PATTERN)


NON_NEGATIVE_QUANTITY = Rule(
    "type(self) == string || self >= 0",
    "must not be negative",
    lambda v: isinstance(v, str) or v >= 0,
    passes=8,
    fails=-1,
)
"""A quantity written as a number is not negative (a string one is bounded by the pattern)."""


def _check_quantity(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a Kubernetes quantity such as 8, 500m, 64Gi")
    if isinstance(value, int):
        NON_NEGATIVE_QUANTITY.enforce(value)
        return str(value)
    if isinstance(value, str) and _quantity.match(value):
        return value
    raise ValueError(f"{value!r} is not a Kubernetes quantity: write e.g. 8, 500m, 64Gi")


Quantity = Annotated[
    Union[int, str],
    PlainValidator(_check_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            CEL_KEY: [NON_NEGATIVE_QUANTITY.wire()],
        }
    ),
]

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
"""DNS-1123 subdomain (with maxLength 253): what Kubernetes requires of object, PriorityClass and
scheduler names."""

# Label keys and values, taint keys, extended resource names: Kubernetes' "qualified name"
# (k8s.io/apimachinery/pkg/util/validation). The patterns are RE2 (the API server's engine) and
# bound each part's length; the prefix's own limit (253) needs the CEL rule beside them.
_DNS_LABEL_63 = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_NAME_63 = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
QUALIFIED_NAME = rf"^({_DNS_LABEL_63}(\.{_DNS_LABEL_63})*/)?{_NAME_63}$"
LABEL_VALUE = rf"^({_NAME_63})?$"
_PREFIX_TOO_LONG = "^[^/]{254,}/"
_QUALIFIED_HELP = (
    "a qualified name: an optional DNS prefix of at most 253 characters and '/', then at most 63 "
    "letters, digits, '-', '_' or '.', starting and ending with a letter or digit (e.g. nvidia.com/gpu)"
)
_qualified = re.compile(QUALIFIED_NAME)

PREFIX_RULE = Rule(
    f"!self.matches({cel_string(_PREFIX_TOO_LONG)})",
    "the prefix before '/' is at most 253 characters",
    lambda v: len(v.split("/")[0] if "/" in v else "") <= 253,
    passes="nvidia.com/gpu",
    fails="a" * 254 + "/gpu",
    explain=lambda v: f"{v!r} is not {_QUALIFIED_HELP}",
)
"""The prefix's own length limit, which the pattern (bounding each DNS label) cannot express."""


def is_qualified_name(value: str) -> bool:
    return bool(_qualified.match(value)) and PREFIX_RULE.check(value)


def _check_qualified(value: str) -> str:
    if not _qualified.match(value):
        raise ValueError(f"{value!r} is not {_QUALIFIED_HELP}")
    PREFIX_RULE.enforce(value)
    return value


QualifiedName = Annotated[
    str,
    AfterValidator(_check_qualified),
    WithJsonSchema(
        {
            "type": "string",
            "maxLength": 317,
            "pattern": QUALIFIED_NAME,
            CEL_KEY: [PREFIX_RULE.wire()],
        }
    ),
]
"""A Kubernetes qualified name (label key, taint key, extended resource name)."""

TaintKey = Annotated[
    str,
    AfterValidator(lambda v: v if v == "" else _check_qualified(v)),
    WithJsonSchema(
        {
            "type": "string",
            "maxLength": 317,
            "pattern": f"^({QUALIFIED_NAME[1:-1]})?$",
            CEL_KEY: [PREFIX_RULE.wire()],
        }
    ),
]
"""A qualified name, or empty (a toleration with operator Exists and no key tolerates every taint)."""

LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]
"""A Kubernetes label value: at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends, or empty."""


def _bad_keys(keys: Any) -> list[str]:
    return [k for k in keys if not is_qualified_name(k)]


LABEL_MAP_RULE = Rule(
    f"self.all(k, k.matches({cel_string(QUALIFIED_NAME)}) && !k.matches({cel_string(_PREFIX_TOO_LONG)}))",
    f"every key must be {_QUALIFIED_HELP}",
    lambda keys: not _bad_keys(keys),
    passes={"nvidia.com/gpu.product": "H100", "pool": "gpu"},
    fails={"pool": "gpu", "-pool": "gpu"},
    explain=lambda keys: f"{_bad_keys(keys)[0]!r} is not a valid label key: every key must be {_QUALIFIED_HELP}",
)
"""The keys of a map of labels are qualified names (a schema cannot constrain map keys)."""


def check_label_keys(labels: dict[str, str]) -> dict[str, str]:
    LABEL_MAP_RULE.enforce(labels)
    return labels


ShortString = Annotated[str, Field(max_length=253)]
"""A name-like string; bounded so CEL rules comparing it stay within the API server's cost budget."""

# Paths inside a container (volume mounts, projected files). Kubernetes accepts almost any
# string; kubetune accepts the portable subset, so a path never needs quoting or escaping and
# `.`/`..` segments cannot climb out of a volume.
_PATH_SEGMENT = "[-A-Za-z0-9._@+=,~]+"
ABSOLUTE_PATH = rf"^(/{_PATH_SEGMENT})+$"
RELATIVE_PATH = rf"^{_PATH_SEGMENT}(/{_PATH_SEGMENT})*$"
_DOT_SEGMENT = "(^|/)[.][.]?(/|$)"
_PATH_CHARS = "letters, digits and - . _ @ + = , ~"


_dots = re.compile(_DOT_SEGMENT)
DOT_SEGMENT_RULE = Rule(
    f"!self.matches({cel_string(_DOT_SEGMENT)})",
    "has a '.' or '..' segment; write the path without them",
    lambda v: not _dots.search(v),
    passes="/data/models",
    fails="/data/../etc",
    explain=lambda v: f"{v!r} has a '.' or '..' segment; write the path without them",
)


def path_type(pattern: str, what: str, rules: tuple[Rule, ...] = ()) -> Any:
    """A bounded path string matching `pattern` without '.'/'..' segments; `rules` add what a
    particular field refuses."""
    compiled = re.compile(pattern)

    def check_path(value: str) -> str:
        if len(value) > 1024:
            raise ValueError(f"is {len(value)} characters long; at most 1024 are allowed")
        if not compiled.match(value):
            raise ValueError(f"{value!r} is not {what} of '/'-separated {_PATH_CHARS}")
        for rule in (DOT_SEGMENT_RULE, *rules):
            rule.enforce(value)
        return value

    return Annotated[
        str,
        AfterValidator(check_path),
        WithJsonSchema(
            {
                "type": "string",
                "maxLength": 1024,
                "pattern": pattern,
                CEL_KEY: [DOT_SEGMENT_RULE.wire(), *(r.wire() for r in rules)],
            }
        ),
    ]


AbsolutePath = path_type(ABSOLUTE_PATH, "an absolute path")
"""An absolute container path such as /data/models: no '.' or '..' segments, no trailing '/'."""

RelativePath = path_type(RELATIVE_PATH, "a relative path")
"""A path relative to a volume's root, such as config/train.json: no '.' or '..' segments."""

ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
"""An environment variable name as Kubernetes checks it without the RelaxedEnvironmentVariableValidation
feature (letters, digits, '-', '_', '.'; no leading digit): accepted by every supported server."""

QUALIFIED_NAME_HELP = _QUALIFIED_HELP
"""What a qualified name is, for messages about keys checked outside a LABEL_MAP_RULE."""
