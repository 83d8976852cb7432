"""Measure the peak memory of two training steps on CPU: `python memory_probe.py JSON-LIST`.

For each config (in one process, after an unmeasured warm-up that initialises the kernels) it
prints `PROBE {"peak": bytes, "base": bytes, …}`: `base` is the RSS before the model is built,
`peak` the high-water mark (VmHWM, reset through /proc/self/clear_refs before each config) after
two optimizer steps (the second has Adam's states). peak − base is what the memory model predicts
for a CPU run. RSS is what a pod's memory limit counts, so it is measured rather than torch's
allocator statistics (which do not exist for CPU tensors); freed memory is handed back to the OS
(malloc_trim) between configs so one config's peak does not hide in the next one's base.
"""

from __future__ import annotations

import json
import sys


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)


def workload(c: dict):
    """What a probe result ran, as kubetune.api.memory sees a CPU run (fp32 weights and
    activations): the benchmark (memory_grid.py) and the test (test_memory_model.py) compare its
    prediction with the measured peak."""
    from kubetune.api.memory import Workload

    return Workload(
        parameters=c["parameters"],
        trainable=c["trainable"],
        hidden=c["hidden"],
        layers=c["layers"],
        vocab=c["vocab"],
        seq_length=c["seq"],
        batch_size=c["batch"],
        intermediate=c["intermediate"],
        weight_dtype="fp32",
        compute_bytes=4,
        gradient_checkpointing=bool(c.get("checkpointing")),
        chunked_logits=c["chunked"],
        head_trains=c["head_trains"],
        label_share=0.75,  # the probe masks the first quarter of every row
        gpu=False,
    )


def measure(cfg: dict) -> dict:
    import torch
    from kubetune.trainer import chunked
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    _reset()
    base = _status("VmRSS")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["heads"],
        max_position_embeddings=cfg["seq"],
        tie_word_embeddings=False,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    if cfg["adaptation"] == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    if cfg.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg["adaptation"] == "lora":
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g)
    labels = ids.clone()
    labels[:, : cfg["seq"] // 4] = -100
    for _ in range(2):
        inputs = {"input_ids": ids, "labels": labels}
        if cfg["chunked"]:
            loss = chunked.sft_loss(model, inputs)[0]
        else:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n)
    return {
        **cfg,
        "peak": _status("VmHWM"),
        "base": base,
        "trainable": trainable,
        "parameters": total,
        "head_trains": head > 0,
    }


WARM_UP = {
    "vocab": 512,
    "hidden": 32,
    "intermediate": 64,
    "layers": 1,
    "heads": 2,
    "seq": 64,
    "batch": 2,
    "adaptation": "lora",
    "chunked": True,
    "checkpointing": True,
}

if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    measure(WARM_UP)
    measure({**WARM_UP, "adaptation": "full", "chunked": False, "checkpointing": False})
    for cfg in json.loads(sys.argv[1]):
        print("PROBE " + json.dumps(measure(cfg)), flush=True)
