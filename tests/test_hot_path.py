"""The GPU hot path, checked on CPU: LSQ quantizers compute in fp32 under bf16 autocast, and after
warm-up a LIMPQ joint step and a single-policy QAT step read no tensor back to the host (on a GPU each
read is a device sync). Where CUDA is present the same steps also run under sync-debug "error"."""
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from workloads.models import build_model
from workloads.quant import Policy, draw_random_policies, lsq_quantize, quant_layers, quantize_model, searchable_names
from workloads.train import joint_step, quant_sgd, single_step

HOST_READS = ("item", "__bool__", "__float__", "__int__", "tolist")
BITS = (6, 4, 2)


@contextmanager
def counting_host_reads():
    calls: Counter = Counter()
    saved = {n: getattr(torch.Tensor, n) for n in HOST_READS}

    def wrap(name, fn):
        def counted(self, *a, **k):
            calls[name] += 1
            return fn(self, *a, **k)
        return counted

    for n, fn in saved.items():
        setattr(torch.Tensor, n, wrap(n, fn))
    try:
        yield calls
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


def _batch(device, n=4, classes=10):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, 32, 32, generator=g).to(device),
            torch.randint(classes, (n,), generator=g).to(device))


def _stepper(kind: str, device: str, amp_dtype=None):
    """step(i): a training step of the kind on a ResNet-18 (bits 6,4,2), the i-th pre-drawn random
    policy for the joint step; returns the loss, still on the device."""
    torch.manual_seed(0)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    x, y = _batch(device)
    if kind == "joint":
        model = quantize_model(build_model("resnet18", 10), bits=BITS).to(device).train()
        opt = quant_sgd(model, 0.01)
        randoms = draw_random_policies(searchable_names(model), BITS, torch.Generator().manual_seed(1), 3)
        return lambda i: joint_step(model, x, y, BITS, opt, crit, randoms[i], amp_dtype=amp_dtype).loss
    names = searchable_names(quantize_model(build_model("resnet18", 10), bits=BITS))
    model = quantize_model(build_model("resnet18", 10), policy=Policy.uniform(names, 4)).to(device).train()
    opt = quant_sgd(model, 0.01)
    return lambda i: single_step(model, x, y, opt, crit, clip=1.0, amp_dtype=amp_dtype)


@pytest.mark.parametrize("kind", ["joint", "qat"])
def test_training_step_after_warmup_reads_nothing_back(kind):
    step = _stepper(kind, "cpu")
    with counting_host_reads() as warmup:
        step(0)  # initialises every quantizer's step sizes: reads here are expected
    assert sum(warmup.values()) > 0, "the counter saw nothing: it would not catch a read either"
    with counting_host_reads() as calls:
        losses = [step(1), step(2)]
    assert dict(calls) == {}, f"host reads in a training step after warm-up: {dict(calls)}"
    assert all(torch.isfinite(t) for t in losses)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["joint", "qat"])
def test_training_step_after_warmup_is_sync_free_on_cuda(kind):
    step = _stepper(kind, "cuda", torch.bfloat16)
    step(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_quantizers_compute_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    names = searchable_names(quantize_model(build_model("resnet18", 10), bits=BITS))
    model = quantize_model(build_model("resnet18", 10), policy=Policy.uniform(names, 4)).train()
    x, _ = _batch("cpu", n=8)
    model(x)  # initialise the step sizes (fp32)
    layer = dict(quant_layers(model))[names[3]]  # deep inside: its input comes from a bf16 conv
    seen = {}
    layer.a_quant.register_forward_hook(lambda m, inp, out: seen.update(inp=inp[0], out=out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.eval()(x)
    inp, out = seen["inp"], seen["out"]
    assert inp.dtype == torch.bfloat16  # the case under test: a bf16 activation reaches the quantizer
    step = layer.a_quant.step["4"].detach()
    expected = lsq_quantize(inp.float(), step, 4, layer.a_quant.signed)  # the fp32 grid, no autocast
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    codes = out / step.clamp(min=1e-5)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    # What bf16 arithmetic would have produced lies off that grid: the check above can fail.
    naive = torch.clamp(inp / step.to(torch.bfloat16), 0, 15).round() * step.to(torch.bfloat16)
    assert not torch.equal(naive.float(), expected)
