"""`bitnet bench`: byte accounting, kernel adapter exactness, sections, JSON schema, bad input.

Timings are checked only for being positive and self-consistent, never against a speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark
from typer.testing import CliRunner

from bitnet_cli.bench import anchors, kernels_api, micro, report, roofline, suite
from bitnet_cli.bench.shapes import bytes_per_token, padded_k, ternary_bytes, weight_shapes
from bitnet_cli.bench.stats import scale, summarize, time_call
from bitnet_cli.cli import app
from bitnet_cli.errors import BitnetError

CONFIG_2B4T = dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=30, num_attention_heads=20,
                   num_key_value_heads=5, vocab_size=128256, tie_word_embeddings=True)
TINY = dict(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=389, tie_word_embeddings=True)

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def small_buffers(monkeypatch):
    """Keep the cache-busting buffers small: tests check plumbing, not DRAM speed."""
    monkeypatch.setattr(micro, "COLD_BYTES", 1 << 20)
    monkeypatch.setattr(roofline, "BUFFER_BYTES", 8 << 20)


def unpack_codes(w: np.ndarray, k: int) -> np.ndarray:
    """Independent decoding of i2_k128 (docs/FORMAT.md) into trits [n, k]."""
    n, kp = w.shape[0], w.shape[1] * 4
    blocks = w.reshape(n, kp // 128, 1, 32)
    codes = (blocks >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    return codes.reshape(n, kp)[:, :k].astype(np.int32) - 1


# ---- byte accounting -------------------------------------------------------------------------

def test_2b4t_bytes_per_token_match_the_issue():
    shapes = weight_shapes(CONFIG_2B4T)
    assert sorted((s["n"], s["k"]) for s in shapes) == [(640, 2560), (2560, 2560), (2560, 6912), (6912, 2560)]
    assert sum(s["per_token"] for s in shapes) == 7 * 30  # seven projections in each of 30 layers
    params = sum(s["n"] * s["k"] * s["per_token"] for s in shapes)
    assert params == pytest.approx(2.084e9, rel=1e-3)
    f16, int8 = bytes_per_token(CONFIG_2B4T, "f16"), bytes_per_token(CONFIG_2B4T, "int8")
    assert f16["ternary"] == pytest.approx(521e6, rel=1e-3)   # 2 bits per weight
    assert f16["head"] == 128256 * 2560 * 2                    # 657 MB
    assert int8["head"] == 128256 * (2560 + 4)                 # 328 MB + one f32 scale per row
    for b in (f16, int8):
        assert b["total"] == b["ternary"] + b["head"] + b["embedding_row"] + b["norms"]


def test_ragged_shapes_pad_k_to_128():
    assert padded_k(200) == 256 and ternary_bytes(3, 200) == 3 * 64
    shapes = {(s["n"], s["k"]): s["projections"] for s in weight_shapes(TINY)}
    assert shapes[(96, 200)] == ["down_proj"] and shapes[(48, 96)] == ["k_proj", "v_proj"]


def test_random_ternary_has_only_valid_codes():
    w = micro.random_ternary(7, 200, np.random.default_rng(0))
    assert w.shape == (7, 64) and w.dtype == np.uint8
    trits = unpack_codes(w, 256)
    assert set(np.unique(trits)) == {-1, 0, 1}


def test_stats_summaries():
    s = summarize([3.0, 1.0, 2.0])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    r = scale(s, 6.0)
    assert r["min"] == 2.0 and r["median"] == 3.0 and r["max"] == 6.0
    calls = []
    t = time_call(lambda: calls.append(1), repeat=3, min_time=0.001)
    assert t["n"] == 3 and 0 < t["min"] <= t["median"] <= t["max"] and len(calls) > 3
    with pytest.raises(ValueError):
        summarize([])


# ---- the kernels as bench calls them -------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 2])
def test_ternary_matmul_is_exact(threads):
    rng = np.random.default_rng(1)
    n, k, m = 70, 300, 5
    w = micro.random_ternary(n, k, rng)
    x = rng.standard_normal((m, k), dtype=np.float32)
    acc = kernels_api.TernaryMatmul(n, k, m, threads)(w, x)
    s = np.float32(127) / np.maximum(np.abs(x).max(axis=1, keepdims=True), np.float32(1e-5))
    xq = np.clip(np.round(x * s), -128, 127).astype(np.int32)
    np.testing.assert_array_equal(acc, xq @ unpack_codes(w, k).T)


def test_stream_read_sums_the_buffer():
    buf = np.arange(1 << 16, dtype=np.uint64)
    assert kernels_api.StreamRead(buf.view(np.uint8), 2)() == int(buf.sum())


def test_kernel_input_errors():
    with pytest.raises(BitnetError, match="got 0"):
        kernels_api.pool(0)
    with pytest.raises(BitnetError, match="unknown instruction set"):
        kernels_api.TernaryMatmul(8, 128, 1, 1, isa="sse9")
    op = kernels_api.TernaryMatmul(8, 128, 1, 1)
    with pytest.raises(ValueError, match="weight"):
        op(np.zeros((8, 31), np.uint8), np.zeros((1, 128), np.float32))


# ---- sections ------------------------------------------------------------------------------------

def test_kernel_section_is_consistent(small_buffers):
    rows = micro.run(TINY, threads=[1, 2], repeat=2, tokens=(1, 8))
    assert len(rows) == len(weight_shapes(TINY)) * 2 * 2 * len(micro.IMPLS)
    for r in rows:
        assert 0 < r["seconds"]["min"] <= r["seconds"]["median"] <= r["seconds"]["max"]
        assert r["gbps"]["median"] == pytest.approx(r["weight_bytes"] / 1e9 / r["seconds"]["median"])
        assert r["gops"]["median"] == pytest.approx(2 * r["n"] * r["k"] * r["tokens"] / 1e9 / r["seconds"]["median"])
        expected = {"ternary": ternary_bytes(r["n"], r["k"]), "int8": r["n"] * r["k"] + 4 * r["n"],
                    "f32": r["n"] * r["k"] * 4}[r["impl"]]
        assert r["weight_bytes"] == expected


def test_dense_int8_reference_is_exact():
    rng = np.random.default_rng(3)
    n, k, tokens = 37, 300, 5
    w = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    x = rng.standard_normal((tokens, k), dtype=np.float32)
    got = kernels_api.DenseInt8Matmul(n, k, tokens, threads=2)(w, x)
    s = np.float32(127) / np.abs(x).max(axis=1)
    xq = np.round(x * s[:, None]).astype(np.int64)
    np.testing.assert_array_equal(got, (xq @ w.T.astype(np.int64)).astype(np.float32) / s[:, None])


def test_roofline_section_is_consistent(small_buffers):
    per_token = bytes_per_token(TINY)
    rows = roofline.run(per_token, threads=[1, 2], repeat=2)
    for r in rows:
        bw = r["bandwidth_gbps"]
        assert 0 < bw["min"] <= bw["median"] <= bw["max"]
        assert r["decode_ceiling_tps"]["median"] == pytest.approx(bw["median"] * 1e9 / per_token["total"])


# ---- command-line input handling -------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "--threads: 0 is out of range"),
    (["--threads", "-2"], "--threads: -2 is out of range"),
    (["--threads", "1,two"], "'two' is not a whole number"),
    (["--repeat", "0"], "--repeat must be at least 1"),
    (["--generate", "0"], "--generate must be at least 1"),
    (["--prompts", "128,0"], "--prompts: 0 is out of range"),
    (["--what", "kernels,speed"], "--what: unknown section speed"),
    (["--model", "x.bin", "--shape", "2b4t"], "either --model or --shape"),
    (["--shape", "7b"], "unknown shape '7b'"),
    (["--model", "no/such/file.bin"], "no/such/file.bin: no such file"),
    (["--isa", "sse9"], "unknown instruction set 'sse9' (--isa)"),  # named $BITNET_ISA, which was not set
    (["--kv-cache", "q8"], "--kv-cache must be one of f32, f16, got 'q8'"),
    (["--layout", "i2,i3"], "--layout must be one of i2, tq1, got 'i3'"),
    (["--model", "x.bin", "--layout", "tq1"], "--layout is for synthetic --shape models"),
])
def test_bad_input_is_one_clear_line(args, message):
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())  # rich wraps long lines
    assert "Traceback" not in result.output


def test_an_isa_this_cpu_lacks_is_named_by_where_it_came_from(monkeypatch):
    """Like an unknown one: `--isa neon` on x86 named neither --isa nor $BITNET_ISA."""
    from bitnet_cli import kernels

    missing = next(isa for isa in kernels.ISAS if isa not in kernels.available_isas())  # neon on x86, avx2 on ARM
    monkeypatch.delenv("BITNET_ISA", raising=False)
    result = runner.invoke(app, ["bench", "--isa", missing, "--what", "kernels"])
    assert f"instruction set {missing!r} (--isa) is not available" in " ".join(result.output.split())
    monkeypatch.setenv("BITNET_ISA", missing)
    with pytest.raises(BitnetError, match=rf"'{missing}' \(\$BITNET_ISA\) is not available"):
        kernels.resolve_isa(None)


def test_parse_int_list_dedupes_in_order():
    assert suite.parse_int_list("2, 1,2,4", "--threads") == [2, 1, 4]
    assert suite.parse_sections("e2e,roofline") == ["roofline", "e2e"]


# ---- the whole command on a tiny synthetic model -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from bitnet_cli.bench import target

    t = target.from_shape("tiny", "f16", tmp_path_factory.mktemp("synthetic"))
    return t.ensure_file()


def _positive_numbers(obj, path="results"):
    """Every number anywhere in the results is finite and > 0 (times, rates, sizes, counts)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(v, bool):
                _positive_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _positive_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)):
        assert np.isfinite(obj) and obj > 0, f"{path} = {obj}"


