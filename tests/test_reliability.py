"""Hostile and pathological input (issue 13): every case ends in one clear `error:` line (exit 1)
or in correct behaviour, never a traceback, a hang or unbounded memory. docs/RELIABILITY.md lists
the failure modes these tests pin down."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from bitnet_cli.cli import app
from bitnet_cli.errors import BitnetError

REPO = Path(__file__).resolve().parents[1]

MICRO = {
    "name": "micro",
    "model": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=320),
    "train": dict(batch_size=4, seq_len=32, steps=4, device="cpu", threads=1),
}


def one_error(result, *needles: str) -> str:
    """Assert a CliRunner result is exit 1 with an `error:` line (no traceback); return the flat text."""
    out = result.output
    assert result.exit_code == 1, out
    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    assert "Traceback" not in out
    flat = " ".join(out.split())
    assert "error:" in flat, out
    for n in needles:
        assert n in flat, out
    return flat


def cli(*args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


# ------------------------------------------------------------------------ recipes: YAML bombs


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        refs = ",".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + f"\ntrain:\n  steps: *a{levels}\n"


@pytest.mark.parametrize("text, needle", [
    (billion_laughs(), "aliases (*a0) are not allowed"),
    ("name: &a [*a]\ntrain: {steps: 1}\n", "aliases (*a) are not allowed"),
    ("train:\n  steps: " + "[" * 1000 + "]" * 1000 + "\n", "nested more than 32 levels"),
    ("x: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n", "nested more than 32 levels"),
])
def test_yaml_bombs_are_refused_fast(tmp_path, text, needle):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    r = cli("train", path, "--dry-run")
    assert time.perf_counter() - t0 < 10
    one_error(r, "bomb.yaml", needle)


def test_recipe_too_large_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * 1_000_001 + "\n")
    one_error(cli("train", path, "--dry-run"), "more than 1,000,000 bytes")


@pytest.mark.parametrize("override, needle", [
    ("model.round_vocab_to=18446744073709551616", "model.round_vocab_to"),
    ("model.hidden_size=1000000000000", "model.hidden_size: Input should be less than or equal to 131072"),
    ("model.num_hidden_layers=1000000", "model.num_hidden_layers"),
    ("train.tokens=.inf", "train.tokens"),
    ("optim.lr=.nan", "optim.lr"),
    ("seed=-1", "seed"),
    ("model.vocab_size=16777216", None),  # in bounds: fine on its own...
])
def test_recipe_sizes_are_bounded(tmp_path, override, needle):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MICRO))
    r = cli("train", path, "--dry-run", "--json", "--set", override)
    if needle is None:
        assert r.exit_code == 0, r.output
        return
    one_error(r, needle)


def test_recipe_vocab_rounded_past_the_limit(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MICRO))
    r = cli("train", path, "--dry-run", "--set", "model.vocab_size=16777215", "--set", "model.round_vocab_to=1000")
    one_error(r, "16778000 (rounded up to a multiple of 1000)", "16777216")


def test_dry_run_of_the_largest_model_counts_without_building_it(tmp_path):
    """The bounds' corner (4096 layers of width 131072) is counted in a blink, with no model built."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MICRO))
    t0 = time.perf_counter()
    r = cli("train", path, "--dry-run", "--json", "--set", "model.num_hidden_layers=4096",
            "--set", "model.hidden_size=131072", "--set", "model.num_attention_heads=1024",
            "--set", "model.num_key_value_heads=1024")
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - t0 < 5
    assert json.loads(r.output)["parameters"] > 4096 * 4 * 131072**2


# ------------------------------------------------------------------------ temp files and fsync


