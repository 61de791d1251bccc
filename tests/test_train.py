"""Tests of training (nanogpt/train.py): loss, resume, the log file, the attention choice, dropout
checks, gradient accumulation, the new-user problems (exit status, default --out, missing data)
and data-parallel training under torchrun (2 ranks on this machine).

Fast: tiny models, a few steps, one thread, on generated text (never the Shakespeare text).
"""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from nanogpt import train
from nanogpt.models.gpt import GPT, GPTConfig
from test_model import PLAIN, REPO, SHIPPED, VARIANTS, prepare_module, synthetic_text

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--lr", "1e-2",
        "--warmup-steps", "5", "--eval-iters", "2", "--no-progress"]


def train_args(data_dir, out, *extra, batch="8", eval_interval="20", threads=("--threads", "1")):
    return ["--data-dir", str(data_dir), "--out", str(out), *TINY, *threads, "--batch-size", batch,
            "--eval-interval", eval_interval, *extra]


def run_train(data_dir, out, *extra, **kw):
    """In-process training; returns run()'s dict."""
    return train.run(train.parse_args(train_args(data_dir, out, *extra, **kw)))


def read_log(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def tiny_data(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text(synthetic_text(), encoding="utf-8")
    prepare_module().prepare(src.read_text(encoding="utf-8"), str(tmp_path / "data"))
    return tmp_path / "data"


# -----------------------------------------------------------------------------
# training, resume, log file

def test_training_lowers_loss_and_resumes_exactly(tiny_data, tmp_path):
    vocab_size = len(json.loads((tiny_data / "vocab.json").read_text()))
    full = run_train(tiny_data, tmp_path / "a.pt", "--max-steps", "40")
    print(full)
    assert full["val_loss"] < 0.6 * math.log(vocab_size)  # uniform guessing is log(vocab)
    assert full["tokens_per_s"] > 0
    # the shipped format: plain tensors/values only, loadable with weights_only
    ck = torch.load(tmp_path / "a.pt", weights_only=True)
    assert set(ck) >= {"model", "config", "vocab"} and "optimizer" not in ck
    # stopping at step 20 and resuming reproduces the uninterrupted run exactly
    run_train(tiny_data, tmp_path / "b.pt", "--max-steps", "40", "--stop-at", "20")
    resumed = run_train(tiny_data, tmp_path / "b.pt", "--max-steps", "40", "--resume")
    assert resumed["val_loss"] == full["val_loss"] and resumed["train_loss"] == full["train_loss"]
    a = torch.load(tmp_path / "a.resume.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b.resume.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_log_file_one_json_object_per_evaluation(tiny_data, tmp_path, capsys):
    log = tmp_path / "runs" / "log.jsonl"
    log.parent.mkdir()
    res = run_train(tiny_data, tmp_path / "a.pt", "--max-steps", "10", "--log-file", str(log), eval_interval="4")
    out = capsys.readouterr().out
    records = read_log(log)
    assert [r["step"] for r in records] == [4, 8, 10]
    for r in records:
        assert {"step", "train_loss", "val_loss", "tokens_per_s", "attention"} <= set(r)
        assert r["attention"] == "flash" and r["tokens_per_s"] > 0 and math.isfinite(r["val_loss"])  # auto
    assert records[-1]["val_loss"] == res["val_loss"] and records[-1]["train_loss"] == res["train_loss"]
    assert out.count("tokens/s") == 4  # every evaluation line and the last line
    # appends: a second run adds its own lines
    run_train(tiny_data, tmp_path / "b.pt", "--max-steps", "4", "--log-file", str(log), eval_interval="4")
    assert [r["step"] for r in read_log(log)] == [4, 8, 10, 4]


def test_sample_run_inference(tiny_data, tmp_path):
    from nanogpt.sample import run_inference
    run_train(tiny_data, tmp_path / "s.pt", "--max-steps", "20")
    res = {kv: run_inference("manual", model="shakes128", samples=2, checkpoint=str(tmp_path / "s.pt"),
                             kv_cache=kv, verbose=False) for kv in (True, False)}
    assert res[True]["texts"] == res[False]["texts"]
    assert len(res[True]["texts"]) == 2 and all(len(t) == 1 + 128 for t in res[True]["texts"])
    assert res[True]["crops"] == 2 * (128 - 32)  # inputs of 1..128 tokens, block_size 32
    assert 0 < res[True]["attention_share"] < 1 and res[True]["tokens_per_s"] > 0


def test_grad_accum_equals_the_bigger_batch(tiny_data, tmp_path):
    """2 micro-batches of 4 windows take the steps of one batch of 8 (the same global batch)."""
    big = run_train(tiny_data, tmp_path / "a.pt", "--max-steps", "6", "--eval-interval", "3", batch="8")
    acc = run_train(tiny_data, tmp_path / "b.pt", "--max-steps", "6", "--eval-interval", "3",
                    "--grad-accum", "2", "--eval-batch-size", "8", batch="4")
    assert acc["val_loss"] == pytest.approx(big["val_loss"], abs=1e-4)
    assert acc["train_loss"] == pytest.approx(big["train_loss"], abs=1e-4)


def test_grad_accum_must_divide_over_ranks(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; parsing only
    with pytest.raises(SystemExit):
        train.parse_args(["--grad-accum", "3"])
    assert "--grad-accum 3 must be a multiple of the number of ranks (2)" in capsys.readouterr().err
    args = train.parse_args([])
    assert args.grad_accum == 2 and args.eval_batch_size == 2 * args.batch_size  # one micro-batch per rank


# -----------------------------------------------------------------------------
# the attention choice

@pytest.mark.parametrize("attention", ["manual", "flash"])
def test_training_on_other_attention_matches_torch(attention, tiny_data, tmp_path, request):
    """Training with another attention takes the steps SDPA takes (float rounding apart); the
    checkpoint still records "torch". flash turns on by itself once its backward exists."""
    if attention not in PLAIN:
        request.getfixturevalue("ext")
        if attention not in VARIANTS:
            pytest.skip(f"{attention} is not in nanogpt.VARIANTS")
        if not train.attention_has_backward(attention):
            pytest.skip(f"{attention} has no backward pass yet")
    log = tmp_path / "log.jsonl"
    ref = run_train(tiny_data, tmp_path / "ref.pt", "--max-steps", "10", "--attention", "torch", eval_interval="5")
    got = run_train(tiny_data, tmp_path / "a.pt", "--max-steps", "10", "--attention", attention,
                    "--log-file", str(log), eval_interval="5")
    print(ref, got)
    assert got["val_loss"] == pytest.approx(ref["val_loss"], abs=1e-3)
    assert got["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-3)
    assert {r["attention"] for r in read_log(log)} == {attention}
    assert torch.load(tmp_path / "a.pt", weights_only=True)["config"]["attention"] == "torch"


def test_attention_without_backward_is_a_clear_error(tiny_data, tmp_path, ext, capsys):
    lacking = [v for v in VARIANTS if not train.attention_has_backward(v)]
    if not lacking:
        pytest.skip("every variant has a backward pass")
    argv = train_args(tiny_data, tmp_path / "a.pt", "--max-steps", "2", "--attention", lacking[0])
    with pytest.raises(ValueError, match=f"attention '{lacking[0]}' has no backward.*--attention torch"):
        train.run(train.parse_args(argv))
    assert train.main(argv) == 1
    assert "has no backward" in capsys.readouterr().err
    assert not (tmp_path / "a.pt").exists()
    # evaluating with it is fine
    res = run_train(tiny_data, tmp_path / "b.pt", "--max-steps", "2")
    ev = train.run(train.parse_args(train_args(tiny_data, tmp_path / "b.pt", "--eval-only", "--resume",
                                               "--attention", lacking[0])))
    assert ev["val_loss"] == pytest.approx(res["val_loss"], abs=1e-4)


def test_auto_attention_trains_on_flash_where_it_can(tiny_data, tmp_path, monkeypatch, capsys):
    """--attention auto (the default): flash, whose backward beats SDPA's; torch for a model with
    attention dropout (flash has none) and where the extension cannot be built, saying why."""
    assert train.parse_args([]).attention == "auto"
    assert train.training_attention("auto", 0.0) == "flash"
    assert train.training_attention("auto", 0.1) == "torch"
    assert train.training_attention("manual", 0.0) == "manual"
    res = run_train(tiny_data, tmp_path / "a.pt", "--max-steps", "2", "--dropout", "0.1")
    assert res["attention"] == "torch"
    # dropout on the residual branches only: the kernels train it
    res = run_train(tiny_data, tmp_path / "b.pt", "--max-steps", "2", "--dropout", "0.1", "--attn-dropout", "0")
    assert res["attention"] == "flash"

    def broken():
        raise RuntimeError("no compiler")

    monkeypatch.setattr("nanogpt.extension", broken)
    assert train.training_attention("auto", 0.0) == "torch"
    assert "kernels are not available (RuntimeError: no compiler); training on torch" in capsys.readouterr().out


def test_unknown_attention_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--attention", "no-such-kernel"])
    assert "--attention: unknown attention 'no-such-kernel'" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# attention dropout exists only in SDPA ("torch")

def tiny_config(**kw):
    return GPTConfig(**{**dict(block_size=16, vocab_size=11, n_layer=1, n_head=2, n_embd=16), **kw})


@pytest.mark.parametrize("attention", ["manual", "flash"])
def test_attention_dropout_on_attention_without_it_raises(attention, request):
    if attention not in PLAIN:
        request.getfixturevalue("ext")
    # constructing one: a new module is in training mode
    with pytest.raises(ValueError, match=f"attention '{attention}' has no dropout.*dropout 0.1"):
        GPT(tiny_config(dropout=0.1, attention=attention))
    # switching to it in training mode
    model = GPT(tiny_config(dropout=0.1))
    with pytest.raises(ValueError, match=f"attention '{attention}' has no dropout"):
        model.set_attention(attention)
    assert model.config.attention == "torch"
    # in eval mode it is fine (dropout is off), and gives the torch model's logits
    idx = torch.randint(11, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    want = model(idx, idx)[0]
    model.set_attention(attention)
    assert torch.allclose(model(idx, idx)[0], want, atol=1e-5)
    # back to training mode with it is refused, and nothing changed
    with pytest.raises(ValueError, match=f"attention '{attention}' has no dropout"):
        model.train()
    assert not model.training
    # and dropout 0 trains on it
    GPT(tiny_config(attention=attention)).train()


def test_attention_dropout_set_behind_the_models_back_raises():
    model = GPT(tiny_config(dropout=0.0))
    model.set_attention("manual")
    model.transformer.h[0].attn.attn_dropout_p = 0.2  # as a fine-tuning script might
    with pytest.raises(ValueError, match="attention 'manual' has no dropout.*dropout 0.2"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_train_refuses_attention_dropout_without_it(tiny_data, tmp_path, capsys):
    argv = train_args(tiny_data, tmp_path / "a.pt", "--max-steps", "2", "--attention", "manual", "--dropout", "0.1")
    assert train.main(argv) == 1
    assert "attention 'manual' has no dropout" in capsys.readouterr().err
    res = run_train(tiny_data, tmp_path / "b.pt", "--max-steps", "2", "--dropout", "0.1")  # SDPA has it
    assert math.isfinite(res["val_loss"])


# -----------------------------------------------------------------------------
# a new user's first runs

def test_cli_exits_0_with_a_clean_last_line(tiny_data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nanogpt.train",
                           *train_args(tiny_data, tmp_path / "a.pt", "--max-steps", "4")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done: 4 steps") and "tokens/s" in last and "{" not in last


def test_default_out_is_a_new_ignored_file():
    args = train.parse_args([])
    assert os.path.realpath(args.out) == os.path.realpath(os.path.join(REPO, "out", "ckpt.pt"))
    with open(os.path.join(REPO, ".gitignore"), encoding="utf-8") as f:
        assert "/out/" in f.read().split()  # a first experiment is never committed by accident


@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="checkpoints/shakes2048.pt not present")
def test_shipped_checkpoint_is_not_overwritten_without_force(capsys):
    """Parsing alone decides (no training runs here, so the shipped file is never at risk)."""
    before = os.stat(SHIPPED).st_mtime_ns
    with pytest.raises(SystemExit):
        train.parse_args(["--out", SHIPPED])
    err = capsys.readouterr().err
    assert "shipped in checkpoints/" in err and "--force" in err
    with pytest.raises(SystemExit):
        train.parse_args(["--out", os.path.join(REPO, "out", "..", "checkpoints", "shakes2048.pt")])
    assert train.parse_args(["--out", SHIPPED, "--force"]).force
    assert train.parse_args(["--out", SHIPPED, "--eval-only", "--resume"])  # evaluation writes nothing
    assert train.parse_args(["--out", os.path.join(REPO, "checkpoints", "no-such-new-file.pt")])  # a new file
    assert os.stat(SHIPPED).st_mtime_ns == before


def test_missing_data_says_how_to_prepare(tmp_path, capsys):
    argv = ["--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "a.pt"), *TINY, "--threads", "1"]
    with pytest.raises(FileNotFoundError, match=r"data/shakespeare_char/prepare\.py"):
        train.run(train.parse_args(argv))
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "prepare.py" in err and "Traceback" not in err
    assert not (tmp_path / "a.pt").exists()


# -----------------------------------------------------------------------------
# data parallel: torchrun, 2 ranks on this machine over gloo

def torchrun(*args, nproc=2, timeout=180):
    """`torchrun --standalone --nproc_per_node=2 gpt.py train ...` (the README's command) on
    127.0.0.1, killed with all its ranks if it outlives timeout seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(REPO, "gpt.py"), "train", *args]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's traffic stays on this machine
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout}s:\n{out}\n{err}")
    assert proc.returncode == 0, f"{out}\n{err}"
    return out


def test_two_ranks_take_the_steps_of_one_process_with_twice_the_batch(tiny_data, tmp_path):
    """2 ranks x batch 4 against 1 process x batch 8, the 2-rank run stopped at step 3 and
    resumed: the same evaluation losses (float tolerance) at steps 3 and 6."""
    common = ["--max-steps", "6", "--eval-interval", "3"]
    one = run_train(tiny_data, tmp_path / "one.pt", *common, "--log-file", str(tmp_path / "one.jsonl"), batch="8")
    two = tmp_path / "two.pt"
    log = tmp_path / "two.jsonl"
    # no --threads: the default under torchrun is one thread per rank
    argv = train_args(tiny_data, two, *common, "--log-file", str(log), batch="4", threads=())
    out = torchrun(*argv, "--stop-at", "3")
    assert "over 2 rank(s), 1 thread(s) each" in out
    state = torch.load(tmp_path / "two.resume.pt", weights_only=True)
    assert state["iter_num"] == 3 and len(state["torch_rng"]) == 2  # every rank's RNG state
    out = torchrun(*argv, "--resume")
    assert "resumed from" in out and out.count("done: 6 steps") == 1  # rank 0 alone prints
    want, got = read_log(tmp_path / "one.jsonl"), read_log(log)
    assert [r["step"] for r in got] == [3, 6] and all(r["ranks"] == 2 for r in got)  # rank 0 alone writes
    for w, g in zip(want, got):
        print(f"step {w['step']}: 1 process {w['train_loss']:.6f} {w['val_loss']:.6f}, "
              f"2 ranks {g['train_loss']:.6f} {g['val_loss']:.6f}")
        assert g["train_loss"] == pytest.approx(w["train_loss"], abs=1e-4)
        assert g["val_loss"] == pytest.approx(w["val_loss"], abs=1e-4)
    assert one["val_loss"] == pytest.approx(got[-1]["val_loss"], abs=1e-4) and two.exists()
