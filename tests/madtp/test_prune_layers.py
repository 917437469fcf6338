"""`prune_layers` is checked against the model at apply: an index no tower has would prune nothing, silently."""
import madtp
import pytest
import torch
from test_clip import inputs, tiny_config
from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPEncoder


def vision(layers):
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                            num_hidden_layers=layers, image_size=32, patch_size=8)).eval()


def config(prune_layers):
    return madtp.MADTPConfig(num_alignment_tokens=4, temperature=1.0, prune_layers=prune_layers)


@pytest.mark.parametrize("prune_layers,bad", [((10, 20), "(10, 20)"), ((4,), "(4,)"), ((1, 9), "(9,)")])
def test_out_of_range_layers_are_refused_and_the_model_left_as_it_was(prune_layers, bad):
    model = vision(4)
    encoder = next(m for m in model.modules() if isinstance(m, CLIPEncoder))
    with pytest.raises(ValueError) as e:
        madtp.apply(model, config(prune_layers))
    message = str(e.value)
    assert message.startswith("prune_layers:"), message
    assert "below 4" in message and f"out of range: {bad}" in message, message
    assert not hasattr(model, "madtp") and "forward" not in vars(encoder)   # the class's forward, unpatched


def test_the_last_layer_is_in_range_and_prunes():
    model = madtp.apply(vision(4), config((3,)))
    with torch.no_grad():
        model(pixel_values=torch.randn(2, 3, 32, 32))
    assert [name.split("encoder.")[-1] for name in madtp.pruning_report(model)] == ["layers.3"]


def test_an_index_only_the_deeper_tower_has_is_accepted():
    # vision 3 layers, text 2: layer 2 prunes the image only
    model = madtp.apply(CLIPModel(tiny_config(vision_layers=3)).eval(), config((2,)))
    with torch.no_grad():
        model(**inputs())
    assert list(madtp.pruning_report(model)) == ["vision_model.encoder.layers.2"]
    with pytest.raises(ValueError, match=r"prune_layers: .*below 3 .*text_model: 2, vision_model: 3"):
        madtp.apply(CLIPModel(tiny_config(vision_layers=3)).eval(), config((3,)))
