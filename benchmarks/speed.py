"""Speed benchmark (not a test): predict and training throughput against the machine's roofline.

Prints, all measured in the same run (medians of repeated runs):
- the fp32 GFLOP/s of a large matmul: the roofline of this machine;
- the network's FLOPs per group and the roofline-implied bound in groups/s;
- predict and training-step groups/s at N=64 (gridsize 1, 2) and N=128 (gridsize 1), batch 16
  and 64, and predict's fraction of the bound, each predict timed right after a matmul (the
  median of the paired ratios; see predict_against_roofline);
- the end-to-end inference split (load, group, predict, stitch, phase alignment) for the
  1,087-pattern Run1084 scan, and its throughput relative to predict alone;
- peak resident memory.

Run:  .venv/bin/python benchmarks/speed.py [--repeats 5] [--json FILE]
The end-to-end part is skipped (with a note) when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _checkout  # noqa: F401  (this checkout's code, not the venv's copy)
import numpy as np
import torch

from ptychodus_torch_plugin.engine.data import load_npz, save_npz
from ptychodus_torch_plugin.engine.inference import reconstruct
from ptychodus_torch_plugin.engine.model import TrainedModel
from ptychodus_torch_plugin.engine.network import flops_per_group
from ptychodus_torch_plugin.engine.payload import create_training_payload
from ptychodus_torch_plugin.engine.physics import poisson_nll
from ptychodus_torch_plugin.engine.simulate import disk_probe, simulate_from_object_npz

RUN1084 = Path(__file__).resolve().parents[2] / "shared" / "data" / "run1084_object_probe.npz"


def median_time(fn, repeats: int, warmup: int = 1) -> float:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(repeats: int, n: int = 3072) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_time(lambda: a @ b, repeats) / 1e9


def build_model(n: int, gridsize: int, probe: np.ndarray | None = None) -> TrainedModel:
    """An untrained default network (speed does not depend on the weights).

    ``probe``: the scan's own, as a model trained on that scan holds it (otherwise a disk,
    which inference would rightly warn differs from the scan's illumination).
    """
    config = create_training_payload({"N": n, "gridsize": gridsize}).to_flat()
    return TrainedModel.build(
        config,
        disk_probe(n) if probe is None else probe,
        input_scale=1.0,
        intensity_scale=30.0,
        nphotons=1e6,
    )


def predict_against_roofline(
    model: TrainedModel, batch: int, repeats: int
) -> tuple[float, float, float]:
    """Median predict groups/s, median matmul GFLOP/s, and median of their paired ratio.

    Why paired: this machine's speed drifts by 20-40% within minutes (a shared host), so a
    roofline taken once at the start and a predict timed minutes later can differ by more
    than the effect being measured. Each repeat times the matmul and then the predict back
    to back; the fraction of the bound is the median over those pairs.
    """
    c, n = model.gridsize**2, model.N
    inputs = np.random.default_rng(0).random((batch * 4, c, n, n), dtype=np.float32)
    flops = flops_per_group(model.model_config)
    model.predict(inputs, batch_size=batch)  # warm-up (layout change, oneDNN primitives)
    rates, rooflines, fractions = [], [], []
    for _ in range(repeats):
        roofline = matmul_gflops(1)
        rate = inputs.shape[0] / median_time(
            lambda: model.predict(inputs, batch_size=batch), 1, warmup=0
        )
        rates.append(rate)
        rooflines.append(roofline)
        fractions.append(rate * flops / (roofline * 1e9))
    return statistics.median(rates), statistics.median(rooflines), statistics.median(fractions)


def train_step_rate(model: TrainedModel, batch: int, repeats: int) -> float:
    c, n = model.gridsize**2, model.N
    # The layout train() uses on the CPU (engine.training._ChannelsLastCallback).
    autoencoder = model.autoencoder.train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=1e-4)
    inputs = torch.rand(batch, c, n, n)
    offsets = torch.randn(batch, c, 2)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _, predicted = autoencoder(inputs, offsets)
        poisson_nll(predicted, inputs, 30.0).backward()
        optimizer.step()

    return batch / median_time(step, repeats)


def end_to_end(repeats: int) -> dict:
    data = simulate_from_object_npz(RUN1084, nphotons=1e6, seed=1)
    model = build_model(64, 1, probe=data.probe)
    cpu = model.inference_payload({"accelerator": "cpu"})  # the rows' device, also on a GPU host
    with tempfile.TemporaryDirectory() as tmp:
        path = save_npz(data, Path(tmp) / "scan.npz")
        splits = []
        for _ in range(repeats):
            start = time.perf_counter()
            loaded = load_npz(path)
            load_s = time.perf_counter() - start
            result = reconstruct(model, loaded, cpu)
            total = time.perf_counter() - start
            splits.append({"load": load_s, **result.timings, "total": total})
    split = {k: statistics.median(s[k] for s in splits) for k in splits[0]}
    groups = data.n_patterns
    return {
        "patterns": groups,
        "seconds": {k: round(v, 3) for k, v in split.items()},
        "end_to_end_groups_per_s": round(groups / split["total"], 1),
        "predict_only_groups_per_s": round(groups / split["predict"], 1),
        "end_to_end_fraction_of_predict": round(split["predict"] / split["total"], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    report: dict = {
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    roofline = matmul_gflops(args.repeats)
    report["matmul_fp32_gflops"] = round(roofline, 1)
    print(f"machine: {report['machine']}, torch {report['torch']}, {report['threads']} threads")
    print(f"roofline: fp32 matmul {roofline:.1f} GFLOP/s (3072^3, median of {args.repeats})")
    rows = []
    for n, gridsize in [(64, 1), (64, 2), (128, 1)]:
        model = build_model(n, gridsize)
        flops = flops_per_group(model.model_config)
        for batch in (16, 64):
            predict, row_roofline, fraction = predict_against_roofline(model, batch, args.repeats)
            bound = row_roofline * 1e9 / flops
            train = train_step_rate(model, batch, max(3, args.repeats // 2))
            row = {
                "N": n,
                "gridsize": gridsize,
                "batch": batch,
                "gflop_per_group": round(flops / 1e9, 3),
                "row_matmul_fp32_gflops": round(row_roofline, 1),
                "bound_groups_per_s": round(bound, 1),
                "predict_groups_per_s": round(predict, 1),
                "predict_fraction_of_bound": round(fraction, 3),
                "train_groups_per_s": round(train, 1),
            }
            rows.append(row)
            print(
                f"N={n:3d} g={gridsize} batch={batch:2d}: {flops / 1e9:.2f} GFLOP/group, matmul "
                f"{row_roofline:5.1f} GFLOP/s, bound {bound:6.1f}/s | predict {predict:6.1f}/s "
                f"({fraction:5.1%} of bound, paired) | train step {train:6.1f}/s",
                flush=True,
            )
    report["rows"] = rows
    if RUN1084.exists():
        e2e = end_to_end(max(3, args.repeats // 2))
        report["end_to_end"] = e2e
        print(f"end-to-end inference, Run1084 ({e2e['patterns']} patterns): {e2e['seconds']}")
        print(
            f"  {e2e['end_to_end_groups_per_s']} groups/s end to end vs "
            f"{e2e['predict_only_groups_per_s']} predict alone "
            f"({e2e['end_to_end_fraction_of_predict']:.1%})"
        )
    else:
        print(f"end-to-end: SKIP ({RUN1084} not found)")
    # ru_maxrss: KiB on Linux, bytes on macOS
    unit = 1024 * 1024 if sys.platform == "darwin" else 1024
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
    report["peak_rss_mib"] = round(peak_mib, 1)
    print(f"peak RSS: {peak_mib:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
