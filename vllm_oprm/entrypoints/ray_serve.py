"""N ``vllm-oprm serve`` replicas behind one endpoint, with Ray Serve.

    python -m vllm_oprm.entrypoints.ray_serve MODEL --replicas 2 [--host 127.0.0.1] [--port 8000] \\
        [--num-cpus-per-replica 1] [--num-gpus-per-replica 0] [any vllm-oprm serve argument]

Each replica of the Ray Serve deployment (one Ray actor) starts its own
``vllm-oprm serve`` on a local port and forwards every HTTP request to it
unchanged, streaming responses included. Ray Serve's proxy is the one endpoint:
it spreads requests over the replicas and replaces a replica whose server fails
its health check. A replica therefore answers exactly as the single server does
(OPRM options, ``oprm`` metadata, 400s); ``/metrics`` shows the replica that
answered, named in each response's ``x-oprm-replica`` header.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import httpx
from fastapi import FastAPI, Request
from ray import serve
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from .local_server import start_local_server

# Per-connection headers, and lengths that no longer hold once the body is re-streamed.
HOP_BY_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te", "trailer"}
REPLICA_HEADER = "x-oprm-replica"

app = FastAPI()


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(app)
class OPRMServerReplica:
    """One replica: its own OPRM server, and a proxy to it."""

    def __init__(self, model: str, server_args: Sequence[str]):
        self.server = start_local_server(model, server_args, timeout_s=900)
        self.client = httpx.AsyncClient(base_url=self.server.url, timeout=None)
        self.name = serve.get_replica_context().replica_tag

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def forward(self, path: str, request: Request) -> StreamingResponse:
        headers = [(k, v) for k, v in request.headers.raw if k.decode().lower() not in HOP_BY_HOP]
        upstream = self.client.build_request(
            request.method, "/" + path, params=request.query_params, headers=headers, content=await request.body()
        )
        reply = await self.client.send(upstream, stream=True)
        answer = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP}
        answer[REPLICA_HEADER] = self.name
        # A client that goes away cancels this stream, which closes the upstream connection: the
        # replica's server sees the disconnect and aborts the request's chunk requests.
        return StreamingResponse(
            reply.aiter_raw(), status_code=reply.status_code, headers=answer, background=BackgroundTask(reply.aclose)
        )

    def check_health(self) -> None:
        if not self.server.healthy():
            raise RuntimeError(f"vllm-oprm serve of replica {self.name} is down (log {self.server.log_path})")

    def __del__(self) -> None:
        self.server.stop()


def deploy(
    model: str,
    server_args: Sequence[str] = (),
    replicas: int = 2,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: float = 1,
    num_gpus: float = 0,
) -> str:
    """Run ``replicas`` OPRM servers behind Ray Serve's proxy on ``host:port`` (Ray must be up); returns its URL."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    serve.start(http_options={"host": host, "port": port})
    deployment = OPRMServerReplica.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}
    )
    serve.run(deployment.bind(model, list(server_args)), name="vllm-oprm", route_prefix="/")
    return f"http://{host}:{port}"


def main(argv: Sequence[str] | None = None) -> None:
    import ray

    parser = argparse.ArgumentParser(prog="python -m vllm_oprm.entrypoints.ray_serve")
    parser.add_argument("model")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus-per-replica", type=float, default=1)
    parser.add_argument("--num-gpus-per-replica", type=float, default=0)
    args, server_args = parser.parse_known_args(argv)
    ray.init()  # a local Ray, or the cluster named by RAY_ADDRESS
    url = deploy(args.model, server_args, args.replicas, args.host, args.port,
                 args.num_cpus_per_replica, args.num_gpus_per_replica)
    print(f"vllm-oprm: {args.replicas} replicas serving at {url}/v1", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
