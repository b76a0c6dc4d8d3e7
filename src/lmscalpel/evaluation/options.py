"""Settings of an evaluation run (what to measure, how to edit, how hard to work)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

PROTOCOLS = ("single", "batch", "sequential")
DEFAULT_CHECKPOINTS = (1, 10, 100, 500, 1000, 2000)


class EvaluationError(RuntimeError):
    """An evaluation cannot run as asked (bad settings, an output folder of another run, a revert
    that did not restore the model)."""


@dataclass(frozen=True)
class EvalOptions:
    """How a run edits and measures.

    ``protocol``: ``single`` (each case edited on the pristine model, then reverted),
    ``batch`` (``batch_size`` cases per editor call; ``None`` = all cases in one call) or
    ``sequential`` (edits accumulate in groups of ``batch_size`` cases, one editor call per
    group, ``None`` = 1; all earlier edits re-measured at ``checkpoints`` and at the end; a
    checkpoint that falls inside a group is taken at the first group boundary at or after it,
    see :meth:`checkpoints_for`). ``exact_match``: also judge answers by greedy generation. Fluency is measured on the
    first ``fluency_cases`` cases, ``fluency_prompts`` prompts each, ``fluency_tokens`` generated
    tokens per prompt (0 cases turns it off). ``score_batch_size``: distinct prompts per forward
    pass; ``generate_batch_size``: prompts per generation batch.

    Costs on the 2-core CPU with SmolLM2-135M (see docs/evaluation.md): fluency is by far the most
    expensive measurement, about 12 s per case in the single protocol with the defaults.
    """

    protocol: str = "single"
    batch_size: int | None = None
    checkpoints: tuple[int, ...] = DEFAULT_CHECKPOINTS
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

    @property
    def group_size(self) -> int | None:
        """Cases per editor call: 1 for ``single``, ``batch_size`` for ``batch`` (``None``: all
        cases) and for ``sequential`` (``None``: 1)."""
        if self.protocol == "single":
            return 1
        if self.protocol == "sequential":
            return self.batch_size or 1
        return self.batch_size

    def checkpoints_for(self, n: int, group: int = 1) -> list[int]:
        """Checkpoints of a sequential run over ``n`` cases edited ``group`` at a time: each
        checkpoint <= n moved to the first group boundary at or after it (a multiple of
        ``group``, or n), plus n itself. With groups of 100 and the default checkpoints that is
        100, 500, 1000, 2000 (1 and 10 are both measured after the first group)."""
        if group < 1:
            raise EvaluationError(f"group size must be >= 1, got {group}")
        moved = {min(n, -(-c // group) * group) for c in self.checkpoints if c <= n}
        return sorted(moved | ({n} if n else set()))

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


def comparable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """:meth:`EvalOptions.measurement_settings` without the ones its protocol ignores (the batch
    size of the single protocol, the checkpoints of the single and batch protocols; a sequential
    batch size of ``None`` is 1), so that two runs' settings compare equal when they measure the
    same (a run folder of an older version, written with other defaults, still resumes)."""
    data = dict(settings)
    protocol = data.get("protocol")
    if protocol != "sequential":
        data.pop("checkpoints", None)
    if protocol == "single":
        data.pop("batch_size", None)
    if protocol == "sequential" and data.get("batch_size") is None:
        data["batch_size"] = 1
    return data
