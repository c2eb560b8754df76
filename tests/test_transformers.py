"""Transformer-style models: a dynamic batch axis from a batch-1 example, attention counted."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rankfold.passes import analyze, trace
from rankfold.runtime import create_session
from rankfold.runtime.export import export_onnx


class TinyViT(nn.Module):
    """ViT's shape: patchify, a class token expanded to the batch, attention, an MLP, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 32))
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.mlp(x)
        return self.head(x[:, 0])


def test_batch_one_example_exports_a_dynamic_batch_that_matches_torch(tmp_path):
    # At batch 1, torch.export fixes the batch of this graph to 1 (its 0/1 specialization).
    torch.manual_seed(0)
    model = TinyViT().eval()
    path = export_onnx(model, torch.zeros(1, 3, 16, 16), tmp_path / "vit.onnx")
    session = create_session(path)
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16)
        (onnx_out,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(onnx_out, model(x).numpy(), atol=1e-5)


def test_attention_is_counted_and_kept_with_its_reason():
    x = torch.zeros(2, 3, 16, 16)
    analysis = analyze(trace(TinyViT().eval(), x))
    assert [layer.name for layer in analysis.layers] == ["patch", "mlp.0", "mlp.2", "head"]
    (key,) = analysis.functional
    assert key == "attn (nn.MultiheadAttention: packed projections kept whole)"
    tokens, e = 17, 32  # 16 patches and the class token
    # q, k, v and output projections, then scores and the weighted sum.
    assert analysis.functional[key] == 4 * tokens * e * e + 2 * tokens * tokens * e
    layers = sum(layer.macs for layer in analysis.layers)
    assert analysis.total_macs == layers + analysis.functional[key]
