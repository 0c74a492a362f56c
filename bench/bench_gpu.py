"""GPU step cost of LIMPQ joint training vs single-policy QAT vs FP, and DDP scaling, on synthetic ImageNet.

On a CUDA machine, for ResNet-18 and ResNet-50 at batch 256 on synthetic ImageNet-shaped data
(3x224x224, 1000 classes; one fixed batch on the device, so no input pipeline is timed), channels_last
models and inputs, bf16 autocast, label-smoothing CE 0.1:

1. samples/s of one FP step (``single_step`` on the plain model), one single-policy QAT step
   (``single_step`` on the single-bit W4A4 model: the finetune of a searched policy) and one LIMPQ
   joint step (``joint_step``: n = 5 uniform passes at bits 6,5,4,3,2 + 1 random policy, summed
   gradients, one SGD step). All three clip gradients at 1 so the ratios measure quantization only.
   Warm-up steps first (the first joint step initialises every quantizer's per-bit step size), then
   ``--steps`` steps timed between two ``torch.cuda.synchronize()``; random policies are drawn
   before the timed loop, losses are never read inside it.
   Ratios: QAT / FP (target <= 1.5) and joint / ((n+1) x QAT) (target <= 1.1).
2. Whether one QAT step and one joint step run without a host-device sync
   (``torch.cuda.set_sync_debug_mode("error")``).
3. DDP scaling: one process per GPU (NCCL), world sizes 1, 2, 4, ... up to the GPUs present; the QAT
   step in ``DistributedDataParallel``, the joint step unwrapped (it all-reduces its summed gradients
   itself); per-GPU batch = ``--batch``; ``--ddp-steps`` timed steps after up to 2 warm-up steps, each
   world size in fresh processes; aggregate samples/s and scaling efficiency vs 1 GPU. With one
   GPU: world size 1 through DDP vs the in-process figures of 1 (the DDP overhead).

Needs only torch + torchvision (no Ray, MLflow, pulp or pyarrow). Without a GPU it says so and exits 0;
``--device cpu`` runs a tiny smoke version (no autocast unless ``--amp``; DDP over gloo).

    python3 bench/bench_gpu.py [--models resnet18,resnet50] [--batch 256] [--steps 20] [--json out.json]
    python3 bench/bench_gpu.py --device cpu --models resnet18 --batch 4 --steps 1 --warmup 1 --image-size 64 --no-ddp
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workloads.models import build_model  # noqa: E402
from workloads.quant import (  # noqa: E402
    Policy,
    draw_random_policies,
    lsq,  # noqa: E402
    quantize_model,
    searchable_names,
)
from workloads.train import broadcast_parameters, joint_step, quant_sgd, sgd, single_step  # noqa: E402

BITS = [6, 5, 4, 3, 2]
QAT_BITS = 4
QAT_TARGET = 1.5     # QAT step <= 1.5 x FP step
JOINT_TARGET = 1.1   # joint step <= 1.1 x (n+1) x QAT step


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- models and steps
def layer_names(model_name: str, classes: int) -> list[str]:
    return searchable_names(quantize_model(build_model(model_name, classes, 3), bits=BITS))


def build(kind: str, model_name: str, classes: int, names: list[str], device: torch.device) -> nn.Module:
    model = build_model(model_name, classes, 3)
    if kind == "qat":
        model = quantize_model(model, policy=Policy.uniform(names, QAT_BITS))
    elif kind == "joint":
        model = quantize_model(model, bits=BITS)
    return model.to(device, memory_format=torch.channels_last).train()


def make_stepper(kind: str, model: nn.Module, x, y, names, amp_dtype, n_policies: int, seed: int = 1):
    """A zero-argument step function of the kind; the joint one walks through pre-drawn random policies."""
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    if kind == "fp":
        opt = sgd(model, 0.01)
        return lambda: single_step(model, x, y, opt, crit, clip=1.0, amp_dtype=amp_dtype)
    if kind == "qat":
        opt = quant_sgd(model, 0.01)
        return lambda: single_step(model, x, y, opt, crit, clip=1.0, amp_dtype=amp_dtype)
    opt = quant_sgd(model, 0.01)
    # Drawn in one go before any timing (one host read); a seed shared by all ranks, as in the product.
    policies = draw_random_policies(names, BITS, torch.Generator().manual_seed(seed), n_policies)
    it = iter(policies)
    return lambda: joint_step(model, x, y, BITS, opt, crit, next(it), amp_dtype=amp_dtype)


def synthetic_batch(batch: int, size: int, classes: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, 3, size, size, device=device, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(classes, (batch,), device=device, generator=g)
    return x, y


def timed(step, steps: int, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t


def sync_free(step, device: torch.device) -> dict:
    """Run one step with CUDA's sync debug mode at "error": any host-device sync raises."""
    if device.type != "cuda":
        return {"sync_free": None, "note": "checked on CUDA only"}
    sync(device)
    try:
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        sync(device)
        return {"sync_free": True}
    except Exception as e:  # noqa: BLE001 - reported, never fatal
        sync(device)
        return {"sync_free": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}


