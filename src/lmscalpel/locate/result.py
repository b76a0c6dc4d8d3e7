"""The result of a causal trace and its files.

Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (Section 2.1, Figure 1): per
prompt, P_restored(answer) for every (token, layer) and kind of restored state, with the clean and
corrupted probabilities its indirect effects are measured against. Computed by
:func:`lmscalpel.locate.tracing.trace`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class TraceResult:
    """Causal trace of one prompt.

    ``restored[kind]`` is a (tokens, layers) float tensor of P_restored(answer) when restoring
    that kind at (token, layer); NaN where a token was not traced. ``tokens`` are the decoded
    prompt tokens, ``subject_positions`` their indices that belong to the subject.
    """

    prompt: str
    subject: str
    answer: str
    answer_token: int
    tokens: list[str]
    subject_positions: list[int]
    p_clean: float
    p_corrupted: float
    noise: float
    samples: int
    window: int
    restored: dict[str, torch.Tensor] = field(default_factory=dict)
    model: str = ""
    fingerprint: str = ""
    precision: str = "float32"
    seconds: float = 0.0

    @property
    def kinds(self) -> list[str]:
        return list(self.restored)

    @property
    def num_layers(self) -> int:
        return next(iter(self.restored.values())).shape[1]

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """(tokens, layers) P_restored - P_corrupted."""
        return self.restored[kind] - self.p_corrupted

    def strongest(self, kind: str) -> tuple[int, int]:
        """(token, layer) of the largest indirect effect of ``kind``."""
        effect = torch.nan_to_num(self.indirect_effect(kind), nan=-float("inf"))
        token, layer = divmod(int(effect.argmax()), effect.shape[1])
        return token, layer

    def metadata(self) -> dict:
        """Everything but the arrays, as plain JSON types."""
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "answer": self.answer,
            "answer_token": self.answer_token,
            "tokens": self.tokens,
            "subject_positions": self.subject_positions,
            "p_clean": self.p_clean,
            "p_corrupted": self.p_corrupted,
            "noise": self.noise,
            "samples": self.samples,
            "window": self.window,
            "kinds": self.kinds,
            "num_layers": self.num_layers,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "precision": self.precision,
            "seconds": self.seconds,
        }

    def to_dict(self) -> dict:
        """Metadata plus, per kind, P_restored and the indirect effect as nested lists (NaN as
        ``null``)."""

        def rows(t: torch.Tensor) -> list[list[float | None]]:
            return [[None if v != v else round(v, 6) for v in row] for row in t.tolist()]

        data = self.metadata()
        data["restored"] = {k: rows(v) for k, v in self.restored.items()}
        data["indirect_effect"] = {k: rows(self.indirect_effect(k)) for k in self.restored}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TraceResult:
        def tensor(rows: list) -> torch.Tensor:
            return torch.tensor([[float("nan") if v is None else v for v in r] for r in rows])

        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["restored"] = {k: tensor(v) for k, v in data["restored"].items()}
        return cls(**fields)

    def save(self, folder: str | Path) -> list[Path]:
        """Write ``trace.json`` (metadata and arrays) and ``trace.safetensors`` (the arrays:
        ``restored.<kind>`` and ``indirect_effect.<kind>``, each (tokens, layers))."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for kind, values in self.restored.items():
            tensors[f"restored.{kind}"] = values.contiguous()
            tensors[f"indirect_effect.{kind}"] = self.indirect_effect(kind).contiguous()
        meta = {"metadata": json.dumps(self.metadata())}
        save_file(tensors, folder / "trace.safetensors", metadata=meta)
        (folder / "trace.json").write_text(json.dumps(self.to_dict(), indent=1))
        return [folder / "trace.json", folder / "trace.safetensors"]

    @classmethod
    def load(cls, folder: str | Path) -> TraceResult:
        folder = Path(folder)
        meta = json.loads((folder / "trace.json").read_text())
        tensors = load_file(folder / "trace.safetensors")
        fields = {k: v for k, v in meta.items() if k in cls.__dataclass_fields__}
        fields["restored"] = {k: tensors[f"restored.{k}"] for k in meta["kinds"]}
        return cls(**fields)
