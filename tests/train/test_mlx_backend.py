"""The MLX backend (training.backend: mlx) on Linux with mlx[cpu]: the same trained tokens as the
torch path, a falling validation loss on the embedded model with a 4-bit base, a PEFT adapter
that gives MLX's logits in transformers+PEFT and passes llama.cpp parity, and the recipe's
checkpoint behaviours (resume, NaN rollback, early stopping) on a tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from train_helpers import WORDS, conversation, make_config, write_jsonl

from edentune.errors import EdentuneError
from edentune.train import mlx_backend, run

mlx = pytest.mark.mlx
needs_mlx = pytest.mark.skipif(not run.mlx_installed(), reason="pip install 'edentune[mlx]' (mlx[cpu] on Linux)")
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def peft_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path / "adapter_model.safetensors")


# -- backend selection and refusals (no MLX needed) ---------------------------------------------
def test_auto_is_mlx_only_on_apple_silicon_with_mlx(monkeypatch):
    monkeypatch.setattr(run, "mlx_installed", lambda: True)
    for system, machine, expected in (("Darwin", "arm64", "mlx"), ("Darwin", "x86_64", "torch"), ("Linux", "x86_64", "torch")):
        monkeypatch.setattr(run.platform, "system", lambda s=system: s)
        monkeypatch.setattr(run.platform, "machine", lambda m=machine: m)
        assert run.select_backend("auto") == expected
        assert run.select_backend("torch") == "torch"
    monkeypatch.setattr(run, "mlx_installed", lambda: False)
    assert run.select_backend("auto") == "torch"  # a Mac without the extra keeps the torch path
    with pytest.raises(EdentuneError, match="mlx / mlx-lm are not installed") as err:
        run.select_backend("mlx")
    assert "edentune[mlx]" in err.value.hint


def test_unsupported_combinations_are_refused(tmp_path, monkeypatch):
    from edentune.config import parse_config

    cfg = parse_config({"model": {"trust_remote_code": True}, "training": {"backend": "mlx"}})
    with pytest.raises(EdentuneError, match="trust_remote_code"):
        mlx_backend.check_supported(cfg, str(tmp_path))
    cfg = parse_config({"training": {"backend": "mlx"}})
    monkeypatch.setattr(mlx_backend, "mlx_installed", lambda: False)
    with pytest.raises(EdentuneError, match="needs mlx"):
        mlx_backend.check_supported(cfg, str(tmp_path))


def test_transformers5_rope_parameters_reach_mlx_lm():
    assert mlx_backend.mlx_model_config({"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}) == {"rope_theta": 1e5}
    scaled = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}
    assert mlx_backend.mlx_model_config({"rope_parameters": scaled})["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    assert mlx_backend.mlx_model_config({"rope_theta": 1e6, "rope_parameters": scaled}) == {}  # top-level wins, as in mlx-lm


@mlx
@needs_mlx
def test_architecture_mlx_lm_lacks_is_refused(tmp_path):
    from edentune.config import parse_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_real_arch"}))
    with pytest.raises(EdentuneError, match="no implementation of the 'not_a_real_arch' architecture"):
        mlx_backend.check_supported(parse_config({}), str(tmp_path))


# -- the same trained tokens --------------------------------------------------------------------
@mlx
@needs_mlx
def test_mlx_batches_train_exactly_the_torch_labels(embedded_dir, sample_dir):
    """On the bundled sample: the (inputs, targets) the MLX step consumes are the torch path's
    collated input_ids[:, :-1] and labels[:, 1:], token for token, in the same batches."""
    from transformers import DataCollatorForSeq2Seq

    from edentune.config import parse_config
    from edentune.models import load_tokenizer
    from edentune.data.encode import IGNORE, encode_all, read_conversations

    tok = load_tokenizer(embedded_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    convs = read_conversations(sample_dir / "eden_sample.jsonl")
    examples, _ = encode_all(tok, convs, 4096, "drop", "You are Eden.")
    cfg = parse_config({"training": {"per_device_batch_size": 4, "gradient_accumulation_steps": 2}})
    torch_collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    steps = mlx_backend.step_order(examples, cfg, epoch=0)
    assert sorted(i for step in steps for mb in step for i in mb) == list(range(len(examples)))
    trained = 0
    for step in steps:
        for mb in step:
            batch = [examples[i] for i in mb]
            inputs, targets = mlx_backend.collate(batch, tok.pad_token_id)
            ref = torch_collate([{"input_ids": e.input_ids, "labels": e.labels} for e in batch])
            width = ref["labels"].shape[1]
            assert np.array_equal(targets[:, :width - 1], ref["labels"][:, 1:].numpy())
            assert (targets[:, width - 1:] == IGNORE).all()  # MLX's extra shape padding trains nothing
            assert np.array_equal(inputs[:, :width - 1], ref["input_ids"][:, :-1].numpy())
            trained += int((targets != IGNORE).sum())
            for row, e in zip(targets, batch):  # each reply's last trained token is <|im_end|>
                assert row[np.flatnonzero(row != IGNORE)[-1]] == im_end
    assert trained == sum(e.trained_tokens - (e.labels[0] != IGNORE) for e in examples)


# -- the embedded model: train, convert, compare logits, export --------------------------------
@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    """2 LoRA steps of the embedded SmolLM2 on short conversations with one reply. The base is fp32:
    on the CPU build MLX's 4-bit matmul is slower than fp32 (QLoRA is covered on the tiny model)."""
    from edentune.config import parse_config
    from edentune.train import train

    tmp = tmp_path_factory.mktemp("mlx-embedded")
    rng = random.Random(0)
    answer = "Eden here: apple river stone."
    train_f = write_jsonl(tmp / "train.jsonl", [conversation(rng, 0, answer=answer) for _ in range(8)])
    val_f = write_jsonl(tmp / "val.jsonl", [conversation(rng, 0, answer=answer) for _ in range(2)])
    cfg = parse_config({
        "preset": "embedded",
        "model": {"name_or_path": "embedded", "architecture": "llama", "max_seq_len": 128, "system_prompt": "You are Eden."},
        "quantization": {"load_in_4bit": False},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"backend": "mlx", "output_dir": str(tmp / "run"), "max_steps": 2, "per_device_batch_size": 2,
                     "gradient_accumulation_steps": 1, "warmup_steps": 0, "learning_rate": 2e-3, "logging_steps": 1,
                     "eval_steps": 1, "save_steps": 2, "early_stopping_patience": None, "gradient_checkpointing": False,
                     "optimizer": "paged_adamw_8bit", "seed": 0},
        "data": {"train_files": [train_f], "validation_files": [val_f]},
    })
    return cfg, train(cfg)


