"""MADTPConfig refuses every setting that would change results silently: one check, in __post_init__, that the
API, madtp.json loading and the command line all go through."""
import json
import math

import madtp
import pytest
from madtp.config import check_temperature

BAD = [
    (dict(temperature=-1.0), ValueError, "temperature: .*got -1.0"),
    (dict(temperature=0), ValueError, "temperature: .*None \\(no pruning\\)"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=math.nan), ValueError, "temperature: .*got nan"),
    (dict(temperature=math.inf), ValueError, "temperature: .*got inf"),
    (dict(temperature=True), TypeError, "temperature: .*got bool True"),
    (dict(temperature="1.0"), TypeError, "temperature: .*got str"),
    (dict(merge_pruned="no"), TypeError, "merge_pruned: expected True or False, got str 'no'"),
    (dict(merge_pruned=1), TypeError, "merge_pruned"),
    (dict(prune_vision=None), TypeError, "prune_vision"),
    (dict(prune_text="yes"), TypeError, "prune_text"),
    (dict(prune_layers=5), TypeError, "prune_layers: expected None or a sequence .*got int 5"),
    (dict(prune_layers="01"), TypeError, "prune_layers: .*got str"),
    (dict(prune_layers=(1.0,)), TypeError, "prune_layers: expected layer indices .*got float 1.0"),
    (dict(prune_layers=(True,)), TypeError, "prune_layers: .*got bool"),
    (dict(prune_layers=(-1,)), ValueError, "prune_layers: expected layer indices >= 0, got -1"),
    (dict(prune_layers=()), ValueError, "prune_layers: .*empty"),
    (dict(num_alignment_tokens=0), ValueError, "num_alignment_tokens"),
    (dict(num_alignment_tokens=2.0), TypeError, "num_alignment_tokens: .*got float"),
    (dict(num_alignment_tokens=True), TypeError, "num_alignment_tokens"),
    (dict(execution="dense"), ValueError, "execution: expected one of"),
    (dict(execution=1), TypeError, "execution"),
    (dict(importance="mean"), ValueError, "importance: expected one of"),
    (dict(importance=None), TypeError, "importance: .*got NoneType"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD, ids=[str(k) for k, _, _ in BAD])
def test_refused_with_the_field_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        madtp.MADTPConfig(**kwargs)


def test_accepted_settings_are_normalised():
    c = madtp.MADTPConfig(temperature=2, prune_layers=[3, 0, 3])
    assert c.temperature == 2.0 and isinstance(c.temperature, float) and c.prune_layers == (0, 3)
    assert c.prunes_tokens
    assert not madtp.MADTPConfig(temperature=None).prunes_tokens
    assert not madtp.MADTPConfig(temperature=1e-6, prune_vision=False, prune_text=False).prunes_tokens
    assert madtp.MADTPConfig(prune_layers=range(2)).prune_layers == (0, 1)
    # a config that round-trips through madtp.json is equal to itself
    c = madtp.MADTPConfig(num_alignment_tokens=8, temperature=0.5, prune_layers=(1,), execution="padded")
    d = json.loads(json.dumps(c.__dict__))
    d["prune_layers"] = tuple(d["prune_layers"])
    assert madtp.MADTPConfig(**d) == c


def test_check_temperature():
    assert check_temperature("t", None) is None and check_temperature("t", 3) == 3.0
    for bad in (0, -0.5, math.nan, -math.inf):
        with pytest.raises(ValueError, match="^vision: "):
            check_temperature("vision", bad)
    with pytest.raises(TypeError, match="^text: "):
        check_temperature("text", False)
