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
        errs.append(float(((q(x) - ref) ** 2).mean().detach()))
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


# ------------------------------------------------------------------- per-layer activation PTQ
def test_ptq_model_per_layer_activation_bits():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10).eval()
    x = torch.randn(32, 1, 28, 28)
    before = model.get_submodule("features.3").weight.detach().clone()
    seen = {}

    def grab(name):
        def hook(module, inputs):
            seen[name] = inputs[0].detach()
        return hook

    q = ptq_model(model, {"features.3": 4}, {"features.3": 2, "features.6": 3}, calib_batches=[(x, None)],
                  default_bits=8)
    for name in ("features.0", "features.3", "features.6", "features.9"):
        q.get_submodule(name).register_forward_pre_hook(grab(name))
    q(x)
    assert len(torch.unique(seen["features.3"])) <= 4          # 2-bit input
    assert len(torch.unique(seen["features.6"])) <= 8          # 3-bit input
    assert 8 < len(torch.unique(seen["features.9"])) <= 256    # default: 8 bits
    assert 8 < len(torch.unique(seen["features.0"])) <= 256    # the image, 8 bits
    assert len(torch.unique(q.get_submodule("features.3").weight)) <= 16
    assert len(torch.unique(q.get_submodule("features.6").weight)) <= 256
    assert torch.equal(model.get_submodule("features.3").weight, before)  # the FP model is not modified
    assert not torch.equal(q.get_submodule("features.3").weight, model.get_submodule("features.3").weight)
    with pytest.raises(ValueError):
        ptq_model(model, {}, {"nope": 4}, calib_batches=[x])
    with pytest.raises(ValueError):
        ptq_model(model, {}, 4, calib_batches=[])
    # act_bits=None: weights only, no hooks, so the input reaches features.3 unquantized
    w_only = ptq_model(model, {"features.3": 2}, None)
    w_only.get_submodule("features.3").register_forward_pre_hook(grab("w_only"))
    w_only(x)
    assert len(torch.unique(seen["w_only"])) > 256


# ------------------------------------------------------------------ PTQ evaluation of policies
@pytest.fixture(scope="module")
def digits_study(tmp_path_factory):
    """A config on sklearn's digits and a small_cnn briefly trained on its training split."""
    from torch import nn

    from orchestrator.config import load_config
    from workloads.data import load_data
    from workloads.train import evaluate, make_loader

    root = tmp_path_factory.mktemp("ptq")
    cfg = load_config(None, [f"study.dir={root}", "data.name=digits", "search.bitops=[w4a4]",
                             "resources.num_cpus=2"])
    torch.manual_seed(0)
    data = load_data("digits", val_fraction=cfg.data.val_fraction, seed=cfg.study.seed)
    model = build_model("small_cnn", 10, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(5):
        model.train()
        for x, y in make_loader(data.train, 64, True, 0):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    fp = evaluate(model, make_loader(data.val, 256, False, 0))
    ckpt = root / "fp.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][1:-1]
    return cfg, ckpt, fp, layers, model, data


def test_ptq_eval_accuracy_tracks_bits(digits_study):
    from orchestrator.ptq_eval import evaluate_ptq
    from orchestrator.search_rows import ModelCosts

    cfg, ckpt, fp, layers, model, data = digits_study
    assert fp["top1"] > 0.9, fp  # the model really learned something
    bits = (8, 4, 3, 2)
    pols = [Policy.uniform(layers, b, b) for b in bits] + [Policy.uniform(layers, 8, 8)]  # a duplicate
    costs = ModelCosts.from_model(model, data.input_shape)
    rows = evaluate_ptq(cfg, ckpt, pols, use_ray=False, costs=costs,
                        searchers={pols[0].policy_id: "uniform"})
    assert len(rows) == len(bits) and [r["policy_id"] for r in rows] == [p.policy_id for p in pols[:4]]
    by = dict(zip(bits, rows))
    assert by[8]["top1"] >= fp["top1"] - 0.01 and by[8]["loss"] == pytest.approx(fp["loss"], rel=0.05)
    assert by[2]["top1"] <= by[8]["top1"] - 0.04 and by[2]["loss"] > 2 * by[8]["loss"]   # W2A2: much worse
    assert by[2]["loss"] > by[3]["loss"] > max(by[4]["loss"], by[8]["loss"])             # error shrinks
    for r, p in zip(rows, pols):
        assert (r["stage"], r["lr"], r["epochs"], r["mlflow_run_id"]) == ("ptq", None, 0, None)
        assert r["bitops"] == costs.bitops(p.w_bits, p.a_bits) and r["size_bits"] == costs.size_bits(p.w_bits)
        assert r["seconds"] > 0
    assert [r["searcher"] for r in rows] == ["uniform", None, None, None]
    # weights alone at 2 bits (activations at 8) also hurt, less than W2A2
    w2 = evaluate_ptq(cfg, ckpt, [Policy.uniform(layers, 2, 8)], use_ray=False)[0]
    assert by[2]["loss"] > w2["loss"] > by[8]["loss"] and w2["bitops"] is None


def test_ptq_eval_rejects_bad_input(digits_study, tmp_path):
    from orchestrator.errors import UserError
    from orchestrator.ptq_eval import evaluate_ptq

    cfg, ckpt, _, layers, _, _ = digits_study
    with pytest.raises(UserError, match="searchable layers"):
        evaluate_ptq(cfg, ckpt, [Policy.uniform(layers[:-1], 4, 4)], use_ray=False)
    with pytest.raises(UserError, match="does not exist"):
        evaluate_ptq(cfg, tmp_path / "missing.pt", [Policy.uniform(layers, 4, 4)], use_ray=False)
    assert evaluate_ptq(cfg, ckpt, [], use_ray=False) == []


@pytest.mark.ray
def test_ptq_eval_on_ray_matches_serial(digits_study):
    import ray

    from orchestrator.ptq_eval import evaluate_ptq

    cfg, ckpt, _, layers, _, _ = digits_study
    mixed = Policy(tuple(layers), (8, 2, 4, 3, 6), (8, 4, 6, 8, 3))
    pols = [Policy.uniform(layers, 4, 4), mixed, Policy.uniform(layers, 6, 4)]
    serial = evaluate_ptq(cfg, ckpt, pols, use_ray=False)
    assert not ray.is_initialized()
    distributed = evaluate_ptq(cfg, ckpt, pols, use_ray=True)   # starts and stops its own local Ray
    assert not ray.is_initialized()
    key = ["policy_id", "top1", "top5", "loss"]
    assert [[r[k] for k in key] for r in distributed] == [[r[k] for k in key] for r in serial]
