"""Defenses: one module each, all with the same shape (:class:`Defense`), found by name in
:data:`DEFENSES`. Importing this package needs no torch: it holds settings and declarations; the
trainers they name are imported when a stage runs.

Adding a defense: write ``defenses/<name>.py`` with a :class:`Defense` subclass, import it here and
add it to the registry below (one line; the order is the report's row order), and add its entry to
``tests/test_defense_contract.py``. The README's "Adding a defense" section walks through one.
"""

from lisa_align.defenses.antidote import Antidote
from lisa_align.defenses.base import Defense, Stage
from lisa_align.defenses.booster import Booster
from lisa_align.defenses.ewc import EWC, EWCFreshLoRA
from lisa_align.defenses.lisa import BSO, Lisa, LisaSettings, validate_lisa_settings
from lisa_align.defenses.na_sft import NASFT
from lisa_align.defenses.registry import DEFENSES, defense_names, get_defense, load_class, register
from lisa_align.defenses.repnoise import RepNoise
from lisa_align.defenses.safelora import SafeLoRA
from lisa_align.defenses.sft import SFT
from lisa_align.defenses.t_vaccine import TVaccine
from lisa_align.defenses.vaccine import RandomVaccine, Vaccine
from lisa_align.defenses.vlguard import Vlguard

# The registry, in the report's row order.
for _defense in (
    NASFT,
    SFT,
    EWC,
    EWCFreshLoRA,
    Vlguard,
    BSO,
    Lisa,
    Vaccine,
    RandomVaccine,
    RepNoise,
    TVaccine,
    Booster,
    Antidote,
    SafeLoRA,
):
    register(_defense)

__all__ = ["BSO", "DEFENSES", "EWC", "NASFT", "SFT", "Antidote", "Booster", "Defense", "EWCFreshLoRA", "Lisa",
           "LisaSettings", "RandomVaccine", "RepNoise", "SafeLoRA", "Stage", "TVaccine", "Vaccine", "Vlguard",
           "defense_names", "get_defense", "load_class", "register", "validate_lisa_settings"]
