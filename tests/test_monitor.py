"""CS (Eq. 2), CS-Fluctuation (Eqs. 3-4), the turning-point detector and the snapshot keeper."""

from __future__ import annotations

import collections
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dallm.monitor import CosineSimilarity, cs_naive, lora_pairs, scan_lora
from dallm.turning import SnapshotKeeper, TurningPointDetector, cs_fluctuation, csf_lag

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


# ----------------------------------------------------------------------------------------------
# CS-Fluctuation


def csf_transcription(cs: list[float], m: int, lr: list[float]) -> list[float | None]:
    """Eqs. 3-4 written out literally, one index at a time (forward windows of m values)."""
    n = len(cs)

    def ma(j: int) -> float:  # Eq. 3
        return sum(cs[i] for i in range(j, j + m)) / m

    def slope(j: int) -> float:  # nabla MA, first difference
        return ma(j) - ma(j - 1)

    def x(j: int) -> float:  # X_j = MA(nabla(MA(CS)))
        return sum(slope(i) for i in range(j, j + m)) / m

    out: list[float | None] = []
    for j in range(n):
        if j < 1 or j + 3 * m - 3 > n - 1:
            out.append(None)
            continue
        xs = [x(i) for i in range(j, j + m)]
        mean = sum(xs) / m
        out.append(sum((v - mean) ** 2 for v in xs) / m / lr[j])  # Eq. 4
    return out


@pytest.mark.parametrize("m", [2, 3, 7])
def test_cs_fluctuation_equals_the_equations(m):
    rng = np.random.default_rng(m)
    n = 80
    cs = list(np.cumsum(rng.normal(0, 1e-3, n)) + 0.01 * np.sin(np.arange(n) / 5))
    lr = list(1e-4 * (1 + np.arange(n) / n))
    got = cs_fluctuation(cs, m, lr)
    want = csf_transcription(cs, m, lr)
    assert len(got) == n
    assert [g is None for g in got] == [w is None for w in want]
    for g, w in zip(got, want, strict=True):
        if w is not None:
            assert g == pytest.approx(w, rel=1e-6, abs=1e-15)
    # the alignment: index 0 and the last 3(m-1) steps are not defined
    defined = [j for j, v in enumerate(got) if v is not None]
    assert defined[0] == 1 and defined[-1] == n - 1 - csf_lag(m)


def test_cs_fluctuation_scalar_lr_and_errors():
    cs = list(np.linspace(0, 1, 30) ** 2)
    assert cs_fluctuation(cs, 3, 1e-3) == cs_fluctuation(cs, 3, [1e-3] * 30)
    assert all(v is None for v in cs_fluctuation(cs[:6], 3, 1e-3))
    with pytest.raises(ValueError):
        cs_fluctuation(cs, 3, [1e-3] * 29)
    with pytest.raises(ValueError):
        cs_fluctuation(cs, 1, 1e-3)


def test_detector_series_equals_the_batch_function():
    rng = np.random.default_rng(0)
    cs = np.cumsum(rng.normal(0, 1e-3, 200))
    lr = 1e-4 * (1 + 0.5 * np.cos(np.arange(200) / 30))
    det = TurningPointDetector(window=5)
    for i in range(200):
        det.update(i + 1, cs[i], lr[i])  # steps start at 1
    batch = cs_fluctuation(list(cs), 5, list(lr))
    series = det.series
    assert len(series) == 200 - csf_lag(5) - 1  # j = 1 .. n - 3M + 2
    for step, value in series:
        assert value == pytest.approx(batch[step - 1], rel=1e-9)


# ----------------------------------------------------------------------------------------------
# turning point on synthetic curves


def oscillating_cs(m: int, n: int, period: int, noise: float, seed: int) -> np.ndarray:
    """CS whose curvature is a damped cosine: CS-Fluctuation ~ curvature^2 has valleys every period/2."""
    t = np.arange(n)
    curvature = 1e-6 * np.exp(-t / (2 * period)) * np.cos(2 * np.pi * t / period)
    cs = np.cumsum(np.cumsum(curvature))
    return cs + np.random.default_rng(seed).normal(0, noise, n)


def local_minima(values: list[float | None]) -> list[int]:
    return [
        j
        for j in range(1, len(values) - 1)
        if None not in (values[j - 1], values[j], values[j + 1])
        and values[j] < values[j - 1]
        and values[j] <= values[j + 1]
    ]


