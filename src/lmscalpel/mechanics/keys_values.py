"""Keys and values: the shared mechanics of the locate-then-edit methods (ROME, MEMIT, AlphaEdit).

Meng et al. 2022 ("Locating and Editing Factual Associations in GPT", §3.1) treat an MLP output
matrix W as a key-value memory: its input at the subject's last token is the *key* k that selects
the fact, its output the *value* v that recalls it. Editing a fact takes

* the key k*: the key at the subject's last token, averaged over the prompt behind a few context
  prefixes (:func:`compute_keys`), and
* a new value: a vector δ added to a module's output at that position and optimised so that the
  new target becomes likely behind every prefix, while a KL term keeps what the model says about
  the subject itself ("{subject} is a") and the norm of δ stays bounded (:func:`optimise_value`).

Both run on :class:`~lmscalpel.mechanics.anchored.AnchoredBatch` rows (all anchors in one column), and the
optimisation reruns only the positions and layers δ can affect (:class:`AnchoredRun`), stops as
soon as the target is likely enough, and reads logits only where the loss needs them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmscalpel.core.config import ConfigError, MethodConfig, option
from lmscalpel.core.requests import EditRequest
from lmscalpel.mechanics.anchored import AnchoredBatch, AnchoredRow, AnchoredRun
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import Tap, tap
from lmscalpel.runtime.kv import run_body

log = logging.getLogger(__name__)

KeySolver = Callable[[torch.Tensor], torch.Tensor]
"""k ↦ C⁻¹k for keys (d_k,): e.g. :meth:`lmscalpel.mechanics.stats.KeyStatistics.solve`."""


def context_rows(
    request: EditRequest, prefixes: Sequence[str], *, with_target: bool = True
) -> list[AnchoredRow]:
    """The request's prompt behind each prefix, with its new target (unless ``with_target=False``)."""
    target = request.target_new if with_target else None
    return [
        AnchoredRow(prefix + request.prompt, request.subject, target, subject_from=len(prefix))
        for prefix in prefixes
    ]


def compute_keys(
    lm: LoadedModel, layer: int, requests: Sequence[EditRequest], prefixes: Sequence[str]
) -> torch.Tensor:
    """k* (n_requests, d_k): the input of layer ``layer``'s MLP output matrix at each subject's last
    token, averaged over the prompt behind every prefix. One batched pass that stops at the layer.
    """
    rows = [row for r in requests for row in context_rows(r, prefixes, with_target=False)]
    batch = AnchoredBatch.build(lm, rows)
    name = lm.adapter.mlp_out_name(layer)
    with torch.no_grad(), tap(lm.model, {name: Tap(input=True)}, stop=True) as seen:
        run_body(lm, batch.input_ids, batch.attention_mask, batch.position_ids)
    keys = seen[name].input[:, batch.anchor]
    return keys.reshape(len(requests), len(prefixes), -1).mean(dim=1)


@dataclass
class ValueOptions(MethodConfig):
    """How δ is optimised (the defaults are ROME's, with early stopping; docs/rome.md measures
    them). A method that optimises values (ROME; MEMIT next) *is* these options plus its own
    fields: its config class derives from this one, so the fields exist once.

    ``lr`` is in units of the unedited value's norm ‖v‖ per √d, so one value suits models of any
    width and scale; Adam's β = (0.5, 0.9) (short memory) reaches the target in fewer steps than
    the default β here.
    """

    lr: float = option(0.5, "Adam's step size for δ, in units of the unedited value's norm per √d")
    max_steps: int = option(20, "at most this many optimisation steps for δ")
    stop_nll: float = option(
        0.5, "stop once the mean negative log-likelihood of the new target is at most this"
    )
    kl_factor: float = option(
        0.0625, "weight of KL(new ‖ old) of the next-token distribution after kl_prompt"
    )
    kl_prompt: str = option("{} is a", "prompt whose prediction must not change; {} is the subject")
    weight_decay: float = option(0.5, "weight of (‖δ‖ / ‖v‖)² in the loss")
    clamp_norm: float = option(4.0, "after every step ‖δ‖ is clipped to clamp_norm · ‖v‖")
    fast: bool = option(
        True,
        "rerun only the positions and layers δ can change (False: the whole model, a reference)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_steps < 0:
            raise ConfigError(f"{type(self).__name__}.max_steps must be >= 0")
        if "{}" not in self.kl_prompt:
            raise ConfigError(
                f"{type(self).__name__}.kl_prompt needs a {{}} placeholder for the subject"
            )


@dataclass
class ValueResult:
    """What :func:`optimise_value` found.

    ``delta`` (d,): the vector to add to the module's output at the subject's last token.
    ``keys`` (n_prefixes, d_k): the MLP-output-matrix input there behind each prefix; ``key`` their
    mean k*. ``value_norm``: ‖v‖ of the unedited output on the bare prompt. ``nll``: the mean
    target negative log-likelihood before each step (and after the last).
    """

    delta: torch.Tensor
    keys: torch.Tensor
    value_norm: float
    nll: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)

    @property
    def key(self) -> torch.Tensor:
        return self.keys.mean(dim=0)

    @property
    def steps(self) -> int:
        return len(self.nll) - 1


