"""`edentune train` in two CPU processes (accelerate's launcher, gloo) equals one process with the
same global batch: adapter, logged losses and gradient norms, evaluation loss, trained tokens; also
after a NaN verdict seen by one rank only, and after SIGKILL of the launcher and `--resume`.

The data gives the two ranks very different numbers of trained tokens in every optimizer step
(long and short replies alternate in the length-sorted order), which is what exposes a wrong loss
normalisation. Measured on this data (6 steps, Adam, lr 1e-3; adapter values up to 0.13):
  correct (global token count, x num_processes):       max |adapter difference| 1.3e-7
  global count without x num_processes (old trainer):  3.5e-4, and logged loss / grad norm halved
  per-rank token mean (Trainer without token averaging): 8.1e-3
so the tolerance below (1e-5) separates them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import conversation, make_config, write_jsonl

from edentune.train import train
from edentune.train.distributed import free_port
from edentune.train.trainer import EDENTUNE_STATE, EdenTrainer

SRC = str(Path(__file__).resolve().parents[2] / "src")
HERE = str(Path(__file__).resolve().parent)
# Reply lengths (words): sorted by length, each global batch of 4 is [long, short, shorter, shortest]
# in rank order 0, 1, 0, 1 (one example per micro-batch, 2 accumulation steps).
REPLY_WORDS = [120, 60, 58, 56, 55, 30, 29, 28, 27, 15, 14, 13, 12, 6, 5, 4]
TOL = 1e-5


def patch_non_finite_grad_norm(at: int, rank: int | None = None) -> None:
    """Make the gradient norm of optimizer step `at` read NaN, once, on `rank` only (None: any).
    Only that process then sees a non-finite value: the others must learn it from the trainer's
    cross-process verdict, or they would run on alone and the launch would hang."""
    original = EdenTrainer._clip_grad_norm
    fired = []

    def clip(self, model):
        norm = original(self, model)
        mine = rank is None or int(os.environ.get("RANK", "0")) == rank
        if mine and not fired and self.state.global_step + 1 == at:
            fired.append(at)
            norm = torch.tensor(float("nan"))
            if self.non_finite is None:
                self.non_finite = f"gradient norm nan at step {at}"
        return norm

    EdenTrainer._clip_grad_norm = clip


SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, TESTS_DIR)
    import yaml
    from transformers import TrainerCallback
    from edentune.config import parse_config
    from edentune.train import train
    from test_train_distributed import patch_non_finite_grad_norm

    cfg_file, nan_step, nan_rank, sleep_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    if nan_step:
        patch_non_finite_grad_norm(nan_step, nan_rank)

    class Slow(TrainerCallback):
        def on_step_end(self, *a, **k):
            time.sleep(sleep_s)

    train(parse_config(yaml.safe_load(open(cfg_file))), callbacks=[Slow()])
""")


def launch(script: Path, cfg_file: Path, nan_step: int = 0, nan_rank: int = 0, sleep_s: float = 0.0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(script), str(cfg_file), str(nan_step), str(nan_rank), str(sleep_s)]
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def max_diff(a: Path, b: Path) -> float:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def result(run: Path) -> dict:
    return json.loads((run / "result.json").read_text())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    """Data, configs (one process: 2 x 2 accumulation; two processes: 1 x 2 accumulation, both a
    global batch of 4) and the one-process reference run."""
    root = tmp_path_factory.mktemp("ddp")
    rng = random.Random(0)
    words = REPLY_WORDS[:]
    rng.shuffle(words)
    train_f = write_jsonl(root / "train.jsonl", [conversation(rng, n) for n in words])
    val_f = write_jsonl(root / "val.jsonl", [conversation(rng, n) for n in (9, 40, 17)])  # 3: the last eval batch is evened out

    def config(name: str, processes: int) -> tuple:
        # 4 steps per epoch: max_steps 6 crosses an epoch (per-epoch seeding), checkpoints at 3 and 6.
        cfg = make_config(tiny_llama_dir, train_f, val_f, root / name, max_steps=6, per_device_batch_size=4 // (2 * processes),
                          gradient_accumulation_steps=2, eval_steps=3, save_steps=3)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        return cfg, path

    reference = train(config("reference", 1)[0]).run_dir
    script = root / "run.py"
    script.write_text(SCRIPT.replace("TESTS_DIR", repr(HERE)))
    return root, config, reference, script


