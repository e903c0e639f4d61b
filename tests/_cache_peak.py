"""Extra peak memory of BRECQ's unit caches, measured in a process of its own (run by test_brecq.py).

``python _cache_peak.py CASE...`` prints one JSON line per case: the cache
bytes the run reported, the error message (if it was refused) and the extra
peak resident memory above the level before the call. The peak is reset
between cases through ``/proc/self/clear_refs``; where that is not allowed the
script reports ``"reset": false`` after the first case and stops.
"""

from __future__ import annotations

import gc
import json
import sys

import torch
import torch.nn as nn

import mixquant

# name: (num_samples, max_cache_mb, loss); unit "a" (3 -> 16 channels at 64 x 64) holds the
# largest cache, 400 x (3 + 16) x 64 x 64 x 4 B = 118.75 MB (+ 100 MB of Fisher weights).
CASES = {
    "fits": (400, 145.0, "mse"),
    "fits_fisher": (400, 250.0, "fisher"),
    "refused": (400, 110.0, "mse"),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 4, 3, stride=4, padding=1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def _kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(fh.read().split(field + ":")[1].split()[0])


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def main(names: list) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = Net().eval()
    cfg = mixquant.uniform(net, 4, errors=False)
    x = torch.randn(400, 3, 64, 64)
    y = torch.randint(0, 4, (400,))
    for loss in ("mse", "fisher"):  # load every library and kernel once, before measuring
        mixquant.quantize(net, cfg, "brecq", calib_data=[(x[:32], y[:32])], iters=2, batch_size=16, loss=loss,
                          progress=False)
    for i, name in enumerate(names):
        samples, limit, loss = CASES[name]
        gc.collect()
        reset = _reset_peak()
        if i and not reset:
            print(json.dumps({"case": name, "reset": False}))
            return
        base = _kib("VmRSS")
        err, cache = None, 0
        try:
            q = mixquant.quantize(net, cfg, "brecq", calib_data=[(x[:samples], y[:samples])], iters=2,
                                  num_samples=samples, batch_size=16, max_cache_mb=limit, loss=loss, progress=False)
            cache = q.mixquant_report.peak_cache_bytes
            del q
        except ValueError as exc:
            err = str(exc)
        extra = (_kib("VmHWM") - base) * 1024
        print(json.dumps({"case": name, "reset": True, "limit": limit * 2**20, "cache": cache, "error": err,
                          "extra_peak": extra}))


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
