"""Deployment checks (issue 6): docker-compose.yml, .env.example, Dockerfile, Prometheus config,
``docker-compose config``, and the compose services' own commands run as local processes.

The last test reads the ``command`` and ``environment`` of the compose services, substitutes only
the listen address/port and the Redis address (``redis:6379`` -> a local ``redis-server`` started
with the compose Redis flags), runs them, and drives a client session against them. Every
address is on loopback.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
OVERRIDE_2GPU = ROOT / "deploy" / "compose.2gpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
CONTRACT = ROOT / "docs" / "contract.md"

API_COMMAND = ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]  # contract
WORKER_COMMAND = ["python", "-m", "workers"]  # contract
# Set per service by docker-compose.yml, not by .env (WORKER_DEVICE differs between the workers).
FIXED_BY_COMPOSE = {"REDIS_URL", "EMBEDDED", "WORKER_DEVICE"}
# The metrics the issue asks for (app/metrics.py). The API sets the cluster-wide gauges from Redis
# at scrape time; the worker counts its own jobs, leases and bytes.
API_METRICS = ["attn_queue_depth", "attn_jobs", "attn_bytes_stored_total"]
WORKER_METRICS = [
    "attn_job_seconds",
    "attn_error_bound",
    "attn_reclaimed_total",
    "attn_lease_renewals_total",
    "attn_bytes_stored_total",
]


# --- helpers: compose file, .env, interpolation -------------------------------------------------


def load_yaml(path: Path) -> dict[str, Any]:
    with path.open() as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as compose reads them (comments and blank lines ignored)."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        env[key.strip()] = value.strip()
    return env


_VAR = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose variable substitution: ``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?e}``, ``$$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-") and unset:
            return arg
        if op in (":?", "?") and unset:
            raise KeyError(f"{name}: {arg}")
        return current or ""

    return _VAR.sub(sub, value)


def variables_in(value: Any) -> set[str]:
    """Names of the variables a compose value refers to."""
    if isinstance(value, dict):
        return set().union(*(variables_in(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(variables_in(v) for v in value)) if value else set()
    if not isinstance(value, str):
        return set()
    return {m.group("name") or m.group("bare") for m in _VAR.finditer(value) if m.group(0) != "$$"}


def contract_settings() -> list[str]:
    """The settings table of docs/contract.md: ``| `NAME` | default | meaning |``."""
    names = re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", CONTRACT.read_text(), flags=re.M)
    assert "REDIS_URL" in names and "METRICS_PORT" in names, "settings table not found"
    return names


def seconds(duration: str) -> float:
    """A compose duration (``2m``, ``1m30s``, ``90s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    assert parts, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


def rendered(service: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    return interpolate(service, env)


# --- 1. static properties of the compose file ---------------------------------------------------


def test_redis_service_is_durable_private_and_password_protected(services: dict[str, Any]) -> None:
    redis = services["redis"]
    cmd = [str(a) for a in redis["command"]]
    assert cmd[0] == "redis-server"
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=True))
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] == "everysec"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert "REDIS_PASSWORD" in variables_in(flags["--requirepass"])
    assert ":?" in flags["--requirepass"], "REDIS_PASSWORD must be required (${VAR:?...})"
    assert any(str(v).split(":")[1] == "/data" for v in redis["volumes"]), "no volume on /data"
    assert "ports" not in redis, "Redis must not be published to the host"
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in test and "ping" in test
    # the healthcheck authenticates through REDISCLI_AUTH (no password on a command line)
    assert "REDIS_PASSWORD" in variables_in(redis["environment"]["REDISCLI_AUTH"])
    assert redis["restart"] == "unless-stopped"


def test_api_service(services: dict[str, Any], env_example: dict[str, str]) -> None:
    api = services["api"]
    assert api["command"] == API_COMMAND
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    ports = [str(interpolate(p, env_example)) for p in api["ports"]]
    assert any(p.endswith(":8000") for p in ports), ports
    assert api["restart"] == "unless-stopped"
    assert "profiles" not in api, "the API always starts"
    assert ":?" in api["environment"]["API_KEY"], "API_KEY must be required (${VAR:?...})"
    url = rendered(api, env_example)["environment"]["REDIS_URL"]
    assert url == f"redis://:{env_example['REDIS_PASSWORD']}@redis:6379/0"


