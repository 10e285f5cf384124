"""The Ollama server as edentune talks to it: host rules, model names, and one client with bounded waits.

Every call goes through `OllamaServer.call`: a connect and read timeout for each wait and an overall
deadline for the whole request (`netdeadline.py`), answers that are not Ollama's (an HTML page, a
proxy) named as such, and Ollama's own refusals raised as `OllamaRefused` with its words. Deploy,
rollback, the cycle's preflight and the replacement of an app's tag all use it.
"""

from __future__ import annotations

import os
import re
import urllib.parse

from ..errors import EdentuneError


DEFAULT_HOST = "http://127.0.0.1:11434"
# /api/create with from/files/adapters (the only form this module sends) exists since Ollama
# v0.5.5 (its release notes; the older form took Modelfile text). Dev builds report 0.0.0.
MIN_OLLAMA_VERSION = (0, 5, 5)
_HOST_HINT = "give --host (or export.ollama_host / $OLLAMA_HOST) as http://HOST:PORT, e.g. http://127.0.0.1:11434"


class OllamaRefused(EdentuneError):
    """Ollama answered the request with an error status (as opposed to not answering at all)."""

    def __init__(self, message: str, *, error: str, status: int, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.error, self.status = error, status


def full_name(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def previous_name(name: str) -> str:
    repo, tag = full_name(name).rsplit(":", 1)
    return f"{repo}:previous" if tag == "latest" else f"{repo}:{tag}-previous"


def ollama_host(cfg, host: str | None = None) -> str:
    """`--host`, else the config's `export.ollama_host`, else $OLLAMA_HOST, else Ollama's default."""
    return check_host(host or cfg.export.ollama_host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST)


def check_host(host: str) -> str:
    """A host the client can use (ollama's own forms: `HOST`, `HOST:PORT`, `http(s)://HOST:PORT/path`), else an error."""
    text = host.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    problem = None
    if not text or any(c.isspace() or ord(c) < 32 for c in text):
        problem = "it is empty or contains spaces"
    elif scheme not in ("http", "https"):
        problem = f"the scheme {scheme!r} is not http or https"
    else:
        try:
            split = urllib.parse.urlsplit(f"{scheme}://{rest}")
            split.port  # noqa: B018 - raises ValueError on a non-numeric or out-of-range port
        except ValueError as err:
            problem = str(err)
        else:
            if not split.hostname and not rest.startswith(":"):
                problem = "it names no host"
    if problem:
        raise EdentuneError(f"malformed Ollama host {host!r}: {problem}", hint=_HOST_HINT)
    return text


UPLOAD_MIN_RATE = 1 << 20  # bytes/s: an upload moving at least this fast is given more time than its deadline


class OllamaServer:
    """The Ollama a deploy talks to: a client for quick calls, one with the long read timeout for
    blob upload, create and chat (which loads the model), and errors that name the host."""

    def __init__(self, host: str, timeout: float, long_timeout: float, client=None, deadline: float = 60.0,
                 long_deadline: float = 1200.0):
        self.host, self.timeout, self.long_timeout = check_host(host), timeout, long_timeout
        self.deadline, self.long_deadline = deadline, long_deadline  # overall, however slowly it trickles (netdeadline)
        if client is not None:
            self.quick = self.slow = client
            return
        import httpx
        import ollama

        from ..netdeadline import client_transport

        try:
            self.quick = ollama.Client(host=self.host, timeout=httpx.Timeout(self.timeout), transport=client_transport())
            self.slow = ollama.Client(host=self.host, timeout=httpx.Timeout(self.long_timeout, connect=self.timeout),
                                      transport=client_transport())
        except (ValueError, httpx.InvalidURL) as err:
            raise EdentuneError(f"malformed Ollama host {self.host!r}: {err}", hint=_HOST_HINT) from None

    @classmethod
    def for_config(cls, cfg, host: str | None = None, client=None) -> OllamaServer:
        return cls(ollama_host(cfg, host), cfg.export.ollama_timeout_s, cfg.export.ollama_create_timeout_s, client,
                   cfg.export.ollama_deadline_s, cfg.export.ollama_create_deadline_s)

    @classmethod
    def for_plan(cls, plan, client=None) -> OllamaServer:  # plan: deploy.DeployPlan
        deadlines = (plan.cfg.export.ollama_deadline_s, plan.cfg.export.ollama_create_deadline_s) if plan.cfg else ()
        return cls(plan.host, plan.timeout_s, plan.create_timeout_s, client, *deadlines)

    def call(self, method: str, *args, slow: bool = False, what: str = "the request", **kwargs):
        import httpx
        import ollama

        from ..netdeadline import deadline

        client, timeout = (self.slow, self.long_timeout) if slow else (self.quick, self.timeout)
        overall = self.long_deadline if slow else self.deadline
        try:
            with deadline(overall, min_rate=UPLOAD_MIN_RATE if slow else None) as limit:
                return getattr(client, method)(*args, **kwargs)
        except ollama.ResponseError as err:
            if _looks_like_html(err.error):
                raise self.not_ollama(f"it answered {what} with HTTP {err.status_code}") from None
            raise OllamaRefused(f"Ollama at {self.host} refused {what}: {err.error} (HTTP {err.status_code})",
                                error=str(err.error), status=err.status_code) from None
        except ConnectionError as err:  # ollama's wrapper of httpx.ConnectError (refused, DNS)
            raise EdentuneError(f"cannot reach Ollama at {self.host}: {_connect_reason(err)}",
                                hint="start it with `ollama serve`, or check --host / export.ollama_host / $OLLAMA_HOST") from None
        except httpx.TimeoutException as err:
            if limit.expired:
                key = "export.ollama_create_deadline_s" if slow else "export.ollama_deadline_s"
                raise EdentuneError(f"Ollama at {self.host} did not finish {what} within the deadline of {overall:g} s: it answers "
                                    "too slowly or never stops", hint=f"check that Ollama (not another program) listens at that host "
                                    f"and port; for a slow server raise {key}") from None
            key = "export.ollama_create_timeout_s" if slow else "export.ollama_timeout_s"
            raise EdentuneError(
                f"Ollama at {self.host} did not answer {what} within {timeout:g} s ({type(err).__name__})",
                hint=f"check that Ollama (not another program) listens at that host and port; for a slow server raise {key}",
            ) from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as err:
            raise EdentuneError(f"malformed Ollama host {self.host!r}: {err}", hint=_HOST_HINT) from None
        except httpx.TransportError as err:
            raise EdentuneError(f"the connection to Ollama at {self.host} failed during {what}: {err or type(err).__name__}",
                                hint="check that Ollama (not another program) listens at that host and port") from None
        except ValueError as err:  # JSON that is not JSON, or not the shape of Ollama's answer (pydantic)
            raise self.not_ollama(f"its answer to {what} is not Ollama's JSON ({str(err).splitlines()[0][:120]})") from None

    def not_ollama(self, why: str) -> EdentuneError:
        return EdentuneError(f"not an Ollama server at {self.host}: {why}",
                             hint="check --host / export.ollama_host: it must be Ollama's API address (default port 11434)")

    def version(self) -> str:
        # ollama-python 0.6.3 has no method for /api/version; its _request_raw keeps the error mapping.
        try:
            response = self.call("_request_raw", "GET", "/api/version", what="GET /api/version")
        except OllamaRefused as err:  # every Ollama has this endpoint
            raise self.not_ollama(f"GET /api/version answered HTTP {err.status}") from None
        try:
            version = response.json()["version"]
        except (ValueError, KeyError, TypeError):
            raise self.not_ollama("GET /api/version did not return Ollama's {\"version\": ...}") from None
        if not isinstance(version, str):
            raise self.not_ollama("GET /api/version did not return a version string")
        return version

    def show(self, name: str) -> dict:
        """The raw /api/show answer (the client's model drops fields such as `remote_host`)."""
        response = self.call("_request_raw", "POST", "/api/show", json={"model": name}, what=f"/api/show for {name}")
        try:
            shown = response.json()
        except ValueError:
            raise self.not_ollama(f"/api/show for {name} is not JSON") from None
        if not isinstance(shown, dict):
            raise self.not_ollama(f"/api/show for {name} is not a JSON object")
        return shown

    def models(self) -> set[str]:
        return {full_name(m.model) for m in self.call("list", what="GET /api/tags").models if m.model}


def _looks_like_html(text) -> bool:
    return isinstance(text, str) and text.lstrip()[:15].lower().startswith(("<!doctype", "<html"))


def _connect_reason(err: BaseException) -> str:
    cause = str(err.__context__ or err)
    if any(s in cause for s in ("Name or service not known", "nodename nor servname", "getaddrinfo", "No address associated")):
        return f"the host name does not resolve ({cause})"
    if "refused" in cause.lower():
        return "connection refused (nothing listens on that port)"
    return cause


def version_tuple(version: str) -> tuple[int, int, int] | None:
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version.strip())
    return tuple(int(x) for x in m.groups()) if m else None  # type: ignore[return-value]


def remote_reason(name: str, shown: dict | None = None) -> str | None:
    """Why `name` is a model that runs elsewhere (Ollama cloud models are tagged `:cloud` or
    `…-cloud` and /api/show reports their `remote_host`), or None for a local model."""
    if "://" in name:
        return "it is a URL, not a local model"
    tag = full_name(name).rsplit(":", 1)[1]
    if tag == "cloud" or tag.endswith("-cloud"):
        return "it is an Ollama cloud model (runs on ollama.com)"
    if shown and (shown.get("remote_host") or shown.get("remote_model")):
        return f"it is a remote model served by {shown.get('remote_host') or 'another host'}"
    return None
