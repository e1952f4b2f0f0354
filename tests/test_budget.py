"""The run plan: `--time-budget` durations, the sizing rule against Chinchilla's closed form, the defaults it
picks for the default corpus on CPU and GPU shapes, and whole commands that end within their budget."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, _kill_group, cli_env, run_cli

from blueberry.configs import AdaptiveMoEModelConfig
from blueberry.configs.fields import parse_duration
from blueberry.training import size_plan, sizing
from blueberry.training.distributed import DistContext


@pytest.mark.parametrize("text, seconds", [("45s", 45), ("10m", 600), ("2h", 7200), ("1h30m", 5400), ("90", 90),
                                           ("1.5m", 90)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "10x", "0", "-5", "ten minutes", "inf", "nan"])
def test_a_bad_budget_is_refused_naming_the_field(text):
    from blueberry.errors import ConfigError

    with pytest.raises(ConfigError, match="time_budget|time-budget"):
        AdaptiveMoEModelConfig(device="cpu", time_budget=text).validate()


def test_a_bad_budget_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    r = run_cli("--config", "dev", "--time-budget", "10x", "--out-dir", tmp_path / "run", "--dry-run")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "time" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def _family(depths=range(1, 200)):
    """A fine family whose training FLOPs per token are exactly 6 N (Kaplan's approximation)."""
    return [sizing.Candidate(d, 1000 * d ** 3, 6.0 * 1000 * d ** 3) for d in depths]


@pytest.mark.parametrize("compute", [1e15, 3e17, 1e19])
def test_with_plenty_of_data_the_rule_is_chinchillas_closed_form(compute):
    # C = 6 N D and D = 20 N give N = sqrt(C / 120): the chosen size is the family's last one below it
    choice = sizing.choose_size(_family(), compute, unique_tokens=10 ** 15)
    n_opt = math.sqrt(compute / 120)
    assert choice.regime == "compute-optimal"
    assert choice.params <= n_opt < 1000 * (choice.depth + 1) ** 3
    assert choice.tokens == 20 * choice.params


def test_with_little_data_the_tokens_stop_at_the_passes_and_the_model_at_one_token_per_parameter():
    unique = 1_000_000
    choice = sizing.choose_size(_family(), 1e30, unique)  # compute without limit
    assert choice.regime == "data-limited"
    assert choice.tokens == int(sizing.MAX_EPOCHS * unique)
    assert choice.params <= choice.tokens / sizing.MIN_TOKENS_PER_PARAM < 1000 * (choice.depth + 1) ** 3


def test_without_the_compute_for_any_size_the_smallest_trains_what_the_budget_buys():
    family = _family(range(4, 10))
    choice = sizing.choose_size(family, compute=1e6, unique_tokens=10 ** 9)
    assert (choice.depth, choice.regime) == (4, "compute-limited")
    assert choice.tokens == int(1e6 / family[0].flops_per_token)


SHAKESPEARE_TRAIN_TOKENS = 1_425_632  # the default corpus's 34 training plays in the CPU recipe's 4,096-token BPE


def _plan(config, unique_tokens):
    lines = []
    plan = size_plan.plan_size(config, unique_tokens, DistContext(), __import__("torch").device("cpu"), time.time(),
                               600.0, lines.append)
    return plan, lines


def test_the_cpu_default_plans_the_recipe_search_winner_on_the_default_corpus():
    config = AdaptiveMoEModelConfig(device="cpu")
    assert (config.ensemble, config.time_budget) == (1, "10m")
    plan, lines = _plan(config, SHAKESPEARE_TRAIN_TOKENS)
    assert (config.model_type, config.d_model, config.n_layers, config.n_heads) == ("standard", 256, 4, 4)
    assert plan["data_steps"] == int(sizing.MAX_EPOCHS * SHAKESPEARE_TRAIN_TOKENS) // 4096
    assert "1,425,632 unique tokens" in lines[0]


def _gpu_default_shape():
    """The GPU default's shape (configs: a 374M-parameter MoE), on a config this CPU can build."""
    config = AdaptiveMoEModelConfig(device="cpu")
    for name, value in dict(model_type="moe", d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=1536,
                            vocab_size=8192, max_seq_len=1024, batch_size=32, grad_accum_steps=4).items():
        setattr(config, name, value)  # still automatic: the run may change them
    return config


def test_on_the_default_corpus_the_gpu_default_becomes_a_dense_model_sized_for_its_tokens():
    config = _gpu_default_shape()
    plan, _ = _plan(config, SHAKESPEARE_TRAIN_TOKENS)
    params = plan["params"]
    assert config.model_type == "standard" and config.n_layers <= 4
    assert params <= sizing.MAX_EPOCHS * SHAKESPEARE_TRAIN_TOKENS  # about a token per parameter, or more
    assert plan["data_steps"] * plan["tokens_per_step"] <= sizing.MAX_EPOCHS * SHAKESPEARE_TRAIN_TOKENS  # <= 2.9 passes


def test_on_a_large_store_the_compute_sizes_the_gpu_default(monkeypatch):
    config = _gpu_default_shape()
    monkeypatch.setattr(size_plan, "measure_flops", lambda config, device: 2e14)  # an H200-class measured speed
    plan, lines = _plan(config, 10 ** 10)
    assert config.model_type == "moe" and plan["flops_per_s"] == 2e14
    assert "compute-optimal" in lines[0]
    family = size_plan.candidates(config, [config.n_layers, config.n_layers + 1])
    seconds = plan["compute_seconds"]
    assert 0.8 * size_plan.TRAINING_SHARE * 600 < seconds <= size_plan.TRAINING_SHARE * 600
    assert family[0].flops_per_token * 20 * family[0].params <= 2e14 * seconds  # this size fits the compute
    assert family[1].flops_per_token * 20 * family[1].params > 2e14 * seconds  # the next does not


def test_given_fields_are_never_changed():
    config = AdaptiveMoEModelConfig(device="cpu", d_model=128, n_layers=2, n_heads=2, max_steps=50)
    assert config.time_budget is None and config.max_steps == 50  # given steps are steps, no budget
    config = AdaptiveMoEModelConfig(device="cpu", d_model=512, n_layers=8, n_heads=8, time_budget="1m",
                                    eval_every=7, warmup_steps=20)
    _plan(config, SHAKESPEARE_TRAIN_TOKENS)
    assert (config.d_model, config.n_layers, config.n_heads) == (512, 8, 8)
    assert (config.eval_every, config.warmup_steps) == (7, 20)
    config = AdaptiveMoEModelConfig(device="cpu", n_kv_heads=2)  # one model field given: the size is not auto
    _plan(config, SHAKESPEARE_TRAIN_TOKENS)
    assert (config.d_model, config.n_kv_heads) == (256, 2)
    assert not size_plan.size_is_auto(AdaptiveMoEModelConfig(device="cpu", init_from="some/run"))


def test_the_schedule_follows_the_settled_length_at_once():
    from blueberry.optimizers.schedules import LRSchedule

    param = __import__("torch").nn.Parameter(__import__("torch").zeros(1))
    opt = __import__("torch").optim.SGD([param], lr=1.0)
    schedule = LRSchedule(opt, "wsd", max_steps=1000, warmup=9, min_ratio=0.1)
    for _ in range(9):
        schedule.step()
    schedule.set_max_steps(10)  # the plan: 10 steps, so step 9 is the last one, at the final learning rate
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def _simulate(monkeypatch, probe_step: float, step: float, eval_s: float, revise: bool) -> tuple[float, int, bool]:
    """A planned 100 s run on a simulated clock whose steps and evaluations after the probe take other times
    than the probe measured. Returns (when the run ended, its last step, whether the guard stopped it)."""
    from blueberry.training import budget

    clock = {"t": 0.0}
    monkeypatch.setattr(budget.time, "time", lambda: clock["t"])
    config = AdaptiveMoEModelConfig(device="cpu", time_budget="100s")
    plan = {"time_budget_s": 100.0, "data_steps": 10 ** 6, "tokens_per_step": 1024, "unique_tokens": 10 ** 9}
    planner = budget.StepPlanner(config, plan, 0.0)
    costs = {"eval": 1.0, "final": 5.0, "save": 0.2}
    done = 0
    while done < config.max_steps:
        done += 1
        seconds = probe_step if not planner.settled else step
        clock["t"] += seconds
        if planner.observe(done, seconds):
            planner.settle(costs)
        elif planner.out_of_time():
            return clock["t"] + eval_s + costs["final"] + 0.4, done, True
        if planner.settled and done % config.eval_every == 0 and done < config.max_steps:
            clock["t"] += eval_s + 0.2  # an evaluation, and the checkpoint of a best loss
            planner.record("eval", eval_s)
            planner.record("save", 0.2)
            if revise and planner.revisable(done) and planner.refit(done) != config.max_steps:
                planner.revise(done, planner.refit(done))
    return clock["t"] + eval_s + costs["final"] + 0.4, done, False


@pytest.mark.parametrize("step, eval_s", [(0.13, 1.5), (0.08, 0.7), (0.10, 3.0)])
def test_revisions_end_the_run_on_its_budget_when_the_probe_misjudged_it(monkeypatch, step, eval_s):
    ended, steps, guarded = _simulate(monkeypatch, 0.10, step, eval_s, revise=True)
    assert not guarded and 95 <= ended <= 100.5, (ended, steps)
    unrevised, _, cut_short = _simulate(monkeypatch, 0.10, step, eval_s, revise=False)
    # without them: the guard cuts the schedule short, or the run ends early or late
    assert cut_short or not 95 <= unrevised <= 100.5, unrevised


def _train(args: list, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(args, proc.returncode, out, err), time.perf_counter() - start


@pytest.mark.serial
def test_a_60_second_budget_holds_for_the_whole_command(tmp_path):
    # from an empty data cache: the tokenizer, the tokens, the probe, training, evaluations and task scoring
    run = tmp_path / "run"
    r, wall = _train(["--config", "dev", "--time-budget", "60s", "--cache-dir", tmp_path / "cache",
                      "--out-dir", run], timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 51 <= wall <= 69, f"{wall:.1f} s for a 60 s budget\n{r.stdout[-2000:]}"
    summary = json.loads((run / "summary.json").read_text())
    plan = summary["plan"]
    # steps slower after the probe than during it end the run early at the guard, not past the budget
    assert plan["max_steps"] > plan["probe_steps"]
    assert summary["step"] == plan["max_steps"] or (summary["stopped_by_budget"]
                                                     and summary["step"] >= 0.8 * plan["max_steps"])
    assert abs(summary["wall_s"] - wall) < 5 and plan["time_budget_s"] == 60
    assert json.loads((run / "config.json").read_text())["max_steps"] == plan["max_steps"]
    assert "Plan:" in r.stdout
    # the last checkpoint holds the plan as revised: its length, its schedule, its config
    from blueberry.runs.checkpoint import read_state, resolve_checkpoint

    state = read_state(resolve_checkpoint(run))
    assert state["plan"]["max_steps"] == state["scheduler"]["max_steps"] == state["config"]["max_steps"] \
        == plan["max_steps"]
    assert state["plan"].get("revisions", []) == plan.get("revisions", [])


def test_a_run_killed_after_its_plan_resumes_with_the_same_plan(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--config", "dev", "--time-budget", "40s", "--eval-tasks",
                             "none", "--cache-dir", tmp_path / "cache", "--out-dir", run], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=cli_env(), cwd=ROOT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "checkpoints" / "latest").exists():
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
    planned = json.loads((run / "config.json").read_text())
    assert "max_steps" in planned["derived_fields"]
    r = run_cli("--resume-from", run, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    resumed = json.loads((run / "config.json").read_text())
    assert summary["step"] == resumed["max_steps"] == planned["max_steps"]
    assert (resumed["warmup_steps"], resumed["eval_every"]) == (planned["warmup_steps"], planned["eval_every"])