def run_like_a_trainer(det: TurningPointDetector, cs: np.ndarray, lr: float, first_step: int = 1):
    """Feed the detector and keep snapshots at window boundaries as the trainer does."""
    keeper = SnapshotKeeper()
    live = {"w": torch.zeros(3)}
    found = None
    for i, value in enumerate(cs):
        step = first_step + i
        live["w"].fill_(float(step))  # the "weights after step": their value names the step
        if det.is_boundary(step):
            keeper.keep(step, live)
        tp = det.update(step, float(value), lr)
        if tp is not None:
            keeper.pin(tp)
            found = (tp, step)
        keeper.drop_before(det.oldest_needed_step(step))
        assert len(keeper) <= det.max_lag // det.window + 1 + len(keeper.pinned)
    return found, keeper


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("m", [5, 10])
def test_detector_finds_the_second_valley(m, seed):
    period = 12 * m
    n = 5 * period
    clean = oscillating_cs(m, n, period, 0.0, 0)
    minima = local_minima(cs_fluctuation(list(clean), m, 1e-4))
    assert len(minima) >= 3  # the curve has the valleys we think it has
    expected = minima[1] + 1  # the step of the second valley (steps start at 1)
    det = TurningPointDetector(window=m)  # the defaults: min_rise 0.1, merge distance = window
    cs = oscillating_cs(m, n, period, 1e-6 * (m / 10) ** 2, seed)  # a few % of the per-step change
    (tp, at), keeper = run_like_a_trainer(det, cs, 1e-4)
    assert tp % m == 0  # a window boundary ...
    assert abs(tp - expected) <= m // 2 + 2  # ... next to the known second valley
    assert abs(det.turning_valley - expected) <= 2
    assert 0 < at - tp <= det.max_lag
    assert det.confirmed_at == at
    assert tp in keeper and float(keeper.get(tp)["w"][0]) == tp  # the exact weights of that step


def feed(det: TurningPointDetector, values) -> int | None:
    found = None
    for j, v in enumerate(values):
        r = det.observe_csf(j, float(v))
        found = r if r is not None else found
    return found


@pytest.mark.parametrize("seed", range(5))
def test_valleys_of_a_noisy_damped_oscillation(seed):
    # CS-Fluctuation itself: a decaying wave with valleys at 60, 140, 220 (period 80) + noise
    t = np.arange(400)
    curve = np.exp(-t / 150) * (1.2 + np.cos(2 * np.pi * (t - 20) / 80))
    curve += np.random.default_rng(seed).normal(0, 0.01, len(t))
    det = TurningPointDetector(window=10)
    tp = feed(det, curve)
    assert [abs(v - w) <= 6 for v, w in zip(det.valleys[:3], [60, 140, 220], strict=False)] == [True] * 3
    assert tp in (130, 140, 150) and abs(tp - det.turning_valley) <= 5


def test_a_small_blip_is_not_a_valley():
    t = np.arange(300)
    base = np.exp(-t / 150) * (1.2 + np.cos(2 * np.pi * (t - 20) / 80))
    blip = base + 0.15 * np.exp(-0.5 * ((t - 120) / 2) ** 2)  # on the falling side, 8% of the range
    naive = TurningPointDetector(window=10, min_rise=0.0)
    assert feed(naive, blip) is not None and naive.turning_valley < 125  # fooled: the dip before the blip
    guarded = TurningPointDetector(window=10)
    assert feed(guarded, blip) == 140 and len([v for v in guarded.valleys if v < 130]) == 1


def test_a_double_dip_is_merged_into_one_valley():
    t = np.arange(300)
    base = np.exp(-t / 150) * (1.2 + np.cos(2 * np.pi * (t - 20) / 80))
    dip = base + 0.5 * np.exp(-0.5 * ((t - 56) / 2) ** 2)  # a tall narrow bump splits the first valley
    plain = TurningPointDetector(window=10, min_valley_distance=1)
    assert feed(plain, dip) is not None and plain.turning_valley < 80  # two valleys around the bump
    merged = TurningPointDetector(window=10, min_valley_distance=15)
    assert feed(merged, dip) == 140
    assert len([v for v in merged.valleys if v < 100]) == 1


