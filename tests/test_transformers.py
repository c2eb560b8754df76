"""Transformer-style models: a dynamic batch axis from a batch-1 example; attention split into
Linear projections (nn.MultiheadAttention, torchvision's Swin), counted, decomposed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from rankfold.converter import restore
from rankfold.converter.cli import app
from rankfold.passes import LayerPlan, Plan, analyze, decompose, trace
from rankfold.passes.analysis import attention_macs
from rankfold.passes.attention import SplitMultiheadAttention, split_attention
from rankfold.passes.capture import analyze_captured
from rankfold.runtime import create_session
from rankfold.runtime.export import export_onnx

runner = CliRunner()


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


def test_attention_projections_are_linear_layers_and_the_macs_are_unchanged():
    x = torch.zeros(2, 3, 16, 16)
    model = TinyViT().eval()
    analysis = analyze(trace(model, x))
    projections = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"]
    assert [layer.name for layer in analysis.layers] == [
        "patch",
        *projections,
        "mlp.0",
        "mlp.2",
        "head",
    ]
    assert type(model.attn) is nn.MultiheadAttention  # the model itself is left as it was
    tokens, e = 17, 32  # 16 patches and the class token
    assert [analysis.layer(name).macs for name in projections] == [tokens * e * e] * 4
    (key,) = analysis.functional
    assert key == "attn (attention scores and weighted sum)"
    assert analysis.functional[key] == 2 * tokens * tokens * e
    # The split module costs what nn.MultiheadAttention was counted at before it was split.
    whole = attention_macs(model.attn, *[(2, tokens, e)] * 3)
    assert (
        sum(analysis.layer(name).macs for name in projections) + analysis.functional[key] == whole
    )
    layers = sum(layer.macs for layer in analysis.layers)
    assert analysis.total_macs == layers + analysis.functional[key]


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"add_bias_kv": True}, "add_bias_kv appends learned key/value rows after the projections"),
        (
            {"add_zero_attn": True},
            "add_zero_attn appends zero key/value rows after the projections",
        ),
    ],
)
def test_unsupported_attention_is_counted_and_kept_with_its_reason(kwargs, reason):
    model = TinyViT().eval()
    model.attn = nn.MultiheadAttention(32, 4, batch_first=True, **kwargs).eval()
    analysis = analyze(trace(model, torch.zeros(2, 3, 16, 16)))
    assert [layer.name for layer in analysis.layers] == ["patch", "mlp.0", "mlp.2", "head"]
    (key,) = analysis.functional
    assert key == f"attn (nn.MultiheadAttention kept whole: {reason})"
    assert analysis.functional[key] == attention_macs(model.attn, *[(2, 17, 32)] * 3)


def test_an_attention_marked_a_leaf_stays_whole():
    analysis = analyze(trace(TinyViT().eval(), torch.zeros(1, 3, 16, 16), leaf_modules=["attn"]))
    assert "attn.q_proj" not in [layer.name for layer in analysis.layers]
    reason = "a leaf module (--leaf), so its packed projections are not split"
    assert list(analysis.functional) == [f"attn (nn.MultiheadAttention kept whole: {reason})"]


def _masks(config: str, n: int, heads: int, length: int, source: int, generator) -> dict:
    """Attention masks of one kind, no row fully masked (torch gives NaN rows there)."""
    if config == "causal":
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        return {"attn_mask": mask, "is_causal": True}
    if config == "bool":
        mask = torch.rand(length, source, generator=generator) < 0.3
        mask[:, 0] = False
        return {"attn_mask": mask}
    if config == "float3d":
        return {"attn_mask": torch.randn(n * heads, length, source, generator=generator)}
    if config == "padding":
        padding = torch.rand(n, source, generator=generator) < 0.3
        padding[:, 0] = False
        return {"key_padding_mask": padding}
    return {}


@pytest.mark.parametrize("masks", ["none", "causal", "bool", "float3d", "padding"])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize(
    ("batch_first", "bias", "kdim", "vdim"),
    [(True, True, None, None), (False, False, None, None), (True, True, 12, 20)],
    ids=["batch_first", "seq_first_no_bias", "kdim_vdim"],
)
def test_split_attention_matches_nn_multihead_attention(
    masks, need_weights, batch_first, bias, kdim, vdim
):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    e, heads, n, length = 16, 4, 3, 5
    source = length if masks == "causal" else 7
    module = nn.MultiheadAttention(
        e, heads, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first
    ).eval()
    with torch.no_grad():
        for parameter in module.parameters():  # no zero biases
            parameter.normal_(0, 0.3, generator=generator)
    split = SplitMultiheadAttention.from_attention(module)

    def sequence(length_, dim):
        shape = (n, length_, dim) if batch_first else (length_, n, dim)
        return torch.randn(shape, generator=generator)

    query = sequence(length, e)
    key, value = sequence(source, kdim or e), sequence(source, vdim or e)
    kwargs = {
        "need_weights": need_weights,
        "average_attn_weights": False,
        **_masks(masks, n, heads, length, source, generator),
    }
    with torch.no_grad():
        expected, expected_weights = module(query, key, value, **kwargs)
        out, weights = split(query, key, value, **kwargs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    if need_weights:
        torch.testing.assert_close(weights, expected_weights, atol=1e-5, rtol=0)
    else:
        assert weights is None and expected_weights is None


@settings(max_examples=25, deadline=None)
@given(
    heads=st.integers(1, 4),
    head_dim=st.integers(1, 6),
    n=st.integers(1, 3),
    length=st.integers(1, 6),
    source=st.integers(1, 6),
    kdim=st.sampled_from([None, 3, 9]),
    batch_first=st.booleans(),
    bias=st.booleans(),
    need_weights=st.booleans(),
    padding=st.booleans(),
)
def test_split_attention_matches_on_random_shapes(
    heads, head_dim, n, length, source, kdim, batch_first, bias, need_weights, padding
):
    generator = torch.Generator().manual_seed(heads * 100 + head_dim * 10 + length)
    e = heads * head_dim
    module = nn.MultiheadAttention(
        e, heads, bias=bias, kdim=kdim, vdim=kdim, batch_first=batch_first
    ).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.5, generator=generator)
    split = SplitMultiheadAttention.from_attention(module)
    shape = (lambda m, d: (n, m, d)) if batch_first else (lambda m, d: (m, n, d))
    query = torch.randn(shape(length, e), generator=generator)
    key = torch.randn(shape(source, kdim or e), generator=generator)
    value = torch.randn(shape(source, kdim or e), generator=generator)
    kwargs = {"need_weights": need_weights}
    if padding:
        kwargs["key_padding_mask"] = torch.rand(n, source, generator=generator) < 0.5
        kwargs["key_padding_mask"][:, 0] = False
    with torch.no_grad():
        expected, out = module(query, key, value, **kwargs), split(query, key, value, **kwargs)
    for got, want in zip(out, expected, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_split_self_attention_matches_the_fast_path_and_unbatched_inputs():
    torch.manual_seed(0)
    module = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    split = SplitMultiheadAttention.from_attention(module)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():  # the same tensor as q, k and v: torch's fused fast path
        torch.testing.assert_close(
            split(x, x, x, need_weights=False)[0],
            module(x, x, x, need_weights=False)[0],
            atol=1e-5,
            rtol=0,
        )
        x = x[0]  # unbatched (L, E), averaged weights (L, S)
        for out, expected in zip(split(x, x, x), module(x, x, x), strict=True):
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_svd_at_the_projections_full_rank_reproduces_the_model():
    torch.manual_seed(0)
    model = TinyViT().eval()
    with torch.no_grad():  # q, k, v and output projections of rank 8 (of 32)
        for weight in (*model.attn.in_proj_weight.chunk(3), model.attn.out_proj.weight):
            weight.copy_(torch.randn(32, 8) @ torch.randn(8, 32) / 8)
    x = torch.randn(3, 3, 16, 16)
    gm = trace(model, x[:1])
    analysis = analyze(gm)
    projections = [layer for layer in analysis.layers if layer.name.startswith("attn.")]
    full = {layer.name: [8] for layer in projections}
    plan = Plan(
        model="tiny-vit",
        method="svd",
        layers=[
            LayerPlan(
                name=layer.name,
                type=layer.type,
                method="svd" if layer.name in full else None,
                ranks=full.get(layer.name),
                reason="test",
            )
            for layer in analysis.layers
        ],
    )
    compressed, report = decompose(gm, analysis, plan)
    assert [row.name for row in report.layers if row.status == "decomposed"] == [
        layer.name for layer in projections
    ]
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), model(x), atol=1e-5, rtol=0)


def tiny_swin(v2: bool) -> nn.Module:
    """torchvision's SwinTransformer at toy width: shifted windows (with padding at 12×12)."""
    from torchvision.models import swin_transformer as swin

    torch.manual_seed(0)
    blocks = (
        {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2}
        if v2
        else {}
    )
    model = swin.SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=5, **blocks).eval()
    with torch.no_grad():  # biases, position tables and the head away from their zero init
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 or "relative_position_bias_table" in name or "head" in name:
                parameter.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_split_swin_attention_matches_torchvision(v2):
    model = tiny_swin(v2)
    x = torch.randn(2, 3, 48, 48)  # 12×12 tokens: 4×4 windows, shifted; 6×6 after merging
    gm = trace(model, x[:1])
    analysis = analyze(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=0)
    names = [layer.name for layer in analysis.layers]
    for stage, block in (("1", "0"), ("1", "1"), ("3", "0"), ("3", "1")):
        assert f"features.{stage}.{block}.attn.qkv" in names
        assert f"features.{stage}.{block}.attn.proj" in names
    # Stage 1: 9 windows of 16 positions, 16 channels; stage 3: 36 positions padded to 4
    # windows of 16, 32 channels. Scores and weighted sum are counted apart from qkv/proj.
    assert analysis.layer("features.1.0.attn.qkv").macs == 9 * 16 * 16 * 48
    assert analysis.functional["features.1.0.attn (attention scores and weighted sum)"] == (
        2 * 9 * 16 * 16 * 16
    )
    assert analysis.functional["features.3.1.attn (attention scores and weighted sum)"] == (
        2 * 4 * 16 * 16 * 32
    )


