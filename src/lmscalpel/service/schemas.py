"""The JSON bodies the service accepts (pydantic models: they make the OpenAPI schema and the 422s).

Only the shape is checked here (types, lengths, ranges); what the library knows better (a subject
missing from its prompt, a method's config keys, a guard's bounds) it checks itself, and the
service reports that as a 422 naming the field too. Every string is at most :data:`MAX_TEXT`
characters.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TEXT = 4000
MAX_PROBES = 64

Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalityIn(Strict):
    prompt: Text
    answer: Text
    kind: Text = "neighborhood"


class PortabilityIn(Strict):
    prompt: Text
    answer: Text
    kind: Text = "multi-hop"
    answer_before: Text | None = None


class EditRequestIn(Strict):
    """One fact to rewrite (the fields of :class:`lmscalpel.EditRequest`)."""

    prompt: Text = Field(description="The prompt, with the subject verbatim or a {} for it.")
    subject: Text
    target_new: Text
    target_true: Text | None = None
    paraphrases: list[Text] = Field(default_factory=list, max_length=MAX_PROBES)
    locality: list[LocalityIn] = Field(default_factory=list, max_length=MAX_PROBES)
    portability: list[PortabilityIn] = Field(default_factory=list, max_length=MAX_PROBES)
    case_id: int | Annotated[str, Field(max_length=200)] | None = None

    def to_request_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class GuardIn(Strict):
    """Bounds for a guarded edit (:class:`lmscalpel.guard.Guard`); an omitted field keeps the
    library's default, ``null`` turns a bound off (``general_prompts: null``: the default set)."""

    min_reliability: float | None = Field(None, ge=0, le=1)
    min_generalization: float | None = Field(None, ge=0, le=1)
    min_locality: float | None = Field(None, ge=0, le=1)
    general_prompts: list[Text] | None = Field(None, max_length=MAX_PROBES)
    max_general_changed: int | None = Field(None, ge=0)
    general_tokens: int | None = Field(None, ge=1, le=64)

    def to_guard_dict(self) -> dict[str, Any]:
        data = self.model_dump(exclude_unset=True)
        if data.get("general_tokens", 0) is None:
            data.pop("general_tokens")
        return data


class EditIn(Strict):
    method: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        description="A registered method (see GET /v1/health: methods)."
    )
    requests: list[EditRequestIn] = Field(min_length=1)
    config: dict[str, Any] | None = Field(None, description="Method config overrides.")
    guard: GuardIn | None = Field(None, description="Bounds; omitted: no guard (still measured).")
    note: Annotated[str, Field(max_length=1000)] | None = None


class GenerateIn(Strict):
    prompts: list[Text] | None = None
    prompt: Text | None = None
    max_tokens: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _one_of(self) -> GenerateIn:
        if (self.prompts is None) == (self.prompt is None):
            raise ValueError("give either prompt or prompts")
        return self

    @property
    def all_prompts(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])


class ScoreItem(Strict):
    prompt: Text
    target: Text


class ScoreIn(Strict):
    items: list[ScoreItem] = Field(min_length=1)


class TraceIn(Strict):
    prompt: Text
    subject: Text
    answer: Text | None = None
    kinds: list[Literal["hidden", "mlp", "attn"]] = Field(
        default_factory=lambda: ["hidden", "mlp", "attn"], min_length=1, max_length=3
    )
    samples: int = Field(10, ge=1)
    window: int | None = Field(None, ge=1)
    noise: float | None = Field(None, gt=0, allow_inf_nan=False)
    seed: int = 0


class CompletionIn(BaseModel):
    """OpenAI's completion request, the subset served (greedy); other fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(max_length=200)] | None = None
    prompt: Text | list[Text]
    max_tokens: int = Field(16, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    n: int = 1
    stop: Text | list[Text] | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _served(self) -> CompletionIn:
        if self.temperature not in (None, 0):
            raise ValueError("only greedy decoding is served: temperature must be 0")
        if self.n != 1:
            raise ValueError("only n=1 is served")
        if self.stream:
            raise ValueError("streaming is not served")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