def bench_model(model_name: str, args, device: torch.device, amp_dtype) -> dict:
    names = layer_names(model_name, args.classes)
    x, y = synthetic_batch(args.batch, args.image_size, args.classes, device)
    out: dict = {"searchable_layers": len(names)}
    for kind in ("fp", "qat", "qat_compiled", "joint"):
        # qat_compiled: the same QAT step with the quantizer fused by torch.compile (MPQ_COMPILE_QUANT=1).
        compiled = kind == "qat_compiled"
        os.environ["MPQ_COMPILE_QUANT"] = "1" if compiled else "0"
        lsq._KERNELS.clear()
        kind = "qat" if compiled else kind
        torch.manual_seed(0)
        model = build(kind, model_name, args.classes, names, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = make_stepper(kind, model, x, y, names, amp_dtype, args.warmup + args.steps + 1)
        t = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(device)
        warm = time.perf_counter() - t
        sec = timed(step, args.steps, device)
        rec = {"step_s": sec / args.steps, "samples_per_s": args.batch * args.steps / sec, "warmup_s": warm}
        if kind != "fp":
            rec.update(sync_free(step, device))
        if device.type == "cuda":
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        kind = "qat_compiled" if compiled else kind
        out[kind] = rec
        sf = "" if "sync_free" not in rec or rec["sync_free"] is None else \
            f", sync-free: {'yes' if rec['sync_free'] else 'NO (' + rec['error'] + ')'}"
        mem = f", peak {rec['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in rec else ""
        log(f"   {model_name} {kind:>5}: {rec['step_s'] * 1e3:8.1f} ms/step, {rec['samples_per_s']:8.0f} samples/s "
            f"(warm-up {warm:.1f}s{mem}{sf})")
        del model, step
        free(device)
    os.environ["MPQ_COMPILE_QUANT"] = "0"
    n = len(BITS)
    out["qat_compiled_over_fp"] = out["qat_compiled"]["step_s"] / out["fp"]["step_s"]
    q_fp = out["qat"]["step_s"] / out["fp"]["step_s"]
    j_q = out["joint"]["step_s"] / out["qat"]["step_s"]
    out["ratios"] = {"qat_over_fp": q_fp, "qat_over_fp_met": q_fp <= QAT_TARGET,
                     "joint_over_qat": j_q, "joint_over_n1_qat": j_q / (n + 1),
                     "joint_over_n1_qat_met": j_q / (n + 1) <= JOINT_TARGET, "n": n}
    return out


# ----------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: dict, out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, str(ROOT))
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    cuda = cfg["device"] == "cuda"
    if cuda:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, cfg["threads"] // world))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    amp_dtype = getattr(torch, cfg["amp"]) if cfg["amp"] else None
    results: dict = {}
    try:
        for model_name in cfg["models"]:
            names = layer_names(model_name, cfg["classes"])
            x, y = synthetic_batch(cfg["batch"], cfg["image_size"], cfg["classes"], device, seed=rank)
            res = {}
            for kind in ("qat", "joint"):
                torch.manual_seed(0)
                model = build(kind, model_name, cfg["classes"], names, device)
                if kind == "qat":
                    model = DDP(model, device_ids=[rank] if cuda else None, output_device=rank if cuda else None)
                else:
                    broadcast_parameters(model)  # joint_step averages gradients itself: no DDP wrapper
                step = make_stepper(kind, model, x, y, names, amp_dtype, cfg["warmup"] + cfg["steps"])
                for _ in range(cfg["warmup"]):
                    step()
                sync(device)
                dist.barrier()
                sec = torch.tensor([timed(step, cfg["steps"], device)], device=device)
                dist.all_reduce(sec, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
                s = float(sec)
                res[kind] = {"step_s": s / cfg["steps"], "samples_per_s": world * cfg["batch"] * cfg["steps"] / s}
                del model, step
                free(device)
            results[model_name] = res
        if rank == 0:
            Path(out_path).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def ddp_sizes(n: int) -> list[int]:
    sizes, w = [], 1
    while w <= n:
        sizes.append(w)
        w *= 2
    if sizes[-1] != n:
        sizes.append(n)
    return sizes


def bench_ddp(args, device: torch.device, amp_dtype, single: dict) -> dict:
    import torch.multiprocessing as mp

    avail = torch.cuda.device_count() if device.type == "cuda" else max(1, args.ddp_max or 1)
    top = min(avail, args.ddp_max) if args.ddp_max else avail
    cfg = {"device": device.type, "models": args.models, "batch": args.batch, "image_size": args.image_size,
           "classes": args.classes, "steps": args.ddp_steps, "warmup": min(args.warmup, 2),
           "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else None, "threads": torch.get_num_threads()}
    runs: dict[int, dict] = {}
    for world in ddp_sizes(top):
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
            out = os.path.join(tmp, "rank0.json")
            mp.spawn(_ddp_worker, args=(world, _free_port(), cfg, out), nprocs=world, join=True)
            runs[world] = json.loads(Path(out).read_text())
        log(f"   world size {world}: done in {time.perf_counter() - t:.0f}s")
    result: dict = {"backend": "nccl" if device.type == "cuda" else "gloo", "world_sizes": sorted(runs),
                    "steps": cfg["steps"], "per_gpu_batch": args.batch, "models": {}}
    for model_name in args.models:
        per = {}
        for kind in ("qat", "joint"):
            base = runs[1][model_name][kind]["samples_per_s"]
            per[kind] = {str(w): {**runs[w][model_name][kind],
                                  "efficiency": runs[w][model_name][kind]["samples_per_s"] / (w * base)}
                         for w in sorted(runs)}
            # world size 1 through DDP vs the in-process figure: the DDP (and process group) overhead
            per[kind]["ws1_over_in_process"] = runs[1][model_name][kind]["step_s"] / single[model_name][kind]["step_s"]
        result["models"][model_name] = per
    return result


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50", help="comma-separated workloads.models names")
    ap.add_argument("--batch", type=int, default=256, help="batch per GPU")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per step kind")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least 1)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--no-ddp", action="store_true", help="skip the DDP scaling part")
    ap.add_argument("--ddp-steps", type=int, default=6, help="timed steps per kind and world size in the DDP part")
    ap.add_argument("--ddp-max", type=int, default=0, help="largest DDP world size (default: all GPUs; 1 on CPU)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast on CPU too (always on for CUDA)")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = ap.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.warmup = max(1, args.warmup)  # the first joint step initialises the quantizers' step sizes

    if args.device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: bench_gpu.py measures GPU steps only; nothing to do")
        return
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if (device.type == "cuda" or args.amp) else None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        dev_name = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    else:
        dev_name = f"cpu ({torch.get_num_threads()} threads)"
    t0 = time.perf_counter()
    n = len(BITS)
    log(f"torch {torch.__version__}, {dev_name}; models {','.join(args.models)}, batch {args.batch}, "
        f"3x{args.image_size}x{args.image_size}, {args.classes} classes, channels_last, "
        f"autocast {str(amp_dtype).removeprefix('torch.') if amp_dtype else 'off'}; bits {BITS}, "
        f"QAT W{QAT_BITS}A{QAT_BITS}; {args.warmup} warm-up + {args.steps} timed steps per kind")

    log("\n1+2. in-process steps (one device)")
    single = {}
    for m in args.models:
        single[m] = bench_model(m, args, device, amp_dtype)

    report = {"torch": torch.__version__, "device": dev_name, "batch": args.batch, "image_size": args.image_size,
              "classes": args.classes, "bits": BITS, "qat_bits": QAT_BITS, "steps": args.steps,
              "warmup": args.warmup, "amp": str(amp_dtype) if amp_dtype else None, "models": single}

    if args.no_ddp:
        log("\n3. DDP scaling: skipped (--no-ddp)")
    else:
        free(device)
        log(f"\n3. DDP scaling ({'NCCL' if device.type == 'cuda' else 'gloo'}; per-GPU batch {args.batch}, "
            f"{args.ddp_steps} timed steps per kind and world size)")
        try:
            report["ddp"] = bench_ddp(args, device, amp_dtype, single)
        except Exception as e:  # noqa: BLE001 - the single-device results still count
            report["ddp"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"   DDP part failed: {type(e).__name__}: {e}")

    # ------------------------------------------------------------------ summary, side by side
    log(f"\nsummary (samples/s; n = {n})")
    log("   model     |       fp |      qat |    joint | qat/fp [<= 1.5] | joint/((n+1) qat) [<= 1.1] "
        "| sync-free qat/joint | qat compiled/fp")
    for m, r in single.items():
        q = r["ratios"]
        sf = ["n/a" if r[k].get("sync_free") is None else ("yes" if r[k]["sync_free"] else "NO")
              for k in ("qat", "joint")]
        qat_fp = f"{q['qat_over_fp']:5.2f} {'met' if q['qat_over_fp_met'] else 'NOT met':>9}"
        joint_n1 = (f"{q['joint_over_n1_qat']:5.2f} (joint/qat {q['joint_over_qat']:4.2f}) "
                    f"{'met' if q['joint_over_n1_qat_met'] else 'NOT met':>7}")
        log(f"   {m:<9} | {r['fp']['samples_per_s']:>8.0f} | {r['qat']['samples_per_s']:>8.0f} | "
            f"{r['joint']['samples_per_s']:>8.0f} | {qat_fp} | {joint_n1} | {sf[0]}/{sf[1]} | "
            f"{r['qat_compiled_over_fp']:5.2f}")
    ddp = report.get("ddp")
    if ddp and "models" in ddp:
        log("   DDP aggregate samples/s (efficiency vs 1 GPU):")
        for m, per in ddp["models"].items():
            for kind in ("qat", "joint"):
                cells = "  ".join(f"ws{w}: {per[kind][str(w)]['samples_per_s']:.0f} "
                                  f"({per[kind][str(w)]['efficiency']:.2f})" for w in ddp["world_sizes"])
                log(f"   {m:<9} {kind:>5}: {cells} | ws1 via DDP / in-process step time "
                    f"{per[kind]['ws1_over_in_process']:.3f}")
    report["wall_s"] = time.perf_counter() - t0
    log(f"\ntotal bench wall {report['wall_s']:.0f}s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
