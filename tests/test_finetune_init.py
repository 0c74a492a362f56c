"""Finetuning from the jointly trained multi-bit model: the single-bit model of a policy takes the
shared weights and, per layer, the step sizes and BatchNorm of the policy's bits."""
import torch

from orchestrator.finetune import load_multibit_state
from workloads.data import load_data
from workloads.models import build_model
from workloads.quant import Policy, quant_layers, quantize_model, set_policy, set_uniform


def test_single_bit_model_from_multibit_state_computes_the_same(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 28, 28)
    multi = quantize_model(build_model("small_cnn", 10), bits=(6, 4, 2))
    multi.train()
    for b in (6, 4, 2):  # initialise every bit's activation steps, move the BN statistics apart
        set_uniform(multi, b)
        multi(x * b)
    names = [n for n, _ in quant_layers(multi)]
    policy = Policy(tuple(names), tuple([6, 4, 2, 4, 2][: len(names)]), tuple([2, 6, 4, 2, 6][: len(names)]))
    path = tmp_path / "model.pt"
    torch.save({"model": multi.state_dict(), "bits": [6, 4, 2]}, path)

    single = quantize_model(build_model("small_cnn", 10), policy=policy)
    load_multibit_state(single, path)
    for (_, m), (_, s), w, a in zip(quant_layers(multi), quant_layers(single), policy.w_bits, policy.a_bits):
        assert s.w_quant.step_value(w) == m.w_quant.step_value(w)
        assert s.a_quant.step_value(a) == m.a_quant.step_value(a)
        assert bool(s.a_quant.initialized[0])
        assert torch.equal(s.bn.bn[str(w)].running_mean, m.bn.bn[str(w)].running_mean)
    set_policy(multi, policy)
    multi.eval(), single.eval()
    for (_, m) in quant_layers(multi, fixed=True) + quant_layers(single, fixed=True):
        m.set_bits(None, None)  # fixed layers were never calibrated in this toy run
    assert torch.allclose(multi(x), single(x), atol=1e-6)


def test_finetune_trial_resumed_from_its_epoch_checkpoint_ends_like_an_uninterrupted_one(tmp_path):
    """A study killed mid-finetune restores its trials from their last epoch checkpoint (Tuner.restore);
    the resumed trial must see the same batches, so its result does not depend on when it was killed."""
    import shutil

    from ray.tune import Checkpoint

    from orchestrator.config import load_config
    from orchestrator.finetune import _train_loop

    cfg = load_config(None, [f"study.dir={tmp_path}", "data.name=digits", "data.batch_size=64", "search.bitops=[w4a4]",
                             "finetune.epochs=3", "finetune.bn_recalib_batches=3"])
    model = build_model("small_cnn", 10, 1)
    torch.save({"model": model.state_dict()}, tmp_path / "fp.pt")
    names = [n for n, _ in quant_layers(quantize_model(build_model("small_cnn", 10, 1), bits=(4,)))]
    loop_cfg = {"study": cfg.to_dict(), "policy": Policy.uniform(names, 3, 4).to_json(), "lr": 0.05,
                "init_checkpoint": str(tmp_path / "fp.pt")}

    class Stop(Exception):
        pass

    def run(stop_after=None, resume_from=None):
        reports = []

        def report(metrics, checkpoint=None):
            reports.append(metrics)
            if stop_after is not None and len(reports) == stop_after:
                shutil.copytree(checkpoint.path, tmp_path / "kept")
                raise Stop

        try:
            _train_loop(loop_cfg, report, lambda: resume_from, distributed=False)
        except Stop:
            pass
        return reports

    whole = run()
    assert [r["epoch"] for r in whole] == [0, 1, 2]
    run(stop_after=1)
    resumed = run(resume_from=Checkpoint.from_directory(str(tmp_path / "kept")))
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(whole[1:], resumed):
        assert (a["val_top1"], a["val_loss"], a["train_loss"]) == (b["val_top1"], b["val_loss"], b["train_loss"])
    # The evaluation split is measured once, after the last epoch; every epoch is scored on the holdout.
    assert [("top1" in r) for r in whole] == [False, False, True]
    assert (whole[-1]["top1"], whole[-1]["loss"]) == (resumed[-1]["top1"], resumed[-1]["loss"])
    n_train = len(load_data("digits").train)
    assert whole[0]["holdout_samples"] == round(n_train * cfg.data.holdout_fraction)


def test_holdout_is_seeded_disjoint_from_training_and_uses_eval_transforms(tmp_path):
    import torchvision.transforms as T
    from PIL import Image

    from workloads.data import holdout_split, imagenet

    d = load_data("digits")
    a_train, a_hold = holdout_split(d, 0.1, seed=3)
    b_train, b_hold = holdout_split(d, 0.1, seed=3)
    assert a_hold.indices == b_hold.indices and holdout_split(d, 0.1, seed=4)[1].indices != a_hold.indices
    assert not set(a_train.indices) & set(a_hold.indices)
    assert len(a_train) + len(a_hold) == len(d.train) and len(a_hold) == round(0.1 * len(d.train))
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(tmp_path / split / c / f"{i}.jpg")
    bundle = imagenet(tmp_path, image_size=32)
    train, hold = holdout_split(bundle, 0.2, seed=0)
    assert isinstance(hold.dataset.transform.transforms[0], T.Resize)            # eval: resize + centre crop
    assert isinstance(train.dataset.transform.transforms[0], T.RandomResizedCrop)  # train keeps augmenting
