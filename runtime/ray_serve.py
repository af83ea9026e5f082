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
"""

from __future__ import annotations

from typing import Any

from ray import serve

from qwen2_ref.errors import Qwen2Error


@serve.ingress()  # the app is built per replica, after __init__ (it needs the replica's own engine)
class Qwen2Replica:
    def __init__(self, model: str, name: str, max_batch: int = 4, max_queue: int = 64, context: int | None = None,
                 timeout_s: float | None = None, threads: int = 1, prefill_chunk: int = 256, lookup: int = 0):
        import ray

        from .batching import BatchEngine
        from .runner import Runner
        from .session import SessionSettings

        self.engine = BatchEngine(Runner(model, SessionSettings(threads=threads)), slots=max_batch,
                                  capacity=context, chunk=prefill_chunk, max_queue=max_queue, lookup=lookup)
        ctx = serve.get_replica_context()
        self.replica = f"{ctx.replica_id.unique_id}@{ray.get_runtime_context().get_node_id()[:12]}"
        self.name, self.timeout_s = name, timeout_s

    def __serve_build_asgi_app__(self):
        from .server import create_app

        return create_app(self.engine, self.name, self.timeout_s, replica=self.replica)


def application(model: str, name: str, replicas: int | None = None, autoscale: tuple[int, int] | None = None,
                max_batch: int = 4, max_queue: int = 64, context: int | None = None, timeout_s: float | None = None,
                num_cpus: float = 1, threads: int | None = None, prefill_chunk: int = 256, lookup: int = 0):
    """The bound Ray Serve application: `replicas` fixed, or `autoscale` = (min, max) replicas."""
    from pathlib import Path

    from .folder import open_export

    max_queue = max(max_queue, 2 * max_batch)
    folder = open_export(model)  # a bad folder is one line here, not a replica crash loop on every node
    if folder.report.get("plan", {}).get("attention") != "seqlens":
        raise Qwen2Error(f"{folder.path}: continuous batching needs an export whose rows keep their own lengths: "
                         "re-export with --attention seqlens")
    if replicas is not None and autoscale is not None:
        raise Qwen2Error("give either a fixed number of replicas or an autoscaling range, not both")
    # A replica takes twice the rows it decodes together (the rest wait in its engine's queue); beyond that Ray
    # Serve holds requests at the proxy and sends each to the least busy replica, so load spreads over nodes even
    # though the proxy prefers replicas on its own node.
    opts: dict[str, Any] = {"name": "qwen2", "ray_actor_options": {"num_cpus": num_cpus},
                            "max_ongoing_requests": 2 * max_batch, "health_check_period_s": 5}
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
        str(Path(model).resolve()), name, max_batch, max_queue, context, timeout_s,
        threads or max(1, int(num_cpus)), prefill_chunk, lookup)


def app_builder(args: dict[str, str]):
    """For `serve run runtime.ray_serve:app_builder model=DIR [name=ID] [replicas=N | autoscale=MIN,MAX]
    [max_batch=N] [num_cpus=N] [lookup=N]`."""
    from pathlib import Path

    if "model" not in args:
        raise Qwen2Error("serve run runtime.ray_serve:app_builder needs model=DIR")
    auto = tuple(int(x) for x in args["autoscale"].split(",")) if "autoscale" in args else None
    return application(args["model"], args.get("name", Path(args["model"]).resolve().name),
                       int(args["replicas"]) if "replicas" in args else None, auto,  # type: ignore[arg-type]
                       max_batch=int(args.get("max_batch", 4)), num_cpus=float(args.get("num_cpus", 1)),
                       lookup=int(args.get("lookup", 0)))


def run(app, host: str, port: int, address: str | None) -> None:
    """Start (or join) Ray, put the HTTP proxy on host:port, deploy, and serve until interrupted."""
    import logging

    import ray

    log = logging.getLogger("qwen2.serve")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="qwen2", route_prefix="/")
    log.info("serving on http://%s:%d/v1 through Ray Serve (%d nodes, %d CPUs); Ctrl-C stops", host, port,
             len(ray.nodes()), ray.cluster_resources().get("CPU", 0))
    try:
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