def _check_stat(s):
    assert set(s) == {"median", "min", "max", "n"} and s["min"] <= s["median"] <= s["max"]


@pytest.fixture(scope="module")
def tiny_results(tiny_model, tmp_path_factory):
    """`bitnet bench --json --plot` on the tiny model, every section, two thread counts."""
    out = tmp_path_factory.mktemp("bench_out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(micro, "COLD_BYTES", 1 << 20)
        mp.setattr(roofline, "BUFFER_BYTES", 8 << 20)
        result = runner.invoke(app, ["bench", "--model", str(tiny_model), "--threads", "1,2", "--repeat", "2",
                                     "--prompts", "8,32", "--generate", "8", "--tokens", "1,4", "--json",
                                     "--plot", str(out / "bench.png")])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def test_json_output_schema_and_consistency(tiny_results, tiny_model):
    res, out = tiny_results
    assert res["schema"] == suite.SCHEMA
    assert set(res) == {"schema", "machine", "model", "settings", "roofline", "kernels", "e2e", "summary"}
    assert res["settings"]["threads"] == [1, 2] and res["settings"]["repeat"] == 2
    assert res["model"]["file_bytes"] == tiny_model.stat().st_size
    per_token = res["model"]["bytes_per_token"]
    # the tied f16 head is read in full each token: vocab x hidden x 2 bytes
    assert per_token["head"] == 512 * 128 * 2
    _positive_numbers({k: v for k, v in res.items() if k not in ("machine", "settings")})

    assert [r["threads"] for r in res["e2e"]] == [1, 2]
    for r in res["e2e"]:
        assert set(r["tokens_per_s"]) == {"pp8", "pp32", "tg8"}
        for s in [r["load_s"], *r["tokens_per_s"].values()]:
            _check_stat(s)
            assert s["n"] == 2
        assert r["peak_rss_bytes"] > 0
    for r in res["roofline"]:
        _check_stat(r["bandwidth_gbps"])
        assert r["bytes_per_token"] == per_token["total"]
    decode = res["summary"]["decode_vs_roofline"]
    for d, e, roof in zip(decode, res["e2e"], res["roofline"]):
        assert d["tg_tps"] == e["tokens_per_s"]["tg8"]["median"]
        assert d["pct_of_ceiling"] == pytest.approx(100 * d["tg_tps"] / roof["decode_ceiling_tps"]["median"])
    assert res["summary"]["anchors"] is None  # anchors belong to the 2b4t shape only
    split = {(r["threads"], r["test"]): r for r in res["summary"]["time_per_token"]}
    assert set(split) == {(t, name) for t in (1, 2) for name in ("tg8",)}  # pp8/pp32 have no 8/32-token kernels
    for e in res["e2e"]:
        r = split[(e["threads"], "tg8")]
        assert r["total_ms"] == pytest.approx(1e3 / e["tokens_per_s"]["tg8"]["median"])
        gemvs = [k for k in res["kernels"] if k["impl"] == "ternary" and k["tokens"] == 1 and k["threads"] == e["threads"]]
        assert r["ternary_ms"] == pytest.approx(1e3 * sum(k["seconds"]["median"] * k["per_token"] for k in gemvs))
    gemv = [r for r in res["kernels"] if r["tokens"] == 1]
    assert gemv and all("pct_of_bandwidth" in r for r in gemv)
    # G MAC/s, and its share of the ISA's measured integer MAC peak times the threads
    peaks = res["machine"]["mac_peak_gmacs"]
    ternary = [r for r in res["kernels"] if r["impl"] == "ternary"]
    assert set(peaks) == {r["backend"] for r in ternary} and all(p > 0 for p in peaks.values())
    for r in ternary:
        assert r["gmacs"]["median"] == pytest.approx(r["n"] * r["k"] * r["tokens"] / 1e9 / r["seconds"]["median"])
        assert r["pct_of_peak"] == pytest.approx(100 * r["gmacs"]["median"] / (peaks[r["backend"]] * r["threads"]))
    assert res["settings"]["isa"]["source"] in ("env", "rule", "cache", "autotune", "busy")
    assert set(res["settings"]["isa"]["choice"]) == {"i2", "tq1"}
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.iterdir()] == ["bench.png"]  # no temp files left behind


