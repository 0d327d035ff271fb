"""Two CPU processes (torchrun, gloo DDP) train one model: same coins, one reduced constraint estimate, different
samples, gradients averaged once and then clipped, equal parameters at the end; a constraint_dataset's prompts dealt
to the processes. And FSDP2 over gloo: l3m's sampling
and log-prob pass on a ``fully_shard`` model give the unsharded model's responses and gradients, and a Trainer run
sharded by accelerate trains as the DDP run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import l3m
from fixtures.tiny import build_model, build_tokenizer
from l3m.training.distributed import check_launch, shards_weights
from l3m.errors import L3MConfigError
from l3m.training.reinforce import reinforce_loss
from l3m.sampling import Completions, completion_logps, response_nll

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS_DIR, "fixtures", "ddp_worker.py")
FSDP_WORKER = os.path.join(TESTS_DIR, "fixtures", "fsdp_worker.py")
FSDP_TRAINER_WORKER = os.path.join(TESTS_DIR, "fixtures", "fsdp_trainer_worker.py")


def _launch(out_dir, *flags, worker: str = WORKER) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(l3m.__file__)), TESTS_DIR]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
               str(out_dir), *flags]
    # its own process group, so that a timeout stops the workers too, not only the torchrun launcher (which would
    # leave two workers spinning in gloo and slow every later test)
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            stderr += "\n[the 2-process run timed out after 600 s; its process group was killed]"
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    result = _launch(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_both_processes_join_one_gloo_group(ranks):
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)


def test_same_coins_and_equal_parameters(ranks):
    coins = [[s["constraint"] for s in r["steps"]] for r in ranks]
    assert coins[0] == coins[1]
    assert True in coins[0] and False in coins[0], "the run must mix objective and constraint steps"
    first, second = (r["params"] for r in ranks)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    initial = ranks[0]["steps"][0]["weights"]
    assert any(not torch.equal(initial[n], first[n]) for n in first if n in initial), "training must move weights"


def test_constraint_estimate_is_reduced_across_processes(ranks):
    constraint_steps = [i for i, s in enumerate(ranks[0]["steps"]) if s["constraint"]]
    for i in constraint_steps:
        local = [r["steps"][i]["local_violations"] for r in ranks]  # (N, K) on each process
        global_mean = torch.cat(local).mean(dim=0)
        for r in ranks:
            torch.testing.assert_close(r["steps"][i]["estimate"], global_mean)
        assert not torch.equal(local[0].mean(dim=0), local[1].mean(dim=0)), "the test needs different local values"
    torch.testing.assert_close(ranks[0]["ema"], ranks[1]["ema"], rtol=0, atol=0)


def test_sampling_differs_across_processes(ranks):
    i = next(i for i, s in enumerate(ranks[0]["steps"]) if s["constraint"])
    first, second = (r["steps"][i]["completions"] for r in ranks)
    prompt = first["sequences"][:, : first["prompt_mask"].shape[1]]
    assert torch.equal(prompt, second["sequences"][:, : second["prompt_mask"].shape[1]])  # the same prompts
    assert first["completion_ids"] != second["completion_ids"]


def _step_loss(model, step: dict) -> torch.Tensor:
    """The loss one process computed in ``step``, recomputed on its recorded inputs."""
    if not step["constraint"]:
        inputs = step["inputs"]
        return response_nll(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"]).mean()
    c = step["completions"]
    completions = Completions(c["sequences"], c["prompt_mask"], c["completion_mask"], c["completion_ids"],
                              truncated=torch.zeros(len(c["completion_ids"]), dtype=torch.bool))
    return reinforce_loss(step["advantages"], completion_logps(model, completions))


@pytest.mark.parametrize("kind", ["objective", "constraint"])
def test_gradients_are_averaged_once(ranks, kind):
    i = next(i for i, s in enumerate(ranks[0]["steps"]) if s["constraint"] == (kind == "constraint"))
    steps = [r["steps"][i] for r in ranks]
    model = build_model(build_tokenizer())
    model.load_state_dict(steps[0]["weights"])
    model.train()
    losses = [_step_loss(model, step) for step in steps]
    # the gradient of the mean of the two processes' losses, i.e. DDP's average of their gradients, taken once
    torch.autograd.backward(sum(losses) / 2)
    for name, param in model.named_parameters():
        for step in steps:
            torch.testing.assert_close(step["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    local = [torch.autograd.grad(loss, list(model.parameters()), retain_graph=True) for loss in
             [_step_loss(model, step) for step in steps]]
    assert any(not torch.allclose(a, b) for a, b in zip(*local)), "the processes' own gradients must differ"


def test_each_update_is_the_clipped_averaged_gradient_step(ranks):
    """The worker trains with plain SGD, so each update must be ``-lr * c * g``: ``g`` the averaged gradient recorded
    before clipping, ``c = max_grad_norm / |g|`` as ``torch.nn.utils.clip_grad_norm_`` computes it."""
    max_norm, lr = ranks[0]["settings"]["max_grad_norm"], ranks[0]["settings"]["learning_rate"]
    for r in ranks:
        assert r["skipped_steps"] == 0
        after = [s["weights"] for s in r["steps"][1:]] + [r["params"]]
        for i, (step, new) in enumerate(zip(r["steps"], after)):
            names = list(step["grads"])  # the parameters, the tied output layer once
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(step["grads"][n]) for n in names]))
            assert norm > max_norm, f"step {i}: gradient norm {norm:.3g} <= max_grad_norm {max_norm}: nothing to clip"
            clip = max_norm / (norm + 1e-6)
            update = torch.cat([(new[n] - step["weights"][n]).flatten() for n in names])
            expected = torch.cat([(-lr * clip * step["grads"][n]).flatten() for n in names])
            error = ((update - expected).norm() / expected.norm()).item()
            assert error < 1e-3, f"rank {r['rank']}, step {i}: the update is off the clipped step by {error:.2g}"


def test_constraint_prompts_are_dealt_to_the_processes_and_objective_steps_keep_their_batches(ranks, tmp_path):
    """With a constraint_dataset of 8 prompts and 4 prompts per process and step, every constraint step is one pass
    over them, split between the processes; every objective step reads what the run without them read."""
    result = _launch(tmp_path, "--constraint-prompts")
    assert result.returncode == 0, result.stderr[-3000:]
    own = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for i, step in enumerate(own[0]["steps"]):
        assert step["constraint"] == ranks[0]["steps"][i]["constraint"]  # the same coins
        if step["constraint"]:
            first, second = (set(r["steps"][i]["prompts"]) for r in own)
            assert len(first) == len(second) == 4 and not first & second
            assert all("tell me" in p for p in first | second) and len(first | second) == 8
        else:
            for r, plain in zip(own, ranks):
                assert r["steps"][i]["prompts"] == plain["steps"][i]["prompts"]
                assert torch.equal(r["steps"][i]["inputs"]["input_ids"], plain["steps"][i]["inputs"]["input_ids"])


def test_a_world_of_one_under_a_multi_process_launch_is_refused(monkeypatch):
    # what torchrun without use_cpu gives on a machine without GPUs: WORLD_SIZE=2, but each process a world of 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(L3MConfigError, match="^use_cpu: 2 processes were launched .* each sees a world of 1"):
        check_launch(SimpleNamespace(world_size=1))
    check_launch(SimpleNamespace(world_size=2))


@pytest.mark.slow
def test_processes_that_did_not_join_a_group_are_refused(tmp_path):
    result = _launch(tmp_path, "--no-use-cpu")
    assert result.returncode != 0
    assert "use_cpu: 2 processes were launched (WORLD_SIZE=2) but each sees a world of 1" in result.stderr


_LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "MASTER_ADDR",
                     "MASTER_PORT", "ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP")


@pytest.fixture
def clean_launch_env(monkeypatch):
    for name in _LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_accelerate_cpu_launch_that_started_one_process_is_reported(clean_launch_env, caplog):
    # what `accelerate launch --cpu --num_processes 2 script.py` (accelerate 1.15, no --mpirun_hostfile) gives its
    # single process: ACCELERATE_USE_CPU=True and MASTER_ADDR/MASTER_PORT, no world size
    clean_launch_env.setenv("ACCELERATE_USE_CPU", "True")
    clean_launch_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_launch_env.setenv("MASTER_PORT", "29500")
    with caplog.at_level("WARNING", logger="l3m.training.distributed"):
        check_launch(SimpleNamespace(world_size=1, use_cpu=True))
    lines = [r.getMessage() for r in caplog.records if r.name == "l3m.training.distributed"]
    assert len(lines) == 1 and lines[0].startswith("accelerate launch --cpu started this run as ONE process")
    assert "\n" not in lines[0]


@pytest.mark.parametrize("env", [
    {"ACCELERATE_USE_CPU": "True"},  # `accelerate launch --cpu` asked for one process: no MASTER_ADDR
    {"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1"},
    {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "OMPI_COMM_WORLD_SIZE": "2"},  # with a hostfile: mpirun
    {},  # a plain `python script.py`
])
def test_other_single_process_launches_are_not_reported(clean_launch_env, caplog, env):
    for name, value in env.items():
        clean_launch_env.setenv(name, value)
    with caplog.at_level("WARNING", logger="l3m.training.distributed"):
        check_launch(SimpleNamespace(world_size=1, use_cpu=True))
    assert not [r for r in caplog.records if r.name == "l3m.training.distributed"]


def test_fsdp_config_on_cpu_is_reported_as_ddp_once(clean_launch_env, caplog):
    # accelerate launch with an FSDP config sets ACCELERATE_USE_FSDP; with use_cpu accelerate trains DDP instead
    clean_launch_env.setenv("ACCELERATE_USE_FSDP", "true")
    clean_launch_env.setenv("WORLD_SIZE", "2")
    with caplog.at_level("WARNING", logger="l3m.training.distributed"):
        clean_launch_env.setenv("RANK", "1")
        check_launch(SimpleNamespace(world_size=2, use_cpu=True))  # only the first process says it
        assert not [r for r in caplog.records if r.name == "l3m.training.distributed"]
        clean_launch_env.setenv("RANK", "0")
        check_launch(SimpleNamespace(world_size=2, use_cpu=False))  # on GPUs accelerate does shard
        assert not [r for r in caplog.records if r.name == "l3m.training.distributed"]
        check_launch(SimpleNamespace(world_size=2, use_cpu=True))
    lines = [r.getMessage() for r in caplog.records if r.name == "l3m.training.distributed"]
    assert len(lines) == 1 and "asks for FSDP, but with use_cpu accelerate does not shard" in lines[0]


def test_only_weight_sharding_runs_every_decoding_step_on_every_process():
    from accelerate.utils import DistributedType

    def accelerator(kind, processes=2, zero_stage=None):
        plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
        return SimpleNamespace(num_processes=processes, distributed_type=kind,
                               state=SimpleNamespace(deepspeed_plugin=plugin))

    assert shards_weights(accelerator(DistributedType.FSDP))
    assert shards_weights(accelerator(DistributedType.DEEPSPEED, zero_stage=3))
    assert not shards_weights(accelerator(DistributedType.DEEPSPEED, zero_stage=2))
    assert not shards_weights(accelerator(DistributedType.MULTI_CPU))
    assert not shards_weights(accelerator(DistributedType.FSDP, processes=1))


def test_sampling_and_the_logprob_pass_on_an_fsdp2_sharded_model_match_the_unsharded_model(tmp_path):
    """FSDP2 on CPU (gloo), without accelerate (which does not shard on CPU, docs/scaling.md): each process samples
    from the sharded model with synced decoding, its responses ending at other steps than the other process's; the
    responses, log-probabilities and FSDP-averaged gradients are the unsharded model's."""
    result = _launch(tmp_path, worker=FSDP_WORKER)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["parameter_type"] == "DTensor" for r in ranks)  # the weights were sharded
    lengths = [[len(ids) for ids in r["responses"]["sharded"]] for r in ranks]
    assert lengths[0] != lengths[1] and min(min(x) for x in lengths) < 8  # responses ended at different steps
    for r in ranks:
        assert r["responses"]["sharded"] == r["responses"]["unsharded"]
        torch.testing.assert_close(r["logps"]["sharded"], r["logps"]["unsharded"], rtol=1e-5, atol=1e-5)
        assert r["grad_difference"] < 1e-5


