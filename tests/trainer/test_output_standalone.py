"""The output stands alone (issue 15, Why: no chat template in the base; adapter_config.json points
at a local cache directory, the manifest lacks revision and dataset URIs): the saved tokenizer
carries the template training used and the EOS is trained; plain peft finds the base from
`base_model_name_or_path`; the manifest records the base's revision or digest, the datasets'
URIs and digests, and the library versions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from kubetune.trainer import builtin, data, provenance, sources

from tests.fixtures.models import builtin_cache, tiny_model_dir  # noqa: F401
from tests.trainer.issue15b import resave, run_job

pytestmark = pytest.mark.slow
LORA = {"adaptation": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}}


def plain_tokenizer():  # -> PreTrainedTokenizerFast
    """A byte-level tokenizer like the built-in one, but without ChatML's special tokens or a chat
    template: only <|endoftext|>, its EOS (GPT-2 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token=None, unk_token=None)


def trained_eos(tok, record: data.Record) -> tuple[int, int]:
    """(EOS tokens in the labels, assistant turns) of one chat record encoded as training does."""
    ex = data.encode_full(record, "chat", tok)
    labelled = [x for x in ex.labels if x != data.IGNORE_INDEX]
    turns = sum(m["role"] == "assistant" for m in record.data["messages"])
    assert labelled[-1] == tok.eos_token_id
    return labelled.count(tok.eos_token_id), turns


def test_the_chat_template_is_saved_and_the_eos_is_trained(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    tok = plain_tokenizer()
    base = resave(
        tiny_model_dir,
        tmp_path / "plain",
        tokenizer=tok,
        vocab_size=len(tok),
        pad_token_id=None,
        eos_token_id=tok.eos_token_id,
    )
    summary, out = run_job(
        tmp_path,
        str(base),
        method=LORA,
        hyperparameters={"maxSteps": 3, "learningRate": 1e-2},
        dataset={"maxSeqLength": 512},
    )
    saved = AutoTokenizer.from_pretrained(out / "adapter")
    assert saved.chat_template == builtin.EOS_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Can I return gloves?"}, {"role": "assistant", "content": "Yes."}]
    assert saved.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nCan I return gloves?<|im_end|>\n<|im_start|>assistant\nYes.<|endoftext|>\n"
    )
    record = data.Record(
        "x.jsonl",
        1,
        {"messages": messages + [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}]},
    )
    assert trained_eos(saved, record) == (2, 2)  # every assistant turn is taught to stop
    # a tokenizer with ChatML's special tokens and no template gets ChatML, whose <|im_end|> is its EOS
    chatml = AutoTokenizer.from_pretrained(tiny_model_dir)
    chatml.chat_template = None
    data.ensure_chat_template(chatml)
    assert chatml.chat_template == builtin.CHAT_TEMPLATE and trained_eos(chatml, record) == (2, 2)
    # a local base: plain peft loads the adapter by itself from base_model_name_or_path
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    tuned = AutoPeftModelForCausalLM.from_pretrained(out / "adapter")
    assert tuned.peft_config["default"].base_model_name_or_path == str(base)


def test_adapter_config_names_the_source_and_the_manifest_its_provenance(builtin_cache: Path, tmp_path: Path) -> None:
    import peft
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary, out = run_job(
        tmp_path,
        "builtin://tiny-llama",
        method=LORA,
        hyperparameters={"maxSteps": 3, "learningRate": 1e-2},
        dataset={"maxSeqLength": 512},
    )
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "builtin://tiny-llama"  # not the download cache
    # the name → a base (kubetune's own mapping; `kubetune fetch --model` does the same) → plain peft
    base_dir = sources.resolve_model(config["base_model_name_or_path"])
    base = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True)
    ids = torch.tensor([[5, 70, 80, 90, 100, 110]])
    before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, adapter)
    assert not torch.allclose(tuned(input_ids=ids).logits, before, atol=1e-4)  # the trained adapter applies
    manifest = json.loads((out / "manifest.json").read_text())
    files = sorted(p for p in base_dir.iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in files)
    assert manifest["base"] == {
        "source": "builtin://tiny-llama",
        "name": "builtin://tiny-llama",
        "sha256": hashlib.sha256(lines.encode()).hexdigest(),
        "digestOf": "config.json and *.safetensors: sha256 of their sha256sum lines (sorted by path)",
    }
    train = tmp_path / "train.jsonl"
    assert manifest["datasets"] == [
        {
            "role": "train",
            "uri": str(train),
            "sha256": hashlib.sha256(train.read_bytes()).hexdigest(),
            "bytes": train.stat().st_size,
        }
    ]
    versions = manifest["versions"]
    assert (versions["transformers"], versions["peft"]) == (transformers.__version__, peft.__version__)
    assert versions["torch"] == torch.__version__ and "python" in versions
    # the other sources' names
    assert provenance.base_model_name("hf://Qwen/Qwen2.5-0.5B@v1") == "Qwen/Qwen2.5-0.5B"
    assert provenance.base_model_name("s3://models/llama/") == "s3://models/llama/"
    assert provenance.base_model_name("file:///srv/models/llama") == "/srv/models/llama"