def test_benchmarks_markdown_states_machine_command_and_numbers(tiny_results):
    module = load_benchmark("run")
    res, _ = tiny_results
    text = module.markdown(res, "python benchmarks/run.py --shape tiny", "bench.png")
    assert "`python benchmarks/run.py --shape tiny`" in text and res["machine"]["cpu"] in text
    tg = res["e2e"][1]["tokens_per_s"]["tg8"]
    assert f"{tg['median']:.1f} ({tg['min']:.1f}-{tg['max']:.1f})" in text
    assert "## Decode roofline" in text and "## Kernels per weight shape" in text and "bench.png" in text


def test_table_output_and_sections(tiny_model):
    result = runner.invoke(app, ["bench", "--model", str(tiny_model), "--what", "e2e", "--threads", "1",
                                 "--repeat", "1", "--prompts", "16", "--generate", "4"])
    assert result.exit_code == 0, result.output
    assert "End to end" in result.output and "pp16" in result.output and "tg4" in result.output
    assert "Kernels" not in result.output and "roofline" not in result.output


def test_anchor_comparison_for_the_2b4t_shape(tiny_model):
    rows = suite.e2e.run(tiny_model, [1, 2], repeat=1, prompts=(128,), generate=4)
    results = {"settings": {"generate": 4}, "e2e": rows}
    summary = suite.summarize(results, "2b4t")
    comparison = summary["anchors"]
    assert comparison["date"] == anchors.DATE and comparison["rows"]
    for r in comparison["rows"]:
        ours = next(e for e in rows if e["threads"] == r["threads"])["tokens_per_s"]
        if "pp128_ratio" in r:
            assert r["pp128_ratio"] == pytest.approx(ours["pp128"]["median"] / r["anchor_pp128"])
        assert r["tg_ratio"] == pytest.approx(ours["tg4"]["median"] / r["anchor_tg64"])
    tq2 = [r for r in comparison["rows"] if r["weights"].startswith("TQ2_0") and r["head"] == "Q6_K"]
    assert [(r["threads"], r["anchor_tg64"]) for r in tq2] == [(1, 14.0), (2, 22.7)]
    assert suite.summarize(results, "700m")["anchors"] is None


