"""Training loops on the embedded data (single process; the Ray Train wrapping is tested elsewhere)."""
import time

import torch
from torch import nn

from workloads.data import load_data
from workloads.models import build_model
from workloads.quant import draw_random_policies, quantize_model, searchable_names, set_uniform
from workloads.train import cosine_with_warmup, evaluate, joint_step, make_loader, recalibrate_bn, sgd, train_epoch


def test_small_cnn_reaches_90_percent_on_mnist5k_within_a_minute():
    torch.manual_seed(0)
    t0 = time.perf_counter()
    d = load_data("mnist5k")
    model = build_model("small_cnn", d.num_classes)
    train, val = make_loader(d.train, 64, True), make_loader(d.val, 256, False)
    epochs = 3
    opt = sgd(model, 0.1)
    sched = cosine_with_warmup(opt, epochs * len(train), len(train) // 2)
    for _ in range(epochs):
        train_epoch(model, train, opt, sched, nn.CrossEntropyLoss(label_smoothing=0.1))
    acc = evaluate(model, val)["top1"]
    elapsed = time.perf_counter() - t0
    assert acc >= 0.90, acc
    assert elapsed < 60, elapsed


def test_joint_step_runs_key_policies_then_one_random():
    torch.manual_seed(0)
    d = load_data("digits")
    model = quantize_model(build_model("small_cnn", 10), bits=(6, 4, 2))
    opt = sgd(model, 0.01)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    gen = torch.Generator().manual_seed(5)
    x, y = next(iter(make_loader(d.train, 32, True)))
    before = [p.detach().clone() for p in model.parameters()]
    (rand,) = draw_random_policies(searchable_names(model), [6, 4, 2], gen)
    res = joint_step(model, x, y, [6, 4, 2], opt, crit, rand)
    assert len(res.policies) == 4
    for b, pol in zip((6, 4, 2), res.policies[:3]):
        assert set(pol.w_bits) == {b} and set(pol.a_bits) == {b}
    expected = torch.randint(3, (5, 2), generator=torch.Generator().manual_seed(5)).tolist()
    assert list(res.policies[3].w_bits) == [[6, 4, 2][i] for i, _ in expected]
    assert list(res.policies[3].a_bits) == [[6, 4, 2][j] for _, j in expected]
    moved = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert moved > 0
    # every candidate bit's step size of every searchable layer got a gradient from its key policy
    from workloads.quant import quant_layers
    for _, layer in quant_layers(model):
        for q in (layer.w_quant, layer.a_quant):
            assert all(q.step[str(b)].grad is not None for b in (6, 4, 2))


def test_bn_recalibration_changes_statistics_for_the_active_bit():
    torch.manual_seed(0)
    d = load_data("digits")
    model = quantize_model(build_model("small_cnn", 10), bits=(4, 2))
    loader = make_loader(d.train, 64, True)
    model.train()
    set_uniform(model, 2)
    model(next(iter(loader))[0])  # initialise activation steps at 2 bits
    bn = model.features[4].bn["2"]
    bn.running_mean.fill_(123.0)
    recalibrate_bn(model, loader, num_batches=3)
    assert bn.running_mean.abs().max() < 50
    assert model.features[4].bn["4"].running_mean.abs().max() < 1e-6  # untouched bit


def test_loaders_shard_over_ranks(monkeypatch):
    """Training shards are disjoint and equal (DistributedSampler, drop_last); evaluation shards cover
    every sample exactly once (no padding duplicates), so summed metrics count each sample once."""
    import workloads.train as wt

    ds = torch.utils.data.TensorDataset(torch.arange(103).float()[:, None], torch.zeros(103, dtype=torch.long))
    seen_train, seen_eval = [], []
    for rank in (0, 1):
        monkeypatch.setattr(wt, "world", lambda rank=rank: (rank, 2))
        train = make_loader(ds, 10, True, seed=3)
        train.sampler.set_epoch(1)
        seen_train.append([int(v) for x, _ in train for v in x[:, 0]])
        seen_eval.append([int(v) for x, _ in make_loader(ds, 10, False) for v in x[:, 0]])
    assert len(seen_train[0]) == len(seen_train[1]) == 50  # 51 per rank, whole batches only
    assert not set(seen_train[0]) & set(seen_train[1])
    assert sorted(seen_eval[0] + seen_eval[1]) == list(range(103))
