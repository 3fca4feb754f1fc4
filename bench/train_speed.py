"""What one TexQ run costs on this device: step times, the projected paper-protocol minutes, and
how many runs one device carries at once.

Prints, for the device it runs on (random weights: the timings do not depend on them):
  1. FP vs W4A4 train-step time of the model (batch 128, plain CE + SGD) and their ratio, eager
     and, on CUDA, as CUDA graphs;
  2. step 1 (calibration images) and steps 2-3 (G alone during the warm-up epochs, G + Q after)
     in ms per iteration at the paper's settings, and the projected minutes of one
     ``--profile paper`` run (1500 step-1 iterations, 50 + 450 epochs of 200 iterations);
  3. CPU-measured proxies of one steps-2-3 iteration: aten ops, and host syncs inside the passes
     a CUDA graph captures (must be 0);
  4. with ``--concurrency 1,2,4``: k processes on the device at once, their summed iteration rate,
     as paper-protocol runs per hour;
  5. with ``--imagenet``: the same timings for ResNet-18 at 224x224 (batch 16), Table 2's cost.
The last stdout line is one JSON object with every figure.

    python bench/train_speed.py [--device cuda] [--tf32] [--eager] [--concurrency 1,2,4] [--imagenet]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import subprocess
import sys
import time
from dataclasses import replace

import torch
from torch import nn

from texq.method.bns import LayerStats, bn_layers
from texq.method.calibration import synthesize
from texq.method.finetune import Finetuner, Sources
from texq.method.generator import Generator
from texq.models import create_model
from texq.quant import QuantConfig, calibrate, quantize
from texq.run.config import RunConfig
from texq.util.device import memory_format, set_numerics
from texq.util.graphs import GraphedStep

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call(fn, n: int, device: torch.device, warmup: int = 3) -> float:
    """Seconds per call of ``fn`` over ``n`` calls (after ``warmup`` calls), device work included."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def build(model: str, device: torch.device, batch: int | None, graphs: bool, seed: int = 0,
          layout: torch.memory_format | None = None, fixed_shapes: bool | None = None,
          mix_slots: str = "all", **speed):
    """F, Q (W4A4, ranges set on noise) and a Finetuner at the paper's settings; the calibration
    set is random images with random centers (the same shapes as step 1's). F and G in
    ``layout``, as a run lays them out. ``speed``: Finetuner's precision / compile settings."""
    torch.manual_seed(seed)
    cfg = RunConfig.for_profile("paper", model=model, checkpoint="unused")
    ft = replace(cfg.finetune, mix_slots=mix_slots)
    ft = ft if batch is None else replace(ft, batch_size=batch)
    layout = layout or memory_format("auto", device, torch.backends.cudnn.allow_tf32)
    fp = create_model(model).to(device, memory_format=layout).eval()
    info = fp.texq_info
    k, s = info.num_classes, info.input_size
    q = quantize(fp, QuantConfig(w_bits=4, a_bits=4))
    calibrate(q, [torch.randn(ft.batch_size, 3, s, s, device=device)])
    centers = [LayerStats(torch.randn(k, bn.num_features, device=device),
                          torch.rand(k, bn.num_features, device=device) + 0.5) for bn in bn_layers(fp)]
    src = Sources(generator=Generator.for_model(info).to(device, memory_format=layout),
                  calib_images=torch.randn(k, 3, s, s, device=device),
                  calib_labels=torch.arange(k, device=device), centers=centers)
    return cfg, Finetuner(fp, q, src, cfg.generator, ft, True, device, cuda_graphs=graphs,
                          fixed_shapes=fixed_shapes, **speed)


def step_ratio(model: str, device: torch.device, graphs: bool, batch: int = 128, n: int = 30) -> dict:
    """FP vs W4A4 training step (CE on a fixed batch, SGD): seconds each and the ratio."""
    torch.manual_seed(0)
    layout = memory_format("auto", device, torch.backends.cudnn.allow_tf32)
    fp = create_model(model).to(device, memory_format=layout).train()
    s = fp.texq_info.input_size
    x = torch.randn(batch, 3, s, s, device=device)
    y = torch.randint(0, fp.texq_info.num_classes, (batch,), device=device)
    q = quantize(fp, QuantConfig(w_bits=4, a_bits=4))
    calibrate(q, [x])
    q.train()
    out = {}
    for name, m in (("fp", fp), ("w4a4", q)):
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, foreach=True)

        def fwd_bwd(m=m):
            nn.functional.cross_entropy(m(x), y).backward()
        step = GraphedStep(fwd_bwd, device, list(m.parameters()), enabled=graphs)

        def train(step=step, opt=opt):
            step()
            opt.step()
        out[name] = per_call(train, n, device)
    return {"fp_ms": 1e3 * out["fp"], "w4a4_ms": 1e3 * out["w4a4"], "ratio": out["w4a4"] / out["fp"]}