@mlx
@needs_mlx
def test_mlx_trains_the_embedded_model_and_validation_loss_falls(embedded_run):
    cfg, result = embedded_run
    run = result.run_dir
    evals = [e["eval_loss"] for e in events(run, "eval")]
    assert len(evals) == 2 and evals[-1] < evals[0] - 0.5
    trains = events(run, "train")
    assert [e["step"] for e in trains] == [1, 2]
    assert all(e["loss"] > 0 and e["grad_norm"] > 0 and e["trained_tokens_per_s"] > 0 for e in trains)
    assert [e["learning_rate"] for e in trains] == pytest.approx([2e-3, 1e-3])  # transformers' cosine over 2 steps
    assert result.metrics["backend"] == "mlx" and result.metrics["global_step"] == 2
    assert json.loads((run / "manifest.json").read_text())["device"].startswith("mlx-")
    ckpt = run / "checkpoint-2"
    assert (ckpt / "trainer_state.json").exists() and (ckpt / "optimizer.safetensors").exists()
    # PEFT layout: names, transposed shapes, alpha; mlx-lm's own files beside it.
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["target_modules"]) == sorted(ALL_PROJ)
    weights = peft_weights(result.adapter_dir)
    assert len(weights) == 30 * 7 * 2
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 576)
    assert weights["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (576, 4)
    assert (result.adapter_dir / "mlx" / "adapters.safetensors").exists()


@mlx
@needs_mlx
def test_converted_adapter_gives_mlx_logits_in_transformers_peft(embedded_run, embedded_dir):
    """fp32, unquantized base on both sides: the PEFT adapter reproduces MLX's LoRA model."""
    import mlx.core as mx
    import torch
    from mlx_lm.tuner.utils import load_adapters
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, result = embedded_run
    fp32 = cfg.updated({"training.precision": "fp32"})
    ids = [1, 504, 3458, 282, 4193, 314, 253, 1789, 30, 2, 198, 1, 520, 9531]
    model = mlx_backend.load_mlx_model(fp32, embedded_dir, quantize=False)
    base_mlx = np.array(model(mx.array([ids])))
    load_adapters(model, str(result.adapter_dir / "mlx"))  # mlx-lm's own loader reads our mlx-lm layout
    tuned_mlx = np.array(model(mx.array([ids])))

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32), str(result.adapter_dir))
    with torch.no_grad():
        tuned_hf = hf(torch.tensor([ids])).logits[0].numpy()
    effect = np.abs(tuned_mlx - base_mlx).max()
    diff = np.abs(tuned_mlx[0] - tuned_hf).max()
    assert effect > 0.05  # the adapter changes the logits far more than the tolerance below
    assert diff < 2e-3, f"max |MLX - PEFT| = {diff} (adapter effect {effect})"  # measured: ~1e-4 of logits up to ~30


