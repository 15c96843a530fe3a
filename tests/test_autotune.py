"""The ISA choice: the integer MAC peak probe, the tuned dispatch path (GEMV and GEMM on different
ISAs, bit-identical to the scalar reference), and the autotune's cache, overrides and failures.

No test asserts a speed: measurements are checked for being positive and finite, and the
choosing logic is fed chosen timings through `measure_isas`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bitnet_cli import kernels
from bitnet_cli.bench import micro
from bitnet_cli.errors import BitnetError


def test_mac_peak_is_positive_and_finite_for_every_available_isa():
    _, L = kernels.lib()
    for isa in kernels.available_isas():
        peak = kernels.mac_peak(isa)
        assert math.isfinite(peak) and peak > 0, isa
    assert L.bn_mac_peak(99, 1000) == -1 and L.bn_mac_peak(kernels.ISAS["scalar"], 0) == -1
    with pytest.raises(BitnetError, match="unknown instruction set"):
        kernels.mac_peak("sse9")


@pytest.fixture
def fresh_choice(tmp_path, monkeypatch):
    """A process's first ISA choice, with the cache in tmp_path and a small, quick race between
    the scalar reference and the best ISA; afterwards the tuned C path is the rule's again."""
    monkeypatch.setenv("BITNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BITNET_ISA", raising=False)
    monkeypatch.delenv(kernels.AUTOTUNE_ENV, raising=False)
    monkeypatch.setattr(kernels, "_choices", {})
    monkeypatch.setattr(kernels, "_applied", {})
    monkeypatch.setattr(kernels, "TUNE_SHAPE", (64, 1280))
    monkeypatch.setattr(kernels, "TUNE_COLD_BYTES", (1 << 20, 1 << 20))
    monkeypatch.setattr(kernels, "TUNE_ROUNDS", 2)
    monkeypatch.setattr(kernels, "TUNE_SAMPLE_S", 0.0005)
    monkeypatch.setattr(kernels, "TUNE_QUIET", math.inf)  # CI's load must not turn the race down here
    candidates = sorted({"scalar", kernels.best_isa()}, key=list(kernels.ISAS).index)
    monkeypatch.setattr(kernels, "tune_candidates", lambda: candidates)
    calls = []
    measure = kernels.measure_isas

    def counted(cands):
        calls.append(list(cands))
        return measure(cands)

    monkeypatch.setattr(kernels, "measure_isas", counted)
    yield calls
    _, L = kernels.lib()
    best = kernels.ISAS[kernels.best_isa()]
    for layout_id in kernels._layouts().values():
        L.bn_isa_tune(layout_id, best, best)


def forget_choice(monkeypatch):
    """As if in a new process: no choice made yet."""
    monkeypatch.setattr(kernels, "_choices", {})


def cache_files(tmp_path):
    return sorted((tmp_path / "cache" / "autotune").glob("*.json"))


def test_first_use_measures_and_caches_then_the_cache_is_read(fresh_choice, tmp_path, monkeypatch):
    isa = kernels.resolve_isa()
    choice = kernels.isa_choice()
    assert choice["source"] == "autotune" and len(fresh_choice) == 1
    assert set(choice["choice"]) == {"i2", "tq1"}
    for layout, ops in choice["seconds"].items():
        for op, times in ops.items():
            assert set(times) == set(fresh_choice[0]) and all(math.isfinite(t) and t > 0 for t in times.values())
            assert choice["choice"][layout][op] in times
    [path] = cache_files(tmp_path)
    record = json.loads(path.read_text())
    assert record["key"]["cpu"] == kernels.cpu_model() and record["choice"] == choice["choice"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert kernels.resolve_isa() == isa and len(fresh_choice) == 1  # once per process

    forget_choice(monkeypatch)
    assert kernels.resolve_isa() == isa
    again = kernels.isa_choice()
    assert again["source"] == "cache" and again["choice"] == choice["choice"] and len(fresh_choice) == 1


@pytest.mark.parametrize("damage", ["not json", "foreign key", "unknown isa", "wrong type"])
def test_a_corrupt_or_foreign_cache_file_is_measured_over(fresh_choice, tmp_path, monkeypatch, damage):
    kernels.resolve_isa()
    [path] = cache_files(tmp_path)
    record = json.loads(path.read_text())
    if damage == "not json":
        path.write_bytes(b"\x00\xff{[garbage")
    elif damage == "foreign key":
        path.write_text(json.dumps(record | {"key": record["key"] | {"cpu": "another CPU"}}))
    elif damage == "unknown isa":
        record["choice"]["i2"]["gemv"] = "sse9"
        path.write_text(json.dumps(record))
    else:
        path.write_text(json.dumps([1, 2, 3]))
    forget_choice(monkeypatch)
    kernels.resolve_isa()
    assert kernels.isa_choice()["source"] == "autotune" and len(fresh_choice) == 2
    assert json.loads(path.read_text())["key"] == record["key"]  # rewritten, valid again


def test_bitnet_isa_and_the_option_win_and_measure_nothing(fresh_choice, tmp_path, monkeypatch):
    monkeypatch.setenv("BITNET_ISA", "scalar")
    assert kernels.resolve_isa() == kernels.ISAS["scalar"]
    assert kernels.isa_choice() == {"source": "env", "choice": {"i2": {"gemv": "scalar", "gemm": "scalar"},
                                                                "tq1": {"gemv": "scalar", "gemm": "scalar"}}}
    best = kernels.best_isa()
    assert kernels.resolve_isa(best) == kernels.ISAS[best] and kernels.isa_choice(best)["source"] == "option"
    assert fresh_choice == [] and cache_files(tmp_path) == []


def test_autotune_off_uses_the_rule(fresh_choice, tmp_path, monkeypatch):
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "0")
    assert kernels.resolve_isa() == kernels.ISAS[kernels.best_isa()]
    assert kernels.isa_choice()["source"] == "rule" and fresh_choice == [] and cache_files(tmp_path) == []
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "maybe")
    with pytest.raises(BitnetError, match="must be 0 .off. or 1"):
        kernels.resolve_isa()