def steps23(tuner: Finetuner, device: torch.device, n: int) -> dict:
    g_ms = 1e3 * per_call(tuner.generator_step, n, device)
    x, y, _ = tuner.generator_step()

    def joint():
        xx, yy, _ = tuner.generator_step()
        tuner.quant_step(xx, yy)
    return {"g_only_ms": g_ms, "g_and_q_ms": 1e3 * per_call(joint, n, device)}


def step1_ms(model: str, device: torch.device, graphs: bool, iters: tuple[int, int], repeats: int = 2) -> float:
    """Step 1 ms per iteration (per chunk of classes): the difference of two run lengths, so that
    set-up and capture cancel out. A first, untimed run takes the one-time costs (lazy
    initialisation, the allocator's first blocks), which would otherwise land on the shorter run
    and could make the difference negative; each length is timed ``repeats`` times and its fastest
    kept (noise only adds time). A difference that is still not positive is an error, not a figure."""
    cfg = RunConfig.for_profile("paper", model=model, checkpoint="unused").calibration
    layout = memory_format("auto", device, torch.backends.cudnn.allow_tf32)
    fp = create_model(model).to(device, memory_format=layout).eval()
    chunks = -(-fp.texq_info.num_classes // (cfg.classes_per_step or fp.texq_info.num_classes))

    def run(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        synthesize(fp, replace(cfg, iters=n, warmup_iters=1), device=device, progress=False, cuda_graphs=graphs)
        sync(device)
        return time.perf_counter() - t0

    run(iters[0])  # untimed: the one-time costs
    times = [min(run(n) for _ in range(repeats)) for n in iters]
    return per_iteration_ms(times, iters, chunks)


def per_iteration_ms(times: list[float], iters: tuple[int, int], chunks: int) -> float:
    """ms per iteration from the seconds of two run lengths ``iters`` of ``chunks`` chunks each;
    refuses a longer run that took no longer than the shorter (timing noise above the work)."""
    if times[1] <= times[0]:
        raise RuntimeError(f"step 1 timing not resolved: {iters[1]} iterations took {times[1]:.3f} s, "
                           f"{iters[0]} took {times[0]:.3f} s; time longer runs (a larger iteration gap)")
    return 1e3 * (times[1] - times[0]) / (chunks * (iters[1] - iters[0]))


def proxies(model: str) -> dict:
    """aten ops and host syncs of one eager steps-2-3 iteration on the CPU (batch 8), in the form
    a GPU captures (fixed-shape mixup; the CPU's own variable-size form reads the mixed count)."""
    from torch.profiler import ProfilerActivity, profile

    _, tuner = build(model, torch.device("cpu"), 8, graphs=False, fixed_shapes=True)
    x, y, _ = tuner.generator_step()
    tuner.quant_step(x, y)
    counts = {}
    for name, fn in (("g_pass", tuner._g_step), ("q_pass", lambda: tuner._q_step(x, y)),
                     ("optimizers", lambda: (tuner.opt_g.step(), tuner.opt_q.step()))):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        c = collections.Counter(e.name for e in prof.events())
        counts[name] = {"aten_ops": sum(v for k, v in c.items() if k.startswith("aten::")),
                        "host_syncs": sum(c.get(k, 0) for k in SYNC_OPS)}
    return {"aten_ops_per_iter": sum(v["aten_ops"] for v in counts.values()),
            "host_syncs_in_captured_passes": counts["g_pass"]["host_syncs"] + counts["q_pass"]["host_syncs"],
            "cpu_scalar_reads_in_optimizers": counts["optimizers"]["host_syncs"], "by_part": counts}


def paper_minutes(cfg: RunConfig, step1: float, g_ms: float, gq_ms: float) -> float:
    c, f = cfg.calibration, cfg.finetune
    chunks = 1 if not c.classes_per_step else -(-1000 // c.classes_per_step)
    return (c.iters * chunks * step1 + f.iters_per_epoch * (f.warmup_epochs * g_ms
                                                            + f.epochs * gq_ms)) / 60e3


def worker(args) -> None:
    """One of k concurrent processes: warm up, wait for the common start, iterate for the given
    seconds, print the iteration rate."""
    device = torch.device(args.device)
    set_numerics(args.tf32)
    _, tuner = build(args.model, device, None, not args.eager)
    steps23(tuner, device, 3)
    time.sleep(max(0.0, args.start_at - time.time()))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.worker:
        x, y, _ = tuner.generator_step()
        tuner.quant_step(x, y)
        n += 1
        if n % 20 == 0:
            sync(device)
    sync(device)
    print(json.dumps({"its_per_s": n / (time.perf_counter() - t0)}))


def concurrent(args, k: int, seconds: float) -> float:
    """Summed steps-2-3 iterations per second of ``k`` processes running at once."""
    start = time.time() + 20 + 3 * k  # after every worker's set-up and capture
    cmd = [sys.executable, __file__, "--device", args.device, "--model", args.model,
           "--worker", str(seconds), "--start-at", str(start)] + (["--tf32"] * args.tf32) + (
        ["--eager"] * args.eager)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
    rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["its_per_s"] for p in procs]
    return sum(rates)


def timings(model: str, device: torch.device, graphs: bool, n: int, step1_iters) -> dict:
    cfg, tuner = build(model, device, None, graphs)
    t23 = steps23(tuner, device, n)
    s1 = step1_ms(model, device, graphs, step1_iters)
    return {"step1_ms": s1, **t23,
            "paper_minutes": paper_minutes(cfg, s1, t23["g_only_ms"], t23["g_and_q_ms"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="resnet20a_cifar10")
    p.add_argument("--iters", type=int, default=40, help="timed iterations per figure")
    p.add_argument("--tf32", action="store_true", help="TF32 convolutions/matmuls (default float32)")
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--concurrency", default="", help="e.g. 1,2,4: processes run at once")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per concurrency level")
    p.add_argument("--imagenet", action="store_true", help="also ResNet-18 at 224x224, batch 16")
    p.add_argument("--worker", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    device = torch.device(args.device)
    set_numerics(args.tf32)
    graphs = not args.eager and device.type == "cuda"
    res: dict = {"bench": "train_speed", "model": args.model, "device": str(device),
                 "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                 else platform.processor() or platform.machine(),
                 "torch": torch.__version__, "tf32": args.tf32, "cuda_graphs": graphs}
    res["proxies_cpu"] = proxies(args.model)
    res["step_ratio_eager"] = step_ratio(args.model, device, False)
    if graphs:
        res["step_ratio_graphs"] = step_ratio(args.model, device, True)
    res.update(timings(args.model, device, graphs, args.iters, (10, 60)))
    if args.concurrency:
        rates = {k: concurrent(args, k, args.seconds) for k in map(int, args.concurrency.split(","))}
        per_run_its = 100_000 + 1500  # steps 2-3 iterations, plus step 1's (counted alike)
        res["concurrent"] = {k: {"its_per_s": r, "paper_runs_per_hour": 3600 * r / per_run_its}
                             for k, r in rates.items()}
    if args.imagenet:
        res["imagenet_resnet18"] = timings("resnet18", device, graphs, max(5, args.iters // 4), (2, 5))
    for key in ("step_ratio_eager", "step_ratio_graphs"):
        if key in res:
            r = res[key]
            print(f"{key}: FP {r['fp_ms']:.2f} ms, W4A4 {r['w4a4_ms']:.2f} ms, ratio {r['ratio']:.2f}")
    print(f"step 1 {res['step1_ms']:.2f} ms/iter; steps 2-3 G only {res['g_only_ms']:.2f} ms/iter, "
          f"G + Q {res['g_and_q_ms']:.2f} ms/iter; paper protocol ~{res['paper_minutes']:.1f} min")
    print(f"proxies (CPU, one eager iteration): {res['proxies_cpu']['aten_ops_per_iter']} aten ops, "
          f"{res['proxies_cpu']['host_syncs_in_captured_passes']} host syncs in captured passes")
    for k, v in res.get("concurrent", {}).items():
        print(f"{k} concurrent: {v['its_per_s']:.0f} it/s in all, {v['paper_runs_per_hour']:.2f} paper runs/h")
    if "imagenet_resnet18" in res:
        r = res["imagenet_resnet18"]
        print(f"ResNet-18 224px: step 1 {r['step1_ms']:.1f} ms/iter, G+Q {r['g_and_q_ms']:.1f} ms/iter, "
              f"paper protocol ~{r['paper_minutes']:.0f} min")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