@mlx
@needs_mlx
def test_mlx_adapter_exports_and_passes_llama_cpp_parity(embedded_run, tmp_path, monkeypatch):
    from edentune.export import export_adapter, parity

    monkeypatch.setattr(parity, "PROBE_CONVERSATIONS", [parity.PROBE_CONVERSATIONS[2]])
    cfg, result = embedded_run
    exported = export_adapter(cfg, result.adapter_dir, tmp_path / "export", verify=True)
    exact = next(iter(exported.report["logits"].values()))
    assert exact["passed"] and exact["top1_agreement"] >= 0.95 and exported.report["template"]["passed"]
    assert exported.report["lora"] == {"r": 4, "alpha_in_gguf": 8.0, "tensors": 30 * 7}


# -- recipe behaviours on a tiny model ----------------------------------------------------------
def tiny_cfg(model_dir, data, out, **training):
    return make_config(model_dir, *data, out, backend="mlx", **training)


@mlx
@needs_mlx
def test_qlora_base_is_mlx_4bit_with_trainable_lora_only(tiny_llama_dir, small_data, tmp_path):
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.lora import LoRALinear

    cfg = tiny_cfg(tiny_llama_dir, small_data, tmp_path / "run").updated({"quantization.load_in_4bit": True})
    model = mlx_backend.load_mlx_model(cfg, tiny_llama_dir)
    keys = mlx_backend.add_lora(cfg, model)
    assert keys == sorted(f"{'mlp' if p in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{p}" for p in ALL_PROJ)
    lora = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 2 * 7 and all(isinstance(m.linear, nn.QuantizedLinear) and m.linear.bits == 4 for m in lora)
    assert all(m.scale == pytest.approx(8 / 4) for m in lora)  # alpha / r
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)


