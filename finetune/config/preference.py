"""`train.preference:` the coefficients of the preference objectives (train.objective dpo, orpo or simpo).

Defaults follow the papers: DPO (Rafailov et al. 2023) beta 0.1; SimPO (Meng et al. 2024) beta 2.0 with a margin
gamma of half of it (gamma / beta = 0.5); ORPO (Hong et al. 2024) lambda 0.1; label smoothing 0 (conservative DPO,
Mitchell 2023, when set)."""

from pydantic import Field

from finetune.config.base import Section

PAPER_BETA = {"dpo": 0.1, "simpo": 2.0}


class PreferenceConfig(Section):
    """The `train.preference:` section (read only by train.objective dpo, orpo and simpo)."""

    beta: float | None = Field(
        default=None, gt=0,
        description="Temperature of the implicit reward: DPO beta * (log p - log p_ref), SimPO beta * mean log p. "
        "null: the paper's value for the objective (dpo 0.1, simpo 2.0). Higher keeps DPO closer to its reference.",
    )
    simpo_gamma: float = Field(
        default=1.0, ge=0, description="SimPO's target reward margin gamma (in reward units, i.e. already times beta)."
    )
    orpo_lambda: float = Field(
        default=0.1, ge=0, description="ORPO's weight lambda of the odds-ratio term added to the NLL of the chosen side."
    )
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=0.5,
        description="DPO/SimPO: the assumed share of flipped preference labels (conservative DPO); 0 is plain DPO.",
    )

    def resolved_beta(self, objective: str) -> float:
        """beta as set, else the paper's value for `objective`."""
        return self.beta if self.beta is not None else PAPER_BETA.get(objective, 0.1)
