"""The README's main job: simulate a scan, train briefly on the CPU, reconstruct, write images.

Usage: python scripts/demo.py [OUTPUT_DIR]   (default: demo_output/)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ptychodus_torch_plugin.engine.archive import save_archive
from ptychodus_torch_plugin.engine.data import save_npz
from ptychodus_torch_plugin.engine.images import save_object_images
from ptychodus_torch_plugin.engine.inference import CanvasGeometry, reconstruct
from ptychodus_torch_plugin.engine.metrics import evaluate, scanned_region
from ptychodus_torch_plugin.engine.payload import create_training_payload
from ptychodus_torch_plugin.engine.simulate import simulate_dataset
from ptychodus_torch_plugin.engine.training import train


def main(output: Path) -> int:
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = simulate_dataset(
        object_kind="siemens", probe_kind="zoneplate", N=64, nphotons=1e6, seed=0
    )
    save_npz(data, output / "simulated_scan.npz")
    print(f"simulated {data.n_patterns} patterns of {data.N}x{data.N} (1e6 photons each)")
    payload = create_training_payload(
        {
            "N": data.N,
            "gridsize": 1,
            "n_filters_scale": 1,
            "epochs": 12,
            "batch_size": 16,
            "accelerator": "cpu",
            "logger": "none",
            "enable_progress_bar": False,
        }
    )
    result = train(payload, data)
    losses = ", ".join(f"{r.train_loss:.4g}" for r in result.history)
    print(f"trained {len(result.history)} epochs on the CPU (loss per pattern: {losses})")
    archive = save_archive(result.model, output / "wts.h5.zip")
    height, width = data.object_guess.shape
    inference = reconstruct(result.model, data, canvas=CanvasGeometry(0.0, 0.0, width, height))
    stitched = inference.stitched
    np.save(output / "object.npy", stitched.object)
    np.savez(
        output / "reconstruction.npz",
        object=stitched.object,
        weights=stitched.weights,
        origin_x=stitched.canvas.origin_x,
        origin_y=stitched.canvas.origin_y,
        backend=inference.backend,
    )
    images = save_object_images(stitched.object, output, mask=stitched.weights > 0)
    mask = scanned_region(stitched.weights, erode=data.N // 8)
    quality = evaluate(stitched.object, data.object_guess, mask)
    (output / "metrics.json").write_text(json.dumps(quality.to_dict(), indent=2))
    print(f"model archive: {archive}")
    print("images: " + ", ".join(str(p) for p in images))
    print("quality vs ground truth: " + json.dumps(quality.to_dict()))
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_output")))