def _fake_program(path: Path, body: str) -> str:
    """An executable Python script standing in for another runtime's program."""
    import sys

    path.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_llama_bench_output_is_read_and_its_failures_are_one_line(tmp_path):
    rows = [{"n_prompt": 128, "n_gen": 0, "avg_ts": 50.5, "build_commit": "abc", "build_number": 1,
             "cpu_info": "cpu", "backends": "CPU"}, {"n_prompt": 0, "n_gen": 64, "avg_ts": 20.0}]
    bench = _fake_program(tmp_path / "llama-bench", f"print({json.dumps(json.dumps(rows))})")
    got = anchors.llama_bench_once(bench, tmp_path / "m.gguf", 2)
    assert got == {"rates": {"pp128": 50.5, "tg64": 20.0},
                   "build": {"build_commit": "abc", "build_number": 1, "cpu_info": "cpu", "backends": "CPU"}}
    failing = _fake_program(tmp_path / "failing",
                            "print('loading', file=sys.stderr); print('bad model', file=sys.stderr); sys.exit(3)")
    with pytest.raises(BitnetError, match=r"failed \(exit code 3\): bad model$"):
        anchors.llama_bench_once(failing, tmp_path / "m.gguf", 2)
    with pytest.raises(BitnetError, match="not llama-bench's JSON"):
        anchors.llama_bench_once(_fake_program(tmp_path / "chatty", "print('hello')"), tmp_path / "m.gguf", 2)


