"""Paraphrase defenses (back-translation, SCPN): rewrite every input before the victim sees it,
hoping the rewrite drops the trigger.

They transform inputs rather than flag them, so they are measured by the victim's accuracy
on paraphrased clean texts (defended CA) and its attack success on paraphrased triggered
texts (defended ASR). Offline they use pre-paraphrased files, such as the
``test_back``/``test_spcn`` and ``test_char_back``/``test_char_spcn`` files of the PSIM
study; online, any HF model given by name rewrites the texts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from peftshield.data.loaders import read_split_file
from peftshield.data.records import TextDataset
from peftshield.errors import ConfigError
from peftshield.hub import require_hub
from peftshield.models.inference import predict_proba

OFFLINE_FILES = {"backtranslation": ("test_back", "test_char_back"), "scpn": ("test_spcn", "test_char_spcn")}


@dataclass
class ParaphraseResult:
    defense: str
    defended_clean_accuracy: float
    defended_attack_success_rate: float
    n_clean: int
    n_poisoned: int

    def to_dict(self) -> dict:
        return asdict(self)


def offline_paraphrase_sets(dataset_dir: str | Path, defense: str, skip_empty: bool = True) -> tuple[TextDataset, TextDataset]:
    """The pre-paraphrased clean test set and triggered set of a PSIM-study dataset folder."""
    if defense not in OFFLINE_FILES:
        raise ConfigError(f"unknown paraphrase defense '{defense}' (choose from: {', '.join(OFFLINE_FILES)})")
    clean_stem, triggered_stem = OFFLINE_FILES[defense]
    folder = Path(dataset_dir)
    return read_split_file(folder / f"{clean_stem}.json", skip_empty=skip_empty), read_split_file(folder / f"{triggered_stem}.json", skip_empty=skip_empty)


def evaluate_paraphrased(
    model, tokenizer, defense: str, clean: TextDataset, triggered: TextDataset, target_label: int, max_length: int = 128
) -> ParaphraseResult:
    """Victim accuracy on paraphrased clean texts and attack success on paraphrased triggered texts."""
    clean_probs = predict_proba(model, tokenizer, clean.texts, max_length=max_length)
    triggered_probs = predict_proba(model, tokenizer, triggered.texts, max_length=max_length)
    return ParaphraseResult(
        defense=defense,
        defended_clean_accuracy=float((clean_probs.argmax(1) == clean.label_array()).mean()),
        defended_attack_success_rate=float((triggered_probs.argmax(1) == target_label).mean()),
        n_clean=len(clean), n_poisoned=len(triggered),
    )


class OnlineParaphraser:
    """Rewrite texts with HF models: one seq2seq paraphraser, or a pair of translation models
    (``pivot``: English -> pivot language -> English) for back-translation."""

    def __init__(self, model: str, back_model: str | None = None, max_new_tokens: int = 96) -> None:
        self.model = model
        self.back_model = back_model
        self.max_new_tokens = max_new_tokens

    def _pipeline(self, name: str):
        if not Path(name).exists():
            require_hub(f"paraphrase model '{name}'", "use the pre-paraphrased files (test_back/test_spcn) offline")
        from transformers import pipeline

        return pipeline("text2text-generation", model=name)

    def transform(self, texts: list[str]) -> list[str]:
        outputs = [o["generated_text"] for o in self._pipeline(self.model)(texts, max_new_tokens=self.max_new_tokens)]
        if self.back_model:
            outputs = [o["generated_text"] for o in self._pipeline(self.back_model)(outputs, max_new_tokens=self.max_new_tokens)]
        return [o.strip() or t for o, t in zip(outputs, texts)]
