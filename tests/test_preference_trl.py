"""The preference losses and their LoRA gradients equal TRL's (1.16) on the same batch and weights.

DPO runs TRL's own DPOTrainer (its tokenization, collator and `_compute_loss`, with the frozen "ref" adapter it makes
from a starting adapter, or the disabled adapter for a new one). SimPO runs TRL's CPO code path
(`get_batch_loss_metrics` with loss_type=simpo, cpo_alpha=0) on an uninitialised trainer; ORPO the same for
ORPOTrainer, whose NLL covers prompt and answer where ours covers the answer only (finetune's rule for every loss):
its odds-ratio term, log-probs and rewards must be equal, and its loss equal once that NLL is swapped for the NLL of
the answer tokens. The model is float64; TRL's fused log-prob kernel computes in float32, hence the 1e-5 tolerance.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from finetune.config.data import DataConfig
from finetune.data import build_data
from finetune.testing import write_jsonl
from finetune.training.preference import Dpo, Orpo, SimPO

pytest.importorskip("trl")

SYSTEM = {"role": "system", "content": "be brief"}
NAMES = ["alice", "bob", "carol", "dave"]
ROWS = [{"prompt": [SYSTEM, {"role": "user", "content": f"name: {n}"}],
         "chosen": [{"role": "assistant", "content": f"hello {n}"}],
         "rejected": [{"role": "assistant", "content": f"bye {n}, see you!" if i % 2 else "no"}]}
        for i, n in enumerate(NAMES)]
TOL = 1e-5


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Any:
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def tok(tiny_lm: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm)


@pytest.fixture(scope="module")
def batch(tiny_lm: Path, tok: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Our encoding of ROWS: 4 chosen rows, then the 4 rejected rows."""
    path = write_jsonl(tmp_path_factory.mktemp("pref") / "pairs.jsonl", ROWS)
    bundle = build_data(DataConfig(train=str(path), max_seq_len=256, cache=False), tok)
    return bundle.collator(list(bundle.train))


def _lora_model(tiny_lm: Path) -> Any:
    """float64 tiny Llama with a random (non-zero) LoRA adapter, so adapter and base differ."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float64)
    return get_peft_model(base, _peft_config())


def _peft_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)


def _perturb(*models: Any) -> None:
    """The same step away from the starting adapter in every model (the reference copies stay where they were)."""
    gen = torch.Generator().manual_seed(1)
    names = sorted(n for n, _ in models[0].named_parameters() if ".default." in n)
    noise = {n: torch.randn(dict(models[0].named_parameters())[n].shape, generator=gen, dtype=torch.float64) * 0.05
             for n in names}
    with torch.no_grad():
        for model in models:
            for name, param in model.named_parameters():
                if name in noise:
                    param.add_(noise[name])


def _grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys() and len(ours) > 0
    scale = max(float(g.abs().max()) for g in theirs.values())
    worst = max(float((ours[n] - theirs[n]).abs().max()) for n in ours)
    assert worst <= TOL * max(1.0, scale), (worst, scale)


def _our_loss(objective: Any, model: Any, batch: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    model.train()
    model.zero_grad()
    loss, stats = objective.loss(model, batch, objective.counts(batch), 1)
    loss.backward()
    return float(loss.detach()), objective.summary({k: float(v) for k, v in stats.items()}, objective.counts(batch))


def _dpo_trainer(model: Any, tok: Any, tmp_path: Path, beta: float, **kwargs: Any) -> Any:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, report_to=[], per_device_train_batch_size=4,
                     max_length=None, bf16=False, use_cpu=True)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok, **kwargs)


def _trl_dpo(trainer: Any, batch: dict[str, Any]) -> tuple[float, dict[str, torch.Tensor], dict[str, Any]]:
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch, False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss), _grads(trainer.model), metrics


def _check_trl_batch(trainer: Any, ours: dict[str, Any]) -> dict[str, Any]:
    """TRL's tokenization and collator give our batch: same ids, padding and answer mask."""
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    assert torch.equal(theirs["attention_mask"], ours["attention_mask"])
    assert torch.equal(theirs["completion_mask"], (ours["labels"] != -100).long())
    return dict(theirs)


def test_dpo_from_a_starting_adapter_equals_trl(tiny_lm: Path, tok: Any, batch: dict[str, Any], tmp_path: Path) -> None:
    """Continuing an adapter: the reference is a frozen copy of it (TRL's "ref" adapter), the base is shared."""
    start = _lora_model(tiny_lm)
    ours, theirs = start, copy.deepcopy(start)
    trainer = _dpo_trainer(theirs, tok, tmp_path, beta=0.3)
    assert "ref" in trainer.model.peft_config
    dpo = Dpo(0.3, 0.0, start_adapter="start")
    dpo.attach(ours)
    _perturb(ours, trainer.model)
    trl_batch = _check_trl_batch(trainer, batch)
    loss, metrics = _our_loss(dpo, ours, batch)
    trl_loss, trl_grads, trl_metrics = _trl_dpo(trainer, trl_batch)
    assert abs(loss - trl_loss) <= TOL and loss != pytest.approx(0.6931, abs=1e-3)  # the policy moved
    _assert_same_grads(_grads(ours), trl_grads)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=TOL), name