def test_a_quantizer_that_fails_leaves_no_file(tmp_path):
    writer = _fake_program(tmp_path / "quantize", "open(sys.argv[1], 'w').write('half'); sys.exit(int(sys.argv[2]))")
    out = tmp_path / "m.gguf"
    with pytest.raises(BitnetError, match="exit code 1"):
        anchors.write_with_tool(out, lambda tmp: [writer, str(tmp), "1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantize"]
    assert anchors.write_with_tool(out, lambda tmp: [writer, str(tmp), "0"]) == out and out.read_text() == "half"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "quantize"]


def test_synthetic_models_are_cached(tmp_path, monkeypatch):
    from bitnet_cli.bench import target
    from bitnet_cli.pack import synthetic
    from bitnet_cli.pack.format import FORMAT_VERSION

    t = target.from_shape("tiny", "int8", tmp_path)
    assert t.path.parent == tmp_path and t.path.name.startswith(f"tiny-int8-v{FORMAT_VERSION}-") and not t.path.exists()
    path = t.ensure_file()
    stamp = path.stat().st_mtime_ns

    def must_not_write(*args, **kwargs):
        raise AssertionError("a cached synthetic model was written again")

    monkeypatch.setattr(synthetic, "write_random_model", must_not_write)
    assert target.from_shape("tiny", "int8", tmp_path).ensure_file() == path
    assert path.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_tq1_layout_synthetic_model_and_kernel_table(tmp_path, small_buffers):
    """--layout tq1: its own cache file (i2 keeps the old names), a synthetic model of valid tq1_k640
    rows that runs, 20% fewer ternary bytes per token, and the kernel table on tq1 weights."""
    from bitnet_cli.bench import target
    from bitnet_cli.engine import Engine
    from bitnet_cli.pack import PackedModel
    from bitnet_cli.pack.synthetic import shape_config

    two_b = shape_config("2b4t")
    i2, tq1 = bytes_per_token(two_b), bytes_per_token(two_b, "f16", "tq1")
    assert tq1["head"] == i2["head"] and 0.79 < tq1["ternary"] / i2["ternary"] < 0.81
    shape = {**TINY, "hidden_size": 640, "intermediate_size": 704}  # whole 640-blocks and an i2_k128 end
    path = tmp_path / "tq1.bin"
    from bitnet_cli.pack.synthetic import write_random_model

    write_random_model(path, shape, ternary_layout="tq1")
    with PackedModel.open(path) as pm:
        assert pm.layout == "tq1_k640" and pm.verify() == []
        trits, _ = pm.ternary("model.layers.0.mlp.down_proj.weight")
        assert set(np.unique(trits)) == {-1, 0, 1}
    with Engine.load(path, threads=1) as eng:
        assert np.isfinite(eng.forward([1, 2, 3])).all()
    t = target.from_shape("tiny", "f16", tmp_path, ternary_layout="tq1")
    assert t.layout == "tq1" and "-tq1-" in t.path.name and t.path != target.from_shape("tiny", "f16", tmp_path).path
    rows = micro.run(TINY, threads=[1], repeat=1, tokens=(1, 8), impls=("ternary",), ternary_layout="tq1")
    assert [r["weight_bytes"] for r in rows] == [ternary_bytes(r["n"], r["k"], "tq1") for r in rows]


def test_synthetic_cache_name_follows_the_config(tmp_path, monkeypatch):
    """A preset whose numbers change gets a new cache file, never a stale model of the old shape."""
    from bitnet_cli import arch
    from bitnet_cli.bench import target

    before = target.from_shape("tiny", "f16", tmp_path).path
    changed = arch.Preset("test", dict(arch.PRESETS["tiny"].fields, num_hidden_layers=1))
    monkeypatch.setitem(arch.PRESETS, "tiny", changed)
    assert target.from_shape("tiny", "f16", tmp_path).path != before


