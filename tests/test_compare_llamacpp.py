"""benchmarks/compare_llamacpp.py --render: runs at other thread counts merged into one report, JSON and plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "compare_llamacpp.py"


def stat(x):
    return {"median": x, "min": x * 0.9, "max": x * 1.1, "n": 3}


def run(threads, load, rounds=3):
    """A race's results at one thread count, as measure() writes them; speeds scale with the threads."""
    rows = []
    for i, pair in enumerate(("f16 head", "q6 head vs Q6_K")):
        ours, theirs = 50.0 * threads + i, 30.0 * threads + i
        rows.append({"pair": pair, "threads": threads, "ours_bytes": 1_184_000_000, "theirs_bytes": 1_186_000_000,
                     "their_types": {"counts": {"I2_S": 210, "F32": 61, "F16": 1}},
                     "ours_bytes_per_token": 1_180_000_000, "theirs_bytes_per_token": 1_185_000_000,
                     "ours_pp128": stat(ours), "theirs_pp128": stat(theirs), "pp128_ratio": ours / theirs,
                     "ours_tg64": stat(ours / 5), "theirs_tg64": stat(theirs / 5), "tg64_ratio": ours / theirs,
                     "ours_pct_of_ceiling": 90.0, "theirs_pct_of_ceiling": 55.0})
    return {"machine": {"cpu": "Test CPU", "logical_cpus": 16, "platform": "Linux", "bitnet_cli": "0",
                        "date": f"2026-12-02T0{threads % 10}:00", "load_average": load, "load_average_end": load + 1,
                        "cpu_busy_before": 0.01 * threads},
            "settings": {"threads": [threads], "rounds": rounds, "prompt": 128, "generate": 64},
            "runtime": "bitnet.cpp", "their_build": {"build_commit": "abc", "build_number": 1, "backends": "CPU",
                                                     "cpu_info": "Test CPU"},
            "bandwidth_gbps": {str(threads): stat(10.0 * threads)}, "rows": rows,
            "command": f"python benchmarks/compare_llamacpp.py --threads {threads}"}


def render(tmp_path, runs, *extra):
    paths = []
    for i, r in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(r))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, str(SCRIPT), "--render", *map(str, paths), "--out", str(out), *extra],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return done, out


def test_runs_at_other_thread_counts_merge_in_thread_order(tmp_path):
    done, out = render(tmp_path, [run(16, 9.5), run(2, 1.0)], "--plot", str(tmp_path / "out" / "s.png"))
    assert done.returncode == 0, done.stderr
    merged = json.loads((out / "compare_bitnetcpp.json").read_text())
    assert merged["settings"]["threads"] == [2, 16]
    assert [(r["pair"], r["threads"]) for r in merged["rows"]] == [
        ("f16 head", 2), ("f16 head", 16), ("q6 head vs Q6_K", 2), ("q6 head vs Q6_K", 16)]
    assert list(merged["bandwidth_gbps"]) == ["2", "16"]
    assert merged["machine"]["load_average"] == "9.5 / 1.0"  # per run, in run order
    assert merged["machine"]["cpu_busy_before"] == 0.16  # the busiest run's
    text = (out / "COMPARE_BITNETCPP.md").read_text()
    assert "compare_llamacpp.py --threads 16 ; python benchmarks/compare_llamacpp.py --threads 2`" in text
    assert "| f16 head | 2 | 100.0 (90.0-110.0) | 60.0 (54.0-66.0) | 1.67x" in text
    assert (out / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merging_the_same_thread_count_twice_is_an_error(tmp_path):
    done, out = render(tmp_path, [run(8, 1.0), run(8, 2.0)])
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: --render: two runs measured the same pair at the same thread count"]
    assert not (out / "COMPARE_BITNETCPP.md").exists()


def test_runs_of_other_rounds_do_not_merge(tmp_path):
    done, _ = render(tmp_path, [run(8, 1.0), run(2, 1.0, rounds=5)])
    assert done.returncode != 0 and "differ in runtime or rounds" in done.stderr


def test_unreadable_render_input_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    done = subprocess.run([sys.executable, str(SCRIPT), "--render", str(bad), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: --render")