def injection_scales(
    run: AnchoredRun, key_module: str, rows: int, key_solver: KeySolver | None
) -> torch.Tensor:
    """How much of δ each recomputed position receives, (B, T) like the hooked tensors.

    Without a ``key_solver``: 1 at every row's anchor, 0 elsewhere (the paper's approximation).
    With one (k ↦ C⁻¹k): (C⁻¹k*)ᵀk_p / (C⁻¹k*)ᵀk* at every recomputed position p — exactly what
    the rank-one update W' = W + δ (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀk*) adds there, k* being the mean key of
    the first ``rows`` rows at the anchor.
    """
    captured = run.captured[key_module].input  # (B, T, d_k)
    a = run.anchor_index
    if key_solver is None:
        scales = torch.zeros(captured.shape[:2], dtype=captured.dtype, device=captured.device)
        scales[:, a] = 1.0
        return scales
    key = captured[:rows, a].double().mean(dim=0)
    direction = key_solver(key).to(captured.device).double()
    scales = (captured.double() @ direction) / (direction @ key)
    scales[:, :a] = 0.0  # positions before the anchors are not recomputed (see docs/rome.md)
    scales = scales * run.batch.attention_mask[:, run.batch.anchor - a :].to(scales.dtype)
    return scales.to(captured.dtype)


def optimise_value(
    lm: LoadedModel,
    layer: int,
    request: EditRequest,
    prefixes: Sequence[str],
    options: ValueOptions | None = None,
    *,
    module: str | None = None,
    key_solver: KeySolver | None = None,
) -> ValueResult:
    """Find δ such that adding it to ``module``'s output (default: layer ``layer``'s MLP output
    matrix, as in ROME) at the subject's last token makes ``request.target_new`` likely behind
    every prefix (Meng et al. 2022, eq. 4). ``module`` must be at layer ``layer`` or above.

    With ``key_solver`` (k ↦ C⁻¹k), δ is injected as the rank-one update of layer ``layer``'s MLP
    output matrix will add it — scaled per position, see :func:`injection_scales` — so what is
    optimised is what the edit does. The model is not changed; gradients flow only into δ.
    """
    options = options or ValueOptions()
    adapter = lm.adapter
    key_module = adapter.mlp_out_name(layer)
    module = module or key_module
    rows = context_rows(request, prefixes)
    kl_row = len(rows)
    rows.append(AnchoredRow(options.kl_prompt.format(request.subject), request.subject))
    batch = AnchoredBatch.build(lm, rows)
    run = AnchoredRun(lm, batch, layer, captures=sorted({key_module, module}), fast=options.fast)

    a = run.anchor_index
    keys = run.captured[key_module].input[:kl_row, a].clone()
    value_norm = float(run.captured[module].output[0, a].norm())
    scales = injection_scales(run, key_module, kl_row, key_solver)
    kl_col = batch.last_cols[kl_row : kl_row + 1]
    kl_rows = torch.tensor([kl_row], device=kl_col.device)
    counts = torch.bincount(batch.read_rows, minlength=kl_row).clamp(min=1).float()
    reference = None  # the unedited next-token distribution after the KL prompt (step 0)

    dim = run.captured[module].output.shape[-1]
    delta = torch.zeros(dim, dtype=lm.dtype, device=lm.device, requires_grad=True)
    scale = max(value_norm, 1e-6)
    optimizer = torch.optim.Adam([delta], lr=options.lr * scale / dim**0.5, betas=(0.5, 0.9))

    def inject(hidden: torch.Tensor) -> torch.Tensor:
        return hidden + scales[..., None].to(hidden.dtype) * delta.to(hidden.dtype)

    result = ValueResult(delta=delta, keys=keys, value_norm=value_norm)
    for step in range(options.max_steps + 1):
        hidden = run.suffix_hidden({module: inject})
        logits = run.logits(hidden, batch.read_rows, batch.read_cols)
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, batch.read_tokens[:, None]).squeeze(1)
        per_row = torch.zeros(kl_row, device=chosen.device).index_add(0, batch.read_rows, chosen)
        nll = -(per_row / counts).mean()
        kl_logprobs = torch.log_softmax(run.logits(hidden, kl_rows, kl_col), dim=-1)
        if reference is None:
            reference = kl_logprobs.detach()
        kl = (kl_logprobs.exp() * (kl_logprobs - reference)).sum()
        decay = (delta.norm() / scale) ** 2
        loss = nll + options.kl_factor * kl + options.weight_decay * decay
        result.nll.append(nll.item())
        result.kl.append(kl.item())
        log.debug("value step %d: nll %.4f kl %.4f |δ|/|v| %.3f", step, nll, kl, decay.sqrt())
        if result.nll[-1] <= options.stop_nll or step == options.max_steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            limit = options.clamp_norm * scale
            norm = delta.norm()
            if norm > limit:
                delta.mul_(limit / norm)
    result.delta = delta.detach().clone()
    return result