def test_engine_failure_is_a_clear_error(tmp_path):
    bad = tmp_path / "garbage.bin"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(BitnetError, match="garbage.bin"):
        suite.e2e.run(bad, [1], repeat=1, prompts=(8,), generate=2)


def test_forced_isa_reaches_the_kernels(tiny_model, small_buffers, monkeypatch):
    monkeypatch.setenv("BITNET_ISA", "avx2")  # restored after the test; the command overrides it
    result = runner.invoke(app, ["bench", "--model", str(tiny_model), "--what", "kernels", "--isa", "scalar",
                                 "--threads", "1", "--tokens", "1", "--repeat", "1", "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert {r["backend"] for r in res["kernels"] if r["impl"] == "ternary"} == {"scalar"}
    assert res["settings"]["isa"]["source"] == "option" and set(res["machine"]["mac_peak_gmacs"]) == {"scalar"}


def test_the_kv_cache_option_reaches_the_e2e_engine(tiny_model):
    result = runner.invoke(app, ["bench", "--model", str(tiny_model), "--what", "e2e", "--kv-cache", "f16",
                                 "--threads", "1", "--prompts", "8", "--generate", "2", "--repeat", "1", "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["settings"]["kv_cache"] == "f16" and res["e2e"][0]["tokens_per_s"]["tg2"]["median"] > 0
    from bitnet_cli.bench import report
    from rich.console import Console

    console = Console(record=True, width=200)
    report.print_report(res, console)
    assert "KV cache: f16" in console.export_text()


def test_kernel_table_reports_the_share_of_the_mac_peak(tiny_model, small_buffers, monkeypatch):
    monkeypatch.setenv("BITNET_ISA", "scalar")
    result = runner.invoke(app, ["bench", "--model", str(tiny_model), "--what", "kernels", "--threads", "1",
                                 "--tokens", "1", "--repeat", "1"])
    assert result.exit_code == 0, result.output
    assert "GMAC/s" in result.output and "% pk" in result.output and "MAC peak" in result.output
    assert "instruction set: scalar, chosen by $BITNET_ISA" in " ".join(result.output.split())


def test_unwritable_cache_and_plot_paths_are_clear_errors(tiny_model, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = runner.invoke(app, ["bench", "--shape", "tiny", "--what", "e2e", "--cache-dir", str(blocker / "cache")])
    assert result.exit_code != 0 and "cannot create the synthetic model cache" in " ".join(result.output.split())
    result = runner.invoke(app, ["bench", "--model", str(tiny_model), "--what", "e2e", "--threads", "1",
                                 "--repeat", "1", "--prompts", "4", "--generate", "2",
                                 "--plot", str(tmp_path / "missing" / "bench.png")])
    message = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code != 0 and "error: --plot: directory" in message and "missing does not exist" in message
    assert "Traceback" not in message
    # a directory or an existing file in the plot's place: refused before the benchmark, not after it
    existing = tmp_path / "old.png"
    existing.write_bytes(b"keep")
    for plot, expected in ((tmp_path, "is a directory"), (existing, "already exists (use --force to overwrite)")):
        result = runner.invoke(app, ["bench", "--model", str(tiny_model), "--what", "e2e", "--plot", str(plot)])
        message = " ".join(result.output.split())
        assert result.exit_code == 1 and f"error: --plot: {plot}: {expected}" in message, message
        assert "End to end" not in message  # nothing was measured
    assert existing.read_bytes() == b"keep"


def test_bench_never_imports_torch(tiny_model):
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from bitnet_cli.cli import app; "
            f"r = CliRunner().invoke(app, ['bench', '--model', {str(tiny_model)!r}, '--threads', '1', '--repeat', '1', "
            "'--what', 'kernels,e2e', '--tokens', '1', '--prompts', '4', '--generate', '2', '--json']); "
            "assert r.exit_code == 0, r.output; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_e2e_lengths_are_cut_to_the_model_context_and_said(tiny_model, tmp_path):
    """Lengths beyond the model's context (as pp512 is for a 128-position model): cut, and a note says so."""
    from bitnet_cli.pack import PackedModel

    with PackedModel.open(tiny_model) as pm:
        ctx = pm.dims.max_position_embeddings
    args = ["bench", "--model", str(tiny_model), "--what", "e2e", "--threads", "1", "--repeat", "1",
            "--prompts", f"8,{2 * ctx}", "--generate", str(ctx + 1)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert set(res["e2e"][0]["tokens_per_s"]) == {"pp8", f"pp{ctx}", f"tg{ctx}"}
    assert res["settings"]["clipped"] == [f"pp{2 * ctx} -> pp{ctx}", f"tg{ctx + 1} -> tg{ctx}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and f"pp{2 * ctx} -> pp{ctx}" in result.output


def test_bench_model_directory(tiny_model, tmp_path):
    """`--model runs/quickstart` finds the model.bin in it; a directory without one is explained."""
    (tmp_path / "model.bin").symlink_to(tiny_model)
    result = runner.invoke(app, ["bench", "--model", str(tmp_path), "--what", "e2e", "--threads", "1",
                                 "--repeat", "1", "--prompts", "8", "--generate", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["path"] == str(tmp_path / "model.bin")
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["bench", "--model", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "is a directory" in result.output and "bitnet pack" in result.output


def test_time_breakdown_is_never_over_100_percent():
    e2e = [{"threads": 1, "tokens_per_s": {"tg8": {"median": 100.0}}}]  # 10 ms per token
    kernels = [{"impl": "ternary", "threads": 1, "tokens": 1, "per_token": 4, "seconds": {"median": s}}
               for s in (1e-3, 3e-3)]  # 16 ms of kernels: more than the whole token
    rows = suite.time_per_token({"e2e": e2e, "kernels": kernels})
    assert rows[0]["ternary_ms"] == pytest.approx(16) and "ternary_pct" not in rows[0] and "rest_ms" not in rows[0]
    kernels[1]["seconds"]["median"] = 1e-4  # 4.4 ms
    row = suite.time_per_token({"e2e": e2e, "kernels": kernels})[0]
    assert row["ternary_pct"] == pytest.approx(44) and row["rest_ms"] == pytest.approx(5.6)
    from rich.console import Console

    console = Console(width=200, record=True)
    report._time_per_token(rows, console)
    assert "n/a" in console.export_text() and "160%" not in console.export_text()


def test_two_layouts_in_one_run_are_compared(tmp_path, small_buffers):
    """--layout i2,tq1: the second layout's ternary kernels and e2e under "layouts", its ceiling from
    the bandwidth measured once, and both side by side in the summary and the tables."""
    args = ["bench", "--shape", "tiny", "--layout", "i2,tq1", "--threads", "1", "--repeat", "1", "--tokens", "1",
            "--prompts", "8", "--generate", "2", "--cache-dir", str(tmp_path)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["model"]["layout"] == "i2" and set(res["layouts"]) == {"tq1"}
    tq1 = res["layouts"]["tq1"]
    assert tq1["model"]["layout"] == "tq1" and "-tq1-" in tq1["model"]["path"]
    assert {r["impl"] for r in tq1["kernels"]} == {"ternary"}
    assert [r["weight_bytes"] for r in tq1["kernels"]] == [ternary_bytes(r["n"], r["k"], "tq1") for r in tq1["kernels"]]
    assert [r["bandwidth_gbps"] for r in tq1["roofline"]] == [r["bandwidth_gbps"] for r in res["roofline"]]
    assert tq1["roofline"][0]["bytes_per_token"] == tq1["model"]["bytes_per_token"]["total"]
    compared = res["summary"]["layouts"]
    assert compared["layouts"] == ["i2", "tq1"]
    assert [(r["threads"], r["layout"]) for r in compared["e2e"]] == [(1, "i2"), (1, "tq1")]
    assert compared["e2e"][1]["tokens_per_s"]["tg2"] == tq1["e2e"][0]["tokens_per_s"]["tg2"]["median"]
    assert compared["kernels"] and all(set(g["seconds"]) == {"i2", "tq1"} for g in compared["kernels"])
    table = runner.invoke(app, args)  # the cached synthetic models are reused
    assert table.exit_code == 0, table.output
    assert "Ternary layouts end to end" in table.output and "tq1 us" in table.output
