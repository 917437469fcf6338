"""torch.compile of a pruned model: one graph, no breaks, the eager outputs.

The pruning layers' data-dependent sizes reach the compiler as unbacked symbols (the ops' fake implementations
and the layouts' host offsets read with `tolist` under capture_scalar_outputs), so nothing has to break the
graph to read the device.
"""
import copy

import madtp
import pytest
import torch
from test_clip import inputs, tiny_config
from transformers import CLIPModel, CLIPVisionModel

CAPTURE = dict(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True)


def _pruned(model):
    return madtp.apply(model, madtp.MADTPConfig(num_alignment_tokens=8, temperature=1.0))


@pytest.mark.parametrize("model_type", [CLIPModel, CLIPVisionModel])
@torch._dynamo.config.patch(**CAPTURE)
def test_pruned_clip_traces_without_graph_breaks(model_type):
    torch.manual_seed(0)
    config = tiny_config() if model_type is CLIPModel else tiny_config().vision_config
    model = _pruned(model_type(config).eval())
    x = inputs()
    if model_type is CLIPVisionModel:
        x = {"pixel_values": x["pixel_values"]}
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**x)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1


@torch._dynamo.config.patch(**CAPTURE)
def test_compiled_pruned_clip_equals_eager():
    torch.manual_seed(0)
    model = _pruned(CLIPModel(tiny_config()).eval())
    x = inputs()
    with torch.no_grad():
        eager = model(**x)
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)(**x)
    torch.testing.assert_close(compiled.logits_per_image, eager.logits_per_image)
    torch.testing.assert_close(compiled.image_embeds, eager.image_embeds)
    # eager pruned: the graph compared has pruning in it
    vision = [kept for name, kept in madtp.pruning_report(model).items() if "vision" in name]
    assert int(vision[-1].sum()) < x["pixel_values"].shape[0] * model.vision_model.embeddings.num_positions