def test_an_l3m_run_sharded_by_accelerates_fsdp2_trains_as_the_ddp_run(tmp_path):
    """6 steps (objective and constraint) of the tiny model on 2 CPU processes, once as DDP and once with accelerate
    made to apply its FSDP2 on CPU (the worker's one patch, see its docstring): the sharded run's weights are
    DTensors, its logs are the DDP run's and so are its parameters at the end."""
    runs = {}
    for name, flags in (("ddp", ()), ("fsdp", ("--fsdp",))):
        out = tmp_path / name
        out.mkdir()
        result = _launch(out, *flags, worker=FSDP_TRAINER_WORKER)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = torch.load(out / "params.pt", weights_only=False)
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert (ddp["distributed_type"], fsdp["distributed_type"]) == ("DistributedType.MULTI_CPU", "DistributedType.FSDP")
    assert fsdp["parameter_type"] == "DTensor"
    kinds = [log.get("step/constraint") for log in fsdp["log_history"] if "loss" in log]
    assert kinds.count(1.0) >= 2 and kinds.count(0.0) >= 2  # both step kinds ran sharded
    for a, b in zip(ddp["log_history"], fsdp["log_history"]):
        for key in ("loss", "constraints/length/value", "constraints/length/multiplier"):
            if key in a:
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4), key
    for name, value in ddp["params"].items():
        torch.testing.assert_close(fsdp["params"][name], value, rtol=1e-5, atol=1e-5)
