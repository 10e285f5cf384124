"""Deploy in place of a model an app calls by a fixed name (`--replace qwen2.5:7b`), and undo it.

Garden of Eden V3 calls the constant model name `qwen2.5:7b`, so without patching the app a
fine-tune reaches its user only under that tag. Replacing a tag must never lose the original:
- the first replace copies the tag to `TAG-edentune-original` (Ollama /api/copy) before anything
  is created; that backup is never overwritten afterwards;
- the fine-tune is created under the tag FROM the backup (the same weights the tag had), never
  FROM the tag itself, which after the first round already carries an adapter; a later round
  keeps the current fine-tune as `TAG-previous` (deploy's ordinary previous-version copy);
- any failure (create, read-back, smoke check) puts back what the tag was (deploy's undo);
- the trained base must be the tag's base: an adapter trained on another model (a 14B adapter
  under a 7B tag) is refused unless `allow_base_mismatch`, and then built FROM the trained base,
  with the memory and latency cost said in the warning;
- the tag's digest after the deploy is recorded, so `cycle status` can tell when an
  `ollama pull TAG` has silently put the stock model back.
The planning reuses deploy's plan (export, gate, base, template) and retargets its one model;
apply is deploy's own apply_deploy, so create, confirm, smoke check and undo are the same code.
"""

from __future__ import annotations

import json
from dataclasses import replace as dc_replace
from pathlib import Path

from ..errors import EdentuneError
from ..registry import now
from .ollama import OllamaServer, full_name, previous_name

BACKUP_SUFFIX = "-edentune-original"


def backup_name(tag: str) -> str:
    repo, t = full_name(tag).rsplit(":", 1)
    return f"{repo}:{t}{BACKUP_SUFFIX}"


def pull_warning(tag: str) -> str:
    return (f"`ollama pull {tag}` puts the stock model back under {tag} and silently undoes this replacement "
            f"(`edentune cycle status` notices; deploy again to reapply)")


def model_digests(server: OllamaServer, sizes: dict | None = None) -> dict[str, str]:
    """Ollama model name -> manifest digest (GET /api/tags); fills `sizes` (name -> bytes) when given."""
    listed = [m for m in server.call("list", what="GET /api/tags").models if m.model]
    if sizes is not None:
        sizes.update({full_name(m.model): int(m.size or 0) for m in listed})
    return {full_name(m.model): m.digest or "" for m in listed}


def _has_adapter(server: OllamaServer, name: str) -> bool:
    from .modelfile import parse_modelfile

    return bool(parse_modelfile(server.show(name).get("modelfile") or "").adapter)


def shape_problem(shown: dict, base_dir: str) -> str | None:
    """Why the weights Ollama shows (/api/show model_info) are not the architecture and size the
    adapter was trained on (the HF base's config.json), or None. Unknown model_info: None."""
    info = shown.get("model_info") or {}
    arch = info.get("general.architecture")
    if not arch:
        return None
    hf = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    want = {"architecture": hf.get("model_type"), "layers": hf.get("num_hidden_layers"), "hidden size": hf.get("hidden_size")}
    got = {"architecture": arch, "layers": info.get(f"{arch}.block_count"), "hidden size": info.get(f"{arch}.embedding_length")}
    diff = [f"{k} {got[k]} vs {want[k]}" for k in want if got[k] is not None and want[k] is not None and got[k] != want[k]]
    return ", ".join(diff) or None


def _size_text(shown: dict, size: int) -> str:
    params = (shown.get("details") or {}).get("parameter_size")
    gb = f"{size / 1e9:.1f} GB" if size > 1e6 else None
    return " / ".join(filter(None, [params and f"{params} parameters", gb])) or "size unknown"


