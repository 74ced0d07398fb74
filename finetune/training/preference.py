"""Preference objectives (train.objective dpo, orpo, simpo) on batches of pairs (finetune.data.preference: n chosen
rows, then their n rejected rows), and DPO's frozen reference.

The loop asks an objective for the counts a step is normalised over (`counts`), sums them over every micro-batch
and process, then takes `loss(model, batch, totals, world)` per micro-batch: its pieces are sums divided by those
step totals, so accumulation and processes give exactly the gradient of one big batch. Definitions follow TRL 1.16
(tests/test_preference_trl.py compares losses and LoRA gradients with it):

- log p(y): the log-probabilities of the answer tokens only (prompt tokens are -100 in the labels), summed (DPO) or
  averaged over the answer (ORPO, SimPO).
- DPO:   -(1-e) log sig(b d) - e log sig(-b d), d = (log p(c) - log p_ref(c)) - (log p(r) - log p_ref(r)); e is the
         label smoothing of conservative DPO (0: TRL's sigmoid loss).
- SimPO: the same with d = mean log p(c) - mean log p(r) - gamma / b (TRL's CPO loss_type=simpo, cpo_alpha=0).
- ORPO:  NLL of the chosen answers (mean per token) - lambda * mean log sig(log odds(c) - log odds(r)), with
         odds(y) = p / (1 - p) and p = exp(mean log p(y)). TRL's ORPO takes the NLL over prompt and answer; here it
         covers the answer only, like every loss of finetune.
Rewards (logged): b (log p - log p_ref) for DPO, b * mean log p for SimPO, lambda * mean log p for ORPO, as TRL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from finetune.config.train import TrainConfig
from finetune.errors import FinetuneError
from finetune.training.modes import eval_mode
from finetune.training.processes import validation_share

if TYPE_CHECKING:
    import torch

    from finetune.data import DataBundle

REFERENCE = "reference"  # the peft adapter name of DPO's frozen copy of the starting adapter
TOKENS, PAIRS, CHOSEN_TOKENS = 0, 1, 2  # indices into counts / totals


def check_objective(objective: str, data_format: str, lora: bool) -> None:
    """The objective and the data must go together; DPO's reference needs LoRA (the base with the adapter off)."""
    if objective == "sft" and data_format == "preference":
        raise FinetuneError("the data holds preference pairs (chosen/rejected): set train.objective to dpo, orpo or "
                            "simpo (sft trains on answers of prompt/completion, instruction or chat rows)")
    if objective != "sft" and data_format != "preference":
        raise FinetuneError(f"train.objective={objective} needs preference data (prompt/chosen/rejected), but the data "
                            f"format is '{data_format}'")
    if objective == "dpo" and not lora:
        raise FinetuneError("train.objective=dpo needs LoRA (lora.enabled: true): its reference is the model before "
                            "this run, which LoRA keeps for free; orpo and simpo need no reference")


def make_objective(cfg: TrainConfig, start_adapter: str | None = None) -> Preference | None:
    """The preference objective of `cfg` (None for sft). `start_adapter`: the adapter training continues from."""
    p = cfg.preference
    if cfg.objective == "dpo":
        return Dpo(p.resolved_beta("dpo"), p.label_smoothing, start_adapter)
    if cfg.objective == "simpo":
        return SimPO(p.resolved_beta("simpo"), p.simpo_gamma, p.label_smoothing)
    if cfg.objective == "orpo":
        return Orpo(p.orpo_lambda)
    return None


