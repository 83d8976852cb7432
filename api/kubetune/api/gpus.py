"""Memory of common GPU types, keyed by the product names that `spec.resources.gpuType` holds.

`gpuType` becomes a nodeSelector on the node label `nvidia.com/gpu.product` (set by NVIDIA's GPU
feature discovery), so users write label spellings such as `NVIDIA-A100-SXM4-80GB` or
`Tesla-T4`. The operator compares its memory estimate with the GPU's memory before a Job is
scheduled; this table is the one place that knows how much memory each product has. Values are
GiB as the driver reports them (`nvidia-smi` total ÷ 1024), so "80GB" cards show 79.6 or 80.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class GPU(NamedTuple):
    label: str
    """The product label (nvidia.com/gpu.product for NVIDIA, amd.com/gpu.product-name for AMD)."""
    memory_gib: float
    vendor: str
    """The domain of the vendor's extended resource: nvidia.com or amd.com."""


KNOWN_GPUS: tuple[GPU, ...] = (
    GPU("NVIDIA-B200", 179.1, "nvidia.com"),
    GPU("NVIDIA-H200", 140.4, "nvidia.com"),
    GPU("NVIDIA-H200-NVL", 140.4, "nvidia.com"),
    GPU("NVIDIA-H100-NVL", 93.6, "nvidia.com"),
    GPU("NVIDIA-H100-80GB-HBM3", 79.6, "nvidia.com"),
    GPU("NVIDIA-H100-PCIe", 79.6, "nvidia.com"),
    GPU("NVIDIA-H800-80GB-HBM3", 79.6, "nvidia.com"),
    GPU("NVIDIA-A100-SXM4-80GB", 80.0, "nvidia.com"),
    GPU("NVIDIA-A100-80GB-PCIe", 80.0, "nvidia.com"),
    GPU("NVIDIA-A100-SXM4-40GB", 40.0, "nvidia.com"),
    GPU("NVIDIA-A100-PCIE-40GB", 40.0, "nvidia.com"),
    GPU("NVIDIA-L40S", 45.0, "nvidia.com"),
    GPU("NVIDIA-L40", 45.0, "nvidia.com"),
    GPU("NVIDIA-A40", 45.0, "nvidia.com"),
    GPU("NVIDIA-RTX-A6000", 48.0, "nvidia.com"),
    GPU("NVIDIA-RTX-6000-Ada-Generation", 48.0, "nvidia.com"),
    GPU("NVIDIA-L4", 22.5, "nvidia.com"),
    GPU("NVIDIA-A10G", 22.5, "nvidia.com"),
    GPU("NVIDIA-A10", 22.5, "nvidia.com"),
    GPU("NVIDIA-GeForce-RTX-4090", 24.0, "nvidia.com"),
    GPU("NVIDIA-GeForce-RTX-3090", 24.0, "nvidia.com"),
    GPU("Tesla-V100-SXM2-32GB", 31.7, "nvidia.com"),
    GPU("Tesla-V100-PCIE-32GB", 31.7, "nvidia.com"),
    GPU("Tesla-V100-SXM2-16GB", 15.8, "nvidia.com"),
    GPU("Tesla-V100-PCIE-16GB", 15.8, "nvidia.com"),
    GPU("Tesla-T4", 15.0, "nvidia.com"),
    GPU("AMD-Instinct-MI300X", 191.7, "amd.com"),
    GPU("AMD-Instinct-MI250X", 128.0, "amd.com"),
)

# Vendor words a user may leave out or add: "A100-SXM4-80GB", "NVIDIA-Tesla-T4", "MI300X".
_PREFIXES = ("nvidia-", "tesla-", "geforce-", "amd-", "instinct-")
# MIG slices (GPU feature discovery with the `single` strategy): "...-MIG-1g.10gb" has 10 GB.
_MIG = re.compile(r"-mig-[0-9]+g\.([0-9]+)gb$")
_SIZE = re.compile(r"(?:^|-)([0-9]+)gb(?:-|$)")


def _key(name: str) -> str:
    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    # AMD's labeller appends the form factor (AMD_Instinct_MI300X_OAM); the memory is the same.
    return re.sub(r"-(oam|sxm|pcie)$", "", key) if key.startswith("mi") else key


_BY_KEY = {_key(g.label): g for g in KNOWN_GPUS}


def lookup(gpu_type: str) -> GPU | None:
    """The table entry for a product name, matched case-insensitively, with or without the vendor
    prefix, spaces or underscores for dashes (`nvidia-smi` prints "NVIDIA A100-SXM4-80GB", the
    label says "NVIDIA-A100-SXM4-80GB")."""
    return _BY_KEY.get(_key(gpu_type))


def gpu_memory_gib(gpu_type: str) -> float | None:
    """Memory of one GPU of this product in GiB; a MIG slice's own memory; a size written in the
    name ("…-96GB") for products not in the table; None when nothing says."""
    key = _key(gpu_type)
    mig = _MIG.search(key)
    if mig:
        return float(mig.group(1))
    known = _BY_KEY.get(key)
    if known is not None:
        return known.memory_gib
    size = _SIZE.search(key)
    return float(size.group(1)) if size else None


def largest(gpu_resource: str = "nvidia.com/gpu") -> GPU | None:
    """The GPU with the most memory among those of the resource's vendor (`nvidia.com/gpu` →
    NVIDIA); None for a resource of a vendor the table does not know."""
    vendor = gpu_resource.split("/", 1)[0]
    candidates = [g for g in KNOWN_GPUS if g.vendor == vendor]
    return max(candidates, key=lambda g: g.memory_gib) if candidates else None
