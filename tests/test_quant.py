"""LSQ multi-bit quantizer, switchable BN, module swapping and policies (pure PyTorch)."""
import math

import pytest
import torch
from torch import nn

from workloads.models import SmallCNN, build_model
from workloads.quant import (
    LsqQuantizer,
    Policy,
    QConv2d,
    QLinear,
    SwitchableBatchNorm2d,
    indicator_records,
    lsq_quantize,
    quant_layers,
    quantize_model,
    searchable_names,
    set_full_precision,
    set_policy,
    set_random,
    set_uniform,
)
from workloads.quant.lsq import qrange


def test_values_land_on_the_grid():
    x = torch.randn(1000) * 3
    for bits, signed in [(2, True), (4, True), (3, False), (8, False)]:
        step = torch.tensor(0.37)
        q = lsq_quantize(x.abs() if not signed else x, step, bits, signed)
        levels = q / 0.37
        assert torch.allclose(levels, levels.round(), atol=1e-4)
        lo, hi = qrange(bits, signed)
        assert levels.min() >= lo - 1e-4 and levels.max() <= hi + 1e-4


def test_ste_gradient_passes_inside_range_and_stops_outside():
    x = torch.tensor([-10.0, -0.3, 0.1, 0.45, 10.0], requires_grad=True)
    lsq_quantize(x, torch.tensor(0.1), 4, True).sum().backward()
    # range [-8, 7] * 0.1 = [-0.8, 0.7]: clipped entries get no gradient, the others pass straight through
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_step_gradient_matches_lsq_formula():
    torch.manual_seed(1)
    x = torch.randn(50)
    bits, signed = 3, True
    s = torch.tensor(0.3, requires_grad=True)
    lsq_quantize(x, s, bits, signed).sum().backward()
    q_min, q_max = qrange(bits, signed)
    v = x / 0.3
    # LSQ: dq/ds = -v + round(v) inside the range, q_min / q_max outside; times g = 1/sqrt(q_max * N)
    d = torch.where(v <= q_min, torch.tensor(float(q_min)),
                    torch.where(v >= q_max, torch.tensor(float(q_max)), v.round() - v))
    expected = d.sum() / math.sqrt(q_max * x.numel())
    assert s.grad.item() == pytest.approx(expected.item(), rel=1e-5)


def test_per_bit_step_sizes_are_independent():
    q = LsqQuantizer((4, 2), "weight")
    w = torch.randn(64, requires_grad=True)
    q.set_bits(4)
    q(w).sum().backward()
    assert q.step["4"].grad is not None and q.step["4"].grad.abs() > 0
    assert q.step["2"].grad is None
    q.set_bits(2)
    q(w)
    assert q.step_value(2) != pytest.approx(q.step_value(4))


def test_weight_init_follows_limpq():
    w = torch.randn(1000) * 0.5 + 0.1
    q = LsqQuantizer((6, 3), "weight")
    q.set_bits(3)
    q(w)
    mu, sd = w.mean(), w.std()
    expected = max(abs(mu - 3 * sd), abs(mu + 3 * sd)) / 2 ** 2
    assert q.step_value(3) == pytest.approx(float(expected), rel=1e-5)
    assert not bool(q.initialized[0])  # 6 bits untouched


def test_activation_init_is_lazy_and_training_only():
    q = LsqQuantizer((4,), "act")
    q.set_bits(4)
    x = torch.rand(8, 16)
    q.eval()
    with pytest.raises(RuntimeError):
        q(x)
    q.train()
    q(x)
    assert q.step_value(4) == pytest.approx(float(2 * x.abs().mean() / math.sqrt(15)), rel=1e-5)
    assert not q.signed
    q2 = LsqQuantizer((4,), "act")
    q2.set_bits(4)
    q2(torch.randn(8, 16))
    assert q2.signed  # inputs with negative values get a signed grid


def test_switchable_bn_keeps_separate_statistics():
    bn = nn.BatchNorm2d(3)
    s = SwitchableBatchNorm2d(bn, (4, 2))
    s.train()
    s.set_bits(4)
    s(torch.randn(16, 3, 4, 4) + 5)
    s.set_bits(2)
    s(torch.randn(16, 3, 4, 4) - 5)
    assert s.bn["4"].running_mean.mean() > 0.3
    assert s.bn["2"].running_mean.mean() < -0.3
    assert torch.all(s.fp.running_mean == 0)


def test_swap_leaves_fp_output_unchanged():
    torch.manual_seed(0)
    for model in (SmallCNN(), build_model("resnet20", 10)):
        model.eval()
        x = torch.randn(4, *((1, 28, 28) if isinstance(model, SmallCNN) else (3, 32, 32)))
        ref = model(x)
        quantize_model(model)
        model.eval()
        assert torch.allclose(model(x), ref, atol=1e-6)


def test_first_conv_and_last_linear_are_fixed():
    model = quantize_model(build_model("resnet18", 1000))
    fixed = [n for n, _ in quant_layers(model, fixed=True)]
    assert fixed == ["conv1", "fc"]
    assert len(searchable_names(model)) == 19
    assert all(isinstance(m, (QConv2d, QLinear)) for _, m in quant_layers(model))
    custom = quantize_model(SmallCNN(), fixed_layers=["features.0", "features.3", "fc"])
    assert [n for n, _ in quant_layers(custom, fixed=True)] == ["features.0", "features.3", "fc"]
    with pytest.raises(ValueError):
        quantize_model(SmallCNN(), fixed_layers=["nope"])