@mlx
@needs_mlx
def test_chunked_logits_give_the_same_loss_and_gradients(tiny_llama_dir, small_data, tmp_path, monkeypatch):
    """Logits at trained positions, in checkpointed chunks: the same numbers as one pass."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from edentune.train import trainer

    cfg = tiny_cfg(tiny_llama_dir, small_data, tmp_path / "run")
    model = mlx_backend.load_mlx_model(cfg, tiny_llama_dir)
    mlx_backend.add_lora(cfg, model)
    head = mlx_backend.output_head(model)
    assert head is not None
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 1000, (2, 48)).astype(np.int32)
    targets = np.where(rng.random((2, 48)) < 0.5, rng.integers(0, 1000, (2, 48)), -100).astype(np.int32)
    batch = (mx.array(inputs), mx.array(targets), mx.array(mlx_backend.trained_positions(targets)))

    def loss_and_grads(loss):
        (total, n), grads = nn.value_and_grad(model, lambda m, *b: loss(m, *b))(model, *batch)
        return total.item(), n.item(), dict(tree_flatten(grads))

    one_pass = loss_and_grads(mlx_backend.make_loss(head))
    full_logits = loss_and_grads(mlx_backend.make_loss(None))  # the model's own forward, all positions
    monkeypatch.setattr(trainer, "LOGITS_CHUNK_ELEMENTS", model.args.vocab_size * 7)  # 7-token chunks
    chunked = loss_and_grads(mlx_backend.make_loss(head))
    assert one_pass[1] == int((targets != -100).sum())
    for other in (full_logits, chunked):
        assert other[0] == pytest.approx(one_pass[0], rel=1e-5) and other[1] == one_pass[1]
        assert max(np.abs(np.array(other[2][k]) - np.array(one_pass[2][k])).max() for k in one_pass[2]) < 1e-4


@mlx
@needs_mlx
def test_resume_equals_uninterrupted(tiny_llama_dir, small_data, tmp_path):
    """Interrupted after checkpoint-6 in epoch 2, resumed: the same adapter as an uninterrupted run
    (data order, optimizer moments, schedule and dropout RNG restored)."""
    from edentune.train import train

    class Interrupt(Exception):
        pass

    class StopAfter:
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 7:
                raise Interrupt

    def cfg(name):
        c = tiny_cfg(tiny_llama_dir, small_data, tmp_path / name, max_steps=8, eval_steps=3, save_steps=3)
        c.lora.dropout = 0.1
        return c

    reference = train(cfg("reference"))
    with pytest.raises(Interrupt):
        train(cfg("killed"), callbacks=[StopAfter()])
    assert not (tmp_path / "killed" / "adapter").exists()
    with pytest.raises(EdentuneError, match="--resume"):
        train(cfg("killed"))
    resumed = train(cfg("killed"), resume=True)
    a, b = peft_weights(reference.adapter_dir), peft_weights(resumed.adapter_dir)
    assert a.keys() == b.keys() and max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-6
    assert events(tmp_path / "killed", "start")[-1]["resume_from"].endswith("checkpoint-6")


@mlx
@needs_mlx
def test_nan_rolls_back_to_the_last_checkpoint_with_half_the_lr(tiny_llama_dir, small_data, tmp_path, monkeypatch):
    from edentune.train import train

    make_loss = mlx_backend.make_loss
    calls = {"n": 0}

    def nan_once_at_step_5(head):
        loss = make_loss(head)

        def patched(model, *batch):
            calls["n"] += 1
            total, n = loss(model, *batch)
            return (total * float("nan"), n) if calls["n"] == 5 * 2 + 2 else (total, n)  # 2 micro-batches a step, 2 evals
        return patched

    monkeypatch.setattr(mlx_backend, "make_loss", nan_once_at_step_5)
    result = train(tiny_cfg(tiny_llama_dir, small_data, tmp_path / "run", max_steps=8, learning_rate=1e-3, eval_steps=4, save_steps=4))
    [rollback] = events(result.run_dir, "nan_rollback")
    assert rollback["checkpoint"].endswith("checkpoint-4") and rollback["learning_rate"] == pytest.approx(5e-4)
    assert result.metrics["nan_rollbacks"] == 1 and result.metrics["global_step"] == 8
    lrs = {e["step"]: e["learning_rate"] for e in events(result.run_dir, "train")}  # later entries win
    assert lrs[4] == pytest.approx(1e-3) and lrs[5] == pytest.approx(5e-4) and lrs[8] == pytest.approx(5e-4)
    assert all(np.isfinite(w).all() for w in peft_weights(result.adapter_dir).values())


@mlx
@needs_mlx
def test_early_stopping_keeps_the_best_checkpoint(tiny_llama_dir, tmp_path):
    from edentune.train import train

    rng = random.Random(0)
    train_f = write_jsonl(tmp_path / "t.jsonl", [conversation(rng, 0, answer="apple " * 8) for _ in range(16)])
    val_f = write_jsonl(tmp_path / "v.jsonl", [conversation(rng, 0, answer=" ".join(WORDS[1:9])) for _ in range(4)])
    cfg = tiny_cfg(tiny_llama_dir, (train_f, val_f), tmp_path / "run", max_steps=40, learning_rate=1e-2,
                   early_stopping_patience=2, eval_steps=2, save_steps=2, save_total_limit=2)
    result = train(cfg)
    evals = events(result.run_dir, "eval")
    best = min(evals, key=lambda e: e["eval_loss"])
    assert result.metrics["stopped_early"] and result.metrics["global_step"] < 40
    assert result.best_checkpoint.name == f"checkpoint-{best['step']}" and evals[-1]["step"] == best["step"] + 4
    final, kept = peft_weights(result.adapter_dir), peft_weights(result.best_checkpoint)
    assert all(np.array_equal(final[k], kept[k]) for k in kept)
    assert result.metrics["final_eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-5)


# -- the planner for Apple unified memory (no MLX needed) ----------------------------------------
def test_apple_plan_uses_the_gpu_share_of_unified_memory():
    from edentune.config import config_for_model
    from edentune.train.plan import KNOWN_ARCHITECTURES, Arch, apple_gpu_budget_gb, estimate_apple

    assert [round(apple_gpu_budget_gb(r), 1) for r in (16, 24, 36, 64)] == [10.7, 16.0, 24.0, 48.0]
    cfg = config_for_model("qwen2.5-14b")
    arch = KNOWN_ARCHITECTURES[cfg.model.name_or_path]
    plan = estimate_apple(cfg, arch, 24)
    assert plan.device_gb == pytest.approx(16.0) and not plan.fits
    assert plan.terms["base weights (MLX 4-bit)"] == pytest.approx(Arch.from_config(arch).params * 4.5 / 8 / 2**30)
    assert any("per_device_batch_size: 2" in a for a in plan.advice) and any("iogpu.wired_limit_mb" in a for a in plan.advice)
    one = cfg.updated({"training.per_device_batch_size": 1, "training.gradient_accumulation_steps": 32})
    assert estimate_apple(one, arch, 24).fits and not estimate_apple(one, arch, 16).fits
    assert estimate_apple(one, arch, 24, working_set_gb=12.0).device_gb == 12.0  # a Mac's own number wins
    unquantized = estimate_apple(one.updated({"quantization.load_in_4bit": False}), arch, 36)
    assert not unquantized.fits and any("load_in_4bit: true" in a for a in unquantized.advice)
