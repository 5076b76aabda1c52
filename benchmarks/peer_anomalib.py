"""Run by benchmarks/vs_anomalib.py inside its own anomalib 2.7 environment (benchmarks/.peer/venv), never imported.

One whole process, as an anomalib user runs it: build the model, ``Engine.fit`` then
``Engine.test`` on one MVTec-layout category, with the Lite0 weights the orchestrator
wrote in timm's key names. Prints one JSON line with the metrics.
"""

import argparse
import json
import time

import torch


def inverse_on_one_thread() -> None:
    """torch 2.14.1's batched inverse (MKL getrf/getri) fails on PaDiM's covariances with 2 threads ("Pivots given to
    lu_solve must all be greater or equal to 1"); anomalib's PaDiM calls it once, so that one call runs on one thread."""
    inverse = torch.linalg.inv

    def on_one_thread(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return inverse(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    torch.linalg.inv = on_one_thread


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--model", choices=("padim", "patchcore"), required=True)
    parser.add_argument("--weights", required=True, help="Lite0 state_dict in timm's key names (torch.save of tensors)")
    parser.add_argument("--layers", required=True, help="timm module names, comma-separated, e.g. blocks.2,blocks.4")
    parser.add_argument("--n-features", type=int, required=True, help="PaDiM's kept features (all of them: like anomatune's)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inverse_on_one_thread()

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Padim, Patchcore

    layers = args.layers.split(",")
    if args.model == "padim":
        model = Padim(backbone="tf_efficientnet_lite0", layers=layers, pre_trained=False, n_features=args.n_features)
    else:
        model = Patchcore(backbone="tf_efficientnet_lite0", layers=layers, pre_trained=False, coreset_sampling_ratio=0.01)
    timm_model = model.model.feature_extractor.feature_extractor
    weights = torch.load(args.weights, weights_only=True)
    missing, _ = timm_model.load_state_dict(weights, strict=False)
    if missing:
        raise SystemExit(f"weights do not cover the feature extractor: {missing[:5]}")
    datamodule = MVTecAD(root=args.root, category=args.category, num_workers=0)
    engine = Engine(default_root_dir=args.out, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fitted = time.perf_counter()
    results = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    print(
        json.dumps(
            {
                "fit_s": round(fitted - start, 2),
                "test_s": round(time.perf_counter() - fitted, 2),
                **{k: float(v) for k, v in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