def test_stale_temp_files_are_removed_on_the_next_write(tmp_path, capsys):
    from bitnet_cli.files import TempFile

    out = tmp_path / "m.bin"
    stale = tmp_path / ".m.bin.ab_cd123.tmp"
    stale.write_bytes(b"x" * 1000)
    live = TempFile(out)  # a writer still at work: locked, so kept
    other = [tmp_path / ".m.bin.abcd1234.tmp.keep", tmp_path / ".n.bin.abcd1234.tmp", tmp_path / "m.bin.abcd1234.tmp",
             tmp_path / ".m.bin.abc.tmp"]
    for p in other:
        p.write_bytes(b"not ours")
    link = tmp_path / ".m.bin.zzzzzzzz.tmp"
    link.symlink_to(tmp_path / "target")
    (tmp_path / "target").write_bytes(b"keep me")
    second = TempFile(out)
    assert not stale.exists()
    err = capsys.readouterr().err
    assert "removed .m.bin.ab_cd123.tmp" in err and "interrupted write of m.bin" in err
    assert live.path.exists() and all(p.exists() for p in other) and link.is_symlink()
    second.path.write_bytes(b"new")
    second.publish()
    live.discard()
    assert out.read_bytes() == b"new" and not live.path.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".m.bin.")) == [
        ".m.bin.abc.tmp", ".m.bin.abcd1234.tmp.keep", ".m.bin.zzzzzzzz.tmp"]


def _signalled_at_the_third_tensor(signal_name: str, pack: str) -> str:
    """A script whose pack (the code ``pack``) sends its own process ``signal_name`` once the third tensor is written."""
    return ("import sys, os, signal\n"
            "from bitnet_cli.pack import format as F\n"
            "orig = F.PackedWriter.write\n"
            "def write(self, *a, **k):\n"
            "    orig(self, *a, **k)\n"
            f"    if self._next == 3: os.kill(os.getpid(), signal.{signal_name})\n"
            "F.PackedWriter.write = write\n" + pack)


