"""The same OpenAI-compatible server on Ray Serve, for more than one machine: replicas of the FastAPI app
(server.py), each owning one ONNX Runtime session and its continuous-batching engine, behind Ray Serve's HTTP proxy,
which spreads requests over them and starts a new replica when one dies.

    python -m runtime serve --model DIR --ray --replicas 2                 # a local Ray instance
    python -m runtime serve --model DIR --ray --autoscale 1,4 --ray-address auto   # a running cluster
    serve run runtime.ray_serve:app_builder model=DIR replicas=2          # Ray's own CLI

Every node needs the export folder at the same path (a shared file system or a copy). Each replica asks Ray for
`num_cpus` CPUs (1 by default) and runs ONNX Runtime with that many threads, so Ray places as many replicas on a
node as it has CPUs. With `autoscale` Ray Serve keeps between MIN and MAX replicas, aiming at `max_batch` requests in
flight per replica (the rows one replica decodes together).

The app is built in the replica (`__serve_build_asgi_app__`), after its engine: Ray Serve 2.60 then runs the app's
lifespan there (uvicorn's LifespanOn), which starts the engine thread, and runs the lifespan's shutdown from the
replica's destructor, which stops it. Each replica names itself `<replica id>@<node id>` in an `x-replica` header on
every answer and in GET /health.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from qwen2_ref.errors import Qwen2Error

from .session import CUDA, SessionSettings

APP = "qwen2"  # the Serve application's name (and its deployment's); a replica's actor: SERVE_REPLICA::qwen2#qwen2#ID
log = logging.getLogger("qwen2.serve")


@serve.ingress()  # the app is built per replica, after __init__ (it needs the replica's own engine)
class Qwen2Replica:
    def __init__(self, model: str, name: str, settings: SessionSettings, max_batch: int = 4, max_queue: int = 64,
                 context: int | None = None, timeout_s: float | None = None, prefill_chunk: int = 256,
                 lookup: int = 0):
        import ray

        from .batching import BatchEngine
        from .runner import Runner

        self.engine = BatchEngine(Runner(model, settings), slots=max_batch, capacity=context, chunk=prefill_chunk,
                                  max_queue=max_queue, lookup=lookup)
        ctx = serve.get_replica_context()
        self.replica = f"{ctx.replica_id.unique_id}@{ray.get_runtime_context().get_node_id()[:12]}"
        self.name, self.timeout_s = name, timeout_s

    def __serve_build_asgi_app__(self):
        from .server import create_app

        return create_app(self.engine, self.name, self.timeout_s, replica=self.replica)


def application(model: str, name: str, replicas: int | None = None, autoscale: tuple[int, int] | None = None,
                max_batch: int = 4, max_queue: int = 64, context: int | None = None, timeout_s: float | None = None,
                num_cpus: float = 1, threads: int | None = None, prefill_chunk: int = 256, lookup: int = 0,
                settings: SessionSettings | None = None):
    """The bound Ray Serve application: `replicas` fixed, or `autoscale` = (min, max) replicas. `settings`: each
    replica's ONNX Runtime session (providers, ...); its threads are `threads`, else `num_cpus` (at least 1). A
    replica whose providers include CUDA asks Ray for one GPU."""
    from pathlib import Path

    from .folder import open_export

    max_queue = max(max_queue, 2 * max_batch)
    folder = open_export(model)  # a bad folder is one line here, not a replica crash loop on every node
    if folder.report.get("plan", {}).get("attention") != "seqlens":
        raise Qwen2Error(f"{folder.path}: continuous batching needs an export whose rows keep their own lengths: "
                         "re-export it with --attention seqlens")
    if replicas is not None and autoscale is not None:
        raise Qwen2Error("give either a fixed number of replicas or an autoscaling range, not both")
    settings = (settings or SessionSettings()).with_(threads=threads or max(1, int(num_cpus)))
    actor: dict[str, Any] = {"num_cpus": num_cpus} | ({"num_gpus": 1} if CUDA in settings.providers else {})
    # A replica takes twice the rows it decodes together (the rest wait in its engine's queue); beyond that Ray
    # Serve holds requests at the proxy and sends each to the least busy replica, so load spreads over nodes even
    # though the proxy prefers replicas on its own node.
    opts: dict[str, Any] = {"name": APP, "ray_actor_options": actor, "max_ongoing_requests": 2 * max_batch,
                            "health_check_period_s": 5}
    if autoscale is not None:
        lo, hi = autoscale
        if not 0 <= lo <= hi or hi < 1:
            raise Qwen2Error(f"autoscale {lo},{hi}: expected MIN,MAX with 0 <= MIN <= MAX and MAX >= 1")
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                      "target_ongoing_requests": max_batch, "upscale_delay_s": 10,
                                      "downscale_delay_s": 120}
    else:
        opts["num_replicas"] = replicas or 1
    return serve.deployment(Qwen2Replica).options(**opts).bind(
        str(Path(model).resolve()), name, settings, max_batch, max_queue, context, timeout_s, prefill_chunk, lookup)


BUILDER_ARGS = {"model": str, "name": str, "replicas": int, "autoscale": str, "max_batch": int, "max_queue": int,
                "context": int, "timeout_s": float, "num_cpus": float, "threads": int, "prefill_chunk": int,
                "lookup": int}


def app_builder(args: dict[str, str]):
    """For `serve run runtime.ray_serve:app_builder model=DIR [name=ID] [replicas=N | autoscale=MIN,MAX]
    [max_batch=N] [max_queue=N] [context=N] [timeout_s=S] [num_cpus=N] [threads=N] [prefill_chunk=N] [lookup=N]`."""
    from pathlib import Path

    unknown = sorted(set(args) - set(BUILDER_ARGS))
    if unknown:
        raise Qwen2Error(f"unknown argument {unknown[0]}=...; runtime.ray_serve:app_builder takes "
                         f"{', '.join(k + '=' for k in BUILDER_ARGS)}")
    if "model" not in args:
        raise Qwen2Error("serve run runtime.ray_serve:app_builder needs model=DIR")
    kw: dict[str, Any] = {}
    for k, v in args.items():
        try:
            kw[k] = BUILDER_ARGS[k](v)
            if k == "autoscale":
                kw[k] = tuple(int(x) for x in v.split(","))
                if len(kw[k]) != 2:
                    raise ValueError
        except ValueError:
            want = {"autoscale": "MIN,MAX (two integers)", "int": "an integer", "float": "a number"}
            raise Qwen2Error(f"{k}={v!r}: expected {want.get(k) or want[BUILDER_ARGS[k].__name__]}") from None
    kw.setdefault("name", Path(kw["model"]).resolve().name)
    return application(**kw)


def run(app, host: str, port: int, address: str | None) -> None:
    """Start Ray here (`address` None) or join the cluster at `address` ('auto': the one started on this machine
    with `ray start`), put Ray Serve's HTTP proxy on host:port, deploy `app`, and serve until Ctrl-C or SIGTERM;
    then remove the app (and stop the Ray started here)."""
    import os
    import signal
    import time

    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if address in (None, "local"):
        _port_free(host, port)  # on a cluster Serve may already listen there: its proxy is reused
    elif address != "auto":
        _reachable(address)
    try:
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING)
    except ConnectionError as e:  # "auto" with no cluster on this machine, a refused handshake
        hint = ""
        if address != "auto" and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            # Ray 2.60 sends its token (~/.ray/auth_token or RAY_AUTH_TOKEN) to an explicit address only when told
            hint = "; if the cluster uses token authentication, set RAY_AUTH_MODE=token (and its token) here"
        raise Qwen2Error(f"--ray-address {address}: {str(e).splitlines()[0]}{hint}") from None

    def stop(signum, frame):  # SIGTERM (docker stop, systemd) shuts down like Ctrl-C, not with Ray's stack dump
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP, route_prefix="/")
        log.info("serving on http://%s:%d/v1 through Ray Serve (%d nodes, %g CPUs); Ctrl-C stops", host, port,
                 len(ray.nodes()), ray.cluster_resources().get("CPU", 0))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    except RuntimeError as e:  # a replica or the proxy failed to start
        raise Qwen2Error(f"Ray Serve could not start the app: {_why(e)}") from None
    finally:
        try:
            if address in (None, "local"):
                serve.shutdown()  # the Ray instance is ours: everything goes
            else:
                serve.delete(APP)  # a shared cluster: only our app; Serve and other apps stay
        except Exception:  # noqa: BLE001 - already stopping; Ray reports its own errors
            pass
        ray.shutdown()


def _why(e: Exception) -> str:
    """The error a failed deployment ends with: the replicas' own exception, the last one in the deployment's status
    message (a remote traceback), without its module path; else the exception's last line."""
    import re

    text = ""
    try:
        status = serve.status().applications[APP].deployments.get(APP)
        text = status.message if status is not None else ""
    except Exception:  # noqa: BLE001 - the status is a nicety; fall back to the exception's text
        pass
    errors = [line.strip() for line in text.splitlines() if re.match(r"\s*[\w.]*(Error|Exception): ", line)
              and "Traceback (most recent" not in line]
    last = errors[-1] if errors else ([line for line in str(e).splitlines() if line.strip()] or [repr(e)])[-1]
    return re.sub(r"^([a-z_]\w*\.)+", "", last.strip())[:500]


def _reachable(address: str) -> None:
    """A cluster address that does not answer makes ray.init retry for minutes: one line now instead."""
    import socket

    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except ValueError:
        raise Qwen2Error(f"--ray-address {address}: expected HOST:PORT (the head's `ray start --head --port`), "
                         "or auto") from None
    except OSError as e:
        raise Qwen2Error(f"--ray-address {address}: nothing answers there ({e.strerror or e}); start the head "
                         "with `ray start --head`, or leave out --ray-address to start Ray here") from None


def _port_free(host: str, port: int) -> None:
    """The proxy would fail to bind host:port after Ray and Serve have started, with its traceback: check first."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        raise Qwen2Error(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); pick another "
                         "--port") from None
