"""Cost model totals, policy BitOps/size arithmetic, asymmetric PTQ and MixQuant selection."""
import pytest
import torch
import torchvision

from workloads.cost import layer_costs, policy_bitops, policy_size_bits, total_macs, uniform_bitops
from workloads.models import build_model
from workloads.quant import Policy
from workloads.quant.ptq import asym_quantize, mixquant_bits, ptq_model, qe_table, quant_error


@pytest.mark.parametrize("name,gmacs", [("resnet18", 1.81), ("resnet50", 4.09)])
def test_known_imagenet_totals(name, gmacs):
    costs = layer_costs(getattr(torchvision.models, name)(weights=None), (3, 224, 224))
    assert total_macs(costs) / 1e9 == pytest.approx(gmacs, abs=0.005)


def test_resnet50_layers_match_limpq_reference():
    import json
    from pathlib import Path

    ref = Path(__file__).resolve().parents[2] / "shared" / "reference" / "limpq_resnet50.json"
    if not ref.exists():
        pytest.skip("../shared/reference not present")
    d = json.loads(ref.read_text())
    costs = {c.name: c for c in layer_costs(build_model("resnet50", 1000), (3, 224, 224))}
    for l in d["layers"]:
        assert (costs[l["name"]].macs, costs[l["name"]].params) == (l["macs"], l["params"])
    for name, f in d["fixed_layers"].items():
        assert (costs[name].macs, costs[name].params) == (f["macs"], f["params"])


def test_policy_bitops_and_size():
    costs = layer_costs(build_model("small_cnn", 10), (1, 28, 28))
    names = [c.name for c in costs][1:-1]
    pol = Policy.uniform(names, 4, 3)
    first, last = costs[0], costs[-1]
    inner = costs[1:-1]
    assert policy_bitops(costs, pol) == sum(c.macs * 12 for c in inner) + 64 * (first.macs + last.macs)
    assert policy_size_bits(costs, pol) == sum(c.params * 4 for c in inner) + 8 * (first.params + last.params)
    assert uniform_bitops(costs, 4, 3, names) == sum(c.macs * 12 for c in inner)


def test_asymmetric_quantization_grid_and_error_shrinks_with_bits():
    torch.manual_seed(0)
    w = torch.randn(4096) * 0.05 + 0.01
    errs = [quant_error(w, b) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    q = asym_quantize(w, 3)
    assert len(torch.unique(q)) <= 8
    assert torch.any(q == 0) or q.abs().min() < 1e-6  # zero is exactly representable


def test_ptq_error_shrinks_as_bits_grow():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10).eval()
    x = torch.randn(16, 1, 28, 28)
    ref = model(x)
    errs = []
    for b in (2, 3, 4, 6, 8):
        q = ptq_model(model, {n: b for n, m in model.named_modules() if hasattr(m, "weight") and m.weight.dim() > 1},
                      act_bits=b, calib_batches=[x])
        errs.append(float(((q(x) - ref) ** 2).mean()))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_mixquant_picks_smallest_bit_within_multiplier():
    table = {"a": {8: 1.0, 7: 2.0, 6: 4.0, 5: 9.0, 4: 20.0, 3: 50.0, 2: 200.0},
             "b": {8: 1.0, 7: 100.0, 6: 200.0, 5: 300.0, 4: 400.0, 3: 500.0, 2: 600.0}}
    assert mixquant_bits(table, 1.0) == {"a": 8, "b": 8}
    assert mixquant_bits(table, 4.0) == {"a": 6, "b": 8}
    assert mixquant_bits(table, 50.0) == {"a": 3, "b": 8}
    assert mixquant_bits(table, 1000.0) == {"a": 2, "b": 2}
    model = build_model("small_cnn", 10)
    t = qe_table(model, ["features.3"])
    assert list(t["features.3"]) == [8, 7, 6, 5, 4, 3, 2]
    with pytest.raises(ValueError):
        mixquant_bits(table, 0.0)