def test_one_candidate_needs_no_race(fresh_choice, monkeypatch):
    monkeypatch.setattr(kernels, "tune_candidates", lambda: ["scalar"])
    assert kernels.isa_choice()["source"] == "rule" and fresh_choice == []


def test_an_unwritable_cache_is_a_note_not_an_error(fresh_choice, tmp_path, monkeypatch, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("BITNET_CACHE", str(blocker))  # a file where the directory would be
    kernels.resolve_isa()
    assert kernels.isa_choice()["source"] == "autotune" and "could not be cached" in capfd.readouterr().err


def timings(gemv: dict, gemm: dict) -> dict:
    """Fake autotune samples, {layout: {"gemv": gemv, "gemm": gemm}}, seconds per ISA: a list of
    samples, or one number for a single sample."""
    def samples(times: dict) -> dict:
        return {isa: t if isinstance(t, list) else [t] for isa, t in times.items()}

    return {layout: {"gemv": samples(gemv), "gemm": samples(gemm)} for layout in ("i2", "tq1")}


def simd_best() -> str:
    """The rule's ISA, skipping the test on a CPU without a SIMD path to race against scalar."""
    best = kernels.best_isa()
    if best == "scalar":
        pytest.skip("no SIMD path on this CPU")
    return best


def test_split_choice_runs_gemv_and_gemm_on_their_own_isas_with_the_same_bits(fresh_choice, monkeypatch, tmp_path):
    """Timings where the scalar GEMV and the SIMD GEMM win: BN_ISA_TUNED runs them side by side,
    and every product equals the scalar reference."""
    best = simd_best()
    fake = timings(gemv={"scalar": 1.0, best: 2.0}, gemm={"scalar": 2.0, best: 1.0})
    monkeypatch.setattr(kernels, "measure_isas", lambda cands: fake)
    _, L = kernels.lib()
    isa = kernels.resolve_isa()
    assert isa == L.BN_ISA_TUNED
    assert kernels.isa_name(isa, "i2") == f"scalar/{best}"
    assert kernels.isa_name(isa, "tq1", 1) == "scalar" and kernels.isa_name(isa, "tq1", 8) == best
    rng = np.random.default_rng(5)
    n, k = 37, 700
    for layout in ("i2", "tq1"):
        w = micro.random_ternary(n, k, rng, layout)
        for m in (1, 8):
            xq, _, xsum = kernels.quantize(rng.standard_normal((m, k), dtype=np.float32), isa="scalar")
            want = kernels.gemm(w, xq, xsum, isa="scalar", layout=layout)
            np.testing.assert_array_equal(kernels.gemm(w, xq, xsum, layout=layout), want)
    # one ISA other than the rule's winning everything still runs on the tuned path (the rule's head)
    forget_choice(monkeypatch)
    for path in cache_files(tmp_path):
        path.unlink()
    slow_best = timings(gemv={"scalar": 1.0, best: 2.0}, gemm={"scalar": 1.0, best: 2.0})
    monkeypatch.setattr(kernels, "measure_isas", lambda cands: slow_best)
    assert kernels.resolve_isa() == L.BN_ISA_TUNED and kernels.isa_name(L.BN_ISA_TUNED, "i2") == "scalar"
    # a margin: the rule's ISA stays unless another is clearly faster
    near = timings(gemv={"scalar": 0.99, best: 1.0}, gemm={"scalar": 0.99, best: 1.0})
    assert kernels._fastest(kernels._fastest_samples(near)[0]) == {layout: {"gemv": best, "gemm": best}
                                                                   for layout in ("i2", "tq1")}


def test_each_candidate_is_timed_by_its_fastest_sample(fresh_choice, monkeypatch):
    """Load only adds time, so a candidate's fastest sample is its speed: here its median would
    lose to scalar's, its fastest wins."""
    best = simd_best()
    monkeypatch.setattr(kernels, "TUNE_QUIET", 1.5)
    fake = timings(gemv={"scalar": [1.0, 1.0, 1.0], best: [0.9, 1.2, 1.2]},
                   gemm={"scalar": [1.0, 1.0, 1.0], best: [1.2, 0.9, 1.2]})
    monkeypatch.setattr(kernels, "measure_isas", lambda cands: fake)
    choice = kernels.isa_choice()
    assert choice["source"] == "autotune" and choice["spread"] == pytest.approx(1.2 / 0.9)
    assert choice["choice"] == kernels._uniform(best)
    assert choice["seconds"]["i2"] == {"gemv": {"scalar": 1.0, best: 0.9}, "gemm": {"scalar": 1.0, best: 0.9}}


def test_a_race_that_met_other_load_runs_the_rule_and_is_not_cached(fresh_choice, tmp_path, monkeypatch):
    """Samples spread past TUNE_QUIET: the rule runs, nothing is cached, and the next process
    measures again; a quiet race then is cached. (A busy machine had cached a GEMM 1.6x slower.)"""
    best = simd_best()
    monkeypatch.setattr(kernels, "TUNE_QUIET", 1.5)
    races = iter([timings(gemv={"scalar": [0.1, 5.0, 5.0], best: [1.0, 1.0, 1.0]}, gemm={"scalar": 0.1, best: 1.0}),
                  timings(gemv={"scalar": 2.0, best: 1.0}, gemm={"scalar": 2.0, best: [1.0, 1.1, 1.2]})])
    monkeypatch.setattr(kernels, "measure_isas", lambda cands: next(races))
    busy = kernels.isa_choice()
    assert busy["source"] == "busy" and busy["spread"] == 50.0 and busy["choice"] == kernels._uniform(best)
    assert kernels.resolve_isa() == kernels.ISAS[best] and cache_files(tmp_path) == []
    forget_choice(monkeypatch)
    quiet = kernels.isa_choice()
    assert quiet["source"] == "autotune" and quiet["choice"] == kernels._uniform(best)
    [path] = cache_files(tmp_path)
    assert json.loads(path.read_text())["spread"] == pytest.approx(1.1)
    from bitnet_cli.bench.report import isa_summary

    assert isa_summary(busy, "i2") == f"{best}, chosen by the rule (the autotune met other load; the next run " \
                                      "measures again)"


def test_the_engine_on_a_split_choice_gives_the_same_logits(fresh_choice, monkeypatch, tmp_path):
    """GEMV on the best ISA, GEMM on the scalar one: the logits of the best ISA alone, bit for bit
    (the tuned path keeps the best ISA's head, whose float summation order is its own)."""
    best = simd_best()
    from bitnet_cli.bench import target
    from bitnet_cli.engine import Engine

    fake = timings(gemv={"scalar": 2.0, best: 1.0}, gemm={"scalar": 1.0, best: 2.0})
    monkeypatch.setattr(kernels, "measure_isas", lambda cands: fake)
    path = target.from_shape("tiny", "f16", tmp_path / "synthetic").ensure_file()
    ids = [5, 17, 99, 3, 250, 42]
    with Engine.load(path, threads=2, isa=best) as eng:
        want = eng.forward(ids[:4], n_past=0, all_logits=True), eng.forward(ids[4:5], n_past=4)
    with Engine.load(path, threads=2) as eng:
        assert eng.isa == f"{best}/scalar"  # GEMV on the SIMD path, GEMM on the scalar one
        got = eng.forward(ids[:4], n_past=0, all_logits=True), eng.forward(ids[4:5], n_past=4)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)


def test_tuning_refuses_bad_arguments():
    _, L = kernels.lib()
    assert L.bn_isa_tune(99, 0, 0) == -1 and L.bn_isa_tune(0, 0, 99) == -1 and L.bn_isa_tune(0, -1, 0) == -1
