"""Trait data: paired instructions, questions and the judge rubric, built in or generated."""

from .generate import TraitGenError, generate_trait, make_generator, write_trait
from .trait import QA_BLOCK, Trait, TraitError, builtin_traits, fill_rubric, load_ladder, load_trait

__all__ = [
    "QA_BLOCK", "Trait", "TraitError", "TraitGenError", "builtin_traits", "fill_rubric", "generate_trait",
    "load_ladder", "load_trait", "make_generator", "write_trait",
]