def sequence_logps(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the answer tokens' log-probabilities, number of answer tokens) per row; only the positions that
    predict an answer token are scored."""
    import torch

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[mask]
    scored = logits[:, :-1][mask]
    scored = scored.to(torch.promote_types(scored.dtype, torch.float32))  # half precision up; float64 (tests) kept
    token = scored.gather(-1, labels[mask][:, None]).squeeze(-1) - torch.logsumexp(scored, dim=-1)
    sums = torch.zeros(labels.shape[0], dtype=token.dtype, device=token.device).index_add(0, rows, token)
    return sums, mask.sum(dim=1)


class Preference:
    """Shared by the three objectives: counts, dropout off, and the step-normalised loss with its logged sums."""

    name = ""
    size = 2  # counts per batch: answer tokens (both sides, for throughput), pairs
    reference: str | None = None  # what DPO compares with, for the run record

    def counts(self, batch: dict[str, Any]) -> list[int]:
        return [int((batch["labels"][:, 1:] != -100).sum()), batch["labels"].shape[0] // 2]

    def attach(self, model: Any) -> None:
        """Before the optimizer sees the model: no dropout, so the log-probs of the policy are comparable with the
        reference's and from one step to the next (TRL and the DPO reference code do the same)."""
        import torch

        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0

    def detach(self, model: Any) -> None:
        """After training, before the adapter is saved."""

    def loss(self, model: Any, batch: dict[str, Any], totals: list[int], world: int) -> tuple[Any, dict[str, Any]]:
        """This micro-batch's share of the step loss (times `world`, as DDP averages gradients) and its metric sums."""
        # The reference forward runs first, so adapters are never switched between a forward and its backward.
        reference = self.reference_logps(model, batch)
        logps, tokens = sequence_logps(model, batch)
        per_pair, stats = self.pair_losses(logps, tokens, reference)
        return per_pair.sum() * (world / max(totals[PAIRS], 1)), stats

    def reference_logps(self, model: Any, batch: dict[str, Any]) -> Any:
        """The reference's summed answer log-probabilities, for objectives that have one (DPO)."""
        return None

    def pair_losses(self, logps: Any, tokens: Any, reference: Any) -> tuple[Any, dict[str, Any]]:
        """Per-pair losses and metric sums from the per-row log-probs (chosen rows, then rejected rows)."""
        raise NotImplementedError

    def summary(self, sums: dict[str, float], totals: list[int]) -> dict[str, float]:
        """The logged metrics of a step (or an evaluation) from the summed metric values."""
        return {k: v / max(totals[PAIRS], 1) for k, v in sums.items()}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def _reward_stats(chosen: Any, rejected: Any, logp_chosen: Any, logp_rejected: Any) -> dict[str, Any]:
    chosen, rejected = chosen.detach(), rejected.detach()
    return {"rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
            "rewards/margins": (chosen - rejected).sum(), "rewards/accuracies": (chosen > rejected).sum(),
            "logps/chosen": logp_chosen.detach().sum(), "logps/rejected": logp_rejected.detach().sum()}


def _sigmoid_loss(logits: Any, beta: float, smoothing: float) -> Any:
    import torch.nn.functional as F

    return -F.logsigmoid(beta * logits) * (1 - smoothing) - F.logsigmoid(-beta * logits) * smoothing


class Dpo(Preference):
    """DPO: the sigmoid loss of the chosen-minus-rejected log-ratio against a frozen reference: the base (adapter
    off), or a frozen copy of the starting adapter when the run continues one."""

    name = "dpo"

    def __init__(self, beta: float, label_smoothing: float, start_adapter: str | None):
        self.beta, self.smoothing, self.start = beta, label_smoothing, start_adapter
        self.peft: Any = None
        self.reference = (f"the starting adapter {start_adapter} on the base, frozen (a copy of its LoRA weights)"
                          if start_adapter else "the base model (adapter disabled)")

    def attach(self, model: Any) -> None:
        """A run that continues an adapter compares with a frozen copy of it (a second, frozen LoRA adapter: the
        base weights are shared); a new adapter compares with the base, i.e. the adapter disabled."""
        super().attach(model)
        if not hasattr(model, "disable_adapter"):
            raise FinetuneError("train.objective=dpo needs a LoRA model (its reference is the base with the adapter off)")
        self.peft = model
        if self.start:
            model.add_adapter(REFERENCE, model.peft_config["default"])
            params = dict(model.named_parameters())
            for name, param in params.items():
                if ".default." in name:
                    params[name.replace(".default.", f".{REFERENCE}.")].data.copy_(param.data)
            model.set_requires_grad(REFERENCE, requires_grad=False)

    def detach(self, model: Any) -> None:
        if self.start and REFERENCE in getattr(self.peft, "peft_config", {}):
            self.peft.delete_adapter(REFERENCE)

    @contextlib.contextmanager
    def _as_reference(self, model: Any) -> Iterator[None]:
        import torch

        was_training = model.training
        eval_mode(model)
        if self.start:
            self.peft.set_adapter(REFERENCE, inference_mode=True)
            context: Any = contextlib.nullcontext()
        else:
            context = self.peft.disable_adapter()
        try:
            with torch.no_grad(), context:
                yield
        finally:
            if self.start:
                self.peft.set_adapter("default")
            model.train(was_training)

    def reference_logps(self, model: Any, batch: dict[str, Any]) -> Any:
        """Summed answer log-probabilities under the reference (no gradient, no dropout)."""
        with self._as_reference(model):
            return sequence_logps(model, batch)[0]

    def pair_losses(self, logps: Any, tokens: Any, reference: Any) -> tuple[Any, dict[str, Any]]:
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = reference.chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        losses = _sigmoid_loss(chosen_ratio - rejected_ratio, self.beta, self.smoothing)
        return losses, _reward_stats(self.beta * chosen_ratio, self.beta * rejected_ratio, chosen, rejected)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "beta": self.beta, "label_smoothing": self.smoothing, "reference": self.reference}


