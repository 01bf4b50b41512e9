import os
import time

from qvera.core import base


def test_a_killed_conversions_staging_folder_goes_at_the_next_start(tmp_path, monkeypatch):
    monkeypatch.setenv("QVERA_CACHE", str(tmp_path))
    monkeypatch.setattr(base, "smollm2_gguf_path", lambda: tmp_path / "model.gguf")
    (tmp_path / "smollm2-135m-instruct").mkdir()
    (tmp_path / "smollm2-135m-instruct" / "config.json").write_text("{}")  # converted already: no conversion now
    dead = tmp_path / ".convert-999999999-k1ll"  # above any process id Linux hands out
    running = tmp_path / f".convert-{os.getpid()}-b05y"  # a conversion under way
    legacy_old, legacy_new = tmp_path / ".convert-abcd1234", tmp_path / ".convert-efgh5678"
    for staging in (dead, running, legacy_old, legacy_new):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"0" * 100)
    os.utime(legacy_old, (time.time() - 7200, time.time() - 7200))
    assert base.builtin_smollm2_folder() == str(tmp_path / "smollm2-135m-instruct")
    assert sorted(p.name for p in tmp_path.glob(".convert-*")) == sorted([running.name, legacy_new.name])
