"""Ollama's own engine for the tests: builds tests/gotemplate (a port of Ollama's Modelfile parser and of
the code around Go's text/template that turns a chat into a prompt) and runs it. The `ollama` fixture in
conftest.py builds it once per session."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

SRC = Path(__file__).resolve().parent / "gotemplate"
DEBIAN_GO = "/usr/lib/go-1.19/bin/go"  # Debian's golang-1.19-go, installed by scripts/setup.sh


def find_go() -> str | None:
    """EDGESMITH_GO, else `go` on PATH, else Debian's versioned install (not on PATH by default)."""
    for go in (os.environ.get("EDGESMITH_GO"), shutil.which("go"), DEBIAN_GO):
        if go and os.access(go, os.X_OK):
            return go
    return None


def build(go: str, workdir: Path) -> Path:
    """`go build` tests/gotemplate into workdir. Offline and self-contained: standard library only, with the
    build cache and module path in workdir so nothing outside it is read or written."""
    env = {**os.environ, "GOCACHE": str(workdir / "cache"), "GOPATH": str(workdir / "gopath"),
           "GOPROXY": "off", "GOFLAGS": "", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GO111MODULE": "on"}
    binary = workdir / "gotemplate"
    r = subprocess.run([go, "build", "-o", str(binary), "."], cwd=SRC, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"go build tests/gotemplate failed:\n{r.stderr}")
    return binary


class ModelfileRejected(Exception):
    """Ollama's parser (or its template parser, for TEMPLATE) refuses the Modelfile."""


class Ollama:
    def __init__(self, binary: Path):
        self.binary = binary

    def _run(self, modelfile: str, messages=None, tools=None) -> dict:
        req = {"modelfile": modelfile, "messages": messages, "tools": tools}
        r = subprocess.run([str(self.binary)], input=json.dumps(req), capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"gotemplate exited {r.returncode}: {r.stderr}")
        return json.loads(r.stdout)

    def parse(self, modelfile: str) -> list[tuple[str, str]]:
        """[(command, args)] as Ollama reads them: FROM is "model", PARAMETER lines are named by the parameter."""
        res = self._run(modelfile)
        if res.get("error"):
            raise ModelfileRejected(res["error"])
        return [(c["name"], c["args"]) for c in res["commands"]]

    def chat_prompt(self, modelfile: str, messages: list[dict], tools: list[dict] | None = None) -> str | None:
        """The prompt Ollama builds for POST /api/chat with these messages on a model created from `modelfile`
        (None when the Modelfile has no TEMPLATE: Ollama would use the GGUF's)."""
        res = self._run(modelfile, messages, tools)
        if res.get("error"):
            raise ModelfileRejected(res["error"])
        return res["prompt"]
