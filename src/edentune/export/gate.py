"""The deploy gate, bound to the bytes it deploys.

Two records meet here, and neither is trusted on its word:

- the export's `export_report.json` holds, written at export time, the sha256 of every file the
  export wrote (`files`: adapter.gguf or model.gguf, each Modelfile) and of the PEFT adapter it
  was made from (`adapter_sha256`), tied together by `binding_sha256` (the hash of both): an
  edited `adapter_sha256` or files map no longer matches its binding, and a file swapped in (say
  another round's adapter.gguf) no longer matches its hash. `deploy --gate` re-hashes every file
  before it touches Ollama, and compares the digest Ollama's client computed while uploading the blob
  with the recorded hash, so what is uploaded is what was exported.
- `comparison.json` from `edentune compare` only points at what was compared: the verdict is
  re-derived from the two results files it names (present, sha256 unchanged, not the same
  results twice), by running `evaluate.compare` again with the deploy's config; its stored
  `ship` is never trusted. The scored adapter is taken from the candidate results file itself,
  and must be the adapter the export was made from.

Results of the gguf evaluation backend also record the served files they scored (`artifacts`):
the adapter GGUF scored must be, byte for byte, the `adapter.gguf` the export holds.

A plain hash is no signature: this catches mix-ups and edits, not someone who rewrites every
record consistently (who could as well run `ollama create` by hand); see docs/security.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import EdentuneError
from ..io import file_sha256

GATE_HASH_FIELDS = ("suite_sha256", "base_results_sha256", "candidate_results_sha256", "candidate_adapter_sha256")
_REEXPORT = "run `edentune export` again (and compare that adapter) instead of editing an export"


def binding_sha256(adapter_sha256: str | None, files: dict[str, str]) -> str:
    """One hash over the scored adapter's identity and every exported file's."""
    canonical = json.dumps({"adapter_sha256": adapter_sha256, "files": files}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def record_export_files(folder: Path, report: dict, names: list[str]) -> None:
    """At export time: the sha256 of each written file (by name, in `folder`) and the binding, into `report`."""
    report["files"] = {name: file_sha256(folder / name) for name in names}
    report["binding_sha256"] = binding_sha256(report.get("adapter_sha256"), report["files"])


def check_export_files(export_dir: Path, report: dict) -> dict[str, str]:
    """The export's recorded file hashes, verified against its binding and the files on disk
    (an export that predates them is refused)."""
    files = report.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise EdentuneError(f"not deploying: {export_dir} records no sha256 of its files (an export of an older edentune), "
                            "so the gate cannot tell that they are what was scored", hint=_REEXPORT)
    if report.get("binding_sha256") != binding_sha256(report.get("adapter_sha256"), files):
        raise EdentuneError(f"not deploying: {export_dir}/export_report.json was edited after the export "
                            "(its adapter_sha256 and file hashes no longer match their binding_sha256)", hint=_REEXPORT)
    for name, sha in files.items():
        path = export_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file():
            raise EdentuneError(f"not deploying: {path} (written by the export) is missing", hint=_REEXPORT)
        if file_sha256(path) != sha:
            raise EdentuneError(f"not deploying: {path} is not the file the export wrote (sha256 differs from export_report.json); "
                                "it was replaced or changed after the export", hint=_REEXPORT)
    return files


def check_uploaded(digest: str | None, gguf: Path, files: dict[str, str]) -> None:
    """The digest of an uploaded blob (computed by the client from the bytes it sent) against the export's record."""
    want = files.get(gguf.name)
    if want is not None and digest != f"sha256:{want}":
        raise EdentuneError(f"{gguf} changed while it was uploaded (Ollama received sha256 {str(digest)[7:19]}…, "
                            f"the export wrote {want[:12]}…)", hint=_REEXPORT)


def _results_file(recorded, comparison_dir: Path) -> Path | None:
    if not isinstance(recorded, str) or not recorded:
        return None
    p = Path(recorded)
    # Beside the comparison under its name: a workspace or report folder that was moved (the sha256 decides).
    for candidate in ([p] if p.is_absolute() else [p, comparison_dir / p]) + [comparison_dir / p.name]:
        if candidate.is_file():
            return candidate
    return None


