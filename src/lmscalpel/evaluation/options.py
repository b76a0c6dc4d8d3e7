"""Settings of an evaluation run (what to measure, how to edit, how hard to work)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

PROTOCOLS = ("single", "batch", "sequential")


class EvaluationError(RuntimeError):
    """An evaluation cannot run as asked (bad settings, an output folder of another run, a revert
    that did not restore the model)."""


@dataclass(frozen=True)
class EvalOptions:
    """How a run edits and measures.

    ``protocol``: ``single`` (each case edited on the pristine model, then reverted),
    ``batch`` (``batch_size`` cases per editor call; ``None`` = all cases in one call) or
    ``sequential`` (edits accumulate; all earlier edits re-measured at ``checkpoints`` and at the
    end). ``exact_match``: also judge answers by greedy generation. Fluency is measured on the
    first ``fluency_cases`` cases, ``fluency_prompts`` prompts each, ``fluency_tokens`` generated
    tokens per prompt (0 cases turns it off). ``score_batch_size``: distinct prompts per forward
    pass; ``generate_batch_size``: prompts per generation batch.

    Costs on the 2-core CPU with SmolLM2-135M (see docs/evaluation.md): fluency is by far the most
    expensive measurement, about 12 s per case in the single protocol with the defaults.
    """

    protocol: str = "single"
    batch_size: int | None = None
    checkpoints: tuple[int, ...] = (1, 10, 100, 1000)
    exact_match: bool = True
    fluency_cases: int = 10
    fluency_prompts: int = 2
    fluency_tokens: int = 100
    score_batch_size: int = 64
    generate_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise EvaluationError(
                f"unknown protocol {self.protocol!r}; use one of {', '.join(PROTOCOLS)}"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise EvaluationError(f"batch_size must be >= 1, got {self.batch_size}")
        object.__setattr__(self, "checkpoints", tuple(sorted({int(c) for c in self.checkpoints})))
        if any(c < 1 for c in self.checkpoints):
            raise EvaluationError(f"checkpoints must be >= 1, got {self.checkpoints}")
        for name in ("fluency_cases", "fluency_prompts", "fluency_tokens"):
            if getattr(self, name) < 0:
                raise EvaluationError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("score_batch_size", "generate_batch_size"):
            if getattr(self, name) < 1:
                raise EvaluationError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def measures_fluency(self) -> bool:
        return self.fluency_cases > 0 and self.fluency_prompts > 0 and self.fluency_tokens > 0

    def checkpoints_for(self, n: int) -> list[int]:
        """Checkpoints of a sequential run over ``n`` cases: those <= n, plus n itself."""
        return sorted({c for c in self.checkpoints if c <= n} | ({n} if n else set()))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checkpoints"] = list(self.checkpoints)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EvaluationError(f"unknown evaluation option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def measurement_settings(self) -> dict[str, Any]:
        """The settings that change what a measurement means (a resumed run must keep them)."""
        data = self.to_dict()
        for name in ("score_batch_size", "generate_batch_size"):
            data.pop(name)
        return data