SEQUENCE_FIRST_VIT = '''
import torch
from torch import nn

RANKFOLD_SPEC = {"input_shape": [3, 16, 16], "num_classes": 5, "mean": [0.5] * 3, "std": [0.25] * 3}


class Net(nn.Module):
    """Sequence-first attention called with torch's default need_weights=True."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, stride=4)
        self.attn = nn.MultiheadAttention(32, 4)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).permute(2, 0, 1)  # (tokens, batch, channels)
        x = x + self.attn(x, x, x)[0]
        return self.head(x.mean(0))


def net():
    torch.manual_seed(0)
    return Net()
'''


def test_attention_compresses_exports_and_restores_through_the_cli(tmp_path):
    (tmp_path / "m.py").write_text(SEQUENCE_FIRST_VIT)
    args = ["compress", f"{tmp_path / 'm.py'}:net", "--method", "svd", "--rank", "8"]
    result = runner.invoke(app, [*args, "--no-latency", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    summary = " ".join(result.output.split())  # rich wraps lines at the terminal's width
    assert "(attention scores and weighted sums): 1 call(s), 16,384 MACs counted" in summary
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {row["name"]: row for row in report["layers"]}
    tokens, e = 16, 32
    for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"):
        assert rows[name]["status"] == "decomposed"
        assert rows[name]["original_macs"] == tokens * e * e
        assert rows[name]["macs"] == tokens * 8 * 2 * e
    assert report["original"]["functional_macs"] == {
        "attn (attention scores and weighted sum)": 2 * tokens * tokens * e
    }
    assert report["onnx"]["parity_passed"] and report["onnx"]["max_abs_diff"] < 1e-5
    model = restore(tmp_path / "out")
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    session = create_session(tmp_path / "out" / "model.onnx")
    (onnx_out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, model(x).numpy(), atol=1e-5)


def test_the_capture_path_counts_split_attention_as_fx_does():
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.zeros(1, 3, 16, 16)
    fx_analysis = analyze(trace(model, x))
    captured = analyze_captured(split_attention(model), x)
    assert captured.layers == fx_analysis.layers
    assert captured.total_macs == fx_analysis.total_macs
    assert captured.functional == {"scaled_dot_product_attention": 2 * 17 * 17 * 32}


class EinsumAttention(nn.Module):
    """MaxViT's attention products: einsum over (batch, windows, heads, positions, dims)."""

    def __init__(self) -> None:
        super().__init__()
        self.to_qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q = q.reshape(x.shape[0], 3, 5, 2, 4).transpose(2, 3)
        k = k.reshape(x.shape[0], 3, 5, 2, 4).transpose(2, 3)
        v = v.reshape(x.shape[0], 3, 5, 2, 4).transpose(2, 3)
        scores = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k)
        return torch.einsum("bghij,bghjd->bghid", scores.softmax(-1), v)


def test_einsum_products_are_counted_on_either_path():
    x = torch.randn(2, 3, 5, 8)
    per_product = 3 * 2 * 5 * 5 * 4  # windows · heads · positions² · head dim, per sample
    fx_analysis = analyze(trace(EinsumAttention(), x))
    assert fx_analysis.functional == {
        "einsum (product of activations)": per_product,
        "einsum_1 (product of activations)": per_product,
    }
    captured = analyze_captured(EinsumAttention(), x).functional
    assert captured == {"einsum": per_product, "einsum_1": per_product}


def test_attention_inside_a_torch_transformer_layer_is_left_alone():
    # nn.TransformerEncoderLayer reads its attention's packed weights (its fused fast path) and
    # is a leaf to torch.fx: its attention is not split.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0), nn.Linear(16, 3)
    ).eval()
    x = torch.randn(2, 5, 16)
    gm = trace(model, x)
    assert type(gm.get_submodule("0.self_attn")) is nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=0, rtol=0)
