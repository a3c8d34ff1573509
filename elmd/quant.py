"""The weight quantization a model is stored and served with: one type, one parser and one
string form for both backends and every record of it (the store's manifest, the load plan,
BackendInfo), so that a quantization named once cannot mean two things further down.

Users keep the short spellings (`choices.QUANTS`: none, bf16, int8, int4, int4-g32/-g64/-g128);
parsing writes a bare `int4`'s group out for the backend that runs it."""

from __future__ import annotations

from dataclasses import dataclass

from elmd.choices import QUANTS

GROUP_SIZES = (32, 64, 128)
# The group of a bare `int4`. PyTorch: 32, a GGUF Q4_1 block's size, which its native kernels
# read. MLX: 64, because mlx-lm's affine scheme keeps a bf16 bias per group, and at group 32
# the tiny model with one channel past fp16's range (test_quantized_model_survives_activations_
# beyond_fp16) came out with its logits inverted (cosine -1.0 to bf16; 0.94 or better at 64).
INT4_GROUP = {"torch": 32, "mlx": 64}
SCHEMES = ("none", "bf16", "int8", "int4")


@dataclass(frozen=True)
class Quant:
    """A concrete quantization. `scheme`: none, bf16 (linear layers' weights in bf16), int8 (per
    output channel on PyTorch; MLX groups it by 64) or int4 (per `group` inputs)."""

    scheme: str = "none"
    group: int = 0  # int4 only

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES or (self.group in GROUP_SIZES) != (self.scheme == "int4"):
            raise ValueError(f"unknown quantization {self.scheme!r} (group {self.group})")

    def __str__(self) -> str:
        return f"int4-g{self.group}" if self.scheme == "int4" else self.scheme

    @property
    def is_none(self) -> bool:
        return self.scheme == "none"

    @classmethod
    def parse(cls, quant: "str | Quant", backend: str) -> "Quant":
        """A spelling from the CLI, models.yaml or a manifest -> Quant; bare `int4` takes
        `backend`'s group (INT4_GROUP). The one parser of quantization names."""
        if isinstance(quant, Quant):
            return quant
        if quant in ("none", "bf16", "int8"):
            return cls(quant)
        if quant == "int4":
            return cls("int4", INT4_GROUP[backend])
        group = quant.removeprefix("int4-g") if isinstance(quant, str) and quant.startswith("int4-g") else ""
        if group.isdigit() and int(group) in GROUP_SIZES:
            return cls("int4", int(group))
        raise ValueError(f"unknown quantization {quant!r}; choose {', '.join(QUANTS[:-1])} or {QUANTS[-1]} "
                         "(none, bf16, int8 or int4 per group of 32, 64 or 128)")
