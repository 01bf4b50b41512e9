"""scripts/gpu_check.sh without a GPU: its one-line refusal, and its stage bookkeeping driven by a
stand-in for Python (the GPU run gets one try, so the shell logic is pinned here)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

# Records each call; `-` alone is the preflight, `- OUT STAGES` the summary; the stages behave
# as the case below says.
STAND_IN = """#!/usr/bin/env bash
echo "$*" >>"$CALLS"
if [[ $1 == - ]]; then
    cat >/dev/null
    if [[ $# -gt 1 ]]; then echo "$3" >"$STAGES_SEEN"; fi
    exit 0
fi
case "$*" in
    *"--max_steps 20"*) exit "${SFT_EXIT:-3}" ;;
    *"--resume true"*) sleep "${RESUME_SECONDS:-60}" ;;
    *"--server"*) sleep 60 ;;
esac
"""


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_without_a_gpu_it_stops_in_one_line(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()] and "no CUDA GPU" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


def run_with_stand_in(tmp_path, seconds: int, **env_values):
    """The check with the stand-in Python: its result, each stage's exit code, and the calls made."""
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    calls, stages = tmp_path / "calls", tmp_path / "stages"
    env = dict(os.environ, PYTHON=str(python), CALLS=str(calls), STAGES_SEEN=str(stages))
    env |= dict(GPU_CHECK_SECONDS=str(seconds), **env_values)
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    codes = {
        name: int(code) for name, code, _seconds in (s.split() for s in stages.read_text().split(";") if s.strip())
    }
    return result, codes, calls.read_text().splitlines()


def test_stages_past_the_time_limit_are_stopped_and_the_summary_still_written(tmp_path):
    result, codes, ran = run_with_stand_in(tmp_path, 12)
    assert result.returncode == 1, result.stderr
    # sft failed; its resume ran into the limit and was stopped; the stages after it had no time left.
    late = ("chat", "attention_shapes", "serving", "bench", "train_profile", "dvora_norm", "train_host_time")
    late += ("serving_batcher",)
    assert codes == {"cuda_tests": 0, "sft": 3, "sft_resume": 124} | dict.fromkeys(late, 124)
    assert "time limit" in (tmp_path / "out" / "sft_resume.log").read_text()
    assert all("not run" in (tmp_path / "out" / f"{name}.log").read_text() for name in late)
    assert ran[0] == "-" and "pytest -m cuda tests/cuda" in ran[1] and ran[-1].startswith("- ")
    later = ("bench.py", "chat.py", "bench_serving.py", "attention_new_shapes.py", "train_step_profile.py")
    later += ("train_host_time.py", "dvora_norm.py")
    assert not any(script in line for line in ran for script in later)


def test_an_extra_stage_cut_by_the_time_limit_is_reported_not_failed(tmp_path):
    # Every stage passes at once, but the batcher's runs past the limit.
    result, codes, _ = run_with_stand_in(tmp_path, 15, SFT_EXIT="0", RESUME_SECONDS="0")
    assert codes["serving_batcher"] == 124 and set(codes.values()) == {0, 124}
    assert result.returncode == 0, result.stderr
    assert "serving_batcher was stopped by the time limit; the required stages passed" in result.stderr
