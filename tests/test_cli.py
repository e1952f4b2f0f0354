import pytest

from helpers import TINY_FLAGS, run_cli


@pytest.mark.parametrize("args,flag", [
    (["--d-model", "-1"], "--d-model"),
    (["--batch-size", "0"], "--batch-size"),
    (["--n-layers", "0"], "--n-layers"),
    (["--d-model", "100", "--n-heads", "3"], "--d-model"),
    (["--config", "nope"], "--config"),
    (["--top-k", "9", "--num-experts", "8"], "--top-k"),
    (["--lr", "-1"], "--lr"),
    (["--d-model", "abc"], "--d-model"),
    (["--model-type", "rnn"], "--model-type"),
    (["--max-steps", "-5"], "--max-steps"),
])
def test_invalid_values_exit_2_with_one_line(args, flag, tmp_path):
    r = run_cli(*args, "--out-dir", tmp_path / "run", timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and flag in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_missing_dataset_path_exits_2(tmp_path):
    r = run_cli("--dataset", tmp_path / "nowhere", "--out-dir", tmp_path / "run", *TINY_FLAGS)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_validate_setup_passes(corpus_dir, tmp_path):
    r = run_cli("--validate-setup", "--config", "dev", "--dataset", corpus_dir, "--cache-dir", tmp_path / "c",
                "--vocab-size", "300")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "5/5 checks passed" in r.stdout
    for row in ("hardware detected", "dependencies import", "dataset loads", "forward + backward + step",
                "checkpoint round trip"):
        assert row in r.stdout


def test_validate_setup_fails_on_bad_data(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli("--validate-setup", "--config", "dev", "--dataset", tmp_path / "empty")
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_train_generate_eval_export_round_trip(corpus_dir, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--dataset", corpus_dir, "--cache-dir", tmp_path / "c", "--out-dir", run, "--max-steps", "4",
                "--eval-every", "2", *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    assert "bits per byte" in r.stdout and "perplexity" in r.stdout
    g = run_cli("generate", "--checkpoint", run, "--prompt", "the king", "--max-new-tokens", "8")
    assert g.returncode == 0 and g.stdout.startswith("the king"), g.stderr
    e = run_cli("eval", "--checkpoint", run, "--dataset", corpus_dir / "doc00.txt")
    assert e.returncode == 0 and "bits_per_byte" in e.stdout, e.stderr
    x = run_cli("export", run, tmp_path / "hf")
    assert x.returncode == 0 and (tmp_path / "hf" / "config.json").exists(), x.stderr
    again = run_cli("export", run, tmp_path / "hf")
    assert again.returncode == 2 and "not empty" in again.stderr
    # an existing run directory is never overwritten by a new run
    r2 = run_cli("train", "--dataset", corpus_dir, "--cache-dir", tmp_path / "c", "--out-dir", run, *TINY_FLAGS)
    assert r2.returncode == 2 and "already holds a run" in r2.stderr
    # resume continues to a larger step count
    r3 = run_cli("--resume-from", run, "--max-steps", "6")
    assert r3.returncode == 0, r3.stderr
    assert (run / "checkpoints" / "step_000006").exists()


def test_python_m_and_train_py_share_the_cli():
    import subprocess
    import sys

    from helpers import ROOT, cli_env

    r = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True, cwd=ROOT, env=cli_env())
    assert r.returncode == 0 and "--validate-setup" in r.stdout and "--num-documents" in r.stdout
    info = run_cli("info")
    assert info.returncode == 0 and "FP8 Support" in info.stdout


@pytest.mark.parametrize("flag,value", [("--threads", "0"), ("--slots", "0"), ("--port", "70000")])
def test_serve_refuses_bad_settings_with_one_line(flag, value, tmp_path):
    r = run_cli("serve", "--checkpoint", tmp_path / "nowhere", flag, value, timeout=120)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and flag in lines[0] and "Traceback" not in r.stderr, r.stderr
