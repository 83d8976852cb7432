"""The trainer's data layer: read JSON Lines, find every problem, tokenise with loss masks, pack.

Bad data is the commonest reason a fine-tuning job fails, and the most expensive place to find it
is an hour into a GPU run. So this module checks everything a user can get wrong — encoding, JSON,
record shape, roles, lengths, counts — *before* a model is loaded (RELIABILITY.md T7), reads in
bounded memory (a 10 MB line is reported, not loaded), collects all problems instead of the first,
and reports them as `FILE:LINE: what to do`, with a bounded message that fits a termination log.

Modules, by concern (this package re-exports their public names: `data.check`, `data.Collator`, …):
- `records`: reading (bounded memory, fsspec, compression) and every per-record check, with the
  problems reported as FILE:LINE; torch-free, as the gateway and `kubetune validate --data` need.
- `encode`: chat template, tokenisation, loss labels, per-message weights, attention-guidance
  spans — one tokenisation per record, everything else derived from it.
- `batches`: packing, collation (torch imported inside the collator), packing-safe attention.
- `checks`: `check` (streaming, keeps nothing) and `validate` (keeps the records; with a
  tokenizer, token statistics and the overlength policy).
Nothing here imports torch or transformers at import time.

Decisions worth knowing:
- Unknown keys are errors, as in the API (a typo such as `"conent"` must not silently train on
  nothing). Message keys are role, content, weight, name. Top-level keys other than the format's
  own are refused unless the caller names them in `extra_keys` (attention guidance reads `spans`).
- A record of a shape we know but cannot train as asked gets one message naming it and the field
  to set, not one "unknown key" per key: preference data in a supervised job (spec.method.type),
  another format's keys (spec.dataset.format), tool calls ("not supported yet"; empty `tools` /
  `tool_calls` are tolerated). Content given as OpenAI's parts trains when every part is text:
  the texts are joined with a newline (as vLLM does for string templates) when the line is read,
  so every later reader sees a string; image, audio and file parts are "not supported".
- Chat examples are rendered with the tokenizer's chat template, or `builtin.CHAT_TEMPLATE`
  (ChatML) when the tokenizer ships none (ending assistant turns with the tokenizer's EOS when
  it lacks ChatML's special tokens, so the EOS is always trained); the trainer saves it with the
  result. Loss falls on assistant content plus the end-of-turn token the template emits after
  it, for messages whose `weight` is not 0. An example truncation leaves without such a token is
  dropped and listed (FILE:LINE); none left is an error.
- Packing relies on transformers' packed-sequence masking: with `position_ids` that restart at 0
  and no attention mask, `masking_utils.find_packed_sequence_indices` builds a block-diagonal
  causal mask (eager, sdpa, flex, flash). It is skipped whenever a KV cache exists, and models
  create one when `use_cache` is on, even in training; `prepare_model_for_packing` turns it off.
"""

from kubetune.trainer.data.batches import (
    PACKING_ATTENTION,
    Collator,
    _first_fit,  # noqa: F401  (tests check the packer itself)
    efficiency,
    pack,
    packing_attention,
    prepare_model_for_packing,
)
from kubetune.trainer.data.checks import (
    DataReport,
    check,
    validate,
)
from kubetune.trainer.data.encode import (
    GUIDE_MASK_KEY,
    IGNORE_INDEX,
    UNSUPERVISED_LISTED,
    Encoding,
    Example,
    apply_overlength,
    encode_all,
    encode_example,
    encode_full,
    encode_record,
    ensure_chat_template,
    instruction_prompt,
    no_supervision_message,
    overlength_message,
    supervised_tokens,
    training_examples,
    unsupervised_warning,
)
from kubetune.trainer.data.records import (
    DEFAULT_VALIDATION_SPLIT,
    FORMAT_KEYS,
    MAX_EXPANSION,
    MAX_REPORTED,
    MESSAGE_KEYS,
    MESSAGE_LIMIT,
    PREFERENCE_SHAPES,
    PROBLEM_LIMIT,
    PVC_ROOT_ENV,
    RECOMMENDED_EXAMPLES,
    REQUIRED_KEYS,
    ROLES,
    TEXT_PART_JOIN,
    TOOL_KEYS,
    TOOL_MESSAGE_KEYS,
    TOOL_ROLES,
    DataError,
    DataProblem,
    Record,
    check_record,
    extra_keys_for,
    iter_records,
    join_text_parts,
    preference_shape,
    read_records,
    record_check_for,
    resolve,
    shape_problem,
    spans_field_for,
    split,
    supervised_shape,
    tool_problem,
)

__all__ = [
    "DEFAULT_VALIDATION_SPLIT",
    "FORMAT_KEYS",
    "GUIDE_MASK_KEY",
    "IGNORE_INDEX",
    "MAX_EXPANSION",
    "MAX_REPORTED",
    "MESSAGE_KEYS",
    "MESSAGE_LIMIT",
    "PACKING_ATTENTION",
    "PREFERENCE_SHAPES",
    "PROBLEM_LIMIT",
    "PVC_ROOT_ENV",
    "RECOMMENDED_EXAMPLES",
    "REQUIRED_KEYS",
    "ROLES",
    "TEXT_PART_JOIN",
    "TOOL_KEYS",
    "TOOL_MESSAGE_KEYS",
    "TOOL_ROLES",
    "UNSUPERVISED_LISTED",
    "Collator",
    "DataError",
    "DataProblem",
    "DataReport",
    "Encoding",
    "Example",
    "Record",
    "apply_overlength",
    "check",
    "check_record",
    "efficiency",
    "encode_all",
    "encode_example",
    "encode_full",
    "encode_record",
    "ensure_chat_template",
    "extra_keys_for",
    "instruction_prompt",
    "iter_records",
    "join_text_parts",
    "no_supervision_message",
    "overlength_message",
    "pack",
    "packing_attention",
    "preference_shape",
    "prepare_model_for_packing",
    "read_records",
    "record_check_for",
    "resolve",
    "shape_problem",
    "spans_field_for",
    "split",
    "supervised_shape",
    "supervised_tokens",
    "tool_problem",
    "training_examples",
    "unsupervised_warning",
    "validate",
]