def check_gate(comparison_json: str | Path, export_report: dict, cfg, files: dict[str, str] | None = None) -> dict:
    """Deploy only what `compare` (with `cfg`'s thresholds) would ship now, for the adapter this
    export was made from; `files`: the export's verified file hashes (`check_export_files`).
    Returns what was verified (recorded with the deploy)."""
    from ..evaluate.compare import compare, comparability
    from ..evaluate.runner import EvalResult

    path = Path(comparison_json)
    try:
        verdict = json.loads(path.read_text(encoding="utf-8"))
        stored_ship, reasons = verdict["ship"], verdict.get("reasons") or []
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        raise EdentuneError(f"{path}: not a comparison.json from `edentune compare` ({err})") from None
    if stored_ship is not True:  # a refusal is taken at its word; a ship never is (re-derived below)
        raise EdentuneError(f"not deploying: the comparison says the fine-tuned model is not better ({'; '.join(map(str, reasons)) or 'ship: false'})",
                            hint=f"see {path.parent / 'report.html'}; Ollama was not changed")
    missing = [f for f in GATE_HASH_FIELDS if not isinstance(verdict.get(f), str) or not verdict.get(f)]
    if missing:
        raise EdentuneError(f"not deploying: {path} has no {', '.join(missing)}: it was written by an older `edentune compare`, "
                            "so the gate cannot check what was compared",
                            hint="re-run `edentune compare` on the results, then deploy with the new comparison.json")
    rerun = "re-run `edentune compare` on the results files, then deploy with the new comparison.json"
    compared: dict[str, Path] = {}
    for side in ("base", "candidate"):
        recorded = verdict.get(f"{side}_results_path")
        results = _results_file(recorded, path.parent)
        if results is None:
            raise EdentuneError(f"not deploying: the {side} results that {path} compared ({recorded or 'no file recorded'}) are missing, "
                                "so its verdict cannot be re-derived", hint=rerun)
        if file_sha256(results) != verdict[f"{side}_results_sha256"]:
            raise EdentuneError(f"not deploying: {results} changed after `edentune compare` scored it "
                                f"(sha256 differs from {side}_results_sha256 in {path})", hint=rerun)
        compared[side] = results
    if verdict["base_results_sha256"] == verdict["candidate_results_sha256"] or \
            os.path.realpath(compared["base"]) == os.path.realpath(compared["candidate"]):
        raise EdentuneError(f"not deploying: {path} compares the results {compared['base']} with themselves (base and candidate are the same)",
                            hint="compare the base model's results with the fine-tuned model's")
    base, cand = EvalResult.load(compared["base"]), EvalResult.load(compared["candidate"])
    if base.adapter_sha256 and base.adapter_sha256 == cand.adapter_sha256:
        raise EdentuneError(f"not deploying: {path} compares the adapter {cand.adapter_sha256[:12]} with itself", hint=rerun)
    problems = comparability(base, cand)
    rederived = compare(base, cand, cfg)
    if problems or not rederived.ship:
        raise EdentuneError(f"not deploying: re-derived from {compared['base']} and {compared['candidate']}, the comparison does not ship "
                            f"({'; '.join(problems or rederived.reasons)}), whatever {path.name} says", hint=rerun)
    scored, exported = cand.adapter_sha256, export_report.get("adapter_sha256")
    if scored != verdict["candidate_adapter_sha256"]:
        raise EdentuneError(f"not deploying: {path} names the scored adapter {verdict['candidate_adapter_sha256'][:12]}, but its "
                            f"candidate results scored {(scored or 'none')[:12]}", hint=rerun)
    if not exported or scored != exported:
        raise EdentuneError(
            f"not deploying: {path} scored adapter {(scored or 'unknown')[:12]}, the export holds {(exported or 'unknown')[:12]}",
            hint=f"compare the exported adapter itself: `edentune compare --base base --candidate {export_report.get('adapter_dir')}`",
        )
    bound = files or {}
    scored_files = _scored_files(compared["candidate"])
    for name, sha in scored_files.items():
        if name in bound and bound[name] != sha:
            raise EdentuneError(f"not deploying: the candidate results scored {name} {sha[:12]}, the export holds {bound[name][:12]}",
                                hint=rerun)
    return {"comparison": str(path), "adapter_sha256": exported, "suite_sha256": verdict["suite_sha256"],
            "results_checked": {side: str(p) for side, p in compared.items()}, "files_sha256": bound}


# The gguf evaluation backend records the served files it scored as `artifacts` (evaluate/runner.py);
# the ones an export also writes are named here by the export's file names.
SCORED_EXPORT_FILES = {"adapter_gguf": "adapter.gguf"}


def _scored_files(results: Path) -> dict[str, str]:
    """{export file name: sha256} of the artifacts a results file scored, when its backend records them."""
    try:
        artifacts = json.loads(results.read_text(encoding="utf-8")).get("artifacts") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(artifacts, dict):
        return {}
    return {name: artifacts[key] for key, name in SCORED_EXPORT_FILES.items() if isinstance(artifacts.get(key), str)}
