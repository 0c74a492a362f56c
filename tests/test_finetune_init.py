"""Finetuning from the jointly trained multi-bit model: the single-bit model of a policy takes the
shared weights and, per layer, the step sizes and BatchNorm of the policy's bits."""
import torch

from orchestrator.finetune import load_multibit_state
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
        assert (a["top1"], a["loss"], a["train_loss"]) == (b["top1"], b["loss"], b["train_loss"])
