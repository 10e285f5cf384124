"""The round's plan: the peak memory of every step of a cycle round, and its disk, against the device.

`edentune plan CONFIG` and `edentune cycle plan WS` print it. A round runs its steps one after the
other, each in its own memory; each is estimated where it runs, from the config and the base's
architecture numbers (nothing is loaded):

- train: the training planner (`train.plan.estimate`, `estimate_apple` for MLX on a Mac); on a
  CUDA machine the offloaded layer inputs wait in host RAM;
- evaluate: per backend (`evaluate.memory`): transformers in 16 bits, transformers on the NF4
  base, gguf (llama.cpp on the Q4_K_M base GGUF + the adapter GGUF, what Ollama serves). The
  chosen backend is `evaluation.backend`, or for `auto` the fastest that fits;
- export: the adapter GGUF is small; the llama.cpp parity check of the cycle's export
  (`export.verify`) loads the HF base in fp32 on CPU next to an f16 GGUF of it; the merged route
  merges in fp32 and writes model.gguf;
- smoke check (deploy): Ollama serving the Q4_K_M base + adapter at `export.num_ctx`, and before
  that, llama.cpp's reference answers on the base GGUF the round has (the run's own file, or
  `evaluation.base_gguf`, else the f16 copy the parity check writes).

Where each runs: on CUDA, GPU memory for training, evaluation and Ollama, host RAM for the
export and llama.cpp's CPU references; on a Mac, Metal's share of unified memory (about 2/3 of RAM
up to 36 GB) for what runs on the GPU and the whole RAM less the system's for the rest; on CPU,
RAM. When a step does not fit, the planner changes settings in the order that frees most (the
training planner's own advice; the evaluation backend; no parity check when the gate already
scored the GGUF files in llama.cpp) until it does, and says exactly which changes make the round
fit, or which step still does not.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..evaluate.memory import FASTEST_FIRST, Q4_K_M_BITS, eval_memory_terms
from ..train.plan import (CPU_HEADROOM, CPU_OVERHEAD_GB, CUDA_OVERHEAD_GB, GB, Arch, Plan, apple_gpu_budget_gb,
                         apple_options, estimate, estimate_apple, lora_param_count, scored_options)

APPLE_SYSTEM_GB = 4.0  # what macOS and the apps keep on a Mac (the training planner leaves the OS 4 GB too)
SMOKE_N_CTX = 1024  # deploy's llama.cpp references (export.deploy.smoke_references)
LLAMA_UBATCH = 512
OLLAMA_RUNNER_GB = 0.5  # Ollama's runner process besides the model (off CUDA)
HOST_TERMS = ("logits (all positions)", "runtime overhead")  # of a gguf evaluation: in host memory, not on the GPU
ADAPTER_BYTES = {"f32": 4, "f16": 2, "q8_0": 34 / 32}
MERGED_BITS = {"f16": 16, "q8_0": 8.5, "q4_k_m": Q4_K_M_BITS}
DEVICES = ("cuda", "apple", "cpu", "mps")


@dataclass
class StepPlan:
    step: str  # train | evaluate | export | smoke check
    where: str  # GPU | Metal | RAM
    terms: dict[str, float]  # GB on `where`
    limit_gb: float
    host_terms: dict[str, float] = field(default_factory=dict)  # GB in host RAM besides (CUDA / Metal steps)
    host_limit_gb: float | None = None
    detail: str = ""  # backend, route, ...

    @property
    def total_gb(self) -> float:
        return sum(self.terms.values())

    @property
    def host_gb(self) -> float:
        return sum(self.host_terms.values())

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.limit_gb and (self.host_limit_gb is None or self.host_gb <= self.host_limit_gb)

    @property
    def label(self) -> str:
        return f"{self.step} ({self.detail})" if self.detail else self.step


@dataclass
class RoundPlan:
    model: str
    device: str
    device_gb: float  # CUDA card, the Mac's RAM, or RAM
    ram_gb: float
    disk_free_gb: float | None
    steps: list[StepPlan]  # the round's steps with the settings below
    evaluation: dict[str, float]  # backend -> estimated peak of the evaluate step with it
    eval_backend: str
    changes: list[tuple[str, str]]  # (step, setting) the plan changed so that the round fits (empty: fits as configured)
    advice: list[str]  # steps that still do not fit, and why
    disk: dict[str, float]  # GB
    training: Plan | None = None
    config: object = None  # the RunConfig with the changes applied (what the round would run)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.steps) and self.disk_fits

    @property
    def disk_fits(self) -> bool:
        return self.disk_free_gb is None or sum(self.disk.values()) <= self.disk_free_gb

    def to_json(self) -> dict:
        return {"model": self.model, "device": self.device, "device_gb": self.device_gb, "ram_gb": self.ram_gb,
                "fits": self.fits, "eval_backend": self.eval_backend, "evaluation_gb": self.evaluation,
                "changes": [{"step": st, "set": text} for st, text in self.changes], "advice": self.advice, "disk_gb": self.disk, "disk_free_gb": self.disk_free_gb,
                "steps": [asdict(s) | {"total_gb": s.total_gb, "host_gb": s.host_gb, "fits": s.fits} for s in self.steps]}


def machine_ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def free_disk_gb(path: str | Path) -> float | None:
    path = Path(path).expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free / GB
    except OSError:
        return None


# -- the steps --------------------------------------------------------------------------------------
def _limits(device: str, device_gb: float, ram_gb: float) -> tuple[str, float, float]:
    """(where GPU work runs, its limit, the host RAM limit)."""
    if device == "cuda":
        return "GPU", device_gb, ram_gb * (1 - CPU_HEADROOM)
    if device == "apple":
        return "Metal", apple_gpu_budget_gb(device_gb), device_gb - APPLE_SYSTEM_GB
    return "RAM", ram_gb * (1 - CPU_HEADROOM), ram_gb * (1 - CPU_HEADROOM)


def _train_step(cfg, model_config, device: str, device_gb: float, ram_gb: float, wired_gb: float | None) -> tuple[StepPlan, Plan]:
    where, limit, host_limit = _limits(device, device_gb, ram_gb)
    if device == "apple":
        p = estimate_apple(cfg, model_config, device_gb, wired_gb)
        return StepPlan("train", where, dict(p.terms), p.limit_gb, detail="MLX QLoRA" if cfg.quantization.load_in_4bit else "MLX LoRA"), p
    p = estimate(cfg, model_config, device_gb if device == "cuda" else ram_gb, "cuda" if device == "cuda" else "cpu")
    host = {}
    if device == "cuda":
        arch = Arch.from_config(model_config)
        if cfg.training.offload_checkpoints and cfg.training.gradient_checkpointing:
            from ..train.plan import stream_bytes

            host["offloaded layer inputs (pinned)"] = (stream_bytes(cfg, "cuda") * p.tokens_per_micro_batch * arch.hidden
                                                       * arch.layers / GB)
        host["runtime overhead"] = CPU_OVERHEAD_GB
    quant = "QLoRA" if cfg.quantization.load_in_4bit else "LoRA"
    return StepPlan("train", where, dict(p.terms), p.limit_gb, host, host_limit if host else None, detail=quant), p


def _eval_steps(cfg, model_config, device: str, device_gb: float, ram_gb: float) -> dict[str, StepPlan]:
    where, limit, host_limit = _limits(device, device_gb, ram_gb)
    kind = "mps" if device in ("apple", "mps") else device
    out = {}
    for backend in FASTEST_FIRST.get(kind, FASTEST_FIRST["cpu"]):
        terms = eval_memory_terms(model_config, backend, device=kind, max_seq_len=cfg.model.max_seq_len,
                                  max_new_tokens=cfg.evaluation.max_new_tokens, base_gguf_bytes=_base_gguf_bytes(cfg))
        if where == "RAM":
            out[backend] = StepPlan("evaluate", where, terms, limit, detail=backend)
        elif backend == "gguf":  # llama-cpp-python's logits and the interpreter stay in host memory
            host = {k: v for k, v in terms.items() if k in HOST_TERMS}
            gpu = {k: v for k, v in terms.items() if k not in HOST_TERMS}
            if device == "cuda":  # the CUDA context is on the card; the interpreter in RAM
                gpu["runtime overhead"], host["runtime overhead"] = CUDA_OVERHEAD_GB, CPU_OVERHEAD_GB
            out[backend] = StepPlan("evaluate", where, gpu, limit, host, host_limit, detail=backend)
        else:
            out[backend] = StepPlan("evaluate", where, terms, limit, detail=backend)
    return out


def _base_gguf_bytes(cfg) -> int | None:
    """Size of the base GGUF the gguf backend would score, when the config names one that exists."""
    path = getattr(cfg.evaluation, "base_gguf", None)
    if path and Path(path).expanduser().is_file():
        return Path(path).expanduser().stat().st_size
    return None


def _q4_gb(arch: Arch, cfg) -> float:
    given = _base_gguf_bytes(cfg)
    return (given if given else arch.params * Q4_K_M_BITS / 8) / GB


def _own_gguf(cfg) -> bool:
    """The run has a GGUF of its own (the embedded model, a .gguf path): the llama.cpp checks use it."""
    m = cfg.model
    return m.name_or_path == "embedded" or m.name_or_path.endswith(".gguf") or bool(m.gguf_file)


def _export_step(cfg, model_config, device: str, device_gb: float, ram_gb: float, route: str) -> StepPlan:
    _, _, host_limit = _limits(device, device_gb, ram_gb)
    arch = Arch.from_config(model_config)
    lora = lora_param_count(arch, cfg.lora.r, cfg.lora.target_modules)
    terms: dict[str, float] = {}
    if route == "merged":
        terms["merged model (fp32, CPU)"] = arch.params * 4 / GB
        terms[f"model.gguf ({cfg.export.merged_dtype}) being written"] = arch.params * MERGED_BITS[cfg.export.merged_dtype] / 8 / GB
    elif getattr(cfg.export, "verify", True):
        # export.api.export_adapter(verify=True): parity.adapter_parity holds the HF base in fp32
        # with the PEFT adapter while llama.cpp evaluates the f16 reference GGUF (mmapped).
        terms["HF base + adapter in fp32 (parity check)"] = (arch.params + lora) * 4 / GB
        terms["f16 reference GGUF in llama.cpp"] = arch.params * 2 / GB
    terms["LoRA tensors (read + GGUF written)"] = lora * (4 + ADAPTER_BYTES[cfg.export.adapter_dtype]) / GB
    terms["runtime overhead"] = CPU_OVERHEAD_GB
    return StepPlan("export", "RAM", terms, host_limit, detail=route + (" + parity check" if route == "adapter" and getattr(cfg.export, "verify", True) else ""))


def _served_base(cfg) -> bool:
    """Deploy's llama.cpp references run on a quantized base GGUF: the run's own file, or
    `evaluation.base_gguf` (`export.api.smoke_base_gguf`); otherwise on an f16 copy of the HF base."""
    return _own_gguf(cfg) or bool(getattr(cfg.evaluation, "base_gguf", None))


def _smoke_step(cfg, model_config, device: str, device_gb: float, ram_gb: float, served_base: bool) -> StepPlan:
    """Deploy: llama.cpp's reference answers on CPU first (two contexts on one mmapped base), then
    Ollama serving the model. Ollama runs on the GPU / Metal when it has one, else in RAM."""
    where, limit, host_limit = _limits(device, device_gb, ram_gb)
    arch = Arch.from_config(model_config)
    lora = lora_param_count(arch, cfg.lora.r, cfg.lora.target_modules)
    adapter_gb = lora * ADAPTER_BYTES[cfg.export.adapter_dtype] / GB
    q4 = _q4_gb(arch, cfg)
    served = _serving_terms(arch, cfg.export.num_ctx, adapter_gb, q4)
    served["runtime overhead"] = CUDA_OVERHEAD_GB if device == "cuda" else OLLAMA_RUNNER_GB
    one = _serving_terms(arch, SMOKE_N_CTX, 0.0, 0.0)
    refs = {("base GGUF" if served_base else "f16 copy of the base (GGUF)"): q4 if served_base else arch.params * 2 / GB,
            "adapter GGUF": adapter_gb, f"2 contexts of {SMOKE_N_CTX} positions": 2 * sum(one.values()),
            "runtime overhead": CPU_OVERHEAD_GB}
    if where == "RAM":  # one after the other in the same RAM: the larger counts
        larger = max((served, "Ollama"), (refs, "llama.cpp references"), key=lambda x: sum(x[0].values()))
        return StepPlan("smoke check", "RAM", larger[0], limit, detail=larger[1])
    return StepPlan("smoke check", where, served, limit, refs, host_limit, detail="Ollama; references in RAM")


def _serving_terms(arch: Arch, n_ctx: int, adapter_gb: float, weights_gb: float) -> dict[str, float]:
    terms = {"base GGUF (Q4_K_M)": weights_gb, "adapter GGUF": adapter_gb,
             f"KV cache (f16, {n_ctx} positions)": 2 * arch.layers * n_ctx * arch.kv_dim * 2 / GB,
             "compute buffer": LLAMA_UBATCH * (arch.vocab + 4 * arch.intermediate) * 4 / GB}
    return {k: v for k, v in terms.items() if v}


def _disk(cfg, model_config, eval_backend: str, route: str) -> dict[str, float]:
    arch = Arch.from_config(model_config)
    t = cfg.training
    lora = lora_param_count(arch, cfg.lora.r, cfg.lora.target_modules)
    optim = 2 if "8bit" in t.optimizer else 8
    out = {}
    if cfg.model.name_or_path != "embedded":
        out["HF base weights (bf16, once)"] = arch.params * 2 / GB
    out[f"checkpoints ({t.save_total_limit} kept) + adapter, per round"] = (t.save_total_limit * lora * (4 + optim) + lora * 4) / GB
    out["adapter.gguf, per round (and its Ollama blob)"] = 2 * lora * ADAPTER_BYTES[cfg.export.adapter_dtype] / GB
    if eval_backend == "gguf" and not (_served_base(cfg)):
        out["Q4_K_M base GGUF (written once unless Ollama's blob is found) + its f16 source while quantizing"] = (
            arch.params * (Q4_K_M_BITS / 8 + 2)) / GB
    if getattr(cfg.export, "verify", True) and route == "adapter" and not cfg.model.name_or_path.endswith(".gguf"):
        out["f16 reference GGUF (parity check, once)"] = arch.params * 2 / GB
    if route == "merged":
        out[f"model.gguf ({cfg.export.merged_dtype}), per round"] = arch.params * MERGED_BITS[cfg.export.merged_dtype] / 8 / GB
    return out


# -- the plan ---------------------------------------------------------------------------------------
def plan_round(cfg, model_config, device: str = "cuda", device_gb: float = 24.0, *, ram_gb: float | None = None,
               disk_free_gb: float | None = None, route: str = "adapter", wired_gb: float | None = None,
               eval_backend: str | None = None) -> RoundPlan:
    """Every step of a round of `cfg` on `device` ("cuda": a card of `device_gb`, host RAM
    `ram_gb`; "apple": a Mac with `device_gb` of unified memory (`wired_gb`: its own Metal working
    set); "cpu": `device_gb` of RAM), changing settings until each fits where it can. `eval_backend`
    overrides `evaluation.backend`."""
    if device == "mps":
        device = "apple"
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    ram_gb = device_gb if device in ("apple", "cpu") else (ram_gb or machine_ram_gb())
    changes: list[tuple[str, str]] = []
    advice: list[str] = []

    # train: the training planner's changes, most memory first, until it fits
    train, tplan = _train_step(cfg, model_config, device, device_gb, ram_gb, wired_gb)
    if not train.fits:
        made: list[str] = []
        cfg, train, tplan = _fit_training(cfg, model_config, device, device_gb, ram_gb, wired_gb, made)
        changes += [("train", text) for text in made]
        if not train.fits:
            advice.append(f"train does not fit: ~{train.total_gb:.1f} GB of {train.limit_gb:.1f} GB on the {train.where} even with "
                          + ("these changes" if changes else "the smallest settings") + "; "
                          + "; ".join(tplan.advice[-1:] or ["pick a smaller model preset or a larger device"]))

    # evaluate: the configured backend, or auto's (the fastest that fits)
    evals = _eval_steps(cfg, model_config, device, device_gb, ram_gb)
    requested = eval_backend or getattr(cfg.evaluation, "backend", "auto")
    fitting = [b for b, s in evals.items() if s.fits]
    if requested in ("auto", "http"):
        backend = fitting[0] if fitting else min(evals, key=lambda b: evals[b].total_gb)
    else:
        backend = requested
        if not evals[backend].fits and fitting:
            setting = "auto (transformers on the NF4 base)" if fitting[0] == "transformers-nf4" else fitting[0]
            changes.append(("evaluate", f"evaluation.backend: {setting} ({backend} needs ~{evals[backend].total_gb:.1f} GB on the "
                                        f"{evals[backend].where} of {evals[backend].limit_gb:.1f} GB, {fitting[0]} "
                                        f"~{evals[fitting[0]].total_gb:.1f} GB)"))
            backend = fitting[0]
    evaluate = evals[backend]
    if not evaluate.fits:
        shown = ", ".join(f"{b} ~{s.total_gb:.1f} GB" for b, s in evals.items())
        largest = max(evaluate.terms, key=evaluate.terms.get)
        fix = ("lower evaluation.max_new_tokens or model.max_seq_len (the KV cache and logits grow with both)"
               if largest.startswith(("KV", "generation", "logits")) else "pick a smaller model preset")
        advice.append(f"evaluate does not fit with any backend on the {evaluate.where} ({shown}; {evaluate.limit_gb:.1f} GB; "
                      f"the largest term of {backend}: {largest} {evaluate.terms[largest]:.1f} GB): {fix}, or score the model "
                      "where Ollama serves it (`edentune eval -m http://HOST:11434/v1#MODEL`)")

    # export: without the parity check when the gate scored the exported GGUF files in llama.cpp
    export = _export_step(cfg, model_config, device, device_gb, ram_gb, route)
    if not export.fits and route == "adapter" and getattr(cfg.export, "verify", True) and backend == "gguf":
        needed = export.total_gb
        cfg = cfg.updated({"export.verify": False})
        export = _export_step(cfg, model_config, device, device_gb, ram_gb, route)
        changes.append(("export", f"export.verify: false (the parity check holds the HF base in fp32 beside an f16 GGUF: ~{needed:.1f} GB "
                                  "of RAM; the gguf evaluation has scored the exported files in llama.cpp already)"))
    if not export.fits:
        advice.append(f"export ({export.detail}) does not fit: ~{export.total_gb:.1f} GB of RAM of {export.limit_gb:.1f} GB"
                      + ("; with evaluation.backend gguf the parity check can be left out (export.verify: false)"
                         if backend != "gguf" and route == "adapter" else "; export where there is more RAM"))

    # smoke check: Ollama serving it, after llama.cpp's reference answers
    served_base = _served_base(cfg)
    smoke = _smoke_step(cfg, model_config, device, device_gb, ram_gb, served_base)
    if not smoke.fits and not served_base:
        on_q4 = _smoke_step(cfg, model_config, device, device_gb, ram_gb, True)
        if on_q4.fits or (on_q4.host_gb, on_q4.total_gb) < (smoke.host_gb, smoke.total_gb):
            changes.append(("smoke check", f"evaluation.base_gguf: the base's Q4_K_M GGUF (e.g. Ollama's blob of {cfg.export.ollama_base}), "
                                           "so that deploy's llama.cpp reference answers run on the file Ollama serves, not on an f16 "
                                           f"copy (~{arch_params_gb(model_config, 2):.1f} GB)"))
            smoke = on_q4
    if not smoke.fits:
        advice.append(f"smoke check does not fit: Ollama serving the model needs ~{smoke.total_gb:.1f} GB on the {smoke.where} "
                      f"of {smoke.limit_gb:.1f} GB" + (f" and the llama.cpp references ~{smoke.host_gb:.1f} GB of RAM" if smoke.host_terms else "")
                      + f": run `edentune cycle run --no-deploy` here and `edentune cycle deploy` where Ollama has the room, "
                        f"or lower export.num_ctx ({cfg.export.num_ctx})")
    disk = _disk(cfg, model_config, backend, route)
    plan = RoundPlan(cfg.model.name_or_path, device, device_gb, ram_gb, disk_free_gb, [train, evaluate, export, smoke],
                     {b: round(s.total_gb, 2) for b, s in evals.items()}, backend, changes, advice, disk, tplan, cfg)
    if not plan.disk_fits:
        plan.advice.append(f"disk: the round needs ~{sum(disk.values()):.1f} GB, {disk_free_gb:.1f} GB are free")
    return plan


def arch_params_gb(model_config, bytes_per_param: float) -> float:
    return Arch.from_config(model_config).params * bytes_per_param / GB


def _fit_training(cfg, model_config, device, device_gb, ram_gb, wired_gb, changes: list[str]):
    """Apply the training planner's changes, the one that frees most first, until training fits.
    A change of the same settings as an earlier one (batch 2, then 1) replaces it in `changes`.
    On a Mac, letting Metal wire more memory comes before shorter sequences (it costs nothing)."""
    made: dict[tuple, str] = {}
    train, tplan = _train_step(cfg, model_config, device, device_gb, ram_gb, wired_gb)
    wired_tried = wired_gb is not None
    for _ in range(12):
        if train.fits:
            break
        if device == "apple":
            options = [(ch, text) for ch, text in apple_options(cfg)]
            # raising Metal's limit costs nothing: before a smaller adapter or shorter sequences
            if not wired_tried and (not options or {"lora.r", "model.max_seq_len"} & set(options[0][0])):
                wired_gb, wired_tried = device_gb - APPLE_SYSTEM_GB, True
                made[("wired",)] = (f"let Metal wire {wired_gb:g} GB for training: sudo sysctl iogpu.wired_limit_mb={int(wired_gb * 1024)} "
                                    "(until reboot; the system keeps 4 GB)")
                train, tplan = _train_step(cfg, model_config, device, device_gb, ram_gb, wired_gb)
                continue
        else:
            def estimate_for(c):
                return estimate(c, model_config, device_gb if device == "cuda" else ram_gb, "cuda" if device == "cuda" else "cpu")

            options = [(ch, text) for _, ch, text in scored_options(tplan, cfg, estimate_for)]
        if not options:
            break
        ch, text = options[0]
        cfg = cfg.updated(ch)
        made[tuple(sorted(ch))] = text
        train, tplan = _train_step(cfg, model_config, device, device_gb, ram_gb, wired_gb)
    changes.extend(made.values())
    return cfg, train, tplan


# -- printing ---------------------------------------------------------------------------------------
def print_round_plan(rp: RoundPlan, console) -> None:
    from rich.table import Table
    from rich.text import Text

    where = {"cuda": f"a {rp.device_gb:g} GB CUDA card and {rp.ram_gb:.0f} GB of RAM",
             "apple": f"a Mac with {rp.device_gb:g} GB of unified memory", "cpu": f"CPU with {rp.device_gb:g} GB of RAM"}[rp.device]
    t = Table(title=Text(f"The round on {where}: {rp.model}"))
    for col, just in (("step", "left"), ("runs on", "left"), ("peak GB", "right"), ("of GB", "right"),
                      ("host RAM GB", "right"), ("fits", "left")):
        t.add_column(col, justify=just)
    for s in rp.steps:
        host = f"{s.host_gb:.1f} of {s.host_limit_gb:.1f}" if s.host_terms else ""
        t.add_row(Text(s.label), s.where, f"{s.total_gb:.1f}", f"{s.limit_gb:.1f}", host, "yes" if s.fits else "NO",
                  style=None if s.fits else "red")
    console.print(t)
    console.print(Text("evaluation backends: " + ", ".join(f"{b} ~{gb:.1f} GB" for b, gb in rp.evaluation.items())
                       + f"; chosen: {rp.eval_backend}"))
    disk = sum(rp.disk.values())
    free = f", {rp.disk_free_gb:.0f} GB free" if rp.disk_free_gb is not None else ""
    console.print(Text(f"disk ~{disk:.1f} GB{free}: " + "; ".join(f"{k} {v:.1f}" for k, v in rp.disk.items())))
    if rp.fits and not rp.changes:
        console.print(Text("every step of the round fits as configured", style="green"))
    elif rp.fits:
        console.print(Text("the round fits with these changes:", style="green"))
    for step, c in rp.changes:
        console.print(Text(f"  {step}: {c}"))
    for a in rp.advice:
        console.print(Text(f"  does not fit: {a}", style="red"))


def round_plan_for(cfg, device: str, device_gb: float | None, *, ram_gb: float | None = None, disk_free_gb: float | None = None,
                   where: str | Path = ".", route: str = "adapter") -> RoundPlan:
    """The CLI's plan. `device_gb` defaults to this CUDA card (else 24 GB), on a Mac to its RAM
    (else 24 GB); the free disk to the free space where the run writes (`where`)."""
    import platform

    from ..train.plan import model_config_for

    if device_gb is None:
        if device == "cuda":
            import torch

            device_gb = torch.cuda.get_device_properties(0).total_memory / GB if torch.cuda.is_available() else 24.0
        else:
            device_gb = machine_ram_gb() if device == "cpu" or platform.system() == "Darwin" else 24.0
    if disk_free_gb is None:
        disk_free_gb = free_disk_gb(where)
    return plan_round(cfg, model_config_for(cfg), device, device_gb, ram_gb=ram_gb, disk_free_gb=disk_free_gb, route=route)