def test_policies_set_exactly_what_they_say():
    model = quantize_model(SmallCNN(), bits=(6, 4, 2))
    names = searchable_names(model)
    set_uniform(model, 4)
    for _, m in quant_layers(model):
        assert m.bits == (4, 4) and m.bn.active == 4
    for _, m in quant_layers(model, fixed=True):
        assert m.bits == (None, None)
    g = torch.Generator().manual_seed(3)
    pol = set_random(model, [6, 4, 2], g)
    for (_n, m), w, a in zip(quant_layers(model), pol.w_bits, pol.a_bits):
        assert m.bits == (w, a) and m.bn.active == w
    explicit = Policy(tuple(names), (6, 2, 4, 4, 2), (2, 2, 6, 6, 4))
    set_policy(model, explicit)
    assert [m.bits for _, m in quant_layers(model)] == list(zip(explicit.w_bits, explicit.a_bits))
    assert all(m.bits == (8, 8) for _, m in quant_layers(model, fixed=True))
    with pytest.raises(ValueError):
        set_policy(model, Policy(("x",), (4,), (4,)))
    with pytest.raises(ValueError):
        set_uniform(model, 5)  # not a candidate
    set_full_precision(model)
    assert all(m.bits == (None, None) for _, m in quant_layers(model))


def test_single_bit_mode_and_indicator_records():
    model = SmallCNN()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][1:-1]
    pol = Policy(tuple(names), (4, 3, 2, 5, 6), (8, 4, 4, 4, 2))
    quantize_model(model, policy=pol)
    for (_n, m), w, a in zip(quant_layers(model), pol.w_bits, pol.a_bits):
        assert m.w_quant.bits == (w,) and m.a_quant.bits == (a,) and m.bits == (w, a)
    model.train()
    model(torch.randn(8, 1, 28, 28))
    rows = indicator_records(model)
    assert len(rows) == 2 * len(names)
    assert all(r["value"] > 0 for r in rows)


def test_policy_id_is_stable_and_distinguishes():
    a = Policy(("l1", "l2"), (4, 2), (4, 4))
    assert a.policy_id == Policy(("l1", "l2"), (4, 2), (4, 4)).policy_id
    assert a.policy_id != Policy(("l1", "l2"), (4, 2), (4, 3)).policy_id
    assert Policy.from_json(a.to_json()) == a


def test_single_bit_model_trains_every_parameter_it_has():
    """DDP needs every trainable parameter to get a gradient each step: a policy model's unused FP
    BatchNorms are frozen, and one backward reaches all the rest."""
    names = searchable_names(quantize_model(SmallCNN(), bits=(4,)))
    model = quantize_model(SmallCNN(), policy=Policy.uniform(names, 4)).train()
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert any(not p.requires_grad for n, p in model.named_parameters() if ".fp." in n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (8, True)])
def test_lsq_closed_form_matches_the_autograd_formulation(dtype, bits, signed):
    """The fused LSQ function against LIMPQ's formulation, differentiated by autograd."""
    import math

    from workloads.quant.lsq import MIN_STEP, lsq_quantize, qrange

    def reference(x, step):
        q_min, q_max = qrange(bits, signed)
        s = step.float().clamp(min=MIN_STEP)
        g = 1.0 / math.sqrt(q_max * x.numel())
        s = s * g + (s - s * g).detach()                       # value s, gradient scaled by g
        c = torch.clamp(x.float() / s, q_min, q_max)
        return (c + (c.round() - c).detach()) * s               # straight-through round

    g = torch.Generator().manual_seed(bits)
    base = torch.randn(4, 8, 5, 5, generator=g) * 3
    x1, x2 = (base.to(dtype).requires_grad_() for _ in range(2))
    s1, s2 = (torch.tensor(0.37, requires_grad=True) for _ in range(2))
    w = torch.randn(4, 8, 5, 5, generator=g)
    out, ref = lsq_quantize(x1, s1, bits, signed), reference(x2, s2)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, rtol=0, atol=1e-6)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert x1.grad.dtype == dtype and torch.equal(x1.grad, x2.grad)
    assert float(s1.grad) == pytest.approx(float(s2.grad), abs=1e-6)  # float32 sums, summed in another order
    assert float(s1.grad) != 0.0


def test_compiled_lsq_kernels_match_eager(monkeypatch):
    """MPQ_COMPILE_QUANT=1 fuses the quantizer into one kernel each way (torch.compile); same values
    and gradients as eager, for two bit-widths and dtypes through the same compiled kernels."""
    from workloads.quant import lsq

    def run(bits, dtype):
        x = (torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(bits)) * 2).to(dtype).requires_grad_()
        s = torch.tensor(0.25, requires_grad=True)
        (lsq.lsq_quantize(x, s, bits, signed=True) * torch.arange(288.0).reshape(2, 4, 6, 6)).sum().backward()
        return lsq.lsq_quantize(x.detach(), s.detach(), bits, True), x.grad, s.grad

    cases = [(4, torch.float32), (2, torch.bfloat16)]
    eager = [run(*c) for c in cases]
    monkeypatch.setenv("MPQ_COMPILE_QUANT", "1")
    monkeypatch.setattr(lsq, "_KERNELS", {})
    compiled = [run(*c) for c in cases]
    assert set(lsq._KERNELS) == {"fwd", "bwd"}
    for (o1, gx1, gs1), (o2, gx2, gs2) in zip(eager, compiled):
        assert torch.equal(o1, o2) and torch.equal(gx1, gx2)
        assert float(gs1) == pytest.approx(float(gs2), rel=1e-5)