def plan_replace(plan, tag: str, *, allow_base_mismatch: bool = False, client=None) -> object:  # the deploy plan, with .replace set
    """Retarget a deploy plan at `tag`: FROM the backup of the original (made by apply), refusing
    a base that differs from the trained one. Read-only: changes nothing in Ollama."""
    tag = full_name(tag)
    if len(plan.models) != 1:
        raise EdentuneError(f"--replace {tag} publishes one model, this export holds {len(plan.models)} "
                            f"({', '.join(m.name for m in plan.models)})",
                            hint="an app calls one model name: export one persona (or adapter_mode per persona) for it")
    server = OllamaServer.for_plan(plan, client)
    sizes: dict[str, int] = {}
    digests = model_digests(server, sizes)
    backup = backup_name(tag)
    if tag not in digests:
        raise EdentuneError(f"cannot replace {tag}: there is no such model in Ollama at {plan.host}",
                            hint=f"--replace publishes in place of the model the app calls: `ollama pull {tag}` first")
    tag_is_original = backup not in digests or digests[backup] == digests[tag]
    if backup not in digests and _has_adapter(server, tag):
        raise EdentuneError(f"cannot replace {tag}: it already carries an adapter and no original is kept as {backup}",
                            hint=f"`ollama pull {tag}` restores the stock model; then deploy again")
    if not tag_is_original and not _has_adapter(server, tag):
        raise EdentuneError(f"{tag} is neither the original kept as {backup} nor an edentune fine-tune: "
                            f"probably `ollama pull {tag}` brought another version since the last replace",
                            hint=f"to keep the version now under {tag} as the original: `ollama rm {backup}`, then deploy again; "
                                 f"to put the kept original back: `edentune deploy CONFIG --rollback --replace {tag}`")
    original = tag if backup not in digests else backup
    shown_original = server.show(original)
    (mp,) = plan.models
    trained = full_name(mp.from_) if plan.route == "adapter" else None
    mismatch = shape_problem(shown_original, plan.base_dir)
    if trained and trained != tag and digests.get(trained) != digests[original]:
        mismatch = "; ".join(filter(None, [f"trained for {trained}, not {tag}", mismatch]))
    from_, cost = (backup if plan.route == "adapter" else mp.from_), None
    if mismatch:
        weights = trained or "the merged fine-tune"
        cost = (f"{tag} would then load {weights} ({_size_text(server.show(trained), sizes.get(trained, 0)) if trained else 'its size'}) "
                f"instead of its own {_size_text(shown_original, sizes.get(original, 0))}: the app's answers take that much more "
                "memory and about as much more time per token (generation reads every weight once per token)")
        if not allow_base_mismatch:
            raise EdentuneError(f"not replacing {tag}: its base differs from the one the adapter was trained on ({mismatch})",
                                hint=f"train on the app's base (export.ollama_base {tag}); or accept the cost with "
                                     f"--allow-base-mismatch (export.allow_base_mismatch): {cost}")
        if trained is not None:  # the adapter goes on the base it was trained on, whatever the tag held
            if trained == tag or (problem := shape_problem(server.show(trained), plan.base_dir)):
                raise EdentuneError(f"not replacing {tag}: no base in Ollama fits the adapter "
                                    f"({problem if trained != tag else mismatch})",
                                    hint="set export.ollama_base to the Ollama model of the base the adapter was trained on")
            from_ = trained
    previous = backup if tag_is_original else previous_name(tag)
    new = dc_replace(mp, name=tag, from_=from_, previous=previous)
    return dc_replace(plan, models=[new], replace={"tag": tag, "backup": backup, "original_digest": digests[original], "made_backup": backup not in digests,
                   "from": new.from_, "base_mismatch": mismatch, "cost": cost})


def finish_replace(plan, records: list[dict], *, client=None) -> list[dict]:
    """Add the tag's new digest and the `ollama pull` warning to the deploy records."""
    info = dict(plan.replace)
    try:
        info["digest"] = model_digests(OllamaServer.for_plan(plan, client)).get(info["tag"])
    except EdentuneError:  # deployed and checked: only the record of the digest is missing (status says "unknown")
        info["digest"] = None
    info["warning"] = pull_warning(info["tag"])
    for r in records:
        r["replace"] = info
    return records


def restore_original(cfg, tag: str, *, host: str | None = None, client=None) -> dict:
    """Put the original kept by the first replace back under `tag` (its digest checked after)."""
    server = OllamaServer.for_config(cfg, host, client)
    server.version()
    tag, backup = full_name(tag), backup_name(tag)
    digests = model_digests(server)
    if backup not in digests:
        raise EdentuneError(f"no original of {tag} is kept ({backup} not found in Ollama at {server.host})",
                            hint=f"only a model replaced with `--replace {tag}` has one; `ollama pull {tag}` gets the stock model")
    replaced = digests.get(tag)
    server.call("copy", backup, tag, what=f"restoring {tag} from {backup}")
    restored = model_digests(server).get(tag)
    if restored != digests[backup]:
        raise EdentuneError(f"restored {tag} from {backup} but its digest is {restored}, the original's {digests[backup]}")
    return {"action": "rollback", "model": tag, "time": now(), "host": server.host, "restored_from": backup,
            "digest": restored, "replaced_digest": replaced}


def replacement_drift(records: list[dict], *, host: str | None = None, timeout: float = 5.0, client=None) -> list[dict]:
    """For each replace in `records` (the latest deploy records): is the tag still what was put
    there (its digest as recorded)? `state`: "unchanged", "original" (the kept original is back
    under the tag although a fine-tune was deployed), "changed" (another model, e.g. after an
    `ollama pull`), "missing", or "unknown" (Ollama did not answer; the reason in `error`)."""
    out = []
    for r in records:
        info = r.get("replace")
        if not isinstance(info, dict) or not info.get("tag"):
            continue
        entry = {"tag": info["tag"], "recorded_digest": info.get("digest"), "backup": info.get("backup")}
        try:
            server = OllamaServer(host or r.get("host"), timeout, timeout, client)
            digests = model_digests(server)
        except EdentuneError as err:
            out.append(entry | {"state": "unknown", "error": str(err).splitlines()[0]})
            continue
        now = digests.get(info["tag"])
        entry["digest"] = now
        if now is None:
            entry["state"] = "missing"
        elif now == info.get("digest"):
            entry["state"] = "unchanged"
        elif now == digests.get(info.get("backup")):
            entry["state"] = "original"
        else:
            entry["state"] = "changed"
        out.append(entry)
    return out
