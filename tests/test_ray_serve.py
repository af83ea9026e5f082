"""The Ray Serve deployment (runtime/ray_serve.py) on a two-node Ray cluster simulated on this machine
(`ray.cluster_utils.Cluster`, loopback, one CPU per node): two replicas, each on its own node with its own ONNX
Runtime session, driven through Serve's HTTP proxy by the `openai` client and httpx. Greedy completions from both
replicas equal the library's; requests spread over both; a replica killed while streams are running on it leaves the
other serving: every request in flight returns (none hangs), a finished answer or a clean failure (an HTTP error
status, or a stream that ends without `data: [DONE]`, as HTTP ends a response whose sender died after its headers),
the next requests all succeed, and Ray Serve starts a new replica."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the Ray Serve deployment needs ray[serve]: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="the Ray Serve deployment needs ray[serve]: pip install -e '.[ray]'")
openai = pytest.importorskip("openai")

from runtime.ray_serve import APP, application  # noqa: E402

from .test_server import NAME, alone, tiny_server_export  # noqa: E402

CONTEXT = 1024  # room for streams long enough (about a second) to be killed mid-way


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray.cluster_utils import Cluster

    folder = tiny_server_export(tmp_path_factory.mktemp("ray") / "seqlens")
    small = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    c = Cluster(initialize_head=True, head_node_args=small | {"include_dashboard": False})
    try:
        c.add_node(**small)
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        port = _free_port()
        # both simulated nodes share one loopback address, so only the head runs an HTTP proxy
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(str(folder), NAME, replicas=2, max_batch=2, context=CONTEXT, num_cpus=1), name=APP,
                  route_prefix="/")
        yield folder, f"http://127.0.0.1:{port}"
    finally:
        for stop in (serve.shutdown, ray.shutdown, c.shutdown):
            try:
                stop()
            except Exception as e:  # noqa: BLE001 - the next ones must still run
                print(f"teardown: {stop.__module__}.{stop.__name__}: {e!r}")


def _complete(base: str, prompt: list[int], n: int) -> httpx.Response:
    return httpx.post(base + "/v1/completions", timeout=30,
                      json={"model": NAME, "prompt": prompt, "max_tokens": n, "temperature": 0})


def _burst(base: str, prompts: list[list[int]], n: int) -> list[httpx.Response]:
    """Concurrent requests, more than one replica takes (2 x max_batch in flight), so the proxy, which prefers the
    replica on its own node, sends the rest to the other node's."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda p: _complete(base, p, n), prompts))


def _replica_id(answer: httpx.Response) -> str:
    return answer.headers["x-replica"].split("@")[0]


def test_replicas_on_two_nodes_answer_like_the_library(cluster):
    folder, base = cluster
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model=NAME, prompt=[5, 9, 200, 31, 77, 12], max_tokens=12, temperature=0)
    assert r.choices[0].text == alone(folder, [5, 9, 200, 31, 77, 12], 12).text
    prompts = [[3 + i % 4, 40, 41, 42] for i in range(24)]
    want = {tuple(p): alone(folder, p, 40).text for p in prompts[:4]}
    answers = _burst(base, prompts, 40)
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    replicas = {a.headers["x-replica"] for a in answers}
    assert len(replicas) == 2 and len({r.split("@")[1] for r in replicas}) == 2  # two replicas, two nodes
    for p, a in zip(prompts, answers):  # both replicas answer as the library does
        assert a.json()["choices"][0]["text"] == want[tuple(p)], (p, a.headers["x-replica"])
    health = httpx.get(base + "/health").json()
    assert health["status"] == "ok" and health["replica"] in replicas
    bad = httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": [1], "max_tokens": 0})
    assert bad.status_code == 400 and "max_tokens must be at least 1" in bad.json()["error"]["message"]


def _stream(base: str, prompt: list[int], n: int, started) -> dict:
    """One streamed completion: the replica that answered, whether `data: [DONE]` came, how it ended."""
    out: dict = {"replica": None, "done": False, "error": None, "finished": False}
    try:
        with httpx.stream("POST", base + "/v1/completions", timeout=30,
                          json={"model": NAME, "prompt": prompt, "max_tokens": n, "temperature": 0,
                                "stream": True}) as r:
            out["status"], out["replica"] = r.status_code, r.headers.get("x-replica", "@").split("@")[0]
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started(out)
                out["done"] |= line == "data: [DONE]"
    except httpx.TimeoutException:
        out["error"] = "timeout"
    except httpx.HTTPError as e:  # the connection ended mid-response
        out["error"] = type(e).__name__
    finally:
        out["finished"] = True
        started(out)
    return out


def test_a_replica_killed_under_load(cluster):
    import threading

    _, base = cluster
    first = threading.Semaphore(0)
    opened: list[dict] = []

    def started(out):  # a stream's first event (or its end): it is running on out["replica"]
        if not out.get("started"):
            out["started"] = True
            opened.append(out)
            first.release()

    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(_stream, base, [7 + i, 8, 9], CONTEXT - 10, started) for i in range(6)]
        plain = [pool.submit(_complete, base, [20 + i, 8, 9], CONTEXT - 10) for i in range(2)]
        for _ in streams:
            assert first.acquire(timeout=30), "a stream never started"
        running: dict[str, int] = {}
        for o in opened:
            if not o["finished"] and o["replica"]:
                running[o["replica"]] = running.get(o["replica"], 0) + 1
        assert running, f"every stream ended before the kill: {opened}"
        victim = max(running, key=running.get)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#{APP}#{victim}", namespace="serve"), no_restart=True)
        try:
            ends = [f.result(timeout=60) for f in streams]
            statuses = [f.result(timeout=60).status_code for f in plain]
        except (TimeoutError, httpx.TimeoutException) as e:
            pytest.fail(f"a request in flight when its replica was killed hung: {e!r}")
    on_victim = [e for e in ends if e["replica"] == victim]
    print(f"killed {victim} with {running[victim]} streams running on it; its streams: "
          f"{[e['error'] or ('done' if e['done'] else 'ended early') for e in on_victim]}; other requests: {statuses}")
    assert on_victim and all(e["error"] != "timeout" for e in ends)
    assert all(e["done"] and e["error"] is None for e in ends if e["replica"] != victim)  # the survivor's finished
    assert all(s == 200 or s >= 500 for s in statuses)  # answered, or a clean HTTP error from the proxy
    after = [_complete(base, [11, 12, 13 + i], 6) for i in range(6)]  # the survivor serves at once
    assert all(a.status_code == 200 for a in after), [a.text for a in after]
    assert victim not in {_replica_id(a) for a in after}
    deadline = time.monotonic() + 60  # Ray Serve replaces the dead replica
    while serve.status().applications[APP].deployments[APP].replica_states != {"RUNNING": 2}:
        assert time.monotonic() < deadline, serve.status().applications[APP].deployments[APP]
        time.sleep(0.5)
    seen: set[str] = set()
    while len(seen) < 2:  # the proxy learns of the new replica a moment after the controller reports it running
        assert time.monotonic() < deadline + 30, f"only {seen} answer after the replacement"
        answers = _burst(base, [[2 + i, 5] for i in range(16)], 40)
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
        seen = {_replica_id(a) for a in answers}
        assert victim not in seen
