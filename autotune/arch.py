"""Per-architecture facts: compute capability, nvcc targets, shared memory, SM count.

Everything the later stages need to know about a GPU architecture lives here, so that the search
space, the build flags and the runtime checks read one table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """Facts of one GPU architecture.

    ``smem_per_block`` is the opt-in maximum dynamic shared memory of one thread block, in bytes
    (``cudaDevAttrMaxSharedMemoryPerBlockOptin``), which bounds tile x stage choices.
    ``sm_count`` is the SM count of the reference part, used only when no device is present.
    """

    name: str
    capability: tuple[int, int]
    gencode: str
    smem_per_block: int
    sm_count: int
    min_nvcc: tuple[int, int]
    has_kernels: bool
    parts: str

    @property
    def gencode_flags(self) -> list[str]:
        return [f"-gencode={self.gencode}"]

    @property
    def pdl(self) -> bool:
        """Whether kernels built for it may launch before the kernel ahead of them in the stream
        ends (programmatic dependent launch: ``griddepcontrol`` in PTX, sm90 and newer)."""
        return self.capability >= (9, 0)


# sm90a (not sm90) is required: wgmma, setmaxnreg and TMA multicast are arch-conditional features
# that a plain sm_90 target rejects; likewise sm100a for tcgen05 (UMMA, tensor memory, 2-CTA MMA),
# which nvcc accepts from 12.8 on. The sm80/sm89 libraries also embed PTX: machine code does not
# run across major versions, and with the PTX newer GPUs (an H200 too) JIT-compile and run them.
ARCHS: dict[str, Arch] = {
    "sm80": Arch("sm80", (8, 0), "arch=compute_80,code=[sm_80,compute_80]", 163 * 1024, 108,
                 (11, 0), True, "A100"),
    "sm89": Arch("sm89", (8, 9), "arch=compute_89,code=[sm_89,compute_89]", 99 * 1024, 142,
                 (11, 8), True, "L40S, L4"),
    "sm90": Arch("sm90", (9, 0), "arch=compute_90a,code=sm_90a", 227 * 1024, 132, (12, 3), True,
                 "H100, H200"),
    "sm100": Arch("sm100", (10, 0), "arch=compute_100a,code=sm_100a", 227 * 1024, 148, (12, 8),
                  True, "B200, GB200"),
}


def supported_archs() -> list[str]:
    """Architectures whose kernels this version generates."""
    return [name for name, a in ARCHS.items() if a.has_kernels]


def get_arch(name: str) -> Arch:
    """The :class:`Arch` for ``name``.

    Requirements
    ------------
    ``name`` is one of :func:`supported_archs`; anything else raises ``ValueError`` naming the
    supported ones (and saying when a known architecture has no kernels yet).
    """
    if name in ARCHS and ARCHS[name].has_kernels:
        return ARCHS[name]
    supported = ", ".join(supported_archs())
    if name in ARCHS:
        raise ValueError(f"--arch {name}: no kernels are generated for {name} yet; "
                         f"supported: {supported}")
    raise ValueError(f"--arch {name!r} is not a known architecture; supported: {supported}")


def arch_of_capability(capability: tuple[int, int]) -> str | None:
    """The architecture name of a device capability, e.g. (9, 0) -> "sm90"; None if unknown."""
    for name, a in ARCHS.items():
        if a.capability == tuple(capability):
            return name
    return None


def device_arch(device: int | None = None) -> str | None:
    """The architecture of a visible CUDA device, or None without torch/CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.cuda.is_available():
        return None
    return arch_of_capability(torch.cuda.get_device_capability(device))
