"""gpt.py's command line, the host and load report, and what a user meets on a fresh clone.
Nothing here is timed: the load verdicts are fed readings of our own."""
import importlib.util
import json
import math
import os
import re
import shlex
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import gpt  # noqa: E402  the repository's gpt.py
from nanogpt import bench, host  # noqa: E402
from nanogpt.formats import checkpoint  # noqa: E402


def parse_error(capsys, argv):
    """Parses argv, expecting a usage error; returns its message."""
    with pytest.raises(SystemExit) as e:
        gpt.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# One dispatch table: parts, bench rows and test parametrisations read it


def test_parts_are_the_dispatch_table(ext):
    assert bench.parts() == ("manual",) + ext.VARIANTS
    commands = gpt.build_parser().commands
    parts = [name for name in commands if name.startswith("part")]
    assert parts == [f"part{n}" for n in range(len(ext.VARIANTS) + 1)]
    assert set(commands) == set(parts) | set(gpt.FIXED)
    for n, name in enumerate(parts):
        assert gpt.parse_args([name]).variant == bench.parts()[n]
    for variant, adds in ext.extension().variants():  # each part's help is its row's "adds"
        assert adds in commands[f"part{ext.VARIANTS.index(variant) + 1}"].description


def test_bench_rows_are_the_dispatch_table(ext, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.bench(shapes=[(1, 2, 9, 4)], causals=(False,), repeat=1, json_path=str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["sdpa", *ext.VARIANTS]
    assert all(r["peak_share"] > 0 and r["busy"] in (True, False) for r in rows)
    text = capsys.readouterr().out
    assert "%peak" in text and "FMA peak" in text and "host: " in text


def test_test_parametrisations_read_the_table(ext):
    import test_attention

    marked = 0
    for name in dir(test_attention):
        for mark in getattr(getattr(test_attention, name), "pytestmark", []):
            if mark.name == "parametrize" and mark.args[0] == "variant":
                assert tuple(mark.args[1]) == ext.VARIANTS, name
                marked += 1
    assert marked >= 3


# ---------------------------------------------------------------------------------------
# Parsing: every flag is used by its command or refused


def test_part_defaults(ext):
    args = gpt.parse_args(["part4"])
    assert (args.B, args.H, args.N, args.d, args.causal, args.repeat, args.br, args.bc) == (1, 4, 1024, 32, False, 9, None, None)
    args = gpt.parse_args(["part2", "-N", "512", "--causal", "-br", "16", "-bc", "8"])
    assert (args.variant, args.N, args.causal, args.br, args.bc) == ("blocked", 512, True, 16, 8)
    args = gpt.parse_args(["part4", "--inference", "-m", "shakes256"])
    assert (args.model, args.samples, args.prompt, args.no_kv_cache) == ("shakes256", 10, "\n", False)


@pytest.mark.parametrize("argv,message", [
    (["part0", "-br", "4"], r"gpt.py part0: error: unrecognized arguments: -br 4"),
    (["bench", "-bc", "4"], r"gpt.py bench: error: unrecognized arguments: -bc 4"),
    (["bench", "--png", "x.png"], r"gpt.py bench: error: unrecognized arguments: --png"),
    (["sweep", "--json", "x.json"], r"gpt.py sweep: error: unrecognized arguments: --json"),
    (["--causal", "train"], r"gpt.py train: error: unrecognized arguments: --causal"),
    (["part1", "--samples", "3"], r"gpt.py part1: error: --samples: options of text generation: add --inference"),
    (["part1", "--inference", "-N", "5", "--causal"], r"error: -N, --causal: options of the timed attention call"),
    (["part4", "-N", "0"], r"argument -N: must be at least 1, got 0"),
    (["bench", "--variants", "flash,nope"], r"--variants: unknown nope; expected names from manual, naive"),
    (["bench", "--causal", "--non-causal"], r"not allowed with argument"),
    (["bench", "--backward", "--dtype", "bf16"], r"--backward times its own shapes with flash and SDPA: drop --dtype"),
    (["part4", "--dtype", "bf16"], r"--dtype: options of text generation: add --inference"),
    (["bench", "--dtype", "float16"], r"argument --dtype: invalid choice"),
    ([], r"the following arguments are required: COMMAND"),
])
def test_refused(ext, capsys, argv, message):
    assert re.search(message, parse_error(capsys, argv))


def test_corpus_is_checked_before_generating(ext, capsys, monkeypatch, tmp_path):
    import nanogpt.sample

    monkeypatch.setattr(nanogpt.sample, "run_inference", lambda *a, **k: pytest.fail("generated before the check"))
    with pytest.raises(SystemExit) as e:
        gpt.main(["part4", "--inference", "--corpus", str(tmp_path / "missing.txt")])
    assert e.value.code == 2
    assert f"--corpus {tmp_path / 'missing.txt'}: no such file" in capsys.readouterr().err


def test_bench_takes_its_shape_and_mask(ext, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "bench", lambda *a, **k: calls.append((a, k)) or True)
    assert gpt.main(["bench", "-N", "64", "--causal", "--variants", "flash,manual", "--repeat", "2"]) == 0
    assert gpt.main(["bench", "--non-causal"]) == 0
    assert gpt.main(["bench"]) == 0
    assert gpt.main(["bench", "--dtype", "bf16"]) == 0
    (a1, k1), (a2, _), (a3, k3), (_, k4) = calls
    assert a1 == ([(1, 4, 64, 32)], (True,)) and k1["variants"] == ["flash", "manual"] and k1["repeat"] == 2
    assert a2 == (bench.BENCH_SHAPES, (False,))
    assert a3 == (bench.BENCH_SHAPES, (False, True)) and k3["variants"] is None and k3["dtype"] == torch.float32
    assert k4["dtype"] == torch.bfloat16


def test_part_runs_the_variant(ext, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "part", lambda *a, **k: calls.append((a, k)) or True)
    assert gpt.main(["part0", "-N", "8"]) == 0
    assert gpt.main(["part4", "-br", "4", "-bc", "2", "--causal"]) == 0
    assert calls[0][0] == ("manual", 1, 4, 8, 32, False, None, None)
    assert calls[1][0] == ("flash", 1, 4, 1024, 32, True, 4, 2)


def test_failed_build_is_a_clear_error(capsys, monkeypatch):
    def broken():
        raise RuntimeError("Error building extension 'nanogpt_ext'")

    monkeypatch.setattr(gpt, "part_names", broken)
    with pytest.raises(SystemExit) as e:
        gpt.parse_args(["part4"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "the attention extension did not build or load: RuntimeError: Error building extension" in err


# ---------------------------------------------------------------------------------------
# train


def test_train_help_names_its_program(capsys):
    with pytest.raises(SystemExit) as e:
        gpt.main(["train", "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: gpt.py train ")


def test_train_without_data_names_the_prepare_command(tmp_path, capsys):
    assert gpt.main(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "python data/shakespeare_char/prepare.py --input FILE" in err[0]


def test_train_exits_0_after_a_run(tmp_path, capsys):
    from nanogpt.data import encode, write

    g = torch.Generator().manual_seed(0)
    text = "".join("abcdefgh \n"[i] for i in torch.randint(10, (3000,), generator=g).tolist())
    write(str(tmp_path), *encode(text))
    argv = ["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--n-layer", "1", "--n-head", "2",
            "--n-embd", "16", "--block-size", "16", "--batch-size", "2", "--max-steps", "2", "--eval-interval", "1",
            "--eval-iters", "1", "--no-progress", "--threads", "1"]
    assert gpt.main(argv) == 0
    assert "{" not in capsys.readouterr().out.splitlines()[-1]  # no raw dict printed
    assert (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------------------------------
# A fresh clone: README commands, data preparation offline, the shipped checkpoint


def readme_commands():
    """The README's text, and every `python gpt.py ...` in it: code lines and inline spans."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    joined = re.sub(r"\\\n\s*", "", text)  # continuation lines
    lines = [line.split("#")[0].split("&& ")[-1].strip() for line in joined.splitlines() if "python gpt.py " in line
             and line.strip().split("&& ")[-1].startswith("python gpt.py ")]
    spans = [" ".join(span.split()) for span in re.findall(r"`(python gpt\.py\s[^`]+)`", joined)]
    # the synopsis lines (alternatives, optional parts, placeholders) are not commands
    return joined, [c for c in lines + spans if not re.search(r"[|\[]|partN", c)]


def test_readme_never_points_at_shared():
    assert "../shared" not in readme_commands()[0]


def test_readme_commands_parse(ext):
    _, commands = readme_commands()
    assert len(commands) >= 10
    for command in commands:
        argv = shlex.split(command)[2:]
        if "--corpus" in argv:  # the README's corpus is the downloaded text; any file will do here
            argv[argv.index("--corpus") + 1] = os.path.join(REPO, "README.md")
        if "--help" in argv:
            with pytest.raises(SystemExit) as e:
                gpt.parse_args(argv)
            assert e.value.code == 0, command
            continue
        args = gpt.parse_args(argv)  # exits on any error
        assert args.command == argv[0], command


def load_prepare():
    spec = importlib.util.spec_from_file_location("prepare", os.path.join(REPO, "data", "shakespeare_char", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_offline_says_how_to_give_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        load_prepare().main(["--out-dir", str(tmp_path), "--url", (tmp_path / "nowhere.txt").as_uri()])
    message = str(e.value.code)
    assert "\n" not in message and "cannot download" in message
    assert message.endswith("python data/shakespeare_char/prepare.py --input FILE")
    assert not (tmp_path / "input.txt").exists()


def test_prepare_checks_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_prepare().main(["--input", str(tmp_path / "missing.txt"), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"--input {tmp_path / 'missing.txt'}: no such file" in err


def test_shipped_checkpoint_found_or_explained(monkeypatch, tmp_path):
    path = checkpoint.shipped_checkpoint()
    assert os.path.isfile(path) and path.endswith(os.path.join("checkpoints", "shakes2048.pt"))
    places = [str(tmp_path / "a" / "shakes2048.pt"), str(tmp_path / "b" / "shakes2048.pt")]
    monkeypatch.setattr(checkpoint, "shipped_checkpoint_paths", lambda: places)
    with pytest.raises(FileNotFoundError) as e:
        checkpoint.shipped_checkpoint()
    assert all(p in str(e.value) for p in places)
    from nanogpt.sample import run_inference

    with pytest.raises(FileNotFoundError, match="is in none of"):
        run_inference("torch", model="shakes128", samples=1, verbose=False)


def test_installed_layout_is_searched():
    paths = checkpoint.shipped_checkpoint_paths()
    assert os.path.join(sys.prefix, "share", "nanogpt-flash", "checkpoints", "shakes2048.pt") in paths


# ---------------------------------------------------------------------------------------
# The host line and the busy verdict


def test_cpu_model_from_cpuinfo():
    assert host.cpu_model("processor\t: 0\nmodel name\t: AMD EPYC  7B13 64-Core Processor\n") == "AMD EPYC 7B13 64-Core Processor"
    assert host.cpu_model("processor: 0\n") == "unknown CPU"


def test_host_info(ext):
    info = host.host_info()
    assert set(info) == {"cpu", "simd", "threads", "fma_peak_gflops", "bf16_peak_gflops", "amx_peak_gflops"}
    assert math.isfinite(info["fma_peak_gflops"]) and info["fma_peak_gflops"] > 0
    assert "FMA peak" in host.format_host(info)
    flags = open("/proc/cpuinfo").read()
    # vdpbf16ps: twice the FMA's multiply-adds on a Zen 4, half of them on a Sapphire Rapids
    has_bf16 = "avx512_bf16" in flags
    assert (info["bf16_peak_gflops"] > info["fma_peak_gflops"] / 4) if has_bf16 else info["bf16_peak_gflops"] == 0
    assert ("bf16 dot peak" in host.format_host(info)) == has_bf16
    # a TDPBF16PS does 8192 multiply-adds: where the CPU has AMX, several times the FMA's
    has_amx = "amx_bf16" in flags and ext.build_info()["bf16_amx_cpu"]
    assert (info["amx_peak_gflops"] > 2 * info["fma_peak_gflops"]) if has_amx else info["amx_peak_gflops"] == 0
    assert ("AMX bf16 peak" in host.format_host(info)) == has_amx


@pytest.mark.parametrize("before,after,warns", [(232, 445, True), (445, 232, True), (440, 445, False),
                                                (400, 345, False), (0, 0, False)])
def test_peak_drift(before, after, warns):
    line = host.peak_drift("bf16 dot peak", before, after)
    assert (line is not None) == warns
    if warns:
        assert f"{before} GFLOP/s before" in line and f"{after} after" in line and "bf16 dot peak" in line


@pytest.mark.parametrize("peak", ["fma_peak_gflops", "bf16_dot_peak_gflops", "amx_peak_gflops"])
@pytest.mark.parametrize("threads,seconds,match", [(0, 0.1, "threads"), (2, 0.0, "seconds"), (1, 11.0, "seconds")])
def test_peaks_check_arguments(ext, peak, threads, seconds, match):
    with pytest.raises(ValueError, match=match):
        getattr(ext.extension(), peak)(threads, seconds)


def stat(cpu0, cpu1, running=1):
    """A /proc/stat text: per-CPU (busy, idle) ticks, put in the user and idle columns."""
    lines = [f"cpu  {cpu0[0] + cpu1[0]} 0 0 {cpu0[1] + cpu1[1]} 0 0 0 0 0 0"]
    lines += [f"cpu{i} {b} 0 0 {i_} 0 0 0 0 0 0" for i, (b, i_) in enumerate((cpu0, cpu1))]
    return "\n".join(lines + ["intr 0", f"procs_running {running}", "procs_blocked 0"]) + "\n"


def test_cpu_counters():
    t = host.CLOCK_TICK
    text = "cpu0 10 5 5 100 7 1 1 2 0 0\ncpu1 1 1 1 1 1 1 1 1 0 0\ncpu2 50 0 0 0 0 0 0 0 0 0\nprocs_running 3\n"
    assert host.cpu_busy_seconds(text, [0]) == pytest.approx(24 / t)  # all but idle and iowait
    assert host.cpu_busy_seconds(text, [0, 2]) == pytest.approx(74 / t)
    assert host.procs_running(text) == 3 and host.procs_running("cpu0 1 2\n") is None


@pytest.mark.parametrize("wall,own,busy_s,threads,busy", [
    (1.0, 2.0, 2.0, 2, False),   # our two threads had both CPUs
    (1.0, 1.0, 1.05, 1, False),  # one thread, the other CPU idle
    (1.0, 1.0, 2.0, 2, True),    # another process took a whole CPU
    (1.0, 1.7, 2.0, 2, True),    # others took 0.3 CPUs
    (2.0, 1.0, 1.0, 1, False),   # we waited (I/O, sleep): not the others' fault
])
def test_judge_load(wall, own, busy_s, threads, busy):
    verdict_busy, text = host.judge_load(wall, own, busy_s, ncpu=2, threads=threads, running=4)
    assert verdict_busy == busy
    assert ("MACHINE BUSY" in text) == busy and "4 tasks runnable" in text


def test_load_watch_reads_proc_stat():
    t = host.CLOCK_TICK
    for after, busy in ((stat((0, 0), (0, 0), running=1), False), (stat((10 * t, 0), (10 * t, 0), running=5), True)):
        readings = iter([stat((0, 0), (0, 0)), after])
        with host.LoadWatch(read_stat=lambda: next(readings), cpus=[0, 1], threads=2) as w:
            pass
        assert w.busy == busy, w.verdict()
    with host.LoadWatch(read_stat=lambda: None, cpus=[0], threads=1) as w:
        pass
    assert not w.busy and "unknown" in w.verdict()


def test_duration_estimate():
    lengths = list(range(1, 2049)) * 2
    f = lambda n: 3e-3 + 1e-4 * n + 1e-7 * n * n  # noqa: E731
    assert host.quadratic_total(lengths, [(n, f(n)) for n in (1, 512, 2048)]) == pytest.approx(sum(map(f, lengths)))
    assert host.quadratic_total([4, 8], [(8, 2.0)]) == pytest.approx(4.0)  # one trial: a constant
    assert host.quadratic_total([1, 2], [(1, 1.0), (2, -5.0)]) == pytest.approx(1.0)  # no negative passes
    assert host.format_duration(30) == "30 s" and host.format_duration(240) == "4 min"


def test_manual_is_part0_everywhere(ext):
    from nanogpt.reference import attention_reference

    q, k, v = bench.random_qkv(1, 2, 5, 4)
    torch.testing.assert_close(bench.run("manual", q, k, v, True), attention_reference(q, k, v, True))
    with pytest.raises(TypeError, match="variant must be a str"):
        bench.run(None, q, k, v)  # no second name for part0


def test_bench_decode_flag():
    import gpt

    args = gpt.parse_args(["bench", "--decode", "--repeat", "3"])
    assert args.decode and args.repeat == 3
    for extra in (["-N", "512"], ["-N", "1024"], ["-H", "4"], ["--variants", "flash"], ["--json", "x.json"], ["--causal"]):
        with pytest.raises(SystemExit):  # refused even when the value is the default
            gpt.parse_args(["bench", "--decode", *extra])


def test_bench_decode_runs(ext, capsys):
    from nanogpt import bench

    assert bench.bench_decode(shapes=[(1, 2, 1, 40, 8), (1, 2, 3, 600, 16)], repeat=1)
    out = capsys.readouterr().out
    assert "B1 H2 Nq3 Nk600 d16" in out and "'decode' path" in out and "x@read" in out
    row = next(line for line in out.splitlines() if line.startswith("B1 H2 Nq3 Nk600 d16")).split()
    sdpa_us, read_gbs, x_at_read = float(row[6]), float(row[9]), float(row[10])
    # x@read = SDPA's time over the read's: the read's time is the bytes over read GB/s
    read_us = 2 * 1 * 2 * 600 * 16 * 4 / (read_gbs * 1e3)
    assert x_at_read == pytest.approx(sdpa_us / read_us, rel=0.1)


def test_bench_in_bf16_runs(ext, capsys):
    from nanogpt import bench

    assert bench.bench_decode(shapes=[(1, 2, 1, 40, 8)], repeat=1, dtype=torch.bfloat16)
    assert bench.bench([(1, 2, 48, 16)], (True,), variants=["flash"], repeat=1, dtype=torch.bfloat16)
    out = capsys.readouterr().out
    assert out.count("dtype: torch.bfloat16") == 2 and "B1 H2 N48 d16" in out


def test_inference_in_bf16(ext, capsys):
    """--dtype bf16: weights and KV cache in bfloat16, text still generated, and said so."""
    assert gpt.main(["part4", "--inference", "-m", "shakes128", "--samples", "1", "--max-new-tokens", "30",
                     "--dtype", "bf16"]) == 0
    assert "[flash, shakes128, bfloat16, kv_cache=on" in capsys.readouterr().out


def test_tile_flags_only_where_the_kernel_reads_them(ext):
    tiled = set(ext.extension().tiled())
    assert "flash" in tiled and "blocked" in tiled and "naive" not in tiled
    for name, variant, _ in gpt.part_names():
        if variant in tiled:
            assert gpt.parse_args([name, "-br", "8", "-bc", "16"]).br == 8
        else:
            with pytest.raises(SystemExit):
                gpt.parse_args([name, "-br", "8"])
