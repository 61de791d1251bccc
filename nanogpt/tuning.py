"""Per-host tile sizes for flash: measure them on this CPU and keep them for every later run.

    nanogpt.tune()                  # sweeps Br×Bc at N = 2048 for d = 32, 64, 128; saves; applies
    python gpt.py tune              # the same from the command line
    python gpt.py sweep --save      # one sweep's best cell, saved for its d

The result is a JSON file in the build cache, named after this CPU's feature flags (as the
build is), so a cache shared with another host never applies one host's tiles to the other.
Without it, the extension's model of the cache sizes picks the tiles (csrc/tiles.cpp).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from nanogpt import _build

BRS = (32, 64, 128, 192, 256)
BCS = (64, 128, 256, 512, 1024)


def tuning_path() -> Path:
    return _build.build_root() / f"tiles-{_build.cpu_key()}.json"


def load(path: Path | None = None) -> dict:
    """The saved tuning of this CPU ({} if none): {"cpu": ..., "rules": {d: [br, bc]}}."""
    path = path or tuning_path()
    try:
        data = json.loads(Path(path).read_text())
        return {"cpu": data.get("cpu", "?"), "rules": {int(d): [int(br), int(bc)] for d, (br, bc) in data["rules"].items()}}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"tuning file {path} is not valid ({err}); delete it or run nanogpt.tune() again") from err


def apply(ext, tuning: dict) -> None:
    """Hands the rules to the extension: head sizes up to d use (br, bc)."""
    ext.set_tuned_tiles(sorted((d, br, bc) for d, (br, bc) in tuning.get("rules", {}).items()))


def save(d: int, br: int, bc: int, path: Path | None = None) -> Path:
    """Records (br, bc) for heads of size d in this CPU's tuning file and applies it now."""
    import nanogpt
    from nanogpt.host import cpu_model

    path = Path(path or tuning_path())
    tuning = load(path) or {"cpu": cpu_model(), "rules": {}}
    tuning["rules"][int(d)] = [int(br), int(bc)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"cpu": tuning["cpu"], "rules": {str(k): v for k, v in sorted(tuning["rules"].items())}},
                              indent=1))
    os.replace(tmp, path)  # never a half-written file
    apply(nanogpt.extension(), tuning)
    return path


def tune(N: int = 2048, ds=(32, 64, 128), H: int = 4, repeat: int = 5, save_result: bool = True) -> dict:
    """Sweeps flash's Br×Bc at (1, H, N, d) for each d (interleaved, median of `repeat`) and
    saves the best cell of each; returns {d: (br, bc, ms)}."""
    from nanogpt import bench

    best = {}
    for d in ds:
        result = bench.sweep(1, H, N, d, False, brs=BRS, bcs=BCS, repeat=repeat, png=None)
        (br, bc), ms = result["best"], result["best_ms"]
        best[d] = (br, bc, ms)
        if save_result:
            print(f"saved Br={br} Bc={bc} for d <= {d} in {save(d, br, bc)}")
    return best
