"""The sampling options, with their bounds, declared once: every API dialect's request
(OpenAI chat and completions, Responses, Ollama's `options`) and models.yaml's per-model
`sampling` defaults take them from here, so a bound cannot drift between them. A dialect
may rename a field on the wire (Ollama's `repeat_penalty`) but not re-declare its range.
Names are SamplingParams' (elmd/engine/protocol.py), so `sampling_values()` feeds it."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, field_validator


def _integral(value: Any) -> Any:
    """6.0 as 6: JSON Schema's `integer` admits a number with a zero fraction (and so do the
    clients generated from openapi.json); 6.5, "6" and true stay refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer field of a request (strict validation otherwise refuses every float).
Int = Annotated[int, BeforeValidator(_integral)]


def integer(**bounds: int) -> Any:
    """An integer field type with `bounds` (Field's ge, le, ...) that accepts integral floats.
    The bounds sit inside the integral check, where the JSON schema states them as
    minimum/maximum (outside it, pydantic leaks them as unknown `ge`/`le` keywords)."""
    return Annotated[Annotated[int, Field(**bounds)], BeforeValidator(_integral)]

SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit seed, as the samplers' generators take
MAX_STOP_SEQUENCES = 16  # OpenAI allows 4; evaluation tasks sometimes pass a handful more
MAX_STOP_LENGTH = 256  # characters per stop sequence

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(ge=0, le=1)]
TopK = integer(ge=0)  # 0: off
MinP = Annotated[float, Field(ge=0, le=1)]
RepetitionPenalty = Annotated[float, Field(gt=0)]  # multiplicative; 1: off
Penalty = Annotated[float, Field(ge=-2, le=2)]  # OpenAI's presence and frequency penalties
Seed = integer(ge=SEED_RANGE[0], le=SEED_RANGE[1])
MaxTokens = integer(ge=1)


class SamplingShape(BaseModel):
    """What shapes the distribution a token is drawn from, and where a reply stops: what a
    request may set and what models.yaml may default per model."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # one string or a list, as sent; held as a tuple from here on (the one place it is normalised)
    stop: str | list[str] | tuple[str, ...] | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
        if stop is None:
            return None
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"a stop sequence has at most {MAX_STOP_LENGTH} characters")
        return stops

    def sampling_values(self) -> dict[str, Any]:
        """The options set here, by SamplingParams' names; those left out (None, or no stop
        sequences) take the model's default."""
        values = {name: getattr(self, name, None) for name in SamplingOptions.model_fields}
        return {name: value for name, value in values.items() if value is not None and value != ()}


class SamplingOptions(SamplingShape):
    """A request's sampling options: the shape, plus what only a request may set."""

    seed: Seed | None = None
    ignore_eos: bool | None = None  # vLLM's: generate exactly max_tokens (benchmarks)