def test_workers_gpu_and_cpu_profiles(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    gpu, cpu = services["worker"], services["worker-cpu"]
    for worker in (gpu, cpu):
        assert worker["command"] == WORKER_COMMAND
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert worker["restart"] == "unless-stopped"
        assert seconds(worker["stop_grace_period"]) >= 60, "must outlast a job block"
        assert "ports" not in worker, "worker metrics are scraped inside the compose network"

    assert gpu["profiles"] == ["gpu"]
    assert cpu["profiles"] == ["cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["capabilities"] == ["gpu"]
    assert "deploy" not in cpu
    assert gpu["environment"]["WORKER_DEVICE"] == "cuda"
    assert cpu["environment"]["WORKER_DEVICE"] == "cpu"

    # Same settings everywhere except the device (and the API's healthcheck URL).
    g, c = rendered(gpu, env_example)["environment"], rendered(cpu, env_example)["environment"]
    a = dict(rendered(services["api"], env_example)["environment"])
    a.pop("HEALTHCHECK_URL", None)
    assert {k: v for k, v in g.items() if k != "WORKER_DEVICE"} == a
    assert {k: v for k, v in c.items() if k != "WORKER_DEVICE"} == a

    # Plain `docker compose up` (COMPOSE_PROFILES=gpu from .env.example): redis + api + worker.
    assert env_example["COMPOSE_PROFILES"].split(",") == ["gpu"]
    always = {name for name, svc in services.items() if "profiles" not in svc}
    assert always == {"redis", "api"}


def test_every_setting_is_configurable(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    settings = contract_settings()
    for name in ("api", "worker", "worker-cpu"):
        env = services[name]["environment"]
        missing = [s for s in settings if s not in env and (s, name) != ("WORKER_DEVICE", "api")]
        assert not missing, f"{name}: settings missing from environment: {missing}"
    # every variable the compose files use is in .env.example, except the fixed ones
    used = variables_in(services)
    used |= variables_in(load_yaml(OVERRIDE_2GPU))
    assert not (used - set(env_example)), f"not in .env.example: {sorted(used - set(env_example))}"
    free = set(settings) - FIXED_BY_COMPOSE
    assert not (free - set(env_example)), f"not in .env.example: {sorted(free - set(env_example))}"
    text = ENV_EXAMPLE.read_text()
    assert all(name in text for name in FIXED_BY_COMPOSE), "document the fixed settings"


def test_two_gpu_override_matches_worker(
    services: dict[str, Any], env_example: dict[str, str]
) -> None:
    extra = load_yaml(OVERRIDE_2GPU)["services"]
    assert set(extra) == {"worker-gpu1"}
    w1, w0 = extra["worker-gpu1"], services["worker"]
    for key in ("command", "profiles", "restart", "stop_grace_period", "depends_on"):
        assert w1[key] == w0[key], key
    assert w1["environment"] == w0["environment"], "keep worker-gpu1 in step with x-app-env"
    device = w1["deploy"]["resources"]["reservations"]["devices"][0]
    assert device == {"driver": "nvidia", "device_ids": ["1"], "capabilities": ["gpu"]}


def test_prometheus_scrape_config() -> None:
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS)["scrape_configs"]}
    assert jobs["api"]["static_configs"][0]["targets"] == ["api:8000"]
    (dns,) = jobs["worker"]["dns_sd_configs"]
    assert {"worker", "worker-cpu", "worker-gpu1"} <= set(dns["names"])
    assert dns["port"] == 9100  # METRICS_PORT default


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed: config not linted")
    proc = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in lines and all(
        f == "${PYTHON_IMAGE}" for f in froms
    )
    assert "ARG TORCH_VARIANT=cu128" in lines
    pin = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and f"ARG TORCH_VERSION={pin.group(1)}" in lines, "torch pin out of step"
    torch_at = text.index("https://download.pytorch.org/whl/${TORCH_VARIANT}")
    assert torch_at < text.index("pip install -r"), "torch must be installed before the deps"
    # dependencies are installed before the source is copied (cached layer)
    assert text.index("pip install -r") < text.index("COPY --chown=root:root app")
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(ln.startswith("HEALTHCHECK ") for ln in lines)
    cmd = next(ln for ln in reversed(lines) if ln.startswith("CMD "))
    assert yaml.safe_load(cmd.removeprefix("CMD ")) == API_COMMAND
    for secret in ("REDIS_PASSWORD", "API_KEY"):
        assert secret not in text, f"{secret} must not be baked into the image"
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".git"} <= ignored