def test_dpo_of_a_new_adapter_equals_trl_against_the_base(tiny_lm: Path, tok: Any, batch: dict[str, Any],
                                                         tmp_path: Path) -> None:
    """A new adapter: the reference is the base (the adapter disabled), as TRL does with a peft_config."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float64)
    trainer = _dpo_trainer(base, tok, tmp_path, beta=0.1, peft_config=_peft_config())
    assert list(trainer.model.peft_config) == ["default"]
    ours = _lora_model(tiny_lm)
    ours.load_state_dict({k: v for k, v in trainer.model.state_dict().items()}, strict=True)
    dpo = Dpo(0.1, 0.0, start_adapter=None)
    dpo.attach(ours)
    loss, _ = _our_loss(dpo, ours, batch)
    trl_loss, trl_grads, _ = _trl_dpo(trainer, _check_trl_batch(trainer, batch))
    assert abs(loss - trl_loss) <= TOL and abs(loss - 0.6931) > 1e-3
    _assert_same_grads(_grads(ours), trl_grads)


def test_dpo_label_smoothing_is_conservative_dpo_as_trl_writes_it(tiny_lm: Path, batch: dict[str, Any]) -> None:
    """label_smoothing e: -(1-e) log sig(b d) - e log sig(-b d), TRL's formula (CPO's sigmoid loss) fed the DPO
    log-ratios; TRL's DPOTrainer itself has no smoothed sigmoid loss."""
    from trl.experimental.cpo import CPOTrainer

    model = _lora_model(tiny_lm)
    dpo = Dpo(0.2, 0.15, start_adapter=None)
    dpo.attach(model)
    loss, _ = _our_loss(dpo, model, batch)
    from finetune.training.preference import sequence_logps

    with torch.no_grad():
        logps = sequence_logps(model, batch)[0]
        ref = dpo.reference_logps(model, batch)
    fake = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=0.2, label_smoothing=0.15,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    ratios = (logps - ref).chunk(2)
    losses, _, _ = CPOTrainer.cpo_loss(fake, ratios[0], ratios[1])
    assert abs(loss - float(losses.mean())) <= TOL


class _Acc:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x: Any) -> Any:
        return x


def _trl_side_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Our batch in the chosen_/rejected_ layout of TRL's CPO and ORPO trainers."""
    n = batch["input_ids"].shape[0] // 2
    out = {}
    for side, rows in (("chosen", slice(0, n)), ("rejected", slice(n, None))):
        out[f"{side}_input_ids"] = batch["input_ids"][rows]
        out[f"{side}_attention_mask"] = batch["attention_mask"][rows]
        out[f"{side}_labels"] = batch["labels"][rows]
    return out


def test_simpo_equals_trl_cpo_simpo(tiny_lm: Path, tok: Any, batch: dict[str, Any]) -> None:
    from trl.experimental.cpo import CPOTrainer

    model = _lora_model(tiny_lm)
    theirs = copy.deepcopy(model)
    simpo = SimPO(2.0, 1.2, 0.1)
    simpo.attach(model)
    loss, metrics = _our_loss(simpo, model, batch)
    trl = CPOTrainer.__new__(CPOTrainer)  # its code path, without building a trainer around it
    trl.__dict__.update(is_encoder_decoder=False, pad_token_id=tok.pad_token_id, accelerator=_Acc(), alpha=0.0,
                        aux_loss_enabled=False, cpo_alpha=0.0, loss_type="simpo", beta=2.0, simpo_gamma=1.2,
                        label_smoothing=0.1)
    theirs.train()
    trl_loss, trl_metrics = trl.get_batch_loss_metrics(theirs, _trl_side_batch(batch))
    trl_loss.backward()
    assert abs(loss - float(trl_loss)) <= TOL
    _assert_same_grads(_grads(model), _grads(theirs))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=TOL), name


def test_orpo_equals_trl_with_the_nll_on_the_answer(tiny_lm: Path, batch: dict[str, Any]) -> None:
    from trl.experimental.orpo import ORPOTrainer

    model = _lora_model(tiny_lm)
    theirs = copy.deepcopy(model)
    orpo = Orpo(0.25)
    orpo.attach(model)
    loss, metrics = _our_loss(orpo, model, batch)
    trl = ORPOTrainer.__new__(ORPOTrainer)
    trl.__dict__.update(is_encoder_decoder=False, padding_value=0, accelerator=_Acc(), aux_loss_enabled=False, beta=0.25)
    theirs.train()
    side = _trl_side_batch(batch)
    trl_loss, trl_metrics = trl.get_batch_loss_metrics(theirs, side)
    # TRL's NLL covers prompt and answer: recompute it (with its gradient) and swap in the answer-only NLL
    n, ce = batch["input_ids"].shape[0] // 2, torch.nn.CrossEntropyLoss()
    logits = theirs(input_ids=side["chosen_input_ids"], attention_mask=side["chosen_attention_mask"]).logits[:, :-1]
    logits = logits.reshape(-1, logits.shape[-1])
    full_labels = torch.where(side["chosen_attention_mask"] == 1, side["chosen_input_ids"], -100)[:, 1:]
    full_nll, answer_nll = ce(logits, full_labels.reshape(-1)), ce(logits, batch["labels"][:n, 1:].reshape(-1))
    assert float(full_nll) == pytest.approx(trl_metrics["nll_loss"], abs=TOL)  # it is TRL's
    expected = trl_loss - full_nll + answer_nll
    expected.backward()
    assert abs(loss - float(expected)) <= TOL and float(full_nll) != pytest.approx(float(answer_nll), abs=1e-3)
    assert metrics["nll_loss"] == pytest.approx(float(answer_nll), abs=TOL)
    for name in ("log_odds_ratio", "log_odds_chosen", "rewards/chosen", "rewards/margins", "logps/rejected"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=TOL), name
    _assert_same_grads(_grads(model), _grads(theirs))
