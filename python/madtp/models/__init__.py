"""Model families MADTP patches: one module per family, each a table of tower specs (madtp.models.spec) and of
module patches outside the towers."""
from . import blip, clip

FAMILIES = (clip, blip)
SPECS = tuple(spec for family in FAMILIES for spec in family.SPECS)
MODELS = tuple(model for family in FAMILIES for model in family.MODELS)
PATCHES = tuple(patch for family in FAMILIES for patch in getattr(family, "PATCHES", ()))
