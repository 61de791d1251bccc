"""Per-host tiles: the cache model, tuned rules handed to the extension, the tuning file."""
import json

import pytest
import torch

from nanogpt import tuning
from nanogpt.reference import compare_to_sdpa


@pytest.fixture
def restore_tiles(ext):
    yield ext.extension()
    tuning.apply(ext.extension(), tuning.load())  # whatever this machine had before


def test_cache_model(restore_tiles):
    ext = restore_tiles
    ext.set_tuned_tiles([])
    widths = []
    for nq, d in [(100, 1), (1024, 32), (2048, 64), (4096, 128), (4096, 256)]:
        br, bc = ext.model_tiles(nq, d)
        assert br == (128 if nq >= 2048 else 64)
        assert 64 <= bc <= 1024 and bc & (bc - 1) == 0  # a power of two
        assert ext.default_tiles(nq, nq, d) == (br, bc)
        widths.append(bc)
    assert widths == sorted(widths, reverse=True)  # wider heads, narrower key blocks (same L2)


def test_tuned_rules_apply_by_head_size(restore_tiles):
    ext = restore_tiles
    ext.set_tuned_tiles([(64, 192, 128), (32, 96, 512)])
    assert ext.default_tiles(4096, 4096, 32) == (96, 512)
    assert ext.default_tiles(4096, 4096, 48) == (192, 128)
    assert ext.default_tiles(1000, 1000, 64) == (64, 128)  # short sequences keep Br <= 64
    assert ext.default_tiles(4096, 4096, 128) == ext.model_tiles(4096, 128)  # no rule: the model
    q, k, v = (torch.randn(1, 2, 300, 48) for _ in range(3))
    assert compare_to_sdpa(ext_attention(q, k, v), q, k, v, True)[0]
    with pytest.raises(ValueError, match="tuned tiles must be positive"):
        ext.set_tuned_tiles([(32, 0, 64)])


def ext_attention(q, k, v):
    import nanogpt

    return nanogpt.attention(q, k, v, causal=True)


def test_tuning_file_round_trip(restore_tiles, tmp_path):
    path = tmp_path / "tiles.json"
    assert tuning.load(path) == {}
    tuning.save(32, 160, 256, path)
    tuning.save(128, 64, 128, path)
    saved = tuning.load(path)
    assert saved["rules"] == {32: [160, 256], 128: [64, 128]} and saved["cpu"]
    assert restore_tiles.default_tiles(2048, 2048, 128) == (64, 128)  # applied at once
    path.write_text("{not json")
    with pytest.raises(ValueError, match="tiles.json"):
        tuning.load(path)
    path.write_text(json.dumps({"rules": {"32": [1]}}))
    with pytest.raises(ValueError, match="tiles.json"):
        tuning.load(path)


def test_tuning_file_is_per_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOGPT_BUILD_DIR", str(tmp_path))
    from nanogpt import _build

    assert tuning.tuning_path() == tmp_path / f"tiles-{_build.cpu_key()}.json"


def test_bad_tuning_file_warns_and_keeps_the_model(restore_tiles, tmp_path, monkeypatch):
    import nanogpt

    monkeypatch.setenv("NANOGPT_BUILD_DIR", str(tmp_path))
    tuning.tuning_path().write_text(json.dumps({"rules": {"32": [0, 64]}}))  # br = 0: refused by the extension
    with pytest.warns(UserWarning, match="tuned tiles not applied"):
        nanogpt._apply_tuning(restore_tiles)
    tuning.tuning_path().write_text("{broken")
    with pytest.warns(UserWarning, match="tiles-"):
        nanogpt._apply_tuning(restore_tiles)
