"""CS (Eq. 2): the cosine of B A to W, without forming B A."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dallm.monitor.cs import CosineSimilarity, cs_naive, lora_pairs, scan_lora

# ----------------------------------------------------------------------------------------------
# models


def tiny_unet(seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    unet.requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]  # proj_in: 1x1 conv; conv1: 3x3
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
    return unet


class Toy(nn.Module):
    def __init__(self) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.fc = nn.Linear(12, 20)
        self.pw = nn.Conv2d(6, 10, 1)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.emb = nn.Embedding(11, 7)
        self.gpt = Conv1D(9, 13)  # GPT-2 style: weight stored (in, out), needs fan_in_fan_out
        self.head = nn.Linear(4, 4)  # not adapted


def toy(seed: int = 0) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    model = Toy()
    model = inject_adapter_in_model(
        LoraConfig(
            r=3, lora_alpha=6, target_modules=["fc", "pw", "conv", "emb"], init_lora_weights="gaussian"
        ),
        model,
    )
    with warnings.catch_warnings():  # "multiple adapters": a second config on other layers, on purpose
        warnings.simplefilter("ignore")
        model = inject_adapter_in_model(
            LoraConfig(r=2, target_modules=["gpt"], fan_in_fan_out=True, init_lora_weights="gaussian"), model
        )
    return model


def randomize(module: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_pairs(module):
            p.a.copy_(torch.randn(p.a.shape, generator=g))
            p.b.copy_(torch.randn(p.b.shape, generator=g) * 0.1)
            # correlate one factor pair with W so that CS is far from 0 for some layers
            if p.kind == "linear" and not p.w_transposed:
                u, s, vh = torch.linalg.svd(p.w.float(), full_matrices=False)
                r = p.rank
                p.b.copy_((u[:, :r] * s[:r].sqrt()).reshape(p.b.shape))
                p.a.copy_((s[:r].sqrt()[:, None] * vh[:r]).reshape(p.a.shape) + 0.3 * p.a)


# ----------------------------------------------------------------------------------------------
# CS


def test_lora_pairs_finds_every_kind_of_layer():
    unet = tiny_unet()
    pairs = lora_pairs(unet)
    names = [p.name for p in pairs]
    assert any(n.endswith("attn1.to_q") for n in names) and any(n.endswith("attn2.to_out.0") for n in names)
    kinds = {p.kind for p in pairs}
    assert kinds == {"linear", "conv"}
    assert any(p.kind == "conv" and p.w.shape[2:] == (3, 3) for p in pairs)
    assert any(p.kind == "conv" and p.w.shape[2:] == (1, 1) for p in pairs)
    pairs = lora_pairs(toy())
    assert sorted(p.kind for p in pairs) == ["conv", "conv", "embedding", "linear", "linear"]
    for p in pairs:
        assert p.w2d().shape == (p.b2d().shape[0], p.a2d().shape[1])


def test_cs_matches_naive_on_a_peft_unet():
    unet = tiny_unet()
    randomize(unet)
    cs = CosineSimilarity(unet)
    assert len(cs) == len(lora_pairs(unet))
    value, ref = cs(), cs_naive(unet)
    assert abs(value - ref) < 1e-5
    assert abs(ref) > 1e-3  # a meaningful comparison, not 0 == 0
    # live: CS follows the parameters without rebuilding
    randomize(unet, seed=7)
    assert abs(cs() - cs_naive(unet)) < 1e-5


def test_cs_matches_naive_per_layer_on_a_plain_module():
    model = toy()
    randomize(model)
    cs = CosineSimilarity(model)
    per_layer = cs.per_layer()
    for p, value in zip(cs.pairs, per_layer.tolist(), strict=True):
        delta = (
            p.layer.get_delta_weight("default").detach().double().reshape(-1)
        )  # peft's own B A (scaled, laid out as W)
        w = p.w.double().reshape(-1)
        ref = float(torch.dot(delta, w) / (delta.norm() * w.norm()))
        assert abs(value - ref) < 1e-5, p.name
    assert abs(cs() - cs_naive(model)) < 1e-5
    assert max(abs(v) for v in per_layer.tolist()) > 0.3


def test_cs_is_zero_when_b_is_zero_and_ignores_scaling():
    model = toy()
    cs = CosineSimilarity(model)
    with torch.no_grad():
        for p in cs.pairs:
            p.b.zero_() if p.kind != "embedding" else p.a.zero_()
    assert cs() == 0.0 and cs_naive(model) == 0.0
    randomize(model)
    before = cs()
    for p in cs.pairs:
        p.layer.scaling["default"] *= 5.0
    assert cs() == pytest.approx(before, abs=1e-7)
    assert cs_naive(model) == pytest.approx(before, abs=1e-5)


def test_cs_bf16_base_weights_are_read_in_float32():
    model = toy()
    randomize(model)
    with torch.no_grad():
        for p in lora_pairs(model):
            p.w.data = p.w.data.to(torch.bfloat16)
    cs = CosineSimilarity(model)
    t = cs.tensor()
    assert t.dtype == torch.float32 and t.ndim == 0
    assert abs(cs() - cs_naive(model)) < 1e-5


def test_grouped_conv_is_skipped_with_a_reason():
    from peft import LoraConfig, inject_adapter_in_model

    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Linear(5, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "1"]), model)
    pairs, skipped = scan_lora(model)
    assert [p.name for p in pairs] == ["1"]
    assert skipped and skipped[0][0] == "0" and "groups" in skipped[0][1]
    with pytest.warns(UserWarning, match="skipping LoRA layer 0"):
        CosineSimilarity(model)


def test_no_lora_layers_is_an_error():
    with pytest.raises(ValueError, match="no LoRA layers"):
        CosineSimilarity(nn.Linear(3, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cs_cuda_graph_matches_eager_and_follows_the_parameters():
    model = toy().cuda()
    randomize(model)
    graphed, eager = CosineSimilarity(model, cuda_graph=True), CosineSimilarity(model)
    assert graphed.cuda_graph and not eager.cuda_graph
    assert abs(graphed() - cs_naive(model)) < 1e-5
    for step in range(3):  # in-place updates, as an optimizer makes them: no new capture
        with torch.no_grad():
            for p in lora_pairs(model):
                p.a.add_(0.1 * torch.randn_like(p.a))
                p.b.add_(0.1 * torch.randn_like(p.b))
        with torch.autocast("cuda", dtype=torch.bfloat16):  # a trainer's autocast must not leak in
            got = graphed.tensor()
        assert abs(float(got) - eager()) < 1e-6, step
        assert abs(float(got) - cs_naive(model)) < 1e-5, step
    assert graphed.captures == 1
    model.cpu().cuda()  # storage moved: captured again
    assert abs(graphed() - cs_naive(model)) < 1e-5 and graphed.captures == 2
    bf16 = toy().cuda()
    randomize(bf16)
    with torch.no_grad():
        for p in lora_pairs(bf16):
            p.w.data = p.w.data.to(torch.bfloat16)
    assert abs(CosineSimilarity(bf16, cuda_graph=True)() - cs_naive(bf16)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cs_batched_w_equals_the_per_layer_path(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The batched W A^T (the CUDA default), forced on the CPU, in chunks of a few layers: the same CS
    as the per-layer loop and the float64 reference, on every kind of layer and on bf16 weights."""
    for model in (tiny_unet(), toy()):
        randomize(model)
        with torch.no_grad():
            for p in lora_pairs(model):
                p.w.data = p.w.data.to(dtype)
        per_layer = CosineSimilarity(model, batch_w=False)
        smallest = min(p.w.numel() for p in per_layer.pairs)
        monkeypatch.setattr(CosineSimilarity, "W_CHUNK_BYTES", 4 * smallest)  # one layer a chunk
        batched = CosineSimilarity(model, batch_w=True)
        assert batched.batch_w and not per_layer.batch_w and not CosineSimilarity(model).batch_w
        monkeypatch.undo()
        whole = CosineSimilarity(model, batch_w=True)  # a chunk per group
        if len(whole._groups) < len(whole):  # the UNet: groups of several layers, split above
            assert all(len(c) == 1 for c in whole._chunks)
            assert sum(len(c) for c in batched._chunks) == len(batched)
            torch.testing.assert_close(whole.per_layer(), per_layer.per_layer(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(batched.per_layer(), per_layer.per_layer(), rtol=1e-6, atol=1e-7)
        assert abs(batched() - cs_naive(model)) < 1e-5
        randomize(model, seed=5)  # live parameters, as after an optimizer step
        assert abs(batched() - cs_naive(model)) < 1e-5
