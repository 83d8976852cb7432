"""Quiet, informative output: library noise a run would print, filtered once per process.

Warnings our own calls caused are fixed where we make the call (TrainingArguments gets
`activation_checkpointing`, not the deprecated `gradient_checkpointing`). What is left is library
chatter about the libraries themselves, printed on every run and actionable by nobody running a
job, so it is dropped here rather than shown:

- bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community …" when it is
  imported on a CPU with AVX512-BF16 and the optional `kernels` package is absent. Its own CPU
  kernel is used instead; 4-bit training is correct either way (tests/trainer/test_methods.py).
- peft's PeftModel and TRL read `model.is_gradient_checkpointing`, a deprecated alias in
  transformers 5 (a FutureWarning with two lines of source location per model wrapped); peft's
  prefix and prompt tuning pass `past_key_values` / `position_ids` the way transformers 4 took them.
  Not filtered: "Both `past_key_values` and `cache` are set" — it would mean a prefix dropped in
  `generate`, which methods.prefix_tuning.fix_generation prevents; should it come back, it shows.
- rouge_score logs "Using default tokenizer." through absl at INFO each time a scorer is built.
- transformers' own progress bars ("Loading weights", "Writing model shards") and datasets' map
  bars (TRL's tokenising) redraw with carriage returns: pod logs get a smeared line per load.
  The hub's download bars stay (a 15 GB download should show that it moves).

Everything is matched by message, so any other warning of the same libraries still shows.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

DROPPED_LOG_MESSAGES = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}
"""Logger name → message prefixes dropped from it."""

DROPPED_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # peft's prefix tuning hands its prefix to the base model's forward as `past_key_values`, an alias
    # transformers 5 still honours (the forward uses the prefix; tests/trainer/test_methods.py).
    (FutureWarning, r"`past_key_values` is deprecated and will be removed in version [\d.]+ for `\w+\.forward`"),
    # transformers' generate passes position ids; peft's prompt tuning drops them (it re-derives the
    # positions of the virtual tokens) and says so on every generation.
    (UserWarning, r"Position ids are not supported for parameter efficient tuning"),
)
"""(category, message regex) of Python warnings dropped."""

QUIET_LOGGERS = {"absl": logging.WARNING}
"""Loggers whose INFO chatter is not ours to show."""

_installed = False


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def install() -> None:
    """Install the filters (idempotent). Call before the ML libraries are imported: bitsandbytes
    logs its line at import time. Logger filters work before the logger's module exists, since
    `logging.getLogger` returns the same object to it later."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, prefixes in DROPPED_LOG_MESSAGES.items():
        logging.getLogger(name).addFilter(_DropMessages(prefixes))
    for category, message in DROPPED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported


def no_transformers_bars() -> None:
    """Turn off transformers' own tqdm bars (loading and writing weights), keeping the hub's
    download bars: its tqdm hook gets every bar transformers makes, and returns a disabled one."""
    from transformers.utils import logging as hf_logging

    def disabled(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return factory(*args, **{**kwargs, "disable": True})

    hf_logging.set_tqdm_hook(disabled)


def for_run() -> None:
    """Everything above, for a training run (which imports transformers anyway)."""
    install()
    no_transformers_bars()