def test_gpu_benchmark_script_runs_without_gpu(tmp_path: Path) -> None:
    """benchmarks/gpu.sh runs anywhere and exits 0; here with a tiny time budget."""
    env = {**os.environ, "OUT": str(tmp_path), "TOTAL_S": "12", "PY": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    import torch

    if not torch.cuda.is_available():
        assert "no GPU found" in proc.stdout and "no GPU found" in summary
    assert (tmp_path / "env.txt").exists() and (tmp_path / "tables.md").exists()


# --- 2. docker-compose config -------------------------------------------------------------------


def compose_clis() -> list[list[str]]:
    clis = []
    if shutil.which("docker-compose"):
        clis.append(["docker-compose"])
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        clis.append([docker, "compose"])
    return clis


def compose_config(cli: list[str], *args: str, env_file: Path = ENV_EXAMPLE):
    # Only the env file and what a shell always has: no REDIS_PASSWORD from the caller's env.
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    cmd = [*cli, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


CONFIG_CASES = {
    "default": [],
    "cpu": ["--profile", "cpu"],
    "gpu+monitoring": ["--profile", "gpu", "--profile", "monitoring"],
    "2gpu": ["-f", str(OVERRIDE_2GPU), "--profile", "gpu"],
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_docker_compose_config(case: str) -> None:
    clis = compose_clis()
    if not clis:
        pytest.fail(
            "neither docker-compose nor `docker compose` is installed: `make test` installs "
            "Debian's docker-compose (the compose-spec JSON schema is not available offline)"
        )
    args = CONFIG_CASES[case]
    # -f options (the override) go before the subcommand, profiles too
    for cli in clis:
        proc = compose_config(cli, *args, "config", "-q")
        assert proc.returncode == 0, f"{' '.join(cli)} {case}: {proc.stderr}"


def test_docker_compose_config_requires_redis_password(tmp_path: Path) -> None:
    clis = compose_clis()
    if not clis:
        pytest.fail("neither docker-compose nor `docker compose` is installed (`make test`)")
    env_file = tmp_path / "no-password.env"
    env_file.write_text(
        "".join(
            line + "\n"
            for line in ENV_EXAMPLE.read_text().splitlines()
            if not line.startswith("REDIS_PASSWORD=")
        )
    )
    for cli in clis:
        proc = compose_config(cli, "config", "-q", env_file=env_file)
        assert proc.returncode != 0
        assert "set REDIS_PASSWORD in .env" in proc.stdout + proc.stderr


# --- 3. the compose commands as local processes --------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def dockerfile_healthcheck() -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK instruction."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK "))
    return yaml.safe_load(line.split(" CMD ", 1)[1])


def first_job_snippet() -> str:
    """The Python of the "first job" example in docs/deploy.md."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    m = re.search(r"```bash\npython3 - <<'EOF'\n(.*?)\nEOF\n```", text, flags=re.S)
    assert m, "first-job example not found in docs/deploy.md"
    return m.group(1)


def local_argv(command: list[str]) -> list[str]:
    """The compose command with the image's interpreter replaced by this one (same flags)."""
    head, *rest = command
    if head == "python":
        return [sys.executable, *rest]
    if head == "uvicorn":
        return [sys.executable, "-m", "uvicorn", *rest]
    raise AssertionError(f"unexpected command {command}")


def replace_option(argv: list[str], option: str, value: str) -> list[str]:
    i = argv.index(option)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def base_env() -> dict[str, str]:
    """What the image provides besides the compose environment (Dockerfile ENV)."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    return env


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path):
        self.name = name
        self.log = logdir / f"{name}.log"
        self._fh = self.log.open("wb")
        self.popen = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self._fh, stderr=subprocess.STDOUT
        )

    def tail(self, n: int = 4000) -> str:
        if not self._fh.closed:
            self._fh.flush()
        return f"--- {self.name} log ---\n" + self.log.read_text(errors="replace")[-n:]

    def check_alive(self) -> None:
        rc = self.popen.poll()
        assert rc is None, f"{self.name} exited with {rc}\n{self.tail()}"

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, as `docker stop` sends; SIGKILL after ``timeout`` (like stop_grace_period)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                self._fh.close()
                return None
        self._fh.close()
        return self.popen.returncode


@contextlib.contextmanager
def running(procs: list[Proc]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in reversed(procs):
            p.stop(timeout=10)


def wait_until(predicate, what: str, timeout: float, procs: list[Proc]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            p.check_alive()
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(p.tail() for p in procs))


@pytest.mark.redis
@pytest.mark.slow
def test_compose_services_as_local_processes(
    tmp_path: Path, services: dict[str, Any], env_example: dict[str, str]
) -> None:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.fail("redis-server is not installed: `make test` installs it (Debian redis-server)")
    import httpx
    import redis as redis_py
    import torch

    import compute
    from app.client import Client

    # .env.example with a fresh test password, rendered as compose would render it
    env_file = {**env_example, "REDIS_PASSWORD": secrets.token_hex(16)}
    password = env_file["REDIS_PASSWORD"]
    redis_svc = rendered(services["redis"], env_file)
    api_svc = rendered(services["api"], env_file)
    worker_svc = rendered(services["worker-cpu"], env_file)  # the profile for GPU-less hosts

    redis_port, api_port, metrics_port = free_port(), free_port(), free_port()
    logdir = tmp_path / "logs"
    logdir.mkdir()
    data = tmp_path / "redis-data"
    data.mkdir()

    # Redis: the compose flags (AOF everysec, noeviction, requirepass ...) + loopback/port/dir
    redis_argv = [
        redis_server,
        *[str(a) for a in redis_svc["command"][1:]],
        *["--bind", "127.0.0.1", "--port", str(redis_port), "--dir", str(data)],
        *["--daemonize", "no", "--protected-mode", "yes"],
    ]
    assert "--requirepass" in redis_argv and password in redis_argv

    def local_env(svc: dict[str, Any], **extra: str) -> dict[str, str]:
        env = {k: str(v) for k, v in svc["environment"].items()}
        compose_url = f"redis://:{password}@redis:6379/0"
        assert env["REDIS_URL"] == compose_url
        env["REDIS_URL"] = f"redis://:{password}@127.0.0.1:{redis_port}/0"
        return {**base_env(), **env, **extra}

    api_argv = local_argv(api_svc["command"])
    api_argv = replace_option(
        replace_option(api_argv, "--host", "127.0.0.1"), "--port", str(api_port)
    )
    api_env = local_env(api_svc)
    worker_argv = local_argv(worker_svc["command"])
    worker_env = local_env(worker_svc, METRICS_PORT=str(metrics_port))
    assert worker_env["WORKER_DEVICE"] == "cpu"

    procs: list[Proc] = []
    with running(procs):
        procs.append(Proc("redis", redis_argv, base_env(), logdir))
        r = redis_py.Redis(host="127.0.0.1", port=redis_port, password=password)
        wait_until(r.ping, "redis-server", 20, procs)
        # the password is enforced, the durability settings are the compose ones
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(host="127.0.0.1", port=redis_port).ping()
        cfg = r.config_get("*")
        assert cfg["appendonly"] == "yes" and cfg["appendfsync"] == "everysec"
        assert cfg["maxmemory-policy"] == "noeviction"

        procs.append(Proc("api", api_argv, api_env, logdir))
        procs.append(Proc("worker", worker_argv, worker_env, logdir))
        base = f"http://127.0.0.1:{api_port}"
        http = httpx.Client(base_url=base, timeout=10)
        wait_until(lambda: http.get("/health/live").status_code == 200, "API live", 90, procs)
        wait_until(
            lambda: http.get("/health/ready").status_code == 200, "API ready (worker up)", 90, procs
        )
        # the image's HEALTHCHECK_URL for the API answers
        assert (
            http.get(
                api_env["HEALTHCHECK_URL"].replace("127.0.0.1:8000", f"127.0.0.1:{api_port}")
            ).status_code
            == 200
        )

        # a client session: attention job -> wait -> the same output as compute called directly
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
        with Client(base, api_key=api_env.get("API_KEY") or None) as client:
            assert client.ready()
            result = client.attention(q, k, v, method="exact").wait(timeout=120)
        expected = compute.attention(q, k, v, method="exact").output
        torch.testing.assert_close(result.output, expected, rtol=1e-4, atol=1e-5)

        # Prometheus metrics on the API and on the worker's METRICS_PORT
        api_metrics = http.get("/metrics").text
        worker_metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        missing = [m for m in API_METRICS if f"# TYPE {m}" not in api_metrics]
        missing += [m for m in WORKER_METRICS if f"# TYPE {m}" not in worker_metrics]
        assert not missing, f"metrics not found: {missing}"
        # the session's job is visible: queue depth per operation on the API, a duration
        # observation per method on the worker
        api_samples, worker_samples = samples(api_metrics), samples(worker_metrics)
        assert api_samples[("attn_queue_depth", (("op", "attention"),))] == 0
        key = ("attn_job_seconds_count", (("method", "exact"), ("op", "attention")))
        assert worker_samples.get(key) == 1, worker_metrics

        # the first-job snippet of docs/deploy.md, against this API
        snippet = first_job_snippet().replace("http://127.0.0.1:8000", base)
        proc = subprocess.run(
            [sys.executable, "-"],
            input=snippet,
            capture_output=True,
            text=True,
            timeout=120,
            env={**base_env(), "API_KEY": api_env["API_KEY"]},
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0] == "succeeded", proc.stdout

        # the healthchecks of the image (API) and of the compose services (worker, Redis)
        api_check = dockerfile_healthcheck()
        assert api_check[0] == "python"
        env = {**api_env, "HEALTHCHECK_URL": f"{base}/health/live"}
        assert subprocess.run([sys.executable, *api_check[1:]], env=env, timeout=30).returncode == 0
        kind, *check = worker_svc["healthcheck"]["test"]
        assert kind == "CMD" and check[0] == "python"
        proc = subprocess.run([sys.executable, *check[1:]], env=worker_env, timeout=30)
        assert proc.returncode == 0
        kind, check_sh = redis_svc["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        check_sh = check_sh.replace("redis-cli", f"redis-cli -p {redis_port}")
        env = {**base_env(), **{k: str(v) for k, v in redis_svc["environment"].items()}}
        assert subprocess.run(["sh", "-c", check_sh], env=env, timeout=30).returncode == 0
        env.pop("REDISCLI_AUTH")
        assert subprocess.run(["sh", "-c", check_sh], env=env, timeout=30).returncode != 0

        # docker stop: SIGTERM, then SIGKILL after stop_grace_period; an idle worker and the API
        # must exit well within it
        grace = min(seconds(services["worker-cpu"]["stop_grace_period"]), 60)
        for p in (procs.pop(), procs.pop()):
            rc = p.stop(timeout=grace)
            assert rc is not None, f"{p.name} ignored SIGTERM for {grace}s\n{p.tail()}"
            if p.name == "api":
                # uvicorn shuts down gracefully, then re-raises the signal (exit 143 in docker)
                assert rc in (0, -signal.SIGTERM), f"api exited with {rc}\n{p.tail()}"
                assert "Finished server process" in p.tail(), p.tail()
            else:
                assert rc == 0, f"{p.name} exited with {rc} on SIGTERM\n{p.tail()}"