def test_sigkilled_pack_leaves_a_temp_file_that_the_next_pack_removes(tmp_path, hf_tiny_checkpoint):
    """Kill a pack mid-write (SIGKILL: no cleanup runs); the next pack to the same file removes
    the leftover and says so."""
    out = tmp_path / "m.bin"
    code = _signalled_at_the_third_tensor("SIGKILL", "from bitnet_cli.pack import pack_checkpoint\n"
                                          f"pack_checkpoint({str(hf_tiny_checkpoint)!r}, {str(out)!r})\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()
    left = [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]
    assert len(left) == 1 and not out.exists()
    r = cli("pack", hf_tiny_checkpoint, out)
    assert r.exit_code == 0, r.output
    assert f"removed {left[0].name}" in r.output
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.bin"]


def test_sigtermed_pack_leaves_no_temp_file(tmp_path, hf_tiny_checkpoint):
    """SIGTERM (kill, a scheduler) mid-write cleans up as Ctrl-C does: its default action ended the
    process at once and left the temporary file (gigabytes for a large model); exit 143, one line."""
    out = tmp_path / "m.bin"
    code = _signalled_at_the_third_tensor("SIGTERM", "from bitnet_cli.cli import app\n"
                                          f"app(['pack', {str(hf_tiny_checkpoint)!r}, {str(out)!r}], prog_name='bitnet')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    assert p.stderr.strip() == "interrupted" and list(tmp_path.iterdir()) == []


def test_publish_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    import stat as stat_mod

    from bitnet_cli import files

    synced = []
    real = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.append("dir" if stat_mod.S_ISDIR(st.st_mode) else "file")
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    t = files.TempFile(tmp_path / "r.json")
    t.path.write_text("{}")
    t.publish()
    assert synced == ["file", "dir"]
    assert (tmp_path / "r.json").read_text() == "{}"


# ------------------------------------------------------------------------ packed files: helpers


@pytest.fixture(scope="module")
def packed(tmp_path_factory, hf_tiny_checkpoint) -> Path:
    from bitnet_cli.pack import pack_checkpoint

    out = tmp_path_factory.mktemp("reliab") / "model.bin"
    pack_checkpoint(hf_tiny_checkpoint, out)
    return out


def split_header(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_header(header, data: bytes, text: str | None = None) -> bytes:
    """A safetensors file from a header (or raw header text) and data, the data kept 64-byte aligned."""
    body = (text if text is not None else json.dumps(header)).encode("utf-8", "surrogatepass")
    body += b" " * ((-(8 + len(body))) % 64)
    return struct.pack("<Q", len(body)) + body + data


def edited(packed: Path, out: Path, *, meta=None, config=None, tokenizer_config=None, tensor=None,
           header_text=None, fix_checksum=True) -> Path:
    """A copy of `packed` with its metadata, config or a tensor's bytes changed. With fix_checksum
    the metadata checksum is recomputed, so that loading reaches the code under test."""
    from bitnet_cli.pack.format import metadata_checksum

    header, data = split_header(packed.read_bytes())
    m = header["__metadata__"]
    if config:
        c = json.loads(m["config"])
        c.update(config)
        m["config"] = json.dumps(c)
    if tokenizer_config:
        c = json.loads(m["tokenizer_config"])
        c.update(tokenizer_config)
        m["tokenizer_config"] = json.dumps(c)
    if meta:
        m.update(meta)
    if fix_checksum:
        m["metadata_checksum"] = metadata_checksum(m)
    if tensor:
        name, fn = tensor
        begin, end = header[name]["data_offsets"]
        data = bytearray(data)
        data[begin:end] = fn(bytes(data[begin:end]))
        data = bytes(data)
    out.write_bytes(join_header(header, data, header_text))
    return out


def nan_f32(raw: bytes) -> bytes:
    a = np.frombuffer(raw, dtype=np.float32).copy()
    a[0] = np.nan
    return a.tobytes()


def run_args(path, *extra):
    return ["run", path, "-p", "ROMEO:", "-n", "4", "--seed", "1", "--threads", "1", *extra]


# ------------------------------------------------------------------------ packed files: hostile values


def hostile_header(packed: Path, fn) -> str:
    header, data = split_header(packed.read_bytes())
    fn(header)
    return json.dumps(header)


@pytest.mark.parametrize("case, make, needle", [
    ("deep nesting", lambda p: '{"a": ' + "[" * 50000 + "]" * 50000 + "}", "nested too deeply"),
    ("2^64 shape", lambda p: hostile_header(p, lambda h: h["model.norm.weight"].update(shape=[2**64])),
     "'model.norm.weight': bad shape [18446744073709551616]"),
    ("5000-digit int", lambda p: hostile_header(p, lambda h: h["model.norm.weight"].update(shape=[7])).replace(
        "[7]", "[" + "9" * 5000 + "]"), "corrupt safetensors header"),
    ("dtype list", lambda p: hostile_header(p, lambda h: h["model.norm.weight"].update(dtype=["F32"])),
     "unsupported dtype ['F32']"),
    ("metadata not strings", lambda p: hostile_header(p, lambda h: h["__metadata__"].update(config={"a": 1})),
     "__metadata__ must map strings to strings"),
])
def test_hostile_packed_header_json(packed, tmp_path, case, make, needle):
    path = tmp_path / "m.bin"
    header, data = split_header(packed.read_bytes())
    path.write_bytes(join_header(None, data, make(packed)))
    for args in (["info", path], run_args(path)):
        one_error(cli(*args), needle)


@pytest.mark.parametrize("config, needle", [
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a positive finite number, got nan"),
    ({"rope_theta": float("inf"), "rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}},
     "rope_theta must be a positive finite number"),
    ({"rope_theta": True, "rope_parameters": None}, "rope_theta must be a positive finite number, got True"),
    ({"quantization_config": "bitnet"}, "quantization_config must be a JSON object"),
    ({"quantization_config": [1]}, "quantization_config must be a JSON object"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false"),
    ({"num_attention_heads": 4.0}, "num_attention_heads must be a positive integer"),
    ({"vocab_size": 2**70}, "vocab_size must be a positive integer <= 16777216"),
])
def test_bad_config_values_in_a_packed_file(packed, tmp_path, config, needle):
    path = edited(packed, tmp_path / "m.bin", config=config)
    one_error(cli(*run_args(path)), needle)


def test_metadata_checksum_is_checked_at_load(packed, tmp_path):
    path = edited(packed, tmp_path / "m.bin", config={"rope_theta": 20000.0}, fix_checksum=False)
    one_error(cli(*run_args(path)), "does not match its checksum")


def test_nan_norm_weight_is_refused_at_load(packed, tmp_path):
    path = edited(packed, tmp_path / "m.bin", tensor=("model.layers.1.input_layernorm.weight", nan_f32))
    one_error(cli(*run_args(path)), "'model.layers.1.input_layernorm.weight' holds NaN")


def test_nan_logits_are_an_error_and_verify_finds_the_tensor(packed, tmp_path):
    from bitnet_cli.engine import Engine

    def nan_row(raw):
        a = np.frombuffer(raw, dtype=np.uint16).copy()
        a[5 * 96:6 * 96] = 0x7E00  # f16 NaN across row 5 of the tied embedding / head
        return a.tobytes()

    path = edited(packed, tmp_path / "m.bin", tensor=("model.embed_tokens.weight", nan_row))
    one_error(cli(*run_args(path)), "NaN or infinite logits", "info --verify")
    with pytest.raises(BitnetError, match="do not match their checksums, e.g. 'model.embed_tokens.weight'"):
        Engine.load(path, threads=1, verify=True)


def test_bad_bos_token_string_is_refused(packed, tmp_path):
    path = edited(packed, tmp_path / "m.bin", tokenizer_config={"bos_token": "\udc80"})
    one_error(cli(*run_args(path)), "tokenizer_config bos_token must be a string of valid Unicode")


PANICKING_NORMALIZERS = [
    {"type": "Precompiled", "precompiled_charsmap": "BQAAAGFiYw=="},
    {"type": "Replace", "pattern": {"Regex": "a*"}, "content": "x"},
]


@pytest.mark.parametrize("normalizer", PANICKING_NORMALIZERS, ids=["precompiled", "replace"])
def test_tokenizer_panics_are_one_clear_error(packed, tmp_path, normalizer):
    """A file whose checksums verify but whose tokenizer panics in Rust: run it in a subprocess, so
    that what the panic prints on file descriptor 2 is seen too."""
    header, _ = split_header(packed.read_bytes())
    tok = json.loads(header["__metadata__"]["tokenizer"])
    tok["normalizer"] = normalizer
    path = edited(packed, tmp_path / "m.bin", meta={"tokenizer": json.dumps(tok)})
    p = subprocess.run([sys.executable, "-m", "bitnet_cli.cli", *map(str, run_args(path))], cwd=REPO,
                       capture_output=True, env=dict(os.environ, COLUMNS="300"), timeout=120)
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert "Traceback" not in err and "panicked at" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "the tokenizers library panicked" in lines[0], err


@pytest.mark.parametrize("flag", ["--temperature", "--repeat-penalty"])
def test_extreme_sampling_values_still_sample(packed, flag):
    r = cli(*run_args(packed, flag, "1e-320", "--json"))
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["generated_tokens"] > 0


def test_sampler_is_greedy_at_a_vanishing_temperature():
    from bitnet_cli.sampling import SamplingParams, sample

    logits = np.array([1.0, 3.0, 2.0, 3.0 - 1e-6], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert {sample(logits, SamplingParams(1e-320, 0, 1.0), rng) for _ in range(20)} == {1}
    with pytest.raises(BitnetError, match="NaN"):
        sample(np.array([np.nan, 1.0], dtype=np.float32), SamplingParams(), rng)
    for penalty in (1e-320, 1e300):
        assert sample(logits, SamplingParams(1.0, 0, 1.0, penalty), rng, recent=[1, 2]) in range(4)


def test_negative_seed_is_refused(packed):
    one_error(cli(*run_args(packed, "--seed", "-1")[:-4] if False else ["run", packed, "-p", "x", "--seed", "-1"]),
              "--seed must be a non-negative integer, got -1")


@pytest.mark.parametrize("argv, stdin", [
    (["-p", b"ROMEO \xff\xfe"], b""),
    (["--chat", "-p", b"ROMEO \xff\xfe"], b""),
    (["--chat"], b"ROMEO \xff\xfe\n"),
])
def test_non_utf8_prompt_is_one_clear_error(packed, argv, stdin):
    p = subprocess.run([sys.executable, "-m", "bitnet_cli.cli", "run", str(packed), "-n", "2", *argv],
                       cwd=REPO, input=stdin, capture_output=True, timeout=120,
                       env=dict(os.environ, COLUMNS="300", LC_ALL="C.UTF-8"))
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert "Traceback" not in err
    assert "not valid UTF-8 text (byte 0xff" in err, err


def test_threads_above_the_cores(packed, monkeypatch):
    import bitnet_cli.engine as E

    r = cli(*run_args(packed)[:-2], "--threads", "10000")
    one_error(r, "--threads 10000 is more than this model can use (at most 48", "physical core(s)")
    monkeypatch.setattr(E.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    r = cli(*run_args(packed)[:-2], "--threads", "8")
    assert r.exit_code == 0, r.output
    assert "warning: 8 threads are more than the 2 CPU(s) this process may run on" in " ".join(r.output.split())


def test_context_the_machine_cannot_hold_is_refused(packed, tmp_path, monkeypatch):
    import bitnet_cli.engine as E

    path = edited(packed, tmp_path / "m.bin", config={"max_position_embeddings": 1 << 24})
    monkeypatch.setattr(E, "memory_limit", lambda: 8 << 30)
    # 2 layers x 2 kv heads x 24 dims x 2^24 tokens x 4 bytes x (K, V) = 12 GiB of KV cache, + RoPE
    one_error(cli(*run_args(path, "--ctx-size", str(1 << 24))), "--ctx-size 16777216 needs 13.", "GiB",
              "may use 8.0 GiB")
    r = cli(*run_args(path, "--ctx-size", "100000"))  # the tables are sized to the context used
    assert r.exit_code == 0, r.output


def test_kv_caches_the_machine_cannot_hold_are_refused(packed, monkeypatch):
    """`serve --parallel N`: N caches are committed only as they fill, so a server too large for the
    machine started and would be killed under load; now it is refused before it listens, as run's context."""
    import bitnet_cli.engine as E
    from bitnet_cli.errors import as_flags

    with E.Engine.load(packed, threads=1) as engine:
        monkeypatch.setattr(E, "memory_limit", lambda: engine.kv_bytes_per_sequence * 10)
        engine.set_sequences(10)
        with pytest.raises(BitnetError) as e:
            engine.set_sequences(11)
    assert as_flags(e.value).startswith("--parallel 11 needs ")
    assert "but this process may use" in str(e.value) and "lower --parallel or --ctx-size" in as_flags(e.value)


def test_rope_tables_are_float32_blockwise_and_exact():
    import tracemalloc

    from bitnet_cli.engine import rope_tables

    f32 = np.float32
    ctx, hd, theta = 3000, 64, 500000.0
    exponent = np.arange(0, hd, 2, dtype=f32) / f32(hd)
    inv_freq = f32(1.0) / np.power(np.float64(f32(theta)), exponent.astype(np.float64)).astype(f32)
    angles = (np.arange(ctx, dtype=f32)[:, None] * inv_freq[None, :]).astype(np.float64)
    cos, sin = rope_tables(ctx, hd, theta)
    assert cos.dtype == sin.dtype == np.float32 and cos.shape == (ctx, hd // 2)
    np.testing.assert_array_equal(cos, np.cos(angles).astype(f32))
    np.testing.assert_array_equal(sin, np.sin(angles).astype(f32))
    tracemalloc.start()
    rope_tables(1 << 19, hd, theta)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    tables = 2 * (1 << 19) * (hd // 2) * 4
    assert peak < tables + (64 << 20), peak  # the tables plus a bounded block of float64 work


# ------------------------------------------------------------------------ Engine.forward inputs


@pytest.mark.parametrize("tokens, n_past, needle", [
    ([2**31], 0, "token id 2147483648 out of range"),
    (["a"], 0, "token ids must be integers, got 'a' (str)"),
    ([None], 0, "token ids must be integers, got None"),
    ([[1], [1, 2]], 0, "token ids must be integers, got [1]"),
    ([1.7], 0, "token ids must be integers, got 1.7 (float)"),
    ([True], 0, "token ids must be integers, got True"),
    (np.array([[1, 2], [3, 4]]), 0, "1-D integer array, got 2-D"),
    (np.array([1.0, 2.0]), 0, "1-D integer array, got 1-D float64"),
    ("abc", 0, "token ids must be a list of integers, got str"),
    (5, 0, "got int"),
    ([1], 1.5, "n_past=1.5"),
    ([1], True, "n_past=True"),
    ([1], -1, "n_past=-1"),
])
def test_forward_inputs_are_checked(packed, tokens, n_past, needle):
    from bitnet_cli.engine import Engine

    with Engine.load(packed, threads=1, ctx_size=32) as eng:
        eng.forward([1, 2, 3])
        with pytest.raises(BitnetError) as e:
            eng.forward(tokens, n_past=n_past)
        assert needle in str(e.value)
        assert eng.forward(np.array([5, 6], dtype=np.int64), n_past=np.int64(3)).shape == (2, eng.vocab_size)
        with pytest.raises(BitnetError, match="integers"):
            eng.generate([1, 2.5])


# ------------------------------------------------------------------------ checkpoint directories


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def write(path: Path, text: str):
    path.write_text(text)


def set_config(ckpt: Path, **kw):
    c = json.loads((ckpt / "config.json").read_text())
    c.update(kw)
    (ckpt / "config.json").write_text(json.dumps(c))


def index(ckpt: Path, weight_map) -> None:
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def hostile_safetensors(ckpt: Path, fn=None, text=None):
    path = ckpt / "model.safetensors"
    header, data = split_header(path.read_bytes())
    if fn:
        fn(header)
    path.write_bytes(join_header(header, data, text))


CHECKPOINT_JUNK = {
    "tokenizer_config []": (lambda c: write(c / "tokenizer_config.json", "[]"), "tokenizer config (must be a JSON object, got list)"),
    "tokenizer_config 5": (lambda c: write(c / "tokenizer_config.json", "5"), "got int"),
    "tokenizer_config null": (lambda c: write(c / "tokenizer_config.json", "null"), "got NoneType"),
    "tokenizer_config bad bos": (lambda c: write(c / "tokenizer_config.json", '{"bos_token": "\\udc80"}'),
                                 "bos_token is not valid Unicode text"),
    "config list": (lambda c: write(c / "config.json", "[1]"), "model config (must be a JSON object"),
    "config deep": (lambda c: write(c / "config.json", "[" * 100000 + "]" * 100000), "nested too deeply"),
    "config quant string": (lambda c: set_config(c, quantization_config="bitnet"), "quantization_config must be a JSON object"),
    "config quant list": (lambda c: set_config(c, quantization_config=[]), None),  # empty: no quantization
    "config tie string": (lambda c: set_config(c, tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
    "config heads string": (lambda c: set_config(c, num_attention_heads="4"), "num_attention_heads must be a positive integer"),
    "config eps nan": (lambda c: set_config(c, rms_norm_eps=float("nan")), "rms_norm_eps must be a positive finite number"),
    "config model_type object": (lambda c: set_config(c, model_type={"a": 1}), "unsupported architecture model_type="),
    "config rope list": (lambda c: set_config(c, rope_parameters=[1]), "RoPE scaling [1] is not supported"),
    "index list": (lambda c: write(c / "model.safetensors.index.json", "[]"), "shard index (must be a JSON object"),
    "weight_map value list": (lambda c: index(c, {"a": ["model.safetensors"]}), "weight_map values must be file names"),
    "shard with NUL": (lambda c: index(c, {"a": "model\x00.safetensors"}), "is not a file name"),
    "shard 5000 chars": (lambda c: index(c, {"a": "m" * 5000}), "is not a file name"),
    "shard traversal": (lambda c: index(c, {"a": "../../../etc/passwd"}), "points outside the checkpoint"),
    "shard absolute": (lambda c: index(c, {"a": "/etc/passwd"}), "points outside the checkpoint"),
    "st deep": (lambda c: hostile_safetensors(c, text='{"a":' + "[" * 50000 + "]" * 50000 + "}"), "nested too deeply"),
    "st 2^64 shape": (lambda c: hostile_safetensors(c, lambda h: h["model.norm.weight"].update(shape=[2**64, 2**64])),
                      "bad shape"),
    "st dtype list": (lambda c: hostile_safetensors(c, lambda h: h["model.norm.weight"].update(dtype=["F32"])),
                      "unsupported dtype ['F32']"),
    "st 5000 digits": (lambda c: hostile_safetensors(c, text='{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + "]}}"),
                       "corrupt safetensors header"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_JUNK))
def test_checkpoint_directory_junk(hf_tiny_checkpoint, tmp_path, case):
    breaker, needle = CHECKPOINT_JUNK[case]
    ckpt = copy_checkpoint(hf_tiny_checkpoint, tmp_path / "ckpt")
    breaker(ckpt)
    r = cli("pack", ckpt, tmp_path / "out.bin")
    if needle is None:
        assert r.exit_code == 0, r.output
        return
    one_error(r, needle)
    assert not (tmp_path / "out.bin").exists()


# ------------------------------------------------------------------------ the Hugging Face hub cache


def hub_cache(root: Path, src: Path, repo: str = "acme/tiny-bitnet") -> Path:
    """A cache laid out as huggingface-hub lays it out: models--ORG--NAME/{blobs/<sha256>,
    refs/main, snapshots/<rev>/<file> -> ../../blobs/<sha256>}, with the weights in two shards."""
    import hashlib

    from safetensors.numpy import load_file, save_file

    repo_dir = root / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    blobs, snap = repo_dir / "blobs", repo_dir / "snapshots" / rev
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    files = {}
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        tmp = root / fname
        save_file({n: tensors[n] for n in part}, str(tmp))
        files[fname] = tmp.read_bytes()
        tmp.unlink()
        weight_map.update({n: fname for n in part})
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        files[name] = (src / name).read_bytes()
    for name, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / sha)
    return snap


def test_hub_cache_sharded_checkpoint_packs(hf_tiny_checkpoint, tmp_path, packed, monkeypatch):
    snap = hub_cache(tmp_path / "hub", hf_tiny_checkpoint)
    r = cli("pack", snap, tmp_path / "a.bin")
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = cli("pack", "acme/tiny-bitnet", tmp_path / "b.bin")
    assert r.exit_code == 0, r.output
    from bitnet_cli.pack import PackedModel

    with PackedModel.open(tmp_path / "a.bin") as a, PackedModel.open(packed) as ref:
        for name in ref.names:
            np.testing.assert_array_equal(a.tensor(name), ref.tensor(name))


def test_hub_cache_still_refuses_traversal(hf_tiny_checkpoint, tmp_path):
    snap = hub_cache(tmp_path / "hub", hf_tiny_checkpoint)
    idx = json.loads((snap / "model.safetensors.index.json").read_text())
    blob = os.readlink(snap / "model-00001-of-00002.safetensors")  # ../../blobs/<sha>
    idx["weight_map"] = {k: (blob if v.startswith("model-00001") else v) for k, v in idx["weight_map"].items()}
    (snap / "model.safetensors.index.json").unlink()
    (snap / "model.safetensors.index.json").write_text(json.dumps(idx))
    one_error(cli("pack", snap, tmp_path / "a.bin"), "points outside the checkpoint directory")
    # a link in the snapshot that leads outside both the snapshot and the cache's blobs
    (tmp_path / "elsewhere.safetensors").write_bytes((snap / "model-00001-of-00002.safetensors").read_bytes())
    idx = json.loads((snap / "model.safetensors.index.json").read_text())
    (snap / "model-00001-of-00002.safetensors").unlink()
    (snap / "model-00001-of-00002.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    idx["weight_map"] = {k: v.replace(blob, "model-00001-of-00002.safetensors") for k, v in idx["weight_map"].items()}
    (snap / "model.safetensors.index.json").write_text(json.dumps(idx))
    one_error(cli("pack", snap, tmp_path / "b.bin"), "points outside the checkpoint directory")


def test_recipe_with_a_control_character_is_one_error(tmp_path):
    """Found by the fuzzer: the YAML reader refuses U+007F while constructing the loader."""
    path = tmp_path / "r.yaml"
    path.write_bytes(b'name: "a\x7f"\ntrain: {steps: 1}\n')
    one_error(cli("train", path, "--dry-run"), "invalid YAML (character U+007F at position 8 is not allowed)")


def test_results_and_json_output_with_a_non_utf8_path_are_valid_utf8_json(tmp_path, capsys):
    # `bitnet eval $'\\xff.bin' -o r.json` ended in a UnicodeEncodeError traceback after the whole evaluation
    import json

    from bitnet_cli.cli import print_json
    from bitnet_cli.eval.runner import write_results

    name = b"\xff.bin".decode("utf-8", "surrogateescape")  # as Python gives a non-UTF-8 argument
    out = write_results({"config": {"model_args": {"pretrained": name}}, "text": "é"}, tmp_path / "r.json")
    d = json.loads(out.read_bytes().decode("utf-8"))
    assert d == {"config": {"model_args": {"pretrained": name}}, "text": "é"}  # the surrogate, escaped, comes back
    print_json({"file": name, "text": "é"})
    assert json.loads(capsys.readouterr().out) == {"file": name, "text": "é"}
