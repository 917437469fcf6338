"""Model families MADTP patches: one module per family, each a table of tower specs (madtp.models.spec)."""
from . import clip

FAMILIES = (clip,)
SPECS = tuple(spec for family in FAMILIES for spec in family.SPECS)
MODELS = tuple(model for family in FAMILIES for model in family.MODELS)