@pytest.fixture(scope="module")
def single_nan(setup) -> Path:
    """One process, gradient norm NaN at step 5: rolled back to checkpoint-3 with half the LR."""
    _, config, _, _ = setup
    original = EdenTrainer._clip_grad_norm
    try:
        patch_non_finite_grad_norm(at=5)
        return train(config("single-nan", 1)[0]).run_dir
    finally:
        EdenTrainer._clip_grad_norm = original


def test_nan_rollback_keeps_trained_tokens(setup, single_nan):
    reference, run = setup[2], single_nan
    assert result(run)["nan_rollbacks"] == 1 and events(run, "nan_rollback")[0]["checkpoint"].endswith("checkpoint-3")
    # Steps 1-3 restored from checkpoint-3, steps 4-6 trained again: the same tokens as the clean run
    # (before the fix: only the steps after the rollback, 4-6, were counted).
    assert result(run)["trained_tokens"] == result(reference)["trained_tokens"] > 0
    saved = json.loads((run / "checkpoint-3" / EDENTUNE_STATE).read_text())["trained_tokens"]
    assert 0 < saved < result(run)["trained_tokens"]


def test_two_processes_equal_one_with_the_same_global_batch_and_agree_on_nan(setup, single_nan):
    root, config, reference, script = setup
    single = single_nan  # the one-process twin: the same NaN at step 5
    _, cfg_file = config("ddp-nan", 2)
    proc = launch(script, cfg_file, nan_step=5, nan_rank=1)  # only rank 1 sees the NaN
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    ddp = root / "ddp-nan"

    assert max_diff(single, ddp) <= TOL
    assert result(ddp)["nan_rollbacks"] == 1 and result(ddp)["trained_tokens"] == result(single)["trained_tokens"]
    for kind, key in (("train", "loss"), ("train", "grad_norm"), ("eval", "eval_loss")):
        a, b = events(single, kind), events(ddp, kind)
        assert [e["step"] for e in a] == [e["step"] for e in b]  # logged once per step, by one process
        assert [e[key] for e in b] == pytest.approx([e[key] for e in a], rel=1e-5)
    assert len(events(ddp, "start")) == 1 and events(ddp, "start")[0]["processes"] == 2
    assert json.loads((ddp / "manifest.json").read_text())["processes"] == 2
    # Each rank's RNG state went into the one atomic checkpoint; no temporary folder is left.
    assert {p.name for p in (ddp / "checkpoint-6").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not list(ddp.glob(".checkpoint-*"))


FSDP2_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, TESTS_DIR)
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM
    from edentune.train import trainer
    from test_train_loss import _batch

    model_dir, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    trainer.LOGITS_CHUNK_ELEMENTS = 3 * 49152  # several chunks, recomputed in backward with the head weight

    def lora_model():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                               init_lora_weights=False))  # random A and B: every LoRA weight gets a gradient

    batch = _batch(model_dir)
    plain = lora_model()
    loss, n = trainer.trained_token_loss(plain, batch)
    (loss / n).backward()
    sharded = lora_model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in sharded.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(sharded, mesh=mesh, reshard_after_forward=True)  # embeddings and the (tied) head: the root unit
    s_loss, s_n = trainer.trained_token_loss(sharded, batch)
    (s_loss / s_n).backward()
    grads = dict(plain.named_parameters())
    diff = max((p.grad.full_tensor() - grads[name].grad).abs().max().item()
               for name, p in sharded.named_parameters() if p.requires_grad)
    q = next(p for name, p in sharded.named_parameters() if name.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
    if dist.get_rank() == 0:
        json.dump({"loss": [loss.item(), s_loss.item()], "tokens": [n, s_n], "max_grad_diff": diff,
                   "trainable": sum(p.requires_grad for p in sharded.parameters()),
                   "q_type": type(q).__name__, "q_local": q.to_local().numel(), "q_full": q.numel()}, open(out, "w"))
    dist.destroy_process_group()
""")


def test_trained_token_loss_under_fsdp2_sharding_on_cpu(tiny_llama_dir, tmp_path):
    """torch's FSDP2 (`fully_shard`) over gloo on CPU: the loss, computed inside the sharded
    model's forward (hooks) with the head's logits chunked and recomputed in backward, and every
    LoRA gradient equal the unsharded model's. accelerate 1.15 enables FSDP only for GPU process
    groups (a CPU launch with an FSDP config runs DDP: refused, see below), so the Trainer-level
    FSDP-QLoRA run is benchmarks/gpu_fsdp_check.py, for a machine with 2 GPUs."""
    script, out = tmp_path / "fsdp2.py", tmp_path / "fsdp2.json"
    script.write_text(FSDP2_SCRIPT.replace("TESTS_DIR", repr(HERE)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), tiny_llama_dir, str(out)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["q_type"] == "DTensor" and r["q_local"] * 2 == r["q_full"]  # each rank holds half the rows
    assert r["tokens"][0] == r["tokens"][1] > 0 and r["trainable"] == 2 * 3 * 2
    assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-6)
    assert r["max_grad_diff"] <= 1e-6


def test_known_broken_combinations_are_refused(tiny_llama_dir, tmp_path):
    from edentune.errors import EdentuneError
    from edentune.train.distributed import Processes, check_supported

    cfg = make_config(tiny_llama_dir, "unused.jsonl", None, tmp_path / "run", optimizer="adamw_torch")
    cfg.quantization.load_in_4bit = True
    with pytest.raises(EdentuneError, match="FSDP needs CUDA"):
        check_supported(cfg, "cpu", Processes(num=2, index=0, local_index=0, fsdp=True))
    check_supported(cfg, "cpu", Processes(num=2, index=0, local_index=0, fsdp=False))  # DDP on CPU: supported
    check_supported(cfg, "cpu", Processes(num=1, index=0, local_index=0, fsdp=True))  # one process: nothing to shard
    bf16 = cfg.updated({"training.precision": "bf16", "quantization.compute_dtype": "bf16"})
    check_supported(bf16, "cuda", Processes(2, 0, 0, fsdp=True))  # FSDP-QLoRA as docs/multi-gpu.md configures it
    with pytest.raises(EdentuneError, match="8-bit"):
        check_supported(bf16.updated({"training.optimizer": "paged_adamw_8bit"}), "cuda", Processes(2, 0, 0, fsdp=True))
    with pytest.raises(EdentuneError, match="compute_dtype"):
        check_supported(bf16.updated({"quantization.compute_dtype": "fp16"}), "cuda", Processes(2, 0, 0, fsdp=True))


def test_sigkill_of_the_launcher_then_resume_matches(setup):
    root, config, reference, script = setup
    _, cfg_file = config("killed", 2)
    killed = root / "killed"
    proc = launch(script, cfg_file, sleep_s=0.7)
    try:
        deadline = time.time() + 300
        while not (killed / "checkpoint-3").exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "no checkpoint-3 in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only: torchrun's workers run in sessions of their own
    finally:
        proc.wait()
    logged = (killed / "metrics.jsonl").read_text()
    time.sleep(4)  # workers that outlived their launcher would log and save on (a step takes ~1 s here)
    assert (killed / "metrics.jsonl").read_text() == logged
    assert not (killed / "adapter").exists() and not (killed / "checkpoint-6").exists()

    # Resume through the CLI shortcut, which starts accelerate's launcher itself.
    out = subprocess.run([sys.executable, "-m", "edentune", "train", str(cfg_file), "--resume", "--num-processes", "2"],
                         env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "accelerate.commands.launch" in out.stderr
    assert max_diff(reference, killed) <= TOL
    assert result(killed)["trained_tokens"] == result(reference)["trained_tokens"]  # restored from checkpoint-3
    assert [e["resume_from"] for e in events(killed, "start")] == [None, str(killed / "checkpoint-3")]


def test_planner_gives_per_process_memory():
    from edentune.config import config_for_model
    from edentune.train.plan import estimate, estimate_per_process, model_config_for

    cfg = config_for_model("qwen2.5-14b").updated({"training.optimizer": "adamw_torch"})
    arch = model_config_for(cfg)
    one = estimate(cfg, arch, 16)
    ddp = estimate_per_process(cfg, arch, 16, 2, fsdp=False)
    fsdp = estimate_per_process(cfg, arch, 16, 2, fsdp=True)
    assert ddp.terms["base weights"] == one.terms["base weights"] and ddp.total_gb > one.total_gb  # a full copy each
    assert fsdp.terms["base weights"] < one.terms["base weights"] / 2 + 0.1  # sharded (and no fp32 embeddings)
    assert fsdp.total_gb < 16 * 0.95 < one.total_gb and fsdp.fits and not ddp.fits
    assert "FSDP" in ddp.advice[0]