class SimPO(Preference):
    """SimPO: the sigmoid loss of the length-normalised log-probability margin less gamma / beta; no reference model."""

    name = "simpo"

    def __init__(self, beta: float, gamma: float, label_smoothing: float):
        self.beta, self.gamma, self.smoothing = beta, gamma, label_smoothing

    def pair_losses(self, logps: Any, tokens: Any, reference: Any) -> tuple[Any, dict[str, Any]]:
        chosen, rejected = (logps / tokens.clamp(min=1)).chunk(2)
        losses = _sigmoid_loss(chosen - rejected - self.gamma / self.beta, self.beta, self.smoothing)
        return losses, _reward_stats(self.beta * chosen, self.beta * rejected, chosen, rejected)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "beta": self.beta, "simpo_gamma": self.gamma, "label_smoothing": self.smoothing}


class Orpo(Preference):
    """ORPO: the chosen answers' NLL (per answer token) minus lambda times the mean log-sigmoid of the log odds ratio;
    no reference model."""

    name = "orpo"
    size = 3  # + chosen answer tokens, the NLL's normaliser

    def __init__(self, lam: float):
        self.lam = lam

    def counts(self, batch: dict[str, Any]) -> list[int]:
        chosen = batch["labels"][: batch["labels"].shape[0] // 2, 1:]
        return [*super().counts(batch), int((chosen != -100).sum())]

    def loss(self, model: Any, batch: dict[str, Any], totals: list[int], world: int) -> tuple[Any, dict[str, Any]]:
        import torch.nn.functional as F

        logps, tokens = sequence_logps(model, batch)
        chosen_sum = logps.chunk(2)[0]
        chosen, rejected = (logps / tokens.clamp(min=1)).chunk(2)
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        nll = -chosen_sum.sum()
        loss = nll * (world / max(totals[CHOSEN_TOKENS], 1)) - self.lam * ratio.sum() * (world / max(totals[PAIRS], 1))
        stats = _reward_stats(self.lam * chosen, self.lam * rejected, chosen, rejected)
        stats.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().sum(), "log_odds_chosen": log_odds.detach().sum()})
        return loss, stats

    def summary(self, sums: dict[str, float], totals: list[int]) -> dict[str, float]:
        out = super().summary(sums, totals)
        if "nll_loss" in sums:
            out["nll_loss"] = sums["nll_loss"] / max(totals[CHOSEN_TOKENS], 1)
        return out

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "orpo_lambda": self.lam}


def reduced_sums(accelerator: Any, sums: dict[str, Any]) -> dict[str, float]:
    """Metric sums added over processes (one all-reduce)."""
    import torch

    if not sums:
        return {}
    names = sorted(sums)
    values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64).detach().cpu() for k in names])
    return dict(zip(names, accelerator.reduce(values.to(accelerator.device), reduction="sum").tolist(), strict=True))


def evaluate_objective(objective: Preference, model: Any, data: DataBundle, batch_size: int,
                       accelerator: Any) -> tuple[float, dict[str, float]]:
    """The preference loss over the whole validation set (every process its share), and its metrics prefixed eval_."""
    import torch

    assert data.validation is not None
    rows = validation_share(data.validation, accelerator.process_index, accelerator.num_processes)
    batches = [data.collator(rows[i: i + batch_size]) for i in range(0, len(rows), batch_size)]
    local = torch.tensor([sum(c) for c in zip(*(objective.counts(b) for b in batches), strict=True)] or [0] * objective.size)
    totals = [int(t) for t in accelerator.reduce(local.to(accelerator.device), reduction="sum").tolist()]
    was_training = model.training
    eval_mode(model)
    loss, sums = torch.zeros((), dtype=torch.float64, device=accelerator.device), dict[str, Any]()
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                part, stats = objective.loss(model, batch, totals, 1)
            loss += part.double()
            sums = {k: sums.get(k, 0) + v for k, v in stats.items()}
    model.train(was_training)
    metrics = objective.summary(reduced_sums(accelerator, sums), totals)
    return float(accelerator.reduce(loss, reduction="sum")), {f"eval_{k}": v for k, v in metrics.items()}


def _log1mexp(x: Any) -> Any:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (as TRL's ORPO)."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
