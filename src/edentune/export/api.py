"""Export entry points: adapter route (GGUF LoRA on an Ollama base) and merged route (one GGUF).

Each export writes its directory atomically (a reader never sees half an export): the GGUF,
one Modelfile per model/persona, and `export_report.json` with the parity numbers. With
`verify=True` the files are checked in llama.cpp before the directory is put in place; a failed
check still keeps the files (for inspection) and then raises with the numbers.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..registry import now as utc_now
from ..errors import EdentuneError
from ..io import EXPORT_MARKER, atomic_dir, check_output_dir, write_json_atomic, write_text_atomic
from .gate import record_export_files

REPORT_NAME = "export_report.json"
# EXPORT_MARKER, in every export folder: only a folder holding it is ever replaced by the next
# export (io.atomic_dir), and only while it holds nothing but the files that export wrote.


@dataclass
class ExportResult:
    out_dir: Path
    gguf: Path  # adapter.gguf (adapter route) or model.gguf (merged route)
    modelfiles: dict[str, Path]  # Ollama model name -> Modelfile
    report_path: Path
    report: dict = field(default_factory=dict)

    @property
    def create_commands(self) -> list[str]:
        """What to run where Ollama lives (or use `edentune deploy`)."""
        return [f"ollama create {shlex.quote(name)} -f {shlex.quote(str(p))}" for name, p in self.modelfiles.items()]


def base_model_dir(cfg) -> str:
    from ..models import resolve_model_dir

    return resolve_model_dir(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.architecture)


def reference_ggufs(cfg, base_dir: str) -> list[Path]:
    """Base GGUFs for the llama.cpp checks: first an exact one (f16/f32) that isolates the adapter
    conversion, then the original base file when it is quantized (e.g. the embedded Q4_1), which
    shows what quantization costs on top (llama.cpp#7062). The exact one is the original file when
    that is unquantized, otherwise written once from the HF weights and cached."""
    from transformers import AutoModelForCausalLM

    from ..models import cache_root, load_tokenizer
    from .model_gguf import write_model_gguf

    original, exact_type = _run_gguf(cfg, base_dir)
    if original is not None and exact_type:
        return [original]
    cfg_file = Path(base_dir) / "config.json"
    key = hashlib.sha256(f"{Path(base_dir).resolve()}|{cfg_file.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    exact = cache_root() / "gguf-bases" / f"{Path(base_dir).name}-{key}-f16.gguf"
    if not exact.exists():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
        write_model_gguf(model, load_tokenizer(base_dir), exact, "f16", name=Path(base_dir).name)
    return [exact] + ([original] if original else [])


def _run_gguf(cfg, base_dir: str) -> tuple[Path | None, bool]:
    """The run's own base GGUF (embedded, a .gguf path, or model.gguf_file) when llama.cpp can use
    it for this architecture, and whether it is unquantized (f32/f16)."""
    from ..models import embedded_gguf_path
    from .gguf_common import gguf_facts

    m = cfg.model
    source = None
    if m.name_or_path == "embedded":
        source = embedded_gguf_path()
    elif m.name_or_path.endswith(".gguf"):
        source = Path(m.name_or_path).expanduser()
    elif m.gguf_file:
        source = Path(m.name_or_path).expanduser() / m.gguf_file
    if source is None:
        return None, False
    model_type = json.loads((Path(base_dir) / "config.json").read_text())["model_type"]
    facts = gguf_facts(source)
    if facts.fields.get("general.architecture") != model_type:
        return None, False
    return source, facts.fields.get("general.file_type", 0) in (0, 1)  # ALL_F32, MOSTLY_F16


def smoke_base_gguf(cfg, base_dir: str) -> Path:
    """The base GGUF for deploy's smoke check: the run's own file when there is one (closest to a
    quantized Ollama base, no conversion), else the exact reference written for the parity checks."""
    original, _ = _run_gguf(cfg, base_dir)
    if original is None and getattr(cfg.evaluation, "base_gguf", None):  # the file Ollama serves, as the gguf evaluation scored it
        original = Path(cfg.evaluation.base_gguf).expanduser()
    return original if original is not None else reference_ggufs(cfg, base_dir)[0]


def _write_modelfiles(cfg, tmp: Path, out_dir: Path, personas: dict[str, str] | None, report: dict,
                      **modelfile_kw) -> dict[str, Path]:
    """One Modelfile per Ollama model (per persona); `report["models"]` records which is which for deploy."""
    from .modelfile import modelfile_for, parse_modelfile, render_modelfile, validate_modelfile

    personas = personas or cfg.export.personas or {cfg.export.model_name: cfg.model.system_prompt}
    paths = {}
    for i, (name, system) in enumerate(personas.items()):
        text = render_modelfile(modelfile_for(cfg, system=system, **modelfile_kw))
        # Parse back what was written: the file itself is what must match training.
        validate_modelfile(parse_modelfile(text), cfg, system=system, adapter_expected=modelfile_kw.get("adapter") is not None)
        fname = "Modelfile" if i == 0 else f"Modelfile.{name.replace(':', '_').replace('/', '_')}"
        write_text_atomic(tmp / fname, text)
        paths[name] = out_dir / fname
    report["models"] = {name: p.name for name, p in paths.items()}
    return paths


def export_adapter(cfg, adapter_dir: str | Path, out_dir: str | Path, *, verify: bool = True,
                   personas: dict[str, str] | None = None) -> ExportResult:
    """PEFT adapter -> `adapter.gguf` + Modelfile(s) for `FROM <export.ollama_base>` + report."""
    from transformers import AutoConfig

    from ..models import adapter_sha256

    from .adapter_gguf import read_peft_adapter, validate_adapter_against_base, write_adapter_gguf
    from .modelfile import CHATML_TEMPLATE
    from .parity import adapter_parity, serving_parity

    out_dir = Path(out_dir)
    check_output_dir(out_dir, marker=EXPORT_MARKER, inputs=[adapter_dir])  # before any work
    base_dir = base_model_dir(cfg)
    base_config = AutoConfig.from_pretrained(base_dir).to_dict()
    adapter = read_peft_adapter(adapter_dir, base_config)  # refusals happen here, before anything is written
    report: dict = {"route": "adapter", "created": utc_now(), "adapter_dir": str(adapter_dir), "adapter_sha256": adapter_sha256(adapter_dir),
                    "base": base_dir,
                    "ollama_base": cfg.export.ollama_base, "dtype": cfg.export.adapter_dtype,
                    "lora": {"r": adapter.r, "alpha_in_gguf": adapter.alpha, "tensors": len(adapter.pairs)}}
    with atomic_dir(out_dir, marker=EXPORT_MARKER, inputs=[adapter_dir]) as tmp:
        gguf_path = write_adapter_gguf(adapter, tmp / "adapter.gguf", cfg.export.adapter_dtype)
        modelfiles = _write_modelfiles(cfg, tmp, out_dir, personas, report, adapter="./adapter.gguf")
        logits, template = [], None
        if verify:
            refs = reference_ggufs(cfg, base_dir)
            label = f"exported from {adapter_dir}"  # gguf_path is in a temporary folder, gone once this raises
            report["validation"] = validate_adapter_against_base(gguf_path, refs[0], label=label)
            logits = adapter_parity(base_dir, adapter_dir, gguf_path, refs, cfg.model.system_prompt, label=label)
            template = serving_parity(cfg, CHATML_TEMPLATE, _tokenizer(base_dir), refs[0])
            report["logits"] = {str(ref): asdict(rep) for ref, rep in zip(refs, logits)}
            report["template"] = asdict(template)
        record_export_files(tmp, report, [gguf_path.name, *(p.name for p in modelfiles.values())])
        write_json_atomic(tmp / REPORT_NAME, report)
    return _finish(out_dir, out_dir / "adapter.gguf", modelfiles, report, logits, template)


def export_merged(cfg, adapter_dir: str | Path, out_dir: str | Path, *, verify: bool = True,
                  dtype: str | None = None, personas: dict[str, str] | None = None) -> ExportResult:
    """Fallback route: merge into the full-precision base and write `model.gguf` + Modelfile(s)."""
    from ..models import adapter_sha256
    from .model_gguf import merged_model, write_model_gguf
    from .modelfile import CHATML_TEMPLATE
    from .parity import model_parity, serving_parity

    out_dir, dtype = Path(out_dir), dtype or cfg.export.merged_dtype
    check_output_dir(out_dir, marker=EXPORT_MARKER, inputs=[adapter_dir])  # before any work
    base_dir = base_model_dir(cfg)
    tok = _tokenizer(base_dir)
    model = merged_model(base_dir, adapter_dir).float().eval()
    report: dict = {"route": "merged", "created": utc_now(), "adapter_dir": str(adapter_dir), "adapter_sha256": adapter_sha256(adapter_dir),
                    "base": base_dir, "dtype": dtype}
    with atomic_dir(out_dir, marker=EXPORT_MARKER, inputs=[adapter_dir]) as tmp:
        gguf_path = write_model_gguf(model, tok, tmp / "model.gguf", dtype, name=cfg.export.model_name)
        modelfiles = _write_modelfiles(cfg, tmp, out_dir, personas, report, adapter=None, from_="./model.gguf",
                                       template=CHATML_TEMPLATE)
        logits, template = [], None
        if verify:
            logits = [model_parity(model, tok, gguf_path, cfg.model.system_prompt)]
            template = serving_parity(cfg, CHATML_TEMPLATE, tok, gguf_path)
            report.update(logits={"model.gguf": asdict(logits[0])}, template=asdict(template))
        record_export_files(tmp, report, [gguf_path.name, *(p.name for p in modelfiles.values())])
        write_json_atomic(tmp / REPORT_NAME, report)
    return _finish(out_dir, out_dir / "model.gguf", modelfiles, report, logits, template)


def _finish(out_dir, gguf_path, modelfiles, report, logits, template) -> ExportResult:
    from .parity import raise_on_failure

    result = ExportResult(out_dir=out_dir, gguf=gguf_path, modelfiles=modelfiles, report_path=out_dir / REPORT_NAME, report=report)
    raise_on_failure(logits, template, result.report_path)
    return result


def _tokenizer(base_dir: str):
    from ..models import load_tokenizer

    return load_tokenizer(base_dir)



def load_export(out_dir: str | Path) -> dict:
    path = Path(out_dir) / REPORT_NAME
    if not path.exists():
        raise EdentuneError(f"{out_dir}: not an edentune export (no {REPORT_NAME})", hint="run `edentune export` first")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        report = err
    if not isinstance(report, dict):
        raise EdentuneError(f"{path}: not a readable export report ({str(report)[:160]})", hint="run `edentune export` again")
    return report
