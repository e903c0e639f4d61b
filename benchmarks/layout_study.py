"""Does letting the budget rule choose each layer's group size beat a fixed layout?

At equal storage (``bits_per_weight``: codes, scales and zero points counted),
the search runs with per-channel scales, fixed groups of 32, 64 and 128, and a
free choice among all four per layer; each config is applied with vanilla
round-to-nearest (``mixquant.quantize``, asymmetric min/max) and the result is
compared with the float model:

* MobileNetV2 (ImageNet weights): top-1 agreement with FP32 and KL(FP32 || Q)
  over 10 crops of each of the 20 labelled photos;
* ResNet-20 (Fashion-MNIST): top-1 on the 10,000 test images.

All layers are free (none pinned), bits 2..8, objective ``norm``. A layout that
cannot meet a budget is shown as ``-``.

    python benchmarks/layout_study.py [--models mobilenet_v2 resnet20] [--bpw 3 3.5 4 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import mixquant
from mixquant import zoo

LAYOUTS = {"channel": None, "g128": 128, "g64": 64, "g32": 32, "chosen": [None, 128, 64, 32]}


def mobilenet():
    model = zoo.mobilenet_v2()
    x = torch.cat([zoo.imagenet_crops(img, 10) for img, _, _ in zoo.imagenet_photos()])

    def score(q):
        agree, kl = zoo.agreement_and_kl(q, model, x.split(50))
        return {"agreement": agree, "kl": kl}

    return model, score


def resnet20():
    model = zoo.resnet20()
    x, y = zoo.fashion_mnist("test")
    x = zoo.fashion_mnist_normalize(x)

    def score(q):
        return {"top1": zoo.evaluate_accuracy(q, x, y)}

    return model, score


MODELS = {"mobilenet_v2": mobilenet, "resnet20": resnet20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--bpw", nargs="+", type=float, default=[3.0, 3.5, 4.0, 5.0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    records = []
    for name in args.models:
        model, score = MODELS[name]()
        print(f"\n{name}: {sum(p.numel() for p in model.parameters())} parameters")
        head = f"{'bits/weight':>11} {'layout':8} {'bpw used':>8} {'avg code bits':>13} {'sum norm err':>12}  metrics"
        print(head + "\n" + "-" * len(head))
        for bpw in args.bpw:
            for label, gs in LAYOUTS.items():
                try:
                    cfg = mixquant.search(model, bits_per_weight=bpw, group_size=gs)
                except ValueError:
                    print(f"{bpw:11.2f} {label:8} {'-':>8}")
                    continue
                q = mixquant.quantize(model, cfg, progress=False)
                metrics = score(q)
                used = sorted({str(cfg.group_size_of(n)) for n in cfg.bits}) if label == "chosen" else None
                rec = {"model": name, "bpw": bpw, "layout": label, "bits_per_weight": cfg.bits_per_weight,
                       "avg_bits": cfg.avg_bits, "norm_error": cfg.total_error("norm"), **metrics,
                       "group_sizes_used": used}
                records.append(rec)
                text = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                print(f"{bpw:11.2f} {label:8} {cfg.bits_per_weight:8.3f} {cfg.avg_bits:13.3f} "
                      f"{rec['norm_error']:12.4g}  {text}" + (f"  (group sizes used: {used})" if used else ""),
                      flush=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s, load average {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)


if __name__ == "__main__":
    main()