def test_a_plateau_is_not_a_valley_and_the_lag_is_bounded():
    # falls, stays flat for a long time, then rises slowly: no turn within the horizon
    curve = np.concatenate([np.linspace(1, 0, 50), np.zeros(100), np.linspace(0, 0.05, 100)])
    det = TurningPointDetector(window=5)
    feed(det, curve)
    assert det.valleys == []
    assert det.max_lag == det.horizon + det.min_valley_distance + csf_lag(5) + 5 // 2


def test_detector_state_round_trip_and_consecutive_steps():
    cs = oscillating_cs(5, 300, 60, 1e-6, 0)
    det = TurningPointDetector(window=5)
    for i in range(150):
        det.update(i, cs[i], 1e-4)
    clone = TurningPointDetector.from_state_dict(det.state_dict())
    for i in range(150, 300):
        assert det.update(i, cs[i], 1e-4) == clone.update(i, cs[i], 1e-4)
    assert det.series == clone.series and det.valleys == clone.valleys
    assert det.turning_point is not None and det.turning_point == clone.turning_point
    with pytest.raises(ValueError, match="consecutive"):
        det.update(302, 0.0, 1e-4)


def test_snap_never_goes_before_the_first_step():
    det = TurningPointDetector(window=10)
    det._first_step = 7
    assert det._snap(3) == 10 and det._snap(14) == 10 and det._snap(15) == 10 and det._snap(16) == 20


# ----------------------------------------------------------------------------------------------
# snapshots


def test_snapshot_is_a_real_copy():
    model = toy()
    randomize(model)
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    keeper = SnapshotKeeper()
    keeper.keep(10, state)
    before = {k: v.clone() for k, v in keeper.get(10).items()}
    with torch.no_grad():
        for p in lora_pairs(model):
            p.a.add_(1.0)
            p.b.mul_(-2.0)
    for k, v in keeper.get(10).items():
        assert torch.equal(v, before[k])
        assert not torch.equal(v, state[k])
        assert v.device.type == "cpu" and not v.requires_grad
    same = SnapshotKeeper(device=None)
    same.keep(1, state)
    assert all(same.get(1)[k].data_ptr() != state[k].data_ptr() for k in state)


def test_snapshot_keeper_bookkeeping():
    keeper = SnapshotKeeper()
    for s in (0, 10, 20, 30):
        keeper.keep(s, {"x": torch.full((2,), float(s))})
    keeper.drop_before(15)
    assert keeper.steps == [20, 30] and 10 not in keeper and len(keeper) == 2
    assert keeper.nbytes == 2 * 2 * 4
    keeper.pin(20)
    keeper.drop_before(100)
    assert keeper.steps == [20] and keeper.pinned == [20]
    keeper.drop(20)
    assert keeper.steps == [] and keeper.pinned == []
    with pytest.raises(KeyError, match="no snapshot kept at step 10"):
        keeper.get(10)


def test_lag_bound_formula_defaults():
    det = TurningPointDetector(window=10)
    assert det.max_lag == 4 * 10 + 10 + 3 * 9 + 5
    assert det.oldest_needed_step(1000) == 1000 - det.max_lag
    assert det.max_lag // det.window + 1 == 9  # boundary snapshots held with the defaults
    assert math.isclose(det.min_rise, 0.1)


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


def test_watch_ignores_the_warm_up_and_rewinds_the_same_way() -> None:
    """CS of steps <= start is logged, not detected on; a rewind replays with the same rule."""
    from dallm.config import MonitorConfig
    from dallm.watch import Watch

    layer = nn.Linear(8, 8)
    inject = pytest.importorskip("peft").inject_adapter_in_model
    from peft import LoraConfig

    model = inject(LoraConfig(r=2, target_modules=["lin"]), nn.Sequential(collections.OrderedDict(lin=layer)))
    watch = Watch(model, MonitorConfig(window=2, early_stop="notify"), start=5)
    for step in range(1, 13):
        with torch.no_grad():
            model.lin.lora_B["default"].weight.add_(0.01 * step)
        watch.update(step, 1e-3)
    first = watch.detector.series[0][0]
    assert len(watch.history) == 12 and first >= 6
    before = watch.detector.series
    watch.rewind(12)
    assert watch.detector.series == before
