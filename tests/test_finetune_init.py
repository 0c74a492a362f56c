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
